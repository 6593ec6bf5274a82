//! One-shot all-reduce (and all-gather) over peer memory for small messages between GPUs of
//! one host (cargo feature `cuda`).
//!
//! NCCL's small all-reduce costs tens of microseconds; a decode step makes two per layer.
//! The all-gather of a vocabulary-parallel lm_head's logits takes the same path, so a
//! captured decode step on one host holds no NCCL call (NCCL calls recorded by a capture
//! that then fails on one rank are the suspected cause of an intermittent stall with graphs
//! on).
//! Here every rank owns a registered buffer (two halves, used alternately, each with one slot
//! per rank). Each call is one kernel, compiled by NVRTC at start-up, in the manner of a
//! low-latency ("LL") protocol: the payload travels in 8-byte words of 4 payload bytes and
//! the call's number, so a word is its own flag. Every thread pushes its words into this
//! rank's slot of every peer's buffer (one-way stores over the link, no fence), then reads its
//! peers' words for the same indices from its own buffer until they carry the call's number,
//! and sums them in rank order (so every rank gets bit-identical results). A push of plain
//! data had to be followed by a system fence (a round trip over the link) and a flag per block
//! before a peer could read; here a peer reads after one crossing: 8 KiB in a CUDA graph on 2x
//! H200 took 2.86 us against 4.78 us. It moves twice the bytes, which costs at the top of the
//! range (512 KiB: 8.76 us against 7.09 us, still below NCCL's 9.66 us). Counters live in
//! device memory, so the kernel can be captured in a CUDA graph.
//!
//! Why two halves are enough: rank r writes its slot of half `e % 2` of peer p in call `e`
//! only after its call `e - 1` finished, which needed p's words of call `e - 1`, which p pushed
//! after its call `e - 2` (the last reader of that half) had finished.
//!
//! Row-parallel products of a decode step finish their all-reduce themselves through a second
//! region of the same buffers ([`crate::comm::PeerReduce`], `layers::fused`): such a product
//! has far more blocks than this kernel, so its calls are numbered by one ticket per rank
//! instead of per-block counters. The region keeps the two numberings apart; the argument for
//! two halves holds for each region's calls alone, as it uses nothing but stream order.
//!
//! Peers in this process are reached through peer access between the contexts; peers in
//! other processes of the host through CUDA IPC handles. The pointers and handles are
//! exchanged over the NCCL communicator, and the path is used only if every rank could open
//! every peer (decided together, so all ranks take the same path for every message).
//! A peer that does not arrive within the deadline is recorded in host-mapped memory, and
//! every later call fails naming it: a dead rank is an error, not a hang.

use std::sync::Arc;
use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use cudarc::driver::sys::{self, CUdeviceptr, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};

/// Most ranks the kernel serves.
pub const MAX_WORLD: usize = 8;
/// Most blocks per call (call counters).
const MAX_BLOCKS: usize = 32;
const THREADS: u32 = 512;
/// Largest message, bytes. Above it each rank would read `world` times as much as NCCL's
/// ring moves, and NCCL wins.
pub const MAX_BYTES: usize = 512 << 10;
/// Words of one rank's slot: each carries 4 bytes of the payload and the call's number.
const SLOT_WORDS: usize = MAX_BYTES / 4;
/// Bytes of a rank's all-reduce region: two halves of `MAX_WORLD` slots of 8-byte words.
const DATA_BYTES: usize = 2 * MAX_WORLD * SLOT_WORDS * 8;
/// Largest output of a product that finishes its all-reduce itself
/// ([`crate::comm::PeerReduce`]), bytes.
pub const REDUCE_MAX_BYTES: usize = 128 << 10;
/// Words of one rank's slot in the region of those products (after the all-reduce's).
const REDUCE_SLOT_WORDS: usize = REDUCE_MAX_BYTES / 4;
/// Bytes of a rank's buffer: the all-reduce's region, then the products' (laid out alike).
const BUFFER_BYTES: usize = DATA_BYTES + 2 * MAX_WORLD * REDUCE_SLOT_WORDS * 8;
// The kernel's MAXW, MAXB and MAXPT say the same (its halves are MAXW slots apart).
const _: () =
    assert!(MAX_WORLD == 8 && MAX_BLOCKS == 32 && SLOT_WORDS <= 8 * MAX_BLOCKS * THREADS as usize);
