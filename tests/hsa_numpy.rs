//! The HSA model's logits against bench/np_hsa_check.py, an independent float64 numpy
//! implementation of HSA.md: a tiny random model is written as an HF-layout directory
//! (config.json + model.safetensors in F64), our f64 CPU logits beside it, and the script must
//! agree to 1e-5 relative. Needs python3 with numpy (`make deps` installs it into .venv).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use ultralong::backend::Backend;
use ultralong::backend::cpu::CpuBackend;
use ultralong::model::hsa::config::HsaConfig;
use ultralong::model::hsa::model::{Head, HsaModel};
use ultralong::util::gradcheck::test_values;

/// A python with numpy: $ULTRALONG_PYTHON, the repository's .venv, or python3 on PATH.
fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates: Vec<PathBuf> = std::env::var_os("ULTRALONG_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([root.join(".venv/bin/python"), PathBuf::from("python3")])
        .collect();
    for p in &candidates {
        let ok = Command::new(p)
            .args(["-c", "import numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return p.clone();
        }
    }
    panic!(
        "no python with numpy among {candidates:?}: run `make deps` (or `python3 -m venv .venv && \
         .venv/bin/pip install numpy`), or set ULTRALONG_PYTHON"
    );
}

/// safetensors with F64 tensors, written by hand (the project's writer stores f32/bf16/f16).
fn write_f64_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f64>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape, data) in tensors {
        let n = data.len() * 8;
        header.insert(
            name.clone(),
            json!({"dtype": "F64", "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    for (_, _, data) in tensors {
        data.iter()
            .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
    }
    std::fs::write(path, bytes).unwrap();
}

fn check(extra: Value, seed: u64) {
    check_tol(extra, seed, 1e-5)
}

/// `check` at tolerance `tol` (both sides are f64, so far below 1e-5 is meaningful: an encoder
/// norm eps of 1e-5 instead of their 1e-6 moves these logits by only ~3e-6 relative).
fn check_tol(extra: Value, seed: u64, tol: f64) {
    let mut c = json!({
        "architectures": ["DRTForCausalLM"], "model_type": "llama",
        "vocab_size": 40, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_kv_heads": 2, "intermediate_size": 48, "rms_norm_eps": 1e-5,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.25,
        "num_lower_layers": 2, "num_upper_layers": 2, "num_upper_groups": 2,
        "sliding_window": 6, "chunk_size": 8, "chunk_topk": 3, "retrieval_dim": 16,
        "encoder_layers": 0, "max_position_embeddings": 4096, "rope_theta": 10000.0
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    let text = c.to_string();
    let cfg = HsaConfig::from_json_str(&text, "np-check").unwrap();
    let b = CpuBackend::<f64>::new();
    let mut m = HsaModel::init_random(&b, cfg, seed).unwrap();
    for (i, (s, buf)) in m
        .params
        .specs
        .iter()
        .zip(m.params.bufs.iter_mut())
        .enumerate()
    {
        if s.is_norm {
            let v: Vec<f64> = test_values(s.numel(), 200 + i as u64)
                .iter()
                .map(|x| 1.0 + 0.5 * x)
                .collect();
            *buf = b.upload_f64(&v);
        }
    }
    let t = 64;
    let pos0 = 5;
    let ids: Vec<u32> = (0..t as u64)
        .map(|i| (ultralong::util::rng::uniform(seed, 9, i) * 40.0) as u32)
        .collect();
    let logits = m
        .forward_backward(&b, &ids, pos0, Head::Logits, None)
        .unwrap()
        .1;

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("config.json"), &text).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<f64>)> = m
        .params
        .specs
        .iter()
        .zip(&m.params.bufs)
        .map(|(s, buf)| (s.name.clone(), s.shape.clone(), b.download_f64(buf)))
        .collect();
    write_f64_safetensors(&d.join("model.safetensors"), &tensors);
    std::fs::write(
        d.join("ids.json"),
        json!({"ids": ids, "pos0": pos0}).to_string(),
    )
    .unwrap();
    let raw: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(d.join("logits.f64"), raw).unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/np_hsa_check.py");
    let out = Command::new(python())
        .arg(&script)
        .arg("--model")
        .arg(d)
        .arg("--ids")
        .arg(d.join("ids.json"))
        .arg("--logits")
        .arg(d.join("logits.f64"))
        .args(["--tol", &tol.to_string()])
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    let se = String::from_utf8_lossy(&out.stderr);
    eprintln!("{extra}: {so}{se}");
    assert!(out.status.success(), "{extra}: numpy disagrees: {so}{se}");
}

#[test]
fn logits_match_numpy_softmax_fusion_all_options() {
    check(
        json!({
            "enable_softmax": true, "enable_softmax1": true, "enable_qk_norm": true,
            "enable_lmk_norm": true, "hsa_only": false, "hsa_sliding_window": 4,
            "reset_hsa_residual": true
        }),
        1,
    );
}

#[test]
fn logits_match_numpy_stick_breaking_masked_window() {
    check(
        json!({
            "enable_softmax": false, "hsa_only": true, "mask_slide_window": true,
            "sliding_window": 10
        }),
        2,
    );
}

/// The CLS chunk encoder: one block with `enc_prenorm`, every HSA option on.
#[test]
fn logits_match_numpy_encoder_1_cls_prenorm_all_options() {
    check_tol(
        json!({
            "encoder_layers": 1, "enc_prenorm": true,
            "enable_softmax": true, "enable_softmax1": true, "enable_qk_norm": true,
            "enable_lmk_norm": true, "hsa_only": false, "hsa_sliding_window": 4
        }),
        4,
        1e-12,
    );
}

/// Two encoder blocks: with the CLS landmark, and with the mean of the chunk's outputs.
#[test]
fn logits_match_numpy_encoder_2() {
    check_tol(json!({"encoder_layers": 2}), 5, 1e-12);
    check_tol(
        json!({"encoder_layers": 2, "enable_enc_cls": false, "enable_softmax": true}),
        6,
        1e-12,
    );
}

#[test]
fn logits_match_numpy_defaults() {
    check(json!({}), 3);
}
