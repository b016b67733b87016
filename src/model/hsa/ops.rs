//! The operations HSA adds to a decoder, each with an explicit forward and backward, as
//! Backend-shaped calls (buffers in, buffers out): sliding-window attention, the chunk encoder's
//! bidirectional attention inside each chunk, the chunk mean of the landmark, retrieval
//! (landmark scores, the causal chunk mask, top-k), the fusion weights (softmax or
//! stick-breaking) and the chunk-wise HSA attention.
//!
//! `HsaOps` extends `Backend` with them; `CpuBackend<T>` implements it with the plain loops
//! below (the f64 instance is the gradient-check oracle). A CUDA backend implements the same
//! trait kernel by kernel; until it does, the HSA model is simply not instantiable over it.
//!
//! Layouts (one sequence of `T` tokens, `C = T / S` chunks):
//!   q `[T, H, dh]`, SWA k/v `[T, Hkv, dh]`, lse `[H, T]` (as `attention_forward`; the block
//!   attention likewise over its `blocks · block_len` rows);
//!   chunk memory k/v `[T, G, dh]` (row `c·S + i` is token i of chunk c);
//!   retrieval query `[T, G, dr]`, landmarks `[C, G, dr]`;
//!   selected chunks `idx` and their scores / fusion weights `[T, G, K]` (K = min(chunk_topk, C));
//!   HSA lse `[T, H, K]`.
//! Top-k indices are host `u32`s: they are constants of the backward pass.
//!
//! Incremental inference (infer.rs) runs the forwards on `T` new query rows against a cached
//! prefix: `SwaShape::cached` key rows before the queries, `RetrievalShape::row0` (the sequence
//! index of query row 0) and `chunks` (landmarks and memory chunks held, not `T / S`). Training
//! passes `cached = row0 = 0` and `chunks = T / S`; the backwards need exactly that.

use std::ops::Range;

use rayon::prelude::*;

use crate::backend::Backend;
use crate::backend::cpu::{CpuBackend, CpuBuf};
use crate::util::Real;

/// Causal sliding-window attention over one sequence: query row t sees key rows j with
/// `t − window ≤ j ≤ t` (flash-attn's `window_size = (window, 0)`), where query row t is key row
/// `cached + t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwaShape {
    /// Query rows; k and v hold `cached + len` rows.
    pub len: usize,
    /// Key rows before the first query's own (an inference cache; 0 in training).
    pub cached: usize,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub window: usize,
}

/// Bidirectional attention inside each block of `block_len` rows, no mask within a block and
/// nothing across blocks: the chunk encoder's self-attention over a chunk's S tokens (+ CLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockAttnShape {
    pub blocks: usize,
    pub block_len: usize,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Retrieval over `chunks` landmarks with `heads` retrieval heads of `dim` each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetrievalShape {
    /// Query rows.
    pub len: usize,
    /// The sequence index of query row 0 (tokens before it in an inference cache; 0 in
    /// training): visibility and the valid slots count from it.
    pub row0: usize,
    /// Landmarks (chunks in memory): `len / chunk` in training.
    pub chunks: usize,
    pub heads: usize,
    pub dim: usize,
    pub chunk: usize,
    /// Slots per token: `min(chunk_topk, chunks)`.
    pub topk: usize,
    /// `mask_slide_window`: chunk c is visible to t iff `c·S ≤ t − window` (else iff
    /// `(c+1)·S ≤ t`).
    pub mask_window: Option<usize>,
}

impl RetrievalShape {
    fn visible(&self, c: usize, t: usize) -> bool {
        match self.mask_window {
            Some(w) => c * self.chunk + w <= t,
            None => (c + 1) * self.chunk <= t,
        }
    }
}

/// How the selected chunks' scores become fusion weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fusion {
    /// `w = softmax(s)` over the slots with a finite score; 0 when there is none.
    Softmax,
    /// `w_j = σ(s_j) Π_{i<j} (1 − σ(s_i)) = exp(s_j − Σ_{i≤j} softplus s_i)` (slots in order).
    StickBreaking,
}

/// Chunk-wise attention of every query against the `topk` chunks of its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HsaShape {
    /// Query rows.
    pub len: usize,
    /// Chunks in memory: k_m, v_m hold `chunks · chunk` rows (`len / chunk` in training).
    pub chunks: usize,
    pub n_q_heads: usize,
    /// G: heads of the chunk memory (query head h reads group `h / (H/G)`).
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub chunk: usize,
    pub topk: usize,
    /// Off-by-one softmax: `p = exp(a) / (1 + Σ exp a)`.
    pub softmax1: bool,
}

