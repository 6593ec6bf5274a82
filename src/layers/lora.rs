//! LoRA adapters merged into the base weight at load: `W + scale * B @ A`.
//!
//! The delta is sharded with the weight's shard: a column shard (output rows) takes the same
//! rows of `B`; a row shard (input columns) takes the same columns of `A`. The merge then
//! happens in each rank's own storage format.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::shard::Shard;
use crate::weights::WeightSource;

/// One adapter for one linear weight.
#[derive(Debug, Clone)]
pub struct Lora {
    /// Where the adapter tensors live (usually a PEFT `adapter_model.safetensors`).
    pub source: Arc<dyn WeightSource>,
    /// Name of `A`, shape `[r, in]`.
    pub a: String,
    /// Name of `B`, shape `[out, r]`.
    pub b: String,
    /// `alpha / r`.
    pub scale: f64,
}

impl Lora {
    /// This rank's `scale * B @ A` for a weight of full shape `[out, in]` sharded by `shard`
    /// (dimension 0 = output rows, dimension 1 = input columns).
    ///
    /// # Errors
    /// Missing adapter tensors, shapes that do not fit the weight, or a shard on another dim.
    pub fn delta(&self, out: usize, inp: usize, shard: &Shard) -> Result<Tensor> {
        let src = self.source.as_ref();
        let a_meta = src.meta(&self.a)?;
        let r = *a_meta.shape.first().unwrap_or(&0);
        src.expect_shape(&self.a, &[r, inp])?;
        src.expect_shape(&self.b, &[out, r])?;
        let (b_shard, a_shard) = match shard.dim() {
            0 => (*shard, Shard::full()),
            1 => (Shard::full(), *shard),
            d => {
                return Err(Error::Config {
                    field: "lora".into(),
                    reason: format!("cannot shard a linear weight on dimension {d}"),
                })
            }
        };
        let a = src.read(&self.a, &a_shard, DType::F32)?;
        let b = src.read(&self.b, &b_shard, DType::F32)?;
        Ok((b.matmul(&a)? * self.scale)?)
    }
}

/// A PEFT-style adapter file: `{prefix}{layer}.lora_A.weight` / `lora_B.weight` per layer.
#[derive(Debug, Clone)]
pub struct LoraSet {
    /// The adapter weights.
    pub source: Arc<dyn WeightSource>,
    /// Prefix before the base model's tensor names (PEFT uses `base_model.model.`).
    pub prefix: String,
    /// `lora_alpha / r`.
    pub scale: f64,
}

impl LoraSet {
    /// The adapter for the linear layer `layer` (e.g. `model.layers.0.self_attn.q_proj`), if
    /// the file has one.
    pub fn for_layer(&self, layer: &str) -> Option<Lora> {
        let a = format!("{}{layer}.lora_A.weight", self.prefix);
        let b = format!("{}{layer}.lora_B.weight", self.prefix);
        (self.source.contains(&a) && self.source.contains(&b)).then(|| Lora {
            source: self.source.clone(),
            a,
            b,
            scale: self.scale,
        })
    }
}
