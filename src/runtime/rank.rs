//! The rank actor: owns a [`RankWorker`] on a thread of its own and hands it each request in
//! turn, so ranks of one process waiting on each other in a collective never starve the async
//! runtime.
//!
//! The thread stays the same for the rank's life and, after a request, watches for the next
//! one for a short while before it sleeps ([`RANK_SPIN_US`]): a decode step's request then
//! starts at once instead of after waking a sleeping thread (tens of microseconds on a
//! virtual machine, per rank and step). The thread answers the coordinator itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::messages::{RankReply, RankRequest};
use super::worker::RankWorker;
use crate::error::{Error, Result};

/// How long a rank thread watches for its next request before it sleeps, unless
/// `SHARDWISE_RANK_SPIN_US` says otherwise (0: sleep at once).
fn rank_spin() -> Duration {
    static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        Duration::from_micros(crate::comm::env_usize("SHARDWISE_RANK_SPIN_US", RANK_SPIN_US) as u64)
    })
}

/// Default of the rank's watch (`SHARDWISE_RANK_SPIN_US` overrides it): longer than the coordinator takes between the steps of a
/// generation, short enough that an idle rank costs nothing.
pub const RANK_SPIN_US: usize = 300;

/// A request and where its reply goes.
#[derive(Debug)]
pub struct RankMsg {
    /// The request.
    pub req: RankRequest,
    /// Reply port.
    pub reply: RpcReplyPort<Result<RankReply>>,
}

/// The rank actor (its state is the channel to the rank thread).
#[derive(Debug, Default)]
pub struct RankActor;

/// State of a running rank actor.
#[derive(Debug)]
pub struct RankState {
    rank: usize,
    /// Requests to the rank thread; dropped in `post_stop`, which ends the thread.
    to_thread: Option<Sender<RankMsg>>,
    /// The rank thread, joined in `post_stop` unless it is inside a request.
    thread: Option<std::thread::JoinHandle<()>>,
    /// Shared with the thread.
    flags: Arc<ThreadFlags>,
}

/// The next message, watching for `spin` before sleeping; `None` once the actor is gone.
fn next_msg(rx: &Receiver<RankMsg>, spin: Duration) -> Option<RankMsg> {
    let t0 = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(m) => return Some(m),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) if t0.elapsed() >= spin => return rx.recv().ok(),
            Err(TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
}

/// The rank thread: executes each request on `worker` and answers it. A panicking request
/// leaves the rank unusable: it and every later request get an error naming the rank. Once
/// the actor stops (`stopping`), requests still queued are refused, not run. A Shutdown drops
/// the worker (model, communicator) before it is answered, so a cluster whose shutdown
/// returned holds no device or link any more, and the thread ends.
fn rank_thread(worker: RankWorker, rx: Receiver<RankMsg>, flags: Arc<ThreadFlags>) {
    let rank = worker.rank();
    let mut worker = Some(worker);
    let mut broken: Option<String> = None;
    while let Some(msg) = next_msg(&rx, rank_spin()) {
        let shutdown = matches!(msg.req, RankRequest::Shutdown);
        if flags.stopping.load(Ordering::SeqCst) && !shutdown {
            let _ = msg.reply.send(Err(Error::Rank {
                rank,
                reason: "the rank is stopping".into(),
            }));
            continue;
        }
        flags.busy.store(!shutdown, Ordering::SeqCst);
        let op = msg.req.name();
        let result = match (&broken, worker.as_mut()) {
            (Some(why), _) => Err(Error::Rank {
                rank,
                reason: format!("an earlier request panicked ({why}); the rank is unusable"),
            }),
            (None, None) => Err(Error::Rank {
                rank,
                reason: "the rank has shut down".into(),
            }),
            (None, Some(w)) => {
                let _span = tracing::info_span!("rank", rank).entered();
                tracing::debug!(op, "request");
                let req = msg.req;
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.handle(req))) {
                    Ok(r) => r,
                    Err(p) => {
                        let why = panic_text(p.as_ref());
                        broken = Some(format!("{op}: {why}"));
                        Err(Error::Rank {
                            rank,
                            reason: format!("{op} panicked: {why}"),
                        })
                    }
                }
            }
        };
        if shutdown {
            drop(worker.take());
        }
        // The coordinator may have given up waiting; nothing else to tell it.
        let _ = msg.reply.send(result);
        flags.busy.store(false, Ordering::SeqCst);
        if shutdown {
            break;
        }
    }
}

/// What the actor and its rank thread share.
#[derive(Debug, Default)]
struct ThreadFlags {
    /// The thread is executing a request other than Shutdown.
    busy: AtomicBool,
    /// The actor has stopped: queued requests are refused.
    stopping: AtomicBool,
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
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
        let rank = worker.rank();
        let (tx, rx) = mpsc::channel();
        let flags = Arc::new(ThreadFlags::default());
        let f = flags.clone();
        let thread = std::thread::Builder::new()
            .name(format!("rank-{rank}"))
            .spawn(move || rank_thread(worker, rx, f))
            .map_err(|e| format!("rank {rank}: cannot start the rank thread: {e}"))?;
        Ok(RankState {
            rank,
            to_thread: Some(tx),
            thread: Some(thread),
            flags,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> std::result::Result<(), ActorProcessingErr> {
        // Closing the channel ends the thread after its current request; it then drops the
        // worker (communicators close their links with blocking calls). An idle thread is
        // waited for, so a stopped cluster has released its devices; one still inside a
        // request (stopped after a failure) finishes on its own.
        state.flags.stopping.store(true, Ordering::SeqCst);
        state.to_thread = None;
        if let Some(t) = state.thread.take() {
            if !state.flags.busy.load(Ordering::SeqCst) {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
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
        match &state.to_thread {
            Some(tx) => {
                if let Err(mpsc::SendError(msg)) = tx.send(msg) {
                    let _ = msg.reply.send(Err(Error::Rank {
                        rank,
                        reason: "the rank thread has stopped".into(),
                    }));
                }
            }
            None => {
                let _ = msg.reply.send(Err(Error::Rank {
                    rank,
                    reason: "the rank is stopping".into(),
                }));
            }
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::comm::{Communicator, LocalComm};
    use crate::runtime::handle::RankHandle;

    /// A rank answers on its thread, releases its communicator before it acknowledges a
    /// Shutdown, and refuses anything after it, naming itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_releases_the_worker_before_it_is_acknowledged() {
        let comm: Arc<dyn Communicator> = Arc::new(LocalComm::group(1).unwrap().remove(0));
        let (actor, _) = spawn(RankWorker::new(comm.clone())).await.unwrap();
        let h = RankHandle::Local { rank: 0, actor };
        let deadline = Duration::from_secs(10);
        for _ in 0..3 {
            match h.call(RankRequest::Health, deadline).await.unwrap() {
                RankReply::Health(r) => assert_eq!((r.rank, r.world_size), (0, 1)),
                other => panic!("health answered {other:?}"),
            }
        }
        assert!(
            Arc::strong_count(&comm) > 1,
            "the rank holds its communicator"
        );
        let done = h.call(RankRequest::Shutdown, deadline).await.unwrap();
        assert!(matches!(done, RankReply::Done), "{done:?}");
        assert_eq!(
            Arc::strong_count(&comm),
            1,
            "the worker outlived its Shutdown"
        );
        let err = h.call(RankRequest::Health, deadline).await.unwrap_err();
        assert!(err.to_string().contains("rank 0"), "{err}");
    }
}
