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
//! (`Comm::wait_clock`).

use crate::backend::{AttnShape, Backend};
use crate::parallel::comm::{Comm, Elem, Exchange, PendingExchange};

/// `ULTRALONG_RING_NO_OVERLAP=1` waits for each transfer right after starting it, so the time
/// blocked is the whole communication time: the benchmark's baseline for the share hidden.
fn no_overlap() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| std::env::var("ULTRALONG_RING_NO_OVERLAP").is_ok_and(|v| v == "1"))
}

/// Start an exchange; without overlap (benchmark baseline) finish it at once.
fn start<T: Elem, C: Comm>(
    cp: &C,
    send: Vec<T>,
    to: usize,
    recv: Vec<T>,
    from: usize,
) -> Exchange<T> {
    let x = cp.exchange_start(send, to, recv, from);
    if no_overlap() {
        let (s, r) = cp.wait(x);
        return Exchange::new(Box::new(Done(s, r)));
    }
    x
}

struct Done<T>(Vec<T>, Vec<T>);

impl<T: Elem> PendingExchange<T> for Done<T> {
    fn wait(self: Box<Self>) -> (Vec<T>, Vec<T>) {
        (self.0, self.1)
    }
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

/// Buffers of the ring, allocated once per run (none when cp = 1).
pub struct RingScratch<B: Backend> {
    kb: B::Buf,
    vb: B::Buf,
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

impl<B: Backend> RingScratch<B> {
    pub fn new(b: &B, s: &RingShape, cp: usize) -> Option<Self> {
        if cp == 1 {
            return None;
        }
        let (t, c) = (s.t, s.t / 2);
        Some(RingScratch {
            kb: b.zeros(t * s.kvw()),
            vb: b.zeros(t * s.kvw()),
            kh: b.zeros(c * s.kvw()),
            vh: b.zeros(c * s.kvw()),
            qh: b.zeros(c * s.qw()),
            oh: b.zeros(c * s.qw()),
            doh: b.zeros(c * s.qw()),
            lseh: b.zeros(c * s.n_q),
            out_f: b.zeros(t * s.qw()),
            lse_f: b.zeros(t * s.n_q),
            out_h: b.zeros(c * s.qw()),
            lse_h: b.zeros(c * s.n_q),
            dq_f: b.zeros(t * s.qw()),
            dq_h: b.zeros(c * s.qw()),
            dk_f: b.zeros(t * s.kvw()),
            dv_f: b.zeros(t * s.kvw()),
            dk_h: b.zeros(c * s.kvw()),
            dv_h: b.zeros(c * s.kvw()),
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

fn to_host<B: Backend>(b: &B, buf: &B::Buf, off: usize, n: usize, out: &mut [B::Host]) {
    b.read_host(buf, off, &mut out[..n]);
}

/// Copy the first `rows` rows (per-row width `w`) of the host block `[k; v]` into `k`/`v`.
fn upload_kv<B: Backend>(
    b: &B,
    block: &[B::Host],
    kvn: usize,
    k: &mut B::Buf,
    v: &mut B::Buf,
    n: usize,
) {
    b.write_host(k, 0, &block[..n]);
    b.write_host(v, 0, &block[kvn..kvn + n]);
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
    let mut cur = vec![B::Host::default(); 2 * kvn];
    to_host(b, k, 0, kvn, &mut cur[..kvn]);
    to_host(b, v, 0, kvn, &mut cur[kvn..]);
    let mut spare = vec![B::Host::default(); 2 * kvn];
    for i in 0..n {
        let src = (r + n - i) % n;
        let inflight =
            (i + 1 < n).then(|| start(cp, cur.clone(), next, std::mem::take(&mut spare), prev));
        match step_kind(r, src) {
            Step::Diagonal => b.attention_forward(q, k, v, &s.attn(t, t, true), scale, out, lse),
            Step::FirstHalfKeys => {
                upload_kv(b, &cur, kvn, &mut sc.kh, &mut sc.vh, c * s.kvw());
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
                upload_kv(b, &cur, kvn, &mut sc.kb, &mut sc.vb, kvn);
                b.copy(q, c * s.qw(), &mut sc.qh, 0, c * s.qw());
                b.attention_forward(
                    &sc.qh,
                    &sc.kb,
                    &sc.vb,
                    &s.attn(c, t, false),
                    scale,
                    &mut sc.out_h,
                    &mut sc.lse_h,
                );
                b.attention_merge(out, lse, &sc.out_h, &sc.lse_h, c, c, t, s.n_q, s.head_dim);
            }
        }
        if let Some(x) = inflight {
            let (sent, got) = cp.wait(x);
            spare = sent;
            cur = got;
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
    let mut cur = vec![B::Host::default(); 2 * kvn];
    to_host(b, k, 0, kvn, &mut cur[..kvn]);
    to_host(b, v, 0, kvn, &mut cur[kvn..]);
    let mut spare = vec![B::Host::default(); 2 * kvn];
    // The second query chunk's rows, for the steps that only it takes part in.
    b.copy(q, c * qw, &mut sc.qh, 0, c * qw);
    b.copy(out, c * qw, &mut sc.oh, 0, c * qw);
    b.copy(dout, c * qw, &mut sc.doh, 0, c * qw);
    slice_lse(b, lse, s.n_q, t, c, c, &mut sc.lseh);
    b.fill_zero(dq);
    // The dK/dV accumulator of the block held at the previous step, sent on at this step.
    let mut acc: Vec<B::Host> = Vec::new();
    let mut acc_spare = vec![B::Host::default(); 2 * kvn];
    let mut block = vec![B::Host::default(); 2 * kvn];
    for i in 0..n {
        let src = (r + n - i) % n;
        // Order matters: every rank starts the dK/dV exchange before the K/V one, so the two
        // messages of a step between the same pair of ranks match in posting order.
        let dkv_flight = (i > 0).then(|| {
            start(
                cp,
                std::mem::take(&mut acc),
                next,
                std::mem::take(&mut acc_spare),
                prev,
            )
        });
        let kv_flight =
            (i + 1 < n).then(|| start(cp, cur.clone(), next, std::mem::take(&mut spare), prev));
        block.iter_mut().for_each(|x| *x = B::Host::default());
        match step_kind(r, src) {
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
                b.read_host(&sc.dk_f, 0, &mut block[..kvn]);
                b.read_host(&sc.dv_f, 0, &mut block[kvn..]);
            }
            Step::FirstHalfKeys => {
                upload_kv(b, &cur, kvn, &mut sc.kh, &mut sc.vh, c * kvw);
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
                b.read_host(&sc.dk_h, 0, &mut block[..c * kvw]);
                b.read_host(&sc.dv_h, 0, &mut block[kvn..kvn + c * kvw]);
            }
            Step::SecondHalfQueries => {
                upload_kv(b, &cur, kvn, &mut sc.kb, &mut sc.vb, kvn);
                b.attention_backward(
                    &sc.qh,
                    &sc.kb,
                    &sc.vb,
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
                b.read_host(&sc.dk_f, 0, &mut block[..kvn]);
                b.read_host(&sc.dv_f, 0, &mut block[kvn..]);
            }
        }
        // This block's accumulator: what the ranks before added, plus this rank's part.
        acc = match dkv_flight {
            None => std::mem::take(&mut block),
            Some(x) => {
                let (sent, mut got) = cp.wait(x);
                acc_spare = sent;
                for (a, &g) in got.iter_mut().zip(&block) {
                    *a = a.add(g);
                }
                got
            }
        };
        if block.is_empty() {
            block = vec![B::Host::default(); 2 * kvn];
        }
        if let Some(x) = kv_flight {
            let (sent, got) = cp.wait(x);
            spare = sent;
            cur = got;
        }
    }
    // The last accumulator belongs to the next rank; this rank's own arrives from the previous.
    let x = start(cp, acc, next, acc_spare, prev);
    let (_, mine) = cp.wait(x);
    b.write_host(dk, 0, &mine[..kvn]);
    b.write_host(dv, 0, &mine[kvn..]);
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
