//! CUDA devices as ranks use them (cargo feature `cuda`): the one place a rank's device is
//! created, and the runtime compilation (NVRTC) of the project's own kernels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::Device;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};

use crate::error::{Error, Result};

/// A CUDA device for a rank on GPU `ordinal`.
///
/// cudarc records an event on every buffer a kernel touches once a context has a second
/// stream (candle makes one per device), a few microseconds per launch in a decode step of
/// ~1000 launches. A rank computes, copies and communicates on that one stream, so the
/// tracking protects nothing here and is switched off for the context.
///
/// # Errors
/// No such device.
pub fn device(ordinal: usize) -> Result<Device> {
    let dev = Device::new_cuda(ordinal)?;
    // SAFETY: every kernel, copy and collective of a rank runs on its device's single
    // stream (candle's), so stream order alone keeps buffers alive and written before use;
    // the tracking events only order work across streams, of which a rank has one.
    unsafe { dev.as_cuda_device()?.disable_event_tracking() };
    keep_freed_memory(dev.as_cuda_device()?.cuda_stream().context())?;
    Ok(dev)
}

/// Lets the device's stream-ordered memory pool keep what is freed. By default the pool
/// returns freed memory to the driver at every synchronisation, so the next allocation of a
/// step (or of a collective's output) maps fresh pages: measured as ~14% of a 256 MiB NCCL
/// all-reduce timed from a synchronised start, and a remap of every buffer of an eager decode
/// step (each ends in a synchronising copy of the logits).
fn keep_freed_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: `pool` receives the device's default pool; the attribute takes a u64.
    let r = unsafe {
        ctx.bind_to_thread()
            .map_err(|e| driver_err("binding a CUDA context", e))?;
        let r = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
        if r != sys::CUresult::CUDA_SUCCESS {
            r
        } else {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        }
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(driver_err("setting the memory pool's release threshold", r));
    }
    Ok(())
}

/// An error of the CUDA driver while doing `what`.
pub(crate) fn driver_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Unsupported {
        what: what.to_string(),
        by: format!("the CUDA driver: {e:?}"),
    }
}

