//! Conversions between the runtime's messages and the control protocol's protobuf types:
//! the only place they meet.

use std::path::PathBuf;

use candle_core::{DType, Tensor};

use super::messages::{HealthReport, LoadReport, LoadSpec, RankReply, RankRequest, StepRequest};
use crate::comm::wire::{bytes_to_tensor, code_dtype, dtype_code, tensor_to_bytes};
use crate::error::{Error, Result};
use crate::model::{SamplingParams, SeqStep, StepOutput};
use crate::proto::{self, control_reply, control_request, step_output_data};
use crate::quant::IsqType;

fn bad(what: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        field: format!("control message: {what}"),
        reason: reason.into(),
    }
}

/// A tensor on the wire (f32, bf16 or f16).
///
/// # Errors
/// Another dtype.
pub fn tensor_to_proto(t: &Tensor) -> Result<proto::TensorData> {
    let dtype = dtype_code(t.dtype())
        .ok_or_else(|| bad("tensor", format!("dtype {:?} cannot be sent", t.dtype())))?;
    Ok(proto::TensorData {
        shape: t.dims().iter().map(|&d| d as u64).collect(),
        dtype,
        data: tensor_to_bytes(t)?.into(),
    })
}

/// A tensor from the wire, checked against its declared shape and dtype.
///
/// # Errors
/// Unknown dtype or a size that does not match the shape.
pub fn tensor_from_proto(t: &proto::TensorData) -> Result<Tensor> {
    let dtype =
        code_dtype(t.dtype).ok_or_else(|| bad("tensor", format!("dtype code {}", t.dtype)))?;
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    bytes_to_tensor(&t.data, dtype, &shape)
}

fn dtype_name(d: Option<DType>) -> String {
    match d {
        None => String::new(),
        Some(DType::F32) => "f32".into(),
        Some(DType::BF16) => "bf16".into(),
        Some(DType::F16) => "f16".into(),
        Some(other) => format!("{other:?}").to_lowercase(),
    }
}

/// Parses a dense dtype name (`f32`, `bf16`, `f16`; empty for none).
///
/// # Errors
/// Any other name.
pub fn parse_dtype(s: &str) -> Result<Option<DType>> {
    Ok(match s {
        "" => None,
        "f32" => Some(DType::F32),
        "bf16" => Some(DType::BF16),
        "f16" => Some(DType::F16),
        other => {
            return Err(Error::Config {
                field: "dtype".into(),
                reason: format!("`{other}` (expected f32, bf16 or f16)"),
            })
        }
    })
}

/// The protobuf body of a request.
///
/// # Errors
/// A tensor that cannot be sent.
pub fn request_to_proto(req: &RankRequest) -> Result<control_request::Body> {
    use control_request::Body;
    Ok(match req {
        RankRequest::Load(s) => Body::Load(proto::LoadRequest {
            model: s.model.display().to_string(),
            dtype: dtype_name(s.dtype),
            isq: s.isq.map(|t| t.name()).unwrap_or_default(),
            uqff: s
                .uqff
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            moe: s.moe.name().into(),
        }),
        RankRequest::Forward { layers, input } => Body::Forward(proto::ForwardRequest {
            first_layer: layers.start as u32,
            end_layer: layers.end as u32,
            input: Some(tensor_to_proto(input)?),
        }),
        RankRequest::Step(s) => Body::Step(proto::StepRequest {
            seqs: s
                .seqs
                .iter()
                .map(|q| proto::SeqStepData {
                    seq_id: q.seq_id,
                    tokens: q.tokens.clone(),
                    start_pos: q.start_pos as u64,
                    all_logits: q.all_logits,
                    sample: q.sample.as_ref().map(|p| proto::SamplingData {
                        temperature: p.temperature,
                        top_k: p.top_k as u64,
                        top_p: p.top_p,
                        repetition_penalty: p.repetition_penalty,
                        seed: p.seed,
                    }),
                })
                .collect(),
            release: s.release.clone(),
        }),
        RankRequest::ApplyIsq { ty, filter } => Body::ApplyIsq(proto::IsqRequest {
            isq: ty.name(),
            filter: filter.clone(),
        }),
        RankRequest::Serialize { path } => Body::Serialize(proto::SerializeRequest {
            path: path.display().to_string(),
        }),
        RankRequest::Health => Body::Health(proto::Empty {}),
        RankRequest::Shutdown => Body::Shutdown(proto::Empty {}),
    })
}

