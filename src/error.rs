//! The crate's one error type.
//!
//! Every variant carries the context a user needs to act on it: the file, tensor, rank,
//! layer, dimension or field involved, and what was expected versus what was found.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in shardwise.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A dimension cannot be split over the requested ranks with the requested alignment.
    #[error(
        "cannot split {dim} of size {size} over {world_size} ranks with alignment {align}: {reason}"
    )]
    NoPlan {
        /// Name of the dimension (e.g. `intermediate_size`, `kv groups`).
        dim: String,
        /// Size of the dimension, in elements.
        size: usize,
        /// Number of ranks asked for.
        world_size: usize,
        /// Required alignment of every boundary, in elements.
        align: usize,
        /// Why no plan exists.
        reason: String,
    },
    /// A `Shard` does not fit the tensor it is applied to.
    #[error("shard {shard} does not fit dimension {dim} of size {size}: {reason}")]
    BadShard {
        /// The shard, printed.
        shard: String,
        /// Dimension index.
        dim: usize,
        /// Size of that dimension.
        size: usize,
        /// What is wrong.
        reason: String,
    },
    /// A tensor is not in the weight source.
    #[error("{file}: tensor `{tensor}` not found")]
    MissingTensor {
        /// File (or checkpoint directory) searched.
        file: PathBuf,
        /// Tensor name.
        tensor: String,
    },
    /// A tensor has a different shape than the model expects.
    #[error("{file}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// File holding the tensor.
        file: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Shape the model expects.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype that cannot be used where it is asked for.
    #[error("{file}: tensor `{tensor}` has dtype {found}, expected {expected}")]
    DtypeMismatch {
        /// File holding the tensor.
        file: PathBuf,
        /// Tensor name.
        tensor: String,
        /// What was expected.
        expected: String,
        /// What the file holds.
        found: String,
    },
    /// A file is malformed (bad header, out-of-range offsets, bad json).
    #[error("{file}: {reason}")]
    BadFile {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A collective failed: a peer is gone, timed out, or called a different operation.
    #[error("rank {rank}: {op}: {reason}")]
    Comm {
        /// The rank reporting the failure.
        rank: usize,
        /// The collective (`all_reduce_sum`, `all_gather`, ...).
        op: &'static str,
        /// What happened, naming the peer ranks involved.
        reason: String,
    },
    /// A rank failed or died while serving a request (as the coordinator sees it).
    #[error("rank {rank}: {reason}")]
    Rank {
        /// The failing rank.
        rank: usize,
        /// What happened.
        reason: String,
    },
    /// A configuration value is invalid.
    #[error("invalid {field}: {reason}")]
    Config {
        /// The field (e.g. `world_size`, `isq`).
        field: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A feature is asked of an implementation that does not provide it.
    #[error("{what} is not supported by {by}")]
    Unsupported {
        /// What was asked.
        what: String,
        /// Who cannot do it.
        by: String,
    },
    /// An error inside a named layer.
    #[error("layer {layer}: {source}")]
    Layer {
        /// Layer name (e.g. `model.layers.3.mlp.down_proj`).
        layer: String,
        /// The underlying error.
        #[source]
        source: Box<Error>,
    },
    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Wraps this error with the name of the layer it happened in.
    pub fn in_layer(self, layer: impl Into<String>) -> Self {
        Error::Layer {
            layer: layer.into(),
            source: Box::new(self),
        }
    }
}

/// Adds layer context to any `Result` convertible into ours.
pub trait LayerContext<T> {
    /// Wraps the error, if any, with the layer name.
    fn in_layer(self, layer: &str) -> Result<T>;
}

impl<T, E: Into<Error>> LayerContext<T> for std::result::Result<T, E> {
    fn in_layer(self, layer: &str) -> Result<T> {
        self.map_err(|e| e.into().in_layer(layer))
    }
}
