//! Fused kernels of the decode step, one dispatch point per operation: on a CUDA rank (cargo
//! feature `cuda`) each runs as one kernel of the project's own (compiled by NVRTC); anywhere
//! else, or with `SHARDWISE_FUSED=0`, as the candle operations it replaces.
//!
//! Why: a decode step of one token is a few large matrix products and many small operations,
//! and on a GPU each small operation costs a kernel launch and a few microseconds whatever its
//! size. Measured on an H200 (Llama-3-8B shape, one token, 512 cached positions), candle's
//! attention of one token took five kernels and ~48 us per layer (a copy of the whole value
//! cache, a one-warp-per-row softmax, a strided batched GEMV), and norm plus residual add
//! another ~8 us; here they are:
//! - [`add_rms_norm`]: residual add and RMSNorm in one kernel, both results out;
//! - [`silu_mul`]: `silu(gate) * up` of a merged gate/up product in one kernel;
//! - [`decode_attention`]: one query token against a KV cache (grouped heads share their
//!   keys and values, no copies), split over the positions and combined in the same kernel;
//! - [`rope_store`]: rotary embedding of one token and its KV cache write;
//! - [`linear`] and [`norm_linear`]: the products of a decode step's one or two rows as a
//!   GEMV (no split-K reduction kernel), with the residual add, the norm before it and the
//!   silu after it in the same kernel (`SHARDWISE_GEMV=0` leaves the products to cuBLAS);
//! - [`norm_linear_rope`]: the q/k/v product of one token with the rotary embedding and KV
//!   cache write of [`rope_store`] in its epilogue.
//!
//! Each rounds where the operations it replaces round (the sum to the model's dtype before
//! the norm, silu's result before the product), so fused and plain steps agree to float
//! summation order; the GEMV with a norm applies the norm's scale to the finished dot product
//! instead of rounding the normed input first, within the dtype's rounding of the result.

use candle_core::{Tensor, D};

use crate::error::Result;

/// Whether `t`'s device runs the fused kernels: a CUDA device, unless `SHARDWISE_FUSED=0`
/// (read once per process: this sits on every layer's path).
#[cfg(feature = "cuda")]
fn fused_on(t: &Tensor) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    t.device().is_cuda()
        && matches!(
            t.dtype(),
            candle_core::DType::F32 | candle_core::DType::BF16 | candle_core::DType::F16
        )
        && !*OFF.get_or_init(|| std::env::var("SHARDWISE_FUSED").is_ok_and(|v| v == "0"))
}

/// `x + delta` (when given) and RMSNorm of it with weight `w`: returns `(sum, normed)`; the
/// sum is `x` itself without `delta`.
///
/// # Errors
/// Shape mismatches, kernel errors.
pub fn add_rms_norm(
    x: &Tensor,
    delta: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if fused_on(x) && w.elem_count() <= gpu::MAX_NORM_WIDTH {
        return gpu::add_rms_norm(x, delta, w, eps);
    }
    let x = match delta {
        Some(d) => (x + d)?,
        None => x.clone(),
    };
    let h = candle_nn::ops::rms_norm(&x, w, eps)?;
    Ok((x, h))
}

/// `silu(gate) * up` of a merged product `[.., 2 * width]` (gate columns first).
///
/// # Errors
/// An odd last dimension, kernel errors.
pub fn silu_mul(gu: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_on(gu) {
        return gpu::silu_mul(gu);
    }
    let half = gu.dim(D::Minus1)? / 2;
    let gate = gu.narrow(D::Minus1, 0, half)?;
    let up = gu.narrow(D::Minus1, half, half)?;
    Ok((candle_nn::ops::silu(&gate)? * up)?)
}

/// The input of a product that starts with a norm: RMSNorm (weight `w`, `eps`) of `x`, or
/// of `x + delta` when given.
#[derive(Debug, Clone, Copy)]
pub struct NormIn<'a> {
    /// Residual stream `[.., width]`.
    pub x: &'a Tensor,
    /// Added to `x` before the norm (a previous block's output).
    pub delta: Option<&'a Tensor>,
    /// With `delta`: it is this rank's part of a row-parallel product whose all-reduce is
    /// still owed, to be done before the add (in the norm's own kernel where it serves).
    pub owed: Option<Owed<'a>>,
    /// Norm weight `[width]`.
    pub w: &'a Tensor,
    /// Norm epsilon.
    pub eps: f32,
}

/// The all-reduce a row-parallel product's output still owes: one call of the peer
/// products' protocol ([`crate::comm::Communicator::reduce_target`]), which its ranks were
/// promised. Whoever consumes the output makes that call exactly once: the norm that follows
/// ([`add_rms_norm_in`]) in its own kernel, or [`Owed::settle`].
#[derive(Clone, Copy)]
pub struct Owed<'a> {
    /// Where the call goes.
    pub target: crate::comm::PeerReduce,
    /// The communicator that promised it, for the plain call.
    pub comm: &'a dyn crate::comm::Communicator,
}

impl std::fmt::Debug for Owed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owed")
            .field("target", &self.target)
            .finish()
    }
}

impl Owed<'_> {
    /// `partial` summed over the ranks by the all-reduce kernel of the owed protocol.
    ///
    /// # Errors
    /// Collective errors (a peer that missed the deadline, named).
    pub fn settle(&self, partial: &Tensor) -> Result<Tensor> {
        self.comm.all_reduce_product(partial)
    }
}

/// Whether an owed all-reduce may be done by the norm that follows it
/// (`SHARDWISE_NORM_REDUCE=0`: never, the all-reduce kernel runs first, to measure it).
pub fn norm_reduce_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SHARDWISE_NORM_REDUCE").map_or(true, |v| v != "0"))
}

/// [`add_rms_norm`] of `n`, doing first the all-reduce its delta owes: in the same kernel
/// where it serves (a CUDA rank, rows whose bytes are whole 4-byte words), else by
/// [`Owed::settle`]. `(sum, normed)`; every rank gets the bits it would get from the
/// all-reduce kernel followed by [`add_rms_norm`].
///
/// # Errors
/// Shape mismatches, kernel and collective errors.
pub fn add_rms_norm_in(n: NormIn<'_>) -> Result<(Tensor, Tensor)> {
    let (Some(d), Some(owed)) = (n.delta, n.owed) else {
        return add_rms_norm(n.x, n.delta, n.w, n.eps);
    };
    #[cfg(feature = "cuda")]
    if fused_on(n.x) && n.w.elem_count() <= gpu::MAX_NORM_WIDTH {
        if let Some(r) = gpu::add_rms_norm_reduced(n.x, d, n.w, n.eps, owed.target)? {
            return Ok(r);
        }
    }
    let d = owed.settle(d)?;
    add_rms_norm(n.x, Some(&d), n.w, n.eps)
}

/// `x @ w^T` (`w`: `[out, in]`) for the one or two rows of a decode step, by the project's
/// GEMV kernel (the weight streamed once at full memory bandwidth, no split-K reduction
/// kernel). `None` where it does not serve: not CUDA, more rows, dtypes that differ, or
/// widths and addresses not in 16-byte units; the caller runs the matrix product.
///
/// # Errors
/// Kernel errors.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused_on(x) {
        return Ok(gpu::gemv(x, w, None, false)?.map(|(_, y)| y));
    }
    let _ = (x, w);
    Ok(None)
}

/// [`linear`] of a row-parallel product that also finishes its all-reduce over peer memory
/// (`target`, from [`crate::comm::Communicator::reduce_target`]): each block pushes its
/// outputs to the other ranks, waits for theirs and writes the sums, so no all-reduce kernel
/// follows. `None` where [`linear`] would not serve or the output's rows are not whole
/// 4-byte words; the caller then owes the peers the same protocol's all-reduce
/// ([`crate::comm::Communicator::all_reduce_product`]).
///
/// # Errors
/// Kernel errors.
pub fn linear_reduced(
    x: &Tensor,
    w: &Tensor,
    target: crate::comm::PeerReduce,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused_on(x) {
        return gpu::gemv_reduced(x, w, target);
    }
    let _ = (x, w, target);
    Ok(None)
}

/// [`add_rms_norm`] of `n` and the product of the normed rows with `w` in one kernel,
/// followed with `silu` by [`silu_mul`] of the product: `(sum, product)`, the sum being
/// `n.x` itself without `n.delta`. `None` where [`linear`] would not serve.
///
/// # Errors
/// Shape mismatches, kernel errors.
pub fn norm_linear(n: NormIn<'_>, w: &Tensor, silu: bool) -> Result<Option<(Tensor, Tensor)>> {
    #[cfg(feature = "cuda")]
    if fused_on(n.x) {
        return gpu::gemv(n.x, w, Some(n), silu);
    }
    let _ = (n, w, silu);
    Ok(None)
}

/// The rotary embedding and KV cache write that follow a q/k/v product of one token, done
/// inside it by [`norm_linear_rope`] (what [`rope_store`] does after the product otherwise).
#[derive(Debug, Clone, Copy)]
pub struct RopeIn<'a> {
    /// The position's cos row `[1, head_dim / 2]`.
    pub cos: &'a Tensor,
    /// The position's sin row `[1, head_dim / 2]`.
    pub sin: &'a Tensor,
    /// Pairs `(2p, 2p + 1)` instead of `(p, p + head_dim / 2)`.
    pub interleaved: bool,
    /// Key cache `[1, kv heads, capacity, head_dim]`.
    pub kc: &'a Tensor,
    /// Value cache, as `kc`.
    pub vc: &'a Tensor,
    /// Where the token's key and value go.
    pub pos: StorePos<'a>,
    /// Query heads of the product (its columns: q heads, then k heads, then v heads).
    pub q_heads: usize,
}

/// [`norm_linear`] of a merged q/k/v weight for one token, with the rotary embedding and the
/// KV cache write of [`rope_store`] in the same kernel: `(sum, rotated queries [1, q heads,
/// 1, head_dim])`, the key and value written into the caches. `None` where it does not serve
/// (as [`norm_linear`], or head widths not a multiple of 4, or a weight that is not q, k and
/// v heads of the caches' width); nothing is written then.
///
/// # Errors
/// A position outside the caches, kernel errors.
pub fn norm_linear_rope(
    n: NormIn<'_>,
    w: &Tensor,
    rope: RopeIn<'_>,
) -> Result<Option<(Tensor, Tensor)>> {
    #[cfg(feature = "cuda")]
    if fused_on(n.x) {
        return gpu::gemv_rope(n, w, rope);
    }
    let _ = (n, w, rope);
    Ok(None)
}

/// How many positions of a KV cache a decode attention reads.
#[derive(Debug, Clone, Copy)]
pub enum CacheLen<'a> {
    /// Known on the host: the cache tensors hold exactly the sequence.
    Host,
    /// One past the position in this device tensor (u32, first element): the cache tensors
    /// span their whole capacity (a step replayed as a CUDA graph). Only the CUDA kernel
    /// reads it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Device(&'a Tensor),
}

/// Attention of one query token (`q`: `[1, q heads, 1, head_dim]`, rotated) over cached keys
/// and values `[1, kv heads, positions, head_dim]`, query heads grouped `q heads / kv heads`
/// per KV head, within `window` past positions when set; `[1, q heads, 1, head_dim]` out.
/// `None` where no fused kernel serves (not CUDA; more than 16 query heads per KV head, or
/// more than 8 with heads wider than 128, or heads wider than 256): the caller runs the plain
/// path.
///
/// # Errors
/// Kernel errors.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    len: CacheLen<'_>,
    window: Option<usize>,
    scale: f32,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused_on(q) {
        return gpu::decode_attention(q, k, v, len, window, scale);
    }
    let _ = (q, k, v, len, window, scale);
    Ok(None)
}

/// [`decode_attention`] of several sequences in one launch: query tokens `q` (`[b, q heads,
/// 1, head_dim]`, rotated), sequence `i` over `caches[i]` (keys and values `[1, kv heads,
/// positions_i, head_dim]`, lengths on the host, the same heads and width for all); `[b, q
/// heads, 1, head_dim]` out. `None` where no fused kernel serves (as for one sequence, or more
/// than 1024 KV heads in all): the caller attends sequence by sequence. With
/// [`SeqTable::Device`], the caches span their capacity and the lengths are the table's.
///
/// # Errors
/// Kernel errors.
pub fn decode_attention_batch(
    q: &Tensor,
    caches: &[(&Tensor, &Tensor)],
    window: Option<usize>,
    scale: f32,
    table: SeqTable,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused_on(q) {
        return gpu::decode_attention_batch(q, caches, window, scale, table);
    }
    let _ = (q, caches, window, scale, table);
    Ok(None)
}

/// Where [`rope_store`] writes a token's key and value.
#[derive(Debug, Clone, Copy)]
pub enum StorePos<'a> {
    /// This position (known on the host).
    Host(usize),
    /// The position in this device tensor (u32, first element; a step replayed as a CUDA
    /// graph). Only the CUDA kernel reads it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Device(&'a Tensor),
}

/// Rotary embedding of one token's `q` and `k` (`[1, 1, heads * head_dim]`; `v` likewise)
/// with the position's `cos`/`sin` rows (`[1, head_dim / 2]`, pairs `(p, p + head_dim / 2)`,
/// or `(2p, 2p + 1)` when `interleaved`), `k` and `v` written into the fixed caches `kc`, `vc`
/// (`[1, kv heads, capacity, head_dim]`) at `pos`: one kernel for what is otherwise two
/// rotary kernels and two cache writes. Returns the rotated queries `[1, q heads, 1,
/// head_dim]`, or `None` where no fused kernel serves (not CUDA; nothing is written then).
///
/// # Errors
/// A position outside the caches, kernel errors.
#[allow(clippy::too_many_arguments)]
pub fn rope_store(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
    kc: &Tensor,
    vc: &Tensor,
    pos: StorePos<'_>,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused_on(q) {
        return gpu::rope_store(q, k, v, [cos, sin], interleaved, [kc, vc], pos);
    }
    let _ = (q, k, v, cos, sin, interleaved, kc, vc, pos);
    Ok(None)
}

/// One sequence's part of [`rope_store_batch`].
#[derive(Debug, Clone, Copy)]
pub struct RopeSeq<'a> {
    /// The position's cos and sin rows (`[1, head_dim / 2]`).
    pub cos_sin: [&'a Tensor; 2],
    /// The sequence's fixed key and value caches (`[1, kv heads, capacity, head_dim]`).
    pub caches: [&'a Tensor; 2],
    /// The position written.
    pub pos: usize,
}

/// [`rope_store`] of one token of each of several sequences in one launch: `q`, `k`, `v`
/// are `[b, 1, heads * head_dim]`, row `i` rotated with `seqs[i]`'s rows and written into its
/// caches at its position (positions known on the host, or with [`SeqTable::Device`] rows,
/// caches and positions the table's, `seqs` serving for shapes). Returns the rotated queries
/// `[b, q heads, 1, head_dim]`, or `None` where no fused kernel serves (nothing is written
/// then).
///
/// # Errors
/// A position outside its caches, kernel errors.
pub fn rope_store_batch(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &[RopeSeq<'_>],
    interleaved: bool,
    table: SeqTable,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused_on(q) {
        return gpu::rope_store_batch(q, k, v, seqs, interleaved, table);
    }
    let _ = (q, k, v, seqs, interleaved, table);
    Ok(None)
}

/// Where a launch for several sequences finds their descriptors (caches, lengths, rotary
/// rows, positions).
#[derive(Debug, Clone, Copy)]
pub enum SeqTable {
    /// Written by the launch from what the host holds (an eager step).
    Host,
    /// Already on the device at this address, laid out by [`layer_table`] and written before
    /// the launch (a captured batch step, whose positions change between replays). Only the
    /// CUDA kernels read it; the caches given alongside serve for shapes.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Device(u64),
}

/// Words of one sequence's descriptors of one layer ([`batch_words`]).
pub const BATCH_WORDS: usize = 16;
/// Of [`BATCH_WORDS`], those of the attention descriptor (the rest are rotary's).
const ATTEND_WORDS: usize = 7;

/// The descriptors of one sequence in one layer of a captured batch step, for
/// [`rope_store_batch`] and [`decode_attention_batch`] with [`SeqTable::Device`]: rotary rows
/// and caches of `s` (full capacity), the token written at `s.pos` and attention over the
/// positions up to it. `None` where the fused kernels do not serve (not CUDA, other shapes).
///
/// # Errors
/// A position outside the caches.
pub fn batch_words(s: &RopeSeq<'_>, interleaved: bool) -> Result<Option<[i64; BATCH_WORDS]>> {
    #[cfg(feature = "cuda")]
    if fused_on(s.caches[0]) {
        return gpu::batch_words(s, interleaved, s.caches[0].dtype());
    }
    let _ = (s, interleaved);
    Ok(None)
}

/// One layer's device table from its sequences' [`batch_words`]: every attention descriptor,
/// then every rotary one (the layout [`layer_tables`] addresses).
pub fn layer_table(seqs: &[[i64; BATCH_WORDS]]) -> Vec<i64> {
    let att = seqs.iter().flat_map(|w| w[..ATTEND_WORDS].iter().copied());
    let rope = seqs.iter().flat_map(|w| w[ATTEND_WORDS..].iter().copied());
    att.chain(rope).collect()
}

/// Writes each sequence's position (`positions[i]` for sequence `i`) into a [`layer_table`]:
/// where its token's key and value go and how many positions its attention reads.
pub fn set_positions(table: &mut [i64], positions: &[usize]) {
    let b = positions.len();
    for (i, &p) in positions.iter().enumerate() {
        // Word 2 of an attention descriptor is its length, word 4 of a rotary one its position.
        if let Some(w) = table.get_mut(i * ATTEND_WORDS + 2) {
            *w = p as i64 + 1;
        }
        if let Some(w) = table.get_mut(b * ATTEND_WORDS + i * (BATCH_WORDS - ATTEND_WORDS) + 4) {
            *w = p as i64;
        }
    }
}

/// Device address of `t`'s first element where the fused kernels could read it (a CUDA
/// tensor of a float, u32 or i64 dtype); `None` elsewhere.
///
/// # Errors
/// The storage's errors.
pub fn device_address(t: &Tensor) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    return crate::cuda::device_ptr(t);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = t;
        Ok(None)
    }
}

