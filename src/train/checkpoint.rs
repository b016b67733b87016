//! Distributed checkpoints: everything needed to continue bit-identically (weights, fp32 master
//! weights, Adam moments, step, data position, seed, layout), written by every rank into one
//! temporary directory, flushed, verified by size and SHA-256 of every file, renamed, and only then
//! named by the `latest` pointer; the last `keep` are kept. A truncated or corrupted checkpoint is
//! detected on load and skipped by name.
//!
//! Layout of `<run>/checkpoints/step-00000010/`:
//! - `config.json` (+ tokenizer files): the model, written by rank 0;
//! - `weights-tp{t}-of{T}.safetensors`: TP rank t's weight shard (HF names, shard shapes), written
//!   by the first rank of its DP × CP group;
//! - `optim-tp{t}-z{k}-of{G}.safetensors`: ZeRO slice k of TP shard t — flat `master`, `m`, `v`
//!   (f32), written by that rank;
//! - `state.json`: step, data position, loader state, tokens, seed, config hash, the layout, and
//!   every file's size and hash; written last, by rank 0.
//!
//! Resuming on the same (tp, dp·cp) reads only a rank's own files; on another layout the full
//! tensors are rebuilt (`load_full`) and resharded. `<run>/checkpoints/latest` holds the name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::io::{self, AtomicDir, DType, HostTensor, TensorMap};
use crate::model::arch::ArchConfig;
use crate::model::params::{ParamStore, Shard};
use crate::parallel::comm::{Comm, ReduceOp};
use crate::parallel::topology::Topology;
use crate::train::optim::ShardedAdamW;

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
    /// How the writing run was sharded (absent: written by one rank).
    #[serde(default)]
    pub layout: Option<ShardLayout>,
}

/// The sharding of the files of a checkpoint.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShardLayout {
    pub tp: usize,
    pub cp: usize,
    pub dp: usize,
}

impl ShardLayout {
    fn zero(&self) -> usize {
        self.dp * self.cp
    }
}

fn weights_file(t: usize, n: usize) -> String {
    format!("weights-tp{t}-of{n}.safetensors")
}

fn optim_file(t: usize, n: usize, k: usize, g: usize) -> String {
    format!("optim-tp{t}-of{n}-z{k}-of{g}.safetensors")
}

/// The default checkpoint directory of a run (`checkpoint.dir` in the run config overrides it).
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The Adam moments as one safetensors map: `m.<name>` and `v.<name>`.
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

