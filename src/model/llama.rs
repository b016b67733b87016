//! The Llama decoder: explicit forward and backward of one layer side by side (no autograd, as
//! llm.c), the whole-model pass over one sequence, and the chunked LM head + cross-entropy —
//! written once for one rank or many (tensor, sequence and context parallel).
//!
//! One training pass over this rank's `t` local tokens (its zigzag chunks when cp > 1):
//!   embed → L × [RMSNorm → q,k,v → RoPE → ring attention → o (+res) → RMSNorm →
//!   gate,up → SwiGLU → down (+res)] → RMSNorm → LM head + CE in chunks of tokens
//! and back. Under TP the residual stream, norms and their inputs are sequence-sharded (`ts = t/tp`
//! rows per TP rank); `gather_seq` before each column-parallel block (q/k/v, gate/up, LM head),
//! `reduce_scatter_seq` after each row-parallel one (o, down, embedding) — `parallel::tensor`.
//! Attention runs over the CP ring (`parallel::context`); with cp = tp = 1 every collective is
//! the identity and nothing is copied.
//!
//! Layer inputs are always kept (`Workspace::xs`); the rest of a layer's activations are kept
//! for every layer, or — with full recompute — for one layer at a time, recomputed from its input
//! during the backward pass. All buffers are allocated once, in `Workspace::new`.
//!
//! Inference runs the same layer, embedding and LM head forward only (`Llama::forward_only`, one
//! layer's activations alive, the MLP in row chunks) with its attention plugged in (`Attention`):
//! training and prefill attend over the CP ring (`RingAttention`); `model::infer` also keeps the
//! keys and values and decodes against them. Decode's one row is not split over TP
//! (`Dims::unsplit`): every TP rank holds it, and the row-parallel blocks all-reduce (`reduce`)
//! instead of reduce-scattering.

use crate::backend::timed::Annotation;
use crate::backend::{Backend, NOT_IN_SHARD, TARGET_ELSEWHERE, TARGET_IGNORE};
use crate::model::config::ModelConfig;
use crate::model::params::{
    EMBED, LayerTensor as LT, ParamStore, Shard, final_norm_index, layer_index, lm_head_index,
};
use crate::model::rope::Rope;
use crate::parallel::comm::Comm;
use crate::parallel::context::{
    RingScratch, RingShape, ring_attention_backward, ring_attention_forward,
};
use crate::parallel::tensor::{
    gather_seq_backward, gather_seq_forward, reduce_forward, reduce_scatter_seq_backward,
    reduce_scatter_seq_forward,
};
use crate::parallel::topology::Topology;

/// Sizes of one pass on one rank, taken from the config and the rank's shard.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    /// Local tokens (this CP rank's chunks; the whole sequence with cp = 1).
    pub t: usize,
    /// Rows of the residual stream on this TP rank: `t / tp` (sequence parallel), or `t`.
    pub ts: usize,
    pub tp: usize,
    /// The residual stream's rows are split over TP (sequence parallelism: training, prefill,
    /// evaluation); false when every TP rank holds all `t` rows (`unsplit`: decode).
    pub sp: bool,
    pub hidden: usize,
    /// Per-TP-rank FFN width, query heads, KV heads and vocabulary rows.
    pub ffn: usize,
    pub n_q: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// First vocabulary row of this rank's shard.
    pub vocab_off: usize,
    pub layers: usize,
    pub eps: f64,
}

impl Dims {
    pub fn new(cfg: &ModelConfig, t: usize) -> Self {
        Self::local(cfg, t, Shard::WHOLE)
    }

    /// The sizes `shard` of a TP group sees for `t` local tokens.
    pub fn local(cfg: &ModelConfig, t: usize, shard: Shard) -> Self {
        let tp = shard.size;
        assert!(
            t.is_multiple_of(tp),
            "{t} local tokens do not split over tp {tp}"
        );
        Self::build(cfg, t, t / tp, shard)
    }

    /// The sizes `shard` sees for `t` rows that every TP rank holds whole (no sequence split:
    /// decode's one row).
    pub fn unsplit(cfg: &ModelConfig, t: usize, shard: Shard) -> Self {
        Self::build(cfg, t, t, shard)
    }

