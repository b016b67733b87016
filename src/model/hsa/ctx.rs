//! The context of one HSA pass (model.rs, encoder.rs, infer.rs): the backend, config,
//! parameters and RoPE tables of `t` rows, with the small pieces every layer uses (linear maps
//! and their backward, RMSNorm with its saved statistics). The layers' forward and backward are
//! `impl Ctx` blocks in model.rs and encoder.rs.

use crate::model::hsa::config::HsaConfig;
use crate::model::hsa::ops::HsaOps;
use crate::model::params::ParamStore;

/// Everything a pass reads besides the parameters: `t` rows at the positions of `cos`, `sin`
/// (the whole sequence in training; the new rows of an inference step in infer.rs).
pub(super) struct Ctx<'a, B: HsaOps> {
    pub(super) b: &'a B,
    pub(super) c: &'a HsaConfig,
    pub(super) p: &'a ParamStore<B>,
    pub(super) t: usize,
    pub(super) cos: B::Buf,
    pub(super) sin: B::Buf,
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
    pub(super) fn copy(&self, x: &B::Buf) -> B::Buf {
        let n = self.b.len(x);
        let mut y = self.b.zeros(n);
        self.b.copy(x, 0, &mut y, 0, n);
        y
    }
}
