//! `shardwise bench allreduce`: all-reduce time and bandwidth over a transport, with one
//! process per rank (loopback) for the network and shared-memory transports.
//!
//! The launcher starts `shardwise comm-worker` once per rank, hands the workers each other's
//! addresses, and collects one result line per size and rank. Bandwidths follow nccl-tests:
//! algbw = bytes / time, busbw = algbw * 2(n-1)/n. With `--verify`, every rank draws every
//! rank's input from a shared seed, checks its result against a float64 sum, and reports a
//! hash of its result bytes so the launcher can check that all ranks agree bit for bit.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::comm::grpc::{GrpcConfig, TOKEN_ENV};
use crate::comm::select::{self, TransportChoice};
use crate::comm::{suite::on_ranks, Communicator, LocalComm};
use crate::error::{Error, Result};

/// Transports the benchmark can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Threads of one process.
    Local,
    /// One process per rank, connected as `comm::select` chooses (`grpc`, `shm`, `auto`).
    Group(TransportChoice),
}

impl std::str::FromStr for Transport {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "local" => Ok(Self::Local),
            other => other.parse().map(Self::Group),
        }
    }
}

impl Transport {
    /// Name as given on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Group(c) => c.name(),
        }
    }
}

/// Parses `4K`, `1M`, `2G` or a plain byte count.
///
/// # Errors
/// Not a size.
pub fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mult)
        .map_err(|_| Error::Config {
            field: "sizes".into(),
            reason: format!("`{s}` is not a size (e.g. 4K, 16M)"),
        })
}

/// Parses `f32`, `bf16` or `f16`.
///
/// # Errors
/// Another dtype.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => Err(Error::Config {
            field: "dtype".into(),
            reason: format!("`{s}`: expected f32, bf16 or f16"),
        }),
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct AllReduceOpts {
    /// Ranks.
    pub world: usize,
    /// Transport.
    pub transport: Transport,
    /// Message sizes in bytes.
    pub sizes: Vec<usize>,
    /// Element type.
    pub dtype: DType,
    /// Timed iterations per size (after 2 warm-ups).
    pub iters: usize,
    /// Check results against float64 and across ranks.
    pub verify: bool,
    /// Kill this rank (SIGKILL, mid-collective) during the last size, to test failure.
    pub kill_rank: Option<usize>,
    /// Collective deadline.
    pub timeout: Duration,
    /// Run rank r inside network namespace `netns[r]`, listening on `ips[r]` (multi-host
    /// tests on one machine); empty for loopback.
    pub hosts: Vec<(String, String)>,
}

/// One size's result.
#[derive(Debug, Clone, PartialEq)]
pub struct AllReduceRow {
    /// Transport name.
    pub transport: String,
    /// Ranks.
    pub world: usize,
    /// Element type.
    pub dtype: String,
    /// Message size in bytes.
    pub bytes: usize,
    /// Median time of rank 0.
    pub median_s: f64,
}

impl AllReduceRow {
    /// bytes / time, GB/s.
    pub fn algbw(&self) -> f64 {
        if self.median_s > 0.0 {
            self.bytes as f64 / self.median_s / 1e9
        } else {
            0.0
        }
    }

    /// algbw * 2(n-1)/n, GB/s.
    pub fn busbw(&self) -> f64 {
        self.algbw() * 2.0 * (self.world as f64 - 1.0) / self.world as f64
    }

    /// One JSON object (the `--json` output).
    pub fn json(&self) -> String {
        serde_json::json!({
            "transport": self.transport,
            "world": self.world,
            "dtype": self.dtype,
            "bytes": self.bytes,
            "median_s": self.median_s,
            "algbw_gbps": self.algbw(),
            "busbw_gbps": self.busbw(),
        })
        .to_string()
    }
}

fn dtype_name(d: DType) -> String {
    format!("{d:?}").to_lowercase()
}

/// Rank `r`'s input for one size, drawn from the shared seed.
fn input(seed: u64, r: usize, n: usize, dtype: DType) -> Result<Tensor> {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Ok(Tensor::from_vec(v, n, &Device::Cpu)?.to_dtype(dtype)?)
}

/// FNV-1a of a tensor's bytes (to compare results across ranks).
fn hash(t: &Tensor) -> Result<u64> {
    let bytes = crate::comm::wire::tensor_to_bytes(t)?;
    Ok(bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }))
}

