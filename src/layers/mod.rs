//! Megatron-style tensor-parallel layers.
//!
//! [`linear::ParallelLinear`] is the one parallel wrapper: one or more weight pieces (merged
//! chunks such as qkv or gate/up), each a [`crate::quant::QuantMethod`], plus how the output
//! is combined across ranks ([`linear::Reduce`]). [`linear::load_linear`] is the one place
//! that decides how a weight is loaded from a quantization config. [`attention`] and [`mlp`]
//! build the projection sets of a transformer block on it; [`lora`] merges adapters at load.

pub mod attention;
pub mod fused;
pub mod linear;
pub mod lora;
pub mod mlp;
pub mod moe;
pub mod prequantized;

pub use attention::{expand_kv, AttentionDims, AttentionProjections};
pub use linear::{load_linear, ParallelLinear, Partial, Piece, Reduce};
pub use lora::{Lora, LoraSet};
pub use mlp::Mlp;
