//! One rank's part of a step over a global batch, the same for training, `forward` and the layout
//! tests: every rank holds the whole batch; DP rank `d` takes sequences `d, d + dp, …`, CP rank
//! `r` its zigzag chunks of each; forward and backward accumulate gradients scaled by 1 / (the
//! global batch's counted targets), and the loss is summed over DP × CP into the global mean.
//!
//! Gradients are left unreduced: the optimizer reduce-scatters them (`train::optim`), and
//! `all_reduce_grads` gives every rank the full gradient where it is wanted whole (`forward
//! --grads`, tests).

use anyhow::Result;

use crate::backend::Backend;
use crate::data::loader::{Sample, zigzag_slice};
use crate::model::llama::{Head, Llama, Workspace};
use crate::model::params::{ParamStore, Split};
use crate::parallel::comm::{Comm, ReduceOp};
use crate::parallel::tensor::all_reduce_buf;
use crate::parallel::topology::Topology;

/// A global batch, the same on every rank: sequences of one length as (token ids, next-token
/// targets, -1 where no loss is counted), at positions `pos0..pos0 + len`.
#[derive(Clone, Copy, Debug)]
pub struct GlobalBatch<'a> {
    pub seqs: &'a [(Vec<u32>, Vec<i32>)],
    pub pos0: u64,
}

impl GlobalBatch<'_> {
    /// Counted targets of the whole batch (at least 1, so an all-masked batch has loss 0).
    pub fn targets(&self) -> usize {
        self.seqs
            .iter()
            .map(|(_, t)| t.iter().filter(|&&x| x >= 0).count())
            .sum::<usize>()
            .max(1)
    }

    /// This rank's sequences (DP stride) and the zigzag chunks of each (CP), with their global
    /// positions.
    pub fn local(&self, topo: &Topology) -> Result<Vec<Sample>> {
        self.seqs
            .iter()
            .skip(topo.dp_rank)
            .step_by(topo.layout.dp)
            .map(|(ids, targets)| {
                let s = Sample {
                    ids: ids.clone(),
                    targets: targets.clone(),
                    positions: (self.pos0..self.pos0 + ids.len() as u64).collect(),
                };
                // One CP rank holds the whole sequence, of any length.
                if topo.layout.cp > 1 {
                    zigzag_slice(&s, topo.layout.cp, topo.cp_rank)
                } else {
                    Ok(s)
                }
            })
            .collect()
    }
}

/// Forward (and backward into `grads`, when given) over this rank's share of `batch`; returns the
/// batch's mean loss over its counted targets, the same on every rank.
pub fn forward_backward_batch<B: Backend>(
    b: &B,
    topo: &Topology,
    model: &Llama<B>,
    ws: &mut Workspace<B>,
    batch: GlobalBatch<'_>,
    mut grads: Option<&mut ParamStore<B>>,
) -> Result<f64> {
    let n = batch.targets() as f64;
    let mut loss = 0.0;
    for s in batch.local(topo)? {
        loss += model.forward_backward_rank(
            b,
            topo,
            ws,
            &s.ids,
            &s.positions,
            Head::Loss {
                targets: &s.targets,
                grad_scale: 1.0 / n,
            },
            grads.as_deref_mut(),
        );
    }
    let mut l = [loss];
    topo.dpcp.all_reduce(&mut l, ReduceOp::Sum);
    Ok(l[0] / n)
}

/// Sum the gradients of a batch over every rank that saw part of it: replicated weights over TP
/// (each TP rank saw a sequence shard), every weight over DP × CP (each saw a share of the batch).
pub fn all_reduce_grads<B: Backend>(b: &B, topo: &Topology, grads: &mut ParamStore<B>) {
    for (spec, buf) in grads.specs.iter().zip(grads.bufs.iter_mut()) {
        if spec.split == Split::Replicated {
            all_reduce_buf(b, &topo.tp, buf);
        }
        all_reduce_buf(b, &topo.dpcp, buf);
    }
}
