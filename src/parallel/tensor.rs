//! Tensor + sequence parallelism as conjugate pairs (Megatron-Core's `mappings.py`): each
//! communication the model makes is one of these names, whose backward is the transpose of its
//! forward. Activations are `[rows, width]` row-major, and sequence parallelism splits the rows:
//! TP rank r of `tp` holds rows `r·n .. (r+1)·n` of the rank's local tokens.
//!
//! | pair                   | forward                    | backward                  |
//! |------------------------|----------------------------|---------------------------|
//! | `gather_seq`           | all-gather rows            | reduce-scatter rows (sum) |
//! | `reduce_scatter_seq`   | reduce-scatter rows (sum)  | all-gather rows           |
//! | `all_reduce_grads`     | (replicated weight)        | all-reduce (sum)          |
//! | `reduce`               | all-reduce (sum)           | identity                  |
//!
//! Column-parallel layers (q/k/v, gate/up) sit after `gather_seq`; row-parallel layers (o,
//! down) and the vocab-parallel embedding produce partial sums that `reduce_scatter_seq` sums and
//! splits back into sequence shards. Without sequence parallelism (decode's one row, held whole
//! by every rank) the gather is the identity and the partial sums meet in `reduce` instead
//! (Megatron's `reduce_from_tensor_model_parallel_region`; forward only here). The pairs call the
//! communicator's buffer collectives (`Comm::*_buf`): host-staged MPI on the CPU, NCCL or the
//! host-staged fallback on GPUs.

use crate::backend::Backend;
use crate::parallel::comm::Comm;

/// `gather_seq` forward: `full [size·n]` = the group's `local [n]` blocks in rank order.
pub fn gather_seq_forward<B: Backend, C: Comm>(
    b: &B,
    comm: &C,
    local: &B::Buf,
    n: usize,
    full: &mut B::Buf,
) {
    if comm.size() == 1 {
        b.copy(local, 0, full, 0, n);
        return;
    }
    comm.all_gather_buf(b, local, 0, n, full);
}

/// `gather_seq` backward: `dlocal (+)= Σ over ranks of their dfull[rank block]`.
pub fn gather_seq_backward<B: Backend, C: Comm>(
    b: &B,
    comm: &C,
    dfull: &B::Buf,
    n: usize,
    dlocal: &mut B::Buf,
    accumulate: bool,
) {
    reduce_scatter_into(b, comm, dfull, n, dlocal, accumulate);
}

/// `reduce_scatter_seq` forward: `out (+)= this rank's block of Σ over ranks of partial [size·n]`
/// (with `accumulate`, the residual connection is the `+`).
pub fn reduce_scatter_seq_forward<B: Backend, C: Comm>(
    b: &B,
    comm: &C,
    partial: &B::Buf,
    n: usize,
    out: &mut B::Buf,
    accumulate: bool,
) {
    reduce_scatter_into(b, comm, partial, n, out, accumulate);
}

/// `reduce_scatter_seq` backward: `dpartial [size·n]` = all-gather of `dout [n]`.
pub fn reduce_scatter_seq_backward<B: Backend, C: Comm>(
    b: &B,
    comm: &C,
    dout: &B::Buf,
    n: usize,
    dpartial: &mut B::Buf,
) {
    gather_seq_forward(b, comm, dout, n, dpartial);
}

fn reduce_scatter_into<B: Backend, C: Comm>(
    b: &B,
    comm: &C,
    full: &B::Buf,
    n: usize,
    out: &mut B::Buf,
    accumulate: bool,
) {
    if comm.size() == 1 {
        if accumulate {
            b.add_at(out, 0, full, 0, n);
        } else {
            b.copy(full, 0, out, 0, n);
        }
        return;
    }
    comm.reduce_scatter_buf(b, full, n, out, accumulate);
}

/// `reduce` forward: `out (+)= Σ over ranks of partial [n]`, every rank holding all `n` values
/// (no sequence split); with `accumulate`, the residual connection is the `+`.
pub fn reduce_forward<B: Backend, C: Comm>(
    b: &B,
    comm: &C,
    partial: &B::Buf,
    n: usize,
    out: &mut B::Buf,
    accumulate: bool,
) {
    if comm.size() == 1 {
        if accumulate {
            b.add_at(out, 0, partial, 0, n);
        } else {
            b.copy(partial, 0, out, 0, n);
        }
        return;
    }
    if accumulate {
        let mut sum = b.zeros(n);
        b.copy(partial, 0, &mut sum, 0, n);
        comm.all_reduce_buf(b, &mut sum, n);
        b.add_at(out, 0, &sum, 0, n);
    } else {
        b.copy(partial, 0, out, 0, n);
        comm.all_reduce_buf(b, out, n);
    }
}

/// Sum a buffer over the group in place (gradients of replicated weights, partial sums).
pub fn all_reduce_buf<B: Backend, C: Comm>(b: &B, comm: &C, buf: &mut B::Buf) {
    if comm.size() == 1 {
        return;
    }
    let n = b.len(buf);
    comm.all_reduce_buf(b, buf, n);
}

/// The full tensors of a store of TP shards (every rank of the TP group gets all of them), with
/// `prefix` before each name (e.g. `m.` for a moment); for checkpoints and exports.
pub fn gather_full_host<B: Backend, C: Comm>(
    b: &B,
    tp: &C,
    store: &crate::model::params::ParamStore<B>,
    prefix: &str,
) -> crate::io::TensorMap {
    use crate::model::params::Split;
    let mut map = crate::io::TensorMap::new();
    for (s, buf) in store.specs.iter().zip(&store.bufs) {
        let local = b.download(buf);
        let data = if tp.size() == 1 || s.split == Split::Replicated {
            local
        } else {
            let mut all = vec![0f32; local.len() * tp.size()];
            tp.all_gather(&local, &mut all);
            s.join_shards(&all, tp.size())
        };
        map.insert(
            format!("{prefix}{}", s.name),
            crate::io::HostTensor::new(s.full_shape.clone(), data),
        );
    }
    map
}
