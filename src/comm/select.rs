//! Choosing a transport for a group from its membership list.
//!
//! `Auto` picks per peer pair: when every rank is on one host (the same host part in every
//! address) the whole group runs the shared-memory collectives; when the group spans hosts,
//! pairs on the same host exchange frames through shared-memory rings and the other pairs
//! through gRPC ([`MixedLinks`]), under the same collective algorithms. Either transport can
//! be forced for every pair.

use std::hash::{Hash, Hasher};

use super::grpc::{self, GrpcConfig, GrpcLinks};
use super::links::{LinkComm, Links};
use super::shm::{ShmComm, ShmConfig};
use super::shm_links::ShmLinks;
use super::Communicator;
use crate::error::{Error, Result};
use crate::proto::Frame;

/// Which transport a group uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// Shared memory when all ranks share a host, gRPC otherwise.
    #[default]
    Auto,
    /// Always gRPC.
    Grpc,
    /// Always shared memory (every rank must be on this host).
    Shm,
}

impl std::str::FromStr for TransportChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "grpc" => Ok(Self::Grpc),
            "shm" => Ok(Self::Shm),
            _ => Err(Error::Config {
                field: "transport".into(),
                reason: format!("`{s}`: expected auto, grpc or shm"),
            }),
        }
    }
}

impl TransportChoice {
    /// Name as written in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Grpc => "grpc",
            Self::Shm => "shm",
        }
    }
}

/// The host part of `host:port` (`[v6]:port` too).
fn host_of(addr: &str) -> &str {
    let h = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    h.trim_start_matches('[').trim_end_matches(']')
}

/// True when every address names the same host.
pub fn same_host(addrs: &[String]) -> bool {
    let loopback = |h: &str| h == "localhost" || h.starts_with("127.") || h == "::1";
    let first = addrs.first().map(|a| host_of(a));
    addrs.iter().all(|a| {
        let h = host_of(a);
        Some(h) == first || (loopback(h) && first.is_some_and(loopback))
    })
}

/// The transport `choice` resolves to for `addrs`.
///
/// # Errors
/// `Shm` forced for ranks on different hosts.
pub fn resolve(choice: TransportChoice, addrs: &[String]) -> Result<TransportChoice> {
    match choice {
        TransportChoice::Auto if same_host(addrs) => Ok(TransportChoice::Shm),
        TransportChoice::Auto => Ok(TransportChoice::Grpc),
        TransportChoice::Shm if !same_host(addrs) => Err(Error::Config {
            field: "transport".into(),
            reason: format!("shm needs every rank on one host; members are {addrs:?}"),
        }),
        c => Ok(c),
    }
}

/// A name every rank derives alike for the group's shared-memory file (from the token and
/// the membership list), so ranks need no extra coordination.
pub fn shm_name(token: &str, addrs: &[String]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    token.hash(&mut h);
    addrs.hash(&mut h);
    format!("g{:016x}", h.finish())
}

/// Links that reach each peer the best available way: shared-memory rings for peers on this
/// host, gRPC for the rest.
#[derive(Debug)]
pub struct MixedLinks {
    rank: usize,
    world: usize,
    shm: Option<ShmLinks>,
    grpc: Option<GrpcLinks>,
}