/// The attention and rotary tables of a [`layer_table`] of `b` sequences written at device
/// address `at`.
pub fn layer_tables(at: u64, b: usize) -> (SeqTable, SeqTable) {
    (
        SeqTable::Device(at),
        SeqTable::Device(at + (b * ATTEND_WORDS * 8) as u64),
    )
}

#[cfg(feature = "cuda")]
mod gpu {
    //! The kernels and their launches.

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
    use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

    use super::{CacheLen, NormIn, RopeIn, StorePos};
    use crate::cuda::device_ptr;
    use crate::error::{Error, Result};

    /// Most position splits of one attention (blocks per KV head).
    const MAX_SPLITS: usize = 64;
    /// Positions per split below which fewer splits are used: 64 unless
    /// `SHARDWISE_ATTN_SPLIT` says otherwise (to measure others).
    fn split_positions() -> usize {
        static SPLIT: OnceLock<usize> = OnceLock::new();
        *SPLIT.get_or_init(|| {
            std::env::var("SHARDWISE_ATTN_SPLIT")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&v: &usize| v > 0)
                .unwrap_or(64)
        })
    }
    /// Threads of an attention block (eight warps; the widest variant needs ~224 registers
    /// per thread, which 256 threads leave it).
    const ATTN_THREADS: u32 = 256;
    /// Most KV heads of one attention (combine counters).
    const MAX_KV_HEADS: usize = 1024;

    const SRC: &str = r#"
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#define TILE 64
#define MAXG 16
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o); return v; }
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o)); return v; }
__device__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < nw; ++w) t += red[w];
  return t;
}

// One block per row: y = x * rsqrt(mean(x^2) + eps) * w, where x is the row, or with `a` the
// row plus a's row rounded to T (also written to xo). Each thread holds the elements of 4-byte
// words tid, tid + blockDim.x, ... of the row (at most PER elements) in registers between the
// two passes: as add_rms_reduced holds them, so that both sum the squares in one order and
// give the same bits. The weights' loads are in flight while the block sums. (Issuing every
// load of x and a before the first store measured no faster.)
#define PER 16
// Runs the statements after E (elements per 4-byte word) for each element a norm thread holds:
// slot q of its registers, element i of the row.
#define FOR_HELD(E, ...) \
  _Pragma("unroll") for (int r_ = 0; r_ < PER / (E); ++r_) \
  _Pragma("unroll") for (int j_ = 0; j_ < (E); ++j_) { \
    const int q = r_ * (E) + j_, i = (threadIdx.x + r_ * blockDim.x) * (E) + j_; \
    (void)q; (void)i; __VA_ARGS__ }
// The norm weights of the elements add_rms's thread holds, into ws.
template <typename K>
__device__ __forceinline__ void load_norm_weights(const typename K::T* w, int n, float* ws) {
  FOR_HELD(4 / sizeof(typename K::T), ws[q] = i < n ? K::ld(w[i]) : 0.f;)
}

// y = vals * inv * ws for the elements add_rms's thread holds.
template <typename K>
__device__ __forceinline__ void store_normed(typename K::T* y, int n, const float* vals,
                                             const float* ws, float inv) {
  FOR_HELD(4 / sizeof(typename K::T), if (i < n) y[i] = K::st(vals[q] * inv * ws[q]);)
}

template <typename K, bool ADD>
__device__ void add_rms(const typename K::T* x, const typename K::T* a, const typename K::T* w,
                        typename K::T* xo, typename K::T* y, int n, float eps) {
  typedef typename K::T T;
  constexpr int E = 4 / sizeof(T);  // elements per word
  __shared__ float red[32];
  const long long off = (long long)blockIdx.x * n;
  x += off; y += off;
  if (ADD) { a += off; xo += off; }
  float vals[PER], ws[PER];
  float ss = 0.f;
  FOR_HELD(E,
    vals[q] = 0.f;
    if (i < n) {
      float v = K::ld(x[i]);
      if (ADD) { const T s = K::st(v + K::ld(a[i])); xo[i] = s; v = K::ld(s); }
      vals[q] = v;
      ss += v * v;
    })
  load_norm_weights<K>(w, n, ws);
  const float inv = rsqrtf(block_sum(ss, red) / (float)n + eps);
  store_normed<K>(y, n, vals, ws, inv);
}

// y[r, c] = silu(gu[r, c]) * gu[r, half + c], silu's result rounded to T first.
template <typename K>
__device__ void silu_mul(const typename K::T* gu, typename K::T* y, long long rows, int half) {
  const long long total = rows * half;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / half, c = i - r * half;
    const float g = K::ld(gu[r * 2 * half + c]);
    const float s = K::ld(K::st(g / (1.f + __expf(-g))));
    y[i] = K::st(s * K::ld(gu[r * 2 * half + half + c]));
  }
}

// Dimensions lane * ME .. lane * ME + ME - 1 of a cache row (zero past hd), in vector loads of
// up to 16 bytes when `vec` (rows start on that size).
template <typename K, int ME>
__device__ __forceinline__ void load_dims(const typename K::T* row, int lane, int hd, bool vec,
                                          float* out) {
  typedef typename K::T T;
  constexpr int BYTES = ME * sizeof(T);
  const int d0 = lane * ME;
  if (vec && d0 + ME <= hd && (BYTES == 8 || BYTES % 16 == 0)) {
    if (BYTES == 8) {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(row + d0));
      const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int e = 0; e < ME; ++e) out[e] = K::ld(t[e]);
    } else {
      constexpr int CH = 16 / sizeof(T);
#pragma unroll
      for (int c = 0; c < ME / CH; ++c) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(row + d0 + c * CH));
        const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int e = 0; e < CH; ++e) out[c * CH + e] = K::ld(t[e]);
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < ME; ++e) out[e] = d0 + e < hd ? K::ld(row[d0 + e]) : 0.f;
  }
}

