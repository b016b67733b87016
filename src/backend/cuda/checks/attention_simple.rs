//! Checks of `attention_forward`/`attention_backward` as the model calls them (attention_simple.rs
//! and, for head_dim 64/128, attention_flash.rs) and of the ring merge.

use super::{Ctx, Rows, cmp, poisoned, rel_l2, up};
use crate::backend::{AttnShape, Backend};

/// `attention_forward`/`backward` (the flash kernels at head_dim 128, else the simple ones) on
/// the ring's offsets, and the ring merge.
pub(super) fn check(x: &mut Ctx) -> Rows {
    let (c, g, bf, tol, s) = (&x.c, x.g, x.bf, x.tol, x.s);
    let d = &mut x.draw;
    let mut rows = vec![];
    for (causal, ql, kl, qp, kp) in [
        (true, 70 * s, 70 * s, 0i64, 0i64),
        (true, 40, 90, 100, 60),
        (false, 33, 47, 0, 0),
    ] {
        let shape = AttnShape {
            q_len: ql,
            kv_len: kl,
            n_q_heads: 4,
            n_kv_heads: 2,
            head_dim: 128,
            q_pos0: qp,
            k_pos0: kp,
            causal,
        };
        let (nq, nk) = (ql * 4 * 128, kl * 2 * 128);
        let (qv, kv, vv, gv) = (
            d.normal(nq, 1.0),
            d.normal(nk, 1.0),
            d.normal(nk, 1.0),
            d.normal(nq, 1.0),
        );
        let ((qc, qg), (kc, kg), (vc, vg), (gc, gg)) =
            (up(c, g, &qv), up(c, g, &kv), up(c, g, &vv), up(c, g, &gv));
        let sc = 1.0 / (128f64).sqrt();
        let (mut oc, mut og) = (c.zeros(nq), poisoned(g, nq));
        let (mut lc, mut lg) = (c.zeros(4 * ql), poisoned(g, 4 * ql));
        c.attention_forward(&qc, &kc, &vc, &shape, sc, &mut oc, &mut lc);
        g.attention_forward(&qg, &kg, &vg, &shape, sc, &mut og, &mut lg);
        // −∞ rows compare as equal; NaN fails.
        let fin = |v: Vec<f64>| -> Vec<f64> {
            v.into_iter()
                .map(|x| if x == f64::NEG_INFINITY { -1e30 } else { x })
                .collect()
        };
        let e_lse = rel_l2(&fin(g.download_f64(&lg)), &fin(c.download_f64(&lc)));
        // The flash kernels (head_dim 128 here) compute from bf16 operands whatever the
        // storage: fp32 inputs are rounded first, so their tolerance is bf16's
        // (flash_checks says why 1e-2 and 3e-2).
        let flash = g.uses_flash(&shape);
        let ft = if flash { 1e-2 } else { tol };
        let kind = if flash { "flash" } else { "simple" };
        let name = format!("attention ({kind}) {ql}x{kl} causal={causal} pos {qp}/{kp}");
        rows.push((format!("{name} out"), cmp(c, g, &oc, &og), ft));
        rows.push((format!("{name} lse"), e_lse, ft));
        let (mut dqc, mut dqg) = (c.zeros(nq), poisoned(g, nq));
        let (mut dkc, mut dkg) = (c.zeros(nk), poisoned(g, nk));
        let (mut dvc, mut dvg) = (c.zeros(nk), poisoned(g, nk));
        // The same forward results on both sides (the GPU's).
        let (oc2, lc2) = (
            c.upload_f64(&g.download_f64(&og)),
            c.upload_f64(&g.download_f64(&lg)),
        );
        c.attention_backward(
            &qc, &kc, &vc, &oc2, &gc, &lc2, &shape, sc, &mut dqc, &mut dkc, &mut dvc,
        );
        g.attention_backward(
            &qg, &kg, &vg, &og, &gg, &lg, &shape, sc, &mut dqg, &mut dkg, &mut dvg,
        );
        let bt = if bf || flash { 3e-2 } else { tol };
        rows.push((format!("{name} dq"), cmp(c, g, &dqc, &dqg), bt));
        rows.push((format!("{name} dk"), cmp(c, g, &dkc, &dkg), bt));
        rows.push((format!("{name} dv"), cmp(c, g, &dvc, &dvg), bt));
    }
    // Ring merge of a partial block into rows 5.. of a running result.
    let (ql, rows_b, heads, hd) = (20, 9, 3, 64);
    let (ov, lv, obv, lbv) = (
        d.normal(ql * heads * hd, 1.0),
        d.normal(heads * ql, 2.0),
        d.normal(rows_b * heads * hd, 1.0),
        d.normal(heads * rows_b, 2.0),
    );
    let ((mut oc, mut og), (mut lc, mut lg), (obc, obg), (lbc, lbg)) =
        (up(c, g, &ov), up(c, g, &lv), up(c, g, &obv), up(c, g, &lbv));
    c.attention_merge(&mut oc, &mut lc, &obc, &lbc, 5, rows_b, ql, heads, hd);
    g.attention_merge(&mut og, &mut lg, &obg, &lbg, 5, rows_b, ql, heads, hd);
    rows.push(("attention_merge out".into(), cmp(c, g, &oc, &og), tol));
    rows.push(("attention_merge lse".into(), cmp(c, g, &lc, &lg), tol));
    rows
}
