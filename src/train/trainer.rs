//! The training loop, for one rank or many: per step, the global batch of
//! `grad_accum × micro_batch` sequences is read by every rank (so the data position is the same
//! everywhere); each rank runs forward and backward over its share (`train::step`: DP stride,
//! zigzag CP chunks, gradients accumulated). The loss is normalised by the
//! global batch's target-token count; the ZeRO-1 optimizer (`train::optim`) reduces gradients
//! over DP × CP, clips by the global norm and updates. Rank 0 writes one JSON metrics line per
//! step and the checkpoints (full tensors, gathered from every rank).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::backend::cpu::CpuBackend;
use crate::backend::{AdamW, Backend};
use crate::data::loader::Loader;
use crate::io::MappedTensors;
use crate::model::arch::ArchConfig;
use crate::model::config::ModelConfig;
use crate::model::rope::RopePrecision;
use crate::parallel::comm::{Comm, ReduceOp};
use crate::parallel::topology::Topology;
use crate::train::checkpoint::{self, TrainState};
use crate::train::config::RunConfig;
use crate::train::data::{TokenStream, load_token_file, tokenize_text_file};
use crate::train::model::{ModelBackend, PassOptions, TrainModel};
use crate::train::optim::ShardedAdamW;
use crate::train::schedule::learning_rate;
use crate::train::step::GlobalBatch;

/// One line of `metrics.jsonl` (and of stdout).
#[derive(Debug, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub step_ms: f64,
    /// Model TFLOP/s per rank by docs/ARCHITECTURE.md's causal count (`flops::model_flops_per_token`;
    /// recompute not counted).
    pub tflops_per_rank: f64,
    /// `tflops_per_rank / log.peak_tflops`.
    pub mfu: f64,
    /// Peak bytes of this rank's backend buffers so far (rank 0).
    pub peak_mem_bytes: usize,
}

/// What a finished run reports.
#[derive(Debug, Serialize)]
pub struct RunSummary {
    pub steps_done: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub resumed_from: Option<u64>,
    pub final_checkpoint: PathBuf,
    /// Stopped early by SIGUSR1/SIGTERM after writing a checkpoint (requeue and `--resume`).
    pub preempted: bool,
}

/// The exit code of a run stopped by a signal after its checkpoint (EX_TEMPFAIL): the Slurm
/// scripts turn it into `scontrol requeue`.
pub const EXIT_PREEMPTED: u8 = 75;

/// Set by SIGUSR1 or SIGTERM (Slurm's `--signal=B:USR1@N`, preemption, `scancel`). The handler
/// only sets a flag; the loop checks it after each step, on all ranks together.
fn stop_requested() -> &'static std::sync::Arc<std::sync::atomic::AtomicBool> {
    static FLAG: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
        std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let f = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGUSR1, signal_hook::consts::SIGTERM] {
            if let Err(e) = signal_hook::flag::register(sig, f.clone()) {
                eprintln!("warning: cannot install the handler of signal {sig}: {e}");
            }
        }
        f
    })
}

fn config_hash(cfg: &RunConfig) -> String {
    let text = toml::to_string(cfg).unwrap_or_default();
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every rank writes its shards of the checkpoint (`checkpoint::save`).
#[allow(clippy::too_many_arguments)]
fn save_checkpoint<B: Backend>(
    b: &B,
    topo: &Topology,
    root: &Path,
    model: &dyn TrainModel<B>,
    opt: &ShardedAdamW<B>,
    st: &TrainState,
    tok_dirs: &[PathBuf],
    cfg: &RunConfig,
) -> Result<()> {
    checkpoint::save(
        b,
        topo,
        root,
        model.arch(),
        model.params(),
        opt,
        st.clone(),
        &tok_dirs.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
        cfg.checkpoint.keep,
    )?;
    Ok(())
}

/// Drop the metrics lines of steps after `step` (written by a run that died after its last
/// checkpoint), so a resumed run's log has each step once. A fresh run (`step` 0) starts empty.
fn trim_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::io::write_atomic(path, kept.as_bytes())
}

/// Where training sequences come from: a prepared dataset (CPT or SFT, with loss masks) or, for
/// quick runs, a text or token file cut into windows.
enum DataSource {
    Dataset(Box<Loader>),
    Stream(TokenStream),
}

