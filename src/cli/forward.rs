//! `ultralong forward`: one forward pass (and backward with `--grads`) over a JSON array of token
//! ids, printing the mean next-token loss as one JSON line. The reference for every other layout:
//! under MPI with TP/CP it must give the same numbers as one rank. The HSA model (`DRTForCausalLM`)
//! runs on one CPU rank over one sequence.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::backend::select::BackendKind;
use crate::data::loader::zigzag_chunks;
use crate::io::{self, DType, HostTensor, TensorMap};
use crate::model::arch::ArchConfig;
use crate::model::hsa::config::HsaConfig;
use crate::model::hsa::model::{Head as HsaHead, HsaModel};
use crate::model::hsa::ops::HsaOps;
use crate::model::llama::{Head, Llama, Workspace};
use crate::model::params::Shard;
use crate::model::rope::RopePrecision;
use crate::parallel::any::{World, run_world};
use crate::parallel::comm::Comm;
use crate::parallel::tensor::gather_full_host;
use crate::parallel::topology::Topology;
use crate::train::data::{load_token_file, tokenize_text_file};
use crate::train::step::{GlobalBatch, all_reduce_grads, forward_backward_batch};

#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// JSON array of token ids (or little-endian u32 file).
    #[arg(long, required_unless_present = "text", conflicts_with = "text")]
    pub tokens: Option<PathBuf>,
    /// Or a UTF-8 text file, tokenized with the model's tokenizer.json.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Use only the first N tokens.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Write the logits [T, vocab] (f32, tensor `logits`) to this safetensors file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write gradients of the mean loss, by HF parameter name, to this safetensors file.
    #[arg(long)]
    pub grads: Option<PathBuf>,
    /// Position of the first token (RoPE), e.g. to test far positions.
    #[arg(long, default_value_t = 0)]
    pub position_offset: u64,
    /// "exact" or "fp32" (HF/Megatron's fp32 angle arithmetic).
    #[arg(long, default_value = "exact")]
    pub rope_precision: String,
    /// cpu or cuda (one GPU per rank; bf16 GEMMs, fp32 storage).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Working precision of the CPU backend: f32 or f64.
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Tokens per LM-head + cross-entropy chunk.
    #[arg(long, default_value_t = 256)]
    pub ce_chunk: usize,
    /// Cut the tokens into this many sequences of equal length (a batch; DP ranks share it).
    #[arg(long, default_value_t = 1)]
    pub sequences: usize,
    /// Tensor-parallel ranks (under `mpirun -np N`; dp = N / (tp·cp)).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Context-parallel ranks.
    #[arg(long, default_value_t = 1)]
    pub cp: usize,
}

pub fn run(a: ForwardArgs) -> Result<()> {
    let kind = BackendKind::parse(("--backend", &a.backend), ("--precision", &a.precision))?;
    let cfg = a.model.join("config.json");
    if cfg.is_file()
        && let ArchConfig::Hsa(h) = ArchConfig::from_file(&cfg)?
    {
        crate::eval::lm::check_backend(&a.model, kind)?;
        return match kind {
            BackendKind::CpuF64 => run_hsa(&CpuBackend::<f64>::new(), h, &a),
            _ => run_hsa(&CpuBackend::<f32>::new(), h, &a),
        };
    }
    crate::on_backend!(kind, |b| run_world(|world| run_ranks(b, world, &a)))
}

/// The tokens of `--tokens` or `--text`, cut to `--max-tokens`, with their source's name.
fn read_ids(a: &ForwardArgs) -> Result<(Vec<u32>, String)> {
    let (mut ids, source) = match (&a.tokens, &a.text) {
        (Some(p), _) => (load_token_file(p)?, p.display().to_string()),
        (None, Some(p)) => (
            tokenize_text_file(p, &a.model.join("tokenizer.json"))?,
            p.display().to_string(),
        ),
        (None, None) => bail!("give --tokens or --text"),
    };
    if let Some(n) = a.max_tokens {
        ids.truncate(n);
    }
    Ok((ids, source))
}

/// The HSA model (`DRTForCausalLM`) on one CPU rank: one sequence (a multiple of chunk_size), its
/// mean next-token loss, `--out` logits and `--grads` as for a Llama.
fn run_hsa<B: HsaOps>(b: &B, cfg: HsaConfig, a: &ForwardArgs) -> Result<()> {
    if a.tp != 1 || a.cp != 1 || a.sequences != 1 {
        bail!(
            "forward runs the HSA model on one rank over one sequence: --tp, --cp and --sequences must be 1"
        );
    }
    let (ids, source) = read_ids(a)?;
    let t = ids.len();
    if t < 2 {
        bail!("{source}: need at least 2 tokens for a next-token loss, got {t}");
    }
    let arch = ArchConfig::Hsa(cfg.clone());
    let files = io::MappedTensors::open_dir(&a.model)?;
    let params = arch.params_from_files(b, &files, &a.model.display().to_string(), Shard::WHOLE)?;
    let model = HsaModel::new(cfg, params)?;
    let mut targets: Vec<i32> = ids[1..].iter().map(|&x| x as i32).collect();
    targets.push(-1);
    let mut grads = a.grads.as_ref().map(|_| model.params.zeros_like(b));
    let n = (t - 1) as f64;
    let head = HsaHead::Loss {
        targets: &targets,
        grad_scale: 1.0 / n,
    };
    let (sum, _) = model
        .forward_backward(b, &ids, a.position_offset, head, grads.as_mut())
        .with_context(|| source.clone())?;
    let meta = |kind: &str| {
        HashMap::from([(
            "producer".to_string(),
            format!("ultralong forward ({kind})"),
        )])
    };
    if let Some(out) = &a.out {
        let (_, logits) =
            model.forward_backward(b, &ids, a.position_offset, HsaHead::Logits, None)?;
        let vocab = model.cfg.base.vocab_size;
        let f: Vec<f32> = logits.iter().map(|&x| x as f32).collect();
        let map = TensorMap::from([("logits".to_string(), HostTensor::new(vec![t, vocab], f))]);
        io::save_safetensors_file(out, &map, DType::F32, Some(meta("logits")))?;
    }
    if let (Some(path), Some(g)) = (&a.grads, &grads) {
        io::save_safetensors_file(path, &g.to_host(b), DType::F32, Some(meta("grads")))?;
    }
    println!(
        "{}",
        serde_json::json!({"loss": sum / n, "tokens": t, "backend": b.name(), "model": "HSA"})
    );
    Ok(())
}