    fn build(cfg: &ModelConfig, t: usize, ts: usize, shard: Shard) -> Self {
        let tp = shard.size;
        let vocab = cfg.vocab_size / tp;
        Dims {
            t,
            ts,
            tp,
            sp: ts < t,
            hidden: cfg.hidden_size,
            ffn: cfg.intermediate_size / tp,
            n_q: cfg.num_attention_heads / tp,
            n_kv: cfg.num_key_value_heads / tp,
            head_dim: cfg.head_dim,
            vocab,
            vocab_off: shard.rank * vocab,
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
    /// Whether a column-parallel block gathers its input rows over TP.
    fn gathers(&self) -> bool {
        self.tp > 1 && self.sp
    }
    /// The local shapes of this pass's attention.
    pub fn ring(&self) -> RingShape {
        RingShape {
            t: self.t,
            n_q: self.n_q,
            n_kv: self.n_kv,
            head_dim: self.head_dim,
        }
    }
}

/// Everything one layer's backward pass needs from its forward pass.
pub struct LayerActs<B: Backend> {
    xn1: B::Buf,
    rstd1: B::Buf,
    /// `xn1` gathered over the TP group (`[t, hidden]`); absent when tp = 1.
    xn1f: Option<B::Buf>,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    lse: B::Buf,
    x_mid: B::Buf,
    xn2: B::Buf,
    rstd2: B::Buf,
    xn2f: Option<B::Buf>,
    /// `[mlp_rows, ffn]`: all `t` rows in training (kept for the backward pass), a chunk of
    /// rows in a forward-only pass.
    gate: B::Buf,
    up: B::Buf,
    h: B::Buf,
    mlp_rows: usize,
}

impl<B: Backend> LayerActs<B> {
    /// One layer's activations from the workspace table; the MLP buffers hold `mlp_rows` rows
    /// (all `t` in training, as the table says; a chunk in a forward-only pass).
    fn new(b: &B, table: &WorkspaceTable, d: &Dims, mlp_rows: usize) -> Self {
        let mlp = |name| {
            if mlp_rows == d.t {
                table.alloc(b, name)
            } else {
                b.zeros(mlp_rows * d.ffn)
            }
        };
        LayerActs {
            xn1: table.alloc(b, "xn1"),
            rstd1: table.alloc(b, "rstd1"),
            xn1f: table.alloc_opt(b, "xn1f"),
            q: table.alloc(b, "q"),
            k: table.alloc(b, "k"),
            v: table.alloc(b, "v"),
            attn: table.alloc(b, "attn"),
            lse: table.alloc(b, "lse"),
            x_mid: table.alloc(b, "x_mid"),
            xn2: table.alloc(b, "xn2"),
            rstd2: table.alloc(b, "rstd2"),
            xn2f: table.alloc_opt(b, "xn2f"),
            gate: mlp("gate"),
            up: mlp("up"),
            h: mlp("h"),
            mlp_rows,
        }
    }
}

/// Gradient scratch shared by all layers in the backward pass.
struct GradScratch<B: Backend> {
    /// ∂L/∂(residual stream) `[ts, hidden]`.
    dx: B::Buf,
    /// ∂L/∂(norm output) `[ts, hidden]`.
    dxn: B::Buf,
    /// Full-sequence (`[t, hidden]`) forms under TP: the gathered output gradient of a
    /// row-parallel block, and the partial input gradient of a column-parallel block.
    dfull: Option<B::Buf>,
    dxnf: Option<B::Buf>,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    dattn: B::Buf,
    dgate: B::Buf,
    dup: B::Buf,
    dh: B::Buf,
}

/// The element class of a workspace buffer; the memory model (`plan`) gives each its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    /// Activations and their gradients.
    Act,
    /// Per-row statistics: RMSNorm `rstd`, attention LSE.
    Stat,
    Logits,
    /// cos/sin tables.
    Rope,
}

/// How many copies of a buffer a rank holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copies {
    Once,
    /// One per layer input and one for the final norm's: `L + 1`.
    LayerInputs,
    /// One activation set per layer, or one reused by every layer under full recompute.
    ActSets,
}

impl Copies {
    pub fn count(self, layers: usize, recompute: bool) -> usize {
        match self {
            Copies::Once => 1,
            Copies::LayerInputs => layers + 1,
            Copies::ActSets if recompute => 1,
            Copies::ActSets => layers,
        }
    }
}

/// One row of the workspace's buffer table: `names.len()` buffers of one shape and class, each
/// held `copies` times.
#[derive(Clone, Debug)]
pub struct WorkspaceBuffer {
    pub group: &'static str,
    /// The buffers' names as `Workspace` allocates them.
    pub names: &'static [&'static str],
    /// What the memory model prints for the row.
    pub label: &'static str,
    pub copies: Copies,
    /// Symbolic and numeric shape of one buffer (its elements are the product).
    pub dims: Vec<(&'static str, usize)>,
    pub elem: Elem,
}

impl WorkspaceBuffer {
    pub fn elems(&self) -> usize {
        self.dims.iter().map(|&(_, n)| n).product()
    }
}

/// Tokens per LM-head / cross-entropy chunk for `t` local tokens.
fn ce_rows(ce_chunk: usize, t: usize) -> usize {
    ce_chunk.clamp(1, t.max(1))
}

