//! The chunking layer's front (HSA.md §2.1, the authors' `ChunkingLayer._encode` and
//! model/encoder.py): what turns the residual stream X `[T, d]` into the chunk outputs E `[T, d]`
//! (read by `proj_k`/`proj_v`) and the landmark input `[C, d]` (read by `lmk_ln`), forward and
//! explicit backward over all C chunks at once.
//!
//! - `encoder_layers = 0`: E = norm(X) (eps 1e-6), landmark input = the mean of each chunk's E.
//! - `encoder_layers > 0`: the chunk encoder. Each chunk's S rows, with the learned `cls_emb`
//!   appended as row S under `enable_enc_cls`, go (through `enc_prenorm` if set) into Qwen2
//!   blocks: pre-norm, q/k/v with bias and o without, per-head RMSNorm on q and k, RoPE θ = 1e4
//!   (no scaling) on the positions 0..L inside the chunk, bidirectional attention over the
//!   chunk's L = S (+1) rows with `num_key_value_heads` KV heads, then a SwiGLU MLP of width
//!   ⌊8d/3/64⌋·64; all their norms have eps 1e-6 (`LlamaConfig`'s default, not the model's
//!   `rms_norm_eps`), and `encoder.norm` closes. E = the outputs at the S token rows; the landmark
//!   input is the CLS row's output, or without CLS the mean of E. There is no chunking `norm`.
//!
//! The chunks are independent, so one chunk alone (`HsaModel::chunk_memory`) gives the same rows
//! as a whole-sequence pass. Rows of the encoder are chunk-major: row `c·L + i`.

use crate::model::config::RopeScaling;
use crate::model::hsa::config::HSA_NORM_EPS;
use crate::model::hsa::ctx::{Ctx, Normed, linear, linear_back};
use crate::model::hsa::ops::{BlockAttnShape, HsaOps};
use crate::model::hsa::params::{EncLayerIdx, EncoderIdx};
use crate::model::params::ParamStore;
use crate::model::rope::{Rope, RopePrecision};

/// Their encoder's norms (`Qwen2RMSNorm` built with `LlamaConfig`'s default `rms_norm_eps`).
pub const ENCODER_NORM_EPS: f64 = 1e-6;
/// Their encoder's RoPE base (`LlamaConfig`'s default `rope_theta`; no scaling).
pub const ENCODER_ROPE_THETA: f64 = 1e4;

/// E `[T, d]` and the landmark input `[C, d]`, with what the backward pass needs.
pub(super) struct Front<B: HsaOps> {
    pub(super) e: B::Buf,
    pub(super) lmk_in: B::Buf,
    acts: FrontActs<B>,
}

enum FrontActs<B: HsaOps> {
    /// E = norm(X).
    Mean(Normed<B>),
    Encoder(EncoderActs<B>),
}

struct EncoderActs<B: HsaOps> {
    /// Rows per chunk: S, or S + 1 with the CLS row.
    len: usize,
    /// The encoder input (X with the CLS rows) before `enc_prenorm`, and that norm.
    input: B::Buf,
    pre: Option<Normed<B>>,
    /// `xs[j]` is the input of block j; `xs[layers]` the input of `encoder.norm`.
    xs: Vec<B::Buf>,
    layers: Vec<LayerActs<B>>,
    out: Normed<B>,
    cos: B::Buf,
    sin: B::Buf,
    /// A column of ones `[rows]`: the bias add as a rank-1 GEMM.
    ones: B::Buf,
}

struct LayerActs<B: HsaOps> {
    xn: Normed<B>,
    q_raw: B::Buf,
    k_raw: B::Buf,
    qn: Normed<B>,
    kn: Normed<B>,
    v: B::Buf,
    attn: B::Buf,
    lse: B::Buf,
    /// `x + o_proj(attn)`: the MLP's residual and input.
    mid: B::Buf,
    mn: Normed<B>,
    gate: B::Buf,
    up: B::Buf,
    act: B::Buf,
}

