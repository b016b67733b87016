//! The model architectures behind one config.json: a Llama (`LlamaForCausalLM`, `ModelConfig`) or
//! the HSA model (`DRTForCausalLM`, `HsaConfig`, docs/HSA.md). Whatever reads a model directory
//! or a checkpoint without caring which one it holds (checkpoints, `export`, `train`'s start)
//! goes through `ArchConfig`: its parameter list, its config.json, its Llama keys.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

use crate::backend::Backend;
use crate::io::{MappedTensors, TensorMap};
use crate::model::config::{ModelConfig, RopeOverride};
use crate::model::hsa::config::{HsaConfig, is_hsa};
use crate::model::hsa::params::Layout;
use crate::model::params::{ParamSpec, ParamStore, Shard, param_specs};

/// A model config of either architecture.
#[derive(Clone, Debug, PartialEq)]
pub enum ArchConfig {
    Llama(ModelConfig),
    Hsa(HsaConfig),
}

impl ArchConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model config {}", path.display()))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parse config.json text: `architectures` containing `DRTForCausalLM` selects the HSA model
    /// (the authors' configs say `model_type: "llama"` too), anything else a Llama.
    pub fn from_json_str(text: &str, source: &str) -> Result<Self> {
        let raw: Value =
            serde_json::from_str(text).map_err(|e| anyhow!("{source}: malformed JSON: {e}"))?;
        if is_hsa(&raw) {
            Ok(ArchConfig::Hsa(HsaConfig::from_json_str(text, source)?))
        } else {
            Ok(ArchConfig::Llama(ModelConfig::from_json_str(text, source)?))
        }
    }

    /// The Llama keys (vocabulary, hidden size, heads, RoPE, norms) both architectures share.
    pub fn base(&self) -> &ModelConfig {
        match self {
            ArchConfig::Llama(c) => c,
            ArchConfig::Hsa(c) => &c.base,
        }
    }

    pub fn is_hsa(&self) -> bool {
        matches!(self, ArchConfig::Hsa(_))
    }

    /// What a log line calls it.
    pub fn name(&self) -> &'static str {
        match self {
            ArchConfig::Llama(_) => "Llama",
            ArchConfig::Hsa(_) => "HSA (DRTForCausalLM)",
        }
    }

    /// Every parameter in store order (unsharded shapes, with their TP splits).
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        match self {
            ArchConfig::Llama(c) => param_specs(c),
            ArchConfig::Hsa(c) => Layout::new(c).specs,
        }
    }

    /// The same model with its RoPE replaced (`[model.rope_scaling]` of a run config): the Llama's,
    /// or the HSA model's sliding-window layers' (its HSA query and chunk keys have no positions).
    pub fn with_rope_override(&self, o: &RopeOverride, source: &str) -> Result<ArchConfig> {
        Ok(match self {
            ArchConfig::Llama(c) => ArchConfig::Llama(c.with_rope_override(o, source)?),
            ArchConfig::Hsa(c) => {
                let mut c = c.clone();
                c.base = c.base.with_rope_override(o, source)?;
                ArchConfig::Hsa(c)
            }
        })
    }

    /// Fresh weights as each architecture's own initialisation does (N(0, initializer_range²)
    /// weights, norms 1; every value a pure function of (seed, name, index)).
    pub fn init_random<B: Backend>(&self, b: &B, seed: u64) -> ParamStore<B> {
        match self {
            ArchConfig::Llama(c) => ParamStore::init_random(b, c, seed),
            ArchConfig::Hsa(c) => Layout::new(c).init_random(b, c.initializer_range, seed),
        }
    }

    /// This rank's `shard` of a full host map of this model's tensors (a checkpoint's).
    pub fn params_from_host<B: Backend>(
        &self,
        b: &B,
        map: &TensorMap,
        source: &str,
        shard: Shard,
    ) -> Result<ParamStore<B>> {
        let specs = self.param_specs();
        ParamStore::from_host_specs(b, &specs, self.tolerated_extra(), map, source, shard)
    }

    /// This rank's `shard` read from a model directory's (memory-mapped) files.
    pub fn params_from_files<B: Backend>(
        &self,
        b: &B,
        files: &MappedTensors,
        source: &str,
        shard: Shard,
    ) -> Result<ParamStore<B>> {
        let specs = self.param_specs();
        ParamStore::from_mapped_specs(b, &specs, self.tolerated_extra(), files, source, shard)
    }

    /// The config.json to write beside the weights.
    pub fn to_hf_json(&self) -> Value {
        match self {
            ArchConfig::Llama(c) => c.to_hf_json(),
            ArchConfig::Hsa(c) => c.to_hf_json(),
        }
    }

    /// The names a weights file may hold beyond `param_specs` (a tied LM head).
    pub fn tolerated_extra(&self) -> &'static [&'static str] {
        match self {
            ArchConfig::Llama(c) if c.tie_word_embeddings => &["lm_head.weight"],
            _ => &[],
        }
    }
}

impl From<ModelConfig> for ArchConfig {
    fn from(c: ModelConfig) -> Self {
        ArchConfig::Llama(c)
    }
}

impl From<HsaConfig> for ArchConfig {
    fn from(c: HsaConfig) -> Self {
        ArchConfig::Hsa(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HSA: &str = r#"{
        "architectures": ["DRTForCausalLM"], "model_type": "llama",
        "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_kv_heads": 2, "intermediate_size": 48, "rms_norm_eps": 1e-5,
        "num_lower_layers": 1, "num_upper_layers": 2, "num_upper_groups": 2,
        "sliding_window": 6, "chunk_size": 4, "chunk_topk": 2, "retrieval_dim": 16,
        "encoder_layers": 0, "max_position_embeddings": 256, "rope_theta": 10000.0,
        "enable_softmax": true, "hsa_only": false, "hsa_sliding_window": 3
    }"#;

    #[test]
    fn dispatches_on_architectures_and_round_trips() {
        let h = ArchConfig::from_json_str(HSA, "h.json").unwrap();
        assert!(h.is_hsa());
        // The authors' layout: no num_hidden_layers in what we write, their keys all there.
        let j = h.to_hf_json();
        assert!(j.get("num_hidden_layers").is_none(), "{j}");
        assert_eq!(j["architectures"], serde_json::json!(["DRTForCausalLM"]));
        assert_eq!(j["model_type"], "llama");
        assert_eq!(j["hsa_sliding_window"], 3);
        let back = ArchConfig::from_json_str(&j.to_string(), "back").unwrap();
        assert_eq!(
            back.to_hf_json(),
            j,
            "writing what was read changes nothing"
        );
        assert_eq!(back.param_specs(), h.param_specs());

        let l = ArchConfig::from_json_str(
            r#"{"vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}"#,
            "l.json",
        )
        .unwrap();
        assert!(!l.is_hsa());
        assert_eq!(l.param_specs().len(), 1 + 2 * 9 + 2);
    }
}
