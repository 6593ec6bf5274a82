//! Weight sources: shard-only reads, dtype conversion, indexed checkpoints, GGUF blocks, and
//! named errors for bad input.

mod common;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::*;
use shardwise::comm::{Communicator, LocalComm};
use shardwise::layers::{Mlp, ParallelLinear, Piece, Reduce};
use shardwise::quant::QuantConfig;
use shardwise::shard::{plan_split, Shard, SplitSpec};
use shardwise::weights::{self, GgufSource, SafetensorsSource, WeightSource};
use shardwise::Error;

fn one_comm() -> Arc<dyn Communicator> {
    Arc::new(LocalComm::group(1).unwrap().pop().unwrap())
}

/// Byte offset of a tensor's data inside a safetensors file, read from the header with
/// serde_json (independent of the reader under test).
fn data_offset(path: &std::path::Path, name: &str) -> usize {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize
}

#[test]
fn shard_read_copies_only_the_shard_and_ignores_poisoned_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let (rows, ncols) = (37, 53);
    let w = rand_tensor(&[rows, ncols], 1.0);
    save(&HashMap::from([("w".to_string(), w.clone())]), &path);
    let start = data_offset(&path, "w");
    for (dim, offset, len) in [(0usize, 5usize, 11usize), (1, 17, 20)] {
        // Poison every element outside the shard with NaN.
        let mut f = OpenOptions::new().write(true).open(&path).unwrap();
        for r in 0..rows {
            for c in 0..ncols {
                let idx = if dim == 0 { r } else { c };
                if idx < offset || idx >= offset + len {
                    f.seek(SeekFrom::Start((start + (r * ncols + c) * 4) as u64))
                        .unwrap();
                    f.write_all(&f32::NAN.to_le_bytes()).unwrap();
                }
            }
        }
        drop(f);
        let src = SafetensorsSource::open(&path).unwrap();
        let got = src
            .read("w", &Shard::Offset { dim, offset, len }, DType::F32)
            .unwrap();
        assert_eq!(rel_err(&got, &w.narrow(dim, offset, len).unwrap()), 0.0);
        let other = if dim == 0 { ncols } else { rows };
        assert_eq!(src.bytes_copied(), (len * other * 4) as u64);
        // The untouched file region still reads back; restore for the next case.
        save(&HashMap::from([("w".to_string(), w.clone())]), &path);
    }
}

#[test]
fn dtype_conversions_match_independent_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.safetensors");
    let w = rand_tensor(&[8, 24], 4.0);
    let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bf: Vec<f32> = v
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    let hf: Vec<f32> = v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
    let f8: Vec<f32> = v
        .iter()
        .map(|&x| float8::F8E4M3::from_f32(x).to_f32())
        .collect();
    save(
        &HashMap::from([
            ("f32".to_string(), w.clone()),
            ("bf16".to_string(), w.to_dtype(DType::BF16).unwrap()),
            ("f16".to_string(), w.to_dtype(DType::F16).unwrap()),
            ("f8".to_string(), w.to_dtype(DType::F8E4M3).unwrap()),
        ]),
        &path,
    );
    let src = SafetensorsSource::open(&path).unwrap();
    let shard = Shard::Offset {
        dim: 1,
        offset: 3,
        len: 13,
    };
    let want = |full: &[f32]| -> Vec<f32> {
        (0..8)
            .flat_map(|r| full[r * 24 + 3..r * 24 + 16].to_vec())
            .collect()
    };
    for (name, reference) in [("bf16", &bf), ("f16", &hf), ("f8", &f8), ("f32", &v)] {
        let got = src.read(name, &shard, DType::F32).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want(reference),
            "{name}"
        );
    }
    // And the other way: f32 read as bf16 / f8e4m3 rounds like the reference.
    let got = src.read("f32", &Shard::full(), DType::BF16).unwrap();
    assert_eq!(
        got.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        bf
    );
    let got = src.read("f32", &Shard::full(), DType::F8E4M3).unwrap();
    assert_eq!(
        got.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        f8
    );
}

