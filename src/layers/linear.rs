//! The parallel linear layer and the one function that loads a linear weight.

use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use super::fused::{self, NormIn, Owed};
use super::lora::Lora;
use crate::comm::Communicator;
use crate::error::{Error, LayerContext, Result};
use crate::quant::{GgmlLinear, IsqType, QuantConfig, QuantMethod, UnquantLinear};
use crate::shard::Shard;
use crate::weights::WeightSource;

/// How a layer's per-rank outputs combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// Each rank keeps its own output: replicated layers, and column-parallel layers whose
    /// output feeds a row-parallel layer.
    None,
    /// Partial sums are all-reduced (row-parallel); the bias is added once, after.
    AllReduce,
    /// Output slices are concatenated along the last dimension (column-parallel with a full
    /// output, e.g. a vocab-parallel lm_head).
    AllGather,
}

/// A layer's output on this rank, with the all-reduce it may still owe (see
/// [`ParallelLinear::forward_owing`]).
#[derive(Debug, Clone)]
pub struct Partial<'a> {
    /// The output, or with `owed` this rank's part of it.
    pub y: Tensor,
    /// The all-reduce that makes `y` the output.
    pub owed: Option<Owed<'a>>,
}

impl<'a> Partial<'a> {
    /// An output that owes nothing.
    pub fn done(y: Tensor) -> Self {
        Self { y, owed: None }
    }

    /// The output, doing the all-reduce it owes.
    ///
    /// # Errors
    /// Collective errors.
    pub fn settle(self) -> Result<Tensor> {
        match self.owed {
            Some(o) => o.settle(&self.y),
            None => Ok(self.y),
        }
    }

    /// The same rows of the output (`f` applied to `y`; an owed all-reduce is per element).
    ///
    /// # Errors
    /// As `f`.
    pub fn map(self, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            y: f(&self.y)?,
            owed: self.owed,
        })
    }

    /// The input of the norm that follows: `x` plus this output, normed by `w`.
    pub fn norm_in<'b>(this: Option<&'b Self>, x: &'b Tensor, w: &'b Tensor, eps: f32) -> NormIn<'b>
    where
        'a: 'b,
    {
        NormIn {
            x,
            delta: this.map(|p| &p.y),
            owed: this.and_then(|p| p.owed),
            w,
            eps,
        }
    }
}

/// One weight tensor (or one chunk of a packed tensor) a rank loads: `{name}.weight` of full
/// shape `[out, in]`, narrowed by `shard` (dimension 0: output rows; 1: input columns).
#[derive(Debug, Clone)]
pub struct Piece {
    /// Tensor prefix; the weight is `{name}.weight`, the bias `{name}.bias`.
    pub name: String,
    /// Full output dimension of the tensor.
    pub out: usize,
    /// Full input dimension of the tensor.
    pub inp: usize,
    /// This rank's part.
    pub shard: Shard,
    /// Adapter merged into this piece at load.
    pub lora: Option<Lora>,
}

impl Piece {
    /// A piece covering `name` with the given shard and no adapter.
    pub fn new(name: impl Into<String>, out: usize, inp: usize, shard: Shard) -> Self {
        Self {
            name: name.into(),
            out,
            inp,
            shard,
            lora: None,
        }
    }

    /// Adds a LoRA adapter.
    pub fn with_lora(mut self, lora: Option<Lora>) -> Self {
        self.lora = lora;
        self
    }
}

/// Loads one piece: the only place that turns a quantization config into a layer.
///
/// With `bias` set, `{name}.bias` is loaded and sharded with the weight's output rows; a
/// bias of a row shard (input columns) is not this layer's to add and must be loaded by
/// the caller (see [`ParallelLinear::load`]).
///
/// # Errors
/// Missing tensors, shape or dtype mismatches (named), or shards that do not fit.
pub fn load_linear(
    quant: &QuantConfig,
    src: &dyn WeightSource,
    piece: &Piece,
    bias: bool,
) -> Result<Arc<dyn QuantMethod>> {
    let w_name = format!("{}.weight", piece.name);
    let b = if bias && piece.shard.dim() == 0 {
        src.expect_shape(&format!("{}.bias", piece.name), &[piece.out])?;
        Some(src.read(&format!("{}.bias", piece.name), &piece.shard, DType::F32)?)
    } else {
        None
    };
    if !matches!(quant, QuantConfig::Prequantized { .. }) {
        src.expect_shape(&w_name, &[piece.out, piece.inp])?;
    }
    let layer: Arc<dyn QuantMethod> = match quant {
        QuantConfig::Prequantized { dtype, format } => {
            super::prequantized::load(*format, *dtype, src, piece, b)?
        }
        QuantConfig::Unquantized { dtype } => {
            let b = b.map(|b| b.to_dtype(*dtype)).transpose()?;
            Arc::new(UnquantLinear::new(
                src.read(&w_name, &piece.shard, *dtype)?,
                b,
            )?)
        }
        QuantConfig::Ggml => match src.read_quantized(&w_name, &piece.shard)? {
            Some(q) => Arc::new(GgmlLinear::new(q, b)?),
            None => Arc::new(UnquantLinear::new(
                src.read(&w_name, &piece.shard, DType::F32)?,
                b,
            )?),
        },
    };
    match &piece.lora {
        Some(lora) => layer.add_delta_w(&lora.delta(piece.out, piece.inp, &piece.shard)?),
        None => Ok(layer),
    }
}

