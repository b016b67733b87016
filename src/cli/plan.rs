//! `ultralong plan --config RUN.toml --gpus N [--gpu h100-80g|h200-141g] [--mfu 0.4] [--json]`:
//! per-rank memory, step time and GPU-hours of a run for every parallel layout of N GPUs, and
//! the layout to use (`crate::plan` holds the model; this file reads the inputs and prints).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::flops;
use crate::model::config::{ModelConfig, RopeScaling};
use crate::parallel::topology::Layout;
use crate::plan::{
    self, Candidate, GIB, Hardware, Memory, Place, Prefer, RunShape, Search, StepTime, Target,
};
use crate::train::config::RunConfig;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// TOML run config (see configs/).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value, e.g. `--set train.seq_len=2097152` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The model's config.json (default: `<model.path>/config.json`), e.g.
    /// configs/llama-3.1-8b-instruct.json when the model is not on this machine.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// GPUs (ranks) of the job: tp × cp × dp.
    #[arg(long)]
    pub gpus: usize,
    /// h100-80g or h200-141g.
    #[arg(long, default_value = "h100-80g")]
    pub gpu: String,
    /// Model FLOP utilisation of the compute (docs/ARCHITECTURE.md accounting, dense bf16 peak).
    #[arg(long, default_value_t = 0.4)]
    pub mfu: f64,
    /// Compute time from measured kernel rates instead of `--mfu`: a section of bench/rates.toml
    /// (e.g. h200). The rank's GEMM and attention work over the measured TFLOP/s; elementwise
    /// kernels are not in it.
    #[arg(long)]
    pub rates: Option<String>,
    /// Print one JSON object instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// Memory model of: cuda (the GPU run), cpu-bench (`ultralong bench train`), cpu-train.
    #[arg(long, default_value = "cuda")]
    pub backend: String,
    /// Prefer this tensor-parallel size (default: the config's parallel.tp, when it sets one).
    #[arg(long)]
    pub tp: Option<usize>,
    /// Prefer this context-parallel size (default: the config's parallel.cp, when it sets one).
    #[arg(long)]
    pub cp: Option<usize>,
    /// NVLink bandwidth per GPU per direction achieved by collectives (GB/s).
    #[arg(long, default_value_t = 450.0)]
    pub nvlink_gbs: f64,
    /// Inter-node bandwidth per GPU per direction (GB/s): 8 × 400 Gb/s InfiniBand per node.
    #[arg(long, default_value_t = 50.0)]
    pub ib_gbs: f64,
    /// Device memory set aside for the CUDA runtime, libraries and NCCL (GiB).
    #[arg(long, default_value_t = 3.0)]
    pub reserve_gib: f64,
}

/// The model config the plan uses: `--model-config`, else `<model.path>/config.json`; the run
/// config's `[model.rope_scaling]` applied as training applies it.
fn model_config(a: &PlanArgs, run: &RunConfig) -> Result<(ModelConfig, PathBuf)> {
    let path = match &a.model_config {
        Some(p) => p.clone(),
        None => {
            let p = run.model.path.join("config.json");
            if !p.exists() {
                bail!(
                    "no model config: {} does not exist (model.path of {}); pass --model-config FILE (e.g. configs/llama-3.1-8b-instruct.json)",
                    p.display(),
                    a.config.display()
                );
            }
            p
        }
    };
    let mut cfg = ModelConfig::from_file(&path)?;
    if let Some(o) = &run.model.rope_scaling {
        cfg = cfg.with_rope_override(o, &a.config.display().to_string())?;
    }
    Ok((cfg, path))
}

