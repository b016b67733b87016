//! The HSA model (`DRTForCausalLM`) over one sequence: explicit forward and backward of every
//! layer, written once over `B: HsaOps` (the Backend plus the HSA operations).
//!
//!   embed → lower SWA layers → chunking (landmarks + chunk K/V memory, shared by all groups)
//!   → per group: retrieval (top-k chunks, fusion weights) → HSA block → SWA layers
//!   → norm_f → LM head (+ cross-entropy)
//!
//! SWA layers: pre-norm, per-head RMSNorm on q and k, then RoPE, then causal attention over a
//! window of `sliding_window` past keys; SwiGLU MLP. The HSA query, chunk keys and retrieval use
//! no positions. The HSA block reaches the residual stream only through its MLP unless
//! `reset_hsa_residual` (HSA.md §2.3). Gradients reach the retrieval scores only through the
//! fusion weights; the top-k indices are constants.
//!
//! Tensor parallelism (`forward_backward_tp`, ctx.rs): SWA layers split their query and KV
//! heads, MLPs their columns, the chunk memory, retrieval and HSA blocks their groups, the
//! embedding and LM head their vocabulary rows (cross-entropy statistics combined over TP); the
//! chunk encoder is replicated. cp = 1; activations are allocated per pass (the reference path).

use anyhow::{Result, ensure};

use crate::backend::{NOT_IN_SHARD, TARGET_ELSEWHERE, TARGET_IGNORE};
use crate::model::hsa::config::{HSA_NORM_EPS, HsaConfig};
pub(super) use crate::model::hsa::ctx::{Ctx, Normed, linear, linear_back};
use crate::model::hsa::ctx::{OneRank, Shares, TpGroup};
use crate::model::hsa::encoder::Front;
use crate::model::hsa::ops::{Fusion, HsaOps, HsaShape, RetrievalShape, SwaShape};
use crate::model::hsa::params::{AttnIdx, EncoderIdx, LayerIdx, Layout, MlpIdx};
use crate::model::llama::{combine_ce_stats, gather_ce_stats};
use crate::model::params::{ParamStore, Shard};
use crate::model::rope::{Rope, RopePrecision};
use crate::parallel::comm::{Comm, SelfComm};

/// An HSA model over backend `B`.
pub struct HsaModel<B: HsaOps> {
    pub cfg: HsaConfig,
    pub layout: Layout,
    pub rope: Rope,
    /// This rank's tensor-parallel shard of the parameters (`Layout`'s splits).
    pub params: ParamStore<B>,
    pub shares: Shares,
}

// ---- sliding-window attention sub-block -----------------------------------------------------------

/// An attention's projections: its normed input, q and k before and after QK-norm and RoPE, v.
pub(super) struct Qkv<B: HsaOps> {
    xn: Normed<B>,
    q_raw: B::Buf,
    k_raw: B::Buf,
    pub(super) qn: Normed<B>,
    pub(super) kn: Normed<B>,
    pub(super) v: B::Buf,
}

struct AttnActs<B: HsaOps> {
    xn: Normed<B>,
    q_raw: B::Buf,
    k_raw: B::Buf,
    qn: Normed<B>,
    kn: Normed<B>,
    v: B::Buf,
    attn: B::Buf,
    lse: B::Buf,
}

