//! Synthetic checkpoints for benchmarks: `--model synthetic:<preset>` loads a model of a
//! known shape whose weights are made on the fly, so an 8B-shaped model needs no 16 GB file.
//!
//! Every linear and embedding tensor is pseudo-random, normal with standard deviation 0.02
//! (a 64 Ki-value seeded table, tiled from an offset that depends on the tensor's name); norm
//! weights are ones. Values do not change the speed of dense kernels, and the model computes
//! finite logits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use super::{check_target, FileDType, TensorMeta, WeightSource};
use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig, RopeScaling};
use crate::shard::Shard;

/// Prefix of a synthetic model path.
pub const PREFIX: &str = "synthetic:";

const TABLE: usize = 1 << 16;

/// The presets: `llama3-8b` (32 layers, hidden 4096, 32 / 8 heads of width 128, intermediate
/// 14336, vocab 128256); `llama3-8b-half`, one rank's share of it at two ranks (16 / 4 heads,
/// intermediate 7168, vocab 64128: every product of a two-rank step, to time them on one
/// rank, without collectives); and `tiny` (2 layers, hidden 64; for tests).
pub fn preset(name: &str) -> Result<ModelConfig> {
    let (hidden, inter, layers, heads, kv, head_dim, vocab) = match name {
        "llama3-8b" => (4096, 14336, 32, 32, 8, 128, 128_256),
        "llama3-8b-half" => (4096, 7168, 32, 16, 4, 128, 64_128),
        "tiny" => (64, 96, 2, 4, 2, 16, 256),
        other => {
            return Err(Error::Config {
                field: "model".into(),
                reason: format!(
                    "unknown synthetic model `{other}` (presets: llama3-8b, llama3-8b-half, tiny)"
                ),
            })
        }
    };
    Ok(ModelConfig {
        arch: Arch::Llama,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        qk_norm: false,
        sliding_window: None,
        rope_interleaved: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        moe: None,
    })
}

/// The tensors of a synthetic model.
#[derive(Debug)]
pub struct SyntheticSource {
    label: PathBuf,
    shapes: BTreeMap<String, Vec<usize>>,
    table: Vec<f32>,
    copied: AtomicU64,
}

impl SyntheticSource {
    /// The weights of `cfg` (a llama-family model without biases).
    pub fn new(label: &str, cfg: &ModelConfig) -> Self {
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (q, kv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let mut shapes = BTreeMap::new();
        shapes.insert("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h]);
        shapes.insert("lm_head.weight".into(), vec![cfg.vocab_size, h]);
        shapes.insert("model.norm.weight".into(), vec![h]);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            for (n, s) in [
                ("input_layernorm", vec![h]),
                ("post_attention_layernorm", vec![h]),
                ("self_attn.q_proj", vec![q, h]),
                ("self_attn.k_proj", vec![kv, h]),
                ("self_attn.v_proj", vec![kv, h]),
                ("self_attn.o_proj", vec![h, q]),
                ("mlp.gate_proj", vec![i, h]),
                ("mlp.up_proj", vec![i, h]),
                ("mlp.down_proj", vec![h, i]),
            ] {
                shapes.insert(format!("{p}.{n}.weight"), s);
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let normal = rand_distr::Normal::new(0f32, 0.02).unwrap_or_else(|_| unreachable!());
        let table = (0..TABLE).map(|_| normal.sample(&mut rng)).collect();
        Self {
            label: PathBuf::from(label),
            shapes,
            table,
            copied: AtomicU64::new(0),
        }
    }
}

impl WeightSource for SyntheticSource {
    fn location(&self) -> &Path {
        &self.label
    }

    fn names(&self) -> Vec<String> {
        self.shapes.keys().cloned().collect()
    }

    fn meta(&self, name: &str) -> Result<TensorMeta> {
        let shape = self.shapes.get(name).ok_or_else(|| Error::MissingTensor {
            file: self.label.clone(),
            tensor: name.to_string(),
        })?;
        Ok(TensorMeta {
            shape: shape.clone(),
            dtype: FileDType::Dense(DType::F32),
            file: self.label.clone(),
        })
    }

    fn read(&self, name: &str, shard: &Shard, dtype: DType) -> Result<Tensor> {
        let meta = self.meta(name)?;
        check_target(&self.label, name, meta.dtype, dtype)?;
        let shape = shard.sharded_shape(&meta.shape)?;
        let n: usize = shape.iter().product();
        self.copied
            .fetch_add((n * dtype.size_in_bytes()) as u64, Ordering::Relaxed);
        if name.ends_with("norm.weight") {
            return Ok(Tensor::ones(shape, dtype, &Device::Cpu)?);
        }
        let start = name.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        }) % TABLE;
        let v: Vec<f32> = (0..n).map(|k| self.table[(start + k) % TABLE]).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
    }

    fn bytes_copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::{plan_heads, plan_split, SplitSpec};

    /// `llama3-8b-half` has the shapes that the split planner gives rank 0 of `llama3-8b` at
    /// two ranks (query and KV heads, intermediate, vocabulary), with the same head width,
    /// hidden size and depth.
    #[test]
    fn half_preset_is_one_rank_of_two() {
        let full = preset("llama3-8b").expect("llama3-8b");
        let half = preset("llama3-8b-half").expect("llama3-8b-half");
        let heads = plan_heads(full.num_heads, full.num_kv_heads, full.head_dim, 2, 1)
            .expect("heads over two ranks");
        assert_eq!(half.num_heads, heads[0].q_heads.len());
        assert_eq!(half.num_kv_heads, heads[0].kv_heads.len());
        let first = |name: &str, units: usize| {
            let spec = SplitSpec {
                name,
                units,
                unit_elems: 1,
                align: 1,
            };
            plan_split(&spec, 2).expect("split over two ranks")[0].len()
        };
        assert_eq!(
            half.intermediate_size,
            first("intermediate_size", full.intermediate_size)
        );
        assert_eq!(half.vocab_size, first("vocab_size", full.vocab_size));
        assert_eq!(
            (half.head_dim, half.hidden_size, half.num_layers),
            (full.head_dim, full.hidden_size, full.num_layers)
        );
    }
}
