//! `ultralong train --config RUN.toml [--set key=value]... [--resume]`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::backend::select::BackendKind;
use crate::model::arch::ArchConfig;
use crate::model::hf::require_model_dir;
use crate::model::hsa::ctx::Shares;
use crate::model::params::Shard;
use crate::parallel::any::{World, detect_launch, run_world};
use crate::parallel::device_comm::with_device_collectives;
use crate::parallel::topology::{Layout, Topology};
use crate::train::config::RunConfig;
use crate::train::model::{HSA_NOT_ON_CUDA, ModelBackend};
use crate::train::trainer;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// TOML run config (see configs/).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value, e.g. `--set train.steps=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from the newest complete checkpoint in train.out_dir (if any).
    #[arg(long)]
    pub resume: bool,
    /// Stop (with a checkpoint) after this many steps of this invocation; `--resume` continues.
    #[arg(long)]
    pub stop_after_steps: Option<u64>,
    /// Tensor-parallel ranks (overrides parallel.tp); under `mpirun -np N`, dp = N / (tp·cp).
    #[arg(long)]
    pub tp: Option<usize>,
    /// Context-parallel ranks (overrides parallel.cp).
    #[arg(long)]
    pub cp: Option<usize>,
    /// cpu or cuda (overrides train.backend).
    #[arg(long)]
    pub backend: Option<String>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    // Each override with the flag the user typed, for errors.
    let mut set: Vec<(String, String)> = a
        .set
        .iter()
        .map(|s| (format!("--set {s}"), s.clone()))
        .collect();
    set.extend(a.tp.map(|v| (format!("--tp {v}"), format!("parallel.tp={v}"))));
    set.extend(a.cp.map(|v| (format!("--cp {v}"), format!("parallel.cp={v}"))));
    set.extend(
        a.backend
            .as_ref()
            .map(|v| (format!("--backend {v}"), format!("train.backend={v}"))),
    );
    let cfg = RunConfig::load_from(&a.config, &set)?;
    let kind = BackendKind::parse(
        ("train.backend", &cfg.train.backend),
        ("train.precision", &cfg.train.precision),
    )?;
    check_before_world(&cfg, a.resume, kind)?;
    run_world(|world| run_ranks(world, kind, &a, &cfg))
}

/// What can be checked from the config, the files and the launcher's environment is checked before
/// the world starts and before anything is created: an error is then printed once (by rank 0,
/// `report_error`), not once per rank, and no empty `train.out_dir` is left behind. The trainer
/// checks the layout again in the world (its other callers start there).
fn check_before_world(cfg: &RunConfig, resume: bool, kind: BackendKind) -> Result<()> {
    for (key, path) in [
        ("data.dataset", &cfg.data.dataset),
        ("data.text", &cfg.data.text),
        ("data.tokens", &cfg.data.tokens),
        ("data.tokenizer", &cfg.data.tokenizer),
    ] {
        if let Some(p) = path
            && !p.exists()
        {
            bail!(
                "{key} = {:?}: no such file or directory",
                p.display().to_string()
            );
        }
    }
    // The launcher says how many ranks there will be (PMIx alone does not: checked in the world).
    let world = match detect_launch(&|k| std::env::var(k).ok()) {
        None => Some(1),
        Some(l) => l.size,
    };
    let layout = match world {
        Some(n) => Some(Layout::of_world(n, cfg.parallel.tp, cfg.parallel.cp)?),
        None => None,
    };
    if let Some(l) = &layout {
        cfg.check_layout(l)?;
    }
    // The starting model, unless a resume finds checkpoints (they carry the model).
    if !(resume && cfg.checkpoint_dir().is_dir()) {
        require_model_dir(&cfg.model.path, "model.path")?;
        match ArchConfig::from_file(&cfg.model.path.join("config.json"))? {
            ArchConfig::Llama(model) => {
                if let Some(l) = &layout {
                    l.check_model(&model)
                        .context("the model and the layout (parallel.tp, --tp)")?;
                }
            }
            ArchConfig::Hsa(h) => {
                if kind == BackendKind::Cuda {
                    bail!("{HSA_NOT_ON_CUDA}");
                }
                if cfg.parallel.cp != 1 {
                    bail!(
                        "the HSA model trains with tensor and data parallelism only for now: \
                         parallel.cp = {} must be 1",
                        cfg.parallel.cp
                    );
                }
                Shares::new(
                    &h,
                    Shard {
                        rank: 0,
                        size: cfg.parallel.tp,
                    },
                )
                .context("the model and the layout (parallel.tp, --tp)")?;
                if !cfg.train.seq_len.is_multiple_of(h.chunk_size) {
                    bail!(
                        "train.seq_len = {} must be a multiple of the HSA model's chunk_size {} \
                         ({})",
                        cfg.train.seq_len,
                        h.chunk_size,
                        cfg.model.path.join("config.json").display()
                    );
                }
            }
        }
    }
    Ok(())
}

fn run_ranks(world: &World, kind: BackendKind, a: &TrainArgs, cfg: &RunConfig) -> Result<()> {
    let topo = Topology::new(world.comm(), cfg.parallel.tp, cfg.parallel.cp)?;
    crate::on_backend!(kind, |b| {
        let (topo, path) = with_device_collectives(b, topo)?;
        if topo.world_rank == 0 && topo.layout.world() > 1 {
            eprintln!("{path}");
        }
        run_on(b, &topo, a, cfg)
    })
}

fn run_on<B: ModelBackend>(b: &B, topo: &Topology, a: &TrainArgs, cfg: &RunConfig) -> Result<()> {
    let s = trainer::train_on(
        b,
        topo,
        cfg,
        trainer::RunOptions {
            resume: a.resume,
            stop_after_steps: a.stop_after_steps,
        },
    )?;
    if s.preempted {
        crate::cli::EXIT_CODE.store(
            trainer::EXIT_PREEMPTED,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    if topo.world_rank != 0 {
        return Ok(());
    }
    let l = topo.layout;
    if l.world() > 1 {
        eprintln!(
            "layout: tp {} × cp {} × dp {} = {} ranks",
            l.tp,
            l.cp,
            l.dp,
            l.world()
        );
    }
    eprintln!(
        "trained to step {} (loss {} -> {}); checkpoint {}",
        s.steps_done,
        s.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.final_checkpoint.display()
    );
    Ok(())
}
