//! `ultralong train --config RUN.toml [--set key=value]... [--resume]`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

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
}

pub fn run(a: TrainArgs) -> Result<()> {
    let cfg = RunConfig::load(&a.config, &a.set)?;
    let s = trainer::train(
        &cfg,
        trainer::RunOptions {
            resume: a.resume,
            stop_after_steps: a.stop_after_steps,
        },
    )?;
    eprintln!(
        "trained to step {} (loss {} -> {}); checkpoint {}",
        s.steps_done,
        s.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.final_checkpoint.display()
    );
    Ok(())
}
