//! gRPC links between ranks on different hosts (tonic over HTTP/2).
//!
//! Every rank runs a `Collective` server and opens one long-lived client stream to each
//! peer. Frames are queued without waiting for replies; the peer's server hands them to a
//! per-sender inbox. HTTP/2 windows and frame sizes are set for bulk transfer, and each
//! received frame is capped in size.
//!
//! Peers authenticate with a shared cluster token: a challenge-response (HMAC-SHA256 over
//! fresh nonces) in `Hello`, then a one-time proof on the `Exchange` stream. A caller without
//! the token cannot open a stream, so it cannot inject tensors. The token authenticates; it
//! does not encrypt: run on a trusted network or inside a VPN.
//!
//! No wait is unbounded: dialling, the handshake and every receive have deadlines, and a
//! peer whose stream ends or fails is reported by rank and address on every rank.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

use super::links::{AlgoConfig, LinkComm, Links};
use crate::error::{Error, Result};
use crate::proto::collective_client::CollectiveClient;
use crate::proto::collective_server::{Collective, CollectiveServer};
use crate::proto::{ExchangeEnd, Frame, HelloReply, HelloRequest, PROTOCOL_VERSION};

/// Environment variable holding the cluster token when the config does not.
pub const TOKEN_ENV: &str = "SHARDWISE_TOKEN";

/// HTTP/2 flow-control windows, both directions: large enough that a pipelined ring never
/// waits for a WINDOW_UPDATE on a fast link.
const STREAM_WINDOW: u32 = 64 << 20;
const CONNECTION_WINDOW: u32 = 128 << 20;

/// Step number of heartbeat frames (never delivered to collectives).
const HEARTBEAT_STEP: u32 = u32::MAX - 1;

const RANK_KEY: &str = "x-shardwise-rank";
const NONCE_KEY: &str = "x-shardwise-nonce";
const PROOF_KEY: &str = "x-shardwise-proof";

/// Settings of a gRPC group.
#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// Shared secret every rank of the cluster holds.
    pub token: String,
    /// Deadline of every receive inside a collective.
    pub timeout: Duration,
    /// Deadline for reaching every peer and being reached by every peer at start-up.
    pub connect_timeout: Duration,
    /// Collective algorithm tuning (chunk size, small-message threshold).
    pub algo: AlgoConfig,
    /// Largest frame accepted from a peer, in bytes.
    pub max_message_bytes: usize,
    /// Interval of the heartbeat every rank sends every peer.
    pub heartbeat: Duration,
    /// A peer not heard from (data or heartbeat) for this long is reported as lost, by
    /// every rank that has a link to it: a cut cable or a stopped process is named even
    /// while this rank waits on someone else.
    pub silence_limit: Duration,
}

impl GrpcConfig {
    /// Defaults with the given token: 60 s collective deadline, 30 s to connect, 1 MiB
    /// chunks, 256 KiB direct-exchange threshold, 64 MiB frame cap, a heartbeat every 250 ms
    /// and peers lost after 5 s of silence.
    pub fn new(token: impl Into<String>) -> Self {
        Self {
            token: token.into(),
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            algo: AlgoConfig::default(),
            max_message_bytes: 64 << 20,
            heartbeat: Duration::from_millis(250),
            silence_limit: Duration::from_secs(5),
        }
    }

    /// Defaults with the token from `SHARDWISE_TOKEN`.
    ///
    /// # Errors
    /// The variable is unset or empty.
    pub fn from_env() -> Result<Self> {
        match std::env::var(TOKEN_ENV) {
            Ok(t) if !t.is_empty() => Ok(Self::new(t)),
            _ => Err(Error::Config {
                field: TOKEN_ENV.into(),
                reason: "set a cluster token (the same secret on every rank)".into(),
            }),
        }
    }
}

pub(crate) type HmacSha256 = Hmac<Sha256>;

pub(crate) fn mac(token: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(token).unwrap_or_else(|_| unreachable!());
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m
}