/// The buffers of `Workspace::for_rank` for the sizes `d` (the CP ring's scratch aside:
/// `parallel::context::RingScratch`), in the order `plan` prints them. The one table that both
/// the allocation and the memory model (`plan::memory`) read, as llm.c's
/// `fill_in_activation_sizes` feeds its allocation and its accounting. TP-only rows (the
/// gathered `[t, hidden]` forms) are absent when tp = 1.
pub fn workspace_buffers(d: &Dims, ce_chunk: usize) -> Vec<WorkspaceBuffer> {
    let (t, ts, h) = (d.t, d.ts, d.hidden);
    // The gathered copies exist where the residual stream is split over TP (sequence
    // parallelism); a forward-only pass over rows every rank holds whole has none.
    let (qw, kvw, ffn, tp) = (d.q_width(), d.kv_width(), d.ffn, d.gathers());
    let row = |group, names, label, copies, dims: &[(&'static str, usize)], elem| WorkspaceBuffer {
        group,
        names,
        label,
        copies,
        dims: dims.to_vec(),
        elem,
    };
    let (la, ws, gs) = ("layer activations", "workspace", "gradient scratch");
    let (once, sets) = (Copies::Once, Copies::ActSets);
    let tsh = [("ts", ts), ("hidden", h)];
    let th = [("t", t), ("hidden", h)];
    let tq = [("t", t), ("heads/tp·d", qw)];
    let tkv = [("t", t), ("kv/tp·d", kvw)];
    let tf = [("t", t), ("ffn/tp", ffn)];
    let mut v = vec![
        row(
            "layer inputs",
            &["xs"],
            "xs: layer inputs + final-norm input",
            Copies::LayerInputs,
            &tsh,
            Elem::Act,
        ),
        row(
            la,
            &["xn1", "x_mid", "xn2"],
            "xn1, x_mid, xn2",
            sets,
            &tsh,
            Elem::Act,
        ),
        row(
            la,
            &["rstd1", "rstd2"],
            "rstd1, rstd2",
            sets,
            &[("ts", ts)],
            Elem::Stat,
        ),
    ];
    if tp {
        let label = "xn1f, xn2f (gathered over TP)";
        v.push(row(la, &["xn1f", "xn2f"], label, sets, &th, Elem::Act));
    }
    v.extend([
        row(la, &["q", "attn"], "q, attn", sets, &tq, Elem::Act),
        row(la, &["k", "v"], "k, v", sets, &tkv, Elem::Act),
        row(
            la,
            &["lse"],
            "lse",
            sets,
            &[("heads/tp", d.n_q), ("t", t)],
            Elem::Stat,
        ),
        row(
            la,
            &["gate", "up", "h"],
            "gate, up, h",
            sets,
            &tf,
            Elem::Act,
        ),
        row(ws, &["xf"], "xf (final norm)", once, &tsh, Elem::Act),
        row(ws, &["rstd_f"], "rstd_f", once, &[("ts", ts)], Elem::Stat),
    ]);
    if tp {
        let label = "xff, part (gathered / partial sums)";
        v.push(row(ws, &["xff", "part"], label, once, &th, Elem::Act));
    }
    let ce = [("ce_chunk", ce_rows(ce_chunk, t)), ("vocab/tp", d.vocab)];
    v.extend([
        row(
            ws,
            &["logits"],
            "logits (one CE chunk)",
            once,
            &ce,
            Elem::Logits,
        ),
        row(
            ws,
            &["cos", "sin"],
            "cos, sin",
            once,
            &[("t", t), ("d/2", d.head_dim / 2)],
            Elem::Rope,
        ),
        row(gs, &["dx", "dxn"], "dx, dxn", once, &tsh, Elem::Act),
    ]);
    if tp {
        v.push(row(
            gs,
            &["dfull", "dxnf"],
            "dfull, dxnf",
            once,
            &th,
            Elem::Act,
        ));
    }
    v.extend([
        row(gs, &["dq", "dattn"], "dq, dattn", once, &tq, Elem::Act),
        row(gs, &["dk", "dv"], "dk, dv", once, &tkv, Elem::Act),
        row(
            gs,
            &["dgate", "dup", "dh"],
            "dgate, dup, dh",
            once,
            &tf,
            Elem::Act,
        ),
    ]);
    v
}

/// [`workspace_buffers`] for allocation: a buffer by name.
struct WorkspaceTable(Vec<WorkspaceBuffer>);

impl WorkspaceTable {
    fn row(&self, name: &str) -> Option<&WorkspaceBuffer> {
        self.0.iter().find(|r| r.names.contains(&name))
    }

    fn alloc<B: Backend>(&self, b: &B, name: &str) -> B::Buf {
        let r = self.row(name);
        let n = r
            .unwrap_or_else(|| panic!("workspace buffer {name} is not in workspace_buffers"))
            .elems();
        b.zeros_named(n, &format!("workspace {name}"))
    }

    /// A buffer that exists only for some layouts (tp > 1).
    fn alloc_opt<B: Backend>(&self, b: &B, name: &str) -> Option<B::Buf> {
        self.row(name)
            .map(|r| b.zeros_named(r.elems(), &format!("workspace {name}")))
    }
}

/// All activation memory of one pass over `t` local tokens, allocated once per run from
/// [`workspace_buffers`].
pub struct Workspace<B: Backend> {
    pub dims: Dims,
    pub recompute: bool,
    /// Layer inputs `xs[l]` (and `xs[L]`, the input of the final norm), `[ts, hidden]`.
    xs: Vec<B::Buf>,
    /// One set per layer, or a single set reused by every layer under full recompute.
    acts: Vec<LayerActs<B>>,
    xf: B::Buf,
    rstd_f: B::Buf,
    /// `xf` gathered over TP (`[t, hidden]`), absent when tp = 1.
    xff: Option<B::Buf>,
    /// Partial sums of a row-parallel block before its reduce-scatter (`[t, hidden]`), tp > 1.
    part: Option<B::Buf>,
    logits: B::Buf,
    pub ce_chunk: usize,
    cos: B::Buf,
    sin: B::Buf,
    /// Positions the cos/sin tables were built for.
    rope_positions: Vec<u64>,
    ring: Option<RingScratch<B>>,
    grads: GradScratch<B>,
}

impl<B: Backend> Workspace<B> {
    /// One rank alone: `t` tokens. `ce_chunk`: tokens per LM-head/cross-entropy chunk (at most
    /// `ce_chunk × vocab` logits live).
    pub fn new(b: &B, cfg: &ModelConfig, t: usize, recompute: bool, ce_chunk: usize) -> Self {
        Self::for_rank(b, cfg, &Topology::single(), t, recompute, ce_chunk)
    }

    /// This rank's workspace for `t` local tokens (the sequence length / cp).
    pub fn for_rank(
        b: &B,
        cfg: &ModelConfig,
        topo: &Topology,
        t: usize,
        recompute: bool,
        ce_chunk: usize,
    ) -> Self {
        let d = Dims::local(cfg, t, topo.shard());
        let table = WorkspaceTable(workspace_buffers(&d, ce_chunk));
        let z = |name| table.alloc(b, name);
        let opt = |name| table.alloc_opt(b, name);
        let n_sets = Copies::ActSets.count(d.layers, recompute);
        Workspace {
            dims: d,
            recompute,
            xs: (0..Copies::LayerInputs.count(d.layers, recompute))
                .map(|_| z("xs"))
                .collect(),
            acts: (0..n_sets)
                .map(|_| LayerActs::new(b, &table, &d, t))
                .collect(),
            xf: z("xf"),
            rstd_f: z("rstd_f"),
            xff: opt("xff"),
            part: opt("part"),
            logits: z("logits"),
            ce_chunk: ce_rows(ce_chunk, t),
            cos: z("cos"),
            sin: z("sin"),
            rope_positions: Vec::new(),
            ring: RingScratch::new(b, &d.ring(), topo.layout.cp),
            grads: GradScratch {
                dx: z("dx"),
                dxn: z("dxn"),
                dfull: opt("dfull"),
                dxnf: opt("dxnf"),
                dq: z("dq"),
                dk: z("dk"),
                dv: z("dv"),
                dattn: z("dattn"),
                dgate: z("dgate"),
                dup: z("dup"),
                dh: z("dh"),
            },
        }
    }

    fn act_set(&self, layer: usize) -> usize {
        if self.recompute { 0 } else { layer }
    }
}

/// `y [rows, out] = x [rows, in] · Wᵀ` for an HF weight `W [out, in]`.
#[allow(clippy::too_many_arguments)]
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

/// How a layer's attention runs, given the pass's rows after RoPE: `q [t, n_q, d]`, `k`, `v
/// [t, n_kv, d]` (this TP rank's heads) → `out [t, n_q, d]`, `lse [n_q, t]`. Training and prefill
/// attend causally over the rows across the CP ring (`RingAttention`); inference also keeps the
/// keys and values and decodes against them (`model::infer`).
pub trait Attention<B: Backend> {
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
    );
}

