//! The transport suite over gRPC on real loopback sockets, plus authentication, caps and
//! dead peers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use shardwise::comm::grpc::{self, loopback_listeners, GrpcConfig};
use shardwise::comm::links::AlgoConfig;
use shardwise::comm::{each_rank, suite, Communicator};
use shardwise::Result;

fn config() -> GrpcConfig {
    GrpcConfig {
        timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(10),
        ..GrpcConfig::new("suite-token")
    }
}

/// Connects `world` ranks on loopback, each on its own thread (connect blocks until peers
/// are reached), with per-rank configs.
fn group_with(cfgs: Vec<GrpcConfig>) -> Vec<Result<grpc::GrpcComm>> {
    let (ls, addrs) = loopback_listeners(cfgs.len()).unwrap();
    let inputs: Vec<_> = ls.into_iter().zip(cfgs).collect();
    each_rank(inputs, |r, (l, c)| {
        Ok(grpc::connect(&addrs, r, Some(l), &c))
    })
    .unwrap()
}

fn group(world: usize, cfg: GrpcConfig) -> Result<Vec<Arc<dyn Communicator>>> {
    group_with(vec![cfg; world])
        .into_iter()
        .map(|c| c.map(|c| Arc::new(c) as Arc<dyn Communicator>))
        .collect()
}

/// Runs an all-reduce of `t` on every rank at once; every rank must fail; their errors.
fn failing_all_reduce(comms: &[grpc::GrpcComm], t: &Tensor) -> Vec<String> {
    each_rank(comms.iter().collect(), |_, c| {
        Ok(c.all_reduce_sum(t).map(|_| ()).unwrap_err().to_string())
    })
    .unwrap()
}

#[test]
fn grpc_passes_the_transport_suite() {
    suite::run_all(|w| group(w, config())).unwrap();
}

#[test]
fn grpc_ring_with_tiny_chunks_passes_the_suite() {
    // Every all-reduce takes the ring, in many pipelined chunks.
    let cfg = GrpcConfig {
        algo: AlgoConfig {
            chunk_bytes: 1000,
            small_bytes: 0,
            ..AlgoConfig::default()
        },
        ..config()
    };
    for world in [2, 3, 5] {
        suite::check_all_reduce(&|w| group(w, cfg.clone()), world).unwrap();
        suite::check_lengths(&|w| group(w, cfg.clone()), world).unwrap();
    }
}

#[test]
fn wrong_token_is_refused() {
    let mut cfgs = vec![config(); 3];
    cfgs[2].token = "not-the-token".into();
    for c in &mut cfgs {
        c.connect_timeout = Duration::from_secs(3);
    }
    let results = group_with(cfgs);
    for (r, res) in results.iter().enumerate() {
        let e = res
            .as_ref()
            .expect_err("a group with a wrong token must not form");
        let msg = e.to_string();
        assert!(
            msg.contains("cluster token") || msg.contains("refused") || msg.contains("rank 2"),
            "rank {r}: {msg}"
        );
    }
    let bad = results[2].as_ref().unwrap_err().to_string();
    assert!(bad.contains("does not hold the cluster token"), "{bad}");
}

#[test]
fn oversized_frame_is_refused_not_hung() {
    let mut cfgs = vec![config(); 2];
    // Rank 0 sends 4 MiB frames; rank 1 accepts at most 1 MiB.
    cfgs[0].algo = AlgoConfig {
        chunk_bytes: 4 << 20,
        small_bytes: 0,
        ..AlgoConfig::default()
    };
    cfgs[1].max_message_bytes = 1 << 20;
    let comms: Vec<_> = group_with(cfgs).into_iter().map(|c| c.unwrap()).collect();
    let t = Tensor::ones(4 << 20, DType::F32, &Device::Cpu).unwrap();
    let t0 = Instant::now();
    let errs = failing_all_reduce(&comms, &t);
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t0.elapsed()
    );
    // The receiver names the sender and the cap; the sender learns its stream was refused.
    assert!(
        errs[1].starts_with("rank 1:")
            && errs[1].contains("rank 0")
            && errs[1].contains("too large"),
        "{errs:?}"
    );
}

#[test]
fn dead_peer_is_named_on_every_rank_within_the_deadline() {
    let mut comms: Vec<_> = group_with(vec![config(); 4])
        .into_iter()
        .map(|c| c.unwrap())
        .collect();
    let dead = comms.remove(2);
    let dead_addr = dead.links().address().to_string();
    drop(dead);
    let t = Tensor::ones(1 << 20, DType::F32, &Device::Cpu).unwrap();
    let t0 = Instant::now();
    let errs = failing_all_reduce(&comms, &t);
    assert!(t0.elapsed() < Duration::from_secs(20));
    for e in &errs {
        assert!(e.contains("rank 2") && e.contains(&dead_addr), "{e}");
    }
}