/// The request a protobuf body carries (`None` for authentication messages).
///
/// # Errors
/// Malformed fields, named.
pub fn request_from_proto(body: control_request::Body) -> Result<Option<RankRequest>> {
    use control_request::Body;
    let isq = |s: &str| -> Result<Option<IsqType>> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some)
    };
    Ok(Some(match body {
        Body::ClientNonce(_) | Body::ClientProof(_) => return Ok(None),
        Body::Load(l) => RankRequest::Load(LoadSpec {
            model: PathBuf::from(l.model),
            dtype: parse_dtype(&l.dtype)?,
            isq: isq(&l.isq)?,
            uqff: (!l.uqff.is_empty()).then(|| PathBuf::from(l.uqff)),
            moe: if l.moe.is_empty() {
                Default::default()
            } else {
                l.moe.parse()?
            },
        }),
        Body::Forward(f) => RankRequest::Forward {
            layers: f.first_layer as usize..f.end_layer as usize,
            input: tensor_from_proto(
                f.input
                    .as_ref()
                    .ok_or_else(|| bad("forward", "no input tensor"))?,
            )?,
        },
        Body::Step(s) => RankRequest::Step(StepRequest {
            seqs: s
                .seqs
                .into_iter()
                .map(|q| SeqStep {
                    seq_id: q.seq_id,
                    tokens: q.tokens,
                    start_pos: q.start_pos as usize,
                    all_logits: q.all_logits,
                    sample: q.sample.map(|p| SamplingParams {
                        temperature: p.temperature,
                        top_k: p.top_k as usize,
                        top_p: p.top_p,
                        repetition_penalty: p.repetition_penalty,
                        seed: p.seed,
                    }),
                })
                .collect(),
            release: s.release,
        }),
        Body::ApplyIsq(i) => RankRequest::ApplyIsq {
            ty: isq(&i.isq)?.ok_or_else(|| bad("apply_isq", "no ISQ type"))?,
            filter: i.filter,
        },
        Body::Serialize(s) => RankRequest::Serialize {
            path: PathBuf::from(s.path),
        },
        Body::Health(_) => RankRequest::Health,
        Body::Shutdown(_) => RankRequest::Shutdown,
    }))
}

/// The protobuf body of a reply (errors travel as their message).
pub fn reply_to_proto(reply: Result<RankReply>) -> control_reply::Body {
    use control_reply::Body;
    let ok = match reply {
        Ok(r) => r,
        Err(e) => return Body::Error(e.to_string()),
    };
    match ok {
        RankReply::Loaded(l) => Body::Loaded(proto::LoadReply {
            seconds: l.seconds,
            weight_bytes: l.weight_bytes,
            rss_bytes: l.rss_bytes,
            on_gpu: l.on_gpu,
        }),
        RankReply::Tensor(t) => match tensor_to_proto(&t) {
            Ok(t) => Body::Tensor(t),
            Err(e) => Body::Error(e.to_string()),
        },
        RankReply::Step(outs) => {
            let data = outs
                .iter()
                .map(|o| {
                    Ok(proto::StepOutputData {
                        out: Some(match o {
                            StepOutput::Logits(t) => {
                                step_output_data::Out::Logits(tensor_to_proto(t)?)
                            }
                            StepOutput::Token(t) => step_output_data::Out::Token(*t),
                        }),
                    })
                })
                .collect::<Result<Vec<_>>>();
            match data {
                Ok(outputs) => Body::Step(proto::StepOutputList { outputs }),
                Err(e) => Body::Error(e.to_string()),
            }
        }
        RankReply::Quantized(n) => Body::QuantizedLayers(n as u32),
        RankReply::Serialized { file, bytes } => Body::Serialized(proto::SerializeReply {
            file: file.display().to_string(),
            bytes,
        }),
        RankReply::Health(h) => Body::Health(proto::HealthReply {
            rank: h.rank as u32,
            world_size: h.world_size as u32,
            loaded: h.model.is_some(),
            model: h.model.unwrap_or_default(),
        }),
        RankReply::Done => Body::Done(proto::Empty {}),
        RankReply::Nothing => Body::Nothing(proto::Empty {}),
    }
}

