//! Step time of one layout in `ultralong plan`: compute at the stated MFU of the GPU's peak
//! (`crate::flops`), plus the communication this implementation does not overlap (TP
//! collectives, the exposed part of the CP ring, ZeRO), and Adam; [`Hardware`] names the GPU and
//! the bandwidths assumed.

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::RunShape;
use super::memory::{Dtypes, params_per_rank};
use crate::flops;
use crate::model::config::ModelConfig;
use crate::parallel::topology::Layout;

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
