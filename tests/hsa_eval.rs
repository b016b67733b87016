//! `eval ppl`, `generate` and `eval niah` on the HSA model through the binary, against the
//! library's whole-sequence forward (`HsaModel::forward_backward`, no cache) as the reference.

mod common;
use common::*;

use ultralong::backend::cpu::CpuBackend;
use ultralong::io::MappedTensors;
use ultralong::model::arch::ArchConfig;
use ultralong::model::hsa::model::{Head, HsaModel};
use ultralong::model::params::Shard;
use ultralong::train::data::tokenize_text_file;

const HSA_CONFIG: &str = r#"{
  "architectures": ["DRTForCausalLM"], "model_type": "llama",
  "vocab_size": 384, "hidden_size": 32, "intermediate_size": 64,
  "num_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2,
  "num_lower_layers": 1, "num_upper_layers": 2, "num_upper_groups": 2,
  "sliding_window": 6, "chunk_size": 8, "chunk_topk": 2, "retrieval_dim": 16,
  "encoder_layers": 0, "initializer_range": 0.2, "rope_theta": 10000.0,
  "max_position_embeddings": 256, "enable_softmax": true, "enable_qk_norm": true,
  "hsa_only": false, "bos_token_id": 0, "eos_token_id": 1
}"#;

fn load(dir: &std::path::Path) -> (CpuBackend<f64>, HsaModel<CpuBackend<f64>>) {
    let b = CpuBackend::<f64>::new();
    let ArchConfig::Hsa(cfg) = ArchConfig::from_file(&dir.join("config.json")).unwrap() else {
        panic!("not HSA")
    };
    let files = MappedTensors::open_dir(dir).unwrap();
    let params = ArchConfig::Hsa(cfg.clone())
        .params_from_files(&b, &files, "m", Shard::WHOLE)
        .unwrap();
    let m = HsaModel::new(cfg, params).unwrap();
    (b, m)
}

/// The logits of the last token of `ids` from the whole-sequence forward (padded to whole
/// chunks: causal, so the padding does not reach the rows before it).
fn last_logits(b: &CpuBackend<f64>, m: &HsaModel<CpuBackend<f64>>, ids: &[u32]) -> Vec<f64> {
    let s = m.cfg.chunk_size;
    let mut x = ids.to_vec();
    x.resize(ids.len().div_ceil(s) * s, 2);
    let (_, l) = m.forward_backward(b, &x, 0, Head::Logits, None).unwrap();
    let v = m.cfg.base.vocab_size;
    l[(ids.len() - 1) * v..ids.len() * v].to_vec()
}

#[test]
fn hsa_ppl_generate_and_niah_through_the_binary() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    model_from_config(p, HSA_CONFIG, 4);
    let (b, m) = load(&p.join("m"));

    // eval ppl in f64: the mean loss of one 64-token sequence equals the full forward's.
    ok(
        p,
        &[
            "eval",
            "ppl",
            "--model",
            "m",
            "--text",
            "text.txt",
            "--seq-len",
            "64",
            "--out",
            "ppl",
            "--precision",
            "f64",
        ],
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.join("ppl/ppl.json")).unwrap()).unwrap();
    let ids = tokenize_text_file(&p.join("text.txt"), &p.join("m/tokenizer.json")).unwrap();
    let seq = &ids[..64];
    let mut targets: Vec<i32> = seq[1..].iter().map(|&t| t as i32).collect();
    targets.push(-1);
    let (sum, _) = m
        .forward_backward(
            &b,
            seq,
            0,
            Head::Loss {
                targets: &targets,
                grad_scale: 1.0,
            },
            None,
        )
        .unwrap();
    let want = sum / 63.0;
    let got = j["mean_loss"].as_f64().unwrap();
    assert!(
        (got - want).abs() < 1e-9 * want,
        "ppl {got} vs forward {want}"
    );
    assert_eq!(j["architecture"], "HSA");

    // generate: greedy over the cached session equals argmax of repeated full forwards.
    let prompt: Vec<u32> = (0..13).map(|i| (i * 37 + 5) % 384).collect();
    std::fs::write(
        p.join("prompt.json"),
        serde_json::to_string(&prompt).unwrap(),
    )
    .unwrap();
    let out = ok(
        p,
        &[
            "generate",
            "--model",
            "m",
            "--prompt-tokens",
            "prompt.json",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--precision",
            "f64",
        ],
    );
    let line = out.lines().rev().find(|l| l.starts_with('{')).unwrap();
    let g: serde_json::Value = serde_json::from_str(line).unwrap();
    let got: Vec<u32> = serde_json::from_value(g["tokens"].clone()).unwrap();
    let mut seq = prompt.clone();
    let mut want = Vec::new();
    for _ in 0..12 {
        let l = last_logits(&b, &m, &seq);
        let t = (0..l.len()).fold(0, |a, i| if l[i] > l[a] { i } else { a }) as u32;
        want.push(t);
        seq.push(t);
    }
    assert_eq!(got, want);
    assert_eq!(g["model"], "HSA");

    // eval niah runs end to end (a random model: the accuracy is whatever it is).
    ok(
        p,
        &[
            "eval",
            "niah",
            "--model",
            "m",
            "--lengths",
            "200",
            "--depths",
            "0,50",
            "--out",
            "niah",
            "--digits",
            "3",
            "--max-new-tokens",
            "4",
        ],
    );
    let n: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.join("niah/niah.json")).unwrap()).unwrap();
    assert_eq!(n["cells"].as_array().unwrap().len(), 2);
    // And a layout it cannot run is refused.
    fails_with(
        p,
        &[
            "eval",
            "ppl",
            "--model",
            "m",
            "--text",
            "text.txt",
            "--seq-len",
            "64",
            "--out",
            "x",
            "--backend",
            "cuda",
        ],
        &["HSA", "CPU backend"],
    );
}
