//! The cluster: who the ranks are and where they run.
//!
//! [`config`] reads and validates `ranks.toml`; [`rank_server`] serves one rank (collectives,
//! rank actor, control service); [`launch`] starts this host's ranks as child processes.

pub mod config;
pub mod launch;
pub mod rank_server;

pub use config::{ClusterConfig, Device, RankEntry};
