//! UQFF-style files: a quantized model written by a sharded cluster and reloaded at any world
//! size. See `docs/uqff.md` for the layout. An index (`model.uqff`, JSON) names one
//! safetensors file per rank; each holds that rank's pieces in their storage format (GGML
//! blocks as bytes, dense tensors as themselves) and a header describing every piece: the
//! full tensor it belongs to, which slice, its format tag and type, and a CRC-32.
//!
//! [`UqffSource`] serves the pieces back as whole tensors under their checkpoint names, so
//! the model loader re-slices them for the new world size like any other checkpoint:
//! quantized blocks are copied as they are when the new split falls on block boundaries, and
//! a split that would cut a block is an error naming the tensor and both splits.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::copy::shard_runs;
use super::gguf::{block_units, quantized_shard};
use super::{FileDType, TensorMeta, WeightSource};
use crate::error::{Error, Result};
use crate::shard::Shard;

/// Value of the `format` field of index and rank headers.
pub const FORMAT: &str = "shardwise-uqff";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Safetensors metadata key holding a rank file's [`RankHeader`] (JSON).
pub const HEADER_KEY: &str = "uqff";

/// Format tags, numbered as the seed numbers them.
pub mod tag {
    /// GGML blocks.
    pub const GGUF: u8 = 0;
    /// Dense weights.
    pub const UNQUANT: u8 = 1;
    /// FP8.
    pub const FP8: u8 = 3;
    /// MXFP4.
    pub const MXFP4: u8 = 6;
}

/// Which slice of the full tensor a piece holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    /// Dimension cut.
    pub dim: usize,
    /// First index.
    pub start: usize,
    /// Number of indices.
    pub len: usize,
}

/// One stored piece.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Checkpoint name of the full tensor (`model.layers.0.mlp.down_proj.weight`).
    pub tensor: String,
    /// Key of the piece's bytes in this safetensors file.
    pub key: String,
    /// Format tag ([`tag`]).
    pub format: u8,
    /// GGML type name (`q4k`, `q8_0`, ...) for tag 0.
    pub ggml_type: Option<String>,
    /// Dense dtype name (`f32`, `bf16`, `f16`) for tag 1.
    pub dtype: Option<String>,
    /// Shape of the full tensor.
    pub shape: Vec<usize>,
    /// The slice held; `None` for the whole tensor.
    pub slice: Option<Slice>,
    /// CRC-32 of the piece's bytes.
    pub crc32: u32,
    /// Scale block `[rows, cols]` of an FP8 weight (tag 3); `None` for one scale per tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<[usize; 2]>,
}

/// Header of one rank's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankHeader {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// Rank that wrote the file.
    pub rank: usize,
    /// World size of the writing cluster.
    pub world_size: usize,
    /// Hash of the model configuration.
    pub config_hash: String,
    /// Pieces.
    pub entries: Vec<Entry>,
}

/// One file of the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    /// File name, relative to the index.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// The index file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// World size of the writing cluster.
    pub world_size: usize,
    /// Hash of the model configuration.
    pub config_hash: String,
    /// Architecture name.
    pub architecture: String,
    /// ISQ types applied (names).
    pub isq: Vec<String>,
    /// One file per rank, in rank order.
    pub files: Vec<IndexFile>,
}

/// Name of a GGML type in headers (`q4k`, `q8_0`).
pub fn ggml_name(t: GgmlDType) -> String {
    format!("{t:?}").to_lowercase()
}

fn parse_ggml(s: &str) -> Option<GgmlDType> {
    // The block types, plus the float types a GGML tensor can also hold.
    crate::quant::isq::GGML_TYPES
        .into_iter()
        .chain([GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16])
        .find(|t| ggml_name(*t) == s)
}

/// Name of a dense dtype in headers.
pub fn dtype_name(d: DType) -> String {
    format!("{d:?}").to_lowercase()
}

fn parse_dtype(s: &str) -> Option<DType> {
    [
        DType::F32,
        DType::BF16,
        DType::F16,
        DType::U8,
        DType::F8E4M3,
    ]
    .into_iter()
    .find(|d| dtype_name(*d) == s)
}

/// A piece's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    Ggml(GgmlDType),
    Dense(DType),
}

#[derive(Debug, Clone)]
struct PieceRef {
    file: usize,
    bytes: std::ops::Range<usize>,
    storage: Storage,
    slice: Option<Slice>,
}

#[derive(Debug, Clone)]
struct TensorEntry {
    shape: Vec<usize>,
    pieces: Vec<PieceRef>,
}

