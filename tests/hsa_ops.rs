//! The HSA operations (src/model/hsa/ops.rs) in f64: every backward against central finite
//! differences of its forward, and every forward against a direct formula written here or
//! against the project's blockwise attention.

use ultralong::backend::AttnShape;
use ultralong::backend::cpu::attention::attention_forward;
use ultralong::model::hsa::ops::{
    self, BlockAttnShape, Fusion, HsaShape, RetrievalShape, SwaShape,
};
use ultralong::util::gradcheck::{numeric_grad, rel_err, test_values};

const H: f64 = 1e-6;

/// `Σ r ⊙ f(inputs)`'s gradient by finite differences, one input at a time.
fn fd(inputs: &[Vec<f64>], r: &[f64], f: &dyn Fn(&[Vec<f64>]) -> Vec<f64>) -> Vec<Vec<f64>> {
    (0..inputs.len())
        .map(|i| {
            let mut xs = inputs.to_vec();
            let mut g = |x: &[f64]| {
                xs[i] = x.to_vec();
                f(&xs).iter().zip(r).map(|(a, b)| a * b).sum()
            };
            numeric_grad(&mut g, &inputs[i], H)
        })
        .collect()
}

fn assert_grads(name: &str, analytic: &[Vec<f64>], numeric: &[Vec<f64>], tol: f64) {
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        let e = rel_err(a, n);
        eprintln!("{name} input {i}: relative error {e:.2e}");
        assert!(e < tol, "{name} input {i}: relative error {e:e}");
    }
}

#[test]
fn swa_forward_matches_direct_formula_and_blockwise_attention() {
    let (n, hq, hk, d) = (70, 4, 2, 6);
    let q = test_values(n * hq * d, 1);
    let k = test_values(n * hk * d, 2);
    let v = test_values(n * hk * d, 3);
    let scale = 0.7;
    for w in [0, 3, 65, 200] {
        let s = SwaShape {
            len: n,
            cached: 0,
            n_q_heads: hq,
            n_kv_heads: hk,
            head_dim: d,
            window: w,
        };
        let (mut out, mut lse) = (vec![0.0; n * hq * d], vec![0.0; hq * n]);
        ops::swa_forward(&q, &k, &v, &s, scale, &mut out, &mut lse);
        // The softmax over keys max(0, t−w) ..= t, written out.
        for t in 0..n {
            for h in 0..hq {
                let kh = h / (hq / hk);
                let js: Vec<usize> = (t.saturating_sub(w)..=t).collect();
                let a: Vec<f64> = js
                    .iter()
                    .map(|&j| {
                        scale
                            * (0..d)
                                .map(|x| q[(t * hq + h) * d + x] * k[(j * hk + kh) * d + x])
                                .sum::<f64>()
                    })
                    .collect();
                let z: f64 = a.iter().map(|x| x.exp()).sum();
                assert!((lse[h * n + t] - z.ln()).abs() < 1e-12);
                for x in 0..d {
                    let o: f64 = js
                        .iter()
                        .zip(&a)
                        .map(|(&j, &aj)| aj.exp() / z * v[(j * hk + kh) * d + x])
                        .sum();
                    assert!((out[(t * hq + h) * d + x] - o).abs() < 1e-12);
                }
            }
        }
        if w >= n {
            // A window covering the sequence is plain causal attention.
            let shape = AttnShape {
                q_len: n,
                kv_len: n,
                n_q_heads: hq,
                n_kv_heads: hk,
                head_dim: d,
                q_pos0: 0,
                k_pos0: 0,
                causal: true,
            };
            let (mut o2, mut l2) = (vec![0.0; n * hq * d], vec![0.0; hq * n]);
            attention_forward(&q, &k, &v, &shape, scale, &mut o2, &mut l2);
            assert!(rel_err(&out, &o2) < 1e-12 && rel_err(&lse, &l2) < 1e-12);
        }
    }
}

