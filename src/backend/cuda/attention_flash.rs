//! Launchers of cuda/attention_flash.cu: which attention kernel runs (`AttnOptions`, from the
//! environment or set by `gpu-check`), the tile sizes and shared-memory bytes of each flash entry
//! (mirroring the `UL_FLASH_ENTRIES` instantiations), and the launch sequences of the forward and
//! the backward (pre-pass, dK/dV, dQ by atomics or by its deterministic kernel).
//!
//! The flash kernels read and write bf16 with an fp32 log-sum-exp; with fp32 storage the backend
//! rounds q, k, v (and out, dout) into bf16 scratch and converts the results back, so both storages
//! run the same kernels. Head dims other than 64 and 128 fall back to cuda/attention_simple.cu.

use cudarc::driver::LaunchConfig;
use cudarc::driver::sys::CUdeviceptr;

use super::attention_simple::attn_shape;
use super::{CudaBackend, CudaBuf, DType};
use crate::backend::AttnShape;

/// Which attention kernels the backend uses. From the environment at start:
/// `ULTRALONG_ATTN=simple` forces cuda/attention_simple.cu (default `flash`);
/// `ULTRALONG_ATTN_DETERMINISTIC=1` computes dQ with its own kernel instead of fp32 atomics, so
/// the backward is bitwise repeatable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnOptions {
    pub flash: bool,
    pub deterministic: bool,
}

impl AttnOptions {
    pub fn from_env() -> Self {
        let flash = !std::env::var("ULTRALONG_ATTN").is_ok_and(|v| v == "simple");
        let deterministic = std::env::var("ULTRALONG_ATTN_DETERMINISTIC").is_ok_and(|v| v == "1");
        AttnOptions {
            flash,
            deterministic,
        }
    }
}

/// Threads per block of every flash kernel but the pre-pass (4 warps).
const THREADS: u32 = 128;
/// Query rows per block of the forward and dQ kernels; key rows per block of all three.
const BM: usize = 64;
const BN: usize = 64;

/// Query rows per iteration of the dK/dV kernel (`UL_FLASH_ENTRIES(D, BM_DKDV)`).
fn bm_dkdv(d: usize) -> usize {
    if d == 128 { 32 } else { 64 }
}

/// Dynamic shared memory of each kernel, bytes (the layouts in cuda/attention_flash.cu).
pub fn smem_fwd(d: usize) -> u32 {
    ((BM * d + 4 * BN * d) * 2) as u32
}
pub fn smem_dkdv(d: usize) -> u32 {
    let bm = bm_dkdv(d);
    ((2 * BN * d + 4 * bm * d + BN * bm) * 2 + 4 * bm * 4) as u32
}
pub fn smem_dq(d: usize) -> u32 {
    ((2 * BM * d + 4 * BN * d) * 2) as u32
}

/// The most dynamic shared memory any flash kernel asks for (set as each one's limit at load).
pub const FLASH_MAX_SMEM: u32 = 98304;

/// Whether the flash kernels take this shape.
pub fn flash_supports(s: &AttnShape) -> bool {
    (s.head_dim == 64 || s.head_dim == 128)
        && s.q_len < (1 << 30)
        && s.kv_len < (1 << 30)
        && s.q_len.div_ceil(BM) <= 65535
        && s.kv_len.div_ceil(BN) <= 65535
}

impl CudaBackend {
    pub fn attention_options(&self) -> AttnOptions {
        self.attn
    }
    /// Choose the attention kernels (gpu-check runs both, and both backward modes).
    pub fn set_attention_options(&mut self, o: AttnOptions) {
        self.attn = o;
    }

    /// Whether `attention_forward/backward` will use the flash kernels for this shape.
    pub fn uses_flash(&self, s: &AttnShape) -> bool {
        self.attn.flash && flash_supports(s)
    }
}

