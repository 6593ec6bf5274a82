//! Where weights come from: safetensors files and checkpoints, and GGUF files.
//!
//! A [`WeightSource`] reads one tensor, or one rank's [`Shard`] of it, copying only that
//! shard's bytes out of a memory map in bulk ([`copy::copy_shard`]: one copy per contiguous
//! run). [`open`] picks the source from a path.

pub mod copy;
pub mod experts;
pub mod gguf;
pub mod memory;
pub mod renamed;
pub mod safetensors;
pub mod synthetic;
pub mod uqff;

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::shard::Shard;

pub use self::experts::ExpertView;
pub use self::gguf::GgufSource;
pub use self::memory::MemorySource;
pub use self::renamed::RenamedSource;
pub use self::safetensors::SafetensorsSource;
pub use self::uqff::UqffSource;

/// Storage type of a tensor in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileDType {
    /// A dense dtype candle knows.
    Dense(DType),
    /// A GGML block type (GGUF files).
    Ggml(candle_core::quantized::GgmlDType),
    /// Anything else (integer tensors, exotic floats), by its file name for the type.
    Other(&'static str),
}

impl std::fmt::Display for FileDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileDType::Dense(d) => write!(f, "{d:?}"),
            FileDType::Ggml(g) => write!(f, "{g:?}"),
            FileDType::Other(s) => f.write_str(s),
        }
    }
}

/// Shape and storage type of a tensor in a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// Full shape (row-major, last dimension contiguous).
    pub shape: Vec<usize>,
    /// Storage type in the file.
    pub dtype: FileDType,
    /// File holding it.
    pub file: PathBuf,
}

/// Dtypes a dense read can convert from and to.
pub const FLOAT_DTYPES: [DType; 4] = [DType::F32, DType::BF16, DType::F16, DType::F8E4M3];

/// A set of named tensors that can be read whole or by shard.
pub trait WeightSource: Send + Sync + Debug {
    /// Human-readable location (file or directory) for messages.
    fn location(&self) -> &Path;

    /// Names of every tensor, sorted.
    fn names(&self) -> Vec<String>;

    /// Shape, storage type and file of `name`.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] naming the file and tensor.
    fn meta(&self, name: &str) -> Result<TensorMeta>;

    /// Reads `shard` of `name` as a dense tensor of `dtype` on the CPU.
    ///
    /// # Errors
    /// Missing tensor, a shard that does not fit, or a storage type that cannot convert to
    /// `dtype` ([`Error::DtypeMismatch`]).
    fn read(&self, name: &str, shard: &Shard, dtype: DType) -> Result<Tensor>;

    /// Reads `shard` of `name` still quantized, when the file holds a block-quantized tensor
    /// and the shard falls on block boundaries; `None` otherwise.
    ///
    /// # Errors
    /// Missing tensor or a shard that does not fit.
    fn read_quantized(&self, name: &str, shard: &Shard) -> Result<Option<QTensor>> {
        let _ = (name, shard);
        Ok(None)
    }

    /// Bytes copied out of the files so far (for I/O accounting and tests).
    fn bytes_copied(&self) -> u64;

    /// True when `name` exists.
    fn contains(&self, name: &str) -> bool {
        self.meta(name).is_ok()
    }
}

impl dyn WeightSource + '_ {
    /// Like [`WeightSource::read`], after checking the full shape is `expected`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] naming the file, tensor, expected and found shapes; then as
    /// [`WeightSource::read`].
    pub fn read_expect(
        &self,
        name: &str,
        expected: &[usize],
        shard: &Shard,
        dtype: DType,
    ) -> Result<Tensor> {
        self.expect_shape(name, expected)?;
        self.read(name, shard, dtype)
    }

    /// Checks the full shape of `name`.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] or [`Error::ShapeMismatch`].
    pub fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<TensorMeta> {
        let meta = self.meta(name)?;
        if meta.shape != expected {
            return Err(Error::ShapeMismatch {
                file: meta.file,
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: meta.shape,
            });
        }
        Ok(meta)
    }
}

/// Checks a requested dense dtype and builds the error for an unconvertible one.
pub(crate) fn check_target(file: &Path, name: &str, found: FileDType, want: DType) -> Result<()> {
    if found == FileDType::Dense(want) {
        // Stored as asked (integer and byte tensors of quantized formats too).
        return Ok(());
    }
    let convertible = match found {
        FileDType::Dense(d) => FLOAT_DTYPES.contains(&d) || d == DType::F64,
        FileDType::Ggml(_) => true,
        FileDType::Other(_) => false,
    };
    if !convertible || !FLOAT_DTYPES.contains(&want) {
        return Err(Error::DtypeMismatch {
            file: file.to_path_buf(),
            tensor: name.to_string(),
            expected: format!("a float tensor convertible to {want:?} (f32, bf16, f16, f8e4m3)"),
            found: found.to_string(),
        });
    }
    Ok(())
}

/// Opens a weight source from a path: a `.gguf` file, a `.safetensors` file, a
/// `model.safetensors.index.json`, or a directory holding one of those.
///
/// # Errors
/// Nothing usable at `path`, or a malformed file (named).
pub fn open(path: &Path) -> Result<Box<dyn WeightSource>> {
    let is_ext = |p: &Path, e: &str| p.extension().and_then(|x| x.to_str()) == Some(e);
    if is_ext(path, "gguf") {
        return Ok(Box::new(GgufSource::open(path)?));
    }
    Ok(Box::new(SafetensorsSource::open(path)?))
}