impl<B: HsaOps> Ctx<'_, B> {
    fn swa_shape(&self, window: usize) -> SwaShape {
        SwaShape {
            len: self.t,
            cached: 0,
            n_q_heads: self.sh.hq,
            n_kv_heads: self.sh.hk,
            head_dim: self.dh(),
            window,
        }
    }

    /// `rope(q_norm(q(n)))`, `rope(k_norm(k(n)))`, `v(n)` with `n = norm(x)`.
    pub(super) fn attn_qkv(&self, x: &B::Buf, norm: usize, eps: f64, a: &AttnIdx) -> Qkv<B> {
        let (b, t, d, dh) = (self.b, self.t, self.d(), self.dh());
        let (hq, hk) = (self.sh.hq, self.sh.hk);
        let eps_qk = self.c.base.rms_norm_eps;
        let xn = self.norm(x, norm, eps, t, d);
        let q_raw = linear(b, &xn.y, self.w(a.q), t, hq * dh, d);
        let k_raw = linear(b, &xn.y, self.w(a.k), t, hk * dh, d);
        let v = linear(b, &xn.y, self.w(a.v), t, hk * dh, d);
        let mut qn = self.norm(&q_raw, a.q_norm, eps_qk, t * hq, dh);
        let mut kn = self.norm(&k_raw, a.k_norm, eps_qk, t * hk, dh);
        b.rope_forward(&mut qn.y, &self.cos, &self.sin, t, hq, dh);
        b.rope_forward(&mut kn.y, &self.cos, &self.sin, t, hk, dh);
        Qkv {
            xn,
            q_raw,
            k_raw,
            qn,
            kn,
            v,
        }
    }

    /// `x + o(swa(rope(q_norm(q(n))), rope(k_norm(k(n))), v(n)))` with `n = norm(x)`.
    fn attn_forward(
        &self,
        x: &B::Buf,
        norm: usize,
        eps: f64,
        a: &AttnIdx,
        window: usize,
    ) -> (AttnActs<B>, B::Buf) {
        let (b, t, d, dh) = (self.b, self.t, self.d(), self.dh());
        let s = self.swa_shape(window);
        let hq = s.n_q_heads;
        let Qkv {
            xn,
            q_raw,
            k_raw,
            qn,
            kn,
            v,
        } = self.attn_qkv(x, norm, eps, a);
        let (mut attn, mut lse) = (b.zeros(t * hq * dh), b.zeros(hq * t));
        let scale = 1.0 / (dh as f64).sqrt();
        b.swa_forward(&qn.y, &kn.y, &v, &s, scale, &mut attn, &mut lse);
        let mut out = self.copy(x);
        self.row_parallel(&mut out, &attn, a.o, t, d, hq * dh);
        let acts = AttnActs {
            xn,
            q_raw,
            k_raw,
            qn,
            kn,
            v,
            attn,
            lse,
        };
        (acts, out)
    }

    /// `dx` holds ∂L/∂out on entry and ∂L/∂x on exit (the residual passes through).
    #[allow(clippy::too_many_arguments)]
    fn attn_backward(
        &self,
        x: &B::Buf,
        norm: usize,
        a: &AttnIdx,
        window: usize,
        s_: &AttnActs<B>,
        dx: &mut B::Buf,
        g: &mut ParamStore<B>,
    ) {
        let (b, t, d, dh) = (self.b, self.t, self.d(), self.dh());
        let s = self.swa_shape(window);
        let (hq, hk) = (s.n_q_heads, s.n_kv_heads);
        let mut dattn = b.zeros(t * hq * dh);
        linear_back(
            b,
            dx,
            &s_.attn,
            self.w(a.o),
            &mut dattn,
            &mut g.bufs[a.o],
            t,
            d,
            hq * dh,
        );
        let (mut dq, mut dk, mut dv) = (
            b.zeros(t * hq * dh),
            b.zeros(t * hk * dh),
            b.zeros(t * hk * dh),
        );
        let scale = 1.0 / (dh as f64).sqrt();
        b.swa_backward(
            &s_.qn.y, &s_.kn.y, &s_.v, &s_.attn, &dattn, &s_.lse, &s, scale, &mut dq, &mut dk,
            &mut dv,
        );
        b.rope_backward(&mut dq, &self.cos, &self.sin, t, hq, dh);
        b.rope_backward(&mut dk, &self.cos, &self.sin, t, hk, dh);
        let (mut dq_raw, mut dk_raw) = (b.zeros(t * hq * dh), b.zeros(t * hk * dh));
        self.norm_back(&dq, &s_.q_raw, &s_.qn, a.q_norm, t * hq, dh, &mut dq_raw, g);
        self.norm_back(&dk, &s_.k_raw, &s_.kn, a.k_norm, t * hk, dh, &mut dk_raw, g);
        let mut dxn = b.zeros(t * d);
        let xn = &s_.xn.y;
        linear_back(
            b,
            &dq_raw,
            xn,
            self.w(a.q),
            &mut dxn,
            &mut g.bufs[a.q],
            t,
            hq * dh,
            d,
        );
        linear_back(
            b,
            &dk_raw,
            xn,
            self.w(a.k),
            &mut dxn,
            &mut g.bufs[a.k],
            t,
            hk * dh,
            d,
        );
        linear_back(
            b,
            &dv,
            xn,
            self.w(a.v),
            &mut dxn,
            &mut g.bufs[a.v],
            t,
            hk * dh,
            d,
        );
        self.norm_back_tp(&dxn, x, &s_.xn, norm, t, d, dx, g);
    }
}

// ---- SwiGLU MLP sub-block ------------------------------------------------------------------------------

pub(super) struct MlpActs<B: HsaOps> {
    xn: Normed<B>,
    gate: B::Buf,
    up: B::Buf,
    h: B::Buf,
}

impl<B: HsaOps> Ctx<'_, B> {
    /// `base + down(silu(gate(n)) · up(n))` with `n = norm(x)`.
    pub(super) fn mlp_forward(
        &self,
        x: &B::Buf,
        base: &B::Buf,
        norm: usize,
        eps: f64,
        m: &MlpIdx,
    ) -> (MlpActs<B>, B::Buf) {
        let (b, t, d, f) = (self.b, self.t, self.d(), self.sh.ffn);
        let xn = self.norm(x, norm, eps, t, d);
        let gate = linear(b, &xn.y, self.w(m.gate), t, f, d);
        let up = linear(b, &xn.y, self.w(m.up), t, f, d);
        let mut h = b.zeros(t * f);
        b.swiglu_forward(&gate, &up, &mut h);
        let mut out = self.copy(base);
        self.row_parallel(&mut out, &h, m.down, t, d, f);
        (MlpActs { xn, gate, up, h }, out)
    }

    /// `dx += ` ∂L/∂x given ∂L/∂out = `dy` (the residual `base` is the caller's).
    #[allow(clippy::too_many_arguments)]
    fn mlp_backward(
        &self,
        x: &B::Buf,
        norm: usize,
        m: &MlpIdx,
        a: &MlpActs<B>,
        dy: &B::Buf,
        dx: &mut B::Buf,
        g: &mut ParamStore<B>,
    ) {
        let (b, t, d, f) = (self.b, self.t, self.d(), self.sh.ffn);
        let mut dh = b.zeros(t * f);
        linear_back(
            b,
            dy,
            &a.h,
            self.w(m.down),
            &mut dh,
            &mut g.bufs[m.down],
            t,
            d,
            f,
        );
        let (mut dgate, mut dup) = (b.zeros(t * f), b.zeros(t * f));
        b.swiglu_backward(&a.gate, &a.up, &dh, &mut dgate, &mut dup);
        let mut dxn = b.zeros(t * d);
        linear_back(
            b,
            &dgate,
            &a.xn.y,
            self.w(m.gate),
            &mut dxn,
            &mut g.bufs[m.gate],
            t,
            f,
            d,
        );
        linear_back(
            b,
            &dup,
            &a.xn.y,
            self.w(m.up),
            &mut dxn,
            &mut g.bufs[m.up],
            t,
            f,
            d,
        );
        self.norm_back_tp(&dxn, x, &a.xn, norm, t, d, dx, g);
    }
}

