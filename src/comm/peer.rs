//! One-shot all-reduce (and all-gather) over peer memory for small messages between GPUs of
//! one host (cargo feature `cuda`).
//!
//! NCCL's small all-reduce costs tens of microseconds; a decode step makes two per layer.
//! The all-gather of a vocabulary-parallel lm_head's logits takes the same path, so a
//! captured decode step on one host holds no NCCL call (NCCL calls recorded by a capture
//! that then fails on one rank are the suspected cause of an intermittent stall with graphs
//! on).
//! Here every rank owns a registered buffer (two halves, used alternately, each with one slot
//! per rank) and a flag area. Each call is one kernel, compiled by NVRTC at start-up: every
//! block pushes its elements of the input into this rank's slot of every rank's buffer (its
//! own included), raises its flag in every peer's flag area, waits for every peer's flag in
//! its own, then sums the same elements of every slot of its own buffer in rank order (so
//! every rank gets bit-identical results). Pushing costs one-way stores over the link where
//! reading the peers' buffers cost a round trip. Counters live in device memory, so the
//! kernel can be captured in a CUDA graph.
//!
//! Why two halves are enough: rank r writes its slot of half `e % 2` of peer p in call `e`
//! only after its call `e - 1` finished, which needed p's flag of call `e - 1`, which p raised
//! after its call `e - 2` (the last reader of that half) had finished.
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
/// Most blocks per call (flag slots per peer).
const MAX_BLOCKS: usize = 32;
const THREADS: u32 = 512;
/// Largest message, bytes. Above it each rank would read `world` times as much as NCCL's
/// ring moves, and NCCL wins.
pub const MAX_BYTES: usize = 512 << 10;
/// How long a block waits for a peer's flag, unless `SHARDWISE_PEER_DEADLINE_MS` says.
fn deadline() -> Duration {
    Duration::from_millis(super::env_usize("SHARDWISE_PEER_DEADLINE_MS", 30_000) as u64)
}

const SRC: &str = r#"
#define MAXW 8
struct __align__(16) V16 { unsigned a, b, c, d; };

