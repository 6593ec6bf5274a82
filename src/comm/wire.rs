//! Tensor elements on the wire: little-endian bytes of f32, bf16 or f16, and the typed
//! working buffer collectives reduce into.
//!
//! Bytes arriving from the network carry no alignment guarantee, so reductions read them
//! element by element with `from_le_bytes` (the compiler vectorises these loops).

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::error::{Error, Result};

/// Wire code of a dtype (the `dtype` field of a frame).
pub fn dtype_code(d: DType) -> Option<u32> {
    match d {
        DType::F32 => Some(0),
        DType::BF16 => Some(1),
        DType::F16 => Some(2),
        _ => None,
    }
}

/// The dtype of a wire code.
pub fn code_dtype(c: u32) -> Option<DType> {
    match c {
        0 => Some(DType::F32),
        1 => Some(DType::BF16),
        2 => Some(DType::F16),
        _ => None,
    }
}

/// An element type that can be summed straight out of little-endian wire bytes.
pub trait WireElem: Copy + Send + Sync + candle_core::WithDType {
    /// Bytes per element.
    const SIZE: usize;
    /// `acc[i] += src[i]`, with `src` as little-endian bytes.
    fn add_le(acc: &mut [Self], src: &[u8]);
    /// Sum of `parts` (each little-endian bytes of `out.len()` elements) in the given order,
    /// accumulated in f32 and rounded once.
    fn sum_parts(out: &mut [Self], parts: &[&[u8]]);
    /// `a + b` (b as little-endian bytes), rounded to `Self`.
    fn add1(a: Self, b: &[u8]) -> Self;

    /// `a + b` as a new buffer of little-endian bytes (a frame payload, no further copy).
    fn add_to_le(a: &[Self], b: &[u8]) -> Vec<u8> {
        assert_eq!(a.len() * Self::SIZE, b.len(), "operand sizes differ");
        let mut out: Vec<u8> = Vec::with_capacity(b.len());
        let p = out.as_mut_ptr();
        for (i, (x, y)) in a.iter().zip(b.chunks_exact(Self::SIZE)).enumerate() {
            let v = Self::add1(*x, y);
            // SAFETY: `i * SIZE + SIZE <= b.len()` = capacity; `Self` has no padding.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (&v as *const Self).cast::<u8>(),
                    p.add(i * Self::SIZE),
                    Self::SIZE,
                )
            };
        }
        // SAFETY: every byte up to `b.len()` was written above.
        unsafe { out.set_len(b.len()) };
        out
    }

    /// `out = a + b` into uninitialised elements.
    fn add_to(a: &[Self], b: &[u8], out: &mut [std::mem::MaybeUninit<Self>]) {
        assert!(
            a.len() == out.len() && a.len() * Self::SIZE == b.len(),
            "operand sizes differ"
        );
        for ((o, x), y) in out.iter_mut().zip(a).zip(b.chunks_exact(Self::SIZE)) {
            o.write(Self::add1(*x, y));
        }
    }

    /// `out = b` (little-endian bytes) into uninitialised elements.
    fn copy_to(b: &[u8], out: &mut [std::mem::MaybeUninit<Self>]) {
        assert_eq!(out.len() * Self::SIZE, b.len(), "operand sizes differ");
        // SAFETY: sizes match (checked); any bit pattern is a valid `Self`.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), out.as_mut_ptr().cast::<u8>(), b.len())
        };
    }
}

macro_rules! half_elem {
    ($t:ty) => {
        impl WireElem for $t {
            const SIZE: usize = 2;
            fn add_le(acc: &mut [Self], src: &[u8]) {
                for (a, b) in acc.iter_mut().zip(src.chunks_exact(2)) {
                    let b = <$t>::from_bits(u16::from_le_bytes([b[0], b[1]]));
                    *a = <$t>::from_f32(a.to_f32() + b.to_f32());
                }
            }
            fn add1(a: Self, b: &[u8]) -> Self {
                <$t>::from_f32(
                    a.to_f32() + <$t>::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                )
            }
            fn sum_parts(out: &mut [Self], parts: &[&[u8]]) {
                let mut acc = vec![0f32; out.len()];
                for p in parts {
                    for (a, b) in acc.iter_mut().zip(p.chunks_exact(2)) {
                        *a += <$t>::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                    }
                }
                for (o, a) in out.iter_mut().zip(acc) {
                    *o = <$t>::from_f32(a);
                }
            }
        }
    };
}
half_elem!(bf16);
half_elem!(f16);

