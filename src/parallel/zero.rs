//! ZeRO-1's partition over the DP × CP group: the ranks that hold the same weight shard (same TP
//! rank) split the optimizer state. The flat vector of a rank's local tensors (concatenated in
//! store order, zero-padded to a multiple of the group) is cut into equal slices; rank `k` owns
//! slice `k`. This file holds that partition and its three collectives; the optimizer that keeps
//! state per slice is `train::optim::ShardedAdamW`.
//!
//! - `reduce_scatter`: gradients of replicated weights (norms: each TP rank saw only its sequence
//!   shard) are summed over TP, then the flat gradient is reduce-scattered over DP × CP: rank `k`
//!   receives the sum of slice `k`;
//! - `norm`: the global L2 norm of the reduced gradient, each rank's slice squared (replicated
//!   tensors counted on TP rank 0 only), summed over the world;
//! - `all_gather`: every rank's slices back into full local tensors.
//!
//! With one rank in the group the slice is everything and the collectives are copies.

use crate::backend::Backend;
use crate::model::params::{ParamSpec, ParamStore, Split};
use crate::parallel::comm::{Comm, ReduceOp};
use crate::parallel::tensor::all_reduce_buf;
use crate::parallel::topology::Topology;

/// The part of one tensor that falls in this rank's slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Index of the tensor in the store.
    pub param: usize,
    /// Offset within the tensor.
    pub off: usize,
    /// Offset within this rank's slice.
    pub at: usize,
    pub len: usize,
    /// Counted in the gradient norm on this rank (replicated tensors: TP rank 0 only).
    pub in_norm: bool,
}

/// This rank's slice of the flat local parameters.
#[derive(Clone, Debug)]
pub struct Partition {
    /// Elements of all local tensors.
    total: usize,
    /// Elements per slice (`total` rounded up to the group size, divided by it).
    slice: usize,
    /// This rank's slice index.
    index: usize,
    group: usize,
    /// Offset of each tensor in the flat order.
    offsets: Vec<usize>,
    /// Elements of each tensor.
    sizes: Vec<usize>,
    segments: Vec<Segment>,
}