__device__ __forceinline__ u64 now_ns() { u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v; asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v; }
__device__ __forceinline__ void st_release(unsigned* p, unsigned v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory"); }

// peers[0..MAXW): data buffers, each two halves of MAXW slots of `cap` elements (slot w of a
// rank's buffer receives rank w's elements); peers[MAXW..2*MAXW): flag areas, one u32 per
// (block, source rank). Each rank pushes its elements into its slot of every rank's buffer
// (remote stores, which do not wait for a reply, where reading a peer's buffer costs a round
// trip over the link), raises its flag in every peer's flag area, waits for every peer's flag
// in its own, and then reads only its own memory. Elements move in 16-byte chunks; the tail
// past the last whole chunk belongs to block 0. Push and reduction use the same
// chunk-to-block assignment, so a block only reads what the same block of every peer wrote
// before raising its flag.
// With `gather`, every rank's n elements go to out[rank * n ..] instead of being summed
// (an all-gather of equal pieces), under the same protocol.
template <typename K>
__device__ void all_reduce(const typename K::T* in, typename K::T* out, const u64* peers,
                           unsigned* counters, unsigned* err, int rank, int world, u64 n,
                           u64 cap, u64 timeout, int gather) {
  typedef typename K::T T;
  const int V = 16 / sizeof(T);
  __shared__ unsigned epoch;
  if (threadIdx.x == 0) { unsigned e = counters[blockIdx.x] + 1; counters[blockIdx.x] = e; epoch = e; }
  __syncthreads();
  const unsigned e = epoch;
  // This call's half: slot w at half + w * cap.
  const u64 half = (u64)(e & 1u) * MAXW * cap;
  const u64 stride = (u64)gridDim.x * blockDim.x;
  const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  const u64 chunks = n / V;
  const bool aligned = (((u64)in) & 15) == 0;
  for (u64 c = first; c < chunks; c += stride) {
    V16 x;
    if (aligned) {
      x = ((const V16*)in)[c];
    } else {
      T* xe = (T*)&x;
      for (int j = 0; j < V; ++j) xe[j] = in[c * V + j];
    }
#pragma unroll
    for (int w = 0; w < MAXW; ++w)
      if (w < world) ((V16*)((T*)peers[w] + half + (u64)rank * cap))[c] = x;
  }
  if (blockIdx.x == 0)
    for (u64 i = chunks * V + threadIdx.x; i < n; i += blockDim.x)
      for (int w = 0; w < world; ++w) ((T*)peers[w] + half + (u64)rank * cap)[i] = in[i];
  __syncthreads();
  if (threadIdx.x < (unsigned)world) {
    const int p = threadIdx.x;
    __threadfence_system();
    st_release((unsigned*)peers[MAXW + p] + blockIdx.x * MAXW + rank, e);
    const unsigned* from = (const unsigned*)peers[MAXW + rank] + blockIdx.x * MAXW + p;
    const u64 t0 = now_ns();
    while ((int)(ld_acquire(from) - e) < 0) {
      if (now_ns() - t0 > timeout) { atomicCAS(err, 0u, (unsigned)p + 1u); break; }
    }
  }
  __syncthreads();
  // Rank w's elements, in this rank's own buffer.
  const T* mine = (const T*)peers[rank] + half;
  if (gather) {
    const bool vec = (n % V) == 0 && (((u64)out) & 15) == 0;
    for (u64 c = first; c < chunks; c += stride) {
#pragma unroll
      for (int w = 0; w < MAXW; ++w) {
        if (w < world) {
          const V16 v = ((const V16*)(mine + (u64)w * cap))[c];
          T* dst = out + (u64)w * n;
          if (vec) {
            ((V16*)dst)[c] = v;
          } else {
            const T* x = (const T*)&v;
            for (int j = 0; j < V; ++j) dst[c * V + j] = x[j];
          }
        }
      }
    }
    if (blockIdx.x == 0)
      for (u64 i = chunks * V + threadIdx.x; i < n; i += blockDim.x)
        for (int w = 0; w < world; ++w) out[(u64)w * n + i] = (mine + (u64)w * cap)[i];
    return;
  }
  for (u64 c = first; c < chunks; c += stride) {
    V16 v[MAXW];
#pragma unroll
    for (int w = 0; w < MAXW; ++w)
      if (w < world) v[w] = ((const V16*)(mine + (u64)w * cap))[c];
    float acc[16 / sizeof(T)];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
#pragma unroll
    for (int w = 0; w < MAXW; ++w) {
      if (w < world) {
        const T* x = (const T*)&v[w];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += K::ld(x[j]);
      }
    }
    V16 o;
    T* y = (T*)&o;
#pragma unroll
    for (int j = 0; j < V; ++j) y[j] = K::st(acc[j]);
    ((V16*)out)[c] = o;
  }
  if (blockIdx.x == 0)
    for (u64 i = chunks * V + threadIdx.x; i < n; i += blockDim.x) {
      float acc = 0.f;
      for (int w = 0; w < world; ++w) acc += K::ld((mine + (u64)w * cap)[i]);
      out[i] = K::st(acc);
    }
}

#define KERNEL(name, K) \
extern "C" __global__ void name(const K::T* in, K::T* out, const u64* peers, unsigned* counters, \
    unsigned* err, int rank, int world, u64 n, u64 cap, u64 timeout, int gather) { \
  all_reduce<K>(in, out, peers, counters, err, rank, world, n, cap, timeout, gather); }
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
    flags: u64,
    data_handle: [u8; 64],
    flags_handle: [u8; 64],
}

/// u32 words of a [`PeerInfo`].
pub(crate) const INFO_WORDS: usize = 2 + 1 + 1 + 2 + 2 + 16 + 16;

