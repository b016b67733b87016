//! The language model that `generate` and `eval niah|ppl` drive, whichever architecture its
//! config.json names (`model::arch`): a `Decoder` (prefill a prompt, decode token by token) and
//! each sequence's per-row losses. `LlamaLm` is a Llama on a TP × CP group (`model::infer`'s
//! `Session`: ring-attention prefill, the KV cache spread over CP); `HsaLm` is the HSA model on
//! one rank (`model::hsa::infer`'s `HsaSession`: sliding-window caches and the chunk memory).
//!
//! `EvalBackend` loads either on a backend: the CUDA backend has no HSA kernels yet and says so.

use std::path::Path;

use anyhow::{Result, ensure};

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::backend::select::BackendKind;
use crate::eval::ppl;
use crate::io::MappedTensors;
use crate::model::arch::ArchConfig;
use crate::model::config::ModelConfig;
use crate::model::hsa::config::HsaConfig;
use crate::model::hsa::infer::HsaSession;
use crate::model::hsa::model::HsaModel;
use crate::model::hsa::ops::HsaOps;
use crate::model::infer::Session;
use crate::model::llama::Llama;
use crate::model::params::Shard;
use crate::model::rope::RopePrecision;
use crate::parallel::comm::Comm;
use crate::parallel::topology::Topology;
use crate::util::Real;

/// One prompt's incremental decoding.
pub trait Decoder {
    /// Feed the prompt; the last token's logits `[vocab]`.
    fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>>;
    /// Feed one token; its logits `[vocab]`.
    fn decode(&mut self, id: u32) -> Result<Vec<f32>>;
    /// The token every rank of the decoding group goes on with: the CP leader's pick.
    fn agree(&self, id: u32) -> u32;
    /// Rows of the KV cache held on this rank, where the decoder keeps one per token.
    fn cached_rows(&self) -> Option<usize> {
        None
    }
}

impl<B: Backend, C: Comm> Decoder for Session<'_, B, C> {
    fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        Session::prefill(self, ids)
    }
    fn decode(&mut self, id: u32) -> Result<Vec<f32>> {
        Session::decode(self, id)
    }
    fn agree(&self, id: u32) -> u32 {
        let mut t = [id as u64];
        self.cp().broadcast(&mut t, 0);
        t[0] as u32
    }
    fn cached_rows(&self) -> Option<usize> {
        Some(self.cache().len())
    }
}

fn f32s(v: Vec<f64>) -> Vec<f32> {
    v.into_iter().map(|x| x as f32).collect()
}

impl<B: HsaOps> Decoder for HsaSession<'_, B> {
    fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(f32s(HsaSession::prefill(self, ids)?))
    }
    fn decode(&mut self, id: u32) -> Result<Vec<f32>> {
        Ok(f32s(HsaSession::step(self, id)?))
    }
    fn agree(&self, id: u32) -> u32 {
        id
    }
}

/// A loaded model as the evaluations use it.
pub trait EvalLm {
    /// The Llama keys (vocabulary, window, end-of-sequence ids).
    fn cfg(&self) -> &ModelConfig;
    /// A fresh decoder for one prompt.
    fn decoder(&self) -> Box<dyn Decoder + '_>;
    /// Per-row next-token losses of one sequence (`ids.len()` values; the last, with no target,
    /// NaN), the same on every rank of the group.
    fn sequence_losses(&self, ids: &[u32]) -> Result<Vec<f64>>;
    /// What a report calls the architecture.
    fn name(&self) -> &'static str;
}

/// A Llama on this rank's TP × CP group.
pub struct LlamaLm<'a, B: Backend, C: Comm> {
    pub b: &'a B,
    pub model: Llama<B>,
    pub tp: &'a C,
    pub cp: &'a C,
}

impl<B: Backend, C: Comm> EvalLm for LlamaLm<'_, B, C> {
    fn cfg(&self) -> &ModelConfig {
        &self.model.cfg
    }
    fn decoder(&self) -> Box<dyn Decoder + '_> {
        Box::new(Session::new(self.b, &self.model, self.tp, self.cp))
    }
    fn sequence_losses(&self, ids: &[u32]) -> Result<Vec<f64>> {
        ppl::sequence_losses(self.b, &self.model, self.tp, self.cp, ids)
    }
    fn name(&self) -> &'static str {
        "Llama"
    }
}

/// The HSA model on one rank.
pub struct HsaLm<'a, B: HsaOps> {
    pub b: &'a B,
    pub model: HsaModel<B>,
}

/// Rows fed to the HSA session per block when scoring a sequence: the logits of one block
/// (`[rows, vocab]`) are alive at a time, never the whole sequence's.
const HSA_LOSS_BLOCK: usize = 1024;

