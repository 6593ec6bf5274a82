//! Writing a sharded model as a UQFF file set ([`crate::weights::uqff`]): every rank writes
//! its own pieces ([`write_rank_file`]), then the coordinator writes the index that makes the
//! set complete ([`write_index`]). Every file goes through a temporary name, fsync and rename,
//! and the index comes last: a crash never leaves a set that looks complete.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

use super::config::ModelConfig;
use super::decoder::Model;
use crate::error::{Error, Result};
use crate::weights::uqff::{
    dtype_name, tag, Entry, Index, IndexFile, RankHeader, Slice, FORMAT, HEADER_KEY, VERSION,
};

/// Path of `rank`'s file for index `index`.
pub fn rank_file(index: &Path, rank: usize, world: usize) -> PathBuf {
    let mut name = index.as_os_str().to_owned();
    name.push(format!(".rank{rank}-of-{world}.safetensors"));
    PathBuf::from(name)
}

/// Hash of the parts of a configuration that decide the weights' shapes and meaning.
pub fn config_hash(cfg: &ModelConfig) -> String {
    let key = format!(
        "{}|{}|{}|{}|{}|{}|{}|{}|{}",
        cfg.arch.name(),
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.rope_interleaved
    );
    let d = Sha256::digest(key.as_bytes());
    d.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

fn bytes_of(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match t.dtype() {
        DType::U8 => t.flatten_all()?.to_vec1::<u8>()?,
        DType::F8E4M3 => t
            .flatten_all()?
            .to_vec1::<float8::F8E4M3>()?
            .iter()
            .map(float8::F8E4M3::to_bits)
            .collect(),
        _ => crate::comm::wire::tensor_to_bytes(t)?,
    })
}

/// The scale block an FP8 piece is stored with: `None` for one scale per tensor. Its grid must
/// be a slice of the whole tensor's grid (the piece starts on a block boundary).
fn fp8_block_of(
    part: &dyn crate::quant::QuantMethod,
    piece: &crate::layers::Piece,
    full: [usize; 2],
) -> Result<Option<[usize; 2]>> {
    let Some(b) = part.scale_block() else {
        return Ok(None);
    };
    let dim = piece.shard.dim();
    let (start, _) = piece.shard.resolve(full[dim])?;
    if start % b[dim] != 0 {
        return Err(Error::Unsupported {
            what: format!(
                "storing FP8 piece `{}` ({}): it starts at {start}, inside a block of {}",
                piece.name, piece.shard, b[dim]
            ),
            by: "the UQFF writer (quantize at a world size whose splits fall on FP8 blocks)".into(),
        });
    }
    Ok(Some(b))
}

