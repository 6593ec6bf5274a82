//! A coordinator's handle on one rank: a local actor or a gRPC proxy, with one interface.

use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::ActorRef;

use super::messages::{RankReply, RankRequest};
use super::rank::RankMsg;
use super::remote::RemoteRank;
use crate::error::{Error, Result};

/// One rank, wherever it runs.
#[derive(Debug, Clone)]
pub enum RankHandle {
    /// A rank actor in this process.
    Local {
        /// Rank number.
        rank: usize,
        /// The actor.
        actor: ActorRef<RankMsg>,
    },
    /// A rank in another process or host.
    Remote(RemoteRank),
}

impl RankHandle {
    /// Rank number.
    pub fn rank(&self) -> usize {
        match self {
            Self::Local { rank, .. } => *rank,
            Self::Remote(r) => r.rank(),
        }
    }

    /// When this rank's connection broke (remote ranks; `None` while alive or for local
    /// actors).
    pub fn died_at(&self) -> Option<std::time::Instant> {
        match self {
            Self::Local { .. } => None,
            Self::Remote(r) => r.died_at(),
        }
    }

    /// Sends `req` and waits up to `deadline` for the reply.
    ///
    /// # Errors
    /// The rank's own error, or [`Error::Rank`] when it is gone or does not answer in time.
    pub async fn call(&self, req: RankRequest, deadline: Duration) -> Result<RankReply> {
        match self {
            Self::Local { rank, actor } => {
                let rank = *rank;
                let op = req.name();
                match actor
                    .call(|reply| RankMsg { req, reply }, Some(deadline))
                    .await
                {
                    Ok(CallResult::Success(r)) => r,
                    Ok(CallResult::Timeout) => Err(Error::Rank {
                        rank,
                        reason: format!("no reply to {op} within {deadline:?}"),
                    }),
                    Ok(CallResult::SenderError) => Err(Error::Rank {
                        rank,
                        reason: format!("the rank actor stopped during {op}"),
                    }),
                    Err(e) => Err(Error::Rank {
                        rank,
                        reason: format!("the rank actor is not running ({e})"),
                    }),
                }
            }
            Self::Remote(r) => r.call(&req, deadline).await,
        }
    }

    /// Stops the rank without waiting for it: a Shutdown message to a remote rank (which
    /// exits even while a request runs), a stop signal to a local actor.
    pub async fn stop(&self) {
        match self {
            Self::Local { actor, .. } => actor.stop(Some("coordinator shutdown".into())),
            Self::Remote(r) => {
                let _ = r.call(&RankRequest::Shutdown, Duration::from_secs(2)).await;
            }
        }
    }
}
