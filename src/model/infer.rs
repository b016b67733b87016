//! Inference: the Llama forward with a KV cache, for generation and evaluation.
//!
//! The training model's own layers: `Llama::forward_only` runs the embedding, decoder layer and
//! LM head of `model::llama` (the same kernels, weights and TP pairs) forward only, with the
//! attention plugged in here (`KvAttention`): it appends each layer's keys and values (after RoPE)
//! to this rank's KV cache and attends over the CP ring (prefill) or over the cache (decode).
//!
//! Layout: world = tp × cp × dp. A TP group holds one weight shard each, as in training: every
//! TP rank of a group runs the same rows, q/k/v project to its `n_q/tp`, `n_kv/tp` heads, so its
//! KV cache holds its heads of every cached row, and the vocab-parallel LM head's logits are
//! all-gathered over TP (or, for losses, its per-row statistics combined).
//!
//! Prefill, context parallel as in training: a prompt of `T` tokens is padded to a multiple of
//! `2·cp·tp` (`tp` when cp = 1; pad tokens go after the prompt, so under the causal mask no prompt
//! token sees them) and cut into the zigzag chunks of `parallel::context`; each CP rank runs the
//! layers over its chunks (rows split over TP) with ring attention and caches the keys and values
//! of its own real (not pad) rows. Only the CP rank that holds token `T−1` applies the final norm
//! and LM head, to that one row (never `[T, vocab]`), and broadcasts the logits over CP.
//!
//! Decode: every rank embeds the new token and runs the per-row work of each layer on it (one
//! row, held whole by every TP rank: `Dims::unsplit`, the row-parallel blocks all-reduced over
//! TP). One CP rank, the one with the fewest cached rows, appends the token's key and value.
//! Each CP rank attends the query over its own cached rows (a partial `(out, lse)`; `lse = −∞` for
//! an empty cache); the partials are all-gathered over CP and merged with `attention_merge` in
//! rank order, so every rank gets the same attention output and then the same logits. Per token
//! and layer that is O(rows held) work and one all-gather of `n_q/tp·(head_dim + 1)` numbers.
//!
//! KV cache memory per rank: `2 × layers × rows × n_kv/tp × head_dim` elements, in pages of
//! `PAGE_ROWS` rows (a page is an exact-size buffer, so full pages go to the attention kernel
//! without a copy; only the last, partly filled page is copied into a buffer of its size).

use anyhow::{Result, bail, ensure};

use crate::backend::{AttnShape, Backend};
use crate::data::loader::zigzag_chunks;
use crate::model::llama::{Attention, Dims, Llama, RingAttention};
use crate::model::params::{LayerTensor as LT, Shard, layer_index};
use crate::parallel::comm::Comm;
use crate::parallel::context::{RingScratch, RingShape};

/// Rows per KV-cache page.
pub const PAGE_ROWS: usize = 4096;
/// Rows per MLP chunk in a long forward (bounds the `[rows, ffn/tp]` buffers).
const MLP_CHUNK: usize = 2048;
/// Rows per LM-head chunk of `row_losses` (bounds the `[rows, vocab/tp]` logits).
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

/// The attention of a forward-only pass that keeps keys and values: each layer's rows `runs` go
/// to the cache, then the pass attends over the CP ring (its own rows) or over the cache.
struct KvAttention<'s, B: Backend, C: Comm> {
    cache: &'s mut KvCache<B>,
    runs: &'s [Run],
    over: Over<'s, B, C>,
}

enum Over<'s, B: Backend, C: Comm> {
    /// Causally over the pass's rows across the CP ring (prefill, evaluation).
    Ring(RingAttention<'s, B, C>),
    /// One new row against every cached row of the CP group (decode).
    Cache(&'s C),
}

impl<B: Backend, C: Comm> Attention<B> for KvAttention<'_, B, C> {
    fn attend(
        &mut self,
        b: &B,
        layer: usize,
        s: &RingShape,
        scale: f64,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        out: &mut B::Buf,
        lse: &mut B::Buf,
    ) {
        for &run in self.runs {
            self.cache.write(b, layer, k, v, run);
        }
        match &mut self.over {
            Over::Ring(ring) => ring.attend(b, layer, s, scale, q, k, v, out, lse),
            Over::Cache(cp) => attend_cache(b, self.cache, *cp, layer, s, scale, q, out, lse),
        }
    }
}