// A 16-byte chunk of T as floats.
template <typename K>
__device__ __forceinline__ void unpack16(const uint4& u, float* f) {
  const typename K::T* t = reinterpret_cast<const typename K::T*>(&u);
#pragma unroll
  for (int i = 0; i < (int)(16 / sizeof(typename K::T)); ++i) f[i] = K::ld(t[i]);
}
template <typename T>
__device__ __forceinline__ uint4 ld16(const T* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// The parameters of every attention kernel (see SEQ_SELECT for `seqs`).
#define ATTEND_PARAMS const typename K::T* q, const typename K::T* k, const typename K::T* v, \
    typename K::T* out, float* scratch, unsigned* counters, const unsigned* pos_ptr, \
    int len_host, int g, int hd, long long ks_h, long long ks_p, long long vs_h, long long vs_p, \
    int span, int window, float scale
// Positions [start, end) of split `split` of `nsplit` over `span` positions, for a cache of
// len positions (pos_ptr[0] + 1 when the position is on the device) under a window (0: none).
__device__ __forceinline__ void split_range(const unsigned* pos_ptr, int len_host, int span,
                                            int window, int split, int nsplit, int& start,
                                            int& end) {
  const int len = pos_ptr ? (int)pos_ptr[0] + 1 : len_host;
  const int first = (window > 0 && len > window) ? len - window : 0;
  const int chunk = (span + nsplit - 1) / nsplit;
  start = max(split * chunk, first);
  end = min(split * chunk + chunk, len);
}

// The end of an attention block: its partial (sums bacc [g * hd], maxima bm [g], sums of
// weights bl [g], in shared memory) is the result when the block holds every position;
// otherwise it goes to scratch, and the last block of the KV head to finish merges every
// split's partial into `out` and resets its counter. All loads of a merge are issued before
// their sums, so each step costs one memory latency. Reuses `sm` (after bacc is read).
template <typename K>
__device__ void finish_splits(const float* bacc, const float* bm, const float* bl, float* sm,
                              typename K::T* out, float* scratch, unsigned* counters, int kvh,
                              int split, int nsplit, int g, int hd) {
  __shared__ unsigned last;
  const int tid = threadIdx.x;
  if (nsplit == 1) {
    for (int i = tid; i < g * hd; i += blockDim.x) {
      const int h = i / hd;
      out[((long long)kvh * g + h) * hd + (i - h * hd)] = K::st(bacc[i] / bl[h]);
    }
    return;
  }
  const int rec = hd + 2;
  float* mine = scratch + (long long)(kvh * nsplit + split) * g * rec;
  for (int i = tid; i < g * hd; i += blockDim.x) {
    const int h = i / hd, d = i - h * hd;
    mine[h * rec + 2 + d] = bacc[i];
    if (d == 0) { mine[h * rec] = bm[h]; mine[h * rec + 1] = bl[h]; }
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) last = atomicAdd(&counters[kvh], 1u) == (unsigned)(nsplit - 1);
  __syncthreads();
  if (!last) return;
  if (tid == 0) counters[kvh] = 0u;
  __threadfence();
  const float* all = scratch + (long long)kvh * nsplit * g * rec;
  float* sw = sm;               // [nsplit * g] split maxima, then weights
  float* sl = sw + nsplit * g;  // [nsplit * g] split sums
  float* fm = sl + nsplit * g;  // [g] maxima
  float* fl = fm + g;           // [g] sums of weights
  for (int i = tid; i < nsplit * g; i += blockDim.x) {
    sw[i] = __ldcg(all + i * rec);
    sl[i] = __ldcg(all + i * rec + 1);
  }
  __syncthreads();
  for (int h = tid; h < g; h += blockDim.x) {
    float mx = -INFINITY;
    for (int sp = 0; sp < nsplit; ++sp) mx = fmaxf(mx, sw[sp * g + h]);
    float lt = 0.f;
    for (int sp = 0; sp < nsplit; ++sp) {
      const float ms = sw[sp * g + h];
      if (ms != -INFINITY) lt += __expf(ms - mx) * sl[sp * g + h];
    }
    fm[h] = mx;
    fl[h] = lt;
  }
  __syncthreads();
  for (int i = tid; i < nsplit * g; i += blockDim.x) {
    const float ms = sw[i];
    sw[i] = ms == -INFINITY ? 0.f : __expf(ms - fm[i % g]);
  }
  __syncthreads();
  for (int i = tid; i < g * hd; i += blockDim.x) {
    const int h = i / hd, d = i - h * hd;
    float o = 0.f;
#pragma unroll 8
    for (int sp = 0; sp < nsplit; ++sp) o += sw[sp * g + h] * __ldcg(all + (sp * g + h) * rec + 2 + d);
    out[((long long)kvh * g + h) * hd + d] = K::st(o / fl[h]);
  }
}

// Block (kv head, split): the split's positions of the `g` query heads of one KV head. Each
// warp takes groups of U positions (keys and values of a group loaded at once), lane `l`
// holding dimensions l * ME .. l * ME + ME - 1 of every head's query and accumulator (one
// vector load per row), with a running max and sum per head (online softmax). The warps'
// partials are merged in shared memory and `finish_splits` takes the block's partial.
// MG >= g and 32 * ME >= hd (compile-time bounds keep everything in registers).
template <typename K, int MG, int ME, int U>
__device__ void attend(ATTEND_PARAMS) {
  typedef typename K::T T;
  extern __shared__ float sm[];
  const int kvh = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  int start, end;
  split_range(pos_ptr, len_host, span, window, split, nsplit, start, end);
  // Shared: block sums [g * hd], block sum of weights [g], warp maxima [nwarps * g], block
  // maxima [g].
  float* bacc = sm;
  float* bl = bacc + g * hd;
  float* wm = bl + g;
  float* bm = wm + nwarps * g;
  for (int i = tid; i < g * hd + g; i += blockDim.x) sm[i] = 0.f;
  float qr[MG][ME], acc[MG][ME], m[MG], l[MG];
#pragma unroll
  for (int h = 0; h < MG; ++h) {
    m[h] = -INFINITY; l[h] = 0.f;
#pragma unroll
    for (int e = 0; e < ME; ++e) {
      const int d = lane * ME + e;
      qr[h][e] = (h < g && d < hd) ? K::ld(q[((long long)kvh * g + h) * hd + d]) * scale : 0.f;
      acc[h][e] = 0.f;
    }
  }
  const T* kb = k + kvh * ks_h;
  const T* vb = v + kvh * vs_h;
  // Rows in whole vectors when every row starts on the vector size.
  const unsigned long long vb_bytes = ME * sizeof(T) < 16 ? ME * sizeof(T) : 16;
  const bool vec = ((((unsigned long long)kb) | ((unsigned long long)vb) |
                     (unsigned long long)(ks_p * sizeof(T)) |
                     (unsigned long long)(vs_p * sizeof(T))) & (vb_bytes - 1)) == 0;
  for (int j0 = start + warp * U; j0 < end; j0 += nwarps * U) {
    float kx[U][ME], vx[U][ME], s[U][MG];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool ok = j0 + u < end;
#pragma unroll
      for (int e = 0; e < ME; ++e) {
        kx[u][e] = 0.f;
        vx[u][e] = 0.f;
      }
      if (ok) {
        load_dims<K, ME>(kb + (long long)(j0 + u) * ks_p, lane, hd, vec, kx[u]);
        load_dims<K, ME>(vb + (long long)(j0 + u) * vs_p, lane, hd, vec, vx[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int h = 0; h < MG; ++h) {
        float p = 0.f;
#pragma unroll
        for (int e = 0; e < ME; ++e) p += qr[h][e] * kx[u][e];
        s[u][h] = p;
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int h = 0; h < MG; ++h) s[u][h] += __shfl_xor_sync(0xffffffffu, s[u][h], o);
#pragma unroll
    for (int h = 0; h < MG; ++h) {
      float mx = m[h];
#pragma unroll
      for (int u = 0; u < U; ++u) if (j0 + u < end) mx = fmaxf(mx, s[u][h]);
      const float corr = __expf(m[h] - mx);
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float p = (j0 + u < end) ? __expf(s[u][h] - mx) : 0.f;
        s[u][h] = p;
        sum += p;
      }
      m[h] = mx;
      l[h] = l[h] * corr + sum;
#pragma unroll
      for (int e = 0; e < ME; ++e) {
        float a = acc[h][e] * corr;
#pragma unroll
        for (int u = 0; u < U; ++u) a += s[u][h] * vx[u][e];
        acc[h][e] = a;
      }
    }
  }
  // Merge the warps: block maxima, then each warp adds its rescaled sums.
#pragma unroll
  for (int h = 0; h < MG; ++h) if (h < g && lane == 0) wm[warp * g + h] = m[h];
  __syncthreads();
  for (int h = tid; h < g; h += blockDim.x) {
    float mx = -INFINITY;
    for (int w = 0; w < nwarps; ++w) mx = fmaxf(mx, wm[w * g + h]);
    bm[h] = mx;
  }
  __syncthreads();
#pragma unroll
  for (int h = 0; h < MG; ++h) {
    if (h < g && m[h] != -INFINITY) {
      const float c = __expf(m[h] - bm[h]);
      if (lane == 0) atomicAdd(&bl[h], c * l[h]);
#pragma unroll
      for (int e = 0; e < ME; ++e) {
        const int d = lane * ME + e;
        if (d < hd) atomicAdd(&bacc[h * hd + d], c * acc[h][e]);
      }
    }
  }
  __syncthreads();
  finish_splits<K>(bacc, bm, bl, sm, out, scratch, counters, kvh, split, nsplit, g, hd);
}

// Block (kv head, split) like `attend`, laid out so that no step needs a reduction across a
// whole warp per position: positions are taken P = blockDim / 4 at a time (a pass).
// - Scores: four threads per position, each holding every 4th 16-byte chunk of the key row
//   and dotting it with the queries (in shared memory, scaled) of all g heads; two shuffles
//   sum the four. The pass's scores go to shared memory.
// - Softmax: one warp per head takes the pass's maximum, rescales the running sum and turns
//   the scores into weights (online softmax across passes).
// - Values: thread (group pg, chunk c) holds chunk c of the value rows of positions pg,
//   pg + ng, ... (ng = blockDim / chunks per row) and accumulates every head's weighted sum of
//   that chunk; at the end the groups are summed (shuffles inside a warp, then shared memory).
// Every key and value load of a pass is issued a pass ahead. Needs rows of whole
// 16-byte chunks starting on 16 bytes, 4 <= chunks per row <= 4 * MCH (a power of two), g <= MG
// and g * hd <= 1024 (checked by the launch).
#define APT 4
template <typename K, int MG, int MCH>
__device__ void attend_passes(ATTEND_PARAMS) {
  typedef typename K::T T;
  constexpr int V = 16 / sizeof(T);
  extern __shared__ float sm[];
  const int kvh = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
  const int nwarps = nt >> 5;
  int start, end;
  split_range(pos_ptr, len_host, span, window, split, nsplit, start, end);
  const int ch = hd / V;              // chunks per row
  const int P = nt / APT;             // positions per pass
  const int ng = nt / ch;             // value groups
  const int npv = P / ng;             // positions per value group and pass (<= MCH)
  const int wide = ch > 32 ? ch : 32; // threads behind one partial sum set
  const int sets = nt / wide;
  // Shared: queries [g * hd], scores [MG * P], running max, sum, correction [MG] each, then
  // the partial sums [sets * g * hd] (bacc: the first set, once summed).
  float* qs = sm;
  float* ps = qs + g * hd;
  float* hm = ps + MG * P;
  float* hl = hm + MG;
  float* hc = hl + MG;
  float* red = hc + MG;
  const T* kb = k + kvh * ks_h;
  const T* vb = v + kvh * vs_h;
  const int sp = tid / APT, sr = tid % APT;  // score pass: position, quarter
  const int pg = tid / ch, pc = tid % ch;    // value pass: group, chunk
  float acc[MG][V];
#pragma unroll
  for (int h = 0; h < MG; ++h)
#pragma unroll
    for (int e = 0; e < V; ++e) acc[h][e] = 0.f;
  // The next pass's key and value chunks, loaded a pass ahead (the first before the queries
  // are staged).
  uint4 kr[MCH], vr[MCH];
  auto load = [&](int p0) {
    const int j = p0 + sp;
#pragma unroll
    for (int c = 0; c < MCH; ++c) {
      const int cc = sr + c * APT;
      kr[c] = (j < end && cc < ch) ? __ldg(reinterpret_cast<const uint4*>(kb + j * ks_p + cc * V))
                                   : make_uint4(0, 0, 0, 0);
      const int jv = p0 + pg + c * ng;
      vr[c] = (c < npv && jv < end)
                  ? __ldg(reinterpret_cast<const uint4*>(vb + jv * vs_p + pc * V))
                  : make_uint4(0, 0, 0, 0);
    }
  };
  if (start < end) load(start);
  for (int i = tid; i < g * hd; i += nt) qs[i] = K::ld(q[(long long)kvh * g * hd + i]) * scale;
  for (int h = tid; h < MG; h += nt) { hm[h] = -INFINITY; hl[h] = 0.f; }
  __syncthreads();
  for (int p0 = start; p0 < end; p0 += P) {
    const int j = p0 + sp;
    float s[MG];
#pragma unroll
    for (int h = 0; h < MG; ++h) s[h] = 0.f;
#pragma unroll
    for (int c = 0; c < MCH; ++c) {
      const int cc = sr + c * APT;
      if (cc < ch) {
        float kf[V];
        unpack16<K>(kr[c], kf);
#pragma unroll
        for (int h = 0; h < MG; ++h) {
          if (h < g) {
            const float* qh = qs + h * hd + cc * V;
#pragma unroll
            for (int e = 0; e < V; ++e) s[h] += qh[e] * kf[e];
          }
        }
      }
    }
#pragma unroll
    for (int h = 0; h < MG; ++h) {
      s[h] += __shfl_xor_sync(0xffffffffu, s[h], 1);
      s[h] += __shfl_xor_sync(0xffffffffu, s[h], 2);
    }
    if (sr == 0) {
#pragma unroll
      for (int h = 0; h < MG; ++h) if (h < g) ps[h * P + sp] = j < end ? s[h] : -INFINITY;
    }
    __syncthreads();
    for (int h = warp; h < g; h += nwarps) {
      float mx = -INFINITY;
      for (int i = lane; i < P; i += 32) mx = fmaxf(mx, ps[h * P + i]);
      mx = warp_max(mx);
      const float mo = hm[h], mn = fmaxf(mo, mx);
      float sum = 0.f;
      for (int i = lane; i < P; i += 32) {
        const float x = ps[h * P + i];
        const float p = x == -INFINITY ? 0.f : __expf(x - mn);
        ps[h * P + i] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float c = mo == -INFINITY ? 0.f : __expf(mo - mn);
        hc[h] = c;
        hl[h] = hl[h] * c + sum;
        hm[h] = mn;
      }
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < MG; ++h) {
      if (h < g) {
        const float c = hc[h];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[h][e] *= c;
      }
    }
#pragma unroll
    for (int c = 0; c < MCH; ++c) {
      if (c < npv) {
        float vf[V];
        unpack16<K>(vr[c], vf);
        const int jl = pg + c * ng;
#pragma unroll
        for (int h = 0; h < MG; ++h) {
          if (h < g) {
            const float p = ps[h * P + jl];
#pragma unroll
            for (int e = 0; e < V; ++e) acc[h][e] += p * vf[e];
          }
        }
      }
    }
    if (p0 + P < end) load(p0 + P);
    __syncthreads();
  }
  // Sum the value groups: inside a warp by shuffles, then each warp's (or, for rows wider
  // than a warp, each group's) set through shared memory.
  for (int o = ch; o < 32; o <<= 1) {
#pragma unroll
    for (int h = 0; h < MG; ++h)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[h][e] += __shfl_xor_sync(0xffffffffu, acc[h][e], o);
  }
  if (tid % wide < ch) {
    float* mine = red + (tid / wide) * g * hd;
#pragma unroll
    for (int h = 0; h < MG; ++h)
      if (h < g) {
#pragma unroll
        for (int e = 0; e < V; ++e) mine[h * hd + pc * V + e] = acc[h][e];
      }
  }
  __syncthreads();
  for (int i = tid; i < g * hd; i += nt) {
    float t = 0.f;
    for (int st = 0; st < sets; ++st) t += red[st * g * hd + i];
    qs[i] = t;
  }
  __syncthreads();
  finish_splits<K>(qs, hm, hl, red, out, scratch, counters, kvh, split, nsplit, g, hd);
}

// Decode attention on tensor cores (bf16 and f16, head width HD of 64 or 128, at most 16
// query heads per KV head; HI: more than 8). Block (kv head, split, sequence) as
// `attend_passes`; each warp takes 16 positions at a time (warp w: positions start + 16w,
// then every 16 * warps) with its own running maxima and sums, so warps never wait on each
// other inside the loop. Per 16 positions a warp issues HD / 4 mma.m16n8k16 (half each):
// - Scores S[head][position] = Q K^T: A is the queries (16 rows of heads, g used), B two
//   tiles of 8 positions. The order of k (the width) is one permutation for A and B, chosen
//   so that thread (r = lane / 4, t = lane % 4) holds elements t * HD / 4 .. + HD / 4 of a
//   row, step s taking its elements 4s .. 4s + 3 as the fragment's k = 2t, 2t + 1, 2t + 8,
//   2t + 9: each thread reads HD / 2 contiguous bytes of the key rows of positions r and
//   r + 8, and no element is moved between registers.
// - Values O[head][d] += P V: the score tiles' accumulators are, as they stand, operand A
//   (rounded to T), and B is V with output column n of tile u standing for width element
//   n * HD / 8 + u, so thread (r, t) reads elements r * HD / 8 .. + HD / 8 of the value rows
//   of positions 2t, 2t + 1, 2t + 8, 2t + 9 and pairs their halves with one byte permute per
//   operand word. Its accumulators then hold elements t * HD / 4 .. + HD / 4 of head r (and
//   r + 8).
// At the end the warps' partials meet in shared memory (each thread's accumulators as one
// padded row, conflict-free), and `finish_splits` merges the splits. Launched with three
// blocks per multiprocessor as a bound (168 registers; the widest variant spills a few
// bytes), so that a batch's blocks fit one wave more often.
// Mma<K>::run: c += a b (mma.m16n8k16, f32 accumulators); Mma<K>::pack: two floats as one
// operand word, lo in the low half (the lower k).
template <typename K> struct Mma;
#define MMA_TYPE(K, ty) \
template <> struct Mma<K> { \
  static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) { \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." #ty "." #ty ".f32 {%0,%1,%2,%3}, " \
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};" \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1])); } \
  static __device__ __forceinline__ unsigned pack(float lo, float hi) { \
    unsigned r; asm("cvt.rn." #ty "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r; } };
MMA_TYPE(BF16, bf16)
MMA_TYPE(F16, f16)
// `n` 32-bit words of a row from `p` (2-byte elements, any even offset), zeros without `p`.
template <int N>
__device__ __forceinline__ void row_words(unsigned* w, const u16* p) {
#pragma unroll
  for (int i = 0; i < N; ++i)
    w[i] = p ? (unsigned)p[2 * i] | ((unsigned)p[2 * i + 1] << 16) : 0u;
}
template <typename K, int HD, bool HI>
__device__ void attend_mma(ATTEND_PARAMS) {
  typedef typename K::T T;
  constexpr int QW = HD / 8;   // words of a quarter row (a thread's share of a key row)
  constexpr int KC = QW / 4;   // its 16-byte chunks
  constexpr int NT = HD / 8;   // value tiles; elements of a thread's share of a value row
  constexpr int VC = NT / 8;   // its 16-byte chunks
  constexpr int ST = 4 * NT + 4;  // floats of a thread's row in shared memory
  extern __shared__ float sm[];
  const int kvh = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int r = lane >> 2, t = lane & 3;
  int start, end;
  split_range(pos_ptr, len_host, span, window, split, nsplit, start, end);
  const T* kb = k + kvh * ks_h;
  const T* vb = v + kvh * vs_h;
  const T* qh = q + (long long)kvh * g * hd;
  unsigned qa[QW], qb[HI ? QW : 1];
  row_words<QW>(qa, r < g ? qh + r * HD + t * (HD / 4) : nullptr);
  if (HI) row_words<QW>(qb, r + 8 < g ? qh + (r + 8) * HD + t * (HD / 4) : nullptr);
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  float acc[NT][4];
#pragma unroll
  for (int u = 0; u < NT; ++u)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[u][e] = 0.f;
  for (int p0 = start + 16 * warp; p0 < end; p0 += 16 * nw) {
    uint4 kr[2][KC], vr[4][VC];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int p = p0 + 8 * j + r;
#pragma unroll
      for (int c = 0; c < KC; ++c)
        kr[j][c] = p < end ? ld16(kb + p * ks_p + t * (HD / 4) + c * 8) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int p = p0 + 2 * t + (i & 1) + 8 * (i >> 1);
#pragma unroll
      for (int c = 0; c < VC; ++c)
        vr[i][c] = p < end ? ld16(vb + p * vs_p + r * NT + c * 8) : make_uint4(0, 0, 0, 0);
    }
    float s[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
      const unsigned* kw = reinterpret_cast<const unsigned*>(kr[j]);
#pragma unroll
      for (int st = 0; st < HD / 16; ++st) {
        const unsigned a[4] = {qa[2 * st], HI ? qb[2 * st] : 0u, qa[2 * st + 1],
                               HI ? qb[2 * st + 1] : 0u};
        const unsigned b[2] = {kw[2 * st], kw[2 * st + 1]};
        Mma<K>::run(s[j], a, b);
      }
    }
    // Scale, mask the positions past the end, and the online softmax of heads r and r + 8
    // over the 16 positions (the four threads of a row hold 4 each).
    float x0 = -INFINITY, x1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool in = p0 + 8 * j + 2 * t + (e & 1) < end;
        s[j][e] = in ? s[j][e] * scale : -INFINITY;
        if (e < 2) x0 = fmaxf(x0, s[j][e]); else x1 = fmaxf(x1, s[j][e]);
      }
    x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 1));
    x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 2));
    if (HI) {
      x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 1));
      x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 2));
    }
    // Position p0 is inside, so the new maxima are finite.
    const float n0 = fmaxf(m0, x0), n1 = HI ? fmaxf(m1, x1) : 0.f;
    const float c0 = __expf(m0 - n0), c1 = HI ? __expf(m1 - n1) : 0.f;
    m0 = n0;
    m1 = n1;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = (e < 2 || HI) ? __expf(s[j][e] - (e < 2 ? n0 : n1)) : 0.f;
    l0 = l0 * c0 + s[0][0] + s[0][1] + s[1][0] + s[1][1];
    if (HI) l1 = l1 * c1 + s[0][2] + s[0][3] + s[1][2] + s[1][3];
    const unsigned pa[4] = {Mma<K>::pack(s[0][0], s[0][1]), Mma<K>::pack(s[0][2], s[0][3]),
                            Mma<K>::pack(s[1][0], s[1][1]), Mma<K>::pack(s[1][2], s[1][3])};
    const unsigned* v0 = reinterpret_cast<const unsigned*>(vr[0]);
    const unsigned* v1 = reinterpret_cast<const unsigned*>(vr[1]);
    const unsigned* v2 = reinterpret_cast<const unsigned*>(vr[2]);
    const unsigned* v3 = reinterpret_cast<const unsigned*>(vr[3]);
#pragma unroll
    for (int u = 0; u < NT; ++u) {
      const unsigned sel = (u & 1) ? 0x7632u : 0x5410u;
      const unsigned b[2] = {__byte_perm(v0[u >> 1], v1[u >> 1], sel),
                             __byte_perm(v2[u >> 1], v3[u >> 1], sel)};
      acc[u][0] *= c0;
      acc[u][1] *= c0;
      acc[u][2] *= c1;
      acc[u][3] *= c1;
      Mma<K>::run(acc[u], pa, b);
    }
  }
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  if (HI) {
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  }
  // Shared: each thread's accumulators [nw * 32][ST], then the block's sums [g * hd], the
  // warps' maxima and sums [nw][16] each, the block's [16] each.
  float* wacc = sm;
  float* bacc = wacc + nw * 32 * ST;
  float* wm = bacc + g * hd;
  float* wl = wm + nw * 16;
  float* bm = wl + nw * 16;
  float* bl = bm + 16;
  float4* mine = reinterpret_cast<float4*>(wacc + threadIdx.x * ST);
