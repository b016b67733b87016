//! Blockwise causal GQA attention with an online softmax, forward and backward (CPU reference).
//!
//! FlashAttention-2 (Dao 2023) on the CPU. Queries in tiles of `BQ` rows meet keys in tiles of `BK`
//! rows; the forward keeps a running max and sum per query row and rescales its accumulator, so no
//! `[q_len, kv_len]` matrix ever exists (one `BQ x BK` tile of scores per thread). Key tiles wholly
//! above the causal diagonal are never visited. The backward recomputes `P` from the saved
//! log-sum-exp in a single sweep per (query head, chunk of key tiles): the task owns its key rows'
//! dK/dV for that head and a private partial dQ; partials are then summed in a fixed order (chunks
//! for dQ, the group's heads for dK/dV). The chunking depends on the shape only, so results are
//! bitwise identical for every thread count.
//!
//! Layouts follow a projection's output: `q [q_len, n_q_heads, head_dim]`, `k`/`v`
//! `[kv_len, n_kv_heads, head_dim]`; `lse [n_q_heads, q_len]`. Each call first copies its inputs
//! into contiguous zero-padded tiles per (head, tile) (`Tiles`; head_dim padded to a multiple of
//! `NR`, keys also transposed), so every product is one register-blocked kernel, `gemm_tile`.
//! Extra memory: those copies, about the size of the inputs, plus in the backward the dQ partials
//! (at most `BWD_MIN_TASKS / n_q_heads` + 1 times dq) and per-query-head dK/dV (group x dk, dv).
//!
//! Numerics: everything accumulates in `T`. For f32 the exponential is a vectorisable Cody–Waite +
//! polynomial `exp` (cephes `expf`, about 1 ulp); f64 uses the library `exp`, so the f64 path is
//! the gradient-check oracle. On x86-64 with AVX2 and FMA the inner kernels are compiled a second
//! time for those (products then use fused multiply-adds); elsewhere the portable compilation runs.

use std::any::TypeId;

use rayon::prelude::*;

use crate::backend::AttnShape;
use crate::util::Real;

/// Query rows per tile.
const BQ: usize = 64;
/// Key rows per tile.
const BK: usize = 64;
/// Register block of `gemm_tile`: `MR` rows by `NR` columns of accumulators.
const MR: usize = 4;
const NR: usize = 16;
/// The backward splits each head's key tiles into chunks until there are at least this many tasks.
const BWD_MIN_TASKS: usize = 16;
const _: () = assert!(MR == 4, "gemm_tile unrolls four rows of A");

/// Softmax attention forward. `out [q_len, n_q_heads, head_dim]` and `lse [n_q_heads, q_len]` are
/// overwritten; `lse` is `ln Σ_j exp(scale · q·k_j)` over the keys the row sees, −∞ for a row that
/// sees no key (its output row is 0).
pub fn attention_forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &AttnShape,
    scale: T,
    out: &mut [T],
    lse: &mut [T],
) {
    forward_with(Isa::detect(), q, k, v, shape, scale, out, lse);
}

/// Gradients of `attention_forward`: `dq [q_len, n_q_heads, head_dim]`, `dk`/`dv`
/// `[kv_len, n_kv_heads, head_dim]`, all overwritten. Probabilities are recomputed from `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    dout: &[T],
    lse: &[T],
    shape: &AttnShape,
    scale: T,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    backward_with(
        Isa::detect(),
        q,
        k,
        v,
        out,
        dout,
        lse,
        shape,
        scale,
        dq,
        dk,
        dv,
    );
}