/// Attention of one query row `q [1, n_q, d]` over every cached row of the CP group: this rank's
/// pages merged locally, then the ranks' partial results merged in rank order; `out [1, n_q, d]`,
/// `lse [n_q]` overwritten.
fn attend_cache<B: Backend, C: Comm>(
    b: &B,
    cache: &KvCache<B>,
    cp: &C,
    l: usize,
    s: &RingShape,
    scale: f64,
    q: &B::Buf,
    out: &mut B::Buf,
    lse_out: &mut B::Buf,
) {
    let (nq, nkv, hd) = (s.n_q, s.n_kv, s.head_dim);
    let kvw = nkv * hd;
    let neg_inf = vec![f64::NEG_INFINITY; nq];
    let (mut acc, mut acc_lse) = (b.zeros(nq * hd), b.upload_f64(&neg_inf));
    let (mut o, mut lse) = (b.zeros(nq * hd), b.zeros(nq));
    let rows = cache.len();
    for (pi, (kp, vp)) in cache.k[l].iter().zip(&cache.v[l]).enumerate() {
        let page = cache.page;
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
    if cp.size() > 1 {
        // [out (nq·hd), lse (nq)] of every rank, merged in rank order on every rank.
        let w = nq * hd + nq;
        let mut mine = b.download_f64(&acc);
        mine.extend(b.download_f64(&acc_lse));
        let mut all = vec![0f64; w * cp.size()];
        cp.all_gather(&mine, &mut all);
        acc = b.zeros(nq * hd);
        acc_lse = b.upload_f64(&neg_inf);
        for part in all.chunks(w) {
            let ob = b.upload_f64(&part[..nq * hd]);
            let lb = b.upload_f64(&part[nq * hd..]);
            b.attention_merge(&mut acc, &mut acc_lse, &ob, &lb, 0, 1, 1, nq, hd);
        }
    }
    b.copy(&acc, 0, out, 0, nq * hd);
    b.copy(&acc_lse, 0, lse_out, 0, nq);
}

/// A model with this rank's KV cache: prefill a prompt, then decode one token at a time. Every
/// rank of the TP group `tp` and the CP group `cp` calls the same methods in the same order; the
/// model holds this rank's TP shard (`Llama::load_shard` with `tp`'s rank and size).
pub struct Session<'a, B: Backend, C: Comm> {
    b: &'a B,
    model: &'a Llama<B>,
    tp: &'a C,
    cp: &'a C,
    cache: KvCache<B>,
    /// Rows cached on each CP rank (known to all: the layout is deterministic).
    counts: Vec<usize>,
    next_pos: u64,
    /// Rows per MLP chunk of a forward.
    mlp_rows: usize,
}

impl<'a, B: Backend, C: Comm> Session<'a, B, C> {
    pub fn new(b: &'a B, model: &'a Llama<B>, tp: &'a C, cp: &'a C) -> Self {
        let cfg = &model.cfg;
        let q_rows = model.params.specs[layer_index(0, LT::Q)].shape[0];
        assert_eq!(
            q_rows * tp.size(),
            cfg.num_attention_heads * cfg.head_dim,
            "the model's weights are not a shard of tp {}",
            tp.size()
        );
        Session {
            b,
            model,
            tp,
            cp,
            cache: KvCache::new(
                cfg.num_hidden_layers,
                cfg.num_key_value_heads / tp.size() * cfg.head_dim,
            ),
            counts: vec![0; cp.size()],
            next_pos: 0,
            mlp_rows: MLP_CHUNK,
        }
    }

    /// Use KV-cache pages of `rows` rows (before the prefill).
    pub fn set_page_rows(&mut self, rows: usize) {
        assert!(self.cache.is_empty() && rows > 0);
        self.cache.page = rows;
    }

