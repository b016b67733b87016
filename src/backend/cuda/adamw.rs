//! Launchers of cuda/adamw.cu: AdamW on one tensor (a 4-wide fp32 kernel when every operand is
//! fp32), and over many tensors in three launches with the global gradient norm and the clipping
//! factor computed on the device (no host round trip between the norm and the update).

use cudarc::driver::{DeviceRepr, LaunchConfig};

use super::device::THREADS;
use super::{CudaBackend, CudaBuf, DType};
use crate::backend::AdamW;

/// `UlAdamHp` of cuda/adamw.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct UlAdamHp {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    bc1: f32,
    bc2_sqrt: f32,
}
// SAFETY: plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for UlAdamHp {}

/// `UlTensor` of cuda/adamw.cu (one row of the multi-tensor table).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct UlTensor {
    param: u64,
    grad: u64,
    m: u64,
    v: u64,
    n: i64,
    dt_param: i32,
    dt_grad: i32,
    dt_m: i32,
    dt_v: i32,
    weight_decay: f32,
    pad: i32,
}
// SAFETY: as above.
unsafe impl DeviceRepr for UlTensor {}

/// The kernel's hyper-parameters, bias corrections computed once (step counted from 1).
fn adam_hp(hp: &AdamW) -> UlAdamHp {
    let t = hp.step.max(1) as i32;
    UlAdamHp {
        lr: hp.lr as f32,
        beta1: hp.beta1 as f32,
        beta2: hp.beta2 as f32,
        eps: hp.eps as f32,
        bc1: (1.0 - hp.beta1.powi(t)) as f32,
        bc2_sqrt: (1.0 - hp.beta2.powi(t)).sqrt() as f32,
    }
}

/// `Backend::adamw`: in place on one tensor.
pub(super) fn step(
    b: &CudaBackend,
    param: &mut CudaBuf,
    grad: &CudaBuf,
    m: &mut CudaBuf,
    v: &mut CudaBuf,
    hp: &AdamW,
) {
    let n = param.len;
    assert!(grad.len == n && m.len == n && v.len == n, "adamw: sizes");
    if n == 0 {
        return;
    }
    let f = DType::F32;
    if [param.dtype, grad.dtype, m.dtype, v.dtype]
        .iter()
        .all(|&d| d == f)
        && n.is_multiple_of(4)
    {
        let cfg = b.grid1d(n / 4);
        launch!(b, "ul_adamw_f32x4", cfg; param.ptr, grad.ptr, m.ptr, v.ptr,
            (n / 4) as i64, adam_hp(hp), hp.weight_decay as f32, hp.grad_scale as f32);
        return;
    }
    let cfg = b.grid1d(n);
    launch!(b, "ul_adamw", cfg; param.ptr, param.dtype.code(), grad.ptr,
        grad.dtype.code(), m.ptr, m.dtype.code(), v.ptr, v.dtype.code(), n as i64,
        adam_hp(hp), hp.weight_decay as f32, hp.grad_scale as f32);
}

impl CudaBackend {
    /// AdamW over many tensors in one launch, with the global gradient norm and clipping on the
    /// device: `grad_scale = pre_scale · min(1, max_norm / (‖pre_scale·g‖ + 1e-6))` (no clipping
    /// when `max_norm <= 0`). `weight_decay[i]` per tensor. Returns the norm of `pre_scale·g`.
    /// `hp.grad_scale` is ignored (the device computes it).
    pub fn adamw_multi(
        &self,
        tensors: &mut [(&mut CudaBuf, &CudaBuf, &mut CudaBuf, &mut CudaBuf)],
        weight_decay: &[f64],
        hp: &AdamW,
        pre_scale: f64,
        max_norm: f64,
    ) -> f64 {
        const CHUNK: usize = 1 << 16;
        let mut table = Vec::with_capacity(tensors.len());
        let mut block_tensor: Vec<i32> = Vec::new();
        let mut block_start: Vec<i64> = Vec::new();
        for (i, (p, g, m, v)) in tensors.iter().enumerate() {
            let n = p.len;
            assert!(
                g.len == n && m.len == n && v.len == n,
                "adamw_multi: tensor {i} has mismatched lengths"
            );
            table.push(UlTensor {
                param: p.ptr,
                grad: g.ptr,
                m: m.ptr,
                v: v.ptr,
                n: n as i64,
                dt_param: p.dtype.code(),
                dt_grad: g.dtype.code(),
                dt_m: m.dtype.code(),
                dt_v: v.dtype.code(),
                weight_decay: weight_decay[i] as f32,
                pad: 0,
            });
            for s in (0..n).step_by(CHUNK) {
                block_tensor.push(i as i32);
                block_start.push(s as i64);
            }
        }
        let nblocks = block_tensor.len();
        if nblocks == 0 {
            return 0.0;
        }
        // SAFETY: UlTensor is repr(C) plain data without padding holes the kernel reads.
        let table_bytes = unsafe {
            std::slice::from_raw_parts(
                table.as_ptr() as *const u8,
                table.len() * std::mem::size_of::<UlTensor>(),
            )
        };
        let table_d = self.upload_raw(table_bytes);
        let bt = self.upload_raw(&block_tensor);
        let bs = self.upload_raw(&block_start);
        let partials = self.alloc(nblocks * 2, DType::F32);
        let scale = self.alloc(1, DType::F32);
        let norm = self.alloc(2, DType::F32);
        let cfg = LaunchConfig {
            grid_dim: (nblocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "ul_sum_squares_multi", cfg; table_d.ptr, bt.ptr, bs.ptr, CHUNK as i32,
            partials.ptr);
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "ul_clip_scale", one; partials.ptr, nblocks as i32, pre_scale as f32,
            max_norm as f32, scale.ptr, norm.ptr);
        launch!(self, "ul_adamw_multi", cfg; table_d.ptr, bt.ptr, bs.ptr, CHUNK as i32,
            adam_hp(hp), scale.ptr);
        self.download_raw::<f64>(&norm, 1)[0]
    }

    /// Σ g² over many tensors, in f64.
    pub fn sum_squares_multi(&self, bufs: &[&CudaBuf]) -> f64 {
        bufs.iter()
            .map(|b| self.sum_squares_at(b.ptr, b.dtype, b.len))
            .sum()
    }
}
