//! Hugging Face `config.json` of the Llama 3.x family: parse (both rope forms: transformers 4.x
//! `rope_scaling`, 5.x `rope_parameters`), validate the shapes, and write back a config that either
//! transformers generation loads the same way.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// How RoPE frequencies are scaled; one variant per HF `rope_type` we support.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
}

impl RopeScaling {
    /// HF's `rope_type` string for this variant.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::Yarn { .. } => "yarn",
        }
    }

    /// The type-specific keys as HF writes them (no `rope_type`, `type` or `rope_theta`).
    fn hf_params(&self) -> Map<String, Value> {
        let mut m = Map::new();
        match *self {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => {
                m.insert("factor".into(), json!(factor));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                m.insert("factor".into(), json!(factor));
                m.insert("low_freq_factor".into(), json!(low_freq_factor));
                m.insert("high_freq_factor".into(), json!(high_freq_factor));
                m.insert(
                    "original_max_position_embeddings".into(),
                    integral_json(original_max_position_embeddings),
                );
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                m.insert("factor".into(), json!(factor));
                m.insert(
                    "original_max_position_embeddings".into(),
                    integral_json(original_max_position_embeddings),
                );
                m.insert("beta_fast".into(), json!(beta_fast));
                m.insert("beta_slow".into(), json!(beta_slow));
                if let Some(x) = mscale {
                    m.insert("mscale".into(), json!(x));
                }
                if let Some(x) = mscale_all_dim {
                    m.insert("mscale_all_dim".into(), json!(x));
                }
                if let Some(x) = attention_factor {
                    m.insert("attention_factor".into(), json!(x));
                }
                // HF's default is true, and transformers before `truncate` existed warn about the
                // key as unrecognised: write it only when it changes something.
                if !truncate {
                    m.insert("truncate".into(), json!(false));
                }
            }
        }
        m
    }
}

/// A Llama 3.x `config.json`, with the fields the trainer uses pulled out and typed.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// From `head_dim` if present, else `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// HF allows one id or a list; one id becomes a list of one.
    pub eos_token_id: Option<Vec<u32>>,
    pub rope_scaling: RopeScaling,
    /// The whole original JSON object, so keys we do not model survive a save.
    pub raw: Value,
}

// HF LlamaConfig defaults for keys a config.json may leave out.
const DEFAULT_RMS_NORM_EPS: f64 = 1e-6;
const DEFAULT_ROPE_THETA: f64 = 10000.0;
const DEFAULT_MAX_POSITION_EMBEDDINGS: usize = 2048;
// HF's YaRN defaults (the YaRN paper's values for Llama).
const DEFAULT_YARN_BETA_FAST: f64 = 32.0;
const DEFAULT_YARN_BETA_SLOW: f64 = 1.0;

