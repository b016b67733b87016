//! `ultralong gpu-check`: the CUDA backend's checks and benchmarks in one process, so one device
//! call (bench/gpu-check.sh) runs them with no Rust on the GPU machine.
//!
//! Each kernel family's checks and benchmarks live beside its launcher, in
//! src/backend/cuda/checks/ (the method and the tolerances are stated there). This file holds the
//! arguments, the report (`Report`, which those checks write to as their `Sink`), and the checks
//! that need the model: device RoPE tables at positions up to 2^23 against `Rope::cos_sin` (max
//! abs error); one whole tiny-model training step (YaRN, GQA, chunked CE, AdamW) against the CPU
//! f32 backend: loss within 1e-2 relative, gradient cosine > 0.999 per tensor, and the updated
//! weights; an out-of-memory through the command line (one line, naming the buffer); one
//! Llama-3.1-8B decoder layer at the per-rank shapes of TP 8 (4 query heads, 1 KV head, FFN 1792,
//! hidden 4096, head_dim 128) over `--layer-tokens` tokens: time of forward+backward, peak memory,
//! MFU (crate::flops: causal model FLOPs against the dense bf16 peak), beside the PyTorch peer's numbers
//! (`--peer`, from bench/gpu/layer_torch.py) and their ratio; and one rank of the 4M run.
//!
//! Output: `--out DIR/gpu-check.json` as {"device","command","date","rows":[{"name","value","unit",
//! "peer","peer_value", ...}],"raw"}; a check row has value 1 (pass) or 0 (fail) and its error and
//! tolerance. The exit code is non-zero if any check failed.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use serde_json::{Value, json};

#[derive(Args, Debug)]
pub struct GpuCheckArgs {
    /// Directory for gpu-check.json.
    #[arg(long)]
    pub out: PathBuf,
    /// What to run: all, checks (kernels + training step), bench (kernel benchmarks), layer,
    /// attention (the flash kernels against the CPU f64 reference), attn-bench (flash attention
    /// TFLOP/s beside `--attn-peer`), nccl (the NCCL buffer collectives with a world of one),
    /// rank4m (one rank of the 4M run, by phase; not part of `all`).
    #[arg(long, default_value = "all")]
    pub only: String,
    /// Sequence lengths of the attention benchmark (comma-separated).
    #[arg(long, default_value = "8192,32768,131072")]
    pub attn_seqlens: String,
    /// JSON of the PyTorch SDPA peer (bench/gpu/attn_torch.py) for the attention benchmark.
    #[arg(long)]
    pub attn_peer: Option<PathBuf>,
    /// Layer counts of the one-rank 4M step (comma-separated; two counts also extrapolate
    /// linearly to the model's 32 layers).
    #[arg(long, default_value = "32")]
    pub rank4m_layers: String,
    /// Smaller check sizes (for compute-sanitizer, which is slow).
    #[arg(long)]
    pub small: bool,
    /// Local tokens of the decoder-layer benchmark.
    #[arg(long, default_value_t = 32768)]
    pub layer_tokens: usize,
    /// JSON of the PyTorch peer (bench/gpu/layer_torch.py) to put beside the layer numbers.
    #[arg(long)]
    pub peer: Option<PathBuf>,
    /// Recorded in the output: the command line that ran this.
    #[arg(long, default_value = "")]
    pub command: String,
    /// Recorded in the output: the date.
    #[arg(long, default_value = "")]
    pub date: String,
    /// Name of the output file inside --out.
    #[arg(long, default_value = "gpu-check.json")]
    pub name: String,
}

/// Rows of the report, printed as they come.
#[derive(Default)]
pub struct Report {
    pub rows: Vec<Value>,
    pub raw: String,
    pub failed: usize,
}