/// A tensor-parallel linear layer: this rank's weight pieces and how outputs combine.
#[derive(Debug, Clone)]
pub struct ParallelLinear {
    name: String,
    parts: Vec<Arc<dyn QuantMethod>>,
    /// Which tensor slice each part holds (empty for layers built from parts).
    pieces: Vec<Piece>,
    reduce: Reduce,
    /// Row-parallel bias, added once after the all-reduce.
    bias_after: Option<Tensor>,
    comm: Arc<dyn Communicator>,
    /// Every rank's output width, when known, for the all-gather of `Reduce::AllGather`.
    gather_sizes: Option<Vec<usize>>,
    /// Dense parts on a GPU as one matrix (the parts are views of it): one product per
    /// forward instead of one per part and a concatenation.
    merged: Option<Arc<dyn QuantMethod>>,
}

impl ParallelLinear {
    /// Loads a layer from its pieces.
    ///
    /// Column-parallel: pieces sharded on dimension 0, their outputs concatenated (merged
    /// chunks such as q/k/v or gate/up), biases sharded with them. Row-parallel
    /// (`Reduce::AllReduce`): one piece sharded on dimension 1; the full bias is added after
    /// the reduction. Replicated: full pieces, `Reduce::None`.
    ///
    /// # Errors
    /// As [`load_linear`], plus inconsistent pieces; errors name the layer.
    pub fn load(
        name: &str,
        quant: &QuantConfig,
        src: &dyn WeightSource,
        pieces: &[Piece],
        bias: bool,
        reduce: Reduce,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let inner = || -> Result<Self> {
            if pieces.is_empty() {
                return Err(Error::Config {
                    field: "pieces".into(),
                    reason: "a linear layer needs at least one piece".into(),
                });
            }
            let parts = pieces
                .iter()
                .map(|p| load_linear(quant, src, p, bias).in_layer(&p.name))
                .collect::<Result<Vec<_>>>()?;
            let row_bias = bias && pieces.iter().any(|p| p.shard.dim() == 1);
            if row_bias && pieces.len() != 1 {
                return Err(Error::Config {
                    field: "pieces".into(),
                    reason: "a row-parallel layer has exactly one piece".into(),
                });
            }
            let bias_after = if row_bias {
                let p = &pieces[0];
                let name = format!("{}.bias", p.name);
                src.expect_shape(&name, &[p.out])?;
                Some(src.read(&name, &Shard::full(), DType::F32)?)
            } else {
                None
            };
            Ok(Self {
                name: name.to_string(),
                parts,
                pieces: pieces.iter().map(|p| p.clone().with_lora(None)).collect(),
                reduce,
                bias_after,
                comm,
                gather_sizes: None,
                merged: None,
            })
        };
        inner().in_layer(name)
    }

    /// Builds a layer from already-loaded parts (tests, tools).
    pub fn from_parts(
        name: &str,
        parts: Vec<Arc<dyn QuantMethod>>,
        reduce: Reduce,
        bias_after: Option<Tensor>,
        comm: Arc<dyn Communicator>,
    ) -> Self {
        Self {
            name: name.to_string(),
            parts,
            pieces: Vec::new(),
            reduce,
            bias_after,
            comm,
            gather_sizes: None,
            merged: None,
        }
    }

    /// Tells a `Reduce::AllGather` layer every rank's output width (from the split plan),
    /// so the gather need not exchange them first.
    #[must_use]
    pub fn with_gather_sizes(mut self, sizes: Vec<usize>) -> Self {
        self.gather_sizes = Some(sizes);
        self
    }

    /// Layer name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This rank's weight pieces.
    pub fn parts(&self) -> &[Arc<dyn QuantMethod>] {
        &self.parts
    }

    /// The tensor slice each part holds, in part order (empty for layers built from parts).
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The bias added once after the reduction (row-parallel layers).
    pub fn bias_after(&self) -> Option<&Tensor> {
        self.bias_after.as_ref()
    }

    /// How outputs combine.
    pub fn reduce(&self) -> Reduce {
        self.reduce
    }

