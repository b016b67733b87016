//! Bad input gives an error that names the thing, a non-zero exit, and no panic.

mod common;
use common::*;

use std::collections::BTreeMap;
use ultralong::io::{DType, HostTensor, load_safetensors_dir, save_safetensors_file};

#[test]
fn missing_files_are_named() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    std::fs::write(p.join("ids.json"), "[1, 2, 3]").unwrap();
    fails_with(
        p,
        &["forward", "--model", "nope", "--tokens", "ids.json"],
        &["nope", "config.json"],
    );
    fails_with(
        p,
        &["forward", "--model", "m", "--tokens", "absent.json"],
        &["absent.json"],
    );
    fails_with(
        p,
        &["init", "--config", "absent.json", "--out", "x"],
        &["absent.json"],
    );
    fails_with(p, &["train", "--config", "absent.toml"], &["absent.toml"]);
    std::fs::remove_file(p.join("m/model.safetensors")).unwrap();
    fails_with(
        p,
        &["forward", "--model", "m", "--tokens", "ids.json"],
        &["model.safetensors"],
    );
}

/// A missing model directory names its key and where weights come from, and nothing is created.
#[test]
fn a_missing_model_directory_names_its_key_and_creates_nothing() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::write(p.join("text.txt"), repeating_text()).unwrap();
    std::fs::write(p.join("r.toml"), run_config(1, "o")).unwrap();
    fails_with(
        p,
        &["train", "--config", "r.toml"],
        &["model.path", "\"m\"", "no such directory", "REPRODUCE.md"],
    );
    assert!(!p.join("o").exists(), "out_dir must not be created");
    let o = run(
        p,
        &[
            "eval",
            "niah",
            "--model",
            "m",
            "--lengths",
            "64",
            "--out",
            "n",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--model")
            && err.contains("no such directory")
            && !err.contains("tokenizer.json in"),
        "{err}"
    );
    assert!(!p.join("n").exists());
    // A directory without config.json says so.
    std::fs::create_dir(p.join("m")).unwrap();
    fails_with(
        p,
        &["train", "--config", "r.toml"],
        &["model.path", "no config.json"],
    );
}

/// Under mpirun, an error every rank meets before the world starts is printed once (by rank 0),
/// and a layout that does not fit leaves no out_dir behind.
#[test]
fn errors_before_the_world_are_printed_once_under_mpirun() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    std::fs::write(p.join("r.toml"), run_config(1, "o")).unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &["train", "--config", "r.toml", "--set", "train.seqlen=30"],
            "--set train.seqlen=30",
        ),
        (
            &[
                "train",
                "--config",
                "r.toml",
                "--cp",
                "2",
                "--set",
                "train.seq_len=30",
            ],
            "multiple of 2·cp·tp = 4",
        ),
        (&["train", "--config", "r.toml", "--tp", "x"], "'x'"),
    ];
    for (args, needle) in cases {
        let o = mpirun(p, 2, args, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{args:?}: one error, by rank 0: {err}");
        assert!(
            errors[0].contains(needle) && !errors[0].contains("[rank"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !p.join("o").exists(),
            "{args:?}: out_dir must not be created"
        );
    }
}

/// Rewrite `m/model.safetensors` after editing its tensors.
fn edit_weights(p: &std::path::Path, f: impl FnOnce(&mut BTreeMap<String, HostTensor>)) {
    let mut map = load_safetensors_dir(&p.join("m")).unwrap();
    f(&mut map);
    save_safetensors_file(&p.join("m/model.safetensors"), &map, DType::F32, None).unwrap();
}

#[test]
fn missing_tensor_and_wrong_shape_are_named() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    std::fs::write(p.join("ids.json"), "[1, 2, 3]").unwrap();
    edit_weights(p, |m| {
        m.remove("model.layers.1.mlp.up_proj.weight");
    });
    fails_with(
        p,
        &["forward", "--model", "m", "--tokens", "ids.json"],
        &["model.layers.1.mlp.up_proj.weight", "missing"],
    );
    tiny_model(p);
    edit_weights(p, |m| {
        m.insert(
            "model.norm.weight".into(),
            HostTensor::new(vec![63], vec![1.0; 63]),
        );
    });
    fails_with(
        p,
        &["forward", "--model", "m", "--tokens", "ids.json"],
        &["model.norm.weight", "[63]", "[64]"],
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    std::fs::write(p.join("ids.json"), "[1, 2, 3]").unwrap();
    // A hand-written safetensors file holding one I64 tensor.
    let header =
        r#"{"model.embed_tokens.weight":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(p.join("m/model.safetensors"), bytes).unwrap();
    fails_with(
        p,
        &["forward", "--model", "m", "--tokens", "ids.json"],
        &["model.embed_tokens.weight", "I64"],
    );
}

#[test]
fn malformed_configs_are_named() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    std::fs::write(p.join("ids.json"), "[1, 2, 3]").unwrap();
    std::fs::write(
        p.join("m/config.json"),
        "{\"vocab_size\": 256,\n \"hidden_size\": }",
    )
    .unwrap();
    fails_with(
        p,
        &["forward", "--model", "m", "--tokens", "ids.json"],
        &["config.json", "line 2"],
    );
    std::fs::write(
        p.join("m/config.json"),
        TINY_CONFIG.replace("\"llama3\"", "\"dynamic\""),
    )
    .unwrap();
    fails_with(
        p,
        &["forward", "--model", "m", "--tokens", "ids.json"],
        &["config.json", "dynamic", "rope_type"],
    );
    // Run configs: unknown keys and bad values.
    tiny_model(p);
    std::fs::write(p.join("r.toml"), run_config(1, "o") + "\n[extra]\nx = 1\n").unwrap();
    fails_with(p, &["train", "--config", "r.toml"], &["r.toml", "extra"]);
    std::fs::write(p.join("r.toml"), run_config(1, "o")).unwrap();
    fails_with(
        p,
        &[
            "train",
            "--config",
            "r.toml",
            "--set",
            "optim.schedule=zigzag",
        ],
        &["optim.schedule", "zigzag"],
    );
    fails_with(
        p,
        &[
            "train",
            "--config",
            "r.toml",
            "--set",
            "model.rope_precision=fp16",
        ],
        &["fp16"],
    );
}

