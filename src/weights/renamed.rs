//! A source seen through another naming convention: GGUF files (`blk.0.attn_q.weight`) served
//! under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`), so the layers load
//! every checkpoint through one set of names.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor};

use super::{TensorMeta, WeightSource};
use crate::error::{Error, Result};
use crate::shard::Shard;

/// `inner` with every tensor renamed by a mapping from its own names to the served ones.
#[derive(Debug)]
pub struct RenamedSource {
    inner: Box<dyn WeightSource>,
    /// Served name -> inner name.
    map: BTreeMap<String, String>,
}

impl RenamedSource {
    /// Serves each tensor of `inner` under `rename(name)`; tensors it maps to `None` are
    /// hidden.
    pub fn new(inner: Box<dyn WeightSource>, rename: impl Fn(&str) -> Option<String>) -> Self {
        let map = inner
            .names()
            .into_iter()
            .filter_map(|n| rename(&n).map(|served| (served, n)))
            .collect();
        Self { inner, map }
    }

    /// Serves a GGUF file's llama-family tensors under Hugging Face names.
    pub fn gguf_as_hf(inner: Box<dyn WeightSource>) -> Self {
        Self::new(inner, gguf_to_hf)
    }

    /// The wrapped source.
    pub fn inner(&self) -> &dyn WeightSource {
        self.inner.as_ref()
    }

    fn inner_name(&self, name: &str) -> Result<&str> {
        self.map
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| Error::MissingTensor {
                file: self.inner.location().to_path_buf(),
                tensor: name.to_string(),
            })
    }
}

/// The Hugging Face name of a llama-family GGUF tensor (`None` for tensors the decoder does
/// not use, such as `rope_freqs.weight`).
pub fn gguf_to_hf(name: &str) -> Option<String> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = rest.rsplit_once('.')?;
    let hf = match base {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

impl WeightSource for RenamedSource {
    fn location(&self) -> &Path {
        self.inner.location()
    }

    fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }

    fn meta(&self, name: &str) -> Result<TensorMeta> {
        self.inner.meta(self.inner_name(name)?)
    }

    fn read(&self, name: &str, shard: &Shard, dtype: DType) -> Result<Tensor> {
        self.inner.read(self.inner_name(name)?, shard, dtype)
    }

    fn read_quantized(&self, name: &str, shard: &Shard) -> Result<Option<QTensor>> {
        self.inner.read_quantized(self.inner_name(name)?, shard)
    }

    fn bytes_copied(&self) -> u64 {
        self.inner.bytes_copied()
    }

    fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::gguf_to_hf;

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(
            gguf_to_hf("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            gguf_to_hf("blk.0.attn_k.bias").as_deref(),
            Some("model.layers.0.self_attn.k_proj.bias")
        );
        assert_eq!(
            gguf_to_hf("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(gguf_to_hf("rope_freqs.weight"), None);
        assert_eq!(gguf_to_hf("blk.x.attn_q.weight"), None);
    }
}
