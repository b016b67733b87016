//! `LoopbackComm`: one rank of a large world, alone in one process, with every collective replaced
//! by a local copy of the right size — how one GPU runs one rank of the real 4M layout (TP 8 ×
//! CP 16) to measure its step time and peak memory (`gpu-check --only rank4m`) without 127 others.
//!
//! It pretends to be rank `rank` of `size`: `all_gather` fills every rank's block with this
//! rank's data, `reduce_scatter` keeps this rank's block, `exchange_start` receives what it sends
//! (the ring's KV blocks have one size on every rank), `all_reduce`, `broadcast` and `barrier` pass.
//! The buffers moved and their sizes are the real ones; the values are not the real run's (they
//! stay finite: copies of this rank's own).
//!
//! With an inner communicator it records instead: every call is passed on and logged, so a test
//! can compare the calls of a loopback rank with those of the same rank in a real (thread) world.

use std::sync::{Arc, Mutex};

use super::any::AnyComm;
use super::comm::{
    BufExchange, Comm, Elem, Exchange, PendingExchange, ReduceOp, SelfComm, WaitClock,
};
use super::topology::{Layout, Topology};
use crate::backend::Backend;
use crate::backend::timed::Annotation;

/// One collective as logged: the group's label, the operation and the elements it moved. Host
/// collectives are named `host …`; the buffer collectives (`Comm::*_buf`) by the bare name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommCall {
    pub group: &'static str,
    pub op: &'static str,
    pub elems: usize,
}

pub type CommLog = Arc<Mutex<Vec<CommCall>>>;

pub struct LoopbackComm {
    rank: usize,
    size: usize,
    group: &'static str,
    log: Option<CommLog>,
    inner: Option<Box<AnyComm>>,
    clock: WaitClock,
}

struct Ready<T>(Vec<T>, Vec<T>);

impl<T: Elem> PendingExchange<T> for Ready<T> {
    fn wait(self: Box<Self>) -> (Vec<T>, Vec<T>) {
        (self.0, self.1)
    }
}

impl LoopbackComm {
    /// Rank `rank` of a pretended group of `size`, named `group` in the log.
    pub fn new(rank: usize, size: usize, group: &'static str, log: Option<CommLog>) -> Self {
        assert!(rank < size, "LoopbackComm: rank {rank} of {size}");
        LoopbackComm {
            rank,
            size,
            group,
            log,
            inner: None,
            clock: WaitClock::default(),
        }
    }

    /// Pass every call on to `inner`, logging it.
    pub fn recording(inner: AnyComm, group: &'static str, log: CommLog) -> Self {
        LoopbackComm {
            rank: inner.rank(),
            size: inner.size(),
            group,
            log: Some(log),
            inner: Some(Box::new(inner)),
            clock: WaitClock::default(),
        }
    }

    fn note(&self, op: &'static str, elems: usize) {
        if let Some(l) = &self.log {
            l.lock().unwrap().push(CommCall {
                group: self.group,
                op,
                elems,
            });
        }
    }
}