/// The HSA operations on a backend's buffers. Gradients of shared inputs accumulate (`+=`) where
/// noted, since the chunk memory and landmarks are read by every group.
#[allow(clippy::too_many_arguments)]
pub trait HsaOps: Backend {
    /// `out [T, H, dh]`, `lse [H, T]` overwritten.
    fn swa_forward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: &SwaShape,
        scale: f64,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    );
    /// `dq`, `dk`, `dv` overwritten.
    fn swa_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        dout: &Self::Buf,
        lse: &Self::Buf,
        s: &SwaShape,
        scale: f64,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
    );
    /// `out [rows, H, dh]`, `lse [H, rows]` overwritten (rows = blocks · block_len).
    fn block_attention_forward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: &BlockAttnShape,
        scale: f64,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    );
    /// `dq`, `dk`, `dv` overwritten.
    fn block_attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        dout: &Self::Buf,
        lse: &Self::Buf,
        s: &BlockAttnShape,
        scale: f64,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
    );
    /// `out [rows/chunk, dim]` = mean of each chunk's rows of `x [rows, dim]` (overwritten).
    fn chunk_mean_forward(
        &self,
        x: &Self::Buf,
        rows: usize,
        dim: usize,
        chunk: usize,
        out: &mut Self::Buf,
    );
    /// `dx += ` the mean's gradient.
    fn chunk_mean_backward(
        &self,
        dout: &Self::Buf,
        rows: usize,
        dim: usize,
        chunk: usize,
        dx: &mut Self::Buf,
    );
    /// Scores `⟨q_t, L_c⟩ / sqrt(dim)` of the visible chunks, top-k per (token, head), kept
    /// slots sorted by chunk index descending (most recent first); slot j is valid only if
    /// `j < t / chunk`. Unused slots get index 0 and score −∞. `idx`, `scores` `[T, G, K]`.
    fn retrieval_select(
        &self,
        q: &Self::Buf,
        lmk: &Self::Buf,
        s: &RetrievalShape,
        idx: &mut [u32],
        scores: &mut Self::Buf,
    );
    /// Gradient of the selected scores with the indices held fixed: `dq += `, `dlmk += `.
    /// Slots with score −∞ carry none.
    fn retrieval_select_backward(
        &self,
        q: &Self::Buf,
        lmk: &Self::Buf,
        idx: &[u32],
        scores: &Self::Buf,
        dscores: &Self::Buf,
        s: &RetrievalShape,
        dq: &mut Self::Buf,
        dlmk: &mut Self::Buf,
    );
    /// Fusion weights `w [rows, k]` from scores `[rows, k]` (overwritten).
    fn fusion_forward(
        &self,
        scores: &Self::Buf,
        rows: usize,
        k: usize,
        f: Fusion,
        w: &mut Self::Buf,
    );
    /// `dscores` overwritten.
    fn fusion_backward(
        &self,
        scores: &Self::Buf,
        w: &Self::Buf,
        dw: &Self::Buf,
        rows: usize,
        k: usize,
        f: Fusion,
        dscores: &mut Self::Buf,
    );
    /// `out[t,h] = Σ_j w[t,g,j] · softmax_i(scale · q[t,h]·k_m[c_j S + i, g]) · v_m[..]` over
    /// the chunks `c_j = idx[t,g,j]`, no positions, no mask inside a chunk. `out [T, H, dh]`,
    /// `lse [T, H, K]` overwritten.
    fn hsa_forward(
        &self,
        q: &Self::Buf,
        km: &Self::Buf,
        vm: &Self::Buf,
        idx: &[u32],
        w: &Self::Buf,
        s: &HsaShape,
        scale: f64,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    );
    /// `dq [T,H,dh]` and `dw [T,G,K]` overwritten; `dkm`, `dvm` `+=`.
    fn hsa_backward(
        &self,
        q: &Self::Buf,
        km: &Self::Buf,
        vm: &Self::Buf,
        idx: &[u32],
        w: &Self::Buf,
        dout: &Self::Buf,
        lse: &Self::Buf,
        s: &HsaShape,
        scale: f64,
        dq: &mut Self::Buf,
        dkm: &mut Self::Buf,
        dvm: &mut Self::Buf,
        dw: &mut Self::Buf,
    );
}

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |s, (&x, &y)| s + x * y)
}

fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += a * x);
}

fn check(name: &str, got: usize, want: usize) {
    assert!(got == want, "{name}.len() is {got}, expected {want}");
}

// ---- sliding-window and block attention ---------------------------------------------------------

