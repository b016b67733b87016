//! `ultralong plan` and the shipped configs: every config parses and carries the paper's values;
//! plan finds the paper's layouts for 1M/2M/4M on 80 GB H100s and refuses too few GPUs, saying by
//! how much; the memory model predicts the CPU backend's measured peaks (`bench train`) and
//! `Workspace::for_rank`'s buffers byte for byte; the debug configs run.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use serde_json::Value;
use ultralong::backend::Backend;
use ultralong::backend::cpu::CpuBackend;
use ultralong::model::arch::ArchConfig;
use ultralong::model::config::{ModelConfig, RopeScaling};
use ultralong::model::llama::Workspace;
use ultralong::model::params::ParamStore;
use ultralong::parallel::any::AnyComm;
use ultralong::parallel::comm::SelfComm;
use ultralong::parallel::topology::{Layout, Topology};
use ultralong::plan::{self, RankShape, Target, WORKSPACE_GROUPS};
use ultralong::train::config::RunConfig;
use ultralong::train::optim::ShardedAdamW;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const LLAMA: &str = "configs/llama-3.1-8b-instruct.json";

fn plan_json(args: &[&str]) -> Value {
    let out = ok(&repo(), &[&["plan", "--json"], args].concat());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("plan --json: {e}: {out}"))
}

fn load(rel: &str) -> RunConfig {
    RunConfig::load(&repo().join(rel), &[]).unwrap_or_else(|e| panic!("{rel}: {e:#}"))
}

#[test]
fn every_config_parses_and_carries_the_papers_values() {
    // Every run config in configs/ (RunConfig::load validates the keys and values; it does not
    // open the data or model paths, which do not exist on this machine).
    let mut n = 0;
    for dir in ["configs", "configs/debug", "configs/demo"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            match p.extension().and_then(|x| x.to_str()) {
                Some("toml") => {
                    RunConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{e:#}"));
                    n += 1;
                }
                Some("json") => {
                    // A Llama or the HSA model (configs/demo/recall-hsa.json).
                    ArchConfig::from_file(&p).unwrap_or_else(|e| panic!("{e:#}"));
                }
                _ => {}
            }
        }
    }
    assert!(n >= 11, "{n} run configs");

    // The real Llama-3.1-8B-Instruct config.json.
    let m = ModelConfig::from_file(&repo().join(LLAMA)).unwrap();
    assert_eq!(
        (m.vocab_size, m.hidden_size, m.intermediate_size),
        (128256, 4096, 14336)
    );
    assert_eq!(
        (
            m.num_hidden_layers,
            m.num_attention_heads,
            m.num_key_value_heads,
            m.head_dim
        ),
        (32, 32, 8, 128)
    );
    assert_eq!((m.rope_theta, m.rms_norm_eps), (500000.0, 1e-5));
    assert_eq!(m.max_position_embeddings, 131072);
    assert!(!m.tie_word_embeddings);
    assert_eq!(
        m.rope_scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0
        }
    );

    // CPT: RECIPE.md §1 Stage 1 and YaRN.
    for (name, seq, factor) in [
        ("1m", 1 << 20, 128.0),
        ("2m", 1 << 21, 256.0),
        ("4m", 1 << 22, 512.0),
    ] {
        let c = load(&format!("configs/ultralong-{name}.toml"));
        assert_eq!(c.train.seq_len, seq);
        assert_eq!(c.optim.lr, 3e-5);
        assert!(c.train.recompute);
        assert_eq!(c.parallel.tp, 8);
        assert_eq!(
            c.model.path,
            PathBuf::from("models/Llama-3.1-8B-Instruct"),
            "{name}"
        );
        let r = c.model.rope_scaling.as_ref().unwrap();
        assert_eq!(r.rope_type, "yarn");
        assert_eq!(r.factor, Some(factor));
        assert_eq!(r.original_max_position_embeddings, Some(8192.0));
        assert_eq!((r.beta_fast, r.beta_slow), (Some(4.0), Some(1.0)));
        assert_eq!(r.max_position_embeddings, seq);
        assert_eq!(factor * 8192.0, seq as f64);
        let tokens = c.train.steps as f64 * c.sequences_per_step() as f64 * seq as f64;
        assert!(
            (0.95e9..1.3e9).contains(&tokens),
            "{name}: {tokens:e} tokens, not ~1B"
        );
        eprintln!(
            "ultralong-{name}: {} steps × {} × {seq} = {tokens:.3e} tokens, tp {} cp {}",
            c.train.steps,
            c.sequences_per_step(),
            c.parallel.tp,
            c.parallel.cp
        );
    }
    let c4 = load("configs/ultralong-4m.toml");
    assert_eq!((c4.train.steps, c4.sequences_per_step()), (150, 2));
    assert_eq!(c4.parallel.cp, 16);
    assert_eq!(load("configs/ultralong-1m.toml").parallel.cp, 4);

    // SFT: RECIPE.md §1 Stage 2.
    for (name, steps) in [("1m", 480), ("2m", 140), ("4m", 150)] {
        let c = load(&format!("configs/sft-{name}.toml"));
        assert_eq!(c.train.steps, steps);
        assert_eq!(c.sequences_per_step(), 128);
        assert_eq!(c.optim.lr, 5e-6);
        assert_eq!(c.train.seq_len, 8192);
        assert_eq!(c.parallel.tp, 8);
        assert!(c.data.dataset.is_some(), "SFT reads a prepare-sft dataset");
        assert!(c.model.rope_scaling.is_none());
        assert!(
            c.model
                .path
                .to_string_lossy()
                .contains(&format!("ultralong-{name}")),
            "SFT starts from the exported {name} CPT model: {}",
            c.model.path.display()
        );
    }
    // Every paper value carries its source; every open value says it is ours.
    for f in [
        "ultralong-1m",
        "ultralong-2m",
        "ultralong-4m",
        "sft-1m",
        "sft-2m",
        "sft-4m",
    ] {
        let text = std::fs::read_to_string(repo().join(format!("configs/{f}.toml"))).unwrap();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains('='))
        {
            let key = line.split('=').next().unwrap().trim();
            let needs_comment = !["path", "dataset", "out_dir", "micro_batch"].contains(&key);
            if needs_comment {
                assert!(
                    line.contains("RECIPE.md") || line.contains("our choice") || line.contains('#'),
                    "{f}: `{line}` has no source comment"
                );
            }
            if [
                "schedule",
                "warmup_steps",
                "beta1",
                "beta2",
                "weight_decay",
                "grad_clip",
            ]
            .contains(&key)
            {
                assert!(line.contains("our choice"), "{f}: `{line}`");
            }
            if ["lr", "seq_len", "factor", "beta_fast", "beta_slow", "tp"].contains(&key) {
                assert!(line.contains("RECIPE.md"), "{f}: `{line}`");
            }
        }
    }
}

