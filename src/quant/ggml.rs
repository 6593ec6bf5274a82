//! GGML block-quantized weights (Q4_0 … Q8K) through candle's `QTensor` / `QMatMul`.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::{add_bias, check_delta, IsqType, QuantMethod};
use crate::error::{Error, Result};

/// Rows of activations from which a product goes through a dequantized f32 GEMM.
pub const DEQUANT_ROWS: usize = 32;

/// A linear layer whose weight is a GGML-quantized `[out, in]` tensor.
#[derive(Debug, Clone)]
pub struct GgmlLinear {
    w: Arc<QTensor>,
    mm: Arc<QMatMul>,
    b: Option<Tensor>,
}

impl GgmlLinear {
    /// Wraps a quantized `[out, in]` tensor and an optional f32 bias.
    ///
    /// # Errors
    /// The tensor is not 2-D or the bias length is not `out`.
    pub fn new(w: QTensor, b: Option<Tensor>) -> Result<Self> {
        let dims = w.shape().dims().to_vec();
        if dims.len() != 2 {
            return Err(Error::Config {
                field: "quantized weight".into(),
                reason: format!("must be 2-D, got {dims:?}"),
            });
        }
        if let Some(b) = &b {
            if b.dims() != [dims[0]] {
                return Err(Error::Config {
                    field: "quantized weight bias".into(),
                    reason: format!("bias {:?} for weight {dims:?}", b.dims()),
                });
            }
        }
        let w = Arc::new(w);
        let mm = Arc::new(QMatMul::from_arc(w.clone())?);
        Ok(Self { w, mm, b })
    }

    /// Quantizes a dense `[out, in]` weight to `ty`; `in` must be a multiple of its block.
    ///
    /// # Errors
    /// A shape the block size does not divide, or a kernel error.
    pub fn quantize(w: &Tensor, ty: GgmlDType, b: Option<Tensor>) -> Result<Self> {
        let w32 = w.to_dtype(DType::F32)?;
        Self::new(QTensor::quantize(&w32, ty)?, b)
    }

    /// The GGML block type.
    pub fn ggml_dtype(&self) -> GgmlDType {
        self.w.dtype()
    }

    /// The quantized weight.
    pub fn qtensor(&self) -> &Arc<QTensor> {
        &self.w
    }
}

impl QuantMethod for GgmlLinear {
    fn format(&self) -> String {
        format!("{:?}", self.w.dtype()).to_lowercase()
    }

    fn storage_bytes(&self) -> usize {
        self.w.storage_size_in_bytes()
            + self
                .b
                .as_ref()
                .map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }

    /// The same blocks on `device` (candle's quantized kernels run them there: its matrix-
    /// vector product for decode, dequantize-then-GEMM for prefill).
    fn to_device(&self, device: &Device) -> Result<Arc<dyn QuantMethod>> {
        let storage =
            candle_core::quantized::QStorage::from_data(self.w.data()?, device, self.w.dtype())?;
        let w = QTensor::new(storage, self.w.shape().clone())?;
        let b = self.b.as_ref().map(|b| b.to_device(device)).transpose()?;
        Ok(Arc::new(Self::new(w, b)?))
    }

    /// The raw GGML blocks as a `u8` tensor (`weight.ggml`; the type is [`Self::format`]) and
    /// the bias.
    fn persist_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let data = self.w.data()?.into_owned();
        let n = data.len();
        let mut v = vec![(
            "weight.ggml".to_string(),
            Tensor::from_vec(data, n, &candle_core::Device::Cpu)?,
        )];
        if let Some(b) = &self.b {
            v.push(("bias".to_string(), b.clone()));
        }
        Ok(v)
    }

    fn shape(&self) -> (usize, usize) {
        let d = self.w.shape().dims();
        (d[0], d[1])
    }

    /// Up to [`DEQUANT_ROWS`] rows (decode, short prompts): candle's quantized kernel, which
    /// quantizes the activations per block. From there on (prefill): the weight is expanded
    /// to f32 once and multiplied by a blocked f32 GEMM, which is several times faster for
    /// many rows than one block dot product per (row, column) and exact in the activations.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_dtype = x.dtype();
        let (out, inp) = self.shape();
        let rows = x.elem_count() / inp.max(1);
        let x32 = x.to_dtype(DType::F32)?;
        let y = if rows >= DEQUANT_ROWS {
            let mut dims = x.dims().to_vec();
            let w = self.w.dequantize(&self.w.device())?;
            let y = x32.reshape((rows, inp))?.matmul(&w.t()?)?;
            if let Some(last) = dims.last_mut() {
                *last = out;
            }
            y.reshape(dims)?
        } else {
            self.mm.forward(&x32)?
        };
        add_bias(y.to_dtype(in_dtype)?, self.b.as_ref())
    }

    fn dequantize_w(&self) -> Result<Tensor> {
        Ok(self.w.dequantize(&self.w.device())?)
    }

    fn dtype_and_device(&self) -> (DType, Device) {
        (DType::F32, self.w.device())
    }

    fn bias(&self) -> Option<&Tensor> {
        self.b.as_ref()
    }

    /// Requantizes (dequantize, then quantize to the new type), as `llama-quantize
    /// --allow-requantize` does; the error of both types adds up.
    fn apply_isq(&self, ty: IsqType, layer: &str) -> Result<Arc<dyn QuantMethod>> {
        let (out, inp) = self.shape();
        match super::isq::choose(ty, inp, layer, out) {
            Some(IsqType::Ggml(g)) if g == self.w.dtype() => Ok(Arc::new(self.clone())),
            Some(IsqType::Ggml(g)) => Ok(Arc::new(Self::quantize(
                &self.dequantize_w()?,
                g,
                self.b.clone(),
            )?)),
            Some(IsqType::Fp8) => Ok(Arc::new(super::Fp8Linear::quantize(
                &self.dequantize_w()?,
                super::fp8::ISQ_BLOCK,
                self.b.clone(),
            )?)),
            None => Ok(Arc::new(self.clone())),
        }
    }

    fn add_delta_w(&self, delta: &Tensor) -> Result<Arc<dyn QuantMethod>> {
        check_delta(self, delta)?;
        let w = (self.dequantize_w()? + delta.to_dtype(DType::F32)?)?;
        Ok(Arc::new(Self::quantize(
            &w,
            self.w.dtype(),
            self.b.clone(),
        )?))
    }
}