/// First key row query `t` sees.
fn window_start(t: usize, w: usize) -> usize {
    t.saturating_sub(w)
}

/// Which rows meet in a banded attention: query t reads key rows `keys(t)`, and key j is read by
/// query rows `queries(j)` (the transpose, for dk/dv). SWA and the chunk encoder's block
/// attention are the two bands; the softmax loops below are written once for both.
struct Band<'a> {
    /// Query rows.
    len: usize,
    /// Key rows before the queries' own (an inference cache): k and v hold `cached + len` rows,
    /// and `keys(t)` indexes them.
    cached: usize,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    keys: &'a (dyn Fn(usize) -> Range<usize> + Sync),
    queries: &'a (dyn Fn(usize) -> Range<usize> + Sync),
}

impl SwaShape {
    fn with_band<R>(&self, f: impl FnOnce(&Band) -> R) -> R {
        let (n, w, m0) = (self.len, self.window, self.cached);
        f(&Band {
            len: n,
            cached: m0,
            n_q_heads: self.n_q_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            // Query row i is sequence row m0 + i, whose own key row is m0 + i.
            keys: &|i| window_start(m0 + i, w)..m0 + i + 1,
            queries: &|j| j..n.min(j + w + 1),
        })
    }
}

impl BlockAttnShape {
    fn with_band<R>(&self, f: impl FnOnce(&Band) -> R) -> R {
        let l = self.block_len;
        let block = |t: usize| (t / l) * l..(t / l + 1) * l;
        f(&Band {
            len: self.blocks * l,
            cached: 0,
            n_q_heads: self.n_q_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            keys: &block,
            queries: &block,
        })
    }
}

fn band_forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    s: &Band,
    scale: T,
    out: &mut [T],
    lse: &mut [T],
) {
    let (n, hq, hk, d) = (s.len, s.n_q_heads, s.n_kv_heads, s.head_dim);
    let grp = hq / hk;
    check("attention q", q.len(), n * hq * d);
    check("attention k", k.len(), (s.cached + n) * hk * d);
    check("attention v", v.len(), (s.cached + n) * hk * d);
    check("attention out", out.len(), n * hq * d);
    check("attention lse", lse.len(), hq * n);
    let rows: Vec<Vec<T>> = out
        .par_chunks_mut(hq * d)
        .enumerate()
        .map(|(t, o)| {
            let mut l_row = vec![T::zero(); hq];
            for h in 0..hq {
                let kh = h / grp;
                let qv = &q[(t * hq + h) * d..][..d];
                let a: Vec<T> = (s.keys)(t)
                    .map(|j| scale * dot(qv, &k[(j * hk + kh) * d..][..d]))
                    .collect();
                let m = a.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
                let l: T = a.iter().map(|&x| (x - m).exp()).sum();
                let ls = m + l.ln();
                let o = &mut o[h * d..(h + 1) * d];
                o.fill(T::zero());
                for (j, &x) in (s.keys)(t).zip(&a) {
                    axpy(o, (x - ls).exp(), &v[(j * hk + kh) * d..][..d]);
                }
                l_row[h] = ls;
            }
            l_row
        })
        .collect();
    for (t, l_row) in rows.iter().enumerate() {
        for (h, &x) in l_row.iter().enumerate() {
            lse[h * n + t] = x;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn band_backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    dout: &[T],
    lse: &[T],
    s: &Band,
    scale: T,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let (n, hq, hk, d) = (s.len, s.n_q_heads, s.n_kv_heads, s.head_dim);
    let grp = hq / hk;
    assert!(
        s.cached == 0,
        "attention backward: a cached prefix is inference only"
    );
    check("attention dout", dout.len(), n * hq * d);
    check("attention dq", dq.len(), n * hq * d);
    check("attention dk", dk.len(), n * hk * d);
    check("attention dv", dv.len(), n * hk * d);
    // D[t, h] = dO · O.
    let delta: Vec<T> = (0..n * hq)
        .map(|r| dot(&dout[r * d..][..d], &out[r * d..][..d]))
        .collect();
    // p and dS of (query t, head h, key j), recomputed from lse.
    let p_ds = |t: usize, h: usize, j: usize| -> (T, T) {
        let kh = h / grp;
        let qv = &q[(t * hq + h) * d..][..d];
        let p = (scale * dot(qv, &k[(j * hk + kh) * d..][..d]) - lse[h * n + t]).exp();
        let dp = dot(&dout[(t * hq + h) * d..][..d], &v[(j * hk + kh) * d..][..d]);
        (p, p * (dp - delta[t * hq + h]))
    };
    dq.par_chunks_mut(hq * d).enumerate().for_each(|(t, dq)| {
        dq.fill(T::zero());
        for h in 0..hq {
            let kh = h / grp;
            for j in (s.keys)(t) {
                let (_, ds) = p_ds(t, h, j);
                axpy(
                    &mut dq[h * d..(h + 1) * d],
                    scale * ds,
                    &k[(j * hk + kh) * d..][..d],
                );
            }
        }
    });
    dk.par_chunks_mut(hk * d)
        .zip(dv.par_chunks_mut(hk * d))
        .enumerate()
        .for_each(|(j, (dk, dv))| {
            dk.fill(T::zero());
            dv.fill(T::zero());
            for t in (s.queries)(j) {
                for h in 0..hq {
                    let kh = h / grp;
                    let (p, ds) = p_ds(t, h, j);
                    axpy(
                        &mut dk[kh * d..(kh + 1) * d],
                        scale * ds,
                        &q[(t * hq + h) * d..][..d],
                    );
                    axpy(
                        &mut dv[kh * d..(kh + 1) * d],
                        p,
                        &dout[(t * hq + h) * d..][..d],
                    );
                }
            }
        });
}

pub fn swa_forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    s: &SwaShape,
    scale: T,
    out: &mut [T],
    lse: &mut [T],
) {
    s.with_band(|b| band_forward(q, k, v, b, scale, out, lse))
}

#[allow(clippy::too_many_arguments)]
pub fn swa_backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    dout: &[T],
    lse: &[T],
    s: &SwaShape,
    scale: T,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    s.with_band(|b| band_backward(q, k, v, out, dout, lse, b, scale, dq, dk, dv))
}

