//! Launchers of cuda/cross_entropy.cu: the vocabulary-parallel cross-entropy's two passes over a
//! chunk of logits — per-row statistics over this shard (max, Σexp, the target's logit), then,
//! with the statistics combined over the shard group, the gradient written over the logits.

use super::device::{per_row, row_threads};
use super::{CudaBackend, CudaBuf, DType};
use crate::backend::CeStats;

/// `Backend::cross_entropy_stats`.
pub(super) fn stats(
    b: &CudaBackend,
    logits: &CudaBuf,
    targets: &[i32],
    vocab: usize,
) -> Vec<CeStats> {
    let rows = targets.len();
    assert_eq!(logits.len, rows * vocab, "cross_entropy_stats: sizes");
    for &t in targets {
        assert!(t < vocab as i32, "target {t} out of shard of {vocab}");
    }
    if rows == 0 {
        return Vec::new();
    }
    let tg = b.upload_raw(targets);
    let st = b.alloc(rows * 8, DType::F32);
    let cfg = per_row(rows, row_threads(vocab / 8, 1024));
    launch!(b, "ul_ce_stats", cfg; logits.ptr, logits.dtype.code(), tg.ptr, rows as i32,
        vocab as i32, st.ptr);
    let h = b.download_raw::<f64>(&st, rows * 4);
    h.chunks(4)
        .map(|c| CeStats {
            max: c[0],
            sum: c[1],
            target: (c[3] != 0.0).then_some(c[2]),
        })
        .collect()
}

/// `Backend::cross_entropy_grad`.
pub(super) fn grad(
    b: &CudaBackend,
    logits: &mut CudaBuf,
    targets: &[i32],
    vocab: usize,
    max: &[f64],
    sum: &[f64],
    grad_scale: f64,
) {
    let rows = targets.len();
    assert!(
        logits.len == rows * vocab && max.len() == rows && sum.len() == rows,
        "cross_entropy_grad: sizes"
    );
    if rows == 0 {
        return;
    }
    let (tg, mx, sm) = (b.upload_raw(targets), b.upload_raw(max), b.upload_raw(sum));
    let cfg = per_row(rows, row_threads(vocab / 8, 1024));
    launch!(b, "ul_ce_grad", cfg; logits.ptr, logits.dtype.code(), tg.ptr, rows as i32,
        vocab as i32, mx.ptr, sm.ptr, grad_scale as f32);
}
