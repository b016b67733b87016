//! Checks and benchmarks of cuda/rope.cu's rotation (rope.rs). The device tables are checked
//! against the model's `Rope::cos_sin` by `gpu-check` itself (it needs the model's RoPE).

use super::{Ctx, Rows, Sink, bandwidth, cmp, labelled, randn_dev, time_ms, up};
use crate::backend::Backend;
use crate::backend::cuda::CudaBackend;

/// rotation forward and backward with tables carrying an attention factor.
pub(super) fn check(x: &mut Ctx) -> Rows {
    let (c, g, tol, s) = (&x.c, x.g, x.tol, x.s);
    let d = &mut x.draw;
    let (rows, heads, hd) = (33 * s, 5, 128);
    let half = hd / 2;
    let xv = d.normal(rows * heads * hd, 1.0);
    let ang: Vec<f32> = d.normal(rows * half, 3.0);
    let cv: Vec<f32> = ang.iter().map(|a| a.cos() * 1.2).collect();
    let sv: Vec<f32> = ang.iter().map(|a| a.sin() * 1.2).collect();
    let ((mut xc, mut xg), (cc, cg), (sc, sg)) = (up(c, g, &xv), up(c, g, &cv), up(c, g, &sv));
    c.rope_forward(&mut xc, &cc, &sc, rows, heads, hd);
    g.rope_forward(&mut xg, &cg, &sg, rows, heads, hd);
    let e_f = cmp(c, g, &xc, &xg);
    c.rope_backward(&mut xc, &cc, &sc, rows, heads, hd);
    g.rope_backward(&mut xg, &cg, &sg, rows, heads, hd);
    labelled(vec![
        ("rope fwd", e_f, tol),
        ("rope bwd", cmp(c, g, &xc, &xg), tol),
    ])
}

/// RoPE on q of the 4M config (TP 8): 32K tokens × 4 heads × 128 in place, bf16 tables.
pub fn bench(sink: &mut dyn Sink, g: &CudaBackend, copy_gbs: f64) {
    let (rows, heads, hd) = (32768 * 4, 4, 128);
    let mut x = randn_dev(g, rows * heads * hd, 2, 1.0);
    let cs = randn_dev(g, rows * hd / 2, 3, 1.0);
    let sn = randn_dev(g, rows * hd / 2, 4, 1.0);
    let ms = time_ms(g, 3, 20, || {
        g.rope_forward(&mut x, &cs, &sn, rows, heads, hd)
    });
    let bytes = (2 * rows * heads * hd * 2 + 2 * rows * hd / 2 * 2) as f64;
    bandwidth(sink, "rope fwd (bf16)", bytes, ms, copy_gbs);
}