impl Partition {
    /// Slice `index` of `group` over tensors `specs`; `tp_rank` decides who counts replicated
    /// tensors in the norm.
    pub fn new(specs: &[ParamSpec], group: usize, index: usize, tp_rank: usize) -> Self {
        assert!(index < group, "slice {index} of a group of {group}");
        let sizes: Vec<usize> = specs.iter().map(ParamSpec::numel).collect();
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
                segments.push(Segment {
                    param: i,
                    off: a - start,
                    at: a - lo,
                    len: z - a,
                    in_norm: specs[i].split != Split::Replicated || tp_rank == 0,
                });
            }
            start += n;
        }
        Partition {
            total,
            slice,
            index,
            group,
            offsets,
            sizes,
            segments,
        }
    }

    /// This rank's partition of its local tensors over the DP × CP group of `topo`.
    pub fn of_rank(topo: &Topology, specs: &[ParamSpec]) -> Self {
        Self::new(specs, topo.dpcp.size(), topo.dpcp_rank(), topo.tp_rank)
    }

    /// The tensors' parts in this rank's slice, in flat order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
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

    /// Reduce `grads` over TP (replicated tensors) and DP × CP; segment `k`'s part of the sum
    /// lands in `out[k]` (each `segments()[k].len` long). `grads` is left holding partial results.
    pub fn reduce_scatter<B: Backend>(
        &self,
        b: &B,
        topo: &Topology,
        grads: &mut ParamStore<B>,
        out: &mut [B::Buf],
    ) {
        assert_eq!(out.len(), self.segments.len());
        if topo.layout.tp > 1 {
            for (s, g) in grads.specs.iter().zip(grads.bufs.iter_mut()) {
                if s.split == Split::Replicated {
                    all_reduce_buf(b, &topo.tp, g);
                }
            }
        }
        if self.group == 1 {
            for (s, o) in self.segments.iter().zip(out) {
                b.copy(&grads.bufs[s.param], s.off, o, 0, s.len);
            }
            return;
        }
        // The flat gradient and this rank's slice are backend buffers: on GPUs with NCCL the
        // reduce-scatter never leaves the device (`Comm::reduce_scatter_buf`).
        let mut flat = b.zeros(self.slice * self.group);
        for (i, g) in grads.bufs.iter().enumerate() {
            b.copy(g, 0, &mut flat, self.offsets[i], self.sizes[i]);
        }
        let mut mine = b.zeros(self.slice);
        topo.dpcp
            .reduce_scatter_buf(b, &flat, self.slice, &mut mine, false);
        for (s, o) in self.segments.iter().zip(out) {
            b.copy(&mine, s.at, o, 0, s.len);
        }
    }

    /// The global L2 norm of a reduced gradient whose slices (one buffer per segment, as
    /// `reduce_scatter` leaves them) are spread over the world.
    pub fn norm<B: Backend>(&self, b: &B, topo: &Topology, parts: &[B::Buf]) -> f64 {
        let mut sq = [self
            .segments
            .iter()
            .zip(parts)
            .filter(|(s, _)| s.in_norm)
            .map(|(_, g)| b.sum_squares(g))
            .sum::<f64>()];
        topo.world.all_reduce(&mut sq, ReduceOp::Sum);
        sq[0].sqrt()
    }

    /// All-gather per-segment buffers (`parts[k]` for segment `k`) over the group into `out`, a
    /// store shaped like the local parameters.
    pub fn all_gather<B: Backend>(
        &self,
        b: &B,
        topo: &Topology,
        parts: &[B::Buf],
        out: &mut ParamStore<B>,
    ) {
        assert_eq!(parts.len(), self.segments.len());
        if self.group == 1 {
            for (k, s) in self.segments.iter().enumerate() {
                b.copy(&parts[k], 0, &mut out.bufs[s.param], s.off, s.len);
            }
            return;
        }
        let mut mine = b.zeros(self.slice);
        for (k, s) in self.segments.iter().enumerate() {
            b.copy(&parts[k], 0, &mut mine, s.at, s.len);
        }
        let mut flat = b.zeros(self.slice * self.group);
        topo.dpcp.all_gather_buf(b, &mine, 0, self.slice, &mut flat);
        for (i, buf) in out.bufs.iter_mut().enumerate() {
            b.copy(&flat, self.offsets[i], buf, 0, self.sizes[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The partition against the slicing formula (flat index `x` lives in slice `x / slice` at
    //! `x % slice`), and the collectives on thread ranks against sums computed here on the host.
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::parallel::any::AnyComm;
    use crate::parallel::thread::ThreadComm;
    use crate::util::gradcheck::test_values;

    fn spec(name: &str, rows: usize, cols: usize, split: Split) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            shape: vec![rows, cols],
            is_norm: split == Split::Replicated,
            split,
            full_shape: vec![rows, cols],
        }
    }

    /// Local shards of four tensors, two of them replicated, 5 + 14 + 1 + 12 = 32 elements.
    fn specs() -> Vec<ParamSpec> {
        vec![
            spec("norm_a", 1, 5, Split::Replicated),
            spec("w", 7, 2, Split::Rows),
            spec("norm_b", 1, 1, Split::Replicated),
            spec("o", 3, 4, Split::Cols),
        ]
    }

    #[test]
    fn slices_cover_the_flat_vector_once_by_the_formula() {
        let specs = specs();
        let sizes: Vec<usize> = specs.iter().map(ParamSpec::numel).collect();
        let total: usize = sizes.iter().sum();
        let starts: Vec<usize> = sizes
            .iter()
            .scan(0, |a, &n| {
                *a += n;
                Some(*a - n)
            })
            .collect();
        for group in 1..=7 {
            let slice = total.div_ceil(group);
            let mut seen = vec![0usize; total];
            for index in 0..group {
                let p = Partition::new(&specs, group, index, 0);
                assert_eq!(p.slice(), (index, slice));
                assert_eq!(p.total(), total);
                let mut held = 0;
                for s in p.segments() {
                    for j in 0..s.len {
                        let x = starts[s.param] + s.off + j;
                        assert_eq!(x / slice, index, "group {group}: element {x}");
                        assert_eq!(x % slice, s.at + j, "group {group}: element {x}");
                        seen[x] += 1;
                    }
                    held += s.len;
                }
                assert_eq!(p.held(), held);
                assert_eq!(
                    held,
                    total.min((index + 1) * slice).saturating_sub(index * slice)
                );
            }
            assert!(seen.iter().all(|&c| c == 1), "group {group}: {seen:?}");
        }
    }

    #[test]
    fn replicated_tensors_count_in_the_norm_on_tp_rank_0_only() {
        for tp_rank in [0, 1] {
            let p = Partition::new(&specs(), 1, 0, tp_rank);
            for s in p.segments() {
                let replicated = specs()[s.param].split == Split::Replicated;
                assert_eq!(s.in_norm, !replicated || tp_rank == 0, "{s:?}");
            }
        }
    }

    /// Rank (t, d)'s local gradient of tensor `i`.
    fn grad(t: usize, d: usize, i: usize, n: usize) -> Vec<f64> {
        test_values(n, (100 * t + 10 * d + i) as u64)
    }

    #[test]
    fn reduce_scatter_norm_and_all_gather_match_host_sums() {
        let (tp, dp) = (2, 3);
        let specs = specs();
        // Reduced gradient of TP rank t: sum over DP, and over TP too for replicated tensors.
        let reduced = |t: usize, i: usize| -> Vec<f64> {
            let n = specs[i].numel();
            let tps: Vec<usize> = if specs[i].split == Split::Replicated {
                (0..tp).collect()
            } else {
                vec![t]
            };
            let mut sum = vec![0.0; n];
            for &u in &tps {
                for d in 0..dp {
                    for (a, g) in sum.iter_mut().zip(grad(u, d, i, n)) {
                        *a += g;
                    }
                }
            }
            sum
        };
        // Replicated tensors once, TP shards of the others from every TP rank.
        let norm: f64 = (0..specs.len())
            .flat_map(|i| {
                let ts = if specs[i].split == Split::Replicated {
                    1
                } else {
                    tp
                };
                (0..ts).flat_map(move |t| reduced(t, i))
            })
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt();
        let results = ThreadComm::run(tp * dp, |world: AnyComm| {
            let b = CpuBackend::<f64>::new();
            let topo = Topology::new(&world, tp, 1).unwrap();
            let (t, d) = (topo.tp_rank, topo.dp_rank);
            let p = Partition::of_rank(&topo, &specs);
            let mut grads = ParamStore::<CpuBackend<f64>> {
                specs: specs.clone(),
                bufs: specs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| b.upload_f64(&grad(t, d, i, s.numel())))
                    .collect(),
            };
            let mut parts: Vec<_> = p.segments().iter().map(|s| b.zeros(s.len)).collect();
            p.reduce_scatter(&b, &topo, &mut grads, &mut parts);
            let mine: Vec<Vec<f64>> = parts.iter().map(|x| b.download_f64(x)).collect();
            let n = p.norm(&b, &topo, &parts);
            let mut out = ParamStore::<CpuBackend<f64>> {
                specs: specs.clone(),
                bufs: specs.iter().map(|s| b.zeros(s.numel())).collect(),
            };
            p.all_gather(&b, &topo, &parts, &mut out);
            let full: Vec<Vec<f64>> = out.bufs.iter().map(|x| b.download_f64(x)).collect();
            (t, p.segments().to_vec(), mine, n, full)
        });
        for (t, segs, mine, n, full) in results {
            for (s, got) in segs.iter().zip(&mine) {
                let want = &reduced(t, s.param)[s.off..s.off + s.len];
                for (a, b) in got.iter().zip(want) {
                    assert!((a - b).abs() < 1e-14, "tp {t}, {s:?}: {a} vs {b}");
                }
            }
            assert!(
                (n - norm).abs() < 1e-14 * norm,
                "tp {t}: norm {n} vs {norm}"
            );
            for (i, f) in full.iter().enumerate() {
                let want = reduced(t, i);
                for (a, b) in f.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-14, "tp {t}, tensor {i}: {a} vs {b}");
                }
            }
        }
    }
}
