//! The Llama decoder: explicit forward and backward of one layer side by side (no autograd, as
//! llm.c), the whole-model pass over one sequence, and the chunked LM head + cross-entropy.
//!
//! One training pass over a sequence of `T` tokens:
//!   embed → L × [RMSNorm → q,k,v → RoPE → causal GQA attention → o (+res) → RMSNorm →
//!   gate,up → SwiGLU → down (+res)] → RMSNorm → LM head + CE in chunks of tokens
//! and back. Layer inputs are always kept (`Workspace::xs`); the rest of a layer's activations are
//! kept for every layer, or — with full recompute — for one layer at a time, recomputed from its
//! input during the backward pass. All buffers are allocated once, in `Workspace::new`.

use crate::backend::{AttnShape, Backend};
use crate::model::config::ModelConfig;
use crate::model::params::{
    EMBED, LayerTensor as LT, ParamStore, final_norm_index, layer_index, lm_head_index,
};
use crate::model::rope::Rope;

/// Sizes of one pass, taken from the config.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub t: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_q: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub layers: usize,
    pub eps: f64,
}

impl Dims {
    pub fn new(cfg: &ModelConfig, t: usize) -> Self {
        Dims {
            t,
            hidden: cfg.hidden_size,
            ffn: cfg.intermediate_size,
            n_q: cfg.num_attention_heads,
            n_kv: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            vocab: cfg.vocab_size,
            layers: cfg.num_hidden_layers,
            eps: cfg.rms_norm_eps,
        }
    }
    fn q_width(&self) -> usize {
        self.n_q * self.head_dim
    }
    fn kv_width(&self) -> usize {
        self.n_kv * self.head_dim
    }
}

/// Everything one layer's backward pass needs from its forward pass.
pub struct LayerActs<B: Backend> {
    xn1: B::Buf,
    rstd1: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    lse: B::Buf,
    x_mid: B::Buf,
    xn2: B::Buf,
    rstd2: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    h: B::Buf,
}

impl<B: Backend> LayerActs<B> {
    fn new(b: &B, d: &Dims) -> Self {
        let (t, h) = (d.t, d.hidden);
        LayerActs {
            xn1: b.zeros(t * h),
            rstd1: b.zeros(t),
            q: b.zeros(t * d.q_width()),
            k: b.zeros(t * d.kv_width()),
            v: b.zeros(t * d.kv_width()),
            attn: b.zeros(t * d.q_width()),
            lse: b.zeros(d.n_q * t),
            x_mid: b.zeros(t * h),
            xn2: b.zeros(t * h),
            rstd2: b.zeros(t),
            gate: b.zeros(t * d.ffn),
            up: b.zeros(t * d.ffn),
            h: b.zeros(t * d.ffn),
        }
    }
}

/// Gradient scratch shared by all layers in the backward pass.
struct GradScratch<B: Backend> {
    dx: B::Buf,
    dxn: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    dattn: B::Buf,
    dgate: B::Buf,
    dup: B::Buf,
    dh: B::Buf,
}

/// All activation memory of one pass over `t` tokens, allocated once per run.
pub struct Workspace<B: Backend> {
    pub dims: Dims,
    pub recompute: bool,
    /// Layer inputs `xs[l]` (and `xs[L]`, the input of the final norm).
    xs: Vec<B::Buf>,
    /// One set per layer, or a single set reused by every layer under full recompute.
    acts: Vec<LayerActs<B>>,
    xf: B::Buf,
    rstd_f: B::Buf,
    logits: B::Buf,
    pub ce_chunk: usize,
    cos: B::Buf,
    sin: B::Buf,
    /// Position of the first token the cos/sin tables were built for.
    rope_pos0: Option<u64>,
    grads: GradScratch<B>,
}

