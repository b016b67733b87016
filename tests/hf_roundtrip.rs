//! HF layout round trip: init, load, save, load gives identical tensors and config; sharded
//! saves load to the same model.

use ultralong::backend::cpu::CpuBackend;
use ultralong::io::{DType, load_safetensors_dir};
use ultralong::model::config::ModelConfig;
use ultralong::model::llama::Llama;
use ultralong::model::params::ParamStore;
use ultralong::model::rope::RopePrecision;

const CFG: &str = r#"{"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
  "num_attention_heads": 4, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
  "max_position_embeddings": 1048576, "model_type": "llama", "some_unknown_key": [1, 2],
  "rope_scaling": {"rope_type": "yarn", "factor": 128.0, "original_max_position_embeddings": 8192,
                   "beta_fast": 4.0, "beta_slow": 1.0}}"#;

#[test]
fn init_load_save_load_is_identical() {
    let d = tempfile::tempdir().unwrap();
    let b = CpuBackend::<f32>::new();
    let cfg = ModelConfig::from_json_str(CFG, "test").unwrap();
    let m0 = Llama::new(
        cfg,
        RopePrecision::Exact,
        ParamStore::init_random(&b, &ModelConfig::from_json_str(CFG, "t").unwrap(), 4),
    )
    .unwrap();
    m0.save(&b, &d.path().join("a"), DType::F32, None).unwrap();
    let m1 = Llama::load(&b, &d.path().join("a"), RopePrecision::Exact).unwrap();
    m1.save(&b, &d.path().join("b"), DType::F32, None).unwrap();
    let m2 = Llama::load(&b, &d.path().join("b"), RopePrecision::Exact).unwrap();
    assert_eq!(m0.params.to_host(&b), m2.params.to_host(&b));
    assert_eq!(m1.cfg.rope_scaling, m2.cfg.rope_scaling);
    assert_eq!(m0.cfg.rope_scaling, m2.cfg.rope_scaling);
    let ca = std::fs::read(d.path().join("a/config.json")).unwrap();
    let cb = std::fs::read(d.path().join("b/config.json")).unwrap();
    assert_eq!(ca, cb, "config.json must survive a round trip unchanged");
    let fa = std::fs::read(d.path().join("a/model.safetensors")).unwrap();
    let fb = std::fs::read(d.path().join("b/model.safetensors")).unwrap();
    assert!(fa == fb, "model.safetensors must be byte-identical");
    assert!(
        String::from_utf8_lossy(&ca).contains("some_unknown_key"),
        "unknown keys survive"
    );
}

#[test]
fn sharded_and_bf16_saves_load_back() {
    let d = tempfile::tempdir().unwrap();
    let b = CpuBackend::<f32>::new();
    let cfg = ModelConfig::from_json_str(CFG, "test").unwrap();
    let params = ParamStore::init_random(&b, &cfg, 4);
    let host = params.to_host(&b);
    ultralong::io::save_safetensors_dir(&d.path().join("s"), &host, DType::F32, 20_000).unwrap();
    assert!(d.path().join("s/model.safetensors.index.json").exists());
    assert_eq!(load_safetensors_dir(&d.path().join("s")).unwrap(), host);
    // bf16: every value rounds to nearest-even bf16.
    ultralong::io::save_safetensors_dir(&d.path().join("h"), &host, DType::BF16, u64::MAX).unwrap();
    let back = load_safetensors_dir(&d.path().join("h")).unwrap();
    for (k, t) in &host {
        for (a, r) in t.data.iter().zip(&back[k].data) {
            assert_eq!(*r, half::bf16::from_f32(*a).to_f32(), "{k}");
        }
    }
}
