//! Shards a SwiGLU MLP over in-process ranks and prints the largest difference from the same
//! MLP on one rank, for every world size up to `--max-world`.
//!
//! `cargo run --release --example tp_mlp -- --hidden 576 --intermediate 1536 --isq q4k --transport grpc`
//!
//! Weights are random and written to a temporary safetensors file, so the run exercises the
//! same sharded-read path as a real checkpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use shardwise::comm::select::{in_process_group, TransportChoice};
use shardwise::comm::{suite::on_ranks, Communicator};
use shardwise::layers::Mlp;
use shardwise::quant::{IsqType, QuantConfig};
use shardwise::weights::{SafetensorsSource, WeightSource};

#[derive(Parser)]
struct Args {
    /// Model width (SmolLM2-135M: 576).
    #[arg(long, default_value_t = 576)]
    hidden: usize,
    /// MLP width (SmolLM2-135M: 1536).
    #[arg(long, default_value_t = 1536)]
    intermediate: usize,
    /// Largest world size to run.
    #[arg(long, default_value_t = 5)]
    max_world: usize,
    /// Tokens in the input.
    #[arg(long, default_value_t = 4)]
    tokens: usize,
    /// Quantize after loading (q4_0 … q8k); the one-rank reference is quantized the same way.
    #[arg(long)]
    isq: Option<IsqType>,
    /// Collectives between the ranks: local (threads), grpc (real loopback sockets, token
    /// handshake) or shm (a real /dev/shm group).
    #[arg(long, default_value = "local")]
    transport: String,
}

fn run_world(
    world: usize,
    args: &Args,
    src: &dyn WeightSource,
    x: &Tensor,
) -> shardwise::Result<(Vec<Tensor>, Vec<String>)> {
    let choice = match args.transport.as_str() {
        "local" => TransportChoice::Auto,
        other => other.parse()?,
    };
    let token = format!("tp-mlp-{}", std::process::id());
    let comms: Vec<Arc<dyn Communicator>> = in_process_group(world, choice, &token)?;
    let align = args.isq.map_or(1, |t| t.block_size());
    let quant = QuantConfig::Unquantized { dtype: DType::F32 };
    let outs = on_ranks(&comms, |r, _| {
        let mut mlp = Mlp::load(
            "mlp",
            args.hidden,
            args.intermediate,
            &quant,
            src,
            comms[r].clone(),
            align,
            None,
        )?;
        if let Some(t) = args.isq {
            mlp.apply_isq(t)?;
        }
        let fmt = mlp.down.parts()[0].format();
        let cols = mlp.down.parts()[0].shape().1;
        Ok((mlp.forward(x)?, format!("{cols} cols {fmt}")))
    })?;
    Ok(outs.into_iter().unzip())
}

fn main() -> shardwise::Result<()> {
    let args = Args::parse();
    shardwise::init_logging();
    let dev = Device::Cpu;
    let (h, i) = (args.hidden, args.intermediate);
    let dir = std::env::temp_dir().join(format!("shardwise-tp-mlp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| shardwise::Error::Io {
        path: dir.clone(),
        source,
    })?;
    let path = dir.join("mlp.safetensors");
    let scale = (1.0 / h as f64).sqrt() as f32;
    let tensors: HashMap<String, Tensor> = [
        ("mlp.gate_proj.weight", (i, h)),
        ("mlp.up_proj.weight", (i, h)),
        ("mlp.down_proj.weight", (h, i)),
    ]
    .into_iter()
    .map(|(n, s)| Ok((n.to_string(), Tensor::randn(0f32, scale, s, &dev)?)))
    .collect::<shardwise::Result<_>>()?;
    candle_core::safetensors::save(&tensors, &path)?;
    let src = SafetensorsSource::open(&path)?;
    let x = Tensor::randn(0f32, 1.0, (args.tokens, h), &dev)?;
    let (reference, _) = run_world(1, &args, &src, &x)?;
    let scale = reference[0].abs()?.max_all()?.to_scalar::<f32>()?;
    println!(
        "SwiGLU MLP {h}x{i}, {} tokens, {}, {} collectives; reference: 1 rank (max |y| = {scale:.4})",
        args.tokens,
        args.isq.map_or("f32".to_string(), |t| format!("ISQ {t}")),
        args.transport,
    );
    for world in 2..=args.max_world {
        let t0 = Instant::now();
        let (outs, shards) = run_world(world, &args, &src, &x)?;
        let mut worst = 0f32;
        for y in &outs {
            let d = (y - &reference[0])?.abs()?.max_all()?.to_scalar::<f32>()?;
            worst = worst.max(d);
        }
        println!(
            "world {world}: max |diff| vs 1 rank = {worst:.3e} (relative {:.3e}); down_proj shards: [{}]; {:.0} ms",
            worst / scale,
            shards.join(", "),
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
