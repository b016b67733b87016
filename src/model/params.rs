//! Parameters by Hugging Face name: the order and shapes of a Llama's tensors, their initial values,
//! and the conversion between a backend's buffers and host tensors (HF directories, checkpoints).
//!
//! The store is a flat list (so the optimizer, norms and checkpoints are loops over it); the model
//! finds each tensor by the index functions below.

use anyhow::{Context, Result, bail};

use crate::backend::Backend;
use crate::io::{HostTensor, MappedTensors, TensorMap};
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
        let tied: &[&str] = if cfg.tie_word_embeddings {
            &["lm_head.weight"]
        } else {
            &[]
        };
        Self::from_host_specs(b, &param_specs(cfg), tied, map, source, shard)
    }

    /// The `shard` of a full host map holding every tensor of `full` with its full shape (and
    /// nothing else but the names of `tolerated`, such as a tied LM head).
    pub fn from_host_specs(
        b: &B,
        full: &[ParamSpec],
        tolerated: &[&str],
        map: &TensorMap,
        source: &str,
        shard: Shard,
    ) -> Result<Self> {
        check_tensor_names(
            full,
            tolerated,
            map.iter().map(|(k, t)| (k.as_str(), t.shape.as_slice())),
            source,
        )?;
        let specs: Vec<ParamSpec> = full.iter().map(|s| s.sharded(shard)).collect();
        let bufs = specs
            .iter()
            .map(|s| b.upload(&s.take_shard(&map[&s.name].data, shard)))
            .collect();
        Ok(ParamStore { specs, bufs })
    }

    /// The `shard` of a model's tensors read straight from (memory-mapped) files: each tensor's
    /// rows or columns of this rank only, so host memory holds this rank's part plus one tensor's
    /// slice — never the whole model (8 ranks of a node reading an 8B model read 16 GB, not 128).
    pub fn from_mapped_shard(
        b: &B,
        cfg: &ModelConfig,
        files: &MappedTensors,
        source: &str,
        shard: Shard,
    ) -> Result<Self> {
        let tied: &[&str] = if cfg.tie_word_embeddings {
            &["lm_head.weight"]
        } else {
            &[]
        };
        Self::from_mapped_specs(b, &param_specs(cfg), tied, files, source, shard)
    }

    /// [`Self::from_mapped_shard`] for the tensors `full` (any architecture's list).
    pub fn from_mapped_specs(
        b: &B,
        full: &[ParamSpec],
        tolerated: &[&str],
        files: &MappedTensors,
        source: &str,
        shard: Shard,
    ) -> Result<Self> {
        check_tensor_names(
            full,
            tolerated,
            files.names().filter_map(|n| Some((n, files.shape(n)?))),
            source,
        )?;
        let specs: Vec<ParamSpec> = full.iter().map(|s| s.sharded(shard)).collect();
        let bufs = specs
            .iter()
            .map(|s| {
                let part = match s.split {
                    Split::Replicated => files.read(&s.name),
                    Split::Rows => {
                        let n = s.shape[0];
                        files.read_rows(&s.name, shard.rank * n..(shard.rank + 1) * n)
                    }
                    Split::Cols => {
                        let n = s.shape[1];
                        files.read_cols(&s.name, shard.rank * n..(shard.rank + 1) * n)
                    }
                }
                .with_context(|| format!("{source}: reading tensor `{}`", s.name))?;
                Ok(b.upload(&part.data))
            })
            .collect::<Result<_>>()?;
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

/// Every tensor of `specs` must be held with its full shape, and nothing else but the names of
/// `tolerated` (a tied LM head), so a wrong config is caught.
fn check_tensor_names<'a>(
    specs: &[ParamSpec],
    tolerated: &[&str],
    held: impl Iterator<Item = (&'a str, &'a [usize])>,
    source: &str,
) -> Result<()> {
    let held: std::collections::BTreeMap<&str, &[usize]> = held.collect();
    for s in specs {
        let shape = held.get(s.name.as_str()).with_context(|| {
            format!(
                "{source}: tensor `{}` is missing (expected shape {:?})",
                s.name, s.full_shape
            )
        })?;
        if *shape != s.full_shape.as_slice() {
            bail!(
                "{source}: tensor `{}` has shape {:?}; the config implies {:?}",
                s.name,
                shape,
                s.full_shape
            );
        }
    }
    let extra: Vec<&str> = held
        .keys()
        .copied()
        .filter(|k| !specs.iter().any(|s| s.name == *k) && !tolerated.contains(k))
        .collect();
    if let Some(k) = extra.first() {
        bail!(
            "{source}: unexpected tensor `{k}` for this config ({} unexpected in all)",
            extra.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The layout against Hugging Face's Llama names and Meta's parameter count, sharding against
    //! matrices cut by hand, and the initialisation and host-map checks by their rules.
    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn cfg(tied: bool) -> ModelConfig {
        ModelConfig::from_json_str(
            &format!(
                r#"{{"vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "initializer_range": 0.5, "tie_word_embeddings": {tied}}}"#
            ),
            "tiny",
        )
        .unwrap()
    }

    #[test]
    fn specs_follow_the_hf_llama_names_and_shapes() {
        let c = cfg(false);
        let specs = param_specs(&c);
        let got: Vec<(&str, &[usize], Split)> = specs
            .iter()
            .map(|s| (s.name.as_str(), s.shape.as_slice(), s.split))
            .collect();
        let layer = |l: usize| -> Vec<(String, Vec<usize>, Split)> {
            let p = format!("model.layers.{l}.");
            vec![
                (
                    format!("{p}input_layernorm.weight"),
                    vec![8],
                    Split::Replicated,
                ),
                (
                    format!("{p}self_attn.q_proj.weight"),
                    vec![8, 8],
                    Split::Rows,
                ),
                (
                    format!("{p}self_attn.k_proj.weight"),
                    vec![4, 8],
                    Split::Rows,
                ),
                (
                    format!("{p}self_attn.v_proj.weight"),
                    vec![4, 8],
                    Split::Rows,
                ),
                (
                    format!("{p}self_attn.o_proj.weight"),
                    vec![8, 8],
                    Split::Cols,
                ),
                (
                    format!("{p}post_attention_layernorm.weight"),
                    vec![8],
                    Split::Replicated,
                ),
                (format!("{p}mlp.gate_proj.weight"), vec![12, 8], Split::Rows),
                (format!("{p}mlp.up_proj.weight"), vec![12, 8], Split::Rows),
                (format!("{p}mlp.down_proj.weight"), vec![8, 12], Split::Cols),
            ]
        };
        let mut want = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![16, 8],
            Split::Rows,
        )];
        want.extend(layer(0));
        want.extend(layer(1));
        want.push(("model.norm.weight".into(), vec![8], Split::Replicated));
        want.push(("lm_head.weight".into(), vec![16, 8], Split::Rows));
        let want: Vec<(&str, &[usize], Split)> = want
            .iter()
            .map(|(n, s, p)| (n.as_str(), s.as_slice(), *p))
            .collect();
        assert_eq!(got, want);
        assert!(
            specs
                .iter()
                .all(|s| s.is_norm == (s.split == Split::Replicated))
        );
        // The index functions find the tensors by name.
        assert_eq!(specs[EMBED].name, "model.embed_tokens.weight");
        assert_eq!(
            specs[layer_index(1, LayerTensor::Down)].name,
            "model.layers.1.mlp.down_proj.weight"
        );
        assert_eq!(
            specs[layer_index(0, LayerTensor::MlpNorm)].name,
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(specs[final_norm_index(&c)].name, "model.norm.weight");
        assert_eq!(specs[lm_head_index(&c)].name, "lm_head.weight");
        // Tied: no lm_head tensor, the head is the embedding.
        let t = cfg(true);
        assert_eq!(param_specs(&t).len(), specs.len() - 1);
        assert_eq!(lm_head_index(&t), EMBED);
    }

    #[test]
    fn llama_3_1_8b_has_meta_s_parameter_count() {
        let c = ModelConfig::from_json_str(
            r#"{"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}"#,
            "llama-3.1-8b",
        )
        .unwrap();
        let n: usize = param_specs(&c).iter().map(ParamSpec::numel).sum();
        // The count transformers reports for meta-llama/Llama-3.1-8B.
        assert_eq!(n, 8_030_261_248);
    }

    #[test]
    fn shards_are_the_rows_or_columns_cut_by_hand() {
        // A [4, 6] matrix holding 0..24.
        let full: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let m = |split| ParamSpec {
            name: "m".into(),
            shape: vec![4, 6],
            is_norm: false,
            split,
            full_shape: vec![4, 6],
        };
        let shard = |rank| Shard { rank, size: 2 };
        let rows = m(Split::Rows);
        assert_eq!(rows.sharded(shard(1)).shape, vec![2, 6]);
        assert_eq!(
            rows.take_shard(&full, shard(1)),
            (12..24).map(|x| x as f32).collect::<Vec<_>>()
        );
        let cols = m(Split::Cols);
        assert_eq!(cols.sharded(shard(1)).shape, vec![4, 3]);
        assert_eq!(
            cols.take_shard(&full, shard(1)),
            vec![3., 4., 5., 9., 10., 11., 15., 16., 17., 21., 22., 23.]
        );
        let rep = m(Split::Replicated);
        assert_eq!(rep.sharded(shard(1)).shape, vec![4, 6]);
        assert_eq!(rep.take_shard(&full, shard(1)), full);
        for s in [rows, cols, rep] {
            let parts: Vec<f32> = (0..2).flat_map(|r| s.take_shard(&full, shard(r))).collect();
            assert_eq!(s.join_shards(&parts, 2), full, "{:?}", s.split);
        }
    }

    #[test]
    fn random_init_is_the_same_whatever_the_sharding_and_follows_hf_rules() {
        let c = cfg(false);
        let b = CpuBackend::<f64>::new();
        let whole = ParamStore::init_random(&b, &c, 7);
        for (i, s) in whole.specs.iter().enumerate() {
            let v = b.download_f64(&whole.bufs[i]);
            if s.is_norm {
                assert!(v.iter().all(|&x| x == 1.0), "{}", s.name);
                continue;
            }
            // N(0, 0.5²): the RMS near the configured deviation (64 to 128 values each).
            let rms = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
            assert!((0.3..0.7).contains(&rms), "{}: rms {rms}", s.name);
            for r in 0..2 {
                let sh = Shard { rank: r, size: 2 };
                let part = ParamStore::init_random_shard(&b, &c, 7, sh);
                let want: Vec<f64> = s.take_shard(&v, sh);
                assert_eq!(b.download_f64(&part.bufs[i]), want, "{} rank {r}", s.name);
            }
        }
        let other = ParamStore::init_random(&b, &c, 8);
        assert_ne!(
            b.download_f64(&other.bufs[EMBED]),
            b.download_f64(&whole.bufs[EMBED]),
            "the seed changes the values"
        );
    }

    #[test]
    fn host_maps_are_checked_by_name_and_shape() {
        let c = cfg(true);
        let b = CpuBackend::<f32>::new();
        let good = ParamStore::init_random(&b, &c, 1).to_host(&b);
        let back = ParamStore::from_host(&b, &c, &good, "src").unwrap();
        assert_eq!(back.to_host(&b), good);
        // A tied model may carry an lm_head copy (transformers writes one).
        let mut with_head = good.clone();
        with_head.insert(
            "lm_head.weight".into(),
            good["model.embed_tokens.weight"].clone(),
        );
        ParamStore::from_host(&b, &c, &with_head, "src").unwrap();
        let err = |m: &TensorMap| {
            ParamStore::from_host(&b, &c, m, "src")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let mut missing = good.clone();
        missing.remove("model.layers.1.mlp.up_proj.weight");
        let e = err(&missing);
        assert!(
            e.contains("src: tensor `model.layers.1.mlp.up_proj.weight` is missing"),
            "{e}"
        );
        let mut shape = good.clone();
        shape.insert(
            "model.norm.weight".into(),
            HostTensor::new(vec![9], vec![1.0; 9]),
        );
        let e = err(&shape);
        assert!(
            e.contains("`model.norm.weight` has shape [9]") && e.contains("[8]"),
            "{e}"
        );
        let mut extra = good.clone();
        extra.insert(
            "model.layers.2.mlp.up_proj.weight".into(),
            HostTensor::new(vec![1], vec![0.0]),
        );
        let e = err(&extra);
        assert!(
            e.contains("unexpected tensor `model.layers.2.mlp.up_proj.weight`"),
            "{e}"
        );
    }
}
