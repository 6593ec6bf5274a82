//! Collectives between ranks.
//!
//! [`Communicator`] is the one interface every transport implements: in-process threads
//! ([`local`]), and later shared memory, gRPC and NCCL. [`suite`] is a transport-generic test
//! suite: each transport runs the same checks against a float64 reference.

pub mod grpc;
pub mod links;
pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
#[cfg(feature = "cuda")]
pub mod peer;
pub mod select;
pub mod shm;
pub mod shm_links;
pub mod suite;
pub mod wire;

#[cfg(target_endian = "big")]
compile_error!(
    "shardwise sends tensors as little-endian bytes and supports little-endian targets only"
);

use std::fmt::Debug;

use candle_core::Tensor;

use crate::error::Result;

pub use local::LocalComm;

/// Collective operations among the ranks of one tensor-parallel group.
///
/// Calls are blocking and must be made by every rank in the same order (as with NCCL).
/// Every wait has a deadline: a rank that is gone or late is reported by number in an
/// [`crate::Error::Comm`], never waited on forever.
pub trait Communicator: Send + Sync + Debug {
    /// This rank's index, `0..world_size`.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Element-wise sum of `t` over all ranks, returned on every rank. Supports f32, bf16
    /// and f16; the result has the input's dtype and shape, and is identical on every rank.
    ///
    /// # Errors
    /// Shape or dtype differs between ranks, unsupported dtype, or a peer is gone.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// Concatenation of every rank's `t` along `dim`, in rank order. Pieces may differ in
    /// size along `dim` (uneven splits); other dimensions must agree.
    ///
    /// # Errors
    /// Mismatched shapes or dtypes between ranks, or a peer is gone.
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor>;

    /// [`Self::all_gather`] when the caller knows every rank's length along `dim`
    /// (`sizes[r]` for rank `r`, e.g. from the split plan): a transport that would otherwise
    /// exchange the lengths first skips that round trip.
    ///
    /// # Errors
    /// `sizes` does not list this rank's length at its index; as [`Self::all_gather`].
    fn all_gather_sized(&self, t: &Tensor, dim: usize, sizes: &[usize]) -> Result<Tensor> {
        check_gather_sizes(self, t, dim, sizes)?;
        self.all_gather(t, dim)
    }

    /// Rank `root`'s `t`, returned on every rank. Every rank passes a tensor of the same
    /// shape and dtype (its content is ignored except on `root`).
    ///
    /// # Errors
    /// `root` out of range, mismatched shapes, or a peer is gone.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;

    /// Returns once every rank has called it.
    ///
    /// # Errors
    /// A peer is gone or does not arrive before the deadline.
    fn barrier(&self) -> Result<()>;

    /// The device this rank computes on, where its collectives take their tensors (the CPU
    /// for every transport but NCCL).
    fn device(&self) -> candle_core::Device {
        candle_core::Device::Cpu
    }

    /// Where a row-parallel product whose output has `bytes` bytes may finish its
    /// all-reduce itself: the peer-memory path's buffers for such products (`None` without
    /// that path, for a larger output, or with `SHARDWISE_PEER_REDUCE=0`). The answer is the
    /// same on every rank; once it is `Some`, every rank must make exactly one call of that
    /// protocol for the tensor: the product's own (`layers::fused`), or
    /// [`Self::all_reduce_product`] after a product that could not.
    ///
    /// # Errors
    /// A peer missed a deadline earlier (named).
    fn reduce_target(&self, bytes: usize) -> Result<Option<PeerReduce>> {
        let _ = bytes;
        Ok(None)
    }

    /// [`Self::all_reduce_sum`] as a call of the [`Self::reduce_target`] protocol, for a rank
    /// whose product did not finish the all-reduce itself.
    ///
    /// # Errors
    /// As [`Self::all_reduce_sum`].
    fn all_reduce_product(&self, t: &Tensor) -> Result<Tensor> {
        self.all_reduce_sum(t)
    }
}

