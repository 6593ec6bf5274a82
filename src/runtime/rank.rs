//! The rank actor: owns a [`RankWorker`] and runs each request on a blocking thread, so
//! ranks of one process waiting on each other in a collective never starve the async
//! runtime.

use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::messages::{RankReply, RankRequest};
use super::worker::RankWorker;
use crate::error::{Error, Result};

/// A request and where its reply goes.
#[derive(Debug)]
pub struct RankMsg {
    /// The request.
    pub req: RankRequest,
    /// Reply port.
    pub reply: RpcReplyPort<Result<RankReply>>,
}

/// The rank actor (its state is the worker).
#[derive(Debug, Default)]
pub struct RankActor;

/// State of a running rank actor.
#[derive(Debug)]
pub struct RankState {
    rank: usize,
    /// Taken in `post_stop`, so the worker is dropped on a blocking thread.
    worker: Option<Arc<Mutex<RankWorker>>>,
}

impl Actor for RankActor {
    type Msg = RankMsg;
    type State = RankState;
    type Arguments = RankWorker;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        worker: RankWorker,
    ) -> std::result::Result<Self::State, ActorProcessingErr> {
        Ok(RankState {
            rank: worker.rank(),
            worker: Some(Arc::new(Mutex::new(worker))),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> std::result::Result<(), ActorProcessingErr> {
        // Communicators close their links with blocking calls; never on an async thread.
        if let Some(w) = state.worker.take() {
            let _ = tokio::task::spawn_blocking(move || drop(w)).await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> std::result::Result<(), ActorProcessingErr> {
        let shutdown = matches!(msg.req, RankRequest::Shutdown);
        let rank = state.rank;
        let Some(worker) = state.worker.clone() else {
            let _ = msg.reply.send(Err(Error::Rank {
                rank,
                reason: "the rank is stopping".into(),
            }));
            return Ok(());
        };
        let span = tracing::info_span!("rank", rank);
        let op = msg.req.name();
        let result = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            tracing::debug!(op, "request");
            let mut w = worker.lock().map_err(|_| Error::Rank {
                rank,
                reason: "an earlier request panicked; the rank is unusable".into(),
            })?;
            w.handle(msg.req)
        })
        .await
        .unwrap_or_else(|e| {
            Err(Error::Rank {
                rank,
                reason: format!("{op} panicked: {e}"),
            })
        });
        // The coordinator may have given up waiting; nothing else to tell it.
        let _ = msg.reply.send(result);
        if shutdown {
            myself.stop(Some("shutdown".into()));
        }
        Ok(())
    }
}

/// Spawns a rank actor for `worker`.
///
/// # Errors
/// The actor system refuses to spawn.
pub async fn spawn(worker: RankWorker) -> Result<(ActorRef<RankMsg>, tokio::task::JoinHandle<()>)> {
    let rank = worker.rank();
    Actor::spawn(None, RankActor, worker)
        .await
        .map_err(|e| Error::Rank {
            rank,
            reason: format!("cannot start the rank actor: {e}"),
        })
}
