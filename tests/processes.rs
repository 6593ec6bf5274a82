//! Collectives across real processes: the `shardwise` binary launches one worker per rank
//! (loopback TCP for gRPC, /dev/shm for shared memory), checks results against float64 and
//! across ranks bit for bit, and reports a killed rank by name.

use std::process::Command;
use std::time::{Duration, Instant};

fn shardwise(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardwise"))
        .args(args)
        .output()
        .expect("run shardwise");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn processes_agree_with_float64_over_grpc_and_shm() {
    // 0, 1 and 7 elements, 4 KiB, and a prime 1000003 elements (4000012 bytes).
    for transport in ["grpc", "shm"] {
        for (world, dtype) in [("3", "f32"), ("4", "bf16"), ("2", "f16")] {
            let (ok, out, err) = shardwise(&[
                "bench",
                "allreduce",
                "--world",
                world,
                "--transport",
                transport,
                "--dtype",
                dtype,
                "--sizes",
                "0,4,28,4K,4000012",
                "--iters",
                "1",
                "--verify",
                "--json",
            ]);
            assert!(ok, "{transport} world {world} {dtype}: {err}");
            assert_eq!(out.lines().count(), 5, "{out}");
        }
    }
}

#[test]
fn killed_rank_is_named_by_every_other_rank() {
    for transport in ["grpc", "shm"] {
        let t0 = Instant::now();
        let (ok, _, err) = shardwise(&[
            "bench",
            "allreduce",
            "--world",
            "3",
            "--transport",
            transport,
            "--sizes",
            "4K,32M",
            "--iters",
            "3",
            "--timeout-s",
            "15",
            "--kill-rank",
            "1",
        ]);
        assert!(!ok, "{transport}: a killed rank must fail the run");
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "{transport}: took {:?}",
            t0.elapsed()
        );
        for r in [0, 2] {
            let line = err
                .split("; ")
                .find(|l| l.contains(&format!("rank {r} (")))
                .unwrap_or_else(|| panic!("{transport}: no report from rank {r}: {err}"));
            assert!(
                line.contains("rank 1"),
                "{transport}: rank {r} does not name rank 1: {line}"
            );
        }
    }
}
