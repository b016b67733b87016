//! CPU reference kernels other than attention (which has its own file). Each is the plain formula,
//! parallel over rows with rayon where the work is large enough, and deterministic: reductions
//! across rows (parameter gradients, norms) sum fixed-size chunks in a fixed order, so results do
//! not depend on the number of threads.

use rayon::prelude::*;

use crate::backend::AdamW;
use crate::util::Real;

/// Rows per parallel task; also the fixed chunking of cross-row reductions.
const ROW_CHUNK: usize = 64;
/// Below this many multiply-adds a GEMM runs on one thread (threading costs more than it saves).
const GEMM_PARALLEL_MIN: usize = 1 << 16;

pub fn add_assign<T: Real>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "add_assign: length mismatch");
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d += s));
}

pub fn scale<T: Real>(b: &mut [T], s: T) {
    b.par_chunks_mut(1 << 14)
        .for_each(|c| c.iter_mut().for_each(|x| *x *= s));
}

/// Σ x² accumulated in f64 over fixed chunks, summed in order (thread-count independent).
pub fn sum_squares<T: Real>(b: &[T]) -> f64 {
    let partial: Vec<f64> = b
        .par_chunks(1 << 14)
        .map(|c| c.iter().map(|&x| x.as_f64() * x.as_f64()).sum::<f64>())
        .collect();
    partial.iter().sum()
}

/// `C[m, n] (+)= op(A) · op(B)`, row-major; see `Backend::gemm`.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Real>(
    c: &mut [T],
    a: &[T],
    b: &[T],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    assert!(
        c.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "gemm: buffer too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(T::zero());
        }
        return;
    }
    // Strides (column stride, row stride) of op(A) [m, k] and op(B) [k, n].
    let (a_cs, a_rs) = if trans_a {
        (m as isize, 1)
    } else {
        (1, k as isize)
    };
    let (b_cs, b_rs) = if trans_b {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    let par = if m * n * k >= GEMM_PARALLEL_MIN {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index the strides reach: op(A) touches
    // a[0 .. m*k], op(B) b[0 .. k*n], C c[0 .. m*n]; C does not alias A or B (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
}

/// An id whose row lives on another vocabulary shard (vocab-parallel embedding): its output row
/// is zero and its gradient is dropped.
pub const NOT_IN_SHARD: u32 = u32::MAX;

pub fn embedding_forward<T: Real>(table: &[T], ids: &[u32], dim: usize, out: &mut [T]) {
    assert_eq!(
        out.len(),
        ids.len() * dim,
        "embedding_forward: out has the wrong size"
    );
    let vocab = table.len() / dim;
    out.par_chunks_mut(dim)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            if id == NOT_IN_SHARD {
                row.fill(T::zero());
                return;
            }
            let id = id as usize;
            assert!(
                id < vocab,
                "token id {id} out of range for vocabulary {vocab}"
            );
            row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
        });
}

/// Sequential in token order: a repeated token's rows are summed in the same order every run.
pub fn embedding_backward<T: Real>(dtable: &mut [T], ids: &[u32], dim: usize, dout: &[T]) {
    assert_eq!(
        dout.len(),
        ids.len() * dim,
        "embedding_backward: dout has the wrong size"
    );
    for (t, &id) in ids.iter().enumerate() {
        if id == NOT_IN_SHARD {
            continue;
        }
        let id = id as usize;
        let dst = &mut dtable[id * dim..(id + 1) * dim];
        for (d, &g) in dst.iter_mut().zip(&dout[t * dim..(t + 1) * dim]) {
            *d += g;
        }
    }
}

/// `out = x · rstd · w`, `rstd = 1/sqrt(mean(x²) + eps)` (HF LlamaRMSNorm: statistics in f32 or
/// better; here the mean of squares is accumulated in f64).
pub fn rmsnorm_forward<T: Real>(
    x: &[T],
    w: &[T],
    eps: f64,
    rows: usize,
    dim: usize,
    out: &mut [T],
    rstd: &mut [T],
) {
    assert!(
        x.len() == rows * dim && out.len() == rows * dim && rstd.len() == rows && w.len() == dim
    );
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .zip(rstd.par_iter_mut())
        .for_each(|((o, xr), r)| {
            let ms = xr.iter().map(|&v| v.as_f64() * v.as_f64()).sum::<f64>() / dim as f64;
            let rs = T::of(1.0 / (ms + eps).sqrt());
            *r = rs;
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                *o = xv * rs * wv;
            }
        });
}

