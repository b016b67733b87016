//! `ultralong forward`: one forward pass (and backward with `--grads`) over a JSON array of token
//! ids, printing the mean next-token loss as one JSON line. The reference for every other layout:
//! under MPI with TP/CP it must give the same numbers as one rank.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::io::{self, DType, HostTensor, TensorMap};
use crate::model::llama::{Head, Llama, Workspace};
use crate::model::params::ParamStore;
use crate::model::rope::RopePrecision;
use crate::train::data::{load_token_file, tokenize_text_file};

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
    /// Working precision of the CPU backend: f32 or f64.
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Tokens per LM-head + cross-entropy chunk.
    #[arg(long, default_value_t = 256)]
    pub ce_chunk: usize,
}

pub fn run(a: ForwardArgs) -> Result<()> {
    match a.precision.as_str() {
        "f32" => run_on(&CpuBackend::<f32>::new(), &a),
        "f64" => run_on(&CpuBackend::<f64>::new(), &a),
        p => bail!("--precision {p:?}: expected f32 or f64"),
    }
}

fn run_on<B: Backend>(b: &B, a: &ForwardArgs) -> Result<()> {
    let precision: RopePrecision = a.rope_precision.parse()?;
    let model = Llama::load(b, &a.model, precision)?;
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
    let t = ids.len();
    if t < 2 {
        bail!("{source}: need at least 2 tokens for a next-token loss, got {t}");
    }
    let vocab = model.cfg.vocab_size;
    if let Some((i, &bad)) = ids.iter().enumerate().find(|&(_, &x)| x as usize >= vocab) {
        bail!("{source}: token {bad} at index {i} is outside the vocabulary of {vocab}");
    }
    let mut ws = Workspace::new(b, &model.cfg, t, false, a.ce_chunk);
    // Next-token targets; the last position has none.
    let mut targets: Vec<i32> = ids[1..].iter().map(|&x| x as i32).collect();
    targets.push(-1);
    let n = (t - 1) as f64;

    let mut grads = a.grads.as_ref().map(|_| ParamStore::zeros(b, &model.cfg));
    let loss_sum = model.forward_backward(
        b,
        &mut ws,
        &ids,
        a.position_offset,
        Head::Loss {
            targets: &targets,
            grad_scale: 1.0 / n,
        },
        grads.as_mut(),
    );
    let meta = |kind: &str| {
        HashMap::from([(
            "producer".to_string(),
            format!("ultralong forward ({kind})"),
        )])
    };
    if let Some(out) = &a.out {
        let mut logits = Vec::with_capacity(t * vocab);
        model.forward_backward(
            b,
            &mut ws,
            &ids,
            a.position_offset,
            Head::Logits(&mut logits),
            None,
        );
        let map = TensorMap::from([(
            "logits".to_string(),
            HostTensor::new(vec![t, vocab], logits),
        )]);
        io::save_safetensors_file(out, &map, DType::F32, Some(meta("logits")))?;
    }
    if let (Some(path), Some(g)) = (&a.grads, &grads) {
        io::save_safetensors_file(path, &g.to_host(b), DType::F32, Some(meta("grads")))?;
    }
    println!(
        "{}",
        serde_json::json!({"loss": loss_sum / n, "tokens": t, "backend": b.name(), "rope_precision": a.rope_precision})
    );
    Ok(())
}