/// Causal attention over the pass's rows across the CP ring (`parallel::context`), forward and
/// backward.
pub struct RingAttention<'a, B: Backend, C: Comm> {
    pub cp: &'a C,
    /// The ring's buffers (none when cp = 1).
    pub scratch: Option<&'a mut RingScratch<B>>,
}

impl<B: Backend, C: Comm> Attention<B> for RingAttention<'_, B, C> {
    fn attend(
        &mut self,
        b: &B,
        _layer: usize,
        s: &RingShape,
        scale: f64,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        out: &mut B::Buf,
        lse: &mut B::Buf,
    ) {
        let scratch = self.scratch.as_deref_mut();
        ring_attention_forward(b, self.cp, s, scale, q, k, v, out, lse, scratch);
    }
}

/// Everything a layer pass reads besides its buffers.
struct Ctx<'a, B: Backend, C: Comm> {
    b: &'a B,
    d: &'a Dims,
    tp: &'a C,
    cos: &'a B::Buf,
    sin: &'a B::Buf,
}

/// Sum the partial rows of a row-parallel block (or the vocab-parallel embedding) over TP into
/// this rank's rows `out`: `reduce_scatter_seq` when the rows are split, else `reduce`.
fn sum_partials<B: Backend, C: Comm>(
    b: &B,
    tp: &C,
    d: &Dims,
    partial: &B::Buf,
    out: &mut B::Buf,
    accumulate: bool,
) {
    let n = d.ts * d.hidden;
    if d.sp {
        reduce_scatter_seq_forward(b, tp, partial, n, out, accumulate);
    } else {
        reduce_forward(b, tp, partial, n, out, accumulate);
    }
}

impl<B: Backend, C: Comm> Ctx<'_, B, C> {
    /// `gather_seq` forward into `full` (tp > 1, rows split), returning the full-sequence input
    /// of a column-parallel block.
    fn gathered<'x>(&self, local: &'x B::Buf, full: &'x mut Option<B::Buf>) -> &'x B::Buf {
        match full {
            Some(f) => {
                gather_seq_forward(self.b, self.tp, local, self.d.ts * self.d.hidden, f);
                f
            }
            None => local,
        }
    }

    /// A row-parallel block with its residual: `out = residual + Σ_TP (partial products)`, where
    /// `products(y, acc)` writes (or, with `acc`, adds) the block's `[t, hidden]` products into
    /// `y` — `out` itself when tp = 1, else the partial-sum buffer.
    fn row_parallel(
        &self,
        residual: &B::Buf,
        out: &mut B::Buf,
        part: &mut Option<B::Buf>,
        products: impl FnOnce(&mut B::Buf, bool),
    ) {
        let (b, d) = (self.b, self.d);
        b.copy(residual, 0, out, 0, d.ts * d.hidden);
        match part {
            None => products(out, true),
            Some(p) => {
                products(p, false);
                sum_partials(b, self.tp, d, p, out, true);
            }
        }
    }
}

/// One decoder layer forward: `x_out = layer(x_in)`, filling `a`; attention by `attn`. The MLP
/// runs `a.mlp_rows` rows at a time (all rows in training).
fn layer_forward<B: Backend, C: Comm>(
    c: &Ctx<'_, B, C>,
    p: &ParamStore<B>,
    l: usize,
    x_in: &B::Buf,
    a: &mut LayerActs<B>,
    x_out: &mut B::Buf,
    part: &mut Option<B::Buf>,
    attn: &mut dyn Attention<B>,
) {
    let (b, d) = (c.b, c.d);
    let w = |t: LT| &p.bufs[layer_index(l, t)];
    let (t, ts, h) = (d.t, d.ts, d.hidden);
    b.rmsnorm_forward(
        x_in,
        w(LT::AttnNorm),
        d.eps,
        ts,
        h,
        &mut a.xn1,
        &mut a.rstd1,
    );
    let xn1 = c.gathered(&a.xn1, &mut a.xn1f);
    linear(b, &mut a.q, xn1, w(LT::Q), t, d.q_width(), h, false);
    linear(b, &mut a.k, xn1, w(LT::K), t, d.kv_width(), h, false);
    linear(b, &mut a.v, xn1, w(LT::V), t, d.kv_width(), h, false);
    b.rope_forward(&mut a.q, c.cos, c.sin, t, d.n_q, d.head_dim);
    b.rope_forward(&mut a.k, c.cos, c.sin, t, d.n_kv, d.head_dim);
    let scale = 1.0 / (d.head_dim as f64).sqrt();
    attn.attend(
        b,
        l,
        &d.ring(),
        scale,
        &a.q,
        &a.k,
        &a.v,
        &mut a.attn,
        &mut a.lse,
    );
    c.row_parallel(x_in, &mut a.x_mid, part, |y, acc| {
        linear(b, y, &a.attn, w(LT::O), t, h, d.q_width(), acc)
    });
    b.rmsnorm_forward(
        &a.x_mid,
        w(LT::MlpNorm),
        d.eps,
        ts,
        h,
        &mut a.xn2,
        &mut a.rstd2,
    );
    let xn2 = c.gathered(&a.xn2, &mut a.xn2f);
    let (gate, up, act, ch) = (&mut a.gate, &mut a.up, &mut a.h, a.mlp_rows);
    c.row_parallel(&a.x_mid, x_out, part, |y, acc| {
        for r0 in (0..t).step_by(ch) {
            let m = ch.min(t - r0);
            b.gemm(
                gate,
                0,
                xn2,
                r0 * h,
                w(LT::Gate),
                0,
                m,
                d.ffn,
                h,
                false,
                true,
                false,
            );
            b.gemm(
                up,
                0,
                xn2,
                r0 * h,
                w(LT::Up),
                0,
                m,
                d.ffn,
                h,
                false,
                true,
                false,
            );
            // A short last chunk leaves stale rows past `m`: computed, never read.
            b.swiglu_forward(gate, up, act);
            b.gemm(
                y,
                r0 * h,
                act,
                0,
                w(LT::Down),
                0,
                m,
                h,
                d.ffn,
                false,
                true,
                acc,
            );
        }
    });
}