#pragma unroll
  for (int u = 0; u < NT; ++u) mine[u] = make_float4(acc[u][0], acc[u][1], acc[u][2], acc[u][3]);
  if (t == 0) {
    wm[warp * 16 + r] = m0;
    wl[warp * 16 + r] = l0;
    wm[warp * 16 + r + 8] = HI ? m1 : -INFINITY;
    wl[warp * 16 + r + 8] = HI ? l1 : 0.f;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < g * HD; i += blockDim.x) {
    const int h = i / HD, d = i - h * HD;
    const int tt = d / (2 * NT), rr = d - tt * 2 * NT;
    const int off = ((h & 7) * 4 + tt) * ST + (rr % NT) * 4 + (h >> 3) * 2 + rr / NT;
    float mx = -INFINITY;
    for (int w = 0; w < nw; ++w) mx = fmaxf(mx, wm[w * 16 + h]);
    float a = 0.f, l = 0.f;
    for (int w = 0; w < nw; ++w) {
      const float mw = wm[w * 16 + h];
      if (mw != -INFINITY) {
        const float c = __expf(mw - mx);
        a += c * wacc[w * 32 * ST + off];
        l += c * wl[w * 16 + h];
      }
    }
    bacc[i] = a;
    if (d == 0) { bm[h] = mx; bl[h] = l; }
  }
  __syncthreads();
  finish_splits<K>(bacc, bm, bl, wacc, out, scratch, counters, kvh, split, nsplit, g, hd);
}

// Products of a few rows of x ([rows, kd], rows <= MR) with a weight of output rows
// [n, kd] (with SILU [2n, kd]: gate rows, then up rows), each block taking R weight rows (R
// output columns, or R/2 gate/up pairs with SILU) so that the work on x is shared by R rows,
// the weight streamed once in 16-byte loads. The block's threads split the width (every
// thread keeps U loads of each row in flight), and the warps' sums meet in shared memory:
// many short blocks keep every SM's loads in flight whatever n is, where one warp per R rows
// left the SMs unevenly loaded (o_proj: 1024 warps for 132 SMs). MODE 1 takes RMSNorm(x)
// with weight nw as the input, MODE 2 RMSNorm(x + a) (the sum, rounded to T, also written to
// xo by the first block): the norm's scale is applied to the finished dot product, each
// thread summing the squares of the input it reads anyway. SILU writes silu(gate) * up,
// rounded as silu_mul. At most 8 warps per block.
// With ROPE (a q/k/v product of one token, R = 4, no SILU): rotary embedding and the KV
// cache write in the same kernel (what `rope_store` does). A group then holds two rotary
// pairs, columns i, i + 1, i + hd/2, i + hd/2 + 1 of a head (or 4 adjacent columns when the
// pairs are interleaved); the rotated q heads go to y ([nq * hd]), the rotated k heads and
// the v heads into the caches at the position (from the device when pos_ptr is set).
template <typename K>
struct RopeArgs {
  const typename K::T* cosr;
  const typename K::T* sinr;
  typename K::T* kc;
  typename K::T* vc;
  const unsigned* pos_ptr;
  int pos_host, nq, hd;
  long long kc_h, kc_p, vc_h, vc_p;
  int interleaved;
};
// With REDUCE (a row-parallel product, see comm::PeerReduce): the product finishes its
// all-reduce over peer memory. Each block takes a ticket as it starts; at the end, the
// thread of an output word's first element stores the word (4 bytes of outputs, tagged with
// the call's number) in this rank's slot of every peer's buffer, waits for the peers' words
// at the same index of its own, and writes the sums in rank order (as the all-reduce kernel
// does, so every rank gets the same bits). A block waits only for its peers' blocks of the
// same index, which push before they wait and dispatch in the same order (at the decode
// shapes all of them are resident at once); the deadline bounds the wait whatever happens.
// Needs n * sizeof(T) a multiple of 4.
struct ReduceArgs {
  const u64* peers;
  u64* ticket;
  unsigned* err;
  int rank, world;
  u64 cap, half, base, timeout;
};
// Word i of this rank's payload (v: tagged with the call's number) into this rank's slot of
// every peer's buffer, `at` words into the buffer (the call's half).
__device__ __forceinline__ void ll_push(const ReduceArgs& ra, u64 at, u64 i, u64 v) {
  for (int p = 0; p < ra.world; ++p)
    if (p != ra.rank) st_ll((u64*)ra.peers[p] + at + (u64)ra.rank * ra.cap + i, v);
}
// The ranks' elements of payload word i summed in rank order into acc (own: this rank's word),
// waiting for the peers' words of call e in this rank's buffer (see ll_wait).
template <typename K>
__device__ __forceinline__ void ll_sum(const ReduceArgs& ra, u64 at, u64 i, unsigned own,
                                       unsigned e, u64 t0, bool& gone, float* acc) {
  constexpr int E = 4 / sizeof(typename K::T);
  const u64* mine = (const u64*)ra.peers[ra.rank] + at + i;
#pragma unroll
  for (int j = 0; j < E; ++j) acc[j] = 0.f;
  for (int p = 0; p < ra.world; ++p) {
    const unsigned got =
        p == ra.rank ? own : ll_wait(mine + (u64)p * ra.cap, e, t0, ra.timeout, ra.err, p, gone);
#pragma unroll
    for (int j = 0; j < E; ++j) acc[j] += K::ld(elem_of<typename K::T>(got, j));
  }
}
__device__ __forceinline__ unsigned tbits(float x) { return __float_as_uint(x); }
__device__ __forceinline__ unsigned tbits(u16 x) { return x; }
// Column j of group cg under rotary pairing (hd a multiple of 4).
__device__ __forceinline__ int rope_col(int cg, int j, int hd, int interleaved) {
  if (interleaved) return cg * 4 + j;
  const int q4 = hd / 4, h = cg / q4, i = (cg - h * q4) * 2;
  return h * hd + i + (j & 1) + (j >> 1) * (hd / 2);
}
template <typename K, int MR, int MODE, bool SILU, int R, bool ROPE, bool REDUCE = false>
__device__ void gemv(const typename K::T* x, const typename K::T* a, const typename K::T* nw,
                     const typename K::T* w, typename K::T* y, typename K::T* xo, int rows,
                     int n, int kd, float eps, RopeArgs<K> ro, ReduceArgs ra = ReduceArgs{}) {
  typedef typename K::T T;
  constexpr int V = 16 / sizeof(T);
  constexpr int C = SILU ? R / 2 : R;
  constexpr int U = R >= 4 ? 2 : 4;
  constexpr int S = R * MR + MR;  // a warp's sums: dot products, then squares
  static_assert(!ROPE || (R == 4 && MR == 1 && !SILU), "rotary groups are 4 columns of one row");
  __shared__ float red[8 * S];
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
  const int nwarps = (nt + 31) >> 5;
  const int c0 = blockIdx.x * C;
  // Every block takes its ticket (the reply is needed only at the end).
  const u64 taken = REDUCE && tid == 0 ? ticket_take(ra.ticket) : 0ull;
  __shared__ unsigned epoch;
  if (c0 >= n) {
    if (REDUCE && tid == 0) ticket_close(ra.ticket, taken);
    return;
  }
  const T* wr[R];
  bool ok[R];
#pragma unroll
  for (int j = 0; j < R; ++j) {
    const int col = ROPE ? rope_col(blockIdx.x, j, ro.hd, ro.interleaved) : c0 + j % C;
    ok[j] = col < n;
    wr[j] = w + (long long)(ok[j] ? (j >= C ? col + n : col) : 0) * kd;
  }
  float dot[R][MR], ss[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    ss[m] = 0.f;
#pragma unroll
    for (int j = 0; j < R; ++j) dot[j][m] = 0.f;
  }
  const bool sum_out = MODE == 2 && blockIdx.x == 0;
  for (int k0 = tid * V; k0 < kd; k0 += nt * V * U) {
    // The input's chunks first (cache hits, shared by every block), then the weight's, all in
    // flight together.
    uint4 xv[U][MR], av[U][MR], nv[U], wv[R][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * nt * V;
      const bool in = k < kd;
      nv[u] = (MODE > 0 && in) ? ld16(nw + k) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        const bool row = in && m < rows;
        xv[u][m] = row ? ld16(x + (long long)m * kd + k) : make_uint4(0, 0, 0, 0);
        av[u][m] = (MODE == 2 && row) ? ld16(a + (long long)m * kd + k) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * nt * V;
#pragma unroll
      for (int j = 0; j < R; ++j)
        wv[j][u] = (ok[j] && k < kd) ? __ldcs(reinterpret_cast<const uint4*>(wr[j] + k))
                                     : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * nt * V;
      if (k >= kd) break;
      float nf[V];
      if (MODE > 0) unpack16<K>(nv[u], nf);
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        if (m >= rows) break;
        float xf[V];
        unpack16<K>(xv[u][m], xf);
        if (MODE == 2) {
          float af[V];
          unpack16<K>(av[u][m], af);
          uint4 packed;
          T* s = reinterpret_cast<T*>(&packed);
#pragma unroll
          for (int v = 0; v < V; ++v) { s[v] = K::st(xf[v] + af[v]); xf[v] = K::ld(s[v]); }
          if (sum_out) *reinterpret_cast<uint4*>(xo + (long long)m * kd + k) = packed;
        }
        if (MODE > 0) {
#pragma unroll
          for (int v = 0; v < V; ++v) { ss[m] += xf[v] * xf[v]; xf[v] *= nf[v]; }
        }
#pragma unroll
        for (int j = 0; j < R; ++j) {
          float wf[V];
          unpack16<K>(wv[j][u], wf);
#pragma unroll
          for (int v = 0; v < V; ++v) dot[j][m] += wf[v] * xf[v];
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m) {
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const float d = warp_sum(dot[j][m]);
      if (lane == 0) red[warp * S + j * MR + m] = d;
    }
    if (MODE > 0) {
      const float q = warp_sum(ss[m]);
      if (lane == 0) red[warp * S + R * MR + m] = q;
    }
  }
  if (REDUCE && tid == 0) epoch = ticket_close(ra.ticket, taken);
  __syncthreads();
  if (ROPE) {
    // Lanes 0-3 of the first warp hold the group's two pairs.
    if (tid < 4) {
      const int j = tid, col = rope_col(blockIdx.x, j, ro.hd, ro.interleaved);
      float d0 = 0.f, q = 0.f;
      for (int w2 = 0; w2 < nwarps; ++w2) {
        d0 += red[w2 * S + j];
        if (MODE > 0) q += red[w2 * S + R];
      }
      const float inv = MODE > 0 ? rsqrtf(q / (float)kd + eps) : 1.f;
      const float o = K::ld(K::st(d0 * inv));
      const float other = __shfl_xor_sync(0xfu, o, ro.interleaved ? 1 : 2);
      const int hd = ro.hd, nkv = (n / hd - ro.nq) / 2;
      const int h = col / hd, d = col - h * hd;
      const long long pos = ro.pos_ptr ? (long long)ro.pos_ptr[0] : (long long)ro.pos_host;
      if (h < ro.nq + nkv) {
        const bool first = ro.interleaved ? (j & 1) == 0 : j < 2;
        const int p = ro.interleaved ? d / 2 : (first ? d : d - hd / 2);
        const float c = K::ld(ro.cosr[p]), sn = K::ld(ro.sinr[p]);
        const float x1 = first ? o : other, x2 = first ? other : o;
        const T r = K::st(first ? x1 * c - x2 * sn : x1 * sn + x2 * c);
        if (h < ro.nq) y[(long long)h * hd + d] = r;
        else ro.kc[(h - ro.nq) * ro.kc_h + pos * ro.kc_p + d] = r;
      } else {
        ro.vc[(h - ro.nq - nkv) * ro.vc_h + pos * ro.vc_p + d] = K::st(o);
      }
    }
    return;
  }
  // Thread (m, c) finishes output column c0 + c of row m.
  unsigned bits = 0u;
  if (tid < MR * C) {
    const int m = tid / C, c = tid - m * C;
    if (m < rows && c0 + c < n) {
      float d0 = 0.f, d1 = 0.f, q = 0.f;
      for (int w2 = 0; w2 < nwarps; ++w2) {
        d0 += red[w2 * S + c * MR + m];
        if (SILU) d1 += red[w2 * S + (C + c) * MR + m];
        if (MODE > 0) q += red[w2 * S + R * MR + m];
      }
      const float inv = MODE > 0 ? rsqrtf(q / (float)kd + eps) : 1.f;
      float out = d0 * inv;
      if (SILU) {
        const float g = K::ld(K::st(out)), u = K::ld(K::st(d1 * inv));
        out = K::ld(K::st(g / (1.f + __expf(-g)))) * u;
      }
      const T o = K::st(out);
      if (!REDUCE) y[(long long)m * n + c0 + c] = o;
      bits = tbits(o);
    }
  }
  if (REDUCE && warp == 0) {
    // Words of E outputs, led by the thread of the first (C is even, so a word never spans
    // two rows' threads, and n * E is whole words).
    constexpr int E = 4 / sizeof(T);
    const unsigned hi = __shfl_down_sync(0xffffffffu, bits, 1);
    const unsigned word = E == 2 ? (bits | (hi << 16)) : bits;
    const int m = tid / C, c = tid - m * C;
    if (tid < MR * C && m < rows && c0 + c < n && c % E == 0) {
      const unsigned e = epoch;
      const u64 i = ((u64)m * n + c0 + c) / E;
      const u64 at = ra.base + (u64)(e & 1u) * ra.half;
      ll_push(ra, at, i, ((u64)e << 32) | word);
      bool gone = false;
      float acc[E];
      ll_sum<K>(ra, at, i, word, e, now_ns(), gone, acc);
#pragma unroll
      for (int j = 0; j < E; ++j) y[(long long)m * n + c0 + c + j] = K::st(acc[j]);
    }
  }
}

// add_rms with a's rows all-reduced first over peer memory (see ReduceArgs): one call of the
// products' region whose payload words are a's, numbered as the all-reduce kernel numbers
// them (word i holds elements i * E ..), so a peer may take part with that kernel instead.
// Each block (a row) takes a ticket, pushes its words of a to every peer, loads its x and w
// while the peers' words travel, then sums the ranks' words in rank order and rounds to T
// (as the all-reduce writes its output) before the residual add: the bits of the all-reduce
// kernel followed by add_rms. Needs n * sizeof(T) a multiple of 4.
template <typename K>
__device__ void add_rms_reduced(const typename K::T* x, const typename K::T* a,
                                const typename K::T* w, typename K::T* xo, typename K::T* y,
                                int n, float eps, ReduceArgs ra) {
  typedef typename K::T T;
  constexpr int E = 4 / sizeof(T);  // elements per payload word
  constexpr int PW = PER / E;       // words per thread
  __shared__ float red[32];
  __shared__ unsigned epoch;
  const u64 taken = threadIdx.x == 0 ? ticket_take(ra.ticket) : 0ull;
  const long long off = (long long)blockIdx.x * n;
  x += off; a += off; xo += off; y += off;
  const int nw = n / E;
  unsigned d[PW];
#pragma unroll
  for (int r = 0; r < PW; ++r) {
    const int i = threadIdx.x + r * blockDim.x;
    d[r] = 0u;
    if (i < nw) {
#pragma unroll
      for (int j = 0; j < E; ++j) d[r] |= word_of(a[i * E + j], j);
    }
  }
  if (threadIdx.x == 0) epoch = ticket_close(ra.ticket, taken);
  __syncthreads();
  const unsigned e = epoch;
  const u64 at = ra.base + (u64)(e & 1u) * ra.half + (u64)off / E;
  const u64 tag = (u64)e << 32;
#pragma unroll
  for (int r = 0; r < PW; ++r) {
    const int i = threadIdx.x + r * blockDim.x;
    if (i < nw) ll_push(ra, at, i, tag | d[r]);
  }
  float vals[PER];
#pragma unroll
  for (int r = 0; r < PW; ++r) {
    const int i = threadIdx.x + r * blockDim.x;
#pragma unroll
    for (int j = 0; j < E; ++j) vals[r * E + j] = i < nw ? K::ld(x[i * E + j]) : 0.f;
  }
  const u64 t0 = now_ns();
  bool gone = false;
  float ss = 0.f;
#pragma unroll
  for (int r = 0; r < PW; ++r) {
    const int i = threadIdx.x + r * blockDim.x;
    if (i >= nw) break;
    float acc[E];
    ll_sum<K>(ra, at, i, d[r], e, t0, gone, acc);
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const T s = K::st(vals[r * E + j] + K::ld(K::st(acc[j])));
      xo[i * E + j] = s;
      const float v = K::ld(s);
      vals[r * E + j] = v;
      ss += v * v;
    }
  }
  float ws[PER];
  load_norm_weights<K>(w, n, ws);
  const float inv = rsqrtf(block_sum(ss, red) / (float)n + eps);
  store_normed<K>(y, n, vals, ws, inv);
}

