//! The HSA model's tensors by their `DRTForCausalLM` names (HSA.md §5, the authors'
//! `state_dict()`): one flat `ParamStore` in name order, and `Layout`, the index of every tensor
//! the model code reads, with its tensor-parallel split (ctx.rs): SWA heads, MLP columns, the
//! chunk memory / retrieval / HSA tensors by group, embedding and LM head by vocabulary row;
//! norms and the chunk encoder replicated. Initialisation as theirs: N(0, initializer_range²) weights (and
//! `cls_emb`), norms 1, biases 0.

use crate::backend::Backend;
use crate::model::hsa::config::{HsaConfig, LayerKind};
use crate::model::params::{ParamSpec, ParamStore, Split};
use crate::util::rng;

/// q/k/v/o projections and per-head QK norms of a sliding-window attention.
#[derive(Clone, Copy, Debug)]
pub struct AttnIdx {
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub o: usize,
    pub q_norm: usize,
    pub k_norm: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct MlpIdx {
    pub gate: usize,
    pub up: usize,
    pub down: usize,
}

/// One Qwen2-style block of the chunk encoder (their model/encoder.py): an SWA-shaped attention
/// whose q/k/v projections carry biases, and a SwiGLU MLP of width
/// `HsaConfig::encoder_intermediate_size`.
#[derive(Clone, Copy, Debug)]
pub struct EncLayerIdx {
    pub in_norm: usize,
    pub attn: AttnIdx,
    pub q_bias: usize,
    pub k_bias: usize,
    pub v_bias: usize,
    pub post_norm: usize,
    pub mlp: MlpIdx,
}

/// The chunking layer's encoder (`encoder_layers > 0`): `backbone.layers.{i}.encoder.*`, with
/// `cls_emb` (`[1, 1, d]`) under `enable_enc_cls` and `enc_prenorm` under that key.
#[derive(Clone, Debug)]
pub struct EncoderIdx {
    pub cls: Option<usize>,
    pub prenorm: Option<usize>,
    pub layers: Vec<EncLayerIdx>,
    /// `encoder.norm`, on the last block's output.
    pub norm: usize,
}

#[derive(Clone, Copy, Debug)]
pub enum LayerIdx {
    Swa {
        in_norm: usize,
        attn: AttnIdx,
        post_norm: usize,
        mlp: MlpIdx,
    },
    Chunking {
        /// The chunking `norm` (E = norm(X)); absent with the encoder, as theirs (its blocks are
        /// in `Layout::encoder`).
        norm: Option<usize>,
        proj_k: usize,
        proj_v: usize,
        lmk_ln: usize,
        k_norm: Option<usize>,
    },
    Retrieval {
        group: usize,
        pre_norm: usize,
        ln: usize,
        /// (`lmk_q_norm`, `lmk_k_norm`) with `enable_lmk_norm`.
        lmk_norms: Option<(usize, usize)>,
    },
    Hsa {
        group: usize,
        /// (`swa_prenorm`, `attn.*`) unless `hsa_only`.
        swa: Option<(usize, AttnIdx)>,
        pre_norm: usize,
        q_proj: usize,
        o_proj: usize,
        q_norm: Option<usize>,
        mlp_norm: usize,
        mlp: MlpIdx,
    },
}

/// Where each tensor sits in the store.
#[derive(Clone, Debug)]
pub struct Layout {
    pub specs: Vec<ParamSpec>,
    pub embed: usize,
    pub layers: Vec<LayerIdx>,
    /// The chunk encoder of the chunking layer, if `encoder_layers > 0`.
    pub encoder: Option<EncoderIdx>,
    pub norm_f: usize,
    pub lm_head: usize,
}

struct Builder {
    specs: Vec<ParamSpec>,
}

impl Builder {
    fn add(&mut self, name: String, shape: Vec<usize>, split: Split) -> usize {
        self.specs.push(ParamSpec {
            name,
            is_norm: shape.len() == 1,
            full_shape: shape.clone(),
            shape,
            split,
        });
        self.specs.len() - 1
    }
    fn norm(&mut self, name: String, dim: usize) -> usize {
        self.add(name, vec![dim], Split::Replicated)
    }
    fn col(&mut self, name: String, out: usize, inp: usize) -> usize {
        self.add(name, vec![out, inp], Split::Rows)
    }
    fn row(&mut self, name: String, out: usize, inp: usize) -> usize {
        self.add(name, vec![out, inp], Split::Cols)
    }
    /// The bias of a column-parallel projection: split like its rows. Marked `is_norm` for what
    /// that flag decides: not initialised randomly (`init_random` sets biases to 0, as their
    /// `_init_weights`) and not weight-decayed (HF Trainer's decay list leaves biases out).
    fn bias(&mut self, name: String, out: usize) -> usize {
        self.add(name, vec![out], Split::Rows)
    }
    fn attn(&mut self, p: &str, c: &HsaConfig) -> AttnIdx {
        let (d, dh) = (c.base.hidden_size, c.head_dim());
        let (hq, hk) = (c.base.num_attention_heads, c.base.num_key_value_heads);
        AttnIdx {
            q: self.col(format!("{p}.q_proj.weight"), hq * dh, d),
            k: self.col(format!("{p}.k_proj.weight"), hk * dh, d),
            v: self.col(format!("{p}.v_proj.weight"), hk * dh, d),
            o: self.row(format!("{p}.o_proj.weight"), d, hq * dh),
            q_norm: self.norm(format!("{p}.q_norm.weight"), dh),
            k_norm: self.norm(format!("{p}.k_norm.weight"), dh),
        }
    }
    fn mlp(&mut self, p: &str, c: &HsaConfig) -> MlpIdx {
        self.mlp_width(p, c.base.hidden_size, c.base.intermediate_size)
    }
    fn mlp_width(&mut self, p: &str, d: usize, f: usize) -> MlpIdx {
        MlpIdx {
            gate: self.col(format!("{p}.gate_proj.weight"), f, d),
            up: self.col(format!("{p}.up_proj.weight"), f, d),
            down: self.row(format!("{p}.down_proj.weight"), d, f),
        }
    }
    /// `{p}.encoder.*`, `{p}.enc_prenorm`, `{p}.cls_emb` of the chunking layer `p`.
    fn encoder(&mut self, p: &str, c: &HsaConfig) -> EncoderIdx {
        let (d, dh) = (c.base.hidden_size, c.head_dim());
        let (hq, hk) = (c.base.num_attention_heads, c.base.num_key_value_heads);
        let layers = (0..c.encoder_layers)
            .map(|j| {
                let q = format!("{p}.encoder.layers.{j}");
                // Their state_dict order: self_attn, mlp, then the two norms.
                let attn = self.attn(&format!("{q}.self_attn"), c);
                let q_bias = self.bias(format!("{q}.self_attn.q_proj.bias"), hq * dh);
                let k_bias = self.bias(format!("{q}.self_attn.k_proj.bias"), hk * dh);
                let v_bias = self.bias(format!("{q}.self_attn.v_proj.bias"), hk * dh);
                let mlp = self.mlp_width(&format!("{q}.mlp"), d, c.encoder_intermediate_size());
                EncLayerIdx {
                    in_norm: self.norm(format!("{q}.input_layernorm.weight"), d),
                    attn,
                    q_bias,
                    k_bias,
                    v_bias,
                    post_norm: self.norm(format!("{q}.post_attention_layernorm.weight"), d),
                    mlp,
                }
            })
            .collect();
        EncoderIdx {
            layers,
            norm: self.norm(format!("{p}.encoder.norm.weight"), d),
            prenorm: c
                .enc_prenorm
                .then(|| self.norm(format!("{p}.enc_prenorm.weight"), d)),
            cls: c
                .enable_enc_cls
                .then(|| self.add(format!("{p}.cls_emb"), vec![1, 1, d], Split::Replicated)),
        }
    }
}

impl Layout {
    pub fn new(c: &HsaConfig) -> Layout {
        let (d, dh, g) = (c.base.hidden_size, c.head_dim(), c.num_kv_heads);
        let mut b = Builder { specs: Vec::new() };
        let embed = b.col("backbone.embeddings.weight".into(), c.base.vocab_size, d);
        let mut layers = Vec::new();
        let mut encoder = None;
        for (i, kind) in c.layer_kinds().into_iter().enumerate() {
            let p = format!("backbone.layers.{i}");
            layers.push(match kind {
                LayerKind::Swa => LayerIdx::Swa {
                    in_norm: b.norm(format!("{p}.input_layernorm.weight"), d),
                    attn: b.attn(&format!("{p}.self_attn"), c),
                    post_norm: b.norm(format!("{p}.post_attention_layernorm.weight"), d),
                    mlp: b.mlp(&format!("{p}.mlp"), c),
                },
                LayerKind::Chunking => LayerIdx::Chunking {
                    norm: if c.encoder_layers > 0 {
                        // Replicated over TP: every rank runs the whole chunk encoder.
                        let first = b.specs.len();
                        encoder = Some(b.encoder(&p, c));
                        for s in &mut b.specs[first..] {
                            s.split = Split::Replicated;
                        }
                        None
                    } else {
                        Some(b.norm(format!("{p}.norm.weight"), d))
                    },
                    proj_k: b.col(format!("{p}.proj_k.weight"), g * dh, d),
                    proj_v: b.col(format!("{p}.proj_v.weight"), g * dh, d),
                    lmk_ln: b.col(format!("{p}.lmk_ln.weight"), c.retrieval_dim, d),
                    k_norm: c
                        .enable_qk_norm
                        .then(|| b.norm(format!("{p}.k_rmsnorm.weight"), dh)),
                },
                LayerKind::Retrieval(group) => LayerIdx::Retrieval {
                    group,
                    pre_norm: b.norm(format!("{p}.pre_norm.weight"), d),
                    ln: b.col(format!("{p}.ln.weight"), c.retrieval_dim, d),
                    lmk_norms: c.enable_lmk_norm.then(|| {
                        let r = c.retrieval_head_dim();
                        (
                            b.norm(format!("{p}.lmk_q_norm.weight"), r),
                            b.norm(format!("{p}.lmk_k_norm.weight"), r),
                        )
                    }),
                },
                LayerKind::Hsa(group) => LayerIdx::Hsa {
                    group,
                    pre_norm: b.norm(format!("{p}.pre_norm.weight"), d),
                    q_proj: b.col(format!("{p}.q_proj.weight"), d, d),
                    o_proj: b.row(format!("{p}.o_proj.weight"), d, d),
                    q_norm: c
                        .enable_qk_norm
                        .then(|| b.norm(format!("{p}.q_norm.weight"), dh)),
                    swa: (!c.hsa_only).then(|| {
                        (
                            b.norm(format!("{p}.swa_prenorm.weight"), d),
                            b.attn(&format!("{p}.attn"), c),
                        )
                    }),
                    mlp_norm: b.norm(format!("{p}._mlp_norm.weight"), d),
                    mlp: b.mlp(&format!("{p}._mlp"), c),
                },
            });
        }
        let norm_f = b.norm("backbone.norm_f.weight".into(), d);
        let lm_head = b.col("lm_head.weight".into(), c.base.vocab_size, d);
        Layout {
            specs: b.specs,
            embed,
            layers,
            encoder,
            norm_f,
            lm_head,
        }
    }

    pub fn zeros<B: Backend>(&self, b: &B) -> ParamStore<B> {
        ParamStore {
            specs: self.specs.clone(),
            bufs: self.specs.iter().map(|s| b.zeros(s.numel())).collect(),
        }
    }

    /// Weights from N(0, std²) as a pure function of (seed, name, index) (`util::rng`), norms 1.
    pub fn init_random<B: Backend>(&self, b: &B, std: f64, seed: u64) -> ParamStore<B> {
        let bufs = self
            .specs
            .iter()
            .map(|s| {
                let host: Vec<f32> = if s.is_norm {
                    let v = if s.name.ends_with(".bias") { 0.0 } else { 1.0 };
                    vec![v; s.numel()]
                } else {
                    let stream = rng::stream_of(&s.name);
                    (0..s.numel() as u64)
                        .map(|i| (std * rng::normal(seed, stream, i)) as f32)
                        .collect()
                };
                b.upload(&host)
            })
            .collect();
        ParamStore {
            specs: self.specs.clone(),
            bufs,
        }
    }
}