/// `dx += r·w⊙g − r³·x·mean(g⊙w⊙x)`, `dw += Σ_rows g⊙x·r`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward<T: Real>(
    dout: &[T],
    x: &[T],
    w: &[T],
    rstd: &[T],
    rows: usize,
    dim: usize,
    dx: &mut [T],
    dw: &mut [T],
) {
    assert!(
        x.len() == rows * dim
            && dout.len() == rows * dim
            && dx.len() == rows * dim
            && w.len() == dim
    );
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(ROW_CHUNK * dim)
        .enumerate()
        .map(|(ci, dxc)| {
            let mut dwp = vec![T::zero(); dim];
            let r0 = ci * ROW_CHUNK;
            for (j, dxr) in dxc.chunks_mut(dim).enumerate() {
                let row = r0 + j;
                let xr = &x[row * dim..(row + 1) * dim];
                let gr = &dout[row * dim..(row + 1) * dim];
                let r = rstd[row];
                let dot: T = gr
                    .iter()
                    .zip(w)
                    .zip(xr)
                    .map(|((&g, &wv), &xv)| g * wv * xv)
                    .sum();
                let c = r * r * r * dot / T::of(dim as f64);
                for i in 0..dim {
                    dxr[i] += r * w[i] * gr[i] - c * xr[i];
                    dwp[i] += gr[i] * xr[i] * r;
                }
            }
            dwp
        })
        .collect();
    for p in partials {
        for (d, v) in dw.iter_mut().zip(p) {
            *d += v;
        }
    }
}

/// HF half-split rotation of `x [rows, heads, head_dim]` in place; `transpose` applies Rᵀ
/// (the backward pass), with the attention factor carried by `cos`/`sin` either way.
pub fn rope_rotate<T: Real>(
    x: &mut [T],
    cos: &[T],
    sin: &[T],
    rows: usize,
    heads: usize,
    head_dim: usize,
    transpose: bool,
) {
    let half = head_dim / 2;
    assert!(
        x.len() == rows * heads * head_dim && cos.len() >= rows * half && sin.len() >= rows * half
    );
    x.par_chunks_mut(heads * head_dim)
        .enumerate()
        .for_each(|(t, row)| {
            let c = &cos[t * half..(t + 1) * half];
            let s = &sin[t * half..(t + 1) * half];
            for h in row.chunks_mut(head_dim) {
                let (x1, x2) = h.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    if transpose {
                        x1[i] = a * c[i] + b * s[i];
                        x2[i] = b * c[i] - a * s[i];
                    } else {
                        x1[i] = a * c[i] - b * s[i];
                        x2[i] = b * c[i] + a * s[i];
                    }
                }
            }
        });
}

fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

pub fn swiglu_forward<T: Real>(gate: &[T], up: &[T], out: &mut [T]) {
    assert!(gate.len() == up.len() && out.len() == up.len());
    out.par_chunks_mut(4096)
        .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
        .for_each(|(o, (g, u))| {
            for i in 0..o.len() {
                o[i] = g[i] * sigmoid(g[i]) * u[i];
            }
        });
}

/// d/dg [g·σ(g)·u] = u·σ(g)·(1 + g·(1 − σ(g))); d/du = g·σ(g).
pub fn swiglu_backward<T: Real>(gate: &[T], up: &[T], dout: &[T], dgate: &mut [T], dup: &mut [T]) {
    assert!(
        gate.len() == up.len()
            && dout.len() == up.len()
            && dgate.len() == up.len()
            && dup.len() == up.len()
    );
    dgate
        .par_chunks_mut(4096)
        .zip(dup.par_chunks_mut(4096))
        .enumerate()
        .for_each(|(c, (dg, du))| {
            let o = c * 4096;
            for i in 0..dg.len() {
                let (g, u, d) = (gate[o + i], up[o + i], dout[o + i]);
                let s = sigmoid(g);
                dg[i] = d * u * s * (T::one() + g * (T::one() - s));
                du[i] = d * g * s;
            }
        });
}