impl DataSource {
    fn open(
        cfg: &RunConfig,
        mcfg: &ModelConfig,
        tokenizer: Option<&Path>,
        state: &TrainState,
    ) -> Result<Self> {
        let seq = cfg.train.seq_len;
        if let Some(dir) = &cfg.data.dataset {
            let mut l = Loader::open(dir, seq, cfg.train.seed)?;
            if let Some(s) = &state.loader {
                l.set_state(s.clone());
            }
            check_vocab(dir, mcfg.vocab_size)?;
            return Ok(DataSource::Dataset(Box::new(l)));
        }
        let (tokens, source) = match (&cfg.data.text, &cfg.data.tokens) {
            (Some(text), _) => {
                let tok = cfg
                    .data
                    .tokenizer
                    .clone()
                    .or_else(|| tokenizer.map(Path::to_path_buf))
                    .with_context(|| {
                        format!(
                            "data.text needs a tokenizer: none in {} and no data.tokenizer",
                            cfg.model.path.display()
                        )
                    })?;
                (tokenize_text_file(text, &tok)?, text.display().to_string())
            }
            (None, Some(t)) => (load_token_file(t)?, t.display().to_string()),
            (None, None) => bail!("data: missing key `dataset`, `text` or `tokens`"),
        };
        Ok(DataSource::Stream(TokenStream::new(
            tokens,
            seq,
            mcfg.vocab_size,
            &source,
        )?))
    }

    /// The next (ids, targets) and the data position advanced in `st`.
    fn next(&mut self, st: &mut TrainState) -> Result<(Vec<u32>, Vec<i32>)> {
        match self {
            DataSource::Dataset(l) => {
                let s = l.next_sample()?;
                st.loader = Some(l.state());
                Ok((s.ids, s.targets))
            }
            DataSource::Stream(t) => {
                let w = t.window(st.data_position);
                st.data_position += 1;
                Ok(w)
            }
        }
    }
}

/// A prepared dataset's manifest must fit the model's vocabulary.
fn check_vocab(dir: &Path, vocab: usize) -> Result<()> {
    let p = dir.join("manifest.json");
    let Ok(text) = std::fs::read_to_string(&p) else {
        return Ok(());
    };
    let m: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: malformed", p.display()))?;
    if let Some(v) = m["vocab_size"].as_u64()
        && v as usize > vocab
    {
        bail!(
            "{}: the dataset's tokenizer has {v} tokens, more than the model's vocab_size {vocab}",
            p.display()
        );
    }
    Ok(())
}

/// The tokenizer that goes with a model directory, if it has one.
fn tokenizer_of(dir: &Path) -> Option<PathBuf> {
    let p = dir.join("tokenizer.json");
    p.exists().then_some(p)
}

/// How this invocation runs: resume or not, and an optional stop before the configured end (a job
/// step shorter than the run: it checkpoints and exits, and a later `--resume` continues).
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    pub resume: bool,
    pub stop_after_steps: Option<u64>,
}

/// Run (or resume) training as `cfg` says, on the CPU backend in f32, one rank alone.
pub fn train(cfg: &RunConfig, opts: RunOptions) -> Result<RunSummary> {
    let b = CpuBackend::<f32>::new();
    train_on(&b, &Topology::single(), cfg, opts)
}

/// A test hook: `ULTRALONG_FAIL_RANK=r` (and optionally `ULTRALONG_FAIL_STEP=s`, default 1) makes
/// world rank r fail at step s, to show that one failing rank ends the whole job.
fn injected_failure(topo: &Topology, step: u64) -> Result<()> {
    let rank: Option<usize> = std::env::var("ULTRALONG_FAIL_RANK")
        .ok()
        .and_then(|v| v.parse().ok());
    let at: u64 = std::env::var("ULTRALONG_FAIL_STEP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if rank == Some(topo.world_rank) && step == at {
        bail!(
            "rank {} fails at step {step} on purpose (ULTRALONG_FAIL_RANK)",
            topo.world_rank
        );
    }
    Ok(())
}

