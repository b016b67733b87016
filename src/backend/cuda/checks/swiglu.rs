//! Checks and benchmarks of cuda/swiglu.cu's launchers (swiglu.rs).

use super::{Ctx, Rows, Sink, bandwidth, cmp, labelled, poisoned, randn_dev, time_ms, up};
use crate::backend::Backend;
use crate::backend::cuda::CudaBackend;

/// forward and both input gradients.
pub(super) fn check(x: &mut Ctx) -> Rows {
    let (c, g, tol, s) = (&x.c, x.g, x.tol, x.s);
    let d = &mut x.draw;
    let n = 40_000 * s;
    let (gv, uv, dv) = (d.normal(n, 3.0), d.normal(n, 1.0), d.normal(n, 1.0));
    let ((gc, gg), (uc, ug), (dc, dg)) = (up(c, g, &gv), up(c, g, &uv), up(c, g, &dv));
    let (mut oc, mut og) = (c.zeros(n), poisoned(g, n));
    c.swiglu_forward(&gc, &uc, &mut oc);
    g.swiglu_forward(&gg, &ug, &mut og);
    let (mut agc, mut agg) = (c.zeros(n), poisoned(g, n));
    let (mut auc, mut aug) = (c.zeros(n), poisoned(g, n));
    c.swiglu_backward(&gc, &uc, &dc, &mut agc, &mut auc);
    g.swiglu_backward(&gg, &ug, &dg, &mut agg, &mut aug);
    labelled(vec![
        ("swiglu fwd", cmp(c, g, &oc, &og), tol),
        ("swiglu bwd dgate", cmp(c, g, &agc, &agg), tol),
        ("swiglu bwd dup", cmp(c, g, &auc, &aug), tol),
    ])
}

/// The forward at 32K × 4 tokens of the TP-8 FFN width, bf16.
pub fn bench(sink: &mut dyn Sink, g: &CudaBackend, copy_gbs: f64) {
    let n = 32768 * 1792 * 4;
    let gt = randn_dev(g, n, 7, 1.0);
    let upb = randn_dev(g, n, 8, 1.0);
    let mut o = g.zeros(n);
    let ms = time_ms(g, 3, 20, || g.swiglu_forward(&gt, &upb, &mut o));
    bandwidth(sink, "swiglu fwd (bf16)", (3 * n * 2) as f64, ms, copy_gbs);
}
