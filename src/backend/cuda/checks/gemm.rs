//! Checks and benchmarks of the GEMM launcher (gemm.rs, cuBLASLt).

use super::{Ctx, Rows, Sink, randn_dev, rel_l2, time_ms, up};
use crate::backend::Backend;
use crate::backend::cuda::CudaBackend;

/// GEMM through cuBLASLt: every transpose, with and without accumulation, aligned and odd shapes,
/// offsets; bf16 operands, so a tolerance of 2e-2 whatever the storage.
pub(super) fn check(x: &mut Ctx) -> Rows {
    let (c, g, s) = (&x.c, x.g, x.s);
    let d = &mut x.draw;
    let gemm_tol = 2e-2;
    let mut rows = vec![];
    for &(m, n, k) in &[(64 * s, 96 * s, 128 * s), (77, 45, 33)] {
        for ta in [false, true] {
            for tb in [false, true] {
                for acc in [false, true] {
                    let (av, bv, cv) = (
                        d.normal(m * k + 8, 1.0),
                        d.normal(k * n + 8, 1.0),
                        d.normal(m * n + 8, 1.0),
                    );
                    let ((ac, ag), (bc, bg)) = (up(c, g, &av), up(c, g, &bv));
                    let (mut cc, mut cg) = up(c, g, &cv);
                    if !acc {
                        g.fill(&mut cg, f32::NAN);
                    }
                    c.gemm(&mut cc, 8, &ac, 8, &bc, 8, m, n, k, ta, tb, acc);
                    g.gemm(&mut cg, 8, &ag, 8, &bg, 8, m, n, k, ta, tb, acc);
                    let e = rel_l2(&g.download_f64(&cg)[8..], &c.download_f64(&cc)[8..]);
                    rows.push((
                        format!(
                            "gemm {m}x{n}x{k} {}{}{}",
                            if ta { "T" } else { "N" },
                            if tb { "T" } else { "N" },
                            if acc { " acc" } else { "" }
                        ),
                        e,
                        gemm_tol,
                    ));
                }
            }
        }
    }
    rows
}

/// TFLOP/s, bf16 in and out, at the square 8192³ and the FFN shapes of the TP-8 decoder layer.
pub fn bench(sink: &mut dyn Sink, g: &CudaBackend) {
    for (m, n, k, name) in [
        (8192, 8192, 8192, "gemm 8192^3"),
        (32768, 1792, 4096, "gemm gate (32K x 1792 x 4096)"),
        (32768, 4096, 1792, "gemm down (32K x 4096 x 1792)"),
        (4096, 1792, 32768, "gemm dW gate (4096x1792, k=32K)"),
    ] {
        let a = randn_dev(g, m * k, 12, 1.0);
        let b = randn_dev(g, k * n, 13, 1.0);
        let mut c = g.zeros(m * n);
        let (ta, tb) = if name.contains("dW") {
            (true, false)
        } else {
            (false, true)
        };
        let ms = time_ms(g, 3, 20, || {
            g.gemm(&mut c, 0, &a, 0, &b, 0, m, n, k, ta, tb, false)
        });
        sink.metric(
            &format!("{name} (bf16)"),
            2.0 * (m * n * k) as f64 / ms / 1e9,
            "TFLOP/s",
            None,
        );
    }
}
