//! The CUDA backend: the `Backend` trait on one GPU through cudarc (driver API, loaded at run time,
//! so the crate builds with no CUDA installed), kernels from `cuda/` (build.rs → `kernels`), GEMMs
//! through cuBLASLt (`gemm`), memory from a caching pool (`pool`).
//!
//! Numerics (DESIGN.md): every buffer carries its element type (`DType`). GEMMs always take bf16
//! operands with fp32 accumulation (an fp32 operand is rounded to bf16 into pooled scratch first);
//! every other kernel computes in fp32 (f64 for reductions) whatever the storage. `storage` picks
//! the type of the buffers the model code allocates through the trait (`zeros`, `upload`): `F32`
//! (the default, `cuda`) keeps activations, gradients, fp32 master weights and Adam moments in fp32;
//! `Bf16` (`cuda-bf16`) stores them all in bf16 — the memory layout the design wants for
//! activations, but the trait has no way yet to ask for fp32 master weights and moments, so `Bf16`
//! is for forward passes and benchmarks, not training (docs/DEVELOPERS.md, CUDA).
//!
//! All work runs on the context's default stream, in order; host transfers synchronise. A CUDA
//! error panics with the kernel's name (the trait has no `Result`). With `ULTRALONG_CUDA_SYNC=1`
//! every launch is followed by a synchronise and an error check (for compute-sanitizer runs).

pub mod gemm;
pub mod kernels;
pub mod pool;

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaContext, CudaStream, LaunchConfig, PushKernelArg, result};
use half::bf16;

use crate::backend::{AdamW, AttnShape, Backend, CeStats, NOT_IN_SHARD};
use kernels::{Kernels, UlAdamHp, UlAttnShape, UlTensor};
use pool::Pool;

/// Element type of a device buffer (the codes match `cuda/common.cuh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
    pub fn code(self) -> i32 {
        match self {
            DType::F32 => 0,
            DType::Bf16 => 1,
        }
    }
}

/// A device buffer of `len` elements of `dtype`, returned to the pool when dropped.
pub struct CudaBuf {
    ptr: CUdeviceptr,
    len: usize,
    dtype: DType,
    class: usize,
    pool: Arc<Pool>,
}

impl CudaBuf {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn device_ptr(&self) -> CUdeviceptr {
        self.ptr
    }
    /// Device address of element `off`.
    fn at(&self, off: usize) -> CUdeviceptr {
        assert!(
            off <= self.len,
            "offset {off} past a buffer of {}",
            self.len
        );
        self.ptr + (off * self.dtype.size()) as u64
    }
    fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        if self.class > 0 {
            self.pool.release(self.ptr, self.class, self.bytes());
        }
    }
}

/// Push each argument into a launch as a local that lives until the launch (cudarc keeps pointers
/// to the arguments), launch, and check.
macro_rules! launch {
    ($self:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let f = $self.k.get($name);
        let mut l = $self.stream.launch_builder(f);
        launch!(@push l; $($arg),*);
        // SAFETY: the argument list matches the kernel's signature in cuda/ (same order, types).
        unsafe { l.launch($cfg) }.unwrap_or_else(|e| panic!("CUDA launch {}: {e:?}", $name));
        $self.after_launch($name);
    }};
    (@push $l:ident; $head:expr $(, $tail:expr)*) => {
        let v = $head;
        $l.arg(&v);
        launch!(@push $l; $($tail),*);
    };
    (@push $l:ident;) => {};
}

mod flash;
pub use flash::{AttnOptions, flash_supports};

