//! The runtime end to end: rank actors in one process, then real rank processes started by
//! `shardwise launch` on loopback, then ranks on separate hosts (network namespaces). Each
//! drives Forward, Step, ApplyIsq and Serialize through the coordinator and compares with one
//! rank; killing a rank process mid-request must fail the request naming it, within 5 s,
//! with every other rank process gone.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use shardwise::cluster::ClusterConfig;
use shardwise::model::SeqStep;
use shardwise::quant::IsqType;
use shardwise::runtime::{Cluster, LoadSpec, LocalTransport, StepRequest};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-qwen2")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn spec(isq: Option<IsqType>) -> LoadSpec {
    LoadSpec {
        model: tiny(),
        dtype: None,
        isq,
        uqff: None,
        moe: Default::default(),
    }
}

const PROMPT: [u32; 11] = [5, 77, 19, 200, 3, 3, 140, 9, 250, 31, 64];

async fn logits(c: &Cluster) -> Tensor {
    let mut l = c
        .step(StepRequest {
            seqs: vec![SeqStep {
                seq_id: 7,
                tokens: PROMPT.to_vec(),
                start_pos: 0,
                all_logits: true,
                sample: None,
            }],
            release: vec![],
        })
        .await
        .unwrap();
    l.remove(0)
}

/// What one rank computes: logits, a 2-layer forward of `x`, logits after ISQ Q8_0.
struct Outputs {
    logits: Tensor,
    forward: Tensor,
    isq_logits: Tensor,
}

async fn exercise(c: &Cluster, x: &Tensor, out_prefix: &Path) -> Outputs {
    let first = c.load(spec(None)).await.unwrap();
    // The same spec again (each `generate --config` sends one) reuses the loaded shards.
    let again = c.load(spec(None)).await.unwrap();
    assert_eq!(first, again, "a repeated Load reloaded");
    assert!(
        first.iter().all(|r| !r.on_gpu),
        "CPU ranks reported a GPU: {first:?}"
    );
    let logits_dense = logits(c).await;
    let forward = c.forward(0..2, x.clone()).await.unwrap();
    let files = c.serialize(out_prefix.to_path_buf()).await.unwrap();
    assert_eq!(files.len(), c.world_size());
    for (r, (f, bytes)) in files.iter().enumerate() {
        assert!(f.exists() && *bytes > 0, "rank {r}: {}", f.display());
    }
    check_serialized(&files, out_prefix);
    let q8 = IsqType::Ggml(candle_core::quantized::GgmlDType::Q8_0);
    let n = c.apply_isq(q8, vec![]).await.unwrap();
    assert!(n.iter().all(|&k| k == 2 * 4), "{n:?}");
    let moved = common::rel_err(&logits(c).await, &logits_dense);
    assert!(moved > 1e-5, "ApplyIsq changed nothing ({moved})");
    // ISQ at load aligns the splits to the Q8_0 blocks, as one rank has them.
    c.load(spec(Some(q8))).await.unwrap();
    let isq_logits = logits(c).await;
    let health = c.health().await.unwrap();
    assert_eq!(health.len(), c.world_size());
    assert!(health
        .iter()
        .enumerate()
        .all(|(r, h)| h.rank == r && h.model.is_some()));
    Outputs {
        logits: logits_dense,
        forward,
        isq_logits,
    }
}

/// The rank files plus an index form a UQFF set holding exactly the checkpoint's tensors.
fn check_serialized(files: &[(PathBuf, u64)], index: &Path) {
    use shardwise::weights::WeightSource;
    let cfg = shardwise::model::ModelConfig::from_hf_file(&tiny()).unwrap();
    shardwise::model::persist::write_index(index, &cfg, vec![], files).unwrap();
    let set = shardwise::weights::UqffSource::open(index).unwrap();
    let full =
        candle_core::safetensors::load(tiny().join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut names = set.names();
    names.sort();
    let mut want: Vec<String> = full.keys().cloned().collect();
    want.sort();
    assert_eq!(names, want, "tensor names");
    for (name, t) in &full {
        let got = set
            .read(
                name,
                &shardwise::shard::Shard::full(),
                candle_core::DType::F32,
            )
            .unwrap();
        assert_eq!(common::rel_err(&got, t), 0.0, "{name}");
    }
}

fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    let e = common::rel_err(a, b);
    assert!(e <= tol, "{what}: relative error {e} > {tol}");
}

fn reference(x: &Tensor) -> Outputs {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let c = Cluster::local(1, LocalTransport::InProcess).await.unwrap();
        let o = exercise(&c, x, &dir.path().join("ref")).await;
        c.shutdown().await.unwrap();
        o
    })
}

fn compare(got: &Outputs, want: &Outputs, what: &str) {
    assert_close(&got.logits, &want.logits, 1e-5, &format!("{what}: logits"));
    assert_close(
        &got.forward,
        &want.forward,
        1e-5,
        &format!("{what}: forward"),
    );
    // Where a split cannot align to Q8_0's 32-element blocks (3 ranks over 8 heads of 8),
    // those pieces stay dense, and activations are quantized per block: ISQ at another world
    // size is closer to one rank's ISQ than ISQ is to the dense model (3 ranks: 0.63x).
    let tp = common::rel_err(&got.isq_logits, &want.isq_logits);
    let quant = common::rel_err(&want.isq_logits, &want.logits);
    assert!(quant > 1e-4, "{what}: ISQ changed nothing ({quant})");
    assert!(
        tp < quant,
        "{what}: ISQ logits {tp} from one rank's; ISQ itself moves them {quant}"
    );
}