// ---- driver -------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn forward_with<T: Real>(
    isa: Isa,
    q: &[T],
    k: &[T],
    v: &[T],
    shape: &AttnShape,
    scale: T,
    out: &mut [T],
    lse: &mut [T],
) {
    let g = Geom::new(shape);
    g.check_qkv(q, k, v);
    check_len(
        "attention_forward: out",
        out.len(),
        q.len(),
        "q_len*n_q_heads*head_dim",
    );
    check_len(
        "attention_forward: lse",
        lse.len(),
        g.nq * g.q_len,
        "n_q_heads*q_len",
    );

    let x = FwdInputs {
        q: Tiles::rows(q, g.q_len, g.nq, g.hd, BQ),
        kt: Tiles::transposed(k, g.kv_len, g.nkv, g.hd),
        v: Tiles::rows(v, g.kv_len, g.nkv, g.hd, BK),
        scale,
    };
    let tasks = g.query_tasks();
    let tiles: Vec<(Vec<T>, Vec<T>)> = tasks
        .par_iter()
        .map_init(
            || Scratch::new(g.hd),
            |sc, &(h, t)| {
                let rows = g.q_rows(t);
                let mut o = vec![T::zero(); rows * g.hd];
                let mut l = vec![T::zero(); rows];
                forward_tile(isa, &g, &x, h, t, sc, &mut o, &mut l);
                (o, l)
            },
        )
        .collect();
    for (&(h, t), (o, l)) in tasks.iter().zip(&tiles) {
        g.scatter_rows(o, t * BQ, g.nq, h, out);
        lse[h * g.q_len + t * BQ..][..l.len()].copy_from_slice(l);
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_with<T: Real>(
    isa: Isa,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    dout: &[T],
    lse: &[T],
    shape: &AttnShape,
    scale: T,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let g = Geom::new(shape);
    g.check_qkv(q, k, v);
    let (ql, kl) = (q.len(), k.len());
    let (q_dims, kv_dims) = ("q_len*n_q_heads*head_dim", "kv_len*n_kv_heads*head_dim");
    check_len("attention_backward: out", out.len(), ql, q_dims);
    check_len("attention_backward: dout", dout.len(), ql, q_dims);
    check_len(
        "attention_backward: lse",
        lse.len(),
        g.nq * g.q_len,
        "n_q_heads*q_len",
    );
    check_len("attention_backward: dq", dq.len(), ql, q_dims);
    check_len("attention_backward: dk", dk.len(), kl, kv_dims);
    check_len("attention_backward: dv", dv.len(), kl, kv_dims);
    if g.q_len == 0 || g.kv_len == 0 {
        dq.fill(T::zero());
        dk.fill(T::zero());
        dv.fill(T::zero());
        return;
    }

    // D_i = dO_i · O_i, laid out like lse: [n_q_heads, q_len].
    let mut delta = vec![T::zero(); g.nq * g.q_len];
    delta
        .par_chunks_mut(g.q_len)
        .enumerate()
        .for_each(|(h, dh)| {
            for (i, d) in dh.iter_mut().enumerate() {
                let at = (i * g.nq + h) * g.hd;
                *d = dot(&dout[at..at + g.hd], &out[at..at + g.hd]);
            }
        });
    let x = BwdInputs {
        q: Tiles::rows(q, g.q_len, g.nq, g.hd, BQ),
        d_o: Tiles::rows(dout, g.q_len, g.nq, g.hd, BQ),
        kt: Tiles::transposed(k, g.kv_len, g.nkv, g.hd),
        vt: Tiles::transposed(v, g.kv_len, g.nkv, g.hd),
        k: Tiles::rows(k, g.kv_len, g.nkv, g.hd, BK),
        lse,
        delta,
        scale,
    };

    // One task per (query head, chunk of key tiles). A task owns the dK/dV rows of its chunk for
    // its head and a private partial dQ of the whole head; the partials are summed below in a
    // fixed order. The chunk count depends on the shape only, never on the thread count.
    let n_chunks = BWD_MIN_TASKS.div_ceil(g.nq).min(g.n_kt);
    let tiles_per_chunk = g.n_kt.div_ceil(n_chunks);
    let n_chunks = g.n_kt.div_ceil(tiles_per_chunk);
    let dq_block = g.n_qt * BQ * g.hdp;
    let kv_block = tiles_per_chunk * BK * g.hdp;
    let mut dq_part = vec![T::zero(); g.nq * n_chunks * dq_block];
    let mut dk_part = vec![T::zero(); g.nq * n_chunks * kv_block];
    let mut dv_part = vec![T::zero(); g.nq * n_chunks * kv_block];
    dq_part
        .par_chunks_mut(dq_block)
        .zip(dk_part.par_chunks_mut(kv_block))
        .zip(dv_part.par_chunks_mut(kv_block))
        .enumerate()
        .for_each_init(
            || Scratch::new(g.hd),
            |sc, (b, ((dq_h, dk_c), dv_c))| {
                let (h, c) = (b / n_chunks, b % n_chunks);
                let t0 = c * tiles_per_chunk;
                let tiles = t0..g.n_kt.min(t0 + tiles_per_chunk);
                backward_chunk(isa, &g, &x, h, tiles, sc, dq_h, dk_c, dv_c);
            },
        );

    // dQ = scale · Σ_chunks partial; dK = scale · Σ_{heads of the group} partial; dV likewise
    // without the scale. Each sum runs in index order.
    let (hd, hdp) = (g.hd, g.hdp);
    dq.par_chunks_mut(g.nq * hd)
        .enumerate()
        .for_each(|(i, row)| {
            for (h, o) in row.chunks_exact_mut(hd).enumerate() {
                o.fill(T::zero());
                for c in 0..n_chunks {
                    let p = &dq_part[(h * n_chunks + c) * dq_block + i * hdp..][..hd];
                    o.iter_mut().zip(p).for_each(|(o, &p)| *o += p);
                }
                o.iter_mut().for_each(|o| *o *= scale);
            }
        });
    let (c_rows, kv_nq) = (tiles_per_chunk * BK, g.nkv * hd);
    let reduce_kv = |j: usize, row: &mut [T], part: &[T], s: T| {
        let (c, jj) = (j / c_rows, j % c_rows);
        for (kh, o) in row.chunks_exact_mut(hd).enumerate() {
            o.fill(T::zero());
            for h in kh * g.group..(kh + 1) * g.group {
                let p = &part[(h * n_chunks + c) * kv_block + jj * hdp..][..hd];
                o.iter_mut().zip(p).for_each(|(o, &p)| *o += p);
            }
            o.iter_mut().for_each(|o| *o *= s);
        }
    };
    dk.par_chunks_mut(kv_nq)
        .enumerate()
        .for_each(|(j, row)| reduce_kv(j, row, &dk_part, scale));
    dv.par_chunks_mut(kv_nq)
        .enumerate()
        .for_each(|(j, row)| reduce_kv(j, row, &dv_part, T::one()));
}

/// The forward's inputs, regrouped into tiles once per call.
struct FwdInputs<T> {
    /// Query tiles `[BQ, hdp]` per (query head, query tile).
    q: Tiles<T>,
    /// Kᵀ tiles `[hd, BK]` per (KV head, key tile).
    kt: Tiles<T>,
    /// V tiles `[BK, hdp]`.
    v: Tiles<T>,
    scale: T,
}

/// The backward's inputs, regrouped into tiles once per call and shared by every task.
struct BwdInputs<'a, T> {
    /// Q and dO tiles `[BQ, hdp]` per (query head, query tile).
    q: Tiles<T>,
    d_o: Tiles<T>,
    /// Kᵀ and Vᵀ tiles `[hd, BK]` per (KV head, key tile).
    kt: Tiles<T>,
    vt: Tiles<T>,
    /// K tiles `[BK, hdp]`.
    k: Tiles<T>,
    /// `[n_q_heads, q_len]`.
    lse: &'a [T],
    /// `[n_q_heads, q_len]`: rowsum(dO ∘ O).
    delta: Vec<T>,
    scale: T,
}

/// One tensor `[len, heads, hd]` cut into contiguous zero-padded blocks, one per (head, tile), so
/// the kernels read unit-stride memory and never gather.
struct Tiles<T> {
    data: Vec<T>,
    block: usize,
    n_tiles: usize,
}

impl<T: Real> Tiles<T> {
    /// Blocks `[tile, hdp]`: rows of one head, `hd` padded to `hdp`, rows past `len` zero.
    fn rows(src: &[T], len: usize, heads: usize, hd: usize, tile: usize) -> Tiles<T> {
        let hdp = padded(hd);
        let n_tiles = len.div_ceil(tile);
        let block = tile * hdp;
        let mut data = vec![T::zero(); heads * n_tiles * block];
        data.par_chunks_mut(block).enumerate().for_each(|(b, dst)| {
            let (head, t) = (b / n_tiles, b % n_tiles);
            for (i, row) in dst.chunks_exact_mut(hdp).take(len - t * tile).enumerate() {
                let at = ((t * tile + i) * heads + head) * hd;
                row[..hd].copy_from_slice(&src[at..at + hd]);
            }
        });
        Tiles {
            data,
            block,
            n_tiles,
        }
    }

    /// Blocks `[hd, BK]`: the transpose of `BK` rows of one head, columns past `len` zero.
    fn transposed(src: &[T], len: usize, heads: usize, hd: usize) -> Tiles<T> {
        let n_tiles = len.div_ceil(BK);
        let block = hd * BK;
        let mut data = vec![T::zero(); heads * n_tiles * block];
        data.par_chunks_mut(block).enumerate().for_each(|(b, dst)| {
            let (head, t) = (b / n_tiles, b % n_tiles);
            for j in 0..BK.min(len - t * BK) {
                let at = ((t * BK + j) * heads + head) * hd;
                for (d, &x) in src[at..at + hd].iter().enumerate() {
                    dst[d * BK + j] = x;
                }
            }
        });
        Tiles {
            data,
            block,
            n_tiles,
        }
    }

    fn get(&self, head: usize, t: usize) -> &[T] {
        let b = head * self.n_tiles + t;
        &self.data[b * self.block..(b + 1) * self.block]
    }
}

// ---- geometry and masking ----------------------------------------------------------------------

/// A wrong buffer length is a programmer error: panic naming the buffer and the expectation.
fn check_len(name: &str, got: usize, want: usize, dims: &str) {
    assert!(
        got == want,
        "{name}.len() is {got}, expected {dims} = {want}"
    );
}

/// `hd` rounded up to a multiple of `NR`: the row length of every scratch tile.
fn padded(hd: usize) -> usize {
    hd.div_ceil(NR) * NR
}

/// The shape, checked, plus the tiling derived from it.
struct Geom {
    q_len: usize,
    kv_len: usize,
    nq: usize,
    nkv: usize,
    /// Query heads per KV head.
    group: usize,
    hd: usize,
    hdp: usize,
    q_pos0: i64,
    k_pos0: i64,
    causal: bool,
    n_qt: usize,
    n_kt: usize,
}

impl Geom {
    fn new(s: &AttnShape) -> Geom {
        assert!(
            s.n_q_heads > 0 && s.n_kv_heads > 0,
            "attention: head counts must be positive ({s:?})"
        );
        assert!(
            s.n_q_heads.is_multiple_of(s.n_kv_heads),
            "attention: n_q_heads must be a multiple of n_kv_heads ({s:?})"
        );
        assert!(
            s.head_dim > 0,
            "attention: head_dim must be positive ({s:?})"
        );
        Geom {
            q_len: s.q_len,
            kv_len: s.kv_len,
            nq: s.n_q_heads,
            nkv: s.n_kv_heads,
            group: s.n_q_heads / s.n_kv_heads,
            hd: s.head_dim,
            hdp: padded(s.head_dim),
            q_pos0: s.q_pos0,
            k_pos0: s.k_pos0,
            causal: s.causal,
            n_qt: s.q_len.div_ceil(BQ),
            n_kt: s.kv_len.div_ceil(BK),
        }
    }

    fn check_qkv<T>(&self, q: &[T], k: &[T], v: &[T]) {
        let kv = self.kv_len * self.nkv * self.hd;
        let q_dims = "q_len*n_q_heads*head_dim";
        check_len(
            "attention: q",
            q.len(),
            self.q_len * self.nq * self.hd,
            q_dims,
        );
        check_len("attention: k", k.len(), kv, "kv_len*n_kv_heads*head_dim");
        check_len("attention: v", v.len(), kv, "kv_len*n_kv_heads*head_dim");
    }

    /// (query head, query tile) pairs, the latest tiles first: under the causal mask they see the
    /// most keys, and starting them first balances the threads.
    fn query_tasks(&self) -> Vec<(usize, usize)> {
        (0..self.n_qt)
            .rev()
            .flat_map(|t| (0..self.nq).map(move |h| (h, t)))
            .collect()
    }

    fn q_rows(&self, t: usize) -> usize {
        BQ.min(self.q_len - t * BQ)
    }

    fn k_rows(&self, t: usize) -> usize {
        BK.min(self.kv_len - t * BK)
    }

    /// Writes `tile [rows, hd]` to rows `r0..` of head `head` of `dst [len, heads, hd]`.
    fn scatter_rows<T: Real>(
        &self,
        tile: &[T],
        r0: usize,
        heads: usize,
        head: usize,
        dst: &mut [T],
    ) {
        for (i, row) in tile.chunks_exact(self.hd).enumerate() {
            let at = ((r0 + i) * heads + head) * self.hd;
            dst[at..at + self.hd].copy_from_slice(row);
        }
    }

    /// How many of the `cols` keys starting at key `k0` query row `i` sees (a prefix, since
    /// visibility `k_pos0 + j <= q_pos0 + i` is monotone in `j`).
    fn visible(&self, i: usize, k0: usize, cols: usize) -> usize {
        if !self.causal {
            return cols;
        }
        let n = (self.q_pos0 + i as i64) - (self.k_pos0 + k0 as i64) + 1;
        n.clamp(0, cols as i64) as usize
    }

    /// Number of key tiles query tile `t` must visit: the rest lie wholly above the diagonal.
    fn key_tiles_for(&self, t: usize) -> usize {
        if !self.causal {
            return self.n_kt;
        }
        let last = (t * BQ + self.q_rows(t) - 1) as i64;
        let keys = (self.q_pos0 + last - self.k_pos0 + 1).clamp(0, self.kv_len as i64) as usize;
        keys.div_ceil(BK)
    }

    /// First query tile that sees any key of key tile `t`.
    fn first_query_tile_for(&self, t: usize) -> usize {
        if !self.causal {
            return 0;
        }
        let first = (self.k_pos0 + (t * BK) as i64 - self.q_pos0).clamp(0, self.q_len as i64);
        first as usize / BQ
    }
}

// ---- instruction-set dispatch ---------------------------------------------------------------------

/// Which compilation of the inner kernels runs. Within one, every sum has a fixed order; the AVX2
/// one fuses the tile products' multiply-adds, so the two agree to rounding, not bitwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

/// Compiles the inner kernels once more under `$feature`, each a small function of its own: small
/// enough that LLVM reliably keeps `gemm_tile`'s accumulators in vector registers, which it does
/// not when the kernels are inlined into the larger tile loops.
macro_rules! kernel_set {
    ($module:ident, $fma:expr $(, $feature:meta)?) => {
        mod $module {
            use super::{Geom, Real, Scratch};

            #[allow(clippy::too_many_arguments)]
            #[inline(never)]
            $(#[$feature])?
            pub(super) fn gemm_tile<T: Real, const TRANS_A: bool>(
                m: usize,
                n: usize,
                k: usize,
                a: &[T],
                lda: usize,
                b: &[T],
                c: &mut [T],
                accumulate: bool,
            ) {
                super::gemm_tile::<T, TRANS_A, { $fma }>(m, n, k, a, lda, b, c, accumulate)
            }

            #[inline(never)]
            $(#[$feature])?
            pub(super) fn online_softmax<T: Real>(
                g: &Geom,
                scale: T,
                q0: usize,
                k0: usize,
                sc: &mut Scratch<T>,
            ) {
                super::online_softmax(g, scale, q0, k0, sc)
            }

            #[inline(never)]
            $(#[$feature])?
            pub(super) fn probs_and_dscores<T: Real>(
                g: &Geom,
                scale: T,
                q0: usize,
                k0: usize,
                sc: &mut Scratch<T>,
            ) {
                super::probs_and_dscores(g, scale, q0, k0, sc)
            }
        }
    };
}

kernel_set!(portable, false);
#[cfg(target_arch = "x86_64")]
kernel_set!(avx2, true, target_feature(enable = "avx2,fma"));

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2;
        }
        Isa::Portable
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm<T: Real, const TRANS_A: bool>(
        self,
        m: usize,
        n: usize,
        k: usize,
        a: &[T],
        lda: usize,
        b: &[T],
        c: &mut [T],
        accumulate: bool,
    ) {
        match self {
            Isa::Portable => portable::gemm_tile::<T, TRANS_A>(m, n, k, a, lda, b, c, accumulate),
            // SAFETY: `Isa::Avx2` is only constructed after detecting AVX2 and FMA at run time.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe {
                avx2::gemm_tile::<T, TRANS_A>(m, n, k, a, lda, b, c, accumulate)
            },
        }
    }

    fn online_softmax<T: Real>(
        self,
        g: &Geom,
        scale: T,
        q0: usize,
        k0: usize,
        sc: &mut Scratch<T>,
    ) {
        match self {
            Isa::Portable => portable::online_softmax(g, scale, q0, k0, sc),
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::online_softmax(g, scale, q0, k0, sc) },
        }
    }

    fn probs_and_dscores<T: Real>(
        self,
        g: &Geom,
        scale: T,
        q0: usize,
        k0: usize,
        sc: &mut Scratch<T>,
    ) {
        match self {
            Isa::Portable => portable::probs_and_dscores(g, scale, q0, k0, sc),
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::probs_and_dscores(g, scale, q0, k0, sc) },
        }
    }
}