/// A UQFF file set opened for reading (memory-mapped, every checksum verified at open).
#[derive(Debug)]
pub struct UqffSource {
    index_path: PathBuf,
    index: Index,
    maps: Vec<Mmap>,
    tensors: BTreeMap<String, TensorEntry>,
    fp8_block: Option<Option<[usize; 2]>>,
    copied: AtomicU64,
}

fn bad(file: &Path, reason: impl Into<String>) -> Error {
    Error::BadFile {
        file: file.to_path_buf(),
        reason: reason.into(),
    }
}

impl UqffSource {
    /// Opens the index at `path` and every rank file it names, verifying sizes, headers and
    /// checksums before anything is served.
    ///
    /// # Errors
    /// A missing, truncated, corrupted or newer-version file, or pieces that do not cover
    /// their tensors; each names the file (and tensor).
    pub fn open(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let probe: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| bad(path, format!("not a UQFF index (invalid JSON: {e})")))?;
        if probe.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(bad(
                path,
                format!("not a UQFF index (no `format: \"{FORMAT}\"`)"),
            ));
        }
        match probe.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(VERSION) => {}
            Some(v) => {
                return Err(bad(
                    path,
                    format!(
                        "format version {v} is not supported: this build reads version {VERSION}"
                    ),
                ))
            }
            None => return Err(bad(path, "no format version")),
        }
        let index: Index = serde_json::from_value(probe)
            .map_err(|e| bad(path, format!("malformed UQFF index: {e}")))?;
        if index.files.len() != index.world_size || index.world_size == 0 {
            return Err(bad(
                path,
                format!(
                    "the index lists {} files for a world size of {}",
                    index.files.len(),
                    index.world_size
                ),
            ));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut maps = Vec::with_capacity(index.files.len());
        let mut tensors: BTreeMap<String, TensorEntry> = BTreeMap::new();
        let mut fp8_blocks: Vec<(String, Option<[usize; 2]>)> = Vec::new();
        for (r, f) in index.files.iter().enumerate() {
            let fpath = dir.join(&f.name);
            let file = File::open(&fpath).map_err(|source| Error::Io {
                path: fpath.clone(),
                source,
            })?;
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            if len != f.bytes {
                return Err(bad(
                    &fpath,
                    format!(
                        "truncated or altered: {len} bytes, the index says {}",
                        f.bytes
                    ),
                ));
            }
            // SAFETY: read-only map of a file this process does not modify.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
                path: fpath.clone(),
                source,
            })?;
            let st = safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| bad(&fpath, format!("invalid safetensors data: {e}")))?;
            let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| bad(&fpath, format!("invalid safetensors header: {e}")))?;
            let header_json = meta
                .metadata()
                .as_ref()
                .and_then(|m| m.get(HEADER_KEY))
                .ok_or_else(|| bad(&fpath, "no UQFF header in the safetensors metadata"))?;
            let header: RankHeader = serde_json::from_str(header_json)
                .map_err(|e| bad(&fpath, format!("malformed UQFF header: {e}")))?;
            if header.format != FORMAT || header.version != VERSION {
                return Err(bad(
                    &fpath,
                    format!(
                        "header says {} version {}; this build reads {FORMAT} version {VERSION}",
                        header.format, header.version
                    ),
                ));
            }
            if header.rank != r
                || header.world_size != index.world_size
                || header.config_hash != index.config_hash
            {
                return Err(bad(
                    &fpath,
                    format!(
                        "belongs to another file set (rank {} of {}, config {}; the index expects \
                         rank {r} of {}, config {})",
                        header.rank,
                        header.world_size,
                        header.config_hash,
                        index.world_size,
                        index.config_hash
                    ),
                ));
            }
            let base = mmap.as_ptr() as usize;
            for e in header.entries {
                let view = st.tensor(&e.key).map_err(|_| {
                    bad(
                        &fpath,
                        format!("piece `{}` of `{}` is missing", e.key, e.tensor),
                    )
                })?;
                let data = view.data();
                if crc32fast::hash(data) != e.crc32 {
                    return Err(bad(
                        &fpath,
                        format!(
                            "checksum mismatch in `{}` (piece `{}`): the file is corrupted",
                            e.tensor, e.key
                        ),
                    ));
                }
                let storage = match e.format {
                    tag::GGUF => Storage::Ggml(
                        e.ggml_type.as_deref().and_then(parse_ggml).ok_or_else(|| {
                            bad(
                                &fpath,
                                format!("`{}`: unknown GGML type {:?}", e.tensor, e.ggml_type),
                            )
                        })?,
                    ),
                    // FP8 weights and MXFP4 blocks/scales are raw bytes of their dtype,
                    // served as they are (the loader reads them by name).
                    tag::UNQUANT | tag::FP8 | tag::MXFP4 => Storage::Dense(
                        e.dtype.as_deref().and_then(parse_dtype).ok_or_else(|| {
                            bad(
                                &fpath,
                                format!("`{}`: unknown dtype {:?}", e.tensor, e.dtype),
                            )
                        })?,
                    ),
                    other => {
                        return Err(bad(
                            &fpath,
                            format!(
                                "`{}`: format tag {other} is not supported by this build",
                                e.tensor
                            ),
                        ))
                    }
                };
                if e.format == tag::FP8 {
                    fp8_blocks.push((e.tensor.clone(), e.block));
                }
                let start = data.as_ptr() as usize - base;
                let piece = PieceRef {
                    file: r,
                    bytes: start..start + data.len(),
                    storage,
                    slice: e.slice,
                };
                check_piece(&e, &piece, &fpath)?;
                let t = tensors
                    .entry(e.tensor.clone())
                    .or_insert_with(|| TensorEntry {
                        shape: e.shape.clone(),
                        pieces: Vec::new(),
                    });
                if t.shape != e.shape {
                    return Err(bad(
                        &fpath,
                        format!(
                            "`{}` has shape {:?} here and {:?} in another piece",
                            e.tensor, e.shape, t.shape
                        ),
                    ));
                }
                t.pieces.push(piece);
            }
            maps.push(mmap);
        }
        for (name, t) in &tensors {
            check_coverage(name, t, path)?;
        }
        let fp8_block = match fp8_blocks.first() {
            None => None,
            Some((_, first)) => {
                if let Some((t, b)) = fp8_blocks.iter().find(|(_, b)| b != first) {
                    return Err(bad(
                        path,
                        format!("`{t}`: FP8 scale block {b:?}, other pieces use {first:?}"),
                    ));
                }
                Some(*first)
            }
        };
        Ok(Self {
            index_path: path.to_path_buf(),
            index,
            maps,
            tensors,
            fp8_block,
            copied: AtomicU64::new(0),
        })
    }

    /// The FP8 scale block of the set's FP8 weights: `None` when it has none,
    /// `Some(None)` for per-tensor scales.
    pub fn fp8_block(&self) -> Option<Option<[usize; 2]>> {
        self.fp8_block
    }

    /// True when the set holds MXFP4 weights.
    pub fn has_mxfp4(&self) -> bool {
        self.tensors.keys().any(|n| n.ends_with(".weight_blocks"))
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Largest GGML block size among the stored pieces (1 when none is quantized).
    pub fn block(&self) -> usize {
        self.tensors
            .values()
            .flat_map(|t| t.pieces.iter())
            .filter_map(|p| match p.storage {
                Storage::Ggml(g) => Some(g.block_size()),
                Storage::Dense(_) => None,
            })
            .max()
            .unwrap_or(1)
    }

    /// The dtype of every piece when all are dense and share one (a set written without
    /// ISQ), so the model computes in it as it did before saving.
    pub fn dense_dtype(&self) -> Option<DType> {
        let mut it = self.tensors.values().flat_map(|t| t.pieces.iter());
        let first = match it.next()?.storage {
            Storage::Dense(d) => d,
            Storage::Ggml(_) => return None,
        };
        it.all(|p| p.storage == Storage::Dense(first))
            .then_some(first)
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            file: self.index_path.clone(),
            tensor: name.to_string(),
        })
    }

    fn piece_bytes(&self, p: &PieceRef) -> &[u8] {
        &self.maps[p.file][p.bytes.clone()]
    }

    /// The single storage every piece of `t` shares, if they share one.
    fn uniform(t: &TensorEntry) -> Option<Storage> {
        let first = t.pieces.first()?.storage;
        t.pieces.iter().all(|p| p.storage == first).then_some(first)
    }

    /// Writes every piece into a whole-tensor buffer whose storage units are `units` of
    /// `unit_bytes` each; `piece_units` maps a slice to its unit range and gives the piece's
    /// bytes in those units.
    fn assemble<'a>(
        &'a self,
        t: &'a TensorEntry,
        units: &[usize],
        unit_bytes: usize,
        piece: impl Fn(&'a PieceRef) -> Result<(Option<Slice>, std::borrow::Cow<'a, [u8]>)>,
    ) -> Result<Vec<u8>> {
        let mut full = vec![0u8; units.iter().product::<usize>() * unit_bytes];
        for p in &t.pieces {
            let (slice, bytes) = piece(p)?;
            match slice {
                None => full.copy_from_slice(&bytes),
                Some(s) => {
                    let mut at = 0;
                    for run in shard_runs(units, unit_bytes, s.dim, s.start, s.len) {
                        let n = run.len();
                        full[run].copy_from_slice(&bytes[at..at + n]);
                        at += n;
                    }
                }
            }
        }
        self.copied.fetch_add(full.len() as u64, Ordering::Relaxed);
        Ok(full)
    }

    /// The whole tensor as f32 (pieces dequantized where needed).
    fn dense_f32(&self, name: &str) -> Result<Tensor> {
        let t = self.entry(name)?;
        let full = self.assemble(t, &t.shape, 4, |p| {
            let piece_shape = piece_shape(&t.shape, p.slice);
            let f32s = match p.storage {
                Storage::Ggml(g) => {
                    let storage = QStorage::from_data(
                        std::borrow::Cow::Borrowed(self.piece_bytes(p)),
                        &Device::Cpu,
                        g,
                    )?;
                    QTensor::new(storage, piece_shape.as_slice())?.dequantize(&Device::Cpu)?
                }
                Storage::Dense(d) => {
                    crate::comm::wire::bytes_to_tensor(self.piece_bytes(p), d, &piece_shape)?
                        .to_dtype(DType::F32)?
                }
            };
            let v: Vec<f32> = f32s.flatten_all()?.to_vec1()?;
            Ok((
                p.slice,
                std::borrow::Cow::Owned(crate::comm::wire::as_bytes(&v).to_vec()),
            ))
        })?;
        crate::comm::wire::bytes_to_tensor(&full, DType::F32, &t.shape)
    }
}