#[test]
fn swa_backward_matches_finite_differences() {
    let (n, hq, hk, d, w) = (13, 4, 2, 5, 3);
    let s = SwaShape {
        len: n,
        cached: 0,
        n_q_heads: hq,
        n_kv_heads: hk,
        head_dim: d,
        window: w,
    };
    let scale = 0.8;
    let inputs = vec![
        test_values(n * hq * d, 11),
        test_values(n * hk * d, 12),
        test_values(n * hk * d, 13),
    ];
    let fwd = |x: &[Vec<f64>]| {
        let (mut out, mut lse) = (vec![0.0; n * hq * d], vec![0.0; hq * n]);
        ops::swa_forward(&x[0], &x[1], &x[2], &s, scale, &mut out, &mut lse);
        (out, lse)
    };
    let r = test_values(n * hq * d, 14);
    let (out, lse) = fwd(&inputs);
    let (mut dq, mut dk, mut dv) = (
        vec![9.0; n * hq * d],
        vec![9.0; n * hk * d],
        vec![9.0; n * hk * d],
    );
    ops::swa_backward(
        &inputs[0], &inputs[1], &inputs[2], &out, &r, &lse, &s, scale, &mut dq, &mut dk, &mut dv,
    );
    let num = fd(&inputs, &r, &|x| fwd(x).0);
    assert_grads("swa", &[dq, dk, dv], &num, 1e-8);
}

fn block_shape(blocks: usize, len: usize) -> BlockAttnShape {
    BlockAttnShape {
        blocks,
        block_len: len,
        n_q_heads: 4,
        n_kv_heads: 2,
        head_dim: 6,
    }
}

/// The chunk encoder's attention: each row sees every row of its own block (both directions)
/// and none of another.
#[test]
fn block_attention_forward_matches_direct_formula_and_blockwise_attention() {
    let (blocks, len) = (3, 5);
    let s = block_shape(blocks, len);
    let (n, hq, hk, d) = (blocks * len, s.n_q_heads, s.n_kv_heads, s.head_dim);
    let q = test_values(n * hq * d, 61);
    let k = test_values(n * hk * d, 62);
    let v = test_values(n * hk * d, 63);
    let scale = 0.9;
    let (mut out, mut lse) = (vec![0.0; n * hq * d], vec![0.0; hq * n]);
    ops::block_attention_forward(&q, &k, &v, &s, scale, &mut out, &mut lse);
    for t in 0..n {
        for h in 0..hq {
            let kh = h / (hq / hk);
            let js: Vec<usize> = (t / len * len..(t / len + 1) * len).collect();
            let a: Vec<f64> = js
                .iter()
                .map(|&j| {
                    scale
                        * (0..d)
                            .map(|x| q[(t * hq + h) * d + x] * k[(j * hk + kh) * d + x])
                            .sum::<f64>()
                })
                .collect();
            let z: f64 = a.iter().map(|x| x.exp()).sum();
            assert!((lse[h * n + t] - z.ln()).abs() < 1e-12);
            for x in 0..d {
                let o: f64 = js
                    .iter()
                    .zip(&a)
                    .map(|(&j, &aj)| aj.exp() / z * v[(j * hk + kh) * d + x])
                    .sum();
                assert!((out[(t * hq + h) * d + x] - o).abs() < 1e-12);
            }
        }
    }
    // Each block alone through the project's blockwise attention, non-causal.
    let shape = AttnShape {
        q_len: len,
        kv_len: len,
        n_q_heads: hq,
        n_kv_heads: hk,
        head_dim: d,
        q_pos0: 0,
        k_pos0: 0,
        causal: false,
    };
    for c in 0..blocks {
        let (qr, kr) = (len * hq * d, len * hk * d);
        let (mut o2, mut l2) = (vec![0.0; qr], vec![0.0; hq * len]);
        attention_forward(
            &q[c * qr..(c + 1) * qr],
            &k[c * kr..(c + 1) * kr],
            &v[c * kr..(c + 1) * kr],
            &shape,
            scale,
            &mut o2,
            &mut l2,
        );
        assert!(rel_err(&out[c * qr..(c + 1) * qr], &o2) < 1e-12);
        for h in 0..hq {
            let got = &lse[h * n + c * len..][..len];
            assert!(rel_err(got, &l2[h * len..(h + 1) * len]) < 1e-12);
        }
    }
}

