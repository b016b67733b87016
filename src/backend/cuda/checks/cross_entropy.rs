//! Checks of cuda/cross_entropy.cu's launchers (cross_entropy.rs).

use super::{Ctx, Rows, cmp, labelled, rel_l2, up};
use crate::backend::Backend;

/// vocabulary-parallel statistics (ignored rows, targets on another shard) and gradient.
pub(super) fn check(x: &mut Ctx) -> Rows {
    let (c, g, tol, s) = (&x.c, x.g, x.tol, x.s);
    let d = &mut x.draw;
    let (rows, vocab) = (19 * s, 5000);
    let lv = d.normal(rows * vocab, 3.0);
    let targets: Vec<i32> = (0..rows)
        .map(|r| match r % 7 {
            3 => -1,
            5 => -2,
            _ => ((r * 131) % vocab) as i32,
        })
        .collect();
    let (lc2, lg2) = up(c, g, &lv);
    let sc = c.cross_entropy_stats(&lc2, &targets, vocab);
    let sg = g.cross_entropy_stats(&lg2, &targets, vocab);
    let flat = |v: &[crate::backend::CeStats]| -> Vec<f64> {
        v.iter()
            .flat_map(|s| [s.max, s.sum, s.target.unwrap_or(-7.0)])
            .collect()
    };
    let e_stats = rel_l2(&flat(&sg), &flat(&sc));
    let mx: Vec<f64> = sc.iter().map(|s| s.max).collect();
    let sm: Vec<f64> = sc.iter().map(|s| s.sum).collect();
    let (mut gc, mut ggb) = up(c, g, &lv);
    c.cross_entropy_grad(&mut gc, &targets, vocab, &mx, &sm, 0.5);
    g.cross_entropy_grad(&mut ggb, &targets, vocab, &mx, &sm, 0.5);
    labelled(vec![
        ("cross_entropy_stats", e_stats, tol),
        ("cross_entropy_grad", cmp(c, g, &gc, &ggb), tol),
    ])
}
