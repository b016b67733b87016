//! The per-rank memory model of `ultralong plan`: every buffer a rank holds, by class of element
//! ([`Dtypes`] per [`Target`]), resident or alive only in one phase, and the peak. The workspace
//! rows come from `model::llama::workspace_buffers`, the table `Workspace::for_rank` allocates
//! from; the rest follow `parallel/zero.rs`, `parallel::context::RingScratch`, the collectives'
//! staging and the transient phases (tests/plan_cli.rs checks them byte for byte on the CPU).

use anyhow::{Result, bail};
use serde::Serialize;

use crate::model::config::ModelConfig;
use crate::model::llama::{Copies, Dims, Elem, workspace_buffers};
use crate::model::params::{Shard, param_specs};
use crate::parallel::topology::Layout;

/// Bytes per element of each class of buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Dtypes {
    /// Activations, their gradients, K/V blocks on the ring, TP staging.
    pub act: u64,
    /// Per-row statistics: RMSNorm `rstd`, attention LSE.
    pub stat: u64,
    /// Partial results of one ring step (merged into the layer's output in fp32) and the dK/dV
    /// accumulators that travel the ring.
    pub ring_acc: u64,
    /// One chunk of LM-head logits.
    pub logits: u64,
    /// cos/sin tables.
    pub rope: u64,
    pub weight: u64,
    pub grad: u64,
    /// fp32 master weights of the optimizer slice (0: the weights are the master copy).
    pub master: u64,
    /// Adam m and v.
    pub moment: u64,
    /// The optimizer's copy of its gradient slice (0: none).
    pub opt_grad: u64,
}

/// Which implementation the memory model describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The CUDA backend as docs/ARCHITECTURE.md specifies it: bf16 weights, activations and gradients, fp32
    /// master weights and moments sharded ZeRO-1 over DP × CP; communication buffers on the device
    /// (NCCL); a runtime reserve.
    Cuda,
    /// `ultralong bench train` on the CPU backend in f32: one rank, unsharded AdamW (m, v beside
    /// the weights, no master copy), and the benchmark's attention-profile buffers.
    CpuBench,
    /// `ultralong train` on the CPU backend in f32: ZeRO-1 slices (master, m, v, gradient),
    /// communication staged through host vectors.
    CpuTrain,
}