impl<B: HsaOps> EvalLm for HsaLm<'_, B> {
    fn cfg(&self) -> &ModelConfig {
        &self.model.cfg.base
    }
    fn decoder(&self) -> Box<dyn Decoder + '_> {
        Box::new(HsaSession::new(self.b, &self.model).expect("checked by HsaLm::new"))
    }
    fn sequence_losses(&self, ids: &[u32]) -> Result<Vec<f64>> {
        let vocab = self.model.cfg.base.vocab_size;
        let mut s = HsaSession::new(self.b, &self.model)?;
        let mut out = Vec::with_capacity(ids.len());
        for (k, block) in ids.chunks(HSA_LOSS_BLOCK).enumerate() {
            let logits = s.extend(block)?;
            for (r, row) in logits.chunks(vocab).enumerate() {
                let i = k * HSA_LOSS_BLOCK + r;
                out.push(match ids.get(i + 1) {
                    Some(&next) => {
                        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
                        z.ln() + m - row[next as usize]
                    }
                    None => f64::NAN,
                });
            }
        }
        Ok(out)
    }
    fn name(&self) -> &'static str {
        "HSA"
    }
}

impl<'a, B: HsaOps> HsaLm<'a, B> {
    pub fn new(b: &'a B, cfg: HsaConfig, dir: &Path) -> Result<Self> {
        let arch = ArchConfig::Hsa(cfg);
        let files = MappedTensors::open_dir(dir)?;
        let params = arch.params_from_files(b, &files, &dir.display().to_string(), Shard::WHOLE)?;
        let ArchConfig::Hsa(cfg) = arch else {
            unreachable!()
        };
        let model = HsaModel::new(cfg, params)?;
        HsaSession::new(b, &model)?;
        Ok(HsaLm { b, model })
    }
}

/// Refuse, before any backend starts, a model the chosen backend cannot run (the HSA model on
/// CUDA), so the error names the model rather than a missing driver.
pub fn check_backend(dir: &Path, kind: BackendKind) -> Result<()> {
    let p = dir.join("config.json");
    if kind == BackendKind::Cuda && p.is_file() && ArchConfig::from_file(&p)?.is_hsa() {
        anyhow::bail!("{}: {}", p.display(), crate::train::model::HSA_NOT_ON_CUDA);
    }
    Ok(())
}

/// The architectures a backend can evaluate.
pub trait EvalBackend: Backend + Sized {
    /// The model of directory `dir` on this rank of `topo` (its TP shard for a Llama).
    fn load_lm<'a>(
        &'a self,
        topo: &'a Topology,
        dir: &Path,
        precision: RopePrecision,
    ) -> Result<Box<dyn EvalLm + 'a>>;
}

fn load_llama<'a, B: Backend>(
    b: &'a B,
    topo: &'a Topology,
    cfg: ModelConfig,
    dir: &Path,
    precision: RopePrecision,
) -> Result<Box<dyn EvalLm + 'a>> {
    topo.layout.check_model(&cfg)?;
    let model = Llama::load_shard(b, dir, precision, topo.shard())?;
    Ok(Box::new(LlamaLm {
        b,
        model,
        tp: &topo.tp,
        cp: &topo.cp,
    }))
}

/// The HSA model evaluates on one rank per prompt (data parallel over prompts is fine).
fn check_hsa_layout(topo: &Topology) -> Result<()> {
    ensure!(
        topo.layout.tp == 1 && topo.layout.cp == 1,
        "the HSA model evaluates on one rank per prompt for now: --tp {} and --cp {} must be 1",
        topo.layout.tp,
        topo.layout.cp
    );
    Ok(())
}

impl<T: Real> EvalBackend for CpuBackend<T> {
    fn load_lm<'a>(
        &'a self,
        topo: &'a Topology,
        dir: &Path,
        precision: RopePrecision,
    ) -> Result<Box<dyn EvalLm + 'a>> {
        match ArchConfig::from_file(&dir.join("config.json"))? {
            ArchConfig::Llama(c) => load_llama(self, topo, c, dir, precision),
            ArchConfig::Hsa(c) => {
                check_hsa_layout(topo)?;
                Ok(Box::new(HsaLm::new(self, c, dir)?))
            }
        }
    }
}

#[cfg(feature = "cuda")]
impl EvalBackend for crate::backend::cuda::CudaBackend {
    fn load_lm<'a>(
        &'a self,
        topo: &'a Topology,
        dir: &Path,
        precision: RopePrecision,
    ) -> Result<Box<dyn EvalLm + 'a>> {
        match ArchConfig::from_file(&dir.join("config.json"))? {
            ArchConfig::Llama(c) => load_llama(self, topo, c, dir, precision),
            ArchConfig::Hsa(_) => anyhow::bail!(crate::train::model::HSA_NOT_ON_CUDA),
        }
    }
}
