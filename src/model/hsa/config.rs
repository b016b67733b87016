//! The HSA-UltraLong variant's config.json (`architectures: ["DRTForCausalLM"]`): the keys of the
//! authors' `DRTForCausalLM` (RamstorageAI/long-context-modeling, model/modeling_swa_hsa.py and
//! model/hsa_layers.py; docs/HSA.md §5), typed and checked, with file+key errors.
//!
//! Their checkpoints are saved with an HF `LlamaConfig` plus extra keys, so the Llama keys
//! (vocabulary, heads, RoPE, norms) are parsed by `ModelConfig` — once — and the HSA keys here.
//! `num_hidden_layers` is optional: their model computes it (the flat layer count) at run time.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Map, Value};

use crate::model::config::ModelConfig;

/// Their HSA modules build `RMSNorm(dim)` with Liger's default eps (1e-6), not `rms_norm_eps`:
/// the chunking norm, `k_rmsnorm`, the retrieval `pre_norm` and landmark norms, and the HSA block's
/// `pre_norm`, `q_norm`, `swa_prenorm` and `_mlp_norm`.
pub const HSA_NORM_EPS: f64 = 1e-6;

/// A `DRTForCausalLM` config.
#[derive(Clone, Debug, PartialEq)]
pub struct HsaConfig {
    /// The Llama keys: vocabulary, hidden size, `num_attention_heads` H, `num_key_value_heads`
    /// (the SWA layers' KV heads), `intermediate_size`, `rms_norm_eps`, RoPE, … Its
    /// `num_hidden_layers` is the flat layer count of `layer_kinds`.
    pub base: ModelConfig,
    /// G: KV heads of the chunk memory and retrieval heads (`num_kv_heads`).
    pub num_kv_heads: usize,
    pub num_lower_layers: usize,
    /// SWA layers of all groups together (a multiple of `num_upper_groups`).
    pub num_upper_layers: usize,
    pub num_upper_groups: usize,
    /// W: key j is visible to query t iff t − W ≤ j ≤ t.
    pub sliding_window: usize,
    /// S: tokens per chunk.
    pub chunk_size: usize,
    /// K: chunks retrieved per token and group.
    pub chunk_topk: usize,
    /// d_r: the landmark / retrieval-query width (split into G heads).
    pub retrieval_dim: usize,
    /// 0: mean landmark over `norm(X)`; > 0: that many Qwen2-style blocks of the chunk encoder
    /// (their model/encoder.py; src/model/hsa/encoder.rs).
    pub encoder_layers: usize,
    /// The encoder's input passes an RMSNorm (`enc_prenorm`) first. Only with the encoder (theirs
    /// reads the key only then).
    pub enc_prenorm: bool,
    /// A learned `cls_emb` row is appended to each chunk and the landmark is `lmk_ln` of its
    /// encoder output; otherwise `lmk_ln` of the mean of the chunk's outputs. Theirs defaults it
    /// to `encoder_layers > 0` and asserts the encoder when set.
    pub enable_enc_cls: bool,
    /// `norm_f` eps.
    pub layer_norm_epsilon: f64,
    pub initializer_range: f64,
    /// Fusion weights: softmax of the retrieval scores (true) or stick-breaking (false).
    pub enable_softmax: bool,
    /// Off-by-one softmax inside each chunk: p = exp(a) / (1 + Σ exp a).
    pub enable_softmax1: bool,
    /// RMSNorm over head_dim on the HSA query (`q_norm`) and the chunk keys (`k_rmsnorm`).
    pub enable_qk_norm: bool,
    /// RMSNorm over the retrieval head dim on the retrieval query and landmarks.
    pub enable_lmk_norm: bool,
    /// Chunks are also hidden from retrieval while they overlap the sliding window.
    pub mask_slide_window: bool,
    /// false: the HSA block starts with its own SWA sub-block (`swa_prenorm`, `attn.*`).
    pub hsa_only: bool,
    /// That sub-block's window (`hsa_sliding_window`, default `sliding_window`).
    pub hsa_sliding_window: usize,
    /// true: x + out + mlp(norm(x + out)); false (theirs by default): x + mlp(norm(x + out)).
    pub reset_hsa_residual: bool,
    pub lmk_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// One entry of the flat layer list `backbone.layers.{i}` (their ModuleList order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// A sliding-window decoder layer.
    Swa,
    Chunking,
    /// The retrieval layer of group `g`.
    Retrieval(usize),
    /// The HSA block of group `g`.
    Hsa(usize),
}

