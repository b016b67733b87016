//! Every layout against one rank, in one process: ranks are threads (`ThreadComm`), the backend
//! is the f64 CPU reference, so parity holds to round-off and any wiring error shows.

use crate::backend::cpu::CpuBackend;
use crate::backend::{AttnShape, Backend};
use crate::data::loader::zigzag_chunks;
use crate::io::TensorMap;
use crate::model::config::ModelConfig;
use crate::model::llama::{Llama, Workspace};
use crate::model::params::{ParamStore, Shard};
use crate::model::rope::RopePrecision;
use crate::parallel::any::AnyComm;
use crate::parallel::comm::Comm;
use crate::parallel::context::{
    RingScratch, RingShape, ring_attention_backward, ring_attention_forward,
};
use crate::parallel::thread::ThreadComm;
use crate::parallel::topology::Topology;
use crate::train::step::{GlobalBatch, all_reduce_grads, forward_backward_batch};
use crate::util::gradcheck::test_values;

/// Naive causal attention in f64 over contiguous positions: (out, lse).
fn naive_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s: usize,
    nq: usize,
    nkv: usize,
    d: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; s * nq * d];
    let mut lse = vec![0.0; nq * s];
    let g = nq / nkv;
    for h in 0..nq {
        let kh = h / g;
        for i in 0..s {
            let qi = &q[(i * nq + h) * d..][..d];
            let logits: Vec<f64> = (0..=i)
                .map(|j| {
                    let kj = &k[(j * nkv + kh) * d..][..d];
                    scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            lse[h * s + i] = m + z.ln();
            for (j, l) in logits.iter().enumerate() {
                let p = (l - m).exp() / z;
                for e in 0..d {
                    out[(i * nq + h) * d + e] += p * v[(j * nkv + kh) * d + e];
                }
            }
        }
    }
    (out, lse)
}

/// Rows `[start, start+len)` of a `[s, width]` matrix for each of a rank's zigzag chunks.
fn zigzag_rows<T: Copy>(x: &[T], width: usize, s: usize, cp: usize, r: usize) -> Vec<T> {
    let mut out = Vec::new();
    for (start, len) in zigzag_chunks(s, cp, r) {
        out.extend_from_slice(&x[start * width..(start + len) * width]);
    }
    out
}

const NQ: usize = 4;
const NKV: usize = 2;
const D: usize = 16;
const S: usize = 64;

struct RingCase {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    dout: Vec<f64>,
}

fn ring_case(q_scale: f64) -> RingCase {
    RingCase {
        q: test_values(S * NQ * D, 1)
            .iter()
            .map(|x| x * q_scale)
            .collect(),
        k: test_values(S * NKV * D, 2),
        v: test_values(S * NKV * D, 3),
        dout: test_values(S * NQ * D, 4),
    }
}

/// Ring forward on `cp` thread ranks in precision `T`; the results reassembled in sequence order
/// (out `[S, NQ, D]`, lse `[NQ, S]`).
fn ring_forward<T: crate::util::Real>(c: &RingCase, cp: usize) -> (Vec<f64>, Vec<f64>) {
    let scale = 1.0 / (D as f64).sqrt();
    let parts = ThreadComm::run(cp, |comm: AnyComm| {
        let b = CpuBackend::<T>::new();
        let r = comm.rank();
        let t = S / cp;
        let up = |x: &[f64], w| b.upload_f64(&zigzag_rows(x, w, S, cp, r));
        let (q, k, v) = (up(&c.q, NQ * D), up(&c.k, NKV * D), up(&c.v, NKV * D));
        let shape = RingShape {
            t,
            n_q: NQ,
            n_kv: NKV,
            head_dim: D,
        };
        let mut scratch = RingScratch::new(&b, &shape, cp);
        let (mut out, mut lse) = (b.zeros(t * NQ * D), b.zeros(NQ * t));
        ring_attention_forward(
            &b,
            &comm,
            &shape,
            scale,
            &q,
            &k,
            &v,
            &mut out,
            &mut lse,
            scratch.as_mut(),
        );
        (b.download_f64(&out), b.download_f64(&lse))
    });
    let (mut out, mut lse) = (vec![0.0; S * NQ * D], vec![0.0; NQ * S]);
    for (r, (o, l)) in parts.iter().enumerate() {
        let t = S / cp;
        let mut row = 0;
        for (start, len) in zigzag_chunks(S, cp, r) {
            out[start * NQ * D..(start + len) * NQ * D]
                .copy_from_slice(&o[row * NQ * D..(row + len) * NQ * D]);
            for h in 0..NQ {
                lse[h * S + start..h * S + start + len]
                    .copy_from_slice(&l[h * t + row..h * t + row + len]);
            }
            row += len;
        }
    }
    (out, lse)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn ring_forward_matches_f64_reference_and_its_error_does_not_grow_with_cp() {
    let c = ring_case(1.0);
    let (ro, rl) = naive_attention(&c.q, &c.k, &c.v, S, NQ, NKV, D, 1.0 / (D as f64).sqrt());
    let mut errs = Vec::new();
    for cp in [1, 2, 4, 8] {
        // f64: the ring is exact up to round-off.
        let (o, l) = ring_forward::<f64>(&c, cp);
        assert!(
            max_abs_diff(&o, &ro) < 1e-13 && max_abs_diff(&l, &rl) < 1e-13,
            "f64 cp {cp}"
        );
        // f32: the merge error against f64, per cp.
        let (o, l) = ring_forward::<f32>(&c, cp);
        let e = max_abs_diff(&o, &ro).max(max_abs_diff(&l, &rl));
        eprintln!("ring merge, f32 vs f64 reference: cp {cp}: max abs error {e:.3e}");
        errs.push(e);
    }
    for (i, e) in errs.iter().enumerate() {
        assert!(*e < 2e-6, "cp {}: error {e:e}", 1 << i);
        assert!(*e <= 3.0 * errs[0] + 1e-7, "error grows with cp: {errs:?}");
    }
}

#[test]
fn ring_merge_stays_finite_with_logits_around_1e4() {
    // q scaled so that scale·q·k reaches about ±1e4: exp of any logit would overflow f32/f64.
    let c = ring_case(2.5e4);
    let scale = 1.0 / (D as f64).sqrt();
    let (ro, rl) = naive_attention(&c.q, &c.k, &c.v, S, NQ, NKV, D, scale);
    let peak = rl.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(
        peak > 5e3,
        "the case must reach large logits (lse peak {peak})"
    );
    for cp in [2, 4, 8] {
        let (o, l) = ring_forward::<f32>(&c, cp);
        assert!(
            o.iter().chain(&l).all(|x| x.is_finite()),
            "cp {cp}: non-finite"
        );
        let lse_rel = l
            .iter()
            .zip(&rl)
            .map(|(a, b)| ((a - b) / b.abs().max(1.0)).abs())
            .fold(0.0, f64::max);
        assert!(lse_rel < 1e-6, "cp {cp}: lse rel error {lse_rel:e}");
        let e = max_abs_diff(&o, &ro);
        eprintln!("ring merge at logits ~1e4: cp {cp}: lse rel {lse_rel:.2e}, out abs {e:.2e}");
        assert!(e < 1e-3, "cp {cp}: out error {e:e}");
    }
}

#[test]
fn ring_backward_equals_one_rank() {
    let c = ring_case(1.0);
    let scale = 1.0 / (D as f64).sqrt();
    let b = CpuBackend::<f64>::new();
    let shape = AttnShape {
        q_len: S,
        kv_len: S,
        n_q_heads: NQ,
        n_kv_heads: NKV,
        head_dim: D,
        q_pos0: 0,
        k_pos0: 0,
        causal: true,
    };
    let (q, k, v, dout) = (
        b.upload_f64(&c.q),
        b.upload_f64(&c.k),
        b.upload_f64(&c.v),
        b.upload_f64(&c.dout),
    );
    let (mut out, mut lse) = (b.zeros(S * NQ * D), b.zeros(NQ * S));
    b.attention_forward(&q, &k, &v, &shape, scale, &mut out, &mut lse);
    let (mut dq, mut dk, mut dv) = (
        b.zeros(S * NQ * D),
        b.zeros(S * NKV * D),
        b.zeros(S * NKV * D),
    );
    b.attention_backward(
        &q, &k, &v, &out, &dout, &lse, &shape, scale, &mut dq, &mut dk, &mut dv,
    );
    let (rq, rk, rv) = (
        b.download_f64(&dq),
        b.download_f64(&dk),
        b.download_f64(&dv),
    );
    for cp in [2, 4, 8] {
        let parts = ThreadComm::run(cp, |comm: AnyComm| {
            let b = CpuBackend::<f64>::new();
            let r = comm.rank();
            let t = S / cp;
            let up = |x: &[f64], w| b.upload_f64(&zigzag_rows(x, w, S, cp, r));
            let (q, k, v, dout) = (
                up(&c.q, NQ * D),
                up(&c.k, NKV * D),
                up(&c.v, NKV * D),
                up(&c.dout, NQ * D),
            );
            let shape = RingShape {
                t,
                n_q: NQ,
                n_kv: NKV,
                head_dim: D,
            };
            let mut sc = RingScratch::new(&b, &shape, cp);
            let (mut out, mut lse) = (b.zeros(t * NQ * D), b.zeros(NQ * t));
            ring_attention_forward(
                &b,
                &comm,
                &shape,
                scale,
                &q,
                &k,
                &v,
                &mut out,
                &mut lse,
                sc.as_mut(),
            );
            let (mut dq, mut dk, mut dv) = (
                b.zeros(t * NQ * D),
                b.zeros(t * NKV * D),
                b.zeros(t * NKV * D),
            );
            ring_attention_backward(
                &b,
                &comm,
                &shape,
                scale,
                &q,
                &k,
                &v,
                &out,
                &dout,
                &lse,
                &mut dq,
                &mut dk,
                &mut dv,
                sc.as_mut(),
            );
            (
                b.download_f64(&dq),
                b.download_f64(&dk),
                b.download_f64(&dv),
            )
        });
        for (r, (dq, dk, dv)) in parts.iter().enumerate() {
            let eq = max_abs_diff(dq, &zigzag_rows(&rq, NQ * D, S, cp, r));
            let ek = max_abs_diff(dk, &zigzag_rows(&rk, NKV * D, S, cp, r));
            let ev = max_abs_diff(dv, &zigzag_rows(&rv, NKV * D, S, cp, r));
            assert!(
                eq.max(ek).max(ev) < 1e-12,
                "cp {cp} rank {r}: dq {eq:e} dk {ek:e} dv {ev:e}"
            );
        }
    }
}

/// A tiny Llama with YaRN, GQA 2 and norm weights away from 1.
fn tiny_cfg(tied: bool) -> ModelConfig {
    let text = format!(
        r#"{{"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "tie_word_embeddings": {tied}, "initializer_range": 0.3,
        "rope_scaling": {{"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
        "beta_fast": 4.0, "beta_slow": 1.0}}}}"#
    );
    ModelConfig::from_json_str(&text, "tiny").unwrap()
}

