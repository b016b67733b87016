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
    b.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|x| *x *= s));
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
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n, "gemm: buffer too small");
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
    let (a_cs, a_rs) = if trans_a { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if trans_b { (k as isize, 1) } else { (1, n as isize) };
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

pub fn embedding_forward<T: Real>(table: &[T], ids: &[u32], dim: usize, out: &mut [T]) {
    assert_eq!(out.len(), ids.len() * dim, "embedding_forward: out has the wrong size");
    let vocab = table.len() / dim;
    out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(row, &id)| {
        let id = id as usize;
        assert!(id < vocab, "token id {id} out of range for vocabulary {vocab}");
        row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    });
}

/// Sequential in token order: a repeated token's rows are summed in the same order every run.
pub fn embedding_backward<T: Real>(dtable: &mut [T], ids: &[u32], dim: usize, dout: &[T]) {
    assert_eq!(dout.len(), ids.len() * dim, "embedding_backward: dout has the wrong size");
    for (t, &id) in ids.iter().enumerate() {
        let id = id as usize;
        let dst = &mut dtable[id * dim..(id + 1) * dim];
        for (d, &g) in dst.iter_mut().zip(&dout[t * dim..(t + 1) * dim]) {
            *d += g;
        }
    }
}

/// `out = x · rstd · w`, `rstd = 1/sqrt(mean(x²) + eps)` (HF LlamaRMSNorm: statistics in f32 or
/// better; here the mean of squares is accumulated in f64).
pub fn rmsnorm_forward<T: Real>(x: &[T], w: &[T], eps: f64, rows: usize, dim: usize, out: &mut [T], rstd: &mut [T]) {
    assert!(x.len() == rows * dim && out.len() == rows * dim && rstd.len() == rows && w.len() == dim);
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
    assert!(x.len() == rows * dim && dout.len() == rows * dim && dx.len() == rows * dim && w.len() == dim);
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
                let dot: T = gr.iter().zip(w).zip(xr).map(|((&g, &wv), &xv)| g * wv * xv).sum();
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
    assert!(x.len() == rows * heads * head_dim && cos.len() >= rows * half && sin.len() >= rows * half);
    x.par_chunks_mut(heads * head_dim).enumerate().for_each(|(t, row)| {
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
    assert!(gate.len() == up.len() && dout.len() == up.len() && dgate.len() == up.len() && dup.len() == up.len());
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

/// One chunk of softmax cross-entropy; see `Backend::cross_entropy_chunk`. The log-sum-exp of each
/// row is taken around its maximum and accumulated in f64.
pub fn cross_entropy_chunk<T: Real>(logits: &mut [T], targets: &[i32], vocab: usize, grad_scale: f64) -> f64 {
    assert_eq!(logits.len(), targets.len() * vocab, "cross_entropy_chunk: logits/targets size mismatch");
    let losses: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &tgt)| {
            if tgt < 0 {
                row.fill(T::zero());
                return 0.0;
            }
            let tgt = tgt as usize;
            assert!(tgt < vocab, "target {tgt} out of range for vocabulary {vocab}");
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v.as_f64()));
            let sum: f64 = row.iter().map(|&v| (v.as_f64() - max).exp()).sum();
            let lse = max + sum.ln();
            let loss = lse - row[tgt].as_f64();
            for v in row.iter_mut() {
                *v = T::of((v.as_f64() - lse).exp() * grad_scale);
            }
            row[tgt] -= T::of(grad_scale);
            loss
        })
        .collect();
    losses.iter().sum()
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