const SUPPORTED_ROPE_TYPES: &str = "default, linear, llama3, yarn";

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model config {}", path.display()))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parse config.json text; `source` (usually the file name) prefixes every error message.
    pub fn from_json_str(text: &str, source: &str) -> Result<Self> {
        let raw: Value =
            serde_json::from_str(text).map_err(|e| anyhow!("{source}: malformed JSON: {e}"))?;
        let obj = raw.as_object().ok_or_else(|| {
            anyhow!(
                "{source}: expected a JSON object at the top level, got {}",
                kind(&raw)
            )
        })?;
        if is_hsa(&raw) {
            bail!(
                "{source}: architectures [\"DRTForCausalLM\"] is the HSA model, which this command \
                 does not take (the HSA model runs under init, train, export, forward, generate, \
                 eval and bench train)"
            );
        }
        let top = Keys::new(obj, "", source);

        let vocab_size = top.required(Keys::size, "vocab_size")?;
        let hidden_size = top.required(Keys::size, "hidden_size")?;
        let intermediate_size = top.required(Keys::size, "intermediate_size")?;
        let num_hidden_layers = top.required(Keys::size, "num_hidden_layers")?;
        let num_attention_heads = top.required(Keys::size, "num_attention_heads")?;
        // HF: a config without kv heads is plain multi-head attention.
        let num_key_value_heads = top
            .size("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        for (key, v) in [
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("num_key_value_heads", num_key_value_heads),
        ] {
            ensure!(v > 0, "{source}: `{key}` must be > 0, got 0");
        }
        let head_dim = match top.size("head_dim")? {
            Some(h) => h,
            None => {
                ensure!(
                    hidden_size.is_multiple_of(num_attention_heads),
                    "{source}: `hidden_size` ({hidden_size}) is not divisible by \
                     `num_attention_heads` ({num_attention_heads}) and there is no `head_dim`"
                );
                hidden_size / num_attention_heads
            }
        };
        ensure!(
            head_dim > 0 && head_dim.is_multiple_of(2),
            "{source}: `head_dim` must be a positive even number (RoPE rotates pairs), got {head_dim}"
        );
        ensure!(
            num_attention_heads.is_multiple_of(num_key_value_heads),
            "{source}: `num_attention_heads` ({num_attention_heads}) is not divisible by \
             `num_key_value_heads` ({num_key_value_heads})"
        );

        let rms_norm_eps = top.number("rms_norm_eps")?.unwrap_or(DEFAULT_RMS_NORM_EPS);
        ensure!(
            rms_norm_eps > 0.0,
            "{source}: `rms_norm_eps` must be > 0, got {rms_norm_eps}"
        );
        let max_position_embeddings = top
            .size("max_position_embeddings")?
            .unwrap_or(DEFAULT_MAX_POSITION_EMBEDDINGS);
        ensure!(
            max_position_embeddings > 0,
            "{source}: `max_position_embeddings` must be > 0, got 0"
        );
        let tie_word_embeddings = top.boolean("tie_word_embeddings")?.unwrap_or(false);
        let bos_token_id = top.token_id("bos_token_id")?;
        let eos_token_id = match top.get("eos_token_id") {
            None => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| top.token_id_value(v, &format!("eos_token_id[{i}]")))
                    .collect::<Result<Vec<u32>>>()?,
            ),
            Some(v) => Some(vec![top.token_id_value(v, "eos_token_id").map_err(|_| {
                anyhow!(
                    "{source}: `eos_token_id` must be a token id or a list of token ids, got {} {v}",
                    kind(v)
                )
            })?]),
        };

        let (rope_scaling, rope_theta) = parse_rope(obj, source, max_position_embeddings)?;

        Ok(ModelConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            tie_word_embeddings,
            bos_token_id,
            eos_token_id,
            rope_scaling,
            raw,
        })
    }

    /// HF config.json text to save: `raw` with every field above written back; rope scaling written in BOTH
    /// forms (transformers 4.x `rope_scaling` object with `rope_type` and also `type`; 5.x `rope_parameters`
    /// with `rope_type` and `rope_theta`), `rope_theta` kept at top level too; for yarn, keep `factor` ==
    /// max_position_embeddings / original_max_position_embeddings consistent when the caller set them so.
    pub fn to_hf_json(&self) -> Value {
        let mut out = match &self.raw {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        // transformers' Auto* classes dispatch on these; configs written by hand (the tiny ones
        // of `init`) may lack them.
        for (key, v) in [
            ("model_type", json!("llama")),
            ("architectures", json!(["LlamaForCausalLM"])),
        ] {
            out.entry(key.to_string()).or_insert(v);
        }
        let mut put = |key: &str, v: Value| {
            out.insert(key.to_string(), v);
        };
        put("vocab_size", json!(self.vocab_size));
        put("hidden_size", json!(self.hidden_size));
        put("intermediate_size", json!(self.intermediate_size));
        put("num_hidden_layers", json!(self.num_hidden_layers));
        put("num_attention_heads", json!(self.num_attention_heads));
        put("num_key_value_heads", json!(self.num_key_value_heads));
        put("head_dim", json!(self.head_dim));
        put("rms_norm_eps", json!(self.rms_norm_eps));
        put("rope_theta", json!(self.rope_theta));
        put(
            "max_position_embeddings",
            json!(self.max_position_embeddings),
        );
        put("tie_word_embeddings", json!(self.tie_word_embeddings));
        put("bos_token_id", json!(self.bos_token_id));
        // Keep the original's single-id form when there is still a single id.
        let eos = match &self.eos_token_id {
            None => Value::Null,
            Some(ids)
                if ids.len() == 1 && self.raw.get("eos_token_id").is_some_and(Value::is_number) =>
            {
                json!(ids[0])
            }
            Some(ids) => json!(ids),
        };
        put("eos_token_id", eos);

        let params = self.rope_scaling.hf_params();
        let rope_type = self.rope_scaling.rope_type();
        // 4.x: null means default; with a type, 4.43+ reads `rope_type`, older code and 4.x's own
        // back-compat path read `type` (and let it win), so both carry the same name.
        let rope_scaling = match self.rope_scaling {
            RopeScaling::Default => Value::Null,
            _ => {
                let mut m = params.clone();
                m.insert("rope_type".into(), json!(rope_type));
                m.insert("type".into(), json!(rope_type));
                Value::Object(m)
            }
        };
        put("rope_scaling", rope_scaling);
        let mut m = params;
        m.insert("rope_type".into(), json!(rope_type));
        m.insert("rope_theta".into(), json!(self.rope_theta));
        put("rope_parameters", Value::Object(m));
        Value::Object(out)
    }

    /// Replace the rope scaling (e.g. extend context with YaRN) and max_position_embeddings.
    pub fn with_rope_scaling(&self, rope: RopeScaling, max_position_embeddings: usize) -> Self {
        ModelConfig {
            rope_scaling: rope,
            max_position_embeddings,
            ..self.clone()
        }
    }

    /// Total parameter count: embedding, per layer (q, k, v, o, gate, up, down, two RMSNorm weights),
    /// final norm, and the LM head unless tied. Llama has no biases.
    pub fn n_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attention = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * self.intermediate_size;
        let layer = attention + mlp + 2 * h;
        let embedding = self.vocab_size * h;
        let lm_head = if self.tie_word_embeddings {
            0
        } else {
            embedding
        };
        embedding + self.num_hidden_layers * layer + h + lm_head
    }
}

/// A new RoPE scaling for a run, e.g. YaRN for the one-step context extension (docs/RECIPE.md §3): a run
/// config's `[model.rope_scaling]`, HF's key names. Built by the same code as a config.json's
/// rope object ([`ModelConfig::with_rope_override`]).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RopeOverride {
    /// "yarn", "linear", "llama3", "default", or "ntk" (NTK-aware: default RoPE with
    /// `rope_theta · factor^(d/(d−2))`).
    pub rope_type: String,
    pub factor: Option<f64>,
    pub original_max_position_embeddings: Option<f64>,
    pub beta_fast: Option<f64>,
    pub beta_slow: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub attention_factor: Option<f64>,
    pub truncate: Option<bool>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    /// The new context window (HF `max_position_embeddings`).
    pub max_position_embeddings: usize,
}

/// Where an override's keys live in a run config (error messages name them so).
const OVERRIDE_KEY: &str = "model.rope_scaling";

