//! Launchers of cuda/swiglu.cu: `out = silu(gate) * up` and its backward, with 16-byte-vector
//! kernels when every operand is bf16 and the length a multiple of 8.

use super::{CudaBackend, CudaBuf, DType};

/// `Backend::swiglu_forward`.
pub(super) fn forward(b: &CudaBackend, gate: &CudaBuf, up: &CudaBuf, out: &mut CudaBuf) {
    assert!(
        gate.len == up.len && out.len == up.len,
        "swiglu_forward: sizes"
    );
    if up.len == 0 {
        return;
    }
    let bf = DType::Bf16;
    if gate.dtype == bf && up.dtype == bf && out.dtype == bf && up.len.is_multiple_of(8) {
        let n8 = up.len / 8;
        let cfg = b.grid1d(n8);
        launch!(b, "ul_swiglu_fwd_bf16x8", cfg; gate.ptr, up.ptr, out.ptr, n8 as i64);
        return;
    }
    let cfg = b.grid1d(up.len);
    launch!(b, "ul_swiglu_fwd", cfg; gate.ptr, gate.dtype.code(), up.ptr, up.dtype.code(),
        out.ptr, out.dtype.code(), up.len as i64);
}

/// `Backend::swiglu_backward`: `dgate`, `dup` overwritten.
pub(super) fn backward(
    b: &CudaBackend,
    gate: &CudaBuf,
    up: &CudaBuf,
    dout: &CudaBuf,
    dgate: &mut CudaBuf,
    dup: &mut CudaBuf,
) {
    let n = up.len;
    assert!(
        gate.len == n && dout.len == n && dgate.len == n && dup.len == n,
        "swiglu_backward: sizes"
    );
    if n == 0 {
        return;
    }
    let bf = DType::Bf16;
    if [gate.dtype, up.dtype, dout.dtype, dgate.dtype, dup.dtype]
        .iter()
        .all(|&d| d == bf)
        && n.is_multiple_of(8)
    {
        let cfg = b.grid1d(n / 8);
        launch!(b, "ul_swiglu_bwd_bf16x8", cfg; gate.ptr, up.ptr, dout.ptr, dgate.ptr,
            dup.ptr, (n / 8) as i64);
        return;
    }
    let cfg = b.grid1d(n);
    launch!(b, "ul_swiglu_bwd", cfg; gate.ptr, gate.dtype.code(), up.ptr, up.dtype.code(),
        dout.ptr, dout.dtype.code(), dgate.ptr, dgate.dtype.code(), dup.ptr,
        dup.dtype.code(), n as i64);
}