fn piece_shape(full: &[usize], slice: Option<Slice>) -> Vec<usize> {
    let mut s = full.to_vec();
    if let Some(sl) = slice {
        s[sl.dim] = sl.len;
    }
    s
}

/// A piece's byte length must match its slice and storage.
fn check_piece(e: &Entry, p: &PieceRef, file: &Path) -> Result<()> {
    if let Some(s) = e.slice {
        if s.dim >= e.shape.len() || s.start + s.len > e.shape[s.dim] {
            return Err(bad(
                file,
                format!("`{}`: slice {s:?} outside shape {:?}", e.tensor, e.shape),
            ));
        }
    }
    let shape = piece_shape(&e.shape, e.slice);
    let want = match p.storage {
        Storage::Ggml(g) => {
            block_units(&shape, g)
                .map_err(|r| bad(file, format!("`{}`: {r}", e.tensor)))?
                .iter()
                .product::<usize>()
                * g.type_size()
        }
        Storage::Dense(d) => shape.iter().product::<usize>() * d.size_in_bytes(),
    };
    if p.bytes.len() != want {
        return Err(bad(
            file,
            format!(
                "`{}`: piece holds {} bytes, its shape needs {want}",
                e.tensor,
                p.bytes.len()
            ),
        ));
    }
    Ok(())
}