// ---- layers ---------------------------------------------------------------------------------------------

/// The chunking layer's outputs, read by every group.
pub(super) struct Memory<B: HsaOps> {
    /// E and the landmark input (mean landmark or chunk encoder, encoder.rs).
    front: Front<B>,
    /// Landmarks `[C, G, dr]`.
    pub(super) lmk: B::Buf,
    km_raw: B::Buf,
    /// Chunk keys (after `k_rmsnorm` if any) and values `[T, G, dh]`.
    pub(super) km: Normed<B>,
    pub(super) vm: B::Buf,
}

struct RetrievalActs<B: HsaOps> {
    xn: Normed<B>,
    q_raw: B::Buf,
    /// Retrieval query and landmarks as scored (after the landmark norms if any).
    q: Normed<B>,
    lmk: Normed<B>,
    idx: Vec<u32>,
    scores: B::Buf,
    w: B::Buf,
}

struct HsaActs<B: HsaOps> {
    /// The SWA sub-block (unless `hsa_only`) and its output x1.
    swa: Option<AttnActs<B>>,
    x1: B::Buf,
    xn: Normed<B>,
    q_raw: B::Buf,
    q: Normed<B>,
    o: B::Buf,
    lse: B::Buf,
    /// `x1 + o_proj(o)`: the MLP's input.
    z: B::Buf,
    mlp: MlpActs<B>,
}

enum Acts<B: HsaOps> {
    Swa(AttnActs<B>, B::Buf, MlpActs<B>),
    Chunking,
    Retrieval(RetrievalActs<B>),
    Hsa(HsaActs<B>),
}

