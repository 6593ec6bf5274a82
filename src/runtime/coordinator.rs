//! The coordinator actor and the [`Cluster`] users drive. A request goes to every rank at
//! once (one message per rank, never one per layer); the reply of the rank that holds the
//! result comes back. The first rank to fail or die fails the request with its rank named;
//! the coordinator then stops every rank and refuses further requests with that cause.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::handle::RankHandle;
use super::messages::{HealthReport, LoadReport, LoadSpec, RankReply, RankRequest, StepRequest};
use super::rank;
use super::remote::RemoteRank;
use super::worker::RankWorker;
use crate::cluster::ClusterConfig;
use crate::comm::select::{in_process_group, TransportChoice};
use crate::comm::{Communicator, LocalComm};
use crate::error::{Error, Result};
use crate::model::StepOutput;
use crate::quant::IsqType;

/// A request for every rank, and where the replies go (in rank order).
#[derive(Debug)]
pub struct CoordMsg {
    /// The request.
    pub req: RankRequest,
    /// Reply port.
    pub reply: RpcReplyPort<Result<Vec<RankReply>>>,
}

/// The coordinator actor.
#[derive(Debug, Default)]
pub struct CoordinatorActor;

/// Coordinator state.
#[derive(Debug)]
pub struct CoordState {
    handles: Vec<RankHandle>,
    step_deadline: Duration,
    /// Whether steps are waited for hot: every rank's loaded shard is on a GPU, unless
    /// [`CoordArgs::hot_override`] says otherwise.
    hot_steps: bool,
    hot_override: Option<bool>,
    /// Set by the first failure: (rank, reason).
    failed: Option<(usize, String)>,
}

/// What the coordinator starts with.
#[derive(Debug)]
pub struct CoordArgs {
    /// One handle per rank, in rank order.
    pub handles: Vec<RankHandle>,
    /// Deadline of Step and Forward requests.
    pub step_deadline: Duration,
    /// Whether to wait for a step's replies without letting the coordinator's thread sleep
    /// (it polls, yielding to other tasks). A GPU step takes a few milliseconds, and waking
    /// a thread that slept that long costs about 0.15 ms on a virtual machine, every step.
    /// `None`: when every rank reported its shard on a GPU at the last load, where a busy
    /// core is cheap (CPU ranks need every core). Set by `SHARDWISE_HOT_STEPS=0|1`.
    pub hot_override: Option<bool>,
}

