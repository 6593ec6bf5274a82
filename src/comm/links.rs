//! Collective algorithms over point-to-point links.
//!
//! [`Links`] is what a network transport provides: ordered, reliable frames to and from each
//! peer, with a deadline on every receive. [`LinkComm`] builds every [`Communicator`]
//! operation on it:
//!
//! - all-reduce of large tensors: ring reduce-scatter then ring all-gather, chunked and
//!   pipelined (a reduced chunk is forwarded as soon as it is summed; no per-chunk reply);
//! - all-reduce of small tensors: direct exchange (one hop, any world size), summed in rank
//!   order;
//! - all-gather, broadcast and barrier by direct exchange of chunked tensors.
//!
//! Every rank ends with bitwise-identical results: in the ring each segment is summed once,
//! by its owner, and copied to the others; in the direct exchange every rank sums the same
//! bytes in the same order. The first error on any rank is sent to every peer as an abort,
//! so one failure stops the whole group at once instead of leaving peers waiting.

use std::ops::Range;
use std::sync::Mutex;

use bytes::Bytes;
use candle_core::Tensor;

use super::wire::{self, WireElem};
use super::Communicator;
use crate::error::{Error, Result};
use crate::proto::Frame;

/// Step number that marks an abort frame; its data is the reason, in UTF-8.
pub const ABORT_STEP: u32 = u32::MAX;

/// Ordered, reliable frames between this rank and each peer.
pub trait Links: Send + Sync + std::fmt::Debug {
    /// This rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Queues a frame for `to` and returns without waiting for it to be delivered.
    ///
    /// # Errors
    /// The link to `to` is gone (naming the rank and its address).
    fn send(&self, to: usize, frame: Frame) -> Result<()>;
    /// The next frame from `from`, waiting at most the configured deadline.
    ///
    /// # Errors
    /// Deadline passed, or `from` (or any other peer) is gone; names the rank and address.
    fn recv(&self, from: usize) -> Result<Frame>;
    /// Describes a peer for messages (`rank 2 (10.0.0.3:7000)`).
    fn peer(&self, rank: usize) -> String;
}

/// Algorithm tuning.
#[derive(Debug, Clone, Copy)]
pub struct AlgoConfig {
    /// Bytes per frame in pipelined transfers.
    pub chunk_bytes: usize,
    /// All-reduces whose direct-exchange volume (bytes x (world - 1), what each rank sends)
    /// is at most this use the direct exchange, others the ring. Default 256 KiB: measured
    /// on loopback gRPC (BENCHMARKS.md), direct wins up to 256 KiB at world 2 and up to
    /// ~64 KiB at world 4.
    pub small_bytes: usize,
    /// Largest tensor a peer may announce, in bytes.
    pub max_tensor_bytes: usize,
    /// Chunks sent ahead of those received, per ring step.
    pub window: usize,
}

impl Default for AlgoConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: super::env_usize("SHARDWISE_CHUNK_BYTES", 1 << 20),
            small_bytes: super::env_usize("SHARDWISE_SMALL_BYTES", 256 << 10),
            max_tensor_bytes: 16 << 30,
            window: super::env_usize("SHARDWISE_WINDOW", 4),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    seq: u64,
    poisoned: Option<String>,
}

/// Frames received ahead of the one awaited, by (sender, collective, step, chunk).
type Stash = std::collections::HashMap<(usize, u64, u32, u32), Frame>;

/// Most frames held ahead of need before a peer counts as misbehaving.
const MAX_STASH: usize = 4096;

/// A [`Communicator`] running the algorithms above on any [`Links`].
#[derive(Debug)]
pub struct LinkComm<L: Links> {
    links: L,
    cfg: AlgoConfig,
    state: Mutex<State>,
    stash: Mutex<Stash>,
}