/// The tp and/or cp the config asks for: its `[parallel]` keys, `--set parallel.*`, `--tp`/`--cp`
/// (a key left at its default is no preference).
fn preferred(a: &PlanArgs, run: &RunConfig) -> Result<Prefer> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("cannot read run config {}", a.config.display()))?;
    let doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: invalid TOML", a.config.display()))?;
    let named = |key: &str| {
        doc.get("parallel")
            .and_then(|p| p.as_table())
            .is_some_and(|p| p.contains_key(key))
            || a.set
                .iter()
                .any(|s| s.trim_start().starts_with(&format!("parallel.{key}")))
    };
    Ok(Prefer {
        tp: a.tp.or(named("tp").then_some(run.parallel.tp)),
        cp: a.cp.or(named("cp").then_some(run.parallel.cp)),
    })
}

fn gib(b: u64) -> f64 {
    b as f64 / GIB
}

fn hms(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.2} s")
    } else if s < 3600.0 {
        format!("{:.1} min", s / 60.0)
    } else if s < 86400.0 * 2.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} days", s / 86400.0)
    }
}

fn rope_text(cfg: &ModelConfig) -> String {
    match &cfg.rope_scaling {
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            ..
        } => format!(
            "yarn factor {factor} (original {original_max_position_embeddings}, beta_fast {beta_fast}, beta_slow {beta_slow})"
        ),
        RopeScaling::Llama3 { factor, .. } => format!("llama3 factor {factor}"),
        RopeScaling::Linear { factor } => format!("linear factor {factor}"),
        RopeScaling::Default => "default".into(),
    }
}

