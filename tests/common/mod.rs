//! Helpers shared by the integration tests: random weights on disk, ranks on threads, and
//! float64 references computed without any shardwise code.

#![allow(dead_code)]

pub mod reference;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use shardwise::comm::{suite, Communicator, LocalComm};
use shardwise::Result;

/// A fresh random `[dims]` f32 tensor with values in (-scale, scale).
pub fn rand_tensor(dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let mut rng = rand::rng();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// Writes `tensors` to `path` as safetensors.
pub fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

/// Runs `f` on `world` in-process ranks, one thread each.
pub fn run_ranks<T: Send>(
    world: usize,
    f: impl Fn(Arc<dyn Communicator>) -> Result<T> + Sync,
) -> Vec<T> {
    let comms: Vec<Arc<dyn Communicator>> = LocalComm::group(world)
        .unwrap()
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect();
    let comms2 = comms.clone();
    suite::on_ranks(&comms, |r, _| f(comms2[r].clone())).unwrap()
}

/// `x @ w^T (+ b)` in float64.
pub fn linear64(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let y = x
        .to_dtype(DType::F64)
        .unwrap()
        .matmul(&w.to_dtype(DType::F64).unwrap().t().unwrap())
        .unwrap();
    match b {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F64).unwrap()).unwrap(),
        None => y,
    }
}

/// SiLU in float64: `x / (1 + exp(-x))`.
pub fn silu64(x: &Tensor) -> Tensor {
    let x = x.to_dtype(DType::F64).unwrap();
    (&x / (x.neg().unwrap().exp().unwrap() + 1.0).unwrap()).unwrap()
}

/// `max |a - b| / max |b|`.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let diff = (&a - &b).unwrap().abs().unwrap().max(0).unwrap();
    let scale = b.abs().unwrap().max(0).unwrap();
    diff.to_scalar::<f64>().unwrap() / scale.to_scalar::<f64>().unwrap().max(1e-30)
}

/// Root-mean-square of `a - b` over root-mean-square of `b`.
pub fn rms_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let d = (&a - &b).unwrap().sqr().unwrap().mean_all().unwrap();
    let s = b.sqr().unwrap().mean_all().unwrap();
    (d.to_scalar::<f64>().unwrap() / s.to_scalar::<f64>().unwrap().max(1e-30)).sqrt()
}

/// Columns `start..end` of the last dimension.
pub fn cols(t: &Tensor, start: usize, end: usize) -> Tensor {
    t.narrow(t.rank() - 1, start, end - start).unwrap()
}

/// A `ranks.toml` in `dir` for `hosts` (one rank each) with free ports, an inline random
/// token, the given transport and 20 s timeouts.
pub fn ranks_toml(dir: &Path, hosts: &[String], transport: &str) -> std::path::PathBuf {
    let mut text = format!(
        "cluster = \"test\"\ntoken = \"{}\"\ntransport = \"{transport}\"\n[timeouts]\ncollective_s = 20\nconnect_s = 20\n",
        shardwise::comm::grpc::random_token()
    );
    // Hold every probe listener until all ports are chosen, so none is handed out twice.
    let held: Vec<std::net::TcpListener> = (0..2 * hosts.len())
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    drop(held);
    for (r, h) in hosts.iter().enumerate() {
        text += &format!(
            "[[rank]]\nrank = {r}\nhost = \"{h}\"\ncontrol_port = {}\ncollective_port = {}\n",
            ports[2 * r],
            ports[2 * r + 1]
        );
    }
    let p = dir.join("ranks.toml");
    std::fs::write(&p, text).unwrap();
    p
}
