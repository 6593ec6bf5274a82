//! The coordinator's proxy for a rank in another process or host: one authenticated
//! `Control.Session` stream, requests matched to replies by id. HTTP/2 keepalives notice a
//! vanished host within seconds; a broken stream fails every pending request naming the rank.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::Mac;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use super::messages::{RankReply, RankRequest};
use super::wire::{reply_from_proto, request_to_proto};
use crate::comm::grpc::{mac, nonce};
use crate::error::{Error, Result};
use crate::proto::control_client::ControlClient;
use crate::proto::{control_reply, control_request, ControlReply, ControlRequest};

/// Largest control message (logits of a long prompt, forward tensors).
pub const MAX_CONTROL_MESSAGE: usize = 1 << 30;

/// HMAC proof of the control handshake: `label` is `control-server` or `control-client`.
pub(crate) fn control_proof(token: &str, label: &str, nonce: &[u8], rank: usize) -> Vec<u8> {
    mac(
        token.as_bytes(),
        &[label.as_bytes(), nonce, &(rank as u32).to_le_bytes()],
    )
    .finalize()
    .into_bytes()
    .to_vec()
}

/// Checks a proof in constant time.
pub(crate) fn verify_control_proof(
    token: &str,
    label: &str,
    nonce: &[u8],
    rank: usize,
    proof: &[u8],
) -> bool {
    mac(
        token.as_bytes(),
        &[label.as_bytes(), nonce, &(rank as u32).to_le_bytes()],
    )
    .verify_slice(proof)
    .is_ok()
}