impl Comm for LoopbackComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce<T: Elem>(&self, buf: &mut [T], op: ReduceOp) {
        self.note("host all_reduce", buf.len());
        if let Some(c) = &self.inner {
            c.all_reduce(buf, op);
        }
    }
    fn all_gather<T: Elem>(&self, send: &[T], recv: &mut [T]) {
        self.note("host all_gather", recv.len());
        if let Some(c) = &self.inner {
            return c.all_gather(send, recv);
        }
        assert_eq!(recv.len(), send.len() * self.size, "all_gather: sizes");
        for block in recv.chunks_exact_mut(send.len().max(1)) {
            block.copy_from_slice(send);
        }
    }
    fn reduce_scatter<T: Elem>(&self, send: &[T], recv: &mut [T]) {
        self.note("host reduce_scatter", send.len());
        if let Some(c) = &self.inner {
            return c.reduce_scatter(send, recv);
        }
        assert_eq!(send.len(), recv.len() * self.size, "reduce_scatter: sizes");
        let n = recv.len();
        recv.copy_from_slice(&send[self.rank * n..][..n]);
    }
    fn broadcast<T: Elem>(&self, buf: &mut [T], root: usize) {
        self.note("host broadcast", buf.len());
        if let Some(c) = &self.inner {
            c.broadcast(buf, root);
        }
    }
    fn barrier(&self) {
        if let Some(c) = &self.inner {
            c.barrier();
        }
    }
    fn exchange_start<T: Elem>(
        &self,
        send: Vec<T>,
        to: usize,
        mut recv: Vec<T>,
        from: usize,
    ) -> Exchange<T> {
        self.note("host exchange", send.len() + recv.len());
        if let Some(c) = &self.inner {
            return c.exchange_start(send, to, recv, from);
        }
        assert!(to < self.size && from < self.size, "exchange: ranks");
        let n = send.len().min(recv.len());
        recv[..n].copy_from_slice(&send[..n]);
        Exchange::new(Box::new(Ready(send, recv)))
    }
    fn wait_clock(&self) -> &WaitClock {
        match &self.inner {
            Some(c) => c.wait_clock(),
            None => &self.clock,
        }
    }
    fn buf_path(&self) -> &'static str {
        match &self.inner {
            Some(c) => c.buf_path(),
            None => "loopback (device-local copies)",
        }
    }

    // The buffer collectives: logged under the same names as the host ones; without an inner
    // communicator they are copies within the backend (on a GPU, device to device: the one-rank
    // 4M step pays for moving the real sizes in device memory, never a host round trip).
    fn all_gather_buf<B: Backend>(
        &self,
        b: &B,
        send: &B::Buf,
        off: usize,
        n: usize,
        recv: &mut B::Buf,
    ) {
        self.note("all_gather", n * self.size);
        if let Some(c) = &self.inner {
            return c.all_gather_buf(b, send, off, n, recv);
        }
        b.annotate(Annotation::CommBegin {
            elems: n * self.size,
        });
        for r in 0..self.size {
            b.copy(send, off, recv, r * n, n);
        }
        b.annotate(Annotation::CommEnd);
    }
    fn reduce_scatter_buf<B: Backend>(
        &self,
        b: &B,
        send: &B::Buf,
        n: usize,
        recv: &mut B::Buf,
        accumulate: bool,
    ) {
        self.note("reduce_scatter", n * self.size);
        if let Some(c) = &self.inner {
            return c.reduce_scatter_buf(b, send, n, recv, accumulate);
        }
        b.annotate(Annotation::CommBegin {
            elems: n * self.size,
        });
        if accumulate {
            b.add_at(recv, 0, send, self.rank * n, n);
        } else {
            b.copy(send, self.rank * n, recv, 0, n);
        }
        b.annotate(Annotation::CommEnd);
    }
    fn all_reduce_buf<B: Backend>(&self, b: &B, buf: &mut B::Buf, n: usize) {
        self.note("all_reduce", n);
        if let Some(c) = &self.inner {
            c.all_reduce_buf(b, buf, n);
        }
    }
    fn exchange_buf_start<'a, B: Backend>(
        &self,
        b: &B,
        send: &'a B::Buf,
        n: usize,
        to: usize,
        recv: &'a mut B::Buf,
        from: usize,
    ) -> BufExchange<'a, B> {
        self.note("exchange", 2 * n);
        if let Some(c) = &self.inner {
            return c.exchange_buf_start(b, send, n, to, recv, from);
        }
        assert!(to < self.size && from < self.size, "exchange: ranks");
        b.annotate(Annotation::CommBegin { elems: n });
        b.copy(send, 0, recv, 0, n);
        b.annotate(Annotation::CommEnd);
        BufExchange::done(recv, n)
    }
    fn wait_buf<B: Backend>(&self, b: &B, x: BufExchange<'_, B>) {
        match &self.inner {
            Some(c) => c.wait_buf(b, x),
            None => {
                let t0 = std::time::Instant::now();
                drop(x);
                self.clock.add(t0.elapsed().as_secs_f64());
            }
        }
    }
}

/// The topology of world rank `world_rank` under `layout`, every group a `LoopbackComm` of the
/// group's real size and this rank's place in it.
pub fn loopback_topology(layout: Layout, world_rank: usize, log: Option<CommLog>) -> Topology {
    let (t, c, d) = layout.coords(world_rank);
    let lb = |rank, size, name| AnyComm::Loopback(LoopbackComm::new(rank, size, name, log.clone()));
    Topology {
        layout,
        world_rank,
        tp_rank: t,
        cp_rank: c,
        dp_rank: d,
        world: lb(world_rank, layout.world(), "world"),
        tp: lb(t, layout.tp, "tp"),
        cp: lb(c, layout.cp, "cp"),
        dp: lb(d, layout.dp, "dp"),
        dpcp: lb(c + layout.cp * d, layout.cp * layout.dp, "dpcp"),
    }
}

