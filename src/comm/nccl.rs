//! NCCL collectives on CUDA tensors (cargo feature `cuda`), through cudarc.
//!
//! [`NcclComm`] implements [`Communicator`] on device buffers: the all-reduce, all-gather and
//! broadcast run as candle custom ops whose CUDA path hands the tensor's device memory to
//! NCCL on the device's stream, so nothing is staged through the host. Rank 0 creates the
//! unique id ([`new_unique_id`]); every rank passes the same 128 bytes to [`NcclComm::init`]
//! (in-process ranks share it directly, remote ranks get it through the control plane).

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::Communicator;
use crate::error::{Error, Result};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// A fresh NCCL unique id (rank 0 makes it; every rank initialises with the same bytes).
///
/// # Errors
/// NCCL cannot be loaded or has no usable network/device.
pub fn new_unique_id() -> Result<[u8; ID_BYTES]> {
    let id = Id::new().map_err(|e| nccl_err(0, "unique id", e))?;
    Ok(id.internal().map(|c| c as u8))
}

fn nccl_err(rank: usize, op: &'static str, e: impl std::fmt::Debug) -> Error {
    Error::Comm {
        rank,
        op,
        reason: format!("NCCL: {e:?}"),
    }
}

/// The NCCL communicator handle. NCCL allows a communicator to be used from any thread as
/// long as calls on it do not overlap; the mutex in [`NcclComm`] serialises them.
struct SharedComm(Comm);

// SAFETY: the raw communicator pointer is only used under `NcclComm::comm`'s mutex, one call
// at a time, which is NCCL's requirement for using a communicator from several threads.
unsafe impl Send for SharedComm {}
// SAFETY: as above; `&SharedComm` is never used without holding the mutex.
unsafe impl Sync for SharedComm {}

/// One rank of an NCCL group, bound to one CUDA device.
pub struct NcclComm {
    comm: Arc<Mutex<SharedComm>>,
    rank: usize,
    world: usize,
    device: Device,
    /// The one-shot all-reduce for small messages, when every rank could open every peer.
    peer: Option<super::peer::PeerAllReduce>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclComm(rank {} of {}, {:?})",
            self.rank, self.world, self.device
        )
    }
}