fn run_ranks<B: Backend>(b: &B, world: &World, a: &ForwardArgs) -> Result<()> {
    let topo = Topology::new(world.comm(), a.tp, a.cp)?;
    let layout = topo.layout;
    let precision: RopePrecision = a.rope_precision.parse()?;
    let model = Llama::load_shard(b, &a.model, precision, topo.shard())?;
    layout.check_model(&model.cfg)?;
    let (ids, source) = read_ids(a)?;
    let t = ids.len();
    let n_seq = a.sequences.max(1);
    if t % n_seq != 0 {
        bail!("{source}: {t} tokens do not split into {n_seq} sequences of equal length");
    }
    let len = t / n_seq;
    if len < 2 {
        bail!("{source}: need at least 2 tokens per sequence for a next-token loss, got {len}");
    }
    if !n_seq.is_multiple_of(layout.dp) {
        bail!("--sequences {n_seq} does not divide over dp {}", layout.dp);
    }
    layout.check_seq_len(len)?;
    let vocab = model.cfg.vocab_size;
    if let Some((i, &bad)) = ids.iter().enumerate().find(|&(_, &x)| x as usize >= vocab) {
        bail!("{source}: token {bad} at index {i} is outside the vocabulary of {vocab}");
    }
    let t_local = len / layout.cp;
    let mut ws = Workspace::for_rank(b, &model.cfg, &topo, t_local, false, a.ce_chunk);
    // Next-token targets within each sequence; this rank's share in `train::step`.
    let seqs: Vec<(Vec<u32>, Vec<i32>)> = ids
        .chunks(len)
        .map(|seq| {
            let mut targets: Vec<i32> = seq[1..].iter().map(|&x| x as i32).collect();
            targets.push(-1);
            (seq.to_vec(), targets)
        })
        .collect();
    let batch = GlobalBatch {
        seqs: &seqs,
        pos0: a.position_offset,
    };
    let mut grads = a.grads.as_ref().map(|_| model.params.zeros_like(b));
    let loss = forward_backward_batch(b, &topo, &model, &mut ws, batch, grads.as_mut())?;
    b.check().context("the forward and backward pass")?;
    let lead = topo.world_rank == 0;
    let meta = |kind: &str| {
        HashMap::from([(
            "producer".to_string(),
            format!("ultralong forward ({kind})"),
        )])
    };
    if let Some(out) = &a.out {
        let mine = batch.local(&topo)?;
        let mut logits = Vec::with_capacity(mine.len() * t_local * vocab);
        for s in &mine {
            model.forward_backward_rank(
                b,
                &topo,
                &mut ws,
                &s.ids,
                &s.positions,
                Head::Logits(&mut logits),
                None,
            );
        }
        b.check().context("the forward pass for --out")?;
        // Every DP × CP rank's rows, put back in sequence order.
        let mut all = vec![0f32; logits.len() * topo.dpcp.size()];
        topo.dpcp.all_gather(&logits, &mut all);
        if lead {
            let mut full = vec![0f32; t * vocab];
            for (k, part) in all.chunks(logits.len()).enumerate() {
                let (c, d) = (k % layout.cp, k / layout.cp);
                for (j, sq) in (d..n_seq).step_by(layout.dp).enumerate() {
                    let rows = &part[j * t_local * vocab..(j + 1) * t_local * vocab];
                    let chunks = if layout.cp > 1 {
                        zigzag_chunks(len, layout.cp, c).to_vec()
                    } else {
                        vec![(0, len)]
                    };
                    let mut r = 0;
                    for (start, clen) in chunks {
                        let dst = (sq * len + start) * vocab;
                        full[dst..dst + clen * vocab]
                            .copy_from_slice(&rows[r * vocab..(r + clen) * vocab]);
                        r += clen;
                    }
                }
            }
            let map =
                TensorMap::from([("logits".to_string(), HostTensor::new(vec![t, vocab], full))]);
            io::save_safetensors_file(out, &map, DType::F32, Some(meta("logits")))?;
        }
    }
    if let (Some(path), Some(g)) = (&a.grads, &mut grads) {
        all_reduce_grads(b, &topo, g);
        let full = gather_full_host(b, &topo.tp, g, "");
        b.check().context("gathering the gradients for --grads")?;
        if lead {
            io::save_safetensors_file(path, &full, DType::F32, Some(meta("grads")))?;
        }
    }
    if lead {
        let mut j = serde_json::json!({"loss": loss, "tokens": t, "backend": b.name(), "rope_precision": a.rope_precision});
        if layout.world() > 1 {
            j["layout"] = serde_json::json!({"tp": layout.tp, "cp": layout.cp, "dp": layout.dp});
        }
        println!("{j}");
    }
    Ok(())
}
