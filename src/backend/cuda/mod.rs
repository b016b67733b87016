//! The CUDA backend: the `Backend` trait on one GPU through cudarc (driver API, loaded at run time,
//! so the crate builds with no CUDA installed), kernels from `cuda/` (build.rs → `kernels`), GEMMs
//! through cuBLASLt (`gemm`), memory from a caching pool (`pool`).
//!
//! Layout (llm.c's one file per kernel family): `device` (launching, launch geometry,
//! synchronisation, raw copies), `buffer` (`DType`, `CudaBuf`, allocation, host transfers), then
//! one launcher file per `cuda/<family>.cu` — `elementwise`, `rope`, `rmsnorm`, `swiglu`,
//! `embedding`, `cross_entropy`, `adamw`, `attention_simple`, `attention_flash` — and `gemm`
//! (cuBLASLt). This file holds the backend itself and the `Backend` impl, one launcher per op.
//!
//! Numerics (docs/ARCHITECTURE.md): every buffer carries its element type (`DType`). GEMMs always take bf16
//! operands with fp32 accumulation (an fp32 operand is rounded to bf16 into pooled scratch first);
//! every other kernel computes in fp32 (f64 for reductions) whatever the storage. `storage` picks
//! the type of the buffers the model code allocates through the trait (`zeros`, `upload`): `F32`
//! (the default, `cuda`) keeps activations, gradients, fp32 master weights and Adam moments in fp32;
//! `Bf16` (`cuda-bf16`) stores them all in bf16 — the memory layout the design wants for
//! activations, but the trait has no way yet to ask for fp32 master weights and moments, so `Bf16`
//! is for forward passes and benchmarks, not training (docs/DEVELOPERS.md, CUDA).
//!
//! All work runs on the context's default stream, in order; host transfers synchronise. A CUDA
//! failure (allocation, launch, a kernel's error) is recorded with the operation, its sizes and
//! the device, and returned by `Backend::check` (device.rs says how). With
//! `ULTRALONG_CUDA_SYNC=1` every launch is followed by a synchronise and an error check (for
//! compute-sanitizer runs, and to name the kernel that failed).

#[macro_use]
mod device;
mod buffer;
pub mod gemm;
pub mod kernels;
pub mod pool;
pub mod timeline;

pub mod checks;

mod adamw;
mod attention_flash;
mod attention_simple;
mod cross_entropy;
mod elementwise;
mod embedding;
mod flash_sm90;
mod rmsnorm;
mod rope;
mod swiglu;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use cudarc::driver::{CudaContext, CudaStream};

use crate::backend::{AdamW, AttnShape, Backend, CeStats};
pub use attention_flash::{AttnOptions, flash_supports};
pub use buffer::{CudaBuf, DType};
use kernels::Kernels;
use pool::Pool;

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    k: Kernels,
    lt: gemm::Lt,
    _workspace: CudaBuf,
    pool: Arc<Pool>,
    storage: DType,
    sms: u32,
    sync_each: bool,
    device_name: String,
    ordinal: usize,
    attn: AttnOptions,
    /// cuda/attention_sm90.cu's kernels, on compute capability 9.0 only.
    sm90: Option<flash_sm90::Sm90Attn>,
    /// The first failure (device.rs), and whether there is one (read before every launch).
    fault: Mutex<Option<String>>,
    failed: AtomicBool,
    /// The kernel launched last, named when an asynchronous error surfaces at a synchronisation.
    last_launch: Mutex<&'static str>,
}

/// `ULTRALONG_CUDA_MEM_LIMIT`: at most this many bytes of device memory (the pool's limit), to
/// emulate a smaller GPU or force an out-of-memory; unset, the device's.
fn memory_limit() -> Result<Option<usize>> {
    match std::env::var("ULTRALONG_CUDA_MEM_LIMIT") {
        Err(_) => Ok(None),
        Ok(v) => {
            v.trim().parse().map(Some).with_context(|| {
                format!("ULTRALONG_CUDA_MEM_LIMIT={v:?}: expected a number of bytes")
            })
        }
    }
}

/// Why `--backend cuda` cannot run here, or `None` if the driver, cuBLASLt and the kernels exist.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some(
            "the CUDA backend: no CUDA driver found (libcuda.so could not be loaded); run on a \
             machine with an NVIDIA GPU and driver (train and forward run without one on the \
             CPU backend, their default)"
                .into(),
        );
    }
    if !kernels::built_with_kernels() {
        return Some(
            "--backend cuda: this binary was built without CUDA kernels (no nvcc at build time); \
             rebuild with nvcc on PATH or NVCC/CUDA_HOME set (docs/DEVELOPERS.md, CUDA)"
                .into(),
        );
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Some(
            "--backend cuda: libcublasLt.so not found on the library path (cudarc looks for \
             libcublasLt.so or libcublasLt.so.12; link libcublasLt.so.13 as libcublasLt.so, \
             bench/gpu-check.sh shows how)"
                .into(),
        );
    }
    None
}