impl<B: Backend> Workspace<B> {
    /// `ce_chunk`: tokens per LM-head/cross-entropy chunk (at most `ce_chunk × vocab` logits live).
    pub fn new(b: &B, cfg: &ModelConfig, t: usize, recompute: bool, ce_chunk: usize) -> Self {
        let d = Dims::new(cfg, t);
        let n_sets = if recompute { 1 } else { d.layers };
        let ce_chunk = ce_chunk.clamp(1, t.max(1));
        Workspace {
            dims: d,
            recompute,
            xs: (0..=d.layers).map(|_| b.zeros(t * d.hidden)).collect(),
            acts: (0..n_sets).map(|_| LayerActs::new(b, &d)).collect(),
            xf: b.zeros(t * d.hidden),
            rstd_f: b.zeros(t),
            logits: b.zeros(ce_chunk * d.vocab),
            ce_chunk,
            cos: b.zeros(t * d.head_dim / 2),
            sin: b.zeros(t * d.head_dim / 2),
            rope_pos0: None,
            grads: GradScratch {
                dx: b.zeros(t * d.hidden),
                dxn: b.zeros(t * d.hidden),
                dq: b.zeros(t * d.q_width()),
                dk: b.zeros(t * d.kv_width()),
                dv: b.zeros(t * d.kv_width()),
                dattn: b.zeros(t * d.q_width()),
                dgate: b.zeros(t * d.ffn),
                dup: b.zeros(t * d.ffn),
                dh: b.zeros(t * d.ffn),
            },
        }
    }

    fn act_set(&self, layer: usize) -> usize {
        if self.recompute { 0 } else { layer }
    }
}

fn attn_shape(d: &Dims, pos0: i64) -> AttnShape {
    AttnShape {
        q_len: d.t,
        kv_len: d.t,
        n_q_heads: d.n_q,
        n_kv_heads: d.n_kv,
        head_dim: d.head_dim,
        q_pos0: pos0,
        k_pos0: pos0,
        causal: true,
    }
}

/// `y [rows, out] = x [rows, in] · Wᵀ` for an HF weight `W [out, in]`.
fn linear<B: Backend>(
    b: &B,
    y: &mut B::Buf,
    x: &B::Buf,
    w: &B::Buf,
    rows: usize,
    out: usize,
    inp: usize,
    acc: bool,
) {
    b.gemm(y, 0, x, 0, w, 0, rows, out, inp, false, true, acc);
}

/// Backward of `linear`: `dx (+)= dy · W`, `dW += dyᵀ · x`.
#[allow(clippy::too_many_arguments)]
fn linear_backward<B: Backend>(
    b: &B,
    dy: &B::Buf,
    x: &B::Buf,
    w: &B::Buf,
    dx: &mut B::Buf,
    dw: &mut B::Buf,
    rows: usize,
    out: usize,
    inp: usize,
    acc_dx: bool,
) {
    b.gemm(dx, 0, dy, 0, w, 0, rows, inp, out, false, false, acc_dx);
    b.gemm(dw, 0, dy, 0, x, 0, out, inp, rows, true, false, true);
}

/// One decoder layer forward: `x_out = layer(x_in)`, filling `a`.
fn layer_forward<B: Backend>(
    b: &B,
    d: &Dims,
    p: &ParamStore<B>,
    l: usize,
    x_in: &B::Buf,
    a: &mut LayerActs<B>,
    x_out: &mut B::Buf,
    cos: &B::Buf,
    sin: &B::Buf,
    pos0: i64,
) {
    let w = |t: LT| &p.bufs[layer_index(l, t)];
    let (t, h) = (d.t, d.hidden);
    b.rmsnorm_forward(x_in, w(LT::AttnNorm), d.eps, t, h, &mut a.xn1, &mut a.rstd1);
    linear(b, &mut a.q, &a.xn1, w(LT::Q), t, d.q_width(), h, false);
    linear(b, &mut a.k, &a.xn1, w(LT::K), t, d.kv_width(), h, false);
    linear(b, &mut a.v, &a.xn1, w(LT::V), t, d.kv_width(), h, false);
    b.rope_forward(&mut a.q, cos, sin, t, d.n_q, d.head_dim);
    b.rope_forward(&mut a.k, cos, sin, t, d.n_kv, d.head_dim);
    let scale = 1.0 / (d.head_dim as f64).sqrt();
    b.attention_forward(
        &a.q,
        &a.k,
        &a.v,
        &attn_shape(d, pos0),
        scale,
        &mut a.attn,
        &mut a.lse,
    );
    b.copy(x_in, 0, &mut a.x_mid, 0, t * h);
    linear(b, &mut a.x_mid, &a.attn, w(LT::O), t, h, d.q_width(), true);
    b.rmsnorm_forward(
        &a.x_mid,
        w(LT::MlpNorm),
        d.eps,
        t,
        h,
        &mut a.xn2,
        &mut a.rstd2,
    );
    linear(b, &mut a.gate, &a.xn2, w(LT::Gate), t, d.ffn, h, false);
    linear(b, &mut a.up, &a.xn2, w(LT::Up), t, d.ffn, h, false);
    b.swiglu_forward(&a.gate, &a.up, &mut a.h);
    b.copy(&a.x_mid, 0, x_out, 0, t * h);
    linear(b, x_out, &a.h, w(LT::Down), t, h, d.ffn, true);
}