/// A typo'd key is one line naming where it came from: the file and its line, or the `--set`.
#[test]
fn config_errors_are_one_line_and_name_their_source() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::write(
        p.join("r.toml"),
        run_config(1, "o").replace("seq_len", "seqlen"),
    )
    .unwrap();
    let line = 1 + run_config(1, "o")
        .lines()
        .position(|l| l.starts_with("seq_len"))
        .unwrap();
    let o = run(p, &["train", "--config", "r.toml"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(&format!("r.toml line {line}")) && err.contains("`seqlen`"),
        "{err}"
    );
    std::fs::write(p.join("r.toml"), run_config(1, "o")).unwrap();
    let o = run(
        p,
        &["train", "--config", "r.toml", "--set", "train.seqlen=4096"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("error: --set train.seqlen=4096: ") && !err.contains("r.toml"),
        "{err}"
    );
    // A flag that is an override names itself.
    let o = run(p, &["train", "--config", "r.toml", "--backend", "tpu"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("error: --backend tpu: "), "{err}");
    assert!(!p.join("o").exists(), "nothing is created for a bad config");
}

#[test]
fn bad_tokens_are_named() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    std::fs::write(p.join("ids.json"), "[1, 2, 999]").unwrap();
    fails_with(
        p,
        &["forward", "--model", "m", "--tokens", "ids.json"],
        &["999", "index 2", "384"],
    );
    std::fs::write(p.join("ids.json"), "[1, -2]").unwrap();
    fails_with(
        p,
        &["forward", "--model", "m", "--tokens", "ids.json"],
        &["ids.json"],
    );
}

#[test]
fn corrupted_checkpoint_is_skipped_with_its_name() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    std::fs::write(p.join("r.toml"), run_config(10, "o")).unwrap();
    ok(p, &["train", "--config", "r.toml"]);
    // Corrupt the newest checkpoint: export falls back to the older one and says why.
    let f = p.join("o/checkpoints/step-00000010/optim-tp0-of1-z0-of1.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&f, bytes).unwrap();
    let o = run(p, &["export", "--checkpoint", "o", "--out", "hf"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("step-00000010") && err.contains("SHA-256") && err.contains("step-00000005"),
        "{err}"
    );
    // Truncation is detected by size.
    std::fs::write(&f, b"short").unwrap();
    let o = run(
        p,
        &[
            "export",
            "--checkpoint",
            "o/checkpoints/step-00000010",
            "--out",
            "hf2",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("truncated"), "{err}");
}

#[test]
fn top_level_help_names_both_backends() {
    let o = run(std::path::Path::new("."), &["--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("CPU reference") && out.contains("CUDA"),
        "{out}"
    );
}
