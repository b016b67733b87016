//! Single-rank checkpoints: everything needed to continue bit-identically (weights, Adam moments,
//! step, data position, seed), written to a temporary directory, verified, renamed, and only then
//! named by the `latest` pointer. Every file's size and SHA-256 is recorded, so a truncated or
//! corrupted checkpoint is detected on load. (The scale-out issue shards this across ranks.)
//!
//! Layout: `<run>/checkpoints/step-00000010/{model/, optimizer.safetensors, state.json}` and
//! `<run>/checkpoints/latest` holding the directory name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::io::{self, DType, HostTensor, TensorMap};
use crate::model::config::ModelConfig;
use crate::model::hf::save_hf_dir;
use crate::model::llama::Llama;
use crate::model::params::{ParamStore, Shard};
use crate::model::rope::RopePrecision;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileRecord {
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Training windows consumed (the data position of text/token-file runs).
    pub data_position: u64,
    /// The dataset loader's position (epoch, index) for `data.dataset` runs.
    #[serde(default)]
    pub loader: Option<crate::data::loader::LoaderState>,
    pub tokens_seen: u64,
    pub seed: u64,
    /// SHA-256 of the run config that wrote it (informational: resuming with a changed config is
    /// allowed, and reported).
    pub config_hash: String,
    /// Every file of the checkpoint except state.json, relative path -> size and hash.
    #[serde(default)]
    pub files: BTreeMap<String, FileRecord>,
}

/// The default checkpoint directory of a run (`checkpoint.dir` in the run config overrides it).
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The Adam moments as one safetensors map: `m.<name>` and `v.<name>`.
fn moments_to_host<B: Backend>(b: &B, m: &ParamStore<B>, v: &ParamStore<B>) -> TensorMap {
    let mut map = TensorMap::new();
    for (prefix, store) in [("m.", m), ("v.", v)] {
        for (s, buf) in store.specs.iter().zip(&store.bufs) {
            map.insert(
                format!("{prefix}{}", s.name),
                HostTensor::new(s.shape.clone(), b.download(buf)),
            );
        }
    }
    map
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            list_files(root, &p, out)?;
        } else if p.file_name().is_some_and(|n| n != "state.json") {
            out.push(p.strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}

/// Write a checkpoint of `model` and its optimizer state after `state.step` steps into the
/// checkpoint directory `root`; returns its directory. Older checkpoints beyond `keep` are removed
/// after the new one is complete.
#[allow(clippy::too_many_arguments)]
pub fn save<B: Backend>(
    b: &B,
    root: &Path,
    model: &Llama<B>,
    m: &ParamStore<B>,
    v: &ParamStore<B>,
    state: TrainState,
    tokenizer_from: Option<&Path>,
    keep: usize,
) -> Result<PathBuf> {
    save_host(
        root,
        &model.cfg,
        &model.params.to_host(b),
        &moments_to_host(b, m, v),
        state,
        tokenizer_from,
        keep,
    )
}

/// `save` from host tensors: the full weights (HF names) and moments (`m.`/`v.` + HF name).
pub fn save_host(
    root: &Path,
    cfg: &ModelConfig,
    weights: &TensorMap,
    moments: &TensorMap,
    mut state: TrainState,
    tokenizer_from: Option<&Path>,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = step_name(state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove stale {}", tmp.display()))?;
    }
    let mut write = || -> Result<()> {
        save_hf_dir(&tmp.join("model"), cfg, weights, DType::F32, tokenizer_from)?;
        io::save_safetensors_file(
            &tmp.join("optimizer.safetensors"),
            moments,
            DType::F32,
            None,
        )?;
        let mut files = Vec::new();
        list_files(&tmp, &tmp, &mut files)?;
        for f in files {
            let p = tmp.join(&f);
            let bytes = std::fs::metadata(&p)?.len();
            state.files.insert(
                f.to_string_lossy().into_owned(),
                FileRecord {
                    bytes,
                    sha256: io::sha256_file(&p)?,
                },
            );
        }
        io::write_atomic(
            &tmp.join("state.json"),
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "writing checkpoint {} failed; the previous checkpoints in {} are untouched",
            name,
            root.display()
        )));
    }
    let fin = root.join(&name);
    if fin.exists() {
        std::fs::remove_dir_all(&fin)
            .with_context(|| format!("cannot replace {}", fin.display()))?;
    }
    std::fs::rename(&tmp, &fin)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), fin.display()))?;
    io::write_atomic(&root.join("latest"), name.as_bytes())?;
    prune(root, keep)?;
    Ok(fin)
}