/// Per row of one vocabulary shard's `logits [rows, vocab]`: the row maximum, `Σ exp(z − max)`
/// (f64) and the target's logit when the target is in this shard (`targets[r] >= 0`). Rows with
/// target `IGNORE` (−1) give zeros.
pub fn cross_entropy_stats<T: Real>(
    logits: &[T],
    targets: &[i32],
    vocab: usize,
) -> Vec<crate::backend::CeStats> {
    assert_eq!(logits.len(), targets.len() * vocab);
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &tgt)| {
            if tgt == -1 {
                return crate::backend::CeStats::default();
            }
            let max = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
            let sum: f64 = row.iter().map(|&v| (v - max).exp().as_f64()).sum();
            let target = if tgt >= 0 {
                assert!(
                    (tgt as usize) < vocab,
                    "target {tgt} out of shard of {vocab}"
                );
                Some(row[tgt as usize].as_f64())
            } else {
                None
            };
            crate::backend::CeStats {
                max: max.as_f64(),
                sum,
                target,
            }
        })
        .collect()
}

/// `logits ← grad_scale · (exp(z − max[r]) / sum[r] − [j = target])` per row (the global max and
/// sum over all shards); rows with target −1 become 0.
pub fn cross_entropy_grad<T: Real>(
    logits: &mut [T],
    targets: &[i32],
    vocab: usize,
    max: &[f64],
    sum: &[f64],
    grad_scale: f64,
) {
    assert_eq!(logits.len(), targets.len() * vocab);
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .enumerate()
        .for_each(|(r, (row, &tgt))| {
            if tgt == -1 {
                row.fill(T::zero());
                return;
            }
            let m = T::of(max[r]);
            let k = T::of(grad_scale / sum[r]);
            for v in row.iter_mut() {
                *v = (*v - m).exp() * k;
            }
            if tgt >= 0 {
                row[tgt as usize] -= T::of(grad_scale);
            }
        });
}

/// Merge one ring step's attention result into the running one, per row and head, with the
/// overflow-free form (docs/ARCHITECTURE.md): `out −= σ(lse_b − lse)·(out − out_b)`,
/// `lse ← max + ln(1 + exp(min − max))`. Neither exponent can overflow, whatever the logits'
/// scale; a side with lse = −∞ (no visible key) contributes nothing. `out [q_len, heads, d]` rows
/// `row0 .. row0 + rows` against `out_b [rows, heads, d]`; `lse [heads, q_len]`, `lse_b [heads, rows]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_merge<T: Real>(
    out: &mut [T],
    lse: &mut [T],
    out_b: &[T],
    lse_b: &[T],
    row0: usize,
    rows: usize,
    q_len: usize,
    heads: usize,
    d: usize,
) {
    assert!(out.len() == q_len * heads * d && lse.len() == heads * q_len);
    assert!(out_b.len() == rows * heads * d && lse_b.len() == heads * rows && row0 + rows <= q_len);
    let new_lse: Vec<(T, T)> = (0..rows * heads)
        .map(|i| {
            let (r, h) = (i / heads, i % heads);
            let a = lse[h * q_len + row0 + r];
            let bb = lse_b[h * rows + r];
            if bb == T::neg_infinity() {
                return (a, T::zero());
            }
            if a == T::neg_infinity() {
                return (bb, T::one());
            }
            // w = σ(b − a): the weight of the new block in the merged output.
            let w = T::one() / (T::one() + (a - bb).exp());
            let (hi, lo) = if a > bb { (a, bb) } else { (bb, a) };
            (hi + (lo - hi).exp().ln_1p(), w)
        })
        .collect();
    for r in 0..rows {
        for h in 0..heads {
            let (l, w) = new_lse[r * heads + h];
            lse[h * q_len + row0 + r] = l;
            let o = &mut out[((row0 + r) * heads + h) * d..][..d];
            let ob = &out_b[(r * heads + h) * d..][..d];
            for (x, &y) in o.iter_mut().zip(ob) {
                *x -= w * (*x - y);
            }
        }
    }
}

