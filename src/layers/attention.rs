//! Attention projections: merged q/k/v column-parallel, o row-parallel, heads split by
//! [`crate::shard::plan_heads`] (whole KV groups, or replicated KV heads when there are more
//! ranks than KV heads).

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::fused::NormIn;
use super::linear::{ParallelLinear, Piece, Reduce};
use super::lora::LoraSet;
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::quant::{IsqType, QuantConfig};
use crate::shard::{plan_heads, HeadShard, Shard};
use crate::weights::WeightSource;

/// Sizes of an attention block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    /// Model width.
    pub hidden: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// q/k/v projections carry a bias (Qwen2-style).
    pub qkv_bias: bool,
    /// The output projection carries a bias.
    pub o_bias: bool,
}

/// This rank's query/key/value and output projections.
#[derive(Debug, Clone)]
pub struct AttentionProjections {
    /// Merged q, k, v (column-parallel; output is `[.., q | k | v]` for this rank's heads).
    pub qkv: ParallelLinear,
    /// Output projection (row-parallel, all-reduced).
    pub o: ParallelLinear,
    /// Which heads this rank owns.
    pub heads: HeadShard,
    /// Sizes.
    pub dims: AttentionDims,
}

/// The KV shard of the seed API: rows of a `[n_kv_heads * head_dim, hidden]` k/v weight
/// that `rank` holds (KV heads are replicated when `world_size > n_kv_heads`).
///
/// # Errors
/// No plan exists for these heads on this many ranks.
pub fn compute_kv_shard(
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rank: usize,
    world_size: usize,
) -> Result<Shard> {
    let plan = plan_heads(n_heads, n_kv_heads, head_dim, world_size, 1)?;
    Ok(plan[rank].kv_shard(head_dim, 0))
}

/// Query heads per local KV head on `rank` (the seed's `compute_n_kv_groups`), or `None` when
/// this rank's heads straddle KV groups unevenly and need [`expand_kv`]'s general mapping.
///
/// # Errors
/// No plan exists for these heads on this many ranks.
pub fn compute_n_kv_groups(
    n_heads: usize,
    n_kv_heads: usize,
    rank: usize,
    world_size: usize,
) -> Result<Option<usize>> {
    let plan = plan_heads(n_heads, n_kv_heads, 1, world_size, 1)?;
    Ok(plan[rank].uniform_group())
}

/// Expands this rank's KV heads `[b, n_kv_local, t, d]` to one per local query head
/// `[b, n_q_local, t, d]`, following [`HeadShard::kv_of_q`].
///
/// # Errors
/// The input does not have this rank's number of KV heads.
pub fn expand_kv(kv: &Tensor, heads: &HeadShard) -> Result<Tensor> {
    if kv.dim(1)? != heads.kv_heads.len() {
        return Err(Error::Config {
            field: "kv heads".into(),
            reason: format!(
                "tensor has {} heads, this rank holds {}",
                kv.dim(1)?,
                heads.kv_heads.len()
            ),
        });
    }
    if let Some(g) = heads.uniform_group() {
        if g == 1 {
            return Ok(kv.clone());
        }
        let (b, n, t, d) = kv.dims4()?;
        return Ok(kv
            .unsqueeze(2)?
            .expand((b, n, g, t, d))?
            .reshape((b, n * g, t, d))?);
    }
    let idx: Vec<u32> = heads.kv_of_q.iter().map(|&k| k as u32).collect();
    let idx = Tensor::from_vec(idx, heads.kv_of_q.len(), &Device::Cpu)?.to_device(kv.device())?;
    Ok(kv.contiguous()?.index_select(&idx, 1)?)
}