impl WireElem for f32 {
    const SIZE: usize = 4;
    fn add_le(acc: &mut [Self], src: &[u8]) {
        for (a, b) in acc.iter_mut().zip(src.chunks_exact(4)) {
            *a += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    fn add1(a: Self, b: &[u8]) -> Self {
        a + f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn sum_parts(out: &mut [Self], parts: &[&[u8]]) {
        out.iter_mut().for_each(|o| *o = 0.0);
        for p in parts {
            Self::add_le(out, p);
        }
    }
}

/// Little-endian bytes of a slice of plain numbers.
pub fn as_bytes<T: WireElem>(v: &[T]) -> &[u8] {
    // SAFETY: `T` is f32/bf16/f16: no padding, any byte pattern readable; the targets this
    // crate supports are little-endian (checked at compile time in `comm::mod`).
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Copies little-endian `src` bytes over `dst`.
pub fn copy_le<T: WireElem>(dst: &mut [T], src: &[u8]) -> Result<()> {
    if src.len() != std::mem::size_of_val(dst) {
        return Err(Error::Config {
            field: "frame".into(),
            reason: format!("{} bytes for {} elements", src.len(), dst.len()),
        });
    }
    // SAFETY: lengths are equal (checked above) and `T` accepts any byte pattern.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<u8>(), src.len())
    };
    Ok(())
}

/// A flat vector back into a tensor of `shape`.
///
/// # Errors
/// Element count does not match the shape.
pub fn from_vec<T: WireElem>(v: Vec<T>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// The bytes of any tensor with a wire dtype.
///
/// # Errors
/// Unsupported dtype.
pub fn tensor_to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match t.dtype() {
        // One copy, straight out of the tensor's storage.
        DType::F32 => crate::mem::with_slice(t, |x: &[f32]| as_bytes(x).to_vec())?,
        DType::BF16 => crate::mem::with_slice(t, |x: &[bf16]| as_bytes(x).to_vec())?,
        DType::F16 => crate::mem::with_slice(t, |x: &[f16]| as_bytes(x).to_vec())?,
        d => {
            return Err(Error::Config {
                field: "dtype".into(),
                reason: format!("{d:?} cannot be sent; f32, bf16 and f16 can"),
            })
        }
    })
}

/// A tensor from wire bytes.
///
/// # Errors
/// Unsupported dtype or a byte count that does not match the shape.
pub fn bytes_to_tensor(bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    if bytes.len() != n * dtype.size_in_bytes() {
        return Err(Error::Config {
            field: "frame".into(),
            reason: format!("{} bytes for shape {shape:?} of {dtype:?}", bytes.len()),
        });
    }
    Ok(Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)?)
}

/// A computation over a flat slice of any wire element type (generic closures do not exist;
/// this trait stands in for one).
pub trait ElemFn {
    /// Runs on the tensor's elements; returns the result's elements.
    ///
    /// # Errors
    /// Whatever the computation reports.
    fn call<T: WireElem>(self, x: &[T]) -> Result<Vec<T>>;
}

/// The one dtype dispatch of the collectives: runs `f` on `t`'s elements (borrowed from its
/// storage when possible) and returns a tensor of `t`'s shape and dtype.
///
/// # Errors
/// Unsupported dtype, or `f`'s error.
pub fn map_elems(t: &Tensor, f: impl ElemFn) -> Result<Tensor> {
    let shape = t.dims().to_vec();
    match t.dtype() {
        DType::F32 => from_vec(crate::mem::with_slice(t, |x: &[f32]| f.call(x))??, &shape),
        DType::BF16 => from_vec(crate::mem::with_slice(t, |x: &[bf16]| f.call(x))??, &shape),
        DType::F16 => from_vec(crate::mem::with_slice(t, |x: &[f16]| f.call(x))??, &shape),
        d => Err(Error::Config {
            field: "dtype".into(),
            reason: format!("{d:?} cannot be reduced; f32, bf16 and f16 can"),
        }),
    }
}
