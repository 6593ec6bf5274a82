//! A rank as a server: `shardwise rank` connects this rank's collectives, starts its rank
//! actor, and serves the authenticated control service (plus gRPC health) on its control
//! port until a coordinator sends Shutdown.

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::ActorRef;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::config::ClusterConfig;
use crate::comm::grpc::nonce;
use crate::error::{Error, Result};
use crate::proto::control_server::{Control, ControlServer};
use crate::proto::{control_reply, control_request, ControlReply, ControlRequest, Empty};
use crate::runtime::rank::{self, RankMsg};
use crate::runtime::remote::{control_proof, verify_control_proof, MAX_CONTROL_MESSAGE};
use crate::runtime::wire::{reply_to_proto, request_from_proto};
use crate::runtime::{RankRequest, RankWorker};

/// Longest a client may take for each handshake message.
const HANDSHAKE: Duration = Duration::from_secs(10);

struct ControlService {
    rank: usize,
    world: usize,
    token: Arc<String>,
    actor: ActorRef<RankMsg>,
    stop: Arc<Notify>,
}

type ReplyTx = mpsc::Sender<std::result::Result<ControlReply, Status>>;

fn reply(id: u64, body: control_reply::Body) -> std::result::Result<ControlReply, Status> {
    Ok(ControlReply {
        id,
        body: Some(body),
    })
}

async fn call_actor(
    actor: &ActorRef<RankMsg>,
    req: RankRequest,
) -> Result<crate::runtime::RankReply> {
    match actor.call(|reply| RankMsg { req, reply }, None).await {
        Ok(CallResult::Success(r)) => r,
        _ => Err(Error::Config {
            field: "rank actor".into(),
            reason: "the rank actor is not running".into(),
        }),
    }
}

