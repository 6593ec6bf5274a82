//! Measurements behind `shardwise bench`: parallel-layer forward time, sharded-read
//! throughput and all-reduce bandwidth ([`allreduce`]). Benchmarks report figures; they
//! assert nothing about speed.

pub mod allreduce;
pub mod decode;
#[cfg(feature = "cuda")]
pub mod nccl;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::comm::{suite::on_ranks, Communicator, LocalComm};
use crate::error::{Error, Result};
use crate::layers::Mlp;
use crate::quant::{IsqType, QuantConfig};
use crate::shard::{plan_split, Shard, SplitSpec};
use crate::weights::{MemorySource, SafetensorsSource, WeightSource};

/// One measured MLP configuration.
#[derive(Debug, Clone)]
pub struct MlpRow {
    /// Requested format (`f32` or an ISQ type).
    pub format: String,
    /// Formats the down projection actually got on each rank (after any fallback).
    pub formats_used: Vec<String>,
    /// In-process ranks.
    pub world: usize,
    /// Tokens per forward (rows of the input).
    pub tokens: usize,
    /// Median forward time.
    pub median: Duration,
    /// Fastest forward time.
    pub min: Duration,
}

fn local_comms(world: usize) -> Result<Vec<Arc<dyn Communicator>>> {
    Ok(LocalComm::group(world)?
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect())
}

fn median(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[0])
}

/// Times the forward of a SwiGLU MLP (`hidden` x `intermediate`, random weights) for each
/// format (`None` = f32) and world size, on in-process ranks.
///
/// # Errors
/// Load, quantization or collective errors.
pub fn bench_mlp(
    hidden: usize,
    intermediate: usize,
    formats: &[Option<IsqType>],
    worlds: &[usize],
    tokens: &[usize],
    iters: usize,
) -> Result<Vec<MlpRow>> {
    let dev = Device::Cpu;
    let std = (1.0 / hidden as f64).sqrt();
    let src = MemorySource::new(
        "random-mlp",
        [
            ("mlp.gate_proj.weight", (intermediate, hidden)),
            ("mlp.up_proj.weight", (intermediate, hidden)),
            ("mlp.down_proj.weight", (hidden, intermediate)),
        ]
        .into_iter()
        .map(|(n, s)| Ok((n.to_string(), Tensor::randn(0f32, std as f32, s, &dev)?)))
        .collect::<Result<Vec<_>>>()?,
    );
    let f32c = QuantConfig::Unquantized { dtype: DType::F32 };
    let mut rows = Vec::new();
    for &format in formats {
        for &world in worlds {
            let comms = local_comms(world)?;
            let align = format.map_or(1, |f| f.block_size());
            let results = on_ranks(&comms, |r, _| {
                let comm = comms[r].clone();
                let mut mlp = Mlp::load(
                    "mlp",
                    hidden,
                    intermediate,
                    &f32c,
                    &src,
                    comm.clone(),
                    align,
                    None,
                )?;
                if let Some(ty) = format {
                    mlp.apply_isq(ty)?;
                }
                let used = mlp.down.parts()[0].format();
                let mut out = Vec::new();
                for &t in tokens {
                    let x = Tensor::randn(0f32, 1.0, (t, hidden), &Device::Cpu)?;
                    for _ in 0..2 {
                        mlp.forward(&x)?;
                    }
                    let mut times = Vec::with_capacity(iters);
                    for _ in 0..iters {
                        comm.barrier()?;
                        let t0 = Instant::now();
                        mlp.forward(&x)?;
                        times.push(t0.elapsed());
                    }
                    out.push((t, median(times)));
                }
                Ok((used, out))
            })?;
            let formats_used: Vec<String> = results.iter().map(|(u, _)| u.clone()).collect();
            for (t, (med, min)) in &results[0].1 {
                rows.push(MlpRow {
                    format: format.map_or("f32".into(), |f| f.name()),
                    formats_used: formats_used.clone(),
                    world,
                    tokens: *t,
                    median: *med,
                    min: *min,
                });
            }
        }
    }
    Ok(rows)
}