impl ModelConfig {
    /// This config with a run's RoPE override applied (the one-step context extension), built
    /// and checked by the same code as a config.json's rope object; errors name `source` (the run
    /// config) and `model.rope_scaling.KEY`. Besides the HF rope types, `"ntk"` is NTK-aware
    /// scaling (bloc97, 2023; the YaRN paper §3.1): plain RoPE with `rope_theta · factor^(d/(d−2))`,
    /// d = head_dim — an ablation baseline, written to config.json as the default rope type with
    /// the new `rope_theta`.
    pub fn with_rope_override(&self, o: &RopeOverride, source: &str) -> Result<ModelConfig> {
        if o.rope_type == "ntk" {
            let factor = o.factor.with_context(|| {
                format!("{source}: `{OVERRIDE_KEY}.factor` is required for rope_type \"ntk\"")
            })?;
            ensure!(
                factor >= 1.0 && factor.is_finite(),
                "{source}: `{OVERRIDE_KEY}.factor` = {factor}: NTK-aware scaling needs a finite \
                 factor >= 1"
            );
            let d = self.head_dim as f64;
            let mut out = self.with_rope_scaling(RopeScaling::Default, o.max_position_embeddings);
            out.rope_theta = self.rope_theta * factor.powf(d / (d - 2.0));
            return Ok(out);
        }
        if !["default", "linear", "llama3", "yarn"].contains(&o.rope_type.as_str()) {
            bail!(
                "{source}: `{OVERRIDE_KEY}.rope_type` = {:?}: expected one of \
                 {SUPPORTED_ROPE_TYPES}, ntk",
                o.rope_type
            );
        }
        let Value::Object(obj) = serde_json::to_value(o)? else {
            unreachable!("a struct serialises to an object")
        };
        let keys = Keys::new(&obj, OVERRIDE_KEY, source);
        let (scaling, _) = parse_rope_object(&keys, o.max_position_embeddings, None, None)?;
        Ok(self.with_rope_scaling(scaling, o.max_position_embeddings))
    }
}

/// Reads the rope scaling and rope_theta from either form. When a config carries both forms they
/// must agree: transformers 4.x and 5.x would each read `rope_scaling` there, but a disagreement
/// means one of them was edited by hand, and a silently wrong RoPE ruins a long-context run.
fn parse_rope(
    obj: &Map<String, Value>,
    source: &str,
    max_position_embeddings: usize,
) -> Result<(RopeScaling, f64)> {
    let top = Keys::new(obj, "", source);
    let top_theta = top.number("rope_theta")?;
    let top_original = top.number("original_max_position_embeddings")?;

    let mut forms = Vec::new();
    for name in ["rope_scaling", "rope_parameters"] {
        match top.get(name) {
            None => {}
            Some(Value::Object(m)) => {
                let keys = Keys::new(m, name, source);
                let parsed = parse_rope_object(
                    &keys,
                    max_position_embeddings,
                    top_original,
                    Some(max_position_embeddings as f64),
                )?;
                forms.push((name, parsed));
            }
            Some(v) => bail!(
                "{source}: `{name}` must be an object or null, got {} {v}",
                kind(v)
            ),
        }
    }

    let mut scaling: Option<(&str, RopeScaling)> = None;
    let mut theta: Option<(String, f64)> = top_theta.map(|t| ("rope_theta".to_string(), t));
    for (name, (s, t)) in forms {
        if let Some((first, prev)) = &scaling {
            ensure!(
                *prev == s,
                "{source}: `{first}` ({prev:?}) and `{name}` ({s:?}) disagree; \
                 keep one of them or make them equal"
            );
        } else {
            scaling = Some((name, s));
        }
        if let Some(t) = t {
            let key = format!("{name}.rope_theta");
            if let Some((first, prev)) = &theta {
                ensure!(
                    *prev == t,
                    "{source}: `{first}` ({prev}) and `{key}` ({t}) disagree"
                );
            } else {
                theta = Some((key, t));
            }
        }
    }
    let rope_theta = theta.map_or(DEFAULT_ROPE_THETA, |(_, t)| t);
    ensure!(
        rope_theta.is_finite() && rope_theta > 1.0,
        "{source}: `rope_theta` must be a finite number > 1, got {rope_theta}"
    );
    Ok((scaling.map_or(RopeScaling::Default, |(_, s)| s), rope_theta))
}