/// The reply a protobuf body carries; a rank's error becomes [`Error::Rank`].
///
/// # Errors
/// The rank's error, or a malformed reply.
pub fn reply_from_proto(body: control_reply::Body, rank: usize) -> Result<RankReply> {
    use control_reply::Body;
    let rank_err = |reason: String| Error::Rank { rank, reason };
    Ok(match body {
        Body::Error(e) => return Err(rank_err(e)),
        Body::ServerHello(_) | Body::Authenticated(_) => {
            return Err(rank_err("unexpected authentication message".into()))
        }
        Body::Loaded(l) => RankReply::Loaded(LoadReport {
            seconds: l.seconds,
            weight_bytes: l.weight_bytes,
            rss_bytes: l.rss_bytes,
            on_gpu: l.on_gpu,
        }),
        Body::Tensor(t) => RankReply::Tensor(tensor_from_proto(&t)?),
        Body::Step(l) => RankReply::Step(
            l.outputs
                .iter()
                .map(|o| match &o.out {
                    Some(step_output_data::Out::Logits(t)) => {
                        Ok(StepOutput::Logits(tensor_from_proto(t)?))
                    }
                    Some(step_output_data::Out::Token(t)) => Ok(StepOutput::Token(*t)),
                    None => Err(rank_err(
                        "a step output with neither logits nor a token".into(),
                    )),
                })
                .collect::<Result<_>>()?,
        ),
        Body::QuantizedLayers(n) => RankReply::Quantized(n as usize),
        Body::Serialized(s) => RankReply::Serialized {
            file: PathBuf::from(s.file),
            bytes: s.bytes,
        },
        Body::Health(h) => RankReply::Health(HealthReport {
            rank: h.rank as usize,
            world_size: h.world_size as usize,
            model: h.loaded.then_some(h.model),
        }),
        Body::Done(_) => RankReply::Done,
        Body::Nothing(_) => RankReply::Nothing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A load report crosses the wire whole, whichever device the rank reports.
    #[test]
    fn load_reports_round_trip() {
        for on_gpu in [false, true] {
            let sent = LoadReport {
                seconds: 1.25,
                weight_bytes: 123_456_789,
                rss_bytes: 42,
                on_gpu,
            };
            let body = reply_to_proto(Ok(RankReply::Loaded(sent.clone())));
            match reply_from_proto(body, 3) {
                Ok(RankReply::Loaded(got)) => assert_eq!(got, sent),
                other => panic!("a load report came back as {other:?}"),
            }
        }
    }

    /// A step's sampling parameters reach the rank whole, and its outputs (a token, logits)
    /// come back whole.
    #[test]
    fn sampled_steps_round_trip() {
        let params = SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            repetition_penalty: 1.15,
            seed: rand::random(),
        };
        let req = StepRequest {
            seqs: vec![
                SeqStep {
                    seq_id: 7,
                    tokens: vec![1, 2, 3],
                    start_pos: 0,
                    all_logits: false,
                    sample: Some(params),
                },
                SeqStep {
                    seq_id: 8,
                    tokens: vec![4],
                    start_pos: 9,
                    all_logits: true,
                    sample: None,
                },
            ],
            release: vec![5],
        };
        let body = request_to_proto(&RankRequest::Step(req.clone())).unwrap();
        match request_from_proto(body) {
            Ok(Some(RankRequest::Step(got))) => assert_eq!(got, req),
            other => panic!("a step came back as {other:?}"),
        }
        let logits: Vec<f32> = (0..12).map(|_| rand::random()).collect();
        let t = Tensor::from_vec(logits.clone(), (2, 6), &candle_core::Device::Cpu).unwrap();
        let token = rand::random::<u32>();
        let outs = vec![StepOutput::Token(token), StepOutput::Logits(t)];
        match reply_from_proto(reply_to_proto(Ok(RankReply::Step(outs))), 0) {
            Ok(RankReply::Step(got)) => match got.as_slice() {
                [StepOutput::Token(a), StepOutput::Logits(l)] => {
                    assert_eq!(*a, token);
                    assert_eq!(l.dims(), &[2, 6]);
                    let back: Vec<f32> = l.flatten_all().unwrap().to_vec1().unwrap();
                    assert_eq!(back, logits);
                }
                other => panic!("step outputs came back as {other:?}"),
            },
            other => panic!("a step reply came back as {other:?}"),
        }
    }
}