impl CudaBackend {
    /// The backend on GPU `ordinal` with trait-allocated buffers in `storage`.
    pub fn new(ordinal: usize, storage: DType) -> Result<Self> {
        if let Some(why) = unavailable_reason() {
            bail!(why);
        }
        let ctx = CudaContext::new(ordinal).context("creating the CUDA context")?;
        // One stream, in order: cudarc's per-buffer events are not needed.
        // SAFETY: no cudarc-managed buffers exist yet, and this backend allocates raw memory.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let k = Kernels::load(&ctx)?;
        let sm90 = flash_sm90::Sm90Attn::load(&ctx, k.image)?;
        let pool = Arc::new(Pool::new(pool::Driver(ctx.clone())));
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .context("SM count")? as u32;
        let ws_bytes = 32 << 20;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        if let Some(limit) = memory_limit()? {
            pool.set_limit(Some(limit));
        }
        let workspace = buffer::pool_buffer(&pool, ws_bytes / 4, DType::F32).map_err(|e| {
            anyhow::anyhow!(
                "allocating the cuBLASLt workspace on cuda:{ordinal} ({device_name}): {e}"
            )
        })?;
        let lt = gemm::Lt::new(workspace.ptr, ws_bytes)?;
        Ok(CudaBackend {
            ctx,
            stream,
            k,
            lt,
            _workspace: workspace,
            pool,
            storage,
            sms,
            sync_each: std::env::var("ULTRALONG_CUDA_SYNC").is_ok_and(|v| v == "1"),
            device_name,
            ordinal,
            attn: AttnOptions::from_env(),
            sm90,
            fault: Mutex::new(None),
            failed: AtomicBool::new(false),
            last_launch: Mutex::new("none"),
        })
    }