/// The chosen layout, its peak and step of a `plan --json` answer.
fn chosen(v: &Value) -> (usize, usize, usize, f64, f64) {
    let c = &v["chosen"];
    let l = &c["layout"];
    let u = |x: &Value| x.as_u64().unwrap() as usize;
    (
        u(&l["tp"]),
        u(&l["cp"]),
        u(&l["dp"]),
        c["memory_summary"]["device_peak_gib"].as_f64().unwrap(),
        c["step"]["step_s"].as_f64().unwrap(),
    )
}

#[test]
fn plan_finds_the_papers_layouts_on_80gb_h100s() {
    for (name, gpus, cp, dp) in [("1m", 32, 4, 1), ("2m", 128, 16, 1), ("4m", 256, 16, 2)] {
        let config = format!("configs/ultralong-{name}.toml");
        let g = gpus.to_string();
        let v = plan_json(&[
            "--config",
            &config,
            "--model-config",
            LLAMA,
            "--gpus",
            &g,
            "--gpu",
            "h100-80g",
        ]);
        let (tp, c, d, peak, step) = chosen(&v);
        let ring = &v["chosen"]["step"]["ring"];
        let hours = v["chosen"]["per_1b_tokens"]["gpu_hours"].as_f64().unwrap();
        eprintln!(
            "{name}: {gpus} GPUs tp {tp} cp {c} dp {d}: peak {peak:.1} GiB, step {step:.0} s, {hours:.0} GPU-hours per 1B tokens, ring comm/compute {:.3}",
            ring["ratio"].as_f64().unwrap()
        );
        assert_eq!((tp, c, d), (8, cp, dp), "{name}: {}", v["chosen"]["reason"]);
        assert!(peak < 79.6, "{name}: {peak} GiB");
        assert!(ring["hides"].as_bool().unwrap(), "{name}: the ring hides");
        // GPU-hours per 1B tokens: at least what the FLOPs need at the stated MFU (RECIPE.md: 4M
        // ~2,350 H100-hours at 40%), and not much more (exposed communication is small).
        let flops = v["flops_per_token"]["model"].as_f64().unwrap();
        // docs/ARCHITECTURE.md's count by hand: 6·N + 6·(32·128)·S·32 with N = 32 layers × 218,103,808
        // matmul weights + the 525,336,576 of the LM head = 7,504,658,432.
        let s = v["run"]["seq_len"].as_f64().unwrap();
        assert_eq!(
            flops,
            6.0 * 7_504_658_432.0 + 6.0 * 4096.0 * s * 32.0,
            "{name}"
        );
        // The ring's attention: the kernel's backward is 2.5× its forward (P recomputed).
        let ratio =
            ring["bwd_compute_s"].as_f64().unwrap() / ring["fwd_compute_s"].as_f64().unwrap();
        assert!((ratio - 2.5).abs() < 1e-12, "{name}: {ratio}");
        let ideal = 1e9 * flops / (989e12 * 0.4) / 3600.0;
        assert!(
            hours >= ideal && hours < 1.1 * ideal,
            "{name}: {hours} vs {ideal}"
        );
    }
    // The readable form says what it chose, the memory, the step time and the GPU-hours.
    let out = ok(
        &repo(),
        &[
            "plan",
            "--config",
            "configs/ultralong-4m.toml",
            "--model-config",
            LLAMA,
            "--gpus",
            "256",
            "--set",
            "train.steps=150",
        ],
    );
    for needle in [
        "chosen    256 GPUs = tp 8 × cp 16 × dp 2",
        "layer activations",
        "ring scratch",
        "per 1B tokens",
        "GPU-hours",
        "tokens/s",
        "the ring hides",
    ] {
        assert!(out.contains(needle), "plan output lacks {needle:?}:\n{out}");
    }
}

