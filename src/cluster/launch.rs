//! `shardwise launch`: starts every rank of `ranks.toml` whose host is this machine as a
//! child process (`shardwise rank`), prefixes their output with the rank, and stops them all
//! on Ctrl-C, on SIGTERM, or as soon as one of them exits. Children also die with the
//! launcher (parent-death signal), so no rank outlives it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::config::{ClusterConfig, RankEntry};
use crate::error::{Error, Result};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// True when `host` names an address of this machine (it can be bound here).
pub fn is_local_host(host: &str) -> bool {
    std::net::TcpListener::bind((host, 0)).is_ok()
}

/// The ranks of `cfg` whose host is this machine.
pub fn local_ranks(cfg: &ClusterConfig) -> Vec<RankEntry> {
    cfg.ranks
        .iter()
        .filter(|e| is_local_host(&e.host))
        .cloned()
        .collect()
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "exited".into(),
    }
}

fn stop_all(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for (_, c) in children.iter_mut() {
        while Instant::now() < deadline {
            if matches!(c.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Runs the launcher for `config` (the file at `config_path`) with `exe` as the shardwise
/// binary. Returns when every child has exited.
///
/// # Errors
/// No rank of the file is on this host, a child cannot start, or a child failed (named).
pub fn launch(config_path: &Path, cfg: &ClusterConfig, exe: &Path) -> Result<()> {
    let mine = local_ranks(cfg);
    if mine.is_empty() {
        return Err(Error::Config {
            field: format!("{}: rank.host", config_path.display()),
            reason: "no rank of this file has a host address of this machine".into(),
        });
    }
    // SAFETY: installs an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut children: Vec<(usize, Child)> = Vec::new();
    for e in &mine {
        let mut cmd = Command::new(exe);
        cmd.arg("rank")
            .arg("--config")
            .arg(config_path)
            .arg("--rank")
            .arg(e.rank.to_string())
            .envs(crate::threads::pool_env(mine.len()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl in the child before exec; async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                stop_all(&mut children);
                return Err(Error::Io {
                    path: exe.to_path_buf(),
                    source,
                });
            }
        };
        let rank = e.rank;
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || prefix_lines(rank, out, false));
        }
        if let Some(err) = child.stderr.take() {
            std::thread::spawn(move || prefix_lines(rank, err, true));
        }
        children.push((rank, child));
    }
    eprintln!(
        "launch: started ranks {:?} of {} ({})",
        mine.iter().map(|e| e.rank).collect::<Vec<_>>(),
        cfg.world_size(),
        cfg.cluster
    );
    loop {
        if STOP.load(Ordering::SeqCst) {
            eprintln!("launch: stopping every rank");
            stop_all(&mut children);
            return Ok(());
        }
        let mut exited = None;
        for (i, (rank, c)) in children.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                exited = Some((i, *rank, status));
                break;
            }
        }
        if let Some((i, rank, status)) = exited {
            children.remove(i);
            if children.is_empty() && status.success() {
                eprintln!("launch: every rank has exited");
                return Ok(());
            }
            eprintln!(
                "launch: rank {rank} {}; stopping the others",
                describe(status)
            );
            if !status.success() {
                // Let a coordinator see this rank's connection close before its neighbours'
                // (their collectives fail on their own meanwhile): it names the first rank
                // whose connection broke as the cause.
                std::thread::sleep(Duration::from_millis(500));
            }
            stop_all(&mut children);
            if status.success() {
                return Ok(());
            }
            return Err(Error::Rank {
                rank,
                reason: describe(status),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn prefix_lines(rank: usize, r: impl std::io::Read, stderr: bool) {
    for line in BufReader::new(r).lines() {
        let Ok(line) = line else { break };
        let text = format!("[rank {rank}] {line}\n");
        let _ = if stderr {
            std::io::stderr().write_all(text.as_bytes())
        } else {
            std::io::stdout().write_all(text.as_bytes())
        };
    }
}