    /// Output widths of the pieces on this rank (to split merged outputs).
    pub fn part_widths(&self) -> Vec<usize> {
        self.parts.iter().map(|p| p.shape().0).collect()
    }

    /// `x @ W^T`, combined across ranks as the layer says, plus the bias.
    ///
    /// # Errors
    /// Kernel or collective errors, naming the layer.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Owing nothing, the output is whole.
        Ok(self.output(x, false)?.y)
    }

    /// [`Self::forward`], except that a row-parallel product whose all-reduce could be done
    /// by the norm that follows it (see [`fused::add_rms_norm_in`]) returns this rank's part
    /// and the all-reduce it owes, which the caller passes on in a [`NormIn`] or settles.
    ///
    /// # Errors
    /// Kernel or collective errors, naming the layer.
    pub fn forward_owing(&self, x: &Tensor) -> Result<Partial<'_>> {
        self.output(x, fused::norm_reduce_on())
    }

    /// The output of [`Self::forward`], or with `owe` of [`Self::forward_owing`].
    fn output(&self, x: &Tensor, owe: bool) -> Result<Partial<'_>> {
        (|| -> Result<Partial<'_>> {
            Ok(match self.reduced_product(x, owe)? {
                Some((y, Some(owed))) => Partial {
                    y,
                    owed: Some(owed),
                },
                Some((y, None)) => {
                    Partial::done(crate::quant::add_bias(y, self.bias_after.as_ref())?)
                }
                None => Partial::done(self.combine(self.product(x)?)?),
            })
        })()
        .in_layer(&self.name)
    }

    /// A row-parallel product that finishes its all-reduce in its own kernel over peer
    /// memory ([`fused::linear_reduced`]), where the communicator offers that
    /// ([`crate::comm::Communicator::reduce_target`], decided on shapes every rank shares,
    /// counting 4 bytes an element whatever the product's type). A rank whose product cannot
    /// (no dense unbiased weight, a shape the kernel does not take) runs its product and then
    /// an all-reduce of the same protocol, so ranks may differ in this; with `owe` and no
    /// bias to add after the sum, it returns its part with that all-reduce still owed.
    fn reduced_product(&self, x: &Tensor, owe: bool) -> Result<Option<(Tensor, Option<Owed<'_>>)>> {
        if !matches!(self.reduce, Reduce::AllReduce) {
            return Ok(None);
        }
        let rows: usize = x.dims().split_last().map_or(1, |(_, r)| r.iter().product());
        let width: usize = self.parts.iter().map(|p| p.shape().0).sum();
        let Some(target) = self.comm.reduce_target(rows * width * 4)? else {
            return Ok(None);
        };
        if let Some(w) = self.dense_unbiased() {
            if let Some(y) = fused::linear_reduced(x, w, target)? {
                return Ok(Some((y, None)));
            }
        }
        let owed = Owed {
            target,
            comm: &*self.comm,
        };
        let y = self.product(x)?;
        if owe && self.bias_after.is_none() {
            return Ok(Some((y, Some(owed))));
        }
        Ok(Some((owed.settle(&y)?, None)))
    }

    /// The product of the normed input `n` (see [`NormIn`]), then as [`Self::forward`];
    /// with `silu`, this rank's product goes through [`fused::silu_mul`] before it is
    /// combined (a merged gate/up layer). Returns the residual sum too. One kernel does
    /// the add, the norm, the product (and silu) where [`fused::norm_linear`] serves.
    ///
    /// # Errors
    /// Kernel or collective errors, naming the layer.
    pub fn forward_normed(&self, n: NormIn<'_>, silu: bool) -> Result<(Tensor, Tensor)> {
        let run = || -> Result<(Tensor, Tensor)> {
            // An owed all-reduce is done by the norm's kernel, not the GEMV's.
            let fused = match (self.dense_unbiased(), n.owed) {
                (Some(w), None) => fused::norm_linear(n, w, silu)?,
                _ => None,
            };
            let (x, y) = match fused {
                Some(r) => r,
                None => {
                    let (x, h) = fused::add_rms_norm_in(n)?;
                    let y = self.product(&h)?;
                    (x, if silu { fused::silu_mul(&y)? } else { y })
                }
            };
            Ok((x, self.combine(y)?))
        };
        run().in_layer(&self.name)
    }

    /// [`Self::forward_normed`] of a merged q/k/v layer for one token, with the rotary
    /// embedding and KV cache write in the same kernel ([`fused::norm_linear_rope`]): `(sum,
    /// rotated queries)`. `None` where that does not serve: outputs combined across ranks, a
    /// bias, a weight that is not one dense matrix, or the kernel's own conditions.
    ///
    /// # Errors
    /// A position outside the caches, kernel errors, naming the layer.
    pub fn forward_normed_rope(
        &self,
        n: NormIn<'_>,
        rope: fused::RopeIn<'_>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if !matches!(self.reduce, Reduce::None) || self.bias_after.is_some() || n.owed.is_some() {
            return Ok(None);
        }
        match self.dense_unbiased() {
            Some(w) => fused::norm_linear_rope(n, w, rope).in_layer(&self.name),
            None => Ok(None),
        }
    }

    /// This rank's whole weight as one dense matrix without a bias of its own, if it is one.
    fn dense_unbiased(&self) -> Option<&Tensor> {
        let part = match (&self.merged, self.parts.as_slice()) {
            (Some(m), _) => m,
            (None, [p]) => p,
            _ => return None,
        };
        match part.bias() {
            Some(_) => None,
            None => part.dense_weight(),
        }
    }

    /// This rank's product, its parts' outputs side by side.
    fn product(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.merged {
            Some(m) => m.forward(x)?,
            None => {
                let ys = self
                    .parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                if ys.len() == 1 {
                    ys.into_iter().next().unwrap_or_else(|| unreachable!())
                } else {
                    Tensor::cat(&ys, D::Minus1)?
                }
            }
        })
    }

    /// This rank's output combined across ranks as the layer says, plus the bias.
    fn combine(&self, y: Tensor) -> Result<Tensor> {
        let y = match self.reduce {
            Reduce::None => y,
            Reduce::AllReduce => self.comm.all_reduce_sum(&y)?,
            Reduce::AllGather => {
                let last = y.rank() - 1;
                match &self.gather_sizes {
                    Some(s) => self.comm.all_gather_sized(&y, last, s)?,
                    None => self.comm.all_gather(&y, last)?,
                }
            }
        };
        crate::quant::add_bias(y, self.bias_after.as_ref())
    }

    /// Moves every piece and the bias to `device`.
    ///
    /// # Errors
    /// A format without a device path, naming the layer; copy errors.
    pub fn move_to(&mut self, device: &candle_core::Device) -> Result<()> {
        if !device.is_cpu() && self.parts.len() > 1 {
            if let Some((merged, views)) = merge_dense(&self.parts, device)? {
                self.merged = Some(merged);
                self.parts = views;
                return Ok(());
            }
        }
        self.merged = None;
        let parts = self
            .parts
            .iter()
            .map(|p| p.to_device(device))
            .collect::<Result<Vec<_>>>()
            .in_layer(&self.name)?;
        self.parts = parts;
        self.bias_after = self
            .bias_after
            .as_ref()
            .map(|b| b.to_device(device))
            .transpose()?;
        Ok(())
    }

    /// Quantizes every piece to `ty` (with the block-alignment fallback per piece).
    ///
    /// # Errors
    /// Kernel errors, naming the layer.
    pub fn apply_isq(&mut self, ty: IsqType) -> Result<()> {
        use rayon::prelude::*;
        let parts = self
            .parts
            .par_iter()
            .map(|p| p.apply_isq(ty, &self.name))
            .collect::<Result<Vec<_>>>()
            .in_layer(&self.name)?;
        self.parts = parts;
        self.merged = None;
        Ok(())
    }
}