/// Write a checkpoint of the model and its optimizer state after `state.step` steps into the
/// checkpoint directory `root`; returns its directory. Collective over the world: rank 0 prepares
/// the temporary directory (`io::AtomicDir`) and finishes it (state.json, rename, `latest`, pruning
/// beyond `keep`); every rank writes its files in between. If any rank fails, every rank returns
/// the error, the temporary directory is removed and the previous checkpoints are untouched.
#[allow(clippy::too_many_arguments)]
pub fn save<B: Backend>(
    b: &B,
    topo: &Topology,
    root: &Path,
    cfg: &ArchConfig,
    params: &ParamStore<B>,
    opt: &ShardedAdamW<B>,
    mut state: TrainState,
    tokenizer_from: &[&Path],
    keep: usize,
) -> Result<PathBuf> {
    let lead = topo.world_rank == 0;
    // The records are this checkpoint's: a state read from an older one (a resumed run) lists
    // that one's files, which need not exist here (another layout's shards).
    state.files.clear();
    let name = step_name(state.step);
    let fin = root.join(&name);
    let tmp = AtomicDir::temp_path(&fin)?;
    let l = topo.layout;
    let failed = |e: anyhow::Error| {
        e.context(format!(
            "writing checkpoint {name} failed; the previous checkpoints in {} are untouched",
            root.display()
        ))
    };
    // 1. Rank 0: a fresh temporary directory with the model config and tokenizer. Dropped on an
    // error (on any rank: `agree`), it is removed.
    let mut dir = None;
    let prepared = if lead {
        (|| -> Result<()> {
            let d = dir.insert(AtomicDir::create(&fin)?);
            let json = serde_json::to_string_pretty(&cfg.to_hf_json())?;
            io::write_atomic(&d.tmp().join("config.json"), json.as_bytes())?;
            io::copy_tokenizer_files_layered(tokenizer_from, d.tmp())?;
            Ok(())
        })()
    } else {
        Ok(())
    };
    agree(topo, prepared, "preparing the directory").map_err(failed)?;
    // 2. Every rank: its files, and their records.
    let written = (|| -> Result<BTreeMap<String, FileRecord>> {
        let mut names = Vec::new();
        if topo.dpcp_rank() == 0 {
            let f = weights_file(topo.tp_rank, l.tp);
            io::save_safetensors_file(&tmp.join(&f), &params.to_host(b), DType::F32, None)?;
            names.push(f);
        }
        let [master, m, v] = opt.export_slice(b);
        let n = master.len();
        let map = TensorMap::from([
            ("master".to_string(), HostTensor::new(vec![n], master)),
            ("m".to_string(), HostTensor::new(vec![n], m)),
            ("v".to_string(), HostTensor::new(vec![n], v)),
        ]);
        let f = optim_file(topo.tp_rank, l.tp, topo.dpcp_rank(), l.dp * l.cp);
        io::save_safetensors_file(&tmp.join(&f), &map, DType::F32, None)?;
        names.push(f);
        names
            .into_iter()
            .map(|f| {
                let p = tmp.join(&f);
                let rec = FileRecord {
                    bytes: std::fs::metadata(&p)?.len(),
                    sha256: io::sha256_file(&p)?,
                };
                Ok((f, rec))
            })
            .collect()
    })();
    // Test hook: `ULTRALONG_CRASH_IN_CHECKPOINT=STEP` kills the last rank (as kill -9 would) after it
    // wrote its shards of that step's checkpoint, before the checkpoint is complete.
    if std::env::var("ULTRALONG_CRASH_IN_CHECKPOINT")
        .ok()
        .and_then(|v| v.parse().ok())
        == Some(state.step)
        && topo.world_rank + 1 == topo.world.size()
    {
        eprintln!(
            "rank {} dies inside checkpoint {name} (ULTRALONG_CRASH_IN_CHECKPOINT)",
            topo.world_rank
        );
        std::process::abort();
    }
    // Records travel to rank 0 as fixed-size JSON blocks.
    let mine = match &written {
        Ok(r) => serde_json::to_vec(r)?,
        Err(_) => Vec::new(),
    };
    agree(topo, written, "writing its shards").map_err(failed)?;
    let mut len = [mine.len() as u64];
    topo.world.all_reduce(&mut len, ReduceOp::Max);
    let mut block = mine.clone();
    block.resize(len[0] as usize, b' ');
    let mut all = vec![0u8; block.len() * topo.world.size()];
    topo.world.all_gather(&block, &mut all);
    // 3. Rank 0: state.json last, then rename and point `latest` at it.
    let finished = if lead {
        (|| -> Result<()> {
            for chunk in all.chunks(block.len().max(1)) {
                let recs: BTreeMap<String, FileRecord> =
                    serde_json::from_slice(chunk).context("shard records")?;
                state.files.extend(recs);
            }
            let mut files = Vec::new();
            list_files(&tmp, &tmp, &mut files)?;
            for f in files {
                if let std::collections::btree_map::Entry::Vacant(e) =
                    state.files.entry(f.to_string_lossy().into_owned())
                {
                    let p = tmp.join(&f);
                    e.insert(FileRecord {
                        bytes: std::fs::metadata(&p)?.len(),
                        sha256: io::sha256_file(&p)?,
                    });
                }
            }
            state.layout = Some(ShardLayout {
                tp: l.tp,
                cp: l.cp,
                dp: l.dp,
            });
            io::write_atomic(
                &tmp.join("state.json"),
                serde_json::to_string_pretty(&state)?.as_bytes(),
            )?;
            dir.take().context("rank 0 holds the directory")?.commit()?;
            io::write_atomic(&root.join("latest"), name.as_bytes())?;
            prune(root, keep)
        })()
    } else {
        Ok(())
    };
    agree(topo, finished, "finishing").map_err(failed)?;
    Ok(fin)
}

/// Every rank learns whether every rank succeeded; a failure elsewhere becomes an error naming the
/// lowest failing rank.
fn agree<T>(topo: &Topology, r: Result<T>, what: &str) -> Result<T> {
    let n = topo.world.size() as u64;
    let mut code = [if r.is_err() {
        n - topo.world_rank as u64
    } else {
        0
    }];
    topo.world.all_reduce(&mut code, ReduceOp::Max);
    match r {
        Err(e) => Err(e),
        Ok(_) if code[0] > 0 => bail!("rank {} failed {what}", n - code[0]),
        Ok(v) => Ok(v),
    }
}

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