impl ControlService {
    /// Runs one authenticated session: requests are executed in order by the rank actor;
    /// Shutdown is answered at once and stops the process even while a request runs.
    async fn run(self: Arc<Self>, mut inbound: Streaming<ControlRequest>, tx: ReplyTx) {
        let deny = |why: String| Status::unauthenticated(why);
        let first = tokio::time::timeout(HANDSHAKE, inbound.message()).await;
        let client_nonce = match first {
            Ok(Ok(Some(ControlRequest {
                body: Some(control_request::Body::ClientNonce(n)),
                ..
            }))) => n,
            _ => {
                let _ = tx
                    .send(Err(deny("expected the handshake's client nonce".into())))
                    .await;
                return;
            }
        };
        let server_nonce = nonce();
        let hello = crate::proto::ServerHello {
            rank: self.rank as u32,
            world_size: self.world as u32,
            server_nonce: server_nonce.clone().into(),
            server_proof: control_proof(&self.token, "control-server", &client_nonce, self.rank)
                .into(),
        };
        if tx
            .send(reply(0, control_reply::Body::ServerHello(hello)))
            .await
            .is_err()
        {
            return;
        }
        let ok = match tokio::time::timeout(HANDSHAKE, inbound.message()).await {
            Ok(Ok(Some(ControlRequest {
                body: Some(control_request::Body::ClientProof(p)),
                ..
            }))) => {
                verify_control_proof(&self.token, "control-client", &server_nonce, self.rank, &p)
            }
            _ => false,
        };
        if !ok {
            tracing::warn!(rank = self.rank, "control client failed authentication");
            let _ = tx
                .send(Err(deny(format!(
                    "rank {}: authentication failed (wrong cluster token)",
                    self.rank
                ))))
                .await;
            return;
        }
        if tx
            .send(reply(0, control_reply::Body::Authenticated(Empty {})))
            .await
            .is_err()
        {
            return;
        }
        // In-order execution queue; the reader below stays free to see Shutdown.
        let (qtx, mut qrx) = mpsc::channel::<(u64, RankRequest)>(64);
        let me = self.clone();
        let worker_tx = tx.clone();
        tokio::spawn(async move {
            while let Some((id, req)) = qrx.recv().await {
                let r = call_actor(&me.actor, req).await;
                if worker_tx.send(reply(id, reply_to_proto(r))).await.is_err() {
                    break;
                }
            }
        });
        loop {
            let msg = match inbound.message().await {
                Ok(Some(m)) => m,
                // The coordinator went away; the rank stays up for the next one.
                Ok(None) | Err(_) => break,
            };
            let id = msg.id;
            let parsed = msg
                .body
                .ok_or_else(|| Error::Config {
                    field: "control message".into(),
                    reason: "empty request".into(),
                })
                .and_then(request_from_proto);
            match parsed {
                Ok(Some(RankRequest::Shutdown)) => {
                    tracing::info!(rank = self.rank, "shutdown requested");
                    let _ = tx
                        .send(reply(id, control_reply::Body::Done(Empty {})))
                        .await;
                    // Let the reply leave before the process stops.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    self.stop.notify_one();
                    break;
                }
                Ok(Some(req)) => {
                    if qtx.send((id, req)).await.is_err() {
                        break;
                    }
                }
                Ok(None) => {
                    let _ = tx
                        .send(reply(
                            id,
                            control_reply::Body::Error(
                                "handshake message after authentication".into(),
                            ),
                        ))
                        .await;
                }
                Err(e) => {
                    let _ = tx
                        .send(reply(id, control_reply::Body::Error(e.to_string())))
                        .await;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Control for Arc<ControlService> {
    type SessionStream = ReceiverStream<std::result::Result<ControlReply, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<ControlRequest>>,
    ) -> std::result::Result<Response<Self::SessionStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(self.clone().run(request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves rank `rank` of `cfg` until a coordinator sends Shutdown: connects the collectives
/// (waiting up to the connect timeout for the peers), then serves control and health on the
/// rank's control port.
///
/// # Errors
/// A rank not in the file, an unreadable token, collectives that cannot connect (naming the
/// peer), or a control port that cannot be bound.
pub async fn serve_rank(cfg: ClusterConfig, rank: usize) -> Result<()> {
    let entry = cfg
        .ranks
        .iter()
        .find(|e| e.rank == rank)
        .cloned()
        .ok_or_else(|| Error::Config {
            field: "rank".into(),
            reason: format!(
                "{rank} is not in this cluster of {} ranks",
                cfg.world_size()
            ),
        })?;
    let token = Arc::new(cfg.resolve_token()?);
    let world = cfg.world_size();
    let addr = entry.control_addr();
    // Bind first, so a port clash is reported before waiting on peers.
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| Error::Io {
            path: format!("control port {addr} of rank {rank}").into(),
            source,
        })?;
    tracing::info!(rank, "connecting collectives");
    let cfg2 = cfg.clone();
    let comm = tokio::task::spawn_blocking(move || cfg2.connect_collectives(rank))
        .await
        .map_err(|e| Error::Rank {
            rank,
            reason: format!("collective setup panicked: {e}"),
        })??;
    let device = match comm.device() {
        candle_core::Device::Cpu => "cpu".to_string(),
        d => format!("{:?}", d.location()),
    };
    let (actor, _) = rank::spawn(RankWorker::new(Arc::from(comm))).await?;
    let stop = Arc::new(Notify::new());
    let svc = Arc::new(ControlService {
        rank,
        world,
        token,
        actor: actor.clone(),
        stop: stop.clone(),
    });
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<ControlServer<Arc<ControlService>>>()
        .await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!(rank, %addr, "serving");
    eprintln!("rank {rank}/{world}: serving control on {addr}, computing on {device}");
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(1)))
        .http2_keepalive_timeout(Some(Duration::from_secs(3)))
        .add_service(health_svc)
        .add_service(
            ControlServer::new(svc)
                .max_decoding_message_size(MAX_CONTROL_MESSAGE)
                .max_encoding_message_size(MAX_CONTROL_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, async move { stop.notified().await })
        .await
        .map_err(|e| Error::Rank {
            rank,
            reason: format!("control server failed: {e}"),
        })?;
    actor.stop(None);
    Ok(())
}
