//! Launchers of cuda/attention_simple.cu, a simple correct causal GQA attention (one warp per
//! query row in the forward and dQ, one per key row in dK/dV): the fallback for head dims the
//! flash kernels do not take, and the ring's LSE merge. Also the shape both attention kernels read
//! (`UlAttnShape`) and the size checks of the `Backend` contract they share.

use cudarc::driver::{DeviceRepr, LaunchConfig};

use super::device::{THREADS, warp_grid};
use super::{CudaBackend, CudaBuf, DType};
use crate::backend::AttnShape;

/// `UlAttnShape` of cuda/attention_simple.cu and cuda/attention_flash.cuh (one layout).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct UlAttnShape {
    q_len: i32,
    kv_len: i32,
    n_q: i32,
    n_kv: i32,
    d: i32,
    causal: i32,
    q_pos0: i64,
    k_pos0: i64,
}
// SAFETY: plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for UlAttnShape {}

pub(super) fn attn_shape(s: &AttnShape) -> UlAttnShape {
    assert!(
        s.head_dim <= 256,
        "attention_simple: head_dim {} > 256",
        s.head_dim
    );
    assert!(
        s.n_kv_heads > 0 && s.n_q_heads.is_multiple_of(s.n_kv_heads),
        "attention: {} query heads over {} KV heads",
        s.n_q_heads,
        s.n_kv_heads
    );
    UlAttnShape {
        q_len: s.q_len as i32,
        kv_len: s.kv_len as i32,
        n_q: s.n_q_heads as i32,
        n_kv: s.n_kv_heads as i32,
        d: s.head_dim as i32,
        causal: s.causal as i32,
        q_pos0: s.q_pos0,
        k_pos0: s.k_pos0,
    }
}

/// The buffer sizes `Backend::attention_forward` requires.
pub(super) fn assert_forward_sizes(
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    shape: &AttnShape,
    out: &CudaBuf,
    lse: &CudaBuf,
) {
    let (ql, kl, d) = (shape.q_len, shape.kv_len, shape.head_dim);
    assert!(
        q.len == ql * shape.n_q_heads * d
            && k.len == kl * shape.n_kv_heads * d
            && v.len == k.len
            && out.len == q.len
            && lse.len == shape.n_q_heads * ql,
        "attention_forward: sizes for {shape:?}"
    );
}

/// The buffer sizes `Backend::attention_backward` requires.
#[allow(clippy::too_many_arguments)]
pub(super) fn assert_backward_sizes(
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    out: &CudaBuf,
    dout: &CudaBuf,
    shape: &AttnShape,
    dq: &CudaBuf,
    dk: &CudaBuf,
    dv: &CudaBuf,
) {
    assert!(
        out.len == q.len
            && dout.len == q.len
            && dq.len == q.len
            && dk.len == k.len
            && dv.len == v.len
            && dk.dtype == dv.dtype,
        "attention_backward: sizes for {shape:?}"
    );
}

/// `Backend::attention_forward` on the simple kernel.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    b: &CudaBackend,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    shape: &AttnShape,
    scale: f64,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
) {
    let s = attn_shape(shape);
    // The kernel reads q, k, v with one dtype code: k and v in q's.
    let (kk, vv) = (b.in_dtype(k, q.dtype), b.in_dtype(v, q.dtype));
    let (kp, vp) = (kk.as_ref().unwrap_or(k).ptr, vv.as_ref().unwrap_or(v).ptr);
    let items = shape.n_q_heads * shape.q_len;
    if items == 0 {
        return;
    }
    launch!(b, "ul_attn_fwd", warp_grid(items); q.ptr, kp, vp, q.dtype.code(), s,
        scale as f32, out.ptr, out.dtype.code(), lse.ptr, lse.dtype.code());
}

/// `Backend::attention_backward` on the simple kernels: dQ per query row (with the row sums of
/// dO∘O it leaves for dK/dV), then dK, dV per key row.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    b: &CudaBackend,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    out: &CudaBuf,
    dout: &CudaBuf,
    lse: &CudaBuf,
    shape: &AttnShape,
    scale: f64,
    dq: &mut CudaBuf,
    dk: &mut CudaBuf,
    dv: &mut CudaBuf,
) {
    let s = attn_shape(shape);
    let ql = shape.q_len;
    // The kernels read q, k, v, out, dout with one dtype code: bring strays to q's.
    let (kk, vv) = (b.in_dtype(k, q.dtype), b.in_dtype(v, q.dtype));
    let (oo, gg) = (b.in_dtype(out, q.dtype), b.in_dtype(dout, q.dtype));
    let kp = kk.as_ref().unwrap_or(k).ptr;
    let vp = vv.as_ref().unwrap_or(v).ptr;
    let op = oo.as_ref().unwrap_or(out).ptr;
    let gp = gg.as_ref().unwrap_or(dout).ptr;
    let dsum = b.alloc(shape.n_q_heads * ql, DType::F32);
    let dt = q.dtype.code();
    let sc = scale as f32;
    if shape.n_q_heads * ql > 0 {
        launch!(b, "ul_attn_bwd_dq", warp_grid(shape.n_q_heads * ql); q.ptr, kp, vp, op,
            gp, lse.ptr, dt, lse.dtype.code(), s, sc, dq.ptr, dq.dtype.code(), dsum.ptr);
    }
    if shape.n_kv_heads * shape.kv_len > 0 {
        launch!(b, "ul_attn_bwd_dkdv", warp_grid(shape.n_kv_heads * shape.kv_len); q.ptr,
            kp, vp, gp, lse.ptr, dt, lse.dtype.code(), s, sc, dsum.ptr, dk.ptr, dv.ptr,
            dk.dtype.code());
    }
}

/// `Backend::attention_merge`: a ring step's (out_b, lse_b) into rows `row0..row0+rows` of the
/// running (out, lse).
#[allow(clippy::too_many_arguments)]
pub(super) fn merge(
    b: &CudaBackend,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    out_b: &CudaBuf,
    lse_b: &CudaBuf,
    row0: usize,
    rows: usize,
    q_len: usize,
    heads: usize,
    head_dim: usize,
) {
    assert!(
        out.len == q_len * heads * head_dim
            && lse.len == heads * q_len
            && out_b.len == rows * heads * head_dim
            && lse_b.len == heads * rows
            && row0 + rows <= q_len,
        "attention_merge: sizes"
    );
    let items = rows * heads;
    if items == 0 {
        return;
    }
    let cfg = LaunchConfig {
        grid_dim: (items.div_ceil(THREADS as usize) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(b, "ul_attn_merge", cfg; out.ptr, out.dtype.code(), lse.ptr, lse.dtype.code(),
        out_b.ptr, out_b.dtype.code(), lse_b.ptr, lse_b.dtype.code(), row0 as i32,
        rows as i32, q_len as i32, heads as i32, head_dim as i32);
}
