//! Context parallelism: the zigzag layout and ring attention (forward and backward).
//!
//! The sequence of `S` tokens is cut into `2·cp` chunks of `c = S/(2·cp)`; CP rank `r` holds
//! chunks `r` and `2·cp−1−r`, in that order (`data::loader::zigzag_slice`): `T = 2c` local tokens
//! whose RoPE positions are their global indices. Under the causal mask this gives every rank the
//! same work.
//!
//! Ring attention: K/V blocks travel around the ring (rank r sends to r+1, receives from r−1);
//! at step `i` rank r holds the block of rank `src = r − i (mod cp)` and attends to it while the
//! next block is already in flight (non-blocking exchange started before the compute). The causal
//! structure of each step (TransformerEngine's p2p schedule):
//! - `i = 0` (own block): local causal attention. With virtual positions `0..2c` for both halves,
//!   chunk r's queries see chunk r causally and not chunk 2cp−1−r, and chunk 2cp−1−r's queries
//!   see all of chunk r and chunk 2cp−1−r causally: one causal call.
//! - `src < r`: the block's first chunk (`src`) precedes both query chunks and its second chunk
//!   (`2cp−1−src`) follows both: all `2c` queries against the first `c` keys, no mask.
//! - `src > r`: only the second query chunk (`2cp−1−r`) sees the block, all `2c` keys, no mask.
//!
//! Each step costs `2c²` score entries, so all ranks do equal work at every step. Per-step results
//! are merged with the overflow-free log-sum-exp form (`Backend::attention_merge`).
//!
//! Backward: the same ring of K/V; dQ accumulates locally; each block's dK/dV accumulator travels
//! with it one step behind (received from r−1, this rank's contribution added, sent on to r+1) and
//! after `cp` steps arrives back at its owner. Both transfers of a step are in flight during the
//! step's compute; the time blocked waiting for them is the exposed communication
//! (`Comm::wait_clock`). Blocks travel as backend buffers (`Comm::exchange_buf_start`): NCCL
//! keeps them on the device, the host-staged path copies them through host memory.

use crate::backend::{AttnShape, Backend};
use crate::parallel::comm::{BufExchange, Comm};

/// `ULTRALONG_RING_NO_OVERLAP=1` waits for each transfer right after starting it, so the time
/// blocked is the whole communication time: the benchmark's baseline for the share hidden.
fn no_overlap() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| std::env::var("ULTRALONG_RING_NO_OVERLAP").is_ok_and(|v| v == "1"))
}

/// Start sending `send[..n]` to the next rank and receiving the previous rank's into `recv`;
/// without overlap (benchmark baseline) finish at once and return `None`.
#[allow(clippy::too_many_arguments)]
fn start<'a, B: Backend, C: Comm>(
    b: &B,
    cp: &C,
    send: &'a B::Buf,
    n: usize,
    to: usize,
    recv: &'a mut B::Buf,
    from: usize,
) -> Option<BufExchange<'a, B>> {
    let x = cp.exchange_buf_start(b, send, n, to, recv, from);
    if no_overlap() {
        cp.wait_buf(b, x);
        return None;
    }
    Some(x)
}

/// Local shapes of one ring attention call: `t` local tokens (2 zigzag chunks when cp > 1), heads
/// as held by this TP rank.
#[derive(Clone, Copy, Debug)]
pub struct RingShape {
    pub t: usize,
    pub n_q: usize,
    pub n_kv: usize,
    pub head_dim: usize,
}

impl RingShape {
    fn attn(&self, q_len: usize, kv_len: usize, causal: bool) -> AttnShape {
        AttnShape {
            q_len,
            kv_len,
            n_q_heads: self.n_q,
            n_kv_heads: self.n_kv,
            head_dim: self.head_dim,
            q_pos0: 0,
            k_pos0: 0,
            causal,
        }
    }
    fn qw(&self) -> usize {
        self.n_q * self.head_dim
    }
    fn kvw(&self) -> usize {
        self.n_kv * self.head_dim
    }
}

