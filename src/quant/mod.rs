//! How a linear layer's weight is stored and multiplied.
//!
//! [`QuantMethod`] is the one interface; each storage format is one file: [`unquantized`]
//! (f32/bf16/f16), [`ggml`] (every GGML block type, via candle's `QTensor`), [`fp8`] (E4M3
//! with block scales) and [`mxfp4`]; [`int4`] unpacks GPTQ/AWQ checkpoints. [`isq`] picks the
//! quantization type a shard can actually take (block alignment fallback), and
//! [`PrequantFormat`] reads a checkpoint's `quantization_config`.

pub mod fp8;
pub mod ggml;
pub mod int4;
pub mod isq;
pub mod mxfp4;
pub mod unquantized;

use std::fmt::Debug;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

pub use fp8::Fp8Linear;
pub use ggml::GgmlLinear;
pub use int4::Int4Packing;
pub use isq::IsqType;
pub use mxfp4::Mxfp4Linear;
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

    /// The `[out, in]` weight when the layer is stored dense (merged chunks on a GPU are
    /// multiplied as one dense matrix; see `ParallelLinear::move_to`).
    fn dense_weight(&self) -> Option<&Tensor> {
        None
    }

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

    /// The layer with its tensors on `device`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for formats without a device path yet; copy errors.
    fn to_device(&self, device: &Device) -> Result<Arc<dyn QuantMethod>> {
        let _ = device;
        Err(Error::Unsupported {
            what: format!("{} weights on a CUDA device", self.format()),
            by: "this build (load dense weights with --dtype bf16 or f32)".into(),
        })
    }

    /// Block of the per-block scales a format keeps (FP8), when it is not one scale for the
    /// whole weight.
    fn scale_block(&self) -> Option<[usize; 2]> {
        None
    }

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

/// `x @ w^T (+ bias)` through a dense weight, computed in `w`'s dtype and returned in `x`'s:
/// the product of dense layers and of every format that expands its weight first.
pub(crate) fn dense_product(w: Tensor, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    use candle_core::Module;
    if let Some(y) = crate::layers::fused::linear(x, &w)? {
        return add_bias(y, bias);
    }
    let (in_dtype, w_dtype) = (x.dtype(), w.dtype());
    let y = candle_nn::Linear::new(w, None).forward(&x.to_dtype(w_dtype)?)?;
    add_bias(y.to_dtype(in_dtype)?, bias)
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
    /// A pre-quantized checkpoint: each linear loads in the format its tensors are stored in
    /// (layers the checkpoint left dense load as `dtype`).
    Prequantized {
        /// Compute dtype, and the dtype of dense layers.
        dtype: DType,
        /// The checkpoint's format.
        format: PrequantFormat,
    },
}

impl QuantConfig {
    /// Dtype activations and dense weights use.
    pub fn dtype(&self) -> DType {
        match *self {
            QuantConfig::Unquantized { dtype } | QuantConfig::Prequantized { dtype, .. } => dtype,
            QuantConfig::Ggml => DType::F32,
        }
    }

    /// Elements a shard boundary should be a multiple of, so pieces stay in their format.
    pub fn block(&self) -> usize {
        match self {
            QuantConfig::Prequantized { format, .. } => format.align(),
            _ => 1,
        }
    }
}

/// The pre-quantized formats a checkpoint's `quantization_config` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrequantFormat {
    /// F8E4M3 `weight` with f32 scales (`weight_scale_inv`, or `weight_scale`): one per
    /// `[rows, cols]` block, or one per tensor when `block` is `None`.
    Fp8 {
        /// `weight_block_size`.
        block: Option<[usize; 2]>,
    },
    /// MXFP4 `*_blocks` / `*_scales` (gpt-oss layout).
    Mxfp4,
    /// GPTQ or AWQ 4-bit `qweight` / `qzeros` / `scales` (/ `g_idx`).
    Int4 {
        /// Code layout.
        packing: Int4Packing,
        /// Inputs per group; `None` for one group over all inputs (`group_size: -1`).
        group: Option<usize>,
    },
}

