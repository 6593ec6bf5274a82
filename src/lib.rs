//! shardwise: run a transformer tensor-parallel across ranks and hosts.
//!
//! A map of the crate, in data-flow order:
//!
//! - [`weights`]: read tensors, or one rank's shard of them, from safetensors or GGUF files,
//!   copying only the shard's bytes.
//! - [`shard`]: which slice a rank owns; the split planner for uneven, block-aligned splits
//!   (any world size runs any model) and the attention-head planner.
//! - [`quant`]: how a weight is stored and multiplied ([`quant::QuantMethod`]): dense or GGML
//!   blocks, and in-situ quantization with the block-alignment fallback.
//! - [`layers`]: Megatron-style parallel layers built on one wrapper
//!   ([`layers::ParallelLinear`]): column, row (all-reduced, bias once), replicated, merged
//!   chunks, KV sharding with replication, LoRA merged at load.
//! - [`comm`]: collectives ([`comm::Communicator`]) and a test suite every transport passes:
//!   in-process threads, gRPC links with a pipelined ring ([`comm::grpc`], [`comm::links`]),
//!   shared memory ([`comm::shm`], [`comm::shm_links`]), chosen per peer pair
//!   ([`comm::select`]).
//! - [`model`]: checkpoints (HF directories, GGUF), configs, the decoder graph on those
//!   layers with per-rank KV caches, tokenizers and sampling.
//! - [`runtime`]: rank actors owning their shards, the coordinator actor that sends one
//!   message per step per rank (locally or over gRPC), generation and perplexity.
//! - [`cluster`]: `ranks.toml`, validated with line-and-field errors.
//! - [`proto`]: the wire protocol generated from `proto/shardwise.proto`.
//! - [`app`]: the `generate` and `perplexity` jobs of the command line.
//! - [`mod@bench`]: measurements behind `shardwise bench`.
//! - `cuda` (feature `cuda`): how a rank's CUDA device is made, and NVRTC for the
//!   project's own kernels (the peer-memory all-reduce).
//! - [`threads`]: kernel threads per rank when ranks share a host's cores.
//! - [`error`]: one error type carrying file, tensor, rank and layer context.

pub mod app;
pub mod bench;
pub mod cluster;
pub mod comm;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
mod fsutil;
pub mod layers;
mod mem;
pub mod model;
pub mod proto;
pub mod quant;
pub mod runtime;
pub mod shard;
pub mod threads;
pub mod weights;

pub use error::{Error, Result};

/// Logs to stderr at `warn` (ISQ fallbacks, dead ranks) unless `RUST_LOG` says otherwise.
/// For binaries and examples; a library user installs their own subscriber.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A second call (or a user's subscriber) keeps the first; nothing to report.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
