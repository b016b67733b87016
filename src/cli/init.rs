//! `ultralong init`: a random model (and optionally a freshly trained byte-level BPE tokenizer).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::backend::cpu::CpuBackend;
use crate::io::DType;
use crate::model::arch::ArchConfig;
use crate::model::hf::save_hf_dir;

#[derive(Args, Debug)]
pub struct InitArgs {
    /// A Hugging Face config.json: the Llama 3.x family, or the HSA model
    /// (`architectures: ["DRTForCausalLM"]`, docs/HSA.md).
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
    /// Copy this tokenizer.json (or the tokenizer files of this directory) into the model.
    #[arg(long, conflicts_with = "train_tokenizer")]
    pub tokenizer: Option<PathBuf>,
    /// Train a byte-level BPE tokenizer on this text file, with the config's vocab_size.
    #[arg(long)]
    pub train_tokenizer: Option<PathBuf>,
    /// Weight dtype on disk: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Special tokens of our trained tokenizers: Llama 3's begin/end of text and chat-template tokens,
/// and the paper's `<s>` document separator.
pub const SPECIAL_TOKENS: [&str; 6] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
];

/// Train a byte-level BPE (GPT-2/Llama-3 style pre-tokenisation) with `vocab_size` entries.
pub fn train_bpe_tokenizer(text: &Path, vocab_size: usize, out: &Path) -> Result<()> {
    if !text.exists() {
        bail!("tokenizer training text {} does not exist", text.display());
    }
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(
                SPECIAL_TOKENS
                    .iter()
                    .map(|t| AddedToken::from(*t, true))
                    .collect(),
            )
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    let files = vec![text.to_string_lossy().into_owned()];
    tok.train_from_files(&mut trainer, files)
        .map_err(|e| anyhow::anyhow!("training a tokenizer on {}: {e}", text.display()))?;
    tok.save(out, false)
        .map_err(|e| anyhow::anyhow!("cannot save {}: {e}", out.display()))?;
    Ok(())
}

pub fn run(a: InitArgs) -> Result<()> {
    let arch = ArchConfig::from_file(&a.config)?;
    let dtype: DType = a.dtype.parse()?;
    let b = CpuBackend::<f32>::new();
    let params = arch.init_random(&b, a.seed);
    save_hf_dir(&a.out, arch.to_hf_json(), &params.to_host(&b), dtype, None)?;
    if let Some(t) = &a.tokenizer {
        if t.is_dir() {
            crate::io::copy_tokenizer_files(t, &a.out)?;
        } else {
            std::fs::copy(t, a.out.join("tokenizer.json"))
                .with_context(|| format!("cannot copy {}", t.display()))?;
        }
    }
    let cfg = arch.base();
    if let Some(text) = &a.train_tokenizer {
        train_bpe_tokenizer(text, cfg.vocab_size, &a.out.join("tokenizer.json"))?;
    }
    eprintln!(
        "initialised {} parameters ({}, {} layers, hidden {}) in {}",
        params.numel(),
        arch.name(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        a.out.display()
    );
    Ok(())
}
