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
    /// Measured kernel rates (`plan --rates DEVICE`, bench/rates.toml): compute time from the
    /// rank's GEMM and attention work over them instead of the model FLOPs at a stated MFU.
    pub rates: Option<crate::rates::DeviceRates>,
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
            rates: None,
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

/// The tensor-core work of one rank for one sequence of its layout: what `Timed` counts when
/// the pass runs (tested against it), and what the kernel rates turn into time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RankWork {
    /// GEMMs: layers forward and backward (2 + 4 FLOPs per matmul parameter and token), the
    /// LM head, and the recomputed layers' forward.
    pub gemm_flops: f64,
    /// Attention forward calls (every layer, and again the recomputed ones) and backward calls,
    /// by the kernel convention (`flops::attention_kernel_flops_of_pairs`: backward 2.5×).
    pub attn_fwd_flops: f64,
    pub attn_bwd_flops: f64,
    /// The sequence length the attention rates are looked up at (the rank's local tokens).
    pub attn_len: usize,
}

/// [`RankWork`] of `layout` for one sequence of `run`.
pub fn rank_work(cfg: &ModelConfig, run: &RunShape, layout: Layout) -> RankWork {
    let Layout { tp, cp, .. } = layout;
    let t = run.seq_len / cp;
    let l = cfg.num_hidden_layers as f64;
    let p_layer = flops::layer_matmul_params(cfg) as f64 / tp as f64;
    let head = (cfg.vocab_size * cfg.hidden_size) as f64 / tp as f64;
    let recomputed = if run.recompute { l - 1.0 } else { 0.0 };
    let gemm_flops = t as f64 * (6.0 * (l * p_layer + head) + 2.0 * recomputed * p_layer);
    // Visible (query, key) pairs of one layer on one rank: the own block causally (t(t+1)/2 with
    // the zigzag's virtual positions), and each of the cp-1 other blocks t²/2 (half of the
    // queries against the whole block, or all of them against half of it).
    let t2 = (t * t) as f64;
    let pairs = t2 / 2.0 + t as f64 / 2.0 + (cp - 1) as f64 * t2 / 2.0;
    let k =
        flops::attention_kernel_flops_of_pairs(pairs, cfg.num_attention_heads / tp, cfg.head_dim);
    RankWork {
        gemm_flops,
        attn_fwd_flops: (l + recomputed) * k.forward,
        attn_bwd_flops: l * k.backward,
        attn_len: t,
    }
}

impl RankWork {
    /// Seconds of this work at measured kernel rates.
    pub fn seconds(&self, r: &crate::rates::DeviceRates) -> f64 {
        let len = self.attn_len as f64;
        self.gemm_flops / (r.gemm_tflops * 1e12)
            + self.attn_fwd_flops / (r.attention_tflops(false, len) * 1e12)
            + self.attn_bwd_flops / (r.attention_tflops(true, len) * 1e12)
    }
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
    let seqs = run.global_batch / dp;
    // At the stated MFU, or the rank's GEMM and attention work at measured kernel rates.
    let compute_s = match &hw.rates {
        None => model_flops / (gpus * rate),
        Some(r) => seqs as f64 * rank_work(cfg, run, layout).seconds(r),
    };
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
        hfu_compute: (model_flops + hw_extra) / (compute_s * gpus * hw.peak_flops),
        ring,
        seqs_per_rank: seqs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::timed::Timed;
    use crate::data::loader::{Sample, zigzag_slice};
    use crate::model::llama::{Head, Llama, Workspace};
    use crate::model::params::ParamStore;
    use crate::model::rope::RopePrecision;
    use crate::parallel::loopback::loopback_topology;

    /// The work the time model charges a rank equals what that rank's pass really does, as
    /// `Timed` counts it call by call (GEMM shapes, attention pairs) on a loopback rank.
    #[test]
    fn rank_work_is_what_a_rank_pass_does() {
        let cfg = ModelConfig::from_json_str(
            r#"{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512}"#,
            "t",
        )
        .unwrap();
        let seq = 64;
        for (tp, cp) in [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)] {
            for recompute in [false, true] {
                let layout = Layout { tp, cp, dp: 1 };
                let topo = loopback_topology(layout, 0, None);
                let b = Timed::on_host(CpuBackend::<f32>::new());
                let params = ParamStore::init_random_shard(&b, &cfg, 1, topo.shard());
                let model = Llama::new(cfg.clone(), RopePrecision::Exact, params).unwrap();
                let mut ws = Workspace::for_rank(&b, &cfg, &topo, seq / cp, recompute, 16);
                let mut g = model.params.zeros_like(&b);
                let s = Sample {
                    ids: (0..seq).map(|i| (i * 5 % 64) as u32).collect(),
                    targets: (0..seq).map(|i| (i * 3 % 64) as i32).collect(),
                    positions: (0..seq as u64).collect(),
                };
                let s = zigzag_slice(&s, cp, 0).unwrap();
                b.reset();
                model.forward_backward_rank(
                    &b,
                    &topo,
                    &mut ws,
                    &s.ids,
                    &s.positions,
                    Head::Loss {
                        targets: &s.targets,
                        grad_scale: 1.0 / seq as f64,
                    },
                    Some(&mut g),
                );
                let r = b.report();
                let got = |name: &str| r.get(name).map_or(0.0, |p| p.flops);
                let run = RunShape {
                    seq_len: seq,
                    global_batch: 1,
                    steps: 1,
                    recompute,
                    ce_chunk: 16,
                };
                let w = rank_work(&cfg, &run, layout);
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
                let what = format!("tp {tp} cp {cp} recompute {recompute}");
                assert!(close(w.gemm_flops, got("gemm")), "{what}: gemm {w:?}");
                let fwd = got("attention fwd") + got("attention fwd (recompute)");
                assert!(close(w.attn_fwd_flops, fwd), "{what}: fwd {fwd} {w:?}");
                assert!(
                    close(w.attn_bwd_flops, got("attention bwd")),
                    "{what}: bwd {w:?}"
                );
            }
        }
    }

    #[test]
    fn rates_turn_work_into_time() {
        let r = crate::rates::device(
            Some(std::path::Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/bench/rates.toml"
            ))),
            "h200",
        )
        .unwrap();
        let w = RankWork {
            gemm_flops: 2e15,
            attn_fwd_flops: 1e15,
            attn_bwd_flops: 3e15,
            attn_len: 131072,
        };
        let want = 2e15 / (r.gemm_tflops * 1e12)
            + 1e15 / (r.attention_tflops(false, 131072.0) * 1e12)
            + 3e15 / (r.attention_tflops(true, 131072.0) * 1e12);
        assert!((w.seconds(&r) - want).abs() < 1e-12 * want);
    }
}
