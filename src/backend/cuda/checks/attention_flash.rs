//! Checks and benchmarks of the flash-attention kernels (cuda/attention_flash.cu, launched by
//! attention_flash.rs): against the CPU f64 reference on the shapes of the model and the ring,
//! and their TFLOP/s beside PyTorch SDPA's flash and cuDNN backends.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use serde_json::{Value, json};

use super::{
    Cpu, Draw, Rows, Sink, group_mut, panic_message, poisoned, randn_dev, rel_l2, time_ms, up,
};
use crate::backend::cuda::{AttnOptions, CudaBackend, DType};
use crate::backend::{AttnShape, Backend};

/// One shape of `flash_checks`.
struct AttnCase {
    label: &'static str,
    nq: usize,
    nkv: usize,
    d: usize,
    ql: usize,
    kl: usize,
    qp: i64,
    kp: i64,
    causal: bool,
}

/// The flash kernels (cuda/attention_flash.cu) against the CPU f64 reference, on the shapes
/// the model and the ring produce: GQA 1, 4 and 8 query heads per KV head, head_dim 64 and
/// 128, the ring's diagonal step (equal offsets), its full step (every key before every
/// query) and partial overlaps (zigzag chunks), lengths that are not multiples of the 64-row
/// tiles, rows that see no key and a block where no row sees any; outputs NaN-poisoned; the
/// fast (atomic dQ) and deterministic backward; the deterministic one run twice and compared
/// bit for bit.
///
/// Tolerances (‖gpu − ref‖/‖ref‖). Inputs are drawn bf16-exact, so both sides see the same
/// operands and only the kernel's own roundings count. Forward: scores are exact products
/// summed in fp32 (~1e-6); P is rounded to bf16 before P·V (relative 2^-9 per element,
/// independent signs: ~1e-3 over a row) and O to bf16 at the store (~1e-3): about 2e-3 in all,
/// tolerance 1e-2 — a wrong index, mask or rescale gives errors of order 1. The log-sum-exp
/// is fp32 from unrounded probabilities: tolerance 1e-4 (its own relative error is ~1e-6).
/// Backward: dS = P∘(dP − rowsum(dO∘O)) and P are rounded to bf16 for the tensor cores, and
/// dP − rowsum cancels where the two are close, which amplifies the relative error of dQ and
/// dK (FlashAttention's own tests allow twice PyTorch's bf16 error); tolerance 3e-2, as the
/// bf16 checks of the simple kernel. With fp32 storage the kernels round fp32 operands to
/// bf16 first; the inputs here are bf16-exact, so the same bounds hold.
pub fn flash_checks(
    sink: &mut dyn Sink,
    g16: &mut CudaBackend,
    g32: &mut CudaBackend,
    small: bool,
) {
    let long = if small { 130 } else { 1000 };
    let mid = if small { 96 } else { 300 };
    let case = |label, nq, nkv, d, ql, kl, qp, kp, causal| AttnCase {
        label,
        nq,
        nkv,
        d,
        ql,
        kl,
        qp,
        kp,
        causal,
    };
    let cases = [
        case("diagonal GQA 8 d128", 8, 1, 128, long, long, 0, 0, true),
        case(
            "ring full step GQA 4 d128",
            4,
            1,
            128,
            mid,
            mid,
            mid as i64,
            0,
            true,
        ),
        case(
            "zigzag partial overlap h32k8 d128",
            32,
            8,
            128,
            130,
            200,
            1000,
            900,
            true,
        ),
        case("diagonal GQA 1 d64 length 77", 4, 4, 64, 77, 77, 0, 0, true),
        case(
            "zigzag chunk pair GQA 4 d64",
            8,
            2,
            64,
            mid,
            mid / 2,
            3 * mid as i64,
            mid as i64,
            true,
        ),
        case(
            "rows 0..59 see no key GQA 4 d64",
            8,
            2,
            64,
            150,
            90,
            0,
            60,
            true,
        ),
        case("no row sees a key d128", 4, 2, 128, 64, 100, 0, 1000, true),
        case("non-causal d128", 4, 2, 128, 33, 47, 0, 0, false),
    ];
    for (i, cs) in cases.iter().enumerate() {
        let tag = g16.name();
        group_mut(sink, g16, &format!("{tag} flash {}", cs.label), |g| {
            flash_case(g, cs)
        });
        // fp32 storage (bf16 scratch operands and conversions) on two of them.
        if i == 0 || i == 3 {
            let tag = g32.name();
            group_mut(sink, g32, &format!("{tag} flash {}", cs.label), |g| {
                flash_case(g, cs)
            });
        }
    }
}

