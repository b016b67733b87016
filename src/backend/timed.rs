//! `Timed<B>`: any backend, with the time of every call attributed to a phase — the breakdown of a
//! step (attention forward / recompute / backward, GEMMs, LSE merges, elementwise kernels,
//! communication, host↔device copies, the optimizer) that `gpu-check --only rank4m`, `bench
//! phases` and `plan`'s calibration read.
//!
//! It forwards every call to the inner backend unchanged (same buffers, same numbers) and brackets
//! it with two marks of a [`PhaseClock`]: on the CPU the wall clock (the CPU backend returns when
//! its work is done); on a GPU, events recorded on the backend's stream, resolved after a
//! synchronisation when the report is read — so the marks measure the device's time, not the
//! launch. Model code tells it where a step is with [`Annotation`]s (a no-op on other backends);
//! the communicators' buffer collectives mark themselves as communication.
//!
//! Each call also records what it computes — FLOPs (GEMM `2mnk`; attention by the convention of
//! `flops` below) or elements touched — so a phase's time can be set beside a prediction from
//! measured kernel rates.

use std::sync::Mutex;
use std::time::Instant;

use super::{AdamW, AttnShape, Backend, CeStats};

/// Where a step is, as the model tells its backend (`Backend::annotate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Annotation {
    /// The pass that follows: "forward", "lm head" or "backward" (attention forwards in the
    /// backward pass are recomputation).
    Pass(&'static str),
    /// From here to `CommEnd`, data moves between ranks (`elems` elements leave this rank): one
    /// "communication" span, whatever backend calls (staging copies) happen inside it. The span
    /// is marked on the device's timeline, so a transfer another library issues on the same
    /// stream (NCCL) is inside it too.
    CommBegin {
        elems: usize,
    },
    CommEnd,
}

/// A clock of the device's timeline.
pub trait PhaseClock: Send + Sync {
    /// A mark after all work issued so far; returns its index.
    fn mark(&self) -> usize;
    /// Seconds of every mark since the first, after waiting for the device (index = mark).
    fn resolve(&self) -> Vec<f64>;
    /// Forget every mark.
    fn reset(&self);
}

/// The wall clock: right for backends whose calls return when their work is done (the CPU).
#[derive(Default)]
pub struct HostClock(Mutex<Vec<Instant>>);

impl PhaseClock for HostClock {
    fn mark(&self) -> usize {
        let mut v = self.0.lock().unwrap();
        v.push(Instant::now());
        v.len() - 1
    }
    fn resolve(&self) -> Vec<f64> {
        let v = self.0.lock().unwrap();
        let t0 = v.first().copied();
        v.iter()
            .map(|t| t0.map_or(0.0, |t0| t.duration_since(t0).as_secs_f64()))
            .collect()
    }
    fn reset(&self) {
        self.0.lock().unwrap().clear();
    }
}

/// One phase of a report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PhaseTime {
    pub name: String,
    pub calls: usize,
    pub seconds: f64,
    /// Floating-point operations of the phase's calls (GEMM, attention, merges), by the
    /// convention stated at [`attention_flops`].
    pub flops: f64,
    /// Elements read + written by the phase's calls (elementwise kernels, copies, transfers).
    pub elems: f64,
}

/// The breakdown since the last reset: phases in the order first seen, and the span from the
/// first mark to the last.
#[derive(Clone, Debug, Default)]
pub struct PhaseReport {
    pub phases: Vec<PhaseTime>,
    pub span_seconds: f64,
}

impl PhaseReport {
    pub fn get(&self, name: &str) -> Option<&PhaseTime> {
        self.phases.iter().find(|p| p.name == name)
    }
    /// Seconds inside calls; `span_seconds` minus this is time outside the backend (host code,
    /// waiting for ranks).
    pub fn busy_seconds(&self) -> f64 {
        self.phases.iter().map(|p| p.seconds).sum()
    }
}

