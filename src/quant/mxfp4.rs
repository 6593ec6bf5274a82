//! MXFP4 weights (OCP microscaling, the gpt-oss checkpoint layout): blocks of 32 values along
//! the input dimension, each an E2M1 4-bit code, sharing one E8M0 scale byte.
//!
//! Storage per `[out, in]` weight: `blocks` u8 `[out, in / 32, 16]` (two codes per byte, the
//! even element in the low nibble) and `scales` u8 `[out, in / 32]`; element value
//! `E2M1[code] * 2^(scale - 127)`. Products run through the weight expanded to the activations'
//! dtype.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::{check_delta, GgmlLinear, IsqType, QuantMethod};
use crate::error::{Error, Result};

/// Values per MXFP4 block (one scale each).
pub const MXFP4_BLOCK: usize = 32;

/// The 16 E2M1 values by code (sign in bit 3).
pub const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// A linear layer whose weight is MXFP4.
#[derive(Debug, Clone)]
pub struct Mxfp4Linear {
    blocks: Tensor,
    scales: Tensor,
    b: Option<Tensor>,
    dtype: DType,
}

fn bad(reason: String) -> Error {
    Error::Config {
        field: "mxfp4 weight".into(),
        reason,
    }
}

/// Expands MXFP4 `blocks` (`[rows * nb * 16]` bytes) and `scales` (`[rows * nb]`) to f32
/// values, row-major `[rows, nb * 32]`.
pub fn dequantize(blocks: &[u8], scales: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(blocks.len() * 2);
    for (blk, &e) in blocks.chunks_exact(MXFP4_BLOCK / 2).zip(scales) {
        let s = 2f32.powi(i32::from(e) - 127);
        for &byte in blk {
            out.push(E2M1[usize::from(byte & 0x0f)] * s);
            out.push(E2M1[usize::from(byte >> 4)] * s);
        }
    }
    out
}

/// The E2M1 code nearest to `x` (already divided by its block scale), ties to the even code;
/// saturates at ±6.
fn nearest_code(x: f32) -> u8 {
    let mag = x.abs();
    let mut best = 0u8;
    for code in 1..8u8 {
        let d = (E2M1[usize::from(code)] - mag).abs();
        let db = (E2M1[usize::from(best)] - mag).abs();
        if d < db || (d == db && code % 2 == 0) {
            best = code;
        }
    }
    if x.is_sign_negative() && best != 0 {
        best | 8
    } else {
        best
    }
}

impl Mxfp4Linear {
    /// Wraps `blocks` u8 `[out, in / 32, 16]`, `scales` u8 `[out, in / 32]`, an optional bias
    /// and the dtype products run in.
    ///
    /// # Errors
    /// Wrong dtypes or shapes.
    pub fn new(blocks: Tensor, scales: Tensor, b: Option<Tensor>, dtype: DType) -> Result<Self> {
        if blocks.dtype() != DType::U8 || scales.dtype() != DType::U8 {
            return Err(bad(format!(
                "blocks and scales must be u8, got {:?} and {:?}",
                blocks.dtype(),
                scales.dtype()
            )));
        }
        let bd = blocks.dims();
        if bd.len() != 3 || bd[2] != MXFP4_BLOCK / 2 || scales.dims() != [bd[0], bd[1]] {
            return Err(bad(format!(
                "blocks {bd:?} and scales {:?} are not [out, in/32, 16] and [out, in/32]",
                scales.dims()
            )));
        }
        if let Some(b) = &b {
            if b.dims() != [bd[0]] {
                return Err(bad(format!("bias {:?} for {} rows", b.dims(), bd[0])));
            }
        }
        Ok(Self {
            blocks,
            scales,
            b,
            dtype,
        })
    }