pub fn block_attention_forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    s: &BlockAttnShape,
    scale: T,
    out: &mut [T],
    lse: &mut [T],
) {
    s.with_band(|b| band_forward(q, k, v, b, scale, out, lse))
}

#[allow(clippy::too_many_arguments)]
pub fn block_attention_backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    dout: &[T],
    lse: &[T],
    s: &BlockAttnShape,
    scale: T,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    s.with_band(|b| band_backward(q, k, v, out, dout, lse, b, scale, dq, dk, dv))
}

// ---- chunk mean -------------------------------------------------------------------------------------

pub fn chunk_mean_forward<T: Real>(x: &[T], rows: usize, dim: usize, chunk: usize, out: &mut [T]) {
    check("chunk_mean x", x.len(), rows * dim);
    check("chunk_mean out", out.len(), rows / chunk * dim);
    let inv = T::one() / T::of(chunk as f64);
    for (c, o) in out.chunks_exact_mut(dim).enumerate() {
        o.fill(T::zero());
        for r in c * chunk..(c + 1) * chunk {
            axpy(o, T::one(), &x[r * dim..][..dim]);
        }
        o.iter_mut().for_each(|o| *o *= inv);
    }
}

pub fn chunk_mean_backward<T: Real>(
    dout: &[T],
    rows: usize,
    dim: usize,
    chunk: usize,
    dx: &mut [T],
) {
    check("chunk_mean dout", dout.len(), rows / chunk * dim);
    check("chunk_mean dx", dx.len(), rows * dim);
    let inv = T::one() / T::of(chunk as f64);
    for (r, dx) in dx.chunks_exact_mut(dim).enumerate() {
        axpy(dx, inv, &dout[(r / chunk) * dim..][..dim]);
    }
}

// ---- retrieval --------------------------------------------------------------------------------------

pub fn retrieval_select<T: Real>(
    q: &[T],
    lmk: &[T],
    s: &RetrievalShape,
    idx: &mut [u32],
    scores: &mut [T],
) {
    let (n, g, d, kk, nc) = (s.len, s.heads, s.dim, s.topk, s.chunks);
    check("retrieval q", q.len(), n * g * d);
    check("retrieval lmk", lmk.len(), nc * g * d);
    check("retrieval idx", idx.len(), n * g * kk);
    check("retrieval scores", scores.len(), n * g * kk);
    assert!(
        kk <= nc,
        "retrieval: topk {kk} exceeds the {nc} chunks of the sequence"
    );
    if kk == 0 {
        return; // no chunk in memory yet: nothing to select
    }
    let scale = T::one() / T::of(d as f64).sqrt();
    idx.par_chunks_mut(kk)
        .zip(scores.par_chunks_mut(kk))
        .enumerate()
        .for_each(|(r, (ix, sc))| {
            let (t, h) = (s.row0 + r / g, r % g);
            let qv = &q[r * d..][..d];
            let mut cand: Vec<(T, usize)> = (0..nc)
                .filter(|&c| s.visible(c, t))
                .map(|c| (scale * dot(qv, &lmk[(c * g + h) * d..][..d]), c))
                .collect();
            // Highest score first; ties go to the more recent chunk (torch leaves them open).
            cand.sort_by(|a, b| {
                b.0.partial_cmp(&a.0)
                    .expect("NaN score")
                    .then(b.1.cmp(&a.1))
            });
            let keep = kk.min(t / s.chunk).min(cand.len());
            cand.truncate(keep);
            cand.sort_by_key(|x| std::cmp::Reverse(x.1));
            ix.fill(0);
            sc.fill(T::neg_infinity());
            for (j, &(x, c)) in cand.iter().enumerate() {
                ix[j] = c as u32;
                sc[j] = x;
            }
        });
}

