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

    /// Load the part of `dir`'s weights that TP rank `shard` holds, reading only that part
    /// (memory-mapped row or column ranges of each tensor).
    pub fn load_shard(b: &B, dir: &Path, precision: RopePrecision, shard: Shard) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = io::MappedTensors::open_dir(dir)?;
        let params =
            ParamStore::from_mapped_shard(b, &cfg, &files, &dir.display().to_string(), shard)?;
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
            self.cfg.to_hf_json(),
            &self.params.to_host(b),
            dtype,
            tokenizer_from,
        )
    }
}

/// Write a Hugging Face directory: `config` as config.json (`ArchConfig::to_hf_json`), the
/// tensors of `map` in `dtype`, and the tokenizer files of `tokenizer_from` (if any).
pub fn save_hf_dir(
    dir: &Path,
    config: serde_json::Value,
    map: &io::TensorMap,
    dtype: DType,
    tokenizer_from: Option<&Path>,
) -> Result<()> {
    {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut cfg = config;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    /// 4 KV heads, so the tensor-parallel sizes 1, 2 and 4 all divide every split dimension.
    fn tp4_config(tied: bool) -> ModelConfig {
        let text = format!(
            r#"{{"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": {tied},
            "initializer_range": 0.3}}"#
        );
        ModelConfig::from_json_str(&text, "tp4").unwrap()
    }

    /// Sharded loading reads each rank's rows/columns straight from the (several) files; the
    /// reference is the whole directory read into memory and cut by `ParamSpec::take_shard`.
    #[test]
    fn sharded_load_equals_full_load_then_slice() {
        for tied in [false, true] {
            for dtype in [DType::BF16, DType::F32] {
                let b = CpuBackend::<f32>::new();
                let cfg = tp4_config(tied);
                let host = ParamStore::init_random(&b, &cfg, 3).to_host(&b);
                let dir = tempfile::tempdir().unwrap();
                let json = serde_json::to_string(&cfg.to_hf_json()).unwrap();
                std::fs::write(dir.path().join("config.json"), json).unwrap();
                // Shards of ~1 KB: the model is spread over many files.
                io::save_safetensors_dir(dir.path(), &host, dtype, 1024).unwrap();
                assert!(dir.path().join(io::INDEX_FILE).is_file());
                let full = io::load_safetensors_dir(dir.path()).unwrap();
                for tp in [1, 2, 4] {
                    for rank in 0..tp {
                        let shard = Shard { rank, size: tp };
                        let got =
                            Llama::load_shard(&b, dir.path(), RopePrecision::Exact, shard).unwrap();
                        let want =
                            ParamStore::from_host_shard(&b, &cfg, &full, "ref", shard).unwrap();
                        assert_eq!(got.params.specs, want.specs);
                        for (s, (x, y)) in want
                            .specs
                            .iter()
                            .zip(got.params.bufs.iter().zip(&want.bufs))
                        {
                            let (x, y) = (b.download(x), b.download(y));
                            let xb: Vec<u32> = x.iter().map(|v| v.to_bits()).collect();
                            let yb: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                            assert_eq!(xb, yb, "{} tp {tp} rank {rank} {dtype}", s.name);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sharded_load_names_a_wrong_shape() {
        let b = CpuBackend::<f32>::new();
        let cfg = tp4_config(false);
        let mut host = ParamStore::init_random(&b, &cfg, 3).to_host(&b);
        host.insert(
            "model.norm.weight".into(),
            io::HostTensor::new(vec![15], vec![1.0; 15]),
        );
        let dir = tempfile::tempdir().unwrap();
        let json = serde_json::to_string(&cfg.to_hf_json()).unwrap();
        std::fs::write(dir.path().join("config.json"), json).unwrap();
        io::save_safetensors_dir(dir.path(), &host, DType::F32, u64::MAX).unwrap();
        let err = Llama::load_shard(
            &b,
            dir.path(),
            RopePrecision::Exact,
            Shard { rank: 1, size: 2 },
        )
        .err()
        .unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("model.norm.weight") && msg.contains("[15]") && msg.contains("[16]"),
            "{msg}"
        );
    }
}