#[test]
fn plan_refuses_too_few_gpus_and_says_by_how_much() {
    let o = run(
        &repo(),
        &[
            "plan",
            "--config",
            "configs/ultralong-4m.toml",
            "--model-config",
            LLAMA,
            "--gpus",
            "32",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("{err}");
    assert!(
        err.starts_with("error: ") && !err.contains("panicked"),
        "{err}"
    );
    // "... it exceeds the memory by X GiB; the smallest power-of-two GPU count that fits is N"
    let by: f64 = err
        .split("exceeds the memory by ")
        .nth(1)
        .and_then(|s| s.split(" GiB").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no margin in {err}"));
    assert!(by > 10.0, "{err}");
    assert!(err.contains("the smallest per-rank peak, tp "), "{err}");
    assert!(err.contains("fits is 64"), "{err}");
    // A GPU count that no layout can use at all.
    fails_with(
        &repo(),
        &[
            "plan",
            "--config",
            "configs/ultralong-4m.toml",
            "--model-config",
            LLAMA,
            "--gpus",
            "3",
        ],
        &["no layout of 3 GPUs satisfies the layout rules"],
    );
    // The model config must come from somewhere: both places are named.
    fails_with(
        &repo(),
        &[
            "plan",
            "--config",
            "configs/ultralong-1m.toml",
            "--gpus",
            "32",
        ],
        &["models/Llama-3.1-8B-Instruct/config.json", "--model-config"],
    );
}

#[test]
fn plan_gives_sensible_gpu_counts_for_every_paper_config() {
    // 1M and 2M: the smallest GPU counts with the config's layout; the SFT stage on 64 GPUs.
    for (config, gpus) in [
        ("configs/ultralong-1m.toml", 32),
        ("configs/ultralong-2m.toml", 128),
        ("configs/ultralong-4m.toml", 128),
        ("configs/ultralong-4m.toml", 512),
        ("configs/sft-1m.toml", 64),
        ("configs/sft-2m.toml", 8),
        ("configs/sft-4m.toml", 128),
    ] {
        let g = gpus.to_string();
        let v = plan_json(&["--config", config, "--model-config", LLAMA, "--gpus", &g]);
        let (tp, cp, dp, peak, step) = chosen(&v);
        eprintln!(
            "{config} on {gpus}: tp {tp} cp {cp} dp {dp}, peak {peak:.1} GiB, step {step:.1} s"
        );
        assert_eq!(tp * cp * dp, gpus);
        assert!(peak < 79.6);
    }
    // 4M on 64 GPUs fits both the H200 and (since checkpoints are written shard by shard, with no
    // gather on the device) the H100, keeping the config's tp 8 (cp 8); 32 H100s do not.
    let v = plan_json(&[
        "--config",
        "configs/ultralong-4m.toml",
        "--model-config",
        LLAMA,
        "--gpus",
        "64",
        "--gpu",
        "h200-141g",
    ]);
    assert_eq!((chosen(&v).0, chosen(&v).1), (8, 8));
    let v = plan_json(&[
        "--config",
        "configs/ultralong-4m.toml",
        "--model-config",
        LLAMA,
        "--gpus",
        "64",
    ]);
    assert_eq!((chosen(&v).0, chosen(&v).1), (8, 8));
    assert!(chosen(&v).3 < 79.6);
    fails_with(
        &repo(),
        &[
            "plan",
            "--config",
            "configs/ultralong-4m.toml",
            "--model-config",
            LLAMA,
            "--gpus",
            "32",
        ],
        &["exceeds the memory by", "fits is 64"],
    );
}

/// `ultralong bench train` on the CPU: the backend's measured peak bytes.
fn bench_peak(model: &str, seq: usize, recompute: bool) -> (u64, u64) {
    let s = seq.to_string();
    let mut args = vec![
        "bench",
        "train",
        "--model-config",
        model,
        "--seq-len",
        &s,
        "--steps",
        "1",
        "--warmup",
        "0",
        "--ce-chunk",
        "256",
    ];
    if recompute {
        args.push("--recompute");
    }
    let out = ok(&repo(), &args);
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    (
        v["backend_peak_bytes"].as_u64().unwrap(),
        v["peak_rss_bytes"].as_u64().unwrap_or(0),
    )
}

/// `plan --backend cpu-bench`: the predicted peak of the same run.
fn predicted_peak(model: &str, seq: usize, recompute: bool) -> u64 {
    let v = plan_json(&[
        "--config",
        "configs/debug/cpt.toml",
        "--model-config",
        model,
        "--gpus",
        "1",
        "--backend",
        "cpu-bench",
        "--set",
        &format!("train.seq_len={seq}"),
        "--set",
        &format!("train.recompute={recompute}"),
        "--set",
        "train.ce_chunk=256",
    ]);
    v["predicted_peak_bytes"].as_u64().unwrap()
}

#[test]
fn memory_model_predicts_the_measured_cpu_peaks() {
    let d = tempfile::tempdir().unwrap();
    // A third model with a large vocabulary relative to its width (the LM head and logits matter).
    let wide = d.path().join("wide.json");
    std::fs::write(
        &wide,
        r#"{"vocab_size": 8192, "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 3,
            "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": false}"#,
    )
    .unwrap();
    let wide = wide.to_string_lossy().into_owned();
    let runs: Vec<(&str, usize, bool)> = vec![
        ("configs/debug/model.json", 256, false),
        ("configs/debug/model.json", 1024, true),
        ("configs/debug/model.json", 1024, false),
        ("configs/demo/model.json", 384, false),
        ("configs/demo/model.json", 1024, true),
        ("configs/demo/model.json", 1024, false),
        (&wide, 128, false),
        (&wide, 768, true),
    ];
    eprintln!(
        "{:<28} {:>6} {:>9} {:>14} {:>14} {:>8} {:>12}",
        "model", "seq", "recompute", "measured B", "predicted B", "error", "peak RSS"
    );
    let mut worst: f64 = 0.0;
    for (model, seq, rc) in runs {
        let (measured, rss) = bench_peak(model, seq, rc);
        let predicted = predicted_peak(model, seq, rc);
        let err = predicted as f64 / measured as f64 - 1.0;
        worst = worst.max(err.abs());
        let p = Path::new(model);
        let dir = p.parent().and_then(|d| d.file_name()).unwrap_or_default();
        let name = format!(
            "{}/{}",
            dir.to_string_lossy(),
            p.file_name().unwrap().to_string_lossy()
        );
        eprintln!(
            "{name:<28} {seq:>6} {rc:>9} {measured:>14} {predicted:>14} {:>7.2}% {:>9.1} MiB",
            100.0 * err,
            rss as f64 / (1u64 << 20) as f64
        );
        assert!(
            err.abs() < 0.15,
            "{model} seq {seq} recompute {rc}: predicted {predicted} vs measured {measured}"
        );
    }
    eprintln!("worst relative error {:.3}%", 100.0 * worst);
}

/// A topology of the given layout for rank 0, with single-rank communicators: enough for
/// `Workspace::for_rank` (it reads the layout and the shard, it does not communicate).
fn fake_topology(tp: usize, cp: usize) -> Topology {
    let one = || AnyComm::Single(SelfComm::default());
    Topology {
        layout: Layout { tp, cp, dp: 1 },
        world_rank: 0,
        tp_rank: 0,
        cp_rank: 0,
        dp_rank: 0,
        world: one(),
        tp: one(),
        cp: one(),
        dp: one(),
        dpcp: one(),
    }
}

#[test]
fn workspace_buffers_are_exactly_the_memory_models() {
    // 8 heads / 4 KV heads: tp up to 4.
    let cfg = ModelConfig::from_json_str(
        r#"{"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8,
            "rope_theta": 10000.0, "max_position_embeddings": 4096}"#,
        "t",
    )
    .unwrap();
    let b = CpuBackend::<f32>::new();
    for (tp, cp) in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4)] {
        for recompute in [false, true] {
            for (seq, ce) in [(256, 64), (512, 1000)] {
                let topo = fake_topology(tp, cp);
                let before = b.bytes_in_use();
                let ws = Workspace::for_rank(&b, &cfg, &topo, seq / cp, recompute, ce);
                let measured = (b.bytes_in_use() - before) as u64;
                drop(ws);
                let m = plan::memory(
                    &RankShape {
                        cfg: &cfg,
                        layout: topo.layout,
                        seq_len: seq,
                        recompute,
                        ce_chunk: ce,
                    },
                    Target::CpuTrain,
                    0,
                );
                let predicted: u64 = WORKSPACE_GROUPS.iter().map(|g| m.group_bytes(g)).sum();
                assert_eq!(
                    predicted, measured,
                    "tp {tp} cp {cp} recompute {recompute} seq {seq}: predicted {predicted} vs allocated {measured}"
                );
            }
        }
    }
    // Parameters, gradients and the (one-rank) ZeRO state: master, m, v, gradient slice.
    let topo = fake_topology(1, 1);
    let before = b.bytes_in_use();
    let params = ParamStore::zeros(&b, &cfg);
    let grads = params.zeros_like(&b);
    let opt = ShardedAdamW::new(&b, &topo, &params);
    let measured = (b.bytes_in_use() - before) as u64;
    drop((opt, grads, params));
    let m = plan::memory(
        &RankShape {
            cfg: &cfg,
            layout: topo.layout,
            seq_len: 64,
            recompute: true,
            ce_chunk: 64,
        },
        Target::CpuTrain,
        0,
    );
    let predicted =
        m.group_bytes("weights") + m.group_bytes("gradients") + m.group_bytes("optimizer");
    assert_eq!(predicted, measured);
}