/// How long a thread waits for a peer's words, unless `SHARDWISE_PEER_DEADLINE_MS` says.
fn deadline() -> Duration {
    Duration::from_millis(super::env_usize("SHARDWISE_PEER_DEADLINE_MS", 30_000) as u64)
}

/// Device code of the protocol, shared by the all-reduce kernel and the products that finish
/// their all-reduce themselves (`layers::fused`); compiled after [`crate::cuda::DTYPES`].
pub(crate) const LL: &str = r#"
__device__ __forceinline__ u64 now_ns() { u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
// One 8-byte word that lands whole, past every cache that could hold it back.
__device__ __forceinline__ void st_ll(u64* p, u64 v) {
  asm volatile("st.volatile.global.u64 [%0], %1;" :: "l"(p), "l"(v) : "memory"); }
__device__ __forceinline__ u64 ld_ll(const u64* p) {
  u64 v; asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v; }
// Call numbers of the products' region: one 64-bit ticket, the last call's number in the high
// half and the blocks of the current call that took theirs in the low half. A block takes
// one as it starts (`ticket_take`, whose reply it needs only at the end) and reads its number
// from it (`ticket_close`): the block that took the last of its grid's tickets closes the call
// (number up, count to zero). Atomics on one word are ordered, so every block of a call reads
// the same number, and the next call (later on the stream) the next.
__device__ __forceinline__ u64 ticket_take(u64* ticket) {
  return atomicAdd((unsigned long long*)ticket, 1ull); }
__device__ __forceinline__ unsigned ticket_close(u64* ticket, u64 taken) {
  const unsigned e = (unsigned)(taken >> 32) + 1u;
  if ((unsigned)taken + 1u == gridDim.x) atomicExch((unsigned long long*)ticket, (u64)e << 32);
  return e;
}
// The payload of the word at `src` once it carries call number e. Past the deadline (t0 +
// timeout) it records peer w + 1 in err and stops waiting (`gone`, for every later word).
__device__ __forceinline__ unsigned ll_wait(const u64* src, unsigned e, u64 t0, u64 timeout,
                                            unsigned* err, int w, bool& gone) {
  u64 v = ld_ll(src);
  while ((unsigned)(v >> 32) != e && !gone) {
    if (now_ns() - t0 > timeout) { atomicCAS(err, 0u, (unsigned)w + 1u); gone = true; }
    v = ld_ll(src);
  }
  return (unsigned)v;
}
// Element j of a payload word, and the word holding x as element j (4-byte elements: one
// per word; 2-byte ones: two, the first in the low half).
template <typename T> __device__ __forceinline__ T elem_of(unsigned w, int j);
template <> __device__ __forceinline__ float elem_of<float>(unsigned w, int) { return __uint_as_float(w); }
template <> __device__ __forceinline__ u16 elem_of<u16>(unsigned w, int j) { return (u16)(w >> (16 * j)); }
__device__ __forceinline__ unsigned word_of(float x, int) { return __float_as_uint(x); }
__device__ __forceinline__ unsigned word_of(u16 x, int j) { return ((unsigned)x) << (16 * j); }
"#;

const SRC: &str = r#"
#define MAXW 8
// Most blocks of a call: MAX_BLOCKS on the host.
#define MAXB 32
// Most payload words a thread carries: MAX_BYTES / 4 over MAXB blocks of THREADS.
#define MAXPT 8
// Payload word i of a piece of n elements into `dst`: one store when it is whole and aligned.
template <typename T>
__device__ __forceinline__ void put_word(T* dst, u64 i, u64 n, unsigned w) {
  constexpr int E = 4 / sizeof(T);
  if ((((u64)dst) & 3) == 0 && i * E + E <= n) {
    ((unsigned*)dst)[i] = w;
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) if (i * E + j < n) dst[i * E + j] = elem_of<T>(w, j);
  }
}

