//! `ultralong train --config RUN.toml [--set key=value]... [--resume]`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::backend::Backend;
use crate::backend::select::BackendKind;
use crate::parallel::any::run_world;
use crate::parallel::topology::Topology;
use crate::train::config::RunConfig;
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
    let mut set = a.set.clone();
    set.extend(a.tp.map(|v| format!("parallel.tp={v}")));
    set.extend(a.cp.map(|v| format!("parallel.cp={v}")));
    set.extend(a.backend.as_ref().map(|v| format!("train.backend={v}")));
    let cfg = RunConfig::load(&a.config, &set)?;
    let kind = BackendKind::parse(
        ("train.backend", &cfg.train.backend),
        ("train.precision", &cfg.train.precision),
    )?;
    run_world(|world| {
        let topo = Topology::new(world.comm(), cfg.parallel.tp, cfg.parallel.cp)?;
        crate::on_backend!(kind, |b| run_on(b, &topo, &a, &cfg))
    })
}

fn run_on<B: Backend>(b: &B, topo: &Topology, a: &TrainArgs, cfg: &RunConfig) -> Result<()> {
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