impl NcclComm {
    /// Joins the group `id` as `rank` of `world` on CUDA device `ordinal`. Waits until every
    /// rank has joined (NCCL's own initialisation), at most `SHARDWISE_NCCL_INIT_DEADLINE_MS`
    /// (default 120 s): NCCL's initialisation has no timeout of its own, so it runs on a
    /// helper thread, which a rank that never joins leaves blocked (the process is expected to
    /// exit on the error).
    ///
    /// # Errors
    /// No such device, NCCL initialisation fails, or not every rank joined in time.
    pub fn init(rank: usize, world: usize, ordinal: usize, id: &[u8; ID_BYTES]) -> Result<Self> {
        let device = crate::cuda::device(ordinal)?;
        let stream = device.as_cuda_device()?.cuda_stream();
        let id = Id::uninit(id.map(|b| b as core::ffi::c_char));
        let ms = super::env_usize("SHARDWISE_NCCL_INIT_DEADLINE_MS", 120_000);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("nccl-init-{rank}"))
            .spawn(move || {
                let joined = stream
                    .context()
                    .bind_to_thread()
                    .map_err(|e| nccl_err(rank, "init", e))
                    .and_then(|()| {
                        Comm::from_rank(stream, rank, world, id)
                            .map(SharedComm)
                            .map_err(|e| nccl_err(rank, "init", e))
                    });
                // The receiver is gone only if it gave up waiting.
                let _ = tx.send(joined);
            })
            .map_err(|e| nccl_err(rank, "init", e))?;
        use std::sync::mpsc::RecvTimeoutError;
        let comm = match rx.recv_timeout(std::time::Duration::from_millis(ms as u64)) {
            Ok(joined) => joined?,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(nccl_err(rank, "init", "the initialising thread panicked"))
            }
            Err(RecvTimeoutError::Timeout) => {
                return Err(Error::Comm {
                    rank,
                    op: "init",
                    reason: format!(
                        "not every rank of {world} joined the NCCL group within {ms} ms (a rank \
                         is gone or never started)"
                    ),
                })
            }
        };
        let mut me = Self {
            comm: Arc::new(Mutex::new(comm)),
            rank,
            world,
            device,
            peer: None,
        };
        me.peer = me.open_peer_path()?;
        Ok(me)
    }

    /// Sets up the peer-memory all-reduce with the other ranks (a collective: every rank
    /// calls it, and all use it or none). `SHARDWISE_PEER_ALLREDUCE=0` opts a rank out, and
    /// with it the group. Failing to set it up is not an error: NCCL serves every size.
    fn open_peer_path(&self) -> Result<Option<super::peer::PeerAllReduce>> {
        use super::peer::{PeerAllReduce, PeerBuffers, PeerInfo, INFO_WORDS, MAX_WORLD};
        let stream = self.device.as_cuda_device()?.cuda_stream();
        let wanted = std::env::var("SHARDWISE_PEER_ALLREDUCE").map_or(true, |v| v != "0")
            && self.world > 1
            && self.world <= MAX_WORLD;
        let mine = if wanted {
            PeerBuffers::new(stream.context())
                .map_err(|e| tracing::warn!("rank {}: {e}", self.rank))
                .ok()
        } else {
            None
        };
        let words = mine
            .as_ref()
            .map_or_else(|| vec![0u32; INFO_WORDS], |m| m.info().to_words());
        let all: Vec<u32> = self
            .run(Kind::AllGather, &Tensor::new(words, &self.device)?)?
            .to_vec1()?;
        let infos: Option<Vec<PeerInfo>> =
            all.chunks(INFO_WORDS).map(PeerInfo::from_words).collect();
        let opened = match (mine, infos) {
            (Some(mine), Some(infos)) if infos.iter().all(|i| i.pid != 0) => {
                PeerAllReduce::open(mine, &infos, self.rank, &stream)
                    .map_err(|e| tracing::warn!("rank {}: {e}", self.rank))
                    .ok()
            }
            _ => None,
        };
        let ok = Tensor::new(&[u32::from(opened.is_some())], &self.device)?;
        let agreed: Vec<u32> = self.run(Kind::AllReduce, &ok)?.to_vec1()?;
        if agreed.first().copied() == Some(self.world as u32) {
            tracing::info!(
                "rank {}: peer-memory all-reduce for messages up to {} KiB",
                self.rank,
                super::peer::MAX_BYTES >> 10
            );
            Ok(opened)
        } else {
            if wanted {
                tracing::info!("rank {}: NCCL for every all-reduce", self.rank);
            }
            Ok(None)
        }
    }

    /// Whether small all-reduces take the peer-memory path.
    pub fn has_peer_path(&self) -> bool {
        self.peer.is_some()
    }

    /// The all-reduce through NCCL whatever the size (benchmarks compare the two paths).
    ///
    /// # Errors
    /// NCCL errors.
    pub fn all_reduce_nccl(&self, t: &Tensor) -> Result<Tensor> {
        self.run(Kind::AllReduce, t)
    }

    /// Every rank's piece of `t` along `dim` (`sizes[r]` long on rank `r`), each padded to
    /// the longest for NCCL's equal-size gather.
    fn gather_padded(&self, t: &Tensor, dim: usize, sizes: &[usize]) -> Result<Tensor> {
        let len = t.dim(dim)?;
        let max = sizes.iter().copied().max().unwrap_or(0);
        let padded = if len < max {
            t.pad_with_zeros(dim, 0, max - len)?
        } else {
            t.clone()
        };
        let flat = match &self.peer {
            Some(p) if super::peer::PeerAllReduce::fits(&padded) => {
                let _serial = self.comm.lock().map_err(|_| Error::Comm {
                    rank: self.rank,
                    op: "all_gather",
                    reason: "a previous collective panicked".into(),
                })?;
                p.all_gather(&padded)?
            }
            _ => self.run(Kind::AllGather, &padded.flatten_all()?)?,
        };
        let mut dims = padded.dims().to_vec();
        dims.insert(0, self.world);
        let all = flat.reshape(dims)?;
        let pieces = sizes
            .iter()
            .enumerate()
            .map(|(r, &n)| all.get(r)?.narrow(dim, 0, n))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&pieces, dim)?)
    }

    /// The CUDA device of this rank.
    pub fn cuda_device(&self) -> &Device {
        &self.device
    }

    fn run(&self, op: Kind, t: &Tensor) -> Result<Tensor> {
        let guard = self.comm.lock().map_err(|_| Error::Comm {
            rank: self.rank,
            op: op.name(),
            reason: "a previous NCCL call panicked".into(),
        })?;
        let t = t.contiguous()?;
        Ok(t.apply_op1_no_bwd(&NcclOp {
            comm: &guard.0,
            kind: op,
        })?)
    }
}