impl<B: HsaOps> Ctx<'_, B> {
    pub(super) fn chunks(&self) -> usize {
        self.t / self.c.chunk_size
    }
    fn topk(&self) -> usize {
        self.c.chunk_topk.min(self.chunks())
    }
    pub(super) fn fusion(&self) -> Fusion {
        if self.c.enable_softmax {
            Fusion::Softmax
        } else {
            Fusion::StickBreaking
        }
    }
    fn retrieval_shape(&self) -> RetrievalShape {
        RetrievalShape {
            len: self.t,
            row0: 0,
            chunks: self.chunks(),
            heads: self.sh.g,
            dim: self.c.retrieval_head_dim(),
            chunk: self.c.chunk_size,
            topk: self.topk(),
            mask_window: self.c.mask_slide_window.then_some(self.c.sliding_window),
        }
    }
    fn hsa_shape(&self) -> HsaShape {
        HsaShape {
            len: self.t,
            chunks: self.chunks(),
            n_q_heads: self.sh.hq,
            n_kv_heads: self.sh.g,
            head_dim: self.dh(),
            chunk: self.c.chunk_size,
            topk: self.topk(),
            softmax1: self.c.enable_softmax1,
        }
    }
    /// A norm that may be absent: its input, unchanged, as the "normed" value.
    pub(super) fn maybe_norm(
        &self,
        x: B::Buf,
        w: Option<usize>,
        rows: usize,
        dim: usize,
    ) -> Normed<B> {
        match w {
            Some(w) => self.norm(&x, w, HSA_NORM_EPS, rows, dim),
            None => Normed {
                y: x,
                rstd: self.b.zeros(0),
            },
        }
    }
    /// `dx += ` the gradient through `maybe_norm`.
    #[allow(clippy::too_many_arguments)]
    fn maybe_norm_back(
        &self,
        dy: &B::Buf,
        x: &B::Buf,
        n: &Normed<B>,
        w: Option<usize>,
        rows: usize,
        dim: usize,
        dx: &mut B::Buf,
        g: &mut ParamStore<B>,
    ) {
        match w {
            Some(w) => self.norm_back(dy, x, n, w, rows, dim, dx, g),
            None => self.b.add_assign(dx, dy),
        }
    }

    /// `enc`: the layout's chunk encoder (`Layout::encoder`), if any.
    pub(super) fn chunking_forward(
        &self,
        x: &B::Buf,
        l: &LayerIdx,
        enc: Option<&EncoderIdx>,
    ) -> Memory<B> {
        let LayerIdx::Chunking {
            norm,
            proj_k,
            proj_v,
            lmk_ln,
            k_norm,
        } = *l
        else {
            unreachable!()
        };
        let (b, t, d, dh, g) = (self.b, self.t, self.d(), self.dh(), self.sh.g);
        let front = self.front_forward(x, norm, enc);
        let lmk = linear(
            b,
            &front.lmk_in,
            self.w(lmk_ln),
            self.chunks(),
            self.sh.dr,
            d,
        );
        let km_raw = linear(b, &front.e, self.w(proj_k), t, g * dh, d);
        let km = self.maybe_norm(self.copy(&km_raw), k_norm, t * g, dh);
        let vm = linear(b, &front.e, self.w(proj_v), t, g * dh, d);
        Memory {
            front,
            lmk,
            km_raw,
            km,
            vm,
        }
    }

    /// The chunk memory of the whole chunks `x [t, d]` (the chunking layer's input rows, `t` a
    /// multiple of S), forward only: landmarks `[t/S, dr]`, K_m and V_m `[t, G, dh]`. The
    /// inference cache (infer.rs) appends these as chunks complete.
    pub(super) fn chunk_memory(
        &self,
        x: &B::Buf,
        l: &LayerIdx,
        enc: Option<&EncoderIdx>,
    ) -> [B::Buf; 3] {
        let m = self.chunking_forward(x, l, enc);
        [m.lmk, m.km.y, m.vm]
    }

    fn retrieval_forward(&self, x: &B::Buf, l: &LayerIdx, mem: &Memory<B>) -> RetrievalActs<B> {
        let LayerIdx::Retrieval {
            pre_norm,
            ln,
            lmk_norms,
            ..
        } = *l
        else {
            unreachable!()
        };
        let (b, t, d) = (self.b, self.t, self.d());
        let rs = self.retrieval_shape();
        let xn = self.norm(x, pre_norm, HSA_NORM_EPS, t, d);
        let q_raw = linear(b, &xn.y, self.w(ln), t, self.sh.dr, d);
        let (qn, kn) = (lmk_norms.map(|n| n.0), lmk_norms.map(|n| n.1));
        let q = self.maybe_norm(self.copy(&q_raw), qn, t * rs.heads, rs.dim);
        let lmk = self.maybe_norm(self.copy(&mem.lmk), kn, self.chunks() * rs.heads, rs.dim);
        let n = t * rs.heads * rs.topk;
        let (mut idx, mut scores, mut w) = (vec![0u32; n], b.zeros(n), b.zeros(n));
        b.retrieval_select(&q.y, &lmk.y, &rs, &mut idx, &mut scores);
        b.fusion_forward(&scores, t * rs.heads, rs.topk, self.fusion(), &mut w);
        RetrievalActs {
            xn,
            q_raw,
            q,
            lmk,
            idx,
            scores,
            w,
        }
    }

    fn hsa_forward(
        &self,
        x: &B::Buf,
        l: &LayerIdx,
        mem: &Memory<B>,
        r: &RetrievalActs<B>,
    ) -> (HsaActs<B>, B::Buf) {
        let LayerIdx::Hsa {
            swa,
            pre_norm,
            q_proj,
            o_proj,
            q_norm,
            mlp_norm,
            mlp,
            ..
        } = *l
        else {
            unreachable!()
        };
        let (b, t, d, dh) = (self.b, self.t, self.d(), self.dh());
        let hs = self.hsa_shape();
        let (swa_acts, x1) = match swa {
            Some((n, a)) => {
                let (acts, x1) =
                    self.attn_forward(x, n, HSA_NORM_EPS, &a, self.c.hsa_sliding_window);
                (Some(acts), x1)
            }
            None => (None, self.copy(x)),
        };
        let hw = hs.n_q_heads * dh;
        let xn = self.norm(&x1, pre_norm, HSA_NORM_EPS, t, d);
        let q_raw = linear(b, &xn.y, self.w(q_proj), t, hw, d);
        let q = self.maybe_norm(self.copy(&q_raw), q_norm, t * hs.n_q_heads, dh);
        let (mut o, mut lse) = (b.zeros(t * hw), b.zeros(t * hs.n_q_heads * hs.topk));
        let scale = 1.0 / (dh as f64).sqrt();
        b.hsa_forward(
            &q.y, &mem.km.y, &mem.vm, &r.idx, &r.w, &hs, scale, &mut o, &mut lse,
        );
        let mut z = self.copy(&x1);
        self.row_parallel(&mut z, &o, o_proj, t, d, hw);
        let base = if self.c.reset_hsa_residual { &z } else { &x1 };
        let (mlp_acts, out) = self.mlp_forward(&z, base, mlp_norm, HSA_NORM_EPS, &mlp);
        let acts = HsaActs {
            swa: swa_acts,
            x1,
            xn,
            q_raw,
            q,
            o,
            lse,
            z,
            mlp: mlp_acts,
        };
        (acts, out)
    }
}

/// Gradients of the chunk memory, summed over the groups that read it.
struct MemoryGrads<B: HsaOps> {
    lmk: B::Buf,
    km: B::Buf,
    vm: B::Buf,
}

