//! What the coordinator asks of a rank and what a rank answers: the same types whether the
//! rank is a local actor or a process reached over gRPC ([`super::wire`] converts them).

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Tensor};

use crate::model::{SeqStep, StepOutput};
use crate::quant::IsqType;

/// Which checkpoint a rank loads, and how.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoadSpec {
    /// Model directory or `.gguf` file, as a path on the rank's host.
    pub model: PathBuf,
    /// Dense dtype to load as; `None` keeps GGUF blocks (f32 for safetensors).
    pub dtype: Option<DType>,
    /// In-situ quantization applied after loading.
    pub isq: Option<IsqType>,
    /// Weights from this UQFF index instead of the checkpoint's own files (`model` still
    /// gives the configuration).
    pub uqff: Option<PathBuf>,
    /// Expert layout of MoE models.
    pub moe: crate::layers::moe::MoeImpl,
}

/// One step of generation: new tokens of each sequence, plus caches to drop.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepRequest {
    /// Sequences advanced by this step.
    pub seqs: Vec<SeqStep>,
    /// Sequences whose KV caches are dropped first.
    pub release: Vec<u64>,
}

/// A request to one rank.
#[derive(Debug, Clone)]
pub enum RankRequest {
    /// Load this rank's shard of a checkpoint (replacing any loaded model).
    Load(LoadSpec),
    /// Run decoder layers on hidden states (tests and tools; not the hot path).
    Forward {
        /// Layer indices.
        layers: Range<usize>,
        /// `[1, t, hidden]` input.
        input: Tensor,
    },
    /// One generation step (the hot path).
    Step(StepRequest),
    /// Quantize linear layers in place.
    ApplyIsq {
        /// Target type.
        ty: IsqType,
        /// Layers whose name contains one of these (all when empty).
        filter: Vec<String>,
    },
    /// Write this rank's pieces as one file of a UQFF set.
    Serialize {
        /// Path of the set's index (each rank writes its file next to it).
        path: PathBuf,
    },
    /// Report state.
    Health,
    /// Stop the rank.
    Shutdown,
}

impl RankRequest {
    /// Short name for messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Load(_) => "load",
            Self::Forward { .. } => "forward",
            Self::Step(_) => "step",
            Self::ApplyIsq { .. } => "apply_isq",
            Self::Serialize { .. } => "serialize",
            Self::Health => "health",
            Self::Shutdown => "shutdown",
        }
    }

    /// How long the coordinator waits for a reply. Dead ranks are noticed sooner (a local
    /// actor stops, a remote session breaks or misses keepalives); this bounds a rank that
    /// is alive but stuck. Loading and quantizing big models take minutes.
    pub fn deadline(&self, step: Duration) -> Duration {
        match self {
            Self::Load(_) | Self::ApplyIsq { .. } | Self::Serialize { .. } => {
                Duration::from_secs(3600)
            }
            Self::Forward { .. } | Self::Step(_) => step,
            Self::Health | Self::Shutdown => Duration::from_secs(10),
        }
    }
}

/// What loading cost a rank.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// Wall time of the load (and ISQ, if asked).
    pub seconds: f64,
    /// Bytes of weights the rank holds.
    pub weight_bytes: u64,
    /// Resident memory of the rank's process.
    pub rss_bytes: u64,
    /// The shard lives on a GPU (its steps take a few milliseconds and leave the host's
    /// cores idle; see [`super::coordinator::CoordArgs::hot_override`]).
    pub on_gpu: bool,
}

/// A rank's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// Rank number.
    pub rank: usize,
    /// World size.
    pub world_size: usize,
    /// Model loaded from this path, if any.
    pub model: Option<String>,
}

/// A rank's answer.
#[derive(Debug, Clone)]
pub enum RankReply {
    /// Load finished.
    Loaded(LoadReport),
    /// Forward output (from the rank that returns results).
    Tensor(Tensor),
    /// A step's result per sequence: its logits or its drawn token (from the rank that
    /// returns results).
    Step(Vec<StepOutput>),
    /// Number of linear layers quantized.
    Quantized(usize),
    /// File written and its size.
    Serialized {
        /// File.
        file: PathBuf,
        /// Bytes.
        bytes: u64,
    },
    /// State.
    Health(HealthReport),
    /// Done (shutdown).
    Done,
    /// This rank holds no result for the request (only rank 0 returns logits and outputs).
    Nothing,
}
