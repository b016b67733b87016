//! `ultralong bench train`: training-step speed and memory of the CPU backend on a model config,
//! with a coarse profile (forward, backward, optimizer, attention alone) and the FLOP rates
//! (`crate::flops`: the model count, and the attention kernels' benchmark count). The PyTorch
//! peer runs beside it from `bench/run_cpu_bench.sh`; results are recorded in bench/results/.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

use crate::backend::cpu::CpuBackend;
use crate::backend::{AdamW, AttnShape, Backend};
use crate::flops;
use crate::model::arch::ArchConfig;
use crate::model::hsa::config::HsaConfig;
use crate::model::hsa::model::{Head as HsaHead, HsaModel};
use crate::model::llama::{Head, Llama, Workspace};
use crate::model::params::ParamStore;
use crate::model::rope::RopePrecision;
use crate::train::optim::adamw_step;
use crate::util::rng;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time full training steps (forward, backward, AdamW) at one sequence length.
    Train(BenchTrainArgs),
    /// One rank of a tp × cp layout broken down by phase, beside the rates table's prediction.
    Phases(super::bench_phases::BenchPhasesArgs),
}

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// A Hugging Face config.json (random weights are used): a Llama, or the HSA model
    /// (`DRTForCausalLM`; its step is timed whole, and the attention profile is the Llama's only).
    #[arg(long)]
    pub model_config: PathBuf,
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long)]
    pub recompute: bool,
    #[arg(long, default_value_t = 256)]
    pub ce_chunk: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Peak resident set of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train(a) => bench_train(a),
        BenchCommand::Phases(a) => super::bench_phases::bench_phases(a),
    }
}

fn bench_train(a: BenchTrainArgs) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let cfg = match ArchConfig::from_file(&a.model_config)? {
        ArchConfig::Llama(c) => c,
        ArchConfig::Hsa(c) => return bench_train_hsa(&a, c),
    };
    let b = CpuBackend::<f32>::new();
    let params = ParamStore::init_random(&b, &cfg, 1);
    let mut model = Llama::new(cfg.clone(), RopePrecision::Exact, params)?;
    let t = a.seq_len;
    let ids: Vec<u32> = (0..t as u64)
        .map(|i| (rng::uniform(3, 0, i) * cfg.vocab_size as f64) as u32)
        .collect();
    let targets: Vec<i32> = (0..t as u64)
        .map(|i| (rng::uniform(3, 1, i) * cfg.vocab_size as f64) as i32)
        .collect();
    let mut ws = Workspace::new(&b, &cfg, t, a.recompute, a.ce_chunk);
    let mut grads = ParamStore::zeros(&b, &cfg);
    let mut m = ParamStore::zeros(&b, &cfg);
    let mut v = ParamStore::zeros(&b, &cfg);
    let (mut step_ms, mut fwd_ms, mut opt_ms) = (vec![], vec![], vec![]);
    let mut loss = 0.0;
    for i in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        grads.zero_all(&b);
        let head = Head::Loss {
            targets: &targets,
            grad_scale: 1.0 / t as f64,
        };
        loss = model.forward_backward(&b, &mut ws, &ids, 0, head, Some(&mut grads)) / t as f64;
        let t1 = Instant::now();
        let hp = AdamW {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step: i as u64 + 1,
            grad_scale: 1.0,
        };
        adamw_step(&b, &mut model.params, &grads, &mut m, &mut v, hp);
        let t2 = Instant::now();
        // Forward alone (loss, no backward), for the profile.
        let head = Head::Loss {
            targets: &targets,
            grad_scale: 1.0,
        };
        model.forward_backward(&b, &mut ws, &ids, 0, head, None);
        let t3 = Instant::now();
        if i >= a.warmup {
            step_ms.push((t2 - t0).as_secs_f64() * 1e3);
            opt_ms.push((t2 - t1).as_secs_f64() * 1e3);
            fwd_ms.push((t3 - t2).as_secs_f64() * 1e3);
        }
    }
    // Attention alone, forward and backward, for one layer's shape.
    let shape = AttnShape {
        q_len: t,
        kv_len: t,
        n_q_heads: cfg.num_attention_heads,
        n_kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        q_pos0: 0,
        k_pos0: 0,
        causal: true,
    };
    let nq = t * shape.n_q_heads * shape.head_dim;
    let nkv = t * shape.n_kv_heads * shape.head_dim;
    let rand = |n: usize, s: u64| {
        b.upload(
            &(0..n as u64)
                .map(|i| rng::normal(9, s, i) as f32)
                .collect::<Vec<_>>(),
        )
    };
    let (q, k, vv, dout) = (rand(nq, 1), rand(nkv, 2), rand(nkv, 3), rand(nq, 4));
    let (mut out, mut lse) = (b.zeros(nq), b.zeros(shape.n_q_heads * t));
    let (mut dq, mut dk, mut dv) = (b.zeros(nq), b.zeros(nkv), b.zeros(nkv));
    let scale = 1.0 / (cfg.head_dim as f64).sqrt();
    let (mut af, mut ab) = (vec![], vec![]);
    for _ in 0..a.steps.max(2) {
        let t0 = Instant::now();
        b.attention_forward(&q, &k, &vv, &shape, scale, &mut out, &mut lse);
        let t1 = Instant::now();
        b.attention_backward(
            &q, &k, &vv, &out, &dout, &lse, &shape, scale, &mut dq, &mut dk, &mut dv,
        );
        af.push((t1 - t0).as_secs_f64() * 1e3);
        ab.push(t1.elapsed().as_secs_f64() * 1e3);
    }
    let step = median(step_ms);
    let fwd = median(fwd_ms);
    let opt = median(opt_ms);
    let (attn_f, attn_b) = (median(af), median(ab));
    let layers = cfg.num_hidden_layers as f64;
    // Model FLOP/s by docs/ARCHITECTURE.md's count (what `train` reports as TFLOP/s, recompute not counted)
    // and the attention kernels' by the benchmark convention (backward 2.5× forward).
    let model_flops = flops::model_flops_per_token(&cfg, t) * t as f64;
    let attn = flops::attention_kernel_flops(t, t, shape.n_q_heads, shape.head_dim, true);
    println!(
        "{}",
        serde_json::json!({
            "impl": "ultralong-cpu",
            "backend": b.name(),
            "threads": rayon::current_num_threads(),
            "seq_len": t,
            "n_params": model.params.numel(),
            "recompute": a.recompute,
            "step_ms": step,
            "tokens_per_s": t as f64 * 1e3 / step,
            "loss": loss,
            "peak_rss_bytes": peak_rss_bytes(),
            "backend_peak_bytes": b.peak_bytes(),
            "profile_ms": {
                "forward": fwd,
                "backward": step - fwd - opt,
                "optimizer": opt,
                "attention_forward_all_layers": attn_f * layers,
                "attention_backward_all_layers": attn_b * layers,
            },
            "gflops_per_s": {
                "model": model_flops / step / 1e6,
                "attention_forward": attn.forward / attn_f / 1e6,
                "attention_backward": attn.backward / attn_b / 1e6,
            }
        })
    );
    Ok(())
}

