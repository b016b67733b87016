//! HSA incremental inference (src/model/hsa/infer.rs) against the full forward
//! (`HsaModel::forward_backward`, `Head::Logits`): the session's logits at every position, for a
//! prompt of any length followed by single steps or further blocks, equal the full forward's row
//! by row (f64, 1e-10), over configs that switch every option the session reads; a length that is
//! not a multiple of the chunk size against the first rows of a longer forward; f32; greedy
//! generation against argmax of repeated full forwards; the cached-prefix op variants against the
//! plain ops.

use serde_json::{Value, json};
use ultralong::backend::Backend;
use ultralong::backend::cpu::CpuBackend;
use ultralong::eval::generate::{Sampling, argmax, generate};
use ultralong::model::hsa::config::HsaConfig;
use ultralong::model::hsa::infer::HsaSession;
use ultralong::model::hsa::model::{Head, HsaModel};
use ultralong::model::hsa::ops::{self, Fusion, HsaShape, RetrievalShape, SwaShape};
use ultralong::util::gradcheck::test_values;

const VOCAB: usize = 16;

fn tiny(extra: Value) -> HsaConfig {
    let mut c = json!({
        "architectures": ["DRTForCausalLM"], "model_type": "llama",
        "vocab_size": VOCAB, "hidden_size": 16, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_kv_heads": 2, "intermediate_size": 24,
        "rms_norm_eps": 1e-5, "layer_norm_epsilon": 1e-5, "initializer_range": 0.5,
        "num_lower_layers": 1, "num_upper_layers": 2, "num_upper_groups": 2,
        "sliding_window": 5, "chunk_size": 4, "chunk_topk": 2, "retrieval_dim": 8,
        "encoder_layers": 0, "max_position_embeddings": 256, "rope_theta": 10000.0
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    HsaConfig::from_json_str(&c.to_string(), "tiny").unwrap()
}

/// A random model with its norm weights away from 1 (so every norm matters).
fn model<B: ultralong::model::hsa::ops::HsaOps>(b: &B, cfg: HsaConfig) -> HsaModel<B> {
    let mut m = HsaModel::init_random(b, cfg, 11).unwrap();
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
                .map(|x| 1.0 + 0.3 * x)
                .collect();
            *buf = b.upload_f64(&v);
        }
    }
    m
}

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 7 + 3 + i / 5) % VOCAB as u32)
        .collect()
}