// ---- tile kernels ---------------------------------------------------------------------------------

/// One thread's working tiles, reused across its tasks.
struct Scratch<T> {
    /// Scores, then probabilities `[BQ, BK]`.
    s: Vec<T>,
    /// dP, then dS `[BQ, BK]`.
    ds: Vec<T>,
    /// Output accumulator `[BQ, hdp]` (forward).
    acc: Vec<T>,
    /// Per query row: running max (forward) or lse (backward).
    m: [T; BQ],
    /// Per query row: running sum (forward) or delta (backward).
    l: [T; BQ],
}

impl<T: Real> Scratch<T> {
    fn new(hd: usize) -> Scratch<T> {
        let z = T::zero();
        Scratch {
            s: vec![z; BQ * BK],
            ds: vec![z; BQ * BK],
            acc: vec![z; BQ * padded(hd)],
            m: [z; BQ],
            l: [z; BQ],
        }
    }
}

/// Output rows of query tile `t`, head `h`: `out [rows, hd]`, `lse [rows]`.
#[allow(clippy::too_many_arguments)]
fn forward_tile<T: Real>(
    isa: Isa,
    g: &Geom,
    x: &FwdInputs<T>,
    h: usize,
    t: usize,
    sc: &mut Scratch<T>,
    out: &mut [T],
    lse: &mut [T],
) {
    let (hd, hdp) = (g.hd, g.hdp);
    let kh = h / g.group;
    let q0 = t * BQ;
    let rows = g.q_rows(t);
    let rows_r = rows.next_multiple_of(MR);
    let q = x.q.get(h, t);

    sc.m.fill(T::neg_infinity());
    sc.l.fill(T::zero());
    sc.acc[..rows_r * hdp].fill(T::zero());
    for kt in 0..g.key_tiles_for(t) {
        let k0 = kt * BK;
        let cols = g.k_rows(kt);
        isa.gemm::<T, false>(rows_r, BK, hd, q, hdp, x.kt.get(kh, kt), &mut sc.s, false);
        isa.online_softmax(g, x.scale, q0, k0, sc);
        isa.gemm::<T, false>(
            rows_r,
            hdp,
            cols,
            &sc.s,
            BK,
            x.v.get(kh, kt),
            &mut sc.acc,
            true,
        );
    }

    for i in 0..rows {
        let o = &mut out[i * hd..(i + 1) * hd];
        let l = sc.l[i];
        if l > T::zero() {
            let inv = T::one() / l;
            for (o, &a) in o.iter_mut().zip(&sc.acc[i * hdp..i * hdp + hd]) {
                *o = a * inv;
            }
            lse[i] = sc.m[i] + l.ln();
        } else {
            o.fill(T::zero());
            lse[i] = T::neg_infinity();
        }
    }
}