/// One decoder layer backward. On entry `g.dx` holds ∂L/∂x_out, on exit ∂L/∂x_in; parameter
/// gradients are accumulated into `grads`.
#[allow(clippy::too_many_arguments)]
fn layer_backward<B: Backend>(
    b: &B,
    d: &Dims,
    p: &ParamStore<B>,
    grads: &mut ParamStore<B>,
    l: usize,
    x_in: &B::Buf,
    a: &LayerActs<B>,
    g: &mut GradScratch<B>,
    cos: &B::Buf,
    sin: &B::Buf,
    pos0: i64,
) {
    let w = |t: LT| &p.bufs[layer_index(l, t)];
    let gi = |t: LT| layer_index(l, t);
    let (t, h) = (d.t, d.hidden);
    // MLP: x_out = x_mid + down(swiglu(gate(xn2), up(xn2))).
    b.gemm(
        &mut g.dh,
        0,
        &g.dx,
        0,
        w(LT::Down),
        0,
        t,
        d.ffn,
        h,
        false,
        false,
        false,
    );
    b.gemm(
        &mut grads.bufs[gi(LT::Down)],
        0,
        &g.dx,
        0,
        &a.h,
        0,
        h,
        d.ffn,
        t,
        true,
        false,
        true,
    );
    b.swiglu_backward(&a.gate, &a.up, &g.dh, &mut g.dgate, &mut g.dup);
    linear_backward(
        b,
        &g.dgate,
        &a.xn2,
        w(LT::Gate),
        &mut g.dxn,
        &mut grads.bufs[gi(LT::Gate)],
        t,
        d.ffn,
        h,
        false,
    );
    linear_backward(
        b,
        &g.dup,
        &a.xn2,
        w(LT::Up),
        &mut g.dxn,
        &mut grads.bufs[gi(LT::Up)],
        t,
        d.ffn,
        h,
        true,
    );
    b.rmsnorm_backward(
        &g.dxn,
        &a.x_mid,
        w(LT::MlpNorm),
        &a.rstd2,
        t,
        h,
        &mut g.dx,
        &mut grads.bufs[gi(LT::MlpNorm)],
    );
    // Attention: x_mid = x_in + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))).
    linear_backward(
        b,
        &g.dx,
        &a.attn,
        w(LT::O),
        &mut g.dattn,
        &mut grads.bufs[gi(LT::O)],
        t,
        h,
        d.q_width(),
        false,
    );
    let scale = 1.0 / (d.head_dim as f64).sqrt();
    b.attention_backward(
        &a.q,
        &a.k,
        &a.v,
        &a.attn,
        &g.dattn,
        &a.lse,
        &attn_shape(d, pos0),
        scale,
        &mut g.dq,
        &mut g.dk,
        &mut g.dv,
    );
    b.rope_backward(&mut g.dq, cos, sin, t, d.n_q, d.head_dim);
    b.rope_backward(&mut g.dk, cos, sin, t, d.n_kv, d.head_dim);
    linear_backward(
        b,
        &g.dq,
        &a.xn1,
        w(LT::Q),
        &mut g.dxn,
        &mut grads.bufs[gi(LT::Q)],
        t,
        d.q_width(),
        h,
        false,
    );
    linear_backward(
        b,
        &g.dk,
        &a.xn1,
        w(LT::K),
        &mut g.dxn,
        &mut grads.bufs[gi(LT::K)],
        t,
        d.kv_width(),
        h,
        true,
    );
    linear_backward(
        b,
        &g.dv,
        &a.xn1,
        w(LT::V),
        &mut g.dxn,
        &mut grads.bufs[gi(LT::V)],
        t,
        d.kv_width(),
        h,
        true,
    );
    b.rmsnorm_backward(
        &g.dxn,
        x_in,
        w(LT::AttnNorm),
        &a.rstd1,
        t,
        h,
        &mut g.dx,
        &mut grads.bufs[gi(LT::AttnNorm)],
    );
}