// Rotary embedding of one token's q and k heads (pairs (p, p + hd/2), or (2p, 2p + 1) when
// interleaved) with the position's cos/sin row; q goes to qo, k and v into the caches at the
// position (from the device when pos_ptr is set).
template <typename K>
__device__ void rope_store(const typename K::T* q, const typename K::T* k,
                           const typename K::T* v, const typename K::T* cosr,
                           const typename K::T* sinr, typename K::T* qo, typename K::T* kc,
                           typename K::T* vc, const unsigned* pos_ptr, int pos_host, int nq,
                           int nkv, int hd, long long kc_h, long long kc_p, long long vc_h,
                           long long vc_p, int interleaved) {
  typedef typename K::T T;
  const int half = hd / 2;
  const long long pos = pos_ptr ? (long long)pos_ptr[0] : (long long)pos_host;
  const int rot = (nq + nkv) * half;
  const int total = rot + nkv * hd;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    if (i < rot) {
      const int h = i / half, p = i - h * half;
      const int i1 = interleaved ? 2 * p : p, i2 = interleaved ? 2 * p + 1 : p + half;
      const T* x = h < nq ? q + (long long)h * hd : k + (long long)(h - nq) * hd;
      const float x1 = K::ld(x[i1]), x2 = K::ld(x[i2]);
      const float c = K::ld(cosr[p]), s = K::ld(sinr[p]);
      T* dst = h < nq ? qo + (long long)h * hd : kc + (h - nq) * kc_h + pos * kc_p;
      dst[i1] = K::st(x1 * c - x2 * s);
      dst[i2] = K::st(x1 * s + x2 * c);
    } else {
      const int j = i - rot, h = j / hd, d = j - h * hd;
      vc[h * vc_h + pos * vc_p + d] = v[(long long)h * hd + d];
    }
  }
}

// Several sequences' tokens in one launch: with `seqs`, blocks y take sequence y, whose
// descriptor (ROPE_SEQ_WORDS words) gives its cos/sin rows, caches, position and cache
// strides; its rows of q, k, v and qo follow the previous sequence's.
#define ROPE_SEQ_WORDS 9
#define ROPE_SEQ_SELECT(K) \
  if (seqs) { \
    const long long* s = seqs + ROPE_SEQ_WORDS * blockIdx.y; \
    cosr = (const K::T*)s[0]; sinr = (const K::T*)s[1]; kc = (K::T*)s[2]; vc = (K::T*)s[3]; \
    pos_ptr = nullptr; pos_host = (int)s[4]; \
    kc_h = s[5]; kc_p = s[6]; vc_h = s[7]; vc_p = s[8]; \
    q += (long long)blockIdx.y * nq * hd; qo += (long long)blockIdx.y * nq * hd; \
    k += (long long)blockIdx.y * nkv * hd; v += (long long)blockIdx.y * nkv * hd; \
  }
#define KERNELS(sfx, K) \
extern "C" __global__ void __launch_bounds__(1024, 1) rms_norm_##sfx(const K::T* x, const K::T* w, K::T* y, int n, \
    float eps) { add_rms<K, false>(x, x, w, y, y, n, eps); } \
extern "C" __global__ void __launch_bounds__(1024, 1) add_rms_norm_##sfx(const K::T* x, const K::T* a, const K::T* w, \
    K::T* xo, K::T* y, int n, float eps) { add_rms<K, true>(x, a, w, xo, y, n, eps); } \
extern "C" __global__ void __launch_bounds__(1024, 1) add_rms_norm_reduce_##sfx(const K::T* x, \
    const K::T* a, \
    const K::T* w, K::T* xo, K::T* y, int n, float eps, const u64* peers, u64* ticket, \
    unsigned* err, int rank, int world, u64 cap, u64 half, u64 base, u64 timeout) { \
  add_rms_reduced<K>(x, a, w, xo, y, n, eps, \
      ReduceArgs{peers, ticket, err, rank, world, cap, half, base, timeout}); } \
extern "C" __global__ void rope_store_##sfx(const K::T* q, const K::T* k, const K::T* v, \
    const K::T* cosr, const K::T* sinr, K::T* qo, K::T* kc, K::T* vc, const unsigned* pos_ptr, \
    int pos_host, int nq, int nkv, int hd, long long kc_h, long long kc_p, long long vc_h, \
    long long vc_p, int interleaved, const long long* seqs) { \
  ROPE_SEQ_SELECT(K) \
  rope_store<K>(q, k, v, cosr, sinr, qo, kc, vc, pos_ptr, pos_host, nq, nkv, hd, kc_h, kc_p, \
                vc_h, vc_p, interleaved); } \
extern "C" __global__ void silu_mul_##sfx(const K::T* gu, K::T* y, long long rows, int half) { \
  silu_mul<K>(gu, y, rows, half); } \
ATTEND(sfx, K, 4, 4, 8) ATTEND(sfx, K, 8, 4, 4) ATTEND(sfx, K, 16, 4, 2) \
ATTEND(sfx, K, 4, 8, 4) ATTEND(sfx, K, 8, 8, 4) \
ATTEND_PASSES(sfx, K, 4, 4) ATTEND_PASSES(sfx, K, 8, 4) ATTEND_PASSES(sfx, K, 4, 8) \
ATTEND_PASSES(sfx, K, 8, 8) \
GEMV(sfx, K, 1, 4) GEMV(sfx, K, 2, 4) GEMV_SILU(sfx, K, 1, 4) GEMV_SILU(sfx, K, 2, 4) \
GEMV_ROPE(sfx, K, 1, norm) GEMV_ROPE(sfx, K, 2, addnorm) GEMV_REDUCE(sfx, K, 1) \
GEMV_REDUCE(sfx, K, 2)
#define GEMV_REDUCE(sfx, K, MR) \
extern "C" __global__ void __launch_bounds__(256) gemv##MR##x4_plain_reduce_##sfx(const K::T* x, \
    const K::T* a, const K::T* nw, const K::T* w, K::T* y, K::T* xo, int rows, int n, int kd, \
    float eps, const u64* peers, u64* ticket, unsigned* err, int rank, int world, u64 cap, \
    u64 half, u64 base, u64 timeout) { \
  gemv<K, MR, 0, false, 4, false, true>(x, a, nw, w, y, xo, rows, n, kd, eps, RopeArgs<K>{}, \
      ReduceArgs{peers, ticket, err, rank, world, cap, half, base, timeout}); }
#define GEMV(sfx, K, MR, R) \
GEMV1(sfx, K, MR, R, 0, false, plain) GEMV1(sfx, K, MR, R, 1, false, norm) \
GEMV1(sfx, K, MR, R, 2, false, addnorm)
#define GEMV_SILU(sfx, K, MR, R) \
GEMV1(sfx, K, MR, R, 1, true, norm_silu) GEMV1(sfx, K, MR, R, 2, true, addnorm_silu)
#define GEMV1(sfx, K, MR, R, MODE, SILU, tag) \
extern "C" __global__ void __launch_bounds__(256) gemv##MR##x##R##_##tag##_##sfx(const K::T* x, \
    const K::T* a, const K::T* nw, const K::T* w, K::T* y, K::T* xo, int rows, int n, int kd, \
    float eps) { \
  gemv<K, MR, MODE, SILU, R, false>(x, a, nw, w, y, xo, rows, n, kd, eps, RopeArgs<K>{}); }
#define GEMV_ROPE(sfx, K, MODE, tag) \
extern "C" __global__ void __launch_bounds__(256) gemv1x4_##tag##_rope_##sfx(const K::T* x, \
    const K::T* a, const K::T* nw, const K::T* w, K::T* y, K::T* xo, int rows, int n, int kd, \
    float eps, const K::T* cosr, const K::T* sinr, K::T* kc, K::T* vc, const unsigned* pos_ptr, \
    int pos_host, int nq, int hd, long long kc_h, long long kc_p, long long vc_h, \
    long long vc_p, int interleaved) { \
  const RopeArgs<K> ro{cosr, sinr, kc, vc, pos_ptr, pos_host, nq, hd, kc_h, kc_p, vc_h, vc_p, \
                       interleaved}; \
  gemv<K, 1, MODE, false, 4, true>(x, a, nw, w, y, xo, rows, n, kd, eps, ro); }
// Several sequences in one launch: with `seqs`, block z takes sequence z, whose descriptor
// (SEQ_WORDS words) gives its key and value caches, length and strides; its queries, output,
// scratch and counters follow the previous sequence's.
#define SEQ_WORDS 7
#define SEQ_SELECT(K) \
  if (seqs) { \
    const long long* s = seqs + SEQ_WORDS * blockIdx.z; \
    k = (const K::T*)s[0]; v = (const K::T*)s[1]; len_host = (int)s[2]; \
    ks_h = s[3]; ks_p = s[4]; vs_h = s[5]; vs_p = s[6]; pos_ptr = nullptr; \
    const long long width = (long long)gridDim.x * g * hd; \
    q += blockIdx.z * width; out += blockIdx.z * width; \
    scratch += (long long)blockIdx.z * gridDim.x * gridDim.y * g * (hd + 2); \
    counters += blockIdx.z * gridDim.x; \
  }
#define ATTEND(sfx, K, MG, ME, U) \
extern "C" __global__ void attend_##MG##x##ME##_##sfx(const K::T* q, const K::T* k, \
    const K::T* v, K::T* out, float* scratch, unsigned* counters, const unsigned* pos_ptr, \
    int len_host, int g, int hd, long long ks_h, long long ks_p, long long vs_h, long long vs_p, \
    int span, int window, float scale, const long long* seqs) { \
  SEQ_SELECT(K) \
  attend<K, MG, ME, U>(q, k, v, out, scratch, counters, pos_ptr, len_host, g, hd, ks_h, ks_p, vs_h, \
                    vs_p, span, window, scale); }
#define ATTEND_PASSES(sfx, K, MG, MCH) \
extern "C" __global__ void __launch_bounds__(256) attend_passes_##MG##x##MCH##_##sfx( \
    const K::T* q, const K::T* k, const K::T* v, K::T* out, float* scratch, unsigned* counters, \
    const unsigned* pos_ptr, int len_host, int g, int hd, long long ks_h, long long ks_p, \
    long long vs_h, long long vs_p, int span, int window, float scale, const long long* seqs) { \
  SEQ_SELECT(K) \
  attend_passes<K, MG, MCH>(q, k, v, out, scratch, counters, pos_ptr, len_host, g, hd, ks_h, \
                            ks_p, vs_h, vs_p, span, window, scale); }
#define ATTEND_MMA(sfx, K, HD, MG) \
extern "C" __global__ void __launch_bounds__(128, 3) attend_mma_##HD##x##MG##_##sfx( \
    const K::T* q, const K::T* k, const K::T* v, K::T* out, float* scratch, unsigned* counters, \
    const unsigned* pos_ptr, int len_host, int g, int hd, long long ks_h, long long ks_p, \
    long long vs_h, long long vs_p, int span, int window, float scale, const long long* seqs) { \
  SEQ_SELECT(K) \
  attend_mma<K, HD, (MG > 8)>(q, k, v, out, scratch, counters, pos_ptr, len_host, g, hd, ks_h, \
                              ks_p, vs_h, vs_p, span, window, scale); }
