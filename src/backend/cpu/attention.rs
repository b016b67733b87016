//! TEMPORARY naive attention (row by row) until the blockwise kernel lands from branch `attn`.
use crate::backend::AttnShape;
use crate::util::Real;

fn visible(s: &AttnShape, i: usize, j: usize) -> bool {
    !s.causal || s.k_pos0 + j as i64 <= s.q_pos0 + i as i64
}

pub fn attention_forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    s: &AttnShape,
    scale: T,
    out: &mut [T],
    lse: &mut [T],
) {
    let (nq, nkv, hd) = (s.n_q_heads, s.n_kv_heads, s.head_dim);
    let g = nq / nkv;
    for h in 0..nq {
        let kh = h / g;
        for i in 0..s.q_len {
            let qi = &q[(i * nq + h) * hd..][..hd];
            let sc: Vec<T> = (0..s.kv_len)
                .map(|j| {
                    if visible(s, i, j) {
                        qi.iter()
                            .zip(&k[(j * nkv + kh) * hd..][..hd])
                            .map(|(&a, &b)| a * b)
                            .sum::<T>()
                            * scale
                    } else {
                        T::neg_infinity()
                    }
                })
                .collect();
            let m = sc.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
            let o = &mut out[(i * nq + h) * hd..][..hd];
            o.fill(T::zero());
            if m == T::neg_infinity() {
                lse[h * s.q_len + i] = m;
                continue;
            }
            let mut z = T::zero();
            for j in 0..s.kv_len {
                let p = (sc[j] - m).exp();
                z += p;
                for d in 0..hd {
                    o[d] += p * v[(j * nkv + kh) * hd + d];
                }
            }
            for d in 0..hd {
                o[d] /= z;
            }
            lse[h * s.q_len + i] = m + z.ln();
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    dout: &[T],
    lse: &[T],
    s: &AttnShape,
    scale: T,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let (nq, nkv, hd) = (s.n_q_heads, s.n_kv_heads, s.head_dim);
    let g = nq / nkv;
    dq.fill(T::zero());
    dk.fill(T::zero());
    dv.fill(T::zero());
    for h in 0..nq {
        let kh = h / g;
        for i in 0..s.q_len {
            let l = lse[h * s.q_len + i];
            if l == T::neg_infinity() {
                continue;
            }
            let qi = &q[(i * nq + h) * hd..][..hd];
            let doi = &dout[(i * nq + h) * hd..][..hd];
            let oi = &out[(i * nq + h) * hd..][..hd];
            let dd: T = doi.iter().zip(oi).map(|(&a, &b)| a * b).sum();
            for j in 0..s.kv_len {
                if !visible(s, i, j) {
                    continue;
                }
                let kj = &k[(j * nkv + kh) * hd..][..hd];
                let vj = &v[(j * nkv + kh) * hd..][..hd];
                let p = (qi.iter().zip(kj).map(|(&a, &b)| a * b).sum::<T>() * scale - l).exp();
                let dp: T = doi.iter().zip(vj).map(|(&a, &b)| a * b).sum();
                let ds = p * (dp - dd) * scale;
                for d in 0..hd {
                    dv[(j * nkv + kh) * hd + d] += p * doi[d];
                    dq[(i * nq + h) * hd + d] += ds * kj[d];
                    dk[(j * nkv + kh) * hd + d] += ds * qi[d];
                }
            }
        }
    }
}