#[test]
fn block_attention_backward_matches_finite_differences() {
    let (blocks, len) = (3, 5);
    let s = block_shape(blocks, len);
    let (n, hq, hk, d) = (blocks * len, s.n_q_heads, s.n_kv_heads, s.head_dim);
    let scale = 0.8;
    let inputs = vec![
        test_values(n * hq * d, 64),
        test_values(n * hk * d, 65),
        test_values(n * hk * d, 66),
    ];
    let fwd = |x: &[Vec<f64>]| {
        let (mut out, mut lse) = (vec![0.0; n * hq * d], vec![0.0; hq * n]);
        ops::block_attention_forward(&x[0], &x[1], &x[2], &s, scale, &mut out, &mut lse);
        (out, lse)
    };
    let r = test_values(n * hq * d, 67);
    let (out, lse) = fwd(&inputs);
    let (mut dq, mut dk, mut dv) = (
        vec![9.0; n * hq * d],
        vec![9.0; n * hk * d],
        vec![9.0; n * hk * d],
    );
    ops::block_attention_backward(
        &inputs[0], &inputs[1], &inputs[2], &out, &r, &lse, &s, scale, &mut dq, &mut dk, &mut dv,
    );
    let num = fd(&inputs, &r, &|x| fwd(x).0);
    assert_grads("block attention", &[dq, dk, dv], &num, 1e-8);
}

#[test]
fn chunk_mean_backward_matches_finite_differences() {
    let (rows, dim, chunk) = (12, 3, 4);
    let x = vec![test_values(rows * dim, 21)];
    let f = |x: &[Vec<f64>]| {
        let mut o = vec![0.0; rows / chunk * dim];
        ops::chunk_mean_forward(&x[0], rows, dim, chunk, &mut o);
        o
    };
    let o = f(&x);
    assert!((o[dim + 1] - (4..8).map(|r| x[0][r * dim + 1]).sum::<f64>() / 4.0).abs() < 1e-15);
    let r = test_values(o.len(), 22);
    let mut dx = vec![0.5; rows * dim];
    ops::chunk_mean_backward(&r, rows, dim, chunk, &mut dx);
    dx.iter_mut().for_each(|x| *x -= 0.5); // it accumulates
    assert_grads("chunk_mean", &[dx], &fd(&x, &r, &f), 1e-8);
}

fn rshape(n: usize, mask_window: Option<usize>) -> RetrievalShape {
    RetrievalShape {
        len: n,
        row0: 0,
        chunks: n / 4,
        heads: 2,
        dim: 4,
        chunk: 4,
        topk: 3,
        mask_window,
    }
}

fn select(x: &[Vec<f64>], s: &RetrievalShape) -> (Vec<u32>, Vec<f64>) {
    let m = s.len * s.heads * s.topk;
    let (mut idx, mut sc) = (vec![0; m], vec![0.0; m]);
    ops::retrieval_select(&x[0], &x[1], s, &mut idx, &mut sc);
    (idx, sc)
}

#[test]
fn retrieval_select_keeps_the_top_visible_chunks_most_recent_first() {
    let n = 36;
    for mw in [None, Some(6)] {
        let s = rshape(n, mw);
        let (g, d, nc) = (s.heads, s.dim, s.chunks);
        let x = vec![test_values(n * g * d, 31), test_values(nc * g * d, 32)];
        let (idx, sc) = select(&x, &s);
        for t in 0..n {
            for h in 0..g {
                let visible: Vec<usize> = (0..nc)
                    .filter(|&c| match mw {
                        Some(w) => c * 4 + w <= t,
                        None => (c + 1) * 4 <= t,
                    })
                    .collect();
                let score = |c: usize| {
                    (0..d)
                        .map(|i| x[0][(t * g + h) * d + i] * x[1][(c * g + h) * d + i])
                        .sum::<f64>()
                        / 2.0
                };
                let row = (t * g + h) * 3;
                let kept: Vec<usize> = (0..3)
                    .filter(|&j| sc[row + j].is_finite())
                    .map(|j| idx[row + j] as usize)
                    .collect();
                assert_eq!(kept.len(), 3.min(t / 4).min(visible.len()), "t {t}");
                assert!(kept.windows(2).all(|p| p[0] > p[1]), "most recent first");
                for (j, &c) in kept.iter().enumerate() {
                    assert!(visible.contains(&c));
                    assert!((sc[row + j] - score(c)).abs() < 1e-14);
                }
                let worst_kept = kept.iter().map(|&c| score(c)).fold(f64::INFINITY, f64::min);
                for &c in visible.iter().filter(|c| !kept.contains(c)) {
                    // Left out only when the slots are full, and never a better chunk.
                    assert_eq!(kept.len(), 3.min(t / 4), "t {t}: chunk {c} left out");
                    assert!(score(c) <= worst_kept, "t {t}: chunk {c} scores higher");
                }
            }
        }
    }
}

