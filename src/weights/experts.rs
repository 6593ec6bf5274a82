//! MoE expert weights under one set of names, whatever layout the checkpoint uses.
//!
//! The layers load every expert as `{block}.experts.{e}.{gate,up,down}_proj.*` (nn.Linear
//! orientation, `[out, in]`). [`ExpertView`] serves those names from:
//! - per-expert tensors under those names (Qwen3-MoE), passed through;
//! - Mixtral's per-expert `w1` / `w3` / `w2` (gate / up / down), renamed, any suffix (FP8
//!   scales and GPTQ tensors follow their weight);
//! - stacked tensors `{block}.experts.gate_up_proj` (gate rows, then up rows) and
//!   `{block}.experts.down_proj`, in either convention, told apart by their shapes:
//!   A (`x @ W`, as gpt-oss and Llama 4 store them): `[E, H, 2I]` and `[E, I, H]`;
//!   B (nn.Linear, as transformers 5 holds them): `[E, 2I, H]` and `[E, H, I]`;
//! - stacked MXFP4 `{block}.experts.{gate_up,down}_proj_{blocks,scales}` (gpt-oss layout,
//!   rows are outputs).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor};

use super::{TensorMeta, WeightSource};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::shard::Shard;

/// How a served tensor comes out of the inner source.
#[derive(Debug, Clone)]
enum Served {
    /// Another name for an inner tensor.
    Renamed(String),
    /// Rows `rows` (after transposing when `transpose`) of expert `expert` of a stacked
    /// tensor.
    Stacked {
        inner: String,
        expert: usize,
        transpose: bool,
        rows: Range<usize>,
        shape: Vec<usize>,
    },
}

/// A source whose MoE experts appear under per-expert nn.Linear names (see the module docs).
#[derive(Debug)]
pub struct ExpertView<'a> {
    inner: &'a dyn WeightSource,
    served: BTreeMap<String, Served>,
}