/// Reads typed keys from the top-level object, naming the file and key in every error.
struct Keys<'a> {
    obj: &'a Map<String, Value>,
    source: &'a str,
}

impl Keys<'_> {
    fn size(&self, key: &str) -> Result<Option<usize>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                anyhow!(
                    "{}: `{key}` must be a non-negative integer, got {v}",
                    self.source
                )
            }),
        }
    }
    fn required_size(&self, key: &str) -> Result<usize> {
        self.size(key)?.ok_or_else(|| {
            anyhow!(
                "{}: missing `{key}` (required by the HSA model, architectures \
                 [\"DRTForCausalLM\"])",
                self.source
            )
        })
    }
    fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| anyhow!("{}: `{key}` must be a number, got {v}", self.source)),
        }
    }
    fn boolean(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => bail!("{}: `{key}` must be true or false, got {v}", self.source),
        }
    }
}

pub use crate::model::config::is_hsa;

impl HsaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model config {}", path.display()))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parse config.json text; `source` (usually the file name) prefixes every error message.
    pub fn from_json_str(text: &str, source: &str) -> Result<Self> {
        let raw: Value =
            serde_json::from_str(text).map_err(|e| anyhow!("{source}: malformed JSON: {e}"))?;
        let obj = raw
            .as_object()
            .ok_or_else(|| anyhow!("{source}: expected a JSON object at the top level"))?;
        ensure!(
            is_hsa(&raw),
            "{source}: `architectures` must contain \"DRTForCausalLM\" for the HSA model"
        );
        let k = Keys { obj, source };

        let num_lower_layers = k.required_size("num_lower_layers")?;
        let num_upper_layers = k.required_size("num_upper_layers")?;
        let num_upper_groups = k.required_size("num_upper_groups")?;
        let sliding_window = k.required_size("sliding_window")?;
        let chunk_size = k.required_size("chunk_size")?;
        let chunk_topk = k.required_size("chunk_topk")?;
        let retrieval_dim = k.required_size("retrieval_dim")?;
        let encoder_layers = k.required_size("encoder_layers")?;
        let num_kv_heads = k.required_size("num_kv_heads")?;

        // The Llama keys through ModelConfig; it requires `num_hidden_layers`, which theirs
        // sets to the flat layer count.
        let flat = num_lower_layers
            + if num_upper_groups > 0 {
                1 + 2 * num_upper_groups + num_upper_layers
            } else {
                0
            };
        let mut base_obj = obj.clone();
        base_obj.insert("num_hidden_layers".into(), Value::from(flat.max(1)));
        // ModelConfig refuses DRTForCausalLM (a Llama-only command given the HSA model);
        // `to_hf_json` writes it back.
        base_obj.remove("architectures");
        let base = ModelConfig::from_json_str(&Value::Object(base_obj).to_string(), source)?;
        let (d, h) = (base.hidden_size, base.num_attention_heads);
        ensure!(
            base.head_dim * h == d,
            "{source}: `head_dim` ({}) × `num_attention_heads` ({h}) must equal `hidden_size` \
             ({d}) in the HSA model (its projections are d → d)",
            base.head_dim
        );

        ensure!(
            !base.tie_word_embeddings,
            "{source}: `tie_word_embeddings` = true is not supported by the HSA model here (it \
             keeps `lm_head.weight` apart from `backbone.embeddings.weight`)"
        );

        let layer_norm_epsilon = k.number("layer_norm_epsilon")?.unwrap_or(1e-5);
        let initializer_range = k.number("initializer_range")?.unwrap_or(0.02);
        ensure!(
            layer_norm_epsilon > 0.0,
            "{source}: `layer_norm_epsilon` must be > 0"
        );
        ensure!(
            initializer_range > 0.0,
            "{source}: `initializer_range` must be > 0"
        );

        ensure!(
            num_upper_groups > 0,
            "{source}: `num_upper_groups` must be > 0 (a model without HSA groups is a plain SWA \
             model)"
        );
        ensure!(
            num_upper_layers.is_multiple_of(num_upper_groups),
            "{source}: `num_upper_layers` ({num_upper_layers}) must be a multiple of \
             `num_upper_groups` ({num_upper_groups})"
        );
        ensure!(chunk_size > 0, "{source}: `chunk_size` must be > 0");
        ensure!(chunk_topk > 0, "{source}: `chunk_topk` must be > 0");
        ensure!(
            num_kv_heads > 0 && h.is_multiple_of(num_kv_heads),
            "{source}: `num_kv_heads` ({num_kv_heads}) must divide `num_attention_heads` ({h})"
        );
        ensure!(
            retrieval_dim > 0 && retrieval_dim.is_multiple_of(num_kv_heads),
            "{source}: `retrieval_dim` ({retrieval_dim}) must be a positive multiple of \
             `num_kv_heads` ({num_kv_heads})"
        );
        let has_encoder = encoder_layers > 0;
        let enable_enc_cls = k.boolean("enable_enc_cls", has_encoder)?;
        ensure!(
            !enable_enc_cls || has_encoder,
            "{source}: `enable_enc_cls` = true needs the chunk encoder (`encoder_layers` > 0, got \
             0)"
        );
        ensure!(
            !has_encoder || d >= 24,
            "{source}: `encoder_layers` = {encoder_layers} with `hidden_size` {d}: the encoder's \
             SwiGLU width ⌊(8·d/3) / 64⌋·64 is 0 below hidden_size 24"
        );
        // Dropout would make the reference pass random; theirs defaults it to off.
        match obj.get("encoder_dropout") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(v) if v.as_f64() == Some(0.0) => {}
            Some(v) => bail!(
                "{source}: `encoder_dropout` = {v} is not supported by the HSA model here (only \
                 0 / false)"
            ),
        }
        // Options of theirs this implementation refuses rather than silently ignores.
        for key in [
            "singlehead_retrieval",
            "enable_gumbel_noise",
            "enable_pos_decay",
            "skip_hsa",
            "attention_bias",
        ] {
            if k.boolean(key, false)? {
                bail!("{source}: `{key}` = true is not supported by the HSA model here");
            }
        }

        let hsa_only = k.boolean("hsa_only", true)?;
        let hsa_sliding_window = k.size("hsa_sliding_window")?.unwrap_or(sliding_window);
        let id = |key: &str| -> Result<Option<u32>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n <= u32::MAX as u64)
                    .map(|n| Some(n as u32))
                    .ok_or_else(|| anyhow!("{source}: `{key}` must be a token id, got {v}")),
            }
        };
        Ok(HsaConfig {
            base,
            num_kv_heads,
            num_lower_layers,
            num_upper_layers,
            num_upper_groups,
            sliding_window,
            chunk_size,
            chunk_topk,
            retrieval_dim,
            encoder_layers,
            enc_prenorm: has_encoder && k.boolean("enc_prenorm", false)?,
            enable_enc_cls,
            layer_norm_epsilon,
            initializer_range,
            enable_softmax: k.boolean("enable_softmax", false)?,
            enable_softmax1: k.boolean("enable_softmax1", false)?,
            enable_qk_norm: k.boolean("enable_qk_norm", false)?,
            enable_lmk_norm: k.boolean("enable_lmk_norm", false)?,
            mask_slide_window: k.boolean("mask_slide_window", false)?,
            hsa_only,
            hsa_sliding_window,
            reset_hsa_residual: k.boolean("reset_hsa_residual", false)?,
            lmk_token_id: id("lmk_token_id")?,
            pad_token_id: id("pad_token_id")?,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.base.head_dim
    }

    /// The chunk encoder's SwiGLU width, as their `create_encoder`: `int((d·8/3) // 64 · 64)`,
    /// which is ⌊d/24⌋·64 exactly (8d/3 is a multiple of 64 only when d is one of 24, and then
    /// the float division is exact).
    pub fn encoder_intermediate_size(&self) -> usize {
        self.base.hidden_size / 24 * 64
    }

    /// SWA layers per group.
    pub fn group_layers(&self) -> usize {
        self.num_upper_layers / self.num_upper_groups
    }

    /// Retrieval head width: `retrieval_dim / num_kv_heads`.
    pub fn retrieval_head_dim(&self) -> usize {
        self.retrieval_dim / self.num_kv_heads
    }

    /// The flat layer list `backbone.layers.{i}`: lower SWA layers, the chunking layer, then per
    /// group retrieval, HSA block and its SWA layers.
    pub fn layer_kinds(&self) -> Vec<LayerKind> {
        let mut v = vec![LayerKind::Swa; self.num_lower_layers];
        v.push(LayerKind::Chunking);
        for g in 0..self.num_upper_groups {
            v.push(LayerKind::Retrieval(g));
            v.push(LayerKind::Hsa(g));
            v.extend(std::iter::repeat_n(LayerKind::Swa, self.group_layers()));
        }
        v
    }

    /// The config.json to write: the Llama keys as `ModelConfig` writes them (`model_type:
    /// "llama"`, as the authors' saved configs), `architectures: ["DRTForCausalLM"]`, every HSA
    /// key, and no `num_hidden_layers` (their model computes it), so their code loads it back.
    pub fn to_hf_json(&self) -> Value {
        let mut out = self.base.to_hf_json();
        let o = out.as_object_mut().expect("to_hf_json writes an object");
        o.remove("num_hidden_layers");
        o.insert("model_type".into(), "llama".into());
        o.insert(
            "architectures".into(),
            serde_json::json!(["DRTForCausalLM"]),
        );
        let mut put = |k: &str, v: Value| {
            o.insert(k.into(), v);
        };
        put("num_kv_heads", self.num_kv_heads.into());
        put("num_lower_layers", self.num_lower_layers.into());
        put("num_upper_layers", self.num_upper_layers.into());
        put("num_upper_groups", self.num_upper_groups.into());
        put("sliding_window", self.sliding_window.into());
        put("chunk_size", self.chunk_size.into());
        put("chunk_topk", self.chunk_topk.into());
        put("retrieval_dim", self.retrieval_dim.into());
        put("encoder_layers", self.encoder_layers.into());
        put("enc_prenorm", self.enc_prenorm.into());
        put("enable_enc_cls", self.enable_enc_cls.into());
        put("layer_norm_epsilon", self.layer_norm_epsilon.into());
        put("initializer_range", self.initializer_range.into());
        put("enable_softmax", self.enable_softmax.into());
        put("enable_softmax1", self.enable_softmax1.into());
        put("enable_qk_norm", self.enable_qk_norm.into());
        put("enable_lmk_norm", self.enable_lmk_norm.into());
        put("mask_slide_window", self.mask_slide_window.into());
        put("hsa_only", self.hsa_only.into());
        put("hsa_sliding_window", self.hsa_sliding_window.into());
        put("reset_hsa_residual", self.reset_hsa_residual.into());
        put("lmk_token_id", self.lmk_token_id.into());
        put("pad_token_id", self.pad_token_id.into());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const TINY: &str = r#"{
        "architectures": ["DRTForCausalLM"], "model_type": "llama",
        "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_kv_heads": 2, "intermediate_size": 48, "rms_norm_eps": 1e-5,
        "num_lower_layers": 1, "num_upper_layers": 2, "num_upper_groups": 2,
        "sliding_window": 6, "chunk_size": 4, "chunk_topk": 2, "retrieval_dim": 16,
        "encoder_layers": 0, "max_position_embeddings": 256, "rope_theta": 10000.0,
        "enable_softmax": true, "hsa_only": false, "hsa_sliding_window": 3
    }"#;

    #[test]
    fn parses_keys_and_layer_list() {
        let c = HsaConfig::from_json_str(TINY, "tiny.json").unwrap();
        assert_eq!(c.num_kv_heads, 2);
        assert_eq!(c.base.num_key_value_heads, 2);
        assert_eq!(c.base.num_hidden_layers, 1 + 1 + 2 * 2 + 2);
        assert!(c.enable_softmax && !c.hsa_only && !c.enable_softmax1);
        assert_eq!((c.sliding_window, c.hsa_sliding_window), (6, 3));
        assert_eq!(c.layer_norm_epsilon, 1e-5);
        use LayerKind::*;
        assert_eq!(
            c.layer_kinds(),
            vec![
                Swa,
                Chunking,
                Retrieval(0),
                Hsa(0),
                Swa,
                Retrieval(1),
                Hsa(1),
                Swa
            ]
        );
    }

    #[test]
    fn encoder_keys_default_as_theirs() {
        let c = HsaConfig::from_json_str(TINY, "t").unwrap();
        assert!(!c.enable_enc_cls && !c.enc_prenorm);
        // enc_prenorm is read only with the encoder, as theirs.
        let c = HsaConfig::from_json_str(&with("enc_prenorm", Value::from(true)), "t").unwrap();
        assert!(!c.enc_prenorm);
        let mut o: Map<String, Value> = serde_json::from_str(TINY).unwrap();
        o.insert("encoder_layers".into(), Value::from(2));
        o.insert("encoder_dropout".into(), Value::from(0.0));
        let c = HsaConfig::from_json_str(&Value::Object(o.clone()).to_string(), "t").unwrap();
        assert!(c.enable_enc_cls && !c.enc_prenorm);
        // int((32·8/3) // 64 · 64) = 64 in their create_encoder.
        assert_eq!(c.encoder_intermediate_size(), 64);
        o.insert("enable_enc_cls".into(), Value::from(false));
        o.insert("enc_prenorm".into(), Value::from(true));
        let c = HsaConfig::from_json_str(&Value::Object(o.clone()).to_string(), "t").unwrap();
        assert!(!c.enable_enc_cls && c.enc_prenorm);
        for (d, f) in [(24, 64), (47, 64), (48, 128), (64, 128), (1024, 2688)] {
            let want = ((d as f64 * 8.0 / 3.0) / 64.0).floor() as usize * 64;
            assert_eq!(f, want, "hidden_size {d}");
            let mut cd = c.clone();
            cd.base.hidden_size = d;
            assert_eq!(cd.encoder_intermediate_size(), f, "hidden_size {d}");
        }
        o.insert("hidden_size".into(), Value::from(16));
        o.insert("num_attention_heads".into(), Value::from(2));
        o.insert("num_key_value_heads".into(), Value::from(2));
        let e = HsaConfig::from_json_str(&Value::Object(o).to_string(), "t").unwrap_err();
        assert!(format!("{e:#}").contains("below hidden_size 24"), "{e:#}");
    }

    fn with(key: &str, v: Value) -> String {
        let mut o: Map<String, Value> = serde_json::from_str(TINY).unwrap();
        if v.is_null() {
            o.remove(key);
        } else {
            o.insert(key.into(), v);
        }
        Value::Object(o).to_string()
    }

    #[test]
    fn errors_name_file_and_key() {
        let cases = [
            ("chunk_size", Value::Null, "missing `chunk_size`"),
            ("chunk_topk", Value::from("8"), "`chunk_topk` must be"),
            ("num_upper_layers", Value::from(3), "`num_upper_layers` (3)"),
            ("num_kv_heads", Value::from(3), "`num_kv_heads` (3)"),
            ("retrieval_dim", Value::from(15), "`retrieval_dim` (15)"),
            (
                "enable_enc_cls",
                Value::from(true),
                "`enable_enc_cls` = true needs",
            ),
            (
                "encoder_dropout",
                Value::from(0.1),
                "`encoder_dropout` = 0.1",
            ),
            (
                "singlehead_retrieval",
                Value::from(true),
                "`singlehead_retrieval`",
            ),
            (
                "enable_softmax",
                Value::from(1),
                "`enable_softmax` must be true or false",
            ),
            (
                "architectures",
                Value::from(vec!["LlamaForCausalLM"]),
                "DRTForCausalLM",
            ),
        ];
        for (key, v, want) in cases {
            let e = HsaConfig::from_json_str(&with(key, v), "m/config.json").unwrap_err();
            let msg = format!("{e:#}");
            assert!(msg.contains("m/config.json"), "{msg}");
            assert!(msg.contains(want), "{key}: {msg}");
        }
    }
}
