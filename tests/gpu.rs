//! CUDA ranks with NCCL (built with `--features cuda`, run on the GPU machine by
//! `scripts/gpu-run.sh`): the tiny transformers fixtures on GPUs at one and two ranks against
//! the same references the CPU tests use (f32: logits within 1e-3, identical greedy tokens),
//! and bf16 at two ranks against one within bf16 tolerance.
#![cfg(feature = "cuda")]

mod common;

use candle_core::DType;
use common::reference::{all_logits, check_reference_on, fixtures, max_abs, max_abs_diff, rt};
use shardwise::runtime::{Cluster, LoadSpec, LocalTransport};

fn gpus() -> usize {
    candle_core::utils::cuda_is_available()
        .then(|| {
            (0..8)
                .take_while(|&i| candle_core::Device::new_cuda(i).is_ok())
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn tiny_models_on_gpus_match_transformers() {
    let world = gpus().min(2);
    assert!(world >= 1, "no CUDA device");
    for name in [
        "tiny-llama",
        "tiny-qwen3",
        "tiny-qwen2",
        "tiny-mistral",
        "tiny-qwen3-moe",
    ] {
        let dir = fixtures().join("models").join(name);
        let spec = LoadSpec {
            model: dir.clone(),
            dtype: Some(DType::F32),
            ..Default::default()
        };
        check_reference_on(
            &format!("{name} on GPU"),
            &spec,
            &dir.join("reference.json"),
            1..=world,
            LocalTransport::Nccl,
        );
    }
}

#[test]
fn bf16_two_gpus_match_one_within_bf16_tolerance() {
    if gpus() < 2 {
        eprintln!("skipped: one GPU");
        return;
    }
    let dir = fixtures().join("models").join("tiny-llama");
    let run = |world: usize| {
        rt().block_on(async {
            let c = Cluster::local(world, LocalTransport::Nccl).await.unwrap();
            c.load(LoadSpec {
                model: dir.clone(),
                dtype: Some(DType::BF16),
                ..Default::default()
            })
            .await
            .unwrap();
            let l = all_logits(&c, &[1, 17, 200, 45, 3, 99, 128, 7, 64, 12]).await;
            c.shutdown().await.unwrap();
            l
        })
    };
    let (one, two) = (run(1), run(2));
    let rel = max_abs_diff(&one, &two) / max_abs(&one);
    // bf16 keeps 8 bits of mantissa (2^-8 = 0.4%); two ranks sum in another order.
    assert!(rel <= 2e-2, "two GPUs are {rel} from one in bf16");
    eprintln!("bf16: two GPUs are {rel} (relative) from one");
}
