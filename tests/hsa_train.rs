//! The HSA model (docs/HSA.md) through the binary: `init` writes the authors' layout, `train`
//! learns and resumes bit-identically, data parallelism equals one rank, `export` writes a
//! directory their code reads (no `num_hidden_layers`, `backbone.*` names) that trains again.

mod common;
use common::*;

use ultralong::io::load_safetensors_dir;
use ultralong::train::checkpoint::load_full;

pub const HSA_CONFIG: &str = r#"{
  "architectures": ["DRTForCausalLM"], "model_type": "llama",
  "vocab_size": 384, "hidden_size": 32, "intermediate_size": 64,
  "num_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 1,
  "num_lower_layers": 1, "num_upper_layers": 1, "num_upper_groups": 1,
  "sliding_window": 8, "chunk_size": 8, "chunk_topk": 2, "retrieval_dim": 16,
  "encoder_layers": 0, "rms_norm_eps": 1e-5, "layer_norm_epsilon": 1e-5,
  "initializer_range": 0.05, "rope_theta": 10000.0, "max_position_embeddings": 128,
  "enable_softmax": true, "enable_qk_norm": true, "hsa_only": false,
  "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1
}"#;

#[test]
fn hsa_init_train_resume_export() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    model_from_config(p, HSA_CONFIG, 3);
    // `init` wrote the authors' layout.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.join("m/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "DRTForCausalLM");
    assert!(cfg.get("num_hidden_layers").is_none(), "{cfg}");
    let w = load_safetensors_dir(&p.join("m")).unwrap();
    assert!(w.contains_key("backbone.embeddings.weight"));
    assert!(
        w.contains_key("backbone.layers.1.proj_k.weight"),
        "chunking layer 1"
    );
    assert!(
        w.contains_key("backbone.layers.3.q_proj.weight"),
        "HSA block 3"
    );

    std::fs::write(p.join("a.toml"), run_config(10, "a")).unwrap();
    std::fs::write(p.join("b.toml"), run_config(10, "b")).unwrap();
    let straight = losses(&ok(p, &["train", "--config", "a.toml"]));
    assert_eq!(straight.len(), 10);
    assert!(
        straight[9] < straight[0] - 0.3,
        "the HSA model does not learn: {straight:?}"
    );
    let leg1 = ["train", "--config", "b.toml", "--stop-after-steps", "5"];
    let first = losses(&ok(p, &leg1));
    let second = losses(&ok(p, &["train", "--config", "b.toml", "--resume"]));
    let joined: Vec<f64> = first.into_iter().chain(second).collect();
    assert_eq!(straight, joined, "losses must be bitwise identical");
    let (arch, wa, oa) = load_full(&p.join("a/checkpoints/step-00000010")).unwrap();
    assert!(arch.is_hsa());
    let (_, wb, ob) = load_full(&p.join("b/checkpoints/step-00000010")).unwrap();
    assert_eq!(wa, wb, "weights must be bitwise identical");
    assert!(oa == ob, "Adam state must be bitwise identical");

    // Two data-parallel ranks (one sequence each of the micro-batch) equal one rank: the same
    // losses within f32 summation order.
    let two = losses(&mpirun_ok(
        p,
        2,
        &[
            "train",
            "--config",
            "a.toml",
            "--set",
            "train.out_dir=\"dp2\"",
        ],
    ));
    assert_eq!(two.len(), 10);
    for (x, y) in straight.iter().zip(&two) {
        assert!(
            (x - y).abs() < 1e-4 * x.abs(),
            "dp 2 {two:?} vs 1 {straight:?}"
        );
    }

    // Export: their layout again, and it trains from there.
    ok(
        p,
        &[
            "export",
            "--checkpoint",
            "a",
            "--out",
            "hf",
            "--dtype",
            "f32",
        ],
    );
    assert_eq!(load_safetensors_dir(&p.join("hf")).unwrap(), wa);
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.join("hf/config.json")).unwrap()).unwrap();
    assert!(e.get("num_hidden_layers").is_none());
    assert_eq!(e["chunk_topk"], 2);
    assert_eq!(e["enable_softmax"], true);
    let again = losses(&ok(
        p,
        &[
            "train",
            "--config",
            "a.toml",
            "--set",
            "model.path=\"hf\"",
            "--set",
            "train.out_dir=\"c\"",
            "--set",
            "train.steps=2",
        ],
    ));
    assert_eq!(again.len(), 2);
    assert!(again[0] < straight[0], "{again:?} starts where a ended");
}

#[test]
fn hsa_refusals_name_the_key() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    model_from_config(p, HSA_CONFIG, 3);
    std::fs::write(p.join("a.toml"), run_config(2, "a")).unwrap();
    fails_with(
        p,
        &["train", "--config", "a.toml", "--set", "train.seq_len=36"],
        &["train.seq_len", "36", "chunk_size 8"],
    );
    fails_with(
        p,
        &["train", "--config", "a.toml", "--backend", "cuda"],
        &["HSA", "CPU backend"],
    );
}

/// The CLS chunk encoder's tensors (a 3-D `cls_emb`, biases) go through init, training,
/// checkpoints and export like the rest.
#[test]
fn hsa_with_the_chunk_encoder_trains_and_exports() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let cfg = HSA_CONFIG.replace(
        "\"encoder_layers\": 0,",
        "\"encoder_layers\": 1, \"enable_enc_cls\": true, \"enc_prenorm\": true,",
    );
    model_from_config(p, &cfg, 3);
    let w = load_safetensors_dir(&p.join("m")).unwrap();
    assert_eq!(w["backbone.layers.1.cls_emb"].shape, vec![1, 1, 32]);
    assert!(w.contains_key("backbone.layers.1.encoder.layers.0.self_attn.q_proj.bias"));
    std::fs::write(p.join("a.toml"), run_config(4, "a")).unwrap();
    let l = losses(&ok(p, &["train", "--config", "a.toml"]));
    assert_eq!(l.len(), 4);
    assert!(l[3] < l[0], "{l:?}");
    ok(
        p,
        &[
            "export",
            "--checkpoint",
            "a",
            "--out",
            "hf",
            "--dtype",
            "f32",
        ],
    );
    let (_, wa, _) = load_full(&p.join("a/checkpoints/step-00000004")).unwrap();
    assert_eq!(load_safetensors_dir(&p.join("hf")).unwrap(), wa);
    let e = std::fs::read_to_string(p.join("hf/config.json")).unwrap();
    assert!(e.contains("\"enable_enc_cls\": true"), "{e}");
}