#[allow(clippy::too_many_arguments)]
pub fn retrieval_select_backward<T: Real>(
    q: &[T],
    lmk: &[T],
    idx: &[u32],
    scores: &[T],
    dscores: &[T],
    s: &RetrievalShape,
    dq: &mut [T],
    dlmk: &mut [T],
) {
    let (n, g, d, kk, nc) = (s.len, s.heads, s.dim, s.topk, s.chunks);
    check("retrieval dq", dq.len(), n * g * d);
    check("retrieval dlmk", dlmk.len(), nc * g * d);
    check("retrieval dscores", dscores.len(), n * g * kk);
    let scale = T::one() / T::of(d as f64).sqrt();
    for r in 0..n * g {
        let h = r % g;
        for j in 0..kk {
            if !scores[r * kk + j].is_finite() {
                continue;
            }
            let c = idx[r * kk + j] as usize;
            let ds = scale * dscores[r * kk + j];
            let at = (c * g + h) * d;
            axpy(&mut dq[r * d..][..d], ds, &lmk[at..at + d]);
            axpy(&mut dlmk[at..at + d], ds, &q[r * d..][..d]);
        }
    }
}

/// torch's `softplus(x, threshold=15)`: x above the threshold, log1p(exp x) below.
fn softplus<T: Real>(x: T) -> (T, T) {
    if x > T::of(15.0) {
        (x, T::one())
    } else {
        (x.exp().ln_1p(), T::one() / (T::one() + (-x).exp()))
    }
}

pub fn fusion_forward<T: Real>(scores: &[T], rows: usize, k: usize, f: Fusion, w: &mut [T]) {
    check("fusion scores", scores.len(), rows * k);
    check("fusion w", w.len(), rows * k);
    if k == 0 {
        return;
    }
    for (s, w) in scores.chunks_exact(k).zip(w.chunks_exact_mut(k)) {
        w.fill(T::zero());
        match f {
            Fusion::Softmax => {
                let m = s
                    .iter()
                    .filter(|x| x.is_finite())
                    .fold(T::neg_infinity(), |m, &x| m.max(x));
                if m == T::neg_infinity() {
                    continue;
                }
                let mut sum = T::zero();
                for (w, &x) in w.iter_mut().zip(s) {
                    if x.is_finite() {
                        *w = (x - m).exp();
                        sum += *w;
                    }
                }
                w.iter_mut().for_each(|w| *w /= sum);
            }
            Fusion::StickBreaking => {
                let mut acc = T::zero();
                for (w, &x) in w.iter_mut().zip(s) {
                    if x.is_finite() {
                        acc += softplus(x).0;
                        *w = (x - acc).exp();
                    }
                }
            }
        }
    }
}

pub fn fusion_backward<T: Real>(
    scores: &[T],
    w: &[T],
    dw: &[T],
    rows: usize,
    k: usize,
    f: Fusion,
    ds: &mut [T],
) {
    check("fusion dw", dw.len(), rows * k);
    check("fusion ds", ds.len(), rows * k);
    for r in 0..rows {
        let (s, w, dw) = (&scores[r * k..][..k], &w[r * k..][..k], &dw[r * k..][..k]);
        let ds = &mut ds[r * k..][..k];
        match f {
            Fusion::Softmax => {
                let wdw = dot(w, dw);
                for j in 0..k {
                    ds[j] = w[j] * (dw[j] - wdw);
                }
            }
            Fusion::StickBreaking => {
                // ds_j = w_j dw_j − softplus'(s_j) Σ_{i≥j} w_i dw_i.
                let mut suffix = T::zero();
                for j in (0..k).rev() {
                    suffix += w[j] * dw[j];
                    ds[j] = if s[j].is_finite() {
                        w[j] * dw[j] - softplus(s[j]).1 * suffix
                    } else {
                        T::zero()
                    };
                }
            }
        }
    }
}