/// Row maps of the CLS join and split, as gathers (`embedding_forward`) whose transposes are
/// the deterministic scatter-adds of `embedding_backward`.
struct ClsRows {
    /// Encoder row `c·(S+1) + i` ← X row `c·S + i`, and row `c·(S+1) + S` ← `cls_emb` (row T of
    /// the table `[X; cls_emb]`).
    join: Vec<u32>,
    /// E row `c·S + i` ← encoder row `c·(S+1) + i`.
    body: Vec<u32>,
    /// Landmark input row c ← encoder row `c·(S+1) + S`.
    last: Vec<u32>,
}

impl ClsRows {
    fn new(chunks: usize, s: usize) -> ClsRows {
        let l = s + 1;
        let t = (chunks * s) as u32;
        let join = (0..chunks * l)
            .map(|r| {
                let (c, i) = (r / l, r % l);
                if i == s { t } else { (c * s + i) as u32 }
            })
            .collect();
        let body = (0..chunks * s)
            .map(|r| ((r / s) * l + r % s) as u32)
            .collect();
        let last = (0..chunks).map(|c| (c * l + s) as u32).collect();
        ClsRows { join, body, last }
    }
}

impl<B: HsaOps> Ctx<'_, B> {
    fn attn_shape(&self, len: usize) -> BlockAttnShape {
        BlockAttnShape {
            blocks: self.chunks(),
            block_len: len,
            n_q_heads: self.c.base.num_attention_heads,
            n_kv_heads: self.c.base.num_key_value_heads,
            head_dim: self.dh(),
        }
    }

    /// `y [rows, out] = x · Wᵀ + bias`.
    #[allow(clippy::too_many_arguments)]
    fn biased(
        &self,
        x: &B::Buf,
        w: usize,
        bias: usize,
        ones: &B::Buf,
        rows: usize,
        out: usize,
        inp: usize,
    ) -> B::Buf {
        let mut y = linear(self.b, x, self.w(w), rows, out, inp);
        self.b.gemm(
            &mut y,
            0,
            ones,
            0,
            self.w(bias),
            0,
            rows,
            out,
            1,
            false,
            false,
            true,
        );
        y
    }

    /// Backward of `biased`: `dx +=`, `dW +=`, `dbias += Σ_rows dy`.
    #[allow(clippy::too_many_arguments)]
    fn biased_back(
        &self,
        dy: &B::Buf,
        x: &B::Buf,
        w: usize,
        bias: usize,
        ones: &B::Buf,
        dx: &mut B::Buf,
        g: &mut ParamStore<B>,
        rows: usize,
        out: usize,
        inp: usize,
    ) {
        let b = self.b;
        linear_back(b, dy, x, self.w(w), dx, &mut g.bufs[w], rows, out, inp);
        b.gemm(
            &mut g.bufs[bias],
            0,
            ones,
            0,
            dy,
            0,
            1,
            out,
            rows,
            true,
            false,
            true,
        );
    }

    /// E and the landmark input from X. `norm` is the chunking norm (mean landmark), `enc` the
    /// encoder; exactly one of them is present (`Layout::new`).
    pub(super) fn front_forward(
        &self,
        x: &B::Buf,
        norm: Option<usize>,
        enc: Option<&EncoderIdx>,
    ) -> Front<B> {
        let (b, t, d, s) = (self.b, self.t, self.d(), self.c.chunk_size);
        let chunks = self.chunks();
        let enc = match (norm, enc) {
            (Some(w), None) => {
                let e = self.norm(x, w, HSA_NORM_EPS, t, d);
                let mut lmk_in = b.zeros(chunks * d);
                b.chunk_mean_forward(&e.y, t, d, s, &mut lmk_in);
                return Front {
                    e: self.copy(&e.y),
                    lmk_in,
                    acts: FrontActs::Mean(e),
                };
            }
            (None, Some(enc)) => enc,
            _ => unreachable!("the chunking layer has a norm or an encoder, not both"),
        };
        let len = s + usize::from(enc.cls.is_some());
        let rows = chunks * len;
        let cls_rows = enc.cls.map(|_| ClsRows::new(chunks, s));
        let input = match (enc.cls, &cls_rows) {
            (Some(cls), Some(r)) => {
                let mut table = b.zeros((t + 1) * d);
                b.copy(x, 0, &mut table, 0, t * d);
                b.copy(self.w(cls), 0, &mut table, t * d, d);
                let mut input = b.zeros(rows * d);
                b.embedding_forward(&table, &r.join, d, &mut input);
                input
            }
            _ => self.copy(x),
        };
        let pre = enc
            .prenorm
            .map(|w| self.norm(&input, w, HSA_NORM_EPS, rows, d));
        let mut xs = vec![self.copy(pre.as_ref().map_or(&input, |p| &p.y))];
        let (cos, sin) = self.encoder_rope(len);
        let ones = b.upload_f64(&vec![1.0; rows]);
        let mut layers = Vec::with_capacity(enc.layers.len());
        for li in &enc.layers {
            let (a, out) = self.enc_layer_forward(&xs[xs.len() - 1], li, len, &cos, &sin, &ones);
            layers.push(a);
            xs.push(out);
        }
        let out = self.norm(&xs[xs.len() - 1], enc.norm, ENCODER_NORM_EPS, rows, d);
        let (e, lmk_in) = match &cls_rows {
            Some(r) => {
                let (mut e, mut lmk_in) = (b.zeros(t * d), b.zeros(chunks * d));
                b.embedding_forward(&out.y, &r.body, d, &mut e);
                b.embedding_forward(&out.y, &r.last, d, &mut lmk_in);
                (e, lmk_in)
            }
            None => {
                let mut lmk_in = b.zeros(chunks * d);
                b.chunk_mean_forward(&out.y, t, d, s, &mut lmk_in);
                (self.copy(&out.y), lmk_in)
            }
        };
        Front {
            e,
            lmk_in,
            acts: FrontActs::Encoder(EncoderActs {
                len,
                input,
                pre,
                xs,
                layers,
                out,
                cos,
                sin,
                ones,
            }),
        }
    }

    /// `dx += ` ∂L/∂X given ∂L/∂E = `de` and ∂L/∂(landmark input) = `dlmk_in`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn front_backward(
        &self,
        x: &B::Buf,
        norm: Option<usize>,
        enc: Option<&EncoderIdx>,
        f: &Front<B>,
        de: B::Buf,
        dlmk_in: &B::Buf,
        dx: &mut B::Buf,
        g: &mut ParamStore<B>,
    ) {
        let (b, t, d, s) = (self.b, self.t, self.d(), self.c.chunk_size);
        let a = match (&f.acts, norm, enc) {
            (FrontActs::Mean(e), Some(w), None) => {
                let mut de = de;
                b.chunk_mean_backward(dlmk_in, t, d, s, &mut de);
                self.norm_back(&de, x, e, w, t, d, dx, g);
                return;
            }
            (FrontActs::Encoder(a), None, Some(enc)) => (a, enc),
            _ => unreachable!("front activations out of step with the layout"),
        };
        let (a, enc) = a;
        let rows = self.chunks() * a.len;
        let cls_rows = enc.cls.map(|_| ClsRows::new(self.chunks(), s));
        let dout = match &cls_rows {
            Some(r) => {
                let mut dout = b.zeros(rows * d);
                b.embedding_backward(&mut dout, &r.body, d, &de);
                b.embedding_backward(&mut dout, &r.last, d, dlmk_in);
                dout
            }
            None => {
                let mut dout = de;
                b.chunk_mean_backward(dlmk_in, t, d, s, &mut dout);
                dout
            }
        };
        let mut dh = b.zeros(rows * d);
        let last = &a.xs[a.layers.len()];
        self.norm_back(&dout, last, &a.out, enc.norm, rows, d, &mut dh, g);
        for (j, li) in enc.layers.iter().enumerate().rev() {
            self.enc_layer_backward(&a.xs[j], li, &a.layers[j], a, &mut dh, g);
        }
        let dinput = match (enc.prenorm, &a.pre) {
            (Some(w), Some(p)) => {
                let mut di = b.zeros(rows * d);
                self.norm_back(&dh, &a.input, p, w, rows, d, &mut di, g);
                di
            }
            _ => dh,
        };
        match (enc.cls, &cls_rows) {
            (Some(cls), Some(r)) => {
                let mut dtable = b.zeros((t + 1) * d);
                b.embedding_backward(&mut dtable, &r.join, d, &dinput);
                b.add_at(dx, 0, &dtable, 0, t * d);
                b.add_at(&mut g.bufs[cls], 0, &dtable, t * d, d);
            }
            _ => b.add_assign(dx, &dinput),
        }
    }

    /// cos/sin `[C·len, dh/2]` of the positions 0..len inside each chunk.
    fn encoder_rope(&self, len: usize) -> (B::Buf, B::Buf) {
        let mut rc = self.c.base.clone();
        rc.rope_theta = ENCODER_ROPE_THETA;
        rc.rope_scaling = RopeScaling::Default;
        let rope = Rope::new(&rc, RopePrecision::Exact)
            .expect("head_dim was checked by the model's own RoPE (HsaModel::new)");
        let positions: Vec<u64> = (0..self.chunks() * len).map(|r| (r % len) as u64).collect();
        let (cos, sin) = rope.cos_sin::<f64>(&positions);
        (self.b.upload_f64(&cos), self.b.upload_f64(&sin))
    }

    /// One Qwen2 block over the encoder rows: `mid = x + o(attn(norm x))`, `out = mid +
    /// mlp(norm mid)`.
    fn enc_layer_forward(
        &self,
        x: &B::Buf,
        li: &EncLayerIdx,
        len: usize,
        cos: &B::Buf,
        sin: &B::Buf,
        ones: &B::Buf,
    ) -> (LayerActs<B>, B::Buf) {
        let (b, d, dh) = (self.b, self.d(), self.dh());
        let sh = self.attn_shape(len);
        let (hq, hk, n) = (sh.n_q_heads, sh.n_kv_heads, sh.blocks * len);
        let f = self.c.encoder_intermediate_size();
        let at = &li.attn;
        let xn = self.norm(x, li.in_norm, ENCODER_NORM_EPS, n, d);
        let q_raw = self.biased(&xn.y, at.q, li.q_bias, ones, n, hq * dh, d);
        let k_raw = self.biased(&xn.y, at.k, li.k_bias, ones, n, hk * dh, d);
        let v = self.biased(&xn.y, at.v, li.v_bias, ones, n, hk * dh, d);
        let mut qn = self.norm(&q_raw, at.q_norm, ENCODER_NORM_EPS, n * hq, dh);
        let mut kn = self.norm(&k_raw, at.k_norm, ENCODER_NORM_EPS, n * hk, dh);
        b.rope_forward(&mut qn.y, cos, sin, n, hq, dh);
        b.rope_forward(&mut kn.y, cos, sin, n, hk, dh);
        let (mut attn, mut lse) = (b.zeros(n * hq * dh), b.zeros(hq * n));
        let scale = 1.0 / (dh as f64).sqrt();
        b.block_attention_forward(&qn.y, &kn.y, &v, &sh, scale, &mut attn, &mut lse);
        let mut mid = self.copy(x);
        b.gemm(
            &mut mid,
            0,
            &attn,
            0,
            self.w(at.o),
            0,
            n,
            d,
            hq * dh,
            false,
            true,
            true,
        );
        let mn = self.norm(&mid, li.post_norm, ENCODER_NORM_EPS, n, d);
        let gate = linear(b, &mn.y, self.w(li.mlp.gate), n, f, d);
        let up = linear(b, &mn.y, self.w(li.mlp.up), n, f, d);
        let mut act = b.zeros(n * f);
        b.swiglu_forward(&gate, &up, &mut act);
        let mut out = self.copy(&mid);
        b.gemm(
            &mut out,
            0,
            &act,
            0,
            self.w(li.mlp.down),
            0,
            n,
            d,
            f,
            false,
            true,
            true,
        );
        let acts = LayerActs {
            xn,
            q_raw,
            k_raw,
            qn,
            kn,
            v,
            attn,
            lse,
            mid,
            mn,
            gate,
            up,
            act,
        };
        (acts, out)
    }

    /// `dio` holds ∂L/∂out on entry and ∂L/∂x on exit.
    fn enc_layer_backward(
        &self,
        x: &B::Buf,
        li: &EncLayerIdx,
        a: &LayerActs<B>,
        e: &EncoderActs<B>,
        dio: &mut B::Buf,
        g: &mut ParamStore<B>,
    ) {
        let (b, d, dh) = (self.b, self.d(), self.dh());
        let sh = self.attn_shape(e.len);
        let (hq, hk, n) = (sh.n_q_heads, sh.n_kv_heads, sh.blocks * e.len);
        let f = self.c.encoder_intermediate_size();
        let (at, m) = (&li.attn, &li.mlp);
        // MLP: out = mid + down(silu(gate(mn)) · up(mn)), mn = norm(mid).
        let mut dmid = self.copy(dio);
        let mut dact = b.zeros(n * f);
        linear_back(
            b,
            dio,
            &a.act,
            self.w(m.down),
            &mut dact,
            &mut g.bufs[m.down],
            n,
            d,
            f,
        );
        let (mut dgate, mut dup) = (b.zeros(n * f), b.zeros(n * f));
        b.swiglu_backward(&a.gate, &a.up, &dact, &mut dgate, &mut dup);
        let mut dmn = b.zeros(n * d);
        linear_back(
            b,
            &dgate,
            &a.mn.y,
            self.w(m.gate),
            &mut dmn,
            &mut g.bufs[m.gate],
            n,
            f,
            d,
        );
        linear_back(
            b,
            &dup,
            &a.mn.y,
            self.w(m.up),
            &mut dmn,
            &mut g.bufs[m.up],
            n,
            f,
            d,
        );
        self.norm_back(&dmn, &a.mid, &a.mn, li.post_norm, n, d, &mut dmid, g);
        // Attention: mid = x + o(attn).
        let mut dattn = b.zeros(n * hq * dh);
        linear_back(
            b,
            &dmid,
            &a.attn,
            self.w(at.o),
            &mut dattn,
            &mut g.bufs[at.o],
            n,
            d,
            hq * dh,
        );
        let (mut dq, mut dk, mut dv) = (
            b.zeros(n * hq * dh),
            b.zeros(n * hk * dh),
            b.zeros(n * hk * dh),
        );
        let scale = 1.0 / (dh as f64).sqrt();
        b.block_attention_backward(
            &a.qn.y, &a.kn.y, &a.v, &a.attn, &dattn, &a.lse, &sh, scale, &mut dq, &mut dk, &mut dv,
        );
        b.rope_backward(&mut dq, &e.cos, &e.sin, n, hq, dh);
        b.rope_backward(&mut dk, &e.cos, &e.sin, n, hk, dh);
        let (mut dq_raw, mut dk_raw) = (b.zeros(n * hq * dh), b.zeros(n * hk * dh));
        self.norm_back(&dq, &a.q_raw, &a.qn, at.q_norm, n * hq, dh, &mut dq_raw, g);
        self.norm_back(&dk, &a.k_raw, &a.kn, at.k_norm, n * hk, dh, &mut dk_raw, g);
        let mut dxn = b.zeros(n * d);
        let xn = &a.xn.y;
        let ones = &e.ones;
        self.biased_back(
            &dq_raw,
            xn,
            at.q,
            li.q_bias,
            ones,
            &mut dxn,
            g,
            n,
            hq * dh,
            d,
        );
        self.biased_back(
            &dk_raw,
            xn,
            at.k,
            li.k_bias,
            ones,
            &mut dxn,
            g,
            n,
            hk * dh,
            d,
        );
        self.biased_back(&dv, xn, at.v, li.v_bias, ones, &mut dxn, g, n, hk * dh, d);
        self.norm_back(&dxn, x, &a.xn, li.in_norm, n, d, &mut dmid, g);
        *dio = dmid;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::backend::Backend;
    use crate::backend::cpu::CpuBackend;
    use crate::model::hsa::config::HsaConfig;
    use crate::model::hsa::model::HsaModel;
    use crate::model::hsa::params::LayerIdx;
    use crate::util::gradcheck::test_values;

    fn model(extra: serde_json::Value) -> (CpuBackend<f64>, HsaModel<CpuBackend<f64>>) {
        let mut c = json!({
            "architectures": ["DRTForCausalLM"], "model_type": "llama",
            "vocab_size": 16, "hidden_size": 24, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_kv_heads": 2, "intermediate_size": 24,
            "rms_norm_eps": 1e-5, "initializer_range": 0.3,
            "num_lower_layers": 1, "num_upper_layers": 1, "num_upper_groups": 1,
            "sliding_window": 3, "chunk_size": 4, "chunk_topk": 2, "retrieval_dim": 8,
            "encoder_layers": 2, "max_position_embeddings": 64, "rope_theta": 500.0,
            "enable_qk_norm": true
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        let cfg = HsaConfig::from_json_str(&c.to_string(), "t").unwrap();
        let b = CpuBackend::<f64>::new();
        let m = HsaModel::init_random(&b, cfg, 11).unwrap();
        (b, m)
    }

    /// `chunk_memory` of each chunk alone equals that chunk's rows of a whole-sequence pass
    /// (what an incremental decoder relies on), with and without the CLS row and prenorm.
    #[test]
    fn one_chunk_memory_equals_its_rows_of_the_whole_pass() {
        for extra in [
            json!({}),
            json!({"enable_enc_cls": false, "enc_prenorm": true}),
            json!({"encoder_layers": 0}),
        ] {
            let (b, m) = model(extra.clone());
            let (c, s, d) = (3, m.cfg.chunk_size, m.cfg.base.hidden_size);
            let t = c * s;
            let xh = test_values(t * d, 5);
            let x = b.upload_f64(&xh);
            let ctx = Ctx {
                b: &b,
                c: &m.cfg,
                p: &m.params,
                t,
                cos: b.zeros(0),
                sin: b.zeros(0),
                sh: m.shares,
                tp: &crate::model::hsa::ctx::OneRank,
            };
            let l = m
                .layout
                .layers
                .iter()
                .find(|l| matches!(l, LayerIdx::Chunking { .. }))
                .unwrap();
            let whole = ctx.chunking_forward(&x, l, m.layout.encoder.as_ref());
            let (km, vm, lmk) = (&whole.km.y, &whole.vm, &whole.lmk);
            let (g, dh, dr) = (m.cfg.num_kv_heads, m.cfg.head_dim(), m.cfg.retrieval_dim);
            for ci in 0..c {
                let one = m
                    .chunk_memory(&b, &b.upload_f64(&x[ci * s * d..(ci + 1) * s * d]))
                    .unwrap();
                let row = s * g * dh;
                let close = |a: &[f64], b: &[f64]| {
                    a.iter()
                        .zip(b)
                        .all(|(x, y)| (x - y).abs() <= 1e-13 * (1.0 + y.abs()))
                };
                assert!(
                    close(&one.km, &km[ci * row..(ci + 1) * row]),
                    "{extra} km {ci}"
                );
                assert!(
                    close(&one.vm, &vm[ci * row..(ci + 1) * row]),
                    "{extra} vm {ci}"
                );
                assert!(
                    close(&one.lmk, &lmk[ci * dr..(ci + 1) * dr]),
                    "{extra} lmk {ci}"
                );
            }
            // The chunks differ (a memory that ignored its input would pass the above).
            assert!(lmk[..dr] != lmk[dr..2 * dr]);
        }
    }
}
