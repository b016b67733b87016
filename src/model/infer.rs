//! Inference: the Llama forward with a KV cache, for generation and evaluation.
//!
//! The same kernels as training (`Backend`: GEMM, RMSNorm, RoPE with exact YaRN cos/sin from
//! `Rope::cos_sin`, blockwise attention with LSE, the overflow-free LSE merge) and the same weights
//! (`ParamStore`), but a forward-only pass that keeps each layer's keys and values.
//!
//! Context parallelism, as in training: a prompt of `T` tokens is padded to a multiple of `2·cp`
//! (pad tokens go after the prompt, so under the causal mask no prompt token sees them) and cut
//! into the zigzag chunks of `parallel::context`; each CP rank runs the layers over its chunks with
//! ring attention (`ring_attention_forward`) and caches the keys and values of its own real (not
//! pad) tokens. Only the rank that holds token `T−1` applies the final norm and LM head, to that
//! one row (never `[T, vocab]`), and broadcasts the logits over CP.
//!
//! Decode: every CP rank embeds the new token and runs the per-row work of each layer (norms,
//! projections, MLP: one row, cheap, identical on all ranks). One rank, the one with the fewest
//! cached rows, appends the token's key and value to its cache. Each rank attends the query over
//! its own cached rows (a partial `(out, lse)`; `lse = −∞` for an empty cache); the partials are
//! all-gathered over CP and merged with `attention_merge` in rank order, so every rank gets the
//! same attention output and then the same logits. Per token and layer that is O(rows held) work
//! and one all-gather of `n_q·(head_dim + 1)` numbers.
//!
//! KV cache memory per rank: `2 × layers × rows × n_kv_heads × head_dim` elements, in pages of
//! `PAGE_ROWS` rows (a page is an exact-size buffer, so full pages go to the attention kernel
//! without a copy; only the last, partly filled page is copied into a buffer of its size).
//!
//! Tensor parallelism is not used here (tp = 1: every CP rank holds the whole model).

use anyhow::{Result, bail, ensure};

use crate::backend::{AttnShape, Backend, TARGET_IGNORE};
use crate::data::loader::zigzag_chunks;
use crate::model::llama::Llama;
use crate::model::params::{
    EMBED, LayerTensor as LT, final_norm_index, layer_index, lm_head_index,
};
use crate::parallel::comm::Comm;
use crate::parallel::context::{RingScratch, RingShape, ring_attention_forward};

/// Rows per KV-cache page.
pub const PAGE_ROWS: usize = 4096;
/// Rows per MLP chunk in a long forward (bounds the `[rows, ffn]` buffers).
const MLP_CHUNK: usize = 2048;
/// Rows per LM-head chunk of `row_losses` (bounds the `[rows, vocab]` logits).
const LOSS_CHUNK: usize = 256;

/// The keys and values this rank holds, per layer, in pages of `PAGE_ROWS` rows (`[rows,
/// n_kv_heads, head_dim]` after RoPE), and the global position of each row.
pub struct KvCache<B: Backend> {
    kvw: usize,
    /// Rows per page (`PAGE_ROWS`; smaller in tests, to cross pages with short prompts).
    page: usize,
    k: Vec<Vec<B::Buf>>,
    v: Vec<Vec<B::Buf>>,
    positions: Vec<u64>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(layers: usize, kv_width: usize) -> Self {
        KvCache {
            kvw: kv_width,
            page: PAGE_ROWS,
            k: (0..layers).map(|_| Vec::new()).collect(),
            v: (0..layers).map(|_| Vec::new()).collect(),
            positions: Vec::new(),
        }
    }

    /// Cached rows.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Global positions of the cached rows, in cache order.
    pub fn positions(&self) -> &[u64] {
        &self.positions
    }

    /// Elements held (keys and values of every layer, allocated pages).
    pub fn elements(&self) -> usize {
        self.k.iter().map(|p| p.len()).sum::<usize>() * 2 * self.page * self.kvw
    }

    /// Claim rows for tokens at `positions` (pages allocated as needed); returns the first row.
    fn reserve(&mut self, b: &B, positions: &[u64]) -> usize {
        let row0 = self.len();
        self.positions.extend_from_slice(positions);
        let pages = self.len().div_ceil(self.page);
        for l in 0..self.k.len() {
            while self.k[l].len() < pages {
                self.k[l].push(b.zeros(self.page * self.kvw));
                self.v[l].push(b.zeros(self.page * self.kvw));
            }
        }
        row0
    }

