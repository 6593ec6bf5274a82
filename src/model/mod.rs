//! The model side: configuration ([`config`]), the decoder graph ([`decoder`]) with rotary
//! embeddings ([`rope`]), checkpoints and tokenizers ([`checkpoint`]), and sampling
//! ([`sampling`]).

pub mod checkpoint;
pub mod config;
pub mod decoder;
mod graph;
mod kv;
pub mod persist;
pub mod rope;
pub mod sampling;

pub use checkpoint::{Checkpoint, TextStream};
pub use config::{Arch, ModelConfig, RopeScaling};
pub use decoder::{LoadOptions, Model, SeqStep};
pub use sampling::{Sampler, SamplingParams, StepOutput};