// peers[0..MAXW): every rank's buffer: two halves of MAXW slots of `cap` 8-byte words (slot w
// of a rank's buffer receives rank w's payload). The payload (the input's bytes, zero-padded
// to whole 4-byte words) travels as words whose low half is 4 payload bytes and whose high
// half is the call's number: one 8-byte store lands whole, so a receiver that sees this
// call's number in a word has its payload, with no fence and no separate flag (each word is
// its own flag). Each thread pushes its words into this rank's slot of every peer's buffer
// (remote stores, which need no reply), then waits until each peer's words for the same
// indices carry the call's number in its own buffer (local reads) and sums them in rank order
// (its own words from registers), so every rank gets bit-identical results.
// Call numbers: every block keeps one counter and block 0 also advances those of the blocks
// a call does not use, so all counters stay equal and a call's number is one for all its
// blocks; half (number & 1) of every buffer belongs to the call (the module doc says why two
// halves are enough), whose stale words carry e - 2 or older.
// With `gather`, every rank's n elements go to out[rank * n ..] instead of being summed
// (an all-gather of equal pieces), under the same protocol. With a `ticket`, the call is one
// of the products' region instead (words from `base` on, call numbers from the ticket), so
// that a rank whose product could not finish the all-reduce itself takes part in its call.
template <typename K>
__device__ void all_reduce(const typename K::T* in, typename K::T* out, const u64* peers,
                           unsigned* counters, unsigned* err, int rank, int world, u64 n,
                           u64 cap, u64 timeout, int gather, u64* ticket, u64 base) {
  typedef typename K::T T;
  constexpr int E = 4 / sizeof(T);  // elements per payload word
  __shared__ unsigned epoch;
  const u64 nw = (n + E - 1) / E;
  const u64 stride = (u64)gridDim.x * blockDim.x;
  const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  const bool aligned = (((u64)in) & 3) == 0;
  // The payload words first (in flight with the counter's load).
  unsigned d[MAXPT];
#pragma unroll
  for (int k = 0; k < MAXPT; ++k) {
    const u64 i = first + (u64)k * stride;
    d[k] = 0u;
    if (i < nw) {
      if (aligned && i * E + E <= n) {
        d[k] = ((const unsigned*)in)[i];
      } else {
#pragma unroll
        for (int j = 0; j < E; ++j) if (i * E + j < n) d[k] |= word_of(in[i * E + j], j);
      }
    }
  }
  if (threadIdx.x == 0) {
    if (ticket) {
      epoch = ticket_close(ticket, ticket_take(ticket));
    } else {
      const unsigned e = counters[blockIdx.x] + 1;
      counters[blockIdx.x] = e;
      if (blockIdx.x == 0) for (int b = gridDim.x; b < MAXB; ++b) counters[b] = e;
      epoch = e;
    }
  }
  __syncthreads();
  const unsigned e = epoch;
  const u64 half = base + (u64)(e & 1u) * MAXW * cap;
  const u64 tag = (u64)e << 32;
#pragma unroll
  for (int k = 0; k < MAXPT; ++k) {
    const u64 i = first + (u64)k * stride;
    if (i < nw) {
#pragma unroll
      for (int w = 0; w < MAXW; ++w)
        if (w < world && w != rank) st_ll((u64*)peers[w] + half + (u64)rank * cap + i, tag | d[k]);
    }
  }
  const u64* mine = (const u64*)peers[rank] + half;
  const u64 t0 = now_ns();
  bool gone = false;
#pragma unroll
  for (int k = 0; k < MAXPT; ++k) {
    const u64 i = first + (u64)k * stride;
    if (i >= nw) break;
    float acc[E];
#pragma unroll
    for (int j = 0; j < E; ++j) acc[j] = 0.f;
#pragma unroll
    for (int w = 0; w < MAXW; ++w) {
      if (w >= world) break;
      const unsigned got =
          w == rank ? d[k] : ll_wait(mine + (u64)w * cap + i, e, t0, timeout, err, w, gone);
      if (gather) {
        put_word<T>(out + (u64)w * n, i, n, got);
      } else {
#pragma unroll
        for (int j = 0; j < E; ++j) acc[j] += K::ld(elem_of<T>(got, j));
      }
    }
    if (!gather) {
      unsigned o = 0u;
#pragma unroll
      for (int j = 0; j < E; ++j) o |= word_of(K::st(acc[j]), j);
      put_word<T>(out, i, n, o);
    }
  }
}