fn flash_case(g: &mut CudaBackend, cs: &AttnCase) -> Rows {
    let c = Cpu::new();
    let tag = format!("{} flash {}", g.name(), cs.label);
    let saved = g.attention_options();
    let fast = AttnOptions {
        flash: true,
        deterministic: false,
    };
    let det = AttnOptions {
        flash: true,
        deterministic: true,
    };
    g.set_attention_options(fast);
    let shape = AttnShape {
        q_len: cs.ql,
        kv_len: cs.kl,
        n_q_heads: cs.nq,
        n_kv_heads: cs.nkv,
        head_dim: cs.d,
        q_pos0: cs.qp,
        k_pos0: cs.kp,
        causal: cs.causal,
    };
    assert!(
        g.uses_flash(&shape),
        "{tag}: the flash kernels do not take {shape:?}"
    );
    let mut dr = Draw {
        stream: 0,
        bf16: true,
    };
    let (nq, nk) = (cs.ql * cs.nq * cs.d, cs.kl * cs.nkv * cs.d);
    // Queries a little larger than unit scale: peakier softmax rows.
    let (qv, kv, vv, gv) = (
        dr.normal(nq, 1.5),
        dr.normal(nk, 1.0),
        dr.normal(nk, 1.0),
        dr.normal(nq, 1.0),
    );
    let ((qc, qg), (kc, kg), (vc, vg), (gc, gg)) = (
        up(&c, g, &qv),
        up(&c, g, &kv),
        up(&c, g, &vv),
        up(&c, g, &gv),
    );
    let sc = 1.0 / (cs.d as f64).sqrt();
    let poisoned_f32 = |g: &CudaBackend, n: usize| {
        let mut b = g.zeros_dtype(n, DType::F32);
        g.fill(&mut b, f32::NAN);
        b
    };
    let (mut oc, mut og) = (c.zeros(nq), poisoned(g, nq));
    let (mut lc, mut lg) = (c.zeros(cs.nq * cs.ql), poisoned_f32(g, cs.nq * cs.ql));
    c.attention_forward(&qc, &kc, &vc, &shape, sc, &mut oc, &mut lc);
    g.attention_forward(&qg, &kg, &vg, &shape, sc, &mut og, &mut lg);
    let (lcv, lgv) = (c.download_f64(&lc), g.download_f64(&lg));
    let (ocv, ogv) = (c.download_f64(&oc), g.download_f64(&og));
    // lse: −∞ exactly where the reference has it; relative error over the finite ones.
    let mut bad_rows = 0usize;
    let (mut fin_g, mut fin_c) = (vec![], vec![]);
    for (idx, (&x, &y)) in lgv.iter().zip(&lcv).enumerate() {
        if y == f64::NEG_INFINITY {
            let (h, i) = (idx / cs.ql, idx % cs.ql);
            let row = &ogv[(i * cs.nq + h) * cs.d..][..cs.d];
            if x != f64::NEG_INFINITY || row.iter().any(|&o| o != 0.0) {
                bad_rows += 1;
            }
        } else {
            fin_g.push(x);
            fin_c.push(y);
        }
    }
    let masked = lcv.iter().filter(|x| **x == f64::NEG_INFINITY).count();
    let mut rows = vec![
        (format!("{tag}: out"), rel_l2(&ogv, &ocv), 1e-2),
        (
            format!("{tag}: lse (finite rows)"),
            rel_l2(&fin_g, &fin_c),
            1e-4,
        ),
        (
            format!("{tag}: {masked} rows that see no key have out 0, lse -inf (count wrong)"),
            bad_rows as f64,
            0.0,
        ),
    ];
    // Backward from the GPU's forward results on both sides.
    let (oc2, lc2) = (c.upload_f64(&ogv), c.upload_f64(&lgv));
    let (mut dqc, mut dkc, mut dvc) = (c.zeros(nq), c.zeros(nk), c.zeros(nk));
    c.attention_backward(
        &qc, &kc, &vc, &oc2, &gc, &lc2, &shape, sc, &mut dqc, &mut dkc, &mut dvc,
    );
    let refs = [
        c.download_f64(&dqc),
        c.download_f64(&dkc),
        c.download_f64(&dvc),
    ];
    let run = |g: &mut CudaBackend, o: AttnOptions| -> [Vec<f64>; 3] {
        g.set_attention_options(o);
        let (mut dq, mut dk, mut dv) = (poisoned(g, nq), poisoned(g, nk), poisoned(g, nk));
        g.attention_backward(
            &qg, &kg, &vg, &og, &gg, &lg, &shape, sc, &mut dq, &mut dk, &mut dv,
        );
        [
            g.download_f64(&dq),
            g.download_f64(&dk),
            g.download_f64(&dv),
        ]
    };
    let f = run(g, fast);
    let d1 = run(g, det);
    let d2 = run(g, det);
    for (mode, got) in [("fast", &f), ("deterministic", &d1)] {
        for (k, name) in ["dq", "dk", "dv"].iter().enumerate() {
            rows.push((
                format!("{tag}: {name} ({mode})"),
                rel_l2(&got[k], &refs[k]),
                3e-2,
            ));
        }
    }
    let differ: usize = (0..3)
        .map(|k| {
            d1[k]
                .iter()
                .zip(&d2[k])
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count()
        })
        .sum();
    rows.push((
        format!("{tag}: deterministic backward bitwise repeatable (elements differing)"),
        differ as f64,
        0.0,
    ));
    g.set_attention_options(saved);
    rows
}