impl<B: HsaOps> Ctx<'_, B> {
    /// `dx` holds ∂L/∂out on entry, ∂L/∂x on exit; `dw` receives ∂L/∂(fusion weights).
    #[allow(clippy::too_many_arguments)]
    fn hsa_backward(
        &self,
        x: &B::Buf,
        l: &LayerIdx,
        mem: &Memory<B>,
        r: &RetrievalActs<B>,
        a: &HsaActs<B>,
        dx: &mut B::Buf,
        dmem: &mut MemoryGrads<B>,
        dw: &mut B::Buf,
        g: &mut ParamStore<B>,
    ) {
        let LayerIdx::Hsa {
            swa,
            pre_norm,
            q_proj,
            o_proj,
            q_norm,
            mlp_norm,
            mlp,
            ..
        } = *l
        else {
            unreachable!()
        };
        let (b, t, d, dh) = (self.b, self.t, self.d(), self.dh());
        let hs = self.hsa_shape();
        // out = base + mlp(norm(z)), base = z (reset) or x1; z = x1 + o_proj(o).
        let mut dz = b.zeros(t * d);
        self.mlp_backward(&a.z, mlp_norm, &mlp, &a.mlp, dx, &mut dz, g);
        let reset = self.c.reset_hsa_residual;
        if reset {
            b.add_assign(&mut dz, dx);
        }
        let mut dx1 = self.copy(&dz);
        if !reset {
            b.add_assign(&mut dx1, dx);
        }
        let hw = hs.n_q_heads * dh;
        let mut d_o = b.zeros(t * hw);
        linear_back(
            b,
            &dz,
            &a.o,
            self.w(o_proj),
            &mut d_o,
            &mut g.bufs[o_proj],
            t,
            d,
            hw,
        );
        let mut dq = b.zeros(t * hw);
        let scale = 1.0 / (dh as f64).sqrt();
        b.hsa_backward(
            &a.q.y,
            &mem.km.y,
            &mem.vm,
            &r.idx,
            &r.w,
            &d_o,
            &a.lse,
            &hs,
            scale,
            &mut dq,
            &mut dmem.km,
            &mut dmem.vm,
            dw,
        );
        let mut dq_raw = b.zeros(t * hw);
        self.maybe_norm_back(
            &dq,
            &a.q_raw,
            &a.q,
            q_norm,
            t * hs.n_q_heads,
            dh,
            &mut dq_raw,
            g,
        );
        let mut dxn = b.zeros(t * d);
        linear_back(
            b,
            &dq_raw,
            &a.xn.y,
            self.w(q_proj),
            &mut dxn,
            &mut g.bufs[q_proj],
            t,
            hw,
            d,
        );
        self.norm_back_tp(&dxn, &a.x1, &a.xn, pre_norm, t, d, &mut dx1, g);
        if let (Some((n, at)), Some(sa)) = (swa, &a.swa) {
            self.attn_backward(x, n, &at, self.c.hsa_sliding_window, sa, &mut dx1, g);
        }
        b.copy(&dx1, 0, dx, 0, t * d);
    }

    /// `dx += ` the gradient through the retrieval query; `dmem.lmk += ` the landmarks'.
    #[allow(clippy::too_many_arguments)]
    fn retrieval_backward(
        &self,
        x: &B::Buf,
        l: &LayerIdx,
        mem: &Memory<B>,
        r: &RetrievalActs<B>,
        dw: &B::Buf,
        dx: &mut B::Buf,
        dmem: &mut MemoryGrads<B>,
        g: &mut ParamStore<B>,
    ) {
        let LayerIdx::Retrieval {
            pre_norm,
            ln,
            lmk_norms,
            ..
        } = *l
        else {
            unreachable!()
        };
        let (b, t, d, dr) = (self.b, self.t, self.d(), self.sh.dr);
        let rs = self.retrieval_shape();
        let rows = t * rs.heads;
        let mut ds = b.zeros(rows * rs.topk);
        b.fusion_backward(&r.scores, &r.w, dw, rows, rs.topk, self.fusion(), &mut ds);
        let (mut dq, mut dl) = (b.zeros(t * dr), b.zeros(self.chunks() * dr));
        b.retrieval_select_backward(
            &r.q.y, &r.lmk.y, &r.idx, &r.scores, &ds, &rs, &mut dq, &mut dl,
        );
        let (qn, kn) = (lmk_norms.map(|n| n.0), lmk_norms.map(|n| n.1));
        let lrows = self.chunks() * rs.heads;
        self.maybe_norm_back(&dl, &mem.lmk, &r.lmk, kn, lrows, rs.dim, &mut dmem.lmk, g);
        let mut dq_raw = b.zeros(t * dr);
        self.maybe_norm_back(&dq, &r.q_raw, &r.q, qn, rows, rs.dim, &mut dq_raw, g);
        let mut dxn = b.zeros(t * d);
        linear_back(
            b,
            &dq_raw,
            &r.xn.y,
            self.w(ln),
            &mut dxn,
            &mut g.bufs[ln],
            t,
            dr,
            d,
        );
        self.norm_back_tp(&dxn, x, &r.xn, pre_norm, t, d, dx, g);
    }

    /// `dx += ` the gradient through the chunk memory and landmarks.
    #[allow(clippy::too_many_arguments)]
    fn chunking_backward(
        &self,
        x: &B::Buf,
        l: &LayerIdx,
        enc: Option<&EncoderIdx>,
        mem: &Memory<B>,
        dmem: &MemoryGrads<B>,
        dx: &mut B::Buf,
        g: &mut ParamStore<B>,
    ) {
        let LayerIdx::Chunking {
            norm,
            proj_k,
            proj_v,
            lmk_ln,
            k_norm,
        } = *l
        else {
            unreachable!()
        };
        let (b, t, d, dh, gk) = (self.b, self.t, self.d(), self.dh(), self.sh.g);
        let (c, dr) = (self.chunks(), self.sh.dr);
        let mut dkm_raw = b.zeros(t * gk * dh);
        self.maybe_norm_back(
            &dmem.km,
            &mem.km_raw,
            &mem.km,
            k_norm,
            t * gk,
            dh,
            &mut dkm_raw,
            g,
        );
        let mut de = b.zeros(t * d);
        let e = &mem.front.e;
        linear_back(
            b,
            &dkm_raw,
            e,
            self.w(proj_k),
            &mut de,
            &mut g.bufs[proj_k],
            t,
            gk * dh,
            d,
        );
        linear_back(
            b,
            &dmem.vm,
            e,
            self.w(proj_v),
            &mut de,
            &mut g.bufs[proj_v],
            t,
            gk * dh,
            d,
        );
        let mut dlmk_in = b.zeros(c * d);
        let lw = self.w(lmk_ln);
        linear_back(
            b,
            &dmem.lmk,
            &mem.front.lmk_in,
            lw,
            &mut dlmk_in,
            &mut g.bufs[lmk_ln],
            c,
            dr,
            d,
        );
        if self.sh.tp() == 1 {
            self.front_backward(x, norm, enc, &mem.front, de, &dlmk_in, dx, g);
        } else {
            // The front (norm, or the replicated chunk encoder) is linear in its output
            // gradients, here partial per rank: its input gradient is summed over TP.
            let mut part = b.zeros(t * d);
            self.front_backward(x, norm, enc, &mem.front, de, &dlmk_in, &mut part, g);
            self.sum_into(part, dx);
        }
    }
}

