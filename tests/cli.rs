//! The command line end to end with real processes: `shardwise launch` + `shardwise generate
//! --config` print the same greedy continuation as `generate --local 1`, a second generate
//! reuses the running ranks, and SIGTERM to the launcher stops every rank.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_shardwise");

fn smollm2() -> PathBuf {
    if let Some(p) = std::env::var_os("SHARDWISE_SMOLLM2") {
        return p.into();
    }
    PathBuf::from(std::env::var("HOME").unwrap())
        .join(".cache/shardwise/models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn generate(ranks: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("generate")
        .args(ranks)
        .arg("--model")
        .arg(smollm2())
        .args(["--prompt", "The capital of France is", "--max-tokens", "10"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("decode") && stderr.contains("tokens/s"),
        "{stderr}"
    );
    String::from_utf8(out.stdout).unwrap()
}

fn rank_pids(launch: &Child) -> Vec<u32> {
    let pid = launch.id();
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect()
}

fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}

#[test]
fn generate_through_launched_ranks_matches_one_local_rank() {
    let want = generate(&["--local", "1"]);
    assert!(!want.trim().is_empty());
    // stdout is the continuation only: the prompt is not repeated.
    assert!(!want.contains("The capital of France is"), "{want}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::ranks_toml(dir.path(), &vec!["127.0.0.1".to_string(); 2], "auto");
    let mut launch = Command::new(BIN)
        .args(["launch", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let got = generate(&["--config", cfg_s]);
    // Greedy Q4_1 at 2 ranks: same blocks, another order of partial sums; this prompt's
    // steps are far from ties.
    assert_eq!(got, want);
    // The ranks stay up; a second job reuses them.
    assert_eq!(generate(&["--config", cfg_s]), want);
    let ranks = rank_pids(&launch);
    assert_eq!(ranks.len(), 2);
    // SAFETY: kill(2) on the launcher this test started.
    unsafe { libc::kill(launch.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    while launch.try_wait().unwrap().is_none() || !ranks.iter().all(|&p| gone(p)) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "ranks still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn decode_bench_runs_a_synthetic_model_at_two_ranks() {
    let out = Command::new(BIN)
        .args([
            "bench",
            "decode",
            "--model",
            "synthetic:tiny",
            "--local",
            "2",
            "--dtype",
            "f32",
            "--batch",
            "1,3",
            "--context",
            "8",
            "--steps",
            "4",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One table row per batch size: | ranks | batch | ms/step | tok/s | GiB | floor |.
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("| 2 |"))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for (row, batch) in rows.iter().zip(["1", "3"]) {
        assert_eq!(row[2], batch, "{stdout}");
        let ms: f64 = row[3].parse().unwrap();
        assert!(ms > 0.0 && ms.is_finite(), "{stdout}");
    }
    // An unknown preset is named.
    let out = Command::new(BIN)
        .args([
            "bench",
            "decode",
            "--model",
            "synthetic:huge",
            "--local",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("synthetic model `huge`"));
}