/// `topo` with every group wrapped in a recording `LoopbackComm` writing to `log`.
pub fn recording_topology(mut topo: Topology, log: &CommLog) -> Topology {
    let wrap = |c: &mut AnyComm, name: &'static str| {
        let inner = std::mem::replace(c, AnyComm::Single(SelfComm::default()));
        *c = AnyComm::Loopback(LoopbackComm::recording(inner, name, log.clone()));
    };
    wrap(&mut topo.world, "world");
    wrap(&mut topo.tp, "tp");
    wrap(&mut topo.cp, "cp");
    wrap(&mut topo.dp, "dp");
    wrap(&mut topo.dpcp, "dpcp");
    topo
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
    use crate::parallel::thread::ThreadComm;

    fn tiny() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": false,
            "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}}"#,
            "tiny",
        )
        .unwrap()
    }

    /// One rank's pass (recompute on, the long-context setting): its loss and the sizes of the
    /// buffers it allocated for the workspace (the backend's bytes in use after building it).
    fn rank_pass(cfg: &ModelConfig, topo: &Topology, len: usize) -> f64 {
        let b = CpuBackend::<f32>::new();
        let params = ParamStore::init_random_shard(&b, cfg, 3, topo.shard());
        let model = Llama::new(cfg.clone(), RopePrecision::Exact, params).unwrap();
        let cp = topo.layout.cp;
        let mut ws = Workspace::for_rank(&b, cfg, topo, len / cp, true, 8);
        let mut g = model.params.zeros_like(&b);
        let ids: Vec<u32> = (0..len).map(|i| ((i * 7 + i * i) % 64) as u32).collect();
        let targets: Vec<i32> = (0..len).map(|i| ((i * 5 + 1) % 64) as i32).collect();
        let s = Sample {
            ids,
            targets,
            positions: (0..len as u64).collect(),
        };
        let s = zigzag_slice(&s, cp, topo.cp_rank).unwrap();
        model.forward_backward_rank(
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
        )
    }

    #[test]
    fn loopback_rank_moves_what_the_thread_world_moves() {
        let cfg = tiny();
        let (tp, cp, len) = (2, 2, 32);
        let layout = Layout { tp, cp, dp: 1 };
        // The real world of 4 thread ranks, each rank's collectives recorded.
        let logs: Vec<(usize, Vec<CommCall>, f64)> = ThreadComm::run(tp * cp, |world: AnyComm| {
            let log: CommLog = Arc::default();
            let topo = recording_topology(Topology::new(&world, tp, cp).unwrap(), &log);
            let loss = rank_pass(&cfg, &topo, len);
            let calls = log.lock().unwrap().clone();
            (topo.world_rank, calls, loss)
        });
        for (r, calls, real_loss) in logs {
            let log: CommLog = Arc::default();
            let topo = loopback_topology(layout, r, Some(log.clone()));
            let loss = rank_pass(&cfg, &topo, len);
            assert!(
                loss.is_finite() && real_loss.is_finite(),
                "rank {r}: loss {loss}"
            );
            let got = log.lock().unwrap().clone();
            assert!(!got.is_empty(), "rank {r}: no collective at all");
            assert_eq!(
                got, calls,
                "rank {r}: loopback calls differ from the thread world's"
            );
        }
    }

    /// Every activation-sized collective of a tp 2 × cp 2 pass goes through the buffer interface
    /// (what NCCL implements on GPUs); the host collectives left carry per-row statistics only
    /// (the vocab-parallel cross-entropy's max, Σexp and target logit: 3 values per row of a
    /// chunk, from each TP rank).
    #[test]
    fn tensors_cross_ranks_only_through_the_buffer_collectives() {
        let cfg = tiny();
        let (tp, cp, len, ce_chunk) = (2, 2, 32, 8);
        let logs: Vec<Vec<CommCall>> = ThreadComm::run(tp * cp, |world: AnyComm| {
            let log: CommLog = Arc::default();
            let topo = recording_topology(Topology::new(&world, tp, cp).unwrap(), &log);
            rank_pass(&cfg, &topo, len);
            log.lock().unwrap().clone()
        });
        for calls in logs {
            let bufs: Vec<&CommCall> = calls.iter().filter(|c| !c.op.starts_with("host")).collect();
            // Per layer: TP gathers/scatters and the CP ring, forward, recompute and backward.
            assert!(bufs.len() >= 2 * 4, "{calls:?}");
            assert!(bufs.iter().any(|c| c.group == "cp" && c.op == "exchange"));
            assert!(bufs.iter().any(|c| c.group == "tp" && c.op == "all_gather"));
            assert!(
                bufs.iter()
                    .any(|c| c.group == "tp" && c.op == "reduce_scatter")
            );
            for c in calls.iter().filter(|c| c.op.starts_with("host")) {
                assert!(
                    c.group == "tp" && c.op == "host all_gather" && c.elems <= 3 * ce_chunk * tp,
                    "a tensor went through a host collective: {c:?}"
                );
            }
        }
    }

    /// A whole training step of tp 2 × cp 2 × dp 2 (8 thread ranks): forward, backward and the
    /// ZeRO-1 optimizer step. Every tensor-sized transfer — TP pairs, CP ring, the gradient
    /// reduce-scatter and the weight all-gather — goes through the buffer collectives (what the
    /// NCCL group implements); the host collectives left are scalars and per-row statistics.
    #[test]
    fn a_whole_step_moves_tensors_only_through_the_buffer_collectives() {
        use crate::backend::AdamW;
        use crate::train::optim::ShardedAdamW;
        let cfg = tiny();
        let (tp, cp, dp, len, ce_chunk) = (2, 2, 2, 32, 8);
        let logs: Vec<Vec<CommCall>> = ThreadComm::run(tp * cp * dp, |world: AnyComm| {
            let log: CommLog = Arc::default();
            let topo = recording_topology(Topology::new(&world, tp, cp).unwrap(), &log);
            let b = CpuBackend::<f32>::new();
            let params = ParamStore::init_random_shard(&b, &cfg, 3, topo.shard());
            let mut model = Llama::new(cfg.clone(), RopePrecision::Exact, params).unwrap();
            let mut opt = ShardedAdamW::new(&b, &topo, &model.params);
            let mut ws = Workspace::for_rank(&b, &cfg, &topo, len / cp, true, ce_chunk);
            let mut g = model.params.zeros_like(&b);
            let s = Sample {
                ids: (0..len)
                    .map(|i| ((i * 7 + topo.dp_rank) % 64) as u32)
                    .collect(),
                targets: (0..len).map(|i| ((i * 5 + 1) % 64) as i32).collect(),
                positions: (0..len as u64).collect(),
            };
            let s = zigzag_slice(&s, cp, topo.cp_rank).unwrap();
            model.forward_backward_rank(
                &b,
                &topo,
                &mut ws,
                &s.ids,
                &s.positions,
                Head::Loss {
                    targets: &s.targets,
                    grad_scale: 1.0 / len as f64,
                },
                Some(&mut g),
            );
            let hp = AdamW {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step: 1,
                grad_scale: 1.0,
            };
            opt.step(&b, &topo, &mut model.params, &mut g, hp, 1.0);
            log.lock().unwrap().clone()
        });
        for calls in logs {
            for group in ["dpcp"] {
                for op in ["reduce_scatter", "all_gather"] {
                    assert!(
                        calls.iter().any(|c| c.group == group && c.op == op),
                        "no {op} over {group}: {calls:?}"
                    );
                }
            }
            for c in calls.iter().filter(|c| c.op.starts_with("host")) {
                let stats =
                    c.group == "tp" && c.op == "host all_gather" && c.elems <= 3 * ce_chunk * tp;
                assert!(
                    stats || c.elems <= 2,
                    "a tensor went through a host collective: {c:?}"
                );
            }
        }
    }

    /// The loopback's buffer collectives copy within the backend, with the real sizes.
    #[test]
    fn loopback_buffer_collectives_are_local_copies() {
        let b = CpuBackend::<f32>::new();
        let c = LoopbackComm::new(1, 3, "t", None);
        let send = b.upload(&[9.0, 1.0, 2.0]);
        let mut recv = b.zeros(6);
        c.all_gather_buf(&b, &send, 1, 2, &mut recv);
        assert_eq!(b.download(&recv), [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]);
        let full = b.upload(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let mut out = b.upload(&[10.0, 20.0]);
        c.reduce_scatter_buf(&b, &full, 2, &mut out, true);
        assert_eq!(b.download(&out), [12.0, 23.0]);
        c.reduce_scatter_buf(&b, &full, 2, &mut out, false);
        assert_eq!(b.download(&out), [2.0, 3.0]);
        let mut got = b.zeros(3);
        let x = c.exchange_buf_start(&b, &send, 2, 2, &mut got, 0);
        c.wait_buf(&b, x);
        assert_eq!(b.download(&got), [9.0, 1.0, 0.0]);
    }

    #[test]
    fn loopback_collectives_have_the_real_sizes() {
        let c = LoopbackComm::new(2, 4, "t", None);
        let mut recv = vec![0f32; 12];
        c.all_gather(&[1.0, 2.0, 3.0], &mut recv);
        assert_eq!(recv, [1.0, 2.0, 3.0].repeat(4));
        let mut one = vec![0f32; 2];
        c.reduce_scatter(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &mut one);
        assert_eq!(one, [4.0, 5.0]);
        let x = c.exchange_start(vec![7u8, 8], 3, vec![0, 0], 1);
        let (_, r) = c.wait(x);
        assert_eq!(r, [7, 8]);
    }
}
