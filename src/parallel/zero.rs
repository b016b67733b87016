//! ZeRO-1 over the DP × CP group: the ranks that hold the same weight shard (same TP rank) split
//! the optimizer state. Per step:
//!
//! 1. gradients of replicated weights (norms: each TP rank saw only its sequence shard) are
//!    summed over TP;
//! 2. the flat gradient (every local tensor, concatenated, zero-padded to a multiple of the group)
//!    is reduce-scattered over DP × CP: rank `k` receives the sum of slice `k`;
//! 3. the global gradient norm: each rank's slice squared (replicated tensors counted on TP rank 0
//!    only), summed over the world;
//! 4. AdamW on the slice: fp32 master weights and both moments exist only for the slice;
//! 5. the updated slices are all-gathered back into every rank's weights.
//!
//! With one rank this is exactly the unsharded optimizer, tensor by tensor.

use crate::backend::{AdamW, Backend};
use crate::model::params::{ParamStore, Split};
use crate::parallel::comm::{Comm, ReduceOp};
use crate::parallel::tensor::all_reduce_buf;
use crate::parallel::topology::Topology;

/// The part of one tensor that falls in this rank's slice.
struct Segment<B: Backend> {
    param: usize,
    /// Offset within the tensor.
    off: usize,
    /// Offset within this rank's slice.
    at: usize,
    len: usize,
    decay: bool,
    /// Counted in the norm on this rank (replicated tensors: TP rank 0 only).
    in_norm: bool,
    master: B::Buf,
    m: B::Buf,
    v: B::Buf,
    grad: B::Buf,
}

pub struct ShardedAdamW<B: Backend> {
    /// Elements of all local tensors.
    total: usize,
    /// Elements per slice (`total` rounded up to the group size, divided by it).
    slice: usize,
    /// This rank's slice index.
    index: usize,
    group: usize,
    /// Offset of each tensor in the flat order.
    offsets: Vec<usize>,
    segments: Vec<Segment<B>>,
}

impl<B: Backend> ShardedAdamW<B> {
    /// State for `params` (this rank's TP shard): master weights copied from them, zero moments.
    pub fn new(b: &B, topo: &Topology, params: &ParamStore<B>) -> Self {
        let (group, index) = (topo.dpcp.size(), topo.dpcp_rank());
        let sizes: Vec<usize> = params.specs.iter().map(|s| s.numel()).collect();
        let total: usize = sizes.iter().sum();
        let slice = total.div_ceil(group);
        let (lo, hi) = (index * slice, ((index + 1) * slice).min(total));
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut segments = Vec::new();
        let mut start = 0;
        for (i, &n) in sizes.iter().enumerate() {
            offsets.push(start);
            let (a, z) = (start.max(lo), (start + n).min(hi));
            if a < z {
                let len = z - a;
                let spec = &params.specs[i];
                let mut master = b.zeros(len);
                b.copy(&params.bufs[i], a - start, &mut master, 0, len);
                segments.push(Segment {
                    param: i,
                    off: a - start,
                    at: a - lo,
                    len,
                    decay: !spec.is_norm,
                    in_norm: spec.split != Split::Replicated || topo.tp_rank == 0,
                    master,
                    m: b.zeros(len),
                    v: b.zeros(len),
                    grad: b.zeros(len),
                });
            }
            start += n;
        }
        ShardedAdamW {
            total,
            slice,
            index,
            group,
            offsets,
            segments,
        }
    }

    /// Reduce `grads` (summed over this rank's sequences, already scaled by 1 / global target
    /// count), clip to `max_norm` (0 = off) and update `params`. Returns the global gradient norm
    /// before clipping. `grads` is left holding partial results (zero it before the next step).
    pub fn step(
        &mut self,
        b: &B,
        topo: &Topology,
        params: &mut ParamStore<B>,
        grads: &mut ParamStore<B>,
        hp: AdamW,
        max_norm: f64,
    ) -> f64 {
        // 1. Replicated weights: sum over the TP group's sequence shards.
        if topo.layout.tp > 1 {
            for (s, g) in grads.specs.iter().zip(grads.bufs.iter_mut()) {
                if s.split == Split::Replicated {
                    all_reduce_buf(b, &topo.tp, g);
                }
            }
        }
        // 2. Reduce-scatter the flat gradient over DP × CP.
        if self.group == 1 {
            for s in &mut self.segments {
                b.copy(&grads.bufs[s.param], s.off, &mut s.grad, 0, s.len);
            }
        } else {
            let mut flat = vec![B::Host::default(); self.slice * self.group];
            for (i, g) in grads.bufs.iter().enumerate() {
                let n = grads.specs[i].numel();
                b.read_host(g, 0, &mut flat[self.offsets[i]..self.offsets[i] + n]);
            }
            let mut mine = vec![B::Host::default(); self.slice];
            topo.dpcp.reduce_scatter(&flat, &mut mine);
            for s in &mut self.segments {
                b.write_host(&mut s.grad, 0, &mine[s.at..s.at + s.len]);
            }
        }
        // 3. Global norm.
        let mut sq = [self
            .segments
            .iter()
            .filter(|s| s.in_norm)
            .map(|s| b.sum_squares(&s.grad))
            .sum::<f64>()];
        topo.world.all_reduce(&mut sq, ReduceOp::Sum);
        let norm = sq[0].sqrt();
        // 4. AdamW on this rank's slice.
        let hp = AdamW {
            grad_scale: hp.grad_scale * crate::train::trainer::clip_factor(norm, max_norm),
            ..hp
        };
        for s in &mut self.segments {
            let h = AdamW {
                weight_decay: if s.decay { hp.weight_decay } else { 0.0 },
                ..hp
            };
            b.adamw(&mut s.master, &s.grad, &mut s.m, &mut s.v, &h);
        }
        // 5. Everyone's updated slices back into the weights.
        self.gather_into(b, topo, |s| &s.master, params);
        norm
    }