/// Near-equal split of `n` elements into `parts` ranges (earlier ranges take the remainder).
fn segment(n: usize, parts: usize, i: usize) -> Range<usize> {
    let (base, extra) = (n / parts, n % parts);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

impl<L: Links> LinkComm<L> {
    /// Wraps connected links.
    pub fn new(links: L, cfg: AlgoConfig) -> Self {
        Self {
            links,
            cfg,
            state: Mutex::new(State::default()),
            stash: Mutex::new(Stash::new()),
        }
    }

    fn stash_mut(&self) -> std::sync::MutexGuard<'_, Stash> {
        self.stash.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The underlying links.
    pub fn links(&self) -> &L {
        &self.links
    }

    fn err(&self, op: &'static str, reason: String) -> Error {
        Error::Comm {
            rank: self.links.rank(),
            op,
            reason,
        }
    }

    /// Runs one collective: numbers it, refuses if the group is already broken, and on
    /// failure tells every peer before returning the error.
    fn run<T>(&self, op: &'static str, f: impl FnOnce(u64) -> Result<T>) -> Result<T> {
        let seq = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = &st.poisoned {
                return Err(self.err(op, format!("group is broken by an earlier error: {p}")));
            }
            st.seq += 1;
            st.seq
        };
        let out = f(seq);
        if let Err(e) = &out {
            let reason = e.to_string();
            self.state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .poisoned = Some(reason.clone());
            for p in (0..self.links.world_size()).filter(|&p| p != self.links.rank()) {
                let _ = self.links.send(
                    p,
                    Frame {
                        seq,
                        step: ABORT_STEP,
                        data: Bytes::from(reason.clone().into_bytes()),
                        ..Default::default()
                    },
                );
            }
        }
        out
    }

    fn frame(seq: u64, step: u32, chunk: u32, shape: &[u64], dtype: u32, data: Bytes) -> Frame {
        Frame {
            seq,
            step,
            chunk,
            shape: shape.to_vec(),
            dtype,
            data,
        }
    }

    /// Receives the frame `(seq, step, chunk)` from `from`, turning aborts and schedule
    /// mismatches into errors.
    fn expect(
        &self,
        op: &'static str,
        from: usize,
        seq: u64,
        step: u32,
        chunk: u32,
    ) -> Result<Frame> {
        let key = (from, seq, step, chunk);
        if let Some(f) = self.stash_mut().remove(&key) {
            return Ok(f);
        }
        loop {
            let f = self.links.recv(from)?;
            if f.step == ABORT_STEP {
                return Err(self.err(
                    op,
                    format!(
                        "{} aborted: {}",
                        self.links.peer(from),
                        String::from_utf8_lossy(&f.data)
                    ),
                ));
            }
            if (f.seq, f.step, f.chunk) == (seq, step, chunk) {
                return Ok(f);
            }
            // A peer pipelines ahead: frames of a later step of this collective may arrive
            // before the one awaited (the ring interleaves new chunks with forwarded ones).
            let ahead = f.seq == seq && (f.step, f.chunk) > (step, chunk);
            let stash_len = self.stash_mut().len();
            if !ahead || stash_len > MAX_STASH {
                return Err(self.err(
                    op,
                    format!(
                        "{} is out of step: sent collective {} step {} chunk {}, expected {seq}/{step}/{chunk}",
                        self.links.peer(from),
                        f.seq,
                        f.step,
                        f.chunk
                    ),
                ));
            }
            self.stash_mut().insert((from, f.seq, f.step, f.chunk), f);
        }
    }

    /// Checks that a peer's all-reduce has our element count and dtype.
    fn check_meta(
        &self,
        op: &'static str,
        from: usize,
        f: &Frame,
        n: u64,
        dtype: u32,
    ) -> Result<()> {
        if f.shape.as_slice() != [n] || f.dtype != dtype {
            return Err(self.err(
                op,
                format!(
                    "{} sent {:?} elements of dtype {}, this rank has [{n}] of dtype {dtype}",
                    self.links.peer(from),
                    f.shape,
                    f.dtype
                ),
            ));
        }
        Ok(())
    }

    fn all_reduce_typed<T: WireElem>(&self, seq: u64, input: &[T], dtype: u32) -> Result<Vec<T>> {
        let w = self.links.world_size();
        if w == 1 {
            return Ok(input.to_vec());
        }
        if std::mem::size_of_val(input).saturating_mul(w - 1) <= self.cfg.small_bytes {
            self.direct_reduce(seq, input, dtype)
        } else {
            self.ring_reduce(seq, input, dtype)
        }
    }

    fn direct_reduce<T: WireElem>(&self, seq: u64, input: &[T], dtype: u32) -> Result<Vec<T>> {
        let (w, r) = (self.links.world_size(), self.links.rank());
        let n = input.len() as u64;
        let mine = Bytes::copy_from_slice(wire::as_bytes(input));
        for p in (0..w).filter(|&p| p != r) {
            self.links
                .send(p, Self::frame(seq, 0, 0, &[n], dtype, mine.clone()))?;
        }
        let mut parts: Vec<Bytes> = Vec::with_capacity(w);
        for p in 0..w {
            if p == r {
                parts.push(mine.clone());
                continue;
            }
            let f = self.expect("all_reduce_sum", p, seq, 0, 0)?;
            self.check_meta("all_reduce_sum", p, &f, n, dtype)?;
            if f.data.len() != mine.len() {
                return Err(self.err(
                    "all_reduce_sum",
                    format!(
                        "{} sent {} bytes, expected {}",
                        self.links.peer(p),
                        f.data.len(),
                        mine.len()
                    ),
                ));
            }
            parts.push(f.data);
        }
        let views: Vec<&[u8]> = parts.iter().map(|b| b.as_ref()).collect();
        let mut out = input.to_vec();
        T::sum_parts(&mut out, &views);
        Ok(out)
    }

    /// Ring all-reduce writing straight into the result: partial sums travel as fresh frame
    /// buffers (no copy into a working array), the final sum of this rank's own segment is
    /// written once, and all-gather frames are forwarded as received (shared, not copied).
    fn ring_reduce<T: WireElem>(&self, seq: u64, input: &[T], dtype: u32) -> Result<Vec<T>> {
        let op = "all_reduce_sum";
        let (w, r) = (self.links.world_size(), self.links.rank());
        let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
        let n = input.len();
        let meta = [n as u64];
        let ce = (self.cfg.chunk_bytes / T::SIZE).max(1);
        let chunks = n.div_ceil(w).div_ceil(ce).max(1);
        let chunk = |s: usize, c: usize| {
            let seg = segment(n, w, s);
            let a = (seg.start + c * ce).min(seg.end);
            a..(a + ce).min(seg.end)
        };
        let send = |step: usize, c: usize, data: Bytes| {
            self.links.send(
                next,
                Self::frame(seq, step as u32, c as u32, &meta, dtype, data),
            )
        };
        let recv = |step: usize, c: usize, range: &Range<usize>| -> Result<Frame> {
            let f = self.expect(op, prev, seq, step as u32, c as u32)?;
            self.check_meta(op, prev, &f, n as u64, dtype)?;
            if f.data.len() != range.len() * T::SIZE {
                return Err(self.err(
                    op,
                    format!(
                        "{} sent a chunk of {} bytes, expected {}",
                        self.links.peer(prev),
                        f.data.len(),
                        range.len() * T::SIZE
                    ),
                ));
            }
            Ok(f)
        };
        let mut out: Vec<T> = crate::mem::huge_vec(n);
        let dst = &mut out.spare_capacity_mut()[..n];
        // Chunks a rank puts on the wire ahead of what it has received: enough to keep the
        // link busy, few enough that buffers stay in cache instead of queueing the whole
        // segment (which made large tensors slower per byte than small ones).
        let window = self.cfg.window.max(1);
        let first = |c: usize| Bytes::copy_from_slice(wire::as_bytes(&input[chunk(r, c)]));
        let mut sent = 0;
        while sent < chunks.min(window) {
            send(0, sent, first(sent))?;
            sent += 1;
        }
        // Reduce-scatter: after w-1 steps rank r holds the full sum of segment r+1.
        for k in 0..w - 1 {
            let s = (r + w - k - 1) % w;
            for c in 0..chunks {
                if k == 0 && sent < chunks {
                    send(0, sent, first(sent))?;
                    sent += 1;
                }
                let range = chunk(s, c);
                let f = recv(k, c, &range)?;
                if k + 2 < w {
                    send(k + 1, c, Bytes::from(T::add_to_le(&input[range], &f.data)))?;
                } else {
                    T::add_to(&input[range.clone()], &f.data, &mut dst[range]);
                }
            }
        }
        // All-gather: each finished segment travels once around the ring.
        let own = (r + 1) % w;
        let done = |dst: &[std::mem::MaybeUninit<T>], c: usize| {
            let range = chunk(own, c);
            let len = range.len();
            // SAFETY: the own segment was fully written by the last reduce-scatter step.
            let v = unsafe { std::slice::from_raw_parts(dst[range].as_ptr().cast::<T>(), len) };
            Bytes::copy_from_slice(wire::as_bytes(v))
        };
        let mut sent = 0;
        while sent < chunks.min(window) {
            send(w - 1, sent, done(dst, sent))?;
            sent += 1;
        }
        for k in 0..w - 1 {
            let s = (r + w - k) % w;
            for c in 0..chunks {
                if k == 0 && sent < chunks {
                    send(w - 1, sent, done(dst, sent))?;
                    sent += 1;
                }
                let range = chunk(s, c);
                let f = recv(w - 1 + k, c, &range)?;
                T::copy_to(&f.data, &mut dst[range]);
                if k + 2 < w {
                    send(w + k, c, f.data)?;
                }
            }
        }
        // SAFETY: segment r+1 was written by reduce-scatter and every other segment by the
        // all-gather, so all `n` elements are initialised.
        unsafe { out.set_len(n) };
        Ok(out)
    }

    /// Sends a whole tensor to `to` in chunks; the first chunk's shape tells the receiver
    /// how many follow.
    fn send_tensor(&self, to: usize, seq: u64, t: &Tensor, data: &Bytes) -> Result<()> {
        let dtype = wire::dtype_code(t.dtype()).unwrap_or(u32::MAX);
        let shape: Vec<u64> = t.dims().iter().map(|&d| d as u64).collect();
        let cb = self.cfg.chunk_bytes.max(1);
        let chunks = data.len().div_ceil(cb).max(1);
        for c in 0..chunks {
            let part = data.slice((c * cb).min(data.len())..((c + 1) * cb).min(data.len()));
            self.links
                .send(to, Self::frame(seq, 0, c as u32, &shape, dtype, part))?;
        }
        Ok(())
    }

    fn recv_tensor(&self, op: &'static str, from: usize, seq: u64) -> Result<Tensor> {
        let first = self.expect(op, from, seq, 0, 0)?;
        let dtype = wire::code_dtype(first.dtype).ok_or_else(|| {
            self.err(
                op,
                format!(
                    "{} sent unknown dtype {}",
                    self.links.peer(from),
                    first.dtype
                ),
            )
        })?;
        let shape: Vec<usize> = first.shape.iter().map(|&d| d as usize).collect();
        let total = shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |a, &d| a.checked_mul(d))
            .filter(|&b| b <= self.cfg.max_tensor_bytes)
            .ok_or_else(|| {
                self.err(
                    op,
                    format!(
                        "{} announced a tensor of shape {shape:?}, over the {} byte cap",
                        self.links.peer(from),
                        self.cfg.max_tensor_bytes
                    ),
                )
            })?;
        let cb = self.cfg.chunk_bytes.max(1);
        let chunks = total.div_ceil(cb).max(1);
        let mut data = Vec::with_capacity(total);
        data.extend_from_slice(&first.data);
        for c in 1..chunks {
            data.extend_from_slice(&self.expect(op, from, seq, 0, c as u32)?.data);
        }
        wire::bytes_to_tensor(&data, dtype, &shape)
    }
}