#define MMA_KERNELS(sfx, K) \
ATTEND_MMA(sfx, K, 64, 8) ATTEND_MMA(sfx, K, 128, 8) ATTEND_MMA(sfx, K, 64, 16) \
ATTEND_MMA(sfx, K, 128, 16)
KERNELS(f32, F32)
KERNELS(bf16, BF16)
KERNELS(f16, F16)
MMA_KERNELS(bf16, BF16)
MMA_KERNELS(f16, F16)
"#;

    /// The CPU half of a custom op (one `storage: layout` pair of names per input), which
    /// only CUDA tensors reach (the callers dispatch on the device first).
    macro_rules! cpu_refused {
        ($what:literal, $($s:ident: $l:ident),+) => {
            fn cpu_fwd(
                &self,
                $($s: &CpuStorage, $l: &Layout),+
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                candle_core::bail!(concat!("fused ", $what, " needs CUDA tensors"))
            }
        };
    }

    /// Runs the local macro `$run` for the element type of `$dtype` (the kernels' three).
    macro_rules! by_dtype {
        ($dtype:expr, $what:literal, $run:ident) => {
            match $dtype {
                DType::F32 => $run!(f32),
                DType::BF16 => $run!(half::bf16),
                DType::F16 => $run!(half::f16),
                d => candle_core::bail!("fused {}: dtype {d:?}", $what),
            }
        };
    }

    /// Variants of the warp-per-positions attention kernel `attend` (most query heads per KV
    /// head, head_dim / 32 rounded up): it serves every shape the launch takes.
    const ATTEND_VARIANTS: [(usize, usize); 5] = [(4, 4), (8, 4), (16, 4), (4, 8), (8, 8)];

    /// The smallest `attend` variant serving `g` heads per KV head of width `hd`.
    fn attend_variant(g: usize, hd: usize) -> Option<(usize, usize)> {
        let e = hd.div_ceil(32);
        ATTEND_VARIANTS
            .iter()
            .copied()
            .filter(|&(mg, me)| g <= mg && e <= me)
            .min_by_key(|&(mg, me)| mg * me)
    }

    /// Variants of the pass-wise attention kernel `attend_passes` (most query heads per KV
    /// head, most 16-byte chunks of a row per score thread).
    const PASS_VARIANTS: [(usize, usize); 4] = [(4, 4), (8, 4), (4, 8), (8, 8)];
    /// Score threads per position of `attend_passes` (`APT`), so positions per pass
    /// `ATTN_THREADS / PASS_APT`.
    const PASS_APT: usize = 4;
    /// Most `g * head_dim` of `attend_passes` (its partial sums fit shared memory).
    const PASS_MAX_WIDTH: usize = 1024;

    /// Widths of the tensor-core attention kernel `attend_mma` (bf16 and f16).
    const MMA_WIDTHS: [usize; 2] = [64, 128];
    /// Threads of an `attend_mma` block (four warps of 16 positions each).
    const MMA_THREADS: u32 = 128;
    // The split merge of `attend_mma` (`2 * splits * g + 2 * g` floats) fits the threads'
    // rows it reuses, at the narrowest width (64: rows of 36 floats) and most heads (16).
    const _: () = assert!(2 * MAX_SPLITS * 16 + 2 * 16 <= MMA_THREADS as usize * (64 / 2 + 4));

    /// Which attention kernel `SHARDWISE_ATTN_KERNEL` asks for: `warps` or `passes` (to
    /// measure them), else the fastest that serves.
    fn attend_choice() -> &'static str {
        static CHOICE: OnceLock<String> = OnceLock::new();
        CHOICE.get_or_init(|| std::env::var("SHARDWISE_ATTN_KERNEL").unwrap_or_default())
    }

    /// The attention kernel for `g` heads per KV head of width `hd`, `elem` bytes per element,
    /// `splits` blocks per KV head, with `aligned`: every cache row starts on 16 bytes. In
    /// order, where each serves: the tensor-core kernel (2-byte elements, width 64 or 128, at
    /// most 16 heads per KV head); the pass-wise kernel (rows of 4 to 32 whole 16-byte chunks,
    /// a power of two; at most 8 heads per KV head; `g * hd` at most 1024); the
    /// warp-per-positions one. `SHARDWISE_ATTN_KERNEL=passes` or `warps` starts the list
    /// there (to measure them). Returns the kernel's name, its dynamic shared floats and its
    /// threads per block.
    fn attend_kernel(
        g: usize,
        hd: usize,
        elem: usize,
        aligned: bool,
        splits: usize,
    ) -> Option<(String, usize, u32)> {
        let choice = attend_choice();
        let merge = 2 * splits * g + 2 * g;
        if choice != "warps" && choice != "passes" && elem == 2 && aligned && g <= 16 {
            if let Some(&w) = MMA_WIDTHS.iter().find(|&&w| w == hd) {
                // The threads' rows (which the split merge reuses: never smaller than it
                // needs, asserted below MMA_THREADS), the block's sums, the maxima and sums.
                let warps = (MMA_THREADS / 32) as usize;
                let rows = warps * 32 * (hd / 2 + 4);
                let floats = rows + g * hd + 2 * warps * 16 + 2 * 16;
                let mg = if g > 8 { 16 } else { 8 };
                return Some((format!("attend_mma_{w}x{mg}"), floats, MMA_THREADS));
            }
        }
        let chunks = hd * elem / 16;
        let passes = PASS_VARIANTS
            .iter()
            .copied()
            .filter(|&(mg, mch)| g <= mg && chunks <= PASS_APT * mch)
            .min_by_key(|&(mg, mch)| mg * mch);
        match passes {
            Some((mg, mch))
                if choice != "warps"
                    && aligned
                    && (hd * elem) % 16 == 0
                    && chunks.is_power_of_two()
                    && chunks >= PASS_APT
                    && g * hd <= PASS_MAX_WIDTH =>
            {
                let threads = ATTN_THREADS as usize;
                let sets = threads / chunks.max(32);
                let floats =
                    g * hd + mg * (threads / PASS_APT) + 3 * mg + (sets * g * hd).max(merge);
                Some((format!("attend_passes_{mg}x{mch}"), floats, ATTN_THREADS))
            }
            _ => {
                let (mg, me) = attend_variant(g, hd)?;
                let warps = (ATTN_THREADS / 32) as usize;
                let floats = (g * hd + g + warps * g + g).max(merge);
                Some((format!("attend_{mg}x{me}"), floats, ATTN_THREADS))
            }
        }
    }

    const OPS: [&str; 5] = [
        "rms_norm",
        "add_rms_norm",
        "add_rms_norm_reduce",
        "silu_mul",
        "rope_store",
    ];
    const SUFFIXES: [&str; 3] = ["f32", "bf16", "f16"];

    /// One device's kernels and attention workspace.
    struct Kernels {
        /// By `{op}_{dtype}`.
        funcs: HashMap<String, CudaFunction>,
        /// Per-split partial results of attention; grown, never shrunk. Buffers it outgrew
        /// stay alive, since a captured graph may still point at them.
        scratch: Mutex<Vec<CudaSlice<f32>>>,
        /// Per-KV-head split counters, zero between launches.
        counters: CudaSlice<u32>,
        /// The device's multiprocessors.
        sms: usize,
        /// Resident blocks per multiprocessor, by kernel name: `(dynamic shared bytes,
        /// blocks)` for each size asked about.
        resident: Mutex<HashMap<String, Vec<(usize, usize)>>>,
    }

    impl Kernels {
        fn func(&self, op: &str, dtype: DType) -> candle_core::Result<&CudaFunction> {
            let sfx = match dtype {
                DType::F32 => "f32",
                DType::BF16 => "bf16",
                DType::F16 => "f16",
                d => candle_core::bail!("fused {op}: dtype {d:?}"),
            };
            self.funcs
                .get(&format!("{op}_{sfx}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("fused kernel {op}_{sfx} missing")))
        }

        /// Splits of an attention launch of `groups` (KV heads times sequences) blocks per
        /// split with kernel `name` (`f`): `want`, or fewer so that every block is resident
        /// at once (`SHARDWISE_ATTN_WAVES` waves of them, default 1; 0: no limit). A second
        /// wave of a few blocks costs as much as the first: batch 8 at two ranks took 288
        /// blocks where 264 were resident.
        fn wave_splits(
            &self,
            name: &str,
            f: &CudaFunction,
            threads: u32,
            smem: usize,
            groups: usize,
            want: usize,
        ) -> candle_core::Result<usize> {
            static WAVES: OnceLock<usize> = OnceLock::new();
            let waves = *WAVES.get_or_init(|| {
                std::env::var("SHARDWISE_ATTN_WAVES")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1)
            });
            if waves == 0 {
                return Ok(want);
            }
            let mut resident = self
                .resident
                .lock()
                .map_err(|_| candle_core::Error::Msg("fused occupancy poisoned".into()))?;
            let known = resident
                .get(name)
                .and_then(|sizes| sizes.iter().find(|&&(s, _)| s == smem))
                .map(|&(_, n)| n);
            let per_sm = match known {
                Some(n) => n,
                None => {
                    let n = f
                        .occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
                        .map_err(cerr)? as usize;
                    resident
                        .entry(name.to_string())
                        .or_default()
                        .push((smem, n));
                    n
                }
            };
            let cap = waves * self.sms * per_sm.max(1) / groups.max(1);
            Ok(want.min(cap.max(1)))
        }

        /// A scratch buffer of at least `n` floats (the same one while it is big enough).
        fn scratch(&self, dev: &CudaDevice, n: usize) -> candle_core::Result<u64> {
            let mut s = self
                .scratch
                .lock()
                .map_err(|_| candle_core::Error::Msg("fused attention scratch poisoned".into()))?;
            if s.last().is_none_or(|b| b.len() < n) {
                s.push(dev.cuda_stream().alloc_zeros::<f32>(n).map_err(cerr)?);
            }
            let stream = dev.cuda_stream();
            let b = s
                .last()
                .ok_or_else(|| candle_core::Error::Msg("no scratch".into()))?;
            let ptr = b.device_ptr(&stream).0;
            Ok(ptr)
        }
    }

    fn cerr(e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("fused kernel: {e:?}"))
    }

    fn to_candle(e: Error) -> candle_core::Error {
        candle_core::Error::Msg(e.to_string())
    }

    /// The kernels of `dev` (one set per candle device, so ranks sharing a GPU on separate
    /// streams have separate workspaces).
    fn kernels(dev: &CudaDevice) -> candle_core::Result<Arc<Kernels>> {
        type Map = Mutex<HashMap<candle_core::cuda_backend::DeviceId, Arc<Kernels>>>;
        static ALL: OnceLock<Map> = OnceLock::new();
        let mut all = ALL
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused kernels poisoned".into()))?;
        if let Some(k) = all.get(&dev.id()) {
            return Ok(k.clone());
        }
        let attend = ATTEND_VARIANTS
            .map(|(g, e)| format!("attend_{g}x{e}"))
            .into_iter()
            .chain(PASS_VARIANTS.map(|(g, c)| format!("attend_passes_{g}x{c}")));
        let gemv = (1..=GEMV_MAX_ROWS)
            .flat_map(|mr| {
                ["plain", "norm", "addnorm", "norm_silu", "addnorm_silu"]
                    .map(|tag| format!("gemv{mr}x{GEMV_ROWS_PER_BLOCK}_{tag}"))
            })
            .chain(["norm", "addnorm"].map(|tag| format!("gemv1x{GEMV_ROWS_PER_BLOCK}_{tag}_rope")))
            .chain(
                (1..=GEMV_MAX_ROWS)
                    .map(|mr| format!("gemv{mr}x{GEMV_ROWS_PER_BLOCK}_plain_reduce")),
            );
        let mma = MMA_WIDTHS.into_iter().flat_map(|w| {
            [8, 16]
                .into_iter()
                .flat_map(move |mg| ["bf16", "f16"].map(|s| format!("attend_mma_{w}x{mg}_{s}")))
        });
        let names: Vec<String> = OPS
            .iter()
            .map(|op| op.to_string())
            .chain(attend)
            .chain(gemv)
            .flat_map(|op| SUFFIXES.iter().map(move |s| format!("{op}_{s}")))
            .chain(mma)
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let stream = dev.cuda_stream();
        let funcs = crate::cuda::load_kernels(
            stream.context(),
            "fused",
            &[crate::cuda::DTYPES, crate::comm::peer::LL, SRC],
            &refs,
        )
        .map_err(to_candle)?;
        let counters = stream.alloc_zeros::<u32>(MAX_KV_HEADS).map_err(cerr)?;
        let sms = stream
            .context()
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(cerr)?;
        let k = Arc::new(Kernels {
            funcs: names.into_iter().zip(funcs).collect(),
            scratch: Mutex::new(Vec::new()),
            counters,
            sms: usize::try_from(sms).unwrap_or(1).max(1),
            resident: Mutex::new(HashMap::new()),
        });
        all.insert(dev.id(), k.clone());
        Ok(k)
    }

    fn contiguous_range(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("fused {what}: not contiguous")))
    }

    fn grid(blocks: u32, threads: u32, shared: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: shared,
        }
    }

    /// Elements per thread of a norm block (`PER` in the kernel).
    const NORM_PER_THREAD: usize = 16;
    /// Widest row a norm block takes.
    pub(super) const MAX_NORM_WIDTH: usize = NORM_PER_THREAD * 1024;

    /// Threads of a norm block for rows of `n` (at most [`MAX_NORM_WIDTH`]): four elements
    /// each, or more for rows wider than 4096.
    fn norm_threads(n: usize) -> u32 {
        (n.div_ceil(4).div_ceil(32) * 32).clamp(32, 1024) as u32
    }

    struct Norm {
        eps: f32,
    }

    impl CustomOp2 for Norm {
        fn name(&self) -> &'static str {
            "fused_rms_norm"
        }

        cpu_refused!("rms_norm", _x: _xl, _y: _yl);

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let k = kernels(&dev)?;
            let f = k.func("rms_norm", x.dtype())?;
            let (xs, xe) = contiguous_range(xl, "rms_norm")?;
            let (ws, we) = contiguous_range(wl, "rms_norm")?;
            let n = we - ws;
            let rows = (xe - xs) / n.max(1);
            let stream = dev.cuda_stream();
            let cfg = grid(rows as u32, norm_threads(n), 0);
            let (n32, eps) = (n as i32, self.eps);
            macro_rules! run {
                ($t:ty) => {{
                    let xv = x.as_cuda_slice::<$t>()?.slice(xs..xe);
                    let wv = w.as_cuda_slice::<$t>()?.slice(ws..we);
                    // SAFETY: the kernel writes every element.
                    let mut y = unsafe { dev.alloc::<$t>(xe - xs)? };
                    let mut b = stream.launch_builder(f);
                    b.arg(&xv).arg(&wv).arg(&mut y).arg(&n32).arg(&eps);
                    // SAFETY: arguments match the kernel's signature.
                    unsafe { b.launch(cfg) }.map_err(cerr)?;
                    Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
                }};
            }
            by_dtype!(x.dtype(), "rms_norm", run)
        }
    }

    /// Output `[2, ..x]`: the sum, then the normed sum.
    struct AddNorm {
        eps: f32,
        /// The delta is this rank's part, all-reduced in the kernel first (see
        /// [`super::add_rms_norm_in`]).
        reduce: Option<crate::comm::PeerReduce>,
    }

    impl CustomOp3 for AddNorm {
        fn name(&self) -> &'static str {
            "fused_add_rms_norm"
        }

        cpu_refused!("add_rms_norm", _x: _xl, _y: _yl, _z: _zl);

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            a: &CudaStorage,
            al: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let k = kernels(&dev)?;
            let name = match self.reduce {
                Some(_) => "add_rms_norm_reduce",
                None => "add_rms_norm",
            };
            let f = k.func(name, x.dtype())?;
            let (xs, xe) = contiguous_range(xl, "add_rms_norm")?;
            let (as_, ae) = contiguous_range(al, "add_rms_norm")?;
            let (ws, we) = contiguous_range(wl, "add_rms_norm")?;
            let (len, n) = (xe - xs, we - ws);
            let rows = len / n.max(1);
            let stream = dev.cuda_stream();
            let cfg = grid(rows as u32, norm_threads(n), 0);
            let (n32, eps) = (n as i32, self.eps);
            let mut dims = vec![2];
            dims.extend_from_slice(xl.dims());
            macro_rules! run {
                ($t:ty) => {{
                    let xv = x.as_cuda_slice::<$t>()?.slice(xs..xe);
                    let av = a.as_cuda_slice::<$t>()?.slice(as_..ae);
                    let wv = w.as_cuda_slice::<$t>()?.slice(ws..we);
                    // SAFETY: the kernel writes every element of both halves.
                    let mut out = unsafe { dev.alloc::<$t>(2 * len)? };
                    {
                        let (mut xo, mut y) = out.split_at_mut(len);
                        let mut b = stream.launch_builder(f);
                        b.arg(&xv)
                            .arg(&av)
                            .arg(&wv)
                            .arg(&mut xo)
                            .arg(&mut y)
                            .arg(&n32)
                            .arg(&eps);
                        if let Some(p) = &self.reduce {
                            p.push_args(&mut b);
                        }
                        // SAFETY: arguments match the kernel's signature (with a target,
                        // the caller checked that the rows are whole words within its slot).
                        unsafe { b.launch(cfg) }.map_err(cerr)?;
                    }
                    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
                }};
            }
            by_dtype!(x.dtype(), "add_rms_norm", run)
        }
    }

    pub(super) fn add_rms_norm(
        x: &Tensor,
        delta: Option<&Tensor>,
        w: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let x = x.contiguous()?;
        let w = w.contiguous()?;
        match delta {
            None => {
                let h = x.apply_op2_no_bwd(&w, &Norm { eps })?;
                Ok((x, h))
            }
            Some(d) => {
                if d.shape() != x.shape() {
                    return Err(candle_core::Error::ShapeMismatchBinaryOp {
                        lhs: x.shape().clone(),
                        rhs: d.shape().clone(),
                        op: "add_rms_norm",
                    }
                    .into());
                }
                let d = d.contiguous()?;
                let both = x.apply_op3_no_bwd(&d, &w, &AddNorm { eps, reduce: None })?;
                Ok((both.get(0)?, both.get(1)?))
            }
        }
    }

    /// The kernel behind [`super::add_rms_norm_in`]: `delta` (this rank's part) all-reduced
    /// through `target`, added to `x` and normed. `None` (nothing launched) where it does not
    /// serve: shapes or dtypes that differ, rows that are not whole 4-byte words, or more
    /// words than the target's slot.
    pub(super) fn add_rms_norm_reduced(
        x: &Tensor,
        delta: &Tensor,
        w: &Tensor,
        eps: f32,
        target: crate::comm::PeerReduce,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let n = w.elem_count();
        let bytes = x.elem_count() * x.dtype().size_in_bytes();
        let fits = delta.shape() == x.shape()
            && delta.dtype() == x.dtype()
            && w.dtype() == x.dtype()
            && x.dims().last() == Some(&n)
            && n > 0
            && (n * x.dtype().size_in_bytes()) % 4 == 0
            && (bytes / 4) as u64 <= target.cap;
        if !fits {
            return Ok(None);
        }
        let (x, d, w) = (x.contiguous()?, delta.contiguous()?, w.contiguous()?);
        let op = AddNorm {
            eps,
            reduce: Some(target),
        };
        let both = x.apply_op3_no_bwd(&d, &w, &op)?;
        Ok(Some((both.get(0)?, both.get(1)?)))
    }

    struct SiluMul;

    impl CustomOp1 for SiluMul {
        fn name(&self) -> &'static str {
            "fused_silu_mul"
        }

        cpu_refused!("silu_mul", _x: _xl);

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = s.device().clone();
            let k = kernels(&dev)?;
            let f = k.func("silu_mul", s.dtype())?;
            let (start, end) = contiguous_range(l, "silu_mul")?;
            let mut dims = l.dims().to_vec();
            let last = dims
                .last_mut()
                .ok_or_else(|| candle_core::Error::Msg("scalar".into()))?;
            if *last % 2 != 0 {
                candle_core::bail!("fused silu_mul: odd width {}", *last)
            }
            *last /= 2;
            let half = *last;
            let rows = (end - start) / (2 * half).max(1);
            let total = rows * half;
            let cfg = grid(total.div_ceil(256).clamp(1, 65535) as u32, 256, 0);
            let stream = dev.cuda_stream();
            let (rows64, half32) = (rows as i64, half as i32);
            macro_rules! run {
                ($t:ty) => {{
                    let src = s.as_cuda_slice::<$t>()?.slice(start..end);
                    // SAFETY: the kernel writes every element.
                    let mut y = unsafe { dev.alloc::<$t>(total)? };
                    let mut b = stream.launch_builder(f);
                    b.arg(&src).arg(&mut y).arg(&rows64).arg(&half32);
                    // SAFETY: arguments match the kernel's signature.
                    unsafe { b.launch(cfg) }.map_err(cerr)?;
                    Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from(dims)))
                }};
            }
            by_dtype!(s.dtype(), "silu_mul", run)
        }
    }

    pub(super) fn silu_mul(gu: &Tensor) -> Result<Tensor> {
        Ok(gu.contiguous()?.apply_op1_no_bwd(&SiluMul)?)
    }

    /// Most rows of `x` a GEMV kernel takes (`MR` of its largest variant); more rows run as
    /// a matrix product, which reads the weight once for all of them.
    const GEMV_MAX_ROWS: usize = 2;
    /// Threads of a GEMV block for rows `kd` wide of `elem`-byte elements: as few passes of
    /// at most 256 threads (2 chunks of 16 bytes per thread and pass, `U`) as cover the row,
    /// with as few threads as fill those passes (o_proj at TP2, 2048 wide in bf16: one pass
    /// of 128 threads, where 256 left half of them without a load).
    /// `SHARDWISE_GEMV_THREADS` fixes it (a multiple of 32 up to 256, to measure others).
    fn gemv_threads(kd: usize, elem: usize) -> u32 {
        static FIXED: OnceLock<Option<u32>> = OnceLock::new();
        let fixed = FIXED.get_or_init(|| {
            std::env::var("SHARDWISE_GEMV_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&v: &u32| v > 0 && v <= 256 && v % 32 == 0)
        });
        if let Some(t) = fixed {
            return *t;
        }
        let per_thread = 2 * 16 / elem.max(1);
        let passes = kd.div_ceil(256 * per_thread).max(1);
        (kd.div_ceil(passes * per_thread).div_ceil(32) * 32).clamp(32, 256) as u32
    }

    struct Gemv {
        /// 0: plain, 1: norm, 2: add and norm (see the kernel).
        mode: u8,
        silu: bool,
        /// Device addresses of the added rows and the norm weight (0 when unused).
        a_ptr: u64,
        nw_ptr: u64,
        eps: f32,
        /// With a rotary target: the q/k/v product of one token, rotated and stored (query
        /// heads alongside).
        rope: Option<(RopeTarget, i32)>,
        /// With a peer target (plain products only): the product finishes its all-reduce.
        reduce: Option<crate::comm::PeerReduce>,
    }

    /// Weight rows per block of the GEMV kernels (`R`; with silu, two gate/up pairs). One row
    /// per warp repeated the add and norm work on x for every row: the q/k/v product with its
    /// norm took ~25 us for 12 us of weight bytes; with 4 rows, 17.5 us (H200). 1 and 2 rows
    /// were also measured and lost at TP1 (BENCHMARKS.md, fourth round).
    const GEMV_ROWS_PER_BLOCK: usize = 4;

    impl Gemv {
        /// Kernel name for `rows` rows of x.
        fn kernel(&self, rows: usize) -> String {
            let tag = match (self.mode, self.silu) {
                (0, _) => "plain",
                (1, false) => "norm",
                (1, true) => "norm_silu",
                (_, false) => "addnorm",
                (_, true) => "addnorm_silu",
            };
            let mr = if rows == 1 { 1 } else { 2 };
            let rope = if self.rope.is_some() { "_rope" } else { "" };
            let reduce = if self.reduce.is_some() { "_reduce" } else { "" };
            format!("gemv{mr}x{GEMV_ROWS_PER_BLOCK}_{tag}{rope}{reduce}")
        }
    }

    /// Output: (mode 2) the sum's rows, then the product's (with a rotary target, only the
    /// rotated query heads).
    impl CustomOp2 for Gemv {
        fn name(&self) -> &'static str {
            "fused_gemv"
        }

        cpu_refused!("gemv", _x: _xl, _y: _yl);

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let kern = kernels(&dev)?;
            let (xs, xe) = contiguous_range(xl, "gemv")?;
            let (ws, we) = contiguous_range(wl, "gemv")?;
            let (wrows, kd) = wl.shape().dims2()?;
            let rows = (xe - xs) / kd.max(1);
            let n = if self.silu { wrows / 2 } else { wrows };
            let f = kern.func(&self.kernel(rows), x.dtype())?;
            let sum_len = if self.mode == 2 { rows * kd } else { 0 };
            let out_len = match &self.rope {
                Some((t, nq)) => (*nq * t.hd) as usize,
                None => rows * n,
            };
            let cols_per_block = GEMV_ROWS_PER_BLOCK / if self.silu { 2 } else { 1 };
            let threads = gemv_threads(kd, x.dtype().size_in_bytes());
            let cfg = grid(n.div_ceil(cols_per_block) as u32, threads, 0);
            let stream = dev.cuda_stream();
            let (rows32, n32, kd32) = (rows as i32, n as i32, kd as i32);
            macro_rules! run {
                ($t:ty) => {{
                    let xv = x.as_cuda_slice::<$t>()?.slice(xs..xe);
                    let wv = w.as_cuda_slice::<$t>()?.slice(ws..we);
                    // SAFETY: the kernel writes every element of the product, and every
                    // element of the sum in mode 2.
                    let mut out = unsafe { dev.alloc::<$t>(sum_len + out_len)? };
                    {
                        // The sum first: its 16-byte stores stay aligned.
                        let (mut xo, mut y) = out.split_at_mut(sum_len);
                        let mut b = stream.launch_builder(f);
                        b.arg(&xv)
                            .arg(&self.a_ptr)
                            .arg(&self.nw_ptr)
                            .arg(&wv)
                            .arg(&mut y)
                            .arg(&mut xo)
                            .arg(&rows32)
                            .arg(&n32)
                            .arg(&kd32)
                            .arg(&self.eps);
                        if let Some((t, nq)) = &self.rope {
                            b.arg(&t.ptrs[0])
                                .arg(&t.ptrs[1])
                                .arg(&t.ptrs[2])
                                .arg(&t.ptrs[3])
                                .arg(&t.pos_ptr)
                                .arg(&t.pos_host)
                                .arg(nq)
                                .arg(&t.hd)
                                .arg(&t.strides[0])
                                .arg(&t.strides[1])
                                .arg(&t.strides[2])
                                .arg(&t.strides[3])
                                .arg(&t.interleaved);
                        }
                        if let Some(p) = &self.reduce {
                            p.push_args(&mut b);
                        }
                        // SAFETY: arguments match the kernel's signature; the caller checked
                        // shapes, dtypes and 16-byte alignment of every operand (and, with a
                        // rotary target, the caches and the position).
                        unsafe { b.launch(cfg) }.map_err(cerr)?;
                    }
                    Ok((
                        CudaStorage::wrap_cuda_slice(out, dev),
                        Shape::from(sum_len + out_len),
                    ))
                }};
            }
            by_dtype!(x.dtype(), "gemv", run)
        }
    }

    /// The GEMV launch behind [`super::linear`] and [`super::norm_linear`]: `(sum, y)`, the
    /// sum `x` itself without a delta. `SHARDWISE_GEMV=0` turns it off (cuBLAS products with
    /// the other fused kernels, to measure it).
    pub(super) fn gemv(
        x: &Tensor,
        w: &Tensor,
        norm: Option<NormIn<'_>>,
        silu: bool,
    ) -> Result<Option<(Tensor, Tensor)>> {
        launch_gemv(x, w, norm, silu, None, None)
    }

    /// The plain GEMV behind [`super::linear_reduced`]: its output, summed over the ranks.
    /// `None` where the GEMV does not serve or a row's bytes are not whole words.
    pub(super) fn gemv_reduced(
        x: &Tensor,
        w: &Tensor,
        target: crate::comm::PeerReduce,
    ) -> Result<Option<Tensor>> {
        let words = w.dim(0).unwrap_or(0) * x.dtype().size_in_bytes() % 4 == 0;
        if !words {
            return Ok(None);
        }
        Ok(launch_gemv(x, w, None, false, None, Some(target))?.map(|(_, y)| y))
    }

    /// The GEMV with a rotary target behind [`super::norm_linear_rope`]: `(sum, rotated
    /// queries [1, q heads, 1, head_dim])`.
    pub(super) fn gemv_rope(
        n: NormIn<'_>,
        w: &Tensor,
        r: RopeIn<'_>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let dt = n.x.dtype();
        let Some((target, _cos_sin)) =
            rope_target([r.cos, r.sin], r.interleaved, [r.kc, r.vc], r.pos, dt)?
        else {
            return Ok(None);
        };
        let (hd, nkv) = (target.hd as usize, target.nkv as usize);
        let fits = hd % 4 == 0
            && n.x.elem_count() == w.dim(1).unwrap_or(0)
            && w.dim(0).ok() == Some((r.q_heads + 2 * nkv) * hd);
        if !fits {
            return Ok(None);
        }
        let rope = (target, r.q_heads as i32);
        let Some((sum, q)) = launch_gemv(n.x, w, Some(n), false, Some(rope), None)? else {
            return Ok(None);
        };
        Ok(Some((sum, q.reshape((1, r.q_heads, 1, hd))?)))
    }

    fn launch_gemv(
        x: &Tensor,
        w: &Tensor,
        norm: Option<NormIn<'_>>,
        silu: bool,
        rope: Option<(RopeTarget, i32)>,
        reduce: Option<crate::comm::PeerReduce>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        static OFF: OnceLock<bool> = OnceLock::new();
        if *OFF.get_or_init(|| std::env::var("SHARDWISE_GEMV").is_ok_and(|v| v == "0")) {
            return Ok(None);
        }
        let dt = x.dtype();
        let Ok((wrows, kd)) = w.dims2() else {
            return Ok(None);
        };
        let unit = 16 / dt.size_in_bytes();
        let rows = x.elem_count() / kd.max(1);
        let fits = w.dtype() == dt
            && w.is_contiguous()
            && x.dims().last() == Some(&kd)
            && (1..=GEMV_MAX_ROWS).contains(&rows)
            && kd % unit == 0
            && wrows > 0
            && (!silu || wrows % 2 == 0)
            && norm.is_none_or(|n| {
                n.w.elem_count() == kd
                    && n.w.dtype() == dt
                    && n.delta
                        .is_none_or(|d| d.shape() == x.shape() && d.dtype() == dt)
            });
        if !fits {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let (nw, delta) = match norm {
            Some(n) => (
                Some(n.w.contiguous()?),
                n.delta.map(Tensor::contiguous).transpose()?,
            ),
            None => (None, None),
        };
        // Every operand's address in 16-byte units (the kernel's loads).
        let mut ptrs = [0u64; 4];
        for (slot, t) in ptrs
            .iter_mut()
            .zip([Some(&x), Some(w), nw.as_ref(), delta.as_ref()])
        {
            if let Some(t) = t {
                match device_ptr(t)? {
                    Some(p) if p % 16 == 0 => *slot = p,
                    _ => return Ok(None),
                }
            }
        }
        let mode = match (&nw, &delta) {
            (None, _) => 0,
            (Some(_), None) => 1,
            (Some(_), Some(_)) => 2,
        };
        let out_len = match &rope {
            // One row through norm (the kernels with a rotary target), no silu.
            Some(_) if rows != 1 || mode == 0 || silu => return Ok(None),
            Some((t, nq)) => (*nq * t.hd) as usize,
            None => rows * if silu { wrows / 2 } else { wrows },
        };
        let op = Gemv {
            mode,
            silu,
            a_ptr: ptrs[3],
            nw_ptr: ptrs[2],
            eps: norm.map_or(0.0, |n| n.eps),
            rope,
            reduce,
        };
        let mut dims = x.dims().to_vec();
        let out = x.apply_op2_no_bwd(w, &op)?;
        let sum_len = if op.mode == 2 { rows * kd } else { 0 };
        let sum = if op.mode == 2 {
            out.narrow(0, 0, sum_len)?.reshape(dims.as_slice())?
        } else {
            x.clone()
        };
        if let Some(last) = dims.last_mut() {
            *last = out_len / rows;
        }
        let y = out.narrow(0, sum_len, out_len)?.reshape(dims)?;
        Ok(Some((sum, y)))
    }

    /// One sequence's caches for an attention launch.
    #[derive(Debug, Clone, Copy)]
    struct SeqCaches {
        /// Device addresses of the first key and value.
        k: u64,
        v: u64,
        /// Positions held (the caches' length when the position is on the device).
        len: usize,
        /// Key strides (head, position) and value strides, in elements.
        ks: [usize; 2],
        vs: [usize; 2],
    }

    /// Words of a sequence's descriptor in the kernels' `seqs` table (`SEQ_WORDS`).
    const SEQ_WORDS: usize = 7;

    impl SeqCaches {
        /// `k`, `v` (`[1, kv heads, positions, head_dim]`, unit stride along head_dim).
        fn of(k: &Tensor, v: &Tensor) -> Result<Option<Self>> {
            let (Some(kp), Some(vp)) = (device_ptr(k)?, device_ptr(v)?) else {
                return Ok(None);
            };
            let (ks, vs) = (k.stride(), v.stride());
            Ok(Some(Self {
                k: kp,
                v: vp,
                len: k.dim(2)?,
                ks: [ks[1], ks[2]],
                vs: [vs[1], vs[2]],
            }))
        }

        /// Every row starts on 16 bytes.
        fn aligned(&self, elem: usize) -> bool {
            self.k % 16 == 0
                && self.v % 16 == 0
                && [self.ks[0], self.ks[1], self.vs[0], self.vs[1]]
                    .iter()
                    .all(|&x| (x * elem) % 16 == 0)
        }

        fn words(&self) -> [i64; SEQ_WORDS] {
            let [kh, kp] = self.ks;
            let [vh, vp] = self.vs;
            [
                self.k,
                self.v,
                self.len as u64,
                kh as u64,
                kp as u64,
                vh as u64,
                vp as u64,
            ]
            .map(|w| w as i64)
        }
    }

    /// Attention of `seqs.len()` sequences' query tokens (`q`: `[b, q heads, 1, head_dim]`)
    /// over their caches, in one launch: grid (KV heads, splits, sequences). One sequence
    /// passes its caches as arguments (a captured graph keeps them); several pass a table of
    /// descriptors, written to the workspace before the launch.
    struct Attend {
        seqs: Vec<SeqCaches>,
        /// Where several sequences' descriptors are (see [`super::SeqTable`]).
        table: super::SeqTable,
        nkv: usize,
        /// Device pointer of the u32 position (0: each sequence's length is `len`).
        pos_ptr: u64,
        window: i32,
        scale: f32,
    }

    impl CustomOp1 for Attend {
        fn name(&self) -> &'static str {
            "fused_decode_attention"
        }

        cpu_refused!("decode attention", _x: _xl);

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            ql: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = q.device().clone();
            let kern = kernels(&dev)?;
            let (qs, qe) = contiguous_range(ql, "decode attention")?;
            let (b, nq, _, hd) = ql.shape().dims4()?;
            let (nkv, first) = match self.seqs.first() {
                Some(f) if self.seqs.len() == b => (self.nkv, *f),
                _ => candle_core::bail!("fused attention: {b} queries, {} caches", self.seqs.len()),
            };
            let g = nq / nkv;
            let span = self.seqs.iter().map(|s| s.len).max().unwrap_or(0);
            let want = span.div_ceil(split_positions()).clamp(1, MAX_SPLITS);
            let elem = q.dtype().size_in_bytes();
            let aligned = self.seqs.iter().all(|s| s.aligned(elem));
            let choose = |splits| {
                attend_kernel(g, hd, elem, aligned, splits).ok_or_else(|| {
                    candle_core::Error::Msg(format!("fused attention: no kernel for {g} x {hd}"))
                })
            };
            let (name, most, threads) = choose(want)?;
            let f = kern.func(&name, q.dtype())?;
            let splits = kern.wave_splits(&name, f, threads, most * 4, nkv * b, want)?;
            let (_, floats, _) = choose(splits)?;
            // Partials of every sequence, then (for several) the descriptor table, 8-aligned.
            let partials = (b * nkv * splits * g * (hd + 2)).next_multiple_of(2);
            let on_host = matches!(self.table, super::SeqTable::Host);
            let table_words = if b > 1 && on_host { b * SEQ_WORDS } else { 0 };
            let scratch = kern.scratch(&dev, partials + 2 * table_words)?;
            let stream = dev.cuda_stream();
            let table = if let (true, super::SeqTable::Device(at)) = (b > 1, self.table) {
                at
            } else if b > 1 {
                let words: Vec<i64> = self.seqs.iter().flat_map(SeqCaches::words).collect();
                let at = scratch + (partials * 4) as u64;
                // SAFETY: the table's words lie inside the scratch buffer; the copy is ordered
                // on the stream before the launch that reads them (and after the last one).
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(at, &words, stream.cu_stream())
                }
                .map_err(cerr)?;
                at
            } else {
                0
            };
            let cfg = LaunchConfig {
                grid_dim: (nkv as u32, splits as u32, b as u32),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: (floats * 4) as u32,
            };
            let one = if b == 1 {
                first
            } else {
                SeqCaches {
                    k: 0,
                    v: 0,
                    ..first
                }
            };
            let args_i32 = [
                one.len as i32,
                g as i32,
                hd as i32,
                span as i32,
                self.window,
            ];
            let strides = [one.ks[0], one.ks[1], one.vs[0], one.vs[1]].map(|x| x as i64);
            let (pos_ptr, scale) = (self.pos_ptr, self.scale);
            macro_rules! run {
                ($t:ty) => {{
                    let qv = q.as_cuda_slice::<$t>()?.slice(qs..qe);
                    // SAFETY: the combining blocks write every element.
                    let mut out = unsafe { dev.alloc::<$t>(b * nq * hd)? };
                    let mut lb = stream.launch_builder(f);
                    lb.arg(&qv)
                        .arg(&one.k)
                        .arg(&one.v)
                        .arg(&mut out)
                        .arg(&scratch)
                        .arg(&kern.counters)
                        .arg(&pos_ptr)
                        .arg(&args_i32[0])
                        .arg(&args_i32[1])
                        .arg(&args_i32[2])
                        .arg(&strides[0])
                        .arg(&strides[1])
                        .arg(&strides[2])
                        .arg(&strides[3])
                        .arg(&args_i32[3])
                        .arg(&args_i32[4])
                        .arg(&scale)
                        .arg(&table);
                    // SAFETY: arguments match the kernel's signature; the caller checked
                    // shapes, group size and head width, and holds the caches.
                    unsafe { lb.launch(cfg) }.map_err(cerr)?;
                    Ok((
                        CudaStorage::wrap_cuda_slice(out, dev),
                        Shape::from((b, nq, 1, hd)),
                    ))
                }};
            }
            by_dtype!(q.dtype(), "decode attention", run)
        }
    }

    /// Whether the fused attention takes a query `[b, nq, 1, hd]` over caches `k`, `v`.
    fn attention_fits(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<bool> {
        let (_, nq, t, hd) = q.dims4()?;
        let (kb, nkv, span, khd) = k.dims4()?;
        Ok(t == 1
            && kb == 1
            && khd == hd
            && v.dims() == k.dims()
            && nkv > 0
            && nq % nkv == 0
            && attend_variant(nq / nkv, hd).is_some()
            && span > 0
            && k.stride()[3] == 1
            && v.stride()[3] == 1
            && k.dtype() == q.dtype()
            && v.dtype() == q.dtype())
    }

    pub(super) fn decode_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        len: CacheLen<'_>,
        window: Option<usize>,
        scale: f32,
    ) -> Result<Option<Tensor>> {
        let nkv = k.dim(1)?;
        if q.dim(0)? != 1 || nkv > MAX_KV_HEADS || !attention_fits(q, k, v)? {
            return Ok(None);
        }
        let pos_ptr = match len {
            CacheLen::Host => 0,
            CacheLen::Device(p) if p.dtype() == DType::U32 => match device_ptr(p)? {
                Some(ptr) => ptr,
                None => return Ok(None),
            },
            CacheLen::Device(_) => return Ok(None),
        };
        let Some(seq) = SeqCaches::of(k, v)? else {
            return Ok(None);
        };
        let q = q.contiguous()?;
        let op = Attend {
            seqs: vec![seq],
            table: super::SeqTable::Host,
            nkv,
            pos_ptr,
            window: window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
            scale,
        };
        Ok(Some(q.apply_op1_no_bwd(&op)?))
    }

    pub(super) fn decode_attention_batch(
        q: &Tensor,
        caches: &[(&Tensor, &Tensor)],
        window: Option<usize>,
        scale: f32,
        table: super::SeqTable,
    ) -> Result<Option<Tensor>> {
        let Some((k0, _)) = caches.first() else {
            return Ok(None);
        };
        let nkv = k0.dim(1)?;
        if q.dim(0)? != caches.len() || caches.len() * nkv > MAX_KV_HEADS {
            return Ok(None);
        }
        let mut seqs = Vec::with_capacity(caches.len());
        for (k, v) in caches {
            if k.dim(1)? != nkv || k.dim(3)? != k0.dim(3)? || !attention_fits(q, k, v)? {
                return Ok(None);
            }
            match SeqCaches::of(k, v)? {
                Some(s) => seqs.push(s),
                None => return Ok(None),
            }
        }
        let q = q.contiguous()?;
        let op = Attend {
            seqs,
            table,
            nkv,
            pos_ptr: 0,
            window: window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
            scale,
        };
        Ok(Some(q.apply_op1_no_bwd(&op)?))
    }

    /// Where a rotary embedding reads its cos/sin rows and writes a token's key and value
    /// (the `rope_store` kernel and the q/k/v GEMV with ROPE).
    struct RopeTarget {
        /// cos, sin, k cache, v cache.
        ptrs: [u64; 4],
        /// k cache head and position strides, then v cache's.
        strides: [i64; 4],
        pos_ptr: u64,
        pos_host: i32,
        nkv: i32,
        hd: i32,
        interleaved: i32,
    }

    /// The target of `cos`/`sin` rows and caches `[1, kv heads, capacity, head_dim]` of dtype
    /// `dt` at `pos`, with the contiguous cos and sin it points into (to keep alive until the
    /// launch); `None` where a kernel does not serve them.
    fn rope_target(
        [cos, sin]: [&Tensor; 2],
        interleaved: bool,
        [kc, vc]: [&Tensor; 2],
        pos: StorePos<'_>,
        dt: DType,
    ) -> Result<Option<(RopeTarget, [Tensor; 2])>> {
        let (_, nkv, cap, hd) = kc.dims4()?;
        let fits = hd % 2 == 0
            && vc.dims() == kc.dims()
            && kc.stride()[3] == 1
            && vc.stride()[3] == 1
            && cos.elem_count() == hd / 2
            && sin.elem_count() == hd / 2
            && [cos, sin, kc, vc].iter().all(|t| t.dtype() == dt);
        if !fits {
            return Ok(None);
        }
        let (pos_ptr, pos_host) = match pos {
            StorePos::Host(p) if p < cap => (0, p as i32),
            StorePos::Host(p) => {
                return Err(Error::Config {
                    field: "start_pos".into(),
                    reason: format!("position {p} is outside a KV cache of {cap}"),
                })
            }
            StorePos::Device(t) if t.dtype() == DType::U32 => match device_ptr(t)? {
                Some(p) => (p, 0),
                None => return Ok(None),
            },
            StorePos::Device(_) => return Ok(None),
        };
        let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
        let mut ptrs = [0u64; 4];
        for (slot, t) in ptrs.iter_mut().zip([&cos, &sin, kc, vc]) {
            match device_ptr(t)? {
                Some(p) => *slot = p,
                None => return Ok(None),
            }
        }
        let (ks, vs) = (kc.stride(), vc.stride());
        let target = RopeTarget {
            ptrs,
            strides: [ks[1] as i64, ks[2] as i64, vs[1] as i64, vs[2] as i64],
            pos_ptr,
            pos_host,
            nkv: nkv as i32,
            hd: hd as i32,
            interleaved: i32::from(interleaved),
        };
        Ok(Some((target, [cos, sin])))
    }

    /// Words of a sequence's descriptor in the `rope_store` kernel's `seqs` table
    /// (`ROPE_SEQ_WORDS`).
    const ROPE_SEQ_WORDS: usize = 9;

    const _: () = assert!(
        super::BATCH_WORDS == SEQ_WORDS + ROPE_SEQ_WORDS && super::ATTEND_WORDS == SEQ_WORDS
    );

    impl RopeTarget {
        fn words(&self) -> [i64; ROPE_SEQ_WORDS] {
            let [cos, sin, kc, vc] = self.ptrs.map(|p| p as i64);
            let [kh, kp, vh, vp] = self.strides;
            [cos, sin, kc, vc, i64::from(self.pos_host), kh, kp, vh, vp]
        }
    }

    /// Words of one sequence's descriptors for one layer of a batch step (see
    /// [`super::batch_words`]): attention over `pos + 1` positions, then rotary and cache
    /// write at `pos`.
    pub(super) fn batch_words(
        s: &super::RopeSeq<'_>,
        interleaved: bool,
        dt: DType,
    ) -> Result<Option<[i64; super::BATCH_WORDS]>> {
        let [kc, vc] = s.caches;
        let pos = StorePos::Host(s.pos);
        let (Some((rope, _)), Some(mut att)) = (
            rope_target(s.cos_sin, interleaved, s.caches, pos, dt)?,
            SeqCaches::of(kc, vc)?,
        ) else {
            return Ok(None);
        };
        att.len = s.pos + 1;
        let mut out = [0i64; super::BATCH_WORDS];
        out[..SEQ_WORDS].copy_from_slice(&att.words());
        out[SEQ_WORDS..].copy_from_slice(&rope.words());
        Ok(Some(out))
    }

    /// `rope_store` of `b` sequences' tokens (`q`, `k`, `v`: `[b, 1, width]`), sequence `i` at
    /// `targets[i]`: one sequence passes its target as arguments (a captured graph keeps
    /// them), several a table of descriptors written to the workspace before the launch.
    struct RopeStore(Vec<RopeTarget>, super::SeqTable);

    impl CustomOp3 for RopeStore {
        fn name(&self) -> &'static str {
            "fused_rope_store"
        }

        cpu_refused!("rope_store", _x: _xl, _y: _yl, _z: _zl);

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            ql: &Layout,
            k: &CudaStorage,
            kl: &Layout,
            v: &CudaStorage,
            vl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = q.device().clone();
            let kern = kernels(&dev)?;
            let f = kern.func("rope_store", q.dtype())?;
            let (qs, qe) = contiguous_range(ql, "rope_store")?;
            let (ks, ke) = contiguous_range(kl, "rope_store")?;
            let (vs, ve) = contiguous_range(vl, "rope_store")?;
            let (b, t) = match self.0.first() {
                Some(t) => (self.0.len(), t),
                None => candle_core::bail!("fused rope_store: no sequences"),
            };
            let nkv = t.nkv as usize;
            let hd = (ke - ks) / (b * nkv).max(1);
            let nq = (qe - qs) / (b * hd).max(1);
            let total = (nq + nkv) * hd / 2 + nkv * hd;
            let cfg = LaunchConfig {
                grid_dim: (total.div_ceil(256).max(1) as u32, b as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let stream = dev.cuda_stream();
            let table = if let (true, super::SeqTable::Device(at)) = (b > 1, self.1) {
                at
            } else if b > 1 {
                let words: Vec<i64> = self.0.iter().flat_map(RopeTarget::words).collect();
                let at = kern.scratch(&dev, 2 * words.len())?;
                // SAFETY: the words fit the scratch buffer; the copy is ordered on the stream
                // before the launch that reads them (and after the last user of the buffer).
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(at, &words, stream.cu_stream())
                }
                .map_err(cerr)?;
                at
            } else {
                0
            };
            let (nq32, hd32) = (nq as i32, hd as i32);
            macro_rules! run {
                ($t:ty) => {{
                    let qv = q.as_cuda_slice::<$t>()?.slice(qs..qe);
                    let kv = k.as_cuda_slice::<$t>()?.slice(ks..ke);
                    let vv = v.as_cuda_slice::<$t>()?.slice(vs..ve);
                    // SAFETY: the kernel writes every element.
                    let mut out = unsafe { dev.alloc::<$t>(b * nq * hd)? };
                    let mut lb = stream.launch_builder(f);
                    lb.arg(&qv)
                        .arg(&kv)
                        .arg(&vv)
                        .arg(&t.ptrs[0])
                        .arg(&t.ptrs[1])
                        .arg(&mut out)
                        .arg(&t.ptrs[2])
                        .arg(&t.ptrs[3])
                        .arg(&t.pos_ptr)
                        .arg(&t.pos_host)
                        .arg(&nq32)
                        .arg(&t.nkv)
                        .arg(&hd32)
                        .arg(&t.strides[0])
                        .arg(&t.strides[1])
                        .arg(&t.strides[2])
                        .arg(&t.strides[3])
                        .arg(&t.interleaved)
                        .arg(&table);
                    // SAFETY: arguments match the kernel's signature; the caller checked the
                    // caches' shapes, dtypes and the positions.
                    unsafe { lb.launch(cfg) }.map_err(cerr)?;
                    Ok((
                        CudaStorage::wrap_cuda_slice(out, dev),
                        Shape::from((b, nq, 1, hd)),
                    ))
                }};
            }
            by_dtype!(q.dtype(), "rope_store", run)
        }
    }

    pub(super) fn rope_store(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos_sin: [&Tensor; 2],
        interleaved: bool,
        caches: [&Tensor; 2],
        pos: StorePos<'_>,
    ) -> Result<Option<Tensor>> {
        let Some(target) = rope_target(cos_sin, interleaved, caches, pos, q.dtype())? else {
            return Ok(None);
        };
        rope_store_seqs(q, k, v, vec![target], super::SeqTable::Host)
    }

    pub(super) fn rope_store_batch(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seqs: &[super::RopeSeq<'_>],
        interleaved: bool,
        table: super::SeqTable,
    ) -> Result<Option<Tensor>> {
        let mut targets = Vec::with_capacity(seqs.len());
        for s in seqs {
            let pos = StorePos::Host(s.pos);
            match rope_target(s.cos_sin, interleaved, s.caches, pos, q.dtype())? {
                Some(t) => targets.push(t),
                None => return Ok(None),
            }
        }
        let same = targets
            .windows(2)
            .all(|w| (w[0].0.nkv, w[0].0.hd) == (w[1].0.nkv, w[1].0.hd));
        if targets.is_empty() || !same {
            return Ok(None);
        }
        rope_store_seqs(q, k, v, targets, table)
    }

    /// `rope_store` of one token of each of `targets.len()` sequences (rows of `q`, `k`, `v`),
    /// with the contiguous cos/sin rows each target points into kept alive until the launch.
    fn rope_store_seqs(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        targets: Vec<(RopeTarget, [Tensor; 2])>,
        table: super::SeqTable,
    ) -> Result<Option<Tensor>> {
        let Some((first, _)) = targets.first() else {
            return Ok(None);
        };
        let (b, nkv, hd) = (targets.len(), first.nkv as usize, first.hd as usize);
        let fits = q.dims().first() == Some(&b)
            && q.elem_count() % (b * hd).max(1) == 0
            && k.elem_count() == b * nkv * hd
            && v.elem_count() == b * nkv * hd
            && k.dtype() == q.dtype()
            && v.dtype() == q.dtype();
        if !fits {
            return Ok(None);
        }
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let (targets, _keep): (Vec<RopeTarget>, Vec<[Tensor; 2]>) = targets.into_iter().unzip();
        Ok(Some(q.apply_op3_no_bwd(
            &k,
            &v,
            &RopeStore(targets, table),
        )?))
    }
}
