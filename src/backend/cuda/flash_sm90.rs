//! The host side of cuda/attention_sm90.cu, the Hopper-native attention forward: loading its
//! kernels (they exist only in the sm_90a cubin, so only on a device of compute capability 9.0),
//! building the TMA tensor maps of q, k, v and out (`cuTensorMapEncodeTiled`), and the launch.
//! `flash.rs` calls `sm90_forward` first and falls back to the mma.sync forward when it declines.
//!
//! `ULTRALONG_ATTN=flash2` keeps the mma.sync forward on Hopper too (it is still `flash`: any value
//! but `simple` is); `set_attention_sm90` does the same from code.
//!
//! Not yet run on a GPU (written in a session without one): bench/gpu-check.sh's attention steps
//! are its first test; the index math is checked on the CPU by bench/gpu/sm90_fragments.py.

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cudarc::driver::sys::{
    self, CUdeviceptr, CUfunction_attribute, CUresult, CUtensorMapDataType,
    CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
};
use cudarc::driver::{CudaContext, CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::CudaBackend;
use super::attention_simple::{UlAttnShape, attn_shape};
use super::kernels::{self, ImageKind};
use crate::backend::AttnShape;

/// The entry points of cuda/attention_sm90.cu (in the sm_90a cubin only: not in `KERNELS`, whose
/// entries every image must have).
pub const SM90_KERNELS: &[&str] = &["ul_attn_sm90_fwd_d64", "ul_attn_sm90_fwd_d128"];

/// Threads per block: a producer warpgroup and two consumer warpgroups.
const THREADS: u32 = 384;
/// Query rows per block (64 per consumer warpgroup), keys per pipeline stage.
const BM: usize = 128;
const BN: usize = 128;
/// Rows of the out tensor map's box: one consumer warpgroup's rows.
const OUT_BOX_ROWS: u32 = 64;

/// Dynamic shared memory of the forward (`Fwd<D>::SMEM` in the .cu): 1024 bytes of alignment
/// slack, Q [128 × d], 2 stages of K and V [128 × d] (bf16), 9 mbarriers of 8 bytes.
pub fn smem_fwd(d: usize) -> u32 {
    (1024 + BM * d * 2 + 4 * BN * d * 2 + 8 * 9) as u32
}

/// The loaded sm_90a kernels and whether the backend uses them.
pub struct Sm90Attn {
    fwd_d64: CudaFunction,
    fwd_d128: CudaFunction,
    enabled: bool,
}

impl Sm90Attn {
    /// The kernels of cuda/attention_sm90.cu from the sm_90a cubin, when that image is the one
    /// the device runs (compute capability 9.0); `None` otherwise.
    pub fn load(ctx: &Arc<CudaContext>, image: ImageKind) -> Result<Option<Self>> {
        if image != ImageKind::CubinSm90a {
            return Ok(None);
        }
        let m = kernels::module("attention_sm90")
            .context("kernel module cuda/attention_sm90.cu is not embedded")?;
        let module = ctx
            .load_module(Ptx::from_binary(m.cubin_sm90a.to_vec()))
            .context("loading cuda/attention_sm90.cu (sm_90a cubin)")?;
        let load = |name: &str, d: usize| -> Result<CudaFunction> {
            let f = module
                .load_function(name)
                .with_context(|| format!("kernel {name} in cuda/attention_sm90.cu (sm_90a)"))?;
            // Above 48 KiB of dynamic shared memory only after opting in, per function.
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_fwd(d) as i32,
            )
            .with_context(|| format!("{name}: allowing {} bytes of shared memory", smem_fwd(d)))?;
            Ok(f)
        };
        Ok(Some(Sm90Attn {
            fwd_d64: load(SM90_KERNELS[0], 64)?,
            fwd_d128: load(SM90_KERNELS[1], 128)?,
            enabled: !std::env::var("ULTRALONG_ATTN").is_ok_and(|v| v == "flash2"),
        }))
    }
}

/// A `CUtensorMap` as a kernel argument (passed by value, `__grid_constant__` in the kernel).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TmaMap(sys::CUtensorMap);
// SAFETY: 128 bytes of plain data with the layout of the driver's CUtensorMap (`UlTmaMap`).
unsafe impl DeviceRepr for TmaMap {}