// ---- HSA attention ----------------------------------------------------------------------------------

/// Log of the softmax denominator of the scores `a` (plus 1 with the off-by-one softmax).
fn chunk_lse<T: Real>(a: &[T], softmax1: bool) -> T {
    let mut m = a.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
    if softmax1 {
        m = m.max(T::zero());
    }
    let mut l: T = a.iter().map(|&x| (x - m).exp()).sum();
    if softmax1 {
        l += (-m).exp();
    }
    m + l.ln()
}

struct HsaGeom<'a, T> {
    s: &'a HsaShape,
    q: &'a [T],
    km: &'a [T],
    vm: &'a [T],
    idx: &'a [u32],
    scale: T,
}

impl<T: Real> HsaGeom<'_, T> {
    fn check(&self) {
        let s = self.s;
        let (n, d, mem) = (s.len, s.head_dim, s.chunks * s.chunk);
        check("hsa q", self.q.len(), n * s.n_q_heads * d);
        check("hsa km", self.km.len(), mem * s.n_kv_heads * d);
        check("hsa vm", self.vm.len(), mem * s.n_kv_heads * d);
        check("hsa idx", self.idx.len(), n * s.n_kv_heads * s.topk);
        let nc = s.chunks as u32;
        assert!(
            self.idx.iter().all(|&c| c < nc),
            "hsa: a chunk index is out of range"
        );
    }
    fn group(&self, h: usize) -> usize {
        h / (self.s.n_q_heads / self.s.n_kv_heads)
    }
    fn q_row(&self, t: usize, h: usize) -> &[T] {
        let d = self.s.head_dim;
        &self.q[(t * self.s.n_q_heads + h) * d..][..d]
    }
    fn mem_row<'b>(&self, m: &'b [T], r: usize, g: usize) -> &'b [T] {
        let d = self.s.head_dim;
        &m[(r * self.s.n_kv_heads + g) * d..][..d]
    }
    /// The chunk slot (t, h, j): its first memory row and the scaled scores.
    fn scores(&self, t: usize, h: usize, j: usize) -> (usize, Vec<T>) {
        let g = self.group(h);
        let c = self.idx[(t * self.s.n_kv_heads + g) * self.s.topk + j] as usize;
        let r0 = c * self.s.chunk;
        let qv = self.q_row(t, h);
        let a = (r0..r0 + self.s.chunk)
            .map(|r| self.scale * dot(qv, self.mem_row(self.km, r, g)))
            .collect();
        (r0, a)
    }
}

#[allow(clippy::too_many_arguments)]
pub fn hsa_forward<T: Real>(
    q: &[T],
    km: &[T],
    vm: &[T],
    idx: &[u32],
    w: &[T],
    s: &HsaShape,
    scale: T,
    out: &mut [T],
    lse: &mut [T],
) {
    let x = HsaGeom {
        s,
        q,
        km,
        vm,
        idx,
        scale,
    };
    x.check();
    let (hq, g, d, kk) = (s.n_q_heads, s.n_kv_heads, s.head_dim, s.topk);
    check("hsa w", w.len(), s.len * g * kk);
    check("hsa out", out.len(), q.len());
    check("hsa lse", lse.len(), s.len * hq * kk);
    if kk == 0 {
        out.fill(T::zero()); // no chunk in memory yet: HSA adds nothing
        return;
    }
    out.par_chunks_mut(hq * d)
        .zip(lse.par_chunks_mut(hq * kk))
        .enumerate()
        .for_each(|(t, (o, l))| {
            o.fill(T::zero());
            for h in 0..hq {
                let wt = &w[(t * g + x.group(h)) * kk..][..kk];
                let o = &mut o[h * d..(h + 1) * d];
                for j in 0..kk {
                    let (r0, a) = x.scores(t, h, j);
                    let ls = chunk_lse(&a, s.softmax1);
                    l[h * kk + j] = ls;
                    for (i, &ai) in a.iter().enumerate() {
                        let p = (ai - ls).exp();
                        axpy(o, wt[j] * p, x.mem_row(vm, r0 + i, x.group(h)));
                    }
                }
            }
        });
}

