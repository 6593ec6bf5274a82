//! The cluster: who the ranks are and where they run.
//!
//! [`config`] reads and validates `ranks.toml`. Launching ranks, the rank control service and
//! the coordinator build on it.

pub mod config;

pub use config::{ClusterConfig, Device, RankEntry};
