//! Memory helpers for large buffers: huge-page-backed vectors and copies out of tensor
//! storage without candle's intermediate allocation.

use candle_core::{Storage, Tensor, WithDType};

use crate::error::Result;

/// Asks the kernel to back a large fresh buffer with huge pages: a 1 GiB buffer otherwise
/// takes 262144 page faults (each zeroing a 4 KiB page) before the first byte lands.
pub(crate) fn advise_huge(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).div_ceil(HUGE) * HUGE;
        let end = (ptr as usize + len) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside an allocation we own; MADV_HUGEPAGE is advice
            // only and cannot change its contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// An empty vector with room for `n` elements, huge pages advised for it.
pub(crate) fn huge_vec<T>(n: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    advise_huge(v.as_mut_ptr().cast(), n * std::mem::size_of::<T>());
    v
}

/// Runs `f` on a tensor's elements as one flat slice, borrowed from its storage when it is
/// contiguous on the CPU (no copy), copied otherwise.
///
/// # Errors
/// The tensor's dtype is not `T`.
pub(crate) fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
        return Ok(f(&cpu.as_slice::<T>()?[a..b]));
    }
    drop(storage);
    let v = t.flatten_all()?.to_vec1::<T>()?;
    Ok(f(&v))
}
