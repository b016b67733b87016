//! Checks and benchmarks of cuda/rmsnorm.cu's launchers (rmsnorm.rs).

use super::{Ctx, Rows, Sink, bandwidth, cmp, labelled, poisoned, randn_dev, time_ms, up};
use crate::backend::Backend;
use crate::backend::cuda::CudaBackend;

/// forward (out, rstd) and backward (dx, dw) from the same rstd on both sides.
pub(super) fn check(x: &mut Ctx) -> Rows {
    let (c, g, tol, s) = (&x.c, x.g, x.tol, x.s);
    let d = &mut x.draw;
    let (rows, dim) = (37 * s, 4096);
    let xv = d.normal(rows * dim, 2.0);
    let wv: Vec<f32> = d.normal(dim, 0.1).iter().map(|x| 1.0 + x).collect();
    let ((xc, xg), (wc, wg)) = (up(c, g, &xv), up(c, g, &wv));
    let (mut oc, mut og) = (c.zeros(rows * dim), poisoned(g, rows * dim));
    let (mut rc, mut rg) = (c.zeros(rows), poisoned(g, rows));
    c.rmsnorm_forward(&xc, &wc, 1e-5, rows, dim, &mut oc, &mut rc);
    g.rmsnorm_forward(&xg, &wg, 1e-5, rows, dim, &mut og, &mut rg);
    let (e_out, e_rstd) = (cmp(c, g, &oc, &og), cmp(c, g, &rc, &rg));
    let gv = d.normal(rows * dim, 1.0);
    let (gc, gg) = up(c, g, &gv);
    let (dx0, dw0) = (d.normal(rows * dim, 1.0), d.normal(dim, 1.0));
    let ((mut dxc, mut dxg), (mut dwc, mut dwg)) = (up(c, g, &dx0), up(c, g, &dw0));
    // Both sides from the same rstd (the GPU's, possibly rounded to bf16).
    let rr = c.upload_f64(&g.download_f64(&rg));
    c.rmsnorm_backward(&gc, &xc, &wc, &rr, rows, dim, &mut dxc, &mut dwc);
    g.rmsnorm_backward(&gg, &xg, &wg, &rg, rows, dim, &mut dxg, &mut dwg);
    labelled(vec![
        ("rmsnorm fwd out", e_out, tol),
        ("rmsnorm fwd rstd", e_rstd, tol),
        ("rmsnorm bwd dx", cmp(c, g, &dxc, &dxg), tol),
        ("rmsnorm bwd dw", cmp(c, g, &dwc, &dwg), tol),
    ])
}

/// The forward at 32K rows of 4096, bf16.
pub fn bench(sink: &mut dyn Sink, g: &CudaBackend, copy_gbs: f64) {
    let (rows, dim) = (32768, 4096);
    let x = randn_dev(g, rows * dim, 5, 1.0);
    let w = randn_dev(g, dim, 6, 1.0);
    let mut o = g.zeros(rows * dim);
    let mut r = g.zeros(rows);
    let ms = time_ms(g, 3, 20, || {
        g.rmsnorm_forward(&x, &w, 1e-5, rows, dim, &mut o, &mut r)
    });
    bandwidth(
        sink,
        "rmsnorm fwd (bf16)",
        (2 * rows * dim * 2) as f64,
        ms,
        copy_gbs,
    );
}