#define KERNEL(name, K) \
extern "C" __global__ void name(const K::T* in, K::T* out, const u64* peers, unsigned* counters, \
    unsigned* err, int rank, int world, u64 n, u64 cap, u64 timeout, int gather, u64* ticket, \
    u64 base) { \
  all_reduce<K>(in, out, peers, counters, err, rank, world, n, cap, timeout, gather, ticket, \
                base); }
KERNEL(peer_all_reduce_f32, F32)
KERNEL(peer_all_reduce_bf16, BF16)
KERNEL(peer_all_reduce_f16, F16)
"#;

fn check(what: &str, r: CUresult) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(crate::cuda::driver_err(
            &format!("peer all-reduce: {what}"),
            r,
        ))
    }
}

fn driver(e: cudarc::driver::DriverError) -> Error {
    crate::cuda::driver_err("peer all-reduce", e)
}

/// What one rank tells the others about its buffers (exchanged as u32 words).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerInfo {
    host: u64,
    pub(crate) pid: u32,
    ordinal: u32,
    data: u64,
    data_handle: [u8; 64],
}

/// u32 words of a [`PeerInfo`].
pub(crate) const INFO_WORDS: usize = 2 + 1 + 1 + 2 + 16;

impl PeerInfo {
    pub(crate) fn to_words(&self) -> Vec<u32> {
        let mut w = Vec::with_capacity(INFO_WORDS);
        let split = |v: u64| [v as u32, (v >> 32) as u32];
        w.extend(split(self.host));
        w.push(self.pid);
        w.push(self.ordinal);
        w.extend(split(self.data));
        w.extend(
            self.data_handle
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        w
    }

    pub(crate) fn from_words(w: &[u32]) -> Option<Self> {
        if w.len() != INFO_WORDS {
            return None;
        }
        let join = |i: usize| u64::from(w[i]) | (u64::from(w[i + 1]) << 32);
        let handle = |at: usize| {
            let mut h = [0u8; 64];
            for (k, word) in w[at..at + 16].iter().enumerate() {
                h[4 * k..4 * k + 4].copy_from_slice(&word.to_le_bytes());
            }
            h
        };
        Some(Self {
            host: join(0),
            pid: w[2],
            ordinal: w[3],
            data: join(4),
            data_handle: handle(6),
        })
    }
}

/// This host, as far as peer memory is concerned: host name and boot id.
fn host_id() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in [
        "/proc/sys/kernel/hostname",
        "/proc/sys/kernel/random/boot_id",
    ] {
        std::fs::read_to_string(f).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// This rank's registered buffers, before the peers are opened.
pub(crate) struct PeerBuffers {
    ctx: Arc<CudaContext>,
    data: CUdeviceptr,
    info: PeerInfo,
}

impl PeerBuffers {
    /// Allocates and zeroes this rank's buffers on `ctx`'s device.
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        ctx.bind_to_thread().map_err(driver)?;
        let mut data: CUdeviceptr = 0;
        // SAFETY: a plain driver allocation on the current context, freed in `Drop` (which
        // `me` owns from here on, so an error below frees it).
        unsafe {
            check("allocating", sys::cuMemAlloc_v2(&mut data, BUFFER_BYTES))?;
            let mut me = Self {
                ctx: ctx.clone(),
                data,
                info: PeerInfo {
                    host: host_id(),
                    pid: std::process::id(),
                    ordinal: ctx.ordinal() as u32,
                    data,
                    data_handle: [0; 64],
                },
            };
            // Stale words must never carry a call's number (the kernel's flags): start at 0.
            check("zeroing", sys::cuMemsetD8_v2(data, 0, BUFFER_BYTES))?;
            let mut h = std::mem::MaybeUninit::<sys::CUipcMemHandle>::zeroed();
            // IPC is optional (peers in this process need none): a failure leaves the handle
            // zeroed and only other processes fail to open it.
            if sys::cuIpcGetMemHandle(h.as_mut_ptr(), data) == CUresult::CUDA_SUCCESS {
                let h = h.assume_init();
                for (o, c) in me.info.data_handle.iter_mut().zip(h.reserved) {
                    *o = c as u8;
                }
            }
            Ok(me)
        }
    }

    pub(crate) fn info(&self) -> &PeerInfo {
        &self.info
    }
}

impl Drop for PeerBuffers {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: our own allocations; peers no longer use them once ranks stop.
            unsafe {
                if self.data != 0 {
                    let _ = sys::cuMemFree_v2(self.data);
                }
            }
        }
    }
}