    /// Run the MLP `rows` rows at a time (default 2048).
    pub fn set_mlp_rows(&mut self, rows: usize) {
        assert!(rows > 0);
        self.mlp_rows = rows;
    }

    /// The CP group the prompt and cache are spread over.
    pub fn cp(&self) -> &'a C {
        self.cp
    }

    pub fn cache(&self) -> &KvCache<B> {
        &self.cache
    }

    /// Tokens seen so far (prompt and decoded): the position of the next token.
    pub fn position(&self) -> u64 {
        self.next_pos
    }

    fn shard(&self) -> Shard {
        Shard {
            rank: self.tp.rank(),
            size: self.tp.size(),
        }
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
        let (n_cp, r, n_tp) = (self.cp.size(), self.cp.rank(), self.tp.size());
        let t = ids.len();
        let padded = if n_cp == 1 {
            t.next_multiple_of(n_tp)
        } else {
            t.next_multiple_of(2 * n_cp * n_tp)
        };
        let layout = |q: usize| -> Vec<(usize, usize)> {
            if n_cp == 1 {
                vec![(0, padded)]
            } else {
                zigzag_chunks(padded, n_cp, q).to_vec()
            }
        };
        let (mut local, mut positions) = (Vec::new(), Vec::new());
        for (start, len) in layout(r) {
            for i in start..start + len {
                local.push(if i < t { ids[i] } else { ids[t - 1] });
                positions.push(i as u64);
            }
        }
        let (d, x) = self.forward_rows(&local, &positions, Some(t as u64));
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
            self.model.logits_of_row(self.b, self.tp, &d, &x, owner.1)
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
        let d = Dims::unsplit(&self.model.cfg, 1, self.shard());
        let runs: Vec<Run> = if owner == self.cp.rank() {
            vec![Run {
                src: 0,
                dst: self.cache.reserve(b, &[pos]),
                len: 1,
            }]
        } else {
            Vec::new()
        };
        let mut attn = KvAttention {
            cache: &mut self.cache,
            runs: &runs,
            over: Over::Cache(self.cp),
        };
        let x = self
            .model
            .forward_only(b, self.tp, &d, &[id], &[pos], self.mlp_rows, &mut attn);
        self.counts[owner] += 1;
        self.next_pos += 1;
        Ok(self.model.logits_of_row(b, self.tp, &d, &x, 0))
    }

    /// The final hidden states (before the final norm) of this rank's rows `ids` at `positions`,
    /// attention over the CP ring (the rows are the rank's zigzag chunks when cp > 1; their
    /// number divides by tp): this TP rank's `[n/tp, hidden]`. Nothing is cached. With
    /// `row_losses`, the evaluation pass of `eval ppl`.
    pub fn hidden_states(&mut self, ids: &[u32], positions: &[u64]) -> Result<B::Buf> {
        self.check_ids(ids)?;
        ensure!(
            ids.len() == positions.len(),
            "{} ids but {} positions",
            ids.len(),
            positions.len()
        );
        ensure!(
            ids.len().is_multiple_of(self.tp.size()),
            "{} rows do not split over tp {}",
            ids.len(),
            self.tp.size()
        );
        Ok(self.forward_rows(ids, positions, None).1)
    }

    /// Per-row next-token loss (nats) of `hidden_states` `x` against `targets`, one per row
    /// (negative: not counted, NaN in the result); the LM head runs `LOSS_CHUNK` rows at a time.
    pub fn row_losses(&self, x: &B::Buf, targets: &[i32]) -> Vec<f64> {
        let d = Dims::local(&self.model.cfg, targets.len(), self.shard());
        self.model
            .row_losses(self.b, self.tp, &d, x, targets, LOSS_CHUNK)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.model.cfg.vocab_size;
        if let Some((i, &bad)) = ids.iter().enumerate().find(|&(_, &x)| x as usize >= vocab) {
            bail!("token {bad} at index {i} is outside the vocabulary of {vocab}");
        }
        Ok(())
    }

    /// The embedding and every layer over `ids` at `positions` (this rank's rows, split over TP),
    /// attention over the CP ring; with `cache_below`, the keys and values of rows at positions
    /// below it are appended to the cache. Returns the sizes and the hidden states.
    fn forward_rows(
        &mut self,
        ids: &[u32],
        positions: &[u64],
        cache_below: Option<u64>,
    ) -> (Dims, B::Buf) {
        let b = self.b;
        let d = Dims::local(&self.model.cfg, ids.len(), self.shard());
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
        let mut scratch = RingScratch::new(b, &d.ring(), self.cp.size());
        let mut attn = KvAttention {
            cache: &mut self.cache,
            runs: &runs,
            over: Over::Ring(RingAttention {
                cp: self.cp,
                scratch: scratch.as_mut(),
            }),
        };
        let x = self
            .model
            .forward_only(b, self.tp, &d, ids, positions, self.mlp_rows, &mut attn);
        (d, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::eval::generate::{Sampling, generate};
    use crate::model::config::ModelConfig;
    use crate::model::llama::{Head, Workspace};
    use crate::model::params::ParamStore;
    use crate::model::rope::RopePrecision;
    use crate::parallel::any::AnyComm;
    use crate::parallel::comm::SelfComm;
    use crate::parallel::thread::ThreadComm;
    use crate::parallel::topology::Topology;
    use crate::util::Real;

    /// A tiny Llama with YaRN (attention factor ≠ 1), GQA 2 and weights large enough that
    /// attention is far from uniform.
    fn tiny<T: Real>(b: &CpuBackend<T>) -> Llama<CpuBackend<T>> {
        tiny_shard(b, Shard::WHOLE)
    }

    /// TP rank `shard`'s part of `tiny` (the same values as the whole model's).
    fn tiny_shard<T: Real>(b: &CpuBackend<T>, shard: Shard) -> Llama<CpuBackend<T>> {
        let cfg = ModelConfig::from_json_str(
            r#"{"vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 256, "tie_word_embeddings": false, "initializer_range": 0.4,
            "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
            "beta_fast": 4.0, "beta_slow": 1.0}}"#,
            "tiny",
        )
        .unwrap();
        let params = ParamStore::init_random_shard(b, &cfg, 5, shard);
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
            let mut s = Session::new(&b, &m, &comm, &comm);
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
            let tp = AnyComm::Single(SelfComm::default());
            let mut s = Session::new(&b, &m, &tp, &comm);
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
                let tp = AnyComm::Single(SelfComm::default());
                crate::eval::ppl::sequence_losses(&b, &m, &tp, &comm, &ids).unwrap()
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

    /// One greedy generation on a tp × cp world of thread ranks, each holding its TP shard of
    /// `tiny`, with KV pages of 3 rows and the MLP in chunks of `mlp_rows`; per rank: (tp rank,
    /// new tokens, the logits of every step, cached positions, layer-1 keys and values).
    #[allow(clippy::type_complexity)]
    fn run_layout(
        tp: usize,
        cp: usize,
        prompt: &[u32],
        max_new: usize,
        mlp_rows: usize,
    ) -> Vec<(usize, Vec<u32>, Vec<Vec<f32>>, Vec<u64>, Vec<f64>, Vec<f64>)> {
        ThreadComm::run(tp * cp, |world| {
            let b = CpuBackend::<f64>::new();
            let topo = Topology::new(&world, tp, cp).unwrap();
            let m = tiny_shard(&b, topo.shard());
            let mut s = Session::new(&b, &m, &topo.tp, &topo.cp);
            s.set_page_rows(3);
            s.set_mlp_rows(mlp_rows);
            let g = generate(&mut s, prompt, max_new, &Sampling::Greedy, &[], true).unwrap();
            let (k, v) = s.cache().read_layer(&b, 1);
            let pos = s.cache().positions().to_vec();
            (topo.tp_rank, g.tokens, g.logits, pos, k, v)
        })
    }

    #[test]
    fn tp_and_cp_generation_equals_one_rank() {
        // Against one rank holding the whole model (itself checked against the training forward
        // above): every rank's tokens, the logits of every step, and each cached key/value row
        // (this TP rank's heads of the one-rank row of its position). The MLP runs in chunks of
        // 3 rows under TP/CP, in one piece on one rank.
        let max_new = 7;
        for len in [13usize, 16, 5] {
            let prompt = tokens(len, 4);
            let one = run_layout(1, 1, &prompt, max_new, 2048);
            let (_, ref_tokens, ref_logits, ref_pos, ref_k, ref_v) = &one[0];
            assert_eq!(ref_tokens.len(), max_new);
            // Decoding feeds back all but the last token.
            assert_eq!(ref_pos.len(), len + max_new - 1);
            let kvw = ref_k.len() / ref_pos.len();
            for (tp, cp) in [(2usize, 1usize), (1, 2), (2, 2), (2, 3)] {
                let ranks = run_layout(tp, cp, &prompt, max_new, 3);
                let w = kvw / tp;
                let mut seen = vec![0usize; ref_pos.len()];
                let mut worst = 0f64;
                for (r, (tr, toks, logits, pos, k, v)) in ranks.iter().enumerate() {
                    assert_eq!(toks, ref_tokens, "len {len} tp {tp} cp {cp} rank {r}");
                    assert_eq!(logits.len(), ref_logits.len());
                    for (i, (a, e)) in logits.iter().zip(ref_logits).enumerate() {
                        assert_eq!(a.len(), e.len());
                        let err = rel64(a, e);
                        worst = worst.max(err);
                        assert!(
                            err < 1e-12,
                            "len {len} tp {tp} cp {cp} rank {r} step {i}: {err:e}"
                        );
                    }
                    assert_eq!(k.len(), pos.len() * w);
                    for (j, &p) in pos.iter().enumerate() {
                        if *tr == 0 {
                            seen[p as usize] += 1;
                        }
                        let one_k = &ref_k[p as usize * kvw + tr * w..][..w];
                        let one_v = &ref_v[p as usize * kvw + tr * w..][..w];
                        let (a, av) = (&k[j * w..][..w], &v[j * w..][..w]);
                        for (x, y) in a.iter().zip(one_k).chain(av.iter().zip(one_v)) {
                            assert!(
                                (x - y).abs() < 1e-12 * (1.0 + y.abs()),
                                "len {len} tp {tp} cp {cp} rank {r} pos {p}"
                            );
                        }
                    }
                }
                // Each position cached once per TP rank: on exactly one CP rank.
                assert!(
                    seen.iter().all(|&n| n == 1),
                    "len {len} tp {tp} cp {cp}: rows held {seen:?}"
                );
                assert_eq!(w * tp, kvw);
                eprintln!(
                    "len {len} tp {tp} cp {cp}: worst relative logit error vs one rank {worst:.2e}"
                );
            }
        }
    }

    #[test]
    fn tp_and_cp_row_losses_equal_one_rank() {
        let ids = tokens(24, 6);
        let run = |tp: usize, cp: usize| -> Vec<Vec<f64>> {
            ThreadComm::run(tp * cp, |world| {
                let b = CpuBackend::<f64>::new();
                let topo = Topology::new(&world, tp, cp).unwrap();
                let m = tiny_shard(&b, topo.shard());
                crate::eval::ppl::sequence_losses(&b, &m, &topo.tp, &topo.cp, &ids).unwrap()
            })
        };
        let one = run(1, 1).remove(0);
        assert!(one[23].is_nan() && one[..23].iter().all(|x| x.is_finite()));
        for (tp, cp) in [(2usize, 1usize), (1, 2), (2, 2), (2, 3)] {
            for (r, got) in run(tp, cp).iter().enumerate() {
                assert!(got[23].is_nan(), "tp {tp} cp {cp} rank {r}");
                for (i, (a, e)) in got[..23].iter().zip(&one[..23]).enumerate() {
                    assert!(
                        (a - e).abs() < 1e-12 * e.abs(),
                        "tp {tp} cp {cp} rank {r} row {i}: {a} vs {e}"
                    );
                }
            }
        }
    }
}
