//! FP8 (E4M3) weights with one f32 scale per block of `[rows, cols]` elements: DeepSeek-style
//! blockwise checkpoints (`weight` + `weight_scale_inv`, e.g. 128x128 blocks), per-tensor
//! scales (one block covering the whole weight), and in-situ quantization to FP8.
//!
//! The real value of element `(r, c)` is `fp8[r, c] * scale[r / rows, c / cols]`. Products run
//! through the weight expanded to the activations' dtype (CPU has no FP8 GEMM); the stored
//! weight stays one byte per element.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::{check_delta, GgmlLinear, IsqType, QuantMethod};
use crate::error::{Error, Result};

/// Largest finite E4M3 value: block scales map each block's absolute maximum onto it.
pub const FP8_MAX: f32 = 448.0;

/// Block of the FP8 scales that in-situ quantization writes. 32x32 rather than DeepSeek-V3's
/// 128x128: shard boundaries already fall on 32-element steps for the GGML types wherever the
/// model allows, so every shard's blocks are blocks of the whole tensor and a quantized set
/// reloads at other world sizes; the scales cost 0.4% of the weight.
pub const ISQ_BLOCK: [usize; 2] = [32, 32];

/// A linear layer whose weight is F8E4M3 with block scales.
#[derive(Debug, Clone)]
pub struct Fp8Linear {
    w: Tensor,
    scale: Tensor,
    block: [usize; 2],
    per_tensor: bool,
    b: Option<Tensor>,
    dtype: DType,
}

fn bad(reason: String) -> Error {
    Error::Config {
        field: "fp8 weight".into(),
        reason,
    }
}

/// Number of blocks of `block` covering `n` elements.
pub fn blocks_of(n: usize, block: usize) -> usize {
    n.div_ceil(block.max(1))
}

impl Fp8Linear {
    /// Wraps an F8E4M3 `[out, in]` weight, its f32 scales `[ceil(out / block[0]),
    /// ceil(in / block[1])]`, an optional bias, and the dtype products run in.
    ///
    /// # Errors
    /// Wrong dtypes or shapes (the message gives the expected ones).
    pub fn new(
        w: Tensor,
        scale: Tensor,
        block: [usize; 2],
        b: Option<Tensor>,
        dtype: DType,
    ) -> Result<Self> {
        if w.dtype() != DType::F8E4M3 || w.rank() != 2 {
            return Err(bad(format!(
                "weight must be a 2-D f8e4m3 tensor, got {:?} {:?}",
                w.dtype(),
                w.dims()
            )));
        }
        if block[0] == 0 || block[1] == 0 {
            return Err(bad(format!("block {block:?} has a zero side")));
        }
        let (out, inp) = (w.dim(0)?, w.dim(1)?);
        let want = [blocks_of(out, block[0]), blocks_of(inp, block[1])];
        let scale = scale.to_dtype(DType::F32)?;
        let scale = if scale.elem_count() == 1 && want == [1, 1] {
            scale.reshape((1, 1))?
        } else {
            scale
        };
        if scale.dims() != want {
            return Err(bad(format!(
                "scales {:?} do not cover weight [{out}, {inp}] in blocks of {block:?} \
                 (expected {want:?})",
                scale.dims()
            )));
        }
        if let Some(b) = &b {
            if b.dims() != [out] {
                return Err(bad(format!(
                    "bias {:?} for weight [{out}, {inp}]",
                    b.dims()
                )));
            }
        }
        Ok(Self {
            w,
            scale,
            block,
            per_tensor: false,
            b,
            dtype,
        })
    }

    /// Wraps an F8E4M3 `[out, in]` weight with one scale for all of it.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn per_tensor(w: Tensor, scale: Tensor, b: Option<Tensor>, dtype: DType) -> Result<Self> {
        let dims = w.dims().to_vec();
        let block = [
            dims.first().copied().unwrap_or(1).max(1),
            dims.get(1).copied().unwrap_or(1).max(1),
        ];
        let mut l = Self::new(w, scale, block, b, dtype)?;
        l.per_tensor = true;
        Ok(l)
    }

    /// Quantizes a dense `[out, in]` weight: per block, `scale = amax / 448` (1 for an all-zero
    /// block) and `fp8 = round(w / scale)`.
    ///
    /// # Errors
    /// Kernel errors.
    pub fn quantize(w: &Tensor, block: [usize; 2], b: Option<Tensor>) -> Result<Self> {
        let dtype = w.dtype();
        let (out, inp) = w.dims2()?;
        let (br, bc) = (block[0], block[1]);
        let (nr, nc) = (blocks_of(out, br), blocks_of(inp, bc));
        let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut amax = vec![0f32; nr * nc];
        for r in 0..out {
            for c in 0..inp {
                let k = (r / br) * nc + c / bc;
                amax[k] = amax[k].max(v[r * inp + c].abs());
            }
        }
        let scale: Vec<f32> = amax
            .iter()
            .map(|&a| if a > 0.0 { a / FP8_MAX } else { 1.0 })
            .collect();
        let q: Vec<float8::F8E4M3> = (0..out * inp)
            .map(|i| {
                let (r, c) = (i / inp, i % inp);
                let s = scale[(r / br) * nc + c / bc];
                float8::F8E4M3::from_f32((v[i] / s).clamp(-FP8_MAX, FP8_MAX))
            })
            .collect();
        let dev = w.device();
        Self::new(
            Tensor::from_vec(q, (out, inp), dev)?,
            Tensor::from_vec(scale, (nr, nc), dev)?,
            block,
            b,
            dtype,
        )
    }

    /// Scale block `[rows, cols]`.
    pub fn block(&self) -> [usize; 2] {
        self.block
    }

    /// The block scales `[ceil(out / rows), ceil(in / cols)]` (f32).
    pub fn scales(&self) -> &Tensor {
        &self.scale
    }

    fn expanded(&self, dtype: DType) -> Result<Tensor> {
        let (out, inp) = self.w.dims2()?;
        let (nr, nc) = self.scale.dims2()?;
        let [br, bc] = self.block;
        let s = self
            .scale
            .reshape((nr, 1, nc, 1))?
            .broadcast_as((nr, br.min(out), nc, bc.min(inp)))?
            .reshape((nr * br.min(out), nc * bc.min(inp)))?
            .narrow(0, 0, out)?
            .narrow(1, 0, inp)?;
        Ok((self.w.to_dtype(DType::F32)? * s)?.to_dtype(dtype)?)
    }
}

