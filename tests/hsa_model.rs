//! The whole HSA model (src/model/hsa/model.rs) in f64: every parameter's gradient against
//! central finite differences of the loss, for tiny configs that between them switch every
//! option on and off (two with the mean landmark, two with the chunk encoder).

use serde_json::{Value, json};
use ultralong::backend::Backend;
use ultralong::backend::cpu::CpuBackend;
use ultralong::model::hsa::config::HsaConfig;
use ultralong::model::hsa::model::{Head, HsaModel};
use ultralong::util::gradcheck::{numeric_grad, rel_err, test_values};

fn tiny(extra: Value) -> HsaConfig {
    let mut c = json!({
        "architectures": ["DRTForCausalLM"], "model_type": "llama",
        "vocab_size": 16, "hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
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

fn model(b: &CpuBackend<f64>, cfg: HsaConfig) -> HsaModel<CpuBackend<f64>> {
    let mut m = HsaModel::init_random(b, cfg, 7).unwrap();
    // Norm weights away from 1 so their gradients are exercised.
    for (i, (s, buf)) in m
        .params
        .specs
        .iter()
        .zip(m.params.bufs.iter_mut())
        .enumerate()
    {
        if s.is_norm {
            let v: Vec<f64> = test_values(s.numel(), 100 + i as u64)
                .iter()
                .map(|x| 1.0 + 0.3 * x)
                .collect();
            *buf = b.upload_f64(&v);
        }
    }
    m
}

const T: usize = 16;

fn data() -> (Vec<u32>, Vec<i32>) {
    let ids: Vec<u32> = (0..T as u32).map(|i| (i * 7 + 3) % 16).collect();
    let mut targets: Vec<i32> = ids[1..].iter().map(|&i| i as i32).collect();
    targets.push(-1);
    targets[4] = -1;
    (ids, targets)
}

fn check(extra: Value) {
    let b = CpuBackend::<f64>::new();
    let mut m = model(&b, tiny(extra.clone()));
    let (ids, targets) = data();
    let n = targets.iter().filter(|&&t| t >= 0).count() as f64;
    let head = || Head::Loss {
        targets: &targets,
        grad_scale: 1.0 / n,
    };
    let mut g = m.layout.zeros(&b);
    m.forward_backward(&b, &ids, 3, head(), Some(&mut g))
        .unwrap();
    let mut worst = (0.0f64, String::new());
    for i in 0..m.params.bufs.len() {
        let x0 = b.download_f64(&m.params.bufs[i]);
        let mut f = |x: &[f64]| {
            m.params.bufs[i] = b.upload_f64(x);
            m.forward_backward(&b, &ids, 3, head(), None).unwrap().0 / n
        };
        let num = numeric_grad(&mut f, &x0, 1e-5);
        m.params.bufs[i] = b.upload_f64(&x0);
        let a = b.download_f64(&g.bufs[i]);
        let e = rel_err(&a, &num);
        let name = &m.params.specs[i].name;
        assert!(
            num.iter().any(|&v| v != 0.0),
            "{extra}: {name} has no gradient at all"
        );
        assert!(e < 1e-6, "{extra}: {name}: relative error {e:e}");
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    eprintln!(
        "HSA whole-model gradient check {extra}: {} tensors, worst relative error {:.2e} in {}",
        m.params.bufs.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn whole_model_gradient_softmax_fusion_all_norms_swa_in_hsa() {
    check(json!({
        "enable_softmax": true, "enable_softmax1": true, "enable_qk_norm": true,
        "enable_lmk_norm": true, "hsa_only": false, "hsa_sliding_window": 3,
        "reset_hsa_residual": true
    }));
}

#[test]
fn whole_model_gradient_stick_breaking_plain() {
    check(json!({
        "enable_softmax": false, "hsa_only": true, "reset_hsa_residual": false,
        "mask_slide_window": true, "sliding_window": 2
    }));
}

/// The CLS chunk encoder (src/model/hsa/encoder.rs; hidden_size 24, the least with a nonzero
/// encoder MLP): one block with `enc_prenorm`, the CLS landmark and every HSA option on.
#[test]
fn whole_model_gradient_encoder_1_cls_prenorm_all_options() {
    check(json!({
        "hidden_size": 24, "encoder_layers": 1, "enc_prenorm": true,
        "enable_softmax": true, "enable_softmax1": true, "enable_qk_norm": true,
        "enable_lmk_norm": true, "hsa_only": false, "hsa_sliding_window": 3,
        "reset_hsa_residual": true
    }));
}

/// Two encoder blocks without the CLS row (the landmark is the mean of the chunk's outputs) and
/// without prenorm.
#[test]
fn whole_model_gradient_encoder_2_mean_landmark() {
    check(json!({
        "hidden_size": 24, "encoder_layers": 2, "enable_enc_cls": false,
        "enable_softmax": true, "enable_qk_norm": true
    }));
}

#[test]
fn logits_depend_on_retrieved_chunks_only_through_the_past() {
    // Causality: changing the last chunk's tokens leaves the earlier logits unchanged.
    let b = CpuBackend::<f64>::new();
    let m = model(&b, tiny(json!({"enable_softmax": true, "hsa_only": false})));
    let (ids, _) = data();
    let l0 = m
        .forward_backward(&b, &ids, 0, Head::Logits, None)
        .unwrap()
        .1;
    let mut ids2 = ids.clone();
    ids2[T - 2] = (ids2[T - 2] + 5) % 16;
    let l1 = m
        .forward_backward(&b, &ids2, 0, Head::Logits, None)
        .unwrap()
        .1;
    let v = 16;
    assert_eq!(l0[..(T - 2) * v], l1[..(T - 2) * v]);
    assert_ne!(l0[(T - 2) * v..], l1[(T - 2) * v..]);
}

#[test]
fn bad_lengths_and_ids_are_errors() {
    let b = CpuBackend::<f64>::new();
    let m = model(&b, tiny(json!({})));
    let e = m
        .forward_backward(&b, &[1; 6], 0, Head::Logits, None)
        .unwrap_err();
    assert!(e.to_string().contains("multiple of chunk_size 4"), "{e}");
    let e = m
        .forward_backward(&b, &[16; 4], 0, Head::Logits, None)
        .unwrap_err();
    assert!(e.to_string().contains("token id 16"), "{e}");
}
