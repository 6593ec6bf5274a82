//! Choosing a transport for a group from its membership list.
//!
//! `Auto` uses shared memory when every rank is on the same host (the same host part in
//! every address), and gRPC otherwise; either can be forced. A group that spans hosts uses
//! gRPC for every pair, including pairs that share a host.

use std::hash::{Hash, Hasher};

use super::grpc::{self, GrpcConfig};
use super::shm::{ShmComm, ShmConfig};
use super::Communicator;
use crate::error::{Error, Result};

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
    Ok(match resolve(choice, addrs)? {
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
    fn auto_group_on_loopback_reduces_over_shared_memory() {
        let (ls, addrs) = grpc::loopback_listeners(3).unwrap();
        let cfg = GrpcConfig::new(format!("select-{}", std::process::id()));
        let outs: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = ls
                .into_iter()
                .enumerate()
                .map(|(r, l)| {
                    let (addrs, cfg) = (&addrs, &cfg);
                    s.spawn(move || {
                        let c = connect(addrs, r, Some(l), TransportChoice::Auto, cfg).unwrap();
                        let t =
                            candle_core::Tensor::new(&[r as f32, 1.0], &candle_core::Device::Cpu)
                                .unwrap();
                        c.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for o in outs {
            assert_eq!(o, vec![3.0, 3.0]);
        }
    }
}