impl QuantMethod for Fp8Linear {
    fn format(&self) -> String {
        "fp8".into()
    }

    fn shape(&self) -> (usize, usize) {
        let d = self.w.dims();
        (d[0], d[1])
    }

    fn storage_bytes(&self) -> usize {
        self.w.elem_count()
            + 4 * self.scale.elem_count()
            + self.b.as_ref().map_or(0, |b| 4 * b.elem_count())
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::dense_product(self.expanded(self.dtype)?, x, self.b.as_ref())
    }

    fn dequantize_w(&self) -> Result<Tensor> {
        self.expanded(DType::F32)
    }

    fn dtype_and_device(&self) -> (DType, Device) {
        (self.dtype, self.w.device().clone())
    }

    fn bias(&self) -> Option<&Tensor> {
        self.b.as_ref()
    }

    fn apply_isq(&self, ty: IsqType, layer: &str) -> Result<Arc<dyn QuantMethod>> {
        let (out, inp) = self.shape();
        match super::isq::choose(ty, inp, layer, out) {
            Some(IsqType::Fp8) | None => Ok(Arc::new(self.clone())),
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
        let mut q = Self::quantize(&w, self.block, self.b.clone())?;
        q.dtype = self.dtype;
        q.per_tensor = self.per_tensor;
        Ok(Arc::new(q))
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn QuantMethod>> {
        Ok(Arc::new(Self {
            w: self.w.to_device(device)?,
            scale: self.scale.to_device(device)?,
            b: self.b.as_ref().map(|b| b.to_device(device)).transpose()?,
            ..self.clone()
        }))
    }

    fn scale_block(&self) -> Option<[usize; 2]> {
        (!self.per_tensor).then_some(self.block)
    }

    fn persist_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![
            ("weight.fp8".to_string(), self.w.clone()),
            ("weight_scale_inv".to_string(), self.scale.clone()),
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
    fn quantize_round_trips_within_fp8_precision() {
        // Ragged blocks on both sides (70 = 2 * 32 + 6, 45 = 32 + 13).
        let w = Tensor::randn(0f32, 1.0, (70, 45), &Device::Cpu).unwrap();
        let q = Fp8Linear::quantize(&w, [32, 32], None).unwrap();
        assert_eq!(q.scales().dims(), [3, 2]);
        let d = q.dequantize_w().unwrap();
        let (wv, dv) = (
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            d.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let sv = q.scales().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (a, b)) in wv.iter().zip(&dv).enumerate() {
            let (r, c) = (i / 45, i % 45);
            let s = sv[(r / 32) * 2 + c / 32];
            // E4M3 keeps 3 mantissa bits: relative error <= 2^-4, absolute <= half the
            // smallest subnormal step (2^-10 before scaling) near zero.
            let tol = a.abs() / 16.0 + s * 2f32.powi(-10);
            assert!((a - b).abs() <= tol, "{i}: {a} vs {b} (tol {tol})");
        }
    }

    #[test]
    fn per_tensor_scale_is_one_block() {
        let w = Tensor::randn(0f32, 1.0, (8, 12), &Device::Cpu).unwrap();
        let q = Fp8Linear::quantize(&w, [8, 12], None).unwrap();
        let again = Fp8Linear::per_tensor(
            q.w.clone(),
            q.scales().flatten_all().unwrap().squeeze(0).unwrap(),
            None,
            DType::F32,
        )
        .unwrap();
        assert_eq!(again.scale_block(), None);
        assert_eq!(q.scale_block(), Some([8, 12]));
        let a = q
            .dequantize_w()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = again
            .dequantize_w()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        assert!(
            Fp8Linear::new(q.w.clone(), q.scale.clone(), [4, 12], None, DType::F32)
                .unwrap_err()
                .to_string()
                .contains("expected [2, 1]")
        );
    }
}