#[test]
fn local_actors_agree_with_one_rank() {
    let x = common::rand_tensor(&[1, 6, 64], 1.0);
    let want = reference(&x);
    for (world, t) in [
        (2, LocalTransport::InProcess),
        (3, LocalTransport::InProcess),
        (4, LocalTransport::Grpc),
        (3, LocalTransport::Shm),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let got = rt().block_on(async {
            let c = Cluster::local(world, t).await.unwrap();
            let o = exercise(&c, &x, &dir.path().join("out")).await;
            c.shutdown().await.unwrap();
            o
        });
        compare(&got, &want, &format!("world {world} {t:?}"));
    }
}

#[test]
fn hot_step_waits_agree_with_one_rank() {
    // The coordinator's hot wait for step replies (the default for GPU ranks), forced on for
    // CPU ranks: the same results, nothing lost between polls.
    let x = common::rand_tensor(&[1, 6, 64], 1.0);
    let want = reference(&x);
    let dir = tempfile::tempdir().unwrap();
    let got = common::reference::with_env("SHARDWISE_HOT_STEPS", Some("1"), || {
        rt().block_on(async {
            let c = Cluster::local(2, LocalTransport::InProcess).await.unwrap();
            let o = exercise(&c, &x, &dir.path().join("out")).await;
            c.shutdown().await.unwrap();
            o
        })
    });
    compare(&got, &want, "world 2, hot step waits");
}

/// [`exercise`] on `n` rank processes of this host (`shardwise launch`), shut down after;
/// checks that the launcher exits with them.
fn launched(dir: &Path, n: usize, x: &Tensor) -> Outputs {
    let hosts = vec!["127.0.0.1".to_string(); n];
    let cfg_path = common::ranks_toml(dir, &hosts, "grpc");
    let mut launch = Launch::start(&cfg_path);
    let cfg = ClusterConfig::load(&cfg_path).unwrap();
    let got = rt().block_on(async {
        let c = Cluster::connect(&cfg).await.unwrap();
        let o = exercise(&c, x, &dir.join("out")).await;
        c.shutdown().await.unwrap();
        o
    });
    // Shutdown stops every rank, and the launcher with them.
    launch.exits_within(
        Duration::from_secs(10),
        "launch did not exit after Shutdown",
    );
    got
}

/// `shardwise launch` running in the background; stopped on drop.
struct Launch(Child);

impl Launch {
    /// Waits until the launcher has exited, failing with `what` once `deadline` passed.
    fn exits_within(&mut self, deadline: Duration, what: &str) {
        let t0 = Instant::now();
        while self.0.try_wait().unwrap().is_none() {
            assert!(t0.elapsed() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start(config: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_shardwise"))
            .args(["launch", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Launch(child)
    }

    /// Rank processes (pid per rank) under the launcher.
    fn ranks(&self) -> Vec<(usize, u32)> {
        let pid = self.0.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .filter_map(|c| {
                let c: u32 = c.parse().ok()?;
                let cmd = std::fs::read(format!("/proc/{c}/cmdline")).ok()?;
                let args: Vec<String> = cmd
                    .split(|&b| b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                let i = args.iter().position(|a| a == "--rank")?;
                Some((args.get(i + 1)?.parse().ok()?, c))
            })
            .collect()
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); look at its state instead.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

#[test]
fn launched_processes_agree_with_one_rank() {
    let x = common::rand_tensor(&[1, 6, 64], 1.0);
    let want = reference(&x);
    let dir = tempfile::tempdir().unwrap();
    compare(&launched(dir.path(), 3, &x), &want, "3 processes");
}

#[test]
fn kill_9_of_a_rank_is_named_within_5_s_and_leaves_no_process() {
    for run in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = common::ranks_toml(dir.path(), &vec!["127.0.0.1".to_string(); 3], "grpc");
        let mut launch = Launch::start(&cfg_path);
        let cfg = ClusterConfig::load(&cfg_path).unwrap();
        let rt = rt();
        let c = rt.block_on(async {
            let c = Cluster::connect(&cfg).await.unwrap();
            c.load(spec(None)).await.unwrap();
            c
        });
        let ranks = launch.ranks();
        assert_eq!(ranks.len(), 3, "run {run}: {ranks:?}");
        let victim = 1 + run % 2;
        let pid = ranks.iter().find(|(r, _)| *r == victim).unwrap().1;
        // Keep the cluster busy with long prefills; kill the victim mid-stream.
        let (err, latency) = rt.block_on(async {
            let killer = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                // SAFETY: kill(2) on a rank process this test started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                Instant::now()
            });
            let err = loop {
                let step = StepRequest {
                    seqs: vec![SeqStep {
                        seq_id: 1,
                        tokens: (0..400).map(|i| (i * 7 % 256) as u32).collect(),
                        start_pos: 0,
                        all_logits: false,
                        sample: None,
                    }],
                    release: vec![],
                };
                if let Err(e) = c.step(step).await {
                    break e;
                }
            };
            let killed_at = killer.await.unwrap();
            (err, killed_at.elapsed())
        });
        let msg = err.to_string();
        assert!(msg.contains(&format!("rank {victim}")), "run {run}: {msg}");
        assert!(
            latency < Duration::from_secs(5),
            "run {run}: named after {latency:?}"
        );
        // The launcher stops the survivors and exits; nothing is left behind.
        launch.exits_within(
            Duration::from_secs(5),
            &format!("run {run}: launch still running"),
        );
        for (r, p) in &ranks {
            assert!(!alive(*p), "run {run}: rank {r} (pid {p}) still running");
        }
    }
}