/// Where a product finishes its all-reduce itself over peer memory (see `comm::peer`): each
/// block takes a ticket (`ticket_take` there) for the call's number `e` and stores each 4-byte
/// word `i` of its output, tagged with `e` in the high half (`st_ll`), at word
/// `base + (e & 1) * half + rank * cap + i` of every peer `w`'s buffer `table[w]`. It then
/// waits for the peers' words at the same place of its own buffer (`ll_wait`, recording a
/// peer past `timeout` ns in `err`) and sums all ranks' in rank order.
#[derive(Debug, Clone, Copy)]
pub struct PeerReduce {
    /// Device address of every rank's buffer address (`u64` each).
    pub table: u64,
    /// Device address of the call ticket (`u64`).
    pub ticket: u64,
    /// Device address of the word a kernel sets to `peer + 1` when a peer misses the deadline.
    pub err: u64,
    /// This rank.
    pub rank: i32,
    /// Ranks in the group.
    pub world: i32,
    /// Words of one rank's slot.
    pub cap: u64,
    /// Words of one half of the region (every rank's slot).
    pub half: u64,
    /// Word where the region starts in each buffer.
    pub base: u64,
    /// How long to wait for a peer, ns.
    pub timeout: u64,
}

#[cfg(feature = "cuda")]
impl PeerReduce {
    /// Appends the target to a kernel's arguments, in the order the kernels take it
    /// (`peers, ticket, err, rank, world, cap, half, base, timeout`).
    pub(crate) fn push_args<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        use cudarc::driver::PushKernelArg;
        b.arg(&self.table)
            .arg(&self.ticket)
            .arg(&self.err)
            .arg(&self.rank)
            .arg(&self.world)
            .arg(&self.cap)
            .arg(&self.half)
            .arg(&self.base)
            .arg(&self.timeout);
    }
}

/// How a peer's tensor differs from this rank's, ignoring dimension `skip` (all-gather
/// pieces may differ there); `None` when they fit together.
pub(crate) fn mismatch(theirs: &Tensor, mine: &Tensor, skip: Option<usize>) -> Option<String> {
    let fits = theirs.dtype() == mine.dtype()
        && theirs.rank() == mine.rank()
        && (0..mine.rank()).all(|d| Some(d) == skip || theirs.dims()[d] == mine.dims()[d]);
    (!fits).then(|| {
        format!(
            "sent {:?} {:?}, this rank has {:?} {:?}",
            theirs.dims(),
            theirs.dtype(),
            mine.dims(),
            mine.dtype()
        )
    })
}

/// Checks that `sizes` has one entry per rank and this rank's entry is `t`'s length along
/// `dim`.
pub(crate) fn check_gather_sizes<C: Communicator + ?Sized>(
    comm: &C,
    t: &Tensor,
    dim: usize,
    sizes: &[usize],
) -> Result<()> {
    let len = t.dim(dim)?;
    if sizes.len() != comm.world_size() || sizes.get(comm.rank()) != Some(&len) {
        return Err(crate::Error::Comm {
            rank: comm.rank(),
            op: "all_gather",
            reason: format!(
                "sizes {sizes:?} do not fit {} ranks with this rank's {len} along dim {dim}",
                comm.world_size()
            ),
        });
    }
    Ok(())
}

/// A tuning knob from the environment (`SHARDWISE_CHUNK_BYTES`, ...), or `default` when it is
/// unset or not a number.
pub(crate) fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `f(rank, input)` for each input on its own thread (the ranks of one process) and
/// returns the results in rank order.
///
/// # Errors
/// The first rank's error; a rank that panics becomes an error naming it.
pub fn each_rank<I: Send, T: Send>(
    inputs: Vec<I>,
    f: impl Fn(usize, I) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = inputs
            .into_iter()
            .enumerate()
            .map(|(r, input)| {
                let f = &f;
                s.spawn(move || f(r, input))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(crate::error::Error::Comm {
                        rank: r,
                        op: "rank thread",
                        reason: format!("rank {r} panicked"),
                    })
                })
            })
            .collect()
    })
}
