//! Checks of cuda/embedding.cu's launchers (embedding.rs).

use super::{Ctx, Rows, cmp, labelled, poisoned, up};
use crate::backend::{Backend, NOT_IN_SHARD};
use crate::util::rng;

/// gather with rows of another shard, and the backward with many repeated ids.
pub(super) fn check(x: &mut Ctx) -> Rows {
    let (c, g, tol, s) = (&x.c, x.g, x.tol, x.s);
    let d = &mut x.draw;
    let (vocab, dim, t) = (1000, 256, 300 * s);
    let tv = d.normal(vocab * dim, 1.0);
    let (tc, tg) = up(c, g, &tv);
    let ids: Vec<u32> = (0..t as u64)
        .map(|i| {
            if i % 17 == 5 {
                NOT_IN_SHARD
            } else {
                (rng::uniform(11, 3, i) * 50.0) as u32 // many repeats
            }
        })
        .collect();
    let (mut oc, mut og) = (c.zeros(t * dim), poisoned(g, t * dim));
    c.embedding_forward(&tc, &ids, dim, &mut oc);
    g.embedding_forward(&tg, &ids, dim, &mut og);
    let gv = d.normal(t * dim, 1.0);
    let (gc, gg) = up(c, g, &gv);
    let dt0 = d.normal(vocab * dim, 1.0);
    let (mut dtc, mut dtg) = up(c, g, &dt0);
    c.embedding_backward(&mut dtc, &ids, dim, &gc);
    g.embedding_backward(&mut dtg, &ids, dim, &gg);
    labelled(vec![
        ("embedding fwd", cmp(c, g, &oc, &og), tol),
        ("embedding bwd", cmp(c, g, &dtc, &dtg), tol),
    ])
}