impl Actor for CoordinatorActor {
    type Msg = CoordMsg;
    type State = CoordState;
    type Arguments = CoordArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: CoordArgs,
    ) -> std::result::Result<Self::State, ActorProcessingErr> {
        Ok(CoordState {
            handles: args.handles,
            step_deadline: args.step_deadline,
            hot_steps: args.hot_override.unwrap_or(false),
            hot_override: args.hot_override,
            failed: None,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: CoordMsg,
        state: &mut CoordState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        if let Some((rank, why)) = &state.failed {
            let _ = msg.reply.send(Err(Error::Rank {
                rank: *rank,
                reason: format!("the cluster was stopped after this failure: {why}"),
            }));
            return Ok(());
        }
        let shutdown = matches!(msg.req, RankRequest::Shutdown);
        let deadline = msg.req.deadline(state.step_deadline);
        let hot = state.hot_steps && matches!(msg.req, RankRequest::Step(_));
        let load = matches!(msg.req, RankRequest::Load(_));
        let result = broadcast(&state.handles, msg.req, deadline, hot).await;
        if let (true, Ok(replies)) = (load, &result) {
            let on_gpus = replies
                .iter()
                .all(|r| matches!(r, RankReply::Loaded(l) if l.on_gpu));
            state.hot_steps = state.hot_override.unwrap_or(on_gpus);
        }
        if let Err(e) = &result {
            let (rank, why) = match e {
                Error::Rank { rank, reason } => (*rank, reason.clone()),
                other => (0, other.to_string()),
            };
            tracing::error!(rank, "request failed: {why}; stopping every rank");
            if !shutdown {
                for h in &state.handles {
                    h.stop().await;
                }
            }
            state.failed = Some((rank, why));
        }
        let _ = msg.reply.send(result);
        Ok(())
    }
}

/// Sends `req` to every rank concurrently; returns the replies in rank order, or the first
/// failure (as it happens, without waiting for the other ranks). The calls are polled by the
/// coordinator's own task (no task per rank), so a reply reaches it without another hop;
/// with `hot`, without its thread going to sleep either.
async fn broadcast(
    handles: &[RankHandle],
    req: RankRequest,
    deadline: Duration,
    hot: bool,
) -> Result<Vec<RankReply>> {
    let mut calls: FuturesUnordered<_> = handles
        .iter()
        .map(|h| {
            let req = req.clone();
            async move {
                let rank = h.rank();
                let r = h.call(req, deadline).await.map_err(|e| match e {
                    e @ Error::Rank { .. } => e,
                    other => Error::Rank {
                        rank,
                        reason: other.to_string(),
                    },
                });
                (rank, r)
            }
        })
        .collect();
    let mut replies: Vec<Option<RankReply>> = vec![None; handles.len()];
    while let Some((rank, r)) = next_reply(&mut calls, hot).await {
        match r {
            Ok(reply) => replies[rank] = Some(reply),
            // Dropping the calls abandons the other ranks; they are stopped next.
            Err(e) => {
                drop(calls);
                return Err(root_cause(handles, e).await);
            }
        }
    }
    Ok(replies.into_iter().flatten().collect())
}

/// The next of `calls` to finish; with `hot`, polled in a loop that yields to other tasks
/// instead of letting the thread sleep (the calls' own deadlines still bound the wait): a
/// thread woken after a few milliseconds asleep costs ~0.15 ms on these virtual machines,
/// several times a GPU step's messages. While it polls, the runtime's thread also keeps
/// polling the sockets (tokio checks them between tasks), so a reply over the network is seen
/// without a wake-up either. For waits that last a GPU step, not longer.
async fn next_reply<S: futures_util::Stream + Unpin>(calls: &mut S, hot: bool) -> Option<S::Item> {
    if !hot {
        return calls.next().await;
    }
    loop {
        if let Some(item) = calls.next().now_or_never() {
            return item;
        }
        tokio::task::yield_now().await;
    }
}

/// When one rank process dies, a survivor's collective can report the broken link before the
/// coordinator has seen the dead rank's control session close, and a launcher then stops the
/// neighbours, whose sessions break too. So with rank servers, an error waits a short grace
/// for a broken session; the rank whose session broke first is the cause, else the error that
/// arrived first. (In-process ranks cannot die alone: no wait.)
async fn root_cause(handles: &[RankHandle], first: Error) -> Error {
    const GRACE: Duration = Duration::from_millis(500);
    if !handles.iter().any(|h| matches!(h, RankHandle::Remote(_))) {
        return first;
    }
    let t0 = tokio::time::Instant::now();
    while !handles.iter().any(|h| h.died_at().is_some()) {
        if t0.elapsed() >= GRACE {
            return first;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let earliest = handles
        .iter()
        .filter_map(|h| h.died_at().map(|t| (t, h.rank())))
        .min();
    match (earliest, &first) {
        (Some((_, rank)), Error::Rank { rank: r, .. }) if rank != *r => {
            let reason = handles[rank]
                .call(RankRequest::Health, Duration::from_millis(10))
                .await
                .err()
                .map_or_else(
                    || "lost its connection".to_string(),
                    |e| match e {
                        Error::Rank { reason, .. } => reason,
                        other => other.to_string(),
                    },
                );
            Error::Rank {
                rank,
                reason: format!("{reason} (first of the ranks to fail; then: {first})"),
            }
        }
        _ => first,
    }
}

/// Which collectives in-process ranks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LocalTransport {
    /// Shared buffers between threads (fastest).
    #[default]
    InProcess,
    /// Real gRPC links on loopback.
    Grpc,
    /// Real shared-memory segments.
    Shm,
    /// NCCL on CUDA devices `0..world`, one per rank (feature `cuda`).
    #[cfg(feature = "cuda")]
    Nccl,
}

impl LocalTransport {
    /// `world` communicators of this process over this transport, in rank order (blocking:
    /// links connect and NCCL initialises here).
    ///
    /// # Errors
    /// A world size of 0, or the transport cannot connect.
    pub fn group(self, world: usize) -> Result<Vec<Arc<dyn Communicator>>> {
        Ok(match self {
            LocalTransport::InProcess => LocalComm::group(world)?
                .into_iter()
                .map(|c| Arc::new(c) as Arc<dyn Communicator>)
                .collect(),
            #[cfg(feature = "cuda")]
            LocalTransport::Nccl => crate::comm::nccl::group(world)?
                .into_iter()
                .map(|c| Arc::new(c) as Arc<dyn Communicator>)
                .collect(),
            LocalTransport::Grpc | LocalTransport::Shm => {
                let choice = if self == LocalTransport::Grpc {
                    TransportChoice::Grpc
                } else {
                    TransportChoice::Shm
                };
                in_process_group(world, choice, &crate::comm::grpc::random_token())?
            }
        })
    }
}

/// A running cluster: the coordinator and its ranks, local or remote.
#[derive(Debug)]
pub struct Cluster {
    coord: ActorRef<CoordMsg>,
    world: usize,
}

/// Default deadline of a step for in-process clusters.
const LOCAL_STEP_DEADLINE: Duration = Duration::from_secs(300);

impl Cluster {
    /// Starts `world` rank actors in this process and a coordinator over them.
    ///
    /// # Errors
    /// A world size of 0, or the transport cannot connect.
    pub async fn local(world: usize, transport: LocalTransport) -> Result<Self> {
        let comms = tokio::task::spawn_blocking(move || transport.group(world))
            .await
            .map_err(|e| Error::Rank {
                rank: 0,
                reason: format!("connecting collectives failed: {e}"),
            })??;
        let mut handles = Vec::with_capacity(world);
        for comm in comms {
            let rank = comm.rank();
            let (actor, _) = rank::spawn(RankWorker::new(comm)).await?;
            handles.push(RankHandle::Local { rank, actor });
        }
        Self::start(handles, LOCAL_STEP_DEADLINE).await
    }

    /// Connects to the rank servers `ranks.toml` lists (started by `shardwise launch` or
    /// `shardwise rank`), authenticating each.
    ///
    /// # Errors
    /// An unreadable token, or a rank that cannot be reached or authenticated in the
    /// connect timeout (named).
    pub async fn connect(cfg: &ClusterConfig) -> Result<Self> {
        let token = cfg.resolve_token()?;
        let world = cfg.world_size();
        let mut set = tokio::task::JoinSet::new();
        for e in &cfg.ranks {
            let (addr, rank, token) = (e.control_addr(), e.rank, token.clone());
            let deadline = cfg.connect_timeout;
            set.spawn(
                async move { RemoteRank::connect(&addr, rank, world, &token, deadline).await },
            );
        }
        let mut remotes = Vec::with_capacity(world);
        while let Some(r) = set.join_next().await {
            remotes.push(r.map_err(|e| Error::Rank {
                rank: 0,
                reason: format!("connect task failed: {e}"),
            })??);
        }
        remotes.sort_by_key(RemoteRank::rank);
        let handles = remotes.into_iter().map(RankHandle::Remote).collect();
        // A step waits at most on a few collectives, each bounded by the collective timeout.
        let step = (cfg.collective_timeout * 2).max(Duration::from_secs(60));
        Self::start(handles, step).await
    }

    async fn start(handles: Vec<RankHandle>, step_deadline: Duration) -> Result<Self> {
        // `SHARDWISE_HOT_STEPS=0|1` forces step waits cold or hot (to measure them); unset,
        // they are hot when every shard is on a GPU.
        let hot_override = match std::env::var("SHARDWISE_HOT_STEPS").as_deref() {
            Ok("0") => Some(false),
            Ok("1") => Some(true),
            _ => None,
        };
        let world = handles.len();
        let (coord, _) = Actor::spawn(
            None,
            CoordinatorActor,
            CoordArgs {
                handles,
                step_deadline,
                hot_override,
            },
        )
        .await
        .map_err(|e| Error::Rank {
            rank: 0,
            reason: format!("cannot start the coordinator: {e}"),
        })?;
        Ok(Self { coord, world })
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Sends `req` to every rank; replies in rank order.
    ///
    /// # Errors
    /// The first rank failure, naming the rank.
    pub async fn request(&self, req: RankRequest) -> Result<Vec<RankReply>> {
        match self.coord.call(|reply| CoordMsg { req, reply }, None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            Ok(_) | Err(_) => Err(Error::Rank {
                rank: 0,
                reason: "the coordinator is not running".into(),
            }),
        }
    }

    /// Loads a checkpoint on every rank.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub async fn load(&self, spec: LoadSpec) -> Result<Vec<LoadReport>> {
        let replies = self.request(RankRequest::Load(spec)).await?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RankReply::Loaded(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// One step; per sequence its logits, or its token where it asked for one
    /// ([`crate::model::SeqStep::sample`]).
    ///
    /// # Errors
    /// As [`Self::request`].
    pub async fn step_outputs(&self, step: StepRequest) -> Result<Vec<StepOutput>> {
        for r in self.request(RankRequest::Step(step)).await? {
            if let RankReply::Step(l) = r {
                return Ok(l);
            }
        }
        Err(missing("step", "outputs"))
    }

    /// One step of sequences that ask for no token; logits per sequence.
    ///
    /// # Errors
    /// As [`Self::request`]; a sequence that asked for a token (use [`Self::step_outputs`]).
    pub async fn step(&self, step: StepRequest) -> Result<Vec<Tensor>> {
        self.step_outputs(step)
            .await?
            .into_iter()
            .map(|o| match o {
                StepOutput::Logits(l) => Ok(l),
                StepOutput::Token(_) => Err(Error::Config {
                    field: "sample".into(),
                    reason: "a sequence asked for a token: its step returns no logits \
                             (Cluster::step_outputs returns both)"
                        .into(),
                }),
            })
            .collect()
    }

    /// Runs decoder layers on `input`.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub async fn forward(&self, layers: std::ops::Range<usize>, input: Tensor) -> Result<Tensor> {
        for r in self.request(RankRequest::Forward { layers, input }).await? {
            if let RankReply::Tensor(t) = r {
                return Ok(t);
            }
        }
        Err(missing("forward", "a tensor"))
    }

    /// Quantizes matching linear layers on every rank; returns the count per rank.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub async fn apply_isq(&self, ty: IsqType, filter: Vec<String>) -> Result<Vec<usize>> {
        let replies = self.request(RankRequest::ApplyIsq { ty, filter }).await?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RankReply::Quantized(n) => Some(n),
                _ => None,
            })
            .collect())
    }

    /// Each rank writes its shard next to `prefix`; returns the files in rank order.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub async fn serialize(&self, prefix: PathBuf) -> Result<Vec<(PathBuf, u64)>> {
        let replies = self
            .request(RankRequest::Serialize { path: prefix })
            .await?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RankReply::Serialized { file, bytes } => Some((file, bytes)),
                _ => None,
            })
            .collect())
    }

    /// Every rank's state.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub async fn health(&self) -> Result<Vec<HealthReport>> {
        let replies = self.request(RankRequest::Health).await?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RankReply::Health(h) => Some(h),
                _ => None,
            })
            .collect())
    }

    /// Stops every rank (rank processes exit) and the coordinator.
    ///
    /// # Errors
    /// A rank that does not acknowledge.
    pub async fn shutdown(self) -> Result<()> {
        let r = self.request(RankRequest::Shutdown).await.map(|_| ());
        self.coord.stop(None);
        r
    }
}

fn missing(op: &str, what: &str) -> Error {
    Error::Rank {
        rank: 0,
        reason: format!("{op}: rank 0 returned no {what}"),
    }
}