#[test]
fn debug_configs_run_on_the_cpu() {
    // The configs' paths are relative to the repository root: run in a scratch directory that
    // sees the repository's configs/ under the same name.
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::os::unix::fs::symlink(repo().join("configs"), p.join("configs")).unwrap();
    ok(
        p,
        &[
            "init",
            "--config",
            "configs/debug/model.json",
            "--seed",
            "1",
            "--out",
            "runs/debug/init",
            "--train-tokenizer",
            "configs/debug/text.txt",
        ],
    );
    let cpt = losses(&ok(p, &["train", "--config", "configs/debug/cpt.toml"]));
    assert_eq!(cpt.len(), 6);
    assert!(cpt.iter().all(|l| l.is_finite()));
    let par = losses(&mpirun_ok(
        p,
        4,
        &["train", "--config", "configs/debug/cpt-tp2-cp2.toml"],
    ));
    assert_eq!(par.len(), 6);
    for (a, b) in cpt.iter().zip(&par) {
        assert!((a - b).abs() < 1e-3 * a.abs(), "{cpt:?} vs {par:?}");
    }
    ok(
        p,
        &[
            "export",
            "--checkpoint",
            "runs/debug/cpt",
            "--out",
            "runs/debug/cpt-hf",
            "--dtype",
            "f32",
        ],
    );
    ok(
        p,
        &[
            "prepare",
            "sft",
            "--input",
            "configs/debug/sft.jsonl",
            "--tokenizer",
            "runs/debug/cpt-hf",
            "--max-len",
            "256",
            "--out",
            "runs/debug/sft-data",
        ],
    );
    let sft = losses(&ok(p, &["train", "--config", "configs/debug/sft.toml"]));
    assert_eq!(sft.len(), 5);
    assert!(sft.iter().all(|l| l.is_finite()));
    // plan describes the debug run's CPU memory.
    let out = ok(
        p,
        &[
            "plan",
            "--config",
            "configs/debug/cpt-tp2-cp2.toml",
            "--gpus",
            "4",
            "--backend",
            "cpu-train",
        ],
    );
    assert!(
        out.contains("ring scratch") && out.contains("tp 2, cp 2, dp 1"),
        "{out}"
    );
}