#[test]
fn indexed_checkpoint_resolves_tensors_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = rand_tensor(&[4, 6], 1.0);
    let b = rand_tensor(&[6, 4], 1.0);
    save(
        &HashMap::from([("a".to_string(), a.clone())]),
        &dir.path().join("m-1.safetensors"),
    );
    save(
        &HashMap::from([("b".to_string(), b.clone())]),
        &dir.path().join("m-2.safetensors"),
    );
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}"#,
    )
    .unwrap();
    let src = weights::open(dir.path()).unwrap();
    assert_eq!(src.names(), vec!["a", "b"]);
    let got = src
        .read(
            "b",
            &Shard::Simple {
                dim: 0,
                rank: 1,
                world_size: 2,
            },
            DType::F32,
        )
        .unwrap();
    assert_eq!(rel_err(&got, &b.narrow(0, 3, 3).unwrap()), 0.0);
    assert!(src.meta("b").unwrap().file.ends_with("m-2.safetensors"));
}

#[test]
fn gguf_shards_stay_quantized_on_block_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let q4k = QTensor::quantize(&rand_tensor(&[12, 512], 1.0), GgmlDType::Q4K).unwrap();
    let q8 = QTensor::quantize(&rand_tensor(&[10, 96], 1.0), GgmlDType::Q8_0).unwrap();
    let f32t = QTensor::quantize(&rand_tensor(&[7], 1.0), GgmlDType::F32).unwrap();
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[], &[("q4k", &q4k), ("q8", &q8), ("norm", &f32t)]).unwrap();
    drop(f);
    let full_q4k = q4k.dequantize(&Device::Cpu).unwrap();
    let full_q8 = q8.dequantize(&Device::Cpu).unwrap();
    let src = GgufSource::open(&path).unwrap();
    // Row shard: always block-aligned.
    let s = Shard::Offset {
        dim: 0,
        offset: 5,
        len: 4,
    };
    let q = src
        .read_quantized("q4k", &s)
        .unwrap()
        .expect("row shard stays quantized");
    assert_eq!(q.dtype(), GgmlDType::Q4K);
    assert_eq!(
        rel_err(
            &q.dequantize(&Device::Cpu).unwrap(),
            &full_q4k.narrow(0, 5, 4).unwrap()
        ),
        0.0
    );
    // Column shard on a block boundary stays quantized; inside a block it does not.
    let s = Shard::Offset {
        dim: 1,
        offset: 256,
        len: 256,
    };
    let q = src
        .read_quantized("q4k", &s)
        .unwrap()
        .expect("aligned column shard");
    assert_eq!(
        rel_err(
            &q.dequantize(&Device::Cpu).unwrap(),
            &full_q4k.narrow(1, 256, 256).unwrap()
        ),
        0.0
    );
    let s = Shard::Offset {
        dim: 1,
        offset: 32,
        len: 40,
    };
    assert!(src.read_quantized("q8", &s).unwrap().is_none());
    let d = src.read("q8", &s, DType::F32).unwrap();
    assert_eq!(rel_err(&d, &full_q8.narrow(1, 32, 40).unwrap()), 0.0);
    // Dense tensors in GGUF read as dense.
    assert!(src
        .read_quantized("norm", &Shard::full())
        .unwrap()
        .is_none());
    let n = src
        .read(
            "norm",
            &Shard::Offset {
                dim: 0,
                offset: 2,
                len: 3,
            },
            DType::F32,
        )
        .unwrap();
    assert_eq!(n.dims(), [3]);
    // A column-parallel layer loaded with QuantConfig::Ggml keeps the blocks.
    let layer = ParallelLinear::load(
        "q4k_layer",
        &QuantConfig::Ggml,
        &RenamedWeight {
            inner: &src,
            from: "q4k",
        },
        &[Piece::new(
            "lin",
            12,
            512,
            Shard::Offset {
                dim: 0,
                offset: 0,
                len: 6,
            },
        )],
        false,
        Reduce::None,
        one_comm(),
    )
    .unwrap();
    assert_eq!(layer.parts()[0].format(), "q4k");
}