/// Which collective a custom op runs.
#[derive(Debug, Clone, Copy)]
enum Kind {
    AllReduce,
    /// Gathers equal-size flat pieces into `[world * n]`.
    AllGather,
    Broadcast(usize),
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::AllReduce => "all_reduce_sum",
            Kind::AllGather => "all_gather",
            Kind::Broadcast(_) => "broadcast",
        }
    }
}

struct NcclOp<'a> {
    comm: &'a Comm,
    kind: Kind,
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL {} needs a CUDA tensor", self.kind.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("NCCL needs a contiguous tensor".into()))?;
        let n = end - start;
        let world = self.comm.world_size();
        let dev = s.device().clone();
        let err = |e: cudarc::nccl::result::NcclError| {
            candle_core::Error::Msg(format!("NCCL {}: {e:?}", self.kind.name()))
        };
        macro_rules! run {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(start..end);
                let (out_len, shape) = match self.kind {
                    Kind::AllGather => (n * world, Shape::from(n * world)),
                    _ => (n, l.shape().clone()),
                };
                // SAFETY: every element is written by the collective before it is read.
                let mut dst = unsafe { dev.alloc::<$t>(out_len)? };
                match self.kind {
                    Kind::AllReduce => {
                        self.comm
                            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                            .map_err(err)?;
                    }
                    Kind::AllGather => {
                        self.comm.all_gather(&src, &mut dst).map_err(err)?;
                    }
                    Kind::Broadcast(root) => {
                        self.comm
                            .broadcast(Some(&src), &mut dst, root as i32)
                            .map_err(err)?;
                    }
                }
                Ok((CudaStorage::wrap_cuda_slice(dst, dev), shape))
            }};
        }
        match s.dtype() {
            DType::F32 => run!(f32),
            DType::BF16 => run!(half::bf16),
            DType::F16 => run!(half::f16),
            DType::U32 => run!(u32),
            d => candle_core::bail!("NCCL {}: dtype {d:?} is not supported", self.kind.name()),
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        match &self.peer {
            Some(p) if super::peer::PeerAllReduce::fits(t) => {
                let _serial = self.comm.lock().map_err(|_| Error::Comm {
                    rank: self.rank,
                    op: "all_reduce_sum",
                    reason: "a previous collective panicked".into(),
                })?;
                p.all_reduce(t)
            }
            _ => self.run(Kind::AllReduce, t),
        }
    }

    fn reduce_target(&self, bytes: usize) -> Result<Option<super::PeerReduce>> {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let off = *OFF.get_or_init(|| super::env_usize("SHARDWISE_PEER_REDUCE", 1) == 0);
        match &self.peer {
            Some(p) if !off && super::peer::PeerAllReduce::fits_reduce(bytes) => {
                p.reduce_target().map(Some)
            }
            _ => Ok(None),
        }
    }

    fn all_reduce_product(&self, t: &Tensor) -> Result<Tensor> {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        let Some(p) = &self.peer else {
            return self.all_reduce_sum(t);
        };
        // The peers are in this protocol's call: another path would leave them waiting.
        if !super::peer::PeerAllReduce::fits(t) || !super::peer::PeerAllReduce::fits_reduce(bytes) {
            return Err(Error::Comm {
                rank: self.rank,
                op: "all_reduce_sum",
                reason: format!(
                    "a product's all-reduce of {bytes} bytes of {:?} does not fit the peer \
                     path it was promised to",
                    t.dtype()
                ),
            });
        }
        let _serial = self.comm.lock().map_err(|_| Error::Comm {
            rank: self.rank,
            op: "all_reduce_sum",
            reason: "a previous collective panicked".into(),
        })?;
        p.all_reduce_product(t)
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        // Sizes along `dim` first (uneven splits; a host round trip), then the pieces.
        let len = t.dim(dim)?;
        let sizes = Tensor::new(&[len as u32], &self.device)?;
        let sizes: Vec<u32> = self.run(Kind::AllGather, &sizes)?.to_vec1()?;
        let sizes: Vec<usize> = sizes.into_iter().map(|s| s as usize).collect();
        self.gather_padded(t, dim, &sizes)
    }

    fn all_gather_sized(&self, t: &Tensor, dim: usize, sizes: &[usize]) -> Result<Tensor> {
        super::check_gather_sizes(self, t, dim, sizes)?;
        self.gather_padded(t, dim, sizes)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            return Err(Error::Comm {
                rank: self.rank,
                op: "broadcast",
                reason: format!("root {root} is not in 0..{}", self.world),
            });
        }
        self.run(Kind::Broadcast(root), t)
    }

    fn barrier(&self) -> Result<()> {
        let one = Tensor::new(&[1f32], &self.device)?;
        self.run(Kind::AllReduce, &one)?.to_vec1::<f32>()?;
        Ok(())
    }

    fn device(&self) -> Device {
        self.device.clone()
    }
}

