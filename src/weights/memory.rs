//! Tensors already in memory, served through the same interface as files (tools, benches,
//! models built in code).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Tensor};

use super::{check_target, FileDType, TensorMeta, WeightSource};
use crate::error::{Error, Result};
use crate::shard::Shard;

/// A named set of in-memory tensors.
#[derive(Debug)]
pub struct MemorySource {
    label: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    copied: AtomicU64,
}

impl MemorySource {
    /// Wraps `tensors`; `label` stands in for a file name in messages.
    pub fn new(label: &str, tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        Self {
            label: PathBuf::from(label),
            tensors: tensors.into_iter().collect(),
            copied: AtomicU64::new(0),
        }
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            file: self.label.clone(),
            tensor: name.to_string(),
        })
    }
}

impl WeightSource for MemorySource {
    fn location(&self) -> &Path {
        &self.label
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn meta(&self, name: &str) -> Result<TensorMeta> {
        let t = self.get(name)?;
        Ok(TensorMeta {
            shape: t.dims().to_vec(),
            dtype: FileDType::Dense(t.dtype()),
            file: self.label.clone(),
        })
    }

    fn read(&self, name: &str, shard: &Shard, dtype: DType) -> Result<Tensor> {
        let t = self.get(name)?;
        check_target(&self.label, name, FileDType::Dense(t.dtype()), dtype)?;
        let s = if t.rank() == 0 {
            t.clone()
        } else {
            shard.apply_to(t)?.contiguous()?
        };
        self.copied.fetch_add(
            (s.elem_count() * s.dtype().size_in_bytes()) as u64,
            Ordering::Relaxed,
        );
        Ok(s.to_dtype(dtype)?)
    }

    fn bytes_copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }
}
