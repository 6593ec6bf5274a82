//! Model configuration: one [`ModelConfig`] read from a Hugging Face `config.json`
//! (transformers 4.x and 5.x key spellings) or from GGUF metadata.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::Value as Json;

use crate::error::{Error, Result};

/// Decoder families the graph supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, SmolLM2 and other `LlamaForCausalLM` checkpoints.
    Llama,
    /// Mistral (Llama graph plus an optional sliding window).
    Mistral,
    /// Qwen2: bias on q/k/v.
    Qwen2,
    /// Qwen3: RMSNorm on each query and key head.
    Qwen3,
    /// Qwen3-MoE: Qwen3 attention, sparse MoE feed-forward (`mlp.gate`, `mlp.experts`).
    Qwen3Moe,
    /// Mixtral: Mistral attention, sparse MoE feed-forward (`block_sparse_moe`).
    Mixtral,
}

impl Arch {
    /// Parses an HF `model_type` / GGUF `general.architecture` value.
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "qwen3_moe" => Self::Qwen3Moe,
            "mixtral" => Self::Mixtral,
            _ => return None,
        })
    }

    /// Lower-case name, as in `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Qwen3Moe => "qwen3_moe",
            Self::Mixtral => "mixtral",
        }
    }
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Scale factor.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position: f64,
    },
    /// YaRN.
    Yarn {
        /// Scale factor.
        factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position: f64,
        /// `beta_fast` (32 when absent).
        beta_fast: f64,
        /// `beta_slow` (1 when absent).
        beta_slow: f64,
        /// Multiplier on cos/sin (`attention_factor`, derived from the factor when absent).
        attention_factor: f64,
    },
}

/// Everything the decoder graph needs to know about a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE rescaling.
    pub rope_scaling: RopeScaling,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// lm_head shares the token embedding.
    pub tie_word_embeddings: bool,
    /// q/k/v carry a bias.
    pub qkv_bias: bool,
    /// o_proj carries a bias.
    pub o_bias: bool,
    /// RMSNorm on each query and key head (Qwen3).
    pub qk_norm: bool,
    /// Attention window (Mistral), if any.
    pub sliding_window: Option<usize>,
    /// Rotary pairs are interleaved (GGUF llama checkpoints, whose q/k rows were permuted
    /// at conversion) rather than split in halves (Hugging Face layout).
    pub rope_interleaved: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (generation stops on any).
    pub eos_token_ids: Vec<u32>,
    /// Sparse mixture-of-experts feed-forward (Qwen3-MoE, Mixtral).
    pub moe: Option<MoeConfig>,
}

/// The mixture-of-experts part of a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoeConfig {
    /// Experts per MoE layer (`num_experts`, transformers 5.x `num_local_experts`).
    pub num_experts: usize,
    /// Experts each token is routed to (`num_experts_per_tok`).
    pub top_k: usize,
    /// Renormalise the top-k routing weights to sum to one (`norm_topk_prob`; Mixtral always).
    pub norm_topk_prob: bool,
    /// Width of one expert's MLP (`moe_intermediate_size`; Mixtral: `intermediate_size`).
    pub expert_intermediate: usize,
    /// Layers with a dense MLP of `intermediate_size` instead (`mlp_only_layers`, and layers
    /// off `decoder_sparse_step`).
    pub dense_layers: Vec<usize>,
    /// Tensor prefix of the block inside a layer (`mlp` or `block_sparse_moe`).
    pub prefix: &'static str,
}

impl ModelConfig {
    /// True when layer `i` has a sparse MoE block.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.moe
            .as_ref()
            .is_some_and(|m| !m.dense_layers.contains(&i))
    }
}

fn unsupported(what: String) -> Error {
    Error::Unsupported {
        what,
        by: "shardwise (architectures: llama, mistral, qwen2, qwen3, qwen3_moe, mixtral)".into(),
    }
}

fn cfg_err(file: &Path, field: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        field: format!("{}: {field}", file.display()),
        reason: reason.into(),
    }
}

