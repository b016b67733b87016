//! `ultralong eval niah|ppl`: needle-in-a-haystack over a grid of lengths × depths (niah.json +
//! niah.png heatmap), and loss by position (ppl.json + ppl.png). Under `mpirun` the world is
//! tp × cp × dp: each TP × CP group holds the model in TP shards and prefills one prompt (or
//! sequence) with ring attention, the DP groups share the grid cells (or sequences), world rank 0
//! writes the files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::backend::select::BackendKind;
use crate::data::indexed::IndexedDataset;
use crate::data::loader::TOKENS_PREFIX;
use crate::eval::lm::{EvalBackend, EvalLm};
use crate::eval::niah::{CellResult, Haystack, NiahSpec, accuracy_grid, run_cells};
use crate::eval::ppl::bucketize;
use crate::eval::{
    PromptFormat, all_gather_bytes, format_count, load_tokenizer, parse_count, parse_list,
};
use crate::io::write_atomic;
use crate::model::rope::RopePrecision;
use crate::parallel::any::{World, run_world};
use crate::parallel::comm::{Comm, ReduceOp};
use crate::parallel::topology::Topology;
use crate::plot;
use crate::train::data::{load_token_file, tokenize_text_file};

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Needle in a haystack: a number hidden at each depth of a haystack of each length, asked
    /// for, answered greedily, scored by exact match; niah.json + niah.png in --out.
    Niah(NiahArgs),
    /// Mean next-token loss by position (log-spaced buckets); ppl.json + ppl.png in --out.
    Ppl(PplArgs),
    /// Accuracy by length on a `prepare recall` task (either architecture; CPU, one rank);
    /// recall.json in --out.
    Recall(crate::eval::recall::RecallArgs),
}

/// Layout and numerics of an inference run (`eval`, `generate`).
#[derive(Args, Debug)]
pub struct InferenceArgs {
    /// Context-parallel ranks per prompt (world = tp × cp × dp under mpirun): the prompt and the
    /// KV cache are split over them.
    #[arg(long, default_value_t = 1)]
    pub cp: usize,
    /// Tensor-parallel ranks per copy of the model: the weights (and each cached row's heads)
    /// are split over them, as in training.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// cpu or cuda (one GPU per rank).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Working precision of the CPU backend: f32 or f64.
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// "exact" or "fp32" (HF/Megatron's fp32 angle arithmetic).
    #[arg(long, default_value = "exact")]
    pub rope_precision: String,
}

/// Flags shared by the evaluations: the model, the layout, the numerics.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub run: InferenceArgs,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct NiahArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Haystack lengths in tokens, e.g. 1K,4K,16K,1M (K = 1024). Default: 8 lengths halving down
    /// from --max-len (not below 1K).
    #[arg(long)]
    pub lengths: Option<String>,
    /// The longest haystack when --lengths is not given (default: the model's window,
    /// max_position_embeddings).
    #[arg(long)]
    pub max_len: Option<String>,
    /// Needle depths in percent of the haystack (0 = start, 100 = end).
    #[arg(long, default_value = "0,10,20,30,40,50,60,70,80,90,100")]
    pub depths: String,
    /// Trials per cell, each with its own number.
    #[arg(long, default_value_t = 1)]
    pub trials: usize,
    /// Seed of the numbers (and of the generated filler).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Haystack text file (its sentences are cycled to fill each length). Default: generated
    /// filler sentences.
    #[arg(long)]
    pub haystack: Option<PathBuf>,
    /// The needle sentence; `{number}` is replaced by the number.
    #[arg(long, default_value = "The special magic number is: {number}.")]
    pub needle: String,
    #[arg(long, default_value = "What is the special magic number?")]
    pub question: String,
    /// Text after the haystack; `{question}` is replaced. Default: "\n\n{question}" (chat) or
    /// "\n\nQuestion: {question}\nAnswer:" (plain).
    #[arg(long)]
    pub query_format: Option<String>,
    /// Digits of the number.
    #[arg(long, default_value_t = 7)]
    pub digits: u32,
    /// Greedy tokens generated for the answer.
    #[arg(long, default_value_t = 12)]
    pub max_new_tokens: usize,
    /// Prompt template: auto (chat when the tokenizer has the Llama-3 special tokens), chat, plain.
    #[arg(long, default_value = "auto")]
    pub template: String,
}

