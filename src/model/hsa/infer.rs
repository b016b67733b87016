//! Incremental inference for the HSA model: `HsaSession` feeds a sequence a block of tokens at a
//! time (a prompt, then one token per step) and keeps what later tokens read, so a step costs
//! O(W + chunks) per layer instead of a forward over the whole sequence.
//!
//! Caches (docs/HSA.md §2; one sequence, one rank):
//!   - per SWA attention (each SWA layer, and each HSA block's SWA sub-block unless `hsa_only`):
//!     the keys (after QK-norm and RoPE at absolute positions) and values of the last W positions
//!     (`sliding_window`, or `hsa_sliding_window` for the sub-blocks), `[rows, Hkv, dh]`;
//!   - the chunk memory: K_m, V_m (after `k_rmsnorm`) `[chunks·S, G, dh]` and, per group, the
//!     landmarks as its retrieval layer scores them (after `lmk_k_norm`) `[chunks, G, dr/G]`.
//!     Only complete chunks are in memory: when the S-th row of a chunk has passed the lower
//!     layers, the chunking layer (`Ctx::chunk_memory`, the model's own code) turns the chunk's
//!     rows into its memory and landmark, appended; until then the rows wait in `pending`.
//!
//! A block of n new rows at sequence indices p0.. runs every layer's forward on those rows only:
//! SWA attends over the cached keys followed by the block's own (`SwaShape::cached`); the chunking
//! layer first appends every chunk the block completes; retrieval scores the memory's landmarks
//! with the causal chunk mask at the rows' own indices (`RetrievalShape::row0`), so a chunk
//! completed inside the block is visible only to the rows after it, as in the full forward. The
//! HSA attention reads the memory through the selected indices. The logits therefore equal the
//! full forward's (`HsaModel::forward_backward`, `Head::Logits`) row by row, for any split of the
//! sequence into blocks and any length (tests/hsa_infer.rs).
//!
//! The memory buffers are reallocated at each chunk completion (O(memory) per chunk, the order of
//! one token's retrieval scoring over all chunks); the SWA caches are rewritten per block.

use anyhow::{Result, bail, ensure};

use crate::model::hsa::config::HSA_NORM_EPS;
use crate::model::hsa::ctx::{Ctx, linear};
use crate::model::hsa::model::HsaModel;
use crate::model::hsa::ops::{HsaOps, HsaShape, RetrievalShape, SwaShape};
use crate::model::hsa::params::{AttnIdx, LayerIdx};

/// Keys and values of one SWA attention's last `rows` positions, `[rows, Hkv, dh]`.
struct SwaCache<B: HsaOps> {
    k: B::Buf,
    v: B::Buf,
    rows: usize,
}

/// The chunk memory of the complete chunks, and the chunking layer's input rows of the chunk
/// being filled.
struct ChunkMemory<B: HsaOps> {
    chunks: usize,
    /// K_m and V_m `[chunks·S, G, dh]`.
    km: B::Buf,
    vm: B::Buf,
    /// Per group g: the landmarks its retrieval layer scores, `[chunks, G, dr/G]`.
    lmk: Vec<B::Buf>,
    /// `[pending_rows, d]`, `pending_rows < S`.
    pending: B::Buf,
    pending_rows: usize,
}

/// One sequence's decoding state over an `HsaModel`: feed tokens with `prefill` / `extend` /
/// `step`, or let `generate` pick them.
pub struct HsaSession<'a, B: HsaOps> {
    b: &'a B,
    model: &'a HsaModel<B>,
    /// Per layer of `model.layout.layers`: the SWA cache of a SWA layer or of an HSA block's SWA
    /// sub-block; None for the others.
    swa: Vec<Option<SwaCache<B>>>,
    mem: ChunkMemory<B>,
    /// Tokens fed so far: the sequence index of the next one.
    pos: usize,
}

/// `[a; b]` along rows of `width` elements (`a` may be empty).
fn cat<B: HsaOps>(
    b: &B,
    a: &B::Buf,
    a_rows: usize,
    x: &B::Buf,
    x_rows: usize,
    width: usize,
) -> B::Buf {
    let mut y = b.zeros((a_rows + x_rows) * width);
    b.copy(a, 0, &mut y, 0, a_rows * width);
    b.copy(x, 0, &mut y, a_rows * width, x_rows * width);
    y
}