const MIXTRAL: [(&str, &str); 3] = [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")];

impl<'a> ExpertView<'a> {
    /// Maps the experts of every MoE layer of `cfg` in `inner`.
    ///
    /// # Errors
    /// Stacked tensors whose shapes fit neither convention (named, with the expected shapes).
    pub fn new(inner: &'a dyn WeightSource, cfg: &ModelConfig) -> Result<Self> {
        let mut served = BTreeMap::new();
        let Some(moe) = &cfg.moe else {
            return Ok(Self { inner, served });
        };
        let (h, i, e) = (cfg.hidden_size, moe.expert_intermediate, moe.num_experts);
        let names = inner.names();
        for layer in (0..cfg.num_layers).filter(|&l| cfg.is_moe_layer(l)) {
            let block = format!("model.layers.{layer}.{}.experts", moe.prefix);
            // Mixtral's per-expert names, every suffix.
            let dot = format!("{block}.");
            for n in names.iter().filter(|n| n.starts_with(&dot)) {
                let rest = &n[dot.len()..];
                let Some((expert, rest)) = rest.split_once('.') else {
                    continue;
                };
                for (old, new) in MIXTRAL {
                    if let Some(suffix) = rest.strip_prefix(&format!("{old}.")) {
                        served.insert(
                            format!("{block}.{expert}.{new}.{suffix}"),
                            Served::Renamed(n.clone()),
                        );
                    }
                }
            }
            let gu = format!("{block}.gate_up_proj");
            let down = format!("{block}.down_proj");
            if inner.contains(&gu) || inner.contains(&down) {
                let gm = inner.meta(&gu)?;
                let dm = inner.meta(&down)?;
                let conv_a = gm.shape == [e, h, 2 * i] && dm.shape == [e, i, h];
                let conv_b = gm.shape == [e, 2 * i, h] && dm.shape == [e, h, i];
                let transpose = match (conv_a, conv_b) {
                    (true, false) => true,
                    (false, true) => false,
                    _ => {
                        return Err(Error::Config {
                            field: format!("{}: {gu}", gm.file.display()),
                            reason: format!(
                                "stacked experts {:?} and {down} {:?} fit neither [E, H, 2I] + \
                                 [E, I, H] nor [E, 2I, H] + [E, H, I] (E {e}, H {h}, I {i})",
                                gm.shape, dm.shape
                            ),
                        })
                    }
                };
                for x in 0..e {
                    let p = format!("{block}.{x}");
                    for (name, inner_name, rows, shape) in [
                        ("gate_proj", &gu, 0..i, vec![i, h]),
                        ("up_proj", &gu, i..2 * i, vec![i, h]),
                        ("down_proj", &down, 0..h, vec![h, i]),
                    ] {
                        served.insert(
                            format!("{p}.{name}.weight"),
                            Served::Stacked {
                                inner: inner_name.clone(),
                                expert: x,
                                transpose,
                                rows,
                                shape,
                            },
                        );
                    }
                }
            }
            // Stacked MXFP4 (rows are outputs; 16 bytes per 32-value block).
            let gub = format!("{block}.gate_up_proj_blocks");
            if inner.contains(&gub) {
                for x in 0..e {
                    let p = format!("{block}.{x}");
                    for (part, src, rows, out, inp) in [
                        ("gate_proj", "gate_up_proj", 0..i, i, h),
                        ("up_proj", "gate_up_proj", i..2 * i, i, h),
                        ("down_proj", "down_proj", 0..h, h, i),
                    ] {
                        let nb = inp / 32;
                        for (suffix, shape) in
                            [("blocks", vec![out, nb, 16]), ("scales", vec![out, nb])]
                        {
                            served.insert(
                                format!("{p}.{part}.weight_{suffix}"),
                                Served::Stacked {
                                    inner: format!("{block}.{src}_{suffix}"),
                                    expert: x,
                                    transpose: false,
                                    rows: rows.clone(),
                                    shape,
                                },
                            );
                        }
                    }
                }
            }
        }
        Ok(Self { inner, served })
    }
}

impl WeightSource for ExpertView<'_> {
    fn location(&self) -> &Path {
        self.inner.location()
    }

    fn names(&self) -> Vec<String> {
        let mut v = self.inner.names();
        v.extend(self.served.keys().cloned());
        v.sort();
        v.dedup();
        v
    }

    fn meta(&self, name: &str) -> Result<TensorMeta> {
        match self.served.get(name) {
            None => self.inner.meta(name),
            Some(Served::Renamed(n)) => self.inner.meta(n),
            Some(Served::Stacked { inner, shape, .. }) => {
                let m = self.inner.meta(inner)?;
                Ok(TensorMeta {
                    shape: shape.clone(),
                    ..m
                })
            }
        }
    }

    fn read(&self, name: &str, shard: &Shard, dtype: DType) -> Result<Tensor> {
        match self.served.get(name) {
            None => self.inner.read(name, shard, dtype),
            Some(Served::Renamed(n)) => self.inner.read(n, shard, dtype),
            Some(Served::Stacked {
                inner,
                expert,
                transpose,
                rows,
                shape,
            }) => {
                shard.sharded_shape(shape).map_err(|e| e.in_layer(name))?;
                let t = self
                    .inner
                    .read(inner, &Shard::range(0, *expert..expert + 1), dtype)?
                    .squeeze(0)?;
                let t = if *transpose { t.t()? } else { t };
                let t = t.narrow(0, rows.start, rows.len())?;
                Ok(shard.apply_to(&t)?.contiguous()?)
            }
        }
    }

    fn read_quantized(&self, name: &str, shard: &Shard) -> Result<Option<QTensor>> {
        match self.served.get(name) {
            None => self.inner.read_quantized(name, shard),
            Some(Served::Renamed(n)) => self.inner.read_quantized(n, shard),
            Some(Served::Stacked { .. }) => Ok(None),
        }
    }

    fn bytes_copied(&self) -> u64 {
        self.inner.bytes_copied()
    }
}