/// Writes this rank's pieces of `model` next to `index` (see [`rank_file`]), atomically.
/// Returns the file and its size.
///
/// # Errors
/// A layer format without a persistent form, I/O errors (named).
pub fn write_rank_file(
    model: &Model,
    index: &Path,
    rank: usize,
    world: usize,
) -> Result<(PathBuf, u64)> {
    let path = rank_file(index, rank, world);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut add = |tensor: String,
                   t: Tensor,
                   format: u8,
                   ggml: Option<String>,
                   shape: Vec<usize>,
                   slice: Option<Slice>,
                   block: Option<[usize; 2]>|
     -> Result<()> {
        let t = t.contiguous()?;
        let key = format!("p{}", entries.len());
        let crc32 = crc32fast::hash(&bytes_of(&t)?);
        entries.push(Entry {
            tensor,
            key: key.clone(),
            format,
            dtype: (format != tag::GGUF).then(|| dtype_name(t.dtype())),
            ggml_type: ggml,
            shape,
            slice,
            crc32,
            block,
        });
        tensors.push((key, t));
        Ok(())
    };
    if model.has_fused_experts() {
        return Err(Error::Unsupported {
            what: "storing fused (stacked) experts".into(),
            by: "the UQFF writer (load with --moe packed to quantize and store)".into(),
        });
    }
    let mut sliced = BTreeSet::new();
    for lin in model.linears() {
        if lin.pieces().len() != lin.parts().len() {
            return Err(Error::Unsupported {
                what: format!("serializing `{}` (built without piece records)", lin.name()),
                by: "the UQFF writer".into(),
            });
        }
        for (piece, part) in lin.pieces().iter().zip(lin.parts()) {
            let full = [piece.out, piece.inp];
            let dim = piece.shard.dim();
            let (start, len) = piece.shard.resolve(full[dim])?;
            let slice = Slice { dim, start, len };
            let fp8_block = fp8_block_of(part.as_ref(), piece, full)?;
            for (suffix, t) in part.persist_tensors()? {
                let mut block = None;
                let (name, format, ggml, shape, slice) = match suffix.as_str() {
                    "weight.ggml" => (
                        format!("{}.weight", piece.name),
                        tag::GGUF,
                        Some(part.format()),
                        full.to_vec(),
                        slice,
                    ),
                    "weight" => (
                        format!("{}.weight", piece.name),
                        tag::UNQUANT,
                        None,
                        full.to_vec(),
                        slice,
                    ),
                    "weight.fp8" => {
                        block = fp8_block;
                        (
                            format!("{}.weight", piece.name),
                            tag::FP8,
                            None,
                            full.to_vec(),
                            slice,
                        )
                    }
                    "weight_scale_inv" => match fp8_block {
                        // One scale for the tensor: every rank holds (and writes) it whole.
                        None => {
                            let name = format!("{}.weight_scale", piece.name);
                            add(
                                name,
                                t.flatten_all()?,
                                tag::UNQUANT,
                                None,
                                vec![1],
                                None,
                                None,
                            )?;
                            continue;
                        }
                        Some(b) => {
                            let grid = [full[0].div_ceil(b[0]), full[1].div_ceil(b[1])];
                            let s = Slice {
                                dim,
                                start: start / b[dim],
                                len: t.dim(dim)?,
                            };
                            (
                                format!("{}.weight_scale_inv", piece.name),
                                tag::UNQUANT,
                                None,
                                grid.to_vec(),
                                s,
                            )
                        }
                    },
                    "weight_blocks" | "weight_scales" => {
                        let nb = piece.inp / crate::quant::mxfp4::MXFP4_BLOCK;
                        let mut shape = vec![piece.out, nb];
                        if suffix == "weight_blocks" {
                            shape.push(crate::quant::mxfp4::MXFP4_BLOCK / 2);
                        }
                        let s = if dim == 0 {
                            slice
                        } else {
                            let b = crate::quant::mxfp4::MXFP4_BLOCK;
                            Slice {
                                dim,
                                start: start / b,
                                len: len / b,
                            }
                        };
                        (
                            format!("{}.{suffix}", piece.name),
                            tag::MXFP4,
                            None,
                            shape,
                            s,
                        )
                    }
                    "bias" => (
                        format!("{}.bias", piece.name),
                        tag::UNQUANT,
                        None,
                        vec![piece.out],
                        Slice { dim: 0, start, len },
                    ),
                    other => {
                        return Err(Error::Unsupported {
                            what: format!("persisted tensor kind `{other}` of `{}`", lin.name()),
                            by: "the UQFF writer".into(),
                        })
                    }
                };
                sliced.insert(name.clone());
                add(name, t, format, ggml, shape, Some(slice), block)?;
            }
        }
        if let (Some(b), Some(p), 0) = (lin.bias_after(), lin.pieces().first(), rank) {
            add(
                format!("{}.bias", p.name),
                b.clone(),
                tag::UNQUANT,
                None,
                b.dims().to_vec(),
                None,
                None,
            )?;
        }
    }
    if rank == 0 {
        for (name, t) in model.replicated_tensors() {
            // A tied lm_head stores the embedding as pieces already.
            if !sliced.contains(&name) {
                let shape = t.dims().to_vec();
                add(name, t, tag::UNQUANT, None, shape, None, None)?;
            }
        }
    }
    let header = RankHeader {
        format: FORMAT.into(),
        version: VERSION,
        rank,
        world_size: world,
        config_hash: config_hash(model.config()),
        entries,
    };
    let meta = HashMap::from([(
        HEADER_KEY.to_string(),
        serde_json::to_string(&header).map_err(|e| Error::BadFile {
            file: path.clone(),
            reason: format!("cannot encode the header: {e}"),
        })?,
    )]);
    let bytes =
        safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
            .map_err(|e| Error::BadFile {
                file: path.clone(),
                reason: format!("cannot serialize: {e}"),
            })?;
    crate::fsutil::write_atomic(&path, &bytes)?;
    Ok((path, bytes.len() as u64))
}

/// Writes the index naming the rank files, last and atomically.
///
/// # Errors
/// I/O errors (named).
pub fn write_index(
    index: &Path,
    cfg: &ModelConfig,
    isq: Vec<String>,
    files: &[(PathBuf, u64)],
) -> Result<()> {
    let idx = Index {
        format: FORMAT.into(),
        version: VERSION,
        world_size: files.len(),
        config_hash: config_hash(cfg),
        architecture: cfg.arch.name().into(),
        isq,
        files: files
            .iter()
            .map(|(p, bytes)| IndexFile {
                name: p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                bytes: *bytes,
            })
            .collect(),
    };
    let text = serde_json::to_string_pretty(&idx).map_err(|e| Error::BadFile {
        file: index.to_path_buf(),
        reason: format!("cannot encode the index: {e}"),
    })?;
    crate::fsutil::write_atomic(index, text.as_bytes())
}