/// With the raw scores `q·k` of the tile at query `q0`, key `k0` in `sc.s`, one step of the online
/// softmax (Milakov & Gimelshein 2018): update each row's running max `sc.m` and sum `sc.l`,
/// rescale what the accumulator `sc.acc` summed under the old max, and leave `exp(scale·s − max)`
/// in `sc.s` (0 where masked).
#[inline(always)]
fn online_softmax<T: Real>(g: &Geom, scale: T, q0: usize, k0: usize, sc: &mut Scratch<T>) {
    let rows = g.q_rows(q0 / BQ);
    let cols = g.k_rows(k0 / BK);
    let ninf = T::neg_infinity();
    for i in 0..rows.next_multiple_of(MR) {
        let row: &mut [T; BK] = tile_row(&mut sc.s, i);
        let nvis = if i < rows {
            g.visible(q0 + i, k0, cols)
        } else {
            0
        };
        for s in &mut row[..nvis] {
            *s *= scale;
        }
        row[nvis..].fill(ninf);
        let m_new = sc.m[i].max(row_max(row));
        // A row that has seen no key yet keeps max −∞; subtracting 0 instead keeps exp(−∞) = 0
        // rather than exp(−∞ + ∞) = NaN.
        let m_ref = if m_new == ninf { T::zero() } else { m_new };
        let alpha = (sc.m[i] - m_ref).exp();
        for s in row.iter_mut() {
            *s -= m_ref;
        }
        exp_in_place(row);
        sc.l[i] = sc.l[i] * alpha + row_sum(row);
        sc.m[i] = m_new;
        if alpha != T::one() {
            for a in &mut sc.acc[i * g.hdp..(i + 1) * g.hdp] {
                *a *= alpha;
            }
        }
    }
}

/// Loads the per-row log-sum-exp and delta of query tile `t`, head `h`, into `sc.m`, `sc.l`.
/// A row that saw no key (lse −∞) gets +∞, so `exp(s − lse)` is 0 rather than NaN; padding rows
/// likewise.
fn load_row_stats<T: Real>(g: &Geom, x: &BwdInputs<T>, h: usize, t: usize, sc: &mut Scratch<T>) {
    let at = h * g.q_len + t * BQ;
    let rows = g.q_rows(t);
    sc.m.fill(T::infinity());
    sc.l.fill(T::zero());
    for (m, &lse) in sc.m.iter_mut().zip(&x.lse[at..at + rows]) {
        *m = if lse == T::neg_infinity() {
            T::infinity()
        } else {
            lse
        };
    }
    sc.l[..rows].copy_from_slice(&x.delta[at..at + rows]);
}

/// With `S = q·k` in `sc.s` and `dP` in `sc.ds` for the tile at query `q0`, key `k0`, and the rows'
/// lse and delta in `sc.m`, `sc.l`: recomputes `P = exp(scale·S − lse)` into `sc.s` and
/// `dS = P ∘ (dP − D)` into `sc.ds`. Masked and padding entries of both become exactly 0.
#[inline(always)]
fn probs_and_dscores<T: Real>(g: &Geom, scale: T, q0: usize, k0: usize, sc: &mut Scratch<T>) {
    let rows = g.q_rows(q0 / BQ);
    let cols = g.k_rows(k0 / BK);
    for i in 0..rows.next_multiple_of(MR) {
        let p: &mut [T; BK] = tile_row(&mut sc.s, i);
        let nvis = if i < rows {
            g.visible(q0 + i, k0, cols)
        } else {
            0
        };
        let lse = sc.m[i];
        for s in &mut p[..nvis] {
            *s = *s * scale - lse;
        }
        exp_in_place(&mut p[..nvis]);
        p[nvis..].fill(T::zero());
        let d = sc.l[i];
        let ds: &mut [T; BK] = tile_row(&mut sc.ds, i);
        for (ds, &p) in ds.iter_mut().zip(p.iter()) {
            *ds = p * (*ds - d);
        }
    }
}