/// The one builder of a [`RopeScaling`], from a `rope_scaling` / `rope_parameters` object of a
/// config.json or a run config's `[model.rope_scaling]` ([`ModelConfig::with_rope_override`]):
/// the scaling and the object's own `rope_theta`, if any. Checks the keys each type needs, that
/// they are finite and positive, and llama3's `high_freq_factor > low_freq_factor`.
/// `fallback_original` is YaRN's original context when the object names none: HF's rule (the
/// config's `max_position_embeddings`) for a config.json, none for an override, whose
/// `max_position_embeddings` is the new window.
fn parse_rope_object(
    keys: &Keys,
    max_position_embeddings: usize,
    top_original: Option<f64>,
    fallback_original: Option<f64>,
) -> Result<(RopeScaling, Option<f64>)> {
    let (name, source) = (keys.prefix, keys.source);
    let theta = keys.number("rope_theta")?;
    let (rope_type, type_key) = match (keys.string("rope_type")?, keys.string("type")?) {
        (Some(a), Some(b)) if a != b => bail!(
            "{source}: `{name}.rope_type` is {a:?} but the legacy `{name}.type` is {b:?}; \
             remove one or make them equal"
        ),
        (Some(a), _) => (a, "rope_type"),
        (None, Some(b)) => (b, "type (legacy name of rope_type)"),
        (None, None) => {
            // transformers 5.x reads a missing type as "default"; accept that only when nothing
            // else in the object would be ignored by it.
            if keys.obj.keys().all(|k| k == "rope_theta") {
                return Ok((RopeScaling::Default, theta));
            }
            bail!("{source}: missing `{name}.rope_type` (expected one of {SUPPORTED_ROPE_TYPES})")
        }
    };
    let need = |key: &str| -> Result<f64> {
        keys.positive(key)?.ok_or_else(|| {
            anyhow!("{source}: missing required key `{name}.{key}` for rope_type {rope_type:?}")
        })
    };
    // transformers 5.x lets a top-level original_max_position_embeddings override the one in the
    // rope object (Phi-3 style); 4.x reads the rope object's. Accept only configs where that is moot.
    if let (Some(own), Some(top)) = (
        keys.number("original_max_position_embeddings")?,
        top_original,
    ) {
        ensure!(
            own == top,
            "{source}: `{name}.original_max_position_embeddings` ({own}) and the top-level \
             `original_max_position_embeddings` ({top}) disagree"
        );
    }
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => {
            let factor = need("factor")?;
            let low_freq_factor = need("low_freq_factor")?;
            let high_freq_factor = need("high_freq_factor")?;
            let original_max_position_embeddings = need("original_max_position_embeddings")?;
            // The blend between the two bands divides by their difference.
            ensure!(
                high_freq_factor > low_freq_factor,
                "{source}: `{name}.high_freq_factor` ({high_freq_factor}) must be greater than \
                 `{name}.low_freq_factor` ({low_freq_factor})"
            );
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }
        }
        "yarn" => {
            let own_original = keys.positive("original_max_position_embeddings")?;
            let known_original = own_original.or(top_original);
            let factor = match keys.positive("factor")? {
                Some(f) => f,
                // transformers 4.51-4.55 derived the factor from the two lengths.
                None => match known_original {
                    Some(o) => max_position_embeddings as f64 / o,
                    None => bail!(
                        "{source}: missing required key `{name}.factor` for rope_type \"yarn\" \
                         (and no `original_max_position_embeddings` to derive it from)"
                    ),
                },
            };
            let original_max_position_embeddings =
                known_original.or(fallback_original).ok_or_else(|| {
                    anyhow!(
                        "{source}: missing required key `{name}.original_max_position_embeddings` \
                         for rope_type \"yarn\" (`max_position_embeddings` is the new window)"
                    )
                })?;
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast: keys
                    .positive("beta_fast")?
                    .unwrap_or(DEFAULT_YARN_BETA_FAST),
                beta_slow: keys
                    .positive("beta_slow")?
                    .unwrap_or(DEFAULT_YARN_BETA_SLOW),
                mscale: keys.number("mscale")?,
                mscale_all_dim: keys.number("mscale_all_dim")?,
                attention_factor: keys.positive("attention_factor")?,
                truncate: keys.boolean("truncate")?.unwrap_or(true),
            }
        }
        other => bail!(
            "{source}: unsupported rope type {other:?} in `{name}.{type_key}`; \
             supported rope_type values: {SUPPORTED_ROPE_TYPES}"
        ),
    };
    Ok((scaling, theta))
}

/// Typed access to one JSON object's keys; errors name the file and the full key path.
/// A key set to null counts as absent, as in HF.
struct Keys<'a> {
    obj: &'a Map<String, Value>,
    prefix: &'a str,
    source: &'a str,
}

impl<'a> Keys<'a> {
    fn new(obj: &'a Map<String, Value>, prefix: &'a str, source: &'a str) -> Self {
        Keys {
            obj,
            prefix,
            source,
        }
    }

    fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn wrong_type(&self, key: &str, expected: &str, v: &Value) -> anyhow::Error {
        anyhow!(
            "{}: `{}` must be {expected}, got {} {v}",
            self.source,
            self.path(key),
            kind(v)
        )
    }

    fn required<T>(&self, read: fn(&Self, &str) -> Result<Option<T>>, key: &str) -> Result<T> {
        read(self, key)?
            .ok_or_else(|| anyhow!("{}: missing required key `{}`", self.source, self.path(key)))
    }

    fn number(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.wrong_type(key, "a number", v))
            })
            .transpose()
    }

    fn positive(&self, key: &str) -> Result<Option<f64>> {
        let x = self.number(key)?;
        if let Some(x) = x {
            ensure!(
                x > 0.0 && x.is_finite(),
                "{}: `{}` must be a finite number > 0, got {x}",
                self.source,
                self.path(key)
            );
        }
        Ok(x)
    }

    /// A non-negative integer; an integral float such as `8192.0` is accepted (Python writes those).
    fn size(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                as_integer(v)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
            })
            .transpose()
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.wrong_type(key, "true or false", v))
            })
            .transpose()
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, "a string", v))
            })
            .transpose()
    }

    fn token_id(&self, key: &str) -> Result<Option<u32>> {
        self.get(key)
            .map(|v| self.token_id_value(v, key))
            .transpose()
    }

    fn token_id_value(&self, v: &Value, key: &str) -> Result<u32> {
        as_integer(v)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.wrong_type(key, "a token id (integer in 0..2^32)", v))
    }
}

fn as_integer(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|x| *x >= 0.0 && x.fract() == 0.0 && *x < 2f64.powi(53))
            .map(|x| x as u64)
    })
}