/// Buffers of the ring, allocated once per run (none when cp = 1). The blocks that travel are
/// backend buffers (`Comm::exchange_buf_start`): on a GPU they never leave device memory unless
/// the communicator stages them.
pub struct RingScratch<B: Backend> {
    /// The K/V block attended at this step, and the next one arriving.
    k_cur: B::Buf,
    v_cur: B::Buf,
    k_next: B::Buf,
    v_next: B::Buf,
    /// Backward: the dK/dV accumulator of the block held at the previous step (sent on at this
    /// step), and the one arriving.
    dk_acc: B::Buf,
    dv_acc: B::Buf,
    dk_in: B::Buf,
    dv_in: B::Buf,
    /// The block's first chunk (attention takes exactly `kv_len` rows).
    kh: B::Buf,
    vh: B::Buf,
    qh: B::Buf,
    oh: B::Buf,
    doh: B::Buf,
    lseh: B::Buf,
    out_f: B::Buf,
    lse_f: B::Buf,
    out_h: B::Buf,
    lse_h: B::Buf,
    dq_f: B::Buf,
    dq_h: B::Buf,
    dk_f: B::Buf,
    dv_f: B::Buf,
    dk_h: B::Buf,
    dv_h: B::Buf,
}

/// What a ring buffer holds, for the memory model's bytes per element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingElem {
    /// Activations (K/V blocks, query and output rows).
    Act,
    /// Partial results and accumulators merged in higher precision.
    Acc,
    /// Softmax statistics (LSE).
    Stat,
}

/// One row of the ring's buffer table: buffers `names`, each of `dims` (symbolic, numeric).
pub struct RingBuffer {
    pub names: &'static [&'static str],
    /// What the memory model prints for the row.
    pub label: &'static str,
    pub dims: Vec<(&'static str, usize)>,
    pub elem: RingElem,
}

impl RingBuffer {
    pub fn elems(&self) -> usize {
        self.dims.iter().map(|&(_, n)| n).product()
    }
}

/// Every buffer of [`RingScratch`] (cp > 1): the one table its allocation and `plan`'s memory
/// model both read.
pub fn ring_buffers(s: &RingShape) -> Vec<RingBuffer> {
    let (t, c, qw, kvw, nq) = (s.t, s.t / 2, s.qw(), s.kvw(), s.n_q);
    let row = |names, label, dims: &[(&'static str, usize)], elem| RingBuffer {
        names,
        label,
        dims: dims.to_vec(),
        elem,
    };
    let tkv = [("t", t), ("kv/tp·d", kvw)];
    let ckv = [("t/2", c), ("kv/tp·d", kvw)];
    let tq = [("t", t), ("heads/tp·d", qw)];
    let cq = [("t/2", c), ("heads/tp·d", qw)];
    use RingElem::{Acc, Act, Stat};
    vec![
        row(
            &["k_cur", "v_cur", "k_next", "v_next"],
            "k_cur, v_cur, k_next, v_next (ring K/V: current + in flight)",
            &tkv,
            Act,
        ),
        row(
            &["dk_acc", "dv_acc", "dk_in", "dv_in"],
            "dk_acc, dv_acc, dk_in, dv_in (ring dK/dV: accumulator + in flight)",
            &tkv,
            Acc,
        ),
        row(&["kh", "vh"], "kh, vh (first chunk)", &ckv, Act),
        row(
            &["qh", "oh", "doh"],
            "qh, oh, doh (second query chunk)",
            &cq,
            Act,
        ),
        row(
            &["lseh", "lse_h"],
            "lseh, lse_h",
            &[("heads/tp · t/2", nq * c)],
            Stat,
        ),
        row(&["lse_f"], "lse_f", &[("heads/tp · t", nq * t)], Stat),
        row(&["out_f", "dq_f"], "out_f, dq_f (step partials)", &tq, Acc),
        row(&["out_h", "dq_h"], "out_h, dq_h (step partials)", &cq, Acc),
        row(&["dk_f", "dv_f"], "dk_f, dv_f (step partials)", &tkv, Acc),
        row(&["dk_h", "dv_h"], "dk_h, dv_h (step partials)", &ckv, Acc),
    ]
}

impl<B: Backend> RingScratch<B> {
    pub fn new(b: &B, s: &RingShape, cp: usize) -> Option<Self> {
        if cp == 1 {
            return None;
        }
        let table = ring_buffers(s);
        let z = |name: &str| {
            let r = table
                .iter()
                .find(|r| r.names.contains(&name))
                .unwrap_or_else(|| panic!("ring buffer {name} is not in ring_buffers"));
            b.zeros_named(r.elems(), &format!("ring scratch {name}"))
        };
        Some(RingScratch {
            k_cur: z("k_cur"),
            v_cur: z("v_cur"),
            k_next: z("k_next"),
            v_next: z("v_next"),
            dk_acc: z("dk_acc"),
            dv_acc: z("dv_acc"),
            dk_in: z("dk_in"),
            dv_in: z("dv_in"),
            kh: z("kh"),
            vh: z("vh"),
            qh: z("qh"),
            oh: z("oh"),
            doh: z("doh"),
            lseh: z("lseh"),
            out_f: z("out_f"),
            lse_f: z("lse_f"),
            out_h: z("out_h"),
            lse_h: z("lse_h"),
            dq_f: z("dq_f"),
            dq_h: z("dq_h"),
            dk_f: z("dk_f"),
            dv_f: z("dv_f"),
            dk_h: z("dk_h"),
            dv_h: z("dv_h"),
        })
    }
}

/// What rank `r` does with the block of rank `src` (see the module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Own block: one causal call over the local tokens.
    Diagonal,
    /// All local queries against the block's first chunk.
    FirstHalfKeys,
    /// The second local query chunk against the whole block.
    SecondHalfQueries,
}

