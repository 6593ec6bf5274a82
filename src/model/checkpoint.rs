//! Opening a checkpoint: a Hugging Face directory (`config.json`, safetensors,
//! `tokenizer.json`) or a GGUF file (metadata, tensors served under Hugging Face names, the
//! tokenizer rebuilt from `tokenizer.ggml.*`), and decoding generated tokens as a stream.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::DType;
use tokenizers::Tokenizer;

use super::config::ModelConfig;
use super::decoder::LoadOptions;
use crate::error::{Error, Result};
use crate::quant::QuantConfig;
use crate::weights::{FileDType, GgufSource, RenamedSource, WeightSource};

/// An opened checkpoint: configuration, weights and how to load them.
#[derive(Debug)]
pub struct Checkpoint {
    /// Directory or file it came from.
    pub path: PathBuf,
    /// Model configuration.
    pub config: ModelConfig,
    /// Weights, under Hugging Face names.
    pub source: Box<dyn WeightSource>,
    /// How the linear weights load by default (GGUF: kept in their GGML blocks).
    pub quant: QuantConfig,
    /// Block size of the quantized linears (1 for dense checkpoints).
    pub block: usize,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadFile {
        file: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Checkpoint {
    /// Opens `path`: a `.gguf` file, or a directory with `config.json` and safetensors.
    /// `dtype` forces dense weights of that type (GGUF blocks are dequantized); `None` keeps
    /// GGUF blocks and loads safetensors as f32.
    ///
    /// # Errors
    /// No such file, a directory without `config.json`, an unsupported architecture, a
    /// malformed file; each names the path.
    pub fn open(path: &Path, dtype: Option<DType>) -> Result<Self> {
        use crate::weights::synthetic;
        if let Some(name) = path
            .to_str()
            .and_then(|p| p.strip_prefix(synthetic::PREFIX))
        {
            let config = synthetic::preset(name)?;
            let source = synthetic::SyntheticSource::new(&path.to_string_lossy(), &config);
            return Ok(Self {
                path: path.to_path_buf(),
                config,
                source: Box::new(source),
                quant: QuantConfig::Unquantized {
                    dtype: dtype.unwrap_or(DType::F32),
                },
                block: 1,
            });
        }
        if !path.exists() {
            return Err(bad(path, "no such file or directory"));
        }
        if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
            let gguf = GgufSource::open(path)?;
            let rows = gguf
                .meta("token_embd.weight")
                .map(|m| m.shape[0])
                .map_err(|_| bad(path, "no `token_embd.weight`: not a decoder checkpoint"))?;
            let config = ModelConfig::from_gguf(gguf.content(), path, rows)?;
            let block = gguf
                .names()
                .iter()
                .filter(|n| n.starts_with("blk."))
                .filter_map(|n| match gguf.meta(n).ok()?.dtype {
                    FileDType::Ggml(g) => Some(g.block_size()),
                    _ => None,
                })
                .max()
                .unwrap_or(1);
            let quant = match dtype {
                Some(dtype) => QuantConfig::Unquantized { dtype },
                None => QuantConfig::Ggml,
            };
            return Ok(Self {
                path: path.to_path_buf(),
                config,
                source: Box::new(RenamedSource::gguf_as_hf(Box::new(gguf))),
                quant,
                block: if dtype.is_some() { 1 } else { block },
            });
        }
        if !path.is_dir() {
            return Err(bad(
                path,
                "expected a .gguf file or a model directory with config.json",
            ));
        }
        if !path.join("config.json").is_file() {
            return Err(bad(
                path,
                "no config.json in this directory (expected a Hugging Face model directory)",
            ));
        }
        let config_file = path.join("config.json");
        let config = ModelConfig::from_hf_file(&config_file)?;
        let json: serde_json::Value = std::fs::read_to_string(&config_file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let prequant = crate::quant::PrequantFormat::from_hf(&json).map_err(|e| match e {
            crate::error::Error::Config { field, reason } => crate::error::Error::Config {
                field: format!("{}: {field}", config_file.display()),
                reason,
            },
            other => other,
        })?;
        let source = crate::weights::open(path)?;
        let dtype = dtype.unwrap_or(DType::F32);
        let quant = match prequant {
            Some(format) => QuantConfig::Prequantized { dtype, format },
            None => QuantConfig::Unquantized { dtype },
        };
        Ok(Self {
            path: path.to_path_buf(),
            config,
            source,
            block: quant.block(),
            quant,
        })
    }

    /// Opens the configuration of `model` with the weights of the UQFF set at `uqff`.
    ///
    /// # Errors
    /// As [`Self::open`] and [`crate::weights::UqffSource::open`]; a set written for another
    /// model.
    pub fn open_uqff(model: &Path, uqff: &Path) -> Result<Self> {
        let base = Self::open(model, None)?;
        let source = crate::weights::UqffSource::open(uqff)?;
        let want = super::persist::config_hash(&base.config);
        if source.index().config_hash != want {
            return Err(bad(
                uqff,
                format!(
                    "written for another model (configuration {}, {}; {} is {want})",
                    source.index().config_hash,
                    source.index().architecture,
                    model.display()
                ),
            ));
        }
        // FP8 and MXFP4 pieces load through the pre-quantized path; the model computes in
        // the dtype its dense tensors were stored in.
        let compute = match source.meta("model.norm.weight").map(|m| m.dtype) {
            Ok(FileDType::Dense(d)) => d,
            _ => DType::F32,
        };
        let prequant = match (source.fp8_block(), source.has_mxfp4()) {
            (Some(block), _) => Some(crate::quant::PrequantFormat::Fp8 { block }),
            (None, true) => Some(crate::quant::PrequantFormat::Mxfp4),
            (None, false) => None,
        };
        let quant = match (prequant, source.dense_dtype()) {
            (Some(format), _) => QuantConfig::Prequantized {
                dtype: compute,
                format,
            },
            (None, Some(dtype)) => QuantConfig::Unquantized { dtype },
            (None, None) => QuantConfig::Ggml,
        };
        Ok(Self {
            path: base.path,
            config: base.config,
            block: source.block().max(quant.block()),
            source: Box::new(source),
            quant,
        })
    }

    /// Load options for this checkpoint's default storage.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            quant: self.quant,
            block: self.block,
            lora: None,
            isq: None,
            progress: false,
            moe: Default::default(),
        }
    }

