//! `ultralong prepare cpt|sft|recall`: token datasets for continued pretraining, for SFT, and the
//! synthetic recall task of the toy HSA comparison.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

use crate::data::prepare::{CptOptions, DomainSource, Resampling, prepare_cpt};
use crate::data::recall::{RecallOptions, RecallSpec, prepare_recall};
use crate::data::sft::{SftOptions, prepare_sft};

#[derive(Subcommand, Debug)]
pub enum PrepareCommand {
    /// Stage-1 data: tokenize, resample by length per domain, join with `<s>`, pack.
    Cpt(CptArgs),
    /// Stage-2 data: chat samples in the Llama-3 template, loss on assistant turns only.
    Sft(SftArgs),
    /// A synthetic recall task: key-value needles in filler, queries at the end, loss on the
    /// queried values only (docs/HSA.md §7); `eval recall` draws more samples from its manifest.
    Recall(RecallArgs),
}

#[derive(Args, Debug)]
pub struct RecallArgs {
    /// Tokens per sample (one sample per row).
    #[arg(long)]
    pub seq_len: usize,
    /// Samples (rows) to write.
    #[arg(long)]
    pub samples: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
    /// Filler symbols (ids 3 ..).
    #[arg(long, default_value_t = RecallSpec::default().filler)]
    pub filler: u32,
    /// 0: uniform filler; else the length of a random filler phrase repeated through the
    /// haystack (passkey style).
    #[arg(long, default_value_t = RecallSpec::default().period)]
    pub period: usize,
    /// Key symbols (after the filler).
    #[arg(long, default_value_t = RecallSpec::default().keys)]
    pub keys: u32,
    /// Value symbols (after the keys; then keys x values pair tokens).
    #[arg(long, default_value_t = RecallSpec::default().values)]
    pub values: u32,
    #[arg(long, default_value_t = RecallSpec::default().needles)]
    pub needles: usize,
    #[arg(long, default_value_t = RecallSpec::default().queries)]
    pub queries: usize,
    /// No needle lies fewer than this many tokens before the first query.
    #[arg(long, default_value_t = 0)]
    pub min_distance: usize,
}

#[derive(Args, Debug)]
pub struct SftArgs {
    /// Input files with a `messages` array (system/user/assistant) per record: JSON Lines
    /// (.jsonl, .jsonl.gz, .jsonl.zst) or Parquet (a `messages` column of role/content structs).
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// tokenizer.json (with the Llama-3 special tokens), or a model directory holding one.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Row length; longer samples are dropped and counted, never truncated (the paper: 8192).
    #[arg(long, default_value_t = 8192)]
    pub max_len: usize,
    #[arg(long)]
    pub out: PathBuf,
    /// One sample per row instead of packing several consecutive samples per row.
    #[arg(long)]
    pub no_pack: bool,
    #[arg(long)]
    pub skip_invalid: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct CptArgs {
    /// Input files: JSON Lines (.jsonl, .jsonl.gz, .jsonl.zst) or Parquet (.parquet, as HF datasets).
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// tokenizer.json, or a model directory holding one.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Tokens per packed sequence (the paper: 1048576, 2097152, 4194304).
    #[arg(long)]
    pub seq_len: usize,
    /// Token budget after resampling (the paper: about 1B).
    #[arg(long)]
    pub tokens: u64,
    #[arg(long)]
    pub out: PathBuf,
    /// JSON field holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// JSON field holding the domain.
    #[arg(long, conflicts_with = "domain_from_dir")]
    pub domain_field: Option<String>,
    /// Take each input's domain from the name of its directory.
    #[arg(long)]
    pub domain_from_dir: bool,
    /// Separator token between documents (added to the tokenizer when missing).
    #[arg(long, default_value = "<s>")]
    pub separator: String,
    /// Join documents with nothing between them (the paper's without-separator ablation).
    #[arg(long, conflicts_with = "separator")]
    pub no_separator: bool,
    /// Documents shorter than this many tokens are down-sampled.
    #[arg(long, default_value_t = 4096)]
    pub short: usize,
    /// Documents longer than this many tokens are up-sampled.
    #[arg(long, default_value_t = 8192)]
    pub long: usize,
    /// Relative sampling rate of short documents (mid-length = 1).
    #[arg(long, default_value_t = 0.5)]
    pub short_weight: f64,
    /// Relative sampling rate of long documents (mid-length = 1).
    #[arg(long, default_value_t = 2.0)]
    pub long_weight: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Megabytes of text tokenized per batch (the memory bound: tokenized batches take roughly
    /// 10x their text size while in flight).
    #[arg(long, default_value_t = 16)]
    pub buffer_mb: usize,
    /// Tokenizer threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Skip malformed lines, missing fields, invalid UTF-8 and empty documents, counting each.
    #[arg(long)]
    pub skip_invalid: bool,
}

pub fn run(cmd: PrepareCommand) -> Result<()> {
    match cmd {
        PrepareCommand::Cpt(a) => {
            if let Some(n) = a.workers {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build_global()
                    .ok();
            }
            if !(a.short_weight > 0.0 && a.long_weight > 0.0) {
                bail!("--short-weight and --long-weight must be positive");
            }
            if a.short > a.long {
                bail!("--short ({}) must not exceed --long ({})", a.short, a.long);
            }
            let o = CptOptions {
                inputs: a.input,
                tokenizer: a.tokenizer,
                seq_len: a.seq_len,
                token_budget: a.tokens,
                out: a.out,
                text_field: a.text_field,
                domain: match (a.domain_field, a.domain_from_dir) {
                    (Some(f), _) => DomainSource::Field(f),
                    (None, true) => DomainSource::Directory,
                    (None, false) => DomainSource::Single,
                },
                separator: a.separator,
                no_separator: a.no_separator,
                resampling: Resampling {
                    short: a.short,
                    long: a.long,
                    short_weight: a.short_weight,
                    long_weight: a.long_weight,
                },
                seed: a.seed,
                buffer_bytes: a.buffer_mb.max(1) << 20,
                skip_invalid: a.skip_invalid,
            };
            let r = prepare_cpt(&o)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        PrepareCommand::Sft(a) => {
            let o = SftOptions {
                inputs: a.input,
                tokenizer: a.tokenizer,
                max_len: a.max_len,
                out: a.out,
                pack: !a.no_pack,
                skip_invalid: a.skip_invalid,
                seed: a.seed,
            };
            let r = prepare_sft(&o)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        PrepareCommand::Recall(a) => {
            let o = RecallOptions {
                spec: RecallSpec {
                    filler: a.filler,
                    period: a.period,
                    keys: a.keys,
                    values: a.values,
                    needles: a.needles,
                    queries: a.queries,
                    min_distance: a.min_distance,
                },
                seq_len: a.seq_len,
                samples: a.samples,
                seed: a.seed,
                out: a.out,
            };
            let m = prepare_recall(&o)?;
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
    }
}
