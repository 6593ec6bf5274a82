//! Mixture-of-experts models and pre-quantized checkpoints against transformers (fixtures from
//! `scripts/setup-fixtures.sh --only moe`): tiny random Qwen3-MoE and Mixtral in per-expert and
//! stacked layouts, packed and fused experts, and FP8 (blockwise, per tensor), MXFP4, GPTQ and
//! AWQ variants against transformers run on their dequantized weights; world sizes 1 to 4
//! (6 heads and 96-wide experts split unevenly; 3 MXFP4 blocks over 4 ranks cut blocks).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::reference::{check_reference, fixtures, json, max_abs, max_abs_diff, rt};
use shardwise::layers::moe::MoeImpl;
use shardwise::quant::IsqType;
use shardwise::runtime::{Cluster, LoadSpec, LocalTransport};

fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn spec(dir: &Path, moe: MoeImpl) -> LoadSpec {
    LoadSpec {
        model: dir.to_path_buf(),
        moe,
        ..Default::default()
    }
}

#[test]
fn moe_models_match_transformers_in_both_layouts_and_expert_forms() {
    for name in [
        "tiny-qwen3-moe",
        "tiny-qwen3-moe-stacked",
        "tiny-mixtral",
        "tiny-mixtral-stacked",
    ] {
        let dir = model(name);
        let reference = dir.join("reference.json");
        let packed = check_reference(
            &format!("{name} packed"),
            &spec(&dir, MoeImpl::Packed),
            &reference,
            1..=4,
        );
        let fused = check_reference(
            &format!("{name} fused"),
            &spec(&dir, MoeImpl::Fused),
            &reference,
            1..=4,
        );
        for (k, (p, f)) in packed.iter().zip(&fused).enumerate() {
            let rel = max_abs_diff(p, f) / max_abs(p);
            assert!(rel <= 1e-5, "{name} case {k}: fused is {rel} from packed");
        }
    }
}

#[test]
fn prequantized_checkpoints_match_their_dequantized_reference() {
    for name in [
        "tiny-qwen3-moe-fp8",
        "tiny-mixtral-fp8-tensor",
        "tiny-qwen3-moe-mxfp4",
        "tiny-qwen3-moe-gptq",
        "tiny-qwen3-moe-awq",
    ] {
        let dir = model(name);
        let reference = dir.join("reference.json");
        // The reference really is the quantized model: its greedy tokens differ from the
        // unquantized one's somewhere.
        let base = json(&dir.join("reference.json"))["base_model"]
            .as_str()
            .unwrap()
            .to_string();
        let ours = json(&reference);
        let theirs = json(&model(&base).join("reference.json"));
        assert!(
            ours["cases"]
                .as_array()
                .unwrap()
                .iter()
                .zip(theirs["cases"].as_array().unwrap())
                .any(|(a, b)| a["greedy_ids"] != b["greedy_ids"]),
            "{name}: the quantized reference equals the base model's"
        );
        let packed = check_reference(name, &spec(&dir, MoeImpl::Packed), &reference, 1..=4);
        let fused = check_reference(
            &format!("{name} fused"),
            &spec(&dir, MoeImpl::Fused),
            &reference,
            1..=2,
        );
        for (k, (p, f)) in packed.iter().zip(&fused).enumerate() {
            let rel = max_abs_diff(p, f) / max_abs(p);
            assert!(rel <= 1e-5, "{name} case {k}: fused is {rel} from packed");
        }
    }
}

#[test]
fn isq_to_fp8_equals_the_reference_quantizer() {
    // tiny-qwen3-moe-fp8 holds tiny-qwen3-moe quantized by the fixture script (torch
    // float8_e4m3fn, 32x32 blocks, amax / 448 scales): the same blocks and formula as ISQ
    // FP8, computed independently, so ISQ must reproduce that model's reference. One rank
    // only: this model's 16-wide KV heads put every split of k/v inside a 32-block, where a
    // rank quantizes its own part (tests/uqff.rs checks whole-block splits across ranks).
    let dir = model("tiny-qwen3-moe");
    let fp8 = LoadSpec {
        isq: Some(IsqType::Fp8),
        ..spec(&dir, MoeImpl::Packed)
    };
    let reference = model("tiny-qwen3-moe-fp8").join("reference.json");
    check_reference("tiny-qwen3-moe ISQ fp8", &fp8, &reference, 1..=1);
}