pub fn step_kind(r: usize, src: usize) -> Step {
    use std::cmp::Ordering::*;
    match src.cmp(&r) {
        Equal => Step::Diagonal,
        Less => Step::FirstHalfKeys,
        Greater => Step::SecondHalfQueries,
    }
}

/// Copy `lse [heads, q_len]` columns `row0 .. row0+rows` into `dst [heads, rows]`.
fn slice_lse<B: Backend>(
    b: &B,
    lse: &B::Buf,
    heads: usize,
    q_len: usize,
    row0: usize,
    rows: usize,
    dst: &mut B::Buf,
) {
    for h in 0..heads {
        b.copy(lse, h * q_len + row0, dst, h * rows, rows);
    }
}

/// Ring attention forward over the CP group: `out [t, n_q, d]`, `lse [n_q, t]` overwritten.
#[allow(clippy::too_many_arguments)]
pub fn ring_attention_forward<B: Backend, C: Comm>(
    b: &B,
    cp: &C,
    s: &RingShape,
    scale: f64,
    q: &B::Buf,
    k: &B::Buf,
    v: &B::Buf,
    out: &mut B::Buf,
    lse: &mut B::Buf,
    scratch: Option<&mut RingScratch<B>>,
) {
    let (n, r) = (cp.size(), cp.rank());
    if n == 1 {
        b.attention_forward(q, k, v, &s.attn(s.t, s.t, true), scale, out, lse);
        return;
    }
    let sc = scratch.expect("ring attention with cp > 1 needs its scratch buffers");
    let (t, c) = (s.t, s.t / 2);
    let kvn = t * s.kvw();
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    b.copy(k, 0, &mut sc.k_cur, 0, kvn);
    b.copy(v, 0, &mut sc.v_cur, 0, kvn);
    for i in 0..n {
        let src = (r + n - i) % n;
        // K and V of the next step travel while this step's block is attended.
        let (kx, vx) = if i + 1 < n {
            (
                start(b, cp, &sc.k_cur, kvn, next, &mut sc.k_next, prev),
                start(b, cp, &sc.v_cur, kvn, next, &mut sc.v_next, prev),
            )
        } else {
            (None, None)
        };
        match step_kind(r, src) {
            Step::Diagonal => b.attention_forward(q, k, v, &s.attn(t, t, true), scale, out, lse),
            Step::FirstHalfKeys => {
                // The block's first chunk: its first c rows.
                b.copy(&sc.k_cur, 0, &mut sc.kh, 0, c * s.kvw());
                b.copy(&sc.v_cur, 0, &mut sc.vh, 0, c * s.kvw());
                b.attention_forward(
                    q,
                    &sc.kh,
                    &sc.vh,
                    &s.attn(t, c, false),
                    scale,
                    &mut sc.out_f,
                    &mut sc.lse_f,
                );
                b.attention_merge(out, lse, &sc.out_f, &sc.lse_f, 0, t, t, s.n_q, s.head_dim);
            }
            Step::SecondHalfQueries => {
                b.copy(q, c * s.qw(), &mut sc.qh, 0, c * s.qw());
                b.attention_forward(
                    &sc.qh,
                    &sc.k_cur,
                    &sc.v_cur,
                    &s.attn(c, t, false),
                    scale,
                    &mut sc.out_h,
                    &mut sc.lse_h,
                );
                b.attention_merge(out, lse, &sc.out_h, &sc.lse_h, c, c, t, s.n_q, s.head_dim);
            }
        }
        for x in [kx, vx].into_iter().flatten() {
            cp.wait_buf(b, x);
        }
        if i + 1 < n {
            std::mem::swap(&mut sc.k_cur, &mut sc.k_next);
            std::mem::swap(&mut sc.v_cur, &mut sc.v_next);
        }
    }
}