#[test]
fn fusion_weights_are_softmax_and_stick_breaking() {
    let s = [0.3, -1.2, f64::NEG_INFINITY, 20.0];
    let mut w = [0.0; 4];
    ops::fusion_forward(&s, 1, 4, Fusion::Softmax, &mut w);
    let z = 0.3f64.exp() + (-1.2f64).exp() + 20f64.exp();
    assert!((w[0] - 0.3f64.exp() / z).abs() < 1e-15 && w[2] == 0.0);
    ops::fusion_forward(&s, 1, 4, Fusion::StickBreaking, &mut w);
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    assert!((w[0] - sig(0.3)).abs() < 1e-15);
    assert!((w[1] - sig(-1.2) * (1.0 - sig(0.3))).abs() < 1e-15);
    assert_eq!(w[2], 0.0);
    // Above torch's softplus threshold (15) the remaining stick is exp(0)·Π(1 − σ) exactly.
    assert!((w[3] - (1.0 - sig(0.3)) * (1.0 - sig(-1.2))).abs() < 1e-12);
    let none = [f64::NEG_INFINITY; 3];
    let mut w3 = [1.0; 3];
    ops::fusion_forward(&none, 1, 3, Fusion::Softmax, &mut w3);
    assert_eq!(w3, [0.0; 3]);
}

/// Retrieval scores → fusion weights, with the selected indices held constant.
#[test]
fn retrieval_and_fusion_backward_match_finite_differences() {
    let n = 20;
    for (mw, f) in [
        (None, Fusion::Softmax),
        (None, Fusion::StickBreaking),
        (Some(5), Fusion::Softmax),
        (Some(5), Fusion::StickBreaking),
    ] {
        let s = rshape(n, mw);
        let (g, d, nc, kk) = (s.heads, s.dim, s.chunks, s.topk);
        let x = vec![
            test_values(n * g * d, 41).iter().map(|v| 2.0 * v).collect(),
            test_values(nc * g * d, 42)
                .iter()
                .map(|v| 2.0 * v)
                .collect(),
        ];
        let (idx0, _) = select(&x, &s);
        let fwd = |x: &[Vec<f64>]| {
            let (idx, sc) = select(x, &s);
            assert_eq!(idx, idx0, "a finite-difference step changed the selection");
            let mut w = vec![0.0; sc.len()];
            ops::fusion_forward(&sc, n * g, kk, f, &mut w);
            (sc, w)
        };
        let (sc, w) = fwd(&x);
        let r = test_values(w.len(), 43);
        let mut ds = vec![7.0; w.len()];
        ops::fusion_backward(&sc, &w, &r, n * g, kk, f, &mut ds);
        let (mut dq, mut dl) = (vec![0.0; n * g * d], vec![0.0; nc * g * d]);
        ops::retrieval_select_backward(&x[0], &x[1], &idx0, &sc, &ds, &s, &mut dq, &mut dl);
        let num = fd(&x, &r, &|x| fwd(x).1);
        assert_grads(
            &format!("retrieval+fusion {f:?} {mw:?}"),
            &[dq, dl],
            &num,
            1e-8,
        );
    }
}