/// Peer buffers mapped into this process through IPC handles, unmapped on drop.
struct IpcMapped {
    ctx: Arc<CudaContext>,
    ptrs: Vec<CUdeviceptr>,
}

impl Drop for IpcMapped {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            for &p in &self.ptrs {
                // SAFETY: each was opened by cuIpcOpenMemHandle and is closed once.
                unsafe {
                    let _ = sys::cuIpcCloseMemHandle(p);
                }
            }
        }
    }
}

/// Opens a peer's buffers: directly (same process, after enabling peer access) or through
/// its IPC handles (kept in `ipc`). Returns the peer's buffer pointer.
fn open_peer(
    ctx: &Arc<CudaContext>,
    me: &PeerInfo,
    peer: &PeerInfo,
    ipc: &mut IpcMapped,
) -> Result<u64> {
    if peer.host != me.host {
        return Err(Error::Unsupported {
            what: "peer all-reduce".into(),
            by: "a rank on another host".into(),
        });
    }
    let mut can = 0;
    // SAFETY: driver queries and calls on valid device ordinals and the current context.
    unsafe {
        let peer_dev = {
            let mut d = 0;
            check(
                "device",
                sys::cuDeviceGet(&mut d, peer.ordinal as std::ffi::c_int),
            )?;
            d
        };
        check(
            "peer query",
            sys::cuDeviceCanAccessPeer(&mut can, ctx.cu_device(), peer_dev),
        )?;
        if can == 0 && peer.ordinal != me.ordinal {
            return Err(Error::Unsupported {
                what: "peer all-reduce".into(),
                by: format!("cuda:{} cannot access cuda:{}", me.ordinal, peer.ordinal),
            });
        }
        if peer.pid == me.pid {
            if peer.ordinal != me.ordinal {
                let other = CudaContext::new(peer.ordinal as usize).map_err(driver)?;
                ctx.bind_to_thread().map_err(driver)?;
                let r = sys::cuCtxEnablePeerAccess(other.cu_ctx(), 0);
                if r != CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
                    check("enabling peer access", r)?;
                }
            }
            return Ok(peer.data);
        }
        let mut handle = sys::CUipcMemHandle_st { reserved: [0; 64] };
        for (o, c) in handle.reserved.iter_mut().zip(&peer.data_handle) {
            *o = *c as std::ffi::c_char;
        }
        let mut p: CUdeviceptr = 0;
        check(
            "opening an IPC handle",
            sys::cuIpcOpenMemHandle_v2(
                &mut p,
                handle,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            ),
        )?;
        ipc.ptrs.push(p);
        Ok(p)
    }
}

/// Pinned host word the kernel sets to `peer + 1` when a peer misses the deadline.
struct ErrorWord {
    host: *mut u32,
    dev: u64,
}