/// Ring attention backward: `dq`, `dk`, `dv` (this rank's tokens) overwritten. `out` and `lse` are
/// the merged forward results.
#[allow(clippy::too_many_arguments)]
pub fn ring_attention_backward<B: Backend, C: Comm>(
    b: &B,
    cp: &C,
    s: &RingShape,
    scale: f64,
    q: &B::Buf,
    k: &B::Buf,
    v: &B::Buf,
    out: &B::Buf,
    dout: &B::Buf,
    lse: &B::Buf,
    dq: &mut B::Buf,
    dk: &mut B::Buf,
    dv: &mut B::Buf,
    scratch: Option<&mut RingScratch<B>>,
) {
    let (n, r) = (cp.size(), cp.rank());
    if n == 1 {
        b.attention_backward(
            q,
            k,
            v,
            out,
            dout,
            lse,
            &s.attn(s.t, s.t, true),
            scale,
            dq,
            dk,
            dv,
        );
        return;
    }
    let sc = scratch.expect("ring attention with cp > 1 needs its scratch buffers");
    let (t, c) = (s.t, s.t / 2);
    let (qw, kvw) = (s.qw(), s.kvw());
    let kvn = t * kvw;
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    b.copy(k, 0, &mut sc.k_cur, 0, kvn);
    b.copy(v, 0, &mut sc.v_cur, 0, kvn);
    // The second query chunk's rows, for the steps that only it takes part in.
    b.copy(q, c * qw, &mut sc.qh, 0, c * qw);
    b.copy(out, c * qw, &mut sc.oh, 0, c * qw);
    b.copy(dout, c * qw, &mut sc.doh, 0, c * qw);
    slice_lse(b, lse, s.n_q, t, c, c, &mut sc.lseh);
    b.fill_zero(dq);
    for i in 0..n {
        let src = (r + n - i) % n;
        // Order matters: every rank starts the dK/dV exchanges before the K/V ones, so the
        // messages of a step between the same pair of ranks match in posting order. From step 1
        // on, `dk_acc`/`dv_acc` hold the accumulator of the block of the previous step.
        let (dkx, dvx) = if i > 0 {
            (
                start(b, cp, &sc.dk_acc, kvn, next, &mut sc.dk_in, prev),
                start(b, cp, &sc.dv_acc, kvn, next, &mut sc.dv_in, prev),
            )
        } else {
            (None, None)
        };
        let (kx, vx) = if i + 1 < n {
            (
                start(b, cp, &sc.k_cur, kvn, next, &mut sc.k_next, prev),
                start(b, cp, &sc.v_cur, kvn, next, &mut sc.v_next, prev),
            )
        } else {
            (None, None)
        };
        // This rank's contribution to the block's dK/dV: rows [0, rows) of (dk_blk, dv_blk).
        let (half, rows) = match step_kind(r, src) {
            Step::Diagonal => {
                b.attention_backward(
                    q,
                    k,
                    v,
                    out,
                    dout,
                    lse,
                    &s.attn(t, t, true),
                    scale,
                    &mut sc.dq_f,
                    &mut sc.dk_f,
                    &mut sc.dv_f,
                );
                b.add_at(dq, 0, &sc.dq_f, 0, t * qw);
                (false, t)
            }
            Step::FirstHalfKeys => {
                b.copy(&sc.k_cur, 0, &mut sc.kh, 0, c * kvw);
                b.copy(&sc.v_cur, 0, &mut sc.vh, 0, c * kvw);
                b.attention_backward(
                    q,
                    &sc.kh,
                    &sc.vh,
                    out,
                    dout,
                    lse,
                    &s.attn(t, c, false),
                    scale,
                    &mut sc.dq_f,
                    &mut sc.dk_h,
                    &mut sc.dv_h,
                );
                b.add_at(dq, 0, &sc.dq_f, 0, t * qw);
                (true, c)
            }
            Step::SecondHalfQueries => {
                b.attention_backward(
                    &sc.qh,
                    &sc.k_cur,
                    &sc.v_cur,
                    &sc.oh,
                    &sc.doh,
                    &sc.lseh,
                    &s.attn(c, t, false),
                    scale,
                    &mut sc.dq_h,
                    &mut sc.dk_f,
                    &mut sc.dv_f,
                );
                b.add_at(dq, c * qw, &sc.dq_h, 0, c * qw);
                (false, t)
            }
        };
        for x in [dkx, dvx].into_iter().flatten() {
            cp.wait_buf(b, x);
        }
        // This block's accumulator: what the ranks before added (received), plus this rank's
        // part; at step 0 there is nothing received yet.
        if i > 0 {
            std::mem::swap(&mut sc.dk_acc, &mut sc.dk_in);
            std::mem::swap(&mut sc.dv_acc, &mut sc.dv_in);
        } else {
            b.fill_zero(&mut sc.dk_acc);
            b.fill_zero(&mut sc.dv_acc);
        }
        let (dk_blk, dv_blk) = if half {
            (&sc.dk_h, &sc.dv_h)
        } else {
            (&sc.dk_f, &sc.dv_f)
        };
        b.add_at(&mut sc.dk_acc, 0, dk_blk, 0, rows * kvw);
        b.add_at(&mut sc.dv_acc, 0, dv_blk, 0, rows * kvw);
        for x in [kx, vx].into_iter().flatten() {
            cp.wait_buf(b, x);
        }
        if i + 1 < n {
            std::mem::swap(&mut sc.k_cur, &mut sc.k_next);
            std::mem::swap(&mut sc.v_cur, &mut sc.v_next);
        }
    }
    // The last accumulator belongs to the next rank; this rank's own arrives from the previous.
    let dkx = cp.exchange_buf_start(b, &sc.dk_acc, kvn, next, dk, prev);
    let dvx = cp.exchange_buf_start(b, &sc.dv_acc, kvn, next, dv, prev);
    cp.wait_buf(b, dkx);
    cp.wait_buf(b, dvx);
}