fn tiny_host(cfg: &ModelConfig) -> TensorMap {
    let b = CpuBackend::<f32>::new();
    let mut p = ParamStore::init_random(&b, cfg, 5);
    for (s, buf) in p.specs.iter().zip(p.bufs.iter_mut()) {
        if s.is_norm {
            let v: Vec<f64> = test_values(s.numel(), 9)
                .iter()
                .map(|x| 1.0 + 0.3 * x)
                .collect();
            *buf = b.upload_f64(&v);
        }
    }
    p.to_host(&b)
}

/// Full tensors by name, in f64.
type Grads = std::collections::BTreeMap<String, Vec<f64>>;

/// The full f64 tensors of a store of TP shards (`gather_full_host` without its f32 download).
fn gather_full_f64(
    b: &CpuBackend<f64>,
    tp: &AnyComm,
    store: &ParamStore<CpuBackend<f64>>,
) -> Grads {
    let n = tp.size();
    store
        .specs
        .iter()
        .zip(&store.bufs)
        .map(|(s, buf)| {
            let local = b.download_f64(buf);
            let mut all = vec![0.0; local.len() * n];
            tp.all_gather(&local, &mut all);
            (s.name.clone(), s.join_shards(&all, n))
        })
        .collect()
}

/// Loss (mean over targets) and full gradients of a batch of sequences under (tp, cp, dp).
fn run_layout(
    cfg: &ModelConfig,
    host: &TensorMap,
    seqs: &[(Vec<u32>, Vec<i32>)],
    tp: usize,
    cp: usize,
    dp: usize,
) -> (f64, Grads) {
    let len = seqs[0].0.len();
    let results = ThreadComm::run(tp * cp * dp, |world: AnyComm| {
        let b = CpuBackend::<f64>::new();
        let topo = Topology::new(&world, tp, cp).unwrap();
        let params = ParamStore::from_host_shard(&b, cfg, host, "test", topo.shard()).unwrap();
        let model = Llama::new(cfg.clone(), RopePrecision::Exact, params).unwrap();
        let mut ws = Workspace::for_rank(&b, cfg, &topo, len / cp, false, 5);
        let mut g = model.params.zeros_like(&b);
        let batch = GlobalBatch { seqs, pos0: 0 };
        let loss = forward_backward_batch(&b, &topo, &model, &mut ws, batch, Some(&mut g)).unwrap();
        all_reduce_grads(&b, &topo, &mut g);
        (loss, gather_full_f64(&b, &topo.tp, &g))
    });
    // Every rank must agree.
    for (l, _) in &results {
        assert!((l - results[0].0).abs() <= 1e-14 * l.abs());
    }
    results.into_iter().next().unwrap()
}