/// One chunk's memory (`HsaModel::chunk_memory`).
pub struct ChunkMemory<B: HsaOps> {
    /// Chunk keys (after `k_rmsnorm` if any) and values `[S, G, dh]`.
    pub km: B::Buf,
    pub vm: B::Buf,
    /// The landmark `[G, dr/G]` as `lmk_ln` gives it (each retrieval layer applies its own
    /// `lmk_k_norm`, if any, when it scores).
    pub lmk: B::Buf,
}

/// What to do with the LM head's output.
pub enum Head<'a> {
    /// Cross-entropy against `targets` (negative = not counted), its gradient scaled by
    /// `grad_scale` when parameter gradients are requested. The pass returns Σ loss.
    Loss { targets: &'a [i32], grad_scale: f64 },
    /// Return the logits `[T, vocab]`.
    Logits,
}

impl<B: HsaOps> HsaModel<B> {
    /// One rank holding every parameter.
    pub fn new(cfg: HsaConfig, params: ParamStore<B>) -> Result<Self> {
        Self::new_shard(cfg, params, Shard::WHOLE)
    }

    /// TP rank `shard.rank` of `shard.size` over its shard of the parameters.
    pub fn new_shard(cfg: HsaConfig, params: ParamStore<B>, shard: Shard) -> Result<Self> {
        let shares = Shares::new(&cfg, shard)?;
        let layout = Layout::new(&cfg);
        let want: Vec<_> = layout.specs.iter().map(|s| s.sharded(shard)).collect();
        ensure!(
            params.specs == want,
            "HSA parameters do not have the layout of the config (TP shard {} of {})",
            shard.rank,
            shard.size
        );
        let rope = Rope::new(&cfg.base, RopePrecision::Exact)?;
        Ok(HsaModel {
            cfg,
            layout,
            rope,
            params,
            shares,
        })
    }

    /// The context of a one-rank pass over `t` rows at positions `pos0..` (inference, tp 1).
    pub(super) fn ctx<'a>(&'a self, b: &'a B, pos0: u64, t: usize) -> Ctx<'a, B> {
        self.ctx_tp(b, &OneRank, pos0, t)
    }