/// An integral length as a JSON integer (HF's validators expect `int` there), anything else as a float.
fn integral_json(x: f64) -> Value {
    if x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(53) {
        json!(x as u64)
    } else {
        json!(x)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Whether a config.json object describes the HSA model (`DRTForCausalLM`, `model::hsa`).
pub fn is_hsa(raw: &Value) -> bool {
    raw.get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some("DRTForCausalLM")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// meta-llama/Llama-3.1-8B-Instruct config.json, as published.
    const LLAMA31_8B_INSTRUCT: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009],
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
}"#;

    fn llama3_scaling() -> RopeScaling {
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        }
    }

    /// The Llama-3.1 config with `rope_scaling` (and maybe `rope_theta`) replaced by `rope_json`.
    fn with_rope(rope_key: &str, rope_json: &str, keep_top_theta: bool) -> String {
        let mut v: Value = serde_json::from_str(LLAMA31_8B_INSTRUCT).unwrap();
        let m = v.as_object_mut().unwrap();
        m.remove("rope_scaling");
        if !keep_top_theta {
            m.remove("rope_theta");
        }
        m.insert(rope_key.into(), serde_json::from_str(rope_json).unwrap());
        v.to_string()
    }

    fn err_of(text: &str, source: &str) -> String {
        format!(
            "{:#}",
            ModelConfig::from_json_str(text, source).unwrap_err()
        )
    }

    #[test]
    fn parses_llama31_8b_instruct() {
        let c = ModelConfig::from_json_str(LLAMA31_8B_INSTRUCT, "config.json").unwrap();
        assert_eq!(c.vocab_size, 128256);
        assert_eq!(c.hidden_size, 4096);
        assert_eq!(c.intermediate_size, 14336);
        assert_eq!(c.num_hidden_layers, 32);
        assert_eq!(c.num_attention_heads, 32);
        assert_eq!(c.num_key_value_heads, 8);
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.max_position_embeddings, 131072);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.bos_token_id, Some(128000));
        assert_eq!(c.eos_token_id, Some(vec![128001, 128008, 128009]));
        assert_eq!(c.rope_scaling, llama3_scaling());
        assert_eq!(c.raw["torch_dtype"], "bfloat16");
    }

    #[test]
    fn n_params_of_llama31_8b() {
        let c = ModelConfig::from_json_str(LLAMA31_8B_INSTRUCT, "config.json").unwrap();
        assert_eq!(c.n_params(), 8_030_261_248);
        let tied = ModelConfig {
            tie_word_embeddings: true,
            ..c
        };
        assert_eq!(tied.n_params(), 8_030_261_248 - 128256 * 4096);
    }

    #[test]
    fn rope_parameters_form_parses_the_same() {
        let v5 = with_rope(
            "rope_parameters",
            r#"{"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
            false,
        );
        let a = ModelConfig::from_json_str(LLAMA31_8B_INSTRUCT, "a.json").unwrap();
        let b = ModelConfig::from_json_str(&v5, "b.json").unwrap();
        assert_eq!(b.rope_scaling, a.rope_scaling);
        assert_eq!(b.rope_theta, 500000.0);
    }

    #[test]
    fn legacy_type_key_parses() {
        let text = with_rope("rope_scaling", r#"{"type": "linear", "factor": 4.0}"#, true);
        let c = ModelConfig::from_json_str(&text, "config.json").unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
    }

    #[test]
    fn null_or_absent_rope_scaling_is_default() {
        let text = with_rope("rope_scaling", "null", true);
        let c = ModelConfig::from_json_str(&text, "config.json").unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        let mut v: Value = serde_json::from_str(LLAMA31_8B_INSTRUCT).unwrap();
        v.as_object_mut().unwrap().remove("rope_scaling");
        let c = ModelConfig::from_json_str(&v.to_string(), "config.json").unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Default);
    }

    #[test]
    fn yarn_with_every_key_parses() {
        let text = with_rope(
            "rope_scaling",
            r#"{"rope_type": "yarn", "factor": 128.0, "original_max_position_embeddings": 8192,
                "beta_fast": 4, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.8,
                "attention_factor": 1.3, "truncate": false}"#,
            true,
        );
        let c = ModelConfig::from_json_str(&text, "config.json").unwrap();
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Yarn {
                factor: 128.0,
                original_max_position_embeddings: 8192.0,
                beta_fast: 4.0,
                beta_slow: 1.0,
                mscale: Some(0.9),
                mscale_all_dim: Some(0.8),
                attention_factor: Some(1.3),
                truncate: false,
            }
        );
    }

    #[test]
    fn yarn_defaults_follow_hf() {
        let text = with_rope(
            "rope_scaling",
            r#"{"rope_type": "yarn", "factor": 4.0}"#,
            true,
        );
        let c = ModelConfig::from_json_str(&text, "config.json").unwrap();
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 131072.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: None,
                truncate: true,
            }
        );
        // A top-level original_max_position_embeddings is the next fallback.
        let mut v: Value = serde_json::from_str(&text).unwrap();
        v["original_max_position_embeddings"] = json!(8192);
        let c = ModelConfig::from_json_str(&v.to_string(), "config.json").unwrap();
        let RopeScaling::Yarn {
            original_max_position_embeddings,
            ..
        } = c.rope_scaling
        else {
            panic!("not yarn: {:?}", c.rope_scaling)
        };
        assert_eq!(original_max_position_embeddings, 8192.0);
    }

    #[test]
    fn yarn_factor_derived_from_lengths_when_missing() {
        let mut v: Value = serde_json::from_str(&with_rope(
            "rope_scaling",
            r#"{"rope_type": "yarn", "original_max_position_embeddings": 8192, "beta_fast": 4}"#,
            true,
        ))
        .unwrap();
        v["max_position_embeddings"] = json!(1_048_576);
        let c = ModelConfig::from_json_str(&v.to_string(), "config.json").unwrap();
        let RopeScaling::Yarn { factor, .. } = c.rope_scaling else {
            panic!("not yarn")
        };
        assert_eq!(factor, 128.0);
    }

    #[test]
    fn unknown_rope_type_error_names_type_key_and_file() {
        let text = with_rope(
            "rope_scaling",
            r#"{"rope_type": "dynamic", "factor": 2.0}"#,
            true,
        );
        let msg = err_of(&text, "ckpt/config.json");
        for needle in ["dynamic", "rope_scaling.rope_type", "ckpt/config.json"] {
            assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        }
        let legacy = with_rope("rope_scaling", r#"{"type": "su", "factor": 2.0}"#, true);
        let msg = err_of(&legacy, "x.json");
        for needle in ["\"su\"", "rope_scaling.type", "rope_type", "x.json"] {
            assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        }
    }

    #[test]
    fn missing_linear_factor_error_names_key_and_file() {
        let text = with_rope("rope_scaling", r#"{"rope_type": "linear"}"#, true);
        let msg = err_of(&text, "my_config.json");
        assert!(msg.contains("rope_scaling.factor"), "{msg}");
        assert!(msg.contains("my_config.json"), "{msg}");
        let text = with_rope("rope_parameters", r#"{"rope_type": "linear"}"#, true);
        assert!(err_of(&text, "c.json").contains("rope_parameters.factor"));
    }

    #[test]
    fn llama3_requires_all_four_keys() {
        for key in [
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ] {
            let mut v: Value = serde_json::from_str(LLAMA31_8B_INSTRUCT).unwrap();
            v["rope_scaling"].as_object_mut().unwrap().remove(key);
            let msg = err_of(&v.to_string(), "c.json");
            assert!(msg.contains(&format!("`rope_scaling.{key}`")), "{msg}");
        }
    }

    #[test]
    fn malformed_json_error_names_file_and_line() {
        let text = LLAMA31_8B_INSTRUCT.replace("\"hidden_size\": 4096,", "\"hidden_size\": 4096");
        let msg = err_of(&text, "broken/config.json");
        assert!(msg.contains("broken/config.json"), "{msg}");
        assert!(msg.contains("line 9") && msg.contains("column"), "{msg}");
    }

    #[test]
    fn wrong_type_error_names_key_and_expected_type() {
        let text =
            LLAMA31_8B_INSTRUCT.replace("\"hidden_size\": 4096", "\"hidden_size\": \"4096\"");
        let msg = err_of(&text, "c.json");
        assert!(msg.contains("`hidden_size`"), "{msg}");
        assert!(msg.contains("non-negative integer"), "{msg}");
        assert!(msg.contains("string"), "{msg}");
        let text = with_rope(
            "rope_scaling",
            r#"{"rope_type": "yarn", "factor": 4.0, "truncate": "no"}"#,
            true,
        );
        let msg = err_of(&text, "c.json");
        assert!(msg.contains("`rope_scaling.truncate`") && msg.contains("true or false"));
    }

    #[test]
    fn shape_validation_errors() {
        let cases = [
            (
                "\"num_key_value_heads\": 8",
                "\"num_key_value_heads\": 5",
                "num_key_value_heads",
            ),
            (
                "\"hidden_size\": 4096",
                "\"hidden_size\": 4100",
                "divisible",
            ),
            ("\"vocab_size\": 128256", "\"vocab_size\": 0", "vocab_size"),
            (
                "\"num_hidden_layers\": 32",
                "\"num_hidden_layers\": -1",
                "num_hidden_layers",
            ),
            (
                "\"use_cache\": true",
                "\"use_cache\": true, \"head_dim\": 127",
                "head_dim",
            ),
        ];
        for (from, to, needle) in cases {
            let text = LLAMA31_8B_INSTRUCT.replace(from, to);
            assert_ne!(text, LLAMA31_8B_INSTRUCT);
            let msg = err_of(&text, "c.json");
            assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        }
        // An explicit head_dim lifts the divisibility requirement on hidden_size.
        let text = LLAMA31_8B_INSTRUCT.replace(
            "\"hidden_size\": 4096",
            "\"hidden_size\": 4100, \"head_dim\": 128",
        );
        assert_eq!(
            ModelConfig::from_json_str(&text, "c.json")
                .unwrap()
                .head_dim,
            128
        );
    }

    #[test]
    fn disagreeing_rope_forms_are_rejected() {
        let mut v: Value = serde_json::from_str(LLAMA31_8B_INSTRUCT).unwrap();
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500000.0});
        let msg = err_of(&v.to_string(), "c.json");
        assert!(
            msg.contains("rope_scaling") && msg.contains("rope_parameters"),
            "{msg}"
        );
        let mut v: Value = serde_json::from_str(LLAMA31_8B_INSTRUCT).unwrap();
        v["rope_scaling"]["rope_theta"] = json!(10000.0);
        assert!(err_of(&v.to_string(), "c.json").contains("rope_scaling.rope_theta"));
        let mut v: Value = serde_json::from_str(LLAMA31_8B_INSTRUCT).unwrap();
        v["original_max_position_embeddings"] = json!(4096);
        let msg = err_of(&v.to_string(), "c.json");
        assert!(
            msg.contains("rope_scaling.original_max_position_embeddings"),
            "{msg}"
        );
        v["original_max_position_embeddings"] = json!(8192);
        assert!(ModelConfig::from_json_str(&v.to_string(), "c.json").is_ok());
    }

    #[test]
    fn hf_json_names_the_architecture_when_the_input_did_not() {
        let c = ModelConfig::from_json_str(
            r#"{"vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64}"#,
            "tiny.json",
        )
        .unwrap();
        let v = c.to_hf_json();
        assert_eq!(v["model_type"], "llama");
        assert_eq!(v["architectures"], json!(["LlamaForCausalLM"]));
    }

    #[test]
    fn round_trip_through_hf_json_keeps_fields() {
        let yarn = RopeScaling::Yarn {
            factor: 128.0,
            original_max_position_embeddings: 8192.0,
            beta_fast: 4.0,
            beta_slow: 1.0,
            mscale: Some(1.0),
            mscale_all_dim: None,
            attention_factor: None,
            truncate: false,
        };
        let base = ModelConfig::from_json_str(LLAMA31_8B_INSTRUCT, "config.json").unwrap();
        for c in [
            base.clone(),
            base.with_rope_scaling(RopeScaling::Default, 8192),
            base.with_rope_scaling(RopeScaling::Linear { factor: 2.0 }, 262144),
            base.with_rope_scaling(yarn, 1 << 20),
        ] {
            let saved = c.to_hf_json();
            let back = ModelConfig::from_json_str(&saved.to_string(), "saved.json").unwrap();
            // Same typed fields; `raw` is the saved text by construction.
            assert_eq!(
                ModelConfig {
                    raw: c.raw.clone(),
                    ..back.clone()
                },
                c
            );
            // And saving again changes nothing.
            assert_eq!(back.to_hf_json(), saved);
        }
    }

    #[test]
    fn hf_json_has_both_rope_forms() {
        let c = ModelConfig::from_json_str(LLAMA31_8B_INSTRUCT, "config.json").unwrap();
        let v = c.to_hf_json();
        assert_eq!(v["rope_scaling"]["rope_type"], "llama3");
        assert_eq!(v["rope_scaling"]["type"], "llama3");
        assert_eq!(v["rope_scaling"]["factor"], json!(8.0));
        assert_eq!(
            v["rope_scaling"]["original_max_position_embeddings"],
            json!(8192)
        );
        assert_eq!(v["rope_parameters"]["rope_type"], "llama3");
        assert_eq!(v["rope_parameters"]["rope_theta"], json!(500000.0));
        assert_eq!(v["rope_parameters"]["low_freq_factor"], json!(1.0));
        assert!(v["rope_parameters"].get("type").is_none());
        assert_eq!(v["rope_theta"], json!(500000.0));
        // Unknown keys survive; eos keeps its list form.
        assert_eq!(v["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(v["eos_token_id"], json!([128001, 128008, 128009]));

        let d = c.with_rope_scaling(RopeScaling::Default, 8192).to_hf_json();
        assert!(d["rope_scaling"].is_null());
        assert_eq!(
            d["rope_parameters"],
            json!({"rope_type": "default", "rope_theta": 500000.0})
        );
    }

    #[test]
    fn with_rope_scaling_extends_context_with_consistent_yarn_factor() {
        let c = ModelConfig::from_json_str(LLAMA31_8B_INSTRUCT, "config.json").unwrap();
        for (s, len) in [(128.0, 1usize << 20), (256.0, 1 << 21), (512.0, 1 << 22)] {
            let e = c.with_rope_scaling(
                RopeScaling::Yarn {
                    factor: s,
                    original_max_position_embeddings: 8192.0,
                    beta_fast: 4.0,
                    beta_slow: 1.0,
                    mscale: None,
                    mscale_all_dim: None,
                    attention_factor: None,
                    truncate: true,
                },
                len,
            );
            assert_eq!(e.max_position_embeddings, len);
            assert_eq!(e.hidden_size, c.hidden_size);
            let v = e.to_hf_json();
            for form in ["rope_scaling", "rope_parameters"] {
                let r = &v[form];
                assert_eq!(r["rope_type"], "yarn");
                let (f, o) = (
                    r["factor"].as_f64().unwrap(),
                    r["original_max_position_embeddings"].as_f64().unwrap(),
                );
                // transformers 4.51-4.55 recompute factor as max/original: they must agree.
                assert_eq!(f, v["max_position_embeddings"].as_f64().unwrap() / o);
                assert!(r.get("truncate").is_none());
            }
        }
    }

    #[test]
    fn single_eos_id_keeps_its_form() {
        let text = LLAMA31_8B_INSTRUCT.replace("[128001, 128008, 128009]", "128001");
        let c = ModelConfig::from_json_str(&text, "c.json").unwrap();
        assert_eq!(c.eos_token_id, Some(vec![128001]));
        assert_eq!(c.to_hf_json()["eos_token_id"], json!(128001));
    }

    #[test]
    fn from_file_reads_and_names_path_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("config.json");
        std::fs::write(&good, LLAMA31_8B_INSTRUCT).unwrap();
        assert_eq!(
            ModelConfig::from_file(&good).unwrap().n_params(),
            8_030_261_248
        );
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\n  \"vocab_size\": 1,\n  oops\n}").unwrap();
        let msg = format!("{:#}", ModelConfig::from_file(&bad).unwrap_err());
        assert!(msg.contains("bad.json") && msg.contains("line 3"), "{msg}");
        let missing = dir.path().join("nope.json");
        assert!(
            format!("{:#}", ModelConfig::from_file(&missing).unwrap_err()).contains("nope.json")
        );
    }

    fn override_of(toml_text: &str) -> RopeOverride {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn ntk_aware_override_scales_theta_by_the_formula() {
        let cfg = ModelConfig::from_file(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/configs/demo/model.json"
        )))
        .unwrap();
        let o = override_of("rope_type = \"ntk\"\nfactor = 32.0\nmax_position_embeddings = 4096");
        let n = cfg.with_rope_override(&o, "run.toml").unwrap();
        // head_dim 32: 10000 · 32^(32/30)
        let want = 10000.0 * 32f64.powf(32.0 / 30.0);
        assert!(
            (n.rope_theta - want).abs() < 1e-9 * want,
            "{} vs {want}",
            n.rope_theta
        );
        assert_eq!(n.rope_scaling, RopeScaling::Default);
        assert_eq!(n.max_position_embeddings, 4096);
        assert_eq!(n.to_hf_json()["rope_theta"], json!(n.rope_theta));
        let bad = override_of("rope_type = \"ntk\"\nmax_position_embeddings = 4096");
        let e = cfg
            .with_rope_override(&bad, "run.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.rope_scaling.factor"), "{e}");
    }

    #[test]
    fn the_papers_yarn_override_builds_what_its_keys_say() {
        let cfg = ModelConfig::from_json_str(LLAMA31_8B_INSTRUCT, "config.json").unwrap();
        // configs/ultralong-1m.toml's [model.rope_scaling].
        let o = override_of(
            "rope_type = \"yarn\"\nfactor = 128.0\noriginal_max_position_embeddings = 8192\n\
             beta_fast = 4.0\nbeta_slow = 1.0\nmax_position_embeddings = 1048576",
        );
        let n = cfg.with_rope_override(&o, "run.toml").unwrap();
        assert_eq!(n.max_position_embeddings, 1_048_576);
        assert_eq!(n.rope_theta, 500000.0);
        assert_eq!(
            n.rope_scaling,
            RopeScaling::Yarn {
                factor: 128.0,
                original_max_position_embeddings: 8192.0,
                beta_fast: 4.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: None,
                truncate: true,
            }
        );
    }

    /// The override is checked as a config.json's rope object is: the trainer's own builder took
    /// these (a llama3 blend dividing by high − low ≤ 0, negative or zero factors and betas).
    #[test]
    fn an_override_is_rejected_where_a_config_json_is() {
        let cfg = ModelConfig::from_json_str(LLAMA31_8B_INSTRUCT, "config.json").unwrap();
        let llama3 = "rope_type = \"llama3\"\nfactor = 8.0\noriginal_max_position_embeddings = 8192\n\
                      max_position_embeddings = 131072\n";
        let yarn = "rope_type = \"yarn\"\noriginal_max_position_embeddings = 8192\n\
                    max_position_embeddings = 1048576\n";
        for (body, wrong) in [
            (
                format!("{llama3}low_freq_factor = 4.0\nhigh_freq_factor = 1.0"),
                "high_freq_factor` (1) must be greater than",
            ),
            (
                format!("{llama3}low_freq_factor = 2.0\nhigh_freq_factor = 2.0"),
                "high_freq_factor` (2) must be greater than",
            ),
            (
                format!("{llama3}high_freq_factor = 4.0"),
                "missing required key `{}.low_freq_factor`",
            ),
            (
                format!("{yarn}factor = -8.0"),
                "factor` must be a finite number > 0, got -8",
            ),
            (
                format!("{yarn}factor = 8.0\nbeta_fast = 0.0"),
                "beta_fast` must be a finite number > 0, got 0",
            ),
            (
                format!("{yarn}factor = 8.0\nattention_factor = -1.0"),
                "attention_factor` must be a finite number > 0, got -1",
            ),
            (
                "rope_type = \"linear\"\nfactor = 0.0\nmax_position_embeddings = 4096".into(),
                "factor` must be a finite number > 0, got 0",
            ),
        ] {
            let o = override_of(&body);
            let e = format!("{:#}", cfg.with_rope_override(&o, "run.toml").unwrap_err());
            let want = wrong.replace("{}", "model.rope_scaling");
            assert!(e.starts_with("run.toml: "), "{e}");
            assert!(
                e.contains(&want) && e.contains("`model.rope_scaling."),
                "{body}: {e}"
            );
            // The same keys in a config.json's rope_scaling.
            let mut obj = serde_json::to_value(&o).unwrap();
            obj.as_object_mut()
                .unwrap()
                .remove("max_position_embeddings");
            let text = with_rope("rope_scaling", &obj.to_string(), true);
            let e = err_of(&text, "config.json");
            let want = wrong.replace("{}", "rope_scaling");
            assert!(e.contains(&want), "{body}: {e}");
        }
        let e = format!(
            "{:#}",
            cfg.with_rope_override(
                &override_of(
                    "rope_type = \"dynamic\"\nfactor = 2.0\nmax_position_embeddings = 4096"
                ),
                "run.toml"
            )
            .unwrap_err()
        );
        assert!(e.contains("\"dynamic\"") && e.contains("ntk"), "{e}");
    }

    /// A config.json's YaRN object without the original context takes HF's rule (the config's
    /// max_position_embeddings); an override's max_position_embeddings is the new window, so it
    /// must name the original.
    #[test]
    fn a_yarn_override_names_its_original_context() {
        let cfg = ModelConfig::from_json_str(LLAMA31_8B_INSTRUCT, "config.json").unwrap();
        let o =
            override_of("rope_type = \"yarn\"\nfactor = 8.0\nmax_position_embeddings = 1048576");
        let e = format!("{:#}", cfg.with_rope_override(&o, "run.toml").unwrap_err());
        assert!(
            e.contains(
                "missing required key `model.rope_scaling.original_max_position_embeddings`"
            ),
            "{e}"
        );
        let text = with_rope(
            "rope_scaling",
            r#"{"rope_type": "yarn", "factor": 8.0}"#,
            true,
        );
        let c = ModelConfig::from_json_str(&text, "config.json").unwrap();
        match c.rope_scaling {
            RopeScaling::Yarn {
                original_max_position_embeddings,
                ..
            } => assert_eq!(original_max_position_embeddings, 131072.0),
            ref other => panic!("{other:?}"),
        }
    }
}