    /// The tokenizer: `tokenizer.json` next to the weights, or the GGUF's own.
    ///
    /// # Errors
    /// No tokenizer found or a malformed one, naming the file.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        load_tokenizer(&self.path)
    }
}

/// Loads the tokenizer of the checkpoint at `path` (see [`Checkpoint::tokenizer`]) without
/// opening its weights.
///
/// # Errors
/// No tokenizer found or a malformed one, naming the file.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
        let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let ct = Content::read(&mut f).map_err(|e| bad(path, format!("invalid GGUF: {e}")))?;
        let mut tok = Tokenizer::from_gguf(&ct).map_err(|e| {
            bad(
                path,
                format!("cannot build the tokenizer from GGUF metadata: {e}"),
            )
        })?;
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str);
        // candle's builder treats unknown pre-tokenizer kinds as GPT-2 with a prefix space;
        // SmolLM's (llama.cpp `smollm`) splits digits one by one and adds no prefix space,
        // as its tokenizer.json does.
        if pre == Some("smollm") {
            use tokenizers::pre_tokenizers::{
                byte_level::ByteLevel, digits::Digits, sequence::Sequence,
            };
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])));
        }
        return Ok(tok);
    }
    let file = path.join("tokenizer.json");
    Tokenizer::from_file(&file).map_err(|e| bad(&file, format!("cannot load the tokenizer: {e}")))
}

/// Turns generated token ids into text pieces as they arrive, holding back bytes of a
/// character that is not complete yet.
#[derive(Debug)]
pub struct TextStream {
    tokens: Vec<u32>,
    emitted: usize,
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self {
            tokens: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds `token`; returns the new text it completes (possibly empty).
    ///
    /// # Errors
    /// The tokenizer cannot decode the ids.
    pub fn push(&mut self, tok: &Tokenizer, token: u32) -> Result<String> {
        self.tokens.push(token);
        let text = decode(tok, &self.tokens)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted {
            return Ok(String::new());
        }
        let new = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(new)
    }

    /// Text held back so far (an incomplete character at the end of generation).
    ///
    /// # Errors
    /// The tokenizer cannot decode the ids.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let text = decode(tok, &self.tokens)?;
        let rest = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(rest)
    }
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, true).map_err(|e| Error::Config {
        field: "tokenizer".into(),
        reason: format!("cannot decode tokens: {e}"),
    })
}

/// Tokenizes `text` with the tokenizer's defaults (special tokens added as it says).
///
/// # Errors
/// The tokenizer fails.
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, true)
        .map_err(|e| Error::Config {
            field: "tokenizer".into(),
            reason: format!("cannot tokenize: {e}"),
        })?
        .get_ids()
        .to_vec())
}