fn batch(
    n: usize,
    len: usize,
    vocab: usize,
    masked: impl Fn(usize, usize) -> bool,
) -> Vec<(Vec<u32>, Vec<i32>)> {
    (0..n)
        .map(|k| {
            let ids: Vec<u32> = (0..len)
                .map(|i| ((i * 7 + k * 13 + i * i) % vocab) as u32)
                .collect();
            let targets = (0..len)
                .map(|i| {
                    if i + 1 == len || masked(k, i) {
                        -1
                    } else {
                        ids[i + 1] as i32
                    }
                })
                .collect();
            (ids, targets)
        })
        .collect()
}

/// Largest relative error of the gradients (per tensor, against its largest magnitude) allowed
/// in f64 (measured: 4e-15): the layouts sum the same terms in other orders.
const GRAD_TOL: f64 = 1e-13;

fn compare(reference: &(f64, Grads), got: &(f64, Grads), what: &str) -> (f64, f64) {
    let le = ((got.0 - reference.0) / reference.0).abs();
    let mut ge = 0.0f64;
    assert_eq!(
        got.1.keys().collect::<Vec<_>>(),
        reference.1.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (name, t) in &reference.1 {
        let g = &got.1[name];
        assert_eq!(g.len(), t.len(), "{what}: {name}");
        let scale = t.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let e = t
            .iter()
            .zip(g)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
            / scale.max(1e-300);
        ge = ge.max(e);
        assert!(
            e < GRAD_TOL,
            "{what}: gradient of {name}: relative error {e:e}"
        );
    }
    assert!(le < 1e-12, "{what}: loss {} vs {}", got.0, reference.0);
    (le, ge)
}

#[test]
fn every_layout_equals_one_rank_in_f64() {
    for tied in [false, true] {
        let cfg = tiny_cfg(tied);
        let host = tiny_host(&cfg);
        let seqs = batch(2, 16, cfg.vocab_size, |_, _| false);
        let one = run_layout(&cfg, &host, &seqs, 1, 1, 1);
        for (tp, cp, dp) in [
            (2, 1, 1),
            (1, 2, 1),
            (1, 1, 2),
            (2, 2, 1),
            (1, 4, 1),
            (2, 2, 2),
            (1, 8, 1),
            (2, 4, 1),
        ] {
            let got = run_layout(&cfg, &host, &seqs, tp, cp, dp);
            let (le, ge) = compare(&one, &got, &format!("tied {tied} tp {tp} cp {cp} dp {dp}"));
            eprintln!(
                "tied {tied} tp {tp} cp {cp} dp {dp}: loss rel {le:.1e}, worst grad rel {ge:.1e}"
            );
        }
    }
}

#[test]
fn a_cp_rank_whose_targets_are_all_masked_gives_no_nan() {
    let cfg = tiny_cfg(false);
    let host = tiny_host(&cfg);
    // cp 2, S 16: rank 0 holds chunks 0 and 3 (tokens 0..4 and 12..16); mask all of them.
    let seqs = batch(1, 16, cfg.vocab_size, |_, i| !(4..12).contains(&i));
    let one = run_layout(&cfg, &host, &seqs, 1, 1, 1);
    let got = run_layout(&cfg, &host, &seqs, 1, 2, 1);
    assert!(got.0.is_finite() && got.1.values().all(|t| t.iter().all(|x| x.is_finite())));
    compare(&one, &got, "masked cp rank");
}

#[test]
fn sharding_then_joining_is_the_identity() {
    let cfg = tiny_cfg(false);
    let host = tiny_host(&cfg);
    let b = CpuBackend::<f32>::new();
    for tp in [1, 2] {
        let parts: Vec<ParamStore<CpuBackend<f32>>> = (0..tp)
            .map(|r| {
                ParamStore::from_host_shard(&b, &cfg, &host, "t", Shard { rank: r, size: tp })
                    .unwrap()
            })
            .collect();
        for (i, s) in parts[0].specs.iter().enumerate() {
            let cat: Vec<f32> = parts.iter().flat_map(|p| b.download(&p.bufs[i])).collect();
            assert_eq!(
                s.join_shards(&cat, tp),
                host[&s.name].data,
                "{} tp {tp}",
                s.name
            );
        }
    }
}
