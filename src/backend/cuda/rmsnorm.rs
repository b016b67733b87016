//! Launchers of cuda/rmsnorm.cu: the forward (a 16-byte-vector kernel for bf16 rows, a general
//! one otherwise) and the backward: dx per row, then dw deterministically in two passes (fp32
//! partial sums over chunks of rows, then one column sum added into dw).

use cudarc::driver::LaunchConfig;

use super::device::{THREADS, per_row, row_threads};
use super::{CudaBackend, CudaBuf, DType};

/// `Backend::rmsnorm_forward`.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    b: &CudaBackend,
    x: &CudaBuf,
    w: &CudaBuf,
    eps: f64,
    rows: usize,
    dim: usize,
    out: &mut CudaBuf,
    rstd: &mut CudaBuf,
) {
    assert!(
        x.len == rows * dim && out.len == rows * dim && rstd.len == rows && w.len == dim,
        "rmsnorm_forward: sizes"
    );
    if rows == 0 {
        return;
    }
    let bf = DType::Bf16;
    if x.dtype == bf && w.dtype == bf && out.dtype == bf && dim.is_multiple_of(8) && dim / 8 <= 4096
    {
        // One 16-byte vector per thread and pass (at most 4 passes: the kernel's register row).
        let cfg = per_row(rows, row_threads(dim / 8, 1024));
        launch!(b, "ul_rmsnorm_fwd_bf16x8", cfg; x.ptr, w.ptr, eps as f32, rows as i32,
            dim as i32, out.ptr, rstd.ptr, rstd.dtype.code());
        return;
    }
    let cfg = per_row(rows, row_threads(dim / 4, 1024));
    launch!(b, "ul_rmsnorm_fwd", cfg; x.ptr, x.dtype.code(), w.ptr, w.dtype.code(),
        eps as f32, rows as i32, dim as i32, out.ptr, out.dtype.code(), rstd.ptr,
        rstd.dtype.code());
}

/// `Backend::rmsnorm_backward`: `dx += ∂L/∂x`, `dw += ∂L/∂w`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    b: &CudaBackend,
    dout: &CudaBuf,
    x: &CudaBuf,
    w: &CudaBuf,
    rstd: &CudaBuf,
    rows: usize,
    dim: usize,
    dx: &mut CudaBuf,
    dw: &mut CudaBuf,
) {
    assert!(
        x.len == rows * dim && dout.len == rows * dim && dx.len == rows * dim && w.len == dim,
        "rmsnorm_backward: sizes"
    );
    if rows == 0 {
        return;
    }
    let cfg = per_row(rows, row_threads(dim / 4, 1024));
    launch!(b, "ul_rmsnorm_bwd_dx", cfg; dout.ptr, dout.dtype.code(), x.ptr,
        x.dtype.code(), w.ptr, w.dtype.code(), rstd.ptr, rstd.dtype.code(), rows as i32,
        dim as i32, dx.ptr, dx.dtype.code());
    const CHUNK_ROWS: usize = 64;
    let chunks = rows.div_ceil(CHUNK_ROWS);
    let partial = b.alloc(chunks * dim, DType::F32);
    let cols = dim.div_ceil(THREADS as usize) as u32;
    let cfg = LaunchConfig {
        grid_dim: (chunks as u32, cols, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(b, "ul_rmsnorm_bwd_dw_partial", cfg; dout.ptr, dout.dtype.code(), x.ptr,
        x.dtype.code(), rstd.ptr, rstd.dtype.code(), rows as i32, dim as i32,
        CHUNK_ROWS as i32, partial.ptr);
    let cfg = LaunchConfig {
        grid_dim: (cols, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(b, "ul_colsum_add", cfg; partial.ptr, chunks as i32, dim as i32, dw.ptr,
        dw.dtype.code());
}
