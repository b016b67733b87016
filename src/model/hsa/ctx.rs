//! The context of one HSA pass (model.rs, encoder.rs, infer.rs): the backend, config,
//! parameters and RoPE tables of `t` rows, this rank's tensor-parallel share (`Shares`, `TpGroup`),
//! with the small pieces every layer uses (linear maps and their backward, RMSNorm with its saved
//! statistics, the TP reductions). The layers' forward and backward are `impl Ctx` blocks in
//! model.rs and encoder.rs.
//!
//! Tensor parallelism is plain Megatron TP (no sequence parallelism): every rank holds the whole
//! residual stream `[t, d]`; column-parallel projections compute this rank's heads, groups and
//! MLP columns; row-parallel outputs are summed over the group (`row_parallel`); and the input
//! gradient of each normed column-parallel block, partial on each rank, is summed
//! (`norm_back_tp`). The norms' weight gradients stay partial: the optimizer's rule for
//! `Split::Replicated` tensors (`train::optim::all_reduce_grads`) sums them over TP.

use anyhow::{Result, ensure};

use crate::backend::Backend;
use crate::model::hsa::config::HsaConfig;
use crate::model::hsa::ops::HsaOps;
use crate::model::params::{ParamStore, Shard};
use crate::parallel::comm::Comm;
use crate::parallel::tensor::all_reduce_buf;

/// This rank's share of the model's heads and widths under tensor parallelism (whole at tp 1).
/// The chunk memory, retrieval and HSA blocks split by group: rank r holds groups
/// `r·G/tp ..`, their HSA query heads (head h reads group h/(H/G)) and retrieval slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shares {
    pub shard: Shard,
    /// Query heads of the SWA layers and of the HSA blocks (H/tp), SWA KV heads.
    pub hq: usize,
    pub hk: usize,
    /// Memory / retrieval groups (G/tp) and their retrieval width (dr/tp).
    pub g: usize,
    pub dr: usize,
    /// MLP columns.
    pub ffn: usize,
    /// Vocabulary rows of the embedding and LM head, from `vocab0`.
    pub vocab: usize,
    pub vocab0: usize,
}

impl Shares {
    /// Rank `shard.rank`'s share, or why `shard.size` does not split `c`.
    pub fn new(c: &HsaConfig, shard: Shard) -> Result<Shares> {
        let tp = shard.size;
        let b = &c.base;
        for (what, n) in [
            ("num_attention_heads", b.num_attention_heads),
            ("num_key_value_heads", b.num_key_value_heads),
            ("num_kv_heads (the HSA groups)", c.num_kv_heads),
            ("intermediate_size", b.intermediate_size),
            ("vocab_size", b.vocab_size),
        ] {
            ensure!(
                tp > 0 && n.is_multiple_of(tp),
                "the HSA model's {what} = {n} does not divide by parallel.tp = {tp}: each TP \
                 rank holds an equal share of heads, groups, MLP columns and vocabulary"
            );
        }
        let vocab = b.vocab_size / tp;
        Ok(Shares {
            shard,
            hq: b.num_attention_heads / tp,
            hk: b.num_key_value_heads / tp,
            g: c.num_kv_heads / tp,
            dr: c.retrieval_dim / tp,
            ffn: b.intermediate_size / tp,
            vocab,
            vocab0: shard.rank * vocab,
        })
    }
    pub fn tp(&self) -> usize {
        self.shard.size
    }
}

/// The TP group as a pass uses it: sum a buffer over the ranks (object-safe, so `Ctx` needs no
/// communicator type parameter; every `Comm` is one).
pub trait TpGroup<B: Backend> {
    /// `buf ←` the element-wise sum of every rank's `buf`.
    fn sum(&self, b: &B, buf: &mut B::Buf);
}

/// The TP group of one rank (inference, the chunk memory): the sum is the identity.
pub struct OneRank;

impl<B: Backend> TpGroup<B> for OneRank {
    fn sum(&self, _b: &B, _buf: &mut B::Buf) {}
}

impl<B: Backend, C: Comm> TpGroup<B> for C {
    fn sum(&self, b: &B, buf: &mut B::Buf) {
        all_reduce_buf(b, self, buf);
    }
}

/// Everything a pass reads besides the parameters: `t` rows at the positions of `cos`, `sin`
/// (the whole sequence in training; the new rows of an inference step in infer.rs).
pub(super) struct Ctx<'a, B: HsaOps> {
    pub(super) b: &'a B,
    pub(super) c: &'a HsaConfig,
    pub(super) p: &'a ParamStore<B>,
    pub(super) t: usize,
    pub(super) cos: B::Buf,
    pub(super) sin: B::Buf,
    /// This rank's share and its TP group (`Shares::new(c, Shard::WHOLE)` and `SelfComm` alone).
    pub(super) sh: Shares,
    pub(super) tp: &'a dyn TpGroup<B>,
}