    /// The context of a pass over `t` rows at positions `pos0..` on this model's TP rank.
    fn ctx_tp<'a>(&'a self, b: &'a B, tp: &'a dyn TpGroup<B>, pos0: u64, t: usize) -> Ctx<'a, B> {
        let positions: Vec<u64> = (pos0..pos0 + t as u64).collect();
        let (cos, sin) = self.rope.cos_sin::<f64>(&positions);
        Ctx {
            b,
            c: &self.cfg,
            p: &self.params,
            t,
            cos: b.upload_f64(&cos),
            sin: b.upload_f64(&sin),
            sh: self.shares,
            tp,
        }
    }

    /// A model with weights from N(0, initializer_range²) and norms 1.
    pub fn init_random(b: &B, cfg: HsaConfig, seed: u64) -> Result<Self> {
        let params = Layout::new(&cfg).init_random(b, cfg.initializer_range, seed);
        Self::new(cfg, params)
    }

    /// The chunk memory of ONE chunk from its `chunk_size` rows of X `[S, d]` (the chunking
    /// layer's input: the residual stream after the lower layers), as an incremental decoder
    /// appends it when a chunk completes. The chunking layer (norm + mean landmark, or the chunk
    /// encoder) sees each chunk alone, so this equals that chunk's rows of a whole-sequence pass.
    pub fn chunk_memory(&self, b: &B, x: &B::Buf) -> Result<ChunkMemory<B>> {
        let (s, d) = (self.cfg.chunk_size, self.cfg.base.hidden_size);
        ensure!(
            b.len(x) == s * d,
            "HSA chunk memory: {} values given, expected one chunk of {s} rows × {d}",
            b.len(x)
        );
        let l = self
            .layout
            .layers
            .iter()
            .find(|l| matches!(l, LayerIdx::Chunking { .. }))
            .expect("every HSA layout has a chunking layer");
        let ctx = Ctx {
            b,
            c: &self.cfg,
            p: &self.params,
            t: s,
            // The chunking layer reads no absolute positions.
            cos: b.zeros(0),
            sin: b.zeros(0),
            sh: self.shares,
            tp: &OneRank,
        };
        let [lmk, km, vm] = ctx.chunk_memory(x, l, self.layout.encoder.as_ref());
        Ok(ChunkMemory { km, vm, lmk })
    }

    /// Forward over `ids` at positions `pos0..`, then (with `Head::Loss` and `grads`) the
    /// backward pass, accumulating into `grads`. Returns (Σ loss or 0, logits for
    /// `Head::Logits`).
    pub fn forward_backward(
        &self,
        b: &B,
        ids: &[u32],
        pos0: u64,
        head: Head<'_>,
        grads: Option<&mut ParamStore<B>>,
    ) -> Result<(f64, Vec<f64>)> {
        self.forward_backward_tp(b, &SelfComm::default(), ids, pos0, head, grads)
    }

    /// `forward_backward` on TP rank `self.shares.shard` of the group `tp` (every rank of the
    /// group passes the same `ids` and targets): the loss and logits are the whole model's,
    /// equal on every rank; `grads` receives this rank's shard (replicated tensors' gradients
    /// partial, to be summed over TP as `train::optim::all_reduce_grads` does).
    pub fn forward_backward_tp<C: Comm>(
        &self,
        b: &B,
        tp: &C,
        ids: &[u32],
        pos0: u64,
        head: Head<'_>,
        grads: Option<&mut ParamStore<B>>,
    ) -> Result<(f64, Vec<f64>)> {
        let sh = self.shares;
        ensure!(
            tp.size() == sh.tp() && tp.rank() == sh.shard.rank,
            "HSA: the model holds TP shard {} of {}, the pass runs on rank {} of {}",
            sh.shard.rank,
            sh.tp(),
            tp.rank(),
            tp.size()
        );
        let c = &self.cfg;
        let (t, d, vocab) = (ids.len(), c.base.hidden_size, c.base.vocab_size);
        ensure!(
            t > 0 && t.is_multiple_of(c.chunk_size),
            "HSA: the sequence length {t} must be a positive multiple of chunk_size {}",
            c.chunk_size
        );
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            anyhow::bail!("HSA: token id {bad} is outside the vocabulary of {vocab}");
        }
        let x = self.ctx_tp(b, tp, pos0, t);
        let lay = &self.layout;
        let eps = c.base.rms_norm_eps;
        let tpn = sh.tp();
        // Vocabulary-parallel embedding: this rank's rows; the others' ids look up zeros.
        let local_ids: Vec<u32> = if tpn == 1 {
            ids.to_vec()
        } else {
            ids.iter()
                .map(|&i| match (i as usize).checked_sub(sh.vocab0) {
                    Some(j) if j < sh.vocab => j as u32,
                    _ => NOT_IN_SHARD,
                })
                .collect()
        };

        // ---- forward: xs[i] is the input of layer i.
        let mut xs = vec![b.zeros(t * d)];
        b.embedding_forward(&self.params.bufs[lay.embed], &local_ids, d, &mut xs[0]);
        if tpn > 1 {
            x.tp.sum(b, &mut xs[0]);
        }
        let mut acts: Vec<Acts<B>> = Vec::new();
        let mut mem: Option<Memory<B>> = None;
        for (i, l) in lay.layers.iter().enumerate() {
            let xin = &xs[i];
            let (a, out) = match *l {
                LayerIdx::Swa {
                    in_norm,
                    attn,
                    post_norm,
                    mlp,
                } => {
                    let (aa, mid) = x.attn_forward(xin, in_norm, eps, &attn, c.sliding_window);
                    let (ma, out) = x.mlp_forward(&mid, &mid, post_norm, eps, &mlp);
                    (Acts::Swa(aa, mid, ma), out)
                }
                LayerIdx::Chunking { .. } => {
                    mem = Some(x.chunking_forward(xin, l, lay.encoder.as_ref()));
                    (Acts::Chunking, x.copy(xin))
                }
                LayerIdx::Retrieval { .. } => {
                    let m = mem.as_ref().expect("chunking precedes retrieval");
                    (Acts::Retrieval(x.retrieval_forward(xin, l, m)), x.copy(xin))
                }
                LayerIdx::Hsa { .. } => {
                    let m = mem.as_ref().expect("chunking precedes HSA");
                    let Some(Acts::Retrieval(r)) = acts.last() else {
                        unreachable!("a retrieval layer precedes each HSA block")
                    };
                    let (h, out) = x.hsa_forward(xin, l, m, r);
                    (Acts::Hsa(h), out)
                }
            };
            acts.push(a);
            xs.push(out);
        }
        let xl = &xs[lay.layers.len()];
        let xf = x.norm(xl, lay.norm_f, c.layer_norm_epsilon, t, d);
        // This rank's vocabulary rows of the logits `[t, vocab/tp]`.
        let lv = sh.vocab;
        let mut logits = linear(b, &xf.y, &self.params.bufs[lay.lm_head], t, lv, d);
        let (targets, grad_scale) = match head {
            Head::Logits => return Ok((0.0, full_vocab_logits(b, tp, &logits, t, lv))),
            Head::Loss {
                targets,
                grad_scale,
            } => (targets, grad_scale),
        };
        ensure!(
            targets.len() == t,
            "HSA: {} targets for {t} tokens",
            targets.len()
        );
        let (loss, mx, sm, targets) = if tpn == 1 {
            // One rank holds the whole vocabulary: the row statistics are the final ones.
            let stats = b.cross_entropy_stats(&logits, targets, vocab);
            let loss: f64 = stats
                .iter()
                .filter_map(|s| s.target.map(|z| s.sum.ln() + s.max - z))
                .sum();
            let (mx, sm): (Vec<f64>, Vec<f64>) = stats.iter().map(|s| (s.max, s.sum)).unzip();
            (loss, mx, sm, targets.to_vec())
        } else {
            // Shard-local targets; each row's statistics combined over the TP group.
            let tl: Vec<i32> = targets
                .iter()
                .map(|&z| {
                    if z < 0 {
                        TARGET_IGNORE
                    } else {
                        match (z as usize).checked_sub(sh.vocab0) {
                            Some(j) if j < lv => j as i32,
                            _ => TARGET_ELSEWHERE,
                        }
                    }
                })
                .collect();
            let stats = b.cross_entropy_stats(&logits, &tl, lv);
            let (mx, sm, rows) = combine_ce_stats(&gather_ce_stats(tp, &stats), t);
            (rows.iter().flatten().sum(), mx, sm, tl)
        };
        let Some(g) = grads else {
            return Ok((loss, Vec::new()));
        };
        b.cross_entropy_grad(&mut logits, &targets, lv, &mx, &sm, grad_scale);

        // ---- backward: `dx` is ∂L/∂(output of the layer being undone).
        let mut dxf = b.zeros(t * d);
        let lm = lay.lm_head;
        linear_back(
            b,
            &logits,
            &xf.y,
            &self.params.bufs[lm],
            &mut dxf,
            &mut g.bufs[lm],
            t,
            lv,
            d,
        );
        let mut dx = b.zeros(t * d);
        x.norm_back_tp(&dxf, xl, &xf, lay.norm_f, t, d, &mut dx, g);
        let m = mem.as_ref().expect("the chunking layer ran");
        let n_mem = t * sh.g * c.head_dim();
        let mut dmem = MemoryGrads {
            lmk: b.zeros(x.chunks() * sh.dr),
            km: b.zeros(n_mem),
            vm: b.zeros(n_mem),
        };
        let mut dws: Vec<Option<B::Buf>> = (0..c.num_upper_groups).map(|_| None).collect();
        for (i, l) in lay.layers.iter().enumerate().rev() {
            let xin = &xs[i];
            match (l, &acts[i]) {
                (
                    LayerIdx::Swa {
                        in_norm,
                        attn,
                        post_norm,
                        mlp,
                    },
                    Acts::Swa(aa, mid, ma),
                ) => {
                    let mut dmid = x.copy(&dx);
                    x.mlp_backward(mid, *post_norm, mlp, ma, &dx, &mut dmid, g);
                    x.attn_backward(xin, *in_norm, attn, c.sliding_window, aa, &mut dmid, g);
                    dx = dmid;
                }
                (LayerIdx::Hsa { group, .. }, Acts::Hsa(h)) => {
                    let Acts::Retrieval(r) = &acts[i - 1] else {
                        unreachable!()
                    };
                    let mut dw = b.zeros(b.len(&r.w));
                    x.hsa_backward(xin, l, m, r, h, &mut dx, &mut dmem, &mut dw, g);
                    dws[*group] = Some(dw);
                }
                (LayerIdx::Retrieval { group, .. }, Acts::Retrieval(r)) => {
                    let dw = dws[*group].take().expect("the HSA block's backward ran");
                    x.retrieval_backward(xin, l, m, r, &dw, &mut dx, &mut dmem, g);
                }
                (LayerIdx::Chunking { .. }, Acts::Chunking) => {
                    x.chunking_backward(xin, l, lay.encoder.as_ref(), m, &dmem, &mut dx, g);
                }
                _ => unreachable!("layer and activations out of step"),
            }
        }
        b.embedding_backward(&mut g.bufs[lay.embed], &local_ids, d, &dx);
        Ok((loss, Vec::new()))
    }
}

/// The whole vocabulary's logits `[t, vocab]` from each TP rank's rows `local [t, lv]`.
fn full_vocab_logits<B: HsaOps, C: Comm>(
    b: &B,
    tp: &C,
    local: &B::Buf,
    t: usize,
    lv: usize,
) -> Vec<f64> {
    let mine = b.download_f64(local);
    if tp.size() == 1 {
        return mine;
    }
    let mut all = vec![0f64; mine.len() * tp.size()];
    tp.all_gather(&mine, &mut all);
    let mut out = Vec::with_capacity(all.len());
    for r in 0..t {
        for part in all.chunks(t * lv) {
            out.extend_from_slice(&part[r * lv..][..lv]);
        }
    }
    out
}