#[cfg(test)]
mod tests {
    //! The ring's schedule against the global causal mask: for every rank and every block it
    //! receives, the pairs `step_kind` computes are exactly the pairs (query, key) with key
    //! position <= query position, taken from the zigzag layout's global positions. (The ring's
    //! numbers against naive attention: `parallel::tests`.)
    use super::*;
    use crate::data::loader::zigzag_chunks;

    /// Global positions of rank `r`'s local tokens.
    fn positions(s: usize, cp: usize, r: usize) -> Vec<usize> {
        zigzag_chunks(s, cp, r)
            .iter()
            .flat_map(|&(start, len)| start..start + len)
            .collect()
    }

    #[test]
    fn each_step_attends_exactly_the_causally_visible_pairs() {
        for cp in [2, 3, 4, 8] {
            let c = 3;
            let s = 2 * cp * c;
            for r in 0..cp {
                let q = positions(s, cp, r);
                for src in 0..cp {
                    let k = positions(s, cp, src);
                    // What the step computes: (local query index, local key index).
                    let computed = |i: usize, j: usize| match step_kind(r, src) {
                        // Causal over virtual positions 0..2c.
                        Step::Diagonal => j <= i,
                        Step::FirstHalfKeys => j < c,
                        Step::SecondHalfQueries => i >= c,
                    };
                    for (i, &qp) in q.iter().enumerate() {
                        for (j, &kp) in k.iter().enumerate() {
                            assert_eq!(
                                computed(i, j),
                                kp <= qp,
                                "cp {cp} rank {r} block {src}: query {qp} key {kp}"
                            );
                        }
                    }
                }
            }
        }
    }
}