async fn next_handshake(
    inbound: &mut tonic::Streaming<ControlReply>,
    rank: usize,
    addr: &str,
) -> Result<Option<control_reply::Body>> {
    let hs = Duration::from_secs(10);
    match tokio::time::timeout(hs, inbound.message()).await {
        Err(_) => Err(rank_err(
            rank,
            format!("{addr}: no handshake reply in {hs:?}"),
        )),
        Ok(Err(s)) => Err(rank_err(rank, format!("{addr}: {}", s.message()))),
        Ok(Ok(None)) => Err(rank_err(rank, format!("{addr}: closed the session"))),
        Ok(Ok(Some(m))) => Ok(m.body),
    }
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<ControlReply>>>>;

#[derive(Debug)]
struct Inner {
    rank: usize,
    addr: String,
    tx: mpsc::Sender<ControlRequest>,
    pending: Arc<Pending>,
    /// Why and when the session broke.
    dead: Arc<Mutex<Option<(String, Instant)>>>,
    next_id: AtomicU64,
}

/// A connected, authenticated remote rank.
#[derive(Debug, Clone)]
pub struct RemoteRank(Arc<Inner>);

fn rank_err(rank: usize, reason: impl Into<String>) -> Error {
    Error::Rank {
        rank,
        reason: reason.into(),
    }
}

impl RemoteRank {
    /// Connects to rank `rank` at `addr` (retrying until `deadline` while it starts) and
    /// authenticates both ways on `token`.
    ///
    /// # Errors
    /// Nothing answers in time, the token does not match, or the server is another rank or
    /// another cluster size than expected.
    pub async fn connect(
        addr: &str,
        rank: usize,
        world: usize,
        token: &str,
        deadline: Duration,
    ) -> Result<Self> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| rank_err(rank, format!("bad control address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
        let start = Instant::now();
        let channel = loop {
            match endpoint.connect().await {
                Ok(c) => break c,
                Err(e) if start.elapsed() >= deadline => {
                    return Err(rank_err(
                        rank,
                        format!("no rank server at {addr} after {deadline:?}: {e}"),
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let mut client = ControlClient::new(channel)
            .max_decoding_message_size(MAX_CONTROL_MESSAGE)
            .max_encoding_message_size(MAX_CONTROL_MESSAGE);
        let (tx, rx) = mpsc::channel::<ControlRequest>(16);
        let client_nonce = nonce();
        let send = |id, body| ControlRequest {
            id,
            body: Some(body),
        };
        tx.send(send(
            0,
            control_request::Body::ClientNonce(client_nonce.clone().into()),
        ))
        .await
        .map_err(|_| rank_err(rank, "control stream closed"))?;
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|s| rank_err(rank, format!("{addr}: {}", s.message())))?
            .into_inner();
        let hello = match next_handshake(&mut inbound, rank, addr).await? {
            Some(control_reply::Body::ServerHello(h)) => h,
            other => {
                return Err(rank_err(
                    rank,
                    format!("{addr}: unexpected handshake reply {other:?}"),
                ))
            }
        };
        if !verify_control_proof(
            token,
            "control-server",
            &client_nonce,
            rank,
            &hello.server_proof,
        ) {
            return Err(rank_err(
                rank,
                format!(
                    "{addr} failed authentication: it does not hold this cluster's token, or it \
                     is not rank {rank} (it says rank {})",
                    hello.rank
                ),
            ));
        }
        if hello.rank as usize != rank || hello.world_size as usize != world {
            return Err(rank_err(
                rank,
                format!(
                    "{addr} is rank {} of {}; ranks.toml says rank {rank} of {world}",
                    hello.rank, hello.world_size
                ),
            ));
        }
        let proof = control_proof(token, "control-client", &hello.server_nonce, rank);
        tx.send(send(0, control_request::Body::ClientProof(proof.into())))
            .await
            .map_err(|_| rank_err(rank, "control stream closed"))?;
        match next_handshake(&mut inbound, rank, addr).await? {
            Some(control_reply::Body::Authenticated(_)) => {}
            other => {
                return Err(rank_err(
                    rank,
                    format!("{addr}: authentication refused: {other:?}"),
                ))
            }
        }
        let pending: Arc<Pending> = Arc::default();
        let dead: Arc<Mutex<Option<(String, Instant)>>> = Arc::default();
        let (p, d, a) = (pending.clone(), dead.clone(), addr.to_string());
        tokio::spawn(async move {
            let why = loop {
                match inbound.message().await {
                    Ok(Some(reply)) => {
                        let waiter = p.lock().ok().and_then(|mut m| m.remove(&reply.id));
                        if let Some(w) = waiter {
                            let _ = w.send(Ok(reply));
                        }
                    }
                    Ok(None) => break format!("{a} closed the control session"),
                    Err(s) => {
                        break format!(
                            "lost the connection to {a} (process died or host unreachable): {}",
                            s.message()
                        )
                    }
                }
            };
            if let Ok(mut d) = d.lock() {
                *d = Some((why.clone(), Instant::now()));
            }
            let waiters: Vec<_> = p
                .lock()
                .map(|mut m| m.drain().collect())
                .unwrap_or_default();
            for (_, w) in waiters {
                let _ = w.send(Err(rank_err(rank, why.clone())));
            }
        });
        Ok(Self(Arc::new(Inner {
            rank,
            addr: addr.to_string(),
            tx,
            pending,
            dead,
            next_id: AtomicU64::new(1),
        })))
    }

    /// Rank number.
    pub fn rank(&self) -> usize {
        self.0.rank
    }

    /// When the control session broke, if it did.
    pub fn died_at(&self) -> Option<Instant> {
        self.0
            .dead
            .lock()
            .ok()
            .and_then(|d| d.as_ref().map(|(_, t)| *t))
    }

    /// Control address.
    pub fn addr(&self) -> &str {
        &self.0.addr
    }

    /// Sends `req` and waits up to `deadline` for its reply.
    ///
    /// # Errors
    /// The rank's error, a lost connection, or no reply in time; all name the rank.
    pub async fn call(&self, req: &RankRequest, deadline: Duration) -> Result<RankReply> {
        let rank = self.0.rank;
        if let Some((why, _)) = self.0.dead.lock().ok().and_then(|d| d.clone()) {
            return Err(rank_err(rank, why));
        }
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let (wtx, wrx) = oneshot::channel();
        if let Ok(mut p) = self.0.pending.lock() {
            p.insert(id, wtx);
        }
        let msg = ControlRequest {
            id,
            body: Some(request_to_proto(req)?),
        };
        let forget = || {
            if let Ok(mut p) = self.0.pending.lock() {
                p.remove(&id);
            }
        };
        if self.0.tx.send(msg).await.is_err() {
            forget();
            return Err(rank_err(
                rank,
                format!("{}: control stream closed", self.0.addr),
            ));
        }
        let op = req.name();
        match tokio::time::timeout(deadline, wrx).await {
            Err(_) => {
                forget();
                Err(rank_err(
                    rank,
                    format!("no reply to {op} within {deadline:?}"),
                ))
            }
            Ok(Err(_)) => Err(rank_err(rank, "control session ended")),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok(reply))) => match reply.body {
                Some(b) => reply_from_proto(b, rank),
                None => Err(rank_err(rank, "empty reply")),
            },
        }
    }
}