#[derive(Args, Debug)]
pub struct PplArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// An indexed dataset (PREFIX.bin/.idx, or a directory made by `prepare`): its tokens, in
    /// order, are cut into sequences.
    #[arg(long, required_unless_present = "text", conflicts_with = "text")]
    pub data: Option<PathBuf>,
    /// Or a UTF-8 text file (tokenized with the model's tokenizer), or token ids (.json array).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens per sequence (K/M suffixes allowed).
    #[arg(long)]
    pub seq_len: String,
    /// Sequences to evaluate (consecutive windows of the token stream).
    #[arg(long, default_value_t = 1)]
    pub sequences: usize,
    /// Log-spaced position buckets.
    #[arg(long, default_value_t = 16)]
    pub buckets: usize,
}

pub fn run(c: EvalCommand) -> Result<()> {
    let m = match &c {
        EvalCommand::Niah(a) => &a.m,
        EvalCommand::Ppl(a) => &a.m,
        EvalCommand::Recall(a) => return crate::eval::recall::run(a),
    };
    crate::model::hf::require_model_dir(&m.model, "--model")?;
    let kind = BackendKind::parse(
        ("--backend", &m.run.backend),
        ("--precision", &m.run.precision),
    )?;
    crate::eval::lm::check_backend(&m.model, kind)?;
    crate::on_backend!(kind, |b| run_world(|w| run_on(b, w, &c)))
}

fn run_on<B: EvalBackend>(b: &B, world: &World, c: &EvalCommand) -> Result<()> {
    match c {
        EvalCommand::Niah(a) => niah(b, world, a),
        EvalCommand::Ppl(a) => ppl(b, world, a),
        EvalCommand::Recall(_) => unreachable!("eval recall runs on its own (`run`)"),
    }
}

/// This rank's place in the world and the model (either architecture) on it; creates `--out`.
fn load<'a, B: EvalBackend>(
    b: &'a B,
    topo: &'a Topology,
    m: &ModelArgs,
) -> Result<Box<dyn EvalLm + 'a>> {
    let precision: RopePrecision = m.run.rope_precision.parse()?;
    let lm = b.load_lm(topo, &m.model, precision)?;
    if topo.world_rank == 0 {
        std::fs::create_dir_all(&m.out)
            .with_context(|| format!("--out: cannot create {}", m.out.display()))?;
    }
    Ok(lm)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)? + "\n";
    write_atomic(path, text.as_bytes())
}

