//! `ultralong plan`: what a run costs on N GPUs — per-rank memory, step time, GPU-hours — for
//! every parallel layout the layout rules allow, and which layout to use.
//!
//! **Memory.** One formula, [`memory`], lists every buffer a rank holds: the weights, gradients
//! and ZeRO-1 optimizer slices (`parallel/zero.rs`), the layer inputs and one layer's (or every
//! layer's) activations, the gradient scratch and the rest of `model::llama::Workspace`, the ring
//! scratch (`parallel::context::RingScratch`), communication staging, and the transient buffers of
//! a few phases (RoPE table rebuild, checkpoint save, the benchmark's attention profile). It is
//! written once and parameterised by the bytes per element of each class of buffer
//! ([`Dtypes`]): with bf16 activations, weights and gradients and fp32 master weights and Adam
//! moments it is the CUDA projection (DESIGN.md "Numerics"); with f32 everywhere and the CPU
//! backend's buffer list it predicts what `ultralong bench train` measures (tests/plan_cli.rs
//! checks it against measured peaks; the workspace part is checked byte for byte).
//!
//! **FLOPs.** `crate::flops`: DESIGN.md's causal model count (`6·N + 6·q·S·L` per token), which
//! the stated MFU is defined on; full recompute makes the hardware run the forward of layers
//! `0..L-1` a second time (about 4/3 ×), which the stated MFU does not count (hardware FLOP
//! utilisation = MFU × hardware / model FLOPs). The CP ring's attention time uses the
//! attention-kernel count (backward 2.5× forward).
//!
//! **Time.** Compute at the stated MFU of the dense bf16 peak, plus the communication that this
//! implementation does not overlap: the TP collectives (`parallel::tensor`, blocking), the part
//! of each CP ring transfer that outlasts the ring step's attention compute, the ZeRO
//! reduce-scatter / all-gather after the backward, and Adam itself (HBM-bound). Each transfer
//! costs `α + bytes / bandwidth` (α-β model; [`Hardware`] names the assumed bandwidths).

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::flops;
use crate::model::config::ModelConfig;
use crate::model::params::{Shard, param_specs};
use crate::parallel::topology::Layout;