impl Target {
    pub fn parse(s: &str) -> Result<Target> {
        Ok(match s {
            "cuda" => Target::Cuda,
            "cpu-bench" => Target::CpuBench,
            "cpu-train" => Target::CpuTrain,
            _ => bail!("--backend {s:?}: expected cuda, cpu-bench or cpu-train"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Cuda => "cuda",
            Target::CpuBench => "cpu-bench",
            Target::CpuTrain => "cpu-train",
        }
    }

    pub fn dtypes(self) -> Dtypes {
        match self {
            Target::Cuda => Dtypes {
                act: 2,
                stat: 4,
                ring_acc: 4,
                logits: 4,
                rope: 4,
                weight: 2,
                grad: 2,
                master: 4,
                moment: 4,
                opt_grad: 4,
            },
            Target::CpuBench => Dtypes {
                master: 0,
                opt_grad: 0,
                ..Dtypes::all(4)
            },
            Target::CpuTrain => Dtypes::all(4),
        }
    }

    fn is_cpu(self) -> bool {
        self != Target::Cuda
    }
}

impl Dtypes {
    /// Every class in one precision (the CPU backend: `CpuBuf<T>`).
    pub fn all(b: u64) -> Dtypes {
        Dtypes {
            act: b,
            stat: b,
            ring_acc: b,
            logits: b,
            rope: b,
            weight: b,
            grad: b,
            master: b,
            moment: b,
            opt_grad: b,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Place {
    Device,
    Host,
}

/// One buffer (or `count` identical ones) of a rank.
#[derive(Clone, Debug, Serialize)]
pub struct Buffer {
    pub group: &'static str,
    pub name: &'static str,
    /// Symbolic and numeric shape, e.g. `[ts, hidden] = [32768, 4096]`.
    pub shape: String,
    pub count: u64,
    /// Elements of one copy.
    pub elems: u64,
    pub elem_bytes: u64,
    /// `count × elems × elem_bytes`.
    pub bytes: u64,
    pub place: Place,
    /// `None`: allocated for the whole run. `Some(phase)`: alive only during that phase.
    pub phase: Option<&'static str>,
}

/// Everything a rank holds, and its peak.
#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    pub target: Target,
    pub dtypes: Dtypes,
    pub layout: Layout,
    /// Local tokens `S / cp` and sequence-parallel rows `t / tp`.
    pub t: usize,
    pub ts: usize,
    /// Parameters of this rank's TP shard, and of its optimizer slice.
    pub params_rank: u64,
    pub opt_slice: u64,
    pub buffers: Vec<Buffer>,
    /// Device bytes allocated for the whole run.
    pub device_resident: u64,
    /// The resident bytes plus the largest transient phase, and that phase.
    pub device_peak: u64,
    pub device_peak_phase: Option<&'static str>,
    /// The peak outside checkpoint saves (the training steps alone).
    pub device_train_peak: u64,
    /// Host memory of the rank beyond the device's (staging, checkpoint maps): its peak.
    pub host_peak: u64,
}

impl Memory {
    /// Resident device bytes of one group (e.g. "layer activations").
    pub fn group_bytes(&self, group: &str) -> u64 {
        self.buffers
            .iter()
            .filter(|b| b.group == group && b.place == Place::Device && b.phase.is_none())
            .map(|b| b.bytes)
            .sum()
    }

    /// The groups in first-appearance order with their resident device bytes.
    pub fn groups(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<(&'static str, u64)> = Vec::new();
        for b in &self.buffers {
            if b.place != Place::Device || b.phase.is_some() {
                continue;
            }
            match out.iter_mut().find(|(g, _)| *g == b.group) {
                Some((_, n)) => *n += b.bytes,
                None => out.push((b.group, b.bytes)),
            }
        }
        out
    }

    /// Device bytes of each transient phase.
    pub fn phases(&self, place: Place) -> Vec<(&'static str, u64)> {
        let mut out: Vec<(&'static str, u64)> = Vec::new();
        for b in &self.buffers {
            let Some(p) = b.phase else { continue };
            if b.place != place {
                continue;
            }
            match out.iter_mut().find(|(g, _)| *g == p) {
                Some((_, n)) => *n += b.bytes,
                None => out.push((p, b.bytes)),
            }
        }
        out
    }
}

/// Phase names of transient buffers.
pub const PHASE_ROPE: &str = "rope tables rebuilt";
pub const PHASE_CHECKPOINT: &str = "checkpoint save";
pub const PHASE_BENCH: &str = "bench attention profile";
pub const PHASE_RING_BWD: &str = "ring backward";
pub const PHASE_TP: &str = "tp collective";
pub const PHASE_OPT: &str = "optimizer step";

/// Group names of `model::llama::Workspace::for_rank`'s buffers (the in-process check sums
/// exactly these).
pub const WORKSPACE_GROUPS: [&str; 5] = [
    "layer inputs",
    "layer activations",
    "workspace",
    "gradient scratch",
    "ring scratch",
];

/// Parameters of one TP shard (exactly as `ParamStore::zeros_shard` allocates them).
pub fn params_per_rank(cfg: &ModelConfig, tp: usize) -> u64 {
    param_specs(cfg)
        .iter()
        .map(|s| s.sharded(Shard { rank: 0, size: tp }).numel() as u64)
        .sum()
}

/// What one rank runs: the model, its layout and the run's shape.
#[derive(Clone, Copy, Debug)]
pub struct RankShape<'a> {
    pub cfg: &'a ModelConfig,
    pub layout: Layout,
    pub seq_len: usize,
    pub recompute: bool,
    pub ce_chunk: usize,
}

struct List {
    v: Vec<Buffer>,
}

impl List {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        group: &'static str,
        name: &'static str,
        shape: String,
        count: u64,
        elems: u64,
        elem_bytes: u64,
        place: Place,
        phase: Option<&'static str>,
    ) {
        if count == 0 || elems == 0 || elem_bytes == 0 {
            return;
        }
        self.v.push(Buffer {
            group,
            name,
            shape,
            count,
            elems,
            elem_bytes,
            bytes: count * elems * elem_bytes,
            place,
            phase,
        });
    }
}

/// `[a, b] = [x, y]` shape text.
fn sh(sym: &[&str], num: &[usize]) -> String {
    let n: Vec<String> = num.iter().map(|x| x.to_string()).collect();
    format!("[{}] = [{}]", sym.join(", "), n.join(", "))
}

/// The per-rank memory of `shape` on `target` (rank 0 of the layout: it holds the largest
/// optimizer slice). `reserve` is added as one resident device buffer (CUDA runtime).
pub fn memory(s: &RankShape<'_>, target: Target, reserve: u64) -> Memory {
    let dt = target.dtypes();
    let cfg = s.cfg;
    let Layout { tp, cp, dp } = s.layout;
    let (l, h, hd) = (cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim);
    let t = s.seq_len / cp;
    let ts = t / tp;
    let (nq, nkv) = (cfg.num_attention_heads / tp, cfg.num_key_value_heads / tp);
    let kvw = nkv * hd;
    let n_r = params_per_rank(cfg, tp);
    let group = (dp * cp) as u64;
    let slice = n_r.div_ceil(group);
    let full = tp > 1;
    let ring = cp > 1;
    let (dev, host) = (Place::Device, Place::Host);
    let u = |x: usize| x as u64;
    let mut b = List { v: Vec::new() };

    // Parameters and optimizer (parallel/zero.rs; bench: train::trainer::adamw_step).
    b.add(
        "weights",
        "weights (TP shard)",
        format!("[{n_r}]"),
        1,
        n_r,
        dt.weight,
        dev,
        None,
    );
    b.add(
        "gradients",
        "gradients (TP shard)",
        format!("[{n_r}]"),
        1,
        n_r,
        dt.grad,
        dev,
        None,
    );
    if target == Target::CpuBench {
        b.add(
            "optimizer",
            "Adam m, v (unsharded)",
            format!("[{n_r}]"),
            2,
            n_r,
            dt.moment,
            dev,
            None,
        );
    } else {
        let shp = format!("[params / (dp·cp)] = [{slice}]");
        b.add(
            "optimizer",
            "master weights (ZeRO-1 slice)",
            shp.clone(),
            1,
            slice,
            dt.master,
            dev,
            None,
        );
        b.add(
            "optimizer",
            "Adam m, v (ZeRO-1 slice)",
            shp.clone(),
            2,
            slice,
            dt.moment,
            dev,
            None,
        );
        b.add(
            "optimizer",
            "gradient slice (ZeRO-1)",
            shp,
            1,
            slice,
            dt.opt_grad,
            dev,
            None,
        );
    }

    // The workspace: model::llama::workspace_buffers, the table Workspace::for_rank allocates
    // from, row by row.
    let d = Dims::local(cfg, t, Shard { rank: 0, size: tp });
    for r in workspace_buffers(&d, s.ce_chunk) {
        let copies = r.copies.count(l, s.recompute);
        let n = r.names.len();
        let (sym, num): (Vec<&str>, Vec<usize>) = r.dims.iter().copied().unzip();
        let shape = format!(
            "{}{}{}",
            match r.copies {
                Copies::LayerInputs => "(L+1) × ",
                Copies::ActSets if !s.recompute => "L × ",
                _ => "",
            },
            if n > 1 {
                format!("{n} × ")
            } else {
                String::new()
            },
            sh(&sym, &num)
        );
        let elem_bytes = match r.elem {
            Elem::Act => dt.act,
            Elem::Stat => dt.stat,
            Elem::Logits => dt.logits,
            Elem::Rope => dt.rope,
        };
        b.add(
            r.group,
            r.label,
            shape,
            u(copies * n),
            u(r.elems()),
            elem_bytes,
            dev,
            None,
        );
    }
    let th = sh(&["t", "hidden"], &[t, h]);
    let tsh = sh(&["ts", "hidden"], &[ts, h]);

    // RingScratch::new (parallel/context.rs), cp > 1 only: its own table.
    if ring {
        let ring_shape = crate::parallel::context::RingShape {
            t,
            n_q: nq,
            n_kv: nkv,
            head_dim: hd,
        };
        for r in crate::parallel::context::ring_buffers(&ring_shape) {
            use crate::parallel::context::RingElem;
            let n = r.names.len();
            let (sym, num): (Vec<&str>, Vec<usize>) = r.dims.iter().copied().unzip();
            let shape = if n > 1 {
                format!("{n} × {}", sh(&sym, &num))
            } else {
                sh(&sym, &num)
            };
            let elem_bytes = match r.elem {
                RingElem::Act => dt.act,
                RingElem::Acc => dt.ring_acc,
                RingElem::Stat => dt.stat,
            };
            b.add(
                "ring scratch",
                r.label,
                shape,
                n as u64,
                u(r.elems()),
                elem_bytes,
                dev,
                None,
            );
        }
    }

    // Communication buffers. The ring's blocks are backend buffers (ring scratch above); the
    // host-staged path (the CPU's, and the GPU fallback without NCCL) also holds each exchange in
    // flight on the host, send + receive: in the backward 4 of them (dK, dV, K, V).
    let blk = format!("[2, t, kv/tp·d] = [2, {t}, {kvw}]");
    let cm = "comm buffers";
    if ring && target.is_cpu() {
        b.add(
            cm,
            "ring staging: 4 exchanges in flight, send + receive",
            format!("4 × {blk}"),
            4,
            u(2 * t * kvw),
            dt.act,
            host,
            Some(PHASE_RING_BWD),
        );
    }
    if target.is_cpu() {
        if full {
            // parallel/tensor.rs reduce_scatter_into: send [t,H], recv [ts,H], residual [ts,H].
            b.add(
                cm,
                "TP staging: send + recv + residual",
                format!("{th} + 2 × {tsh}"),
                1,
                u(t * h + 2 * ts * h),
                dt.act,
                host,
                Some(PHASE_TP),
            );
        }
    } else {
        if full {
            b.add(
                cm,
                "TP reduce-scatter receive (residual add)",
                tsh.clone(),
                1,
                u(ts * h),
                dt.act,
                dev,
                None,
            );
        }
        b.add(
            "runtime",
            "CUDA context, cuBLASLt workspace, NCCL buffers (assumed)",
            "-".into(),
            1,
            reserve,
            1,
            dev,
            None,
        );
    }

    // parallel/zero.rs step: the flat gradient and this rank's slice, backend buffers for the
    // reduce-scatter and the all-gather (on the device with NCCL), during the optimizer step.
    if (target == Target::CpuTrain || !target.is_cpu()) && group > 1 {
        b.add(
            cm,
            "ZeRO flat gradient + slice",
            format!("[{}] + [{slice}]", slice * group),
            1,
            slice * group + slice,
            dt.grad,
            dev,
            Some(PHASE_OPT),
        );
    }

    // Transient phases.
    // Llama::load_rope_tables: the new table is uploaded before the old one is dropped; the
    // tables are computed in f64 on the host.
    b.add(
        "transient",
        "rope: new table before the old is freed",
        sh(&["t", "d/2"], &[t, hd / 2]),
        1,
        u(t * hd / 2),
        dt.rope,
        dev,
        Some(PHASE_ROPE),
    );
    b.add(
        "transient",
        "rope: cos, sin computed in f64",
        format!("2 × [{t}, {}]", hd / 2),
        2,
        u(t * hd / 2),
        8,
        host,
        Some(PHASE_ROPE),
    );
    if target != Target::CpuBench {
        // train::checkpoint::save: each rank downloads what it writes — its TP weight shard (the
        // first rank of each DP × CP group) and its ZeRO slice (master, m, v) — as f32 host
        // tensors; nothing extra on the device.
        b.add(
            "transient",
            "checkpoint: the TP weight shard as f32 (host)",
            format!("[{n_r}]"),
            1,
            n_r,
            4,
            host,
            Some(PHASE_CHECKPOINT),
        );
        b.add(
            "transient",
            "checkpoint: the ZeRO slice's master, m, v as f32 (host)",
            format!("3 × [{slice}]"),
            3,
            slice,
            4,
            host,
            Some(PHASE_CHECKPOINT),
        );
    }
    if target == Target::CpuBench {
        // cli/bench.rs: attention alone on one layer's full shape, while everything is alive.
        let (nqf, nkvf) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        b.add(
            "transient",
            "q, dout, out, dq",
            format!("4 × [{t}, {nqf}]"),
            4,
            u(t * nqf),
            dt.act,
            dev,
            Some(PHASE_BENCH),
        );
        b.add(
            "transient",
            "k, v, dk, dv",
            format!("4 × [{t}, {nkvf}]"),
            4,
            u(t * nkvf),
            dt.act,
            dev,
            Some(PHASE_BENCH),
        );
        b.add(
            "transient",
            "lse",
            format!("[{}, {t}]", cfg.num_attention_heads),
            1,
            u(cfg.num_attention_heads * t),
            dt.stat,
            dev,
            Some(PHASE_BENCH),
        );
    }

    let resident = |p: Place| -> u64 {
        b.v.iter()
            .filter(|x| x.place == p && x.phase.is_none())
            .map(|x| x.bytes)
            .sum()
    };
    let (dres, hres) = (resident(dev), resident(host));
    let mut m = Memory {
        target,
        dtypes: dt,
        layout: s.layout,
        t,
        ts,
        params_rank: n_r,
        opt_slice: slice,
        buffers: b.v,
        device_resident: 0,
        device_peak: 0,
        device_peak_phase: None,
        device_train_peak: 0,
        host_peak: 0,
    };
    let dph = m.phases(dev);
    let max_of = |it: &mut dyn Iterator<Item = (&'static str, u64)>| {
        it.max_by_key(|x| x.1)
            .map_or((None, 0), |(p, n)| (Some(p), n))
    };
    let (pp, pn) = max_of(&mut dph.iter().copied());
    let (_, tn) = max_of(&mut dph.iter().copied().filter(|(p, _)| *p != PHASE_CHECKPOINT));
    let (_, hn) = max_of(&mut m.phases(host).into_iter());
    m.device_resident = dres;
    m.device_peak = dres + pn;
    m.device_peak_phase = pp;
    m.device_train_peak = dres + tn;
    m.host_peak = hres + hn;
    m
}

#[cfg(test)]
mod tests {
    use super::super::llama_8b;
    use super::*;

    #[test]
    fn params_per_rank_sum_to_the_model() {
        let cfg = llama_8b();
        let n = cfg.n_params() as u64;
        assert_eq!(params_per_rank(&cfg, 1), n);
        // Norm weights are replicated: 2 per layer + the final one, `hidden` each.
        let norms = ((2 * cfg.num_hidden_layers + 1) * cfg.hidden_size) as u64;
        for tp in [2, 4, 8] {
            assert_eq!(params_per_rank(&cfg, tp), (n - norms) / tp as u64 + norms);
        }
    }

    #[test]
    fn memory_grows_with_the_local_tokens_and_shrinks_with_recompute() {
        let cfg = llama_8b();
        let layout = Layout {
            tp: 8,
            cp: 4,
            dp: 1,
        };
        let shape = |seq, recompute| RankShape {
            cfg: &cfg,
            layout,
            seq_len: seq,
            recompute,
            ce_chunk: 256,
        };
        let a = memory(&shape(1 << 20, true), Target::Cuda, 0);
        let b = memory(&shape(1 << 21, true), Target::Cuda, 0);
        let c = memory(&shape(1 << 20, false), Target::Cuda, 0);
        // Activations double with t; without recompute every layer keeps its set.
        let act = |m: &Memory| m.group_bytes("layer activations");
        assert_eq!(act(&b), 2 * act(&a));
        assert_eq!(act(&c), 32 * act(&a));
        assert_eq!(a.group_bytes("weights"), b.group_bytes("weights"));
        // bf16 weights of the TP shard.
        assert_eq!(a.group_bytes("weights"), 2 * params_per_rank(&cfg, 8));
    }
}