impl AttentionProjections {
    /// Loads `{prefix}.{q,k,v,o}_proj` for this rank. `align` is the block size the
    /// row-parallel `o_proj` shard must respect (1 for dense weights).
    ///
    /// # Errors
    /// No head plan, missing or mis-shaped tensors (named).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        prefix: &str,
        dims: AttentionDims,
        quant: &QuantConfig,
        src: &dyn WeightSource,
        comm: Arc<dyn Communicator>,
        align: usize,
        lora: Option<&LoraSet>,
    ) -> Result<Self> {
        let plan = plan_heads(
            dims.n_heads,
            dims.n_kv_heads,
            dims.head_dim,
            comm.world_size(),
            align,
        )?;
        let heads = plan[comm.rank()].clone();
        let hd = dims.head_dim;
        let lora_for = |n: &str| lora.and_then(|l| l.for_layer(n));
        let piece = |proj: &str, out: usize, shard: Shard| {
            let name = format!("{prefix}.{proj}");
            let l = lora_for(&name);
            Piece::new(name, out, dims.hidden, shard).with_lora(l)
        };
        let qkv_pieces = [
            piece("q_proj", dims.n_heads * hd, heads.q_shard(hd, 0)),
            piece("k_proj", dims.n_kv_heads * hd, heads.kv_shard(hd, 0)),
            piece("v_proj", dims.n_kv_heads * hd, heads.kv_shard(hd, 0)),
        ];
        let qkv = ParallelLinear::load(
            &format!("{prefix}.qkv"),
            quant,
            src,
            &qkv_pieces,
            dims.qkv_bias,
            Reduce::None,
            comm.clone(),
        )?;
        let o_name = format!("{prefix}.o_proj");
        let o_piece = Piece::new(
            o_name.clone(),
            dims.hidden,
            dims.n_heads * hd,
            heads.q_shard(hd, 1),
        )
        .with_lora(lora_for(&o_name));
        let o = ParallelLinear::load(
            &o_name,
            quant,
            src,
            &[o_piece],
            dims.o_bias,
            Reduce::AllReduce,
            comm,
        )?;
        Ok(Self {
            qkv,
            o,
            heads,
            dims,
        })
    }

    /// This rank's `(q, k, v)` for `x` (`[.., hidden]`): widths `local q heads * head_dim`
    /// and `local kv heads * head_dim`.
    ///
    /// # Errors
    /// Kernel errors.
    pub fn qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        self.split_qkv(&self.qkv.forward(x)?)
    }

    /// A merged q/k/v product split into its three parts.
    fn split_qkv(&self, y: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let hd = self.dims.head_dim;
        let nq = self.heads.q_heads.len() * hd;
        let nkv = self.heads.kv_heads.len() * hd;
        let last = y.rank() - 1;
        Ok((
            y.narrow(last, 0, nq)?,
            y.narrow(last, nq, nkv)?,
            y.narrow(last, nq + nkv, nkv)?,
        ))
    }

    /// [`Self::qkv`] of the normed input `n`: `(residual sum, (q, k, v))`, see
    /// [`ParallelLinear::forward_normed`].
    ///
    /// # Errors
    /// Kernel errors.
    pub fn qkv_normed(&self, n: NormIn<'_>) -> Result<(Tensor, (Tensor, Tensor, Tensor))> {
        let (x, y) = self.qkv.forward_normed(n, false)?;
        Ok((x, self.split_qkv(&y)?))
    }

    /// [`Self::qkv_normed`] of one token with the rotary embedding and KV cache write `rope`
    /// in the same kernel: `(residual sum, rotated queries [1, q heads, 1, head_dim])`, or
    /// `None` where that kernel does not serve (nothing computed or written then), see
    /// [`crate::layers::fused::norm_linear_rope`].
    ///
    /// # Errors
    /// A position outside the caches, kernel errors.
    pub fn qkv_rotated(
        &self,
        n: NormIn<'_>,
        rope: crate::layers::fused::RopeIn<'_>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        self.qkv.forward_normed_rope(n, rope)
    }

    /// Output projection of this rank's attention output (`[.., local q heads * head_dim]`),
    /// all-reduced: the full `[.., hidden]` on every rank.
    ///
    /// # Errors
    /// Kernel or collective errors.
    pub fn o(&self, attn: &Tensor) -> Result<Tensor> {
        self.o.forward(attn)
    }

    /// [`Self::o`], whose all-reduce may still be owed (see
    /// [`ParallelLinear::forward_owing`]).
    ///
    /// # Errors
    /// Kernel or collective errors.
    pub fn o_owing(&self, attn: &Tensor) -> Result<super::Partial<'_>> {
        self.o.forward_owing(attn)
    }

    /// Quantizes all four projections.
    ///
    /// # Errors
    /// Kernel errors.
    pub fn apply_isq(&mut self, ty: IsqType) -> Result<()> {
        self.qkv.apply_isq(ty)?;
        self.o.apply_isq(ty)
    }
}