impl ErrorWord {
    fn new() -> Result<Self> {
        let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
        let mut dev: CUdeviceptr = 0;
        // SAFETY: a 4-byte pinned, device-mapped allocation, zeroed before use, freed in Drop.
        unsafe {
            check(
                "pinned allocation",
                sys::cuMemHostAlloc(
                    &mut p,
                    4,
                    sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
                ),
            )?;
            std::ptr::write_volatile(p.cast::<u32>(), 0);
            check(
                "mapping pinned memory",
                sys::cuMemHostGetDevicePointer_v2(&mut dev, p, 0),
            )?;
        }
        Ok(Self {
            host: p.cast(),
            dev,
        })
    }

    fn get(&self) -> u32 {
        // SAFETY: valid for the life of self; the device writes it, so read it volatile.
        unsafe { std::ptr::read_volatile(self.host) }
    }
}

impl Drop for ErrorWord {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc in `new`.
        unsafe {
            let _ = sys::cuMemFreeHost(self.host.cast());
        }
    }
}

/// A rank's one-shot all-reduce, ready to run.
pub struct PeerAllReduce {
    rank: usize,
    world: usize,
    kernels: [CudaFunction; 3],
    /// Buffer pointers of ranks `0..MAX_WORLD`.
    table: CudaSlice<u64>,
    counters: CudaSlice<u32>,
    /// Call numbers of the products' region (see `ticket_take` in [`LL`]), kept alive for the
    /// address in `reduce`.
    _ticket: CudaSlice<u64>,
    /// The products' region as their kernels see it (addresses of the buffers above).
    reduce: crate::comm::PeerReduce,
    error: ErrorWord,
    deadline: Duration,
    /// Peer buffers opened through IPC (closed before this rank's own buffers are freed).
    _ipc: IpcMapped,
    /// Dropped last: peers may read them until every rank is done.
    _mine: PeerBuffers,
}

// SAFETY: the raw pointers are device addresses and a pinned host word, valid for the life
// of the value; the communicator serialises calls.
unsafe impl Send for PeerAllReduce {}
// SAFETY: as above.
unsafe impl Sync for PeerAllReduce {}

impl std::fmt::Debug for PeerAllReduce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerAllReduce(rank {} of {})", self.rank, self.world)
    }
}

impl PeerAllReduce {
    /// Opens every peer of `infos` (one per rank, this rank's at `rank`) and loads the
    /// kernels. The caller must still agree with the other ranks before using it.
    pub(crate) fn open(
        mine: PeerBuffers,
        infos: &[PeerInfo],
        rank: usize,
        stream: &Arc<cudarc::driver::CudaStream>,
    ) -> Result<Self> {
        let world = infos.len();
        if world > MAX_WORLD {
            return Err(Error::Unsupported {
                what: format!("peer all-reduce over {world} ranks"),
                by: format!("its kernel (at most {MAX_WORLD})"),
            });
        }
        let ctx = mine.ctx.clone();
        let mut table = vec![0u64; MAX_WORLD];
        // Every early return below drops `ipc`, unmapping what was opened so far.
        let mut ipc = IpcMapped {
            ctx: ctx.clone(),
            ptrs: Vec::new(),
        };
        for (p, info) in infos.iter().enumerate() {
            table[p] = if p == rank {
                mine.data
            } else {
                open_peer(&ctx, &mine.info, info, &mut ipc)?
            };
        }
        let k = crate::cuda::load_kernels(
            &ctx,
            "peer_all_reduce",
            &[crate::cuda::DTYPES, LL, SRC],
            &[
                "peer_all_reduce_f32",
                "peer_all_reduce_bf16",
                "peer_all_reduce_f16",
            ],
        )?;
        let table = stream.clone_htod(&table).map_err(driver)?;
        let counters = stream.alloc_zeros::<u32>(MAX_BLOCKS).map_err(driver)?;
        let ticket = stream.alloc_zeros::<u64>(1).map_err(driver)?;
        stream.synchronize().map_err(driver)?;
        let mut k = k.into_iter();
        let (Some(f32k), Some(bf16k), Some(f16k)) = (k.next(), k.next(), k.next()) else {
            return Err(Error::Unsupported {
                what: "peer all-reduce".into(),
                by: "its kernel module (functions missing)".into(),
            });
        };
        let error = ErrorWord::new()?;
        let deadline = deadline();
        let reduce = {
            use cudarc::driver::DevicePtr;
            crate::comm::PeerReduce {
                table: table.device_ptr(stream).0,
                ticket: ticket.device_ptr(stream).0,
                err: error.dev,
                rank: rank as i32,
                world: world as i32,
                cap: REDUCE_SLOT_WORDS as u64,
                half: (MAX_WORLD * REDUCE_SLOT_WORDS) as u64,
                base: (DATA_BYTES / 8) as u64,
                timeout: deadline.as_nanos() as u64,
            }
        };
        Ok(Self {
            rank,
            world,
            kernels: [f32k, bf16k, f16k],
            table,
            counters,
            _ticket: ticket,
            reduce,
            error,
            deadline,
            _ipc: ipc,
            _mine: mine,
        })
    }

