//! The device side of the CUDA backend: launching a kernel (`launch!`), launch geometry, the
//! stream's synchronisation and error checks, and raw host ↔ device copies. Every family's
//! launcher (`rmsnorm.rs`, `attention_flash.rs`, ...) goes through these.

use cudarc::driver::LaunchConfig;
use cudarc::driver::result;
use cudarc::driver::sys::CUdeviceptr;

use super::CudaBackend;

/// Push each argument into a launch as a local that lives until the launch (cudarc keeps pointers
/// to the arguments), launch, and check.
macro_rules! launch {
    ($self:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
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

/// Threads per block of the elementwise kernels.
pub(super) const THREADS: u32 = 256;

/// Warps of 32 threads, `WARPS` per block, one per work item.
const WARPS: u32 = 4;

/// One warp per work item, `WARPS` per block.
pub(super) fn warp_grid(items: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.div_ceil(WARPS as usize).max(1) as u32, 1, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads per block for a one-block-per-row kernel over rows of `dim`.
pub(super) fn row_threads(dim: usize, max: usize) -> u32 {
    (dim.div_ceil(32) * 32).clamp(32, max) as u32
}

/// One block per row, `threads` each.
pub(super) fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Wait for all queued work; panics with the error of a failed kernel.
    pub fn synchronize(&self) {
        self.stream
            .synchronize()
            .unwrap_or_else(|e| panic!("CUDA error (asynchronous, from an earlier launch): {e:?}"));
    }

    pub(super) fn after_launch(&self, name: &str) {
        if self.sync_each {
            self.stream
                .synchronize()
                .unwrap_or_else(|e| panic!("CUDA kernel {name} failed: {e:?}"));
        }
    }

    pub(super) fn bind(&self) {
        self.ctx.bind_to_thread().expect("bind CUDA context");
    }

    /// A grid-stride launch over `n` elements.
    pub(super) fn grid1d(&self, n: usize) -> LaunchConfig {
        let blocks = n
            .div_ceil(THREADS as usize)
            .clamp(1, (self.sms * 32) as usize) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) fn htod(&self, dst: CUdeviceptr, bytes: &[u8]) {
        self.bind();
        // SAFETY: `dst` covers `bytes.len()` (callers pass a buffer range); synchronised before
        // the host slice can go away.
        unsafe { result::memcpy_htod_async(dst, bytes, self.stream.cu_stream()) }
            .expect("cuMemcpyHtoD");
        self.synchronize();
    }

    pub(super) fn dtoh(&self, dst: &mut [u8], src: CUdeviceptr) {
        self.bind();
        // SAFETY: `src` covers `dst.len()` bytes; synchronised before the host reads.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .expect("cuMemcpyDtoH");
        self.synchronize();
    }

    /// `bytes` zero bytes from `ptr`.
    pub(super) fn memset_zero(&self, ptr: CUdeviceptr, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.bind();
        // SAFETY: the range is inside a live buffer (callers pass buffer ranges).
        unsafe { result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
            .expect("cuMemsetD8");
    }

    /// `dst[..bytes] = src[..bytes]` on the device.
    pub(super) fn memcpy_dtod(&self, dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) {
        self.bind();
        // SAFETY: both ranges are inside live buffers (callers check).
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .expect("cuMemcpyDtoD");
        self.after_launch("memcpy_dtod");
    }
}