/// The HSA model's training step at `--seq-len` (forward, backward, AdamW) and its forward
/// alone; the same JSON fields as the Llama's where they exist, so bench/hsa_vs_llama.sh can put
/// them side by side.
fn bench_train_hsa(a: &BenchTrainArgs, cfg: HsaConfig) -> Result<()> {
    let b = CpuBackend::<f32>::new();
    let t = a.seq_len;
    if !t.is_multiple_of(cfg.chunk_size) {
        bail!(
            "--seq-len {t} must be a multiple of the HSA model's chunk_size {}",
            cfg.chunk_size
        );
    }
    let vocab = cfg.base.vocab_size;
    let mut model = HsaModel::init_random(&b, cfg.clone(), 1)?;
    let ids: Vec<u32> = (0..t as u64)
        .map(|i| (rng::uniform(3, 0, i) * vocab as f64) as u32)
        .collect();
    let targets: Vec<i32> = (0..t as u64)
        .map(|i| (rng::uniform(3, 1, i) * vocab as f64) as i32)
        .collect();
    let mut grads = model.params.zeros_like(&b);
    let mut m = model.params.zeros_like(&b);
    let mut v = model.params.zeros_like(&b);
    let (mut step_ms, mut fwd_ms, mut opt_ms) = (vec![], vec![], vec![]);
    let mut loss = 0.0;
    for i in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        grads.zero_all(&b);
        let head = HsaHead::Loss {
            targets: &targets,
            grad_scale: 1.0 / t as f64,
        };
        loss = model
            .forward_backward(&b, &ids, 0, head, Some(&mut grads))?
            .0
            / t as f64;
        let t1 = Instant::now();
        let hp = AdamW {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step: i as u64 + 1,
            grad_scale: 1.0,
        };
        adamw_step(&b, &mut model.params, &grads, &mut m, &mut v, hp);
        let t2 = Instant::now();
        let head = HsaHead::Loss {
            targets: &targets,
            grad_scale: 1.0,
        };
        model.forward_backward(&b, &ids, 0, head, None)?;
        let t3 = Instant::now();
        if i >= a.warmup {
            step_ms.push((t2 - t0).as_secs_f64() * 1e3);
            opt_ms.push((t2 - t1).as_secs_f64() * 1e3);
            fwd_ms.push((t3 - t2).as_secs_f64() * 1e3);
        }
    }
    let (step, fwd, opt) = (median(step_ms), median(fwd_ms), median(opt_ms));
    let model_flops = flops::hsa_flops_per_token(&cfg, t) * t as f64;
    println!(
        "{}",
        serde_json::json!({
            "impl": "ultralong-cpu-hsa",
            "backend": b.name(),
            "threads": rayon::current_num_threads(),
            "seq_len": t,
            "n_params": model.params.numel(),
            "step_ms": step,
            "tokens_per_s": t as f64 * 1e3 / step,
            "loss": loss,
            "peak_rss_bytes": peak_rss_bytes(),
            "backend_peak_bytes": b.peak_bytes(),
            "profile_ms": {
                "forward": fwd,
                "backward": step - fwd - opt,
                "optimizer": opt,
            },
            "gflops_per_s": { "model": model_flops / step / 1e6 },
        })
    );
    Ok(())
}