struct Call {
    phase: &'static str,
    start: usize,
    end: usize,
    flops: f64,
    elems: f64,
}

#[derive(Default)]
struct State {
    pass: &'static str,
    /// The open communication span: (start mark, elements).
    comm: Option<(usize, usize)>,
    calls: Vec<Call>,
}

/// A backend whose calls are timed by phase (see the module comment).
pub struct Timed<B: Backend> {
    inner: B,
    clock: Box<dyn PhaseClock>,
    state: Mutex<State>,
}

/// FLOPs of one attention call: `4·d` per visible (query, key) pair and query head in the forward
/// (Q·Kᵀ and P·V), the backward 2.5× that (dV, dP, dQ, dK and the recomputed Q·Kᵀ) — the
/// convention of bench/gpu/attn_torch.py and FlashAttention's benchmarks. Visible pairs are
/// counted exactly for the shape's causal offsets.
pub fn attention_flops(s: &AttnShape, backward: bool) -> f64 {
    let pairs: f64 = if s.causal {
        (0..s.q_len as i64)
            .map(|i| {
                // Key j is visible to query i iff k_pos0 + j <= q_pos0 + i.
                (s.q_pos0 + i - s.k_pos0 + 1).clamp(0, s.kv_len as i64) as f64
            })
            .sum()
    } else {
        (s.q_len * s.kv_len) as f64
    };
    let f = crate::flops::attention_kernel_flops_of_pairs(pairs, s.n_q_heads, s.head_dim);
    if backward { f.backward } else { f.forward }
}

impl<B: Backend> Timed<B> {
    pub fn new(inner: B, clock: Box<dyn PhaseClock>) -> Self {
        Timed {
            inner,
            clock,
            state: Mutex::new(State {
                pass: "forward",
                ..State::default()
            }),
        }
    }

    /// On the wall clock (the CPU backend).
    pub fn on_host(inner: B) -> Self {
        Self::new(inner, Box::new(HostClock::default()))
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The breakdown of every call since the last reset (waits for the device).
    pub fn report(&self) -> PhaseReport {
        let t = self.clock.resolve();
        let st = self.state.lock().unwrap();
        let mut out = PhaseReport::default();
        for c in &st.calls {
            let i = match out.phases.iter().position(|p| p.name == c.phase) {
                Some(i) => i,
                None => {
                    out.phases.push(PhaseTime {
                        name: c.phase.to_string(),
                        ..PhaseTime::default()
                    });
                    out.phases.len() - 1
                }
            };
            let p = &mut out.phases[i];
            p.calls += 1;
            p.seconds += t[c.end] - t[c.start];
            p.flops += c.flops;
            p.elems += c.elems;
        }
        out.span_seconds = t.last().copied().unwrap_or(0.0);
        out
    }

    /// Forget every call (e.g. after a warm-up step).
    pub fn reset(&self) {
        self.clock.reset();
        self.state.lock().unwrap().calls.clear();
    }

    /// Run `f` as one call of `phase`, recording its work; inside a communication span it is
    /// part of that span instead.
    fn timed<R>(&self, phase: &'static str, flops: f64, elems: f64, f: impl FnOnce() -> R) -> R {
        if self.state.lock().unwrap().comm.is_some() {
            return f();
        }
        let start = self.clock.mark();
        let r = f();
        let end = self.clock.mark();
        let mut st = self.state.lock().unwrap();
        st.calls.push(Call {
            phase,
            start,
            end,
            flops,
            elems,
        });
        r
    }

    fn pass(&self) -> &'static str {
        self.state.lock().unwrap().pass
    }

    fn n(&self, b: &B::Buf) -> f64 {
        self.inner.len(b) as f64
    }
}

const COPY: &str = "host<->device";
const ELEM: &str = "elementwise";

impl<B: Backend> Backend for Timed<B> {
    type Buf = B::Buf;
    type Host = B::Host;