#[allow(clippy::too_many_arguments)]
pub fn hsa_backward<T: Real>(
    q: &[T],
    km: &[T],
    vm: &[T],
    idx: &[u32],
    w: &[T],
    dout: &[T],
    lse: &[T],
    s: &HsaShape,
    scale: T,
    dq: &mut [T],
    dkm: &mut [T],
    dvm: &mut [T],
    dw: &mut [T],
) {
    let x = HsaGeom {
        s,
        q,
        km,
        vm,
        idx,
        scale,
    };
    x.check();
    let (n, hq, g, d, kk, sz) = (
        s.len,
        s.n_q_heads,
        s.n_kv_heads,
        s.head_dim,
        s.topk,
        s.chunk,
    );
    check("hsa dout", dout.len(), q.len());
    check("hsa dq", dq.len(), q.len());
    check("hsa dkm", dkm.len(), km.len());
    check("hsa dvm", dvm.len(), vm.len());
    check("hsa dw", dw.len(), n * g * kk);
    let do_row = |t: usize, h: usize| &dout[(t * hq + h) * d..][..d];
    // Per (t, h, j): p_i and dp_i = dO·v_i of the slot's chunk.
    let probs = |t: usize, h: usize, j: usize| -> (usize, Vec<T>, Vec<T>) {
        let (r0, a) = x.scores(t, h, j);
        let ls = lse[(t * hq + h) * kk + j];
        let p = a.iter().map(|&ai| (ai - ls).exp()).collect();
        let dp = (0..sz)
            .map(|i| dot(do_row(t, h), x.mem_row(vm, r0 + i, x.group(h))))
            .collect();
        (r0, p, dp)
    };
    // Pass 1, row-local: D[t,h,j] = ō_j·dO = Σ p_i dp_i; dw = Σ_{h in group} D; dq.
    let mut delta = vec![T::zero(); n * hq * kk];
    dq.par_chunks_mut(hq * d)
        .zip(dw.par_chunks_mut(g * kk))
        .zip(delta.par_chunks_mut(hq * kk))
        .enumerate()
        .for_each(|(t, ((dq, dw), dl))| {
            dq.fill(T::zero());
            dw.fill(T::zero());
            for h in 0..hq {
                let gh = x.group(h);
                for j in 0..kk {
                    let wj = w[(t * g + gh) * kk + j];
                    let (r0, p, dp) = probs(t, h, j);
                    let dd = dot(&p, &dp);
                    dl[h * kk + j] = dd;
                    dw[gh * kk + j] += dd;
                    for i in 0..sz {
                        let ds = wj * p[i] * (dp[i] - dd);
                        axpy(
                            &mut dq[h * d..(h + 1) * d],
                            scale * ds,
                            x.mem_row(km, r0 + i, gh),
                        );
                    }
                }
            }
        });
    // Pass 2, per chunk through an inverted index (as the authors' dk/dv kernel): the chunk's
    // memory rows are contiguous, so each task owns its block of dkm/dvm.
    let nc = s.chunks;
    let mut refs: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); nc];
    for t in 0..n {
        for h in 0..hq {
            for j in 0..kk {
                let c = idx[(t * g + x.group(h)) * kk + j] as usize;
                refs[c].push((t, h, j));
            }
        }
    }
    let block = sz * g * d;
    dkm.par_chunks_mut(block)
        .zip(dvm.par_chunks_mut(block))
        .zip(refs.par_iter())
        .for_each(|((dk, dv), refs)| {
            for &(t, h, j) in refs {
                let gh = x.group(h);
                let wj = w[(t * g + gh) * kk + j];
                if wj == T::zero() {
                    continue; // a weight-0 slot contributes nothing to dk, dv
                }
                let (_, p, dp) = probs(t, h, j);
                let dd = delta[(t * hq + h) * kk + j];
                for i in 0..sz {
                    let at = (i * g + gh) * d;
                    let ds = wj * p[i] * (dp[i] - dd);
                    axpy(&mut dk[at..at + d], scale * ds, x.q_row(t, h));
                    axpy(&mut dv[at..at + d], wj * p[i], do_row(t, h));
                }
            }
        });
}

// ---- the CPU backend ----------------------------------------------------------------------------------