impl MixedLinks {
    /// Connects rank `rank`; `hosts[r]` says which host rank `r` is on (ranks with equal
    /// keys share memory).
    ///
    /// # Errors
    /// As the two transports' `connect`.
    pub fn connect(
        addrs: &[String],
        rank: usize,
        listener: Option<std::net::TcpListener>,
        cfg: &GrpcConfig,
        hosts: &[String],
    ) -> Result<Self> {
        if hosts.len() != addrs.len() || rank >= addrs.len() {
            return Err(Error::Config {
                field: "hosts".into(),
                reason: format!("{} host keys for {} ranks", hosts.len(), addrs.len()),
            });
        }
        let local: Vec<usize> = (0..addrs.len())
            .filter(|&r| hosts[r] == hosts[rank])
            .collect();
        let remote: Vec<usize> = (0..addrs.len())
            .filter(|&r| hosts[r] != hosts[rank])
            .collect();
        let shm = if local.len() > 1 {
            let shm_cfg = ShmConfig {
                timeout: cfg.timeout,
                connect_timeout: cfg.connect_timeout,
                ..ShmConfig::new(cfg.token.clone())
            };
            let mut h = std::collections::hash_map::DefaultHasher::new();
            hosts[rank].hash(&mut h);
            let name = format!("{}-h{:08x}", shm_name(&cfg.token, addrs), h.finish() as u32);
            let ring = (4 * cfg.algo.chunk_bytes).max(cfg.algo.small_bytes + 4096);
            Some(ShmLinks::connect(
                &name, rank, addrs, &local, &shm_cfg, ring,
            )?)
        } else {
            None
        };
        let grpc = if remote.is_empty() {
            None
        } else {
            Some(GrpcLinks::connect_peers(
                addrs, rank, listener, cfg, &remote,
            )?)
        };
        Ok(Self {
            rank,
            world: addrs.len(),
            shm,
            grpc,
        })
    }

    fn pick(&self, peer: usize) -> Result<&dyn Links> {
        match (&self.shm, &self.grpc) {
            (Some(s), _) if s.has(peer) => Ok(s),
            (_, Some(g)) => Ok(g),
            _ => Err(Error::Comm {
                rank: self.rank,
                op: "link",
                reason: format!("no link to rank {peer}"),
            }),
        }
    }

    /// True when `peer` is reached through shared memory.
    pub fn is_shared_memory(&self, peer: usize) -> bool {
        self.shm.as_ref().is_some_and(|s| s.has(peer))
    }
}

impl Links for MixedLinks {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn send(&self, to: usize, frame: Frame) -> Result<()> {
        self.pick(to)?.send(to, frame)
    }
    fn recv(&self, from: usize) -> Result<Frame> {
        self.pick(from)?.recv(from)
    }
    fn peer(&self, rank: usize) -> String {
        self.pick(rank)
            .map_or_else(|_| format!("rank {rank}"), |l| l.peer(rank))
    }
}

/// Connects rank `rank` of the group `addrs` over the chosen transport.
///
/// # Errors
/// As the chosen transport's `connect`.
pub fn connect(
    addrs: &[String],
    rank: usize,
    listener: Option<std::net::TcpListener>,
    choice: TransportChoice,
    cfg: &GrpcConfig,
) -> Result<Box<dyn Communicator>> {
    let hosts: Vec<String> = addrs.iter().map(|a| host_of(a).to_string()).collect();
    let shares_host = hosts.iter().filter(|h| **h == hosts[rank]).count() > 1;
    Ok(match resolve(choice, addrs)? {
        TransportChoice::Grpc if choice == TransportChoice::Auto && shares_host => {
            Box::new(LinkComm::new(
                MixedLinks::connect(addrs, rank, listener, cfg, &hosts)?,
                cfg.algo,
            ))
        }
        TransportChoice::Shm => {
            let shm = ShmConfig {
                timeout: cfg.timeout,
                connect_timeout: cfg.connect_timeout,
                ..ShmConfig::new(cfg.token.clone())
            };
            Box::new(ShmComm::connect(
                &shm_name(&cfg.token, addrs),
                rank,
                addrs.len(),
                &shm,
            )?)
        }
        _ => Box::new(grpc::connect(addrs, rank, listener, cfg)?),
    })
}