/// One all-reduce, for [`wire::map_elems`].
struct Reduce<'a, L: Links> {
    comm: &'a LinkComm<L>,
    seq: u64,
    code: u32,
}

impl<L: Links> wire::ElemFn for Reduce<'_, L> {
    fn call<T: WireElem>(self, x: &[T]) -> Result<Vec<T>> {
        self.comm.all_reduce_typed(self.seq, x, self.code)
    }
}

impl<L: Links> Communicator for LinkComm<L> {
    fn rank(&self) -> usize {
        self.links.rank()
    }

    fn world_size(&self) -> usize {
        self.links.world_size()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let op = "all_reduce_sum";
        let code = wire::dtype_code(t.dtype())
            .ok_or_else(|| self.err(op, format!("unsupported dtype {:?}", t.dtype())))?;
        self.run(op, |seq| {
            wire::map_elems(
                t,
                Reduce {
                    comm: self,
                    seq,
                    code,
                },
            )
        })
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let op = "all_gather";
        if dim >= t.rank() {
            return Err(self.err(op, format!("dim {dim} out of range for {:?}", t.dims())));
        }
        self.run(op, |seq| {
            let (w, r) = (self.links.world_size(), self.links.rank());
            let data = Bytes::from(wire::tensor_to_bytes(t)?);
            for p in (0..w).filter(|&p| p != r) {
                self.send_tensor(p, seq, t, &data)?;
            }
            let mut pieces = Vec::with_capacity(w);
            for p in 0..w {
                if p == r {
                    pieces.push(t.clone());
                    continue;
                }
                let piece = self.recv_tensor(op, p, seq)?;
                if let Some(m) = super::mismatch(&piece, t, Some(dim)) {
                    return Err(self.err(op, format!("{} {m}", self.links.peer(p))));
                }
                pieces.push(piece);
            }
            Ok(Tensor::cat(&pieces, dim)?)
        })
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let op = "broadcast";
        let w = self.links.world_size();
        if root >= w {
            return Err(self.err(op, format!("root {root} out of range")));
        }
        self.run(op, |seq| {
            if self.links.rank() == root {
                let data = Bytes::from(wire::tensor_to_bytes(t)?);
                for p in (0..w).filter(|&p| p != root) {
                    self.send_tensor(p, seq, t, &data)?;
                }
                return Ok(t.clone());
            }
            let got = self.recv_tensor(op, root, seq)?;
            if let Some(m) = super::mismatch(&got, t, None) {
                return Err(self.err(op, format!("{} {m}", self.links.peer(root))));
            }
            Ok(got)
        })
    }

    fn barrier(&self) -> Result<()> {
        self.run("barrier", |seq| {
            let (w, r) = (self.links.world_size(), self.links.rank());
            for p in (0..w).filter(|&p| p != r) {
                self.links
                    .send(p, Self::frame(seq, 0, 0, &[], 0, Bytes::new()))?;
            }
            for p in (0..w).filter(|&p| p != r) {
                self.expect("barrier", p, seq, 0, 0)?;
            }
            Ok(())
        })
    }
}
