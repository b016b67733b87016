//! GEMMs through cuBLASLt: bf16 operands, fp32 accumulation (`CUBLAS_COMPUTE_32F`), output in the
//! output buffer's dtype (fp32 or bf16). The backend's row-major `C[m,n] = op(A)·op(B)` is cuBLASLt's
//! column-major `Cᵀ[n,m] = op(B)ᵀ·op(A)ᵀ`: the operands swap and each keeps its own transpose flag.
//! A plan (descriptors, layouts, the heuristic's algorithm) is made once per shape, transpose,
//! output dtype and operand alignment, and cached. `gemm` below is the `Backend::gemm` launcher.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

use super::{CudaBackend, CudaBuf, DType};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    out: DType,
    align: [u32; 3],
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    la: sys::cublasLtMatrixLayout_t,
    lb: sys::cublasLtMatrixLayout_t,
    lc: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by `Lt::plan`, used only under the plan cache's lock.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.la);
            let _ = lt::destroy_matrix_layout(self.lb);
            let _ = lt::destroy_matrix_layout(self.lc);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// The cuBLASLt handle, its workspace and the plan cache.
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CUdeviceptr,
    workspace_bytes: usize,
    plans: Mutex<HashMap<Key, Plan>>,
}

// SAFETY: the handle and plans are used by one stream; the cache is behind a mutex and every
// matmul is issued while holding it.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

fn cuda_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
    }
}

/// Largest power of two dividing `ptr`, capped at 256 (cuBLASLt's alignment preference).
fn alignment(ptr: CUdeviceptr) -> u32 {
    if ptr == 0 {
        return 256;
    }
    (1u64 << ptr.trailing_zeros().min(8)) as u32
}

impl Lt {
    /// `workspace` must hold `workspace_bytes` for the life of this object.
    pub fn new(workspace: CUdeviceptr, workspace_bytes: usize) -> anyhow::Result<Self> {
        let handle = lt::create_handle().map_err(|e| anyhow::anyhow!("cublasLtCreate: {e:?}"))?;
        Ok(Lt {
            handle,
            workspace,
            workspace_bytes,
            plans: Mutex::new(HashMap::new()),
        })
    }

    fn plan(&self, key: &Key) -> Result<Plan, lt::CublasError> {
        let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
        let bf = cuda_type(DType::Bf16);
        // cuBLASLt's A is our B: stored [k, n] row-major = (n × k) column-major, or [n, k] = (k × n).
        let la = if key.trans_b {
            lt::create_matrix_layout(bf, k, n, k as i64)?
        } else {
            lt::create_matrix_layout(bf, n, k, n as i64)?
        };
        let lb = if key.trans_a {
            lt::create_matrix_layout(bf, m, k, m as i64)?
        } else {
            lt::create_matrix_layout(bf, k, m, k as i64)?
        };
        let lc = lt::create_matrix_layout(cuda_type(key.out), n, m, n as i64)?;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )?;
        let set = |attr, v: i32| unsafe {
            lt::set_matmul_desc_attribute(desc, attr, &v as *const i32 as *const c_void, 4)
        };
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            key.trans_b as i32,
        )?;
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            key.trans_a as i32,
        )?;
        let pref = lt::create_matmul_pref()?;
        let heuristic = unsafe {
            let ws = self.workspace_bytes as u64;
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )?;
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            for (attr, a) in [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align[1]),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align[0]),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align[2]),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align[2]),
            ] {
                lt::set_matmul_pref_attribute(pref, attr, &a as *const u32 as *const c_void, 4)?;
            }
            let h = lt::get_matmul_algo_heuristic(self.handle, desc, la, lb, lc, lc, pref);
            let _ = lt::destroy_matmul_pref(pref);
            h?
        };
        Ok(Plan {
            desc,
            la,
            lb,
            lc,
            algo: heuristic.algo,
        })
    }

    /// `C[m,n] = op(A)·op(B) (+ C if accumulate)`; `a`, `b` bf16 device pointers, `c` of dtype
    /// `out`. A cuBLASLt error comes back with the shape.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        stream: CUstream,
        c: CUdeviceptr,
        out: DType,
        a: CUdeviceptr,
        b: CUdeviceptr,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) -> Result<(), String> {
        let key = Key {
            m,
            n,
            k,
            trans_a,
            trans_b,
            out,
            align: [alignment(a), alignment(b), alignment(c)],
        };
        let shape = || {
            format!(
                "C[{m}x{n}] ({out:?}) = {}[{m}x{k}] · {}[{k}x{n}] (bf16{})",
                if trans_a { "Aᵀ" } else { "A" },
                if trans_b { "Bᵀ" } else { "B" },
                if accumulate { ", accumulating" } else { "" }
            )
        };
        let mut plans = self.plans.lock().unwrap();
        let p = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(
                self.plan(&key)
                    .map_err(|err| format!("cuBLASLt has no plan for {}: {err:?}", shape()))?,
            ),
        };
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        // SAFETY: pointers cover the shapes (checked by the caller), plan made for them.
        unsafe {
            lt::matmul(
                self.handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b as *const c_void,
                p.la,
                a as *const c_void,
                p.lb,
                c as *const c_void,
                p.lc,
                c as *mut c_void,
                p.lc,
                &p.algo,
                self.workspace as *mut c_void,
                self.workspace_bytes,
                stream as sys::cudaStream_t,
            )
        }
        .map_err(|err| format!("cublasLtMatmul {} failed: {err:?}", shape()))
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.lock().unwrap().clear();
        // SAFETY: created in `new`.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// `Backend::gemm`: fp32 operands are rounded into bf16 scratch first; `k = 0` is a zero product
/// (cuBLASLt takes no empty inner dimension).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    g: &CudaBackend,
    c: &mut CudaBuf,
    c_off: usize,
    a: &CudaBuf,
    a_off: usize,
    b: &CudaBuf,
    b_off: usize,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    assert!(c_off + m * n <= c.len, "gemm: C too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            g.memset_zero(c.at(c_off), m * n * c.dtype.size());
        }
        return;
    }
    let (pa, _ta) = g.bf16_operand(a, a_off, m * k);
    let (pb, _tb) = g.bf16_operand(b, b_off, k * n);
    if !g.bind() {
        return;
    }
    let r = g.lt.matmul(
        g.stream.cu_stream(),
        c.at(c_off),
        c.dtype,
        pa,
        pb,
        m,
        n,
        k,
        trans_a,
        trans_b,
        accumulate,
    );
    match r {
        Ok(()) => g.after_launch("cublasLtMatmul"),
        Err(e) => g.fail(|| format!("{e} on {}", g.device_label())),
    }
}
