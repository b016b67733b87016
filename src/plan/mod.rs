//! `ultralong plan`: what a run costs on N GPUs — per-rank memory, step time, GPU-hours — for
//! every parallel layout the layout rules allow, and which layout to use. This file holds the
//! public API; the model is split by concern:
//!
//! **Memory** (`memory.rs`). One formula, [`memory`], lists every buffer a rank holds: the
//! weights, gradients and ZeRO-1 optimizer slices (`parallel/zero.rs`), the workspace's buffers
//! as `model::llama::workspace_buffers` lists them for `Workspace::for_rank` (layer inputs, one
//! layer's or every layer's activations, gradient scratch), the ring scratch
//! (`parallel::context::RingScratch`), communication staging, and the transient buffers of a few
//! phases (RoPE table rebuild, checkpoint save, the benchmark's attention profile). It is
//! parameterised by the bytes per element of each class of buffer ([`Dtypes`]): with bf16
//! activations, weights and gradients and fp32 master weights and Adam moments it is the CUDA
//! projection (docs/ARCHITECTURE.md "Numerics"); with f32 everywhere and the CPU backend's buffer list it
//! predicts what `ultralong bench train` measures (tests/plan_cli.rs checks it against measured
//! peaks, and the workspace byte for byte).
//!
//! **FLOPs.** `crate::flops`: docs/ARCHITECTURE.md's causal model count (`6·N + 6·q·S·L` per token), which
//! the stated MFU is defined on; full recompute makes the hardware run the forward of layers
//! `0..L-1` a second time (about 4/3 ×), which the stated MFU does not count (hardware FLOP
//! utilisation = MFU × hardware / model FLOPs). The CP ring's attention time uses the
//! attention-kernel count (backward 2.5× forward).
//!
//! **Time** (`time.rs`). Compute at the stated MFU of the dense bf16 peak, plus the
//! communication that this implementation does not overlap: the TP collectives
//! (`parallel::tensor`, blocking), the part of each CP ring transfer that outlasts the ring
//! step's attention compute, the ZeRO reduce-scatter / all-gather after the backward, and Adam
//! itself (HBM-bound). Each transfer costs `α + bytes / bandwidth` (α-β model; [`Hardware`]
//! names the assumed bandwidths).
//!
//! **Search** (`search.rs`). Every (tp, cp, dp) of N GPUs that the layout rules allow, each with
//! its memory and step time, and the one to use.

mod memory;
mod search;
mod time;

use serde::Serialize;

pub use memory::{
    Buffer, Dtypes, Memory, PHASE_BENCH, PHASE_CHECKPOINT, PHASE_OPT, PHASE_RING_BWD, PHASE_ROPE,
    PHASE_TP, Place, RankShape, Target, WORKSPACE_GROUPS, memory, params_per_rank,
};
pub use search::{
    Candidate, Prefer, Search, TIE, factorisations, layout_problem, min_gpus, search,
};
pub use time::{Hardware, RingInfo, StepTime, step_time};

pub const GIB: f64 = (1u64 << 30) as f64;

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

#[cfg(test)]
fn llama_8b() -> crate::model::config::ModelConfig {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/llama-3.1-8b-instruct.json"
    );
    crate::model::config::ModelConfig::from_file(std::path::Path::new(p)).unwrap()
}

#[cfg(test)]
fn run(seq: usize, batch: usize) -> RunShape {
    RunShape {
        seq_len: seq,
        global_batch: batch,
        steps: 1,
        recompute: true,
        ce_chunk: 256,
    }
}