/// The full tensors of a verified checkpoint: model config, weights (HF names) and optimizer state
/// (`master.`, `m.`, `v.` + HF name), rebuilt from every shard (export, resharding, tests).
pub fn load_full(dir: &Path) -> Result<(ArchConfig, TensorMap, TensorMap)> {
    let cfg = ArchConfig::from_file(&dir.join("config.json"))?;
    let st = verify(dir)?;
    let l = st.layout.unwrap_or(ShardLayout {
        tp: 1,
        cp: 1,
        dp: 1,
    });
    let specs = cfg.param_specs();
    let mut weights = TensorMap::new();
    let mut optim = TensorMap::new();
    let mut parts_w: Vec<TensorMap> = Vec::new();
    let mut parts_o: Vec<[Vec<f32>; 3]> = Vec::new();
    for t in 0..l.tp {
        parts_w.push(io::load_safetensors_file(&dir.join(weights_file(t, l.tp)))?);
        let mut flat = [Vec::new(), Vec::new(), Vec::new()];
        for k in 0..l.zero() {
            let p = dir.join(optim_file(t, l.tp, k, l.zero()));
            let map = io::load_safetensors_file(&p)?;
            for (i, key) in ["master", "m", "v"].iter().enumerate() {
                let x = map
                    .get(*key)
                    .with_context(|| format!("{}: tensor `{key}` is missing", p.display()))?;
                flat[i].extend_from_slice(&x.data);
            }
        }
        parts_o.push(flat);
    }
    let shard = |t| Shard {
        rank: t,
        size: l.tp,
    };
    let mut off = 0;
    for s in &specs {
        let local = s.sharded(shard(0));
        let n = local.numel();
        let mut cat_w = Vec::with_capacity(n * l.tp);
        let mut cat_o = [Vec::new(), Vec::new(), Vec::new()];
        for t in 0..l.tp {
            let w = parts_w[t].get(&s.name).with_context(|| {
                format!(
                    "{}: tensor `{}` is missing",
                    dir.join(weights_file(t, l.tp)).display(),
                    s.name
                )
            })?;
            if w.shape != local.shape {
                bail!(
                    "{}: tensor `{}` has shape {:?}, expected {:?}",
                    dir.join(weights_file(t, l.tp)).display(),
                    s.name,
                    w.shape,
                    local.shape
                );
            }
            cat_w.extend_from_slice(&w.data);
            for i in 0..3 {
                let flat = &parts_o[t][i];
                if flat.len() < off + n {
                    bail!(
                        "{}: the optimizer slices of TP shard {t} are too short",
                        dir.display()
                    );
                }
                cat_o[i].extend_from_slice(&flat[off..off + n]);
            }
        }
        off += n;
        weights.insert(
            s.name.clone(),
            HostTensor::new(s.full_shape.clone(), s.join_shards(&cat_w, l.tp)),
        );
        for (i, prefix) in ["master.", "m.", "v."].iter().enumerate() {
            optim.insert(
                format!("{prefix}{}", s.name),
                HostTensor::new(s.full_shape.clone(), s.join_shards(&cat_o[i], l.tp)),
            );
        }
    }
    Ok((cfg, weights, optim))
}

/// Restore this rank's model (config and parameters) and optimizer from a verified checkpoint
/// written by any layout: on the same (tp, dp·cp) each rank reads its own files; otherwise the
/// full tensors are rebuilt and resharded.
pub fn load<B: Backend>(
    b: &B,
    topo: &Topology,
    dir: &Path,
    state: &TrainState,
) -> Result<(ArchConfig, ParamStore<B>, ShardedAdamW<B>)> {
    let l = topo.layout;
    let same = state
        .layout
        .is_some_and(|w| w.tp == l.tp && w.zero() == l.dp * l.cp);
    let cfg = ArchConfig::from_file(&dir.join("config.json"))?;
    let shard = topo.shard();
    if same {
        let wf = dir.join(weights_file(topo.tp_rank, l.tp));
        let map = io::load_safetensors_file(&wf)?;
        let specs: Vec<_> = cfg.param_specs().iter().map(|s| s.sharded(shard)).collect();
        let mut bufs = Vec::with_capacity(specs.len());
        for s in &specs {
            let t = map
                .get(&s.name)
                .with_context(|| format!("{}: tensor `{}` is missing", wf.display(), s.name))?;
            if t.shape != s.shape {
                bail!(
                    "{}: tensor `{}` has shape {:?}, expected {:?}",
                    wf.display(),
                    s.name,
                    t.shape,
                    s.shape
                );
            }
            bufs.push(b.upload(&t.data));
        }
        let params = ParamStore { specs, bufs };
        let mut opt = ShardedAdamW::new(b, topo, &params);
        let of = dir.join(optim_file(
            topo.tp_rank,
            l.tp,
            topo.dpcp_rank(),
            l.dp * l.cp,
        ));
        let o = io::load_safetensors_file(&of)?;
        let get = |k: &str| -> Result<&[f32]> {
            let t = o
                .get(k)
                .with_context(|| format!("{}: tensor `{k}` is missing", of.display()))?;
            if t.data.len() != opt.held() {
                bail!(
                    "{}: `{k}` has {} elements, this rank's slice {}",
                    of.display(),
                    t.data.len(),
                    opt.held()
                );
            }
            Ok(&t.data)
        };
        let (master, m, v) = (
            get("master")?.to_vec(),
            get("m")?.to_vec(),
            get("v")?.to_vec(),
        );
        opt.import_slice(b, &master, &m, &v);
        return Ok((cfg, params, opt));
    }
    let (cfg, weights, optim) = load_full(dir)?;
    let src = dir.display().to_string();
    let params = cfg.params_from_host(b, &weights, &src, shard)?;
    let pick = |prefix: &str| -> Result<ParamStore<B>> {
        let map: TensorMap = optim
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(prefix).map(|n| (n.to_string(), t.clone())))
            .collect();
        cfg.params_from_host(b, &map, &src, shard)
    };
    let (master, m, v) = (pick("master.")?, pick("m.")?, pick("v.")?);
    let mut opt = ShardedAdamW::new(b, topo, &params);
    opt.set_state(b, &master, &m, &v);
    Ok((cfg, params, opt))
}