/// Rows `from .. from + n` of `x [.., width]`.
fn rows<B: HsaOps>(b: &B, x: &B::Buf, from: usize, n: usize, width: usize) -> B::Buf {
    let mut y = b.zeros(n * width);
    b.copy(x, from * width, &mut y, 0, n * width);
    y
}

impl<'a, B: HsaOps> HsaSession<'a, B> {
    /// An empty session (no token fed yet).
    pub fn new(b: &'a B, model: &'a HsaModel<B>) -> Result<Self> {
        let c = &model.cfg;
        // With the window mask, chunk c is visible from t = c·S + W on; with W < S that is before
        // its last row (the full forward then reads tokens after t), which a decoder that has
        // only seen tokens up to t cannot reproduce.
        ensure!(
            !c.mask_slide_window || c.sliding_window >= c.chunk_size,
            "HSA inference: mask_slide_window with sliding_window {} < chunk_size {} lets a token \
             retrieve a chunk that ends after it; incremental decoding needs sliding_window >= \
             chunk_size",
            c.sliding_window,
            c.chunk_size
        );
        let swa = model
            .layout
            .layers
            .iter()
            .map(|l| match l {
                LayerIdx::Swa { .. } | LayerIdx::Hsa { swa: Some(_), .. } => Some(SwaCache {
                    k: b.zeros(0),
                    v: b.zeros(0),
                    rows: 0,
                }),
                _ => None,
            })
            .collect();
        Ok(HsaSession {
            b,
            model,
            swa,
            mem: ChunkMemory {
                chunks: 0,
                km: b.zeros(0),
                vm: b.zeros(0),
                lmk: (0..c.num_upper_groups).map(|_| b.zeros(0)).collect(),
                pending: b.zeros(0),
                pending_rows: 0,
            },
            pos: 0,
        })
    }

    /// Tokens fed so far (the sequence index of the next token).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Complete chunks in the memory (`position() / chunk_size`).
    pub fn chunks(&self) -> usize {
        self.mem.chunks
    }