/// `reduce_scatter_seq` backward: the full-sequence gradient of a row-parallel block's output.
fn gathered_grad<'x, B: Backend, C: Comm>(
    c: &Ctx<'_, B, C>,
    dlocal: &'x B::Buf,
    dfull: &'x mut Option<B::Buf>,
) -> &'x B::Buf {
    match dfull {
        Some(f) => {
            reduce_scatter_seq_backward(c.b, c.tp, dlocal, c.d.ts * c.d.hidden, f);
            f
        }
        None => dlocal,
    }
}

/// One decoder layer backward. On entry `g.dx` holds ∂L/∂x_out, on exit ∂L/∂x_in; parameter
/// gradients are accumulated into `grads`.
fn layer_backward<B: Backend, C: Comm>(
    c: &Ctx<'_, B, C>,
    p: &ParamStore<B>,
    grads: &mut ParamStore<B>,
    l: usize,
    x_in: &B::Buf,
    a: &LayerActs<B>,
    g: &mut GradScratch<B>,
    ring: &mut RingAttention<'_, B, C>,
) {
    let (b, d) = (c.b, c.d);
    let w = |t: LT| &p.bufs[layer_index(l, t)];
    let gi = |t: LT| layer_index(l, t);
    let (t, ts, h) = (d.t, d.ts, d.hidden);
    let xn2 = a.xn2f.as_ref().unwrap_or(&a.xn2);
    let xn1 = a.xn1f.as_ref().unwrap_or(&a.xn1);
    // MLP: x_out = x_mid + down(swiglu(gate(xn2), up(xn2))).
    {
        let dy = gathered_grad(c, &g.dx, &mut g.dfull);
        linear_backward(
            b,
            dy,
            &a.h,
            w(LT::Down),
            &mut g.dh,
            &mut grads.bufs[gi(LT::Down)],
            t,
            h,
            d.ffn,
            false,
        );
    }
    b.swiglu_backward(&a.gate, &a.up, &g.dh, &mut g.dgate, &mut g.dup);
    {
        let dxn = g.dxnf.as_mut().unwrap_or(&mut g.dxn);
        let (gate, up) = (gi(LT::Gate), gi(LT::Up));
        linear_backward(
            b,
            &g.dgate,
            xn2,
            w(LT::Gate),
            dxn,
            &mut grads.bufs[gate],
            t,
            d.ffn,
            h,
            false,
        );
        linear_backward(
            b,
            &g.dup,
            xn2,
            w(LT::Up),
            dxn,
            &mut grads.bufs[up],
            t,
            d.ffn,
            h,
            true,
        );
    }
    if let Some(f) = &g.dxnf {
        gather_seq_backward(b, c.tp, f, ts * h, &mut g.dxn, false);
    }
    b.rmsnorm_backward(
        &g.dxn,
        &a.x_mid,
        w(LT::MlpNorm),
        &a.rstd2,
        ts,
        h,
        &mut g.dx,
        &mut grads.bufs[gi(LT::MlpNorm)],
    );
    // Attention: x_mid = x_in + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))).
    {
        let dy = gathered_grad(c, &g.dx, &mut g.dfull);
        linear_backward(
            b,
            dy,
            &a.attn,
            w(LT::O),
            &mut g.dattn,
            &mut grads.bufs[gi(LT::O)],
            t,
            h,
            d.q_width(),
            false,
        );
    }
    let scale = 1.0 / (d.head_dim as f64).sqrt();
    ring_attention_backward(
        b,
        ring.cp,
        &d.ring(),
        scale,
        &a.q,
        &a.k,
        &a.v,
        &a.attn,
        &g.dattn,
        &a.lse,
        &mut g.dq,
        &mut g.dk,
        &mut g.dv,
        ring.scratch.as_deref_mut(),
    );
    b.rope_backward(&mut g.dq, c.cos, c.sin, t, d.n_q, d.head_dim);
    b.rope_backward(&mut g.dk, c.cos, c.sin, t, d.n_kv, d.head_dim);
    {
        let dxn = g.dxnf.as_mut().unwrap_or(&mut g.dxn);
        let (q, k, v) = (gi(LT::Q), gi(LT::K), gi(LT::V));
        linear_backward(
            b,
            &g.dq,
            xn1,
            w(LT::Q),
            dxn,
            &mut grads.bufs[q],
            t,
            d.q_width(),
            h,
            false,
        );
        linear_backward(
            b,
            &g.dk,
            xn1,
            w(LT::K),
            dxn,
            &mut grads.bufs[k],
            t,
            d.kv_width(),
            h,
            true,
        );
        linear_backward(
            b,
            &g.dv,
            xn1,
            w(LT::V),
            dxn,
            &mut grads.bufs[v],
            t,
            d.kv_width(),
            h,
            true,
        );
    }
    if let Some(f) = &g.dxnf {
        gather_seq_backward(b, c.tp, f, ts * h, &mut g.dxn, false);
    }
    b.rmsnorm_backward(
        &g.dxn,
        x_in,
        w(LT::AttnNorm),
        &a.rstd1,
        ts,
        h,
        &mut g.dx,
        &mut grads.bufs[gi(LT::AttnNorm)],
    );
}

