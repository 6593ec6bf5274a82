//! Loading one rank's piece of a pre-quantized linear (FP8, MXFP4, GPTQ/AWQ), chosen by the
//! tensors the checkpoint holds for it, so layers a checkpoint left dense (routers, `lm_head`,
//! `modules_to_not_convert`) load dense.
//!
//! A shard whose boundaries fall on the format's blocks keeps the format. One that cuts a block
//! (any world size runs any model) reads the blocks covering it, expands them and keeps its
//! slice dense, with a warning. GPTQ/AWQ pieces are expanded to the compute dtype on load.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::linear::Piece;
use crate::error::{Error, Result};
use crate::quant::fp8::blocks_of;
use crate::quant::int4::{self, Int4Groups, Int4Packing, QWindow};
use crate::quant::mxfp4::MXFP4_BLOCK;
use crate::quant::{Fp8Linear, Mxfp4Linear, PrequantFormat, QuantMethod, UnquantLinear};
use crate::shard::Shard;
use crate::weights::{FileDType, WeightSource};

/// Where the piece sits in the split dimension: `(dim, offset, len, full)`.
fn span(piece: &Piece) -> Result<(usize, usize, usize, usize)> {
    let d = piece.shard.dim();
    let full = if d == 0 { piece.out } else { piece.inp };
    let (o, l) = piece.shard.resolve(full)?;
    Ok((d, o, l, full))
}

/// Blocks of `b` elements covering `o..o + l` of a dimension of `full`.
fn covering(o: usize, l: usize, b: usize) -> std::ops::Range<usize> {
    o / b..(o + l).div_ceil(b)
}

fn aligned(o: usize, l: usize, full: usize, b: usize) -> bool {
    o % b == 0 && (l % b == 0 || o + l == full)
}

fn warn_cut(piece: &Piece, format: &str, block: usize) {
    tracing::warn!(
        tensor = %piece.name,
        shard = %piece.shard,
        "this split cuts {format} blocks of {block}; the piece loads dense"
    );
}

fn dense_slice(
    w: Tensor,
    d: usize,
    skip: usize,
    len: usize,
    dtype: DType,
    bias: Option<Tensor>,
) -> Result<Arc<dyn QuantMethod>> {
    let w = w.narrow(d, skip, len)?.contiguous()?.to_dtype(dtype)?;
    Ok(Arc::new(UnquantLinear::new(
        w,
        bias.map(|b| b.to_dtype(dtype)).transpose()?,
    )?))
}

/// Loads `piece` of a pre-quantized checkpoint (see the module docs). `bias` is the piece's
/// own bias slice, if any.
///
/// # Errors
/// Missing scales or zeros, shapes that disagree with the configuration (block or group size),
/// named by tensor.
pub fn load(
    format: PrequantFormat,
    dtype: DType,
    src: &dyn WeightSource,
    piece: &Piece,
    bias: Option<Tensor>,
) -> Result<Arc<dyn QuantMethod>> {
    let n = &piece.name;
    if src.contains(&format!("{n}.qweight")) {
        let PrequantFormat::Int4 { packing, group } = format else {
            return Err(Error::Config {
                field: "quantization_config.quant_method".into(),
                reason: format!(
                    "`{n}.qweight` is a GPTQ/AWQ tensor but the checkpoint says `{}`",
                    format.name()
                ),
            });
        };
        return load_int4(packing, group, dtype, src, piece, bias);
    }
    if src.contains(&format!("{n}.weight_blocks")) {
        return load_mxfp4(dtype, src, piece, bias);
    }
    let w_name = format!("{n}.weight");
    let meta = src.expect_shape(&w_name, &[piece.out, piece.inp])?;
    if meta.dtype == FileDType::Dense(DType::F8E4M3) {
        let block = match format {
            PrequantFormat::Fp8 { block } => block,
            _ => None,
        };
        return load_fp8(block, dtype, src, piece, bias);
    }
    let w = src.read(&w_name, &piece.shard, dtype)?;
    Ok(Arc::new(UnquantLinear::new(
        w,
        bias.map(|b| b.to_dtype(dtype)).transpose()?,
    )?))
}