    /// Feed `ids` (the prompt, or more tokens after earlier ones); returns the logits of the last
    /// one, `[vocab]`. The LM head runs on that row only.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f64>> {
        let x = self.forward_rows(ids)?;
        let last = rows(
            self.b,
            &x,
            ids.len() - 1,
            1,
            self.model.cfg.base.hidden_size,
        );
        Ok(self.logits(&last, 1))
    }

    /// Feed `ids`; returns the logits of every one of them, `[ids.len(), vocab]` (teacher-forced
    /// evaluation).
    pub fn extend(&mut self, ids: &[u32]) -> Result<Vec<f64>> {
        let x = self.forward_rows(ids)?;
        Ok(self.logits(&x, ids.len()))
    }

    /// Feed one token; returns its logits `[vocab]`.
    pub fn step(&mut self, id: u32) -> Result<Vec<f64>> {
        self.prefill(&[id])
    }

    /// `norm_f` and the LM head on `x [n, d]` (the last layer's output rows).
    fn logits(&self, x: &B::Buf, n: usize) -> Vec<f64> {
        let (m, b) = (self.model, self.b);
        let c = &m.cfg;
        let (d, vocab) = (c.base.hidden_size, c.base.vocab_size);
        let ctx = m.ctx(b, self.pos as u64, 0);
        let xf = ctx.norm(x, m.layout.norm_f, c.layer_norm_epsilon, n, d);
        let logits = linear(b, &xf.y, &m.params.bufs[m.layout.lm_head], n, vocab, d);
        b.download_f64(&logits)
    }

    /// Run `ids` through every layer, updating the caches; the last layer's output `[n, d]`.
    fn forward_rows(&mut self, ids: &[u32]) -> Result<B::Buf> {
        let (m, b) = (self.model, self.b);
        let c = &m.cfg;
        let (n, d, vocab) = (ids.len(), c.base.hidden_size, c.base.vocab_size);
        ensure!(n > 0, "HSA inference: no tokens to feed");
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            bail!("HSA inference: token id {bad} is outside the vocabulary of {vocab}");
        }
        let ctx = m.ctx(b, self.pos as u64, n);
        let eps = c.base.rms_norm_eps;
        let mut x = b.zeros(n * d);
        b.embedding_forward(&m.params.bufs[m.layout.embed], ids, d, &mut x);
        // The selection and fusion weights of the last retrieval layer, read by its HSA block.
        let mut sel: Option<(Vec<u32>, B::Buf, usize)> = None;
        for (i, l) in m.layout.layers.iter().enumerate() {
            x = match *l {
                LayerIdx::Swa {
                    in_norm,
                    attn,
                    post_norm,
                    mlp,
                } => {
                    let cache = self.swa[i].as_mut().expect("a SWA layer has a cache");
                    let mid = attend(&ctx, &x, in_norm, eps, &attn, c.sliding_window, cache);
                    ctx.mlp_forward(&mid, &mid, post_norm, eps, &mlp).1
                }
                LayerIdx::Chunking { .. } => {
                    self.append_chunks(&x, n, l);
                    x
                }
                LayerIdx::Retrieval { .. } => {
                    sel = Some(self.retrieve(&ctx, &x, l));
                    x
                }
                LayerIdx::Hsa { .. } => {
                    let (idx, w, topk) = sel
                        .take()
                        .expect("a retrieval layer precedes each HSA block");
                    self.hsa_block(&ctx, i, &x, l, &idx, &w, topk)
                }
            };
        }
        self.pos += n;
        Ok(x)
    }

    /// The chunking layer: the rows `x [n, d]` join the pending ones; every chunk they complete
    /// goes through `Ctx::chunk_memory` into the memory.
    fn append_chunks(&mut self, x: &B::Buf, n: usize, l: &LayerIdx) {
        let (m, b) = (self.model, self.b);
        let c = &m.cfg;
        let (d, s, g) = (c.base.hidden_size, c.chunk_size, c.num_kv_heads);
        let mw = g * c.head_dim();
        let mem = &mut self.mem;
        let all = cat(b, &mem.pending, mem.pending_rows, x, n, d);
        let total = mem.pending_rows + n;
        let k = total / s;
        if k > 0 {
            let full = rows(b, &all, 0, k * s, d);
            let [lmk, km, vm] =
                m.ctx(b, 0, k * s)
                    .chunk_memory(&full, l, m.layout.encoder.as_ref());
            let old = mem.chunks * s;
            mem.km = cat(b, &mem.km, old, &km, k * s, mw);
            mem.vm = cat(b, &mem.vm, old, &vm, k * s, mw);
            let (dr, rh) = (c.retrieval_dim, c.retrieval_head_dim());
            let ctx = m.ctx(b, 0, 0);
            for r in &m.layout.layers {
                if let LayerIdx::Retrieval {
                    group, lmk_norms, ..
                } = *r
                {
                    let kn = lmk_norms.map(|n| n.1);
                    let new = ctx.maybe_norm(rows(b, &lmk, 0, k, dr), kn, k * g, rh).y;
                    mem.lmk[group] = cat(b, &mem.lmk[group], mem.chunks, &new, k, dr);
                }
            }
            mem.chunks += k;
        }
        mem.pending_rows = total - k * s;
        mem.pending = rows(b, &all, k * s, mem.pending_rows, d);
    }

    /// A retrieval layer on the rows `x`: the selected chunks, the fusion weights `[n, G, K]` and
    /// K = min(chunk_topk, chunks in memory).
    fn retrieve(&self, ctx: &Ctx<'_, B>, x: &B::Buf, l: &LayerIdx) -> (Vec<u32>, B::Buf, usize) {
        let LayerIdx::Retrieval {
            group,
            pre_norm,
            ln,
            lmk_norms,
        } = *l
        else {
            unreachable!()
        };
        let (m, b) = (self.model, self.b);
        let c = &m.cfg;
        let n = b.len(x) / c.base.hidden_size;
        let (d, dr, g) = (c.base.hidden_size, c.retrieval_dim, c.num_kv_heads);
        let rs = RetrievalShape {
            len: n,
            row0: self.pos,
            chunks: self.mem.chunks,
            heads: g,
            dim: c.retrieval_head_dim(),
            chunk: c.chunk_size,
            topk: c.chunk_topk.min(self.mem.chunks),
            mask_window: c.mask_slide_window.then_some(c.sliding_window),
        };
        let xn = ctx.norm(x, pre_norm, HSA_NORM_EPS, n, d);
        let q_raw = linear(b, &xn.y, ctx.w(ln), n, dr, d);
        let q = ctx.maybe_norm(q_raw, lmk_norms.map(|n| n.0), n * g, rs.dim);
        let z = n * g * rs.topk;
        let (mut idx, mut scores, mut w) = (vec![0u32; z], b.zeros(z), b.zeros(z));
        b.retrieval_select(&q.y, &self.mem.lmk[group], &rs, &mut idx, &mut scores);
        b.fusion_forward(&scores, n * g, rs.topk, ctx.fusion(), &mut w);
        (idx, w, rs.topk)
    }

    /// HSA block `i` on the rows `x` (HSA.md §2.3, as `Ctx::hsa_forward`), reading the memory
    /// through the selection `idx`, `w` of its retrieval layer.
    #[allow(clippy::too_many_arguments)]
    fn hsa_block(
        &mut self,
        ctx: &Ctx<'_, B>,
        i: usize,
        x: &B::Buf,
        l: &LayerIdx,
        idx: &[u32],
        w: &B::Buf,
        topk: usize,
    ) -> B::Buf {
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
        let (m, b) = (self.model, self.b);
        let c = &m.cfg;
        let (d, dh) = (c.base.hidden_size, c.head_dim());
        let n = b.len(x) / d;
        let x1 = match swa {
            Some((norm, a)) => {
                let cache = self.swa[i].as_mut().expect("the SWA sub-block has a cache");
                attend(ctx, x, norm, HSA_NORM_EPS, &a, c.hsa_sliding_window, cache)
            }
            None => rows(b, x, 0, n, d),
        };
        let hs = HsaShape {
            len: n,
            chunks: self.mem.chunks,
            n_q_heads: c.base.num_attention_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: dh,
            chunk: c.chunk_size,
            topk,
            softmax1: c.enable_softmax1,
        };
        let xn = ctx.norm(&x1, pre_norm, HSA_NORM_EPS, n, d);
        let q_raw = linear(b, &xn.y, ctx.w(q_proj), n, d, d);
        let q = ctx.maybe_norm(q_raw, q_norm, n * hs.n_q_heads, dh);
        let (mut o, mut lse) = (b.zeros(n * d), b.zeros(n * hs.n_q_heads * topk));
        let scale = 1.0 / (dh as f64).sqrt();
        let mem = &self.mem;
        b.hsa_forward(&q.y, &mem.km, &mem.vm, idx, w, &hs, scale, &mut o, &mut lse);
        let mut z = rows(b, &x1, 0, n, d);
        b.gemm(
            &mut z,
            0,
            &o,
            0,
            ctx.w(o_proj),
            0,
            n,
            d,
            d,
            false,
            true,
            true,
        );
        let base = if c.reset_hsa_residual { &z } else { &x1 };
        ctx.mlp_forward(&z, base, mlp_norm, HSA_NORM_EPS, &mlp).1
    }
}

