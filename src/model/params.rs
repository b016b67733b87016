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

/// How a tensor is split across the ranks of a tensor-parallel group (Megatron's names:
/// column-parallel layers split their output features, row-parallel ones their input features).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds all of it (norm weights); its gradient is summed over the group.
    Replicated,
    /// Rank r holds rows `r·n/tp ..` of `[n, k]`: column-parallel q/k/v, gate/up, and the
    /// vocab-parallel embedding and LM head.
    Rows,
    /// Rank r holds columns `r·k/tp ..` of `[n, k]`: row-parallel o and down.
    Cols,
}

/// Which shard of a TP group this store holds: rank `rank` of `size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub size: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { rank: 0, size: 1 };
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    /// The shape held here: the full Hugging Face shape, or a TP shard of it.
    pub shape: Vec<usize>,
    /// Norm weights are neither initialised randomly nor weight-decayed.
    pub is_norm: bool,
    pub split: Split,
    /// The full (unsharded) shape.
    pub full_shape: Vec<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// This spec as held by `shard` (the shape divided along its split dimension).
    pub fn sharded(&self, shard: Shard) -> ParamSpec {
        let mut s = self.clone();
        match self.split {
            Split::Replicated => {}
            Split::Rows => s.shape[0] /= shard.size,
            Split::Cols => s.shape[1] /= shard.size,
        }
        s
    }

    /// Cut this rank's part out of the full tensor `full` (row-major, `full_shape`).
    pub fn take_shard<T: Copy>(&self, full: &[T], shard: Shard) -> Vec<T> {
        let n = shard.size;
        match self.split {
            Split::Replicated => full.to_vec(),
            Split::Rows => {
                let part = full.len() / n;
                full[shard.rank * part..(shard.rank + 1) * part].to_vec()
            }
            Split::Cols => {
                let (rows, cols) = (self.full_shape[0], self.full_shape[1]);
                let w = cols / n;
                let mut out = Vec::with_capacity(rows * w);
                for r in 0..rows {
                    out.extend_from_slice(&full[r * cols + shard.rank * w..][..w]);
                }
                out
            }
        }
    }

    /// Reassemble the full tensor from every rank's part, in rank order (`parts` concatenated).
    pub fn join_shards<T: Copy + Default>(&self, parts: &[T], n: usize) -> Vec<T> {
        match self.split {
            Split::Replicated => parts[..parts.len() / n].to_vec(),
            Split::Rows => parts.to_vec(),
            Split::Cols => {
                let (rows, cols) = (self.full_shape[0], self.full_shape[1]);
                let w = cols / n;
                let mut out = vec![T::default(); rows * cols];
                for (rk, part) in parts.chunks(rows * w).enumerate() {
                    for r in 0..rows {
                        out[r * cols + rk * w..][..w].copy_from_slice(&part[r * w..][..w]);
                    }
                }
                out
            }
        }
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
    let spec = |name: String, shape: Vec<usize>, is_norm| {
        let split = if is_norm {
            Split::Replicated
        } else if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            Split::Cols
        } else {
            Split::Rows
        };
        ParamSpec {
            full_shape: shape.clone(),
            name,
            shape,
            is_norm,
            split,
        }
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
        Self::zeros_shard(b, cfg, Shard::WHOLE)
    }

    /// Zeros in the shapes `shard` holds.
    pub fn zeros_shard(b: &B, cfg: &ModelConfig, shard: Shard) -> Self {
        let specs: Vec<ParamSpec> = param_specs(cfg).iter().map(|s| s.sharded(shard)).collect();
        let bufs = specs.iter().map(|s| b.zeros(s.numel())).collect();
        ParamStore { specs, bufs }
    }

    /// Zeros in the same shapes as `self` (gradients, optimizer moments).
    pub fn zeros_like(&self, b: &B) -> Self {
        ParamStore {
            specs: self.specs.clone(),
            bufs: self.specs.iter().map(|s| b.zeros(s.numel())).collect(),
        }
    }

    /// The `shard` of a full host map (already checked by `from_host`'s rules).
    pub fn from_host_shard(
        b: &B,
        cfg: &ModelConfig,
        map: &TensorMap,
        source: &str,
        shard: Shard,
    ) -> Result<Self> {
        check_host_map(cfg, map, source)?;
        let full = param_specs(cfg);
        let specs: Vec<ParamSpec> = full.iter().map(|s| s.sharded(shard)).collect();
        let bufs = specs
            .iter()
            .map(|s| b.upload(&s.take_shard(&map[&s.name].data, shard)))
            .collect();
        Ok(ParamStore { specs, bufs })
    }

    /// Random initialisation (as `init_random`) of the part `shard` holds: the values are those
    /// of the unsharded model.
    pub fn init_random_shard(b: &B, cfg: &ModelConfig, seed: u64, shard: Shard) -> Self {
        let std = cfg
            .raw
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02);
        let full = param_specs(cfg);
        let specs: Vec<ParamSpec> = full.iter().map(|s| s.sharded(shard)).collect();
        let bufs = specs
            .iter()
            .map(|s| {
                let n: usize = s.full_shape.iter().product();
                let host: Vec<f32> = if s.is_norm {
                    vec![1.0; n]
                } else {
                    let stream = rng::stream_of(&s.name);
                    (0..n as u64)
                        .map(|i| (std * rng::normal(seed, stream, i)) as f32)
                        .collect()
                };
                b.upload(&s.take_shard(&host, shard))
            })
            .collect();
        ParamStore { specs, bufs }
    }

    /// Random initialisation as transformers' LlamaPreTrainedModel: linear and embedding weights
    /// from N(0, initializer_range²), norm weights 1. Each value is a pure function of (seed, name,
    /// index) (`util::rng`), so the result does not depend on how the tensor is later sharded.
    pub fn init_random(b: &B, cfg: &ModelConfig, seed: u64) -> Self {
        Self::init_random_shard(b, cfg, seed, Shard::WHOLE)
    }

    pub fn from_host(b: &B, cfg: &ModelConfig, map: &TensorMap, source: &str) -> Result<Self> {
        Self::from_host_shard(b, cfg, map, source, Shard::WHOLE)
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

/// Every tensor of `cfg` must be in `map` with its full shape, and nothing else (a tied LM head may
/// be present), so a wrong config is caught.
fn check_host_map(cfg: &ModelConfig, map: &TensorMap, source: &str) -> Result<()> {
    let specs = param_specs(cfg);
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
    Ok(())
}
