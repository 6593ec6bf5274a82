//! The synchronous body of a rank: executes one request on this rank's model. The actor
//! ([`super::rank`]) and the tests drive it; this is the one place requests are executed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::messages::{HealthReport, LoadReport, LoadSpec, RankReply, RankRequest};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::model::{persist, Checkpoint, Model};

/// One rank's state: communicator and (once loaded) its shard of the model.
#[derive(Debug)]
pub struct RankWorker {
    comm: Arc<dyn Communicator>,
    model: Option<Model>,
    model_path: Option<PathBuf>,
    /// What is loaded and what loading it cost: a repeated Load of the same spec (each
    /// `generate --config` sends one) answers at once.
    loaded: Option<(LoadSpec, LoadReport)>,
}

impl RankWorker {
    /// A rank with no model yet.
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self {
            comm,
            model: None,
            model_path: None,
            loaded: None,
        }
    }

    /// This rank's number.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn model(&mut self) -> Result<&mut Model> {
        self.model.as_mut().ok_or_else(|| Error::Config {
            field: "model".into(),
            reason: "no model is loaded on this rank (send Load first)".into(),
        })
    }

    /// Executes `req`. Rank 0 returns logits and forward outputs; the others answer
    /// [`RankReply::Nothing`] for those.
    ///
    /// # Errors
    /// Whatever the request hits: a missing model, load errors, kernel or collective errors.
    pub fn handle(&mut self, req: RankRequest) -> Result<RankReply> {
        let first = self.comm.rank() == 0;
        Ok(match req {
            RankRequest::Load(spec) => match &self.loaded {
                Some((s, report)) if *s == spec && self.model.is_some() => {
                    RankReply::Loaded(report.clone())
                }
                _ => RankReply::Loaded(self.load(&spec)?),
            },
            RankRequest::Forward { layers, input } => {
                let y = self.model()?.forward_layers(layers, &input)?;
                if first {
                    RankReply::Tensor(y)
                } else {
                    RankReply::Nothing
                }
            }
            RankRequest::Step(step) => {
                let model = self.model()?;
                for id in &step.release {
                    model.release(*id);
                }
                if first {
                    RankReply::Step(model.step(&step.seqs)?)
                } else {
                    model.advance(&step.seqs)?;
                    RankReply::Nothing
                }
            }
            RankRequest::ApplyIsq { ty, filter } => {
                // The weights no longer match the spec they were loaded from.
                self.loaded = None;
                RankReply::Quantized(self.model()?.apply_isq(ty, &filter)?)
            }
            RankRequest::Serialize { path } => {
                let (rank, world) = (self.comm.rank(), self.comm.world_size());
                let (file, bytes) = persist::write_rank_file(self.model()?, &path, rank, world)?;
                RankReply::Serialized { file, bytes }
            }
            RankRequest::Health => RankReply::Health(HealthReport {
                rank: self.comm.rank(),
                world_size: self.comm.world_size(),
                model: self.model_path.as_ref().map(|p| p.display().to_string()),
            }),
            RankRequest::Shutdown => {
                self.model = None;
                self.loaded = None;
                RankReply::Done
            }
        })
    }

    fn load(&mut self, spec: &LoadSpec) -> Result<LoadReport> {
        let t0 = Instant::now();
        self.model = None;
        self.model_path = None;
        self.loaded = None;
        let ck = match &spec.uqff {
            Some(u) => Checkpoint::open_uqff(&spec.model, u)?,
            None => Checkpoint::open(&spec.model, spec.dtype)?,
        };
        let mut opts = ck.load_options();
        opts.moe = spec.moe;
        if let Some(ty) = spec.isq {
            // Split on the ISQ type's blocks so every shard can take it (as one rank does),
            // and quantize each layer as it loads.
            opts.block = opts.block.max(ty.block_size());
            opts.isq = Some(ty);
        }
        opts.progress =
            self.comm.rank() == 0 && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let model = match Model::load(&ck.config, ck.source.as_ref(), &opts, self.comm.clone()) {
            // A block size the split cannot honour: load with unaligned boundaries (those
            // pieces are dequantized) rather than refuse the world size.
            Err(Error::NoPlan { dim, .. }) if opts.block > 1 => {
                tracing::warn!(
                    "{}: {dim} cannot be split over {} ranks on {}-element blocks; loading \
                     unaligned pieces dequantized",
                    spec.model.display(),
                    self.comm.world_size(),
                    opts.block
                );
                opts.block = 1;
                Model::load(&ck.config, ck.source.as_ref(), &opts, self.comm.clone())?
            }
            other => other?,
        };
        let report = LoadReport {
            seconds: t0.elapsed().as_secs_f64(),
            weight_bytes: model.weight_bytes(),
            rss_bytes: rss_bytes(),
            on_gpu: model.device().is_cuda(),
        };
        self.model = Some(model);
        self.model_path = Some(spec.model.clone());
        self.loaded = Some((spec.clone(), report.clone()));
        Ok(report)
    }
}

/// Resident set size of this process (0 where /proc is unavailable).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}