/// Flash attention TFLOP/s at the TP-8 (4 query heads, 1 KV head) and full (32/8) shapes of
/// Llama-3.1-8B, causal, head_dim 128, bf16: forward, backward and both, counted with
/// FlashAttention's convention (benchmarks/benchmark_flash_attention.py: forward
/// 4·S²·d·heads, halved when causal; backward 2.5× the forward), beside torch SDPA's flash
/// and cuDNN backends from `peer` (bench/gpu/attn_torch.py, the same shapes and method).
pub fn attn_bench(sink: &mut dyn Sink, g: &mut CudaBackend, lens: &[usize], peer: Option<&Value>) {
    let d = 128usize;
    for (nq, nkv) in [(4usize, 1usize), (32, 8)] {
        for &s in lens {
            let key = format!("S{s}_h{nq}k{nkv}");
            let r = catch_unwind(AssertUnwindSafe(|| {
                attn_bench_shape(sink, g, s, nq, nkv, d, &key, peer)
            }));
            if let Err(p) = r {
                sink.fail(
                    &format!("attention benchmark {key}"),
                    &panic_message(p.as_ref()),
                );
            }
            if let Err(e) = g.check() {
                sink.fail(&format!("attention benchmark {key}"), &format!("{e:#}"));
                g.clear_failure();
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn attn_bench_shape(
    sink: &mut dyn Sink,
    g: &mut CudaBackend,
    s: usize,
    nq: usize,
    nkv: usize,
    d: usize,
    key: &str,
    peer: Option<&Value>,
) {
    let saved = g.attention_options();
    let shape = AttnShape {
        q_len: s,
        kv_len: s,
        n_q_heads: nq,
        n_kv_heads: nkv,
        head_dim: d,
        q_pos0: 0,
        k_pos0: 0,
        causal: true,
    };
    let sc = 1.0 / (d as f64).sqrt();
    // The kernel-benchmark convention (crate::flops): backward 2.5× forward.
    let af = crate::flops::attention_kernel_flops(s, s, nq, d, true);
    let fwd_flops = af.forward;
    let mut times = vec![];
    for deterministic in [false, true] {
        // The deterministic backward only at the middle lengths (time).
        if deterministic && s > 32768 {
            continue;
        }
        g.set_attention_options(AttnOptions {
            flash: true,
            deterministic,
        });
        let g: &CudaBackend = g;
        let q = randn_dev(g, s * nq * d, 31, 1.0);
        let k = randn_dev(g, s * nkv * d, 32, 1.0);
        let v = randn_dev(g, s * nkv * d, 33, 1.0);
        let dout = randn_dev(g, s * nq * d, 34, 1.0);
        let mut out = g.zeros(s * nq * d);
        let mut lse = g.zeros_dtype(nq * s, DType::F32);
        let (mut dq, mut dk, mut dv) = (
            g.zeros(s * nq * d),
            g.zeros(s * nkv * d),
            g.zeros(s * nkv * d),
        );
        let t0 = Instant::now();
        g.attention_forward(&q, &k, &v, &shape, sc, &mut out, &mut lse);
        g.attention_backward(
            &q, &k, &v, &out, &dout, &lse, &shape, sc, &mut dq, &mut dk, &mut dv,
        );
        g.synchronize();
        let once = t0.elapsed().as_secs_f64();
        let reps = ((1.5 / once) as usize).clamp(1, 10);
        // Every output finite (NaN/Inf anywhere makes Σx² non-finite).
        let finite = [&out, &dq, &dk, &dv]
            .iter()
            .all(|b| g.sum_squares(b).is_finite());
        sink.check(
            &format!(
                "attention benchmark {key}{} outputs finite",
                if deterministic { " deterministic" } else { "" }
            ),
            if finite { 0.0 } else { 1.0 },
            0.0,
        );
        if deterministic {
            let ms = time_ms(g, 0, reps, || {
                g.attention_backward(
                    &q, &k, &v, &out, &dout, &lse, &shape, sc, &mut dq, &mut dk, &mut dv,
                )
            });
            times.push(("attn_bwd_deterministic_causal", ms, af.backward));
            continue;
        }
        let ms_f = time_ms(g, 1, reps, || {
            g.attention_forward(&q, &k, &v, &shape, sc, &mut out, &mut lse)
        });
        let ms_b = time_ms(g, 1, reps, || {
            g.attention_backward(
                &q, &k, &v, &out, &dout, &lse, &shape, sc, &mut dq, &mut dk, &mut dv,
            )
        });
        let ms_fb = time_ms(g, 0, reps, || {
            g.attention_forward(&q, &k, &v, &shape, sc, &mut out, &mut lse);
            g.attention_backward(
                &q, &k, &v, &out, &dout, &lse, &shape, sc, &mut dq, &mut dk, &mut dv,
            );
        });
        times.push(("attn_fwd_causal", ms_f, fwd_flops));
        times.push(("attn_bwd_causal", ms_b, af.backward));
        times.push(("attn_fwd_bwd_causal", ms_fb, af.forward_backward()));
    }
    g.set_attention_options(saved);
    for (what, ms, flops) in times {
        let name = format!("{what}_{key}");
        let tf = flops / (ms / 1e3) / 1e12;
        let pv = |b: &str| {
            peer.and_then(|p| p.get("rows"))
                .and_then(|r| r.get(&name))
                .and_then(|r| r.get(b))
                .and_then(Value::as_f64)
        };
        let (fl, cu) = (pv("sdpa_flash"), pv("sdpa_cudnn"));
        sink.metric_with(
            &name,
            tf,
            "TFLOP/s",
            fl.map(|x| ("sdpa_flash", x)),
            json!({"ms": ms, "peer2": "sdpa_cudnn", "peer2_value": cu}),
        );
        if let Some(x) = fl {
            sink.metric(&format!("{name} / sdpa_flash"), tf / x, "ratio", None);
        }
        if let Some(x) = cu {
            sink.metric(&format!("{name} / sdpa_cudnn"), tf / x, "ratio", None);
        }
        // docs/ARCHITECTURE.md: a rate above the dense peak is a bug (of the timing or the count).
        if tf > crate::flops::H100_SXM_BF16_DENSE / 1e12 {
            sink.fail(
                &name,
                &format!("{tf:.0} TFLOP/s is above the 989 TFLOP/s peak"),
            );
        }
    }
}