/// What to do with the logits of each chunk of the LM head.
pub enum Head<'a> {
    /// Cross-entropy against `targets` (one per local token; negative = not counted); the
    /// gradient of `grad_scale × Σ loss` is back-propagated when parameter gradients are
    /// requested.
    Loss { targets: &'a [i32], grad_scale: f64 },
    /// Append the logits `[t, vocab]` of the local tokens (all of the vocabulary, gathered over
    /// TP) to a host vector (for `forward --out`); no loss.
    Logits(&'a mut Vec<f32>),
}

/// A Llama model over backend `B`: config, RoPE tables generator, parameters (this rank's shard).
pub struct Llama<B: Backend> {
    pub cfg: ModelConfig,
    pub rope: Rope,
    pub params: ParamStore<B>,
}

/// Vocab-parallel embedding of `ids` into this rank's rows `out [ts, hidden]`: each TP rank looks
/// up the ids of its vocabulary shard (rows of other shards are zero) and the partial rows are
/// summed over TP. Returns the shard-local ids (for the backward pass).
fn embed<B: Backend, C: Comm>(
    b: &B,
    tp: &C,
    d: &Dims,
    table: &B::Buf,
    ids: &[u32],
    part: &mut Option<B::Buf>,
    out: &mut B::Buf,
) -> Vec<u32> {
    let local_ids: Vec<u32> = ids
        .iter()
        .map(|&i| {
            let i = i as usize;
            if i >= d.vocab_off && i < d.vocab_off + d.vocab {
                (i - d.vocab_off) as u32
            } else if d.tp == 1 {
                i as u32 // out of range: the kernel names it
            } else {
                NOT_IN_SHARD
            }
        })
        .collect();
    match part {
        None => b.embedding_forward(table, &local_ids, d.hidden, out),
        Some(p) => {
            b.embedding_forward(table, &local_ids, d.hidden, p);
            sum_partials(b, tp, d, p, out, false);
        }
    }
    local_ids
}

/// The final RMSNorm of this rank's rows `x [ts, hidden]` into `xf` (and its `rstd`), gathered
/// over TP into `xff` when the rows are split: the normed hidden states of all `t` rows.
fn final_norm<'x, B: Backend, C: Comm>(
    b: &B,
    tp: &C,
    d: &Dims,
    w: &B::Buf,
    x: &B::Buf,
    xf: &'x mut B::Buf,
    rstd: &mut B::Buf,
    xff: &'x mut Option<B::Buf>,
) -> &'x B::Buf {
    b.rmsnorm_forward(x, w, d.eps, d.ts, d.hidden, xf, rstd);
    match xff {
        Some(f) => {
            gather_seq_forward(b, tp, xf, d.ts * d.hidden, f);
            f
        }
        None => xf,
    }
}

/// The LM head over rows `r0 .. r0+rows` of the normed hidden states `xf [t, hidden]` (all rows,
/// on every TP rank): this rank's vocabulary shard of their logits, `logits [rows, vocab/tp]`.
fn lm_head_shard<B: Backend>(
    b: &B,
    d: &Dims,
    w: &B::Buf,
    xf: &B::Buf,
    r0: usize,
    rows: usize,
    logits: &mut B::Buf,
) {
    let h = d.hidden;
    b.gemm(
        logits,
        0,
        xf,
        r0 * h,
        w,
        0,
        rows,
        d.vocab,
        h,
        false,
        true,
        false,
    );
}

/// The full-vocabulary logits `[rows, vocab]` of a chunk from each TP rank's shard `local`
/// (`[chunk rows, vocab/tp]`, the same length on every rank): all-gathered, shards side by side.
fn full_vocab_logits<C: Comm>(tp: &C, d: &Dims, local: &[f32], rows: usize) -> Vec<f32> {
    if d.tp == 1 {
        return local[..rows * d.vocab].to_vec();
    }
    let mut all = vec![0f32; local.len() * d.tp];
    tp.all_gather(local, &mut all);
    let mut out = Vec::with_capacity(rows * d.vocab * d.tp);
    for r in 0..rows {
        for k in 0..d.tp {
            out.extend_from_slice(&all[k * local.len() + r * d.vocab..][..d.vocab]);
        }
    }
    out
}

/// Shard-local target codes of a chunk's rows (`TARGET_IGNORE` for a negative target,
/// `TARGET_ELSEWHERE` for one in another rank's shard), padded with `TARGET_IGNORE` to `ch` rows.
fn shard_targets(d: &Dims, targets: &[i32], ch: usize) -> Vec<i32> {
    let mut tl: Vec<i32> = targets
        .iter()
        .map(|&x| {
            if x < 0 {
                TARGET_IGNORE
            } else if (x as usize) >= d.vocab_off && (x as usize) < d.vocab_off + d.vocab {
                (x as usize - d.vocab_off) as i32
            } else if d.tp == 1 {
                x // out of range: the kernel names it
            } else {
                TARGET_ELSEWHERE
            }
        })
        .collect();
    tl.resize(ch, TARGET_IGNORE);
    tl
}

/// Cross-entropy of a chunk of shard logits against shard-local targets `tl`, combined over TP:
/// per row the max, the Σexp and the loss (None without a target).
#[allow(clippy::type_complexity)]
fn chunk_ce<B: Backend, C: Comm>(
    b: &B,
    tp: &C,
    d: &Dims,
    logits: &B::Buf,
    tl: &[i32],
) -> (Vec<f64>, Vec<f64>, Vec<Option<f64>>) {
    let stats = b.cross_entropy_stats(logits, tl, d.vocab);
    let parts = if d.tp == 1 {
        vec![stats]
    } else {
        gather_ce_stats(tp, &stats)
    };
    combine_ce_stats(&parts, tl.len())
}

/// Combine per-shard cross-entropy statistics `[max, sum, target]` of each row over the TP group:
/// the global max, sum and loss (None where no shard holds a target).
#[allow(clippy::type_complexity)]
pub(crate) fn combine_ce_stats(
    parts: &[Vec<crate::backend::CeStats>],
    rows: usize,
) -> (Vec<f64>, Vec<f64>, Vec<Option<f64>>) {
    let (mut mx, mut sm, mut loss) = (vec![0.0; rows], vec![0.0; rows], vec![None; rows]);
    for r in 0..rows {
        let m = parts
            .iter()
            .map(|p| p[r].max)
            .fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = parts.iter().map(|p| p[r].sum * (p[r].max - m).exp()).sum();
        let z = parts.iter().find_map(|p| p[r].target);
        mx[r] = m;
        sm[r] = s;
        loss[r] = z.map(|z| s.ln() + m - z);
    }
    (mx, sm, loss)
}

impl<B: Backend> Llama<B> {
    /// Fill the workspace's cos/sin tables for tokens at `positions`.
    fn load_rope_tables(&self, b: &B, ws: &mut Workspace<B>, positions: &[u64]) {
        if ws.rope_positions == positions {
            return;
        }
        ws.rope_positions = positions.to_vec();
        let (cos, sin) = self.rope.cos_sin::<f64>(positions);
        ws.cos = b.upload_f64(&cos);
        ws.sin = b.upload_f64(&sin);
    }

