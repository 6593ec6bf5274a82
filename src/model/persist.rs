//! Writing one rank's shard to a safetensors file: every parallel linear's pieces in their
//! storage format (dense weights, or raw GGML blocks), plus, on rank 0, the replicated
//! tensors. The header records the rank, world size and each piece's format and shape.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::json;

use super::decoder::Model;
use crate::error::{Error, Result};

/// Path of `rank`'s file for output prefix `prefix`.
pub fn rank_file(prefix: &Path, rank: usize, world: usize) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(format!(".rank{rank}-of-{world}.safetensors"));
    PathBuf::from(name)
}

/// Writes this rank's shard of `model` next to `prefix` (see [`rank_file`]), atomically.
/// Returns the file and its size.
///
/// # Errors
/// A layer format without a persistent form, I/O errors (named).
pub fn write_rank_file(
    model: &Model,
    prefix: &Path,
    rank: usize,
    world: usize,
) -> Result<(PathBuf, u64)> {
    let path = rank_file(prefix, rank, world);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut layers = serde_json::Map::new();
    for lin in model.linears() {
        let mut pieces = Vec::new();
        for (i, part) in lin.parts().iter().enumerate() {
            let (o, inp) = part.shape();
            pieces.push(json!({"format": part.format(), "shape": [o, inp]}));
            for (suffix, t) in part.persist_tensors()? {
                tensors.push((format!("{}.{i}.{suffix}", lin.name()), t.contiguous()?));
            }
        }
        layers.insert(lin.name().to_string(), json!(pieces));
    }
    if rank == 0 {
        for (name, t) in model.replicated_tensors() {
            tensors.push((name, t.contiguous()?));
        }
    }
    let header = json!({
        "format": "shardwise-rank-shard",
        "version": 1,
        "rank": rank,
        "world_size": world,
        "architecture": model.config().arch.name(),
        "layers": layers,
    });
    let meta = HashMap::from([("shardwise".to_string(), header.to_string())]);
    let bytes =
        safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
            .map_err(|e| Error::BadFile {
                file: path.clone(),
                reason: format!("cannot serialize: {e}"),
            })?;
    crate::fsutil::write_atomic(&path, &bytes)?;
    Ok((path, bytes.len() as u64))
}