/// Serves `{from}` as `lin.weight`, to load a GGUF tensor under HF-style names.
#[derive(Debug)]
struct RenamedWeight<'a> {
    inner: &'a GgufSource,
    from: &'a str,
}

impl RenamedWeight<'_> {
    fn map(&self, name: &str) -> String {
        if name == "lin.weight" {
            self.from.to_string()
        } else {
            name.to_string()
        }
    }
}

impl WeightSource for RenamedWeight<'_> {
    fn location(&self) -> &std::path::Path {
        self.inner.location()
    }
    fn names(&self) -> Vec<String> {
        vec!["lin.weight".into()]
    }
    fn meta(&self, name: &str) -> shardwise::Result<weights::TensorMeta> {
        self.inner.meta(&self.map(name))
    }
    fn read(&self, name: &str, shard: &Shard, dtype: DType) -> shardwise::Result<Tensor> {
        self.inner.read(&self.map(name), shard, dtype)
    }
    fn read_quantized(&self, name: &str, shard: &Shard) -> shardwise::Result<Option<QTensor>> {
        self.inner.read_quantized(&self.map(name), shard)
    }
    fn bytes_copied(&self) -> u64 {
        self.inner.bytes_copied()
    }
}

#[test]
fn bad_input_gives_named_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    save(
        &HashMap::from([
            (
                "mlp.gate_proj.weight".to_string(),
                rand_tensor(&[20, 8], 1.0),
            ),
            ("mlp.up_proj.weight".to_string(), rand_tensor(&[20, 9], 1.0)),
            (
                "ids".to_string(),
                Tensor::new(&[1i64, 2, 3], &Device::Cpu).unwrap(),
            ),
        ]),
        &path,
    );
    let src = SafetensorsSource::open(&path).unwrap();
    let f32c = QuantConfig::Unquantized { dtype: DType::F32 };
    let file = path.display().to_string();

    let e = src.read("nope", &Shard::full(), DType::F32).unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }));
    assert!(
        e.to_string().contains(&file) && e.to_string().contains("`nope`"),
        "{e}"
    );

    let e = src.read("ids", &Shard::full(), DType::F32).unwrap_err();
    assert!(matches!(e, Error::DtypeMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("I64") && e.to_string().contains("`ids`"),
        "{e}"
    );

    let e = src.read(
        "mlp.gate_proj.weight",
        &Shard::Simple {
            dim: 0,
            rank: 0,
            world_size: 3,
        },
        DType::F32,
    );
    assert!(e
        .unwrap_err()
        .to_string()
        .contains("not divisible by world size 3"));

    // up_proj is [20, 9] where the model expects [20, 8]; down_proj is absent.
    let e = Mlp::load("mlp", 8, 20, &f32c, &src, one_comm(), 1, None).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("mlp.up_proj.weight") && msg.contains("[20, 9]") && msg.contains("[20, 8]"),
        "{msg}"
    );

    let e = plan_split(
        &SplitSpec {
            name: "intermediate_size",
            units: 200,
            unit_elems: 1,
            align: 256,
        },
        3,
    )
    .unwrap_err();
    assert!(matches!(
        e,
        Error::NoPlan {
            size: 200,
            world_size: 3,
            align: 256,
            ..
        }
    ));

    // A truncated file is a named error, not a panic.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = SafetensorsSource::open(&cut).unwrap_err();
    assert!(e.to_string().contains("cut.safetensors"), "{e}");
    std::fs::write(&cut, b"not a gguf file at all").unwrap();
    assert!(GgufSource::open(&cut)
        .unwrap_err()
        .to_string()
        .contains("cut.safetensors"));
}
