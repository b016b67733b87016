//! Tensor parallelism of the HSA model (src/model/hsa/ctx.rs, `HsaModel::forward_backward_tp`):
//! ranks as threads in f64, the training path (`HsaRun`, then the optimizer's gradient rule
//! `all_reduce_grads`) under tp 2 and tp 2 × dp 2 gives one rank's loss and every parameter's
//! gradient (gathered whole with `ParamSpec::join_shards`); and through the binary, `mpirun -np 2
//! ... parallel.tp=2` trains as one rank does and its checkpoint resumes on one rank.

mod common;
use common::*;

use std::collections::BTreeMap;

use serde_json::{Value, json};
use ultralong::backend::Backend;
use ultralong::backend::cpu::CpuBackend;
use ultralong::io::TensorMap;
use ultralong::model::hsa::config::HsaConfig;
use ultralong::model::hsa::model::Head;
use ultralong::model::hsa::params::Layout;
use ultralong::model::params::ParamStore;
use ultralong::parallel::any::AnyComm;
use ultralong::parallel::comm::Comm;
use ultralong::parallel::thread::ThreadComm;
use ultralong::parallel::topology::Topology;
use ultralong::train::model::{HsaRun, TrainModel};
use ultralong::train::step::{GlobalBatch, all_reduce_grads};
use ultralong::util::gradcheck::test_values;