    /// Quantizes a dense `[out, in]` weight (`in` a multiple of 32): per block the scale
    /// exponent is `floor(log2(amax)) - 2` (so the largest value lands in `[4, 8)`, E2M1's top
    /// binade), and each value takes the nearest code.
    ///
    /// # Errors
    /// `in` not a multiple of 32, kernel errors.
    pub fn quantize(w: &Tensor, b: Option<Tensor>) -> Result<Self> {
        let dtype = w.dtype();
        let (out, inp) = w.dims2()?;
        if inp % MXFP4_BLOCK != 0 {
            return Err(bad(format!(
                "{inp} input columns are not a multiple of {MXFP4_BLOCK}"
            )));
        }
        let nb = inp / MXFP4_BLOCK;
        let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut blocks = Vec::with_capacity(out * inp / 2);
        let mut scales = Vec::with_capacity(out * nb);
        for blk in v.chunks_exact(MXFP4_BLOCK) {
            let amax = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
            let e = if amax > 0.0 {
                (amax.log2().floor() as i32 - 2).clamp(-127, 127)
            } else {
                -127
            };
            scales.push((e + 127) as u8);
            let inv = 2f32.powi(-e);
            for pair in blk.chunks_exact(2) {
                blocks.push(nearest_code(pair[0] * inv) | (nearest_code(pair[1] * inv) << 4));
            }
        }
        let dev = w.device();
        Self::new(
            Tensor::from_vec(blocks, (out, nb, MXFP4_BLOCK / 2), dev)?,
            Tensor::from_vec(scales, (out, nb), dev)?,
            b,
            dtype,
        )
    }

    fn expanded(&self, dtype: DType) -> Result<Tensor> {
        let (out, inp) = self.shape();
        let blocks = self.blocks.flatten_all()?.to_vec1::<u8>()?;
        let scales = self.scales.flatten_all()?.to_vec1::<u8>()?;
        let v = dequantize(&blocks, &scales);
        Ok(Tensor::from_vec(v, (out, inp), self.blocks.device())?.to_dtype(dtype)?)
    }
}

impl QuantMethod for Mxfp4Linear {
    fn format(&self) -> String {
        "mxfp4".into()
    }

    fn shape(&self) -> (usize, usize) {
        let d = self.blocks.dims();
        (d[0], d[1] * MXFP4_BLOCK)
    }

    fn storage_bytes(&self) -> usize {
        self.blocks.elem_count()
            + self.scales.elem_count()
            + self.b.as_ref().map_or(0, |b| 4 * b.elem_count())
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::dense_product(self.expanded(self.dtype)?, x, self.b.as_ref())
    }

    fn dequantize_w(&self) -> Result<Tensor> {
        self.expanded(DType::F32)
    }

    fn dtype_and_device(&self) -> (DType, Device) {
        (self.dtype, self.blocks.device().clone())
    }

    fn bias(&self) -> Option<&Tensor> {
        self.b.as_ref()
    }

    fn apply_isq(&self, ty: IsqType, layer: &str) -> Result<Arc<dyn QuantMethod>> {
        let (out, inp) = self.shape();
        match super::isq::choose(ty, inp, layer, out) {
            None => Ok(Arc::new(self.clone())),
            Some(IsqType::Fp8) => Ok(Arc::new(super::Fp8Linear::quantize(
                &self.dequantize_w()?.to_dtype(self.dtype)?,
                super::fp8::ISQ_BLOCK,
                self.b.clone(),
            )?)),
            Some(IsqType::Ggml(g)) => Ok(Arc::new(GgmlLinear::quantize(
                &self.dequantize_w()?,
                g,
                self.b.clone(),
            )?)),
        }
    }

    fn add_delta_w(&self, delta: &Tensor) -> Result<Arc<dyn QuantMethod>> {
        check_delta(self, delta)?;
        let w = (self.dequantize_w()? + delta.to_dtype(DType::F32)?)?;
        let mut q = Self::quantize(&w, self.b.clone())?;
        q.dtype = self.dtype;
        Ok(Arc::new(q))
    }

    fn persist_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![
            ("weight_blocks".to_string(), self.blocks.clone()),
            ("weight_scales".to_string(), self.scales.clone()),
        ];
        if let Some(b) = &self.b {
            v.push(("bias".to_string(), b.clone()));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_scales_follow_the_format() {
        // One block: 0.75 * 2^-3 .. ; amax 6 * 2^-1 = 3 -> exponent floor(log2 3) - 2 = -1.
        let mut row = vec![0f32; 32];
        row[0] = 3.0;
        row[1] = -0.25;
        row[2] = 1.1; // 2.2 in units of 0.5 -> nearest code 2.0
        let w = Tensor::from_vec(row, (1, 32), &Device::Cpu).unwrap();
        let q = Mxfp4Linear::quantize(&w, None).unwrap();
        let scales = q.scales.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(scales, [126]);
        let blocks = q.blocks.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        // element 0: 3.0 / 0.5 = 6 -> code 7 (low nibble); element 1: -0.5 -> code 9 (high).
        assert_eq!(blocks[0], 7 | (9 << 4));
        let d = q
            .dequantize_w()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(&d[..3], &[3.0, -0.25, 1.0]);
    }
}