fn proof_parts<'a>(
    label: &'a [u8],
    nonce: &'a [u8],
    a: &'a [u8; 4],
    b: &'a [u8; 4],
    w: &'a [u8; 4],
) -> [&'a [u8]; 5] {
    [label, nonce, a, b, w]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A fresh random cluster token (in-process clusters, tests).
pub fn random_token() -> String {
    hex(&nonce())
}

pub(crate) fn nonce() -> Vec<u8> {
    let mut n = vec![0u8; 32];
    rand::rng().fill_bytes(&mut n);
    n
}

enum Event {
    Frame(Frame),
    Gone(String),
}

/// State shared by this rank's server and its links.
struct Shared {
    rank: usize,
    world: usize,
    token: Vec<u8>,
    addrs: Vec<String>,
    /// Server nonces handed out by `Hello`, by caller rank; each is good for one stream.
    issued: Mutex<HashMap<Vec<u8>, usize>>,
    inbox_tx: Vec<Mutex<std_mpsc::Sender<Event>>>,
    connected: Mutex<Vec<bool>>,
    refusals: Mutex<Vec<String>>,
    dead: Mutex<Vec<(usize, String)>>,
    /// Reasons peers gave when they aborted: the root cause, preferred over the peer's
    /// disconnect that follows it.
    aborts: Mutex<Vec<String>>,
    /// When each peer was last heard from.
    last_seen: Mutex<Vec<Instant>>,
}

impl Shared {
    fn peer(&self, r: usize) -> String {
        format!(
            "rank {r} ({})",
            self.addrs.get(r).map_or("?", |s| s.as_str())
        )
    }

    fn mark_dead(&self, r: usize, reason: String) {
        let mut dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        if !dead.iter().any(|(d, _)| *d == r) {
            dead.push((r, reason.clone()));
        }
        drop(dead);
        if let Some(tx) = self.inbox_tx.get(r) {
            let _ = tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(Event::Gone(reason));
        }
    }

    fn refuse(&self, why: String) -> Status {
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(why.clone());
        Status::unauthenticated(why)
    }
}

struct Service(Arc<Shared>);

#[tonic::async_trait]
impl Collective for Service {
    async fn hello(
        &self,
        req: Request<HelloRequest>,
    ) -> std::result::Result<Response<HelloReply>, Status> {
        let s = &self.0;
        let h = req.into_inner();
        if h.protocol_version != PROTOCOL_VERSION {
            return Err(s.refuse(format!(
                "protocol version {} refused; this rank speaks {PROTOCOL_VERSION}",
                h.protocol_version
            )));
        }
        if h.world_size as usize != s.world
            || h.target_rank as usize != s.rank
            || h.rank as usize >= s.world
            || h.rank as usize == s.rank
        {
            return Err(s.refuse(format!(
                "caller says rank {} of {} calling rank {}; this is rank {} of {}",
                h.rank, h.world_size, h.target_rank, s.rank, s.world
            )));
        }
        let server_nonce = nonce();
        let (me, them, w) = (
            (s.rank as u32).to_le_bytes(),
            h.rank.to_le_bytes(),
            (s.world as u32).to_le_bytes(),
        );
        let proof = mac(
            &s.token,
            &proof_parts(b"server", &h.client_nonce, &me, &them, &w),
        )
        .finalize()
        .into_bytes();
        s.issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(server_nonce.clone(), h.rank as usize);
        Ok(Response::new(HelloReply {
            protocol_version: PROTOCOL_VERSION,
            world_size: s.world as u32,
            rank: s.rank as u32,
            server_nonce: server_nonce.into(),
            server_proof: proof.to_vec().into(),
        }))
    }

    async fn exchange(
        &self,
        req: Request<tonic::Streaming<Frame>>,
    ) -> std::result::Result<Response<ExchangeEnd>, Status> {
        let s = self.0.clone();
        let md = req.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (Some(rank), Some(n), Some(p)) = (get(RANK_KEY), get(NONCE_KEY), get(PROOF_KEY)) else {
            return Err(s.refuse("stream without credentials refused".into()));
        };
        let from: usize = rank
            .parse()
            .map_err(|_| s.refuse(format!("bad rank `{rank}` refused")))?;
        let (Some(nonce), Some(proof)) = (unhex(&n), unhex(&p)) else {
            return Err(s.refuse(format!("rank {from}: malformed credentials refused")));
        };
        let issued_to = s
            .issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&nonce);
        if issued_to != Some(from) {
            return Err(s.refuse(format!("rank {from}: unknown or reused nonce refused")));
        }
        let (them, me, w) = (
            (from as u32).to_le_bytes(),
            (s.rank as u32).to_le_bytes(),
            (s.world as u32).to_le_bytes(),
        );
        if mac(&s.token, &proof_parts(b"client", &nonce, &them, &me, &w))
            .verify_slice(&proof)
            .is_err()
        {
            return Err(s.refuse(format!(
                "{} does not hold the cluster token: stream refused",
                s.peer(from)
            )));
        }
        {
            let mut c = s.connected.lock().unwrap_or_else(|e| e.into_inner());
            if c[from] {
                return Err(s.refuse(format!("{} already has a stream: refused", s.peer(from))));
            }
            c[from] = true;
        }
        let mut stream = req.into_inner();
        let tx = s.inbox_tx[from]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        loop {
            match stream.message().await {
                Ok(Some(f)) => {
                    s.last_seen.lock().unwrap_or_else(|e| e.into_inner())[from] = Instant::now();
                    if f.step == HEARTBEAT_STEP {
                        continue;
                    }
                    if f.step == super::links::ABORT_STEP {
                        s.aborts
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!(
                                "{} aborted: {}",
                                s.peer(from),
                                String::from_utf8_lossy(&f.data)
                            ));
                    }
                    if tx.send(Event::Frame(f)).is_err() {
                        break; // this rank is shutting down
                    }
                }
                Ok(None) => {
                    s.mark_dead(from, format!("{} closed its stream", s.peer(from)));
                    break;
                }
                Err(e) => {
                    if e.code() == tonic::Code::OutOfRange {
                        // A frame over our cap: the peer's fault, and the root cause of
                        // whatever fails next on either side.
                        s.aborts
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(format!(
                                "{} sent a frame over this rank's size cap: {}",
                                s.peer(from),
                                e.message()
                            ));
                    }
                    s.mark_dead(from, format!("{} failed: {}", s.peer(from), e.message()));
                    break;
                }
            }
        }
        Ok(Response::new(ExchangeEnd {}))
    }
}

