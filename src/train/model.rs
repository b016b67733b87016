//! What the training loop asks of a model, whichever architecture its config.json names
//! (`model::arch`): its parameters, one rank's forward and backward over a global batch
//! (`train::step`'s split), and its FLOP count. `LlamaRun` is a Llama with its workspace (any
//! layout, any backend); `HsaRun` is the HSA model (docs/HSA.md), on backends that have the HSA
//! operations (`HsaOps`: the CPU backend today), one sequence per DP rank, split over TP
//! (`HsaModel::forward_backward_tp`), cp = 1.
//!
//! `ModelBackend` tells, per backend, which architectures it can build: the CUDA backend has no
//! HSA kernels yet and says so in one line instead of failing inside a pass.

use anyhow::{Result, ensure};

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::flops;
use crate::model::arch::ArchConfig;
use crate::model::config::ModelConfig;
use crate::model::hsa::config::HsaConfig;
use crate::model::hsa::model::{Head as HsaHead, HsaModel};
use crate::model::hsa::ops::HsaOps;
use crate::model::llama::{Llama, Workspace};
use crate::model::params::{ParamStore, Shard};
use crate::model::rope::RopePrecision;
use crate::parallel::comm::{Comm, ReduceOp};
use crate::parallel::topology::Topology;
use crate::train::step::{GlobalBatch, forward_backward_batch};
use crate::util::Real;

/// A model as the training loop drives it.
pub trait TrainModel<B: Backend> {
    /// Its config (written into every checkpoint).
    fn arch(&self) -> &ArchConfig;
    fn params(&self) -> &ParamStore<B>;
    fn params_mut(&mut self) -> &mut ParamStore<B>;
    /// Model FLOPs per trained token at sequence length `seq` (`flops`).
    fn flops_per_token(&self, seq: usize) -> f64;
    /// Forward (and backward into `grads`) over this rank's share of `batch`; the batch's mean
    /// loss over its counted targets, the same on every rank.
    fn forward_backward_batch(
        &mut self,
        b: &B,
        topo: &Topology,
        batch: GlobalBatch<'_>,
        grads: Option<&mut ParamStore<B>>,
    ) -> Result<f64>;
}

/// How the loop's sequences are processed: what `Workspace` is sized for.
#[derive(Clone, Copy, Debug)]
pub struct PassOptions {
    pub seq_len: usize,
    pub recompute: bool,
    pub ce_chunk: usize,
    pub precision: RopePrecision,
}

/// A Llama and the workspace of its passes on this rank.
pub struct LlamaRun<B: Backend> {
    arch: ArchConfig,
    pub model: Llama<B>,
    ws: Workspace<B>,
}

impl<B: Backend> LlamaRun<B> {
    pub fn new(
        b: &B,
        topo: &Topology,
        cfg: ModelConfig,
        params: ParamStore<B>,
        o: PassOptions,
    ) -> Result<Self> {
        topo.layout.check_model(&cfg)?;
        let model = Llama::new(cfg, o.precision, params)?;
        let ws = Workspace::for_rank(
            b,
            &model.cfg,
            topo,
            o.seq_len / topo.layout.cp,
            o.recompute,
            o.ce_chunk,
        );
        Ok(LlamaRun {
            arch: ArchConfig::Llama(model.cfg.clone()),
            model,
            ws,
        })
    }
}

impl<B: Backend> TrainModel<B> for LlamaRun<B> {
    fn arch(&self) -> &ArchConfig {
        &self.arch
    }
    fn params(&self) -> &ParamStore<B> {
        &self.model.params
    }
    fn params_mut(&mut self) -> &mut ParamStore<B> {
        &mut self.model.params
    }
    fn flops_per_token(&self, seq: usize) -> f64 {
        flops::model_flops_per_token(&self.model.cfg, seq)
    }
    fn forward_backward_batch(
        &mut self,
        b: &B,
        topo: &Topology,
        batch: GlobalBatch<'_>,
        grads: Option<&mut ParamStore<B>>,
    ) -> Result<f64> {
        forward_backward_batch(b, topo, &self.model, &mut self.ws, batch, grads)
    }
}

