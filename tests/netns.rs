//! Multi-host collectives on one machine: every rank runs in its own network namespace with
//! its own address, joined by a bridge (iproute2, installed by `scripts/install-test-deps.sh`).
//! A link is then cut mid-run and every surviving rank must name the lost one.
//! Where namespaces cannot be made (not root, no `ip`), the tests print why and pass.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces, veth pairs and a bridge; all deleted on drop, also when a test fails.
struct Net {
    ns: Vec<String>,
    host_ends: Vec<String>,
    ips: Vec<String>,
    bridge: String,
}

impl Net {
    fn create(tag: &str, n: usize) -> Result<Self, String> {
        let id = std::process::id() % 100_000;
        let mut net = Net {
            ns: Vec::new(),
            host_ends: Vec::new(),
            ips: Vec::new(),
            bridge: format!("swb{tag}{id}"),
        };
        let subnet = format!("10.{}.{}", 100 + id % 100, (id / 100) % 250);
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        for r in 0..n {
            let ns = format!("sw{tag}{id}n{r}");
            let host = format!("swv{tag}{id}r{r}");
            let inner = format!("swp{tag}{id}r{r}");
            ip(&["netns", "add", &ns])?;
            net.ns.push(ns.clone());
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner])?;
            net.host_ends.push(host.clone());
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &host, "master", &net.bridge])?;
            ip(&["link", "set", &host, "up"])?;
            let addr = format!("{subnet}.{}", r + 1);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &inner,
            ])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            net.ips.push(addr);
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = ip(&["netns", "del", ns]);
        }
        for h in &self.host_ends {
            let _ = ip(&["link", "del", h]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Why namespaces cannot be used here, if they cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces need CAP_NET_ADMIN".into());
    }
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let probe = format!("swprobe{}x{n}", std::process::id());
    match ip(&["netns", "add", &probe]) {
        Ok(()) => {
            let _ = ip(&["netns", "del", &probe]);
            None
        }
        Err(e) => Some(format!(
            "cannot create a network namespace ({e}); run scripts/install-test-deps.sh"
        )),
    }
}

fn bench_args<'a>(net: &'a Net, extra: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = ["bench", "allreduce", "--transport", "grpc", "--world"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.push(net.ns.len().to_string());
    v.push("--netns".into());
    v.push(net.ns.join(","));
    v.push("--ips".into());
    v.push(net.ips.join(","));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Runs a verified `bench allreduce` with rank r in namespace `ns[r]` at `ips[r]`; asserts it
/// succeeds with one result line per size (three sizes).
fn verified_run(transport: &str, ns: &[&str], ips: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardwise"))
        .args(["bench", "allreduce", "--transport", transport])
        .args([
            "--world",
            &ns.len().to_string(),
            "--netns",
            &ns.join(","),
            "--ips",
            &ips.join(","),
        ])
        .args([
            "--sizes",
            "4,4K,4000012",
            "--iters",
            "2",
            "--verify",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
}

#[test]
fn grpc_ranks_on_separate_hosts_agree_with_float64() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Net::create("a", 3).expect("create namespaces");
    let ns: Vec<&str> = net.ns.iter().map(String::as_str).collect();
    let ips: Vec<&str> = net.ips.iter().map(String::as_str).collect();
    verified_run("grpc", &ns, &ips);
}

#[test]
fn cut_link_is_named_by_every_surviving_rank() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Net::create("b", 3).expect("create namespaces");
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardwise"))
        .args(bench_args(
            &net,
            &["--sizes", "4M", "--iters", "100000", "--timeout-s", "5"],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let the ranks connect and start reducing, then unplug rank 1.
    std::thread::sleep(Duration::from_secs(3));
    ip(&["link", "set", &net.host_ends[1], "down"]).unwrap();
    let cut = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if cut.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("ranks still running 60 s after the cut");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "the run must fail: {err}");
    for r in [0, 2] {
        let line = err
            .split("; ")
            .find(|l| l.contains(&format!("rank {r} (")))
            .unwrap_or_else(|| panic!("no report from rank {r}: {err}"));
        assert!(
            line.contains("rank 1"),
            "rank {r} does not name rank 1: {line}"
        );
    }
}

#[test]
fn two_hosts_with_two_ranks_each_mix_shared_memory_and_grpc() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    // Ranks 0-1 share host A, ranks 2-3 host B: `auto` links same-host pairs through shared
    // memory and the others through gRPC, under one ring.
    let net = Net::create("c", 2).expect("create namespaces");
    let (a, b) = (net.ns[0].as_str(), net.ns[1].as_str());
    let (ia, ib) = (net.ips[0].as_str(), net.ips[1].as_str());
    verified_run("auto", &[a, a, b, b], &[ia, ia, ib, ib]);
}

#[test]
fn rank_servers_on_separate_hosts_run_the_model_like_one_rank() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    use shardwise::model::SeqStep;
    use shardwise::runtime::{Cluster, LoadSpec, LocalTransport, StepRequest};
    let net = Net::create("d", 3).expect("create namespaces");
    // The coordinator (this process) reaches the hosts through an address on the bridge.
    let subnet = net.ips[0].rsplit_once('.').unwrap().0.to_string();
    ip(&[
        "addr",
        "add",
        &format!("{subnet}.254/24"),
        "dev",
        &net.bridge,
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut text = format!(
        "cluster = \"hosts\"\ntoken = \"{}\"\n[timeouts]\ncollective_s = 20\nconnect_s = 30\n",
        shardwise::comm::grpc::random_token()
    );
    for (r, addr) in net.ips.iter().enumerate() {
        text += &format!("[[rank]]\nrank = {r}\nhost = \"{addr}\"\ncontrol_port = 7100\n");
    }
    let cfg_path = dir.path().join("ranks.toml");
    std::fs::write(&cfg_path, text).unwrap();
    let mut ranks: Vec<std::process::Child> = net
        .ns
        .iter()
        .enumerate()
        .map(|(r, ns)| {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    ns,
                    env!("CARGO_BIN_EXE_shardwise"),
                    "rank",
                    "--config",
                ])
                .arg(&cfg_path)
                .args(["--rank", &r.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let model =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-qwen2");
    let tokens: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let logits = |c: &Cluster| {
        let step = StepRequest {
            seqs: vec![SeqStep {
                seq_id: 1,
                tokens: tokens.clone(),
                start_pos: 0,
                all_logits: true,
                sample: None,
            }],
            release: vec![],
        };
        rt.block_on(c.step(step)).unwrap().remove(0)
    };
    let spec = LoadSpec {
        model: model.clone(),
        ..Default::default()
    };
    let one = rt
        .block_on(Cluster::local(1, LocalTransport::InProcess))
        .unwrap();
    rt.block_on(one.load(spec.clone())).unwrap();
    let want = logits(&one);
    let cfg = shardwise::cluster::ClusterConfig::load(&cfg_path).unwrap();
    let c = rt.block_on(Cluster::connect(&cfg)).unwrap();
    rt.block_on(c.load(spec)).unwrap();
    let got = logits(&c);
    let diff = (&got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff / scale <= 1e-5,
        "3 hosts vs one rank: {}",
        diff / scale
    );
    rt.block_on(c.shutdown()).unwrap();
    let t0 = Instant::now();
    for (r, p) in ranks.iter_mut().enumerate() {
        loop {
            if p.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "rank {r} did not exit after Shutdown"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