/// One measured read.
#[derive(Debug, Clone)]
pub struct ReadRow {
    /// What was read, and how.
    pub what: String,
    /// Bytes read in total (all ranks).
    pub bytes: u64,
    /// Best wall time over the repetitions.
    pub best: Duration,
}

impl ReadRow {
    /// Throughput in GB/s (10^9 bytes per second).
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.best.as_secs_f64() / 1e9
    }
}

/// Writes a safetensors file with one f32 tensor `[rows, cols]` of pseudo-random bytes,
/// streaming (never holding the whole tensor), via a temporary name and a rename.
///
/// # Errors
/// I/O errors naming the file.
pub fn write_big_safetensors(path: &Path, rows: usize, cols: usize) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let n = rows * cols * 4;
    let mut header =
        format!(r#"{{"w":{{"dtype":"F32","shape":[{rows},{cols}],"data_offsets":[0,{n}]}}}}"#);
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    f.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(header.as_bytes()).map_err(io)?;
    let chunk = 1 << 24;
    let mut buf = vec![0u8; chunk];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut left = n;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            w.copy_from_slice(&state.to_le_bytes());
        }
        let k = left.min(chunk);
        f.write_all(&buf[..k]).map_err(io)?;
        left -= k;
    }
    let f = f.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

fn time_cat(path: &Path) -> Result<Duration> {
    let t0 = Instant::now();
    let status = std::process::Command::new("cat")
        .arg(path)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|source| Error::Io {
            path: PathBuf::from("cat"),
            source,
        })?;
    if !status.success() {
        return Err(Error::Config {
            field: "cat".into(),
            reason: format!("exited with {status}"),
        });
    }
    Ok(t0.elapsed())
}

/// Measures sharded reads of a `size_mib` safetensors file in `dir` against
/// `cat file >/dev/null` on the same (page-cached) file. Each rank opens its own source and
/// reads its shard on its own thread, as separate ranks would.
///
/// # Errors
/// I/O errors, or `cat` missing.
pub fn bench_read(dir: &Path, size_mib: usize, world: usize, reps: usize) -> Result<Vec<ReadRow>> {
    let cols = 4096;
    let rows = size_mib * (1 << 20) / (cols * 4);
    let path = dir.join("shardwise-bench-read.safetensors");
    write_big_safetensors(&path, rows, cols)?;
    let result = (|| {
        let bytes = (rows * cols * 4) as u64;
        time_cat(&path)?; // warm the page cache
        let mut out = Vec::new();
        let best = (0..reps)
            .map(|_| time_cat(&path))
            .collect::<Result<Vec<_>>>()?;
        out.push(ReadRow {
            what: "cat file >/dev/null".into(),
            bytes,
            best: best.into_iter().min().unwrap_or_default(),
        });
        for (label, dim, size) in [("rows (dim 0)", 0usize, rows), ("columns (dim 1)", 1, cols)] {
            let plan = plan_split(
                &SplitSpec {
                    name: "bench",
                    units: size,
                    unit_elems: 1,
                    align: 1,
                },
                world,
            )?;
            let comms = local_comms(world)?;
            let mut best = Duration::MAX;
            for _ in 0..reps {
                let t0 = Instant::now();
                let copied = on_ranks(&comms, |r, _| {
                    let src = SafetensorsSource::open(&path)?;
                    let t = src.read("w", &Shard::range(dim, plan[r].clone()), DType::F32)?;
                    drop(t);
                    Ok(src.bytes_copied())
                })?;
                best = best.min(t0.elapsed());
                if copied.iter().sum::<u64>() != bytes {
                    return Err(Error::Config {
                        field: "bench".into(),
                        reason: format!("ranks copied {copied:?}, expected {bytes} in total"),
                    });
                }
            }
            out.push(ReadRow {
                what: format!("shardwise, {world} ranks, shard {label}"),
                bytes,
                best,
            });
        }
        Ok(out)
    })();
    let _ = std::fs::remove_file(&path);
    result
}
