//! `prepare` output feeds `train`: CPT datasets resume bit-identically through the loader state,
//! SFT datasets train on assistant tokens only.

mod common;
use common::*;

use std::io::Write;

fn cpt_dataset(p: &std::path::Path) {
    let mut f = std::fs::File::create(p.join("c.jsonl")).unwrap();
    for i in 0..300 {
        let text = format!(
            "document {i}: the quick brown fox jumps over the lazy dog {} times.",
            i % 17
        );
        writeln!(f, "{}", serde_json::json!({ "text": text })).unwrap();
    }
    drop(f);
    ok(
        p,
        &[
            "prepare",
            "cpt",
            "--input",
            "c.jsonl",
            "--tokenizer",
            "m",
            "--seq-len",
            "32",
            "--tokens",
            "1200",
            "--out",
            "ds",
        ],
    );
}

fn dataset_config(steps: u64, out: &str, dataset: &str) -> String {
    run_config(steps, out).replace("text = \"text.txt\"", &format!("dataset = \"{dataset}\""))
}

#[test]
fn cpt_dataset_trains_and_resumes_bit_identically() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    cpt_dataset(p);
    // 12 steps x 4 sequences = 48 samples: crosses the first epoch boundary of the dataset.
    let n_seq = ultralong::data::indexed::IndexedDataset::open(&p.join("ds/tokens"))
        .unwrap()
        .len();
    assert!(
        n_seq < 48,
        "{n_seq} sequences: the run should span more than one epoch"
    );
    std::fs::write(p.join("a.toml"), dataset_config(12, "a", "ds")).unwrap();
    std::fs::write(p.join("b.toml"), dataset_config(12, "b", "ds")).unwrap();
    let straight = losses(&ok(p, &["train", "--config", "a.toml"]));
    let first = losses(&ok(
        p,
        &["train", "--config", "b.toml", "--stop-after-steps", "7"],
    ));
    let second = losses(&ok(p, &["train", "--config", "b.toml", "--resume"]));
    let joined: Vec<f64> = first.into_iter().chain(second).collect();
    assert_eq!(straight, joined);
    assert!(straight[11] < straight[0], "the loss falls");
}

#[test]
fn sft_dataset_counts_only_assistant_targets() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    let mut f = std::fs::File::create(p.join("chat.jsonl")).unwrap();
    for i in 0..60 {
        let m = serde_json::json!({"messages": [
            {"role": "user", "content": format!("what is {i} plus one?")},
            {"role": "assistant", "content": format!("{} is the answer.", i + 1)}]});
        writeln!(f, "{m}").unwrap();
    }
    drop(f);
    let out = ok(
        p,
        &[
            "prepare",
            "sft",
            "--input",
            "chat.jsonl",
            "--tokenizer",
            "m",
            "--max-len",
            "256",
            "--out",
            "sft",
        ],
    );
    let r: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    assert_eq!(r["samples_written"], 60);
    std::fs::write(
        p.join("s.toml"),
        dataset_config(3, "s", "sft").replace("seq_len = 32", "seq_len = 256"),
    )
    .unwrap();
    let l = losses(&ok(p, &["train", "--config", "s.toml"]));
    assert_eq!(l.len(), 3);
    // The loader's targets: only assistant tokens (and their <|eot_id|>) are counted.
    let mut loader = ultralong::data::loader::Loader::open(&p.join("sft"), 256, 0).unwrap();
    let s = loader.next_sample().unwrap();
    let counted = s.targets.iter().filter(|&&t| t >= 0).count();
    assert!(
        counted > 0 && counted < 256 / 2,
        "{counted} counted targets in a row of 256"
    );
}