/// Every index of the tensor must be held by some piece.
fn check_coverage(name: &str, t: &TensorEntry, index: &Path) -> Result<()> {
    if t.pieces.iter().any(|p| p.slice.is_none()) {
        return Ok(());
    }
    let Some(dim) = t.pieces.first().and_then(|p| p.slice).map(|s| s.dim) else {
        return Ok(());
    };
    let mut ranges: Vec<(usize, usize)> = t
        .pieces
        .iter()
        .filter_map(|p| p.slice)
        .map(|s| {
            if s.dim == dim {
                Ok((s.start, s.start + s.len))
            } else {
                Err(bad(
                    index,
                    format!("`{name}`: pieces cut different dimensions"),
                ))
            }
        })
        .collect::<Result<_>>()?;
    ranges.sort_unstable();
    let mut covered = 0;
    for (a, b) in ranges {
        if a > covered {
            break;
        }
        covered = covered.max(b);
    }
    if covered < t.shape[dim] {
        return Err(bad(
            index,
            format!(
                "`{name}`: the pieces cover 0..{covered} of dimension {dim} (size {})",
                t.shape[dim]
            ),
        ));
    }
    Ok(())
}

impl WeightSource for UqffSource {
    fn location(&self) -> &Path {
        &self.index_path
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn meta(&self, name: &str) -> Result<TensorMeta> {
        let t = self.entry(name)?;
        let dtype = match Self::uniform(t) {
            Some(Storage::Ggml(g)) => FileDType::Ggml(g),
            Some(Storage::Dense(d)) => FileDType::Dense(d),
            None => FileDType::Dense(DType::F32),
        };
        Ok(TensorMeta {
            shape: t.shape.clone(),
            dtype,
            file: self.index_path.clone(),
        })
    }

    fn read(&self, name: &str, shard: &Shard, dtype: DType) -> Result<Tensor> {
        let t = self.entry(name)?;
        let full = match Self::uniform(t) {
            Some(Storage::Dense(d)) => {
                let bytes = self.assemble(t, &t.shape, d.size_in_bytes(), |p| {
                    Ok((p.slice, std::borrow::Cow::Borrowed(self.piece_bytes(p))))
                })?;
                crate::comm::wire::bytes_to_tensor(&bytes, d, &t.shape)?
            }
            _ => self.dense_f32(name)?,
        };
        Ok(shard.apply_to(&full)?.to_dtype(dtype)?)
    }

    fn read_quantized(&self, name: &str, shard: &Shard) -> Result<Option<QTensor>> {
        let whole = self.entry(name)?;
        // The pieces the shard overlaps must all hold one GGML type (a tensor whose other
        // pieces were left dense, e.g. a rank whose split cut the blocks, still serves its
        // quantized part); the rest of the buffer stays unused.
        let (off, len) = shard.resolve(whole.shape[shard.dim()])?;
        let overlaps = |p: &PieceRef| match p.slice {
            None => true,
            Some(s) => s.dim != shard.dim() || (s.start < off + len && off < s.start + s.len),
        };
        let mut used = TensorEntry {
            shape: whole.shape.clone(),
            pieces: whole
                .pieces
                .iter()
                .filter(|p| overlaps(p))
                .cloned()
                .collect(),
        };
        let mut shard = *shard;
        // Pieces cut along the shard's dimension: assemble only the span they cover.
        let spans: Option<Vec<Slice>> = used
            .pieces
            .iter()
            .map(|p| p.slice.filter(|s| s.dim == shard.dim()))
            .collect();
        if let Some(spans) = spans.filter(|s| !s.is_empty()) {
            let lo = spans.iter().map(|s| s.start).min().unwrap_or(0);
            let hi = spans.iter().map(|s| s.start + s.len).max().unwrap_or(0);
            used.shape[shard.dim()] = hi - lo;
            for p in &mut used.pieces {
                if let Some(s) = &mut p.slice {
                    s.start -= lo;
                }
            }
            shard = Shard::range(shard.dim(), off - lo..off - lo + len);
        }
        let shard = &shard;
        let t = &used;
        let Some(Storage::Ggml(g)) = Self::uniform(t) else {
            return Ok(None);
        };
        let units = block_units(&t.shape, g)
            .map_err(|r| bad(&self.index_path, format!("`{name}`: {r}")))?;
        let bs = g.block_size();
        let full = self.assemble(t, &units, g.type_size(), |p| {
            let slice = p.slice.map(|s| {
                if s.dim + 1 == t.shape.len() {
                    Slice {
                        dim: s.dim,
                        start: s.start / bs,
                        len: s.len / bs,
                    }
                } else {
                    s
                }
            });
            Ok((slice, std::borrow::Cow::Borrowed(self.piece_bytes(p))))
        })?;
        match quantized_shard(&full, &t.shape, g, shard)? {
            Some(q) => Ok(Some(q)),
            None => {
                let saved: Vec<String> = whole
                    .pieces
                    .iter()
                    .filter_map(|p| p.slice)
                    .map(|s| format!("{}..{}", s.start, s.start + s.len))
                    .collect();
                Err(Error::Config {
                    field: format!("{}: tensor `{name}`", self.index_path.display()),
                    reason: format!(
                        "saved in {} blocks of {bs} (saved split of dimension {}: {}); this \
                         world size needs the slice {off}..{}, which cuts inside a block. \
                         Reload at a world size whose split aligns, or quantize again at this one",
                        ggml_name(g),
                        shard.dim(),
                        if saved.is_empty() {
                            "whole".to_string()
                        } else {
                            saved.join(", ")
                        },
                        off + len
                    ),
                })
            }
        }
    }

    fn bytes_copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