pub fn train_on<B: ModelBackend>(
    b: &B,
    topo: &Topology,
    cfg: &RunConfig,
    opts: RunOptions,
) -> Result<RunSummary> {
    let lead = topo.world_rank == 0;
    let shard = topo.shard();
    let resume = opts.resume;
    let precision: RopePrecision = cfg.model.rope_precision.parse()?;
    let out = &cfg.train.out_dir;
    if lead {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    }
    topo.world.barrier();
    // Tokenizer files travel with every checkpoint and export: each from the prepared dataset when
    // it has it (`prepare cpt` writes the starting model's tokenizer files with the `<s>`
    // separator in a reserved slot), else from the starting model directory.
    let tok_dirs: Vec<PathBuf> = cfg
        .data
        .dataset
        .iter()
        .cloned()
        .chain(std::iter::once(cfg.model.path.clone()))
        .collect();
    let tok_dir = tok_dirs
        .iter()
        .find(|d| tokenizer_of(d).is_some())
        .cloned()
        .unwrap_or_else(|| cfg.model.path.clone());
    let tok_source = tokenizer_of(&tok_dir);

    // Model and optimizer state: from the newest valid checkpoint, or fresh.
    let ckpt_root = cfg.checkpoint_dir();
    let found = if resume {
        checkpoint::find_latest(&ckpt_root)?
    } else {
        None
    };
    let pass = PassOptions {
        seq_len: cfg.train.seq_len,
        recompute: cfg.train.recompute,
        ce_chunk: cfg.train.ce_chunk,
        precision,
    };
    let (mut model, mut opt, state) = match found {
        Some((dir, state)) => {
            let (arch, params, opt) = checkpoint::load(b, topo, &dir, &state)?;
            if lead {
                eprintln!("resuming from {} (step {})", dir.display(), state.step);
            }
            if lead && state.config_hash != config_hash(cfg) {
                eprintln!("note: the run config differs from the one that wrote this checkpoint");
            }
            (b.train_model(topo, arch, params, pass)?, opt, state)
        }
        None => {
            if resume && lead {
                eprintln!(
                    "no checkpoint in {}: starting from {}",
                    ckpt_root.display(),
                    cfg.model.path.display()
                );
            }
            let dir = &cfg.model.path;
            let mut arch = ArchConfig::from_file(&dir.join("config.json"))?;
            if let Some(o) = &cfg.model.rope_scaling {
                arch = arch.with_rope_override(o, "the run config")?;
            }
            // This rank's TP shard only, read from the memory-mapped files.
            let files = MappedTensors::open_dir(dir)?;
            let params = arch.params_from_files(b, &files, &dir.display().to_string(), shard)?;
            let opt = ShardedAdamW::new(b, topo, &params);
            let state = TrainState {
                step: 0,
                data_position: 0,
                loader: None,
                tokens_seen: 0,
                seed: cfg.train.seed,
                config_hash: config_hash(cfg),
                files: Default::default(),
                layout: None,
            };
            (b.train_model(topo, arch, params, pass)?, opt, state)
        }
    };
    let resumed_from = (state.step > 0).then_some(state.step);
    if lead && model.arch().is_hsa() {
        eprintln!("model: {}", model.arch().name());
    }

    // Data and layout.
    let seq = cfg.train.seq_len;
    let layout = topo.layout;
    cfg.check_layout(&layout)?;
    let per_step = cfg.sequences_per_step() as u64;
    let mcfg = model.arch().base().clone();
    if lead && seq > mcfg.max_position_embeddings {
        eprintln!(
            "note: seq_len {seq} exceeds the model's max_position_embeddings {}",
            mcfg.max_position_embeddings
        );
    }
    let mut source = DataSource::open(cfg, &mcfg, tok_source.as_deref(), &state)?;
    let mut grads = model.params().zeros_like(b);
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = if lead {
        trim_metrics(&metrics_path, state.step)?;
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .with_context(|| format!("cannot open {}", metrics_path.display()))?,
        )
    } else {
        None
    };

    let total = cfg.train.steps;
    let pb = ProgressBar::new(total);
    if cfg.log.quiet || !lead {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps  ETA {eta}  {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_position(state.step);

    let stop = stop_requested();
    let mut preempted = false;
    let mut st = state;
    let (mut first_loss, mut last_loss) = (None, None);
    let stop_at = opts
        .stop_after_steps
        .map_or(total, |n| (st.step + n).min(total));
    while st.step < stop_at {
        let t0 = Instant::now();
        grads.zero_all(b);
        injected_failure(topo, st.step + 1)?;
        let wait0 = topo.cp.wait_clock().get();
        // The step's global batch first: the loss is averaged over all its counted targets.
        let batch: Vec<(Vec<u32>, Vec<i32>)> = (0..per_step)
            .map(|_| source.next(&mut st))
            .collect::<Result<_>>()?;
        let loss = model.forward_backward_batch(
            b,
            topo,
            GlobalBatch {
                seqs: &batch,
                pos0: 0,
            },
            Some(&mut grads),
        )?;
        b.check()
            .with_context(|| format!("step {}: forward and backward", st.step + 1))?;
        if !loss.is_finite() {
            bail!(
                "step {}: loss is {loss}; stopping (last checkpoint is intact)",
                st.step + 1
            );
        }
        let step = st.step + 1;
        let lr = learning_rate(&cfg.optim, step, total);
        let o = &cfg.optim;
        let hp = AdamW {
            lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            step,
            grad_scale: 1.0,
        };
        let grad_norm = opt.step(b, topo, model.params_mut(), &mut grads, hp, o.grad_clip);
        b.check()
            .with_context(|| format!("step {step}: optimizer"))?;
        let ring_wait_s = topo.cp.wait_clock().get() - wait0;
        st.step = step;
        st.tokens_seen += per_step * seq as u64;

        let dt = t0.elapsed().as_secs_f64();
        let tflops_per_rank = model.flops_per_token(seq) * (per_step as usize * seq) as f64
            / dt
            / layout.world() as f64
            / 1e12;
        let line = StepMetrics {
            step,
            loss,
            lr,
            grad_norm,
            tokens: st.tokens_seen,
            tokens_per_s: (per_step as usize * seq) as f64 / dt,
            step_ms: dt * 1e3,
            tflops_per_rank,
            mfu: tflops_per_rank / cfg.log.peak_tflops,
            peak_mem_bytes: b.peak_bytes(),
        };
        let mut json = serde_json::to_value(&line)?;
        if layout.cp > 1 {
            json["ring_wait_ms"] = (ring_wait_s * 1e3).into();
        }
        let json = json.to_string();
        if let Some(f) = metrics.as_mut() {
            pb.suspend(|| println!("{json}"));
            writeln!(f, "{json}")
                .with_context(|| format!("cannot write {}", metrics_path.display()))?;
        }
        pb.set_message(format!("loss {loss:.4}"));
        pb.inc(1);
        first_loss.get_or_insert(loss);
        last_loss = Some(loss);

        let interval = cfg.checkpoint.interval;
        let saved = (interval > 0 && step % interval == 0) || step == stop_at;
        if saved {
            save_checkpoint(
                b,
                topo,
                &ckpt_root,
                model.as_ref(),
                &opt,
                &st,
                &tok_dirs,
                cfg,
            )?;
        }
        // A signal on any rank stops every rank after the same step.
        let mut sig = [stop.load(std::sync::atomic::Ordering::Relaxed) as u8];
        topo.world.all_reduce(&mut sig, ReduceOp::Max);
        if sig[0] != 0 && step < total {
            if !saved {
                save_checkpoint(
                    b,
                    topo,
                    &ckpt_root,
                    model.as_ref(),
                    &opt,
                    &st,
                    &tok_dirs,
                    cfg,
                )?;
            }
            if lead {
                pb.suspend(|| {
                    eprintln!(
                        "signal received: stopped after step {step} with a checkpoint; `--resume` continues (exit {EXIT_PREEMPTED})"
                    )
                });
            }
            preempted = true;
            break;
        }
    }
    pb.finish_and_clear();
    if let Some(f) = metrics.as_mut() {
        f.flush()?;
    }
    if lead && st.step == total && resumed_from == Some(total) {
        eprintln!("nothing to do: the checkpoint is already at step {total}");
    }
    // Plots of the whole run so far (also after a preemption). A plot that cannot be drawn
    // does not fail a run whose checkpoint is safe: say so and go on.
    if lead && cfg.log.plots {
        match crate::train::plots::write_run_plots(out) {
            Ok(files) => eprintln!(
                "plots: {}",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => eprintln!("warning: plots not written: {e:#}"),
        }
    }
    let final_checkpoint = checkpoint::find_latest(&ckpt_root)?
        .map(|(d, _)| d)
        .unwrap_or_default();
    Ok(RunSummary {
        steps_done: st.step,
        first_loss,
        last_loss,
        resumed_from,
        final_checkpoint,
        preempted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_after_the_checkpoint_are_dropped_on_resume() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("metrics.jsonl");
        std::fs::write(&p, "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n").unwrap();
        trim_metrics(&p, 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"step\":1}\n{\"step\":2}\n"
        );
        trim_metrics(&d.path().join("absent.jsonl"), 0).unwrap();
    }
}
