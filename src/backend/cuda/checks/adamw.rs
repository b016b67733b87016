//! Checks and benchmarks of cuda/adamw.cu's launchers (adamw.rs).

use super::{Ctx, Rows, Sink, bandwidth, cmp, randn_dev, time_ms, up};
use crate::backend::cuda::{CudaBackend, CudaBuf};
use crate::backend::{AdamW, Backend};

/// one tensor, then the multi-tensor step with per-tensor weight decay and clipping on the device.
pub(super) fn check(x: &mut Ctx) -> Rows {
    let (c, g, tol, s) = (&x.c, x.g, x.tol, x.s);
    let d = &mut x.draw;
    let n = 50_000 * s;
    let hp = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.5,
    };
    let (pv, gv, mv) = (d.normal(n, 1.0), d.normal(n, 1.0), d.normal(n, 0.1));
    let vv: Vec<f32> = d.normal(n, 0.1).iter().map(|x| x * x).collect();
    let ((mut pc, mut pg), (gc, gg), (mut mc, mut mg), (mut vc, mut vg)) =
        (up(c, g, &pv), up(c, g, &gv), up(c, g, &mv), up(c, g, &vv));
    c.adamw(&mut pc, &gc, &mut mc, &mut vc, &hp);
    g.adamw(&mut pg, &gg, &mut mg, &mut vg, &hp);
    let mut rows = vec![
        ("adamw param".to_string(), cmp(c, g, &pc, &pg), tol),
        ("adamw m".to_string(), cmp(c, g, &mc, &mg), tol),
        ("adamw v".to_string(), cmp(c, g, &vc, &vg), tol),
    ];
    // Multi-tensor: three tensors, per-tensor weight decay, clipping on the device.
    let sizes = [n / 3, 1000, n / 2 + 7];
    let mut cpu_t = vec![];
    let mut gpu_t = vec![];
    for &k in &sizes {
        let (p, gr, m) = (d.normal(k, 1.0), d.normal(k, 1.0), d.normal(k, 0.1));
        let v: Vec<f32> = d.normal(k, 0.1).iter().map(|x| x * x).collect();
        let (a, b) = up(c, g, &p);
        let (e, f) = up(c, g, &gr);
        let (h, i) = up(c, g, &m);
        let (j, l) = up(c, g, &v);
        cpu_t.push((a, e, h, j));
        gpu_t.push((b, f, i, l));
    }
    let wd = [0.1, 0.0, 0.1];
    let (pre, max_norm) = (0.5, 1.0);
    let norm_c = cpu_t
        .iter()
        .map(|t| c.sum_squares(&t.1))
        .sum::<f64>()
        .sqrt()
        * pre;
    let clip = if norm_c > max_norm {
        max_norm / (norm_c + 1e-6)
    } else {
        1.0
    };
    for (i, t) in cpu_t.iter_mut().enumerate() {
        let h = AdamW {
            weight_decay: wd[i],
            grad_scale: pre * clip,
            ..hp
        };
        c.adamw(&mut t.0, &t.1, &mut t.2, &mut t.3, &h);
    }
    let mut refs: Vec<(&mut CudaBuf, &CudaBuf, &mut CudaBuf, &mut CudaBuf)> = gpu_t
        .iter_mut()
        .map(|(p, gr, m, v)| (p, &*gr, m, v))
        .collect();
    let norm_g = g.adamw_multi(&mut refs, &wd, &hp, pre, max_norm);
    rows.push((
        "adamw_multi global norm".into(),
        ((norm_g - norm_c) / norm_c).abs(),
        tol,
    ));
    for i in 0..sizes.len() {
        rows.push((
            format!("adamw_multi tensor {i} param"),
            cmp(c, g, &cpu_t[i].0, &gpu_t[i].0),
            tol,
        ));
    }
    rows
}

/// fp32 master weights and moments, fp32 gradient (`g32`): 28 bytes per parameter, one more
/// read of the gradient for the multi-tensor step's norm.
pub fn bench(sink: &mut dyn Sink, g32: &CudaBackend, copy_gbs: f64) {
    let n = 1usize << 27;
    let mut p = randn_dev(g32, n, 9, 1.0);
    let gr = randn_dev(g32, n, 10, 1.0);
    let mut m = randn_dev(g32, n, 11, 0.1);
    let mut v = g32.zeros(n);
    let hp = AdamW {
        lr: 1e-5,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
        grad_scale: 1.0,
    };
    let ms = time_ms(g32, 3, 20, || g32.adamw(&mut p, &gr, &mut m, &mut v, &hp));
    bandwidth(sink, "adamw (fp32 state)", (28 * n) as f64, ms, copy_gbs);
    let ms = time_ms(g32, 2, 10, || {
        let mut t = [(&mut p, &gr, &mut m, &mut v)];
        g32.adamw_multi(&mut t, &[0.1], &hp, 1.0, 1.0);
    });
    bandwidth(
        sink,
        "adamw_multi with norm+clip (fp32 state)",
        (32 * n) as f64,
        ms,
        copy_gbs,
    );
}