/// This rank's links to every peer over gRPC.
pub struct GrpcLinks {
    shared: Arc<Shared>,
    outgoing: Vec<Option<mpsc::UnboundedSender<Frame>>>,
    inboxes: Vec<Mutex<std_mpsc::Receiver<Event>>>,
    timeout: Duration,
    silence_limit: Duration,
    peers: Vec<usize>,
    shutdown: Option<oneshot::Sender<()>>,
    /// Outgoing stream tasks, awaited (briefly) on drop so queued frames (an abort naming
    /// the failed rank, above all) reach the peers before the process goes away.
    streams: Vec<tokio::task::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for GrpcLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GrpcLinks(rank {} of {})",
            self.shared.rank, self.shared.world
        )
    }
}

/// A communicator over gRPC.
pub type GrpcComm = LinkComm<GrpcLinks>;

impl GrpcLinks {
    /// Starts this rank's server on `listener` (or on `addrs[rank]`), connects to every
    /// peer in `addrs` and waits until every peer has connected back.
    ///
    /// # Errors
    /// Bad addresses, a missing token, a peer that cannot be reached or authenticated before
    /// `connect_timeout` (named with its address), or a refused handshake.
    pub fn connect(
        addrs: &[String],
        rank: usize,
        listener: Option<std::net::TcpListener>,
        cfg: &GrpcConfig,
    ) -> Result<Self> {
        let peers: Vec<usize> = (0..addrs.len()).filter(|&p| p != rank).collect();
        Self::connect_peers(addrs, rank, listener, cfg, &peers)
    }