/// The HSA model on one rank of a data-parallel world.
pub struct HsaRun<B: HsaOps> {
    arch: ArchConfig,
    pub model: HsaModel<B>,
}

impl<B: HsaOps> HsaRun<B> {
    pub fn new(
        topo: &Topology,
        cfg: HsaConfig,
        params: ParamStore<B>,
        seq_len: usize,
    ) -> Result<Self> {
        let l = topo.layout;
        ensure!(
            l.cp == 1,
            "the HSA model trains with tensor and data parallelism only for now: parallel.cp = \
             {} must be 1",
            l.cp
        );
        ensure!(
            seq_len > 0 && seq_len.is_multiple_of(cfg.chunk_size),
            "train.seq_len = {seq_len} must be a multiple of the HSA model's chunk_size {}",
            cfg.chunk_size
        );
        Ok(HsaRun {
            arch: ArchConfig::Hsa(cfg.clone()),
            model: HsaModel::new_shard(
                cfg,
                params,
                Shard {
                    rank: topo.tp_rank,
                    size: l.tp,
                },
            )?,
        })
    }
}

impl<B: HsaOps> TrainModel<B> for HsaRun<B> {
    fn arch(&self) -> &ArchConfig {
        &self.arch
    }
    fn params(&self) -> &ParamStore<B> {
        &self.model.params
    }
    fn params_mut(&mut self) -> &mut ParamStore<B> {
        &mut self.model.params
    }
    fn flops_per_token(&self, seq: usize) -> f64 {
        flops::hsa_flops_per_token(&self.model.cfg, seq)
    }
    fn forward_backward_batch(
        &mut self,
        b: &B,
        topo: &Topology,
        batch: GlobalBatch<'_>,
        mut grads: Option<&mut ParamStore<B>>,
    ) -> Result<f64> {
        let n = batch.targets() as f64;
        let mut loss = 0.0;
        for s in batch.local(topo)? {
            let (l, _) = self.model.forward_backward_tp(
                b,
                &topo.tp,
                &s.ids,
                batch.pos0,
                HsaHead::Loss {
                    targets: &s.targets,
                    grad_scale: 1.0 / n,
                },
                grads.as_deref_mut(),
            )?;
            loss += l;
        }
        let mut l = [loss];
        topo.dpcp.all_reduce(&mut l, ReduceOp::Sum);
        Ok(l[0] / n)
    }
}

/// The architectures a backend can build for training.
pub trait ModelBackend: Backend + Sized {
    /// A model of `arch` over `params` (this rank's shard), ready for passes of `o`.
    fn train_model(
        &self,
        topo: &Topology,
        arch: ArchConfig,
        params: ParamStore<Self>,
        o: PassOptions,
    ) -> Result<Box<dyn TrainModel<Self> + '_>>;
}

impl<T: Real> ModelBackend for CpuBackend<T> {
    fn train_model(
        &self,
        topo: &Topology,
        arch: ArchConfig,
        params: ParamStore<Self>,
        o: PassOptions,
    ) -> Result<Box<dyn TrainModel<Self> + '_>> {
        Ok(match arch {
            ArchConfig::Llama(c) => Box::new(LlamaRun::new(self, topo, c, params, o)?),
            ArchConfig::Hsa(c) => Box::new(HsaRun::new(topo, c, params, o.seq_len)?),
        })
    }
}

#[cfg(feature = "cuda")]
impl ModelBackend for crate::backend::cuda::CudaBackend {
    fn train_model(
        &self,
        topo: &Topology,
        arch: ArchConfig,
        params: ParamStore<Self>,
        o: PassOptions,
    ) -> Result<Box<dyn TrainModel<Self> + '_>> {
        match arch {
            ArchConfig::Llama(c) => Ok(Box::new(LlamaRun::new(self, topo, c, params, o)?)),
            ArchConfig::Hsa(_) => anyhow::bail!(HSA_NOT_ON_CUDA),
        }
    }
}

/// Why an HSA model does not run on the CUDA backend.
pub const HSA_NOT_ON_CUDA: &str = "the HSA model (DRTForCausalLM) runs on the CPU backend only \
     (backend = \"cpu\"): its CUDA kernels are not written yet";
