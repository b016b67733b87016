//! The run configuration (TOML), with `--set key=value` overrides applied before validation.
//! Every section rejects unknown keys, so a typo is an error that names the key and the file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

/// `[model.rope_scaling]`: built with the model config's own rope builder.
pub use crate::model::config::RopeOverride;
use crate::parallel::topology::Layout;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    #[serde(default)]
    pub optim: OptimSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub parallel: ParallelSection,
}

/// How the ranks of `mpirun -np N` split the work: tensor-parallel `tp` (heads, FFN, vocabulary),
/// context-parallel `cp` (the sequence, zigzag ring attention); data parallel `dp = N / (tp·cp)`.
/// The global batch (`micro_batch × grad_accum` sequences per step) is the same for every layout.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    #[serde(default = "one")]
    pub tp: usize,
    #[serde(default = "one")]
    pub cp: usize,
}

impl Default for ParallelSection {
    fn default() -> Self {
        ParallelSection { tp: 1, cp: 1 }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face directory (config.json, safetensors, tokenizer.json) to start from.
    pub path: PathBuf,
    /// "exact" (default) or "fp32" (HF/Megatron's fp32 angle arithmetic, for parity checks).
    #[serde(default = "default_rope_precision")]
    pub rope_precision: String,
    /// Replace the model's RoPE scaling before training: the context-extension step.
    pub rope_scaling: Option<RopeOverride>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A dataset directory written by `ultralong prepare cpt|sft` (Megatron indexed tokens, and
    /// loss masks for SFT), read in a seeded order per epoch.
    pub dataset: Option<PathBuf>,
    /// A UTF-8 text file, tokenized with the model's tokenizer.json.
    pub text: Option<PathBuf>,
    /// Or a token file: a JSON array of ids (`.json`) or little-endian u32 (`.bin`).
    pub tokens: Option<PathBuf>,
    /// Tokenizer to use for `text` (default: the model directory's tokenizer.json).
    pub tokenizer: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub steps: u64,
    pub seq_len: usize,
    #[serde(default = "one")]
    pub micro_batch: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    #[serde(default)]
    pub seed: u64,
    /// Full recompute: keep only layer inputs, rebuild each layer's activations in backward.
    #[serde(default)]
    pub recompute: bool,
    /// Tokens per LM-head + cross-entropy chunk.
    #[serde(default = "default_ce_chunk")]
    pub ce_chunk: usize,
    /// Working precision of the CPU backend: "f32" (default) or "f64" (for parity checks: Adam
    /// amplifies f32 round-off, so layouts are compared bit-for-bit-ish in f64). Checkpoints store
    /// f32 either way.
    #[serde(default = "default_precision")]
    pub precision: String,
    /// Where the numbers are computed: "cpu" (default) or "cuda" (one GPU per rank, bf16 GEMMs,
    /// fp32 storage; needs the `cuda` feature and a driver).
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Where the run writes metrics, checkpoints and its exported model.
    pub out_dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimSection {
    pub lr: f64,
    /// "constant", "cosine" or "linear" after the warm-up.
    pub schedule: String,
    pub warmup_steps: u64,
    /// Floor of the cosine/linear decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clipping threshold (0 = off).
    pub grad_clip: f64,
}

impl Default for OptimSection {
    fn default() -> Self {
        // Our defaults; the paper gives only LR 3e-5 for CPT (docs/RECIPE.md §2), the rest is our
        // choice (§8).
        OptimSection {
            lr: 3e-5,
            schedule: "constant".into(),
            warmup_steps: 0,
            min_lr_ratio: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointSection {
    /// Where checkpoints go (default: `<train.out_dir>/checkpoints`).
    pub dir: Option<PathBuf>,
    /// Steps between checkpoints (0 = only at the end).
    pub interval: u64,
    /// How many complete checkpoints to keep.
    pub keep: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            dir: None,
            interval: 0,
            keep: 2,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// Hide the progress bar (it is hidden anyway when stderr is not a terminal).
    #[serde(default)]
    pub quiet: bool,
    /// Peak dense TFLOP/s of one device, for MFU (default: H100 SXM bf16, 989; RECIPE.md §7).
    #[serde(default = "default_peak_tflops")]
    pub peak_tflops: f64,
    /// Write `loss.png` and `throughput.png` into the run directory at the end of the run
    /// (default on; `ultralong plot --run DIR` draws them at any time).
    #[serde(default = "yes")]
    pub plots: bool,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            quiet: false,
            peak_tflops: default_peak_tflops(),
            plots: true,
        }
    }
}

fn yes() -> bool {
    true
}

fn default_peak_tflops() -> f64 {
    crate::flops::H100_SXM_BF16_DENSE / 1e12
}

fn one() -> usize {
    1
}
fn default_precision() -> String {
    "f32".into()
}
fn default_backend() -> String {
    "cpu".into()
}
fn default_ce_chunk() -> usize {
    256
}
fn default_rope_precision() -> String {
    "exact".into()
}

impl RunConfig {
    /// Read `path`, apply `key=value` overrides (dotted keys, TOML values; a bare word is a
    /// string), then validate. An error is one line and names its source: the file (with the line
    /// where toml knows it) or the `--set` that brought the bad key or value.
    ///
    /// Relative paths in the config are taken as given (relative to the working directory), the
    /// convention of the shipped configs and Makefile.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let labelled: Vec<(String, String)> = overrides
            .iter()
            .map(|o| (format!("--set {o}"), o.clone()))
            .collect();
        Self::load_from(path, &labelled)
    }

    /// `load` with each override as (what the user typed, `key=value`), e.g. (`--tp 2`,
    /// `parallel.tp=2`): an error names the flag the user gave.
    pub fn load_from(path: &Path, overrides: &[(String, String)]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read run config {}", path.display()))?;
        let file: toml::Table = toml::from_str(&text).map_err(|e| {
            anyhow!(
                "{}{}: invalid TOML: {}",
                path.display(),
                at_line(&text, &e),
                e.message().trim().replace('\n', " ")
            )
        })?;
        let mut doc = file.clone();
        for (from, ov) in overrides {
            apply_override(&mut doc, ov).with_context(|| from.clone())?;
        }
        check(&doc).map_err(|e| blame(path, &text, file, overrides, e))
    }

    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.seq_len < 2 {
            bail!("train.seq_len must be at least 2 (got {})", t.seq_len);
        }
        if t.micro_batch == 0 || t.grad_accum == 0 {
            bail!("train.micro_batch and train.grad_accum must be at least 1");
        }
        if self.parallel.tp == 0 || self.parallel.cp == 0 {
            bail!("parallel.tp and parallel.cp must be at least 1");
        }
        if !["f32", "f64"].contains(&t.precision.as_str()) {
            bail!(
                "train.precision = {:?}: expected \"f32\" or \"f64\"",
                t.precision
            );
        }
        if !["cpu", "cuda"].contains(&t.backend.as_str()) {
            bail!(
                "train.backend = {:?}: expected \"cpu\" or \"cuda\"",
                t.backend
            );
        }
        if t.ce_chunk == 0 {
            bail!("train.ce_chunk must be at least 1");
        }
        let given = [
            self.data.dataset.is_some(),
            self.data.text.is_some(),
            self.data.tokens.is_some(),
        ];
        match given.iter().filter(|&&g| g).count() {
            0 => bail!("data: missing key `dataset`, `text` or `tokens`"),
            1 => {}
            _ => bail!("data: give only one of `dataset`, `text` and `tokens`"),
        }
        let o = &self.optim;
        if !["constant", "cosine", "linear"].contains(&o.schedule.as_str()) {
            bail!(
                "optim.schedule = {:?}: expected \"constant\", \"cosine\" or \"linear\"",
                o.schedule
            );
        }
        if !(o.lr >= 0.0
            && (0.0..1.0).contains(&o.beta1)
            && (0.0..1.0).contains(&o.beta2)
            && o.eps > 0.0)
        {
            bail!("optim: need lr >= 0, 0 <= beta1, beta2 < 1, eps > 0");
        }
        if self.checkpoint.keep == 0 {
            bail!("checkpoint.keep must be at least 1");
        }
        Ok(())
    }

    /// The run's sequences split over `layout`: `train.seq_len` into 2·cp·tp zigzag pieces, the
    /// global batch (`micro_batch × grad_accum`) over dp.
    pub fn check_layout(&self, layout: &Layout) -> Result<()> {
        layout
            .check_seq_len(self.train.seq_len)
            .context("train.seq_len and the layout (parallel.tp/cp, --tp/--cp)")?;
        let per_step = self.sequences_per_step();
        if !per_step.is_multiple_of(layout.dp) {
            bail!(
                "the global batch of {per_step} sequences (train.micro_batch × train.grad_accum) \
                 does not divide over dp {} ({} ranks / (tp {} × cp {}))",
                layout.dp,
                layout.world(),
                layout.tp,
                layout.cp
            );
        }
        Ok(())
    }

    /// The checkpoint directory.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoint
            .dir
            .clone()
            .unwrap_or_else(|| self.train.out_dir.join("checkpoints"))
    }

    /// Sequences per optimizer step.
    pub fn sequences_per_step(&self) -> usize {
        self.train.micro_batch * self.train.grad_accum
    }
}

/// Why a run-config document is not a valid `RunConfig`: `text` is the one-line error (toml's key
/// path, e.g. "in `train`", kept), `message` toml's message alone, to find its line in the file.
#[derive(PartialEq)]
struct Invalid {
    text: String,
    message: String,
}

/// Deserialize and validate `doc`.
fn check(doc: &toml::Table) -> Result<RunConfig, Invalid> {
    let cfg: RunConfig =
        toml::Value::Table(doc.clone())
            .try_into()
            .map_err(|e: toml::de::Error| {
                // Display is "MESSAGE\nin `KEYS`\n": one line, the key path first.
                let message = e.message().trim().replace('\n', " ");
                let keys = e.to_string();
                let keys = keys
                    .lines()
                    .filter_map(|l| l.strip_prefix("in `")?.strip_suffix('`'))
                    .next_back();
                let text = match keys {
                    Some(k) => format!("in `{k}`: {message}"),
                    None => message.clone(),
                };
                Invalid { text, message }
            })?;
    cfg.validate().map_err(|e| Invalid {
        text: format!("{e:#}"),
        message: String::new(),
    })?;
    Ok(cfg)
}

/// The error `err` of the config file `path` (text `text`, parsed `file`) with `overrides` applied,
/// blamed on its source: the first override after which it appears, else the file, at its line when
/// toml can say.
fn blame(
    path: &Path,
    text: &str,
    file: toml::Table,
    overrides: &[(String, String)],
    err: Invalid,
) -> anyhow::Error {
    if !overrides.is_empty() && check(&file).err().as_ref() != Some(&err) {
        let mut doc = file;
        for (from, ov) in overrides {
            if apply_override(&mut doc, ov).is_err() {
                break;
            }
            if check(&doc).err().as_ref() == Some(&err) {
                return anyhow!("{from}: {}", err.text);
            }
        }
    }
    let line = match toml::from_str::<RunConfig>(text) {
        Err(e)
            if !err.message.is_empty() && e.message().trim().replace('\n', " ") == err.message =>
        {
            at_line(text, &e)
        }
        _ => String::new(),
    };
    anyhow!("{}{line}: invalid run config: {}", path.display(), err.text)
}

/// " line N" of the start of a toml error in `text`, or "" when toml gives no place.
fn at_line(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(s) => format!(
            " line {}",
            text[..s.start.min(text.len())].matches('\n').count() + 1
        ),
        None => String::new(),
    }
}