impl Report {
    pub fn check(&mut self, name: &str, err: f64, tol: f64) {
        let pass = err.is_finite() && err <= tol;
        if !pass {
            self.failed += 1;
        }
        let line = format!(
            "{} {name}: error {err:.3e} (tolerance {tol:.0e})",
            if pass { "PASS" } else { "FAIL" }
        );
        println!("{line}");
        self.raw.push_str(&line);
        self.raw.push('\n');
        self.rows.push(
            json!({"name": format!("check: {name}"), "value": pass as i32,
            "unit": "pass", "error": err, "tolerance": tol, "peer": null, "peer_value": null}),
        );
    }
    pub fn fail(&mut self, name: &str, why: &str) {
        self.failed += 1;
        let line = format!("FAIL {name}: {why}");
        println!("{line}");
        self.raw.push_str(&line);
        self.raw.push('\n');
        self.rows.push(
            json!({"name": format!("check: {name}"), "value": 0, "unit": "pass",
            "error": why, "peer": null, "peer_value": null}),
        );
    }
    /// A metric row with more fields (a second peer, the shape) merged into it.
    pub fn metric_with(
        &mut self,
        name: &str,
        value: f64,
        unit: &str,
        peer: Option<(&str, f64)>,
        extra: Value,
    ) {
        self.metric(name, value, unit, peer);
        if let (Some(row), Value::Object(m)) = (self.rows.last_mut(), extra) {
            for (k, v) in m {
                row[k] = v;
            }
        }
    }
    pub fn metric(&mut self, name: &str, value: f64, unit: &str, peer: Option<(&str, f64)>) {
        let line = match peer {
            Some((p, v)) => format!("{name}: {value:.4} {unit} ({p}: {v:.4})"),
            None => format!("{name}: {value:.4} {unit}"),
        };
        println!("{line}");
        self.raw.push_str(&line);
        self.raw.push('\n');
        self.rows
            .push(json!({"name": name, "value": value, "unit": unit,
            "peer": peer.map(|p| p.0), "peer_value": peer.map(|p| p.1)}));
    }
}

#[cfg(feature = "cuda")]
impl crate::backend::cuda::checks::Sink for Report {
    fn check(&mut self, name: &str, err: f64, tol: f64) {
        Report::check(self, name, err, tol);
    }
    fn fail(&mut self, name: &str, why: &str) {
        Report::fail(self, name, why);
    }
    fn metric(&mut self, name: &str, value: f64, unit: &str, peer: Option<(&str, f64)>) {
        Report::metric(self, name, value, unit, peer);
    }
    fn metric_with(
        &mut self,
        name: &str,
        value: f64,
        unit: &str,
        peer: Option<(&str, f64)>,
        extra: Value,
    ) {
        Report::metric_with(self, name, value, unit, peer, extra);
    }
}

