//! The device side of the CUDA backend: launching a kernel (`launch!`), launch geometry, the
//! stream's synchronisation, raw host ↔ device copies, and the backend's failure record. Every
//! family's launcher (`rmsnorm.rs`, `attention_flash.rs`, ...) goes through these.
//!
//! Failures (candle's rule: a device error is a value, never a panic): the trait's ops return no
//! `Result`, so the first failure — a launch, a copy, an allocation, an asynchronous kernel error
//! found at a synchronisation — is recorded with the operation, its sizes and the device, and
//! `Backend::check` returns it. After it every launch and copy is skipped and downloads read NaN
//! (all-ones bytes), so nothing that follows looks like a result; the trainer checks each step.

use cudarc::driver::LaunchConfig;
use cudarc::driver::result;
use cudarc::driver::sys::CUdeviceptr;

use super::CudaBackend;

/// Launch kernel `$name` (a `&'static str`) with `$cfg` unless the backend has failed: each
/// argument is pushed as a local that lives until the launch (cudarc keeps pointers to them); a
/// failed launch is recorded with the kernel's name and geometry.
macro_rules! launch {
    ($self:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let name: &'static str = $name;
        let cfg: cudarc::driver::LaunchConfig = $cfg;
        if let Some(f) = $self.kernel(name) {
            let mut l = $self.stream.launch_builder(f);
            launch!(@push l; $($arg),*);
            // SAFETY: the argument list matches the kernel's signature in cuda/ (same order,
            // types).
            match unsafe { l.launch(cfg) } {
                Ok(_) => $self.after_launch(name),
                Err(e) => $self.launch_failed(name, &cfg, e),
            }
        }
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
    /// `cuda:N (name)`, for messages.
    pub(super) fn device_label(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.device_name)
    }

    /// Record a failure unless one is recorded already (later failures are its consequences).
    pub(super) fn fail(&self, what: impl FnOnce() -> String) {
        let mut f = self.fault.lock().unwrap();
        if f.is_none() {
            *f = Some(what());
            self.failed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether a failure is recorded (then work is skipped).
    pub(super) fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The recorded failure, if any (`Backend::check`).
    pub(super) fn fault(&self) -> Option<String> {
        self.fault.lock().unwrap().clone()
    }

    /// Forget the recorded failure and work again (gpu-check, after a check that failed on
    /// purpose or to go on to the next group; a corrupted context fails again at once).
    pub fn clear_failure(&self) -> Option<String> {
        self.failed
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.fault.lock().unwrap().take()
    }

    /// The loaded kernel `name`, or `None` (recorded) when the backend has failed or the kernel
    /// table lacks it.
    pub(super) fn kernel(&self, name: &'static str) -> Option<&cudarc::driver::CudaFunction> {
        if self.failed() {
            return None;
        }
        *self.last_launch.lock().unwrap() = name;
        let f = self.k.get(name);
        if f.is_none() {
            self.fail(|| format!("CUDA kernel {name} is not loaded (kernels::KERNELS lacks it)"));
        }
        f
    }

    pub(super) fn launch_failed(
        &self,
        name: &str,
        cfg: &LaunchConfig,
        e: cudarc::driver::DriverError,
    ) {
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        self.fail(|| {
            format!(
                "CUDA launch of {name} (grid {}x{}x{}, block {}x{}x{}, {} bytes of dynamic \
                 shared memory) on {} failed: {e}",
                g.0,
                g.1,
                g.2,
                b.0,
                b.1,
                b.2,
                cfg.shared_mem_bytes,
                self.device_label()
            )
        });
    }

    /// Wait for all queued work; an error of a kernel that already ran is recorded (`check`).
    pub fn synchronize(&self) {
        if self.failed() {
            return;
        }
        if let Err(e) = self.stream.synchronize() {
            let last = *self.last_launch.lock().unwrap();
            self.fail(|| {
                format!(
                    "CUDA error on {}, found at a synchronisation after {last} (the last launch; \
                     ULTRALONG_CUDA_SYNC=1 checks after every launch): {e}",
                    self.device_label()
                )
            });
        }
    }

    pub(super) fn after_launch(&self, name: &str) {
        if self.sync_each
            && let Err(e) = self.stream.synchronize()
        {
            self.fail(|| format!("CUDA kernel {name} failed on {}: {e}", self.device_label()));
        }
    }

    /// Make the context current on this thread; false (recorded) if the backend cannot work.
    pub(super) fn bind(&self) -> bool {
        if self.failed() {
            return false;
        }
        if let Err(e) = self.ctx.bind_to_thread() {
            self.fail(|| format!("binding the CUDA context of {}: {e}", self.device_label()));
            return false;
        }
        true
    }

    /// Record the error of a driver call `what` (a copy, a memset) of `bytes` bytes.
    fn driver_call(&self, what: &str, bytes: usize, r: Result<(), cudarc::driver::DriverError>) {
        if let Err(e) = r {
            self.fail(|| {
                format!(
                    "{what} of {bytes} bytes on {} failed: {e}",
                    self.device_label()
                )
            });
        }
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
        if !self.bind() {
            return;
        }
        // SAFETY: `dst` covers `bytes.len()` (callers pass a buffer range); synchronised before
        // the host slice can go away.
        let r = unsafe { result::memcpy_htod_async(dst, bytes, self.stream.cu_stream()) };
        self.driver_call("cuMemcpyHtoD", bytes.len(), r);
        self.synchronize();
    }

    /// `dst = src[..dst.len()]`; all-ones bytes (NaN in every float type) once the backend has
    /// failed.
    pub(super) fn dtoh(&self, dst: &mut [u8], src: CUdeviceptr) {
        if self.bind() {
            // SAFETY: `src` covers `dst.len()` bytes; synchronised before the host reads.
            let r = unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) };
            self.driver_call("cuMemcpyDtoH", dst.len(), r);
            self.synchronize();
        }
        if self.failed() {
            dst.fill(0xff);
        }
    }

    /// `bytes` zero bytes from `ptr`.
    pub(super) fn memset_zero(&self, ptr: CUdeviceptr, bytes: usize) {
        if bytes == 0 || !self.bind() {
            return;
        }
        // SAFETY: the range is inside a live buffer (callers pass buffer ranges).
        let r = unsafe { result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) };
        self.driver_call("cuMemsetD8", bytes, r);
    }

    /// `dst[..bytes] = src[..bytes]` on the device.
    pub(super) fn memcpy_dtod(&self, dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) {
        if !self.bind() {
            return;
        }
        // SAFETY: both ranges are inside live buffers (callers check).
        let r = unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) };
        self.driver_call("cuMemcpyDtoD", bytes, r);
        self.after_launch("memcpy_dtod");
    }
}