#[cfg(test)]
mod tests {
    //! A checkpoint written after one optimizer step holds what AdamW's first step gives by its
    //! formula (m = (1 − β1)·g, v = (1 − β2)·g², p − lr·g/(|g| + ε)); it reloads on its own layout
    //! and on another one; damage is found and the newest intact checkpoint is used.
    use super::*;
    use crate::backend::AdamW;
    use crate::backend::cpu::CpuBackend;
    use crate::model::params::Split;
    use crate::parallel::any::AnyComm;
    use crate::parallel::thread::ThreadComm;
    use crate::util::gradcheck::test_values;

    type B = CpuBackend<f32>;
    const LR: f64 = 1e-2;

    fn cfg() -> ArchConfig {
        ArchConfig::from_json_str(
            r#"{"vocab_size": 8, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
                "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.3}"#,
            "tiny",
        )
        .unwrap()
    }

    fn state(step: u64) -> TrainState {
        TrainState {
            step,
            data_position: 3 * step,
            loader: None,
            tokens_seen: 100 * step,
            seed: 5,
            config_hash: "h".into(),
            files: Default::default(),
            layout: None,
        }
    }

    /// Full weights and the full gradient (values exact in f32, and halves of them too).
    fn host() -> (TensorMap, TensorMap) {
        let b = B::new();
        let w = ParamStore::init_random(&b, cfg().base(), 2).to_host(&b);
        let g = w
            .iter()
            .enumerate()
            .map(|(i, (k, t))| {
                let v = test_values(t.data.len(), 40 + i as u64);
                let data = v
                    .iter()
                    .map(|x| (*x as f32 * 64.0).round() / 64.0)
                    .collect();
                (k.clone(), HostTensor::new(t.shape.clone(), data))
            })
            .collect();
        (w, g)
    }

    /// One optimizer step on `world` ranks laid out (tp, cp = 1), each DP rank holding 1 / dp of
    /// the gradient, then a checkpoint in `root`.
    fn step_and_save(root: &Path, tp: usize, world: usize) -> PathBuf {
        let (w, g) = host();
        let dirs = ThreadComm::run(world, |comm: AnyComm| {
            let b = B::new();
            let topo = Topology::new(&comm, tp, 1).unwrap();
            let shard = topo.shard();
            let mut params = cfg().params_from_host(&b, &w, "w", shard).unwrap();
            let mut grads = cfg().params_from_host(&b, &g, "g", shard).unwrap();
            // Replicated weights' gradients are partial on each TP rank too (sequence shards).
            for (s, buf) in grads.specs.iter().zip(&mut grads.bufs) {
                let tps = if s.split == Split::Replicated { tp } else { 1 };
                b.scale(buf, 1.0 / (topo.layout.dp * tps) as f64);
            }
            let mut opt = ShardedAdamW::new(&b, &topo, &params);
            let hp = AdamW {
                lr: LR,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.0,
                step: 1,
                grad_scale: 1.0,
            };
            opt.step(&b, &topo, &mut params, &mut grads, hp, 0.0);
            save(&b, &topo, root, &cfg(), &params, &opt, state(1), &[], 3).unwrap()
        });
        dirs[0].clone()
    }