/// Hands rank 0's NCCL unique id to every rank over `host` (the cluster's authenticated
/// collective links): 128 bytes broadcast as 128 f32 values.
///
/// # Errors
/// The host transport's errors.
pub fn share_id(host: &dyn Communicator, id: [u8; ID_BYTES]) -> Result<[u8; ID_BYTES]> {
    let t = Tensor::from_vec(
        id.iter().map(|&b| f32::from(b)).collect::<Vec<f32>>(),
        ID_BYTES,
        &Device::Cpu,
    )?;
    let got: Vec<f32> = host.broadcast(&t, 0)?.to_vec1()?;
    let mut out = [0u8; ID_BYTES];
    for (o, v) in out.iter_mut().zip(got) {
        *o = v as u8;
    }
    Ok(out)
}

/// A CUDA rank whose collectives go through a host transport (gRPC or shared memory) when
/// NCCL cannot be used: tensors are copied to host memory, exchanged, and copied back.
#[derive(Debug)]
pub struct Staged {
    host: Box<dyn Communicator>,
    device: Device,
}

impl Staged {
    /// Wraps `host` for a rank computing on CUDA device `ordinal`.
    ///
    /// # Errors
    /// No such device.
    pub fn new(host: Box<dyn Communicator>, ordinal: usize) -> Result<Self> {
        Ok(Self {
            host,
            device: crate::cuda::device(ordinal)?,
        })
    }

    fn staged(&self, t: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let back = t.device().clone();
        Ok(f(&t.to_device(&Device::Cpu)?)?.to_device(&back)?)
    }
}

impl Communicator for Staged {
    fn rank(&self) -> usize {
        self.host.rank()
    }

    fn world_size(&self) -> usize {
        self.host.world_size()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.staged(t, |x| self.host.all_reduce_sum(x))
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        self.staged(t, |x| self.host.all_gather(x, dim))
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.staged(t, |x| self.host.broadcast(x, root))
    }

    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }

    fn device(&self) -> Device {
        self.device.clone()
    }
}

/// `world` NCCL ranks of this process on GPUs `0..world`, initialised together (NCCL's
/// initialisation blocks until every rank has joined, so each joins on its own thread).
///
/// # Errors
/// Fewer GPUs than ranks, or NCCL initialisation fails (naming the rank).
pub fn group(world: usize) -> Result<Vec<NcclComm>> {
    let id = new_unique_id()?;
    super::each_rank((0..world).collect(), |r, _: usize| {
        NcclComm::init(r, world, r, &id)
    })
}