/// Records `f`'s work on `stream` as a CUDA graph (capture local to this thread; memory the
/// graph allocates and does not free is freed again at its next launch) without running it.
/// Returns the graph and `f`'s value, or why nothing usable was captured: `f` failed, the
/// driver refused an operation, or nothing was recorded.
///
/// # Errors
/// As above; a value `f` returned from a failed capture is leaked, since its memory never
/// existed and freeing it would record a driver error.
pub fn capture<T>(
    stream: &Arc<cudarc::driver::CudaStream>,
    f: impl FnOnce() -> Result<T>,
) -> Result<(cudarc::driver::CudaGraph, T)> {
    use cudarc::driver::sys::{CUgraphInstantiate_flags as F, CUstreamCaptureMode as M};
    stream
        .begin_capture(M::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| driver_err("starting a CUDA graph capture", e))?;
    let out = f();
    let graph = stream.end_capture(F::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    let out = out?;
    match graph {
        Ok(Some(g)) => Ok((g, out)),
        other => {
            std::mem::forget(out);
            Err(match other {
                Err(e) => driver_err("capturing a CUDA graph", e),
                Ok(_) => Error::Unsupported {
                    what: "a CUDA graph".into(),
                    by: "the capture, which recorded nothing".into(),
                },
            })
        }
    }
}

/// Waits until the work enqueued on `stream` so far has finished, polling an event: `true`
/// when it did, `false` once `deadline` passed first (the work stays enqueued).
///
/// # Errors
/// The driver reported an error (a kernel fault surfaces here).
pub fn wait_for(stream: &Arc<cudarc::driver::CudaStream>, deadline: Duration) -> Result<bool> {
    use cudarc::driver::sys::{CUevent_flags, CUresult};
    let ev = stream
        .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
        .map_err(|e| driver_err("recording an event", e))?;
    let start = Instant::now();
    loop {
        // SAFETY: `ev` is a live event of this context.
        match unsafe { cudarc::driver::result::event::query(ev.cu_event()) } {
            Ok(()) => return Ok(true),
            Err(e) if e.0 == CUresult::CUDA_ERROR_NOT_READY => {}
            Err(e) => return Err(driver_err("waiting for the GPU", e)),
        }
        if start.elapsed() > deadline {
            return Ok(false);
        }
        // Yield while the work may still be a step's (as CUDA's own blocking copy spins), so
        // the wait adds no sleep granularity to a step; past a second, back off.
        if start.elapsed() < Duration::from_secs(1) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Compute capability `(major, minor)` of `ctx`'s device.
///
/// # Errors
/// Driver errors.
pub fn compute_capability(ctx: &Arc<CudaContext>) -> Result<(i32, i32)> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let major = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .map_err(|e| driver_err("compute capability", e))?;
    let minor = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .map_err(|e| driver_err("compute capability", e))?;
    Ok((major, minor))
}

/// Element types of the project's kernels, for sources compiled with it: `F32`, `BF16`,
/// `F16`, each with its storage type `T`, `ld` (to f32) and `st` (from f32, rounding to
/// nearest even).
pub const DTYPES: &str = r#"
typedef unsigned long long u64;
typedef unsigned short u16;
struct F32 { typedef float T;
  static __device__ __forceinline__ float ld(float x) { return x; }
  static __device__ __forceinline__ float st(float x) { return x; } };
struct BF16 { typedef u16 T;
  static __device__ __forceinline__ float ld(u16 h) { return __uint_as_float(((unsigned)h) << 16); }
  static __device__ __forceinline__ u16 st(float f) { u16 r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r; } };
struct F16 { typedef u16 T;
  static __device__ __forceinline__ float ld(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
  static __device__ __forceinline__ u16 st(float f) { u16 r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r; } };
"#;

/// Compiled PTX by (source name, compute capability).
type PtxCache = Mutex<HashMap<(&'static str, (i32, i32)), String>>;

/// PTX of a kernel source (the concatenation of `srcs`), compiled once per process and
/// architecture.
fn ptx(name: &'static str, srcs: &[&str], arch: (i32, i32)) -> Result<String> {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().map_err(|_| Error::Unsupported {
        what: format!("compiling {name}"),
        by: "a previous compilation panicked".into(),
    })?;
    if let Some(p) = cache.get(&(name, arch)) {
        return Ok(p.clone());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{}{}", arch.0, arch.1)],
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(srcs.concat(), opts).map_err(|e| {
        Error::Unsupported {
            what: format!("compiling the {name} kernels"),
            by: format!("NVRTC: {e:?}"),
        }
    })?;
    let text = ptx.to_src();
    cache.insert((name, arch), text.clone());
    Ok(text)
}

/// Loads the kernels of `srcs` (concatenated, compiled by NVRTC for `ctx`'s device) and
/// returns `funcs`.
///
/// # Errors
/// NVRTC is missing or the source does not compile; a function is not in the module.
pub fn load_kernels(
    ctx: &Arc<CudaContext>,
    name: &'static str,
    srcs: &[&str],
    funcs: &[&str],
) -> Result<Vec<CudaFunction>> {
    let text = ptx(name, srcs, compute_capability(ctx)?)?;
    let module: Arc<CudaModule> = ctx
        .load_module(cudarc::nvrtc::Ptx::from_src(text))
        .map_err(|e| driver_err(&format!("loading the {name} kernels"), e))?;
    funcs
        .iter()
        .map(|f| {
            module
                .load_function(f)
                .map_err(|e| driver_err(&format!("kernel {f} of {name}"), e))
        })
        .collect()
}

/// The device address of `t`'s first element (`None` off CUDA or for dtypes other than f32,
/// bf16, f16 and u32). The address stays valid while `t`'s storage lives; work that takes it
/// runs on the storage's own stream.
///
/// # Errors
/// A storage that does not hold its dtype.
pub fn device_ptr(t: &candle_core::Tensor) -> Result<Option<u64>> {
    use candle_core::backend::BackendStorage;
    use cudarc::driver::DevicePtr;
    let (st, l) = t.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*st else {
        return Ok(None);
    };
    let stream = cs.device().cuda_stream();
    macro_rules! addr {
        ($t:ty) => {{
            let (ptr, _) = cs.as_cuda_slice::<$t>()?.device_ptr(&stream);
            ptr + (l.start_offset() * std::mem::size_of::<$t>()) as u64
        }};
    }
    Ok(Some(match t.dtype() {
        candle_core::DType::F32 => addr!(f32),
        candle_core::DType::BF16 => addr!(half::bf16),
        candle_core::DType::F16 => addr!(half::f16),
        candle_core::DType::U32 => addr!(u32),
        candle_core::DType::I64 => addr!(i64),
        _ => return Ok(None),
    }))
}

/// Copies `values` into the contiguous CUDA tensor `t` of the same element size, without a
/// kernel or an allocation: one asynchronous host-to-device copy on `t`'s stream, ordered
/// with the work around it.
fn upload<T: cudarc::driver::DeviceRepr>(t: &candle_core::Tensor, values: &[T]) -> Result<()> {
    let fits = t.is_contiguous()
        && t.elem_count() == values.len()
        && t.dtype().size_in_bytes() == std::mem::size_of::<T>();
    let ptr = match device_ptr(t)? {
        Some(p) if fits => p,
        _ => {
            return Err(Error::Config {
                field: "upload".into(),
                reason: format!(
                    "{} values for a {:?} {:?} tensor (contiguous on a GPU needed)",
                    values.len(),
                    t.dtype(),
                    t.dims()
                ),
            })
        }
    };
    let candle_core::Device::Cuda(d) = t.device() else {
        return Err(Error::Config {
            field: "upload".into(),
            reason: "not a CUDA tensor".into(),
        });
    };
    let stream = d.cuda_stream();
    // SAFETY: `ptr` addresses `values.len()` elements of `t`'s live storage (checked above);
    // the copy is ordered on the storage's stream.
    unsafe { cudarc::driver::result::memcpy_htod_async(ptr, values, stream.cu_stream()) }
        .map_err(|e| driver_err("copying inputs to the GPU", e))
}

/// `upload` of f32 values into an f32, bf16 or f16 tensor (rounded to nearest even).
///
/// # Errors
/// Another dtype, a size mismatch, or the driver's error.
pub fn upload_f32(t: &candle_core::Tensor, values: &[f32]) -> Result<()> {
    use candle_core::DType;
    match t.dtype() {
        DType::F32 => upload(t, values),
        DType::BF16 => upload(
            t,
            &values
                .iter()
                .map(|&x| half::bf16::from_f32(x))
                .collect::<Vec<_>>(),
        ),
        DType::F16 => upload(
            t,
            &values
                .iter()
                .map(|&x| half::f16::from_f32(x))
                .collect::<Vec<_>>(),
        ),
        d => Err(Error::Config {
            field: "upload".into(),
            reason: format!("f32 values for a {d:?} tensor"),
        }),
    }
}

/// `upload` of values into a tensor of their own dtype (u32 token ids and positions, i64
/// descriptor words).
///
/// # Errors
/// Another dtype, a size mismatch, or the driver's error.
pub fn upload_exact<T: cudarc::driver::DeviceRepr + candle_core::WithDType>(
    t: &candle_core::Tensor,
    values: &[T],
) -> Result<()> {
    if t.dtype() != T::DTYPE {
        return Err(Error::Config {
            field: "upload".into(),
            reason: format!("{:?} values for a {:?} tensor", T::DTYPE, t.dtype()),
        });
    }
    upload(t, values)
}