    fn name(&self) -> String {
        format!("{} (timed)", self.inner.name())
    }
    fn check(&self) -> anyhow::Result<()> {
        self.inner.check()
    }
    fn annotate(&self, a: Annotation) {
        match a {
            Annotation::Pass(p) => self.state.lock().unwrap().pass = p,
            Annotation::CommBegin { elems } => {
                let m = self.clock.mark();
                self.state.lock().unwrap().comm = Some((m, elems));
            }
            Annotation::CommEnd => {
                let open = self.state.lock().unwrap().comm.take();
                if let Some((start, elems)) = open {
                    let end = self.clock.mark();
                    self.state.lock().unwrap().calls.push(Call {
                        phase: "communication",
                        start,
                        end,
                        flops: 0.0,
                        elems: elems as f64,
                    });
                }
            }
        }
        self.inner.annotate(a);
    }

    fn zeros(&self, n: usize) -> B::Buf {
        self.timed("allocation", 0.0, n as f64, || self.inner.zeros(n))
    }
    fn zeros_named(&self, n: usize, name: &str) -> B::Buf {
        self.timed("allocation", 0.0, n as f64, || {
            self.inner.zeros_named(n, name)
        })
    }
    fn len(&self, b: &B::Buf) -> usize {
        self.inner.len(b)
    }
    fn upload(&self, host: &[f32]) -> B::Buf {
        self.timed(COPY, 0.0, host.len() as f64, || self.inner.upload(host))
    }
    fn download(&self, b: &B::Buf) -> Vec<f32> {
        self.timed(COPY, 0.0, self.n(b), || self.inner.download(b))
    }
    fn upload_f64(&self, host: &[f64]) -> B::Buf {
        self.timed(COPY, 0.0, host.len() as f64, || self.inner.upload_f64(host))
    }
    fn download_f64(&self, b: &B::Buf) -> Vec<f64> {
        self.timed(COPY, 0.0, self.n(b), || self.inner.download_f64(b))
    }
    fn fill_zero(&self, b: &mut B::Buf) {
        let n = self.n(b);
        self.timed(ELEM, 0.0, n, || self.inner.fill_zero(b))
    }
    fn copy(&self, src: &B::Buf, src_off: usize, dst: &mut B::Buf, dst_off: usize, n: usize) {
        self.timed("device copy", 0.0, 2.0 * n as f64, || {
            self.inner.copy(src, src_off, dst, dst_off, n)
        })
    }
    fn read_host(&self, b: &B::Buf, off: usize, out: &mut [B::Host]) {
        self.timed(COPY, 0.0, out.len() as f64, || {
            self.inner.read_host(b, off, out)
        })
    }
    fn write_host(&self, b: &mut B::Buf, off: usize, data: &[B::Host]) {
        self.timed(COPY, 0.0, data.len() as f64, || {
            self.inner.write_host(b, off, data)
        })
    }
    fn bytes_in_use(&self) -> usize {
        self.inner.bytes_in_use()
    }
    fn peak_bytes(&self) -> usize {
        self.inner.peak_bytes()
    }

    fn add_assign(&self, dst: &mut B::Buf, src: &B::Buf) {
        let n = 3.0 * self.n(src);
        self.timed(ELEM, 0.0, n, || self.inner.add_assign(dst, src))
    }
    fn add_at(&self, dst: &mut B::Buf, dst_off: usize, src: &B::Buf, src_off: usize, n: usize) {
        self.timed(ELEM, 0.0, 3.0 * n as f64, || {
            self.inner.add_at(dst, dst_off, src, src_off, n)
        })
    }
    fn scale(&self, b: &mut B::Buf, s: f64) {
        let n = 2.0 * self.n(b);
        self.timed(ELEM, 0.0, n, || self.inner.scale(b, s))
    }
    fn sum_squares(&self, b: &B::Buf) -> f64 {
        self.timed(ELEM, 0.0, self.n(b), || self.inner.sum_squares(b))
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        c: &mut B::Buf,
        c_off: usize,
        a: &B::Buf,
        a_off: usize,
        b: &B::Buf,
        b_off: usize,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) {
        let flops = 2.0 * (m * n * k) as f64;
        let elems = (m * k + k * n + m * n) as f64;
        self.timed("gemm", flops, elems, || {
            self.inner.gemm(
                c, c_off, a, a_off, b, b_off, m, n, k, trans_a, trans_b, accumulate,
            )
        })
    }