    fn assert_close(got: &TensorMap, want: &TensorMap, what: &str) {
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{what}"
        );
        for (k, t) in want {
            assert_eq!(got[k].shape, t.shape, "{what}: {k}");
            for (a, b) in got[k].data.iter().zip(&t.data) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                    "{what}: {k}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn a_checkpoint_holds_adamw_s_first_step_and_reloads_on_any_layout() {
        let (w, g) = host();
        // AdamW's first step by its formula.
        let map = |f: &dyn Fn(f64, f64) -> f64, prefix: &str| -> TensorMap {
            w.iter()
                .map(|(k, t)| {
                    let d = t
                        .data
                        .iter()
                        .zip(&g[k].data)
                        .map(|(&p, &gi)| f(p as f64, gi as f64) as f32)
                        .collect();
                    (format!("{prefix}{k}"), HostTensor::new(t.shape.clone(), d))
                })
                .collect()
        };
        let stepped = |p: f64, g: f64| p - LR * g / (g.abs() + 1e-8);
        let want_w = map(&stepped, "");
        let mut want_o = map(&stepped, "master.");
        want_o.extend(map(&|_, g| 0.1 * g, "m."));
        want_o.extend(map(&|_, g| 0.05 * g * g, "v."));

        let d = tempfile::tempdir().unwrap();
        for (tp, world) in [(1, 1), (1, 2), (2, 2), (1, 3)] {
            let root = d.path().join(format!("tp{tp}-w{world}"));
            let dir = step_and_save(&root, tp, world);
            assert_eq!(dir, root.join("step-00000001"));
            let st = verify(&dir).unwrap();
            let dp = world / tp;
            assert_eq!(st.layout, Some(ShardLayout { tp, cp: 1, dp }));
            assert_eq!((st.step, st.data_position, st.tokens_seen), (1, 3, 100));
            let (c, weights, optim) = load_full(&dir).unwrap();
            assert_eq!(c.to_hf_json(), cfg().to_hf_json());
            let what = format!("tp {tp} world {world}");
            assert_close(&weights, &want_w, &what);
            assert_close(&optim, &want_o, &what);
            // Reloaded on its own layout and on others, then saved again: the same tensors.
            for (tp2, world2) in [(tp, world), (2, 2), (1, 2), (1, 1)] {
                let again = d.path().join(format!("again-{tp}-{world}-{tp2}-{world2}"));
                ThreadComm::run(world2, |comm: AnyComm| {
                    let b = B::new();
                    let topo = Topology::new(&comm, tp2, 1).unwrap();
                    let (c, params, opt) = load(&b, &topo, &dir, &st).unwrap();
                    save(&b, &topo, &again, &c, &params, &opt, st.clone(), &[], 3).unwrap();
                });
                let (_, w2, o2) = load_full(&again.join("step-00000001")).unwrap();
                let what = format!("{what} reloaded on tp {tp2} world {world2}");
                assert_close(&w2, &want_w, &what);
                assert_close(&o2, &want_o, &what);
            }
        }
    }

    #[test]
    fn damage_is_named_and_the_newest_intact_checkpoint_is_used() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let b = B::new();
        let topo = Topology::single();
        let params = ParamStore::init_random(&b, cfg().base(), 1);
        let opt = ShardedAdamW::new(&b, &topo, &params);
        for step in 1..=3 {
            save(&b, &topo, root, &cfg(), &params, &opt, state(step), &[], 2).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["latest", "step-00000002", "step-00000003"],
            "keep 2"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("latest")).unwrap(),
            "step-00000003"
        );
        assert_eq!(find_latest(root).unwrap().unwrap().1.step, 3);

        let newest = root.join("step-00000003");
        let weights = newest.join(weights_file(0, 1));
        let mut bytes = std::fs::read(&weights).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&weights, &bytes).unwrap();
        let e = format!("{:#}", verify(&newest).unwrap_err());
        assert!(
            e.contains("weights-tp0-of1.safetensors does not match its SHA-256"),
            "{e}"
        );
        let (dir, st) = find_latest(root).unwrap().unwrap();
        assert_eq!((dir, st.step), (root.join("step-00000002"), 2));

        std::fs::write(&weights, &bytes[..10]).unwrap();
        let e = format!("{:#}", verify(&newest).unwrap_err());
        assert!(e.contains("has 10 bytes") && e.contains("truncated"), "{e}");
        std::fs::remove_file(&weights).unwrap();
        let e = format!("{:#}", verify(&newest).unwrap_err());
        assert!(e.contains("weights-tp0-of1.safetensors is missing"), "{e}");

        // Nothing intact: none.
        std::fs::remove_file(root.join("step-00000002/state.json")).unwrap();
        assert!(find_latest(root).unwrap().is_none());
    }
}
