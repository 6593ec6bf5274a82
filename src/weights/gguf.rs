//! GGUF weights through candle's GGUF reader, memory-mapped.
//!
//! Tensors can be read dequantized (any shard), or kept quantized when the shard falls on
//! block boundaries: GGML blocks run along the last (contiguous) dimension, so a shard of an
//! earlier dimension always does, and a shard of the last dimension must start and end on a
//! block boundary.

use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use super::copy::copy_shard;
use super::{check_target, FileDType, TensorMeta, WeightSource};
use crate::error::{Error, Result};
use crate::shard::Shard;

/// A memory-mapped GGUF file.
#[derive(Debug)]
pub struct GgufSource {
    path: PathBuf,
    mmap: Mmap,
    content: Content,
    copied: AtomicU64,
}

impl GgufSource {
    /// Maps `path` and parses its header.
    ///
    /// # Errors
    /// I/O errors and malformed files, naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: read-only map; see SafetensorsFile::open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let content = Content::read(&mut Cursor::new(&mmap[..])).map_err(|e| Error::BadFile {
            file: path.to_path_buf(),
            reason: format!("invalid GGUF: {e}"),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            content,
            copied: AtomicU64::new(0),
        })
    }

    /// The parsed header: metadata (model config, tokenizer) and tensor directory.
    pub fn content(&self) -> &Content {
        &self.content
    }

    fn info(&self, name: &str) -> Result<&gguf_file::TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                file: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// Reads `shard` of `name` as a `QTensor` in its file type when the shard is
    /// block-aligned; `None` when it is not.
    fn read_blocks(&self, name: &str, shard: &Shard) -> Result<Option<QTensor>> {
        let info = self.info(name)?;
        let dims = info.shape.dims().to_vec();
        let ty = info.ggml_dtype;
        let bad = |reason: String| Error::BadFile {
            file: self.path.clone(),
            reason: format!("tensor `{name}`: {reason}"),
        };
        let units = block_units(&dims, ty).map_err(bad)?;
        let total = units.iter().product::<usize>() * ty.type_size();
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        let bytes = self.mmap.get(start..start + total).ok_or_else(|| {
            bad(format!(
                "data {start}..{} runs past the file end",
                start + total
            ))
        })?;
        let q = quantized_shard(bytes, &dims, ty, shard).map_err(|e| e.in_layer(name))?;
        if let Some(q) = &q {
            self.copied
                .fetch_add(q.storage_size_in_bytes() as u64, Ordering::Relaxed);
        }
        Ok(q)
    }
}

/// Storage units of a GGML tensor of shape `dims`: whole blocks along the last dimension.
///
/// # Errors
/// A 0-d tensor, or rows that are not a whole number of blocks.
pub(crate) fn block_units(
    dims: &[usize],
    ty: GgmlDType,
) -> std::result::Result<Vec<usize>, String> {
    let bs = ty.block_size();
    let last = dims.len().checked_sub(1).ok_or("0-d tensor")?;
    if dims[last] % bs != 0 {
        return Err(format!(
            "row of {} is not a multiple of block {bs}",
            dims[last]
        ));
    }
    let mut units = dims.to_vec();
    units[last] /= bs;
    Ok(units)
}

/// `shard` of a whole GGML tensor `full` (shape `dims`, type `ty`) as a `QTensor`, copying
/// only the shard's blocks; `None` when the shard cuts inside a block.
///
/// # Errors
/// A shard that does not fit, or bytes that do not match the shape.
pub(crate) fn quantized_shard(
    full: &[u8],
    dims: &[usize],
    ty: GgmlDType,
    shard: &Shard,
) -> Result<Option<QTensor>> {
    let bs = ty.block_size();
    let units = block_units(dims, ty).map_err(|reason| Error::Config {
        field: "quantized tensor".into(),
        reason,
    })?;
    let last = dims.len() - 1;
    let shape = shard.sharded_shape(dims)?;
    let (mut offset, mut len) = shard.resolve(dims[shard.dim()])?;
    if shard.dim() == last {
        if offset % bs != 0 || len % bs != 0 {
            return Ok(None);
        }
        offset /= bs;
        len /= bs;
    }
    if full.len() != units.iter().product::<usize>() * ty.type_size() {
        return Err(Error::Config {
            field: "quantized tensor".into(),
            reason: format!("{} bytes do not hold {dims:?} in {ty:?}", full.len()),
        });
    }
    let data = copy_shard(full, &units, ty.type_size(), shard.dim(), offset, len);
    let storage = QStorage::from_data(std::borrow::Cow::Owned(data), &Device::Cpu, ty)?;
    Ok(Some(QTensor::new(storage, shape)?))
}

impl WeightSource for GgufSource {
    fn location(&self) -> &Path {
        &self.path
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        v.sort();
        v
    }

    fn meta(&self, name: &str) -> Result<TensorMeta> {
        let info = self.info(name)?;
        let dtype = match info.ggml_dtype {
            GgmlDType::F32 => FileDType::Dense(DType::F32),
            GgmlDType::F16 => FileDType::Dense(DType::F16),
            GgmlDType::BF16 => FileDType::Dense(DType::BF16),
            g => FileDType::Ggml(g),
        };
        Ok(TensorMeta {
            shape: info.shape.dims().to_vec(),
            dtype,
            file: self.path.clone(),
        })
    }

    fn read(&self, name: &str, shard: &Shard, dtype: DType) -> Result<Tensor> {
        let meta = self.meta(name)?;
        check_target(&self.path, name, meta.dtype, dtype)?;
        let t = match self.read_blocks(name, shard)? {
            Some(q) => q.dequantize(&Device::Cpu)?,
            // A cut inside a block: dequantize whole rows, then narrow.
            None => shard.apply_to(
                &self
                    .read_blocks(name, &Shard::full())?
                    .ok_or_else(|| Error::BadFile {
                        file: self.path.clone(),
                        reason: format!("tensor `{name}` cannot be read"),
                    })?
                    .dequantize(&Device::Cpu)?,
            )?,
        };
        Ok(t.to_dtype(dtype)?)
    }

    fn read_quantized(&self, name: &str, shard: &Shard) -> Result<Option<QTensor>> {
        if !matches!(self.meta(name)?.dtype, FileDType::Ggml(_)) {
            return Ok(None);
        }
        self.read_blocks(name, shard)
    }

    fn bytes_copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }
}