    /// Copy rows `src_row .. src_row+n` of `k`, `v` (`[.., kvw]`) to cache rows `dst_row ..`.
    fn write(&mut self, b: &B, layer: usize, k: &B::Buf, v: &B::Buf, run: Run) {
        let w = self.kvw;
        let mut i = 0;
        while i < run.len {
            let row = run.dst + i;
            let (p, off) = (row / self.page, row % self.page);
            let m = (self.page - off).min(run.len - i);
            b.copy(k, (run.src + i) * w, &mut self.k[layer][p], off * w, m * w);
            b.copy(v, (run.src + i) * w, &mut self.v[layer][p], off * w, m * w);
            i += m;
        }
    }

    /// Keys and values of `layer`, rows in cache order, as f64 (for tests and checks).
    pub fn read_layer(&self, b: &B, layer: usize) -> (Vec<f64>, Vec<f64>) {
        let n = self.len() * self.kvw;
        let cat = |pages: &Vec<B::Buf>| {
            let mut out: Vec<f64> = pages.iter().flat_map(|p| b.download_f64(p)).collect();
            out.truncate(n);
            out
        };
        (cat(&self.k[layer]), cat(&self.v[layer]))
    }
}

/// Rows of a forward's input copied to the cache: `len` rows from `src` to cache row `dst`.
#[derive(Clone, Copy, Debug)]
struct Run {
    src: usize,
    dst: usize,
    len: usize,
}

/// Per-row buffers of one forward over `n` rows.
struct Rows<B: Backend> {
    n: usize,
    xn: B::Buf,
    rstd: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    lse: B::Buf,
    cos: B::Buf,
    sin: B::Buf,
}

/// How a forward's attention runs.
enum Attend<'s, B: Backend> {
    /// Over the rows of the forward itself, causally, across the CP ring (prefill; the rows are
    /// this rank's zigzag chunks when cp > 1).
    Ring(Option<&'s mut RingScratch<B>>),
    /// One new row against the whole cache, merged over CP (decode).
    Cache,
}

/// A model with this rank's KV cache: prefill a prompt, then decode one token at a time. Every
/// rank of the CP group `cp` calls the same methods in the same order.
pub struct Session<'a, B: Backend, C: Comm> {
    b: &'a B,
    model: &'a Llama<B>,
    cp: &'a C,
    cache: KvCache<B>,
    /// Rows cached on each CP rank (known to all: the layout is deterministic).
    counts: Vec<usize>,
    next_pos: u64,
}

impl<'a, B: Backend, C: Comm> Session<'a, B, C> {
    pub fn new(b: &'a B, model: &'a Llama<B>, cp: &'a C) -> Self {
        let cfg = &model.cfg;
        Session {
            b,
            model,
            cp,
            cache: KvCache::new(
                cfg.num_hidden_layers,
                cfg.num_key_value_heads * cfg.head_dim,
            ),
            counts: vec![0; cp.size()],
            next_pos: 0,
        }
    }

    /// Use KV-cache pages of `rows` rows (before the prefill).
    pub fn set_page_rows(&mut self, rows: usize) {
        assert!(self.cache.is_empty() && rows > 0);
        self.cache.page = rows;
    }

    pub fn cache(&self) -> &KvCache<B> {
        &self.cache
    }

    /// Tokens seen so far (prompt and decoded): the position of the next token.
    pub fn position(&self) -> u64 {
        self.next_pos
    }