/// Feed `ids` in blocks of `blocks` sizes (a 1 is a `step`), the rest one `step` at a time;
/// the logits of every position `[len, vocab]`.
fn session_logits<B: ultralong::model::hsa::ops::HsaOps>(
    b: &B,
    m: &HsaModel<B>,
    ids: &[u32],
    blocks: &[usize],
) -> Vec<f64> {
    let mut s = HsaSession::new(b, m).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    for &n in blocks {
        if n == 1 {
            out.extend(s.step(ids[at]).unwrap());
        } else {
            out.extend(s.extend(&ids[at..at + n]).unwrap());
        }
        at += n;
        assert_eq!(s.position(), at);
        assert_eq!(s.chunks(), at / m.cfg.chunk_size);
    }
    for &id in &ids[at..] {
        out.extend(s.step(id).unwrap());
    }
    out
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Prompt splits: all at once, none (steps only), 1, mid-chunk, chunk boundaries, and blocks
/// after a prompt that cross chunk boundaries with a warm cache.
const SPLITS: [&[usize]; 8] = [
    &[24],
    &[],
    &[1],
    &[3],
    &[4],
    &[8],
    &[6, 5, 1, 7],
    &[2, 1, 1, 9],
];

fn check_config(extra: Value) {
    let b = CpuBackend::<f64>::new();
    let m = model(&b, tiny(extra.clone()));
    let x = ids(24);
    let full = m.forward_backward(&b, &x, 0, Head::Logits, None).unwrap().1;
    let mut worst = 0.0f64;
    for split in SPLITS {
        let got = session_logits(&b, &m, &x, split);
        for t in 0..x.len() {
            let e = max_abs_diff(&got[t * VOCAB..][..VOCAB], &full[t * VOCAB..][..VOCAB]);
            assert!(
                e < 1e-10,
                "{extra} split {split:?}: position {t}: max |Δ| {e:e}"
            );
            worst = worst.max(e);
        }
    }
    // prefill returns the last row's logits.
    let mut s = HsaSession::new(&b, &m).unwrap();
    let last = s.prefill(&x[..11]).unwrap();
    worst = worst.max(max_abs_diff(&last, &full[10 * VOCAB..11 * VOCAB]));
    assert!(worst < 1e-10);
    eprintln!("HSA session vs full forward {extra}: max |Δlogit| {worst:.2e}");
}

#[test]
fn session_matches_full_forward_softmax_all_norms_swa_in_hsa_reset() {
    check_config(json!({
        "enable_softmax": true, "enable_softmax1": true, "enable_qk_norm": true,
        "enable_lmk_norm": true, "hsa_only": false, "hsa_sliding_window": 3,
        "reset_hsa_residual": true
    }));
}

/// The CLS chunk encoder: each completed chunk goes through it (`Ctx::chunk_memory`).
#[test]
fn session_matches_full_forward_cls_encoder() {
    check_config(json!({
        "hidden_size": 32, "encoder_layers": 1, "enable_enc_cls": true, "enc_prenorm": true,
        "enable_softmax": true, "enable_qk_norm": true
    }));
}

#[test]
fn session_matches_full_forward_stick_breaking_plain() {
    check_config(json!({"enable_softmax": false, "hsa_only": true}));
}

#[test]
fn session_matches_full_forward_mask_slide_window() {
    check_config(json!({
        "enable_softmax": true, "mask_slide_window": true, "sliding_window": 6,
        "enable_qk_norm": true, "hsa_only": false
    }));
    check_config(json!({
        "enable_softmax": false, "mask_slide_window": true, "sliding_window": 4,
        "enable_lmk_norm": true
    }));
}

#[test]
fn session_matches_full_forward_one_kv_head_more_slots_than_chunks() {
    // G = 1, top-k above the chunks of the sequence (every visible chunk is retrieved), three
    // SWA layers per group, one group.
    check_config(json!({
        "num_kv_heads": 1, "retrieval_dim": 4, "chunk_topk": 8, "num_upper_groups": 1,
        "num_upper_layers": 3, "enable_softmax": true, "enable_qk_norm": true
    }));
    check_config(json!({
        "num_kv_heads": 1, "retrieval_dim": 4, "chunk_topk": 8, "enable_softmax": false,
        "enable_softmax1": true, "reset_hsa_residual": true, "hsa_only": false
    }));
}

#[test]
fn lengths_off_the_chunk_grid_equal_the_first_rows_of_a_longer_forward() {
    let b = CpuBackend::<f64>::new();
    let m = model(
        &b,
        tiny(json!({"enable_softmax": true, "hsa_only": false, "enable_qk_norm": true})),
    );
    let x = ids(24);
    let full = m.forward_backward(&b, &x, 0, Head::Logits, None).unwrap().1;
    for (len, split) in [(22, &[22][..]), (13, &[5][..]), (7, &[][..]), (1, &[1][..])] {
        let got = session_logits(&b, &m, &x[..len], split);
        let e = max_abs_diff(&got, &full[..len * VOCAB]);
        eprintln!("length {len}: max |Δlogit| {e:.2e}");
        assert!(e < 1e-10, "length {len}: {e:e}");
    }
}

#[test]
fn session_runs_in_f32() {
    let cfg = tiny(json!({
        "enable_softmax": true, "enable_qk_norm": true, "enable_lmk_norm": true,
        "hsa_only": false, "hsa_sliding_window": 3
    }));
    let b64 = CpuBackend::<f64>::new();
    let m64 = model(&b64, cfg.clone());
    let b32 = CpuBackend::<f32>::new();
    let mut m32 = model(&b32, cfg);
    // The same weights (f32-rounded) in both.
    for (dst, src) in m32.params.bufs.iter_mut().zip(&m64.params.bufs) {
        let v: Vec<f64> = b64
            .download_f64(src)
            .iter()
            .map(|&x| x as f32 as f64)
            .collect();
        *dst = b32.upload_f64(&v);
    }
    let rounded: Vec<_> = m32
        .params
        .bufs
        .iter()
        .map(|x| b32.download_f64(x))
        .collect();
    let mut m64 = m64;
    for (dst, v) in m64.params.bufs.iter_mut().zip(&rounded) {
        *dst = b64.upload_f64(v);
    }
    let x = ids(20);
    let full = m64
        .forward_backward(&b64, &x, 0, Head::Logits, None)
        .unwrap()
        .1;
    let got = session_logits(&b32, &m32, &x, &[6]);
    let e = max_abs_diff(&got, &full);
    let scale = full.iter().fold(0.0f64, |a, &x| a.max(x.abs()));
    eprintln!("f32 session vs f64 full forward: max |Δlogit| {e:.2e} (max |logit| {scale:.2})");
    assert!(e < 1e-4 * scale.max(1.0), "{e:e}");
}

#[test]
fn greedy_generation_equals_argmax_of_full_forwards() {
    let b = CpuBackend::<f64>::new();
    let m = model(
        &b,
        tiny(json!({"enable_softmax": true, "hsa_only": false, "enable_qk_norm": true})),
    );
    let prompt = ids(6);
    let max_new = 14;
    // Reference: the full forward over the sequence so far, padded to the chunk grid after its
    // end (causal, so the pad never reaches the last real row).
    let mut seq = prompt.clone();
    let mut want = Vec::new();
    for _ in 0..max_new {
        let mut padded = seq.clone();
        padded.resize(seq.len().next_multiple_of(4), 0);
        let l = m
            .forward_backward(&b, &padded, 0, Head::Logits, None)
            .unwrap()
            .1;
        let row: Vec<f32> = l[(seq.len() - 1) * VOCAB..][..VOCAB]
            .iter()
            .map(|&x| x as f32)
            .collect();
        let tok = argmax(&row);
        want.push(tok);
        seq.push(tok);
    }
    let mut s = HsaSession::new(&b, &m).unwrap();
    let g = generate(&mut s, &prompt, max_new, &Sampling::Greedy, &[], true).unwrap();
    assert_eq!(g.tokens, want);
    assert!(!g.stopped);
    assert_eq!((g.decode_steps, g.logits.len()), (max_new - 1, max_new));
    assert_eq!(s.position(), prompt.len() + max_new - 1);
    // A stop token ends it after that token.
    let stop = want[4];
    let first = want.iter().position(|&t| t == stop).unwrap();
    let mut s = HsaSession::new(&b, &m).unwrap();
    let g = generate(&mut s, &prompt, max_new, &Sampling::Greedy, &[stop], false).unwrap();
    assert_eq!(g.tokens, want[..=first]);
    assert!(g.stopped && g.logits.is_empty());
}

#[test]
fn bad_input_and_unsupported_configs_are_errors() {
    let b = CpuBackend::<f64>::new();
    let m = model(&b, tiny(json!({})));
    let mut s = HsaSession::new(&b, &m).unwrap();
    let e = s.extend(&[1, 16]).unwrap_err().to_string();
    assert!(e.contains("token id 16"), "{e}");
    let e = s.extend(&[]).unwrap_err().to_string();
    assert!(e.contains("no tokens"), "{e}");
    assert_eq!(s.position(), 0);

    let m = model(
        &b,
        tiny(json!({"mask_slide_window": true, "sliding_window": 2})),
    );
    let e = HsaSession::new(&b, &m).err().unwrap().to_string();
    assert!(e.contains("sliding_window 2 < chunk_size 4"), "{e}");
}

/// The cached-prefix variants of the ops (queries at rows `cached..` / `row0..`, a memory of
/// `chunks` chunks) equal the last rows of the plain ops over the whole sequence.
#[test]
fn cached_prefix_ops_equal_the_tail_of_the_whole_sequence_ops() {
    let (n, hq, hk, d) = (23, 4, 2, 5);
    let (q, k, v) = (
        test_values(n * hq * d, 1),
        test_values(n * hk * d, 2),
        test_values(n * hk * d, 3),
    );
    for (window, m0) in [(4, 9), (30, 17), (0, 22)] {
        let s = SwaShape {
            len: n,
            cached: 0,
            n_q_heads: hq,
            n_kv_heads: hk,
            head_dim: d,
            window,
        };
        let (mut o, mut l) = (vec![0.0; n * hq * d], vec![0.0; hq * n]);
        ops::swa_forward(&q, &k, &v, &s, 0.6, &mut o, &mut l);
        let s2 = SwaShape {
            len: n - m0,
            cached: m0,
            ..s
        };
        let (mut o2, mut l2) = (vec![0.0; (n - m0) * hq * d], vec![0.0; hq * (n - m0)]);
        ops::swa_forward(&q[m0 * hq * d..], &k, &v, &s2, 0.6, &mut o2, &mut l2);
        assert_eq!(o2, o[m0 * hq * d..]);
        for h in 0..hq {
            assert_eq!(l2[h * (n - m0)..][..n - m0], l[h * n + m0..][..n - m0]);
        }
    }

    // Retrieval and HSA attention of rows row0.. against the first `chunks` chunks: equal to
    // the whole sequence's rows row0.. (whose later chunks are invisible to them) up to
    // slots that are empty in both.
    let (g, dr, chunk, nc) = (2, 3, 4, 6);
    let t = nc * chunk;
    let ql = test_values(t * g * dr, 4);
    let lmk = test_values(nc * g * dr, 5);
    for (mw, row0) in [(None, 13), (Some(5), 10), (None, 2)] {
        let rs = RetrievalShape {
            len: t,
            row0: 0,
            chunks: nc,
            heads: g,
            dim: dr,
            chunk,
            topk: 2,
            mask_window: mw,
        };
        let mut idx = vec![0; t * g * 2];
        let mut sc = vec![0.0; t * g * 2];
        ops::retrieval_select(&ql, &lmk, &rs, &mut idx, &mut sc);
        let rows = 3;
        let have = (row0 + rows - 1) / chunk; // chunks complete before the block's last row
        let rs2 = RetrievalShape {
            len: rows,
            row0,
            chunks: have,
            topk: 2.min(have),
            ..rs
        };
        let kk = rs2.topk;
        let mut idx2 = vec![0; rows * g * kk];
        let mut sc2 = vec![0.0; rows * g * kk];
        ops::retrieval_select(
            &ql[row0 * g * dr..][..rows * g * dr],
            &lmk[..have * g * dr],
            &rs2,
            &mut idx2,
            &mut sc2,
        );
        for r in 0..rows * g {
            assert_eq!(idx2[r * kk..][..kk], idx[(row0 * g + r) * 2..][..kk]);
            assert_eq!(sc2[r * kk..][..kk], sc[(row0 * g + r) * 2..][..kk]);
            assert!(
                sc[(row0 * g + r) * 2 + kk..][..2 - kk]
                    .iter()
                    .all(|x| x.is_infinite())
            );
        }
        // HSA attention of those rows over the memory of `have` chunks.
        let (hh, dh) = (4, 5);
        let qh = test_values(t * hh * dh, 6);
        let (km, vm) = (test_values(t * g * dh, 7), test_values(t * g * dh, 8));
        let mut w = vec![0.0; sc.len()];
        ops::fusion_forward(&sc, t * g, 2, Fusion::Softmax, &mut w);
        let hs = HsaShape {
            len: t,
            chunks: nc,
            n_q_heads: hh,
            n_kv_heads: g,
            head_dim: dh,
            chunk,
            topk: 2,
            softmax1: true,
        };
        let (mut o, mut l) = (vec![0.0; t * hh * dh], vec![0.0; t * hh * 2]);
        ops::hsa_forward(&qh, &km, &vm, &idx, &w, &hs, 0.7, &mut o, &mut l);
        let mut w2 = vec![0.0; sc2.len()];
        ops::fusion_forward(&sc2, rows * g, kk, Fusion::Softmax, &mut w2);
        let hs2 = HsaShape {
            len: rows,
            chunks: have,
            topk: kk,
            ..hs
        };
        let mem = have * chunk * g * dh;
        let mut o2 = vec![0.0; rows * hh * dh];
        let mut l2 = vec![0.0; rows * hh * kk];
        ops::hsa_forward(
            &qh[row0 * hh * dh..][..rows * hh * dh],
            &km[..mem],
            &vm[..mem],
            &idx2,
            &w2,
            &hs2,
            0.7,
            &mut o2,
            &mut l2,
        );
        assert_eq!(o2, o[row0 * hh * dh..][..rows * hh * dh], "row0 {row0}");
    }
}
