//! Sparse mixture-of-experts feed-forward (Qwen3-MoE, Mixtral), tensor-parallel inside the
//! experts.
//!
//! - [`Router`]: softmax over the gate logits (f32), top-k, optional renormalisation of the
//!   chosen weights (`norm_topk_prob`). Every rank holds the whole router and routes the same
//!   (its input is the all-reduced hidden state, identical on every rank).
//! - [`Experts::Packed`]: every rank holds every expert; inside each, gate/up are
//!   column-parallel and down is row-parallel, each expert weight in its own storage format
//!   (so ISQ, FP8, MXFP4 and UQFF apply per expert).
//! - [`Experts::Fused`]: the same slices stacked into `[E, 2I/r, H]` and `[E, H, I/r]`
//!   tensors of the compute dtype.
//!
//! Both compute only the experts some token was routed to, one product per routed expert
//! over its tokens, and combine the weighted partial outputs with one all-reduce per block.

use std::str::FromStr;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::linear::{ParallelLinear, Piece, Reduce};
use crate::comm::Communicator;
use crate::error::{Error, LayerContext, Result};
use crate::model::config::MoeConfig;
use crate::quant::{IsqType, QuantConfig};
use crate::shard::{plan_split, Shard, SplitSpec};
use crate::weights::WeightSource;

/// Which expert layout a model loads with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MoeImpl {
    /// Per-expert layers in their own formats ([`Experts::Packed`]).
    #[default]
    Packed,
    /// Stacked dense tensors ([`Experts::Fused`]).
    Fused,
}

impl MoeImpl {
    /// Name as accepted by [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            MoeImpl::Packed => "packed",
            MoeImpl::Fused => "fused",
        }
    }
}

impl FromStr for MoeImpl {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "packed" => Ok(MoeImpl::Packed),
            "fused" => Ok(MoeImpl::Fused),
            other => Err(Error::Config {
                field: "moe".into(),
                reason: format!("unknown expert layout `{other}`; expected packed or fused"),
            }),
        }
    }
}

/// Top-k softmax router.
#[derive(Debug, Clone)]
pub struct Router {
    /// `[experts, hidden]`, f32.
    pub weight: Tensor,
    top_k: usize,
    norm: bool,
}

impl Router {
    /// Routes each row of `x` (`[n, hidden]`): its top-k experts and their weights, highest
    /// first.
    ///
    /// # Errors
    /// Kernel errors.
    pub fn route(&self, x: &Tensor) -> Result<Vec<Vec<(usize, f32)>>> {
        let logits = x
            .to_dtype(DType::F32)?
            .matmul(&self.weight.t()?)?
            .to_vec2::<f32>()?;
        Ok(logits
            .into_iter()
            .map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exp: Vec<f32> = row.iter().map(|l| (l - max).exp()).collect();
                let sum: f32 = exp.iter().sum();
                let mut order: Vec<usize> = (0..exp.len()).collect();
                // Highest probability first; equal ones by expert index.
                order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
                let mut top: Vec<(usize, f32)> = order
                    .into_iter()
                    .take(self.top_k)
                    .map(|e| (e, exp[e] / sum))
                    .collect();
                if self.norm {
                    let s: f32 = top.iter().map(|(_, p)| p).sum();
                    top.iter_mut().for_each(|(_, p)| *p /= s);
                }
                top
            })
            .collect())
    }
}

/// One expert on this rank: its gate/up columns and down rows.
#[derive(Debug, Clone)]
pub struct Expert {
    /// Gate and up slices (column-parallel, outputs `[gate | up]`).
    pub gate_up: ParallelLinear,
    /// Down slice (row-parallel; partial sums, reduced once per block).
    pub down: ParallelLinear,
}

/// This rank's experts.
#[derive(Debug, Clone)]
pub enum Experts {
    /// Per-expert layers.
    Packed(Vec<Expert>),
    /// Stacked dense slices: `gate_up` `[E, 2 * i, hidden]` (gate rows, then up rows) and
    /// `down` `[E, hidden, i]`, `i` this rank's share of the expert width.
    Fused {
        /// Gate and up.
        gate_up: Tensor,
        /// Down.
        down: Tensor,
    },
}

