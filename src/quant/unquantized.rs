//! Dense weights in f32, bf16 or f16.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::{check_delta, GgmlLinear, IsqType, QuantMethod};
use crate::error::{Error, Result};

/// A dense linear layer.
#[derive(Debug, Clone)]
pub struct UnquantLinear {
    w: Tensor,
    b: Option<Tensor>,
}

impl UnquantLinear {
    /// Wraps a `[out, in]` weight and an optional `[out]` bias.
    ///
    /// # Errors
    /// The weight is not 2-D, not a float dtype, or the bias length is not `out`.
    pub fn new(w: Tensor, b: Option<Tensor>) -> Result<Self> {
        let bad = |reason: String| Error::Config {
            field: "linear weight".into(),
            reason,
        };
        if w.rank() != 2 {
            return Err(bad(format!("weight must be 2-D, got {:?}", w.dims())));
        }
        if !matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return Err(bad(format!("dtype {:?} is not f32/bf16/f16", w.dtype())));
        }
        if let Some(b) = &b {
            if b.dims() != [w.dim(0)?] {
                return Err(bad(format!(
                    "bias {:?} for weight {:?}",
                    b.dims(),
                    w.dims()
                )));
            }
        }
        Ok(Self { w, b })
    }

    /// The weight.
    pub fn weight(&self) -> &Tensor {
        &self.w
    }
}

impl QuantMethod for UnquantLinear {
    fn format(&self) -> String {
        format!("{:?}", self.w.dtype()).to_lowercase()
    }

    fn storage_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        bytes(&self.w) + self.b.as_ref().map_or(0, bytes)
    }

    fn persist_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![("weight".to_string(), self.w.clone())];
        if let Some(b) = &self.b {
            v.push(("bias".to_string(), b.clone()));
        }
        Ok(v)
    }

    fn shape(&self) -> (usize, usize) {
        let d = self.w.dims();
        (d[0], d[1])
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::dense_product(self.w.clone(), x, self.b.as_ref())
    }

    fn dequantize_w(&self) -> Result<Tensor> {
        Ok(self.w.to_dtype(DType::F32)?)
    }

    fn dtype_and_device(&self) -> (DType, Device) {
        (self.w.dtype(), self.w.device().clone())
    }

    fn bias(&self) -> Option<&Tensor> {
        self.b.as_ref()
    }

    fn dense_weight(&self) -> Option<&Tensor> {
        Some(&self.w)
    }

    fn apply_isq(&self, ty: IsqType, layer: &str) -> Result<Arc<dyn QuantMethod>> {
        let (out, inp) = self.shape();
        match super::isq::choose(ty, inp, layer, out) {
            Some(IsqType::Ggml(g)) => {
                Ok(Arc::new(GgmlLinear::quantize(&self.w, g, self.b.clone())?))
            }
            Some(IsqType::Fp8) => Ok(Arc::new(super::Fp8Linear::quantize(
                &self.w,
                super::fp8::ISQ_BLOCK,
                self.b.clone(),
            )?)),
            None => Ok(Arc::new(self.clone())),
        }
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn QuantMethod>> {
        Ok(Arc::new(Self {
            w: self.w.to_device(device)?,
            b: self.b.as_ref().map(|b| b.to_device(device)).transpose()?,
        }))
    }

    fn add_delta_w(&self, delta: &Tensor) -> Result<Arc<dyn QuantMethod>> {
        check_delta(self, delta)?;
        let w = (self.w.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?;
        Ok(Arc::new(Self::new(
            w.to_dtype(self.w.dtype())?,
            self.b.clone(),
        )?))
    }
}
