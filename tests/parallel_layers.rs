//! Tensor-parallel layers against the unsharded layer in float64, for world sizes 1..=5,
//! random shapes and fresh random weights every run; ISQ at every GGML type; LoRA merge.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};
use common::*;
use proptest::prelude::*;
use shardwise::layers::attention::{expand_kv, AttentionDims};
use shardwise::layers::lora::LoraSet;
use shardwise::layers::{AttentionProjections, Mlp};
use shardwise::quant::isq::GGML_TYPES;
use shardwise::quant::{IsqType, QuantConfig};
use shardwise::weights::{SafetensorsSource, WeightSource};

const F32: QuantConfig = QuantConfig::Unquantized { dtype: DType::F32 };

/// Writes a random attention block and checks every rank's q/k/v slices and the all-reduced
/// o projection against float64 on the full weights.
fn check_attention(dims: AttentionDims, world: usize, tokens: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("attn.safetensors");
    let (h, hd) = (dims.hidden, dims.head_dim);
    let mut t = HashMap::new();
    let q_out = dims.n_heads * hd;
    let kv_out = dims.n_kv_heads * hd;
    for (n, out, inp) in [
        ("q_proj", q_out, h),
        ("k_proj", kv_out, h),
        ("v_proj", kv_out, h),
        ("o_proj", h, q_out),
    ] {
        t.insert(format!("blk.{n}.weight"), rand_tensor(&[out, inp], 0.5));
        let with_bias = if n == "o_proj" {
            dims.o_bias
        } else {
            dims.qkv_bias
        };
        if with_bias {
            t.insert(format!("blk.{n}.bias"), rand_tensor(&[out], 0.5));
        }
    }
    save(&t, &path);
    let x = rand_tensor(&[tokens, h], 1.0);
    let attn_in = rand_tensor(&[tokens, q_out], 1.0);
    let get = |n: &str| t.get(n);
    let q_ref = linear64(&x, &t["blk.q_proj.weight"], get("blk.q_proj.bias"));
    let k_ref = linear64(&x, &t["blk.k_proj.weight"], get("blk.k_proj.bias"));
    let v_ref = linear64(&x, &t["blk.v_proj.weight"], get("blk.v_proj.bias"));
    let o_ref = linear64(&attn_in, &t["blk.o_proj.weight"], get("blk.o_proj.bias"));
    let src = SafetensorsSource::open(&path).unwrap();
    let outs = run_ranks(world, |comm| {
        let a = AttentionProjections::load("blk", dims, &F32, &src, comm, 1, None)?;
        let (q, k, v) = a.qkv(&x)?;
        let qh = &a.heads.q_heads;
        let o = a.o(&cols(&attn_in, qh.start * hd, qh.end * hd))?;
        Ok((a.heads.clone(), q, k, v, o))
    });
    let mut covered = 0;
    for (heads, q, k, v, o) in &outs {
        let (qh, kh) = (&heads.q_heads, &heads.kv_heads);
        assert_eq!(qh.start, covered);
        covered = qh.end;
        let tol = 1e-5;
        assert!(rel_err(q, &cols(&q_ref, qh.start * hd, qh.end * hd)) < tol);
        assert!(rel_err(k, &cols(&k_ref, kh.start * hd, kh.end * hd)) < tol);
        assert!(rel_err(v, &cols(&v_ref, kh.start * hd, kh.end * hd)) < tol);
        let e = rel_err(o, &o_ref);
        assert!(e < tol, "o_proj world {world}: rel err {e}");
        // Every local query head must see the KV head its global index maps to.
        let kv4 = k
            .reshape((1, tokens, kh.len(), hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let expanded = expand_kv(&kv4, heads).unwrap();
        for (i, qhead) in qh.clone().enumerate() {
            let g = qhead / (dims.n_heads / dims.n_kv_heads);
            let want = cols(&k_ref, g * hd, (g + 1) * hd);
            let got = expanded.get(0).unwrap().get(i).unwrap();
            assert!(rel_err(&got, &want) < tol);
        }
    }
    assert_eq!(covered, dims.n_heads);
}

fn write_mlp(
    hidden: usize,
    inter: usize,
    packed: bool,
) -> (tempfile::TempDir, HashMap<String, Tensor>) {
    let dir = tempfile::tempdir().unwrap();
    let mut t = HashMap::new();
    let gate = rand_tensor(&[inter, hidden], 0.5);
    let up = rand_tensor(&[inter, hidden], 0.5);
    t.insert(
        "mlp.down_proj.weight".to_string(),
        rand_tensor(&[hidden, inter], 0.5),
    );
    let mut file = t.clone();
    if packed {
        file.insert(
            "mlp.gate_up_proj.weight".into(),
            Tensor::cat(&[&gate, &up], 0).unwrap(),
        );
    } else {
        file.insert("mlp.gate_proj.weight".into(), gate.clone());
        file.insert("mlp.up_proj.weight".into(), up.clone());
    }
    save(&file, &dir.path().join("mlp.safetensors"));
    t.insert("mlp.gate_proj.weight".into(), gate);
    t.insert("mlp.up_proj.weight".into(), up);
    (dir, t)
}

fn mlp_ref(x: &Tensor, t: &HashMap<String, Tensor>) -> Tensor {
    let g = linear64(x, &t["mlp.gate_proj.weight"], None);
    let u = linear64(x, &t["mlp.up_proj.weight"], None);
    linear64(&(silu64(&g) * u).unwrap(), &t["mlp.down_proj.weight"], None)
}

fn check_mlp(hidden: usize, inter: usize, world: usize, tokens: usize, packed: bool) {
    let (dir, t) = write_mlp(hidden, inter, packed);
    let src = SafetensorsSource::open(&dir.path().join("mlp.safetensors")).unwrap();
    let x = rand_tensor(&[tokens, hidden], 1.0);
    let reference = mlp_ref(&x, &t);
    let outs = run_ranks(world, |comm| {
        Mlp::load("mlp", hidden, inter, &F32, &src, comm, 1, None)?.forward(&x)
    });
    for (r, y) in outs.iter().enumerate() {
        let e = rel_err(y, &reference);
        assert!(
            e < 1e-5,
            "mlp {hidden}x{inter} world {world} rank {r}: rel err {e}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn attention_projections_match_one_rank(
        n_kv in 1usize..5, group in 1usize..5, hd_pow in 2u32..5, hidden in 4usize..48,
        world in 1usize..=5, tokens in 1usize..4, qkv_bias: bool, o_bias: bool,
    ) {
        let dims = AttentionDims {
            hidden, n_heads: n_kv * group, n_kv_heads: n_kv, head_dim: 1 << hd_pow, qkv_bias, o_bias,
        };
        prop_assume!(world <= dims.n_heads);
        check_attention(dims, world, tokens);
    }

    #[test]
    fn swiglu_mlp_matches_one_rank(
        hidden in 1usize..64, inter in 1usize..300, world in 1usize..=5, tokens in 1usize..4, packed: bool,
    ) {
        prop_assume!(world <= inter);
        check_mlp(hidden, inter, world, tokens, packed);
    }
}

fn dims(n_heads: usize, n_kv: usize) -> AttentionDims {
    AttentionDims {
        hidden: 64,
        n_heads,
        n_kv_heads: n_kv,
        head_dim: 16,
        qkv_bias: true,
        o_bias: true,
    }
}

#[test]
fn uneven_head_splits() {
    check_attention(dims(9, 3), 2, 3);
    check_attention(dims(9, 3), 4, 3);
    check_attention(dims(6, 2), 3, 2);
}

#[test]
fn uneven_intermediate_split() {
    check_mlp(32, 200, 3, 2, false);
    check_mlp(32, 200, 3, 2, true);
}

/// Relative RMS error bound of a quantized MLP against f32, per type: a few times what the
/// format's bits give on uniform random weights, and far below the error of a wrong layer.
fn isq_bound(t: GgmlDType) -> f64 {
    use GgmlDType::*;
    match t {
        Q8_0 | Q8_1 | Q8K => 0.02,
        Q6K => 0.04,
        Q5_0 | Q5_1 | Q5K => 0.08,
        Q4_0 | Q4_1 | Q4K => 0.15,
        Q3K => 0.3,
        Q2K => 0.6,
        _ => 0.0,
    }
}

#[test]
fn isq_every_type_tp_matches_single_rank_quantized() {
    // 256-aligned everywhere: hidden 256, intermediate 768 split in 256-blocks (512 + 256
    // over 2 ranks, 256 each over 3), so TP blocks are exactly the single-rank blocks.
    let (hidden, inter) = (256, 768);
    let (dir, t) = write_mlp(hidden, inter, false);
    let src = SafetensorsSource::open(&dir.path().join("mlp.safetensors")).unwrap();
    let x = rand_tensor(&[3, hidden], 1.0);
    let reference = mlp_ref(&x, &t);
    for ty in GGML_TYPES {
        let isq = IsqType::Ggml(ty);
        let run = |world: usize| {
            run_ranks(world, |comm| {
                let mut mlp = Mlp::load("mlp", hidden, inter, &F32, &src, comm, 256, None)?;
                mlp.apply_isq(isq)?;
                let formats: Vec<String> = mlp.down.parts().iter().map(|p| p.format()).collect();
                Ok((mlp.forward(&x)?, formats))
            })
        };
        let single = run(1);
        let (y1, f1) = &single[0];
        assert_eq!(
            f1,
            &vec![isq.name()],
            "{ty:?}: single rank did not quantize"
        );
        let e = rms_rel_err(y1, &reference);
        assert!(e < isq_bound(ty), "{ty:?} vs f32: rms rel err {e}");
        assert!(
            e > 1e-7,
            "{ty:?}: output identical to f32, quantization did not happen"
        );
        for world in [2, 3] {
            for (r, (y, f)) in run(world).iter().enumerate() {
                assert_eq!(f, &vec![isq.name()], "{ty:?} world {world} rank {r}");
                let e = rel_err(y, y1);
                assert!(
                    e < 1e-5,
                    "{ty:?} world {world} rank {r}: {e} vs single-rank"
                );
            }
        }
    }
}

#[test]
fn isq_falls_back_when_shard_is_not_block_aligned() {
    // intermediate 384 over 2 ranks with no alignment asked: 192 + 192 columns of down_proj,
    // which 256-wide k-quant blocks cannot cover: Q4K falls back to Q4_1 on each rank.
    let (hidden, inter) = (256, 384);
    let (dir, t) = write_mlp(hidden, inter, false);
    let src = SafetensorsSource::open(&dir.path().join("mlp.safetensors")).unwrap();
    let x = rand_tensor(&[2, hidden], 1.0);
    let reference = mlp_ref(&x, &t);
    let outs = run_ranks(2, |comm| {
        let mut mlp = Mlp::load("mlp", hidden, inter, &F32, &src, comm, 1, None)?;
        mlp.apply_isq(IsqType::Ggml(GgmlDType::Q4K))?;
        let down = mlp.down.parts()[0].format();
        let gate = mlp.gate_up.parts()[0].format();
        Ok((mlp.forward(&x)?, down, gate))
    });
    for (y, down, gate) in outs {
        assert_eq!(down, "q4_1");
        assert_eq!(gate, "q4k");
        assert!(rms_rel_err(&y, &reference) < isq_bound(GgmlDType::Q4K));
    }
}

#[test]
fn lora_delta_merged_and_sharded_with_weight() {
    let (hidden, inter, r, alpha) = (48, 90, 4, 8.0);
    let (dir, t) = write_mlp(hidden, inter, false);
    let src = SafetensorsSource::open(&dir.path().join("mlp.safetensors")).unwrap();
    let mut adapters = HashMap::new();
    let mut merged = t.clone();
    for (proj, out, inp) in [("gate_proj", inter, hidden), ("down_proj", hidden, inter)] {
        let a = rand_tensor(&[r, inp], 0.3);
        let b = rand_tensor(&[out, r], 0.3);
        let delta = (b.matmul(&a).unwrap() * (alpha / r as f64)).unwrap();
        let key = format!("mlp.{proj}.weight");
        merged.insert(key.clone(), (&t[&key] + delta).unwrap());
        adapters.insert(format!("base_model.model.mlp.{proj}.lora_A.weight"), a);
        adapters.insert(format!("base_model.model.mlp.{proj}.lora_B.weight"), b);
    }
    let lora_path = dir.path().join("adapter_model.safetensors");
    save(&adapters, &lora_path);
    let lora = LoraSet {
        source: Arc::new(SafetensorsSource::open(&lora_path).unwrap()),
        prefix: "base_model.model.".into(),
        scale: alpha / r as f64,
    };
    let x = rand_tensor(&[2, hidden], 1.0);
    let reference = mlp_ref(&x, &merged);
    let base = mlp_ref(&x, &t);
    assert!(
        rel_err(&base, &reference) > 1e-2,
        "adapter too small to detect"
    );
    for world in [1, 2, 3] {
        for y in run_ranks(world, |comm| {
            Mlp::load("mlp", hidden, inter, &F32, &src, comm, 1, Some(&lora))?.forward(&x)
        }) {
            assert!(rel_err(&y, &reference) < 1e-5, "world {world}");
        }
    }
}

#[test]
fn source_reports_only_shard_bytes_for_layers() {
    let (dir, _) = write_mlp(64, 120, false);
    let src = SafetensorsSource::open(&dir.path().join("mlp.safetensors")).unwrap();
    let srcs: Vec<_> = (0..3)
        .map(|_| SafetensorsSource::open(&dir.path().join("mlp.safetensors")).unwrap())
        .collect();
    run_ranks(3, |comm| {
        let r = comm.rank();
        Mlp::load("mlp", 64, 120, &F32, &srcs[r], comm, 1, None).map(|_| ())
    });
    // Each rank copied a third of the three 64x120 f32 matrices; together, exactly once.
    let total: u64 = srcs.iter().map(|s| s.bytes_copied()).sum();
    assert_eq!(total, 3 * 64 * 120 * 4);
    assert_eq!(src.bytes_copied(), 0);
}

#[test]
fn column_gather_and_replicated_match_one_rank() {
    use shardwise::layers::{ParallelLinear, Piece, Reduce};
    use shardwise::shard::{plan_split, Shard, SplitSpec};
    let (out, inp) = (101, 40);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("head.safetensors");
    let w = rand_tensor(&[out, inp], 0.5);
    let b = rand_tensor(&[out], 0.5);
    save(
        &HashMap::from([
            ("lm_head.weight".to_string(), w.clone()),
            ("lm_head.bias".to_string(), b.clone()),
        ]),
        &path,
    );
    let src = SafetensorsSource::open(&path).unwrap();
    let x = rand_tensor(&[3, inp], 1.0);
    let reference = linear64(&x, &w, Some(&b));
    for world in 1..=5 {
        let plan = plan_split(
            &SplitSpec {
                name: "vocab",
                units: out,
                unit_elems: 1,
                align: 1,
            },
            world,
        )
        .unwrap();
        for y in run_ranks(world, |comm| {
            let r = comm.rank();
            let gathered = ParallelLinear::load(
                "lm_head",
                &F32,
                &src,
                &[Piece::new(
                    "lm_head",
                    out,
                    inp,
                    Shard::range(0, plan[r].clone()),
                )],
                true,
                Reduce::AllGather,
                comm.clone(),
            )?;
            let replicated = ParallelLinear::load(
                "lm_head",
                &F32,
                &src,
                &[Piece::new("lm_head", out, inp, Shard::full())],
                true,
                Reduce::None,
                comm,
            )?;
            Ok((gathered.forward(&x)?, replicated.forward(&x)?))
        }) {
            assert!(rel_err(&y.0, &reference) < 1e-5, "gathered, world {world}");
            assert!(
                rel_err(&y.1, &reference) < 1e-5,
                "replicated, world {world}"
            );
        }
    }
}