/// What to do with the logits of each chunk of the LM head.
pub enum Head<'a> {
    /// Cross-entropy against `targets` (negative = not counted); the gradient of
    /// `grad_scale × Σ loss` is back-propagated when parameter gradients are requested.
    Loss { targets: &'a [i32], grad_scale: f64 },
    /// Copy the logits `[T, vocab]` out to the host (for `forward --out`); no loss.
    Logits(&'a mut Vec<f32>),
}

/// A Llama model over backend `B`: config, RoPE tables generator, parameters.
pub struct Llama<B: Backend> {
    pub cfg: ModelConfig,
    pub rope: Rope,
    pub params: ParamStore<B>,
}

impl<B: Backend> Llama<B> {
    /// Fill the workspace's cos/sin tables for tokens at positions `pos0 .. pos0 + T`.
    fn load_rope_tables(&self, b: &B, ws: &mut Workspace<B>, pos0: u64) {
        if ws.rope_pos0 == Some(pos0) {
            return;
        }
        ws.rope_pos0 = Some(pos0);
        let positions: Vec<u64> = (0..ws.dims.t as u64).map(|i| pos0 + i).collect();
        let (cos, sin) = self.rope.cos_sin::<f64>(&positions);
        ws.cos = b.upload_f64(&cos);
        ws.sin = b.upload_f64(&sin);
    }

    /// Forward over one sequence `ids` at positions `pos0..`, then (if `grads` is given and the
    /// head is `Loss`) the backward pass, accumulating into `grads`. Returns Σ loss over counted
    /// targets (0 for `Head::Logits`).
    pub fn forward_backward(
        &self,
        b: &B,
        ws: &mut Workspace<B>,
        ids: &[u32],
        pos0: u64,
        mut head: Head<'_>,
        mut grads: Option<&mut ParamStore<B>>,
    ) -> f64 {
        let d = ws.dims;
        assert_eq!(
            ids.len(),
            d.t,
            "forward_backward: {} ids for a workspace of {} tokens",
            ids.len(),
            d.t
        );
        let p = &self.params;
        let pos = pos0 as i64;
        self.load_rope_tables(b, ws, pos0);

        b.embedding_forward(&p.bufs[EMBED], ids, d.hidden, &mut ws.xs[0]);
        for l in 0..d.layers {
            let set = ws.act_set(l);
            let (before, after) = ws.xs.split_at_mut(l + 1);
            layer_forward(
                b,
                &d,
                p,
                l,
                &before[l],
                &mut ws.acts[set],
                &mut after[0],
                &ws.cos,
                &ws.sin,
                pos,
            );
        }
        let fnorm = final_norm_index(&self.cfg);
        b.rmsnorm_forward(
            &ws.xs[d.layers],
            &p.bufs[fnorm],
            d.eps,
            d.t,
            d.hidden,
            &mut ws.xf,
            &mut ws.rstd_f,
        );

        // LM head + cross-entropy, `ce_chunk` tokens at a time; the chunk's logits buffer is
        // turned into its gradient in place and consumed before the next chunk.
        let backward = grads.is_some() && matches!(head, Head::Loss { .. });
        let lm = lm_head_index(&self.cfg);
        if backward {
            b.fill_zero(&mut ws.grads.dxn);
        }
        let mut loss_sum = 0.0;
        let c = ws.ce_chunk;
        for r0 in (0..d.t).step_by(c) {
            let rows = c.min(d.t - r0);
            b.gemm(
                &mut ws.logits,
                0,
                &ws.xf,
                r0 * d.hidden,
                &p.bufs[lm],
                0,
                rows,
                d.vocab,
                d.hidden,
                false,
                true,
                false,
            );
            match &mut head {
                Head::Logits(out) => {
                    let chunk = b.download(&ws.logits);
                    out.extend_from_slice(&chunk[..rows * d.vocab]);
                }
                Head::Loss {
                    targets,
                    grad_scale,
                } => {
                    if rows < c {
                        // The last chunk is short: shrink the logits view by computing into a
                        // zero-target tail (ignored rows contribute neither loss nor gradient).
                        let mut tg: Vec<i32> = targets[r0..r0 + rows].to_vec();
                        tg.resize(c, -1);
                        loss_sum +=
                            b.cross_entropy_chunk(&mut ws.logits, &tg, d.vocab, *grad_scale);
                    } else {
                        loss_sum += b.cross_entropy_chunk(
                            &mut ws.logits,
                            &targets[r0..r0 + rows],
                            d.vocab,
                            *grad_scale,
                        );
                    }
                    if let Some(g) = grads.as_deref_mut() {
                        // dxf[rows] = dlogits · W_lm ; dW_lm += dlogitsᵀ · xf[rows]
                        b.gemm(
                            &mut ws.grads.dxn,
                            r0 * d.hidden,
                            &ws.logits,
                            0,
                            &p.bufs[lm],
                            0,
                            rows,
                            d.hidden,
                            d.vocab,
                            false,
                            false,
                            false,
                        );
                        b.gemm(
                            &mut g.bufs[lm],
                            0,
                            &ws.logits,
                            0,
                            &ws.xf,
                            r0 * d.hidden,
                            d.vocab,
                            d.hidden,
                            rows,
                            true,
                            false,
                            true,
                        );
                    }
                }
            }
        }
        let Some(g) = grads else { return loss_sum };
        if !backward {
            return loss_sum;
        }

        b.fill_zero(&mut ws.grads.dx);
        b.rmsnorm_backward(
            &ws.grads.dxn,
            &ws.xs[d.layers],
            &p.bufs[fnorm],
            &ws.rstd_f,
            d.t,
            d.hidden,
            &mut ws.grads.dx,
            &mut g.bufs[fnorm],
        );
        for l in (0..d.layers).rev() {
            let set = ws.act_set(l);
            if ws.recompute && l + 1 != d.layers {
                // Full recompute: rebuild this layer's activations from its saved input.
                let mut scratch_out = std::mem::replace(&mut ws.grads.dxn, b.zeros(0));
                layer_forward(
                    b,
                    &d,
                    p,
                    l,
                    &ws.xs[l],
                    &mut ws.acts[set],
                    &mut scratch_out,
                    &ws.cos,
                    &ws.sin,
                    pos,
                );
                ws.grads.dxn = scratch_out;
            }
            layer_backward(
                b,
                &d,
                p,
                g,
                l,
                &ws.xs[l],
                &ws.acts[set],
                &mut ws.grads,
                &ws.cos,
                &ws.sin,
                pos,
            );
        }
        b.embedding_backward(&mut g.bufs[EMBED], ids, d.hidden, &ws.grads.dx);
        loss_sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::util::gradcheck::{numeric_grad, rel_err};

    /// A tiny Llama with YaRN scaling (attention factor ≠ 1) and GQA 2.
    fn tiny_config(tied: bool) -> ModelConfig {
        let text = format!(
            r#"{{"vocab_size": 24, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 256, "tie_word_embeddings": {tied}, "initializer_range": 0.3,
            "rope_scaling": {{"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
            "beta_fast": 4.0, "beta_slow": 1.0}}}}"#
        );
        ModelConfig::from_json_str(&text, "tiny").unwrap()
    }

    fn tiny_model<B: Backend>(b: &B, tied: bool) -> Llama<B> {
        let cfg = tiny_config(tied);
        let mut params = ParamStore::init_random(b, &cfg, 11);
        // Norm weights away from 1 so their gradients are exercised.
        for (s, buf) in params.specs.iter().zip(params.bufs.iter_mut()) {
            if s.is_norm {
                let v: Vec<f64> = crate::util::gradcheck::test_values(s.numel(), 5)
                    .iter()
                    .map(|x| 1.0 + 0.3 * x)
                    .collect();
                *buf = b.upload_f64(&v);
            }
        }
        Llama::new(cfg, crate::model::rope::RopePrecision::Exact, params).unwrap()
    }

    const IDS: [u32; 7] = [3, 17, 5, 5, 22, 0, 9];
    const TARGETS: [i32; 7] = [17, 5, 5, 22, 0, 9, -1];

    fn loss_and_grads<B: Backend>(
        b: &B,
        m: &Llama<B>,
        recompute: bool,
        chunk: usize,
        pos0: u64,
    ) -> (f64, Vec<Vec<f64>>) {
        let mut ws = Workspace::new(b, &m.cfg, IDS.len(), recompute, chunk);
        let mut g = ParamStore::zeros(b, &m.cfg);
        let loss = m.forward_backward(
            b,
            &mut ws,
            &IDS,
            pos0,
            Head::Loss {
                targets: &TARGETS,
                grad_scale: 1.0 / 6.0,
            },
            Some(&mut g),
        );
        (
            loss / 6.0,
            g.bufs.iter().map(|x| b.download_f64(x)).collect(),
        )
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn whole_model_gradient_matches_finite_differences() {
        let b = CpuBackend::<f64>::new();
        for tied in [false, true] {
            let mut worst = (0.0f64, String::new());
            let mut model = tiny_model(&b, tied);
            let (_, grads) = loss_and_grads(&b, &model, true, 3, 40);
            for i in 0..model.params.bufs.len() {
                let x0 = b.download_f64(&model.params.bufs[i]);
                let mut f = |x: &[f64]| {
                    model.params.bufs[i] = b.upload_f64(x);
                    let mut ws = Workspace::new(&b, &model.cfg, IDS.len(), false, 7);
                    let l = model.forward_backward(
                        &b,
                        &mut ws,
                        &IDS,
                        40,
                        Head::Loss {
                            targets: &TARGETS,
                            grad_scale: 1.0,
                        },
                        None,
                    );
                    l / 6.0
                };
                let num = numeric_grad(&mut f, &x0, 1e-5);
                model.params.bufs[i] = b.upload_f64(&x0);
                let e = rel_err(&grads[i], &num);
                assert!(
                    e < 1e-6,
                    "tied={tied} {}: relative error {e:e}",
                    model.params.specs[i].name
                );
                if e > worst.0 {
                    worst = (e, model.params.specs[i].name.clone());
                }
            }
            eprintln!(
                "whole-model gradient check (tied={tied}): worst relative error {:.2e} in {}",
                worst.0, worst.1
            );
        }
    }

    #[test]
    fn chunked_cross_entropy_equals_one_chunk() {
        let b = CpuBackend::<f64>::new();
        let model = tiny_model(&b, false);
        let (l_full, g_full) = loss_and_grads(&b, &model, false, 7, 0);
        for chunk in [1, 2, 3, 5] {
            let (l, g) = loss_and_grads(&b, &model, false, chunk, 0);
            assert!(
                (l - l_full).abs() < 1e-13,
                "chunk {chunk}: loss {l} vs {l_full}"
            );
            for (a, f) in g.iter().zip(&g_full) {
                assert!(rel_err(a, f) < 1e-12, "chunk {chunk}");
            }
        }
    }

    #[test]
    fn full_recompute_is_bitwise_equal_to_stored_activations() {
        let b = CpuBackend::<f32>::new();
        let model = tiny_model(&b, false);
        let (l0, g0) = loss_and_grads(&b, &model, false, 4, 3);
        let (l1, g1) = loss_and_grads(&b, &model, true, 4, 3);
        assert_eq!(l0, l1);
        assert_eq!(g0, g1);
    }

    #[test]
    fn loss_of_uniform_logits_is_log_vocab() {
        // Zero LM head: every logit is 0, so the loss is exactly ln(vocab).
        let b = CpuBackend::<f64>::new();
        let mut model = tiny_model(&b, false);
        let lm = lm_head_index(&model.cfg);
        b.fill_zero(&mut model.params.bufs[lm]);
        let (l, _) = loss_and_grads(&b, &model, false, 7, 0);
        assert!((l - (24f64).ln()).abs() < 1e-12);
    }
}