/// Complete checkpoints in `root`, oldest first.
fn list_checkpoints(root: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(root) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
            })
            .collect(),
        Err(_) => vec![],
    };
    v.sort();
    Ok(v)
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list_checkpoints(root)?;
    for old in &all[..all.len().saturating_sub(keep)] {
        std::fs::remove_dir_all(old)
            .with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
    }
    Ok(())
}

/// Check a checkpoint's files against the sizes and hashes in its state.json.
pub fn verify(dir: &Path) -> Result<TrainState> {
    let sp = dir.join("state.json");
    let text = std::fs::read_to_string(&sp)
        .with_context(|| format!("checkpoint {}: cannot read state.json", dir.display()))?;
    let state: TrainState =
        serde_json::from_str(&text).with_context(|| format!("{}: malformed", sp.display()))?;
    if state.files.is_empty() {
        bail!("{}: lists no files", sp.display());
    }
    for (f, rec) in &state.files {
        let p = dir.join(f);
        let bytes = std::fs::metadata(&p)
            .with_context(|| format!("checkpoint {}: file {f} is missing", dir.display()))?
            .len();
        if bytes != rec.bytes {
            bail!(
                "checkpoint {}: file {f} has {bytes} bytes, expected {} (truncated?)",
                dir.display(),
                rec.bytes
            );
        }
        if io::sha256_file(&p)? != rec.sha256 {
            bail!(
                "checkpoint {}: file {f} does not match its SHA-256 (corrupted)",
                dir.display()
            );
        }
    }
    Ok(state)
}

/// The newest checkpoint in the checkpoint directory `root` that verifies: the `latest` pointer
/// first, then older ones. A checkpoint that fails verification is skipped with a message naming it.
pub fn find_latest(root: &Path) -> Result<Option<(PathBuf, TrainState)>> {
    let mut candidates = list_checkpoints(root)?;
    candidates.reverse();
    if let Ok(name) = std::fs::read_to_string(root.join("latest")) {
        let p = root.join(name.trim());
        candidates.retain(|c| c != &p);
        candidates.insert(0, p);
    }
    for c in candidates {
        match verify(&c) {
            Ok(s) => return Ok(Some((c, s))),
            Err(e) => eprintln!("warning: skipping checkpoint: {e:#}"),
        }
    }
    Ok(None)
}

/// Load a verified checkpoint: the model and the Adam moments.
pub fn load<B: Backend>(
    b: &B,
    dir: &Path,
    precision: RopePrecision,
) -> Result<(Llama<B>, ParamStore<B>, ParamStore<B>)> {
    load_shard(b, dir, precision, Shard::WHOLE)
}

/// Load TP rank `shard`'s part of a checkpoint (written by any layout: checkpoints hold full
/// tensors, so resuming on another (tp, cp, dp) reshards on load).
pub fn load_shard<B: Backend>(
    b: &B,
    dir: &Path,
    precision: RopePrecision,
    shard: Shard,
) -> Result<(Llama<B>, ParamStore<B>, ParamStore<B>)> {
    let model = Llama::load_shard(b, &dir.join("model"), precision, shard)?;
    let opt_path = dir.join("optimizer.safetensors");
    let map = io::load_safetensors_file(&opt_path)?;
    let mut m = ParamStore::zeros_shard(b, &model.cfg, shard);
    let mut v = ParamStore::zeros_shard(b, &model.cfg, shard);
    for (prefix, store) in [("m.", &mut m), ("v.", &mut v)] {
        for (s, buf) in store.specs.iter().zip(store.bufs.iter_mut()) {
            let key = format!("{prefix}{}", s.name);
            let t = map
                .get(&key)
                .with_context(|| format!("{}: tensor `{key}` is missing", opt_path.display()))?;
            if t.shape != s.full_shape {
                bail!(
                    "{}: tensor `{key}` has shape {:?}, expected {:?}",
                    opt_path.display(),
                    t.shape,
                    s.full_shape
                );
            }
            *buf = b.upload(&s.take_shard(&t.data, shard));
        }
    }
    Ok((model, m, v))
}