/// A copy of fixture `name` in `tmp`, its config changed by `cfg` and its tensors by `tensors`.
fn altered(
    tmp: &Path,
    name: &str,
    cfg: impl FnOnce(&mut serde_json::Value),
    tensors: impl FnOnce(&mut HashMap<String, Tensor>),
) -> PathBuf {
    let src = model(name);
    let dst = tmp.join(format!("{name}-{}", rand_suffix()));
    std::fs::create_dir(&dst).unwrap();
    let mut c = json(&src.join("config.json"));
    cfg(&mut c);
    std::fs::write(dst.join("config.json"), c.to_string()).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    tensors(&mut t);
    candle_core::safetensors::save(&t, dst.join("model.safetensors")).unwrap();
    dst
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn load_err(dir: &Path, world: usize) -> String {
    rt().block_on(async {
        let c = Cluster::local(world, LocalTransport::InProcess)
            .await
            .unwrap();
        let e = c
            .load(spec(dir, MoeImpl::Packed))
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        let _ = c.shutdown().await;
        e
    })
}

#[test]
fn bad_quantized_checkpoints_give_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let q = "model.layers.0.self_attn.q_proj";
    // FP8 without its scales.
    let d = altered(
        tmp.path(),
        "tiny-qwen3-moe-fp8",
        |_| {},
        |t| {
            t.remove(&format!("{q}.weight_scale_inv"));
        },
    );
    let e = load_err(&d, 2);
    assert!(
        e.contains(&format!("{q}.weight_scale_inv")) && e.contains("scales"),
        "{e}"
    );
    // A block size the scales do not match.
    let d = altered(
        tmp.path(),
        "tiny-qwen3-moe-fp8",
        |c| c["quantization_config"]["weight_block_size"] = serde_json::json!([16, 16]),
        |_| {},
    );
    let e = load_err(&d, 2);
    assert!(
        e.contains("weight_scale_inv") && e.contains("[16, 16]"),
        "{e}"
    );
    // A group size no split can align to, and one the scales contradict.
    let d = altered(
        tmp.path(),
        "tiny-qwen3-moe-gptq",
        |c| c["quantization_config"]["group_size"] = 12.into(),
        |_| {},
    );
    let e = load_err(&d, 2);
    assert!(e.contains("group_size") && e.contains("align"), "{e}");
    let d = altered(
        tmp.path(),
        "tiny-qwen3-moe-gptq",
        |c| c["quantization_config"]["group_size"] = 32.into(),
        |_| {},
    );
    let e = load_err(&d, 2);
    assert!(e.contains(q) && e.contains("group_size 32"), "{e}");
    // Missing zero points.
    let d = altered(
        tmp.path(),
        "tiny-qwen3-moe-awq",
        |_| {},
        |t| {
            t.remove(&format!("{q}.qzeros"));
        },
    );
    let e = load_err(&d, 2);
    assert!(e.contains(&format!("{q}.qzeros")), "{e}");
    // An unknown method and an unsupported width.
    let d = altered(
        tmp.path(),
        "tiny-qwen3-moe-gptq",
        |c| c["quantization_config"]["bits"] = 3.into(),
        |_| {},
    );
    let e = load_err(&d, 1);
    assert!(e.contains("bits") && e.contains("not supported"), "{e}");
    let d = altered(
        tmp.path(),
        "tiny-qwen3-moe",
        |c| c["quantization_config"] = serde_json::json!({"quant_method": "bitsandbytes"}),
        |_| {},
    );
    let e = load_err(&d, 1);
    assert!(e.contains("bitsandbytes"), "{e}");
    // Stacked experts of the wrong shape.
    let d = altered(
        tmp.path(),
        "tiny-qwen3-moe-stacked",
        |_| {},
        |t| {
            let k = "model.layers.0.mlp.experts.down_proj";
            let v = t[k].narrow(2, 0, 64).unwrap();
            t.insert(k.into(), v);
        },
    );
    let e = load_err(&d, 1);
    assert!(
        e.contains("gate_up_proj") && e.contains("fit neither"),
        "{e}"
    );
}