/// `Backend::attention_forward` on the flash kernels.
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
    let d = shape.head_dim;
    if shape.q_len == 0 || shape.n_q_heads == 0 {
        return;
    }
    let (qp, _tq) = b.bf16_operand(q, 0, q.len);
    let (kp, _tk) = b.bf16_operand(k, 0, k.len);
    let (vp, _tv) = b.bf16_operand(v, 0, v.len);
    let out_tmp = (out.dtype != DType::Bf16).then(|| b.alloc(out.len, DType::Bf16));
    let lse_tmp = (lse.dtype != DType::F32).then(|| b.alloc(lse.len, DType::F32));
    let op = out_tmp.as_ref().map_or(out.ptr, |t| t.ptr);
    let lp = lse_tmp.as_ref().map_or(lse.ptr, |t| t.ptr);
    for p in [qp, kp, vp, op] {
        assert!(
            p.is_multiple_of(16),
            "flash attention: operand not 16-byte aligned"
        );
    }
    // On Hopper, cuda/attention_sm90.cu (flash_sm90.rs) unless it declines.
    if !b.sm90_forward(qp, kp, vp, shape, scale, op, lp) {
        let cfg = LaunchConfig {
            grid_dim: (shape.n_q_heads as u32, shape.q_len.div_ceil(BM) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem_fwd(d),
        };
        let name = if d == 128 {
            "ul_flash_fwd_d128"
        } else {
            "ul_flash_fwd_d64"
        };
        launch!(b, name, cfg; qp, kp, vp, s, scale as f32, op, lp);
    }
    if let Some(t) = out_tmp {
        b.convert(t.ptr, DType::Bf16, out.ptr, out.dtype, out.len);
    }
    if let Some(t) = lse_tmp {
        b.convert(t.ptr, DType::F32, lse.ptr, lse.dtype, lse.len);
    }
}

/// `Backend::attention_backward` on the flash kernels.
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
    let d = shape.head_dim;
    let (ql, nq) = (shape.q_len, shape.n_q_heads);
    let (qp, _tq) = b.bf16_operand(q, 0, q.len);
    let (kp, _tk) = b.bf16_operand(k, 0, k.len);
    let (vp, _tv) = b.bf16_operand(v, 0, v.len);
    let (op, _to) = b.bf16_operand(out, 0, out.len);
    let (gp, _tg) = b.bf16_operand(dout, 0, dout.len);
    let (lp, _tl) = b.f32_operand(lse);
    for p in [qp, kp, vp, op, gp] {
        assert!(
            p.is_multiple_of(16),
            "flash attention: operand not 16-byte aligned"
        );
    }
    let sc = scale as f32;
    let dsum = b.alloc(nq * ql, DType::F32);
    let rows = ql * nq;
    if rows > 0 {
        let threads = rows * (d / 8);
        let cfg = LaunchConfig {
            grid_dim: (threads.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = if d == 128 {
            "ul_flash_bwd_dsum_d128"
        } else {
            "ul_flash_bwd_dsum_d64"
        };
        launch!(b, name, cfg; op, gp, s, dsum.ptr);
    }
    // Fast mode: dQ accumulates by fp32 atomics into dq itself (fp32 storage) or a scratch.
    let dq_tmp =
        (!b.attn.deterministic && dq.dtype != DType::F32).then(|| b.alloc(dq.len, DType::F32));
    let dq_acc: CUdeviceptr = if b.attn.deterministic {
        0
    } else {
        let p = dq_tmp.as_ref().map_or(dq.ptr, |t| t.ptr);
        b.memset_zero(p, dq.len * 4);
        p
    };
    let kv_tiles = shape.kv_len.div_ceil(BN);
    if kv_tiles > 0 && shape.n_kv_heads > 0 {
        let cfg = LaunchConfig {
            grid_dim: (shape.n_kv_heads as u32, kv_tiles as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem_dkdv(d),
        };
        let name = if d == 128 {
            "ul_flash_bwd_dkdv_d128"
        } else {
            "ul_flash_bwd_dkdv_d64"
        };
        launch!(b, name, cfg; qp, kp, vp, gp, lp, dsum.ptr, s, sc, dq_acc, dk.ptr, dv.ptr,
                dk.dtype.code());
    }
    if b.attn.deterministic {
        if rows > 0 {
            let cfg = LaunchConfig {
                grid_dim: (nq as u32, ql.div_ceil(BM) as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: smem_dq(d),
            };
            let name = if d == 128 {
                "ul_flash_bwd_dq_d128"
            } else {
                "ul_flash_bwd_dq_d64"
            };
            launch!(b, name, cfg; qp, kp, vp, gp, lp, dsum.ptr, s, sc, dq.ptr,
                    dq.dtype.code());
        }
    } else if let Some(t) = dq_tmp {
        b.convert(t.ptr, DType::F32, dq.ptr, dq.dtype, dq.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_fits_the_limit_set_at_load() {
        for d in [64, 128] {
            for b in [smem_fwd(d), smem_dkdv(d), smem_dq(d)] {
                assert!(b <= FLASH_MAX_SMEM, "{b} bytes for d {d}");
            }
        }
        assert_eq!(smem_dq(128), FLASH_MAX_SMEM);
        assert_eq!(smem_fwd(128), 81920);
        assert_eq!(smem_dkdv(128), 70144);
    }
}