/// A sparse MoE block on one rank.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    /// The router (whole on every rank).
    pub router: Router,
    /// This rank's expert slices.
    pub experts: Experts,
    name: String,
    comm: Arc<dyn Communicator>,
}

impl MoeBlock {
    /// Loads `{prefix}.gate` and `{prefix}.experts.{e}.{gate,up,down}_proj` (per-expert names;
    /// see [`crate::weights::ExpertView`] for the other layouts), splitting each expert's
    /// width with boundaries aligned to `align` elements.
    ///
    /// # Errors
    /// No plan for the expert width, missing or mis-shaped tensors (named).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        prefix: &str,
        hidden: usize,
        moe: &MoeConfig,
        layout: MoeImpl,
        quant: &QuantConfig,
        src: &dyn WeightSource,
        comm: Arc<dyn Communicator>,
        align: usize,
    ) -> Result<Self> {
        let inter = moe.expert_intermediate;
        let ranges = plan_split(
            &SplitSpec {
                name: "moe_intermediate_size",
                units: inter,
                unit_elems: 1,
                align,
            },
            comm.world_size(),
        )?;
        let range = ranges[comm.rank()].clone();
        let gate = format!("{prefix}.gate.weight");
        let weight = src.read_expect(
            &gate,
            &[moe.num_experts, hidden],
            &Shard::full(),
            DType::F32,
        )?;
        let mut experts = Vec::with_capacity(moe.num_experts);
        for e in 0..moe.num_experts {
            let p = format!("{prefix}.experts.{e}");
            let pieces: Vec<Piece> = ["gate_proj", "up_proj"]
                .iter()
                .map(|n| {
                    Piece::new(
                        format!("{p}.{n}"),
                        inter,
                        hidden,
                        Shard::range(0, range.clone()),
                    )
                })
                .collect();
            let gate_up = ParallelLinear::load(
                &format!("{p}.gate_up"),
                quant,
                src,
                &pieces,
                false,
                Reduce::None,
                comm.clone(),
            )?;
            let down_name = format!("{p}.down_proj");
            let down = ParallelLinear::load(
                &down_name,
                quant,
                src,
                &[Piece::new(
                    down_name.clone(),
                    hidden,
                    inter,
                    Shard::range(1, range.clone()),
                )],
                false,
                Reduce::None,
                comm.clone(),
            )?;
            experts.push(Expert { gate_up, down });
        }
        let experts = match layout {
            MoeImpl::Packed => Experts::Packed(experts),
            MoeImpl::Fused => {
                let dtype = quant.dtype();
                let dense = |l: &ParallelLinear| -> Result<Tensor> {
                    let parts = l
                        .parts()
                        .iter()
                        .map(|p| p.dequantize_w())
                        .collect::<Result<Vec<_>>>()?;
                    Ok(Tensor::cat(&parts, 0)?.to_dtype(dtype)?)
                };
                let gu = experts
                    .iter()
                    .map(|x| dense(&x.gate_up))
                    .collect::<Result<Vec<_>>>()?;
                let dn = experts
                    .iter()
                    .map(|x| dense(&x.down))
                    .collect::<Result<Vec<_>>>()?;
                Experts::Fused {
                    gate_up: Tensor::stack(&gu, 0)?,
                    down: Tensor::stack(&dn, 0)?,
                }
            }
        };
        Ok(Self {
            router: Router {
                weight,
                top_k: moe.top_k,
                norm: moe.norm_topk_prob,
            },
            experts,
            name: prefix.to_string(),
            comm,
        })
    }

    /// Moves the router and the experts to `device`.
    ///
    /// # Errors
    /// As [`ParallelLinear::move_to`].
    pub fn move_to(&mut self, device: &candle_core::Device) -> Result<()> {
        self.router.weight = self.router.weight.to_device(device)?;
        match &mut self.experts {
            Experts::Packed(v) => {
                for x in v.iter_mut() {
                    x.gate_up.move_to(device)?;
                    x.down.move_to(device)?;
                }
            }
            Experts::Fused { gate_up, down } => {
                *gate_up = gate_up.to_device(device)?;
                *down = down.to_device(device)?;
            }
        }
        Ok(())
    }

    /// The per-expert layers (empty for fused experts).
    pub fn linears(&self) -> Vec<&ParallelLinear> {
        match &self.experts {
            Experts::Packed(v) => v.iter().flat_map(|x| [&x.gate_up, &x.down]).collect(),
            Experts::Fused { .. } => Vec::new(),
        }
    }

    /// Bytes of the fused expert tensors (packed experts count as linears).
    pub fn fused_bytes(&self) -> usize {
        match &self.experts {
            Experts::Packed(_) => 0,
            Experts::Fused { gate_up, down } => {
                (gate_up.elem_count() + down.elem_count()) * gate_up.dtype().size_in_bytes()
            }
        }
    }

    /// Quantizes the experts whose layer names contain one of `filter` (all when empty);
    /// returns how many layers were quantized.
    ///
    /// # Errors
    /// Kernel errors; [`Error::Unsupported`] for fused experts, which stay dense.
    pub fn apply_isq(&mut self, ty: IsqType, filter: &[String]) -> Result<usize> {
        let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f));
        match &mut self.experts {
            Experts::Packed(v) => {
                let mut n = 0;
                for x in v.iter_mut() {
                    for lin in [&mut x.gate_up, &mut x.down] {
                        if wanted(lin.name()) {
                            lin.apply_isq(ty)?;
                            n += 1;
                        }
                    }
                }
                Ok(n)
            }
            Experts::Fused { .. } if wanted(&format!("{}.experts", self.name)) => {
                Err(Error::Unsupported {
                    what: format!("ISQ of the fused experts of `{}`", self.name),
                    by: "fused experts (load with --moe packed to quantize experts)".into(),
                })
            }
            Experts::Fused { .. } => Ok(0),
        }
    }

    /// This rank's partial output of expert `e` for the rows `x` (`[m, hidden]`).
    fn expert(&self, e: usize, x: &Tensor) -> Result<Tensor> {
        match &self.experts {
            Experts::Packed(v) => {
                let h = super::fused::silu_mul(&v[e].gate_up.forward(x)?)?;
                v[e].down.forward(&h)
            }
            Experts::Fused { gate_up, down } => {
                let dt = gate_up.dtype();
                let xin = x.to_dtype(dt)?;
                let h = super::fused::silu_mul(&xin.matmul(&gate_up.get(e)?.t()?)?)?;
                Ok(h.matmul(&down.get(e)?.t()?)?.to_dtype(x.dtype())?)
            }
        }
    }

    /// The block's output for `x` (`[.., hidden]`), whole on every rank.
    ///
    /// # Errors
    /// Kernel or collective errors, naming the block.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let run = || -> Result<Tensor> {
            let dims = x.dims().to_vec();
            let hidden = *dims.last().unwrap_or(&0);
            let flat = x.reshape(((), hidden))?;
            let routes = self.router.route(&flat)?;
            let n_exp = self.router.weight.dim(0)?;
            let mut by_expert: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n_exp];
            for (tok, r) in routes.iter().enumerate() {
                for &(e, w) in r {
                    by_expert[e].0.push(tok as u32);
                    by_expert[e].1.push(w);
                }
            }
            let dev = flat.device();
            let mut out = flat.zeros_like()?;
            for (e, (toks, ws)) in by_expert.iter().enumerate() {
                if toks.is_empty() {
                    continue;
                }
                let idx = Tensor::new(toks.as_slice(), dev)?;
                let y = self.expert(e, &flat.index_select(&idx, 0)?)?;
                let w = Tensor::new(ws.as_slice(), dev)?
                    .to_dtype(y.dtype())?
                    .unsqueeze(1)?;
                out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
            }
            Ok(self.comm.all_reduce_sum(&out)?.reshape(dims)?)
        };
        run().in_layer(&self.name)
    }
}