/// Threads per block of the elementwise kernels.
const THREADS: u32 = 256;

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
    attn: AttnOptions,
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
        let pool = Arc::new(Pool::new(ctx.clone()));
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .context("SM count")? as u32;
        let ws_bytes = 32 << 20;
        let (ws_ptr, ws_class) = pool.alloc(ws_bytes);
        let workspace = CudaBuf {
            ptr: ws_ptr,
            len: ws_bytes / 4,
            dtype: DType::F32,
            class: ws_class,
            pool: pool.clone(),
        };
        let lt = gemm::Lt::new(ws_ptr, ws_bytes)?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
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
            attn: AttnOptions::from_env(),
        })
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

    /// Wait for all queued work; panics with the error of a failed kernel.
    pub fn synchronize(&self) {
        self.stream
            .synchronize()
            .unwrap_or_else(|e| panic!("CUDA error (asynchronous, from an earlier launch): {e:?}"));
    }

    fn after_launch(&self, name: &str) {
        if self.sync_each {
            self.stream
                .synchronize()
                .unwrap_or_else(|e| panic!("CUDA kernel {name} failed: {e:?}"));
        }
    }

    fn bind(&self) {
        self.ctx.bind_to_thread().expect("bind CUDA context");
    }

    /// An uninitialised buffer of `n` elements of `dtype`.
    pub fn alloc(&self, n: usize, dtype: DType) -> CudaBuf {
        if n == 0 {
            return CudaBuf {
                ptr: 0,
                len: 0,
                dtype,
                class: 0,
                pool: self.pool.clone(),
            };
        }
        let (ptr, class) = self.pool.alloc(n * dtype.size());
        CudaBuf {
            ptr,
            len: n,
            dtype,
            class,
            pool: self.pool.clone(),
        }
    }

    pub fn zeros_dtype(&self, n: usize, dtype: DType) -> CudaBuf {
        let b = self.alloc(n, dtype);
        if n > 0 {
            self.bind();
            // SAFETY: the range is the buffer.
            unsafe { result::memset_d8_async(b.ptr, 0, b.bytes(), self.stream.cu_stream()) }
                .expect("cuMemsetD8");
        }
        b
    }

    pub fn upload_dtype(&self, host: &[f32], dtype: DType) -> CudaBuf {
        let mut b = self.alloc(host.len(), dtype);
        self.write_f32(&mut b, 0, host);
        b
    }

    /// Every element set to `v` (NaN to poison outputs before a check).
    pub fn fill(&self, b: &mut CudaBuf, v: f32) {
        if b.len == 0 {
            return;
        }
        let cfg = self.grid1d(b.len);
        launch!(self, "ul_fill", cfg; b.ptr, b.dtype.code(), b.len as i64, v);
    }

    /// Uniform random values in `[-scale, scale)` made on the device (benchmark inputs).
    pub fn fill_random(&self, b: &mut CudaBuf, seed: u64, scale: f32) {
        if b.len == 0 {
            return;
        }
        let cfg = self.grid1d(b.len);
        launch!(self, "ul_fill_random", cfg; b.ptr, b.dtype.code(), b.len as i64, seed, scale);
    }

    /// Bytes of plain data (indices, tables) in a temporary device buffer.
    fn upload_raw<T: bytemuck::Pod>(&self, host: &[T]) -> CudaBuf {
        let bytes: &[u8] = bytemuck::cast_slice(host);
        let b = self.alloc(bytes.len().div_ceil(4), DType::F32);
        if !bytes.is_empty() {
            self.htod(b.ptr, bytes);
        }
        b
    }

    fn htod(&self, dst: CUdeviceptr, bytes: &[u8]) {
        self.bind();
        // SAFETY: `dst` covers `bytes.len()` (callers pass a buffer range); synchronised before
        // the host slice can go away.
        unsafe { result::memcpy_htod_async(dst, bytes, self.stream.cu_stream()) }
            .expect("cuMemcpyHtoD");
        self.synchronize();
    }

    fn dtoh(&self, dst: &mut [u8], src: CUdeviceptr) {
        self.bind();
        // SAFETY: `src` covers `dst.len()` bytes; synchronised before the host reads.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .expect("cuMemcpyDtoH");
        self.synchronize();
    }

    fn download_raw<T: bytemuck::Pod + Default + Clone>(&self, b: &CudaBuf, n: usize) -> Vec<T> {
        let mut out = vec![T::default(); n];
        if n > 0 {
            self.dtoh(bytemuck::cast_slice_mut(&mut out), b.ptr);
        }
        out
    }

    fn write_f32(&self, b: &mut CudaBuf, off: usize, data: &[f32]) {
        assert!(
            off + data.len() <= b.len,
            "write of {} at {off} past a buffer of {}",
            data.len(),
            b.len
        );
        if data.is_empty() {
            return;
        }
        match b.dtype {
            DType::F32 => self.htod(b.at(off), bytemuck::cast_slice(data)),
            DType::Bf16 => {
                let h: Vec<u16> = data.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
                self.htod(b.at(off), bytemuck::cast_slice(&h));
            }
        }
    }

    fn read_f32(&self, b: &CudaBuf, off: usize, out: &mut [f32]) {
        assert!(
            off + out.len() <= b.len,
            "read of {} at {off} past a buffer of {}",
            out.len(),
            b.len
        );
        if out.is_empty() {
            return;
        }
        match b.dtype {
            DType::F32 => self.dtoh(bytemuck::cast_slice_mut(out), b.at(off)),
            DType::Bf16 => {
                let mut h = vec![0u16; out.len()];
                self.dtoh(bytemuck::cast_slice_mut(&mut h), b.at(off));
                for (o, x) in out.iter_mut().zip(h) {
                    *o = bf16::from_bits(x).to_f32();
                }
            }
        }
    }

    /// A grid-stride launch over `n` elements.
    fn grid1d(&self, n: usize) -> LaunchConfig {
        let blocks = n
            .div_ceil(THREADS as usize)
            .clamp(1, (self.sms * 32) as usize) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Threads per block for a one-block-per-row kernel over rows of `dim`.
    fn row_threads(dim: usize, max: usize) -> u32 {
        (dim.div_ceil(32) * 32).clamp(32, max) as u32
    }

    /// `dst[..n] = src[..n]` between device addresses, converting dtypes.
    fn convert(&self, src: CUdeviceptr, dts: DType, dst: CUdeviceptr, dtd: DType, n: usize) {
        if n == 0 {
            return;
        }
        if dts == dtd {
            self.bind();
            // SAFETY: both ranges are inside live buffers (callers check).
            unsafe { result::memcpy_dtod_async(dst, src, n * dts.size(), self.stream.cu_stream()) }
                .expect("cuMemcpyDtoD");
            self.after_launch("memcpy_dtod");
            return;
        }
        let cfg = self.grid1d(n);
        launch!(self, "ul_convert", cfg; src, dts.code(), dst, dtd.code(), n as i64);
    }

    /// A bf16 view of `b[off .. off+n]`: the buffer itself if bf16, else a rounded copy.
    fn bf16_operand(&self, b: &CudaBuf, off: usize, n: usize) -> (CUdeviceptr, Option<CudaBuf>) {
        assert!(
            off + n <= b.len,
            "GEMM operand of {n} at {off} past {}",
            b.len
        );
        if b.dtype == DType::Bf16 {
            return (b.at(off), None);
        }
        let tmp = self.alloc(n, DType::Bf16);
        self.convert(b.at(off), b.dtype, tmp.ptr, DType::Bf16, n);
        (tmp.ptr, Some(tmp))
    }

    /// Σ over f64 partials of one block each, summed on the host in order.
    fn sum_squares_at(&self, ptr: CUdeviceptr, dtype: DType, n: usize) -> f64 {
        if n == 0 {
            return 0.0;
        }
        let cfg = self.grid1d(n);
        let blocks = cfg.grid_dim.0 as usize;
        let partials = self.alloc(blocks * 2, DType::F32);
        launch!(self, "ul_sum_squares", cfg; ptr, dtype.code(), n as i64, partials.ptr);
        self.download_raw::<f64>(&partials, blocks).iter().sum()
    }

    /// Device cos/sin tables `[positions.len(), inv_freq.len()]` with exact angles (f64 product,
    /// two-part 2π reduction, f64 sincos) times `attention_factor` — the device twin of
    /// `Rope::cos_sin` (Exact).
    pub fn rope_table(
        &self,
        inv_freq: &[f64],
        positions: &[u64],
        attention_factor: f64,
        dtype: DType,
    ) -> (CudaBuf, CudaBuf) {
        let half = inv_freq.len();
        let rows = positions.len();
        let cos = self.alloc(rows * half, dtype);
        let sin = self.alloc(rows * half, dtype);
        let inv = self.upload_raw(inv_freq);
        let pos: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        let pos = self.upload_raw(&pos);
        if rows * half > 0 {
            let cfg = self.grid1d(rows * half);
            launch!(self, "ul_rope_table", cfg; inv.ptr, pos.ptr, rows as i32, half as i32,
                attention_factor, cos.ptr, sin.ptr, dtype.code());
        }
        (cos, sin)
    }

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

    /// Σ g² over many tensors (multi-tensor, one launch), in f64.
    pub fn sum_squares_multi(&self, bufs: &[&CudaBuf]) -> f64 {
        bufs.iter()
            .map(|b| self.sum_squares_at(b.ptr, b.dtype, b.len))
            .sum()
    }
}

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

