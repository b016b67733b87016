//! A checkpoint in the HSA authors' own layout (tests/fixtures/hsa_authors, written by
//! bench/make_hsa_authors_fixture.py with torch): `pytorch_model.bin` from torch.save, config.json
//! with model_type "llama", their extra keys and no num_hidden_layers, `backbone.*` names, the CLS
//! chunk encoder. It loads, and its logits equal the independent numpy model's
//! (bench/np_hsa_check.py, float64) on the same weights; `eval ppl` reads it through the binary.

mod common;
use common::*;

use std::path::PathBuf;

use ultralong::backend::cpu::CpuBackend;
use ultralong::io::MappedTensors;
use ultralong::model::arch::ArchConfig;
use ultralong::model::hsa::model::{Head, HsaModel};
use ultralong::model::params::Shard;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hsa_authors")
}

#[test]
fn the_authors_checkpoint_loads_and_gives_the_numpy_logits() {
    let dir = fixture();
    let arch = ArchConfig::from_file(&dir.join("config.json")).unwrap();
    let ArchConfig::Hsa(cfg) = arch.clone() else {
        panic!("DRTForCausalLM must select the HSA model")
    };
    assert_eq!(cfg.encoder_layers, 1);
    let b = CpuBackend::<f64>::new();
    let files = MappedTensors::open_dir(&dir).unwrap();
    let params = arch
        .params_from_files(&b, &files, "fixture", Shard::WHOLE)
        .unwrap();
    let m = HsaModel::new(cfg, params).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(want["ids"].clone()).unwrap();
    let rows: Vec<Vec<f64>> = serde_json::from_value(want["logits"].clone()).unwrap();
    let (_, got) = m.forward_backward(&b, &ids, 0, Head::Logits, None).unwrap();
    let flat: Vec<f64> = rows.concat();
    assert_eq!(got.len(), flat.len());
    let scale = flat.iter().fold(0f64, |a, x| a.max(x.abs()));
    let err = got
        .iter()
        .zip(&flat)
        .fold(0f64, |a, (x, y)| a.max((x - y).abs()))
        / scale;
    assert!(err < 1e-12, "max |ours - numpy| / max |numpy| = {err:e}");
}

#[test]
fn the_binary_evaluates_the_authors_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..64).map(|i| (i * 11 + 3) % 47).collect();
    std::fs::write(
        d.path().join("t.json"),
        serde_json::to_string(&ids).unwrap(),
    )
    .unwrap();
    let m = fixture().display().to_string();
    ok(
        d.path(),
        &[
            "eval",
            "ppl",
            "--model",
            &m,
            "--text",
            "t.json",
            "--seq-len",
            "64",
            "--out",
            "p",
        ],
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("p/ppl.json")).unwrap())
            .unwrap();
    assert!(j["mean_loss"].as_f64().unwrap().is_finite());
}

/// `forward --out` on the authors' checkpoint writes the numpy model's logits.
#[test]
fn forward_writes_the_numpy_logits() {
    let d = tempfile::tempdir().unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap())
            .unwrap();
    std::fs::write(d.path().join("ids.json"), want["ids"].to_string()).unwrap();
    let m = fixture().display().to_string();
    let out = ok(
        d.path(),
        &[
            "forward",
            "--model",
            &m,
            "--tokens",
            "ids.json",
            "--precision",
            "f64",
            "--out",
            "l.safetensors",
        ],
    );
    assert!(out.contains("\"model\":\"HSA\""), "{out}");
    let got = ultralong::io::load_safetensors_file(&d.path().join("l.safetensors")).unwrap();
    let rows: Vec<Vec<f64>> = serde_json::from_value(want["logits"].clone()).unwrap();
    let flat = rows.concat();
    let g = &got["logits"].data;
    let scale = flat.iter().fold(0f64, |a, x| a.max(x.abs()));
    let err = g
        .iter()
        .zip(&flat)
        .fold(0f64, |a, (&x, y)| a.max((x as f64 - y).abs()))
        / scale;
    assert!(err < 1e-6, "{err:e}");
}