impl ModelConfig {
    /// Reads `config.json` (or the file itself when `path` is one).
    ///
    /// # Errors
    /// Missing file, bad JSON, an unsupported architecture or a missing/invalid field, each
    /// naming the file and field.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| {
            cfg_err(
                &file,
                "config.json",
                format!("cannot read the model configuration: {e}"),
            )
        })?;
        let json: Json = serde_json::from_str(&text)
            .map_err(|e| cfg_err(&file, "config.json", format!("not valid JSON: {e}")))?;
        Self::from_hf_json(&json, &file)
    }

    /// Builds the configuration from parsed `config.json`; `file` is for messages.
    ///
    /// # Errors
    /// As [`Self::from_hf_file`].
    pub fn from_hf_json(json: &Json, file: &Path) -> Result<Self> {
        let get = |k: &str| json.get(k).filter(|v| !v.is_null());
        let usize_of = |k: &str| -> Result<usize> {
            get(k)
                .ok_or_else(|| cfg_err(file, k, "missing"))?
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| cfg_err(file, k, "not a non-negative integer"))
        };
        let f64_of = |v: &Json, k: &str| -> Result<f64> {
            v.as_f64()
                .ok_or_else(|| cfg_err(file, k, format!("not a number: {v}")))
        };
        let model_type = get("model_type")
            .and_then(Json::as_str)
            .ok_or_else(|| cfg_err(file, "model_type", "missing"))?;
        let arch = Arch::parse(model_type).ok_or_else(|| {
            let archs = get("architectures")
                .map(|a| a.to_string())
                .unwrap_or_default();
            unsupported(format!(
                "{}: architecture `{model_type}` {archs}",
                file.display()
            ))
        })?;
        let hidden = usize_of("hidden_size")?;
        let heads = usize_of("num_attention_heads")?;
        let kv_heads = match get("num_key_value_heads") {
            Some(_) => usize_of("num_key_value_heads")?,
            None => heads,
        };
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(cfg_err(
                file,
                "num_key_value_heads",
                format!("{kv_heads} KV heads do not divide {heads} attention heads"),
            ));
        }
        let head_dim = match get("head_dim") {
            Some(_) => usize_of("head_dim")?,
            None => {
                if hidden % heads != 0 {
                    return Err(cfg_err(
                        file,
                        "head_dim",
                        format!(
                            "missing, and hidden_size {hidden} is not a multiple of {heads} heads"
                        ),
                    ));
                }
                hidden / heads
            }
        };
        // transformers 5.x: `rope_parameters {rope_theta, rope_type, ...}`; 4.x: `rope_theta`
        // plus an optional `rope_scaling {type|rope_type, ...}`.
        let params = get("rope_parameters").filter(|v| v.is_object());
        let theta = match params
            .and_then(|p| p.get("rope_theta"))
            .or(get("rope_theta"))
        {
            Some(v) => f64_of(v, "rope_theta")?,
            None => 10_000.0,
        };
        let max_pos = match get("max_position_embeddings") {
            Some(_) => usize_of("max_position_embeddings")?,
            None => 2048,
        };
        let scaling_obj = get("rope_scaling").filter(|v| v.is_object()).or(params);
        let rope_scaling = match scaling_obj {
            Some(s) => parse_scaling(s, file, max_pos)?,
            None => RopeScaling::None,
        };
        let attention_bias = get("attention_bias")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        if get("mlp_bias").and_then(Json::as_bool).unwrap_or(false) {
            return Err(unsupported(format!("{}: mlp_bias = true", file.display())));
        }
        let token_ids = |k: &str| -> Vec<u32> {
            match get(k) {
                Some(Json::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u32)
                    .collect(),
                Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
                None => vec![],
            }
        };
        let moe = match arch {
            Arch::Qwen3Moe | Arch::Mixtral => {
                let experts_key = ["num_experts", "num_local_experts"]
                    .into_iter()
                    .find(|k| get(k).is_some())
                    .ok_or_else(|| {
                        cfg_err(file, "num_experts", "missing (also as num_local_experts)")
                    })?;
                let num_experts = usize_of(experts_key)?;
                let top_k = usize_of("num_experts_per_tok")?;
                if num_experts == 0 || top_k == 0 || top_k > num_experts {
                    return Err(cfg_err(
                        file,
                        "num_experts_per_tok",
                        format!("{top_k} experts per token of {num_experts}"),
                    ));
                }
                let layers = usize_of("num_hidden_layers")?;
                let (expert_intermediate, norm, dense_layers, prefix) = if arch == Arch::Mixtral {
                    (
                        usize_of("intermediate_size")?,
                        true,
                        vec![],
                        "block_sparse_moe",
                    )
                } else {
                    let step = match get("decoder_sparse_step") {
                        Some(_) => usize_of("decoder_sparse_step")?.max(1),
                        None => 1,
                    };
                    let only: Vec<usize> = match get("mlp_only_layers") {
                        Some(Json::Array(a)) => a
                            .iter()
                            .map(|v| v.as_u64().map(|v| v as usize))
                            .collect::<Option<_>>()
                            .ok_or_else(|| {
                                cfg_err(file, "mlp_only_layers", "not a list of layer indices")
                            })?,
                        Some(_) => return Err(cfg_err(file, "mlp_only_layers", "not a list")),
                        None => vec![],
                    };
                    let dense = (0..layers)
                        .filter(|i| only.contains(i) || (i + 1) % step != 0)
                        .collect();
                    (
                        usize_of("moe_intermediate_size")?,
                        get("norm_topk_prob")
                            .and_then(Json::as_bool)
                            .unwrap_or(false),
                        dense,
                        "mlp",
                    )
                };
                Some(MoeConfig {
                    num_experts,
                    top_k,
                    norm_topk_prob: norm,
                    expert_intermediate,
                    dense_layers,
                    prefix,
                })
            }
            _ => None,
        };
        let sliding_window = match arch {
            Arch::Mistral | Arch::Mixtral => get("sliding_window")
                .and_then(Json::as_u64)
                .map(|v| v as usize),
            Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen3Moe
                if get("use_sliding_window")
                    .and_then(Json::as_bool)
                    .unwrap_or(false) =>
            {
                return Err(unsupported(format!(
                    "{}: use_sliding_window = true for {model_type}",
                    file.display()
                )))
            }
            _ => None,
        };
        Ok(Self {
            arch,
            vocab_size: usize_of("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: usize_of("intermediate_size")?,
            num_layers: usize_of("num_hidden_layers")?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: match get("rms_norm_eps") {
                Some(v) => f64_of(v, "rms_norm_eps")?,
                None => 1e-6,
            },
            rope_theta: theta,
            rope_scaling,
            max_position_embeddings: max_pos,
            tie_word_embeddings: get("tie_word_embeddings")
                .and_then(Json::as_bool)
                .unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: attention_bias && arch != Arch::Qwen2,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe),
            sliding_window,
            rope_interleaved: false,
            bos_token_id: token_ids("bos_token_id").first().copied(),
            eos_token_ids: token_ids("eos_token_id"),
            moe,
        })
    }

    /// Builds the configuration from GGUF metadata (`{arch}.*` and `tokenizer.ggml.*` keys).
    /// `vocab_rows` is the row count of `token_embd.weight`, used when the metadata has no
    /// vocabulary size.
    ///
    /// # Errors
    /// Another architecture, or a missing/invalid key, naming the file and key.
    pub fn from_gguf(ct: &Content, file: &Path, vocab_rows: usize) -> Result<Self> {
        let md = &ct.metadata;
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| cfg_err(file, "general.architecture", "missing"))?;
        let arch = Arch::parse(arch_name).ok_or_else(|| {
            unsupported(format!(
                "{}: GGUF architecture `{arch_name}`",
                file.display()
            ))
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let num = |k: &str| -> Option<f64> { md.get(&key(k)).and_then(value_f64) };
        let need = |k: &str| -> Result<usize> {
            num(k)
                .map(|v| v as usize)
                .ok_or_else(|| cfg_err(file, &key(k), "missing or not a number"))
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let kv_heads = num("attention.head_count_kv").map_or(heads, |v| v as usize);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(cfg_err(
                file,
                &key("attention.head_count_kv"),
                format!("{kv_heads} KV heads do not divide {heads} attention heads"),
            ));
        }
        let head_dim = match num("attention.key_length") {
            Some(v) => v as usize,
            None => hidden / heads,
        };
        let max_pos = num("context_length").map_or(2048, |v| v as usize);
        let scaling_type = md
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str);
        let factor = num("rope.scaling.factor").unwrap_or(1.0);
        let rope_scaling = match scaling_type {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear { factor },
            Some("yarn") => {
                let orig = num("rope.scaling.original_context_length").unwrap_or(max_pos as f64);
                RopeScaling::Yarn {
                    factor,
                    original_max_position: orig,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    attention_factor: yarn_mscale(factor, 1.0),
                }
            }
            Some(other) => {
                return Err(unsupported(format!(
                    "{}: {} = `{other}`",
                    file.display(),
                    key("rope.scaling.type")
                )))
            }
        };
        let tok = |k: &str| md.get(k).and_then(value_f64).map(|v| v as u32);
        let eps = num("attention.layer_norm_rms_epsilon").unwrap_or(1e-5);
        Ok(Self {
            arch,
            vocab_size: num("vocab_size").map_or(vocab_rows, |v| v as usize),
            hidden_size: hidden,
            intermediate_size: need("feed_forward_length")?,
            num_layers: need("block_count")?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: eps,
            rope_theta: num("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: max_pos,
            // The loader ties when the file has no `output.weight`.
            tie_word_embeddings: false,
            qkv_bias: arch == Arch::Qwen2,
            o_bias: false,
            qk_norm: arch == Arch::Qwen3,
            sliding_window: None,
            // llama.cpp's converter permutes llama/mistral q and k rows for interleaved
            // rotary pairs; qwen checkpoints keep the halves layout.
            rope_interleaved: matches!(arch, Arch::Llama | Arch::Mistral),
            bos_token_id: tok("tokenizer.ggml.bos_token_id"),
            eos_token_ids: tok("tokenizer.ggml.eos_token_id").into_iter().collect(),
            // MoE GGUFs (`ffn_gate_exps`) are not read yet; their architectures do not parse.
            moe: None,
        })
    }
}