impl PeerInfo {
    pub(crate) fn to_words(&self) -> Vec<u32> {
        let mut w = Vec::with_capacity(INFO_WORDS);
        let split = |v: u64| [v as u32, (v >> 32) as u32];
        w.extend(split(self.host));
        w.push(self.pid);
        w.push(self.ordinal);
        w.extend(split(self.data));
        w.extend(split(self.flags));
        for h in [&self.data_handle, &self.flags_handle] {
            w.extend(
                h.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
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
            flags: join(6),
            data_handle: handle(8),
            flags_handle: handle(24),
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
    flags: CUdeviceptr,
    info: PeerInfo,
}

impl PeerBuffers {
    /// Allocates and zeroes this rank's buffers on `ctx`'s device.
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        ctx.bind_to_thread().map_err(driver)?;
        let mut data: CUdeviceptr = 0;
        let mut flags: CUdeviceptr = 0;
        let flag_bytes = MAX_BLOCKS * MAX_WORLD * 4;
        // SAFETY: plain driver allocations on the current context, freed in `Drop`.
        unsafe {
            check(
                "allocating",
                sys::cuMemAlloc_v2(&mut data, 2 * MAX_WORLD * MAX_BYTES),
            )?;
            let mut me = Self {
                ctx: ctx.clone(),
                data,
                flags: 0,
                info: PeerInfo {
                    host: host_id(),
                    pid: std::process::id(),
                    ordinal: ctx.ordinal() as u32,
                    data,
                    flags: 0,
                    data_handle: [0; 64],
                    flags_handle: [0; 64],
                },
            };
            check("allocating", sys::cuMemAlloc_v2(&mut flags, flag_bytes))?;
            me.flags = flags;
            me.info.flags = flags;
            check("zeroing", sys::cuMemsetD8_v2(flags, 0, flag_bytes))?;
            for (ptr, out) in [
                (data, &mut me.info.data_handle),
                (flags, &mut me.info.flags_handle),
            ] {
                let mut h = std::mem::MaybeUninit::<sys::CUipcMemHandle>::zeroed();
                // IPC is optional (peers in this process need none): a failure leaves the
                // handle zeroed and only other processes fail to open it.
                if sys::cuIpcGetMemHandle(h.as_mut_ptr(), ptr) == CUresult::CUDA_SUCCESS {
                    let h = h.assume_init();
                    for (o, c) in out.iter_mut().zip(h.reserved) {
                        *o = c as u8;
                    }
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
                for p in [self.data, self.flags] {
                    if p != 0 {
                        let _ = sys::cuMemFree_v2(p);
                    }
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
/// its IPC handles (kept in `ipc`). Returns the peer's (data, flags) pointers.
fn open_peer(
    ctx: &Arc<CudaContext>,
    me: &PeerInfo,
    peer: &PeerInfo,
    ipc: &mut IpcMapped,
) -> Result<(u64, u64)> {
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
            return Ok((peer.data, peer.flags));
        }
        let mut open = |h: &[u8; 64]| -> Result<u64> {
            let mut handle = sys::CUipcMemHandle_st { reserved: [0; 64] };
            for (o, c) in handle.reserved.iter_mut().zip(h) {
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
        };
        Ok((open(&peer.data_handle)?, open(&peer.flags_handle)?))
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
    /// `[data pointers of ranks 0..MAX_WORLD, flag pointers of ranks 0..MAX_WORLD]`.
    table: CudaSlice<u64>,
    counters: CudaSlice<u32>,
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
        let mut table = vec![0u64; 2 * MAX_WORLD];
        // Every early return below drops `ipc`, unmapping what was opened so far.
        let mut ipc = IpcMapped {
            ctx: ctx.clone(),
            ptrs: Vec::new(),
        };
        for (p, info) in infos.iter().enumerate() {
            let (d, f) = if p == rank {
                (mine.data, mine.flags)
            } else {
                open_peer(&ctx, &mine.info, info, &mut ipc)?
            };
            table[p] = d;
            table[MAX_WORLD + p] = f;
        }
        let k = crate::cuda::load_kernels(
            &ctx,
            "peer_all_reduce",
            &[crate::cuda::DTYPES, SRC],
            &[
                "peer_all_reduce_f32",
                "peer_all_reduce_bf16",
                "peer_all_reduce_f16",
            ],
        )?;
        let table = stream.clone_htod(&table).map_err(driver)?;
        let counters = stream.alloc_zeros::<u32>(MAX_BLOCKS).map_err(driver)?;
        stream.synchronize().map_err(driver)?;
        let mut k = k.into_iter();
        let (Some(f32k), Some(bf16k), Some(f16k)) = (k.next(), k.next(), k.next()) else {
            return Err(Error::Unsupported {
                what: "peer all-reduce".into(),
                by: "its kernel module (functions missing)".into(),
            });
        };
        let error = ErrorWord::new()?;
        Ok(Self {
            rank,
            world,
            kernels: [f32k, bf16k, f16k],
            table,
            counters,
            error,
            deadline: deadline(),
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
        self.check_peers("all_reduce_sum")?;
        let t = t.contiguous()?;
        Ok(t.apply_op1_no_bwd(&PeerOp {
            p: self,
            gather: false,
        })?)
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
        })?)
    }
}

struct PeerOp<'a> {
    p: &'a PeerAllReduce,
    /// All-gather instead of all-reduce.
    gather: bool,
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
        let cap = (MAX_BYTES / elem) as u64;
        let blocks = n.div_ceil(THREADS as usize * 8).clamp(1, MAX_BLOCKS) as u32;
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
                    .arg(&gather);
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
            flags: 0x7f00_0000_1000,
            data_handle: h,
            flags_handle: [9; 64],
        };
        let w = info.to_words();
        assert_eq!(w.len(), INFO_WORDS);
        assert_eq!(PeerInfo::from_words(&w), Some(info));
        assert_eq!(PeerInfo::from_words(&w[1..]), None);
    }
}