    fn embedding_forward(&self, table: &B::Buf, ids: &[u32], dim: usize, out: &mut B::Buf) {
        let e = 2.0 * (ids.len() * dim) as f64;
        self.timed(ELEM, 0.0, e, || {
            self.inner.embedding_forward(table, ids, dim, out)
        })
    }
    fn embedding_backward(&self, dtable: &mut B::Buf, ids: &[u32], dim: usize, dout: &B::Buf) {
        let e = 3.0 * (ids.len() * dim) as f64;
        self.timed(ELEM, 0.0, e, || {
            self.inner.embedding_backward(dtable, ids, dim, dout)
        })
    }
    fn rmsnorm_forward(
        &self,
        x: &B::Buf,
        w: &B::Buf,
        eps: f64,
        rows: usize,
        dim: usize,
        out: &mut B::Buf,
        rstd: &mut B::Buf,
    ) {
        let e = 2.0 * (rows * dim) as f64;
        self.timed(ELEM, 0.0, e, || {
            self.inner.rmsnorm_forward(x, w, eps, rows, dim, out, rstd)
        })
    }
    fn rmsnorm_backward(
        &self,
        dout: &B::Buf,
        x: &B::Buf,
        w: &B::Buf,
        rstd: &B::Buf,
        rows: usize,
        dim: usize,
        dx: &mut B::Buf,
        dw: &mut B::Buf,
    ) {
        let e = 4.0 * (rows * dim) as f64;
        self.timed(ELEM, 0.0, e, || {
            self.inner
                .rmsnorm_backward(dout, x, w, rstd, rows, dim, dx, dw)
        })
    }
    fn rope_forward(
        &self,
        x: &mut B::Buf,
        cos: &B::Buf,
        sin: &B::Buf,
        rows: usize,
        heads: usize,
        head_dim: usize,
    ) {
        let e = 2.0 * (rows * heads * head_dim) as f64;
        self.timed(ELEM, 0.0, e, || {
            self.inner.rope_forward(x, cos, sin, rows, heads, head_dim)
        })
    }
    fn rope_backward(
        &self,
        dx: &mut B::Buf,
        cos: &B::Buf,
        sin: &B::Buf,
        rows: usize,
        heads: usize,
        head_dim: usize,
    ) {
        let e = 2.0 * (rows * heads * head_dim) as f64;
        self.timed(ELEM, 0.0, e, || {
            self.inner
                .rope_backward(dx, cos, sin, rows, heads, head_dim)
        })
    }
    fn attention_forward(
        &self,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        shape: &AttnShape,
        scale: f64,
        out: &mut B::Buf,
        lse: &mut B::Buf,
    ) {
        let phase = if self.pass() == "backward" {
            "attention fwd (recompute)"
        } else {
            "attention fwd"
        };
        let e = self.n(q) + self.n(k) + self.n(v) + self.n(out);
        self.timed(phase, attention_flops(shape, false), e, || {
            self.inner
                .attention_forward(q, k, v, shape, scale, out, lse)
        })
    }
    fn attention_backward(
        &self,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        out: &B::Buf,
        dout: &B::Buf,
        lse: &B::Buf,
        shape: &AttnShape,
        scale: f64,
        dq: &mut B::Buf,
        dk: &mut B::Buf,
        dv: &mut B::Buf,
    ) {
        let e = 2.0 * (self.n(q) + self.n(k) + self.n(v)) + self.n(out) + self.n(dout);
        self.timed("attention bwd", attention_flops(shape, true), e, || {
            self.inner
                .attention_backward(q, k, v, out, dout, lse, shape, scale, dq, dk, dv)
        })
    }
    fn swiglu_forward(&self, gate: &B::Buf, up: &B::Buf, out: &mut B::Buf) {
        let e = 3.0 * self.n(gate);
        self.timed(ELEM, 0.0, e, || self.inner.swiglu_forward(gate, up, out))
    }
    fn swiglu_backward(
        &self,
        gate: &B::Buf,
        up: &B::Buf,
        dout: &B::Buf,
        dgate: &mut B::Buf,
        dup: &mut B::Buf,
    ) {
        let e = 5.0 * self.n(gate);
        self.timed(ELEM, 0.0, e, || {
            self.inner.swiglu_backward(gate, up, dout, dgate, dup)
        })
    }
    fn cross_entropy_stats(&self, logits: &B::Buf, targets: &[i32], vocab: usize) -> Vec<CeStats> {
        let e = (targets.len() * vocab) as f64;
        self.timed("cross-entropy", 0.0, e, || {
            self.inner.cross_entropy_stats(logits, targets, vocab)
        })
    }
    fn cross_entropy_grad(
        &self,
        logits: &mut B::Buf,
        targets: &[i32],
        vocab: usize,
        max: &[f64],
        sum: &[f64],
        grad_scale: f64,
    ) {
        let e = 2.0 * (targets.len() * vocab) as f64;
        self.timed("cross-entropy", 0.0, e, || {
            self.inner
                .cross_entropy_grad(logits, targets, vocab, max, sum, grad_scale)
        })
    }
    fn attention_merge(
        &self,
        out: &mut B::Buf,
        lse: &mut B::Buf,
        out_b: &B::Buf,
        lse_b: &B::Buf,
        row0: usize,
        rows: usize,
        q_len: usize,
        heads: usize,
        head_dim: usize,
    ) {
        let e = 3.0 * (rows * heads * head_dim) as f64;
        self.timed("lse merge", 0.0, e, || {
            self.inner
                .attention_merge(out, lse, out_b, lse_b, row0, rows, q_len, heads, head_dim)
        })
    }
    fn adamw(&self, param: &mut B::Buf, grad: &B::Buf, m: &mut B::Buf, v: &mut B::Buf, hp: &AdamW) {
        let e = 7.0 * self.n(grad);
        self.timed("optimizer", 0.0, e, || {
            self.inner.adamw(param, grad, m, v, hp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::data::loader::{Sample, zigzag_slice};
    use crate::model::config::ModelConfig;
    use crate::model::llama::{Head, Llama, Workspace};
    use crate::model::params::ParamStore;
    use crate::model::rope::RopePrecision;
    use crate::parallel::any::AnyComm;
    use crate::parallel::thread::ThreadComm;
    use crate::parallel::topology::Topology;

    const CFG: &str = r#"{"vocab_size": 96, "hidden_size": 32, "intermediate_size": 40,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": false}"#;

    /// One forward + backward of `len` tokens with recompute, on a timed CPU backend.
    fn timed_pass(topo: &Topology, len: usize) -> PhaseReport {
        let cfg = ModelConfig::from_json_str(CFG, "t").unwrap();
        let b = Timed::on_host(CpuBackend::<f32>::new());
        let params = ParamStore::init_random_shard(&b, &cfg, 3, topo.shard());
        let model = Llama::new(cfg.clone(), RopePrecision::Exact, params).unwrap();
        let cp = topo.layout.cp;
        let mut ws = Workspace::for_rank(&b, &cfg, topo, len / cp, true, 16);
        let mut g = model.params.zeros_like(&b);
        let s = Sample {
            ids: (0..len).map(|i| ((i * 7) % 96) as u32).collect(),
            targets: (0..len).map(|i| ((i * 5 + 1) % 96) as i32).collect(),
            positions: (0..len as u64).collect(),
        };
        let s = zigzag_slice(&s, cp, topo.cp_rank).unwrap();
        b.reset();
        let loss = model.forward_backward_rank(
            &b,
            topo,
            &mut ws,
            &s.ids,
            &s.positions,
            Head::Loss {
                targets: &s.targets,
                grad_scale: 1.0 / len as f64,
            },
            Some(&mut g),
        );
        assert!(loss.is_finite());
        b.report()
    }

    fn one_rank() -> Topology {
        Topology::new(&AnyComm::Single(Default::default()), 1, 1).unwrap()
    }

    #[test]
    fn gemm_and_attention_flops_are_the_models() {
        let (t, l, h, nq, nkv, d, f, v) = (64.0, 3.0, 32.0, 4.0, 2.0, 8.0, 40.0, 96.0);
        let r = timed_pass(&one_rank(), 64);
        // Matmul parameters of a layer (q, k, v, o, gate, up, down) and the LM head.
        let per_layer = h * nq * d + 2.0 * h * nkv * d + nq * d * h + 3.0 * h * f;
        let head = v * h;
        // Forward 2·T·P, backward 4·T·P (input and weight gradients), and full recompute
        // of every layer but the last (its activations are the ones just computed).
        let gemm = 2.0 * t * (l * per_layer + head)
            + 4.0 * t * (l * per_layer + head)
            + 2.0 * t * (l - 1.0) * per_layer;
        let got = r.get("gemm").unwrap().flops;
        assert!((got - gemm).abs() < 1e-9 * gemm, "{got} vs {gemm}");
        // Causal self-attention of T tokens: T(T+1)/2 visible pairs, 4·d per pair and head.
        let fwd = 4.0 * t * (t + 1.0) / 2.0 * d * nq;
        assert_eq!(r.get("attention fwd").unwrap().flops, l * fwd);
        assert_eq!(
            r.get("attention fwd (recompute)").unwrap().flops,
            (l - 1.0) * fwd
        );
        assert_eq!(r.get("attention bwd").unwrap().flops, l * 2.5 * fwd);
        assert!(r.get("communication").is_none());
        // Time: the calls lie inside the span, and the CPU step is almost all calls.
        let (busy, span) = (r.busy_seconds(), r.span_seconds);
        assert!(busy > 0.0 && busy <= span * (1.0 + 1e-9), "{busy} {span}");
        assert!(busy >= 0.5 * span, "{busy} of {span}");
    }

    #[test]
    fn communication_is_its_own_phase() {
        let reports = ThreadComm::run(4, |world: AnyComm| {
            let topo = Topology::new(&world, 2, 2).unwrap();
            timed_pass(&topo, 64)
        });
        for r in reports {
            let c = r.get("communication").expect("no communication phase");
            assert!(c.calls > 0 && c.elems > 0.0 && c.seconds >= 0.0);
            // The ring's partial results are merged on every CP step.
            assert!(r.get("lse merge").unwrap().calls > 0);
        }
    }

    #[test]
    fn attention_flops_count_the_visible_pairs() {
        for (q_pos0, k_pos0, q_len, kv_len) in [(0, 0, 5, 5), (10, 3, 4, 9), (0, 8, 6, 3)] {
            let s = AttnShape {
                q_len,
                kv_len,
                n_q_heads: 2,
                n_kv_heads: 1,
                head_dim: 4,
                q_pos0,
                k_pos0,
                causal: true,
            };
            let mut pairs = 0;
            for i in 0..q_len as i64 {
                for j in 0..kv_len as i64 {
                    if k_pos0 + j <= q_pos0 + i {
                        pairs += 1;
                    }
                }
            }
            assert_eq!(attention_flops(&s, false), (4 * pairs * 4 * 2) as f64);
            assert_eq!(attention_flops(&s, true), 2.5 * (4 * pairs * 4 * 2) as f64);
        }
    }
}