/// `y [rows, out] (+)= x [rows, inp] · Wᵀ`.
pub(super) fn linear<B: HsaOps>(
    b: &B,
    x: &B::Buf,
    w: &B::Buf,
    rows: usize,
    out: usize,
    inp: usize,
) -> B::Buf {
    let mut y = b.zeros(rows * out);
    b.gemm(&mut y, 0, x, 0, w, 0, rows, out, inp, false, true, false);
    y
}

/// Backward of `linear`: `dx += dy · W`, `dW += dyᵀ · x`.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_back<B: HsaOps>(
    b: &B,
    dy: &B::Buf,
    x: &B::Buf,
    w: &B::Buf,
    dx: &mut B::Buf,
    dw: &mut B::Buf,
    rows: usize,
    out: usize,
    inp: usize,
) {
    b.gemm(dx, 0, dy, 0, w, 0, rows, inp, out, false, false, true);
    b.gemm(dw, 0, dy, 0, x, 0, out, inp, rows, true, false, true);
}

/// RMSNorm output and saved `rstd`.
pub(super) struct Normed<B: HsaOps> {
    pub(super) y: B::Buf,
    pub(super) rstd: B::Buf,
}

impl<'a, B: HsaOps> Ctx<'a, B> {
    pub(super) fn w(&self, i: usize) -> &'a B::Buf {
        &self.p.bufs[i]
    }
    pub(super) fn norm(
        &self,
        x: &B::Buf,
        w: usize,
        eps: f64,
        rows: usize,
        dim: usize,
    ) -> Normed<B> {
        let (mut y, mut rstd) = (self.b.zeros(rows * dim), self.b.zeros(rows));
        self.b
            .rmsnorm_forward(x, self.w(w), eps, rows, dim, &mut y, &mut rstd);
        Normed { y, rstd }
    }
    /// `dx += ` the norm's input gradient, `grads[w] += ` its weight gradient.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn norm_back(
        &self,
        dy: &B::Buf,
        x: &B::Buf,
        n: &Normed<B>,
        w: usize,
        rows: usize,
        dim: usize,
        dx: &mut B::Buf,
        g: &mut ParamStore<B>,
    ) {
        self.b
            .rmsnorm_backward(dy, x, self.w(w), &n.rstd, rows, dim, dx, &mut g.bufs[w]);
    }
    pub(super) fn d(&self) -> usize {
        self.c.base.hidden_size
    }
    pub(super) fn dh(&self) -> usize {
        self.c.head_dim()
    }
    /// `out += x [rows, inp] · Wᵀ` summed over TP (a row-parallel output, `W` this rank's
    /// columns); at tp 1 one accumulating GEMM.
    pub(super) fn row_parallel(
        &self,
        out: &mut B::Buf,
        x: &B::Buf,
        w: usize,
        rows: usize,
        outw: usize,
        inp: usize,
    ) {
        let b = self.b;
        if self.sh.tp() == 1 {
            b.gemm(
                out,
                0,
                x,
                0,
                self.w(w),
                0,
                rows,
                outw,
                inp,
                false,
                true,
                true,
            );
            return;
        }
        let mut y = linear(b, x, self.w(w), rows, outw, inp);
        self.tp.sum(b, &mut y);
        b.add_assign(out, &y);
    }
    /// `norm_back` for a norm whose output feeds column-parallel projections: `dy` is this
    /// rank's partial gradient, the weight gradient stays partial (summed with the replicated
    /// gradients over TP), and `dx +=` the input gradient summed over TP.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn norm_back_tp(
        &self,
        dy: &B::Buf,
        x: &B::Buf,
        n: &Normed<B>,
        w: usize,
        rows: usize,
        dim: usize,
        dx: &mut B::Buf,
        g: &mut ParamStore<B>,
    ) {
        if self.sh.tp() == 1 {
            self.norm_back(dy, x, n, w, rows, dim, dx, g);
        } else {
            let mut part = self.b.zeros(rows * dim);
            self.norm_back(dy, x, n, w, rows, dim, &mut part, g);
            self.sum_into(part, dx);
        }
    }
    /// `dx += ` the sum over TP of `part` (tp > 1).
    pub(super) fn sum_into(&self, mut part: B::Buf, dx: &mut B::Buf) {
        self.tp.sum(self.b, &mut part);
        self.b.add_assign(dx, &part);
    }
    pub(super) fn copy(&self, x: &B::Buf) -> B::Buf {
        let n = self.b.len(x);
        let mut y = self.b.zeros(n);
        self.b.copy(x, 0, &mut y, 0, n);
        y
    }
}
