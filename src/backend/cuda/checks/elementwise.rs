//! Checks and benchmarks of cuda/elementwise.cu's launchers (elementwise.rs); its copy is the
//! bandwidth ceiling the other families' benchmarks are measured against.

use super::{Ctx, Rows, Sink, cmp, labelled, poisoned, randn_dev, rel_l2, time_ms, up};
use crate::backend::Backend;
use crate::backend::cuda::{CudaBackend, DType};

/// add, scale, Σx², copy between dtypes and back, read_host at an offset.
pub(super) fn check(x: &mut Ctx) -> Rows {
    let (c, g, bf, tol, s) = (&x.c, x.g, x.bf, x.tol, x.s);
    let d = &mut x.draw;
    let n = 10_007 * s;
    let (xv, yv) = (d.normal(n, 1.0), d.normal(n, 1.0));
    let (mut xc, mut xg) = up(c, g, &xv);
    let (yc, yg) = up(c, g, &yv);
    c.add_at(&mut xc, 3, &yc, 5, n - 10);
    g.add_at(&mut xg, 3, &yg, 5, n - 10);
    let e_add = cmp(c, g, &xc, &xg);
    c.scale(&mut xc, 0.37);
    g.scale(&mut xg, 0.37);
    let e_scale = cmp(c, g, &xc, &xg);
    let ss = (g.sum_squares(&xg) - c.sum_squares(&xc)).abs() / c.sum_squares(&xc);
    // copy into the other dtype and back
    let other = if bf { DType::F32 } else { DType::Bf16 };
    let mut t = g.zeros_dtype(n, other);
    g.copy(&xg, 0, &mut t, 0, n);
    let mut back = poisoned(g, n);
    g.copy(&t, 0, &mut back, 0, n);
    let e_copy = rel_l2(&g.download_f64(&back), &g.download_f64(&xg));
    let mut h = vec![0f32; 100];
    g.read_host(&xg, 17, &mut h);
    let want: Vec<f64> = c.download_f64(&xc)[17..117].to_vec();
    let hv: Vec<f64> = h.iter().map(|&x| x as f64).collect();
    let e_read = rel_l2(&hv, &want);
    labelled(vec![
        ("add_at", e_add, tol),
        ("scale", e_scale, tol),
        ("sum_squares", ss, 1e-5),
        ("copy f32<->bf16", e_copy, 1e-2),
        ("read_host", e_read, tol),
    ])
}

/// The ceiling: a large device-to-device copy, bytes read + written; returns its GB/s.
pub fn bench_copy(sink: &mut dyn Sink, g: &CudaBackend) -> f64 {
    let n = 1usize << 28; // 512 MiB of bf16
    let src = randn_dev(g, n, 1, 1.0);
    let mut dst = g.zeros(n);
    let ms = time_ms(g, 3, 20, || g.copy(&src, 0, &mut dst, 0, n));
    let copy_gbs = (2 * n * 2) as f64 / ms / 1e6;
    sink.metric("device-to-device copy bandwidth", copy_gbs, "GB/s", None);
    copy_gbs
}