fn hsa_case(softmax1: bool) -> (HsaShape, Vec<u32>, Vec<Vec<f64>>) {
    let (n, hq, g, d, chunk, kk) = (24, 4, 2, 5, 4, 3);
    let s = HsaShape {
        len: n,
        chunks: n / chunk,
        n_q_heads: hq,
        n_kv_heads: g,
        head_dim: d,
        chunk,
        topk: kk,
        softmax1,
    };
    // Realistic indices: a retrieval selection (valid slots, repeated chunk 0 in empty slots).
    let rs = RetrievalShape {
        len: n,
        row0: 0,
        chunks: n / chunk,
        heads: g,
        dim: 3,
        chunk,
        topk: kk,
        mask_window: None,
    };
    let (mut idx, mut sc) = (vec![0; n * g * kk], vec![0.0; n * g * kk]);
    ops::retrieval_select(
        &test_values(n * g * 3, 51),
        &test_values(n / chunk * g * 3, 52),
        &rs,
        &mut idx,
        &mut sc,
    );
    // Weights: positive where a slot is used, 0 elsewhere (as the fusion gives).
    let w: Vec<f64> = sc
        .iter()
        .zip(test_values(sc.len(), 53))
        .map(|(s, v)| if s.is_finite() { 0.6 + 0.4 * v } else { 0.0 })
        .collect();
    let inputs = vec![
        test_values(n * hq * d, 54)
            .iter()
            .map(|v| 2.0 * v)
            .collect(),
        test_values(n * g * d, 55).iter().map(|v| 2.0 * v).collect(),
        test_values(n * g * d, 56),
        w,
    ];
    (s, idx, inputs)
}

fn hsa_fwd(s: &HsaShape, idx: &[u32], x: &[Vec<f64>], scale: f64) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; x[0].len()];
    let mut lse = vec![0.0; s.len * s.n_q_heads * s.topk];
    ops::hsa_forward(
        &x[0], &x[1], &x[2], idx, &x[3], s, scale, &mut out, &mut lse,
    );
    (out, lse)
}

#[test]
fn hsa_forward_matches_direct_formula() {
    for softmax1 in [false, true] {
        let (s, idx, x) = hsa_case(softmax1);
        let scale = 0.45;
        let (out, _) = hsa_fwd(&s, &idx, &x, scale);
        let (hq, g, d, kk, sz) = (s.n_q_heads, s.n_kv_heads, s.head_dim, s.topk, s.chunk);
        let n1 = if softmax1 { 1.0 } else { 0.0 };
        for t in 0..s.len {
            for h in 0..hq {
                let gh = h / (hq / g);
                let mut o = vec![0.0; d];
                for j in 0..kk {
                    let c = idx[(t * g + gh) * kk + j] as usize;
                    let e: Vec<f64> = (0..sz)
                        .map(|i| {
                            let r = c * sz + i;
                            (scale
                                * (0..d)
                                    .map(|y| {
                                        x[0][(t * hq + h) * d + y] * x[1][(r * g + gh) * d + y]
                                    })
                                    .sum::<f64>())
                            .exp()
                        })
                        .collect();
                    let z = n1 + e.iter().sum::<f64>();
                    for (i, ei) in e.iter().enumerate() {
                        let r = c * sz + i;
                        for y in 0..d {
                            o[y] +=
                                x[3][(t * g + gh) * kk + j] * ei / z * x[2][(r * g + gh) * d + y];
                        }
                    }
                }
                for y in 0..d {
                    assert!((out[(t * hq + h) * d + y] - o[y]).abs() < 1e-12);
                }
            }
        }
        // Tokens of the first chunk retrieve nothing: all weights 0, output 0.
        assert!(out[..s.chunk * hq * d].iter().all(|&v| v == 0.0));
    }
}

#[test]
fn hsa_backward_matches_finite_differences() {
    for softmax1 in [false, true] {
        let (s, idx, x) = hsa_case(softmax1);
        let scale = 0.45;
        let (out, lse) = hsa_fwd(&s, &idx, &x, scale);
        let r = test_values(out.len(), 57);
        let mut dq = vec![3.0; x[0].len()];
        let (mut dk, mut dv) = (vec![0.25; x[1].len()], vec![0.25; x[2].len()]);
        let mut dw = vec![3.0; x[3].len()];
        ops::hsa_backward(
            &x[0], &x[1], &x[2], &idx, &x[3], &r, &lse, &s, scale, &mut dq, &mut dk, &mut dv,
            &mut dw,
        );
        // dk, dv accumulate.
        dk.iter_mut().chain(dv.iter_mut()).for_each(|v| *v -= 0.25);
        let num = fd(&x, &r, &|x| hsa_fwd(&s, &idx, x, scale).0);
        assert_grads(
            &format!("hsa softmax1={softmax1}"),
            &[dq, dk, dv, dw],
            &num,
            1e-8,
        );
    }
}