fn niah<B: EvalBackend>(b: &B, world: &World, a: &NiahArgs) -> Result<()> {
    let t_start = Instant::now();
    let tok = load_tokenizer(&a.m.model)?;
    let format = PromptFormat::choose(&tok, &a.template)?;
    let depths = parse_list("--depths", &a.depths, |s| {
        let d: f64 = s
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{s:?} is not a number"))?;
        if !(0.0..=100.0).contains(&d) {
            bail!("depth {d} is outside 0..100 (percent)");
        }
        Ok(d)
    })?;
    if !(1..=18).contains(&a.digits) {
        bail!("--digits {}: expected 1 to 18", a.digits);
    }
    if a.trials == 0 {
        bail!("--trials 0: expected at least 1");
    }
    if !a.needle.contains("{number}") {
        bail!("--needle {:?}: must contain {{number}}", a.needle);
    }
    let topo = Topology::new(world.comm(), a.m.run.tp, a.m.run.cp)?;
    let lm = load(b, &topo, &a.m)?;
    let window = lm.cfg().max_position_embeddings;
    let lengths = match &a.lengths {
        Some(s) => parse_list("--lengths", s, parse_count)?,
        None => {
            let max = match &a.max_len {
                Some(s) => parse_count(s).context("--max-len")?,
                None => window,
            };
            let mut v: Vec<usize> = (0..8)
                .map(|k| max >> k)
                .filter(|&l| l >= 1024.min(max))
                .collect();
            v.reverse();
            v.dedup();
            v
        }
    };
    let lead = topo.world_rank == 0;
    if lead && let Some(&l) = lengths.iter().find(|&&l| l > window) {
        eprintln!(
            "note: length {l} exceeds the model's window of {window} tokens (max_position_embeddings)"
        );
    }
    let query = a.query_format.clone().unwrap_or_else(|| match format {
        PromptFormat::Chat(_) => "\n\n{question}".into(),
        PromptFormat::Plain => "\n\nQuestion: {question}\nAnswer:".into(),
    });
    let spec = NiahSpec {
        lengths: lengths.clone(),
        depths: depths.clone(),
        trials: a.trials,
        seed: a.seed,
        needle: a.needle.clone(),
        question: a.question.clone(),
        query,
        digits: a.digits,
        max_new_tokens: a.max_new_tokens,
    };
    let longest = *lengths.iter().max().expect("non-empty");
    let hay = match &a.haystack {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("--haystack: cannot read text file {}", p.display()))?;
            Haystack::from_text(&tok, &text, &format!("--haystack {}", p.display()))?
        }
        None => Haystack::generated(&tok, a.seed, longest)?,
    };
    // DP groups take cells round-robin; the longest first spreads the work evenly.
    let mut order: Vec<usize> = (0..spec.cells()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(spec.lengths[spec.cell(i).0]));
    let mine: Vec<usize> = order
        .iter()
        .copied()
        .skip(topo.dp_rank)
        .step_by(topo.layout.dp)
        .collect();
    let report = lead
        || (topo.cp_rank == 0
            && topo.tp_rank == 0
            && std::env::var_os("ULTRALONG_NIAH_VERBOSE").is_some());
    let cells = run_cells(lm.as_ref(), &tok, &format, &hay, &spec, &mine, |r| {
        if report {
            eprintln!(
                "niah: length {} depth {}% trial {}: {} ({} prompt tokens, prefill {:.2}s) {:?}",
                format_count(r.length),
                r.depth,
                r.trial,
                if r.correct { "correct" } else { "wrong" },
                r.prompt_tokens,
                r.prefill_s,
                r.output
            );
        }
    })?;
    // Every DP group's cells (the TP and CP ranks of a group hold the same results).
    let bytes = serde_json::to_vec(&cells)?;
    let parts = all_gather_bytes(&topo.dp, &bytes);
    if !lead {
        return Ok(());
    }
    let mut all: Vec<CellResult> = Vec::new();
    for p in parts {
        all.extend(serde_json::from_slice::<Vec<CellResult>>(&p)?);
    }
    all.sort_by(|x, y| {
        (x.length, x.depth, x.trial)
            .partial_cmp(&(y.length, y.depth, y.trial))
            .expect("finite depths")
    });
    let grid = accuracy_grid(&spec, &all);
    let correct = all.iter().filter(|c| c.correct).count();
    let overall = correct as f64 / all.len() as f64;
    let by_cell: Vec<_> = depths
        .iter()
        .enumerate()
        .flat_map(|(di, &d)| {
            let grid = &grid;
            lengths
                .iter()
                .enumerate()
                .map(move |(li, &l)| json!({"length": l, "depth": d, "accuracy": grid[di][li]}))
        })
        .collect();
    let j = json!({
        "model": a.m.model.display().to_string(),
        "lengths": lengths,
        "depths": depths,
        "trials": a.trials,
        "seed": a.seed,
        "template": format.name(),
        "needle": a.needle,
        "question": a.question,
        "query_format": spec.query,
        "digits": a.digits,
        "max_new_tokens": a.max_new_tokens,
        "haystack": a.haystack.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "generated".into()),
        "layout": {"tp": topo.layout.tp, "cp": topo.layout.cp, "dp": topo.layout.dp},
        "backend": b.name(),
        "cells": all,
        "accuracy": {"overall": overall, "by_cell": by_cell},
        "seconds": t_start.elapsed().as_secs_f64(),
    });
    write_json(&a.m.out.join("niah.json"), &j)?;
    let title = format!(
        "Needle in a haystack: {} ({:.1}% overall)",
        a.m.model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        100.0 * overall
    );
    let x_ticks: Vec<String> = lengths.iter().map(|&l| format_count(l)).collect();
    let y_ticks: Vec<String> = depths.iter().map(|d| format!("{d}%")).collect();
    plot::heatmap(
        &a.m.out.join("niah.png"),
        &plot::Heatmap {
            title: &title,
            x_label: "context length (tokens)",
            y_label: "needle depth",
            x_ticks: &x_ticks,
            y_ticks: &y_ticks,
            values: &grid,
            min: 0.0,
            max: 1.0,
            rows_top_down: true,
            annotate: lengths.len() * depths.len() <= 400,
        },
    )?;
    println!(
        "{}",
        json!({"accuracy": overall, "cells": all.len(), "correct": correct,
               "out": a.m.out.display().to_string(), "seconds": t_start.elapsed().as_secs_f64()})
    );
    Ok(())
}

