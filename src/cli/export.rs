//! `ultralong export`: a checkpoint's model as a Hugging Face directory (config.json carrying the
//! rope scaling in both the transformers 4.x and 5.x forms, weights, tokenizer files).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;

use crate::io::DType;
use crate::model::hf::save_hf_dir;
use crate::train::checkpoint;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A run directory or a checkpoint directory (its newest valid checkpoint), or one
    /// checkpoint (step-…).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype: bf16 (default, as released Llama checkpoints), f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
}

/// Resolve a run dir or a checkpoint dir to one verified checkpoint directory.
pub fn resolve_checkpoint(p: &Path) -> Result<PathBuf> {
    if p.join("state.json").exists() {
        checkpoint::verify(p)?;
        return Ok(p.to_path_buf());
    }
    // A checkpoint directory has a `latest` pointer; a run directory holds `checkpoints/`.
    let root = if p.join("latest").exists() {
        p.to_path_buf()
    } else {
        checkpoint::checkpoints_dir(p)
    };
    match checkpoint::find_latest(&root)? {
        Some((d, _)) => Ok(d),
        None => bail!("{}: no valid checkpoint found", p.display()),
    }
}

pub fn run(a: ExportArgs) -> Result<()> {
    let dtype: DType = a.dtype.parse()?;
    let dir = resolve_checkpoint(&a.checkpoint)?;
    // The full tensors, gathered from every rank's shard of the checkpoint.
    let (cfg, weights, _) = checkpoint::load_full(&dir)?;
    save_hf_dir(&a.out, cfg.to_hf_json(), &weights, dtype, Some(&dir))?;
    eprintln!(
        "exported {} to {} ({dtype})",
        dir.display(),
        a.out.display()
    );
    Ok(())
}