fn attn_shape(s: &AttnShape) -> UlAttnShape {
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

/// Warps of 32 threads, `WARPS` per block, one per work item.
const WARPS: u32 = 4;
fn warp_grid(items: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.div_ceil(WARPS as usize).max(1) as u32, 1, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
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

    fn zeros(&self, n: usize) -> CudaBuf {
        self.zeros_dtype(n, self.storage)
    }
    fn len(&self, b: &CudaBuf) -> usize {
        b.len
    }
    fn upload(&self, host: &[f32]) -> CudaBuf {
        self.upload_dtype(host, self.storage)
    }
    fn download(&self, b: &CudaBuf) -> Vec<f32> {
        let mut out = vec![0f32; b.len];
        self.read_f32(b, 0, &mut out);
        out
    }
    fn upload_f64(&self, host: &[f64]) -> CudaBuf {
        let h: Vec<f32> = host.iter().map(|&x| x as f32).collect();
        self.upload(&h)
    }
    fn download_f64(&self, b: &CudaBuf) -> Vec<f64> {
        self.download(b).into_iter().map(f64::from).collect()
    }
    fn fill_zero(&self, b: &mut CudaBuf) {
        if b.len > 0 {
            self.bind();
            // SAFETY: the range is the buffer.
            unsafe { result::memset_d8_async(b.ptr, 0, b.bytes(), self.stream.cu_stream()) }
                .expect("cuMemsetD8");
        }
    }
    fn copy(&self, src: &CudaBuf, src_off: usize, dst: &mut CudaBuf, dst_off: usize, n: usize) {
        assert!(
            src_off + n <= src.len && dst_off + n <= dst.len,
            "copy of {n}: src {src_off}/{} dst {dst_off}/{}",
            src.len,
            dst.len
        );
        self.convert(src.at(src_off), src.dtype, dst.at(dst_off), dst.dtype, n);
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

    fn add_assign(&self, dst: &mut CudaBuf, src: &CudaBuf) {
        assert_eq!(dst.len, src.len, "add_assign: length mismatch");
        let n = dst.len;
        self.add_at(dst, 0, src, 0, n);
    }
    fn add_at(&self, dst: &mut CudaBuf, dst_off: usize, src: &CudaBuf, src_off: usize, n: usize) {
        assert!(
            src_off + n <= src.len && dst_off + n <= dst.len,
            "add_at out of range"
        );
        if n == 0 {
            return;
        }
        let cfg = self.grid1d(n);
        launch!(self, "ul_add", cfg; dst.at(dst_off), dst.dtype.code(), src.at(src_off),
            src.dtype.code(), n as i64);
    }
    fn scale(&self, b: &mut CudaBuf, s: f64) {
        if b.len == 0 {
            return;
        }
        let cfg = self.grid1d(b.len);
        launch!(self, "ul_scale", cfg; b.ptr, b.dtype.code(), b.len as i64, s as f32);
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
        assert!(c_off + m * n <= c.len, "gemm: C too small");
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                self.convert_fill_zero(c, c_off, m * n);
            }
            return;
        }
        let (pa, _ta) = self.bf16_operand(a, a_off, m * k);
        let (pb, _tb) = self.bf16_operand(b, b_off, k * n);
        self.bind();
        self.lt.matmul(
            self.stream.cu_stream(),
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
        self.after_launch("cublasLtMatmul");
    }

    fn embedding_forward(&self, table: &CudaBuf, ids: &[u32], dim: usize, out: &mut CudaBuf) {
        assert_eq!(
            out.len,
            ids.len() * dim,
            "embedding_forward: out has the wrong size"
        );
        let vocab = table.len / dim.max(1);
        for &id in ids {
            assert!(
                id == NOT_IN_SHARD || (id as usize) < vocab,
                "token id {id} out of range for vocabulary {vocab}"
            );
        }
        if ids.is_empty() || dim == 0 {
            return;
        }
        let ids_d = self.upload_raw(ids);
        let cfg = LaunchConfig {
            grid_dim: (ids.len() as u32, dim.div_ceil(THREADS as usize) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "ul_embedding_fwd", cfg; table.ptr, table.dtype.code(), ids_d.ptr,
            ids.len() as i32, dim as i32, out.ptr, out.dtype.code());
    }
    fn embedding_backward(&self, dtable: &mut CudaBuf, ids: &[u32], dim: usize, dout: &CudaBuf) {
        assert_eq!(
            dout.len,
            ids.len() * dim,
            "embedding_backward: dout has the wrong size"
        );
        let vocab = dtable.len / dim.max(1);
        // Token positions grouped by id, each group in token order (a stable sort).
        let mut order: Vec<i32> = (0..ids.len() as i32)
            .filter(|&t| ids[t as usize] != NOT_IN_SHARD)
            .collect();
        order.sort_by_key(|&t| ids[t as usize]);
        let mut seg_start: Vec<i32> = Vec::new();
        let mut seg_id: Vec<u32> = Vec::new();
        for (j, &t) in order.iter().enumerate() {
            let id = ids[t as usize];
            assert!(
                (id as usize) < vocab,
                "token id {id} out of range for vocabulary {vocab}"
            );
            if seg_id.last() != Some(&id) {
                seg_id.push(id);
                seg_start.push(j as i32);
            }
        }
        seg_start.push(order.len() as i32);
        if seg_id.is_empty() || dim == 0 {
            return;
        }
        let (o, s, i) = (
            self.upload_raw(&order),
            self.upload_raw(&seg_start),
            self.upload_raw(&seg_id),
        );
        let cfg = LaunchConfig {
            grid_dim: (
                seg_id.len() as u32,
                dim.div_ceil(THREADS as usize) as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "ul_embedding_bwd", cfg; dtable.ptr, dtable.dtype.code(), dout.ptr,
            dout.dtype.code(), o.ptr, s.ptr, i.ptr, seg_id.len() as i32, dim as i32);
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
        assert!(
            x.len == rows * dim && out.len == rows * dim && rstd.len == rows && w.len == dim,
            "rmsnorm_forward: sizes"
        );
        if rows == 0 {
            return;
        }
        let bf = DType::Bf16;
        if x.dtype == bf
            && w.dtype == bf
            && out.dtype == bf
            && dim.is_multiple_of(8)
            && dim / 8 <= 4096
        {
            // One 16-byte vector per thread and pass (at most 4 passes: the kernel's register row).
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (Self::row_threads(dim / 8, 1024), 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(self, "ul_rmsnorm_fwd_bf16x8", cfg; x.ptr, w.ptr, eps as f32, rows as i32,
                dim as i32, out.ptr, rstd.ptr, rstd.dtype.code());
            return;
        }
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (Self::row_threads(dim / 4, 1024), 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "ul_rmsnorm_fwd", cfg; x.ptr, x.dtype.code(), w.ptr, w.dtype.code(),
            eps as f32, rows as i32, dim as i32, out.ptr, out.dtype.code(), rstd.ptr,
            rstd.dtype.code());
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
        assert!(
            x.len == rows * dim && dout.len == rows * dim && dx.len == rows * dim && w.len == dim,
            "rmsnorm_backward: sizes"
        );
        if rows == 0 {
            return;
        }
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (Self::row_threads(dim / 4, 1024), 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "ul_rmsnorm_bwd_dx", cfg; dout.ptr, dout.dtype.code(), x.ptr,
            x.dtype.code(), w.ptr, w.dtype.code(), rstd.ptr, rstd.dtype.code(), rows as i32,
            dim as i32, dx.ptr, dx.dtype.code());
        const CHUNK_ROWS: usize = 64;
        let chunks = rows.div_ceil(CHUNK_ROWS);
        let partial = self.alloc(chunks * dim, DType::F32);
        let cols = dim.div_ceil(THREADS as usize) as u32;
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, cols, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "ul_rmsnorm_bwd_dw_partial", cfg; dout.ptr, dout.dtype.code(), x.ptr,
            x.dtype.code(), rstd.ptr, rstd.dtype.code(), rows as i32, dim as i32,
            CHUNK_ROWS as i32, partial.ptr);
        let cfg = LaunchConfig {
            grid_dim: (cols, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "ul_colsum_add", cfg; partial.ptr, chunks as i32, dim as i32, dw.ptr,
            dw.dtype.code());
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
        self.rope(x, cos, sin, rows, heads, head_dim, false);
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
        self.rope(dx, cos, sin, rows, heads, head_dim, true);
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
        let s = attn_shape(shape);
        let (ql, kl, d) = (shape.q_len, shape.kv_len, shape.head_dim);
        assert!(
            q.len == ql * shape.n_q_heads * d
                && k.len == kl * shape.n_kv_heads * d
                && v.len == k.len
                && out.len == q.len
                && lse.len == shape.n_q_heads * ql,
            "attention_forward: sizes for {shape:?}"
        );
        if self.uses_flash(shape) {
            self.flash_forward(q, k, v, shape, scale, out, lse);
            return;
        }
        let (kk, vv) = self.same_dtype_kv(q, k, v);
        let (kp, vp) = (kk.as_ref().unwrap_or(k).ptr, vv.as_ref().unwrap_or(v).ptr);
        let items = shape.n_q_heads * ql;
        if items == 0 {
            return;
        }
        launch!(self, "ul_attn_fwd", warp_grid(items); q.ptr, kp, vp, q.dtype.code(), s,
            scale as f32, out.ptr, out.dtype.code(), lse.ptr, lse.dtype.code());
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
        let s = attn_shape(shape);
        let ql = shape.q_len;
        assert!(
            out.len == q.len
                && dout.len == q.len
                && dq.len == q.len
                && dk.len == k.len
                && dv.len == v.len
                && dk.dtype == dv.dtype,
            "attention_backward: sizes for {shape:?}"
        );
        if self.uses_flash(shape) {
            self.flash_backward(q, k, v, out, dout, lse, shape, scale, dq, dk, dv);
            return;
        }
        // The simple kernels read q, k, v, out, dout with one dtype code: bring strays to q's.
        let conv = |b: &CudaBuf| {
            (b.dtype != q.dtype).then(|| {
                let t = self.alloc(b.len, q.dtype);
                self.convert(b.ptr, b.dtype, t.ptr, q.dtype, b.len);
                t
            })
        };
        let (kk, vv, oo, gg) = (conv(k), conv(v), conv(out), conv(dout));
        let kp = kk.as_ref().unwrap_or(k).ptr;
        let vp = vv.as_ref().unwrap_or(v).ptr;
        let op = oo.as_ref().unwrap_or(out).ptr;
        let gp = gg.as_ref().unwrap_or(dout).ptr;
        let dsum = self.alloc(shape.n_q_heads * ql, DType::F32);
        let dt = q.dtype.code();
        let sc = scale as f32;
        if shape.n_q_heads * ql > 0 {
            launch!(self, "ul_attn_bwd_dq", warp_grid(shape.n_q_heads * ql); q.ptr, kp, vp, op,
                gp, lse.ptr, dt, lse.dtype.code(), s, sc, dq.ptr, dq.dtype.code(), dsum.ptr);
        }
        if shape.n_kv_heads * shape.kv_len > 0 {
            launch!(self, "ul_attn_bwd_dkdv", warp_grid(shape.n_kv_heads * shape.kv_len); q.ptr,
                kp, vp, gp, lse.ptr, dt, lse.dtype.code(), s, sc, dsum.ptr, dk.ptr, dv.ptr,
                dk.dtype.code());
        }
    }

    fn swiglu_forward(&self, gate: &CudaBuf, up: &CudaBuf, out: &mut CudaBuf) {
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
            let cfg = self.grid1d(n8);
            launch!(self, "ul_swiglu_fwd_bf16x8", cfg; gate.ptr, up.ptr, out.ptr, n8 as i64);
            return;
        }
        let cfg = self.grid1d(up.len);
        launch!(self, "ul_swiglu_fwd", cfg; gate.ptr, gate.dtype.code(), up.ptr, up.dtype.code(),
            out.ptr, out.dtype.code(), up.len as i64);
    }
    fn swiglu_backward(
        &self,
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
            let cfg = self.grid1d(n / 8);
            launch!(self, "ul_swiglu_bwd_bf16x8", cfg; gate.ptr, up.ptr, dout.ptr, dgate.ptr,
                dup.ptr, (n / 8) as i64);
            return;
        }
        let cfg = self.grid1d(n);
        launch!(self, "ul_swiglu_bwd", cfg; gate.ptr, gate.dtype.code(), up.ptr, up.dtype.code(),
            dout.ptr, dout.dtype.code(), dgate.ptr, dgate.dtype.code(), dup.ptr,
            dup.dtype.code(), n as i64);
    }

    fn cross_entropy_chunk(
        &self,
        logits: &mut CudaBuf,
        targets: &[i32],
        vocab: usize,
        grad_scale: f64,
    ) -> f64 {
        let rows = targets.len();
        assert_eq!(
            logits.len,
            rows * vocab,
            "cross_entropy_chunk: logits/targets size mismatch"
        );
        for &t in targets {
            assert!(
                t < vocab as i32,
                "target {t} out of range for vocabulary {vocab}"
            );
        }
        if rows == 0 {
            return 0.0;
        }
        let tg = self.upload_raw(targets);
        let loss = self.alloc(rows * 2, DType::F32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (Self::row_threads(vocab / 8, 1024), 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "ul_ce_chunk", cfg; logits.ptr, logits.dtype.code(), tg.ptr, rows as i32,
            vocab as i32, grad_scale as f32, loss.ptr);
        self.download_raw::<f64>(&loss, rows).iter().sum()
    }
    fn cross_entropy_stats(&self, logits: &CudaBuf, targets: &[i32], vocab: usize) -> Vec<CeStats> {
        let rows = targets.len();
        assert_eq!(logits.len, rows * vocab, "cross_entropy_stats: sizes");
        for &t in targets {
            assert!(t < vocab as i32, "target {t} out of shard of {vocab}");
        }
        if rows == 0 {
            return Vec::new();
        }
        let tg = self.upload_raw(targets);
        let st = self.alloc(rows * 8, DType::F32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (Self::row_threads(vocab / 8, 1024), 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "ul_ce_stats", cfg; logits.ptr, logits.dtype.code(), tg.ptr, rows as i32,
            vocab as i32, st.ptr);
        let h = self.download_raw::<f64>(&st, rows * 4);
        h.chunks(4)
            .map(|c| CeStats {
                max: c[0],
                sum: c[1],
                target: (c[3] != 0.0).then_some(c[2]),
            })
            .collect()
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
        let rows = targets.len();
        assert!(
            logits.len == rows * vocab && max.len() == rows && sum.len() == rows,
            "cross_entropy_grad: sizes"
        );
        if rows == 0 {
            return;
        }
        let (tg, mx, sm) = (
            self.upload_raw(targets),
            self.upload_raw(max),
            self.upload_raw(sum),
        );
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (Self::row_threads(vocab / 8, 1024), 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "ul_ce_grad", cfg; logits.ptr, logits.dtype.code(), tg.ptr, rows as i32,
            vocab as i32, mx.ptr, sm.ptr, grad_scale as f32);
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
        launch!(self, "ul_attn_merge", cfg; out.ptr, out.dtype.code(), lse.ptr, lse.dtype.code(),
            out_b.ptr, out_b.dtype.code(), lse_b.ptr, lse_b.dtype.code(), row0 as i32,
            rows as i32, q_len as i32, heads as i32, head_dim as i32);
    }

    fn adamw(
        &self,
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
            let cfg = self.grid1d(n / 4);
            launch!(self, "ul_adamw_f32x4", cfg; param.ptr, grad.ptr, m.ptr, v.ptr,
                (n / 4) as i64, adam_hp(hp), hp.weight_decay as f32, hp.grad_scale as f32);
            return;
        }
        let cfg = self.grid1d(n);
        launch!(self, "ul_adamw", cfg; param.ptr, param.dtype.code(), grad.ptr,
            grad.dtype.code(), m.ptr, m.dtype.code(), v.ptr, v.dtype.code(), n as i64,
            adam_hp(hp), hp.weight_decay as f32, hp.grad_scale as f32);
    }
}

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut CudaBuf,
        cos: &CudaBuf,
        sin: &CudaBuf,
        rows: usize,
        heads: usize,
        head_dim: usize,
        transpose: bool,
    ) {
        let half = head_dim / 2;
        assert!(
            x.len == rows * heads * head_dim && cos.len >= rows * half && sin.len >= rows * half,
            "rope: sizes"
        );
        assert_eq!(
            cos.dtype, sin.dtype,
            "rope: cos and sin of different dtypes"
        );
        let n = rows * heads * half;
        if n == 0 {
            return;
        }
        let bf = DType::Bf16;
        if x.dtype == bf && cos.dtype == bf && half.is_multiple_of(8) {
            let cfg = self.grid1d(n / 8);
            launch!(self, "ul_rope_rotate_bf16x8", cfg; x.ptr, cos.ptr, sin.ptr, rows as i32,
                heads as i32, half as i32, transpose as i32);
            return;
        }
        let cfg = self.grid1d(n);
        launch!(self, "ul_rope_rotate", cfg; x.ptr, x.dtype.code(), cos.ptr, sin.ptr,
            cos.dtype.code(), rows as i32, heads as i32, half as i32, transpose as i32);
    }

    fn convert_fill_zero(&self, c: &mut CudaBuf, off: usize, n: usize) {
        self.bind();
        // SAFETY: the range is inside the buffer (checked by the caller).
        unsafe {
            result::memset_d8_async(c.at(off), 0, n * c.dtype.size(), self.stream.cu_stream())
        }
        .expect("cuMemsetD8");
    }

    /// k and v converted to q's dtype if they differ (the simple kernel reads one dtype).
    fn same_dtype_kv(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
    ) -> (Option<CudaBuf>, Option<CudaBuf>) {
        let conv = |b: &CudaBuf| {
            (b.dtype != q.dtype).then(|| {
                let t = self.alloc(b.len, q.dtype);
                self.convert(b.ptr, b.dtype, t.ptr, q.dtype, b.len);
                t
            })
        };
        (conv(k), conv(v))
    }
}

impl CudaBackend {
    /// The backend for this process under mpirun/srun: GPU `local_rank % device_count` (ranks of
    /// a node spread over its GPUs; several ranks share one when there are fewer GPUs), fp32
    /// storage. The local rank comes from OpenMPI, Slurm or MPICH's environment, else 0.
    pub fn for_local_rank() -> Result<Self> {
        if let Some(why) = unavailable_reason() {
            bail!(why);
        }
        let local: usize = [
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "SLURM_LOCALID",
            "MPI_LOCALRANKID",
        ]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0);
        let count = CudaContext::device_count().context("counting CUDA devices")?;
        if count < 1 {
            bail!("--backend cuda: the driver reports no CUDA device");
        }
        Self::new(local % count as usize, DType::F32)
    }
}