/// The first `n` tokens of an indexed dataset (a prefix, or a `prepare` directory), in order.
fn dataset_tokens(path: &Path, n: usize) -> Result<Vec<u32>> {
    let prefix = if path.is_dir() {
        path.join(TOKENS_PREFIX)
    } else {
        path.to_path_buf()
    };
    let ds = IndexedDataset::open(&prefix).with_context(|| format!("--data {}", path.display()))?;
    let mut out = Vec::with_capacity(n);
    for i in 0..ds.len() {
        if out.len() >= n {
            break;
        }
        out.extend(ds.get(i)?);
    }
    out.truncate(n);
    Ok(out)
}

fn ppl<B: EvalBackend>(b: &B, world: &World, a: &PplArgs) -> Result<()> {
    let t_start = Instant::now();
    let seq_len = parse_count(&a.seq_len).context("--seq-len")?;
    if seq_len < 2 {
        bail!("--seq-len {seq_len}: need at least 2 tokens for a next-token loss");
    }
    if a.sequences == 0 || a.buckets == 0 {
        bail!("--sequences and --buckets must be at least 1");
    }
    let topo = Topology::new(world.comm(), a.m.run.tp, a.m.run.cp)?;
    let lm = load(b, &topo, &a.m)?;
    topo.layout.check_seq_len(seq_len).context("--seq-len")?;
    let need = seq_len * a.sequences;
    let (tokens, source) = match (&a.data, &a.text) {
        (Some(p), _) => (dataset_tokens(p, need)?, p.display().to_string()),
        (None, Some(p)) if p.extension().is_some_and(|e| e == "json") => (
            load_token_file(p).context("--text")?,
            p.display().to_string(),
        ),
        (None, Some(p)) => (
            tokenize_text_file(p, &a.m.model.join("tokenizer.json")).context("--text")?,
            p.display().to_string(),
        ),
        (None, None) => bail!("give --data PREFIX or --text FILE"),
    };
    if tokens.len() < need {
        bail!(
            "{source}: {} tokens, but --sequences {} × --seq-len {seq_len} need {need}",
            tokens.len(),
            a.sequences
        );
    }
    let vocab = lm.cfg().vocab_size;
    if let Some((i, &bad)) = tokens[..need]
        .iter()
        .enumerate()
        .find(|&(_, &x)| x as usize >= vocab)
    {
        bail!("{source}: token {bad} at index {i} is outside the vocabulary of {vocab}");
    }
    let mut sum = vec![0f64; seq_len];
    let mut count = vec![0u64; seq_len];
    for k in (topo.dp_rank..a.sequences).step_by(topo.layout.dp) {
        let seq = &tokens[k * seq_len..(k + 1) * seq_len];
        let losses = lm.sequence_losses(seq)?;
        for (i, l) in losses.iter().enumerate() {
            if l.is_finite() {
                sum[i] += l;
                count[i] += 1;
            }
        }
    }
    topo.dp.all_reduce(&mut sum, ReduceOp::Sum);
    topo.dp.all_reduce(&mut count, ReduceOp::Sum);
    if topo.world_rank != 0 {
        return Ok(());
    }
    let buckets = bucketize(&sum, &count, a.buckets);
    let total: u64 = count.iter().sum();
    let mean = sum.iter().sum::<f64>() / total as f64;
    let j = json!({
        "model": a.m.model.display().to_string(),
        "source": source,
        "seq_len": seq_len,
        "sequences": a.sequences,
        "tokens": total,
        "mean_loss": mean,
        "perplexity": mean.exp(),
        "window": lm.cfg().max_position_embeddings,
        "architecture": lm.name(),
        "layout": {"tp": topo.layout.tp, "cp": topo.layout.cp, "dp": topo.layout.dp},
        "backend": b.name(),
        "buckets": buckets,
        "seconds": t_start.elapsed().as_secs_f64(),
    });
    write_json(&a.m.out.join("ppl.json"), &j)?;
    let points: Vec<(f64, f64)> = buckets
        .iter()
        .map(|x| (x.mean_position, x.mean_loss))
        .collect();
    let name =
        a.m.model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
    plot::line_chart(
        &a.m.out.join("ppl.png"),
        &plot::LineChart {
            title: &format!(
                "Loss by position: {name}, {} × {} tokens",
                a.sequences,
                format_count(seq_len)
            ),
            x_label: "position (tokens of context)",
            y_label: "mean next-token loss (nats)",
            series: &[plot::Series { name, points }],
            log_x: true,
            log_y: false,
        },
    )?;
    println!(
        "{}",
        json!({"mean_loss": mean, "perplexity": mean.exp(), "tokens": total,
               "out": a.m.out.display().to_string(), "seconds": t_start.elapsed().as_secs_f64()})
    );
    Ok(())
}