/// Connects `world` ranks inside this process, one thread each, over `choice` (`Auto` means
/// the in-process transport): real sockets for gRPC, a real `/dev/shm` file for shm. For
/// examples and tests that want every transport without launching processes.
///
/// # Errors
/// The first rank's connection error.
pub fn in_process_group(
    world: usize,
    choice: TransportChoice,
    token: &str,
) -> Result<Vec<std::sync::Arc<dyn Communicator>>> {
    use std::sync::Arc;
    if choice == TransportChoice::Auto {
        return Ok(super::LocalComm::group(world)?
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Communicator>)
            .collect());
    }
    let (ls, addrs) = grpc::loopback_listeners(world)?;
    let cfg = GrpcConfig::new(token);
    let shm_cfg = ShmConfig::new(token);
    let name = shm_name(token, &addrs);
    super::each_rank(ls, |r, l| {
        Ok(match choice {
            TransportChoice::Shm => Arc::new(ShmComm::connect(&name, r, world, &shm_cfg)?),
            _ => Arc::new(grpc::connect(&addrs, r, Some(l), &cfg)?) as Arc<dyn Communicator>,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn auto_picks_shm_on_one_host_and_grpc_across_hosts() {
        let local = v(&["127.0.0.1:7000", "localhost:7001"]);
        let spread = v(&["10.0.0.1:7000", "10.0.0.2:7000"]);
        assert_eq!(
            resolve(TransportChoice::Auto, &local).unwrap(),
            TransportChoice::Shm
        );
        assert_eq!(
            resolve(TransportChoice::Auto, &spread).unwrap(),
            TransportChoice::Grpc
        );
        assert_eq!(
            resolve(TransportChoice::Grpc, &local).unwrap(),
            TransportChoice::Grpc
        );
        assert!(resolve(TransportChoice::Shm, &spread).is_err());
        assert!(same_host(&v(&["[::1]:1", "127.0.0.1:2"])));
        assert_eq!(shm_name("t", &local), shm_name("t", &local));
        assert_ne!(shm_name("t", &local), shm_name("u", &local));
    }

    #[test]
    fn mixed_group_uses_shared_memory_within_hosts_and_grpc_across() {
        use crate::comm::suite;
        // Ranks 0-1 on host "a", 2-4 on host "b"; every collective in the suite.
        let hosts: Vec<String> = ["a", "a", "b", "b", "b"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let make = |w: usize| -> Result<Vec<std::sync::Arc<dyn Communicator>>> {
            let (ls, addrs) = grpc::loopback_listeners(w)?;
            let cfg = GrpcConfig::new(format!("mixed-{}", std::process::id()));
            let hosts = &hosts[..w];
            crate::comm::each_rank(ls, |r, l| {
                let links = MixedLinks::connect(&addrs, r, Some(l), &cfg, hosts)?;
                for p in (0..w).filter(|&p| p != r) {
                    assert_eq!(links.is_shared_memory(p), hosts[p] == hosts[r]);
                }
                Ok(std::sync::Arc::new(LinkComm::new(links, cfg.algo))
                    as std::sync::Arc<dyn Communicator>)
            })
        };
        for w in [3, 5] {
            suite::check_all_reduce(&make, w).unwrap();
            suite::check_lengths(&make, w).unwrap();
            suite::check_all_gather(&make, w).unwrap();
            suite::check_broadcast_barrier_errors(&make, w).unwrap();
        }
    }

    #[test]
    fn in_process_groups_reduce_over_every_transport() {
        for choice in [
            TransportChoice::Auto,
            TransportChoice::Grpc,
            TransportChoice::Shm,
        ] {
            let comms =
                in_process_group(3, choice, &format!("ipg-{}", std::process::id())).unwrap();
            let outs = crate::comm::suite::on_ranks(&comms, |r, c| {
                c.all_reduce_sum(&candle_core::Tensor::new(
                    &[r as f32, 2.0],
                    &candle_core::Device::Cpu,
                )?)
            })
            .unwrap();
            for o in outs {
                assert_eq!(o.to_vec1::<f32>().unwrap(), vec![3.0, 6.0], "{choice:?}");
            }
        }
    }

    #[test]
    fn auto_group_on_loopback_reduces_over_shared_memory() {
        let (ls, addrs) = grpc::loopback_listeners(3).unwrap();
        let cfg = GrpcConfig::new(format!("select-{}", std::process::id()));
        let outs = crate::comm::each_rank(ls, |r, l| {
            let c = connect(&addrs, r, Some(l), TransportChoice::Auto, &cfg)?;
            let t = candle_core::Tensor::new(&[r as f32, 1.0], &candle_core::Device::Cpu)?;
            Ok(c.all_reduce_sum(&t)?.to_vec1::<f32>()?)
        })
        .unwrap();
        for o in outs {
            assert_eq!(o, vec![3.0, 3.0]);
        }
    }
}