/// The tensor map of a [len, heads, d] bf16 tensor at `ptr`: rank 3 (d, heads, len), boxes of
/// 64 columns × 1 head × `box_rows` rows with the 128-byte swizzle (a box row is 128 bytes), rows
/// past `len` read as zeros and are not written.
fn tensor_map(
    ptr: CUdeviceptr,
    len: usize,
    heads: usize,
    d: usize,
    box_rows: u32,
) -> Result<TmaMap> {
    let dims: [u64; 3] = [d as u64, heads as u64, len as u64];
    let strides: [u64; 2] = [(d * 2) as u64, (heads * d * 2) as u64];
    let boxd: [u32; 3] = [64, 1, box_rows];
    let elem_strides: [u32; 3] = [1, 1, 1];
    let mut m = MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: the arrays hold `rank` (3) entries (strides: rank − 1); the map is written whole.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            m.as_mut_ptr(),
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            elem_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != CUresult::CUDA_SUCCESS {
        bail!(
            "cuTensorMapEncodeTiled: {r:?} for a [{len}, {heads}, {d}] bf16 tensor at {ptr:#x} \
             (box rows {box_rows})"
        );
    }
    // SAFETY: written by the successful call above.
    Ok(TmaMap(unsafe { m.assume_init() }))
}

impl CudaBackend {
    /// Whether the forward of this shape runs cuda/attention_sm90.cu (Hopper, cubin loaded, not
    /// switched off, head_dim 64 or 128, at least one key).
    pub fn uses_sm90_forward(&self, s: &AttnShape) -> bool {
        self.sm90.as_ref().is_some_and(|k| k.enabled)
            && self.uses_flash(s)
            && s.kv_len > 0
            && s.q_len > 0
            && s.n_q_heads > 0
    }

    /// Use (true) or skip (false) the sm_90a forward where it is loaded (gpu-check compares both).
    pub fn set_attention_sm90(&mut self, on: bool) {
        if let Some(k) = self.sm90.as_mut() {
            k.enabled = on;
        }
    }

    /// The forward through cuda/attention_sm90.cu on bf16 device pointers (flash.rs's operands,
    /// 16-byte aligned), or false, launching nothing, when `uses_sm90_forward` says no.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sm90_forward(
        &self,
        q: CUdeviceptr,
        k: CUdeviceptr,
        v: CUdeviceptr,
        shape: &AttnShape,
        scale: f64,
        out: CUdeviceptr,
        lse: CUdeviceptr,
    ) -> bool {
        if !self.uses_sm90_forward(shape) {
            return false;
        }
        let Some(kern) = self.sm90.as_ref() else {
            return false;
        };
        let d = shape.head_dim;
        let (ql, kl, nq, nkv) = (shape.q_len, shape.kv_len, shape.n_q_heads, shape.n_kv_heads);
        let maps = (|| -> Result<[TmaMap; 4]> {
            Ok([
                tensor_map(q, ql, nq, d, BM as u32)?,
                tensor_map(k, kl, nkv, d, BN as u32)?,
                tensor_map(v, kl, nkv, d, BN as u32)?,
                tensor_map(out, ql, nq, d, OUT_BOX_ROWS)?,
            ])
        })();
        // A shape the driver refuses is recorded like any launch failure (`Backend::check`).
        let [tq, tk, tv, to] = match maps {
            Ok(m) => m,
            Err(e) => {
                self.fail(|| format!("sm_90a attention forward on {}: {e:#}", self.device_label()));
                return true;
            }
        };
        let s: UlAttnShape = attn_shape(shape);
        let (f, name) = if d == 128 {
            (&kern.fwd_d128, SM90_KERNELS[1])
        } else {
            (&kern.fwd_d64, SM90_KERNELS[0])
        };
        let cfg = LaunchConfig {
            grid_dim: (nq as u32, ql.div_ceil(BM) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem_fwd(d),
        };
        let sc = scale as f32;
        let mut l = self.stream.launch_builder(f);
        l.arg(&tq)
            .arg(&tk)
            .arg(&tv)
            .arg(&to)
            .arg(&s)
            .arg(&sc)
            .arg(&lse);
        // SAFETY: the arguments match `ul_attn_sm90_fwd_d*` (four tensor maps by value, the
        // shape, the scale, the lse pointer); the maps describe live buffers of the given sizes.
        if let Err(e) = unsafe { l.launch(cfg) } {
            self.launch_failed(name, &cfg, e);
            return true;
        }
        self.after_launch(name);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_fits_a_hopper_block_and_matches_the_kernel_layout() {
        // Hopper: 227 KiB of shared memory per block at most.
        for d in [64, 128] {
            assert!(smem_fwd(d) <= 227 * 1024, "{} bytes for d {d}", smem_fwd(d));
        }
        // Fwd<128>::SMEM = 1024 + 32768 (Q) + 2 × 2 × 32768 (K, V) + 72.
        assert_eq!(smem_fwd(128), 164_936);
        assert_eq!(smem_fwd(64), 1024 + 16384 + 65536 + 72);
    }

    #[test]
    fn the_tensor_map_argument_has_the_driver_layout() {
        assert_eq!(std::mem::size_of::<TmaMap>(), 128);
        assert!(std::mem::align_of::<TmaMap>() >= 64);
    }
}
