//! CUDA devices as ranks use them (cargo feature `cuda`): the one place a rank's device is
//! created, and the runtime compilation (NVRTC) of the project's own kernels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

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
    Ok(dev)
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

/// Compiled PTX by (source name, compute capability).
type PtxCache = Mutex<HashMap<(&'static str, (i32, i32)), String>>;

/// PTX of a kernel source, compiled once per process and architecture.
fn ptx(name: &'static str, src: &'static str, arch: (i32, i32)) -> Result<String> {
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
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| Error::Unsupported {
        what: format!("compiling the {name} kernels"),
        by: format!("NVRTC: {e:?}"),
    })?;
    let text = ptx.to_src();
    cache.insert((name, arch), text.clone());
    Ok(text)
}

/// Loads the kernels of `src` (compiled by NVRTC for `ctx`'s device) and returns `funcs`.
///
/// # Errors
/// NVRTC is missing or the source does not compile; a function is not in the module.
pub fn load_kernels(
    ctx: &Arc<CudaContext>,
    name: &'static str,
    src: &'static str,
    funcs: &[&str],
) -> Result<Vec<CudaFunction>> {
    let text = ptx(name, src, compute_capability(ctx)?)?;
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
