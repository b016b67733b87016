//! The kernels of `cuda/`, compiled by build.rs with nvcc and embedded here: PTX for sm_80 and
//! sm_90, a cubin for sm_90a. `Kernels::load` picks the cubin on compute capability 9.0 (Hopper: no
//! JIT), the sm_90 PTX on newer devices and the sm_80 PTX on Ampere, and looks every kernel up once.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;

/// One `cuda/<name>.cu`, compiled three ways.
pub struct CudaModuleImage {
    pub name: &'static str,
    pub ptx_sm80: &'static str,
    pub ptx_sm90: &'static str,
    pub cubin_sm90a: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/cuda_modules.rs"));

/// Whether this binary carries compiled kernels (false when build.rs found no nvcc).
pub fn built_with_kernels() -> bool {
    !cfg!(ul_no_kernels) && !MODULES.is_empty()
}

/// The embedded image of `cuda/<name>.cu`, if built.
pub fn module(name: &str) -> Option<&'static CudaModuleImage> {
    MODULES.iter().find(|m| m.name == name)
}

/// Every kernel entry point, by module; `Kernels::load` fails if one is missing.
pub const KERNELS: &[(&str, &[&str])] = &[
    (
        "elementwise",
        &[
            "ul_fill",
            "ul_fill_random",
            "ul_convert",
            "ul_add",
            "ul_scale",
            "ul_sum_squares",
        ],
    ),
    (
        "rope",
        &["ul_rope_table", "ul_rope_rotate", "ul_rope_rotate_bf16x8"],
    ),
    (
        "rmsnorm",
        &[
            "ul_rmsnorm_fwd",
            "ul_rmsnorm_fwd_bf16x8",
            "ul_rmsnorm_bwd_dx",
            "ul_rmsnorm_bwd_dw_partial",
            "ul_colsum_add",
        ],
    ),
    (
        "swiglu",
        &[
            "ul_swiglu_fwd",
            "ul_swiglu_bwd",
            "ul_swiglu_fwd_bf16x8",
            "ul_swiglu_bwd_bf16x8",
        ],
    ),
    ("embedding", &["ul_embedding_fwd", "ul_embedding_bwd"]),
    ("cross_entropy", &["ul_ce_stats", "ul_ce_grad"]),
    (
        "adamw",
        &[
            "ul_adamw",
            "ul_adamw_f32x4",
            "ul_adamw_multi",
            "ul_sum_squares_multi",
            "ul_clip_scale",
        ],
    ),
    (
        "attention_simple",
        &[
            "ul_attn_fwd",
            "ul_attn_bwd_dq",
            "ul_attn_bwd_dkdv",
            "ul_attn_merge",
        ],
    ),
    (
        "attention_flash",
        &[
            "ul_flash_fwd_d64",
            "ul_flash_bwd_dsum_d64",
            "ul_flash_bwd_dkdv_d64",
            "ul_flash_bwd_dq_d64",
            "ul_flash_fwd_d128",
            "ul_flash_bwd_dsum_d128",
            "ul_flash_bwd_dkdv_d128",
            "ul_flash_bwd_dq_d128",
        ],
    ),
];

/// Which image was loaded (reported by `gpu-check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    CubinSm90a,
    PtxSm90,
    PtxSm80,
}

pub struct Kernels {
    funcs: HashMap<&'static str, CudaFunction>,
    pub image: ImageKind,
}

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        if !built_with_kernels() {
            bail!(
                "--backend cuda: this binary was built without CUDA kernels (no nvcc at build \
                 time): rebuild with nvcc on PATH or NVCC/CUDA_HOME set (docs/DEVELOPERS.md, CUDA)"
            );
        }
        let (major, minor) = ctx.compute_capability().context("compute capability")?;
        let image = match (major, minor) {
            (9, 0) => ImageKind::CubinSm90a,
            (m, _) if m >= 9 => ImageKind::PtxSm90,
            (8, _) => ImageKind::PtxSm80,
            _ => bail!(
                "--backend cuda needs compute capability >= 8.0, the device has {major}.{minor}"
            ),
        };
        let mut funcs = HashMap::new();
        for (name, entries) in KERNELS {
            let m = module(name)
                .with_context(|| format!("kernel module cuda/{name}.cu is not embedded"))?;
            let ptx = match image {
                ImageKind::CubinSm90a => Ptx::from_binary(m.cubin_sm90a.to_vec()),
                ImageKind::PtxSm90 => Ptx::from_src(m.ptx_sm90),
                ImageKind::PtxSm80 => Ptx::from_src(m.ptx_sm80),
            };
            let module = ctx.load_module(ptx).with_context(|| {
                format!("loading cuda/{name}.cu ({image:?}); PTX from CUDA 13 needs driver >= 580")
            })?;
            for e in *entries {
                let f = module
                    .load_function(e)
                    .with_context(|| format!("kernel {e} in cuda/{name}.cu"))?;
                if e.starts_with("ul_flash_") {
                    // Above 48 KiB of dynamic shared memory only after opting in, per function.
                    f.set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        super::attention_flash::FLASH_MAX_SMEM as i32,
                    )
                    .with_context(|| {
                        format!(
                            "{e}: allowing {} bytes of dynamic shared memory",
                            super::attention_flash::FLASH_MAX_SMEM
                        )
                    })?;
                }
                funcs.insert(*e, f);
            }
        }
        Ok(Kernels { funcs, image })
    }

    pub fn get(&self, name: &str) -> Option<&CudaFunction> {
        self.funcs.get(name)
    }
}
