//! Shared helpers of the integration tests: run the built binary, make a tiny model and corpus.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ultralong"))
}

/// Run `ultralong ARGS` in `dir`; returns the output (status not checked).
pub fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("spawn ultralong")
}

/// Run and require success, returning stdout.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    assert!(
        o.status.success(),
        "ultralong {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run and require a clean failure: non-zero exit, one `error:` line naming `needles`, no panic.
pub fn fails_with(dir: &Path, args: &[&str], needles: &[&str]) {
    let o = run(dir, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "ultralong {args:?} should fail; stderr: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "ultralong {args:?} panicked: {err}"
    );
    assert!(
        err.starts_with("error: "),
        "ultralong {args:?}: stderr should start with `error: `: {err}"
    );
    for n in needles {
        assert!(
            err.contains(n),
            "ultralong {args:?}: error should name {n:?}: {err}"
        );
    }
}

pub const TINY_CONFIG: &str = r#"{
  "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
  "max_position_embeddings": 128,
  "rope_scaling": {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
  "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1
}"#;

/// A short repeating text: easy to learn, so the loss must fall fast.
pub fn repeating_text() -> String {
    "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n"
        .repeat(200)
}

/// Write config.json + text.txt in `dir` and `init` a model with a trained tokenizer into `dir/m`.
pub fn tiny_model(dir: &Path) {
    model_from_config(dir, TINY_CONFIG, 3);
}

/// `tiny_model` for any model config (JSON text) and init seed.
pub fn model_from_config(dir: &Path, config: &str, seed: u64) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::write(dir.join("text.txt"), repeating_text()).unwrap();
    ok(
        dir,
        &[
            "init",
            "--config",
            "config.json",
            "--seed",
            &seed.to_string(),
            "--out",
            "m",
            "--train-tokenizer",
            "text.txt",
        ],
    );
}

pub fn run_config(steps: u64, out: &str) -> String {
    format!(
        r#"[model]
path = "m"
[data]
text = "text.txt"
[train]
steps = {steps}
seq_len = 32
micro_batch = 2
grad_accum = 2
seed = 5
out_dir = "{out}"
[optim]
lr = 3e-3
warmup_steps = 3
schedule = "cosine"
weight_decay = 0.1
[checkpoint]
interval = 5
keep = 3
[log]
quiet = true
"#
    )
}

/// The `loss` of each JSON line of a training run's stdout.
pub fn losses(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// `mpirun -np N ultralong ARGS` in `dir` (root-safe, oversubscribed: tests run more ranks than
/// cores). Returns the output (status not checked).
pub fn mpirun(dir: &Path, np: usize, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = mpirun_command(dir, np, args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output()
        .expect("spawn mpirun (is OpenMPI installed? `make deps`)")
}

/// The `mpirun -np N ultralong ARGS` command (not started), with the environment `mpirun` sets.
pub fn mpirun_command(dir: &Path, np: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), "--oversubscribe"])
        .arg(bin())
        .args(args)
        .current_dir(dir)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_hwloc_base_binding_policy", "none")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    c
}

/// `mpirun` and require success, returning stdout.
pub fn mpirun_ok(dir: &Path, np: usize, args: &[&str]) -> String {
    let o = mpirun(dir, np, args, &[]);
    assert!(
        o.status.success(),
        "mpirun -np {np} ultralong {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
