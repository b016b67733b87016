//! `ultralong gpu-check`: the CUDA backend's checks and benchmarks in one process, so one device
//! call (bench/gpu-check.sh) runs them with no Rust on the GPU machine.
//!
//! Checks (METHOD.md): every kernel against the CPU reference in f64 on fresh random inputs,
//! outputs poisoned with NaN before each launch (an unwritten element fails), relative L2 error
//! ‖gpu − ref‖/‖ref‖ against a tolerance per storage type: 1e-5 for fp32 storage (2e-2 for GEMMs,
//! whose operands are bf16), 1e-2 for bf16 storage (inputs rounded to bf16 on both sides, so only
//! the kernel's own rounding counts); device RoPE tables at positions up to 2^23 against
//! `Rope::cos_sin` (max abs error); one whole tiny-model training step (YaRN, GQA, chunked CE,
//! AdamW) against the CPU f32 backend: loss within 1e-2 relative, gradient cosine > 0.999 per
//! tensor, and the updated weights.
//!
//! Benchmarks: device-to-device copy bandwidth (bytes read + written) as the ceiling, each
//! memory-bound kernel's bandwidth against it (RoPE, RMSNorm, SwiGLU, AdamW), GEMM TFLOP/s, and one
//! Llama-3.1-8B decoder layer at the per-rank shapes of TP 8 (4 query heads, 1 KV head, FFN 1792,
//! hidden 4096, head_dim 128) over `--layer-tokens` tokens: time of forward+backward, peak memory,
//! MFU (DESIGN.md: causal FLOPs against 989 TFLOP/s), beside the PyTorch peer's numbers
//! (`--peer`, from bench/gpu/layer_torch.py) and their ratio.
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
    /// TFLOP/s beside `--attn-peer`), rank4m (one rank of the 4M run; not part of `all`).
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

/// ‖a − b‖ / ‖b‖ (NaN anywhere gives NaN: a failed check).
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    if a.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    (num / den.max(1e-300)).sqrt()
}

pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na == 0.0 && nb == 0.0 {
        return 1.0;
    }
    dot / (na * nb).max(1e-300)
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
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::time::Instant;

    use anyhow::Context;

    use crate::backend::cpu::CpuBackend;
    use crate::backend::cuda::{AttnOptions, CudaBackend, CudaBuf, DType};
    use crate::backend::{AdamW, AttnShape, Backend, NOT_IN_SHARD};
    use crate::model::config::ModelConfig;
    use crate::model::llama::{Head, Llama, Workspace};
    use crate::model::params::ParamStore;
    use crate::model::rope::{Rope, RopePrecision};
    use crate::train::optim::adamw_step;
    use crate::util::rng;

    type Cpu = CpuBackend<f64>;

    pub fn run(a: GpuCheckArgs) -> Result<()> {
        const MODES: [&str; 7] = [
            "all",
            "checks",
            "bench",
            "layer",
            "attention",
            "attn-bench",
            "rank4m",
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
            kernel_checks(&mut rep, &g32, s);
            let g16 = CudaBackend::new(0, DType::Bf16)?;
            kernel_checks(&mut rep, &g16, s);
            drop(g16);
            guarded(&mut rep, "rope table exact angles", || {
                rope_table_check(&g32)
            });
            guarded(&mut rep, "training step", || training_step_check(&g32));
        }
        if a.only == "all" || a.only == "bench" {
            let g16 = CudaBackend::new(0, DType::Bf16)?;
            kernel_bench(&mut rep, &g16, &g32);
        }
        if a.only == "all" || a.only == "layer" {
            let peer = read_json(a.peer.as_ref())?;
            let g16 = CudaBackend::new(0, DType::Bf16)?;
            layer_bench(&mut rep, &g16, a.layer_tokens, peer.as_ref())?;
        }
        if a.only == "all" || a.only == "attention" {
            let mut g16 = CudaBackend::new(0, DType::Bf16)?;
            let mut g32 = CudaBackend::new(0, DType::F32)?;
            flash_checks(&mut rep, &mut g16, &mut g32, a.small);
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
            attn_bench(&mut rep, &mut g16, &lens, peer.as_ref());
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

    /// Run one group of checks; a panic (CUDA error, size assertion) becomes a failed row.
    fn guarded(rep: &mut Report, name: &str, f: impl FnOnce() -> Vec<(String, f64, f64)>) {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(rows) => {
                for (n, e, t) in rows {
                    rep.check(&n, e, t);
                }
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                rep.fail(name, &msg);
            }
        }
    }

    /// Fresh random inputs: each call draws from a new stream of the counter RNG.
    struct Draw {
        stream: u64,
        bf16: bool,
    }
    impl Draw {
        fn normal(&mut self, n: usize, scale: f64) -> Vec<f32> {
            self.stream += 1;
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64);
            (0..n as u64)
                .map(|i| {
                    let x = (rng::normal(seed, self.stream, i) * scale) as f32;
                    if self.bf16 {
                        half::bf16::from_f32(x).to_f32()
                    } else {
                        x
                    }
                })
                .collect()
        }
    }

    fn up(c: &Cpu, g: &CudaBackend, x: &[f32]) -> (<Cpu as Backend>::Buf, CudaBuf) {
        (c.upload(x), g.upload(x))
    }
    fn poisoned(g: &CudaBackend, n: usize) -> CudaBuf {
        let mut b = g.zeros(n);
        g.fill(&mut b, f32::NAN);
        b
    }
    fn cmp(c: &Cpu, g: &CudaBackend, cb: &<Cpu as Backend>::Buf, gb: &CudaBuf) -> f64 {
        rel_l2(&g.download_f64(gb), &c.download_f64(cb))
    }

    fn kernel_checks(rep: &mut Report, g: &CudaBackend, s: usize) {
        let c = Cpu::new();
        let bf = g.storage() == DType::Bf16;
        let tag = g.name();
        let tol = if bf { 1e-2 } else { 1e-5 };
        let gemm_tol = 2e-2;
        let mut d = Draw {
            stream: 0,
            bf16: bf,
        };
        let named = |v: Vec<(&str, f64, f64)>| -> Vec<(String, f64, f64)> {
            v.into_iter()
                .map(|(n, e, t)| (format!("{tag} {n}"), e, t))
                .collect()
        };

        // GEMM: every transpose, with and without accumulation, aligned and odd shapes, offsets.
        guarded(rep, &format!("{tag} gemm"), || {
            let mut rows = vec![];
            for &(m, n, k) in &[(64 * s, 96 * s, 128 * s), (77, 45, 33)] {
                for ta in [false, true] {
                    for tb in [false, true] {
                        for acc in [false, true] {
                            let (av, bv, cv) = (
                                d.normal(m * k + 8, 1.0),
                                d.normal(k * n + 8, 1.0),
                                d.normal(m * n + 8, 1.0),
                            );
                            let ((ac, ag), (bc, bg)) = (up(&c, g, &av), up(&c, g, &bv));
                            let (mut cc, mut cg) = up(&c, g, &cv);
                            if !acc {
                                g.fill(&mut cg, f32::NAN);
                            }
                            c.gemm(&mut cc, 8, &ac, 8, &bc, 8, m, n, k, ta, tb, acc);
                            g.gemm(&mut cg, 8, &ag, 8, &bg, 8, m, n, k, ta, tb, acc);
                            let e = rel_l2(&g.download_f64(&cg)[8..], &c.download_f64(&cc)[8..]);
                            rows.push((
                                format!(
                                    "gemm {m}x{n}x{k} {}{}{}",
                                    if ta { "T" } else { "N" },
                                    if tb { "T" } else { "N" },
                                    if acc { " acc" } else { "" }
                                ),
                                e,
                                gemm_tol,
                            ));
                        }
                    }
                }
            }
            rows.into_iter()
                .map(|(n, e, t)| (format!("{tag} {n}"), e, t))
                .collect()
        });

        guarded(rep, &format!("{tag} elementwise"), || {
            let n = 10_007 * s;
            let (xv, yv) = (d.normal(n, 1.0), d.normal(n, 1.0));
            let (mut xc, mut xg) = up(&c, g, &xv);
            let (yc, yg) = up(&c, g, &yv);
            c.add_at(&mut xc, 3, &yc, 5, n - 10);
            g.add_at(&mut xg, 3, &yg, 5, n - 10);
            let e_add = cmp(&c, g, &xc, &xg);
            c.scale(&mut xc, 0.37);
            g.scale(&mut xg, 0.37);
            let e_scale = cmp(&c, g, &xc, &xg);
            let ss = (g.sum_squares(&xg) - c.sum_squares(&xc)).abs() / c.sum_squares(&xc);
            // copy into the other dtype and back
            let other = if bf { DType::F32 } else { DType::Bf16 };
            let mut t = g.zeros_dtype(n, other);
            g.copy(&xg, 0, &mut t, 0, n);
            let mut back = poisoned(g, n);
            g.copy(&t, 0, &mut back, 0, n);
            let e_copy = rel_l2(&g.download_f64(&back), &g.download_f64(&xg));
            let mut h = vec![0f32; 100];
            g.read_host(&xg, 17, &mut h);
            let want: Vec<f64> = c.download_f64(&xc)[17..117].to_vec();
            let hv: Vec<f64> = h.iter().map(|&x| x as f64).collect();
            let e_read = rel_l2(&hv, &want);
            named(vec![
                ("add_at", e_add, tol),
                ("scale", e_scale, tol),
                ("sum_squares", ss, 1e-5),
                ("copy f32<->bf16", e_copy, 1e-2),
                ("read_host", e_read, tol),
            ])
        });

        guarded(rep, &format!("{tag} rmsnorm"), || {
            let (rows, dim) = (37 * s, 4096);
            let xv = d.normal(rows * dim, 2.0);
            let wv: Vec<f32> = d.normal(dim, 0.1).iter().map(|x| 1.0 + x).collect();
            let ((xc, xg), (wc, wg)) = (up(&c, g, &xv), up(&c, g, &wv));
            let (mut oc, mut og) = (c.zeros(rows * dim), poisoned(g, rows * dim));
            let (mut rc, mut rg) = (c.zeros(rows), poisoned(g, rows));
            c.rmsnorm_forward(&xc, &wc, 1e-5, rows, dim, &mut oc, &mut rc);
            g.rmsnorm_forward(&xg, &wg, 1e-5, rows, dim, &mut og, &mut rg);
            let (e_out, e_rstd) = (cmp(&c, g, &oc, &og), cmp(&c, g, &rc, &rg));
            let gv = d.normal(rows * dim, 1.0);
            let (gc, gg) = up(&c, g, &gv);
            let (dx0, dw0) = (d.normal(rows * dim, 1.0), d.normal(dim, 1.0));
            let ((mut dxc, mut dxg), (mut dwc, mut dwg)) = (up(&c, g, &dx0), up(&c, g, &dw0));
            // Both sides from the same rstd (the GPU's, possibly rounded to bf16).
            let rr = c.upload_f64(&g.download_f64(&rg));
            c.rmsnorm_backward(&gc, &xc, &wc, &rr, rows, dim, &mut dxc, &mut dwc);
            g.rmsnorm_backward(&gg, &xg, &wg, &rg, rows, dim, &mut dxg, &mut dwg);
            named(vec![
                ("rmsnorm fwd out", e_out, tol),
                ("rmsnorm fwd rstd", e_rstd, tol),
                ("rmsnorm bwd dx", cmp(&c, g, &dxc, &dxg), tol),
                ("rmsnorm bwd dw", cmp(&c, g, &dwc, &dwg), tol),
            ])
        });

        guarded(rep, &format!("{tag} rope"), || {
            let (rows, heads, hd) = (33 * s, 5, 128);
            let half = hd / 2;
            let xv = d.normal(rows * heads * hd, 1.0);
            let ang: Vec<f32> = d.normal(rows * half, 3.0);
            let cv: Vec<f32> = ang.iter().map(|a| a.cos() * 1.2).collect();
            let sv: Vec<f32> = ang.iter().map(|a| a.sin() * 1.2).collect();
            let ((mut xc, mut xg), (cc, cg), (sc, sg)) =
                (up(&c, g, &xv), up(&c, g, &cv), up(&c, g, &sv));
            c.rope_forward(&mut xc, &cc, &sc, rows, heads, hd);
            g.rope_forward(&mut xg, &cg, &sg, rows, heads, hd);
            let e_f = cmp(&c, g, &xc, &xg);
            c.rope_backward(&mut xc, &cc, &sc, rows, heads, hd);
            g.rope_backward(&mut xg, &cg, &sg, rows, heads, hd);
            named(vec![
                ("rope fwd", e_f, tol),
                ("rope bwd", cmp(&c, g, &xc, &xg), tol),
            ])
        });

        guarded(rep, &format!("{tag} swiglu"), || {
            let n = 40_000 * s;
            let (gv, uv, dv) = (d.normal(n, 3.0), d.normal(n, 1.0), d.normal(n, 1.0));
            let ((gc, gg), (uc, ug), (dc, dg)) = (up(&c, g, &gv), up(&c, g, &uv), up(&c, g, &dv));
            let (mut oc, mut og) = (c.zeros(n), poisoned(g, n));
            c.swiglu_forward(&gc, &uc, &mut oc);
            g.swiglu_forward(&gg, &ug, &mut og);
            let (mut agc, mut agg) = (c.zeros(n), poisoned(g, n));
            let (mut auc, mut aug) = (c.zeros(n), poisoned(g, n));
            c.swiglu_backward(&gc, &uc, &dc, &mut agc, &mut auc);
            g.swiglu_backward(&gg, &ug, &dg, &mut agg, &mut aug);
            named(vec![
                ("swiglu fwd", cmp(&c, g, &oc, &og), tol),
                ("swiglu bwd dgate", cmp(&c, g, &agc, &agg), tol),
                ("swiglu bwd dup", cmp(&c, g, &auc, &aug), tol),
            ])
        });

        guarded(rep, &format!("{tag} embedding"), || {
            let (vocab, dim, t) = (1000, 256, 300 * s);
            let tv = d.normal(vocab * dim, 1.0);
            let (tc, tg) = up(&c, g, &tv);
            let ids: Vec<u32> = (0..t as u64)
                .map(|i| {
                    if i % 17 == 5 {
                        NOT_IN_SHARD
                    } else {
                        (rng::uniform(11, 3, i) * 50.0) as u32 // many repeats
                    }
                })
                .collect();
            let (mut oc, mut og) = (c.zeros(t * dim), poisoned(g, t * dim));
            c.embedding_forward(&tc, &ids, dim, &mut oc);
            g.embedding_forward(&tg, &ids, dim, &mut og);
            let gv = d.normal(t * dim, 1.0);
            let (gc, gg) = up(&c, g, &gv);
            let dt0 = d.normal(vocab * dim, 1.0);
            let (mut dtc, mut dtg) = up(&c, g, &dt0);
            c.embedding_backward(&mut dtc, &ids, dim, &gc);
            g.embedding_backward(&mut dtg, &ids, dim, &gg);
            named(vec![
                ("embedding fwd", cmp(&c, g, &oc, &og), tol),
                ("embedding bwd", cmp(&c, g, &dtc, &dtg), tol),
            ])
        });

        guarded(rep, &format!("{tag} cross-entropy"), || {
            let (rows, vocab) = (19 * s, 5000);
            let lv = d.normal(rows * vocab, 3.0);
            let targets: Vec<i32> = (0..rows)
                .map(|r| match r % 7 {
                    3 => -1,
                    5 => -2,
                    _ => ((r * 131) % vocab) as i32,
                })
                .collect();
            let chunk_targets: Vec<i32> = targets.iter().map(|&t| t.max(-1)).collect();
            let (mut lc, mut lg) = up(&c, g, &lv);
            let loss_c = c.cross_entropy_chunk(&mut lc, &chunk_targets, vocab, 0.25);
            let loss_g = g.cross_entropy_chunk(&mut lg, &chunk_targets, vocab, 0.25);
            let (lc2, lg2) = up(&c, g, &lv);
            let sc = c.cross_entropy_stats(&lc2, &targets, vocab);
            let sg = g.cross_entropy_stats(&lg2, &targets, vocab);
            let flat = |v: &[crate::backend::CeStats]| -> Vec<f64> {
                v.iter()
                    .flat_map(|s| [s.max, s.sum, s.target.unwrap_or(-7.0)])
                    .collect()
            };
            let e_stats = rel_l2(&flat(&sg), &flat(&sc));
            let mx: Vec<f64> = sc.iter().map(|s| s.max).collect();
            let sm: Vec<f64> = sc.iter().map(|s| s.sum).collect();
            let (mut gc, mut ggb) = up(&c, g, &lv);
            c.cross_entropy_grad(&mut gc, &targets, vocab, &mx, &sm, 0.5);
            g.cross_entropy_grad(&mut ggb, &targets, vocab, &mx, &sm, 0.5);
            named(vec![
                (
                    "cross_entropy_chunk loss",
                    ((loss_g - loss_c) / loss_c).abs(),
                    tol,
                ),
                ("cross_entropy_chunk grad", cmp(&c, g, &lc, &lg), tol),
                ("cross_entropy_stats", e_stats, tol),
                ("cross_entropy_grad", cmp(&c, g, &gc, &ggb), tol),
            ])
        });

        guarded(rep, &format!("{tag} attention"), || {
            let mut rows = vec![];
            for (causal, ql, kl, qp, kp) in [
                (true, 70 * s, 70 * s, 0i64, 0i64),
                (true, 40, 90, 100, 60),
                (false, 33, 47, 0, 0),
            ] {
                let shape = AttnShape {
                    q_len: ql,
                    kv_len: kl,
                    n_q_heads: 4,
                    n_kv_heads: 2,
                    head_dim: 128,
                    q_pos0: qp,
                    k_pos0: kp,
                    causal,
                };
                let (nq, nk) = (ql * 4 * 128, kl * 2 * 128);
                let (qv, kv, vv, gv) = (
                    d.normal(nq, 1.0),
                    d.normal(nk, 1.0),
                    d.normal(nk, 1.0),
                    d.normal(nq, 1.0),
                );
                let ((qc, qg), (kc, kg), (vc, vg), (gc, gg)) = (
                    up(&c, g, &qv),
                    up(&c, g, &kv),
                    up(&c, g, &vv),
                    up(&c, g, &gv),
                );
                let sc = 1.0 / (128f64).sqrt();
                let (mut oc, mut og) = (c.zeros(nq), poisoned(g, nq));
                let (mut lc, mut lg) = (c.zeros(4 * ql), poisoned(g, 4 * ql));
                c.attention_forward(&qc, &kc, &vc, &shape, sc, &mut oc, &mut lc);
                g.attention_forward(&qg, &kg, &vg, &shape, sc, &mut og, &mut lg);
                // −∞ rows compare as equal; NaN fails.
                let fin = |v: Vec<f64>| -> Vec<f64> {
                    v.into_iter()
                        .map(|x| if x == f64::NEG_INFINITY { -1e30 } else { x })
                        .collect()
                };
                let e_lse = rel_l2(&fin(g.download_f64(&lg)), &fin(c.download_f64(&lc)));
                // The flash kernels (head_dim 128 here) compute from bf16 operands whatever the
                // storage: fp32 inputs are rounded first, so their tolerance is bf16's
                // (flash_checks says why 1e-2 and 3e-2).
                let flash = g.uses_flash(&shape);
                let ft = if flash { 1e-2 } else { tol };
                let kind = if flash { "flash" } else { "simple" };
                let name = format!("attention ({kind}) {ql}x{kl} causal={causal} pos {qp}/{kp}");
                rows.push((format!("{name} out"), cmp(&c, g, &oc, &og), ft));
                rows.push((format!("{name} lse"), e_lse, ft));
                let (mut dqc, mut dqg) = (c.zeros(nq), poisoned(g, nq));
                let (mut dkc, mut dkg) = (c.zeros(nk), poisoned(g, nk));
                let (mut dvc, mut dvg) = (c.zeros(nk), poisoned(g, nk));
                // The same forward results on both sides (the GPU's).
                let (oc2, lc2) = (
                    c.upload_f64(&g.download_f64(&og)),
                    c.upload_f64(&g.download_f64(&lg)),
                );
                c.attention_backward(
                    &qc, &kc, &vc, &oc2, &gc, &lc2, &shape, sc, &mut dqc, &mut dkc, &mut dvc,
                );
                g.attention_backward(
                    &qg, &kg, &vg, &og, &gg, &lg, &shape, sc, &mut dqg, &mut dkg, &mut dvg,
                );
                let bt = if bf || flash { 3e-2 } else { tol };
                rows.push((format!("{name} dq"), cmp(&c, g, &dqc, &dqg), bt));
                rows.push((format!("{name} dk"), cmp(&c, g, &dkc, &dkg), bt));
                rows.push((format!("{name} dv"), cmp(&c, g, &dvc, &dvg), bt));
            }
            // Ring merge of a partial block into rows 5.. of a running result.
            let (ql, rows_b, heads, hd) = (20, 9, 3, 64);
            let (ov, lv, obv, lbv) = (
                d.normal(ql * heads * hd, 1.0),
                d.normal(heads * ql, 2.0),
                d.normal(rows_b * heads * hd, 1.0),
                d.normal(heads * rows_b, 2.0),
            );
            let ((mut oc, mut og), (mut lc, mut lg), (obc, obg), (lbc, lbg)) = (
                up(&c, g, &ov),
                up(&c, g, &lv),
                up(&c, g, &obv),
                up(&c, g, &lbv),
            );
            c.attention_merge(&mut oc, &mut lc, &obc, &lbc, 5, rows_b, ql, heads, hd);
            g.attention_merge(&mut og, &mut lg, &obg, &lbg, 5, rows_b, ql, heads, hd);
            rows.push(("attention_merge out".into(), cmp(&c, g, &oc, &og), tol));
            rows.push(("attention_merge lse".into(), cmp(&c, g, &lc, &lg), tol));
            rows.into_iter()
                .map(|(n, e, t)| (format!("{tag} {n}"), e, t))
                .collect()
        });

        guarded(rep, &format!("{tag} adamw"), || {
            let n = 50_000 * s;
            let hp = AdamW {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step: 3,
                grad_scale: 0.5,
            };
            let (pv, gv, mv) = (d.normal(n, 1.0), d.normal(n, 1.0), d.normal(n, 0.1));
            let vv: Vec<f32> = d.normal(n, 0.1).iter().map(|x| x * x).collect();
            let ((mut pc, mut pg), (gc, gg), (mut mc, mut mg), (mut vc, mut vg)) = (
                up(&c, g, &pv),
                up(&c, g, &gv),
                up(&c, g, &mv),
                up(&c, g, &vv),
            );
            c.adamw(&mut pc, &gc, &mut mc, &mut vc, &hp);
            g.adamw(&mut pg, &gg, &mut mg, &mut vg, &hp);
            let mut rows = vec![
                ("adamw param".to_string(), cmp(&c, g, &pc, &pg), tol),
                ("adamw m".to_string(), cmp(&c, g, &mc, &mg), tol),
                ("adamw v".to_string(), cmp(&c, g, &vc, &vg), tol),
            ];
            // Multi-tensor: three tensors, per-tensor weight decay, clipping on the device.
            let sizes = [n / 3, 1000, n / 2 + 7];
            let mut cpu_t = vec![];
            let mut gpu_t = vec![];
            for &k in &sizes {
                let (p, gr, m) = (d.normal(k, 1.0), d.normal(k, 1.0), d.normal(k, 0.1));
                let v: Vec<f32> = d.normal(k, 0.1).iter().map(|x| x * x).collect();
                let (a, b) = up(&c, g, &p);
                let (e, f) = up(&c, g, &gr);
                let (h, i) = up(&c, g, &m);
                let (j, l) = up(&c, g, &v);
                cpu_t.push((a, e, h, j));
                gpu_t.push((b, f, i, l));
            }
            let wd = [0.1, 0.0, 0.1];
            let (pre, max_norm) = (0.5, 1.0);
            let norm_c = cpu_t
                .iter()
                .map(|t| c.sum_squares(&t.1))
                .sum::<f64>()
                .sqrt()
                * pre;
            let clip = if norm_c > max_norm {
                max_norm / (norm_c + 1e-6)
            } else {
                1.0
            };
            for (i, t) in cpu_t.iter_mut().enumerate() {
                let h = AdamW {
                    weight_decay: wd[i],
                    grad_scale: pre * clip,
                    ..hp
                };
                c.adamw(&mut t.0, &t.1, &mut t.2, &mut t.3, &h);
            }
            let mut refs: Vec<(&mut CudaBuf, &CudaBuf, &mut CudaBuf, &mut CudaBuf)> = gpu_t
                .iter_mut()
                .map(|(p, gr, m, v)| (p, &*gr, m, v))
                .collect();
            let norm_g = g.adamw_multi(&mut refs, &wd, &hp, pre, max_norm);
            rows.push((
                "adamw_multi global norm".into(),
                ((norm_g - norm_c) / norm_c).abs(),
                tol,
            ));
            for i in 0..sizes.len() {
                rows.push((
                    format!("adamw_multi tensor {i} param"),
                    cmp(&c, g, &cpu_t[i].0, &gpu_t[i].0),
                    tol,
                ));
            }
            rows.into_iter()
                .map(|(n, e, t)| (format!("{tag} {n}"), e, t))
                .collect()
        });
    }

    /// Device RoPE tables with exact angles against `Rope::cos_sin` (Exact) at far positions.
    fn rope_table_check(g: &CudaBackend) -> Vec<(String, f64, f64)> {
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
    fn training_step_check(g: &CudaBackend) -> Vec<(String, f64, f64)> {
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

    /// Median milliseconds of `f` over `reps` runs after `warmup`, timed with CUDA events.
    fn time_ms(g: &CudaBackend, warmup: usize, reps: usize, mut f: impl FnMut()) -> f64 {
        use cudarc::driver::result::event;
        use cudarc::driver::sys::CUevent_flags;
        for _ in 0..warmup {
            f();
        }
        g.synchronize();
        let mut v = Vec::with_capacity(reps);
        let s = g.stream().cu_stream();
        let e0 = event::create(CUevent_flags::CU_EVENT_DEFAULT).expect("event");
        let e1 = event::create(CUevent_flags::CU_EVENT_DEFAULT).expect("event");
        for _ in 0..reps {
            // SAFETY: events and stream belong to the backend's context, bound on this thread.
            unsafe {
                event::record(e0, s).expect("record");
                f();
                event::record(e1, s).expect("record");
                event::synchronize(e1).expect("sync");
                v.push(event::elapsed(e0, e1).expect("elapsed") as f64);
            }
        }
        // SAFETY: created above.
        unsafe {
            let _ = event::destroy(e0);
            let _ = event::destroy(e1);
        }
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }

    /// Random device buffer (uniform, made on the device).
    fn randn_dev(g: &CudaBackend, n: usize, seed: u64, scale: f64) -> CudaBuf {
        let mut b = g.zeros(n);
        g.fill_random(&mut b, seed, scale as f32);
        b
    }

    fn kernel_bench(rep: &mut Report, g: &CudaBackend, g32: &CudaBackend) {
        // Ceiling: a large device-to-device copy, bytes read + written.
        let n = 1usize << 28; // 512 MiB of bf16
        let src = randn_dev(g, n, 1, 1.0);
        let mut dst = g.zeros(n);
        let ms = time_ms(g, 3, 20, || g.copy(&src, 0, &mut dst, 0, n));
        let copy_gbs = (2 * n * 2) as f64 / ms / 1e6;
        rep.metric("device-to-device copy bandwidth", copy_gbs, "GB/s", None);
        drop((src, dst));
        let frac = |r: &mut Report, name: &str, bytes: f64, ms: f64| {
            let gbs = bytes / ms / 1e6;
            r.metric(
                &format!("{name} bandwidth"),
                gbs,
                "GB/s",
                Some(("d2d copy", copy_gbs)),
            );
            r.metric(
                &format!("{name} fraction of copy bandwidth"),
                gbs / copy_gbs,
                "ratio",
                None,
            );
        };
        // RoPE on q of the 4M config (TP 8): 32K tokens × 4 heads × 128 in place, bf16 tables.
        {
            let (rows, heads, hd) = (32768 * 4, 4, 128);
            let mut x = randn_dev(g, rows * heads * hd, 2, 1.0);
            let cs = randn_dev(g, rows * hd / 2, 3, 1.0);
            let sn = randn_dev(g, rows * hd / 2, 4, 1.0);
            let ms = time_ms(g, 3, 20, || {
                g.rope_forward(&mut x, &cs, &sn, rows, heads, hd)
            });
            let bytes = (2 * rows * heads * hd * 2 + 2 * rows * hd / 2 * 2) as f64;
            frac(rep, "rope fwd (bf16)", bytes, ms);
        }
        {
            let (rows, dim) = (32768, 4096);
            let x = randn_dev(g, rows * dim, 5, 1.0);
            let w = randn_dev(g, dim, 6, 1.0);
            let mut o = g.zeros(rows * dim);
            let mut r = g.zeros(rows);
            let ms = time_ms(g, 3, 20, || {
                g.rmsnorm_forward(&x, &w, 1e-5, rows, dim, &mut o, &mut r)
            });
            frac(rep, "rmsnorm fwd (bf16)", (2 * rows * dim * 2) as f64, ms);
        }
        {
            let n = 32768 * 1792 * 4;
            let gt = randn_dev(g, n, 7, 1.0);
            let upb = randn_dev(g, n, 8, 1.0);
            let mut o = g.zeros(n);
            let ms = time_ms(g, 3, 20, || g.swiglu_forward(&gt, &upb, &mut o));
            frac(rep, "swiglu fwd (bf16)", (3 * n * 2) as f64, ms);
        }
        {
            // fp32 master weights and moments, fp32 gradient: 28 bytes per parameter.
            let n = 1usize << 27;
            let mut p = randn_dev(g32, n, 9, 1.0);
            let gr = randn_dev(g32, n, 10, 1.0);
            let mut m = randn_dev(g32, n, 11, 0.1);
            let mut v = g32.zeros(n);
            let hp = AdamW {
                lr: 1e-5,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step: 1,
                grad_scale: 1.0,
            };
            let ms = time_ms(g32, 3, 20, || g32.adamw(&mut p, &gr, &mut m, &mut v, &hp));
            frac(rep, "adamw (fp32 state)", (28 * n) as f64, ms);
            let ms = time_ms(g32, 2, 10, || {
                let mut t = [(&mut p, &gr, &mut m, &mut v)];
                g32.adamw_multi(&mut t, &[0.1], &hp, 1.0, 1.0);
            });
            // + one more read of the gradient for the norm.
            frac(
                rep,
                "adamw_multi with norm+clip (fp32 state)",
                (32 * n) as f64,
                ms,
            );
        }
        // GEMM TFLOP/s, bf16 in and out.
        for (m, n, k, name) in [
            (8192, 8192, 8192, "gemm 8192^3"),
            (32768, 1792, 4096, "gemm gate (32K x 1792 x 4096)"),
            (32768, 4096, 1792, "gemm down (32K x 4096 x 1792)"),
            (4096, 1792, 32768, "gemm dW gate (4096x1792, k=32K)"),
        ] {
            let a = randn_dev(g, m * k, 12, 1.0);
            let b = randn_dev(g, k * n, 13, 1.0);
            let mut c = g.zeros(m * n);
            let (ta, tb) = if name.contains("dW") {
                (true, false)
            } else {
                (false, true)
            };
            let ms = time_ms(g, 3, 20, || {
                g.gemm(&mut c, 0, &a, 0, &b, 0, m, n, k, ta, tb, false)
            });
            rep.metric(
                &format!("{name} (bf16)"),
                2.0 * (m * n * k) as f64 / ms / 1e9,
                "TFLOP/s",
                None,
            );
        }
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
        // Causal FLOPs (DESIGN.md): 6·N per token + 6·heads·head_dim·S per token.
        let (h, hd, nq, nkv, ffn) = (4096.0, 128.0, 4.0, 1.0, 1792.0);
        let layer_params = h * (nq + 2.0 * nkv) * hd + nq * hd * h + 3.0 * h * ffn;
        let tf = t as f64;
        let flops = tf * (6.0 * layer_params + 6.0 * nq * hd * tf);
        let mfu = flops / (ms / 1e3) / 989e12;
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

    /// One shape of `flash_checks`.
    struct AttnCase {
        label: &'static str,
        nq: usize,
        nkv: usize,
        d: usize,
        ql: usize,
        kl: usize,
        qp: i64,
        kp: i64,
        causal: bool,
    }

    /// The flash kernels (cuda/attention_flash.cu) against the CPU f64 reference, on the shapes
    /// the model and the ring produce: GQA 1, 4 and 8 query heads per KV head, head_dim 64 and
    /// 128, the ring's diagonal step (equal offsets), its full step (every key before every
    /// query) and partial overlaps (zigzag chunks), lengths that are not multiples of the 64-row
    /// tiles, rows that see no key and a block where no row sees any; outputs NaN-poisoned; the
    /// fast (atomic dQ) and deterministic backward; the deterministic one run twice and compared
    /// bit for bit.
    ///
    /// Tolerances (‖gpu − ref‖/‖ref‖). Inputs are drawn bf16-exact, so both sides see the same
    /// operands and only the kernel's own roundings count. Forward: scores are exact products
    /// summed in fp32 (~1e-6); P is rounded to bf16 before P·V (relative 2^-9 per element,
    /// independent signs: ~1e-3 over a row) and O to bf16 at the store (~1e-3): about 2e-3 in all,
    /// tolerance 1e-2 — a wrong index, mask or rescale gives errors of order 1. The log-sum-exp
    /// is fp32 from unrounded probabilities: tolerance 1e-4 (its own relative error is ~1e-6).
    /// Backward: dS = P∘(dP − rowsum(dO∘O)) and P are rounded to bf16 for the tensor cores, and
    /// dP − rowsum cancels where the two are close, which amplifies the relative error of dQ and
    /// dK (FlashAttention's own tests allow twice PyTorch's bf16 error); tolerance 3e-2, as the
    /// bf16 checks of the simple kernel. With fp32 storage the kernels round fp32 operands to
    /// bf16 first; the inputs here are bf16-exact, so the same bounds hold.
    fn flash_checks(rep: &mut Report, g16: &mut CudaBackend, g32: &mut CudaBackend, small: bool) {
        let long = if small { 130 } else { 1000 };
        let mid = if small { 96 } else { 300 };
        let case = |label, nq, nkv, d, ql, kl, qp, kp, causal| AttnCase {
            label,
            nq,
            nkv,
            d,
            ql,
            kl,
            qp,
            kp,
            causal,
        };
        let cases = [
            case("diagonal GQA 8 d128", 8, 1, 128, long, long, 0, 0, true),
            case(
                "ring full step GQA 4 d128",
                4,
                1,
                128,
                mid,
                mid,
                mid as i64,
                0,
                true,
            ),
            case(
                "zigzag partial overlap h32k8 d128",
                32,
                8,
                128,
                130,
                200,
                1000,
                900,
                true,
            ),
            case("diagonal GQA 1 d64 length 77", 4, 4, 64, 77, 77, 0, 0, true),
            case(
                "zigzag chunk pair GQA 4 d64",
                8,
                2,
                64,
                mid,
                mid / 2,
                3 * mid as i64,
                mid as i64,
                true,
            ),
            case(
                "rows 0..59 see no key GQA 4 d64",
                8,
                2,
                64,
                150,
                90,
                0,
                60,
                true,
            ),
            case("no row sees a key d128", 4, 2, 128, 64, 100, 0, 1000, true),
            case("non-causal d128", 4, 2, 128, 33, 47, 0, 0, false),
        ];
        for (i, cs) in cases.iter().enumerate() {
            let tag = g16.name();
            guarded(rep, &format!("{tag} flash {}", cs.label), || {
                flash_case(g16, cs)
            });
            // fp32 storage (bf16 scratch operands and conversions) on two of them.
            if i == 0 || i == 3 {
                let tag = g32.name();
                guarded(rep, &format!("{tag} flash {}", cs.label), || {
                    flash_case(g32, cs)
                });
            }
        }
    }

    fn flash_case(g: &mut CudaBackend, cs: &AttnCase) -> Vec<(String, f64, f64)> {
        let c = Cpu::new();
        let tag = format!("{} flash {}", g.name(), cs.label);
        let saved = g.attention_options();
        let fast = AttnOptions {
            flash: true,
            deterministic: false,
        };
        let det = AttnOptions {
            flash: true,
            deterministic: true,
        };
        g.set_attention_options(fast);
        let shape = AttnShape {
            q_len: cs.ql,
            kv_len: cs.kl,
            n_q_heads: cs.nq,
            n_kv_heads: cs.nkv,
            head_dim: cs.d,
            q_pos0: cs.qp,
            k_pos0: cs.kp,
            causal: cs.causal,
        };
        assert!(
            g.uses_flash(&shape),
            "{tag}: the flash kernels do not take {shape:?}"
        );
        let mut dr = Draw {
            stream: 0,
            bf16: true,
        };
        let (nq, nk) = (cs.ql * cs.nq * cs.d, cs.kl * cs.nkv * cs.d);
        // Queries a little larger than unit scale: peakier softmax rows.
        let (qv, kv, vv, gv) = (
            dr.normal(nq, 1.5),
            dr.normal(nk, 1.0),
            dr.normal(nk, 1.0),
            dr.normal(nq, 1.0),
        );
        let ((qc, qg), (kc, kg), (vc, vg), (gc, gg)) = (
            up(&c, g, &qv),
            up(&c, g, &kv),
            up(&c, g, &vv),
            up(&c, g, &gv),
        );
        let sc = 1.0 / (cs.d as f64).sqrt();
        let poisoned_f32 = |g: &CudaBackend, n: usize| {
            let mut b = g.zeros_dtype(n, DType::F32);
            g.fill(&mut b, f32::NAN);
            b
        };
        let (mut oc, mut og) = (c.zeros(nq), poisoned(g, nq));
        let (mut lc, mut lg) = (c.zeros(cs.nq * cs.ql), poisoned_f32(g, cs.nq * cs.ql));
        c.attention_forward(&qc, &kc, &vc, &shape, sc, &mut oc, &mut lc);
        g.attention_forward(&qg, &kg, &vg, &shape, sc, &mut og, &mut lg);
        let (lcv, lgv) = (c.download_f64(&lc), g.download_f64(&lg));
        let (ocv, ogv) = (c.download_f64(&oc), g.download_f64(&og));
        // lse: −∞ exactly where the reference has it; relative error over the finite ones.
        let mut bad_rows = 0usize;
        let (mut fin_g, mut fin_c) = (vec![], vec![]);
        for (idx, (&x, &y)) in lgv.iter().zip(&lcv).enumerate() {
            if y == f64::NEG_INFINITY {
                let (h, i) = (idx / cs.ql, idx % cs.ql);
                let row = &ogv[(i * cs.nq + h) * cs.d..][..cs.d];
                if x != f64::NEG_INFINITY || row.iter().any(|&o| o != 0.0) {
                    bad_rows += 1;
                }
            } else {
                fin_g.push(x);
                fin_c.push(y);
            }
        }
        let masked = lcv.iter().filter(|x| **x == f64::NEG_INFINITY).count();
        let mut rows = vec![
            (format!("{tag}: out"), rel_l2(&ogv, &ocv), 1e-2),
            (
                format!("{tag}: lse (finite rows)"),
                rel_l2(&fin_g, &fin_c),
                1e-4,
            ),
            (
                format!("{tag}: {masked} rows that see no key have out 0, lse -inf (count wrong)"),
                bad_rows as f64,
                0.0,
            ),
        ];
        // Backward from the GPU's forward results on both sides.
        let (oc2, lc2) = (c.upload_f64(&ogv), c.upload_f64(&lgv));
        let (mut dqc, mut dkc, mut dvc) = (c.zeros(nq), c.zeros(nk), c.zeros(nk));
        c.attention_backward(
            &qc, &kc, &vc, &oc2, &gc, &lc2, &shape, sc, &mut dqc, &mut dkc, &mut dvc,
        );
        let refs = [
            c.download_f64(&dqc),
            c.download_f64(&dkc),
            c.download_f64(&dvc),
        ];
        let run = |g: &mut CudaBackend, o: AttnOptions| -> [Vec<f64>; 3] {
            g.set_attention_options(o);
            let (mut dq, mut dk, mut dv) = (poisoned(g, nq), poisoned(g, nk), poisoned(g, nk));
            g.attention_backward(
                &qg, &kg, &vg, &og, &gg, &lg, &shape, sc, &mut dq, &mut dk, &mut dv,
            );
            [
                g.download_f64(&dq),
                g.download_f64(&dk),
                g.download_f64(&dv),
            ]
        };
        let f = run(g, fast);
        let d1 = run(g, det);
        let d2 = run(g, det);
        for (mode, got) in [("fast", &f), ("deterministic", &d1)] {
            for (k, name) in ["dq", "dk", "dv"].iter().enumerate() {
                rows.push((
                    format!("{tag}: {name} ({mode})"),
                    rel_l2(&got[k], &refs[k]),
                    3e-2,
                ));
            }
        }
        let differ: usize = (0..3)
            .map(|k| {
                d1[k]
                    .iter()
                    .zip(&d2[k])
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count()
            })
            .sum();
        rows.push((
            format!("{tag}: deterministic backward bitwise repeatable (elements differing)"),
            differ as f64,
            0.0,
        ));
        g.set_attention_options(saved);
        rows
    }

    /// Flash attention TFLOP/s at the TP-8 (4 query heads, 1 KV head) and full (32/8) shapes of
    /// Llama-3.1-8B, causal, head_dim 128, bf16: forward, backward and both, counted with
    /// FlashAttention's convention (benchmarks/benchmark_flash_attention.py: forward
    /// 4·S²·d·heads, halved when causal; backward 2.5× the forward), beside torch SDPA's flash
    /// and cuDNN backends from `peer` (bench/gpu/attn_torch.py, the same shapes and method).
    fn attn_bench(rep: &mut Report, g: &mut CudaBackend, lens: &[usize], peer: Option<&Value>) {
        let d = 128usize;
        for (nq, nkv) in [(4usize, 1usize), (32, 8)] {
            for &s in lens {
                let key = format!("S{s}_h{nq}k{nkv}");
                let r = catch_unwind(AssertUnwindSafe(|| {
                    attn_bench_shape(rep, g, s, nq, nkv, d, &key, peer)
                }));
                if let Err(p) = r {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into());
                    rep.fail(&format!("attention benchmark {key}"), &msg);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attn_bench_shape(
        rep: &mut Report,
        g: &mut CudaBackend,
        s: usize,
        nq: usize,
        nkv: usize,
        d: usize,
        key: &str,
        peer: Option<&Value>,
    ) {
        let saved = g.attention_options();
        let shape = AttnShape {
            q_len: s,
            kv_len: s,
            n_q_heads: nq,
            n_kv_heads: nkv,
            head_dim: d,
            q_pos0: 0,
            k_pos0: 0,
            causal: true,
        };
        let sc = 1.0 / (d as f64).sqrt();
        let fwd_flops = 4.0 * (s as f64).powi(2) * d as f64 * nq as f64 / 2.0;
        let mut times = vec![];
        for deterministic in [false, true] {
            // The deterministic backward only at the middle lengths (time).
            if deterministic && s > 32768 {
                continue;
            }
            g.set_attention_options(AttnOptions {
                flash: true,
                deterministic,
            });
            let g: &CudaBackend = g;
            let q = randn_dev(g, s * nq * d, 31, 1.0);
            let k = randn_dev(g, s * nkv * d, 32, 1.0);
            let v = randn_dev(g, s * nkv * d, 33, 1.0);
            let dout = randn_dev(g, s * nq * d, 34, 1.0);
            let mut out = g.zeros(s * nq * d);
            let mut lse = g.zeros_dtype(nq * s, DType::F32);
            let (mut dq, mut dk, mut dv) = (
                g.zeros(s * nq * d),
                g.zeros(s * nkv * d),
                g.zeros(s * nkv * d),
            );
            let t0 = Instant::now();
            g.attention_forward(&q, &k, &v, &shape, sc, &mut out, &mut lse);
            g.attention_backward(
                &q, &k, &v, &out, &dout, &lse, &shape, sc, &mut dq, &mut dk, &mut dv,
            );
            g.synchronize();
            let once = t0.elapsed().as_secs_f64();
            let reps = ((1.5 / once) as usize).clamp(1, 10);
            // Every output finite (NaN/Inf anywhere makes Σx² non-finite).
            let finite = [&out, &dq, &dk, &dv]
                .iter()
                .all(|b| g.sum_squares(b).is_finite());
            rep.check(
                &format!(
                    "attention benchmark {key}{} outputs finite",
                    if deterministic { " deterministic" } else { "" }
                ),
                if finite { 0.0 } else { 1.0 },
                0.0,
            );
            if deterministic {
                let ms = time_ms(g, 0, reps, || {
                    g.attention_backward(
                        &q, &k, &v, &out, &dout, &lse, &shape, sc, &mut dq, &mut dk, &mut dv,
                    )
                });
                times.push(("attn_bwd_deterministic_causal", ms, 2.5 * fwd_flops));
                continue;
            }
            let ms_f = time_ms(g, 1, reps, || {
                g.attention_forward(&q, &k, &v, &shape, sc, &mut out, &mut lse)
            });
            let ms_b = time_ms(g, 1, reps, || {
                g.attention_backward(
                    &q, &k, &v, &out, &dout, &lse, &shape, sc, &mut dq, &mut dk, &mut dv,
                )
            });
            let ms_fb = time_ms(g, 0, reps, || {
                g.attention_forward(&q, &k, &v, &shape, sc, &mut out, &mut lse);
                g.attention_backward(
                    &q, &k, &v, &out, &dout, &lse, &shape, sc, &mut dq, &mut dk, &mut dv,
                );
            });
            times.push(("attn_fwd_causal", ms_f, fwd_flops));
            times.push(("attn_bwd_causal", ms_b, 2.5 * fwd_flops));
            times.push(("attn_fwd_bwd_causal", ms_fb, 3.5 * fwd_flops));
        }
        g.set_attention_options(saved);
        for (what, ms, flops) in times {
            let name = format!("{what}_{key}");
            let tf = flops / (ms / 1e3) / 1e12;
            let pv = |b: &str| {
                peer.and_then(|p| p.get("rows"))
                    .and_then(|r| r.get(&name))
                    .and_then(|r| r.get(b))
                    .and_then(Value::as_f64)
            };
            let (fl, cu) = (pv("sdpa_flash"), pv("sdpa_cudnn"));
            rep.metric_with(
                &name,
                tf,
                "TFLOP/s",
                fl.map(|x| ("sdpa_flash", x)),
                json!({"ms": ms, "peer2": "sdpa_cudnn", "peer2_value": cu}),
            );
            if let Some(x) = fl {
                rep.metric(&format!("{name} / sdpa_flash"), tf / x, "ratio", None);
            }
            if let Some(x) = cu {
                rep.metric(&format!("{name} / sdpa_cudnn"), tf / x, "ratio", None);
            }
            // DESIGN.md: a rate above the dense peak is a bug (of the timing or the count).
            if tf > 989.0 {
                rep.fail(
                    &name,
                    &format!("{tf:.0} TFLOP/s is above the 989 TFLOP/s peak"),
                );
            }
        }
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
    /// inside the CP ring, every collective a local copy of its real size (`LoopbackComm`, still
    /// staged through host memory as the MPI path is). One forward+backward per layer count;
    /// the optimizer is left out (ZeRO-1 over DP × CP holds 1/32 of the moments per rank, a small
    /// elementwise pass). With two layer counts the step time and peak memory are extrapolated
    /// linearly to 32 layers (the layers are identical; embedding, head and loss are the
    /// intercept). MFU (DESIGN.md): per token 6·N + 6·heads·head_dim·S·layers, N this rank's
    /// parameters, S = 4,194,304, against 989 TFLOP/s.
    fn rank4m(rep: &mut Report, layers: &[usize]) -> Result<()> {
        use crate::data::loader::zigzag_chunks;
        use crate::parallel::loopback::loopback_topology;
        use crate::parallel::topology::Layout;
        let (seq, tp, cp) = (4_194_304usize, 8usize, 16usize);
        let t = seq / cp;
        let layout = Layout { tp, cp, dp: 1 };
        let g = CudaBackend::new(0, DType::Bf16)?;
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
            g.synchronize();
            g.reset_peak();
            let base = g.bytes_in_use();
            let params = ParamStore::init_random_shard(&g, &cfg, 1, topo.shard());
            let n_params: usize = params.bufs.iter().map(|b| g.len(b)).sum();
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
                g.synchronize();
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
            let t0 = Instant::now();
            let loss = pass();
            let secs = t0.elapsed().as_secs_f64();
            let peak = (g.peak_bytes() - base.min(g.peak_bytes())) as f64 / (1u64 << 30) as f64;
            let flops =
                t as f64 * (6.0 * n_params as f64 + 6.0 * 4.0 * 128.0 * seq as f64 * n as f64);
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
                flops / secs / 989e12,
                "ratio",
                None,
            );
            points.push((n, secs, peak, n_params, flops));
        }
        if let [(n1, t1, p1, np1, f1), (n2, t2, p2, np2, f2), ..] = points[..]
            && n2 != n1
        {
            let full = 32.0;
            let per = |a: f64, b: f64| (b - a) / (n2 as f64 - n1 as f64);
            let at32 = |a: f64, b: f64| a + (full - n1 as f64) * per(a, b);
            let secs = at32(t1, t2);
            let peak = at32(p1, p2);
            let flops = at32(f1, f2);
            let np = at32(np1 as f64, np2 as f64);
            let from = format!("extrapolated from {n1} and {n2} layers");
            rep.metric(&format!("rank4m_step: 32 layers, {from}"), secs, "s", None);
            rep.metric(
                &format!("rank4m_peak: 32 layers, {from}"),
                peak,
                "GiB",
                None,
            );
            rep.metric(
                &format!("rank4m_mfu: 32 layers, {from} (N = {np:.3e} parameters per rank)"),
                flops / secs / 989e12,
                "ratio",
                None,
            );
        }
        Ok(())
    }
}