/// A merged matrix and the parts as views of it.
type Merged = (Arc<dyn QuantMethod>, Vec<Arc<dyn QuantMethod>>);

/// Dense parts of one dtype as one `[sum of outs, in]` matrix on `device` (biases likewise,
/// when every part has one), and the parts as views of it. `None` when the parts are not
/// all dense of one dtype, or only some have biases.
fn merge_dense(
    parts: &[Arc<dyn QuantMethod>],
    device: &candle_core::Device,
) -> Result<Option<Merged>> {
    let Some(ws) = parts
        .iter()
        .map(|p| p.dense_weight())
        .collect::<Option<Vec<&Tensor>>>()
    else {
        return Ok(None);
    };
    if ws.iter().any(|w| w.dtype() != ws[0].dtype()) {
        return Ok(None);
    }
    let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias()).collect();
    let bias = match biases.len() {
        0 => None,
        n if n == parts.len() => Some(Tensor::cat(&biases, 0)?.to_device(device)?),
        _ => return Ok(None),
    };
    let w = Tensor::cat(&ws, 0)?.to_device(device)?;
    let mut views: Vec<Arc<dyn QuantMethod>> = Vec::with_capacity(parts.len());
    let mut at = 0;
    for p in parts {
        let n = p.shape().0;
        let b = bias.as_ref().map(|b| b.narrow(0, at, n)).transpose()?;
        views.push(Arc::new(UnquantLinear::new(w.narrow(0, at, n)?, b)?));
        at += n;
    }
    Ok(Some((Arc::new(UnquantLinear::new(w, bias)?), views)))
}
