//! `ultralong plot --run DIR`: draw a run's `loss.png` and `throughput.png` from its
//! `metrics.jsonl` now (training draws them at its end too), e.g. while a Slurm job is running.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// The run's output directory (`train.out_dir`, where `metrics.jsonl` is).
    #[arg(long)]
    pub run: PathBuf,
}

pub fn run(a: PlotArgs) -> Result<()> {
    for f in crate::train::plots::write_run_plots(&a.run)? {
        println!("{}", f.display());
    }
    Ok(())
}