    /// Like [`GrpcLinks::connect`], linking only to `peers` (the others are reached another
    /// way, e.g. shared memory on the same host).
    ///
    /// # Errors
    /// As [`GrpcLinks::connect`].
    pub fn connect_peers(
        addrs: &[String],
        rank: usize,
        listener: Option<std::net::TcpListener>,
        cfg: &GrpcConfig,
        peers: &[usize],
    ) -> Result<Self> {
        let world = addrs.len();
        let cfg_err = |field: &str, reason: String| Error::Config {
            field: field.into(),
            reason,
        };
        if rank >= world {
            return Err(cfg_err("rank", format!("{rank} is not in 0..{world}")));
        }
        if cfg.token.is_empty() {
            return Err(cfg_err(
                "token",
                format!("empty; set it in the config or {TOKEN_ENV}"),
            ));
        }
        // Two workers by default; SHARDWISE_GRPC_THREADS overrides (on 2-core hosts one worker
        // measured equal or slightly better, see BENCHMARKS.md).
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(super::env_usize("SHARDWISE_GRPC_THREADS", 2).max(1))
            .thread_name(format!("shardwise-grpc-{rank}"))
            .enable_all()
            .build()
            .map_err(|source| Error::Io {
                path: "tokio runtime".into(),
                source,
            })?;
        let mut inbox_tx = Vec::new();
        let mut inboxes = Vec::new();
        for _ in 0..world {
            let (tx, rx) = std_mpsc::channel();
            inbox_tx.push(Mutex::new(tx));
            inboxes.push(Mutex::new(rx));
        }
        let shared = Arc::new(Shared {
            rank,
            world,
            token: cfg.token.as_bytes().to_vec(),
            addrs: addrs.to_vec(),
            issued: Mutex::new(HashMap::new()),
            inbox_tx,
            connected: Mutex::new(vec![false; world]),
            refusals: Mutex::new(Vec::new()),
            dead: Mutex::new(Vec::new()),
            aborts: Mutex::new(Vec::new()),
            last_seen: Mutex::new(vec![Instant::now(); world]),
        });
        let io_err = |source| Error::Io {
            path: addrs[rank].clone().into(),
            source,
        };
        let listener = match listener {
            Some(l) => l,
            None => std::net::TcpListener::bind(&addrs[rank]).map_err(io_err)?,
        };
        listener.set_nonblocking(true).map_err(io_err)?;
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let svc = CollectiveServer::new(Service(shared.clone()))
            .max_decoding_message_size(cfg.max_message_bytes)
            .max_encoding_message_size(cfg.max_message_bytes);
        {
            let _guard = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(listener).map_err(io_err)?;
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let server = Server::builder()
                .initial_stream_window_size(Some(STREAM_WINDOW))
                .initial_connection_window_size(Some(CONNECTION_WINDOW))
                .max_frame_size(Some(4 << 20))
                .tcp_nodelay(true)
                .add_service(svc);
            runtime.spawn(async move {
                let _ = server
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = shutdown_rx.await;
                    })
                    .await;
            });
        }
        let mut links = Self {
            shared: shared.clone(),
            outgoing: (0..world).map(|_| None).collect(),
            inboxes,
            timeout: cfg.timeout,
            silence_limit: cfg.silence_limit,
            peers: peers.to_vec(),
            shutdown: Some(shutdown),
            streams: Vec::new(),
            runtime: None,
        };
        let deadline = Instant::now() + cfg.connect_timeout;
        let dials: Vec<_> = peers
            .iter()
            .copied()
            .filter(|&p| p != rank && p < world)
            .map(|p| {
                (
                    p,
                    runtime.spawn(dial(shared.clone(), p, cfg.clone(), deadline)),
                )
            })
            .collect();
        for (p, handle) in dials {
            let dialled = runtime
                .block_on(handle)
                .map_err(|e| links.err("connect", format!("dialling {}: {e}", shared.peer(p))))
                .and_then(|r| r);
            match dialled {
                Ok((tx, stream)) => {
                    links.outgoing[p] = Some(tx);
                    links.streams.push(stream);
                }
                Err(e) => {
                    // Keep serving a moment before going away, so peers still handshaking
                    // with us get a real answer (e.g. "does not hold the cluster token")
                    // instead of a closed connection.
                    let linger = (cfg.connect_timeout / 4).min(Duration::from_secs(1));
                    std::thread::sleep(linger);
                    links.runtime = Some(runtime);
                    return Err(e);
                }
            }
        }
        // Wait for every peer to open its stream to us.
        loop {
            let missing: Vec<usize> = {
                let c = shared.connected.lock().unwrap_or_else(|e| e.into_inner());
                peers
                    .iter()
                    .copied()
                    .filter(|&p| p != rank && p < world && !c[p])
                    .collect()
            };
            if missing.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let refused = shared
                    .refusals
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                return Err(links.err(
                    "connect",
                    format!(
                        "timed out after {:?} waiting for {} to connect{}",
                        cfg.connect_timeout,
                        missing
                            .iter()
                            .map(|&p| shared.peer(p))
                            .collect::<Vec<_>>()
                            .join(", "),
                        if refused.is_empty() {
                            String::new()
                        } else {
                            format!("; refused: {}", refused.join("; "))
                        }
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Heartbeats start once every link is up; silence is measured from now.
        *shared.last_seen.lock().unwrap_or_else(|e| e.into_inner()) = vec![Instant::now(); world];
        for tx in links.outgoing.iter().flatten() {
            // Weak: the heartbeat must not keep a stream open once the links are dropped.
            let tx = tx.downgrade();
            let every = cfg.heartbeat;
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let Some(tx) = tx.upgrade() else { break };
                    let beat = Frame {
                        step: HEARTBEAT_STEP,
                        ..Default::default()
                    };
                    if tx.send(beat).is_err() {
                        break;
                    }
                }
            });
        }
        links.runtime = Some(runtime);
        Ok(links)
    }

    fn err(&self, op: &'static str, reason: String) -> Error {
        Error::Comm {
            rank: self.shared.rank,
            op,
            reason,
        }
    }

    /// Address this rank's server listens on (as given in the membership list).
    pub fn address(&self) -> &str {
        &self.shared.addrs[self.shared.rank]
    }
}