/// AdamW with decoupled weight decay (as torch.optim.AdamW):
/// `p ← p − lr·wd·p − lr·m̂/(√v̂ + eps)`, `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`.
pub fn adamw<T: Real>(param: &mut [T], grad: &[T], m: &mut [T], v: &mut [T], hp: &AdamW) {
    assert!(param.len() == grad.len() && m.len() == grad.len() && v.len() == grad.len());
    let t = hp.step.max(1) as i32;
    let bc1 = 1.0 - hp.beta1.powi(t);
    let bc2 = 1.0 - hp.beta2.powi(t);
    let (b1, b2, eps, gs) = (hp.beta1, hp.beta2, hp.eps, hp.grad_scale);
    let decay = 1.0 - hp.lr * hp.weight_decay;
    let step = hp.lr / bc1;
    let bc2_sqrt = bc2.sqrt();
    param
        .par_chunks_mut(4096)
        .zip(m.par_chunks_mut(4096))
        .zip(v.par_chunks_mut(4096))
        .enumerate()
        .for_each(|(c, ((p, m), v))| {
            let o = c * 4096;
            for i in 0..p.len() {
                let g = grad[o + i].as_f64() * gs;
                let mi = b1 * m[i].as_f64() + (1.0 - b1) * g;
                let vi = b2 * v[i].as_f64() + (1.0 - b2) * g * g;
                m[i] = T::of(mi);
                v[i] = T::of(vi);
                let denom = vi.sqrt() / bc2_sqrt + eps;
                p[i] = T::of(p[i].as_f64() * decay - step * mi / denom);
            }
        });
}

#[cfg(test)]
mod tests {
    //! Each kernel against its formula evaluated independently here, and each backward against
    //! central finite differences in f64 (relative error < 1e-6).
    use super::*;
    use crate::util::gradcheck::{numeric_grad, rel_err, test_values as vals};