/// The backward of query head `h` against key tiles `tiles`: accumulates (unscaled) dK and dV of
/// those tiles into `dk`, `dv` (`[tiles * BK, hdp]`, from the chunk's first tile) and their dQ
/// contribution into `dq` (`[n_qt * BQ, hdp]`). Each sum runs in tile order.
#[allow(clippy::too_many_arguments)]
fn backward_chunk<T: Real>(
    isa: Isa,
    g: &Geom,
    x: &BwdInputs<T>,
    h: usize,
    tiles: std::ops::Range<usize>,
    sc: &mut Scratch<T>,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let (hd, hdp) = (g.hd, g.hdp);
    let kh = h / g.group;
    let first = tiles.start;
    for t in tiles {
        let k0 = t * BK;
        let cols = g.k_rows(t);
        let cols_r = cols.next_multiple_of(MR);
        let (kt, vt, kr) = (x.kt.get(kh, t), x.vt.get(kh, t), x.k.get(kh, t));
        let dk = &mut dk[(t - first) * BK * hdp..][..BK * hdp];
        let dv = &mut dv[(t - first) * BK * hdp..][..BK * hdp];
        for qt in g.first_query_tile_for(t)..g.n_qt {
            let rows = g.q_rows(qt);
            let rows_r = rows.next_multiple_of(MR);
            let (q, d_o) = (x.q.get(h, qt), x.d_o.get(h, qt));
            load_row_stats(g, x, h, qt, sc);
            isa.gemm::<T, false>(rows_r, BK, hd, q, hdp, kt, &mut sc.s, false);
            isa.gemm::<T, false>(rows_r, BK, hd, d_o, hdp, vt, &mut sc.ds, false);
            isa.probs_and_dscores(g, x.scale, qt * BQ, k0, sc);
            // dV += Pᵀ · dO, dK += dSᵀ · Q, dQ += dS · K.
            isa.gemm::<T, true>(cols_r, hdp, rows, &sc.s, BK, d_o, dv, true);
            isa.gemm::<T, true>(cols_r, hdp, rows, &sc.ds, BK, q, dk, true);
            let dq = &mut dq[qt * BQ * hdp..][..rows_r * hdp];
            isa.gemm::<T, false>(rows_r, hdp, cols, &sc.ds, BK, kr, dq, true);
        }
    }
}

// ---- building blocks --------------------------------------------------------------------------------

/// Row `i` of a `[_, BK]` tile.
#[inline(always)]
fn tile_row<T>(tile: &mut [T], i: usize) -> &mut [T; BK] {
    let row: &mut [T] = &mut tile[i * BK..(i + 1) * BK];
    row.try_into().expect("tile row has BK elements")
}

/// `C[m, n] (+)= A · B[k, n]` on tiles, `B` and `C` row-major with `n` columns, and `A` either
/// `[m, lda]` row-major (`A(i, p) = a[i*lda + p]`) or, with `TRANS_A`, stored transposed
/// (`A(i, p) = a[p*lda + i]`). `m` must be a multiple of `MR`, `n` of `NR`. Each `MR x NR` block of
/// `C` stays in registers across the `k` loop, whose iterators carry no bounds checks; the
/// `NR`-wide inner loop is what LLVM vectorises. Sums run over `p` in order.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gemm_tile<T: Real, const TRANS_A: bool, const FMA: bool>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    c: &mut [T],
    accumulate: bool,
) {
    debug_assert!(m.is_multiple_of(MR) && n.is_multiple_of(NR));
    let b = &b[..k * n];
    if TRANS_A {
        assert!(m <= lda && a.len() >= k * lda, "gemm_tile: A is too short");
    }
    for i0 in (0..m).step_by(MR) {
        for j0 in (0..n).step_by(NR) {
            let mut acc = [[T::zero(); NR]; MR];
            if accumulate {
                for (r, acc) in acc.iter_mut().enumerate() {
                    acc.copy_from_slice(&c[(i0 + r) * n + j0..][..NR]);
                }
            }
            let mut step = |ar: [T; MR], brow: &[T]| {
                let brow: &[T; NR] = brow[j0..j0 + NR].try_into().expect("NR columns");
                for (acc, &ar) in acc.iter_mut().zip(&ar) {
                    for (c, &bv) in acc.iter_mut().zip(brow) {
                        *c = if FMA {
                            ar.mul_add(bv, *c)
                        } else {
                            *c + ar * bv
                        };
                    }
                }
            };
            if TRANS_A {
                for (acol, brow) in a.chunks_exact(lda).zip(b.chunks_exact(n)) {
                    step(acol[i0..i0 + MR].try_into().expect("MR rows"), brow);
                }
            } else {
                let a0 = &a[i0 * lda..][..k];
                let a1 = &a[(i0 + 1) * lda..][..k];
                let a2 = &a[(i0 + 2) * lda..][..k];
                let a3 = &a[(i0 + 3) * lda..][..k];
                let cols = a0.iter().zip(a1).zip(a2).zip(a3);
                for ((((&x0, &x1), &x2), &x3), brow) in cols.zip(b.chunks_exact(n)) {
                    step([x0, x1, x2, x3], brow);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                c[(i0 + r) * n + j0..][..NR].copy_from_slice(acc);
            }
        }
    }
}

/// Max of a tile row, in eight lanes (max is exact, so lane order does not matter).
#[inline(always)]
fn row_max<T: Real>(row: &[T; BK]) -> T {
    let mut m = [T::neg_infinity(); 8];
    for c in row.chunks_exact(8) {
        for (m, &x) in m.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    m.into_iter().fold(T::neg_infinity(), T::max)
}

/// Sum of a tile row in eight lanes, then the lanes in order (a fixed order, hence deterministic).
#[inline(always)]
fn row_sum<T: Real>(row: &[T; BK]) -> T {
    let mut s = [T::zero(); 8];
    for c in row.chunks_exact(8) {
        for (s, &x) in s.iter_mut().zip(c) {
            *s += x;
        }
    }
    s.into_iter().fold(T::zero(), |a, b| a + b)
}

/// `a · b` in eight lanes (vectorisable, fixed order).
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut s = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            s[l] += x[l] * y[l];
        }
    }
    for (l, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        s[l] += x * y;
    }
    s.into_iter().fold(T::zero(), |a, b| a + b)
}

/// `x ← exp(x)` elementwise. The library `expf` is a scalar call that would cost more than all of
/// the tile products together, so f32 uses `exp_f32`, which vectorises; f64 keeps the library
/// `exp` (it is the gradient-check precision).
#[inline(always)]
fn exp_in_place<T: Real>(xs: &mut [T]) {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: `T` is `f32` (same type, so same size, alignment and validity).
        let xs = unsafe { &mut *(xs as *mut [T] as *mut [f32]) };
        for x in xs {
            *x = exp_f32(*x);
        }
    } else {
        for x in xs {
            *x = x.exp();
        }
    }
}

