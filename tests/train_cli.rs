//! End-to-end training through the binary: resume is bit-identical, a tiny model learns, the
//! context extension writes a consistent YaRN config.

mod common;
use common::*;

use ultralong::io::load_safetensors_dir;
use ultralong::train::checkpoint::load_full;

#[test]
fn ten_steps_equal_five_plus_resume_plus_five() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    std::fs::write(p.join("a.toml"), run_config(10, "a")).unwrap();
    std::fs::write(p.join("b.toml"), run_config(10, "b")).unwrap();
    let straight = losses(&ok(p, &["train", "--config", "a.toml"]));
    assert_eq!(straight.len(), 10);
    // The interrupted run keeps its checkpoints in a directory of its own (checkpoint.dir).
    let set_dir = ["--set", "checkpoint.dir=\"bck\""];
    let leg1 = ["train", "--config", "b.toml", "--stop-after-steps", "5"];
    let first = losses(&ok(p, &[&leg1[..], &set_dir].concat()));
    assert!(p.join("bck/step-00000005/state.json").exists());
    let leg2 = ["train", "--config", "b.toml", "--resume"];
    let second = losses(&ok(p, &[&leg2[..], &set_dir].concat()));
    assert_eq!((first.len(), second.len()), (5, 5));
    let joined: Vec<f64> = first.into_iter().chain(second).collect();
    assert_eq!(straight, joined, "losses must be bitwise identical");
    let log = std::fs::read_to_string(p.join("b/metrics.jsonl")).unwrap();
    assert_eq!(
        losses(&log),
        straight,
        "the resumed run's metrics.jsonl has each step once"
    );
    let (_, wa, oa) = load_full(&p.join("a/checkpoints/step-00000010")).unwrap();
    let (_, wb, ob) = load_full(&p.join("bck/step-00000010")).unwrap();
    assert_eq!(wa, wb, "weights must be bitwise identical");
    assert!(
        oa == ob,
        "Adam moments and master weights must be bitwise identical"
    );
    // Export finds the newest checkpoint from the checkpoint directory too.
    ok(
        p,
        &[
            "export",
            "--checkpoint",
            "bck",
            "--out",
            "hf",
            "--dtype",
            "f32",
        ],
    );
    assert_eq!(load_safetensors_dir(&p.join("hf")).unwrap(), wa);
}

#[test]
fn tiny_model_halves_its_loss_in_200_steps() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    std::fs::write(p.join("r.toml"), run_config(200, "r")).unwrap();
    let l = losses(&ok(
        p,
        &[
            "train",
            "--config",
            "r.toml",
            "--set",
            "checkpoint.interval=0",
            "--set",
            "optim.lr=2e-3",
        ],
    ));
    assert_eq!(l.len(), 200);
    let (start, end) = (l[0], l[190..].iter().sum::<f64>() / 10.0);
    assert!(end < start / 2.0, "loss {start} -> {end}: not halved");
    // The run drew its plots; `plot` redraws them on demand.
    let png = |f: &str| std::fs::read(p.join("r").join(f)).unwrap();
    assert_eq!(&png("loss.png")[..4], b"\x89PNG");
    assert_eq!(&png("throughput.png")[..4], b"\x89PNG");
    std::fs::remove_file(p.join("r/loss.png")).unwrap();
    let out = ok(p, &["plot", "--run", "r"]);
    assert!(out.contains("loss.png"), "{out}");
    assert_eq!(&png("loss.png")[..4], b"\x89PNG");
    fails_with(p, &["plot", "--run", "nowhere"], &["nowhere/metrics.jsonl"]);
}

#[test]
fn yarn_extension_trains_at_the_longer_length_and_exports_consistently() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    let cfg = run_config(2, "ext").replace("seq_len = 32", "seq_len = 256")
        + r#"
[model.rope_scaling]
rope_type = "yarn"
factor = 8.0
original_max_position_embeddings = 64
beta_fast = 4.0
beta_slow = 1.0
max_position_embeddings = 512
"#;
    std::fs::write(p.join("ext.toml"), cfg).unwrap();
    ok(p, &["train", "--config", "ext.toml"]);
    ok(
        p,
        &[
            "export",
            "--checkpoint",
            "ext",
            "--out",
            "hf",
            "--dtype",
            "bf16",
        ],
    );
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.join("hf/config.json")).unwrap()).unwrap();
    assert_eq!(c["max_position_embeddings"], 512);
    for form in ["rope_scaling", "rope_parameters"] {
        assert_eq!(c[form]["rope_type"], "yarn", "{form}");
        let f = c[form]["factor"].as_f64().unwrap();
        let orig = c[form]["original_max_position_embeddings"]
            .as_f64()
            .unwrap();
        assert_eq!(
            f,
            512.0 / orig,
            "{form}: factor must equal max_position_embeddings / original"
        );
        assert_eq!(c[form]["beta_fast"], 4.0);
    }
    assert_eq!(c["torch_dtype"], "bfloat16");
    assert!(p.join("hf/tokenizer.json").exists());
    // The export loads back and runs.
    std::fs::write(p.join("ids.json"), "[5, 6, 7, 8, 9]").unwrap();
    ok(p, &["forward", "--model", "hf", "--tokens", "ids.json"]);
}