pub const GIB: f64 = (1u64 << 30) as f64;

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
    /// The CUDA backend as DESIGN.md specifies it: bf16 weights, activations and gradients, fp32
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
    let c = t / 2;
    let (nq, nkv) = (cfg.num_attention_heads / tp, cfg.num_key_value_heads / tp);
    let (qw, kvw) = (nq * hd, nkv * hd);
    let ffn = cfg.intermediate_size / tp;
    let vocab = cfg.vocab_size / tp;
    let n_r = params_per_rank(cfg, tp);
    let group = (dp * cp) as u64;
    let slice = n_r.div_ceil(group);
    let full = tp > 1;
    let ring = cp > 1;
    let ce = s.ce_chunk.clamp(1, t.max(1));
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

    // Workspace::for_rank, buffer by buffer (model/llama.rs).
    let th = sh(&["t", "hidden"], &[t, h]);
    let tsh = sh(&["ts", "hidden"], &[ts, h]);
    b.add(
        "layer inputs",
        "xs: layer inputs + final-norm input",
        format!("(L+1) × {tsh}"),
        u(l + 1),
        u(ts * h),
        dt.act,
        dev,
        None,
    );
    let sets = if s.recompute { 1 } else { l };
    let sets_txt = |x: String| if s.recompute { x } else { format!("L × {x}") };
    let la = "layer activations";
    let set = u(sets);
    b.add(
        la,
        "xn1, x_mid, xn2",
        sets_txt(format!("3 × {tsh}")),
        3 * set,
        u(ts * h),
        dt.act,
        dev,
        None,
    );
    b.add(
        la,
        "rstd1, rstd2",
        sets_txt(format!("2 × [ts] = [{ts}]")),
        2 * set,
        u(ts),
        dt.stat,
        dev,
        None,
    );
    if full {
        b.add(
            la,
            "xn1f, xn2f (gathered over TP)",
            sets_txt(format!("2 × {th}")),
            2 * set,
            u(t * h),
            dt.act,
            dev,
            None,
        );
    }
    let tq = sh(&["t", "heads/tp·d"], &[t, qw]);
    let tkv = sh(&["t", "kv/tp·d"], &[t, kvw]);
    b.add(
        la,
        "q, attn",
        sets_txt(format!("2 × {tq}")),
        2 * set,
        u(t * qw),
        dt.act,
        dev,
        None,
    );
    b.add(
        la,
        "k, v",
        sets_txt(format!("2 × {tkv}")),
        2 * set,
        u(t * kvw),
        dt.act,
        dev,
        None,
    );
    b.add(
        la,
        "lse",
        sets_txt(sh(&["heads/tp", "t"], &[nq, t])),
        set,
        u(nq * t),
        dt.stat,
        dev,
        None,
    );
    let tf = sh(&["t", "ffn/tp"], &[t, ffn]);
    b.add(
        la,
        "gate, up, h",
        sets_txt(format!("3 × {tf}")),
        3 * set,
        u(t * ffn),
        dt.act,
        dev,
        None,
    );

    let ws = "workspace";
    b.add(
        ws,
        "xf (final norm)",
        tsh.clone(),
        1,
        u(ts * h),
        dt.act,
        dev,
        None,
    );
    b.add(
        ws,
        "rstd_f",
        format!("[ts] = [{ts}]"),
        1,
        u(ts),
        dt.stat,
        dev,
        None,
    );
    if full {
        b.add(
            ws,
            "xff, part (gathered / partial sums)",
            format!("2 × {th}"),
            2,
            u(t * h),
            dt.act,
            dev,
            None,
        );
    }
    b.add(
        ws,
        "logits (one CE chunk)",
        sh(&["ce_chunk", "vocab/tp"], &[ce, vocab]),
        1,
        u(ce * vocab),
        dt.logits,
        dev,
        None,
    );
    b.add(
        ws,
        "cos, sin",
        format!("2 × {}", sh(&["t", "d/2"], &[t, hd / 2])),
        2,
        u(t * hd / 2),
        dt.rope,
        dev,
        None,
    );

    let gs = "gradient scratch";
    b.add(
        gs,
        "dx, dxn",
        format!("2 × {tsh}"),
        2,
        u(ts * h),
        dt.act,
        dev,
        None,
    );
    if full {
        b.add(
            gs,
            "dfull, dxnf",
            format!("2 × {th}"),
            2,
            u(t * h),
            dt.act,
            dev,
            None,
        );
    }
    b.add(
        gs,
        "dq, dattn",
        format!("2 × {tq}"),
        2,
        u(t * qw),
        dt.act,
        dev,
        None,
    );
    b.add(
        gs,
        "dk, dv",
        format!("2 × {tkv}"),
        2,
        u(t * kvw),
        dt.act,
        dev,
        None,
    );
    b.add(
        gs,
        "dgate, dup, dh",
        format!("3 × {tf}"),
        3,
        u(t * ffn),
        dt.act,
        dev,
        None,
    );

    // RingScratch::new (parallel/context.rs), cp > 1 only.
    if ring {
        let rs = "ring scratch";
        let ckv = sh(&["t/2", "kv/tp·d"], &[c, kvw]);
        let cq = sh(&["t/2", "heads/tp·d"], &[c, qw]);
        b.add(
            rs,
            "k_cur, v_cur, k_next, v_next (ring K/V: current + in flight)",
            format!("4 × {tkv}"),
            4,
            u(t * kvw),
            dt.act,
            dev,
            None,
        );
        b.add(
            rs,
            "dk_acc, dv_acc, dk_in, dv_in (ring dK/dV: accumulator + in flight)",
            format!("4 × {tkv}"),
            4,
            u(t * kvw),
            dt.ring_acc,
            dev,
            None,
        );
        b.add(
            rs,
            "kh, vh (first chunk)",
            format!("2 × {ckv}"),
            2,
            u(c * kvw),
            dt.act,
            dev,
            None,
        );
        b.add(
            rs,
            "qh, oh, doh (second query chunk)",
            format!("3 × {cq}"),
            3,
            u(c * qw),
            dt.act,
            dev,
            None,
        );
        b.add(
            rs,
            "lseh, lse_h",
            format!("2 × [heads/tp · t/2] = [{}]", nq * c),
            2,
            u(nq * c),
            dt.stat,
            dev,
            None,
        );
        b.add(
            rs,
            "lse_f",
            format!("[heads/tp · t] = [{}]", nq * t),
            1,
            u(nq * t),
            dt.stat,
            dev,
            None,
        );
        b.add(
            rs,
            "out_f, dq_f (step partials)",
            format!("2 × {tq}"),
            2,
            u(t * qw),
            dt.ring_acc,
            dev,
            None,
        );
        b.add(
            rs,
            "out_h, dq_h (step partials)",
            format!("2 × {cq}"),
            2,
            u(c * qw),
            dt.ring_acc,
            dev,
            None,
        );
        b.add(
            rs,
            "dk_f, dv_f (step partials)",
            format!("2 × {tkv}"),
            2,
            u(t * kvw),
            dt.ring_acc,
            dev,
            None,
        );
        b.add(
            rs,
            "dk_h, dv_h (step partials)",
            format!("2 × {ckv}"),
            2,
            u(c * kvw),
            dt.ring_acc,
            dev,
            None,
        );
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
        if target == Target::CpuTrain && group > 1 {
            // parallel/zero.rs step: the flat gradient and this rank's slice, on the host.
            b.add(
                cm,
                "ZeRO staging: flat gradient + slice",
                format!("[{}] + [{slice}]", slice * group),
                1,
                slice * group + slice,
                dt.grad,
                host,
                Some(PHASE_OPT),
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
        if group > 1 {
            b.add(
                cm,
                "ZeRO all-gather send (bf16 slice)",
                format!("[{slice}]"),
                1,
                slice,
                dt.weight,
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

/// A GPU model and the interconnect it sits in.
#[derive(Clone, Debug, Serialize)]
pub struct Hardware {
    pub name: &'static str,
    /// Memory a process can allocate (nvidia-smi's total).
    pub mem_bytes: u64,
    /// Dense bf16 peak (FLOP/s).
    pub peak_flops: f64,
    /// HBM bandwidth (bytes/s).
    pub hbm_bw: f64,
    /// NVLink bandwidth per GPU per direction (bytes/s) achieved by collectives within a node.
    pub nvlink_bw: f64,
    /// Inter-node bandwidth per GPU per direction (bytes/s).
    pub ib_bw: f64,
    pub gpus_per_node: usize,
    /// Latency of one collective or transfer (s), within a node and across nodes.
    pub alpha_nvlink: f64,
    pub alpha_ib: f64,
    /// CUDA context, library workspaces, NCCL buffers, allocator slack (bytes).
    pub reserve: u64,
}

impl Hardware {
    /// `--gpu`: `h100-80g` or `h200-141g` (name and peak from [`flops::PEAKS`]).
    pub fn parse(s: &str) -> Result<Hardware> {
        let mib = 1u64 << 20;
        let (mem_bytes, hbm_bw) = match s {
            "h100-80g" => (81_559 * mib, 3.35e12),
            "h200-141g" => (143_771 * mib, 4.8e12),
            _ => bail!("--gpu {s:?}: expected h100-80g or h200-141g"),
        };
        let peak = flops::peak_by_key(s)
            .with_context(|| format!("--gpu {s:?}: no peak in flops::PEAKS"))?;
        Ok(Hardware {
            name: peak.name,
            mem_bytes,
            peak_flops: peak.bf16_dense,
            hbm_bw,
            nvlink_bw: 450e9,
            ib_bw: 50e9,
            gpus_per_node: 8,
            alpha_nvlink: 10e-6,
            alpha_ib: 20e-6,
            reserve: 3 << 30,
        })
    }
}

/// The run as the config gives it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RunShape {
    pub seq_len: usize,
    /// Sequences per optimizer step (micro_batch × grad_accum).
    pub global_batch: usize,
    pub steps: u64,
    pub recompute: bool,
    pub ce_chunk: usize,
}

impl RunShape {
    pub fn tokens_per_step(&self) -> f64 {
        (self.global_batch * self.seq_len) as f64
    }
}

/// The CP ring of one layer on one rank: per step, bytes sent vs attention compute.
#[derive(Clone, Debug, Serialize)]
pub struct RingInfo {
    /// "nvlink" when the whole ring sits in one node, else "ib".
    pub link: &'static str,
    pub bandwidth: f64,
    pub steps_per_layer: usize,
    /// Forward: one K+V block per step.
    pub fwd_bytes: f64,
    pub fwd_comm_s: f64,
    pub fwd_compute_s: f64,
    /// Backward: K+V block and dK/dV accumulator per step.
    pub bwd_bytes: f64,
    pub bwd_comm_s: f64,
    pub bwd_compute_s: f64,
    /// Communication / compute of the worse direction (< 1: the ring hides).
    pub ratio: f64,
    pub hides: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct StepTime {
    /// Model and hardware (with recompute) FLOPs of one optimizer step, all GPUs.
    pub model_flops: f64,
    pub hardware_flops: f64,
    pub compute_s: f64,
    pub tp_comm_s: f64,
    pub ce_stats_s: f64,
    pub ring_exposed_s: f64,
    pub zero_comm_s: f64,
    pub adam_s: f64,
    pub step_s: f64,
    pub tokens_per_s: f64,
    /// End-to-end MFU (the stated MFU diluted by the exposed communication) and the hardware
    /// FLOP utilisation of the compute alone.
    pub mfu: f64,
    pub hfu_compute: f64,
    pub ring: Option<RingInfo>,
    /// Sequences each rank processes per step (one at a time).
    pub seqs_per_rank: usize,
}

/// Step time of `layout` (valid for the run) at `mfu`.
pub fn step_time(
    cfg: &ModelConfig,
    run: &RunShape,
    layout: Layout,
    hw: &Hardware,
    mfu: f64,
    dt: &Dtypes,
) -> StepTime {
    let Layout { tp, cp, dp } = layout;
    let gpus = layout.world() as f64;
    let s = run.seq_len;
    let rate = hw.peak_flops * mfu;
    let tokens = run.tokens_per_step();
    let model_flops = tokens * flops::model_flops_per_token(cfg, s);
    let hw_extra = if run.recompute {
        tokens * flops::recompute_flops_per_token(cfg, s)
    } else {
        0.0
    };
    let compute_s = model_flops / (gpus * rate);
    let seqs = run.global_batch / dp;
    let l = cfg.num_hidden_layers;
    let (t, h, hd) = (s / cp, cfg.hidden_size, cfg.head_dim);
    let nq = cfg.num_attention_heads / tp;
    let kvw = cfg.num_key_value_heads / tp * hd;

    // TP: 4 collectives per layer forward, 4 backward, 4 per recomputed layer, + 4 around the
    // embedding and the LM head; each moves (tp-1)/tp of a [t, hidden] tensor per rank.
    let mut tp_s = 0.0;
    let mut ce_s = 0.0;
    if tp > 1 {
        let n = 8 * l + 4 + if run.recompute { 4 * (l - 1) } else { 0 };
        let bytes = (tp - 1) as f64 / tp as f64 * (t * h) as f64 * dt.act as f64;
        tp_s = n as f64 * (hw.alpha_nvlink + bytes / hw.nvlink_bw);
        // Cross-entropy statistics: one small all-gather per chunk.
        ce_s = t.div_ceil(run.ce_chunk.max(1)) as f64 * hw.alpha_nvlink;
    }

    // CP ring: per layer forward cp-1 transfers of the K+V block (again in the recompute), the
    // backward cp-1 K+V transfers and cp dK/dV transfers (the last one after the loop, exposed).
    let mut ring = None;
    let mut ring_s = 0.0;
    if cp > 1 {
        let in_node = tp * cp <= hw.gpus_per_node;
        let (bw, alpha, link) = if in_node {
            (hw.nvlink_bw, hw.alpha_nvlink, "nvlink")
        } else {
            (hw.ib_bw, hw.alpha_ib, "ib")
        };
        // Each ring step but the first computes the rank's two query chunks against one K/V
        // block of two chunks, half of whose pairs the zigzag makes visible: the attention
        // kernel's causal count at t × t. The kernel's backward recomputes P (2.5× forward).
        let kernel = flops::attention_kernel_flops(t, t, nq, hd, true);
        let fwd_compute = kernel.forward / rate;
        let bwd_compute = kernel.backward / rate;
        let kv_bytes = (2 * t * kvw) as f64 * dt.act as f64;
        let dkv_bytes = (2 * t * kvw) as f64 * dt.ring_acc as f64;
        let fwd_comm = alpha + kv_bytes / bw;
        let bwd_comm = alpha + (kv_bytes + dkv_bytes) / bw;
        let fwd_exposed = (fwd_comm - fwd_compute).max(0.0);
        let bwd_exposed = (bwd_comm - bwd_compute).max(0.0);
        let fwd_layers = l + if run.recompute { l - 1 } else { 0 };
        let last_dkv = alpha + dkv_bytes / bw;
        ring_s = fwd_layers as f64 * (cp - 1) as f64 * fwd_exposed
            + l as f64 * ((cp - 1) as f64 * bwd_exposed + last_dkv);
        let ratio = (fwd_comm / fwd_compute).max(bwd_comm / bwd_compute);
        ring = Some(RingInfo {
            link,
            bandwidth: bw,
            steps_per_layer: cp,
            fwd_bytes: kv_bytes,
            fwd_comm_s: fwd_comm,
            fwd_compute_s: fwd_compute,
            bwd_bytes: kv_bytes + dkv_bytes,
            bwd_comm_s: bwd_comm,
            bwd_compute_s: bwd_compute,
            ratio,
            hides: ratio <= 1.0,
        });
    }

    // ZeRO over dp·cp: reduce-scatter the gradients, all-gather the updated weights, all-reduce
    // the loss and the norm; the group spans nodes unless the whole world fits in one.
    let n_r = params_per_rank(cfg, tp) as f64;
    let g = (dp * cp) as f64;
    let (zbw, zalpha) = if layout.world() <= hw.gpus_per_node {
        (hw.nvlink_bw, hw.alpha_nvlink)
    } else {
        (hw.ib_bw, hw.alpha_ib)
    };
    let mut zero_s = 2.0 * zalpha;
    if g > 1.0 {
        zero_s += 2.0 * zalpha + (g - 1.0) / g * n_r * (dt.grad + dt.weight) as f64 / zbw;
    }
    // Adam on the slice: read master, m, v, gradient; write master, m, v and the bf16 weights;
    // zero the gradients.
    let slice = n_r / g;
    let adam_s = (slice * (4 * 4 + 3 * 4 + dt.weight) as f64 + n_r * dt.grad as f64) / hw.hbm_bw;

    let step_s = compute_s + seqs as f64 * (tp_s + ce_s + ring_s) + zero_s + adam_s;
    StepTime {
        model_flops,
        hardware_flops: model_flops + hw_extra,
        compute_s,
        tp_comm_s: seqs as f64 * tp_s,
        ce_stats_s: seqs as f64 * ce_s,
        ring_exposed_s: seqs as f64 * ring_s,
        zero_comm_s: zero_s,
        adam_s,
        step_s,
        tokens_per_s: tokens / step_s,
        mfu: model_flops / (step_s * gpus * hw.peak_flops),
        hfu_compute: mfu * (model_flops + hw_extra) / model_flops,
        ring,
        seqs_per_rank: seqs,
    }
}

/// Why a layout cannot run this config, or `None` when it can (`parallel::topology` rules and
/// the trainer's: tp ≤ KV heads, heads/FFN/vocab divisible by tp, seq_len a multiple of
/// 2·cp·tp, the global batch divisible by dp).
pub fn layout_problem(cfg: &ModelConfig, run: &RunShape, layout: Layout) -> Option<String> {
    if let Err(e) = layout.check_model(cfg) {
        return Some(e.to_string());
    }
    if let Err(e) = layout.check_seq_len(run.seq_len) {
        return Some(e.to_string());
    }
    if !run.seq_len.is_multiple_of(layout.cp * layout.tp) {
        return Some(format!(
            "seq_len {} does not split over cp {} × tp {}",
            run.seq_len, layout.cp, layout.tp
        ));
    }
    if !run.global_batch.is_multiple_of(layout.dp) {
        return Some(format!(
            "the global batch of {} sequences does not divide over dp {}",
            run.global_batch, layout.dp
        ));
    }
    None
}

/// Every (tp, cp, dp) with tp·cp·dp = `gpus` and tp a power of two ≤ the KV heads.
pub fn factorisations(cfg: &ModelConfig, gpus: usize) -> Vec<Layout> {
    let mut out = Vec::new();
    let mut tp = 1;
    while tp <= cfg.num_key_value_heads {
        if gpus.is_multiple_of(tp) {
            let rest = gpus / tp;
            for cp in (1..=rest).filter(|cp| rest.is_multiple_of(*cp)) {
                out.push(Layout {
                    tp,
                    cp,
                    dp: rest / cp,
                });
            }
        }
        tp *= 2;
    }
    out
}

/// One candidate layout: valid or not, its memory and time.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    pub layout: Layout,
    /// Why the layout rules refuse it.
    pub problem: Option<String>,
    pub peak_bytes: u64,
    pub fits: bool,
    pub step: Option<StepTime>,
    #[serde(skip)]
    pub memory: Option<Memory>,
}

/// The layouts of `gpus` GPUs for a run, and the one to use.
#[derive(Clone, Debug, Serialize)]
pub struct Search {
    pub candidates: Vec<Candidate>,
    /// Index into `candidates` of the chosen layout.
    pub chosen: Option<usize>,
    /// Why it was chosen.
    pub reason: String,
}

/// Step times within this fraction of the fastest count as equal: the model cannot tell them
/// apart, and the layout with the most memory headroom is the safer choice among them.
pub const TIE: f64 = 0.01;

/// What the config (or the command line) asks for: a tensor- and/or context-parallel size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefer {
    pub tp: Option<usize>,
    pub cp: Option<usize>,
}

impl Prefer {
    fn matches(&self, l: &Layout) -> bool {
        self.tp.is_none_or(|t| t == l.tp) && self.cp.is_none_or(|c| c == l.cp)
    }
    fn is_some(&self) -> bool {
        self.tp.is_some() || self.cp.is_some()
    }
    fn text(&self) -> String {
        let mut v = Vec::new();
        if let Some(t) = self.tp {
            v.push(format!("tp {t}"));
        }
        if let Some(c) = self.cp {
            v.push(format!("cp {c}"));
        }
        v.join(" × ")
    }
}

/// Among the fitting candidates that `keep` accepts: the fastest, or within [`TIE`] of it the
/// one with the smallest peak.
fn pick(cands: &[Candidate], keep: impl Fn(&Candidate) -> bool) -> Option<usize> {
    let ok: Vec<usize> = (0..cands.len())
        .filter(|&i| cands[i].fits && keep(&cands[i]))
        .collect();
    let time = |i: usize| cands[i].step.as_ref().map_or(f64::INFINITY, |s| s.step_s);
    let best = ok.iter().map(|&i| time(i)).fold(f64::INFINITY, f64::min);
    ok.into_iter()
        .filter(|&i| time(i) <= best * (1.0 + TIE))
        .min_by_key(|&i| cands[i].peak_bytes)
}

/// Evaluate every layout of `gpus` GPUs and choose one: among those that fit (and match the
/// config's `prefer`red tp/cp when any of them does), the fastest; step times within [`TIE`]
/// of the fastest count as equal, and the smallest peak wins among them.
pub fn search(
    cfg: &ModelConfig,
    run: &RunShape,
    gpus: usize,
    hw: &Hardware,
    mfu: f64,
    target: Target,
    prefer: Prefer,
) -> Search {
    let mut cands: Vec<Candidate> = factorisations(cfg, gpus)
        .into_iter()
        .map(|layout| {
            let problem = layout_problem(cfg, run, layout);
            if problem.is_some() {
                return Candidate {
                    layout,
                    problem,
                    peak_bytes: 0,
                    fits: false,
                    step: None,
                    memory: None,
                };
            }
            let shape = RankShape {
                cfg,
                layout,
                seq_len: run.seq_len,
                recompute: run.recompute,
                ce_chunk: run.ce_chunk,
            };
            let reserve = if target == Target::Cuda {
                hw.reserve
            } else {
                0
            };
            let mem = memory(&shape, target, reserve);
            let step = step_time(cfg, run, layout, hw, mfu, &mem.dtypes);
            Candidate {
                layout,
                problem: None,
                peak_bytes: mem.device_peak,
                fits: mem.device_peak <= hw.mem_bytes,
                step: Some(step),
                memory: Some(mem),
            }
        })
        .collect();
    // Display order: valid before invalid, fitting before not, then by step time and peak.
    cands.sort_by(|a, b| {
        let key = |c: &Candidate| {
            (
                c.problem.is_some(),
                !c.fits,
                c.step.as_ref().map_or(f64::INFINITY, |s| s.step_s),
                c.peak_bytes,
            )
        };
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.cmp(&kb.1))
            .then(ka.2.total_cmp(&kb.2))
            .then(ka.3.cmp(&kb.3))
    });
    let free = pick(&cands, |_| true);
    let rule = format!(
        "the fastest that fits (step times within {:.0}% count as equal; then the smallest peak)",
        TIE * 100.0
    );
    let (chosen, reason) = if prefer.is_some() {
        match pick(&cands, |c| prefer.matches(&c.layout)) {
            Some(i) if Some(i) == free => (
                Some(i),
                format!("the config's {}, also {rule}", prefer.text()),
            ),
            Some(i) => (
                Some(i),
                format!(
                    "the config's {} (without it: tp {} × cp {} × dp {}, {rule})",
                    prefer.text(),
                    free.map_or(0, |f| cands[f].layout.tp),
                    free.map_or(0, |f| cands[f].layout.cp),
                    free.map_or(0, |f| cands[f].layout.dp),
                ),
            ),
            None => {
                // Keep the config's tp when only its cp cannot be had on this many GPUs.
                let tp_only = Prefer {
                    tp: prefer.tp,
                    cp: None,
                };
                match prefer
                    .cp
                    .and(prefer.tp)
                    .and_then(|_| pick(&cands, |c| tp_only.matches(&c.layout)))
                {
                    Some(i) => (
                        Some(i),
                        format!(
                            "the config's {}, {rule}; its {} does not fit or is not valid on {gpus} GPUs",
                            tp_only.text(),
                            prefer.text()
                        ),
                    ),
                    None => (
                        free,
                        format!(
                            "{rule}; the config's {} does not fit or is not valid on {gpus} GPUs",
                            prefer.text()
                        ),
                    ),
                }
            }
        }
    } else {
        (free, rule)
    };
    let reason = if chosen.is_none() {
        "no layout fits".to_string()
    } else {
        reason
    };
    Search {
        candidates: cands,
        chosen,
        reason,
    }
}

impl Search {
    /// The valid layout with the smallest peak (for a refusal: how far it is from fitting).
    pub fn smallest(&self) -> Option<&Candidate> {
        self.candidates
            .iter()
            .filter(|c| c.problem.is_none())
            .min_by_key(|c| c.peak_bytes)
    }
}

/// The smallest power-of-two GPU count (up to 2^16) on which some layout fits, if any.
pub fn min_gpus(
    cfg: &ModelConfig,
    run: &RunShape,
    hw: &Hardware,
    mfu: f64,
    target: Target,
) -> Option<usize> {
    (0..=16).map(|k| 1usize << k).find(|&g| {
        search(cfg, run, g, hw, mfu, target, Prefer::default())
            .chosen
            .is_some()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_8b() -> ModelConfig {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/configs/llama-3.1-8b-instruct.json"
        );
        ModelConfig::from_file(std::path::Path::new(p)).unwrap()
    }

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

    fn run(seq: usize, batch: usize) -> RunShape {
        RunShape {
            seq_len: seq,
            global_batch: batch,
            steps: 1,
            recompute: true,
            ce_chunk: 256,
        }
    }

    #[test]
    fn layout_rules() {
        let cfg = llama_8b();
        let l = |tp, cp, dp| Layout { tp, cp, dp };
        let r = run(1 << 20, 8);
        assert!(layout_problem(&cfg, &r, l(8, 4, 1)).is_none());
        let e = layout_problem(&cfg, &r, l(16, 2, 1)).unwrap();
        assert!(e.contains("exceeds num_key_value_heads 8"), "{e}");
        let e = layout_problem(&cfg, &r, l(8, 3, 1)).unwrap();
        assert!(e.contains("multiple of 2·cp·tp = 48"), "{e}");
        let e = layout_problem(&cfg, &run(1 << 20, 2), l(8, 4, 4)).unwrap();
        assert!(e.contains("does not divide over dp 4"), "{e}");
        // tp: powers of two up to the KV heads, every cp × dp split of the rest.
        let f = factorisations(&cfg, 32);
        assert!(
            f.iter()
                .all(|x| x.world() == 32 && x.tp.is_power_of_two() && x.tp <= 8)
        );
        assert_eq!(f.iter().filter(|x| x.tp == 8).count(), 3);
        assert_eq!(f.len(), 6 + 5 + 4 + 3);
    }

    #[test]
    fn paper_layouts_fit_on_80gb() {
        let cfg = llama_8b();
        let hw = Hardware::parse("h100-80g").unwrap();
        for (seq, batch, gpus, cp) in [
            (1 << 20, 8, 32, 4),
            (1 << 21, 4, 128, 16),
            (1 << 22, 2, 256, 16),
        ] {
            let r = run(seq, batch);
            let p = Prefer {
                tp: Some(8),
                cp: Some(cp),
            };
            let s = search(&cfg, &r, gpus, &hw, 0.4, Target::Cuda, p);
            let c = &s.candidates[s.chosen.expect("a layout fits")];
            assert_eq!((c.layout.tp, c.layout.cp), (8, cp), "{}", s.reason);
            assert!(c.peak_bytes < hw.mem_bytes);
            eprintln!(
                "S = {seq}: tp 8 cp {cp}: peak {:.1} GiB",
                c.peak_bytes as f64 / GIB
            );
            assert!(c.step.as_ref().unwrap().ring.as_ref().unwrap().hides);
        }
    }

    #[test]
    fn too_few_gpus_for_4m_is_refused_with_the_margin() {
        let cfg = llama_8b();
        let hw = Hardware::parse("h100-80g").unwrap();
        let s = search(
            &cfg,
            &run(1 << 22, 2),
            32,
            &hw,
            0.4,
            Target::Cuda,
            Prefer::default(),
        );
        assert!(s.chosen.is_none());
        let best = s.smallest().unwrap();
        assert!(best.peak_bytes > hw.mem_bytes);
        assert_eq!(best.layout.tp * best.layout.cp, 32);
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