fn value_f64(v: &Value) -> Option<f64> {
    Some(match v {
        Value::U8(x) => *x as f64,
        Value::I8(x) => *x as f64,
        Value::U16(x) => *x as f64,
        Value::I16(x) => *x as f64,
        Value::U32(x) => *x as f64,
        Value::I32(x) => *x as f64,
        Value::U64(x) => *x as f64,
        Value::I64(x) => *x as f64,
        Value::F32(x) => *x as f64,
        Value::F64(x) => *x,
        _ => return None,
    })
}

/// YaRN's attention scale for a context factor (transformers' `get_mscale`).
fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

fn parse_scaling(s: &Json, file: &Path, max_pos: usize) -> Result<RopeScaling> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Json::as_str)
        .unwrap_or("default");
    let num = |k: &str| s.get(k).and_then(Json::as_f64);
    let need = |k: &str| {
        num(k).ok_or_else(|| {
            cfg_err(
                file,
                &format!("rope_scaling.{k}"),
                "missing or not a number",
            )
        })
    };
    let orig = || num("original_max_position_embeddings").unwrap_or(max_pos as f64);
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position: need("original_max_position_embeddings")?,
        },
        "yarn" => {
            let factor = need("factor")?;
            let attention_factor = match (
                num("attention_factor"),
                num("mscale"),
                num("mscale_all_dim"),
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                    yarn_mscale(factor, m) / yarn_mscale(factor, a)
                }
                _ => yarn_mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                original_max_position: orig(),
                beta_fast: num("beta_fast").unwrap_or(32.0),
                beta_slow: num("beta_slow").unwrap_or(1.0),
                attention_factor,
            }
        }
        other => {
            return Err(unsupported(format!(
                "{}: rope scaling type `{other}` (known: default, linear, llama3, yarn)",
                file.display()
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Json {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 256
        })
    }

    #[test]
    fn moe_keys_in_both_spellings() {
        // transformers 4.x Qwen3-MoE (`num_experts`), sparse every 2nd layer, layer 2 dense.
        let mut q = base();
        q["model_type"] = "qwen3_moe".into();
        q["num_hidden_layers"] = 6.into();
        q["num_experts"] = 8.into();
        q["num_experts_per_tok"] = 2.into();
        q["moe_intermediate_size"] = 32.into();
        q["decoder_sparse_step"] = 2.into();
        q["mlp_only_layers"] = serde_json::json!([3]);
        q["norm_topk_prob"] = true.into();
        let c = ModelConfig::from_hf_json(&q, Path::new("q.json")).unwrap();
        let m = c.moe.clone().unwrap();
        assert_eq!((m.num_experts, m.top_k, m.expert_intermediate), (8, 2, 32));
        assert!(m.norm_topk_prob && c.qk_norm);
        assert_eq!(m.dense_layers, vec![0, 2, 3, 4]);
        assert!(c.is_moe_layer(1) && c.is_moe_layer(5) && !c.is_moe_layer(3));
        // transformers 5.x writes `num_local_experts`; Mixtral always renormalises.
        let mut x = base();
        x["model_type"] = "mixtral".into();
        x["num_local_experts"] = 4.into();
        x["num_experts_per_tok"] = 2.into();
        let c = ModelConfig::from_hf_json(&x, Path::new("x.json")).unwrap();
        let m = c.moe.unwrap();
        assert_eq!(
            (m.num_experts, m.expert_intermediate, m.prefix),
            (4, 128, "block_sparse_moe")
        );
        assert!(m.norm_topk_prob && m.dense_layers.is_empty());
        x["num_experts_per_tok"] = 5.into();
        let e = ModelConfig::from_hf_json(&x, Path::new("x.json")).unwrap_err();
        assert!(e.to_string().contains("num_experts_per_tok"), "{e}");
        x.as_object_mut().unwrap().remove("num_local_experts");
        let e = ModelConfig::from_hf_json(&x, Path::new("x.json")).unwrap_err();
        assert!(e.to_string().contains("num_experts"), "{e}");
    }

    #[test]
    fn quantization_configs_parse_or_name_the_field() {
        use crate::quant::{Int4Packing, PrequantFormat};
        let q = |v: serde_json::Value| {
            PrequantFormat::from_hf(&serde_json::json!({ "quantization_config": v }))
        };
        assert_eq!(
            q(serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]})).unwrap(),
            Some(PrequantFormat::Fp8 {
                block: Some([128, 128])
            })
        );
        assert_eq!(
            q(
                serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": -1,
                "checkpoint_format": "gptq_v2"})
            )
            .unwrap(),
            Some(PrequantFormat::Int4 {
                packing: Int4Packing::Gptq { zero_offset: 0 },
                group: None
            })
        );
        let e =
            q(serde_json::json!({"quant_method": "fp8", "weight_block_size": [128]})).unwrap_err();
        assert!(e.to_string().contains("weight_block_size"), "{e}");
        let e = q(
            serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 128,
            "version": "gemv"}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("gemv"), "{e}");
        assert_eq!(PrequantFormat::from_hf(&base()).unwrap(), None);
    }

    #[test]
    fn transformers_4_and_5_spellings_agree() {
        let mut v4 = base();
        v4["rope_theta"] = 500000.0.into();
        v4["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        let mut v5 = base();
        v5["rope_parameters"] =
            serde_json::json!({"rope_theta": 500000.0, "rope_type": "linear", "factor": 2.0});
        let p = Path::new("config.json");
        let a = ModelConfig::from_hf_json(&v4, p).unwrap();
        let b = ModelConfig::from_hf_json(&v5, p).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(a.head_dim, 16);
    }

    #[test]
    fn errors_name_the_field() {
        let mut bad = base();
        bad["model_type"] = "gpt2".into();
        let e = ModelConfig::from_hf_json(&bad, Path::new("m/config.json")).unwrap_err();
        assert!(
            e.to_string().contains("gpt2") && e.to_string().contains("not supported"),
            "{e}"
        );
        let mut bad = base();
        bad.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_hf_json(&bad, Path::new("m/config.json")).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
        let mut bad = base();
        bad["num_key_value_heads"] = 3.into();
        let e = ModelConfig::from_hf_json(&bad, Path::new("m/config.json")).unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
    }
}