    /// The backend for this process under mpirun/srun: one GPU per rank of the node, fp32
    /// storage (which GPU, and the error when a node has too few: `parallel::local_rank`).
    pub fn for_local_rank() -> Result<Self> {
        if let Some(why) = unavailable_reason() {
            bail!(why);
        }
        let count = CudaContext::device_count().context("counting CUDA devices")?;
        let device = crate::parallel::local_rank::device_for_this_rank(count.max(0) as usize)?;
        Self::new(device, DType::F32)
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }
    pub fn storage(&self) -> DType {
        self.storage
    }
    pub fn image(&self) -> kernels::ImageKind {
        self.k.image
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn reset_peak(&self) {
        self.pool.reset_peak();
    }
    pub fn reserved_bytes(&self) -> usize {
        self.pool.reserved()
    }
    /// At most `bytes` of device memory from now on (`None`: the device's); see `memory_limit`.
    pub fn set_memory_limit(&self, bytes: Option<usize>) {
        self.pool.set_limit(bytes);
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Host = f32;

    fn name(&self) -> String {
        match self.storage {
            DType::F32 => "cuda".into(),
            DType::Bf16 => "cuda-bf16".into(),
        }
    }

    #[track_caller]
    fn zeros(&self, n: usize) -> CudaBuf {
        self.zeros_dtype(n, self.storage)
    }
    fn zeros_named(&self, n: usize, name: &str) -> CudaBuf {
        self.zeros_named_dtype(n, self.storage, name)
    }
    fn len(&self, b: &CudaBuf) -> usize {
        b.len
    }
    #[track_caller]
    fn upload(&self, host: &[f32]) -> CudaBuf {
        self.upload_dtype(host, self.storage)
    }
    fn download(&self, b: &CudaBuf) -> Vec<f32> {
        let mut out = vec![0f32; b.len];
        self.read_f32(b, 0, &mut out);
        out
    }
    #[track_caller]
    fn upload_f64(&self, host: &[f64]) -> CudaBuf {
        let h: Vec<f32> = host.iter().map(|&x| x as f32).collect();
        self.upload(&h)
    }
    fn download_f64(&self, b: &CudaBuf) -> Vec<f64> {
        self.download(b).into_iter().map(f64::from).collect()
    }
    fn fill_zero(&self, b: &mut CudaBuf) {
        self.memset_zero(b.ptr, b.bytes());
    }
    fn copy(&self, src: &CudaBuf, src_off: usize, dst: &mut CudaBuf, dst_off: usize, n: usize) {
        elementwise::copy(self, src, src_off, dst, dst_off, n);
    }
    fn read_host(&self, b: &CudaBuf, off: usize, out: &mut [f32]) {
        self.read_f32(b, off, out);
    }
    fn write_host(&self, b: &mut CudaBuf, off: usize, data: &[f32]) {
        self.write_f32(b, off, data);
    }
    fn bytes_in_use(&self) -> usize {
        self.pool.in_use()
    }
    fn peak_bytes(&self) -> usize {
        self.pool.peak()
    }
    fn check(&self) -> Result<()> {
        self.synchronize();
        match self.fault() {
            None => Ok(()),
            Some(f) => Err(anyhow::anyhow!(f)),
        }
    }

    fn add_assign(&self, dst: &mut CudaBuf, src: &CudaBuf) {
        assert_eq!(dst.len, src.len, "add_assign: length mismatch");
        let n = dst.len;
        elementwise::add_at(self, dst, 0, src, 0, n);
    }
    fn add_at(&self, dst: &mut CudaBuf, dst_off: usize, src: &CudaBuf, src_off: usize, n: usize) {
        elementwise::add_at(self, dst, dst_off, src, src_off, n);
    }
    fn scale(&self, b: &mut CudaBuf, s: f64) {
        elementwise::scale(self, b, s);
    }
    fn sum_squares(&self, b: &CudaBuf) -> f64 {
        self.sum_squares_at(b.ptr, b.dtype, b.len)
    }

    fn gemm(
        &self,
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
        gemm::gemm(
            self, c, c_off, a, a_off, b, b_off, m, n, k, trans_a, trans_b, accumulate,
        );
    }

    fn embedding_forward(&self, table: &CudaBuf, ids: &[u32], dim: usize, out: &mut CudaBuf) {
        embedding::forward(self, table, ids, dim, out);
    }
    fn embedding_backward(&self, dtable: &mut CudaBuf, ids: &[u32], dim: usize, dout: &CudaBuf) {
        embedding::backward(self, dtable, ids, dim, dout);
    }

    fn rmsnorm_forward(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        eps: f64,
        rows: usize,
        dim: usize,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
    ) {
        rmsnorm::forward(self, x, w, eps, rows, dim, out, rstd);
    }
    fn rmsnorm_backward(
        &self,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rstd: &CudaBuf,
        rows: usize,
        dim: usize,
        dx: &mut CudaBuf,
        dw: &mut CudaBuf,
    ) {
        rmsnorm::backward(self, dout, x, w, rstd, rows, dim, dx, dw);
    }

    fn rope_forward(
        &self,
        x: &mut CudaBuf,
        cos: &CudaBuf,
        sin: &CudaBuf,
        rows: usize,
        heads: usize,
        head_dim: usize,
    ) {
        rope::rotate(self, x, cos, sin, rows, heads, head_dim, false);
    }
    fn rope_backward(
        &self,
        dx: &mut CudaBuf,
        cos: &CudaBuf,
        sin: &CudaBuf,
        rows: usize,
        heads: usize,
        head_dim: usize,
    ) {
        rope::rotate(self, dx, cos, sin, rows, heads, head_dim, true);
    }

    fn attention_forward(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        shape: &AttnShape,
        scale: f64,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
    ) {
        attention_simple::assert_forward_sizes(q, k, v, shape, out, lse);
        if self.uses_flash(shape) {
            attention_flash::forward(self, q, k, v, shape, scale, out, lse);
        } else {
            attention_simple::forward(self, q, k, v, shape, scale, out, lse);
        }
    }
    fn attention_backward(
        &self,
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
        attention_simple::assert_backward_sizes(q, k, v, out, dout, shape, dq, dk, dv);
        if self.uses_flash(shape) {
            attention_flash::backward(self, q, k, v, out, dout, lse, shape, scale, dq, dk, dv);
        } else {
            attention_simple::backward(self, q, k, v, out, dout, lse, shape, scale, dq, dk, dv);
        }
    }

    fn swiglu_forward(&self, gate: &CudaBuf, up: &CudaBuf, out: &mut CudaBuf) {
        swiglu::forward(self, gate, up, out);
    }
    fn swiglu_backward(
        &self,
        gate: &CudaBuf,
        up: &CudaBuf,
        dout: &CudaBuf,
        dgate: &mut CudaBuf,
        dup: &mut CudaBuf,
    ) {
        swiglu::backward(self, gate, up, dout, dgate, dup);
    }

    fn cross_entropy_stats(&self, logits: &CudaBuf, targets: &[i32], vocab: usize) -> Vec<CeStats> {
        cross_entropy::stats(self, logits, targets, vocab)
    }
    fn cross_entropy_grad(
        &self,
        logits: &mut CudaBuf,
        targets: &[i32],
        vocab: usize,
        max: &[f64],
        sum: &[f64],
        grad_scale: f64,
    ) {
        cross_entropy::grad(self, logits, targets, vocab, max, sum, grad_scale);
    }

    fn attention_merge(
        &self,
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
        attention_simple::merge(
            self, out, lse, out_b, lse_b, row0, rows, q_len, heads, head_dim,
        );
    }

    fn adamw(
        &self,
        param: &mut CudaBuf,
        grad: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        hp: &AdamW,
    ) {
        adamw::step(self, param, grad, m, v, hp);
    }
}
