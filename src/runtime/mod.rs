//! The runtime: every rank is an actor ([`rank::RankActor`]) owning its shard of the model,
//! its communicator and its KV caches; a coordinator actor ([`coordinator`]) sends one
//! message per step per rank, through a [`handle::RankHandle`] that is either a local actor
//! or a gRPC proxy to a rank in another process or host ([`remote`]), and supervises them.
//! [`generate`] runs text generation and perplexity on top.

pub mod coordinator;
pub mod generate;
pub mod handle;
pub mod messages;
pub mod rank;
pub mod remote;
pub mod wire;
pub mod worker;

pub use coordinator::{Cluster, LocalTransport};
pub use messages::{HealthReport, LoadReport, LoadSpec, RankReply, RankRequest, StepRequest};
pub use worker::RankWorker;