impl<T: Real> HsaOps for CpuBackend<T> {
    fn swa_forward(
        &self,
        q: &CpuBuf<T>,
        k: &CpuBuf<T>,
        v: &CpuBuf<T>,
        s: &SwaShape,
        scale: f64,
        out: &mut CpuBuf<T>,
        lse: &mut CpuBuf<T>,
    ) {
        swa_forward(q, k, v, s, T::of(scale), out, lse)
    }
    fn swa_backward(
        &self,
        q: &CpuBuf<T>,
        k: &CpuBuf<T>,
        v: &CpuBuf<T>,
        out: &CpuBuf<T>,
        dout: &CpuBuf<T>,
        lse: &CpuBuf<T>,
        s: &SwaShape,
        scale: f64,
        dq: &mut CpuBuf<T>,
        dk: &mut CpuBuf<T>,
        dv: &mut CpuBuf<T>,
    ) {
        swa_backward(q, k, v, out, dout, lse, s, T::of(scale), dq, dk, dv)
    }
    fn block_attention_forward(
        &self,
        q: &CpuBuf<T>,
        k: &CpuBuf<T>,
        v: &CpuBuf<T>,
        s: &BlockAttnShape,
        scale: f64,
        out: &mut CpuBuf<T>,
        lse: &mut CpuBuf<T>,
    ) {
        block_attention_forward(q, k, v, s, T::of(scale), out, lse)
    }
    fn block_attention_backward(
        &self,
        q: &CpuBuf<T>,
        k: &CpuBuf<T>,
        v: &CpuBuf<T>,
        out: &CpuBuf<T>,
        dout: &CpuBuf<T>,
        lse: &CpuBuf<T>,
        s: &BlockAttnShape,
        scale: f64,
        dq: &mut CpuBuf<T>,
        dk: &mut CpuBuf<T>,
        dv: &mut CpuBuf<T>,
    ) {
        block_attention_backward(q, k, v, out, dout, lse, s, T::of(scale), dq, dk, dv)
    }
    fn chunk_mean_forward(
        &self,
        x: &CpuBuf<T>,
        rows: usize,
        dim: usize,
        chunk: usize,
        out: &mut CpuBuf<T>,
    ) {
        chunk_mean_forward(x, rows, dim, chunk, out)
    }
    fn chunk_mean_backward(
        &self,
        dout: &CpuBuf<T>,
        rows: usize,
        dim: usize,
        chunk: usize,
        dx: &mut CpuBuf<T>,
    ) {
        chunk_mean_backward(dout, rows, dim, chunk, dx)
    }
    fn retrieval_select(
        &self,
        q: &CpuBuf<T>,
        lmk: &CpuBuf<T>,
        s: &RetrievalShape,
        idx: &mut [u32],
        scores: &mut CpuBuf<T>,
    ) {
        retrieval_select(q, lmk, s, idx, scores)
    }
    fn retrieval_select_backward(
        &self,
        q: &CpuBuf<T>,
        lmk: &CpuBuf<T>,
        idx: &[u32],
        scores: &CpuBuf<T>,
        dscores: &CpuBuf<T>,
        s: &RetrievalShape,
        dq: &mut CpuBuf<T>,
        dlmk: &mut CpuBuf<T>,
    ) {
        retrieval_select_backward(q, lmk, idx, scores, dscores, s, dq, dlmk)
    }
    fn fusion_forward(
        &self,
        scores: &CpuBuf<T>,
        rows: usize,
        k: usize,
        f: Fusion,
        w: &mut CpuBuf<T>,
    ) {
        fusion_forward(scores, rows, k, f, w)
    }
    fn fusion_backward(
        &self,
        scores: &CpuBuf<T>,
        w: &CpuBuf<T>,
        dw: &CpuBuf<T>,
        rows: usize,
        k: usize,
        f: Fusion,
        dscores: &mut CpuBuf<T>,
    ) {
        fusion_backward(scores, w, dw, rows, k, f, dscores)
    }
    fn hsa_forward(
        &self,
        q: &CpuBuf<T>,
        km: &CpuBuf<T>,
        vm: &CpuBuf<T>,
        idx: &[u32],
        w: &CpuBuf<T>,
        s: &HsaShape,
        scale: f64,
        out: &mut CpuBuf<T>,
        lse: &mut CpuBuf<T>,
    ) {
        hsa_forward(q, km, vm, idx, w, s, T::of(scale), out, lse)
    }
    fn hsa_backward(
        &self,
        q: &CpuBuf<T>,
        km: &CpuBuf<T>,
        vm: &CpuBuf<T>,
        idx: &[u32],
        w: &CpuBuf<T>,
        dout: &CpuBuf<T>,
        lse: &CpuBuf<T>,
        s: &HsaShape,
        scale: f64,
        dq: &mut CpuBuf<T>,
        dkm: &mut CpuBuf<T>,
        dvm: &mut CpuBuf<T>,
        dw: &mut CpuBuf<T>,
    ) {
        hsa_backward(
            q,
            km,
            vm,
            idx,
            w,
            dout,
            lse,
            s,
            T::of(scale),
            dq,
            dkm,
            dvm,
            dw,
        )
    }
}
