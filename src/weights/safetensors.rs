//! Safetensors weights: one file, or a sharded checkpoint with `model.safetensors.index.json`.
//!
//! Files are memory-mapped; a read copies only the requested shard's bytes, one bulk copy
//! per contiguous run, then converts the dtype if asked.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::Dtype as StDtype;

use super::copy::{copy_shard, copy_shard_typed};
use super::{check_target, FileDType, TensorMeta, WeightSource};
use crate::error::{Error, Result};
use crate::shard::Shard;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn file_dtype(d: StDtype) -> FileDType {
    match d {
        StDtype::F32 => FileDType::Dense(DType::F32),
        StDtype::F16 => FileDType::Dense(DType::F16),
        StDtype::BF16 => FileDType::Dense(DType::BF16),
        StDtype::F64 => FileDType::Dense(DType::F64),
        StDtype::F8_E4M3 => FileDType::Dense(DType::F8E4M3),
        StDtype::U8 => FileDType::Dense(DType::U8),
        StDtype::U32 => FileDType::Dense(DType::U32),
        StDtype::I32 => FileDType::Dense(DType::I32),
        StDtype::I64 => FileDType::Dense(DType::I64),
        StDtype::I16 => FileDType::Dense(DType::I16),
        StDtype::BOOL => FileDType::Other("BOOL"),
        StDtype::I8 => FileDType::Other("I8"),
        StDtype::U16 => FileDType::Other("U16"),
        StDtype::F8_E5M2 => FileDType::Other("F8_E5M2"),
        StDtype::F8_E8M0 => FileDType::Other("F8_E8M0"),
        StDtype::F4 => FileDType::Other("F4"),
        _ => FileDType::Other("unknown"),
    }
}

#[derive(Debug)]
struct Entry {
    dtype: StDtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    bytes: Range<usize>,
}

/// Builds a tensor of `dtype` from a shard of `bytes`, copying once into its final buffer.
fn typed_tensor(
    dtype: DType,
    bytes: &[u8],
    dims: &[usize],
    dim: usize,
    offset: usize,
    len: usize,
    shape: &[usize],
) -> Result<Tensor> {
    fn build<T: candle_core::WithDType>(
        bytes: &[u8],
        dims: &[usize],
        dim: usize,
        offset: usize,
        len: usize,
        shape: &[usize],
    ) -> Result<Tensor> {
        let v = copy_shard_typed::<T>(bytes, dims, dim, offset, len);
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
    match dtype {
        DType::F32 => build::<f32>(bytes, dims, dim, offset, len, shape),
        DType::F16 => build::<half::f16>(bytes, dims, dim, offset, len, shape),
        DType::BF16 => build::<half::bf16>(bytes, dims, dim, offset, len, shape),
        DType::F64 => build::<f64>(bytes, dims, dim, offset, len, shape),
        DType::F8E4M3 => build::<float8::F8E4M3>(bytes, dims, dim, offset, len, shape),
        other => Ok(Tensor::from_raw_buffer(
            &copy_shard(bytes, dims, other.size_in_bytes(), dim, offset, len),
            other,
            shape,
            &Device::Cpu,
        )?),
    }
}

/// One memory-mapped safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    entries: HashMap<String, Entry>,
}

impl SafetensorsFile {
    /// Maps `path` and parses its header; offsets are validated against the file size.
    ///
    /// # Errors
    /// I/O errors and malformed headers, naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        // SAFETY: the map is read-only; a file truncated underneath us by another process
        // is outside what any mmap-based loader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        let (header_len, meta) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::BadFile {
                file: path.to_path_buf(),
                reason: format!("invalid safetensors header: {e}"),
            })?;
        let data_start = 8 + header_len;
        let entries = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (a, b) = info.data_offsets;
                let entry = Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    bytes: data_start + a..data_start + b,
                };
                (name, entry)
            })
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            entries,
        })
    }
}

/// Safetensors weights from one file or an indexed checkpoint.
#[derive(Debug)]
pub struct SafetensorsSource {
    location: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name to index in `files`.
    index: BTreeMap<String, usize>,
    copied: AtomicU64,
}