    /// Whether `t` goes this way: a float dtype and at most [`MAX_BYTES`]. The answer
    /// depends only on the shape and dtype, which every rank shares, so all ranks agree.
    pub fn fits(t: &Tensor) -> bool {
        matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
            && t.elem_count() * t.dtype().size_in_bytes() <= MAX_BYTES
            && t.elem_count() > 0
    }

    /// The peer that missed a deadline in an earlier call, if any.
    pub fn failed_peer(&self) -> Option<usize> {
        match self.error.get() {
            0 => None,
            p => Some(p as usize - 1),
        }
    }

    /// An error naming the peer that missed a deadline in an earlier call, if one did.
    fn check_peers(&self, op: &'static str) -> Result<()> {
        match self.failed_peer() {
            None => Ok(()),
            Some(p) => Err(Error::Comm {
                rank: p,
                op,
                reason: format!(
                    "rank {p} did not reach a peer-memory all-reduce within {} ms (seen by rank \
                     {})",
                    self.deadline.as_millis(),
                    self.rank
                ),
            }),
        }
    }

    /// Sum of `t` over every rank (the caller checked [`Self::fits`]).
    ///
    /// # Errors
    /// A peer missed the deadline in this or an earlier call (named), or a kernel error.
    pub fn all_reduce(&self, t: &Tensor) -> Result<Tensor> {
        self.reduce_in(t, Region::AllReduce)
    }

    /// Sum of `t` over every rank through the buffers' `region`.
    fn reduce_in(&self, t: &Tensor, region: Region) -> Result<Tensor> {
        self.check_peers("all_reduce_sum")?;
        let t = t.contiguous()?;
        Ok(t.apply_op1_no_bwd(&PeerOp {
            p: self,
            gather: false,
            region,
        })?)
    }

    /// Whether a product's output of `bytes` bytes may finish its all-reduce itself
    /// ([`Self::reduce_target`]); like [`Self::fits`], the same answer on every rank.
    pub fn fits_reduce(bytes: usize) -> bool {
        bytes > 0 && bytes <= REDUCE_MAX_BYTES
    }

    /// Where a product of at most [`REDUCE_MAX_BYTES`] finishes its all-reduce: see
    /// [`crate::comm::PeerReduce`].
    ///
    /// # Errors
    /// A peer missed the deadline in an earlier call (named).
    pub fn reduce_target(&self) -> Result<crate::comm::PeerReduce> {
        self.check_peers("all_reduce_sum")?;
        Ok(self.reduce)
    }

    /// [`Self::all_reduce`] of a product's output (at most [`REDUCE_MAX_BYTES`]) as one call of
    /// the products' region: what a rank whose product could not finish the all-reduce itself
    /// runs, so that it still meets the peers whose products did.
    ///
    /// # Errors
    /// As [`Self::all_reduce`].
    pub fn all_reduce_product(&self, t: &Tensor) -> Result<Tensor> {
        self.reduce_in(t, Region::Products)
    }