pub fn run(a: GpuCheckArgs) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        imp::run(a)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = a;
        bail!("gpu-check: this binary was built without the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use std::time::Instant;

    use anyhow::Context;

    use crate::backend::cpu::CpuBackend;
    use crate::backend::cuda::checks::{
        self, attention_flash, cosine, group, pool, randn_dev, rel_l2, time_ms,
    };
    use crate::backend::cuda::{CudaBackend, DType};
    use crate::backend::{AdamW, AttnShape, Backend};
    use crate::model::config::ModelConfig;
    use crate::model::llama::{Head, Llama, Workspace};
    use crate::model::params::ParamStore;
    use crate::model::rope::{Rope, RopePrecision};
    use crate::train::optim::adamw_step;
    use crate::util::rng;

    pub fn run(a: GpuCheckArgs) -> Result<()> {
        const MODES: [&str; 8] = [
            "all",
            "checks",
            "bench",
            "layer",
            "attention",
            "attn-bench",
            "rank4m",
            "nccl",
        ];
        if !MODES.contains(&a.only.as_str()) {
            bail!("--only {:?}: expected one of {}", a.only, MODES.join(", "));
        }
        std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
        let g32 = CudaBackend::new(0, DType::F32)?;
        let device = g32.device_name().to_string();
        println!("device: {device}, kernels: {:?}", g32.image());
        let mut rep = Report::default();
        if a.only == "all" || a.only == "checks" {
            let s = if a.small { 1 } else { 4 };
            checks::kernel_checks(&mut rep, &g32, s);
            let g16 = CudaBackend::new(0, DType::Bf16)?;
            checks::kernel_checks(&mut rep, &g16, s);
            drop(g16);
            group(&mut rep, &g32, "rope table exact angles", || {
                rope_table_check(&g32)
            });
            group(&mut rep, &g32, "training step", || {
                training_step_check(&g32)
            });
            group(&mut rep, &g32, "out of memory", || pool::oom_check(&g32));
            group(
                &mut rep,
                &g32,
                "out of memory at the command line",
                cli_oom_check,
            );
        }
        if a.only == "all" || a.only == "nccl" {
            group(&mut rep, &g32, "nccl world of 1", || {
                crate::parallel::nccl::world_of_one_checks(&g32).unwrap_or_else(|e| panic!("{e:#}"))
            });
        }
        if a.only == "all" || a.only == "bench" {
            let g16 = CudaBackend::new(0, DType::Bf16)?;
            checks::kernel_bench(&mut rep, &g16, &g32);
        }
        if a.only == "all" || a.only == "layer" {
            let peer = read_json(a.peer.as_ref())?;
            let g16 = CudaBackend::new(0, DType::Bf16)?;
            layer_bench(&mut rep, &g16, a.layer_tokens, peer.as_ref())?;
        }
        if a.only == "all" || a.only == "attention" {
            let mut g16 = CudaBackend::new(0, DType::Bf16)?;
            let mut g32 = CudaBackend::new(0, DType::F32)?;
            attention_flash::flash_checks(&mut rep, &mut g16, &mut g32, a.small);
        }
        if a.only == "all" || a.only == "attn-bench" {
            let peer = read_json(a.attn_peer.as_ref())?;
            let lens: Vec<usize> = a
                .attn_seqlens
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse()
                        .with_context(|| format!("--attn-seqlens: {x:?} is not a length"))
                })
                .collect::<Result<_>>()?;
            let mut g16 = CudaBackend::new(0, DType::Bf16)?;
            attention_flash::attn_bench(&mut rep, &mut g16, &lens, peer.as_ref());
        }
        if a.only == "rank4m" {
            let layers: Vec<usize> = a
                .rank4m_layers
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse()
                        .with_context(|| format!("--rank4m-layers: {x:?} is not a count"))
                })
                .collect::<Result<_>>()?;
            rank4m(&mut rep, &layers)?;
        }
        let doc = json!({"device": device, "command": a.command, "date": a.date,
            "rows": rep.rows, "raw": rep.raw});
        let path = a.out.join(&a.name);
        std::fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {} ({} failed checks)", path.display(), rep.failed);
        if rep.failed > 0 {
            bail!("{} GPU checks failed", rep.failed);
        }
        Ok(())
    }

    /// A peer's JSON file, if given.
    fn read_json(p: Option<&PathBuf>) -> Result<Option<Value>> {
        let Some(p) = p else { return Ok(None) };
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let v = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", p.display()))?;
        Ok(Some(v))
    }

    /// An out-of-memory through the command line: `forward --backend cuda` on a tiny model with
    /// ULTRALONG_CUDA_MEM_LIMIT just above the cuBLASLt workspace fails with exit 1 and one line,
    /// `error: ...out of memory...` naming the buffer (its workspace or ring name, or else the
    /// model code's source line that asked for it).
    fn cli_oom_check() -> checks::Rows {
        let run = || -> Result<(bool, String)> {
            let exe = std::env::current_exe()?;
            let dir = std::env::temp_dir().join(format!("ul-oom-check-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let model = dir.join("model");
            let ids = dir.join("ids.json");
            std::fs::write(&ids, serde_json::to_string(&(0..64).collect::<Vec<u32>>())?)?;
            let init = std::process::Command::new(&exe)
                .args([
                    "init",
                    "--config",
                    "configs/tiny.json",
                    "--seed",
                    "1",
                    "--out",
                ])
                .arg(&model)
                .output()?;
            anyhow::ensure!(
                init.status.success(),
                "init: {}",
                String::from_utf8_lossy(&init.stderr)
            );
            let o = std::process::Command::new(&exe)
                .args(["forward", "--backend", "cuda", "--model"])
                .arg(&model)
                .arg("--tokens")
                .arg(&ids)
                .env(
                    "ULTRALONG_CUDA_MEM_LIMIT",
                    ((32 << 20) + (64 << 10)).to_string(),
                )
                .output()?;
            let _ = std::fs::remove_dir_all(&dir);
            let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
            let ok = o.status.code() == Some(1)
                && err.lines().count() == 1
                && err.starts_with("error: ")
                && err.contains("out of memory")
                && err.contains("buffer");
            Ok((ok, err))
        };
        let (ok, msg) = run().unwrap_or_else(|e| (false, format!("{e:#}")));
        vec![(
            format!("out of memory at the command line: one line naming the buffer: {msg:?}"),
            if ok { 0.0 } else { 1.0 },
            0.0,
        )]
    }

    /// Device RoPE tables with exact angles against `Rope::cos_sin` (Exact) at far positions.
    fn rope_table_check(g: &CudaBackend) -> checks::Rows {
        let cfg = ModelConfig::from_json_str(&llama8b_yarn_json(1, 128256, 32, 8, 14336), "yarn")
            .expect("config");
        let rope = Rope::new(&cfg, RopePrecision::Exact).expect("rope");
        let positions: Vec<u64> = (0..64u64)
            .map(|i| [0u64, 4_000_000, 4_194_303, (1 << 23) - 64][(i % 4) as usize] + i)
            .collect();
        let (cw, sw) = rope.cos_sin::<f64>(&positions);
        let (cg, sg) = g.rope_table(
            &rope.inv_freq,
            &positions,
            rope.attention_factor,
            DType::F32,
        );
        let maxerr = |a: Vec<f64>, b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f64, |m, e| if e.is_nan() { f64::NAN } else { m.max(e) })
        };
        vec![
            (
                "rope table cos, positions to 2^23 (max abs error)".into(),
                maxerr(g.download_f64(&cg), &cw),
                1e-6,
            ),
            (
                "rope table sin, positions to 2^23 (max abs error)".into(),
                maxerr(g.download_f64(&sg), &sw),
                1e-6,
            ),
        ]
    }

    /// A Llama config with YaRN (factor 128 over 8K, as the 1M model) and the given sizes.
    fn llama8b_yarn_json(
        layers: usize,
        vocab: usize,
        heads: usize,
        kv: usize,
        ffn: usize,
    ) -> String {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": vocab, "hidden_size": 4096, "intermediate_size": ffn,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": 128, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 1048576,
            "rope_scaling": {"rope_type": "yarn", "factor": 128.0,
                "original_max_position_embeddings": 8192},
            "tie_word_embeddings": false
        })
        .to_string()
    }

    /// One training step of a tiny model (YaRN, GQA, 2 layers) on the GPU and the CPU (f32).
    fn training_step_check(g: &CudaBackend) -> checks::Rows {
        let cfg_json = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 4096,
            "rope_scaling": {"rope_type": "yarn", "factor": 8.0,
                "original_max_position_embeddings": 512},
            "tie_word_embeddings": false
        })
        .to_string();
        let cfg = ModelConfig::from_json_str(&cfg_json, "tiny").expect("config");
        let c = CpuBackend::<f32>::new();
        let t = 384;
        let ids: Vec<u32> = (0..t as u64)
            .map(|i| (rng::uniform(5, 0, i) * 1000.0) as u32)
            .collect();
        let targets: Vec<i32> = (0..t as u64)
            .map(|i| {
                if i % 50 == 7 {
                    -1
                } else {
                    (rng::uniform(5, 1, i) * 1000.0) as i32
                }
            })
            .collect();
        let counted = targets.iter().filter(|&&x| x >= 0).count() as f64;
        let hp = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 1,
            grad_scale: 1.0,
        };
        // Each side: loss, grads, weights after one AdamW step.
        #[allow(clippy::type_complexity)]
        fn step<B: Backend>(
            b: &B,
            cfg: &ModelConfig,
            ids: &[u32],
            targets: &[i32],
            counted: f64,
            hp: AdamW,
        ) -> (f64, Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<String>) {
            let params = ParamStore::init_random(b, cfg, 42);
            let mut model = Llama::new(cfg.clone(), RopePrecision::Exact, params).expect("model");
            let mut ws = Workspace::new(b, cfg, ids.len(), false, 96);
            let mut grads = ParamStore::zeros(b, cfg);
            let head = Head::Loss {
                targets,
                grad_scale: 1.0 / counted,
            };
            // Far positions: YaRN at 1M-scale angles.
            let loss = model.forward_backward(b, &mut ws, ids, 1_000_000, head, Some(&mut grads))
                / counted;
            let gv: Vec<Vec<f64>> = grads.bufs.iter().map(|x| b.download_f64(x)).collect();
            let (mut m, mut v) = (ParamStore::zeros(b, cfg), ParamStore::zeros(b, cfg));
            adamw_step(b, &mut model.params, &grads, &mut m, &mut v, hp);
            let pv: Vec<Vec<f64>> = model
                .params
                .bufs
                .iter()
                .map(|x| b.download_f64(x))
                .collect();
            let names = grads.specs.iter().map(|s| s.name.clone()).collect();
            (loss, gv, pv, names)
        }
        let (lc, gc, _, names) = step(&c, &cfg, &ids, &targets, counted, hp);
        let (lg, gg, pg, _) = step(g, &cfg, &ids, &targets, counted, hp);
        // The optimizer half against the CPU on the GPU's own gradients: Adam's first step is
        // nearly sign(g), so near-zero gradients that differ in sign between the backends would
        // make a comparison of the two whole steps flaky without saying anything.
        let mut pref = ParamStore::init_random(&c, &cfg, 42);
        let mut gref = ParamStore::zeros(&c, &cfg);
        for (i, x) in gg.iter().enumerate() {
            gref.bufs[i] = c.upload_f64(x);
        }
        let (mut m, mut v) = (ParamStore::zeros(&c, &cfg), ParamStore::zeros(&c, &cfg));
        adamw_step(&c, &mut pref, &gref, &mut m, &mut v, hp);
        let mut rows = vec![(
            format!("training step loss (cpu {lc:.6}, gpu {lg:.6}) relative"),
            ((lg - lc) / lc).abs(),
            1e-2,
        )];
        for i in 0..names.len() {
            rows.push((
                format!("training step grad {} 1-cosine", names[i]),
                1.0 - cosine(&gg[i], &gc[i]),
                1e-3,
            ));
            rows.push((
                format!("training step AdamW-updated {} relative", names[i]),
                rel_l2(&pg[i], &c.download_f64(&pref.bufs[i])),
                1e-5,
            ));
        }
        rows
    }

    /// One decoder layer of Llama-3.1-8B at the TP-8 per-rank shapes, forward + backward, through
    /// the model code (a one-layer model with a 256-token vocabulary: embedding and LM head cost
    /// next to nothing), bf16 storage.
    fn layer_bench(
        rep: &mut Report,
        g: &CudaBackend,
        t: usize,
        peer: Option<&Value>,
    ) -> Result<()> {
        let cfg = ModelConfig::from_json_str(&llama8b_yarn_json(1, 256, 4, 1, 1792), "layer")?;
        let params = ParamStore::init_random(g, &cfg, 3);
        let model = Llama::new(cfg.clone(), RopePrecision::Exact, params)?;
        let ids: Vec<u32> = (0..t as u64)
            .map(|i| (rng::uniform(8, 0, i) * 256.0) as u32)
            .collect();
        let targets: Vec<i32> = (0..t as u64)
            .map(|i| (rng::uniform(8, 1, i) * 256.0) as i32)
            .collect();
        g.synchronize();
        g.reset_peak();
        // Peak above the weights: activations, workspace and parameter gradients (as the peer).
        let base = g.bytes_in_use();
        let mut grads = ParamStore::zeros(g, &cfg);
        let mut ws = Workspace::new(g, &cfg, t, false, 1024);
        let mut pass = || {
            let head = Head::Loss {
                targets: &targets,
                grad_scale: 1.0 / t as f64,
            };
            model.forward_backward(g, &mut ws, &ids, 0, head, Some(&mut grads));
        };
        let t0 = Instant::now();
        pass();
        g.synchronize();
        let first = t0.elapsed().as_secs_f64() * 1e3;
        let reps = if first > 5000.0 { 1 } else { 3 };
        let ms = time_ms(g, 0, reps, &mut pass);
        let peak = g.peak_bytes() - base.min(g.peak_bytes());
        // Causal model FLOPs (crate::flops) of this one TP-8 layer.
        let (h, hd, nq, nkv, ffn) = (4096.0, 128.0, 4.0, 1.0, 1792.0);
        let layer_params = h * (nq + 2.0 * nkv) * hd + nq * hd * h + 3.0 * h * ffn;
        let flops = t as f64 * crate::flops::causal_flops_per_token(layer_params, 4 * 128, t, 1);
        let mfu = crate::flops::mfu(flops, ms / 1e3, 1, crate::flops::H100_SXM_BF16_DENSE);
        // Attention alone at the same shape (the simple kernel), forward + backward.
        let shape = AttnShape {
            q_len: t,
            kv_len: t,
            n_q_heads: 4,
            n_kv_heads: 1,
            head_dim: 128,
            q_pos0: 0,
            k_pos0: 0,
            causal: true,
        };
        let q = randn_dev(g, t * 4 * 128, 20, 1.0);
        let k = randn_dev(g, t * 128, 21, 1.0);
        let v = randn_dev(g, t * 128, 22, 1.0);
        let dout = randn_dev(g, t * 4 * 128, 23, 1.0);
        let (mut out, mut lse) = (g.zeros(t * 4 * 128), g.zeros(4 * t));
        let (mut dq, mut dk, mut dv) = (g.zeros(t * 512), g.zeros(t * 128), g.zeros(t * 128));
        let sc = 1.0 / 128f64.sqrt();
        let attn_kind = if g.uses_flash(&shape) {
            "flash"
        } else {
            "simple"
        };
        let attn_ms = time_ms(g, 0, 1, || {
            g.attention_forward(&q, &k, &v, &shape, sc, &mut out, &mut lse);
            g.attention_backward(
                &q, &k, &v, &out, &dout, &lse, &shape, sc, &mut dq, &mut dk, &mut dv,
            );
        });
        let pv = |k: &str| peer.and_then(|p| p.get(k)).and_then(Value::as_f64);
        let name = "pytorch eager+SDPA";
        let row = |rep: &mut Report, n: &str, v: f64, unit: &str, key: &str| {
            rep.metric(n, v, unit, pv(key).map(|x| (name, x)));
        };
        row(
            rep,
            &format!("decoder layer fwd+bwd, {t} tokens, TP8 shapes: time"),
            ms,
            "ms",
            "layer_ms",
        );
        row(
            rep,
            "decoder layer fwd+bwd: peak memory",
            peak as f64 / (1u64 << 30) as f64,
            "GiB",
            "peak_gib",
        );
        row(
            rep,
            "decoder layer fwd+bwd: MFU (causal FLOPs / 989 TFLOP/s)",
            mfu,
            "ratio",
            "mfu",
        );
        row(
            rep,
            &format!("attention ({attn_kind}) fwd+bwd alone: time"),
            attn_ms,
            "ms",
            "attn_ms",
        );
        row(
            rep,
            "decoder layer fwd+bwd minus attention: time",
            ms - attn_ms,
            "ms",
            "layer_minus_attn_ms",
        );
        if let Some(p) = pv("layer_ms") {
            rep.metric(
                "decoder layer time ratio ultralong / pytorch",
                ms / p,
                "ratio",
                None,
            );
        }
        if let (Some(p), Some(pa)) = (pv("layer_ms"), pv("attn_ms")) {
            rep.metric(
                "decoder layer minus attention time ratio ultralong / pytorch",
                (ms - attn_ms) / (p - pa),
                "ratio",
                None,
            );
        }
        Ok(())
    }

    /// Llama-3.1-8B (configs/llama-3.1-8b-instruct.json) with the 4M run's YaRN
    /// (configs/ultralong-4m.toml: factor 512 over 8192, beta_fast 4, beta_slow 1) and `layers`.
    fn rank4m_config(layers: usize) -> Result<ModelConfig> {
        let path = "configs/llama-3.1-8b-instruct.json";
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading {path} (run from the repository root)"))?;
        let mut v: Value =
            serde_json::from_str(&text).with_context(|| format!("{path}: invalid JSON"))?;
        v["num_hidden_layers"] = json!(layers);
        v["max_position_embeddings"] = json!(4194304);
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 512.0,
            "original_max_position_embeddings": 8192, "beta_fast": 4.0, "beta_slow": 1.0});
        ModelConfig::from_json_str(&v.to_string(), path)
    }

    /// One rank of the real 4M run on this GPU (issue 7, item 5): TP 8 × CP 16, world rank 0
    /// (TP rank 0, CP rank 0: zigzag chunks 0 and 31 of 4,194,304 tokens, 262,144 local tokens),
    /// 4 query heads and 1 KV head per rank, full recompute, bf16 storage, the flash kernels
    /// inside the CP ring, every collective a device-to-device copy of its real size
    /// (`LoopbackComm`'s buffer collectives: no host round trip). One forward+backward per layer
    /// count, broken down by phase (`backend::timed` on CUDA events) with each phase's time
    /// predicted from the measured kernel rates of bench/rates.toml [h200];
    /// the optimizer is left out (ZeRO-1 over DP × CP holds 1/32 of the moments per rank, a small
    /// elementwise pass). With two layer counts the step time and peak memory are extrapolated
    /// linearly to 32 layers (the layers are identical; embedding, head and loss are the
    /// intercept). MFU (docs/ARCHITECTURE.md): per token 6·N + 6·heads·head_dim·S·layers, N this rank's
    /// matmul parameters, S = 4,194,304, against the dense bf16 peak (crate::flops).
    fn rank4m(rep: &mut Report, layers: &[usize]) -> Result<()> {
        use crate::data::loader::zigzag_chunks;
        use crate::parallel::loopback::loopback_topology;
        use crate::parallel::topology::Layout;
        let (seq, tp, cp) = (4_194_304usize, 8usize, 16usize);
        let t = seq / cp;
        let layout = Layout { tp, cp, dp: 1 };
        let raw = CudaBackend::new(0, DType::Bf16)?;
        let clock = crate::backend::cuda::timeline::EventClock::new(&raw);
        let g = crate::backend::timed::Timed::new(raw, Box::new(clock));
        let rates = crate::rates::device(None, "h200")?;
        let topo = loopback_topology(layout, 0, None);
        let positions: Vec<u64> = zigzag_chunks(seq, cp, topo.cp_rank)
            .iter()
            .flat_map(|&(s, l)| s as u64..(s + l) as u64)
            .collect();
        anyhow::ensure!(
            positions.len() == t,
            "zigzag: {} positions",
            positions.len()
        );
        let mut points = vec![];
        for (k, &n) in layers.iter().enumerate() {
            let cfg = rank4m_config(n)?;
            layout.check_model(&cfg)?;
            let ids: Vec<u32> = (0..t as u64)
                .map(|i| {
                    (rng::uniform(9, 0, i) * cfg.vocab_size as f64) as u32 % cfg.vocab_size as u32
                })
                .collect();
            let targets: Vec<i32> = (0..t as u64)
                .map(|i| {
                    (rng::uniform(9, 1, i) * cfg.vocab_size as f64) as i32 % cfg.vocab_size as i32
                })
                .collect();
            g.inner().synchronize();
            g.inner().reset_peak();
            let base = g.bytes_in_use();
            let params = ParamStore::init_random_shard(&g, &cfg, 1, topo.shard());
            // This rank's matmul parameters (crate::flops' N; every matmul is split over TP).
            let n_params = (crate::flops::matmul_params(&cfg) / tp as u64) as usize;
            let model = Llama::new(cfg.clone(), RopePrecision::Exact, params)?;
            let mut grads = model.params.zeros_like(&g);
            let mut ws = Workspace::for_rank(&g, &cfg, &topo, t, true, 4096);
            let mut pass = || {
                let head = Head::Loss {
                    targets: &targets,
                    grad_scale: 1.0 / t as f64,
                };
                let l = model.forward_backward_rank(
                    &g,
                    &topo,
                    &mut ws,
                    &ids,
                    &positions,
                    head,
                    Some(&mut grads),
                );
                g.inner().synchronize();
                l
            };
            if k == 0 {
                let t0 = Instant::now();
                pass();
                println!(
                    "rank4m: warm-up pass ({n} layers) {:.1} s",
                    t0.elapsed().as_secs_f64()
                );
            }
            g.reset();
            let t0 = Instant::now();
            let loss = pass();
            let secs = t0.elapsed().as_secs_f64();
            g.inner().check()?;
            // The breakdown: each phase's device time beside its prediction from kernel rates
            // (attention looked up at the ring's local length; the loopback's transfers are
            // device copies, so "communication" is predicted at copy speed).
            let phases = rates.compare(&g.report(), 2.0, t as f64, rates.copy_gbps);
            let predicted: f64 = phases.iter().filter_map(|p| p.predicted_s).sum();
            for p in &phases {
                rep.metric_with(
                    &format!("rank4m_phase_L{n}: {}", p.phase),
                    p.measured_s,
                    "s",
                    p.predicted_s
                        .map(|v| ("predicted from bench/rates.toml [h200]", v)),
                    json!({"calls": p.calls, "flops": p.flops, "elems": p.elems}),
                );
            }
            rep.metric(
                &format!("rank4m_overhead_L{n}: step / sum of predicted phases"),
                secs / predicted,
                "ratio",
                None,
            );
            let peak = (g.peak_bytes() - base.min(g.peak_bytes())) as f64 / (1u64 << 30) as f64;
            // Model FLOPs of this rank (crate::flops): its matmul parameters and its 4 heads.
            let flops =
                t as f64 * crate::flops::causal_flops_per_token(n_params as f64, 4 * 128, seq, n);
            rep.check(
                &format!(
                    "rank4m {n} layers: loss finite ({:.4} per token)",
                    loss / t as f64
                ),
                if loss.is_finite() { 0.0 } else { 1.0 },
                0.0,
            );
            rep.metric(
                &format!(
                    "rank4m_step_L{n}: TP8 x CP16 rank 0, 262144 tokens, {n} layers, fwd+bwd time"
                ),
                secs,
                "s",
                None,
            );
            rep.metric(&format!("rank4m_peak_L{n}: peak memory"), peak, "GiB", None);
            rep.metric(
                &format!("rank4m_mfu_L{n}: MFU (causal FLOPs / 989 TFLOP/s)"),
                crate::flops::mfu(flops, secs, 1, crate::flops::H100_SXM_BF16_DENSE),
                "ratio",
                None,
            );
            points.push((n, secs, peak, n_params, flops));
        }
        // A least-squares line through every (layers, value) point, evaluated at 32 layers; with
        // three or more points the largest relative miss of the line says whether the step is
        // linear in the layer count (the extrapolation's premise).
        let ns: Vec<f64> = points.iter().map(|p| p.0 as f64).collect();
        let distinct = ns.iter().any(|&n| n != ns[0]);
        if points.len() >= 2 && distinct {
            let fit = |ys: &[f64]| -> (f64, f64) {
                let k = ns.len() as f64;
                let (mx, my) = (ns.iter().sum::<f64>() / k, ys.iter().sum::<f64>() / k);
                let sxy: f64 = ns.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
                let sxx: f64 = ns.iter().map(|x| (x - mx) * (x - mx)).sum();
                let slope = sxy / sxx;
                (my - slope * mx, slope)
            };
            let at = |ys: &[f64], x: f64| {
                let (a, b) = fit(ys);
                a + b * x
            };
            let col = |f: fn(&(usize, f64, f64, usize, f64)) -> f64| -> Vec<f64> {
                points.iter().map(f).collect()
            };
            let (ts, ps, fs, nps) = (
                col(|p| p.1),
                col(|p| p.2),
                col(|p| p.4),
                col(|p| p.3 as f64),
            );
            let full = 32.0;
            let secs = at(&ts, full);
            let peak = at(&ps, full);
            let flops = at(&fs, full);
            let np = at(&nps, full);
            let counts: Vec<String> = points.iter().map(|p| p.0.to_string()).collect();
            let from = format!("extrapolated from {} layers", counts.join(", "));
            if points.len() >= 3 {
                let miss = ns
                    .iter()
                    .zip(&ts)
                    .map(|(&x, &y)| ((at(&ts, x) - y) / y).abs())
                    .fold(0.0, f64::max);
                rep.metric(
                    "rank4m_linearity: largest relative miss of the fitted line",
                    miss,
                    "ratio",
                    None,
                );
            }
            rep.metric(&format!("rank4m_step: 32 layers, {from}"), secs, "s", None);
            rep.metric(
                &format!("rank4m_peak: 32 layers, {from}"),
                peak,
                "GiB",
                None,
            );
            rep.metric(
                &format!("rank4m_mfu: 32 layers, {from} (N = {np:.3e} matmul parameters per rank)"),
                crate::flops::mfu(flops, secs, 1, crate::flops::H100_SXM_BF16_DENSE),
                "ratio",
                None,
            );
        }
        Ok(())
    }
}