fn load_fp8(
    block: Option<[usize; 2]>,
    dtype: DType,
    src: &dyn WeightSource,
    piece: &Piece,
    bias: Option<Tensor>,
) -> Result<Arc<dyn QuantMethod>> {
    let n = &piece.name;
    let w_name = format!("{n}.weight");
    let s_name = [format!("{n}.weight_scale_inv"), format!("{n}.weight_scale")]
        .into_iter()
        .find(|s| src.contains(s))
        .ok_or_else(|| Error::MissingTensor {
            file: src.location().to_path_buf(),
            tensor: format!(
                "{n}.weight_scale_inv (or {n}.weight_scale): the scales of FP8 `{w_name}`"
            ),
        })?;
    let s_meta = src.meta(&s_name)?;
    let (d, o, l, full) = span(piece)?;
    let full_dims = [piece.out, piece.inp];
    let Some(block) = block.filter(|_| s_meta.shape.iter().product::<usize>() != 1) else {
        // One scale for the whole tensor: any slice keeps it.
        if s_meta.shape.iter().product::<usize>() != 1 {
            return Err(Error::Config {
                field: format!("{}: {s_name}", s_meta.file.display()),
                reason: format!(
                    "shape {:?}: a per-tensor FP8 checkpoint (no weight_block_size) needs one \
                     scale",
                    s_meta.shape
                ),
            });
        }
        let w = src.read(&w_name, &piece.shard, DType::F8E4M3)?;
        let s = src.read(&s_name, &Shard::full(), DType::F32)?;
        return Ok(Arc::new(Fp8Linear::per_tensor(w, s, bias, dtype)?));
    };
    let want = [
        blocks_of(piece.out, block[0]),
        blocks_of(piece.inp, block[1]),
    ];
    if s_meta.shape != want {
        return Err(Error::Config {
            field: format!("{}: {s_name}", s_meta.file.display()),
            reason: format!(
                "shape {:?} does not match weight {full_dims:?} in blocks of {block:?} \
                 (weight_block_size; expected {want:?})",
                s_meta.shape
            ),
        });
    }
    let b = block[d];
    let blocks = covering(o, l, b);
    let s = src.read(&s_name, &Shard::range(d, blocks.clone()), DType::F32)?;
    if aligned(o, l, full, b) {
        let w = src.read(&w_name, &piece.shard, DType::F8E4M3)?;
        return Ok(Arc::new(Fp8Linear::new(w, s, block, bias, dtype)?));
    }
    warn_cut(piece, "FP8", b);
    let c0 = blocks.start * b;
    let c1 = (blocks.end * b).min(full);
    let w = src.read(&w_name, &Shard::range(d, c0..c1), DType::F8E4M3)?;
    let wide = Fp8Linear::new(w, s, block, None, DType::F32)?.dequantize_w()?;
    dense_slice(wide, d, o - c0, l, dtype, bias)
}

fn load_mxfp4(
    dtype: DType,
    src: &dyn WeightSource,
    piece: &Piece,
    bias: Option<Tensor>,
) -> Result<Arc<dyn QuantMethod>> {
    let n = &piece.name;
    let (bn, sn) = (format!("{n}.weight_blocks"), format!("{n}.weight_scales"));
    if piece.inp % MXFP4_BLOCK != 0 {
        return Err(Error::Config {
            field: bn,
            reason: format!(
                "{} inputs are not a multiple of the MXFP4 block of {MXFP4_BLOCK}",
                piece.inp
            ),
        });
    }
    let nb = piece.inp / MXFP4_BLOCK;
    src.expect_shape(&bn, &[piece.out, nb, MXFP4_BLOCK / 2])?;
    src.expect_shape(&sn, &[piece.out, nb])?;
    let (d, o, l, full) = span(piece)?;
    if d == 0 {
        let blocks = src.read(&bn, &piece.shard, DType::U8)?;
        let scales = src.read(&sn, &piece.shard, DType::U8)?;
        return Ok(Arc::new(Mxfp4Linear::new(blocks, scales, bias, dtype)?));
    }
    let cover = covering(o, l, MXFP4_BLOCK);
    let blocks = src.read(&bn, &Shard::range(1, cover.clone()), DType::U8)?;
    let scales = src.read(&sn, &Shard::range(1, cover.clone()), DType::U8)?;
    let q = Mxfp4Linear::new(blocks, scales, bias.clone(), dtype)?;
    if aligned(o, l, full, MXFP4_BLOCK) {
        return Ok(Arc::new(q));
    }
    warn_cut(piece, "MXFP4", MXFP4_BLOCK);
    dense_slice(
        q.dequantize_w()?,
        1,
        o - cover.start * MXFP4_BLOCK,
        l,
        dtype,
        bias,
    )
}

