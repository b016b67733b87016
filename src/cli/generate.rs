//! `ultralong generate`: continue a prompt (a text file, or a JSON array of token ids) with the
//! model (a Llama, or the HSA model on one CPU rank with its chunk-memory cache): the weights split over `--tp` ranks as in training, prefill with context parallelism
//! over `--cp` ranks (ring attention), decode with the KV cache spread over them; greedy by
//! default, or temperature + top-p sampling with a seed. Prints
//! the continuation, then one JSON line with the tokens and timings (prefill and decode tokens/s).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::backend::select::BackendKind;
use crate::eval::generate::{Sampling, generate};
use crate::eval::lm::EvalBackend;
use crate::eval::{PromptFormat, decode, encode, load_tokenizer};
use crate::model::rope::RopePrecision;
use crate::parallel::any::{World, run_world};
use crate::parallel::topology::Topology;
use crate::train::data::load_token_file;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// UTF-8 text file: the prompt.
    #[arg(
        long,
        required_unless_present = "prompt_tokens",
        conflicts_with = "prompt_tokens"
    )]
    pub prompt: Option<PathBuf>,
    /// Or the prompt as token ids: a JSON array (or little-endian u32 file).
    #[arg(long)]
    pub prompt_tokens: Option<PathBuf>,
    /// Wrap the text prompt in the Llama-3.1 chat template (as a user message).
    #[arg(long)]
    pub chat: bool,
    /// Tokens to generate at most (fewer if an end-of-sequence token comes first).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus (top-p) mass kept when sampling.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the sampling RNG.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Do not stop at the end-of-sequence tokens (config eos_token_id, <|eot_id|>).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Layout (`--tp`, `--cp`: run under `mpirun -np TP·CP`) and numerics.
    #[command(flatten)]
    pub run: super::eval::InferenceArgs,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let kind = BackendKind::parse(
        ("--backend", &a.run.backend),
        ("--precision", &a.run.precision),
    )?;
    crate::eval::lm::check_backend(&a.model, kind)?;
    crate::on_backend!(kind, |b| run_world(|w| run_on(b, w, &a)))
}

fn run_on<B: EvalBackend>(b: &B, world: &World, a: &GenerateArgs) -> Result<()> {
    let topo = Topology::new(world.comm(), a.run.tp, a.run.cp)?;
    if topo.layout.dp != 1 {
        let n = a.run.tp * a.run.cp;
        bail!(
            "generate runs one prompt: the world of {} ranks must equal --tp {} × --cp {} (mpirun -np {n})",
            world.size(),
            a.run.tp,
            a.run.cp
        );
    }
    let sampling = Sampling::new(a.temperature, a.top_p, a.seed)?;
    let precision: RopePrecision = a.run.rope_precision.parse()?;
    let lm = b.load_lm(&topo, &a.model, precision)?;
    let tok = if a.prompt.is_some() || a.model.join("tokenizer.json").exists() {
        Some(load_tokenizer(&a.model)?)
    } else {
        None
    };
    let format = match (&tok, a.chat) {
        (Some(t), true) => PromptFormat::choose(t, "chat")?,
        (None, true) => bail!("--chat needs the model's tokenizer.json"),
        _ => PromptFormat::Plain,
    };
    let prompt: Vec<u32> = match (&a.prompt, &a.prompt_tokens) {
        (Some(p), _) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("--prompt: cannot read text file {}", p.display()))?;
            let t = tok.as_ref().expect("loaded for --prompt");
            match &format {
                PromptFormat::Chat(_) => {
                    let (mut pre, post) = format.wrap(t, "")?;
                    pre.extend(encode(t, &text)?);
                    pre.extend(post);
                    pre
                }
                PromptFormat::Plain => encode(t, &text)?,
            }
        }
        (None, Some(p)) => load_token_file(p).context("--prompt-tokens")?,
        (None, None) => bail!("give --prompt FILE or --prompt-tokens FILE"),
    };
    if prompt.is_empty() {
        bail!("the prompt has no tokens");
    }
    let vocab = lm.cfg().vocab_size;
    if let Some((i, &bad)) = prompt
        .iter()
        .enumerate()
        .find(|&(_, &x)| x as usize >= vocab)
    {
        bail!("--prompt-tokens: token {bad} at index {i} is outside the vocabulary of {vocab}");
    }
    let window = lm.cfg().max_position_embeddings;
    if prompt.len() + a.max_new_tokens > window && topo.world_rank == 0 {
        eprintln!(
            "note: {} prompt + {} new tokens exceed the model's window of {window} (max_position_embeddings)",
            prompt.len(),
            a.max_new_tokens
        );
    }
    let stop = if a.ignore_eos {
        Vec::new()
    } else {
        format.stop_tokens(lm.cfg())
    };
    let mut s = lm.decoder();
    let g = generate(
        s.as_mut(),
        &prompt,
        a.max_new_tokens,
        &sampling,
        &stop,
        false,
    )?;
    let cache_rows = s.cached_rows();
    if topo.world_rank == 0 {
        if let Some(t) = &tok {
            println!("{}", decode(t, &g.tokens)?);
        }
        let j = json!({
            "prompt_tokens": g.prompt_tokens,
            "new_tokens": g.tokens.len(),
            "tokens": g.tokens,
            "stopped": g.stopped,
            "prefill_s": g.prefill_s,
            "decode_s": g.decode_s,
            "prefill_tokens_per_s": g.prefill_tokens_per_s(),
            "decode_tokens_per_s": if g.decode_steps > 0 { json!(g.decode_tokens_per_s()) } else { json!(null) },
            "sampling": match sampling {
                Sampling::Greedy => json!("greedy"),
                Sampling::Nucleus { temperature, top_p, seed } =>
                    json!({"temperature": temperature, "top_p": top_p, "seed": seed}),
            },
            "tp": a.run.tp,
            "cp": a.run.cp,
            "kv_cache_rows_rank0": cache_rows,
            "backend": b.name(),
            "model": lm.name(),
        });
        println!("{j}");
    }
    Ok(())
}