    /// One rank alone: forward over `ids` at positions `pos0..`, then (if `grads` is given and
    /// the head is `Loss`) the backward pass, accumulating into `grads`. Returns Σ loss over
    /// counted targets (0 for `Head::Logits`).
    pub fn forward_backward(
        &self,
        b: &B,
        ws: &mut Workspace<B>,
        ids: &[u32],
        pos0: u64,
        head: Head<'_>,
        grads: Option<&mut ParamStore<B>>,
    ) -> f64 {
        let positions: Vec<u64> = (pos0..pos0 + ids.len() as u64).collect();
        self.forward_backward_rank(b, &Topology::single(), ws, ids, &positions, head, grads)
    }

    /// This rank's part of the pass over one sequence: `ids`/`positions` are its local tokens
    /// (zigzag chunks under CP; the same on every TP rank of a group). Returns Σ loss over this
    /// rank's counted targets (equal on the ranks of a TP group).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_rank(
        &self,
        b: &B,
        topo: &Topology,
        ws: &mut Workspace<B>,
        ids: &[u32],
        positions: &[u64],
        mut head: Head<'_>,
        mut grads: Option<&mut ParamStore<B>>,
    ) -> f64 {
        b.annotate(Annotation::Pass("forward"));
        let d = ws.dims;
        assert!(
            ids.len() == d.t && positions.len() == d.t,
            "forward_backward: {} ids, {} positions for a workspace of {} tokens",
            ids.len(),
            positions.len(),
            d.t
        );
        let p = &self.params;
        self.load_rope_tables(b, ws, positions);
        let (t, ts, h) = (d.t, d.ts, d.hidden);
        // The activation set of each layer (read before the ring scratch is borrowed).
        let sets: Vec<usize> = (0..d.layers).map(|l| ws.act_set(l)).collect();

        let local_ids = embed(
            b,
            &topo.tp,
            &d,
            &p.bufs[EMBED],
            ids,
            &mut ws.part,
            &mut ws.xs[0],
        );
        {
            let c = Ctx {
                b,
                d: &d,
                tp: &topo.tp,
                cos: &ws.cos,
                sin: &ws.sin,
            };
            let mut ring = RingAttention {
                cp: &topo.cp,
                scratch: ws.ring.as_mut(),
            };
            for l in 0..d.layers {
                let set = sets[l];
                let (before, after) = ws.xs.split_at_mut(l + 1);
                layer_forward(
                    &c,
                    p,
                    l,
                    &before[l],
                    &mut ws.acts[set],
                    &mut after[0],
                    &mut ws.part,
                    &mut ring,
                );
            }
        }
        let fnorm = final_norm_index(&self.cfg);
        let xf = final_norm(
            b,
            &topo.tp,
            &d,
            &p.bufs[fnorm],
            &ws.xs[d.layers],
            &mut ws.xf,
            &mut ws.rstd_f,
            &mut ws.xff,
        );

        // LM head + cross-entropy, `ce_chunk` tokens at a time; the chunk's logits buffer is
        // turned into its gradient in place and consumed before the next chunk. Vocab-parallel:
        // each TP rank holds `vocab` rows of the head; per-row max and Σexp are combined over the
        // group, so the full logits are never gathered.
        b.annotate(Annotation::Pass("lm head"));
        let backward = grads.is_some() && matches!(head, Head::Loss { .. });
        let lm = lm_head_index(&self.cfg);
        let dxf_full: &mut B::Buf = ws.grads.dxnf.as_mut().unwrap_or(&mut ws.grads.dxn);
        if backward {
            b.fill_zero(dxf_full);
        }
        let mut loss_sum = 0.0;
        let ch = ws.ce_chunk;
        for r0 in (0..t).step_by(ch) {
            let rows = ch.min(t - r0);
            lm_head_shard(b, &d, &p.bufs[lm], xf, r0, rows, &mut ws.logits);
            match &mut head {
                Head::Logits(out) => {
                    let local = b.download(&ws.logits);
                    out.extend(full_vocab_logits(&topo.tp, &d, &local, rows));
                }
                Head::Loss {
                    targets,
                    grad_scale,
                } => {
                    // The short last chunk's tail rows are ignored.
                    let tl = shard_targets(&d, &targets[r0..r0 + rows], ch);
                    let (mx, sm, loss) = chunk_ce(b, &topo.tp, &d, &ws.logits, &tl);
                    loss_sum += loss.iter().flatten().sum::<f64>();
                    if let Some(g) = grads.as_deref_mut() {
                        b.cross_entropy_grad(&mut ws.logits, &tl, d.vocab, &mx, &sm, *grad_scale);
                        // dxf[rows] = dlogits · W_lm ; dW_lm += dlogitsᵀ · xf[rows]
                        b.gemm(
                            dxf_full,
                            r0 * h,
                            &ws.logits,
                            0,
                            &p.bufs[lm],
                            0,
                            rows,
                            h,
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
                            xf,
                            r0 * h,
                            d.vocab,
                            h,
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

        b.annotate(Annotation::Pass("backward"));
        if let Some(f) = &ws.grads.dxnf {
            gather_seq_backward(b, &topo.tp, f, ts * h, &mut ws.grads.dxn, false);
        }
        b.fill_zero(&mut ws.grads.dx);
        b.rmsnorm_backward(
            &ws.grads.dxn,
            &ws.xs[d.layers],
            &p.bufs[fnorm],
            &ws.rstd_f,
            ts,
            h,
            &mut ws.grads.dx,
            &mut g.bufs[fnorm],
        );
        let c = Ctx {
            b,
            d: &d,
            tp: &topo.tp,
            cos: &ws.cos,
            sin: &ws.sin,
        };
        let mut ring = RingAttention {
            cp: &topo.cp,
            scratch: ws.ring.as_mut(),
        };
        for l in (0..d.layers).rev() {
            let set = sets[l];
            if ws.recompute && l + 1 != d.layers {
                // Full recompute: rebuild this layer's activations from its saved input.
                let mut scratch_out = std::mem::replace(&mut ws.grads.dxn, b.zeros(0));
                layer_forward(
                    &c,
                    p,
                    l,
                    &ws.xs[l],
                    &mut ws.acts[set],
                    &mut scratch_out,
                    &mut ws.part,
                    &mut ring,
                );
                ws.grads.dxn = scratch_out;
            }
            layer_backward(
                &c,
                p,
                g,
                l,
                &ws.xs[l],
                &ws.acts[set],
                &mut ws.grads,
                &mut ring,
            );
        }
        // Embedding backward: the gradient of the reduce-scatter is an all-gather.
        let dx0 = match &mut ws.grads.dfull {
            Some(f) => {
                reduce_scatter_seq_backward(b, &topo.tp, &ws.grads.dx, ts * h, f);
                &*f
            }
            None => &ws.grads.dx,
        };
        b.embedding_backward(&mut g.bufs[EMBED], &local_ids, h, dx0);
        loss_sum
    }

    /// Forward only (inference), through the same embedding, layers and TP pairs as training:
    /// this rank's rows `ids` at `positions` (the same on every TP rank of a group) with sizes
    /// `d` — `Dims::local` (rows split over TP) or `Dims::unsplit` (decode) —, attention by
    /// `attn`, one layer's activations alive at a time and the MLP `mlp_rows` rows at a time.
    /// Returns the hidden states before the final norm: this TP rank's rows, `[d.ts, hidden]`.
    pub fn forward_only<C: Comm>(
        &self,
        b: &B,
        tp: &C,
        d: &Dims,
        ids: &[u32],
        positions: &[u64],
        mlp_rows: usize,
        attn: &mut dyn Attention<B>,
    ) -> B::Buf {
        assert!(
            ids.len() == d.t && positions.len() == d.t,
            "forward_only: {} ids, {} positions for {} rows",
            ids.len(),
            positions.len(),
            d.t
        );
        let p = &self.params;
        let (cos, sin) = self.rope.cos_sin::<f64>(positions);
        let (cos, sin) = (b.upload_f64(&cos), b.upload_f64(&sin));
        let table = WorkspaceTable(workspace_buffers(d, 1));
        let mut acts = LayerActs::new(b, &table, d, mlp_rows.clamp(1, d.t.max(1)));
        let mut part = (d.tp > 1).then(|| b.zeros(d.t * d.hidden));
        let (mut x, mut y) = (b.zeros(d.ts * d.hidden), b.zeros(d.ts * d.hidden));
        embed(b, tp, d, &p.bufs[EMBED], ids, &mut part, &mut x);
        let c = Ctx {
            b,
            d,
            tp,
            cos: &cos,
            sin: &sin,
        };
        for l in 0..d.layers {
            layer_forward(&c, p, l, &x, &mut acts, &mut y, &mut part, attn);
            std::mem::swap(&mut x, &mut y);
        }
        x
    }

    /// The final norm of a forward-only pass's hidden states (`x`, `d` as `forward_only`),
    /// gathered over TP: `[t, hidden]` on every TP rank.
    fn normed_rows<C: Comm>(&self, b: &B, tp: &C, d: &Dims, x: &B::Buf) -> B::Buf {
        let mut xf = b.zeros(d.ts * d.hidden);
        let mut rstd = b.zeros(d.ts);
        let mut xff = d.gathers().then(|| b.zeros(d.t * d.hidden));
        let w = &self.params.bufs[final_norm_index(&self.cfg)];
        final_norm(b, tp, d, w, x, &mut xf, &mut rstd, &mut xff);
        xff.unwrap_or(xf)
    }

    /// Final norm and LM head of local row `row` of a forward-only pass (`x`, `d` as
    /// `forward_only`): the full-vocabulary logits `[vocab]`, on every TP rank (never `[t, vocab]`).
    pub fn logits_of_row<C: Comm>(
        &self,
        b: &B,
        tp: &C,
        d: &Dims,
        x: &B::Buf,
        row: usize,
    ) -> Vec<f32> {
        let xf = self.normed_rows(b, tp, d, x);
        let mut logits = b.zeros(d.vocab);
        let w = &self.params.bufs[lm_head_index(&self.cfg)];
        lm_head_shard(b, d, w, &xf, row, 1, &mut logits);
        full_vocab_logits(tp, d, &b.download(&logits), 1)
    }

    /// Per-row next-token losses (nats; NaN where the target is negative) of a forward-only
    /// pass's `t` rows against `targets`, the LM head `chunk` rows at a time (vocab-parallel: the
    /// logits are never gathered); equal on every TP rank.
    pub fn row_losses<C: Comm>(
        &self,
        b: &B,
        tp: &C,
        d: &Dims,
        x: &B::Buf,
        targets: &[i32],
        chunk: usize,
    ) -> Vec<f64> {
        assert_eq!(targets.len(), d.t, "row_losses: one target per row");
        let xf = self.normed_rows(b, tp, d, x);
        let w = &self.params.bufs[lm_head_index(&self.cfg)];
        let ch = chunk.clamp(1, d.t.max(1));
        let mut logits = b.zeros(ch * d.vocab);
        let mut out = Vec::with_capacity(d.t);
        for r0 in (0..d.t).step_by(ch) {
            let rows = ch.min(d.t - r0);
            lm_head_shard(b, d, w, &xf, r0, rows, &mut logits);
            let tl = shard_targets(d, &targets[r0..r0 + rows], ch);
            let (_, _, loss) = chunk_ce(b, tp, d, &logits, &tl);
            out.extend(loss[..rows].iter().map(|l| l.unwrap_or(f64::NAN)));
        }
        out
    }
}

/// All-gather each TP rank's cross-entropy statistics (3 f64 per row; no target = NaN).
pub(crate) fn gather_ce_stats<C: Comm>(
    tp: &C,
    stats: &[crate::backend::CeStats],
) -> Vec<Vec<crate::backend::CeStats>> {
    let rows = stats.len();
    let send: Vec<f64> = stats
        .iter()
        .flat_map(|s| [s.max, s.sum, s.target.unwrap_or(f64::NAN)])
        .collect();
    let mut all = vec![0f64; send.len() * tp.size()];
    tp.all_gather(&send, &mut all);
    all.chunks(rows * 3)
        .map(|part| {
            part.chunks(3)
                .map(|x| crate::backend::CeStats {
                    max: x[0],
                    sum: x[1],
                    target: (!x[2].is_nan()).then_some(x[2]),
                })
                .collect()
        })
        .collect()
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