fn ints(src: &dyn WeightSource, name: &str, shard: &Shard) -> Result<Vec<i32>> {
    Ok(src
        .read(name, shard, DType::I32)?
        .flatten_all()?
        .to_vec1::<i32>()?)
}

fn load_int4(
    packing: Int4Packing,
    group: Option<usize>,
    dtype: DType,
    src: &dyn WeightSource,
    piece: &Piece,
    bias: Option<Tensor>,
) -> Result<Arc<dyn QuantMethod>> {
    let n = &piece.name;
    let (out, inp) = (piece.out, piece.inp);
    let qn = format!("{n}.qweight");
    let bad = |field: &str, reason: String| Error::Config {
        field: format!("{}: {n}.{field}", src.location().display()),
        reason,
    };
    if out % 8 != 0 || inp % 8 != 0 {
        return Err(bad(
            "qweight",
            format!("weight [{out}, {inp}] is not a whole number of 8-code words"),
        ));
    }
    let group = group.unwrap_or(inp);
    if inp % group != 0 {
        return Err(bad(
            "scales",
            format!(
                "group_size {group} does not divide the {inp} inputs; no split can align to it"
            ),
        ));
    }
    let groups = inp / group;
    match packing {
        Int4Packing::Gptq { .. } => src.expect_shape(&qn, &[inp / 8, out])?,
        Int4Packing::Awq => src.expect_shape(&qn, &[inp, out / 8])?,
    };
    for (name, shape) in [("qzeros", [groups, out / 8]), ("scales", [groups, out])] {
        let full = format!("{n}.{name}");
        let meta = src.meta(&full).map_err(|_| Error::MissingTensor {
            file: src.location().to_path_buf(),
            tensor: format!("{full} (the {name} of `{qn}`)"),
        })?;
        if meta.shape != shape {
            return Err(bad(
                name,
                format!(
                    "shape {:?}, expected {shape:?} for weight [{out}, {inp}] with group_size \
                     {group}",
                    meta.shape
                ),
            ));
        }
    }
    let qzeros = ints(src, &format!("{n}.qzeros"), &Shard::full())?;
    let scales = src
        .read(&format!("{n}.scales"), &Shard::full(), DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let gi = format!("{n}.g_idx");
    let g_idx: Vec<usize> = if matches!(packing, Int4Packing::Gptq { .. }) && src.contains(&gi) {
        src.expect_shape(&gi, &[inp])?;
        let v = ints(src, &gi, &Shard::full())?;
        v.into_iter()
            .map(|g| usize::try_from(g).ok().filter(|&g| g < groups))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("g_idx", format!("holds a group outside 0..{groups}")))?
    } else {
        (0..inp).map(|i| i / group).collect()
    };
    let (d, o, l, _) = span(piece)?;
    let (outs, ins) = if d == 0 {
        (o..o + l, 0..inp)
    } else {
        (0..out, o..o + l)
    };
    // The window of packed words holding the piece.
    let (wshard, row0, col0, cols) = match (packing, d) {
        (Int4Packing::Gptq { .. }, 0) => (Shard::range(1, outs.clone()), 0, o, l),
        (Int4Packing::Gptq { .. }, _) => {
            let rows = covering(o, l, 8);
            (Shard::range(0, rows.clone()), rows.start, 0, out)
        }
        (Int4Packing::Awq, 0) => {
            let words = covering(o, l, 8);
            let cols = words.len();
            (Shard::range(1, words.clone()), 0, words.start, cols)
        }
        (Int4Packing::Awq, _) => (Shard::range(0, ins.clone()), o, 0, out / 8),
    };
    let words = ints(src, &qn, &wshard)?;
    let w = int4::dequantize(
        packing,
        &QWindow {
            words: &words,
            cols,
            row0,
            col0,
        },
        &Int4Groups {
            qzeros: &qzeros,
            scales: &scales,
            g_idx: &g_idx,
            out,
        },
        outs.clone(),
        ins.clone(),
    );
    let w = Tensor::from_vec(w, (outs.len(), ins.len()), &candle_core::Device::Cpu)?;
    dense_slice(w, 0, 0, outs.len(), dtype, bias)
}
