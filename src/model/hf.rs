//! A Llama to and from a Hugging Face directory: config.json + safetensors (+ tokenizer files).

use std::path::Path;

use anyhow::{Context, Result};

use crate::backend::Backend;
use crate::io::{self, DType};
use crate::model::config::ModelConfig;
use crate::model::llama::Llama;
use crate::model::params::{ParamStore, Shard};
use crate::model::rope::{Rope, RopePrecision};

/// Shards above this size, as transformers' default `max_shard_size` of 5 GB.
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

impl<B: Backend> Llama<B> {
    pub fn new(cfg: ModelConfig, precision: RopePrecision, params: ParamStore<B>) -> Result<Self> {
        let rope = Rope::new(&cfg, precision)?;
        Ok(Llama { cfg, rope, params })
    }

    /// Load `dir/config.json` and its weights.
    pub fn load(b: &B, dir: &Path, precision: RopePrecision) -> Result<Self> {
        Self::load_shard(b, dir, precision, Shard::WHOLE)
    }

    /// Load the part of `dir`'s weights that TP rank `shard` holds.
    pub fn load_shard(b: &B, dir: &Path, precision: RopePrecision, shard: Shard) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let map = io::load_safetensors_dir(dir)?;
        let params = ParamStore::from_host_shard(b, &cfg, &map, &dir.display().to_string(), shard)?;
        Llama::new(cfg, precision, params)
    }

    /// Save config.json and weights in `dtype` to `dir`, with the tokenizer files of
    /// `tokenizer_from` (if any).
    pub fn save(
        &self,
        b: &B,
        dir: &Path,
        dtype: DType,
        tokenizer_from: Option<&Path>,
    ) -> Result<()> {
        save_hf_dir(
            dir,
            &self.cfg,
            &self.params.to_host(b),
            dtype,
            tokenizer_from,
        )
    }
}

/// Write a Hugging Face directory: config.json of `cfg`, the tensors of `map` in `dtype`, and the
/// tokenizer files of `tokenizer_from` (if any).
pub fn save_hf_dir(
    dir: &Path,
    cfg: &ModelConfig,
    map: &io::TensorMap,
    dtype: DType,
    tokenizer_from: Option<&Path>,
) -> Result<()> {
    {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut cfg = cfg.to_hf_json();
        // The dtype the weights are stored in (transformers 4.x `torch_dtype`, 5.x `dtype`).
        let name = match dtype {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        };
        if let Some(obj) = cfg.as_object_mut() {
            obj.insert("torch_dtype".into(), name.into());
            if obj.contains_key("dtype") {
                obj.insert("dtype".into(), name.into());
            }
        }
        let json = serde_json::to_string_pretty(&cfg)?;
        io::write_atomic(&dir.join("config.json"), json.as_bytes())?;
        io::save_safetensors_dir(dir, map, dtype, MAX_SHARD_BYTES)?;
        if let Some(src) = tokenizer_from
            && src != dir
        {
            io::copy_tokenizer_files(src, dir)?;
        }
        Ok(())
    }
}

/// Check that `dir`, given by `key` (e.g. `model.path`, `--model`), is a Hugging Face model
/// directory before anything is loaded or created: a missing one is the first thing a new user
/// meets, and the error says where the weights come from.
pub fn require_model_dir(dir: &Path, key: &str) -> Result<()> {
    const WHERE: &str = "a Hugging Face model directory (config.json, *.safetensors, tokenizer.json): \
         download Llama-3.1-8B-Instruct as REPRODUCE.md \"Model and data\" shows, or make a \
         random model with `ultralong init`";
    if !dir.is_dir() {
        anyhow::bail!(
            "{key} = {:?}: no such directory; expected {WHERE}",
            dir.display().to_string()
        );
    }
    if !dir.join("config.json").is_file() {
        anyhow::bail!(
            "{key} = {:?}: no config.json in this directory; expected {WHERE}",
            dir.display().to_string()
        );
    }
    Ok(())
}