/// A SWA attention sub-block on the rows `x [n, d]` of `ctx` with a cache: `x + o(swa(q, [cached
/// k; k], [cached v; v]))`; the cache then keeps the last `window` keys and values.
#[allow(clippy::too_many_arguments)]
fn attend<B: HsaOps>(
    ctx: &Ctx<'_, B>,
    x: &B::Buf,
    norm: usize,
    eps: f64,
    a: &AttnIdx,
    window: usize,
    cache: &mut SwaCache<B>,
) -> B::Buf {
    let (b, c) = (ctx.b, ctx.c);
    let (d, dh) = (c.base.hidden_size, c.head_dim());
    let (hq, hk) = (c.base.num_attention_heads, c.base.num_key_value_heads);
    let n = b.len(x) / d;
    let kvw = hk * dh;
    let qkv = ctx.attn_qkv(x, norm, eps, a);
    let m = cache.rows;
    let k = cat(b, &cache.k, m, &qkv.kn.y, n, kvw);
    let v = cat(b, &cache.v, m, &qkv.v, n, kvw);
    let s = SwaShape {
        len: n,
        cached: m,
        n_q_heads: hq,
        n_kv_heads: hk,
        head_dim: dh,
        window,
    };
    let (mut attn, mut lse) = (b.zeros(n * hq * dh), b.zeros(hq * n));
    let scale = 1.0 / (dh as f64).sqrt();
    b.swa_forward(&qkv.qn.y, &k, &v, &s, scale, &mut attn, &mut lse);
    let mut out = rows(b, x, 0, n, d);
    b.gemm(
        &mut out,
        0,
        &attn,
        0,
        ctx.w(a.o),
        0,
        n,
        d,
        hq * dh,
        false,
        true,
        true,
    );
    let keep = window.min(m + n);
    cache.k = rows(b, &k, m + n - keep, keep, kvw);
    cache.v = rows(b, &v, m + n - keep, keep, kvw);
    cache.rows = keep;
    out
}