fn apply_override(doc: &mut toml::Table, ov: &str) -> Result<()> {
    let (key, value) = ov.split_once('=').context("expected key=value")?;
    let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t.remove("v").context("unparseable value")?,
        Err(_) => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut table = doc;
    for p in &parts[..parts.len() - 1] {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .with_context(|| format!("`{p}` in `{key}` is not a table"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
path = "m"
[data]
text = "t.txt"
[train]
steps = 3
seq_len = 16
out_dir = "o"
"#;

    fn load(text: &str, sets: &[&str]) -> Result<RunConfig> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("run.toml");
        std::fs::write(&p, text)?;
        RunConfig::load(&p, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn overrides_apply_with_types() {
        let c = load(
            BASE,
            &["train.steps=7", "optim.schedule=cosine", "optim.lr=1e-3"],
        )
        .unwrap();
        assert_eq!(c.optim.schedule, "cosine");
        assert_eq!(c.optim.lr, 1e-3);
        assert_eq!(c.optim.beta2, 0.95, "unset keys keep their defaults");
        let c = load(BASE, &["train.steps=7", "train.recompute=true"]).unwrap();
        assert_eq!(c.train.steps, 7);
        assert!(c.train.recompute);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = format!(
            "{:#}",
            load(&format!("{BASE}\nbogus_key = 1\n"), &[]).unwrap_err()
        );
        assert!(e.contains("bogus_key") && e.contains("run.toml"), "{e}");
    }

    #[test]
    fn errors_are_one_line_and_name_their_source() {
        // A typo in the file: the file and the line (`seqlen` is on line 8 of the text).
        let e = format!(
            "{:#}",
            load(&BASE.replace("seq_len", "seqlen"), &[]).unwrap_err()
        );
        assert!(
            e.contains("run.toml line 8") && e.contains("unknown field `seqlen`"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
        // The same typo from --set: the --set, not the file.
        let e = format!("{:#}", load(BASE, &["train.seqlen=4096"]).unwrap_err());
        assert!(
            e.starts_with("--set train.seqlen=4096: ") && e.contains("`seqlen`"),
            "{e}"
        );
        assert!(!e.contains("run.toml") && !e.contains('\n'), "{e}");
        // A bad value among several --set: the one that brought it.
        let e = format!(
            "{:#}",
            load(
                BASE,
                &["train.steps=9", "optim.schedule=zigzag", "optim.lr=1"]
            )
            .unwrap_err()
        );
        assert!(e.starts_with("--set optim.schedule=zigzag: "), "{e}");
        // A file error that a --set does not touch stays the file's.
        let text = BASE.replace("[train]", "[optim]\nschedule=\"zigzag\"\n[train]");
        let e = format!("{:#}", load(&text, &["train.steps=9"]).unwrap_err());
        assert!(e.contains("run.toml") && !e.contains("--set"), "{e}");
        // Invalid TOML: file, line, one line.
        let e = format!("{:#}", load("[model\npath = 1\n", &[]).unwrap_err());
        assert!(e.contains("run.toml line 1: invalid TOML"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn bad_schedule_is_named() {
        let text = BASE.replace("[train]", "[optim]\nschedule=\"zigzag\"\n[train]");
        let e = format!("{:#}", load(&text, &[]).unwrap_err());
        assert!(e.contains("optim.schedule") && e.contains("zigzag"), "{e}");
    }
}