/// Measures every size on one rank; returns `(bytes, median seconds, result hash)`.
///
/// # Errors
/// Collective errors, or a verification failure naming the size and element.
pub fn measure_rank(
    comm: &dyn Communicator,
    opts: &AllReduceOpts,
    seed: u64,
) -> Result<Vec<(usize, f64, u64)>> {
    let (r, w) = (comm.rank(), comm.world_size());
    let esize = opts.dtype.size_in_bytes();
    let mut out = Vec::new();
    for (i, &bytes) in opts.sizes.iter().enumerate() {
        let n = bytes / esize;
        let x = input(seed.wrapping_add(i as u64), r, n, opts.dtype)?;
        let last = i + 1 == opts.sizes.len();
        let mut times = Vec::new();
        let mut result = None;
        for it in 0..opts.iters + 2 {
            comm.barrier()?;
            if last && it == 2 && opts.kill_rank == Some(r) {
                std::thread::spawn(|| {
                    std::thread::sleep(Duration::from_millis(2));
                    // SAFETY: signals this process; the point is to die mid-collective.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                });
            }
            let t0 = Instant::now();
            let y = comm.all_reduce_sum(&x)?;
            let dt = t0.elapsed().as_secs_f64();
            if it >= 2 {
                times.push(dt);
            }
            result = Some(y);
        }
        let y = result.ok_or_else(|| Error::Config {
            field: "iters".into(),
            reason: "no iteration ran".into(),
        })?;
        if opts.verify {
            let mut reference = vec![0f64; n];
            for p in 0..w {
                let v = input(seed.wrapping_add(i as u64), p, n, opts.dtype)?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?;
                reference.iter_mut().zip(v).for_each(|(a, b)| *a += b);
            }
            let got = y.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let eps = match opts.dtype {
                DType::F32 => 1e-6,
                DType::BF16 => 1.0 / 128.0,
                _ => 1.0 / 1024.0,
            } * (w * w) as f64
                * 2.0;
            if let Some((j, (a, b))) = got
                .iter()
                .zip(&reference)
                .enumerate()
                .find(|(_, (a, b))| (*a - *b).abs() > eps * (1.0 + b.abs()))
            {
                return Err(Error::Comm {
                    rank: r,
                    op: "verify",
                    reason: format!("{bytes} bytes: element {j} = {a}, float64 reference {b}"),
                });
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied().unwrap_or(0.0);
        out.push((bytes, median, hash(&y)?));
    }
    Ok(out)
}

fn rows(opts: &AllReduceOpts, rank0: &[(usize, f64, u64)]) -> Vec<AllReduceRow> {
    rank0
        .iter()
        .map(|&(bytes, median_s, _)| AllReduceRow {
            transport: opts.transport.name().into(),
            world: opts.world,
            dtype: dtype_name(opts.dtype),
            bytes,
            median_s,
        })
        .collect()
}

/// Checks that every rank reported the same result hash for every size.
fn check_hashes(per_rank: &[Vec<(usize, f64, u64)>]) -> Result<()> {
    for (r, res) in per_rank.iter().enumerate().skip(1) {
        for ((b, _, h0), (_, _, h)) in per_rank[0].iter().zip(res) {
            if h0 != h {
                return Err(Error::Comm {
                    rank: r,
                    op: "verify",
                    reason: format!("{b} bytes: result differs from rank 0's bit for bit"),
                });
            }
        }
    }
    Ok(())
}

/// Runs the benchmark: in-process for `local`, one worker process per rank otherwise.
///
/// # Errors
/// A worker fails (its error is returned with its rank), or verification fails.
pub fn run(opts: &AllReduceOpts) -> Result<Vec<AllReduceRow>> {
    let seed: u64 = rand::rng().random();
    if opts.transport == Transport::Local {
        let comms: Vec<Arc<dyn Communicator>> = LocalComm::group(opts.world)?
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Communicator>)
            .collect();
        let per_rank = on_ranks(&comms, |_, c| measure_rank(c, opts, seed))?;
        check_hashes(&per_rank)?;
        return Ok(rows(opts, &per_rank[0]));
    }
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        path: "current executable".into(),
        source,
    })?;
    launch(&exe, opts, seed)
}

struct Worker {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

fn launch(exe: &std::path::Path, opts: &AllReduceOpts, seed: u64) -> Result<Vec<AllReduceRow>> {
    let token = format!("{:032x}", rand::rng().random::<u128>());
    let sizes: Vec<String> = opts.sizes.iter().map(|s| s.to_string()).collect();
    let mut workers: Vec<Worker> = Vec::new();
    let spawn_err = |source| Error::Io {
        path: exe.to_path_buf(),
        source,
    };
    for r in 0..opts.world {
        let mut cmd = match opts.hosts.get(r) {
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let bind = opts.hosts.get(r).map_or("127.0.0.1", |(_, ip)| ip.as_str());
        cmd.arg("comm-worker")
            .args(["--bind", bind])
            .args(["--rank", &r.to_string(), "--world", &opts.world.to_string()])
            .args(["--transport", opts.transport.name()])
            .args(["--sizes", &sizes.join(",")])
            .args(["--dtype", &dtype_name(opts.dtype)])
            .args(["--iters", &opts.iters.to_string()])
            .args(["--seed", &seed.to_string()])
            .args(["--timeout-s", &opts.timeout.as_secs_f64().to_string()])
            .env(TOKEN_ENV, &token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if opts.verify {
            cmd.arg("--verify");
        }
        if let Some(k) = opts.kill_rank {
            cmd.args(["--kill-rank", &k.to_string()]);
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out)
                    .lines()
                    .map_while(std::result::Result::ok)
                {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        workers.push(Worker { child, lines: rx });
    }
    let result = drive(&mut workers, opts);
    // Collect exit status and stderr; a worker still running after the others finished is
    // killed (the collective deadline has passed for it too).
    let mut failures = Vec::new();
    let stop_by = Instant::now() + opts.timeout + Duration::from_secs(10);
    for (r, w) in workers.iter_mut().enumerate() {
        let status = loop {
            match w.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < stop_by => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = w.child.kill();
                    break w.child.wait().ok();
                }
            }
        };
        let mut err = String::new();
        if let Some(mut e) = w.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        if !status.is_some_and(|s| s.success()) {
            let tail: String = err
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" | ");
            failures.push(format!(
                "rank {r} ({}): {tail}",
                status.map_or("killed".into(), |s| s.to_string())
            ));
        }
    }
    if !failures.is_empty() {
        return Err(Error::Comm {
            rank: 0,
            op: "bench allreduce",
            reason: failures.join("; "),
        });
    }
    result
}

fn next_line(w: &Worker, r: usize, deadline: Instant) -> Result<String> {
    w.lines
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .map_err(|_| Error::Comm {
            rank: r,
            op: "bench allreduce",
            reason: "worker stopped reporting".into(),
        })
}

fn drive(workers: &mut [Worker], opts: &AllReduceOpts) -> Result<Vec<AllReduceRow>> {
    let deadline = Instant::now() + opts.timeout * 2;
    // Workers exist only for process groups: they always trade addresses first.
    {
        let mut addrs = Vec::new();
        for (r, w) in workers.iter().enumerate() {
            let line = next_line(w, r, deadline)?;
            addrs.push(line.strip_prefix("ADDR ").unwrap_or_default().to_string());
        }
        for w in workers.iter_mut() {
            if let Some(stdin) = w.child.stdin.as_mut() {
                let _ = writeln!(stdin, "ADDRS {}", addrs.join(","));
            }
        }
    }
    let mut per_rank = Vec::new();
    for (r, w) in workers.iter().enumerate() {
        let mut res = Vec::new();
        for _ in &opts.sizes {
            let line = next_line(w, r, deadline + opts.timeout * opts.sizes.len() as u32)?;
            let v: serde_json::Value = serde_json::from_str(
                line.strip_prefix("RESULT ").unwrap_or(&line),
            )
            .map_err(|e| Error::Comm {
                rank: r,
                op: "bench allreduce",
                reason: format!("bad result line `{line}`: {e}"),
            })?;
            let get = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
            res.push((
                get("bytes") as usize,
                get("median_s"),
                v.get("hash").and_then(|h| h.as_u64()).unwrap_or(0),
            ));
        }
        per_rank.push(res);
    }
    check_hashes(&per_rank)?;
    Ok(rows(opts, &per_rank[0]))
}

/// The worker side: connects to the group, measures, prints one `RESULT` line per size.
///
/// # Errors
/// Connection, collective or verification errors (printed by the binary, exit code 1).
pub fn worker(rank: usize, opts: &AllReduceOpts, seed: u64, bind: &str) -> Result<()> {
    let Transport::Group(choice) = opts.transport else {
        return Err(Error::Config {
            field: "transport".into(),
            reason: "local ranks run in one process, not as workers".into(),
        });
    };
    let listener = std::net::TcpListener::bind((bind, 0)).map_err(|source| Error::Io {
        path: bind.into(),
        source,
    })?;
    let local = listener.local_addr().map_err(|source| Error::Io {
        path: bind.into(),
        source,
    })?;
    println!("ADDR {local}");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|source| Error::Io {
            path: "stdin".into(),
            source,
        })?;
    let addrs: Vec<String> = line
        .trim()
        .strip_prefix("ADDRS ")
        .unwrap_or_default()
        .split(',')
        .map(str::to_string)
        .collect();
    let cfg = GrpcConfig {
        timeout: opts.timeout,
        silence_limit: (opts.timeout / 2).min(Duration::from_secs(5)),
        ..GrpcConfig::from_env()?
    };
    let comm = select::connect(&addrs, rank, Some(listener), choice, &cfg)?;
    for (bytes, median, h) in measure_rank(comm.as_ref(), opts, seed)? {
        println!(r#"RESULT {{"bytes":{bytes},"median_s":{median},"hash":{h}}}"#);
    }
    Ok(())
}