/// Two groups (G = 2), four query heads over two SWA KV heads, two retrieval/HSA groups.
fn tiny(extra: Value) -> HsaConfig {
    let mut c = json!({
        "architectures": ["DRTForCausalLM"], "model_type": "llama",
        "vocab_size": 16, "hidden_size": 24, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_kv_heads": 2, "intermediate_size": 24, "rms_norm_eps": 1e-5,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.4,
        "num_lower_layers": 1, "num_upper_layers": 2, "num_upper_groups": 2,
        "sliding_window": 5, "chunk_size": 4, "chunk_topk": 2, "retrieval_dim": 8,
        "encoder_layers": 0, "max_position_embeddings": 256, "rope_theta": 10000.0
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    HsaConfig::from_json_str(&c.to_string(), "tiny").unwrap()
}

/// Full f64 weights by name: random, norms (and biases) away from 1 so their gradients count.
fn weights(cfg: &HsaConfig) -> TensorMap {
    let b = CpuBackend::<f64>::new();
    let lay = Layout::new(cfg);
    let mut p = lay.init_random(&b, cfg.initializer_range, 7);
    for (i, (s, buf)) in p.specs.iter().zip(p.bufs.iter_mut()).enumerate() {
        if s.is_norm {
            let v: Vec<f64> = test_values(s.numel(), 100 + i as u64)
                .iter()
                .map(|x| 1.0 + 0.3 * x)
                .collect();
            *buf = b.upload_f64(&v);
        }
    }
    p.to_host(&b)
}

/// Two sequences of 16 tokens (four chunks), some targets not counted.
fn batch() -> Vec<(Vec<u32>, Vec<i32>)> {
    (0..2u32)
        .map(|k| {
            let ids: Vec<u32> = (0..16u32).map(|i| (i * 7 + 3 + 5 * k) % 16).collect();
            let mut t: Vec<i32> = ids[1..].iter().map(|&i| i as i32).collect();
            t.push(-1);
            t[4 + k as usize] = -1;
            (ids, t)
        })
        .collect()
}

type Grads = BTreeMap<String, Vec<f64>>;

/// The batch's mean loss, the full gradient of every tensor and the first sequence's logits
/// (`Head::Logits`, gathered over the vocabulary shards) under (tp, dp), from rank 0.
fn run_layout(cfg: &HsaConfig, host: &TensorMap, tp: usize, dp: usize) -> (f64, Grads, Vec<f64>) {
    let seqs = batch();
    let mut out = ThreadComm::run(tp * dp, |world: AnyComm| {
        let b = CpuBackend::<f64>::new();
        let topo = Topology::new(&world, tp, 1).unwrap();
        let specs = Layout::new(cfg).specs;
        let params =
            ParamStore::from_host_specs(&b, &specs, &[], host, "test", topo.shard()).unwrap();
        let mut run = HsaRun::new(&topo, cfg.clone(), params, 16).unwrap();
        let mut g = run.params().zeros_like(&b);
        let gb = GlobalBatch {
            seqs: &seqs,
            pos0: 3,
        };
        let loss = run
            .forward_backward_batch(&b, &topo, gb, Some(&mut g))
            .unwrap();
        all_reduce_grads(&b, &topo, &mut g);
        let n = topo.tp.size();
        let grads: Grads = g
            .specs
            .iter()
            .zip(&g.bufs)
            .map(|(s, buf)| {
                let local = b.download_f64(buf);
                let mut all = vec![0.0; local.len() * n];
                topo.tp.all_gather(&local, &mut all);
                (s.name.clone(), s.join_shards(&all, n))
            })
            .collect();
        let (_, logits) = run
            .model
            .forward_backward_tp(&b, &topo.tp, &seqs[0].0, 3, Head::Logits, None)
            .unwrap();
        (loss, grads, logits)
    });
    out.swap_remove(0)
}

fn check(extra: Value) {
    let cfg = tiny(extra.clone());
    let host = weights(&cfg);
    let (l1, g1, z1) = run_layout(&cfg, &host, 1, 1);
    for (tp, dp) in [(2, 1), (2, 2)] {
        let (l, g, z) = run_layout(&cfg, &host, tp, dp);
        assert_eq!(z.len(), z1.len());
        let ez = z
            .iter()
            .zip(&z1)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(
            ez < 1e-12,
            "{extra} tp {tp} dp {dp}: logits differ by {ez:e}"
        );
        let el = (l - l1).abs() / l1.abs();
        assert!(el < 1e-12, "{extra} tp {tp} dp {dp}: loss {l} vs {l1}");
        let mut worst = (0.0f64, String::new());
        assert_eq!(g.len(), g1.len());
        for (name, a) in &g {
            let r = &g1[name];
            assert_eq!(a.len(), r.len(), "{name}");
            let scale = r.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{extra}: {name} has no gradient");
            let e = a
                .iter()
                .zip(r)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max)
                / scale;
            assert!(e < 1e-12, "{extra} tp {tp} dp {dp}: {name}: error {e:e}");
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
        eprintln!(
            "HSA tp {tp} × dp {dp} {extra}: loss error {el:.1e}, logits {ez:.1e}, {} tensors, \
             worst gradient error {:.1e} in {}",
            g.len(),
            worst.0,
            worst.1
        );
    }
}

/// The CLS chunk encoder (replicated over TP), every option on, the SWA sub-block in the HSA
/// blocks.
#[test]
fn tp2_equals_one_rank_encoder_softmax_all_options() {
    check(json!({
        "encoder_layers": 1, "enc_prenorm": true,
        "enable_softmax": true, "enable_softmax1": true, "enable_qk_norm": true,
        "enable_lmk_norm": true, "hsa_only": false, "hsa_sliding_window": 3,
        "reset_hsa_residual": true
    }));
}

/// Stick-breaking fusion with the mean landmark.
#[test]
fn tp2_equals_one_rank_stick_breaking_mean_landmark() {
    check(json!({
        "enable_softmax": false, "hsa_only": false, "reset_hsa_residual": false,
        "enable_qk_norm": true, "mask_slide_window": true, "sliding_window": 2
    }));
}

/// tp must divide the groups: G = 1 under tp 2 is refused, naming `num_kv_heads`.
#[test]
fn tp_must_divide_the_groups() {
    let cfg = tiny(json!({"num_kv_heads": 1, "retrieval_dim": 4}));
    let host = weights(&cfg);
    let errs = ThreadComm::run(2, |world: AnyComm| {
        let b = CpuBackend::<f64>::new();
        let topo = Topology::new(&world, 2, 1).unwrap();
        let specs = Layout::new(&cfg).specs;
        let params =
            ParamStore::from_host_specs(&b, &specs, &[], &host, "test", topo.shard()).unwrap();
        match HsaRun::new(&topo, cfg.clone(), params, 16) {
            Ok(_) => String::new(),
            Err(e) => format!("{e:#}"),
        }
    });
    for e in errs {
        assert!(e.contains("num_kv_heads") && e.contains("tp = 2"), "{e}");
    }
}

/// Two groups and the CLS chunk encoder, shaped for the binary's tokenizer (vocab 384).
const HSA_TP_CONFIG: &str = r#"{
  "architectures": ["DRTForCausalLM"], "model_type": "llama",
  "vocab_size": 384, "hidden_size": 32, "intermediate_size": 64,
  "num_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2,
  "num_lower_layers": 1, "num_upper_layers": 2, "num_upper_groups": 2,
  "sliding_window": 8, "chunk_size": 8, "chunk_topk": 2, "retrieval_dim": 16,
  "encoder_layers": 1, "enable_enc_cls": true, "enc_prenorm": true,
  "rms_norm_eps": 1e-5, "layer_norm_epsilon": 1e-5,
  "initializer_range": 0.05, "rope_theta": 10000.0, "max_position_embeddings": 128,
  "enable_softmax": true, "enable_qk_norm": true, "enable_lmk_norm": true, "hsa_only": false,
  "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1
}"#;

/// `mpirun -np 2 ... parallel.tp=2` trains as one rank does (f32: within 1e-4 relative), and its
/// checkpoint (TP shards) resumes on one rank, continuing the same losses.
#[test]
fn tp2_through_the_binary_matches_one_rank_and_resumes_on_tp1() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    model_from_config(p, HSA_TP_CONFIG, 3);
    std::fs::write(p.join("a.toml"), run_config(10, "a")).unwrap();
    let straight = losses(&ok(p, &["train", "--config", "a.toml"]));
    assert_eq!(straight.len(), 10);
    assert!(straight[9] < straight[0] - 0.3, "{straight:?}");
    let tp2 = [
        "train",
        "--config",
        "a.toml",
        "--set",
        "parallel.tp=2",
        "--set",
        "train.out_dir=\"t\"",
    ];
    let mut leg1 = tp2.to_vec();
    leg1.extend(["--stop-after-steps", "5"]);
    let first = losses(&mpirun_ok(p, 2, &leg1));
    assert_eq!(first.len(), 5);
    let second = losses(&ok(
        p,
        &[
            "train",
            "--config",
            "a.toml",
            "--set",
            "train.out_dir=\"t\"",
            "--resume",
        ],
    ));
    let joined: Vec<f64> = first.into_iter().chain(second).collect();
    assert_eq!(joined.len(), 10);
    let worst = straight
        .iter()
        .zip(&joined)
        .map(|(x, y)| (x - y).abs() / x.abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-4,
        "tp 2 then tp 1 {joined:?} vs one rank {straight:?}"
    );
    eprintln!(
        "HSA tp 2 (5 steps) then tp 1 (5 steps) vs one rank: worst relative loss error {worst:.1e}"
    );
}

/// `train` refuses, before the ranks start, a tp that does not divide the groups.
#[test]
fn train_refuses_tp_that_does_not_divide_the_groups() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let cfg = HSA_TP_CONFIG.replace("\"num_kv_heads\": 2", "\"num_kv_heads\": 1");
    model_from_config(p, &cfg, 3);
    std::fs::write(p.join("a.toml"), run_config(2, "a")).unwrap();
    let args = ["train", "--config", "a.toml", "--set", "parallel.tp=2"];
    let o = mpirun(p, 2, &args, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("num_kv_heads") && err.contains("parallel.tp = 2"),
        "{err}"
    );
}