    const H: f64 = 1e-5;

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn gemm_all_transposes_match_naive() {
        let (m, n, k) = (5, 7, 3);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = vals(m * k, 1);
            let b = vals(k * n, 2);
            let c0 = vals(m * n, 3);
            let at = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] };
            let bt = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] };
            for acc in [false, true] {
                let mut c = c0.clone();
                gemm(&mut c, &a, &b, m, n, k, ta, tb, acc);
                for i in 0..m {
                    for j in 0..n {
                        let want = (0..k).map(|p| at(i, p) * bt(p, j)).sum::<f64>()
                            + if acc { c0[i * n + j] } else { 0.0 };
                        assert!(
                            (c[i * n + j] - want).abs() < 1e-14,
                            "ta={ta} tb={tb} acc={acc} ({i},{j})"
                        );
                    }
                }
            }
        }
        // Large enough to take the multithreaded path.
        let (m, n, k) = (64, 80, 48);
        let (a, b) = (vals(m * k, 4), vals(n * k, 5));
        let mut c = vec![0.0; m * n];
        gemm(&mut c, &a, &b, m, n, k, false, true, false);
        let want: f64 = (0..k).map(|p| a[3 * k + p] * b[7 * k + p]).sum();
        assert!((c[3 * n + 7] - want).abs() < 1e-13);
    }

    #[test]
    fn rmsnorm_forward_formula_and_backward_fd() {
        let (rows, dim, eps) = (3, 8, 1e-5);
        let x = vals(rows * dim, 1);
        let w = vals(dim, 2)
            .iter()
            .map(|v| 1.0 + 0.5 * v)
            .collect::<Vec<_>>();
        let g = vals(rows * dim, 3);
        let mut out = vec![0.0; rows * dim];
        let mut rstd = vec![0.0; rows];
        rmsnorm_forward(&x, &w, eps, rows, dim, &mut out, &mut rstd);
        for r in 0..rows {
            let xr = &x[r * dim..(r + 1) * dim];
            let ms = dot(xr, xr) / dim as f64;
            for i in 0..dim {
                assert!((out[r * dim + i] - xr[i] / (ms + eps).sqrt() * w[i]).abs() < 1e-14);
            }
        }
        let loss = |x: &[f64], w: &[f64]| {
            let mut o = vec![0.0; rows * dim];
            let mut r = vec![0.0; rows];
            rmsnorm_forward(x, w, eps, rows, dim, &mut o, &mut r);
            dot(&o, &g)
        };
        let mut dx = vec![0.0; rows * dim];
        let mut dw = vec![0.0; dim];
        rmsnorm_backward(&g, &x, &w, &rstd, rows, dim, &mut dx, &mut dw);
        let ndx = numeric_grad(&mut |xx| loss(xx, &w), &x, H);
        let ndw = numeric_grad(&mut |ww| loss(&x, ww), &w, H);
        assert!(rel_err(&dx, &ndx) < 1e-6, "dx {}", rel_err(&dx, &ndx));
        assert!(rel_err(&dw, &ndw) < 1e-6, "dw {}", rel_err(&dw, &ndw));
        // Accumulation: a second call adds the same again.
        rmsnorm_backward(&g, &x, &w, &rstd, rows, dim, &mut dx, &mut dw);
        assert!(rel_err(&dw, &ndw.iter().map(|v| 2.0 * v).collect::<Vec<_>>()) < 1e-6);
    }

    #[test]
    fn rope_rotation_and_transpose() {
        let (rows, heads, hd) = (3, 2, 8);
        let half = hd / 2;
        let x = vals(rows * heads * hd, 1);
        let ang = vals(rows * half, 2)
            .iter()
            .map(|a| a * 3.0)
            .collect::<Vec<_>>();
        let fac = 1.3;
        let cos: Vec<f64> = ang.iter().map(|a| a.cos() * fac).collect();
        let sin: Vec<f64> = ang.iter().map(|a| a.sin() * fac).collect();
        let mut y = x.clone();
        rope_rotate(&mut y, &cos, &sin, rows, heads, hd, false);
        // HF: q*cos + rotate_half(q)*sin with rotate_half(q) = cat(-q2, q1), cos/sin duplicated.
        for t in 0..rows {
            for h in 0..heads {
                let o = (t * heads + h) * hd;
                for i in 0..hd {
                    let j = i % half;
                    let rot = if i < half {
                        -x[o + i + half]
                    } else {
                        x[o + i - half]
                    };
                    let want = x[o + i] * cos[t * half + j] + rot * sin[t * half + j];
                    assert!((y[o + i] - want).abs() < 1e-14);
                }
            }
        }
        let g = vals(rows * heads * hd, 3);
        let mut dx = g.clone();
        rope_rotate(&mut dx, &cos, &sin, rows, heads, hd, true);
        let ndx = numeric_grad(
            &mut |xx| {
                let mut yy = xx.to_vec();
                rope_rotate(&mut yy, &cos, &sin, rows, heads, hd, false);
                dot(&yy, &g)
            },
            &x,
            H,
        );
        assert!(rel_err(&dx, &ndx) < 1e-6, "{}", rel_err(&dx, &ndx));
    }

    #[test]
    fn swiglu_forward_formula_and_backward_fd() {
        let n = 17;
        let (gt, up, g) = (
            vals(n, 1).iter().map(|v| v * 4.0).collect::<Vec<_>>(),
            vals(n, 2),
            vals(n, 3),
        );
        let mut out = vec![0.0; n];
        swiglu_forward(&gt, &up, &mut out);
        for i in 0..n {
            assert!((out[i] - gt[i] / (1.0 + (-gt[i]).exp()) * up[i]).abs() < 1e-14);
        }
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_backward(&gt, &up, &g, &mut dg, &mut du);
        let f = |a: &[f64], b: &[f64]| {
            let mut o = vec![0.0; n];
            swiglu_forward(a, b, &mut o);
            dot(&o, &g)
        };
        assert!(rel_err(&dg, &numeric_grad(&mut |a| f(a, &up), &gt, H)) < 1e-6);
        assert!(rel_err(&du, &numeric_grad(&mut |b| f(&gt, b), &up, H)) < 1e-6);
    }

    #[test]
    fn embedding_forward_and_backward_fd() {
        let (vocab, dim) = (5, 3);
        let table = vals(vocab * dim, 1);
        let ids = [3u32, 0, 3, 4];
        let g = vals(ids.len() * dim, 2);
        let mut out = vec![0.0; ids.len() * dim];
        embedding_forward(&table, &ids, dim, &mut out);
        assert_eq!(&out[0..3], &table[9..12]);
        let mut dt = vec![0.0; vocab * dim];
        embedding_backward(&mut dt, &ids, dim, &g);
        let n = numeric_grad(
            &mut |tt| {
                let mut o = vec![0.0; ids.len() * dim];
                embedding_forward(tt, &ids, dim, &mut o);
                dot(&o, &g)
            },
            &table,
            H,
        );
        assert!(rel_err(&dt, &n) < 1e-6);
    }

    #[test]
    fn cross_entropy_value_and_gradient() {
        let (rows, vocab) = (4, 6);
        let logits = vals(rows * vocab, 1)
            .iter()
            .map(|v| v * 5.0)
            .collect::<Vec<_>>();
        let targets = [2i32, -1, 5, 0];
        let scale = 0.25;
        let ce = |l: &[f64]| {
            // Independent formula: −log softmax, summed over counted rows.
            (0..rows)
                .filter(|&r| targets[r] >= 0)
                .map(|r| {
                    let row = &l[r * vocab..(r + 1) * vocab];
                    let z: f64 = row.iter().map(|v| v.exp()).sum();
                    z.ln() - row[targets[r] as usize]
                })
                .sum::<f64>()
        };
        // The two passes on one shard (the whole vocabulary): loss = ln Σ + max − z_target.
        let stats = cross_entropy_stats(&logits, &targets, vocab);
        let loss: f64 = stats
            .iter()
            .filter_map(|s| Some(s.sum.ln() + s.max - s.target?))
            .sum();
        assert!((loss - ce(&logits)).abs() < 1e-12);
        let mut g = logits.clone();
        let max: Vec<f64> = stats.iter().map(|s| s.max).collect();
        let sum: Vec<f64> = stats.iter().map(|s| s.sum).collect();
        cross_entropy_grad(&mut g, &targets, vocab, &max, &sum, scale);
        let n: Vec<f64> = numeric_grad(&mut |l| ce(l) * scale, &logits, H);
        assert!(rel_err(&g, &n) < 1e-6, "{}", rel_err(&g, &n));
        assert!(
            g[vocab..2 * vocab].iter().all(|&v| v == 0.0),
            "ignored row has zero gradient"
        );
    }

    #[test]
    fn adamw_matches_the_torch_formula() {
        let p0 = vals(9, 1);
        let g = vals(9, 2);
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; 9], vec![0.0; 9]);
        let hp = AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 1,
            grad_scale: 0.5,
        };
        adamw(&mut p, &g, &mut m, &mut v, &hp);
        let hp2 = AdamW { step: 2, ..hp };
        adamw(&mut p, &g, &mut m, &mut v, &hp2);
        // torch.optim.AdamW, written out for two steps.
        for i in 0..9 {
            let gi = g[i] * 0.5;
            let (mut pp, mut mm, mut vv) = (p0[i], 0.0, 0.0);
            for t in 1..=2 {
                pp *= 1.0 - 0.1 * 0.1;
                mm = 0.9 * mm + 0.1 * gi;
                vv = 0.95 * vv + 0.05 * gi * gi;
                let mh = mm / (1.0 - 0.9f64.powi(t));
                let vh = vv / (1.0 - 0.95f64.powi(t));
                pp -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
            assert!((p[i] - pp).abs() < 1e-12, "{i}: {} vs {pp}", p[i]);
        }
    }

    #[test]
    fn sum_squares_is_exact_in_f64() {
        let x = vals(100_000, 9);
        let want: f64 = x.iter().map(|v| v * v).sum();
        assert!((sum_squares(&x) - want).abs() < 1e-9);
    }
}