    /// All-gather one per-segment state (master weights or a moment) over the group into a store
    /// shaped like the local parameters.
    fn gather_into(
        &self,
        b: &B,
        topo: &Topology,
        pick: impl Fn(&Segment<B>) -> &B::Buf,
        out: &mut ParamStore<B>,
    ) {
        if self.group == 1 {
            for s in &self.segments {
                b.copy(pick(s), 0, &mut out.bufs[s.param], s.off, s.len);
            }
            return;
        }
        let mut mine = vec![B::Host::default(); self.slice];
        for s in &self.segments {
            b.read_host(pick(s), 0, &mut mine[s.at..s.at + s.len]);
        }
        let mut flat = vec![B::Host::default(); self.slice * self.group];
        topo.dpcp.all_gather(&mine, &mut flat);
        for (i, buf) in out.bufs.iter_mut().enumerate() {
            let n = out.specs[i].numel();
            b.write_host(buf, 0, &flat[self.offsets[i]..self.offsets[i] + n]);
        }
        debug_assert!(
            self.offsets
                .last()
                .map_or(0, |o| o + out.specs.last().unwrap().numel())
                == self.total
        );
    }

    /// The first and second moments of every local tensor (gathered over the group), shaped like
    /// `like` (for checkpoints).
    pub fn moments(
        &self,
        b: &B,
        topo: &Topology,
        like: &ParamStore<B>,
    ) -> (ParamStore<B>, ParamStore<B>) {
        let mut m = like.zeros_like(b);
        let mut v = like.zeros_like(b);
        self.gather_into(b, topo, |s| &s.m, &mut m);
        self.gather_into(b, topo, |s| &s.v, &mut v);
        (m, v)
    }

    /// Restore the moments from stores shaped like the local parameters (a checkpoint, resharded
    /// by the caller to this TP rank); master weights from `params`.
    pub fn set_state(
        &mut self,
        b: &B,
        params: &ParamStore<B>,
        m: &ParamStore<B>,
        v: &ParamStore<B>,
    ) {
        for s in &mut self.segments {
            b.copy(&params.bufs[s.param], s.off, &mut s.master, 0, s.len);
            b.copy(&m.bufs[s.param], s.off, &mut s.m, 0, s.len);
            b.copy(&v.bufs[s.param], s.off, &mut s.v, 0, s.len);
        }
    }

    /// This rank's slice index and its nominal length (the last slice may hold fewer elements).
    pub fn slice(&self) -> (usize, usize) {
        (self.index, self.slice)
    }

    /// Elements of the local TP shard, all tensors (the flat length before padding).
    pub fn total(&self) -> usize {
        self.total
    }

    /// Elements this rank's slice really holds.
    pub fn held(&self) -> usize {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// The slice's master weights, first and second moments, flat, in f32 (checkpoints).
    pub fn export_slice(&self, b: &B) -> [Vec<f32>; 3] {
        let mut out = [Vec::new(), Vec::new(), Vec::new()];
        for s in &self.segments {
            out[0].extend(b.download(&s.master));
            out[1].extend(b.download(&s.m));
            out[2].extend(b.download(&s.v));
        }
        out
    }

    /// Restore the slice from `export_slice`'s vectors (same layout).
    pub fn import_slice(&mut self, b: &B, master: &[f32], m: &[f32], v: &[f32]) {
        for s in &mut self.segments {
            s.master = b.upload(&master[s.at..s.at + s.len]);
            s.m = b.upload(&m[s.at..s.at + s.len]);
            s.v = b.upload(&v[s.at..s.at + s.len]);
        }
    }

    /// Restore from stores shaped like the local parameters, with separate master weights.
    pub fn set_state_with_master(
        &mut self,
        b: &B,
        master: &ParamStore<B>,
        m: &ParamStore<B>,
        v: &ParamStore<B>,
    ) {
        self.set_state(b, master, m, v);
    }
}