impl SafetensorsSource {
    /// Opens a `.safetensors` file, a `model.safetensors.index.json`, or a directory holding
    /// either (the index wins; otherwise every `*.safetensors` file in it).
    ///
    /// # Errors
    /// Missing files, malformed headers or index, or a tensor present in two files.
    pub fn open(path: &Path) -> Result<Self> {
        let files: Vec<PathBuf> = if path.is_dir() {
            let index = path.join("model.safetensors.index.json");
            if index.exists() {
                Self::index_files(&index)?
            } else {
                let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(io_err(path))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
                    .collect();
                found.sort();
                if found.is_empty() {
                    return Err(Error::BadFile {
                        file: path.to_path_buf(),
                        reason: "no .safetensors or .gguf weights in this directory".into(),
                    });
                }
                found
            }
        } else if path.extension().and_then(|e| e.to_str()) == Some("json") {
            Self::index_files(path)?
        } else {
            vec![path.to_path_buf()]
        };
        let mut source = Self {
            location: path.to_path_buf(),
            files: Vec::new(),
            index: BTreeMap::new(),
            copied: AtomicU64::new(0),
        };
        for f in files {
            let file = SafetensorsFile::open(&f)?;
            let i = source.files.len();
            for name in file.entries.keys() {
                if let Some(&j) = source.index.get(name) {
                    return Err(Error::BadFile {
                        file: f.clone(),
                        reason: format!(
                            "tensor `{name}` is also in {}",
                            source.files[j].path.display()
                        ),
                    });
                }
                source.index.insert(name.clone(), i);
            }
            source.files.push(file);
        }
        Ok(source)
    }

    /// The distinct shard files named by an index's `weight_map`, in first-seen order.
    fn index_files(index: &Path) -> Result<Vec<PathBuf>> {
        let text = std::fs::read_to_string(index).map_err(io_err(index))?;
        let bad = |reason: String| Error::BadFile {
            file: index.to_path_buf(),
            reason,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid json: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = Vec::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("weight_map[{tensor}] is not a string")))?;
            let p = dir.join(file);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        Ok(files)
    }

    fn entry(&self, name: &str) -> Result<(&SafetensorsFile, &Entry)> {
        let missing = || Error::MissingTensor {
            file: self.location.clone(),
            tensor: name.to_string(),
        };
        let &i = self.index.get(name).ok_or_else(missing)?;
        let file = &self.files[i];
        let entry = file.entries.get(name).ok_or_else(missing)?;
        Ok((file, entry))
    }
}

impl WeightSource for SafetensorsSource {
    fn location(&self) -> &Path {
        &self.location
    }

    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    fn meta(&self, name: &str) -> Result<TensorMeta> {
        let (file, e) = self.entry(name)?;
        Ok(TensorMeta {
            shape: e.shape.clone(),
            dtype: file_dtype(e.dtype),
            file: file.path.clone(),
        })
    }

    fn read(&self, name: &str, shard: &Shard, dtype: DType) -> Result<Tensor> {
        let (file, e) = self.entry(name)?;
        let found = file_dtype(e.dtype);
        check_target(&file.path, name, found, dtype)?;
        let FileDType::Dense(src_dtype) = found else {
            unreachable!("check_target accepts only dense safetensors dtypes")
        };
        // A 0-d tensor (a per-tensor scale) has nothing to shard.
        let shape = if e.shape.is_empty() {
            Vec::new()
        } else {
            shard
                .sharded_shape(&e.shape)
                .map_err(|err| err.in_layer(name))?
        };
        let bytes = &file.mmap[e.bytes.clone()];
        let (dim, offset, len) = if e.shape.is_empty() {
            (0, 0, 1)
        } else {
            let (offset, len) = shard.resolve(e.shape[shard.dim()])?;
            (shard.dim(), offset, len)
        };
        let dims = if e.shape.is_empty() {
            vec![1]
        } else {
            e.shape.clone()
        };
        let t = typed_tensor(src_dtype, bytes, &dims, dim, offset, len, &shape)?;
        self.copied.fetch_add(
            (t.elem_count() * src_dtype.size_in_bytes()) as u64,
            Ordering::Relaxed,
        );
        Ok(if src_dtype == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        })
    }

    fn bytes_copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }
}
