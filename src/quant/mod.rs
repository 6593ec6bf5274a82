//! How a linear layer's weight is stored and multiplied.
//!
//! [`QuantMethod`] is the one interface; each storage format is one file: [`unquantized`]
//! (f32/bf16/f16) and [`ggml`] (every GGML block type, via candle's `QTensor`). [`isq`] picks
//! the quantization type a shard can actually take (block alignment fallback).

pub mod ggml;
pub mod isq;
pub mod unquantized;

use std::fmt::Debug;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

pub use ggml::GgmlLinear;
pub use isq::IsqType;
pub use unquantized::UnquantLinear;

/// A linear layer's weight `W` (`[out, in]`) and optional bias, in some storage format.
///
/// Layers are immutable: transformations (`apply_isq`, `add_delta_w`) return a new layer.
pub trait QuantMethod: Send + Sync + Debug {
    /// Short name of the storage format (`f32`, `bf16`, `q4k`, ...).
    fn format(&self) -> String;

    /// `(out, in)` of the weight this rank holds.
    fn shape(&self) -> (usize, usize);

    /// Bytes of memory the weight and bias occupy.
    fn storage_bytes(&self) -> usize;

    /// `x @ W^T (+ bias)`; `x` is `[.., in]`, the result `[.., out]` in `x`'s dtype.
    ///
    /// # Errors
    /// Shape mismatch or a kernel error.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// The weight as a dense f32 tensor `[out, in]`.
    ///
    /// # Errors
    /// A kernel error.
    fn dequantize_w(&self) -> Result<Tensor>;

    /// Dtype of the activations this layer computes in, and the device holding it.
    fn dtype_and_device(&self) -> (DType, Device);

    /// True when this layer adds a bias in [`QuantMethod::forward`].
    fn has_bias(&self) -> bool {
        self.bias().is_some()
    }

    /// The bias held by this layer, if any.
    fn bias(&self) -> Option<&Tensor>;

    /// Quantizes the layer in place of itself to `ty` (or the nearest type the shard's block
    /// alignment allows; see [`isq::choose`]). `layer` names it in warnings.
    ///
    /// # Errors
    /// A kernel error, or [`Error::Unsupported`] for formats that cannot be requantized.
    fn apply_isq(&self, ty: IsqType, layer: &str) -> Result<Arc<dyn QuantMethod>> {
        let _ = (ty, layer);
        Err(Error::Unsupported {
            what: "in-situ quantization".into(),
            by: self.format(),
        })
    }

    /// Returns the layer with `W + delta` as its weight (LoRA merge). `delta` is `[out, in]`.
    ///
    /// # Errors
    /// Shape mismatch or a kernel error.
    fn add_delta_w(&self, delta: &Tensor) -> Result<Arc<dyn QuantMethod>>;

    /// Named tensors that persist this layer (the UQFF file writer stores them).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for formats without a persistent form yet.
    fn persist_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Err(Error::Unsupported {
            what: "serialization".into(),
            by: self.format(),
        })
    }
}

/// Checks that `delta` matches the layer's weight shape.
pub(crate) fn check_delta(layer: &dyn QuantMethod, delta: &Tensor) -> Result<()> {
    let (o, i) = layer.shape();
    if delta.dims() != [o, i] {
        return Err(Error::Config {
            field: "lora delta".into(),
            reason: format!("shape {:?} does not match weight [{o}, {i}]", delta.dims()),
        });
    }
    Ok(())
}

/// Adds the bias (if any) to a matmul output.
pub(crate) fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
        None => y,
    })
}

/// How a checkpoint's linear weights are stored, and so how they are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantConfig {
    /// Dense weights, converted to `dtype` on load.
    Unquantized {
        /// Compute dtype (f32, bf16 or f16).
        dtype: DType,
    },
    /// GGML block-quantized weights (GGUF): kept quantized where the shard falls on block
    /// boundaries, dequantized to f32 where it does not.
    Ggml,
}
