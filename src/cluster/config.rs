//! `ranks.toml`: the description of a cluster.
//!
//! ```toml
//! cluster = "demo"
//! token_env = "SHARDWISE_TOKEN"   # or token = "…", or token_file = "path"
//! transport = "auto"              # auto | nccl | shm | grpc
//!
//! [timeouts]
//! collective_s = 60
//! connect_s = 30
//!
//! [[rank]]
//! rank = 0
//! host = "10.0.0.1"
//! control_port = 7000
//! collective_port = 7100          # optional: control_port + 100
//! device = "cpu"                  # cpu | cuda:N
//! ```
//!
//! Every validation error names the file, the line and the field: unknown keys, missing or
//! duplicate ranks, two ranks on one host and port, bad device strings, an ambiguous token.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, Result};

/// Where a rank computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The host CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        s.strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("`{s}` is not a device; expected `cpu` or `cuda:N`"))
    }
}

/// Preferred collective transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportPref {
    /// NCCL when every rank has CUDA, shared memory on one host, gRPC otherwise.
    #[default]
    Auto,
    /// NCCL (every rank must have a CUDA device).
    Nccl,
    /// Shared memory (every rank on one host).
    Shm,
    /// gRPC between every pair.
    Grpc,
}

/// One rank of the cluster, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEntry {
    /// Rank number, `0..world_size`.
    pub rank: usize,
    /// Host name or address.
    pub host: String,
    /// Port of the rank's control server.
    pub control_port: u16,
    /// Port of the rank's collective server.
    pub collective_port: u16,
    /// Compute device.
    pub device: Device,
}

impl RankEntry {
    /// `host:collective_port`, the rank's entry in a collective membership list.
    pub fn collective_addr(&self) -> String {
        format!("{}:{}", self.host, self.collective_port)
    }

    /// `host:control_port`.
    pub fn control_addr(&self) -> String {
        format!("{}:{}", self.host, self.control_port)
    }
}

/// Where the cluster token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// Written in the file.
    Inline(String),
    /// Read from a file (trailing whitespace trimmed).
    File(PathBuf),
    /// Read from an environment variable.
    Env(String),
}