    /// Run the prompt through the model, caching its keys and values across the CP group; returns
    /// the logits of its last token (`[vocab]`, equal on every rank).
    pub fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        ensure!(
            self.cache.is_empty(),
            "prefill: the session already holds {} tokens",
            self.next_pos
        );
        ensure!(!ids.is_empty(), "prefill: the prompt is empty");
        self.check_ids(ids)?;
        let (n_cp, r) = (self.cp.size(), self.cp.rank());
        let t = ids.len();
        let tp = t.next_multiple_of(2 * n_cp);
        let layout = |q: usize| -> Vec<(usize, usize)> {
            if n_cp == 1 {
                vec![(0, t)]
            } else {
                zigzag_chunks(tp, n_cp, q).to_vec()
            }
        };
        let (mut local, mut positions) = (Vec::new(), Vec::new());
        for (start, len) in layout(r) {
            for i in start..start + len {
                local.push(if i < t { ids[i] } else { ids[t - 1] });
                positions.push(i as u64);
            }
        }
        let x = self.forward_rows(&local, &positions, Some(t as u64));
        // Who holds token t−1, at which local row; how many real rows each rank cached.
        let mut owner = (0, 0);
        for q in 0..n_cp {
            let mut row = 0;
            let mut real = 0;
            for (start, len) in layout(q) {
                if (start..start + len).contains(&(t - 1)) {
                    owner = (q, row + t - 1 - start);
                }
                real += len.min(t.saturating_sub(start));
                row += len;
            }
            self.counts[q] = real;
        }
        let mut logits = if owner.0 == r {
            self.logits_of_row(&x, owner.1)
        } else {
            vec![0f32; self.model.cfg.vocab_size]
        };
        self.cp.broadcast(&mut logits, owner.0);
        self.next_pos = t as u64;
        Ok(logits)
    }

    /// Feed one token at the next position; returns its logits (`[vocab]`, equal on every rank).
    pub fn decode(&mut self, id: u32) -> Result<Vec<f32>> {
        self.check_ids(&[id])?;
        let pos = self.next_pos;
        let owner = (0..self.counts.len())
            .min_by_key(|&q| (self.counts[q], q))
            .unwrap_or(0);
        let b = self.b;
        let cfg = &self.model.cfg;
        let h = cfg.hidden_size;
        let p = &self.model.params;
        let mut rows = Rows::new(b, self.model, &[pos]);
        let mut x = b.zeros(h);
        b.embedding_forward(&p.bufs[EMBED], &[id], h, &mut x);
        let run = (owner == self.cp.rank()).then(|| Run {
            src: 0,
            dst: self.cache.reserve(b, &[pos]),
            len: 1,
        });
        for l in 0..cfg.num_hidden_layers {
            self.layer(l, &mut x, &mut rows, run.as_slice(), Attend::Cache);
        }
        self.counts[owner] += 1;
        self.next_pos += 1;
        Ok(self.logits_of_row(&x, 0))
    }

    /// The final hidden states (`[n, hidden]`, before the final norm) of this rank's rows `ids` at
    /// `positions`, attention over the CP ring (the rows are the rank's zigzag chunks when cp > 1).
    /// Nothing is cached. With `row_losses`, the evaluation pass of `eval ppl`.
    pub fn hidden_states(&mut self, ids: &[u32], positions: &[u64]) -> Result<B::Buf> {
        self.check_ids(ids)?;
        ensure!(
            ids.len() == positions.len(),
            "{} ids but {} positions",
            ids.len(),
            positions.len()
        );
        Ok(self.forward_rows(ids, positions, None))
    }

    /// Per-row next-token loss (nats) of hidden states `x [n, hidden]` against `targets` (negative:
    /// not counted, NaN in the result); the LM head runs `LOSS_CHUNK` rows at a time.
    pub fn row_losses(&self, x: &B::Buf, targets: &[i32]) -> Vec<f64> {
        let b = self.b;
        let cfg = &self.model.cfg;
        let (h, vocab, n) = (cfg.hidden_size, cfg.vocab_size, targets.len());
        let p = &self.model.params;
        let mut xn = b.zeros(n * h);
        let mut rstd = b.zeros(n);
        b.rmsnorm_forward(
            x,
            &p.bufs[final_norm_index(cfg)],
            cfg.rms_norm_eps,
            n,
            h,
            &mut xn,
            &mut rstd,
        );
        let ch = LOSS_CHUNK.min(n.max(1));
        let mut logits = b.zeros(ch * vocab);
        let mut out = Vec::with_capacity(n);
        for r0 in (0..n).step_by(ch) {
            let rows = ch.min(n - r0);
            b.gemm(
                &mut logits,
                0,
                &xn,
                r0 * h,
                &p.bufs[lm_head_index(cfg)],
                0,
                rows,
                vocab,
                h,
                false,
                true,
                false,
            );
            let mut tl: Vec<i32> = targets[r0..r0 + rows]
                .iter()
                .map(|&x| if x < 0 { TARGET_IGNORE } else { x })
                .collect();
            tl.resize(ch, TARGET_IGNORE);
            let stats = b.cross_entropy_stats(&logits, &tl, vocab);
            for s in &stats[..rows] {
                out.push(match s.target {
                    Some(z) => s.sum.ln() + s.max - z,
                    None => f64::NAN,
                });
            }
        }
        out
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.model.cfg.vocab_size;
        if let Some((i, &bad)) = ids.iter().enumerate().find(|&(_, &x)| x as usize >= vocab) {
            bail!("token {bad} at index {i} is outside the vocabulary of {vocab}");
        }
        Ok(())
    }

    /// Embedding and every layer over `ids` at `positions` (this rank's rows); with `cache_below`,
    /// the keys and values of rows at positions below it are appended to the cache.
    fn forward_rows(&mut self, ids: &[u32], positions: &[u64], cache_below: Option<u64>) -> B::Buf {
        let b = self.b;
        let cfg = &self.model.cfg;
        let n = ids.len();
        let mut x = b.zeros(n * cfg.hidden_size);
        b.embedding_forward(&self.model.params.bufs[EMBED], ids, cfg.hidden_size, &mut x);
        let mut rows = Rows::new(b, self.model, positions);
        // Contiguous runs of cached rows (two zigzag chunks, each possibly cut by padding).
        let mut runs: Vec<Run> = Vec::new();
        if let Some(limit) = cache_below {
            let keep: Vec<u64> = positions.iter().copied().filter(|&p| p < limit).collect();
            let mut dst = self.cache.reserve(b, &keep);
            for (i, &p) in positions.iter().enumerate() {
                if p >= limit {
                    continue;
                }
                match runs.last_mut() {
                    Some(last) if last.src + last.len == i => last.len += 1,
                    _ => runs.push(Run {
                        src: i,
                        dst,
                        len: 1,
                    }),
                }
                dst += 1;
            }
        }
        let shape = self.ring_shape(n);
        let mut ring = RingScratch::new(b, &shape, self.cp.size());
        for l in 0..cfg.num_hidden_layers {
            self.layer(l, &mut x, &mut rows, &runs, Attend::Ring(ring.as_mut()));
        }
        x
    }

    fn ring_shape(&self, n: usize) -> RingShape {
        let cfg = &self.model.cfg;
        RingShape {
            t: n,
            n_q: cfg.num_attention_heads,
            n_kv: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        }
    }

    /// One decoder layer over the rows of `x` (in place: `x ← x + attn(..); x ← x + mlp(..)`).
    fn layer(
        &mut self,
        l: usize,
        x: &mut B::Buf,
        r: &mut Rows<B>,
        runs: &[Run],
        attend: Attend<B>,
    ) {
        let b = self.b;
        let cfg = &self.model.cfg;
        let p = &self.model.params;
        let w = |t: LT| &p.bufs[layer_index(l, t)];
        let (n, h, hd) = (r.n, cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (qw, kvw) = (nq * hd, nkv * hd);
        b.rmsnorm_forward(
            x,
            w(LT::AttnNorm),
            cfg.rms_norm_eps,
            n,
            h,
            &mut r.xn,
            &mut r.rstd,
        );
        b.gemm(
            &mut r.q,
            0,
            &r.xn,
            0,
            w(LT::Q),
            0,
            n,
            qw,
            h,
            false,
            true,
            false,
        );
        b.gemm(
            &mut r.k,
            0,
            &r.xn,
            0,
            w(LT::K),
            0,
            n,
            kvw,
            h,
            false,
            true,
            false,
        );
        b.gemm(
            &mut r.v,
            0,
            &r.xn,
            0,
            w(LT::V),
            0,
            n,
            kvw,
            h,
            false,
            true,
            false,
        );
        b.rope_forward(&mut r.q, &r.cos, &r.sin, n, nq, hd);
        b.rope_forward(&mut r.k, &r.cos, &r.sin, n, nkv, hd);
        for &run in runs {
            self.cache.write(b, l, &r.k, &r.v, run);
        }
        let scale = 1.0 / (hd as f64).sqrt();
        match attend {
            Attend::Ring(scratch) => {
                let shape = self.ring_shape(n);
                ring_attention_forward(
                    b,
                    self.cp,
                    &shape,
                    scale,
                    &r.q,
                    &r.k,
                    &r.v,
                    &mut r.attn,
                    &mut r.lse,
                    scratch,
                );
            }
            Attend::Cache => self.attend_cache(l, &r.q, scale, &mut r.attn),
        }
        b.gemm(x, 0, &r.attn, 0, w(LT::O), 0, n, h, qw, false, true, true);
        b.rmsnorm_forward(
            x,
            w(LT::MlpNorm),
            cfg.rms_norm_eps,
            n,
            h,
            &mut r.xn,
            &mut r.rstd,
        );
        // MLP in row chunks: at most `MLP_CHUNK × ffn` intermediate values alive.
        let ffn = cfg.intermediate_size;
        let mut r0 = 0;
        while r0 < n {
            let m = MLP_CHUNK.min(n - r0);
            let (mut gate, mut up, mut act) =
                (b.zeros(m * ffn), b.zeros(m * ffn), b.zeros(m * ffn));
            b.gemm(
                &mut gate,
                0,
                &r.xn,
                r0 * h,
                w(LT::Gate),
                0,
                m,
                ffn,
                h,
                false,
                true,
                false,
            );
            b.gemm(
                &mut up,
                0,
                &r.xn,
                r0 * h,
                w(LT::Up),
                0,
                m,
                ffn,
                h,
                false,
                true,
                false,
            );
            b.swiglu_forward(&gate, &up, &mut act);
            b.gemm(
                x,
                r0 * h,
                &act,
                0,
                w(LT::Down),
                0,
                m,
                h,
                ffn,
                false,
                true,
                true,
            );
            r0 += m;
        }
    }

    /// Attention of one query row `q [1, n_q, d]` over every cached row of the CP group: this
    /// rank's pages merged locally, then the ranks' partial results merged in rank order.
    fn attend_cache(&self, l: usize, q: &B::Buf, scale: f64, out: &mut B::Buf) {
        let b = self.b;
        let cfg = &self.model.cfg;
        let (nq, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let kvw = nkv * hd;
        let neg_inf = vec![f64::NEG_INFINITY; nq];
        let (mut acc, mut acc_lse) = (b.zeros(nq * hd), b.upload_f64(&neg_inf));
        let (mut o, mut lse) = (b.zeros(nq * hd), b.zeros(nq));
        let rows = self.cache.len();
        for (pi, (kp, vp)) in self.cache.k[l].iter().zip(&self.cache.v[l]).enumerate() {
            let page = self.cache.page;
            let start = pi * page;
            if start >= rows {
                break;
            }
            let m = page.min(rows - start);
            let shape = AttnShape {
                q_len: 1,
                kv_len: m,
                n_q_heads: nq,
                n_kv_heads: nkv,
                head_dim: hd,
                q_pos0: 0,
                k_pos0: 0,
                causal: false,
            };
            if m == page {
                b.attention_forward(q, kp, vp, &shape, scale, &mut o, &mut lse);
            } else {
                let (mut kc, mut vc) = (b.zeros(m * kvw), b.zeros(m * kvw));
                b.copy(kp, 0, &mut kc, 0, m * kvw);
                b.copy(vp, 0, &mut vc, 0, m * kvw);
                b.attention_forward(q, &kc, &vc, &shape, scale, &mut o, &mut lse);
            }
            b.attention_merge(&mut acc, &mut acc_lse, &o, &lse, 0, 1, 1, nq, hd);
        }
        if self.cp.size() == 1 {
            *out = acc;
            return;
        }
        // [out (nq·hd), lse (nq)] of every rank, merged in rank order on every rank.
        let w = nq * hd + nq;
        let mut mine = b.download_f64(&acc);
        mine.extend(b.download_f64(&acc_lse));
        let mut all = vec![0f64; w * self.cp.size()];
        self.cp.all_gather(&mine, &mut all);
        let mut merged = b.zeros(nq * hd);
        let mut merged_lse = b.upload_f64(&neg_inf);
        for part in all.chunks(w) {
            let ob = b.upload_f64(&part[..nq * hd]);
            let lb = b.upload_f64(&part[nq * hd..]);
            b.attention_merge(&mut merged, &mut merged_lse, &ob, &lb, 0, 1, 1, nq, hd);
        }
        *out = merged;
    }

    /// Final norm and LM head of row `row` of `x [n, hidden]`: the logits `[vocab]`.
    fn logits_of_row(&self, x: &B::Buf, row: usize) -> Vec<f32> {
        let b = self.b;
        let cfg = &self.model.cfg;
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let p = &self.model.params;
        let mut xr = b.zeros(h);
        b.copy(x, row * h, &mut xr, 0, h);
        let (mut xn, mut rstd) = (b.zeros(h), b.zeros(1));
        b.rmsnorm_forward(
            &xr,
            &p.bufs[final_norm_index(cfg)],
            cfg.rms_norm_eps,
            1,
            h,
            &mut xn,
            &mut rstd,
        );
        let mut logits = b.zeros(vocab);
        b.gemm(
            &mut logits,
            0,
            &xn,
            0,
            &p.bufs[lm_head_index(cfg)],
            0,
            1,
            vocab,
            h,
            false,
            true,
            false,
        );
        b.download(&logits)
    }
}

impl<B: Backend> Rows<B> {
    fn new(b: &B, model: &Llama<B>, positions: &[u64]) -> Self {
        let cfg = &model.cfg;
        let n = positions.len();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (qw, kvw) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let (cos, sin) = model.rope.cos_sin::<f64>(positions);
        Rows {
            n,
            xn: b.zeros(n * h),
            rstd: b.zeros(n),
            q: b.zeros(n * qw),
            k: b.zeros(n * kvw),
            v: b.zeros(n * kvw),
            attn: b.zeros(n * qw),
            lse: b.zeros(n * cfg.num_attention_heads),
            cos: b.upload_f64(&cos),
            sin: b.upload_f64(&sin),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::config::ModelConfig;
    use crate::model::llama::{Head, Workspace};
    use crate::model::params::ParamStore;
    use crate::model::rope::RopePrecision;
    use crate::parallel::comm::SelfComm;
    use crate::parallel::thread::ThreadComm;
    use crate::util::Real;

    /// A tiny Llama with YaRN (attention factor ≠ 1), GQA 2 and weights large enough that
    /// attention is far from uniform.
    fn tiny<T: Real>(b: &CpuBackend<T>) -> Llama<CpuBackend<T>> {
        let cfg = ModelConfig::from_json_str(
            r#"{"vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 256, "tie_word_embeddings": false, "initializer_range": 0.4,
            "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
            "beta_fast": 4.0, "beta_slow": 1.0}}"#,
            "tiny",
        )
        .unwrap();
        let params = ParamStore::init_random(b, &cfg, 5);
        Llama::new(cfg, RopePrecision::Exact, params).unwrap()
    }

    fn tokens(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i * 7 + salt * 13 + i * i) % 40)
            .collect()
    }

    /// The reference: a fresh training-path forward over `ids`, logits of the last row.
    fn full_last_logits<T: Real>(
        b: &CpuBackend<T>,
        m: &Llama<CpuBackend<T>>,
        ids: &[u32],
    ) -> Vec<f64> {
        let mut ws = Workspace::new(b, &m.cfg, ids.len(), false, 8);
        let mut out = Vec::new();
        m.forward_backward(b, &mut ws, ids, 0, Head::Logits(&mut out), None);
        let v = m.cfg.vocab_size;
        out[out.len() - v..].iter().map(|&x| x as f64).collect()
    }

    fn rel(a: &[f32], r: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(r).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
        let den: f64 = r.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }

    fn rel64(a: &[f32], r: &[f32]) -> f64 {
        rel(a, &r.iter().map(|&x| x as f64).collect::<Vec<_>>())
    }

    #[test]
    fn cached_decode_equals_full_recompute() {
        // f64: to round-off; f32: to its precision. Pages of 4 rows, so the cache spans pages.
        fn check<T: Real>(tol: f64) {
            let b = CpuBackend::<T>::new();
            let m = tiny(&b);
            let prompt = tokens(11, 1);
            let next = tokens(9, 2);
            let comm = SelfComm::default();
            let mut s = Session::new(&b, &m, &comm);
            s.set_page_rows(4);
            let mut seq = prompt.clone();
            let mut logits = s.prefill(&prompt).unwrap();
            let mut worst = 0f64;
            for &t in &next {
                let e = rel(&logits, &full_last_logits(&b, &m, &seq));
                worst = worst.max(e);
                assert!(e < tol, "after {} tokens: relative error {e:e}", seq.len());
                logits = s.decode(t).unwrap();
                seq.push(t);
            }
            assert!(rel(&logits, &full_last_logits(&b, &m, &seq)) < tol);
            assert_eq!(s.cache().len(), seq.len());
            assert_eq!(s.position(), seq.len() as u64);
            eprintln!(
                "cached decode vs full recompute ({}): worst relative error {worst:.2e}",
                b.name()
            );
        }
        check::<f64>(1e-12);
        check::<f32>(1e-5);
    }

    /// Prefill (and decode `next`) on `cp` thread ranks; every rank's per-step logits and its
    /// cache (positions, layer-0 keys and values per row).
    #[allow(clippy::type_complexity)]
    fn run_cp(
        cp: usize,
        prompt: &[u32],
        next: &[u32],
    ) -> Vec<(Vec<Vec<f32>>, Vec<u64>, Vec<f64>, Vec<f64>)> {
        ThreadComm::run(cp, |comm| {
            let b = CpuBackend::<f64>::new();
            let m = tiny(&b);
            let mut s = Session::new(&b, &m, &comm);
            s.set_page_rows(3);
            let mut steps = vec![s.prefill(prompt).unwrap()];
            for &t in next {
                steps.push(s.decode(t).unwrap());
            }
            let (k, v) = s.cache().read_layer(&b, 1);
            (steps, s.cache().positions().to_vec(), k, v)
        })
    }

    #[test]
    fn cp_prefill_and_distributed_decode_equal_one_rank() {
        let next = tokens(7, 3);
        for len in [13usize, 16, 5] {
            let prompt = tokens(len, 4);
            let one = run_cp(1, &prompt, &next);
            let (ref_steps, ref_pos, ref_k, ref_v) = &one[0];
            assert_eq!(*ref_pos, (0..(len + next.len()) as u64).collect::<Vec<_>>());
            let kvw = ref_k.len() / ref_pos.len();
            for cp in [2usize, 3, 4] {
                let ranks = run_cp(cp, &prompt, &next);
                let mut seen = vec![0usize; ref_pos.len()];
                let mut worst = 0f64;
                for (r, (steps, pos, k, v)) in ranks.iter().enumerate() {
                    // The same logits on every rank, equal to one rank's at every step.
                    for (i, (a, e)) in steps.iter().zip(ref_steps).enumerate() {
                        let err = rel64(a, e);
                        worst = worst.max(err);
                        assert!(err < 1e-12, "len {len} cp {cp} rank {r} step {i}: {err:e}");
                    }
                    // Each cached row is the one-rank row of its position.
                    for (j, &p) in pos.iter().enumerate() {
                        seen[p as usize] += 1;
                        let (a, e) = (&k[j * kvw..][..kvw], &ref_k[p as usize * kvw..][..kvw]);
                        let (av, ev) = (&v[j * kvw..][..kvw], &ref_v[p as usize * kvw..][..kvw]);
                        for (x, y) in a.iter().zip(e).chain(av.iter().zip(ev)) {
                            assert!(
                                (x - y).abs() < 1e-12 * (1.0 + y.abs()),
                                "len {len} cp {cp} pos {p}"
                            );
                        }
                    }
                }
                assert!(
                    seen.iter().all(|&n| n == 1),
                    "len {len} cp {cp}: rows held {seen:?}"
                );
                // Decoded tokens spread over the ranks (the fewest-rows rule).
                let counts: Vec<usize> = ranks.iter().map(|x| x.1.len()).collect();
                let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                assert!(hi - lo <= len.div_ceil(2 * cp) + 1, "cp {cp}: {counts:?}");
                eprintln!("len {len} cp {cp}: worst relative logit error vs one rank {worst:.2e}");
            }
        }
    }

    #[test]
    fn row_losses_equal_the_training_loss() {
        let b = CpuBackend::<f64>::new();
        let m = tiny(&b);
        let ids = tokens(24, 6);
        let targets: Vec<i32> = ids[1..].iter().map(|&x| x as i32).chain([-1]).collect();
        let mut ws = Workspace::new(&b, &m.cfg, ids.len(), false, 5);
        let total = m.forward_backward(
            &b,
            &mut ws,
            &ids,
            0,
            Head::Loss {
                targets: &targets,
                grad_scale: 1.0,
            },
            None,
        );
        for cp in [1usize, 2, 3] {
            let per = ThreadComm::run(cp, |comm| {
                let b = CpuBackend::<f64>::new();
                let m = tiny(&b);
                crate::eval::ppl::sequence_losses(&b, &m, &comm, &ids).unwrap()
            });
            for p in &per {
                assert_eq!(p.len(), ids.len());
                assert!(p[ids.len() - 1].is_nan());
                let s: f64 = p[..ids.len() - 1].iter().sum();
                assert!((s - total).abs() < 1e-10 * total, "cp {cp}: {s} vs {total}");
                assert_eq!(
                    p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    per[0].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }
}