/// Connects to peer `p`, runs the handshake and opens the frame stream.
async fn dial(
    s: Arc<Shared>,
    p: usize,
    cfg: GrpcConfig,
    deadline: Instant,
) -> Result<(mpsc::UnboundedSender<Frame>, tokio::task::JoinHandle<()>)> {
    let err = |reason: String| Error::Comm {
        rank: s.rank,
        op: "connect",
        reason,
    };
    let addr = &s.addrs[p];
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| err(format!("{}: bad address: {e}", s.peer(p))))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let channel: Channel = loop {
        match endpoint.connect().await {
            Ok(c) => break c,
            Err(e) if Instant::now() >= deadline => {
                return Err(err(format!(
                    "cannot reach {} before the {:?} deadline: {e}",
                    s.peer(p),
                    cfg.connect_timeout
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut client = CollectiveClient::new(channel)
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(cfg.max_message_bytes);
    let client_nonce = nonce();
    let mut hello = Request::new(HelloRequest {
        protocol_version: PROTOCOL_VERSION,
        world_size: s.world as u32,
        rank: s.rank as u32,
        target_rank: p as u32,
        client_nonce: client_nonce.clone().into(),
    });
    hello.set_timeout(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100)),
    );
    let reply = client
        .hello(hello)
        .await
        .map_err(|e| {
            err(format!(
                "{} refused the handshake: {}",
                s.peer(p),
                e.message()
            ))
        })?
        .into_inner();
    let (them, me, w) = (
        (p as u32).to_le_bytes(),
        (s.rank as u32).to_le_bytes(),
        (s.world as u32).to_le_bytes(),
    );
    if reply.rank as usize != p || reply.world_size as usize != s.world {
        return Err(err(format!(
            "{} answered as rank {} of {}",
            s.peer(p),
            reply.rank,
            reply.world_size
        )));
    }
    if mac(
        &s.token,
        &proof_parts(b"server", &client_nonce, &them, &me, &w),
    )
    .verify_slice(&reply.server_proof)
    .is_err()
    {
        return Err(err(format!(
            "{} does not hold the cluster token (wrong SHARDWISE_TOKEN?)",
            s.peer(p)
        )));
    }
    let proof = mac(
        &s.token,
        &proof_parts(b"client", &reply.server_nonce, &me, &them, &w),
    )
    .finalize()
    .into_bytes();
    let (tx, rx) = mpsc::unbounded_channel::<Frame>();
    let mut req = Request::new(UnboundedReceiverStream::new(rx));
    let md = req.metadata_mut();
    let val = |v: String| v.parse().map_err(|_| err("bad metadata".into()));
    md.insert(RANK_KEY, val(s.rank.to_string())?);
    md.insert(NONCE_KEY, val(hex(&reply.server_nonce))?);
    md.insert(PROOF_KEY, val(hex(&proof))?);
    let s2 = s.clone();
    let stream = tokio::spawn(async move {
        if let Err(e) = client.exchange(req).await {
            s2.mark_dead(
                p,
                format!("stream to {} failed: {}", s2.peer(p), e.message()),
            );
        }
    });
    Ok((tx, stream))
}

impl GrpcLinks {
    /// A peer not heard from for longer than the silence limit.
    fn silent_peer(&self) -> Option<String> {
        let seen = self
            .shared
            .last_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.peers
            .iter()
            .copied()
            .filter(|&p| p != self.shared.rank)
            .find(|&p| seen[p].elapsed() > self.silence_limit)
            .map(|p| {
                format!(
                    "{} silent for {:.1?} (link down or process stopped)",
                    self.shared.peer(p),
                    seen[p].elapsed()
                )
            })
    }

    /// A peer's abort reason if one arrived (it names the rank that failed first), else `why`.
    ///
    /// Failures cascade: a peer's abort or a refused frame often arrives a moment after the
    /// broken stream it causes, so this waits up to 200 ms for the cause before settling for
    /// the symptom (the group is failing either way).
    fn root_cause(&self, why: String) -> String {
        let until = Instant::now() + Duration::from_millis(200);
        loop {
            if let Some(a) = self
                .shared
                .aborts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .first()
            {
                return format!("{a} (then: {why})");
            }
            if Instant::now() >= until {
                return why;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Links for GrpcLinks {
    fn rank(&self) -> usize {
        self.shared.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn send(&self, to: usize, frame: Frame) -> Result<()> {
        let tx = self
            .outgoing
            .get(to)
            .and_then(Option::as_ref)
            .ok_or_else(|| self.err("send", format!("no link to rank {to}")))?;
        tx.send(frame).map_err(|_| {
            let gone = format!("{} is gone", self.shared.peer(to));
            self.err("send", self.root_cause(gone))
        })
    }

    fn recv(&self, from: usize) -> Result<Frame> {
        let inbox = self.inboxes[from].lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + self.timeout;
        loop {
            let now = Instant::now();
            let slice = deadline
                .saturating_duration_since(now)
                .min(Duration::from_millis(100));
            match inbox.recv_timeout(slice) {
                Ok(Event::Frame(f)) => return Ok(f),
                Ok(Event::Gone(reason)) => return Err(self.err("recv", self.root_cause(reason))),
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(self.err("recv", format!("{} link closed", self.shared.peer(from))))
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    let dead = self.shared.dead.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some((_, why)) = dead.first() {
                        let why = why.clone();
                        drop(dead);
                        return Err(self.err("recv", self.root_cause(why)));
                    }
                    drop(dead);
                    if let Some(why) = self.silent_peer() {
                        return Err(self.err("recv", self.root_cause(why)));
                    }
                    if Instant::now() >= deadline {
                        return Err(self.err(
                            "recv",
                            format!(
                                "timed out after {:?} waiting for {}",
                                self.timeout,
                                self.shared.peer(from)
                            ),
                        ));
                    }
                }
            }
        }
    }

    fn peer(&self, rank: usize) -> String {
        self.shared.peer(rank)
    }
}

impl Drop for GrpcLinks {
    fn drop(&mut self) {
        // Closing the senders ends each stream after its queued frames are written.
        self.outgoing.clear();
        let streams = std::mem::take(&mut self.streams);
        if let Some(rt) = self.runtime.take() {
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    for s in streams {
                        let _ = s.await;
                    }
                })
                .await;
            });
            if let Some(s) = self.shutdown.take() {
                let _ = s.send(());
            }
            rt.shutdown_timeout(Duration::from_millis(200));
        }
    }
}

/// Connects a gRPC communicator (see [`GrpcLinks::connect`]).
///
/// # Errors
/// As [`GrpcLinks::connect`].
pub fn connect(
    addrs: &[String],
    rank: usize,
    listener: Option<std::net::TcpListener>,
    cfg: &GrpcConfig,
) -> Result<GrpcComm> {
    Ok(LinkComm::new(
        GrpcLinks::connect(addrs, rank, listener, cfg)?,
        cfg.algo,
    ))
}

/// Binds `n` listeners on loopback port 0 and returns them with their addresses (tests,
/// benches, single-host launches).
///
/// # Errors
/// The OS refuses to bind.
pub fn loopback_listeners(n: usize) -> Result<(Vec<std::net::TcpListener>, Vec<String>)> {
    let mut ls = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..n {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io {
            path: "127.0.0.1:0".into(),
            source,
        })?;
        let a: SocketAddr = l.local_addr().map_err(|source| Error::Io {
            path: "127.0.0.1:0".into(),
            source,
        })?;
        addrs.push(a.to_string());
        ls.push(l);
    }
    Ok((ls, addrs))
}
