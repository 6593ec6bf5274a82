//! SwiGLU MLP: gate/up column-parallel (merged), down row-parallel.

use std::sync::Arc;

use candle_core::Tensor;

use super::fused::NormIn;
use super::linear::{ParallelLinear, Partial, Piece, Reduce};
use super::lora::LoraSet;
use crate::comm::Communicator;
use crate::error::Result;
use crate::quant::{IsqType, QuantConfig};
use crate::shard::{plan_split, Shard, SplitSpec};
use crate::weights::WeightSource;

/// This rank's slice of a SwiGLU MLP.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Merged gate and up projections (column-parallel): output `[.., gate | up]`.
    pub gate_up: ParallelLinear,
    /// Down projection (row-parallel, all-reduced).
    pub down: ParallelLinear,
}

/// The pieces of a packed tensor of `chunks` equal chunks along its output rows (e.g.
/// `gate_up_proj` = `[gate; up]`), taking `range` of every chunk: the seed's `new_merged`
/// (chunk i of rank r is shard `i * world + r` of `chunks * world`), generalised to uneven
/// ranges.
pub fn chunk_pieces(
    name: &str,
    out_total: usize,
    inp: usize,
    chunks: usize,
    range: std::ops::Range<usize>,
) -> Vec<Piece> {
    let chunk = out_total / chunks;
    (0..chunks)
        .map(|i| {
            Piece::new(
                name,
                out_total,
                inp,
                Shard::range(0, i * chunk + range.start..i * chunk + range.end),
            )
        })
        .collect()
}

impl Mlp {
    /// Loads `{prefix}.gate_proj`/`up_proj` (or a packed `{prefix}.gate_up_proj`) and
    /// `{prefix}.down_proj`, splitting the intermediate dimension with boundaries aligned to
    /// `align` elements (the block size of the down projection's format).
    ///
    /// # Errors
    /// No plan for the intermediate dimension, missing or mis-shaped tensors (named).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        prefix: &str,
        hidden: usize,
        intermediate: usize,
        quant: &QuantConfig,
        src: &dyn WeightSource,
        comm: Arc<dyn Communicator>,
        align: usize,
        lora: Option<&LoraSet>,
    ) -> Result<Self> {
        let ranges = plan_split(
            &SplitSpec {
                name: "intermediate_size",
                units: intermediate,
                unit_elems: 1,
                align,
            },
            comm.world_size(),
        )?;
        let range = ranges[comm.rank()].clone();
        let lora_for = |n: &str| lora.and_then(|l| l.for_layer(n));
        let packed = format!("{prefix}.gate_up_proj");
        let gate_up_pieces = if src.contains(&format!("{packed}.weight")) {
            chunk_pieces(&packed, 2 * intermediate, hidden, 2, range.clone())
        } else {
            ["gate_proj", "up_proj"]
                .iter()
                .map(|p| {
                    let name = format!("{prefix}.{p}");
                    let l = lora_for(&name);
                    Piece::new(name, intermediate, hidden, Shard::range(0, range.clone()))
                        .with_lora(l)
                })
                .collect()
        };
        let gate_up = ParallelLinear::load(
            &format!("{prefix}.gate_up"),
            quant,
            src,
            &gate_up_pieces,
            false,
            Reduce::None,
            comm.clone(),
        )?;
        let down_name = format!("{prefix}.down_proj");
        let down_piece = Piece::new(
            down_name.clone(),
            hidden,
            intermediate,
            Shard::range(1, range),
        )
        .with_lora(lora_for(&down_name));
        let down = ParallelLinear::load(
            &down_name,
            quant,
            src,
            &[down_piece],
            false,
            Reduce::AllReduce,
            comm,
        )?;
        Ok(Self { gate_up, down })
    }

    /// `down(silu(gate(x)) * up(x))`, all-reduced: the full output on every rank.
    ///
    /// # Errors
    /// Kernel or collective errors.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = super::fused::silu_mul(&self.gate_up.forward(x)?)?;
        self.down.forward(&h)
    }

    /// [`Self::forward`] of the normed input `n`: `(residual sum, output)`, the norm, the
    /// gate/up product and silu in one kernel where it serves (see
    /// [`ParallelLinear::forward_normed`]); the output may still owe its all-reduce (see
    /// [`ParallelLinear::forward_owing`]).
    ///
    /// # Errors
    /// Kernel or collective errors.
    pub fn forward_normed(&self, n: NormIn<'_>) -> Result<(Tensor, Partial<'_>)> {
        let (x, h) = self.gate_up.forward_normed(n, true)?;
        Ok((x, self.down.forward_owing(&h)?))
    }

    /// Moves the projections to `device`.
    ///
    /// # Errors
    /// As [`ParallelLinear::move_to`].
    pub fn move_to(&mut self, device: &candle_core::Device) -> Result<()> {
        self.gate_up.move_to(device)?;
        self.down.move_to(device)
    }

    /// Quantizes all three projections.
    ///
    /// # Errors
    /// Kernel errors.
    pub fn apply_isq(&mut self, ty: IsqType) -> Result<()> {
        self.gate_up.apply_isq(ty)?;
        self.down.apply_isq(ty)
    }
}
