//! Launchers of cuda/embedding.cu: the gather, and the deterministic backward — token positions
//! grouped by id on the host (a stable sort), one block per id summing its rows in token order, so
//! no atomics and the same sum every run.

use cudarc::driver::LaunchConfig;

use super::device::THREADS;
use super::{CudaBackend, CudaBuf};
use crate::backend::NOT_IN_SHARD;

/// `Backend::embedding_forward`: `out[t, :] = table[ids[t], :]` (0 for `NOT_IN_SHARD`).
pub(super) fn forward(
    b: &CudaBackend,
    table: &CudaBuf,
    ids: &[u32],
    dim: usize,
    out: &mut CudaBuf,
) {
    assert_eq!(
        out.len,
        ids.len() * dim,
        "embedding_forward: out has the wrong size"
    );
    let vocab = table.len / dim.max(1);
    for &id in ids {
        assert!(
            id == NOT_IN_SHARD || (id as usize) < vocab,
            "token id {id} out of range for vocabulary {vocab}"
        );
    }
    if ids.is_empty() || dim == 0 {
        return;
    }
    let ids_d = b.upload_raw(ids);
    let cfg = LaunchConfig {
        grid_dim: (ids.len() as u32, dim.div_ceil(THREADS as usize) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(b, "ul_embedding_fwd", cfg; table.ptr, table.dtype.code(), ids_d.ptr,
        ids.len() as i32, dim as i32, out.ptr, out.dtype.code());
}

/// `Backend::embedding_backward`: `dtable[ids[t], :] += dout[t, :]`, in token order.
pub(super) fn backward(
    b: &CudaBackend,
    dtable: &mut CudaBuf,
    ids: &[u32],
    dim: usize,
    dout: &CudaBuf,
) {
    assert_eq!(
        dout.len,
        ids.len() * dim,
        "embedding_backward: dout has the wrong size"
    );
    let vocab = dtable.len / dim.max(1);
    // Token positions grouped by id, each group in token order (a stable sort).
    let mut order: Vec<i32> = (0..ids.len() as i32)
        .filter(|&t| ids[t as usize] != NOT_IN_SHARD)
        .collect();
    order.sort_by_key(|&t| ids[t as usize]);
    let mut seg_start: Vec<i32> = Vec::new();
    let mut seg_id: Vec<u32> = Vec::new();
    for (j, &t) in order.iter().enumerate() {
        let id = ids[t as usize];
        assert!(
            (id as usize) < vocab,
            "token id {id} out of range for vocabulary {vocab}"
        );
        if seg_id.last() != Some(&id) {
            seg_id.push(id);
            seg_start.push(j as i32);
        }
    }
    seg_start.push(order.len() as i32);
    if seg_id.is_empty() || dim == 0 {
        return;
    }
    let (o, s, i) = (
        b.upload_raw(&order),
        b.upload_raw(&seg_start),
        b.upload_raw(&seg_id),
    );
    let cfg = LaunchConfig {
        grid_dim: (
            seg_id.len() as u32,
            dim.div_ceil(THREADS as usize) as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(b, "ul_embedding_bwd", cfg; dtable.ptr, dtable.dtype.code(), dout.ptr,
        dout.dtype.code(), o.ptr, s.ptr, i.ptr, seg_id.len() as i32, dim as i32);
}