/// A validated `ranks.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Cluster name.
    pub cluster: String,
    /// Where the token comes from.
    pub token: TokenSource,
    /// Preferred transport.
    pub transport: TransportPref,
    /// Deadline of every collective wait.
    pub collective_timeout: Duration,
    /// Deadline for the cluster to connect.
    pub connect_timeout: Duration,
    /// Ranks, sorted by rank number.
    pub ranks: Vec<RankEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    collective_s: Option<Spanned<f64>>,
    connect_s: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRank {
    rank: Spanned<usize>,
    host: Spanned<String>,
    control_port: Spanned<u16>,
    collective_port: Option<Spanned<u16>>,
    device: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster: String,
    token: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    token_env: Option<Spanned<String>>,
    #[serde(default)]
    transport: TransportPref,
    timeouts: Option<RawTimeouts>,
    #[serde(default)]
    rank: Vec<RawRank>,
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

impl ClusterConfig {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// I/O errors, TOML errors and validation errors, each naming the file, line and field.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates the text of a `ranks.toml`; `path` names it in errors and anchors a relative
    /// `token_file`.
    ///
    /// # Errors
    /// As [`ClusterConfig::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let bad = |span: Option<Range<usize>>, reason: String| Error::BadFile {
            file: path.to_path_buf(),
            reason: match span {
                Some(s) => format!("line {}: {reason}", line_of(text, s.start)),
                None => reason,
            },
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| bad(e.span(), e.message().to_string()))?;
        let token = match (&raw.token, &raw.token_file, &raw.token_env) {
            (Some(t), None, None) => TokenSource::Inline(t.get_ref().clone()),
            (None, Some(f), None) => {
                let p = PathBuf::from(f.get_ref());
                let base = path.parent().unwrap_or(Path::new("."));
                TokenSource::File(if p.is_absolute() { p } else { base.join(p) })
            }
            (None, None, Some(e)) => TokenSource::Env(e.get_ref().clone()),
            (None, None, None) => TokenSource::Env(crate::comm::grpc::TOKEN_ENV.to_string()),
            _ => {
                let second = [&raw.token, &raw.token_file, &raw.token_env]
                    .into_iter()
                    .flatten()
                    .nth(1)
                    .map(|s| s.span());
                return Err(bad(
                    second,
                    "give one of `token`, `token_file`, `token_env`, not several".into(),
                ));
            }
        };
        let secs = |v: &Option<Spanned<f64>>, field: &str, default: f64| -> Result<Duration> {
            match v {
                None => Ok(Duration::from_secs_f64(default)),
                Some(s) if s.get_ref().is_finite() && *s.get_ref() > 0.0 => {
                    Ok(Duration::from_secs_f64(*s.get_ref()))
                }
                Some(s) => Err(bad(
                    Some(s.span()),
                    format!("timeouts.{field} must be a positive number of seconds"),
                )),
            }
        };
        let (collective_timeout, connect_timeout) = match &raw.timeouts {
            Some(t) => (
                secs(&t.collective_s, "collective_s", 60.0)?,
                secs(&t.connect_s, "connect_s", 30.0)?,
            ),
            None => (Duration::from_secs(60), Duration::from_secs(30)),
        };
        if raw.rank.is_empty() {
            return Err(bad(None, "no [[rank]] entries".into()));
        }
        let world = raw.rank.len();
        let mut seen: Vec<Option<usize>> = vec![None; world];
        let mut ranks = Vec::with_capacity(world);
        for r in &raw.rank {
            let n = *r.rank.get_ref();
            let line = line_of(text, r.rank.span().start);
            if n >= world {
                return Err(bad(
                    Some(r.rank.span()),
                    format!(
                        "rank {n} is out of range: {world} [[rank]] entries make ranks 0..{world}"
                    ),
                ));
            }
            if let Some(first) = seen[n] {
                return Err(bad(
                    Some(r.rank.span()),
                    format!("rank {n} appears twice (first on line {first})"),
                ));
            }
            seen[n] = Some(line);
            let device = match &r.device {
                Some(d) => d
                    .get_ref()
                    .parse()
                    .map_err(|e| bad(Some(d.span()), format!("device: {e}")))?,
                None => Device::Cpu,
            };
            let control_port = *r.control_port.get_ref();
            let collective_port = match &r.collective_port {
                Some(p) => *p.get_ref(),
                None => control_port.checked_add(100).ok_or_else(|| {
                    bad(
                        Some(r.control_port.span()),
                        "control_port + 100 overflows; set collective_port".into(),
                    )
                })?,
            };
            if r.host.get_ref().trim().is_empty() {
                return Err(bad(Some(r.host.span()), format!("rank {n}: host is empty")));
            }
            ranks.push((
                RankEntry {
                    rank: n,
                    host: r.host.get_ref().clone(),
                    control_port,
                    collective_port,
                    device,
                },
                r,
            ));
        }
        // Every port on a host is used once (control and collective ports of all its ranks).
        let mut ports: Vec<(&str, u16, usize, &str)> = Vec::new();
        for (e, r) in &ranks {
            for (port, field, span) in [
                (e.control_port, "control_port", r.control_port.span()),
                (
                    e.collective_port,
                    "collective_port",
                    r.collective_port
                        .as_ref()
                        .map_or(r.control_port.span(), |p| p.span()),
                ),
            ] {
                let line = line_of(text, span.start);
                if let Some((_, _, first, first_field)) =
                    ports.iter().find(|(h, p, _, _)| *h == e.host && *p == port)
                {
                    return Err(bad(
                        Some(span),
                        format!(
                            "rank {}: {field} {port} on host {} is already used by the {first_field} on line {first}",
                            e.rank, e.host
                        ),
                    ));
                }
                ports.push((&e.host, port, line, field));
            }
        }
        let mut ranks: Vec<RankEntry> = ranks.into_iter().map(|(e, _)| e).collect();
        ranks.sort_by_key(|e| e.rank);
        Ok(Self {
            cluster: raw.cluster,
            token,
            transport: raw.transport,
            collective_timeout,
            connect_timeout,
            ranks,
        })
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    /// The cluster token.
    ///
    /// # Errors
    /// The token file cannot be read, or the variable is unset or empty (named).
    pub fn resolve_token(&self) -> Result<String> {
        let token = match &self.token {
            TokenSource::Inline(t) => t.clone(),
            TokenSource::File(p) => std::fs::read_to_string(p)
                .map_err(|source| Error::Io {
                    path: p.clone(),
                    source,
                })?
                .trim_end()
                .to_string(),
            TokenSource::Env(v) => std::env::var(v).unwrap_or_default(),
        };
        if token.is_empty() {
            return Err(Error::Config {
                field: "token".into(),
                reason: match &self.token {
                    TokenSource::Env(v) => format!("environment variable {v} is unset or empty"),
                    TokenSource::File(p) => format!("{} is empty", p.display()),
                    TokenSource::Inline(_) => "`token` is empty".into(),
                },
            });
        }
        Ok(token)
    }

    /// Collective addresses in rank order (the membership list the transports take).
    pub fn collective_addrs(&self) -> Vec<String> {
        self.ranks.iter().map(RankEntry::collective_addr).collect()
    }

    /// Connects rank `rank`'s collectives as this file says: membership from the `[[rank]]`
    /// entries, the token, the transport preference and the timeouts.
    ///
    /// # Errors
    /// A rank not in the file, an unreadable token, `nccl` (needs the `cuda` feature and CUDA
    /// ranks), or the transport's connection errors.
    pub fn connect_collectives(&self, rank: usize) -> Result<Box<dyn crate::comm::Communicator>> {
        use crate::comm::select::{self, TransportChoice};
        if rank >= self.world_size() {
            return Err(Error::Config {
                field: "rank".into(),
                reason: format!(
                    "{rank} is not in this cluster of {} ranks",
                    self.world_size()
                ),
            });
        }
        let all_cuda = self
            .ranks
            .iter()
            .all(|r| matches!(r.device, Device::Cuda(_)));
        let nccl = match self.transport {
            TransportPref::Nccl if !cfg!(feature = "cuda") => {
                return Err(Error::Unsupported {
                    what: "transport = \"nccl\"".into(),
                    by: "this build (NCCL needs the `cuda` feature and CUDA devices)".into(),
                })
            }
            TransportPref::Nccl => {
                if let Some(r) = self.ranks.iter().find(|r| r.device == Device::Cpu) {
                    return Err(Error::Config {
                        field: format!("rank {}: device", r.rank),
                        reason: "transport = \"nccl\" needs a CUDA device on every rank".into(),
                    });
                }
                true
            }
            TransportPref::Auto => all_cuda && cfg!(feature = "cuda"),
            _ => false,
        };
        // The host transport: the collectives themselves, or (NCCL) the authenticated links
        // that hand out NCCL's unique id.
        let choice = match self.transport {
            TransportPref::Grpc => TransportChoice::Grpc,
            TransportPref::Shm => TransportChoice::Shm,
            TransportPref::Auto | TransportPref::Nccl => TransportChoice::Auto,
        };
        let cfg = crate::comm::grpc::GrpcConfig {
            timeout: self.collective_timeout,
            connect_timeout: self.connect_timeout,
            ..crate::comm::grpc::GrpcConfig::new(self.resolve_token()?)
        };
        let host = select::connect(&self.collective_addrs(), rank, None, choice, &cfg)?;
        let device = self.ranks[rank].device;
        #[cfg(not(feature = "cuda"))]
        let _ = nccl;
        match device {
            Device::Cpu => Ok(host),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) if nccl => {
                let world = self.world_size();
                let id = if rank == 0 {
                    crate::comm::nccl::new_unique_id()?
                } else {
                    [0u8; crate::comm::nccl::ID_BYTES]
                };
                let id = crate::comm::nccl::share_id(host.as_ref(), id)?;
                tracing::info!("rank {rank}: NCCL collectives on cuda:{ordinal}");
                Ok(Box::new(crate::comm::nccl::NcclComm::init(
                    rank, world, ordinal, &id,
                )?))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                tracing::warn!(
                    "rank {rank}: cuda:{ordinal} with host collectives (staged through host \
                     memory): {}",
                    if all_cuda {
                        "the transport is not NCCL"
                    } else {
                        "not every rank has a CUDA device"
                    }
                );
                Ok(Box::new(crate::comm::nccl::Staged::new(host, ordinal)?))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(ordinal) => Err(Error::Unsupported {
                what: format!("rank {rank} on cuda:{ordinal}"),
                by: "this build (CUDA ranks need the `cuda` feature)".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClusterConfig> {
        ClusterConfig::parse(text, Path::new("ranks.toml"))
    }

    const GOOD: &str = r#"
cluster = "demo"
token = "s3cret"
transport = "grpc"

[timeouts]
collective_s = 5

[[rank]]
rank = 1
host = "10.0.0.2"
control_port = 7000
device = "cuda:1"

[[rank]]
rank = 0
host = "10.0.0.1"
control_port = 7000
collective_port = 7001
"#;

    #[test]
    fn parses_a_valid_file() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.world_size(), 2);
        assert_eq!(c.ranks[0].host, "10.0.0.1");
        assert_eq!(c.ranks[1].device, Device::Cuda(1));
        assert_eq!(c.ranks[1].collective_port, 7100);
        assert_eq!(c.collective_addrs(), vec!["10.0.0.1:7001", "10.0.0.2:7100"]);
        assert_eq!(c.collective_timeout, Duration::from_secs(5));
        assert_eq!(c.connect_timeout, Duration::from_secs(30));
        assert_eq!(c.transport, TransportPref::Grpc);
        assert_eq!(c.resolve_token().unwrap(), "s3cret");
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn each_malformed_case_names_line_and_field() {
        let base = "cluster = \"c\"\ntoken = \"t\"\n";
        let rank = |n: usize, host: &str, port: u16, extra: &str| {
            format!("[[rank]]\nrank = {n}\nhost = \"{host}\"\ncontrol_port = {port}\n{extra}")
        };
        let cases = [
            (format!("{base}{}{}", rank(0, "a", 1, ""), rank(0, "b", 1, "")), "line 8: rank 0 appears twice (first on line 4)"),
            (format!("{base}{}{}", rank(0, "a", 1, ""), rank(2, "b", 1, "")), "line 8: rank 2 is out of range"),
            (format!("{base}{}{}", rank(0, "a", 1, ""), rank(1, "a", 1, "")), "line 10: rank 1: control_port 1 on host a is already used by the control_port on line 6"),
            (format!("{base}{}", rank(0, "a", 1, "device = \"gpu0\"\n")), "line 7: device: `gpu0` is not a device"),
            (format!("{base}{}", rank(0, "a", 1, "colour = 3\n")), "line 7: unknown field `colour`"),
            (format!("{base}token_env = \"X\"\n{}", rank(0, "a", 1, "")), "line 3: give one of `token`"),
            (format!("{base}[timeouts]\nconnect_s = -1\n{}", rank(0, "a", 1, "")), "line 4: timeouts.connect_s must be a positive"),
            (base.to_string(), "no [[rank]] entries"),
            (format!("{base}transport = \"carrier-pigeon\"\n{}", rank(0, "a", 1, "")), "line 3: unknown variant `carrier-pigeon`"),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(
                e.contains("ranks.toml") && e.contains(want),
                "{e}\n--- wanted: {want}\n{text}"
            );
        }
    }

    #[test]
    fn shipped_examples_are_valid() {
        for f in ["examples/ranks-local.toml", "examples/ranks-2host.toml"] {
            let c = ClusterConfig::load(Path::new(env!("CARGO_MANIFEST_DIR")).join(f).as_path())
                .unwrap();
            assert_eq!(c.world_size(), 4, "{f}");
        }
    }

    /// Free loopback ports (probed, then released: another process may take one before we
    /// bind it, so callers retry with fresh ports on failure).
    fn free_ports(n: usize) -> Vec<u16> {
        let ls: Vec<_> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
    }

    /// Sums rank+1 over a 3-rank cluster file with the given transport.
    fn cluster_sum(transport: &str) -> Result<Vec<Vec<f32>>> {
        let ports = free_ports(6);
        let mut text = format!(
            "cluster = \"t\"\ntoken = \"cfg-{}\"\ntransport = \"{transport}\"\n",
            std::process::id()
        );
        for r in 0..3 {
            text += &format!(
                "[[rank]]\nrank = {r}\nhost = \"127.0.0.1\"\ncontrol_port = {}\ncollective_port = {}\n",
                ports[2 * r],
                ports[2 * r + 1]
            );
        }
        let c = parse(&text)?;
        crate::comm::each_rank(vec![(); 3], |r, ()| {
            let comm = c.connect_collectives(r)?;
            let t = candle_core::Tensor::new(&[r as f32 + 1.0], &candle_core::Device::Cpu)?;
            Ok(comm.all_reduce_sum(&t)?.to_vec1::<f32>()?)
        })
    }

    #[test]
    fn a_cluster_file_connects_its_ranks() {
        for transport in ["grpc", "shm", "auto"] {
            let sums = (0..3)
                .find_map(|_| cluster_sum(transport).ok())
                .unwrap_or_else(|| panic!("{transport}: three attempts failed"));
            assert!(
                sums.iter().all(|v| v == &vec![6.0]),
                "{transport}: {sums:?}"
            );
        }
        let nccl = parse(
            "cluster = \"t\"\ntoken = \"x\"\ntransport = \"nccl\"\n[[rank]]\nrank = 0\nhost = \"h\"\ncontrol_port = 1\n",
        )
        .unwrap();
        let e = nccl.connect_collectives(0).unwrap_err().to_string();
        assert!(e.contains("nccl") && e.contains("cuda"), "{e}");
    }

    #[test]
    fn token_from_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "from-file\n").unwrap();
        let text = "cluster = \"c\"\ntoken_file = \"tok\"\n[[rank]]\nrank = 0\nhost = \"h\"\ncontrol_port = 1\n";
        let c = ClusterConfig::parse(text, &dir.path().join("ranks.toml")).unwrap();
        assert_eq!(c.resolve_token().unwrap(), "from-file");
        let text = "cluster = \"c\"\ntoken_env = \"SHARDWISE_TEST_TOKEN_UNSET_VAR\"\n[[rank]]\nrank = 0\nhost = \"h\"\ncontrol_port = 1\n";
        let e = parse(text)
            .unwrap()
            .resolve_token()
            .unwrap_err()
            .to_string();
        assert!(e.contains("SHARDWISE_TEST_TOKEN_UNSET_VAR"), "{e}");
    }
}