    /// Every rank's `t` (flattened, the same length on every rank, the caller checked
    /// [`Self::fits`]) side by side in rank order: `[world * n]`. Keeps all-gathers of small
    /// pieces (a vocabulary-parallel lm_head's logits) off NCCL, so a captured decode step
    /// holds no NCCL call on one host.
    ///
    /// # Errors
    /// As [`Self::all_reduce`].
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.check_peers("all_gather")?;
        let t = t.flatten_all()?.contiguous()?;
        Ok(t.apply_op1_no_bwd(&PeerOp {
            p: self,
            gather: true,
            region: Region::AllReduce,
        })?)
    }
}

struct PeerOp<'a> {
    p: &'a PeerAllReduce,
    /// All-gather instead of all-reduce.
    gather: bool,
    region: Region,
}

/// Which region of the buffers (and which call numbers) a call uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Region {
    /// The all-reduce's own, numbered by the per-block counters.
    AllReduce,
    /// The products' (see [`crate::comm::PeerReduce`]), numbered by the ticket.
    Products,
}

impl CustomOp1 for PeerOp<'_> {
    fn name(&self) -> &'static str {
        if self.gather {
            "peer_all_gather"
        } else {
            "peer_all_reduce"
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the peer all-reduce needs a CUDA tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("peer all-reduce: not contiguous".into()))?;
        let n = end - start;
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let p = self.p;
        let elem = s.dtype().size_in_bytes();
        let products = self.region == Region::Products;
        let (cap, base, ticket) = if products {
            (p.reduce.cap, p.reduce.base, p.reduce.ticket)
        } else {
            (SLOT_WORDS as u64, 0, 0)
        };
        if products && n * elem > REDUCE_MAX_BYTES {
            candle_core::bail!("peer all-reduce: {} bytes for a product's call", n * elem);
        }
        let words = (n * elem).div_ceil(4);
        let blocks = words.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rank, world) = (p.rank as i32, p.world as i32);
        let (n64, timeout) = (n as u64, p.deadline.as_nanos() as u64);
        let gather = i32::from(self.gather);
        let (out_len, out_shape) = if self.gather {
            (p.world * n, Shape::from(p.world * n))
        } else {
            (n, l.shape().clone())
        };
        let err = |e: cudarc::driver::DriverError| {
            candle_core::Error::Msg(format!("peer all-reduce launch: {e:?}"))
        };
        macro_rules! run {
            ($t:ty, $k:expr) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(start..end);
                // SAFETY: the kernel writes all n (gather: world * n) elements.
                let mut dst = unsafe { dev.alloc::<$t>(out_len)? };
                let mut b = stream.launch_builder(&p.kernels[$k]);
                b.arg(&src)
                    .arg(&mut dst)
                    .arg(&p.table)
                    .arg(&p.counters)
                    .arg(&p.error.dev)
                    .arg(&rank)
                    .arg(&world)
                    .arg(&n64)
                    .arg(&cap)
                    .arg(&timeout)
                    .arg(&gather)
                    .arg(&ticket)
                    .arg(&base);
                // SAFETY: arguments match the kernel's signature; buffers are live.
                unsafe { b.launch(cfg) }.map_err(err)?;
                Ok((CudaStorage::wrap_cuda_slice(dst, dev), out_shape))
            }};
        }
        match s.dtype() {
            DType::F32 => run!(f32, 0),
            DType::BF16 => run!(half::bf16, 1),
            DType::F16 => run!(half::f16, 2),
            d => candle_core::bail!("peer all-reduce: dtype {d:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_words_round_trip() {
        let mut h = [0u8; 64];
        h.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 37) as u8);
        let info = PeerInfo {
            host: 0x0123_4567_89ab_cdef,
            pid: 4242,
            ordinal: 3,
            data: 0x7f00_dead_beef,
            data_handle: h,
        };
        let w = info.to_words();
        assert_eq!(w.len(), INFO_WORDS);
        assert_eq!(PeerInfo::from_words(&w), Some(info));
        assert_eq!(PeerInfo::from_words(&w[1..]), None);
    }
}