/// `exp(x)` for f32, branch-free: `x = n·ln2 + r` with `|r| <= ln2/2` (Cody–Waite split of ln 2),
/// cephes' polynomial for `e^r` (about 1 ulp), and `2^n` built in the exponent bits. Results below
/// `e^-87` (all that attention ever discards) are 0, including `exp(−∞)`; NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375: few mantissa bits, so n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to an integer `n` and leaves it in the low mantissa bits, so `2^n`
    // comes from integer adds and a shift (a float-to-int `as` would not vectorise: it saturates).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let y = xc * LOG2E + ROUND;
    let n = y - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = (p * r) * r + r + 1.0;
    // The bits of `y` are those of 1.5·2^23 plus `n`; shifted left by 23 the constant part (whose
    // low 9 bits are zero) vanishes and `n + 127` lands in the exponent field.
    let two_n = f32::from_bits(y.to_bits().wrapping_add(127) << 23);
    if x < -87.0 { 0.0 } else { er * two_n }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::normal;

    #[allow(clippy::too_many_arguments)]
    fn shape(
        q_len: usize,
        kv_len: usize,
        nq: usize,
        nkv: usize,
        hd: usize,
        q_pos0: i64,
        k_pos0: i64,
        causal: bool,
    ) -> AttnShape {
        AttnShape {
            q_len,
            kv_len,
            n_q_heads: nq,
            n_kv_heads: nkv,
            head_dim: hd,
            q_pos0,
            k_pos0,
            causal,
        }
    }

    fn randn(n: usize, seed: u64, sd: f64) -> Vec<f64> {
        (0..n as u64).map(|i| sd * normal(seed, 17, i)).collect()
    }

    struct Inputs {
        q: Vec<f64>,
        k: Vec<f64>,
        v: Vec<f64>,
        /// dout, and the weights W of the finite-difference loss L = Σ out · W.
        w: Vec<f64>,
        scale: f64,
    }

    fn inputs(s: &AttnShape, seed: u64) -> Inputs {
        let nq = s.q_len * s.n_q_heads * s.head_dim;
        let nk = s.kv_len * s.n_kv_heads * s.head_dim;
        // Wider than unit variance so that the softmax is far from uniform.
        Inputs {
            q: randn(nq, seed, 1.5),
            k: randn(nk, seed + 1, 1.5),
            v: randn(nk, seed + 2, 1.0),
            w: randn(nq, seed + 3, 1.0),
            scale: 1.0 / (s.head_dim as f64).sqrt(),
        }
    }

    fn sees(s: &AttnShape, i: usize, j: usize) -> bool {
        !s.causal || s.k_pos0 + j as i64 <= s.q_pos0 + i as i64
    }

    /// Probabilities `[n_q_heads][q_len * kv_len]` from the full score matrix (0 where masked).
    fn naive_probs(x: &Inputs, s: &AttnShape) -> (Vec<Vec<f64>>, Vec<f64>) {
        let (hd, nq, nkv) = (s.head_dim, s.n_q_heads, s.n_kv_heads);
        let mut probs = vec![];
        let mut lse = vec![f64::NEG_INFINITY; nq * s.q_len];
        for h in 0..nq {
            let kh = h / (nq / nkv);
            let mut p = vec![f64::NEG_INFINITY; s.q_len * s.kv_len];
            for i in 0..s.q_len {
                for j in 0..s.kv_len {
                    if sees(s, i, j) {
                        let qi = &x.q[(i * nq + h) * hd..][..hd];
                        let kj = &x.k[(j * nkv + kh) * hd..][..hd];
                        p[i * s.kv_len + j] =
                            x.scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>();
                    }
                }
            }
            for i in 0..s.q_len {
                let row = &mut p[i * s.kv_len..(i + 1) * s.kv_len];
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    row.fill(0.0);
                    continue;
                }
                let z: f64 = row.iter().map(|&s| (s - m).exp()).sum();
                for r in row.iter_mut() {
                    *r = (*r - m).exp() / z;
                }
                lse[h * s.q_len + i] = m + z.ln();
            }
            probs.push(p);
        }
        (probs, lse)
    }

    fn naive_forward(x: &Inputs, s: &AttnShape) -> (Vec<f64>, Vec<f64>) {
        let (hd, nq, nkv) = (s.head_dim, s.n_q_heads, s.n_kv_heads);
        let (probs, lse) = naive_probs(x, s);
        let mut out = vec![0.0; x.q.len()];
        for (h, p) in probs.iter().enumerate() {
            let kh = h / (nq / nkv);
            for i in 0..s.q_len {
                for j in 0..s.kv_len {
                    for d in 0..hd {
                        out[(i * nq + h) * hd + d] +=
                            p[i * s.kv_len + j] * x.v[(j * nkv + kh) * hd + d];
                    }
                }
            }
        }
        (out, lse)
    }

    /// The analytic gradient with dout = W: dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − rowsum(P ∘ dP)),
    /// dQ = scale dS K, dK = scale dSᵀ Q.
    #[allow(clippy::needless_range_loop)]
    fn naive_backward(x: &Inputs, s: &AttnShape) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (hd, nq, nkv) = (s.head_dim, s.n_q_heads, s.n_kv_heads);
        let (probs, _) = naive_probs(x, s);
        let (mut dq, mut dk, mut dv) = (
            vec![0.0; x.q.len()],
            vec![0.0; x.k.len()],
            vec![0.0; x.v.len()],
        );
        for (h, p) in probs.iter().enumerate() {
            let kh = h / (nq / nkv);
            for i in 0..s.q_len {
                let doi = &x.w[(i * nq + h) * hd..][..hd];
                let dp: Vec<f64> = (0..s.kv_len)
                    .map(|j| {
                        let vj = &x.v[(j * nkv + kh) * hd..][..hd];
                        doi.iter().zip(vj).map(|(a, b)| a * b).sum()
                    })
                    .collect();
                let prow = &p[i * s.kv_len..(i + 1) * s.kv_len];
                let dd: f64 = prow.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..s.kv_len {
                    let ds = prow[j] * (dp[j] - dd);
                    for d in 0..hd {
                        let (qa, ka) = ((i * nq + h) * hd + d, (j * nkv + kh) * hd + d);
                        dq[qa] += x.scale * ds * x.k[ka];
                        dk[ka] += x.scale * ds * x.q[qa];
                        dv[ka] += prow[j] * doi[d];
                    }
                }
            }
        }
        (dq, dk, dv)
    }

    fn cast<T: Real>(x: &[f64]) -> Vec<T> {
        x.iter().map(|&a| T::of(a)).collect()
    }

    /// The compilations this machine can run: the detected one first, then the portable one.
    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::detect()];
        if v[0] != Isa::Portable {
            v.push(Isa::Portable);
        }
        v
    }

    fn run_forward<T: Real>(isa: Isa, x: &Inputs, s: &AttnShape) -> (Vec<f64>, Vec<f64>) {
        let mut out = vec![T::nan(); x.q.len()];
        let mut lse = vec![T::nan(); s.n_q_heads * s.q_len];
        let (q, k, v) = (cast::<T>(&x.q), cast::<T>(&x.k), cast::<T>(&x.v));
        forward_with(isa, &q, &k, &v, s, T::of(x.scale), &mut out, &mut lse);
        let f = |a: Vec<T>| a.into_iter().map(T::as_f64).collect();
        (f(out), f(lse))
    }

    fn run_backward<T: Real>(
        isa: Isa,
        x: &Inputs,
        s: &AttnShape,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (q, k, v, w) = (
            cast::<T>(&x.q),
            cast::<T>(&x.k),
            cast::<T>(&x.v),
            cast::<T>(&x.w),
        );
        let scale = T::of(x.scale);
        let mut out = vec![T::zero(); q.len()];
        let mut lse = vec![T::zero(); s.n_q_heads * s.q_len];
        forward_with(isa, &q, &k, &v, s, scale, &mut out, &mut lse);
        let (mut dq, mut dk, mut dv) = (
            vec![T::nan(); q.len()],
            vec![T::nan(); k.len()],
            vec![T::nan(); v.len()],
        );
        backward_with(
            isa, &q, &k, &v, &out, &w, &lse, s, scale, &mut dq, &mut dk, &mut dv,
        );
        let f = |a: Vec<T>| a.into_iter().map(T::as_f64).collect();
        (f(dq), f(dk), f(dv))
    }

    /// max |a − b| / max |b| (norm-wise relative error); both must be finite.
    fn rel_err(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        assert!(
            a.iter().all(|x| x.is_finite()),
            "non-finite value in result"
        );
        let num = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        let den = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
        if den == 0.0 { num } else { num / den }
    }

    /// Like `rel_err` for lse: −∞ must match exactly, finite entries by relative error.
    fn lse_err(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        let mut worst: f64 = 0.0;
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            if y == f64::NEG_INFINITY {
                assert_eq!(x, f64::NEG_INFINITY, "lse[{i}] = {x}, expected -inf");
            } else {
                assert!(x.is_finite(), "lse[{i}] = {x}, expected {y}");
                worst = worst.max((x - y).abs() / y.abs().max(1.0));
            }
        }
        worst
    }

    /// Odd lengths (never a multiple of the tile), GQA ratios 1, 4, 8, non-causal, and the causal
    /// blocks of the ring: diagonal, keys all before the queries (full), keys all after (fully
    /// masked), partial overlaps either way, q_len != kv_len.
    fn cases() -> Vec<(&'static str, AttnShape)> {
        vec![
            ("1x1 causal", shape(1, 1, 2, 2, 8, 0, 0, true)),
            ("7x7 causal gqa4", shape(7, 7, 4, 1, 8, 0, 0, true)),
            ("67x67 causal gqa8", shape(67, 67, 8, 1, 16, 0, 0, true)),
            (
                "130x130 causal mha hd72",
                shape(130, 130, 2, 2, 72, 0, 0, true),
            ),
            ("130x130 causal gqa4", shape(130, 130, 4, 1, 32, 0, 0, true)),
            (
                "67x130 non-causal gqa4",
                shape(67, 130, 4, 1, 12, 0, 0, false),
            ),
            ("130x7 non-causal", shape(130, 7, 2, 2, 5, 0, 0, false)),
            (
                "full block (keys before)",
                shape(67, 130, 4, 2, 16, 300, 0, true),
            ),
            (
                "masked block (keys after)",
                shape(67, 130, 4, 2, 16, 0, 300, true),
            ),
            (
                "partial, keys start later",
                shape(130, 67, 4, 2, 16, 0, 30, true),
            ),
            (
                "partial, queries start later",
                shape(67, 130, 8, 2, 16, 100, 60, true),
            ),
            ("decode-like tail", shape(7, 130, 8, 1, 16, 123, 0, true)),
            ("no keys", shape(5, 0, 2, 1, 4, 0, 0, false)),
            ("no queries", shape(0, 5, 2, 1, 4, 0, 0, true)),
        ]
    }

    #[test]
    fn forward_matches_naive_f64() {
        for isa in isas() {
            let mut worst = (0.0f64, 0.0f64);
            for (seed, (name, s)) in cases().into_iter().enumerate() {
                let x = inputs(&s, 100 + seed as u64);
                let (out, lse) = naive_forward(&x, &s);
                let (o64, l64) = run_forward::<f64>(isa, &x, &s);
                let (eo, el) = (rel_err(&o64, &out), lse_err(&l64, &lse));
                assert!(
                    eo < 1e-12 && el < 1e-12,
                    "{isa:?} {name}: out err {eo:e}, lse err {el:e}"
                );
                worst = (worst.0.max(eo), worst.1.max(el));
            }
            eprintln!(
                "forward f64 {isa:?}: worst out err {:.1e}, lse err {:.1e}",
                worst.0, worst.1
            );
        }
    }

    #[test]
    fn forward_matches_naive_f32() {
        for isa in isas() {
            let mut worst = (0.0f64, 0.0f64);
            for (seed, (name, s)) in cases().into_iter().enumerate() {
                let mut x = inputs(&s, 200 + seed as u64);
                // Compare against the reference on the f32-rounded inputs.
                for a in [&mut x.q, &mut x.k, &mut x.v] {
                    a.iter_mut().for_each(|y| *y = *y as f32 as f64);
                }
                x.scale = x.scale as f32 as f64;
                let (out, lse) = naive_forward(&x, &s);
                let (o32, l32) = run_forward::<f32>(isa, &x, &s);
                let (eo, el) = (rel_err(&o32, &out), lse_err(&l32, &lse));
                assert!(
                    eo < 1e-5 && el < 1e-5,
                    "{isa:?} {name}: out err {eo:e}, lse err {el:e}"
                );
                worst = (worst.0.max(eo), worst.1.max(el));
            }
            eprintln!(
                "forward f32 {isa:?}: worst out err {:.1e}, lse err {:.1e}",
                worst.0, worst.1
            );
        }
    }

    #[test]
    fn backward_matches_naive_analytic() {
        for isa in isas() {
            let (mut w64, mut w32) = (0.0f64, 0.0f64);
            for (seed, (name, s)) in cases().into_iter().enumerate() {
                let x = inputs(&s, 300 + seed as u64);
                let (dq, dk, dv) = naive_backward(&x, &s);
                let (q64, k64, v64) = run_backward::<f64>(isa, &x, &s);
                let e = [rel_err(&q64, &dq), rel_err(&k64, &dk), rel_err(&v64, &dv)];
                assert!(
                    e.iter().all(|&e| e < 1e-11),
                    "{isa:?} {name} f64: dq/dk/dv err {e:?}"
                );
                w64 = e.into_iter().fold(w64, f64::max);
                let (q32, k32, v32) = run_backward::<f32>(isa, &x, &s);
                let e = [rel_err(&q32, &dq), rel_err(&k32, &dk), rel_err(&v32, &dv)];
                assert!(
                    e.iter().all(|&e| e < 1e-4),
                    "{isa:?} {name} f32: dq/dk/dv err {e:?}"
                );
                w32 = e.into_iter().fold(w32, f64::max);
            }
            eprintln!("backward vs analytic {isa:?}: worst f64 err {w64:.1e}, f32 err {w32:.1e}");
        }
    }

    fn slot(x: &mut Inputs, which: usize) -> &mut Vec<f64> {
        match which {
            0 => &mut x.q,
            1 => &mut x.k,
            _ => &mut x.v,
        }
    }

    /// Central differences of L = Σ out · W in f64 against the backward with dout = W.
    #[test]
    fn backward_matches_finite_differences() {
        let cases = [
            ("gqa4 causal", shape(9, 9, 4, 1, 4, 0, 0, true)),
            ("offset partial", shape(11, 7, 2, 2, 3, 3, 5, true)),
            ("non-causal", shape(5, 8, 2, 1, 4, 0, 0, false)),
            ("across tiles gqa2", shape(66, 66, 2, 1, 2, 0, 0, true)),
        ];
        let mut worst: f64 = 0.0;
        for (seed, (name, s)) in cases.into_iter().enumerate() {
            let mut x = inputs(&s, 400 + seed as u64);
            let isa = Isa::detect();
            let (dq, dk, dv) = run_backward::<f64>(isa, &x, &s);
            let loss = |x: &Inputs| -> f64 {
                let (out, _) = run_forward::<f64>(isa, x, &s);
                out.iter().zip(&x.w).map(|(a, b)| a * b).sum()
            };
            let eps = 1e-5;
            for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
                let n = grad.len();
                let mut fd = vec![0.0; n];
                for (e, fd) in fd.iter_mut().enumerate() {
                    let x0 = slot(&mut x, which)[e];
                    slot(&mut x, which)[e] = x0 + eps;
                    let lp = loss(&x);
                    slot(&mut x, which)[e] = x0 - eps;
                    let lm = loss(&x);
                    slot(&mut x, which)[e] = x0;
                    *fd = (lp - lm) / (2.0 * eps);
                }
                let err = rel_err(grad, &fd);
                let var = ["q", "k", "v"][which];
                assert!(err < 1e-6, "{name}: d{var} vs finite differences: {err:e}");
                worst = worst.max(err);
            }
        }
        eprintln!("backward vs finite differences: worst err {worst:.1e}");
    }

    #[test]
    fn fully_masked_rows_are_zero_and_finite() {
        // Rows 0..30 see no key; the second shape masks everything.
        for s in [
            shape(130, 67, 4, 2, 16, 0, 30, true),
            shape(67, 130, 4, 2, 16, 0, 300, true),
        ] {
            let x = inputs(&s, 7);
            let (out, lse) = run_forward::<f32>(Isa::detect(), &x, &s);
            let (dq, dk, dv) = run_backward::<f32>(Isa::detect(), &x, &s);
            for v in [&out, &dq, &dk, &dv] {
                assert!(
                    v.iter().all(|a| a.is_finite()),
                    "non-finite value for {s:?}"
                );
            }
            let row = s.n_q_heads * s.head_dim;
            let masked = (s.k_pos0 - s.q_pos0).clamp(0, s.q_len as i64) as usize;
            assert!(out[..masked * row].iter().all(|&a| a == 0.0));
            assert!(dq[..masked * row].iter().all(|&a| a == 0.0));
            for h in 0..s.n_q_heads {
                let l = &lse[h * s.q_len..(h + 1) * s.q_len];
                assert!(l[..masked].iter().all(|&a| a == f64::NEG_INFINITY));
                assert!(l[masked..].iter().all(|a| a.is_finite()));
            }
            if masked == s.q_len {
                assert!(dk.iter().chain(&dv).all(|&a| a == 0.0));
            }
        }
    }

    /// out, lse, dq, dk, dv of one forward + backward in f32, concatenated.
    fn run_all(isa: Isa, x: &Inputs, s: &AttnShape) -> Vec<f32> {
        let (q, k, v, w) = (
            cast::<f32>(&x.q),
            cast::<f32>(&x.k),
            cast::<f32>(&x.v),
            cast(&x.w),
        );
        let scale = x.scale as f32;
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; s.n_q_heads * s.q_len];
        forward_with(isa, &q, &k, &v, s, scale, &mut out, &mut lse);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        backward_with(
            isa, &q, &k, &v, &out, &w, &lse, s, scale, &mut dq, &mut dk, &mut dv,
        );
        [out, lse, dq, dk, dv].concat()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|a| a.to_bits()).collect()
    }

    /// Bitwise equal across runs and thread counts (the backward's chunking depends on the shape
    /// only). The portable and AVX2+FMA compilations round differently, so they only agree closely.
    #[test]
    fn results_are_bitwise_deterministic() {
        let s = shape(150, 150, 4, 2, 32, 0, 0, true);
        let x = inputs(&s, 9);
        let isa = Isa::detect();
        let first = run_all(isa, &x, &s);
        assert_eq!(bits(&first), bits(&run_all(isa, &x, &s)), "two runs differ");
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let again = pool.install(|| run_all(isa, &x, &s));
            assert_eq!(bits(&first), bits(&again), "{threads} threads differ");
        }
        let portable: Vec<f64> = run_all(Isa::Portable, &x, &s)
            .iter()
            .map(|&a| a as f64)
            .collect();
        let first: Vec<f64> = first.iter().map(|&a| a as f64).collect();
        let err = rel_err(&portable, &first);
        assert!(err < 1e-5, "portable vs {isa:?}: {err:e}");
    }

    #[test]
    fn exp_f32_is_accurate() {
        let mut worst: f64 = 0.0;
        for i in 0..=200_000 {
            let x = -87.0 + 88.0 * i as f64 / 200_000.0;
            let (got, want) = (exp_f32(x as f32) as f64, (x as f32 as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "exp_f32 worst relative error {worst:e}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    /// This thread's CPU time in seconds (Linux), to time kernels on a machine shared with other
    /// jobs, where wall-clock time mostly measures the neighbours.
    fn thread_cpu_seconds() -> Option<f64> {
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        Some(s.split_whitespace().next()?.parse::<f64>().ok()? * 1e-9)
    }

    /// `cargo test --release --lib attention::tests::bench -- --ignored --nocapture`. Best of 5
    /// wall-clock times on the global pool, and best of 5 CPU times on one thread. FLOPs by
    /// FlashAttention's convention: forward 4·q·kv·hd·heads (halved when causal), backward 2.5x.
    #[test]
    #[ignore]
    fn bench_attention() {
        for (t, nq, nkv, hd) in [(2048, 8, 2, 32), (2048, 32, 8, 128)] {
            let s = shape(t, t, nq, nkv, hd, 0, 0, true);
            let x = inputs(&s, 1);
            let (q, k, v, w) = (
                cast::<f32>(&x.q),
                cast::<f32>(&x.k),
                cast::<f32>(&x.v),
                cast(&x.w),
            );
            let scale = x.scale as f32;
            let mut out = vec![0.0; q.len()];
            let mut lse = vec![0.0; nq * t];
            let (mut dq, mut dk, mut dv) =
                (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            let flops = 4.0 * (t * t * hd * nq) as f64 / 2.0;
            let mut time = |clock: &dyn Fn() -> f64| {
                let (mut tf, mut tb) = (f64::INFINITY, f64::INFINITY);
                for _ in 0..5 {
                    let c0 = clock();
                    attention_forward(&q, &k, &v, &s, scale, &mut out, &mut lse);
                    let c1 = clock();
                    attention_backward(
                        &q, &k, &v, &out, &w, &lse, &s, scale, &mut dq, &mut dk, &mut dv,
                    );
                    let c2 = clock();
                    (tf, tb) = (tf.min(c1 - c0), tb.min(c2 - c1));
                }
                format!(
                    "forward {:.1} ms ({:.0} GFLOP/s), backward {:.1} ms ({:.0} GFLOP/s)",
                    tf * 1e3,
                    flops / tf * 1e-9,
                    tb * 1e3,
                    2.5 * flops / tb * 1e-9
                )
            };
            let t0 = std::time::Instant::now();
            let wall = time(&|| t0.elapsed().as_secs_f64());
            let threads = rayon::current_num_threads();
            println!(
                "T={t} nq={nq} nkv={nkv} hd={hd} causal f32, {:?}",
                Isa::detect()
            );
            println!("  wall, {threads} threads: {wall}");
            if thread_cpu_seconds().is_some() {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                let cpu = pool.install(|| time(&|| thread_cpu_seconds().unwrap_or(0.0)));
                println!("  CPU time, 1 thread: {cpu}");
            }
        }
    }
}
