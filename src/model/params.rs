//! Parameters by Hugging Face name: the order and shapes of a Llama's tensors, their initial values,
//! and the conversion between a backend's buffers and host tensors (HF directories, checkpoints).
//!
//! The store is a flat list (so the optimizer, norms and checkpoints are loops over it); the model
//! finds each tensor by the index functions below.

use anyhow::{Context, Result, bail};

use crate::backend::Backend;
use crate::io::{HostTensor, TensorMap};
use crate::model::config::ModelConfig;
use crate::util::rng;

/// The nine tensors of one decoder layer, in store order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerTensor {
    AttnNorm = 0,
    Q,
    K,
    V,
    O,
    MlpNorm,
    Gate,
    Up,
    Down,
}

pub const TENSORS_PER_LAYER: usize = 9;

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// Norm weights are neither initialised randomly nor weight-decayed.
    pub is_norm: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every parameter of `cfg` in store order: embedding, 9 per layer, final norm, LM head (absent
/// when tied to the embedding).
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let (h, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let spec = |name: String, shape: Vec<usize>, is_norm| ParamSpec {
        name,
        shape,
        is_norm,
    };
    let mut out = vec![spec("model.embed_tokens.weight".into(), vec![v, h], false)];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        out.push(spec(format!("{p}input_layernorm.weight"), vec![h], true));
        out.push(spec(
            format!("{p}self_attn.q_proj.weight"),
            vec![q, h],
            false,
        ));
        out.push(spec(
            format!("{p}self_attn.k_proj.weight"),
            vec![kv, h],
            false,
        ));
        out.push(spec(
            format!("{p}self_attn.v_proj.weight"),
            vec![kv, h],
            false,
        ));
        out.push(spec(
            format!("{p}self_attn.o_proj.weight"),
            vec![h, q],
            false,
        ));
        out.push(spec(
            format!("{p}post_attention_layernorm.weight"),
            vec![h],
            true,
        ));
        out.push(spec(format!("{p}mlp.gate_proj.weight"), vec![f, h], false));
        out.push(spec(format!("{p}mlp.up_proj.weight"), vec![f, h], false));
        out.push(spec(format!("{p}mlp.down_proj.weight"), vec![h, f], false));
    }
    out.push(spec("model.norm.weight".into(), vec![h], true));
    if !cfg.tie_word_embeddings {
        out.push(spec("lm_head.weight".into(), vec![v, h], false));
    }
    out
}

pub const EMBED: usize = 0;

pub fn layer_index(layer: usize, t: LayerTensor) -> usize {
    1 + layer * TENSORS_PER_LAYER + t as usize
}

pub fn final_norm_index(cfg: &ModelConfig) -> usize {
    1 + cfg.num_hidden_layers * TENSORS_PER_LAYER
}

pub fn lm_head_index(cfg: &ModelConfig) -> usize {
    if cfg.tie_word_embeddings {
        EMBED
    } else {
        final_norm_index(cfg) + 1
    }
}

/// A set of tensors laid out as `param_specs` (weights, gradients, or an optimizer moment).
pub struct ParamStore<B: Backend> {
    pub specs: Vec<ParamSpec>,
    pub bufs: Vec<B::Buf>,
}

impl<B: Backend> ParamStore<B> {
    pub fn zeros(b: &B, cfg: &ModelConfig) -> Self {
        let specs = param_specs(cfg);
        let bufs = specs.iter().map(|s| b.zeros(s.numel())).collect();
        ParamStore { specs, bufs }
    }

    /// Random initialisation as transformers' LlamaPreTrainedModel: linear and embedding weights
    /// from N(0, initializer_range²), norm weights 1. Each value is a pure function of (seed, name,
    /// index) (`util::rng`), so the result does not depend on how the tensor is later sharded.
    pub fn init_random(b: &B, cfg: &ModelConfig, seed: u64) -> Self {
        let std = cfg
            .raw
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02);
        let specs = param_specs(cfg);
        let bufs = specs
            .iter()
            .map(|s| {
                let host: Vec<f32> = if s.is_norm {
                    vec![1.0; s.numel()]
                } else {
                    let stream = rng::stream_of(&s.name);
                    (0..s.numel() as u64)
                        .map(|i| (std * rng::normal(seed, stream, i)) as f32)
                        .collect()
                };
                b.upload(&host)
            })
            .collect();
        ParamStore { specs, bufs }
    }

    /// Take every tensor of `cfg` from `map`, checking names and shapes; tensors in `map` that
    /// the model does not use (e.g. rotary caches) are an error too, so a wrong config is caught.
    pub fn from_host(b: &B, cfg: &ModelConfig, map: &TensorMap, source: &str) -> Result<Self> {
        let specs = param_specs(cfg);
        let mut bufs = Vec::with_capacity(specs.len());
        for s in &specs {
            let t = map.get(&s.name).with_context(|| {
                format!(
                    "{source}: tensor `{}` is missing (expected shape {:?})",
                    s.name, s.shape
                )
            })?;
            if t.shape != s.shape {
                bail!(
                    "{source}: tensor `{}` has shape {:?}; the config implies {:?}",
                    s.name,
                    t.shape,
                    s.shape
                );
            }
            bufs.push(b.upload(&t.data));
        }
        let mut extra: Vec<&String> = map
            .keys()
            .filter(|k| !specs.iter().any(|s| &s.name == *k))
            .collect();
        if cfg.tie_word_embeddings {
            extra.retain(|k| k.as_str() != "lm_head.weight");
        }
        if let Some(k) = extra.first() {
            bail!(
                "{source}: unexpected tensor `{k}` for this config ({} unexpected in all)",
                extra.len()
            );
        }
        Ok(ParamStore { specs, bufs })
    }

    pub fn to_host(&self, b: &B) -> TensorMap {
        self.specs
            .iter()
            .zip(&self.bufs)
            .map(|(s, buf)| {
                (
                    s.name.clone(),
                    HostTensor::new(s.shape.clone(), b.download(buf)),
                )
            })
            .collect()
    }

    pub fn zero_all(&mut self, b: &B) {
        for buf in &mut self.bufs {
            b.fill_zero(buf);
        }
    }

    pub fn numel(&self) -> usize {
        self.specs.iter().map(|s| s.numel()).sum()
    }
}
