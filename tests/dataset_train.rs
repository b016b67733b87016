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

/// The separator a CPT dataset adds travels to checkpoints and the exported model: in a Llama-3
/// style tokenizer it takes the first reserved special token's id (inside the embedding), and
/// tokenizer_config.json's `added_tokens_decoder` agrees with tokenizer.json.
#[test]
fn separator_takes_a_reserved_slot_and_reaches_the_export() {
    use tokenizers::{AddedToken, Tokenizer};
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    // A Llama-3 style tokenizer: no `<s>`, reserved special tokens (init's `<s>` renamed to the
    // first, one more appended).
    let reserved = [
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
    ];
    let json = std::fs::read_to_string(p.join("m/tokenizer.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for t in v["added_tokens"].as_array_mut().unwrap() {
        if t["content"] == "<s>" {
            t["content"] = reserved[0].into();
        }
    }
    // (The trained BPE also lists its special tokens in the model's vocabulary.)
    let vocab_map = v["model"]["vocab"].as_object_mut().unwrap();
    let id = vocab_map.remove("<s>").unwrap();
    vocab_map.insert(reserved[0].into(), id);
    let mut tok: Tokenizer = v.to_string().parse().unwrap();
    assert_eq!(
        tok.token_to_id("<s>"),
        None,
        "the base tokenizer lacks the separator"
    );
    tok.add_special_tokens(vec![AddedToken::from(reserved[1].to_string(), true)])
        .unwrap();
    tok.save(p.join("m/tokenizer.json"), false).unwrap();
    let vocab = tok.get_vocab_size(true);
    assert!(
        vocab <= 384,
        "the tiny model's embedding holds the tokenizer ({vocab})"
    );
    let r0 = tok.token_to_id(reserved[0]).unwrap();
    let r1 = tok.token_to_id(reserved[1]).unwrap();
    let decoder: serde_json::Map<String, serde_json::Value> =
        [(r0, reserved[0]), (r1, reserved[1])]
            .iter()
            .map(|(id, c)| {
                (
                    id.to_string(),
                    serde_json::json!({ "content": c, "special": true }),
                )
            })
            .collect();
    let config = serde_json::json!({
        "added_tokens_decoder": decoder,
        "chat_template": "{{ messages }}",
    });
    std::fs::write(p.join("m/tokenizer_config.json"), config.to_string()).unwrap();

    cpt_dataset(p);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.join("ds/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["separator_id"], r0);
    assert_eq!(manifest["vocab_size"], vocab, "no new id");
    // Every dataset, checkpoint and export carries the same tokenizer files.
    let check = |dir: &str| {
        let t = Tokenizer::from_file(p.join(dir).join("tokenizer.json")).unwrap();
        assert_eq!(
            t.token_to_id("<s>"),
            Some(r0),
            "{dir}: <s> in the reserved slot"
        );
        assert_eq!(t.token_to_id(reserved[0]), None, "{dir}");
        assert_eq!(t.token_to_id(reserved[1]), Some(r1), "{dir}");
        assert_eq!(t.get_vocab_size(true), vocab, "{dir}");
        let c: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(p.join(dir).join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            c["added_tokens_decoder"][r0.to_string()]["content"],
            "<s>",
            "{dir}"
        );
        assert_eq!(
            c["added_tokens_decoder"][r1.to_string()]["content"],
            reserved[1],
            "{dir}"
        );
        assert_eq!(
            c["chat_template"], "{{ messages }}",
            "{dir}: the rest is kept"
        );
    };
    check("ds");
    std::fs::write(p.join("s.toml"), dataset_config(2, "s", "ds")).unwrap();
    ok(p, &["train", "--config", "s.toml"]);
    check("s/checkpoints/step-00000002");
    ok(
        p,
        &["export", "--checkpoint", "s/checkpoints", "--out", "hf"],
    );
    check("hf");
}
