//! `shardwise bench nccl` (feature `cuda`): all-reduce latency and bus bandwidth through
//! [`NcclComm`] on the local GPUs, one rank per GPU on its own thread, plus a check of every
//! collective against host arithmetic. `scripts/bench/torch_nccl_allreduce.py` measures
//! PyTorch's NCCL all-reduce the same way (mean of back-to-back calls after a warm-up, one
//! device synchronisation per batch). Messages up to 1 MiB are also timed inside a CUDA graph
//! (`*-graph` rows), where the host's launch cost drops out as it does in a captured decode
//! step.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::comm::nccl::{new_unique_id, NcclComm};
use crate::comm::{each_rank, Communicator};
use crate::error::{Error, Result};

/// One message size through one path.
#[derive(Debug, Clone)]
pub struct NcclRow {
    /// `shardwise` (what `all_reduce_sum` picks: peer memory for small messages when
    /// available, NCCL otherwise) or `shardwise-nccl` (NCCL whatever the size).
    pub path: &'static str,
    /// Message bytes.
    pub bytes: usize,
    /// Mean time per all-reduce, microseconds.
    pub mean_us: f64,
    /// Bus bandwidth, GB/s (nccl-tests: 2 (n - 1) / n * bytes / time).
    pub busbw_gbps: f64,
}

fn iters_for(bytes: usize) -> usize {
    if bytes <= 1 << 20 {
        200
    } else if bytes <= 64 << 20 {
        50
    } else {
        10
    }
}

fn check(rank: usize, what: &str, ok: bool, detail: String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Comm {
            rank,
            op: "verify",
            reason: format!("{what}: {detail}"),
        })
    }
}

/// Checks all-reduce (random values against the host sum), an uneven all-gather and a
/// broadcast on one rank.
fn verify(comm: &NcclComm) -> Result<()> {
    let (r, w) = (comm.rank(), comm.world_size());
    let dev = comm.cuda_device();
    // Every rank draws every rank's values from the same seeds, so each can compute the sum.
    let vals = |k: usize| -> Vec<f32> {
        (0..1000)
            .map(|i| (((k * 7919 + i * 104_729) % 2003) as f32 - 1001.0) / 1001.0)
            .collect()
    };
    let mine = Tensor::new(vals(r), dev)?;
    let got: Vec<f32> = comm.all_reduce_sum(&mine)?.to_vec1()?;
    let want: Vec<f64> = (0..1000)
        .map(|i| (0..w).map(|k| f64::from(vals(k)[i])).sum())
        .collect();
    let err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (f64::from(*g) - w).abs())
        .fold(0.0, f64::max);
    check(r, "all_reduce_sum", err <= 1e-5, format!("max error {err}"))?;
    // Back to back with no synchronisation, new values each call: a reused buffer half or
    // a flag raised too early would show as a wrong sum.
    let outs = (0..64)
        .map(|c| comm.all_reduce_sum(&Tensor::new(vals(r + 1000 * c), dev)?))
        .collect::<Result<Vec<_>>>()?;
    for (c, out) in outs.iter().enumerate() {
        let got: Vec<f32> = out.to_vec1()?;
        let ok = got.iter().enumerate().all(|(i, g)| {
            let want: f64 = (0..w).map(|k| f64::from(vals(k + 1000 * c)[i])).sum();
            (f64::from(*g) - want).abs() <= 1e-5
        });
        check(r, "all_reduce_sum back to back", ok, format!("call {c}"))?;
    }
    // Uneven all-gather along dim 1: rank k holds k + 1 columns of value k.
    let piece = Tensor::full(r as f32, (2, r + 1), dev)?;
    let all: Vec<Vec<f32>> = comm.all_gather(&piece, 1)?.to_vec2()?;
    let row: Vec<f32> = (0..w).flat_map(|k| vec![k as f32; k + 1]).collect();
    check(
        r,
        "all_gather",
        all == vec![row.clone(), row],
        format!("{all:?}"),
    )?;
    let b: Vec<f32> = comm
        .broadcast(&Tensor::full(r as f32 + 10.0, 3, dev)?, w - 1)?
        .to_vec1()?;
    check(
        r,
        "broadcast",
        b == vec![w as f32 + 9.0; 3],
        format!("{b:?}"),
    )?;
    comm.barrier()
}

fn graph_name(nccl_only: bool) -> &'static str {
    if nccl_only {
        "shardwise-nccl-graph"
    } else {
        "shardwise-graph"
    }
}

/// Seconds per call of `once` when `it` calls are captured in one CUDA graph and replayed:
/// the device's time, without the host's launch cost (how a decode step runs them).
fn in_graph(comm: &NcclComm, it: usize, once: &dyn Fn() -> Result<Tensor>) -> Result<f64> {
    let dev = comm.cuda_device();
    let stream = dev.as_cuda_device()?.cuda_stream();
    let drv = |e: cudarc::driver::DriverError| Error::Comm {
        rank: comm.rank(),
        op: "graph",
        reason: format!("{e:?}"),
    };
    let (graph, ()) = crate::cuda::capture(&stream, || (0..it).try_for_each(|_| once().map(drop)))?;
    graph.launch().map_err(drv)?;
    dev.synchronize()?;
    comm.barrier()?;
    let reps = 5;
    let t0 = Instant::now();
    for _ in 0..reps {
        graph.launch().map_err(drv)?;
    }
    dev.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() / (reps * it) as f64)
}

/// Runs the benchmark on GPUs `0..world`; returns rank 0's rows.
///
/// # Errors
/// No such GPUs, NCCL failures, or a failed check.
pub fn run(world: usize, sizes: &[usize], dtype: DType) -> Result<Vec<NcclRow>> {
    let id = new_unique_id()?;
    let per_rank = each_rank((0..world).collect(), |r, _: usize| {
        let comm = NcclComm::init(r, world, r, &id)?;
        let comm = &comm;
        verify(comm)?;
        let dev: &Device = comm.cuda_device();
        let mut rows = Vec::with_capacity(sizes.len());
        for &bytes in sizes {
            let n = (bytes / dtype.size_in_bytes()).max(1);
            let x = Tensor::ones(n, dtype, dev)?;
            let mut paths: Vec<(&'static str, bool)> = vec![("shardwise", false)];
            if comm.has_peer_path() && crate::comm::peer::PeerAllReduce::fits(&x) {
                paths.push(("shardwise-nccl", true));
            }
            for (path, nccl_only) in paths {
                let once = || -> Result<Tensor> {
                    if nccl_only {
                        comm.all_reduce_nccl(&x)
                    } else {
                        comm.all_reduce_sum(&x)
                    }
                };
                for _ in 0..5 {
                    once()?;
                }
                dev.synchronize()?;
                comm.barrier()?;
                let it = iters_for(bytes);
                let t0 = Instant::now();
                for _ in 0..it {
                    once()?;
                }
                dev.synchronize()?;
                let eager = t0.elapsed().as_secs_f64() / it as f64;
                let row = |path, secs: f64| NcclRow {
                    path,
                    bytes,
                    mean_us: secs * 1e6,
                    busbw_gbps: 2.0 * (world as f64 - 1.0) / world as f64 * bytes as f64
                        / secs
                        / 1e9,
                };
                rows.push(row(path, eager));
                if bytes <= 1 << 20 {
                    let graphed = in_graph(comm, it, &once)?;
                    rows.push(row(graph_name(nccl_only), graphed));
                }
            }
        }
        Ok(rows)
    })?;
    Ok(per_rank.into_iter().next().unwrap_or_default())
}