impl PrequantFormat {
    /// Short name (`fp8`, `mxfp4`, `gptq`, `awq`).
    pub fn name(&self) -> &'static str {
        match self {
            PrequantFormat::Fp8 { .. } => "fp8",
            PrequantFormat::Mxfp4 => "mxfp4",
            PrequantFormat::Int4 { packing, .. } => packing.name(),
        }
    }

    /// Elements a shard boundary should be a multiple of (the scale block; GPTQ/AWQ: the
    /// 8 codes of a word).
    pub fn align(&self) -> usize {
        match *self {
            PrequantFormat::Fp8 {
                block: Some([r, c]),
            } => r.max(c),
            PrequantFormat::Fp8 { block: None } => 1,
            PrequantFormat::Mxfp4 => mxfp4::MXFP4_BLOCK,
            PrequantFormat::Int4 { .. } => 8,
        }
    }

    /// Reads `quantization_config` from a parsed config.json (`None` when absent).
    ///
    /// # Errors
    /// An unknown `quant_method`, or fields this runtime cannot honour (named).
    pub fn from_hf(config: &serde_json::Value) -> Result<Option<Self>> {
        let Some(q) = config.get("quantization_config") else {
            return Ok(None);
        };
        let bad = |field: &str, reason: String| Error::Config {
            field: format!("quantization_config.{field}"),
            reason,
        };
        let method = q
            .get("quant_method")
            .and_then(|m| m.as_str())
            .ok_or_else(|| bad("quant_method", "missing or not a string".into()))?;
        let uint = |field: &str| -> Result<Option<i64>> {
            match q.get(field) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_i64()
                    .map(Some)
                    .ok_or_else(|| bad(field, format!("{v} is not an integer"))),
            }
        };
        let four_bits = || -> Result<()> {
            match uint("bits")? {
                Some(4) => Ok(()),
                other => Err(Error::Unsupported {
                    what: format!("{method} with bits = {other:?}"),
                    by: "shardwise (4-bit GPTQ/AWQ only)".into(),
                }),
            }
        };
        let group = || -> Result<Option<usize>> {
            match uint("group_size")? {
                Some(-1) => Ok(None),
                Some(g) if g >= 8 && g % 8 == 0 => Ok(Some(g as usize)),
                other => Err(bad(
                    "group_size",
                    format!(
                        "{other:?}: must be -1 or a positive multiple of 8 (the codes of one \
                         int32 word), or no split can align to it"
                    ),
                )),
            }
        };
        let format = match method {
            "fp8" => {
                if let Some(fmt) = q.get("fmt").and_then(|f| f.as_str()) {
                    if fmt != "e4m3" {
                        return Err(Error::Unsupported {
                            what: format!("fp8 format `{fmt}`"),
                            by: "shardwise (e4m3 only)".into(),
                        });
                    }
                }
                let block = match q.get("weight_block_size") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(v) => {
                        let dims: Option<Vec<usize>> = v.as_array().map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_u64().map(|x| x as usize))
                                .filter(|&x| x > 0)
                                .collect()
                        });
                        match dims.as_deref() {
                            Some(&[r, c]) if v.as_array().is_some_and(|a| a.len() == 2) => {
                                Some([r, c])
                            }
                            _ => {
                                return Err(bad(
                                    "weight_block_size",
                                    format!("{v} is not two positive integers"),
                                ))
                            }
                        }
                    }
                };
                PrequantFormat::Fp8 { block }
            }
            "mxfp4" => PrequantFormat::Mxfp4,
            "gptq" => {
                four_bits()?;
                let zero_offset = match q.get("checkpoint_format").and_then(|f| f.as_str()) {
                    None | Some("gptq") => 1,
                    Some("gptq_v2") => 0,
                    Some(other) => {
                        return Err(Error::Unsupported {
                            what: format!("GPTQ checkpoint_format `{other}`"),
                            by: "shardwise (gptq, gptq_v2)".into(),
                        })
                    }
                };
                PrequantFormat::Int4 {
                    packing: Int4Packing::Gptq { zero_offset },
                    group: group()?,
                }
            }
            "awq" => {
                four_bits()?;
                let version = q.get("version").and_then(|v| v.as_str()).unwrap_or("gemm");
                if !version.eq_ignore_ascii_case("gemm") {
                    return Err(Error::Unsupported {
                        what: format!("AWQ version `{version}`"),
                        by: "shardwise (the GEMM layout)".into(),
                    });
                }
                if q.get("zero_point").and_then(|z| z.as_bool()) == Some(false) {
                    return Err(Error::Unsupported {
                        what: "AWQ without zero points".into(),
                        by: "shardwise".into(),
                    });
                }
                PrequantFormat::Int4 {
                    packing: Int4Packing::Awq,
                    group: group()?,
                }
            }
            other => {
                return Err(Error::Unsupported {
                    what: format!("quant_method `{other}`"),
                    by: "shardwise (fp8, mxfp4, gptq, awq)".into(),
                })
            }
        };
        Ok(Some(format))
    }
}