pub fn run(a: PlanArgs) -> Result<()> {
    let target = Target::parse(&a.backend)?;
    if a.gpus == 0 {
        bail!("--gpus must be at least 1");
    }
    if !(a.mfu > 0.0 && a.mfu <= 1.0) {
        bail!("--mfu {} must be in (0, 1]", a.mfu);
    }
    let runcfg = RunConfig::load(&a.config, &a.set)?;
    let (cfg, cfg_path) = model_config(&a, &runcfg)?;
    let mut hw = Hardware::parse(&a.gpu)?;
    hw.nvlink_bw = a.nvlink_gbs * 1e9;
    hw.ib_bw = a.ib_gbs * 1e9;
    hw.reserve = (a.reserve_gib * GIB) as u64;
    if let Some(key) = &a.rates {
        hw.rates = Some(crate::rates::device(None, key).context("--rates")?);
    }
    let run = RunShape {
        seq_len: runcfg.train.seq_len,
        global_batch: runcfg.sequences_per_step(),
        steps: runcfg.train.steps,
        recompute: runcfg.train.recompute,
        ce_chunk: runcfg.train.ce_chunk,
    };
    let prefer = preferred(&a, &runcfg)?;
    if target != Target::Cuda {
        return cpu_memory(&a, target, &cfg, &cfg_path, &run, &runcfg);
    }
    let s = plan::search(&cfg, &run, a.gpus, &hw, a.mfu, target, prefer);
    let Some(ci) = s.chosen else {
        return refuse(&a, &cfg, &run, &hw, &s);
    };
    let c = &s.candidates[ci];
    let mem = c
        .memory
        .as_ref()
        .expect("valid candidates carry their memory");
    let step = c
        .step
        .as_ref()
        .expect("valid candidates carry their step time");
    let tokens_budget = run.steps as f64 * run.tokens_per_step();
    let budget_s = run.steps as f64 * step.step_s;
    let per_1b_s = 1e9 / run.tokens_per_step() * step.step_s;
    let gpus = a.gpus as f64;
    let assumptions = assumptions(&a, &hw);
    if a.json {
        let layouts: Vec<serde_json::Value> = s.candidates.iter().map(candidate_json).collect();
        let out = json!({
            "config": a.config,
            "model_config": cfg_path,
            "target": target,
            "gpus": a.gpus,
            "gpu": a.gpu,
            "hardware": hw,
            "mfu": a.mfu,
            "model": {
                "n_params": cfg.n_params(),
                "matmul_params": flops::matmul_params(&cfg),
                "layers": cfg.num_hidden_layers,
                "hidden": cfg.hidden_size,
                "heads": cfg.num_attention_heads,
                "kv_heads": cfg.num_key_value_heads,
                "head_dim": cfg.head_dim,
                "ffn": cfg.intermediate_size,
                "vocab": cfg.vocab_size,
                "rope": rope_text(&cfg),
            },
            "run": run,
            "flops_per_token": {
                "model": flops::model_flops_per_token(&cfg, run.seq_len),
                "recompute_extra": if run.recompute { flops::recompute_flops_per_token(&cfg, run.seq_len) } else { 0.0 },
            },
            "layouts": layouts,
            "chosen": {
                "layout": c.layout,
                "reason": s.reason,
                "memory": mem,
                "memory_summary": memory_summary(mem, &hw),
                "step": step,
                "budget": {
                    "tokens": tokens_budget,
                    "steps": run.steps,
                    "wall_s": budget_s,
                    "gpu_hours": budget_s * gpus / 3600.0,
                },
                "per_1b_tokens": {
                    "steps": 1e9 / run.tokens_per_step(),
                    "wall_s": per_1b_s,
                    "gpu_hours": per_1b_s * gpus / 3600.0,
                },
            },
            "assumptions": assumptions,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }

    // Readable form.
    println!("ultralong plan: {}", a.config.display());
    println!(
        "model     {} — {:.3e} parameters ({:.3e} in matrix products), {} layers, hidden {}, {} heads / {} KV, ffn {}, vocab {}; rope {}",
        cfg_path.display(),
        cfg.n_params() as f64,
        flops::matmul_params(&cfg) as f64,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
        rope_text(&cfg)
    );
    println!(
        "run       seq_len {}, global batch {} sequences, {} steps = {:.3e} tokens; recompute {}, ce_chunk {}",
        run.seq_len,
        run.global_batch,
        run.steps,
        tokens_budget,
        if run.recompute { "on" } else { "off" },
        run.ce_chunk
    );
    let compute_at = match (&hw.rates, &a.rates) {
        (Some(r), Some(key)) => format!(
            "compute at measured kernel rates (bench/rates.toml [{key}]: GEMM {:.0}, attention \
             fwd {:.0} / bwd {:.0} TFLOP/s at the longest length)",
            r.gemm_tflops,
            r.attention_tflops(false, f64::MAX),
            r.attention_tflops(true, f64::MAX)
        ),
        _ => format!("MFU {:.2} of the compute", a.mfu),
    };
    println!(
        "hardware  {} × {} ({:.1} GiB each, {:.0} TFLOP/s dense bf16), {compute_at}",
        a.gpus,
        hw.name,
        gib(hw.mem_bytes),
        hw.peak_flops / 1e12,
    );
    let fpt = flops::model_flops_per_token(&cfg, run.seq_len);
    let extra = if run.recompute {
        flops::recompute_flops_per_token(&cfg, run.seq_len)
    } else {
        0.0
    };
    println!(
        "FLOPs     per token 6N + 6qSL = {fpt:.3e} (model, what MFU counts){}",
        if run.recompute {
            format!(
                "; the hardware does {:.3e} with full recompute (+{:.1}%)",
                fpt + extra,
                100.0 * extra / fpt
            )
        } else {
            String::new()
        }
    );
    println!();
    println!(
        "layouts of {} GPUs (tp × cp × dp) that the layout rules allow, fastest fitting first:",
        a.gpus
    );
    println!(
        "  {:>3} {:>4} {:>4}  {:>9}  {:>4}  {:>10}  {:>10}  {:>10}  ring",
        "tp", "cp", "dp", "peak GiB", "fits", "step", "tokens/s", "MFU"
    );
    for (i, c) in s.candidates.iter().enumerate() {
        let Some(st) = &c.step else { continue };
        let ring = match &st.ring {
            None => "-".to_string(),
            Some(r) => format!(
                "{} {} (comm/compute {:.3})",
                r.link,
                if r.hides { "hides" } else { "EXPOSED" },
                r.ratio
            ),
        };
        println!(
            "  {:>3} {:>4} {:>4}  {:>9.1}  {:>4}  {:>10}  {:>10.0}  {:>10.3}  {}{}",
            c.layout.tp,
            c.layout.cp,
            c.layout.dp,
            gib(c.peak_bytes),
            if c.fits { "yes" } else { "no" },
            hms(st.step_s),
            st.tokens_per_s,
            st.mfu,
            ring,
            if i == ci { "   <- chosen" } else { "" }
        );
    }
    let invalid: Vec<&Candidate> = s
        .candidates
        .iter()
        .filter(|c| c.problem.is_some())
        .collect();
    if !invalid.is_empty() {
        println!(
            "  ({} other factorisations break the layout rules, e.g. tp {} × cp {} × dp {}: {})",
            invalid.len(),
            invalid[0].layout.tp,
            invalid[0].layout.cp,
            invalid[0].layout.dp,
            invalid[0].problem.as_deref().unwrap_or("")
        );
    }
    println!();
    let Layout { tp, cp, dp } = c.layout;
    println!(
        "chosen    {} GPUs = tp {tp} × cp {cp} × dp {dp} — {}",
        a.gpus, s.reason
    );
    print_memory(mem, Some(&hw));
    println!();
    print_step(step);
    println!();
    println!(
        "budget    configured: {} steps × {} × {} = {:.3e} tokens: {} wall, {:.0} GPU-hours",
        run.steps,
        run.global_batch,
        run.seq_len,
        tokens_budget,
        hms(budget_s),
        budget_s * gpus / 3600.0
    );
    println!(
        "          per 1B tokens: {:.1} steps, {} wall, {:.0} GPU-hours",
        1e9 / run.tokens_per_step(),
        hms(per_1b_s),
        per_1b_s * gpus / 3600.0
    );
    println!();
    println!("assumptions:");
    for x in &assumptions {
        println!("  - {x}");
    }
    Ok(())
}

fn assumptions(a: &PlanArgs, hw: &Hardware) -> Vec<String> {
    vec![
        format!(
            "compute at MFU {:.2} of {:.0} TFLOP/s dense bf16 (docs/RECIPE.md §7), counting model FLOPs 6N + 6qSL per token; full recompute's second forward is not counted by MFU (the hardware FLOP utilisation is reported)",
            a.mfu,
            hw.peak_flops / 1e12
        ),
        format!(
            "NVLink {:.0} GB/s per GPU per direction for TP collectives and rings within a node ({} GPUs per node); inter-node {:.0} GB/s per GPU (8 × 400 Gb/s InfiniBand per node); {:.0} µs / {:.0} µs per transfer",
            hw.nvlink_bw / 1e9,
            hw.gpus_per_node,
            hw.ib_bw / 1e9,
            hw.alpha_nvlink * 1e6,
            hw.alpha_ib * 1e6
        ),
        "TP collectives are blocking (not overlapped: parallel/tensor.rs); the ring overlaps each transfer with the step's attention (exposed only where the transfer is longer); the last dK/dV transfer and the ZeRO reduce-scatter/all-gather are exposed".into(),
        "a ring step's attention runs at the same MFU as the whole step; its backward counts 2× the forward's FLOPs".into(),
        format!(
            "{:.1} GiB per GPU reserved for the CUDA context, cuBLASLt workspaces, NCCL buffers and allocator slack; dK/dV accumulators and ring-step partial results in fp32",
            gib(hw.reserve)
        ),
        "the peak includes the checkpoint save as the trainer does it today (ShardedAdamW::moments gathers m and v of the whole TP shard on the device)".into(),
    ]
}

fn candidate_json(c: &Candidate) -> serde_json::Value {
    json!({
        "tp": c.layout.tp,
        "cp": c.layout.cp,
        "dp": c.layout.dp,
        "problem": c.problem,
        "peak_bytes": c.peak_bytes,
        "peak_gib": gib(c.peak_bytes),
        "fits": c.fits,
        "step_s": c.step.as_ref().map(|s| s.step_s),
        "tokens_per_s": c.step.as_ref().map(|s| s.tokens_per_s),
        "ring_hides": c.step.as_ref().and_then(|s| s.ring.as_ref()).map(|r| r.hides),
    })
}

fn memory_summary(m: &Memory, hw: &Hardware) -> serde_json::Value {
    let groups: serde_json::Map<String, serde_json::Value> = m
        .groups()
        .into_iter()
        .map(|(g, b)| (g.to_string(), json!(b)))
        .collect();
    json!({
        "groups_bytes": groups,
        "device_resident_gib": gib(m.device_resident),
        "device_train_peak_gib": gib(m.device_train_peak),
        "device_peak_gib": gib(m.device_peak),
        "device_peak_phase": m.device_peak_phase,
        "capacity_gib": gib(hw.mem_bytes),
        "headroom_gib": (hw.mem_bytes as f64 - m.device_peak as f64) / GIB,
        "host_peak_gib": gib(m.host_peak),
    })
}

fn print_memory(m: &Memory, hw: Option<&Hardware>) {
    let Layout { tp, cp, dp } = m.layout;
    println!(
        "memory    per rank (tp {tp}, cp {cp}, dp {dp}): t = S/cp = {} local tokens, ts = t/tp = {} rows; {} parameters in the TP shard, {} in the optimizer slice; bytes/element: act {}, weights {}, grads {}, master {}, Adam {}",
        m.t,
        m.ts,
        m.params_rank,
        m.opt_slice,
        m.dtypes.act,
        m.dtypes.weight,
        m.dtypes.grad,
        m.dtypes.master,
        m.dtypes.moment
    );
    println!(
        "  {:<18} {:<52} {:<44} {:>4} {:>11}",
        "group", "buffer", "shape", "B/el", "GiB"
    );
    for b in &m.buffers {
        let place = match (b.place, b.phase) {
            (Place::Device, None) => String::new(),
            (Place::Device, Some(p)) => format!("  [during {p}]"),
            (Place::Host, None) => "  [host]".into(),
            (Place::Host, Some(p)) => format!("  [host, during {p}]"),
        };
        println!(
            "  {:<18} {:<52} {:<44} {:>4} {:>11.4}{}",
            b.group,
            b.name,
            b.shape,
            b.elem_bytes,
            gib(b.bytes),
            place
        );
    }
    println!("  by group (resident, device):");
    for (g, n) in m.groups() {
        println!("    {g:<20} {:>9.2} GiB", gib(n));
    }
    for (p, n) in m.phases(Place::Device) {
        println!("    + during {p:<22} {:>9.2} GiB", gib(n));
    }
    println!(
        "  device: resident {:.2} GiB, training peak {:.2} GiB, peak {:.2} GiB ({})",
        gib(m.device_resident),
        gib(m.device_train_peak),
        gib(m.device_peak),
        m.device_peak_phase.unwrap_or("steady")
    );
    if let Some(hw) = hw {
        println!(
            "  capacity {:.2} GiB: headroom {:.2} GiB",
            gib(hw.mem_bytes),
            (hw.mem_bytes as f64 - m.device_peak as f64) / GIB
        );
    }
    println!(
        "  host (beyond the device's): peak {:.2} GiB",
        gib(m.host_peak)
    );
}

fn print_step(st: &StepTime) {
    println!(
        "step      {} per step ({} sequence{} per rank, one at a time): compute {} + TP collectives {} + CE statistics {} + ring exposed {} + ZeRO {} + Adam {}",
        hms(st.step_s),
        st.seqs_per_rank,
        if st.seqs_per_rank == 1 { "" } else { "s" },
        hms(st.compute_s),
        hms(st.tp_comm_s),
        hms(st.ce_stats_s),
        hms(st.ring_exposed_s),
        hms(st.zero_comm_s),
        hms(st.adam_s)
    );
    println!(
        "          {:.3e} model FLOPs / step ({:.3e} on the hardware); {:.0} tokens/s; end-to-end MFU {:.3}, hardware FLOP utilisation of the compute {:.3}",
        st.model_flops, st.hardware_flops, st.tokens_per_s, st.mfu, st.hfu_compute
    );
    if let Some(r) = &st.ring {
        println!(
            "ring      {} steps per layer over {} at {:.0} GB/s: forward {:.1} MB K+V per step in {:.2} ms vs {:.2} ms attention; backward {:.1} MB K+V + dK/dV in {:.2} ms vs {:.2} ms: {} (comm/compute {:.3})",
            r.steps_per_layer,
            r.link,
            r.bandwidth / 1e9,
            r.fwd_bytes / 1e6,
            r.fwd_comm_s * 1e3,
            r.fwd_compute_s * 1e3,
            r.bwd_bytes / 1e6,
            r.bwd_comm_s * 1e3,
            r.bwd_compute_s * 1e3,
            if r.hides {
                "the ring hides behind the attention"
            } else {
                "the ring can NOT hide"
            },
            r.ratio
        );
    }
}

/// No layout fits: say by how much the closest one misses, and how many GPUs would do.
fn refuse(
    a: &PlanArgs,
    cfg: &ModelConfig,
    run: &RunShape,
    hw: &Hardware,
    s: &Search,
) -> Result<()> {
    let Some(best) = s.smallest() else {
        let why = s
            .candidates
            .first()
            .and_then(|c| c.problem.clone())
            .unwrap_or_default();
        bail!(
            "no layout of {} GPUs satisfies the layout rules for seq_len {} and a global batch of {} (e.g. {why})",
            a.gpus,
            run.seq_len,
            run.global_batch
        );
    };
    let hint = match plan::min_gpus(cfg, run, hw, a.mfu, Target::Cuda) {
        Some(g) => format!("; the smallest power-of-two GPU count that fits is {g}"),
        None => String::new(),
    };
    let Layout { tp, cp, dp } = best.layout;
    bail!(
        "no layout of {} × {} fits {}: the smallest per-rank peak, tp {tp} × cp {cp} × dp {dp}, is {:.1} GiB against {:.1} GiB — it exceeds the memory by {:.1} GiB{hint}",
        a.gpus,
        hw.name,
        a.config.display(),
        gib(best.peak_bytes),
        gib(hw.mem_bytes),
        (best.peak_bytes as f64 - hw.mem_bytes as f64) / GIB
    )
}

/// `--backend cpu-bench | cpu-train`: the memory of the config's own layout, f32 everywhere.
fn cpu_memory(
    a: &PlanArgs,
    target: Target,
    cfg: &ModelConfig,
    cfg_path: &Path,
    run: &RunShape,
    runcfg: &RunConfig,
) -> Result<()> {
    let tp = a.tp.unwrap_or(runcfg.parallel.tp);
    let cp = a.cp.unwrap_or(runcfg.parallel.cp);
    let layout = Layout::of_world(a.gpus, tp, cp)?;
    if target == Target::CpuBench && layout.world() != 1 {
        bail!(
            "--backend cpu-bench describes `ultralong bench train`: one rank (--gpus 1, tp 1, cp 1)"
        );
    }
    if let Some(p) = plan::layout_problem(cfg, run, layout) {
        bail!("tp {tp} × cp {cp} × dp {}: {p}", layout.dp);
    }
    let m = plan::memory(
        &plan::RankShape {
            cfg,
            layout,
            seq_len: run.seq_len,
            recompute: run.recompute,
            ce_chunk: run.ce_chunk,
        },
        target,
        0,
    );
    if a.json {
        let out = json!({
            "config": a.config,
            "model_config": cfg_path,
            "target": target,
            "gpus": a.gpus,
            "run": run,
            "memory": m,
            "predicted_peak_bytes": m.device_peak,
            "predicted_train_peak_bytes": m.device_train_peak,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "ultralong plan ({}): {} with {}",
            target.name(),
            a.config.display(),
            cfg_path.display()
        );
        print_memory(&m, None);
    }
    Ok(())
}
