//! Device memory of the CUDA backend: a caching pool of raw driver allocations by size class, so
//! the buffers a training step frees and asks for again (activations, GEMM operand scratch) cost
//! no `cuMemAlloc`. Counts the bytes held by live buffers and their peak (`Backend::peak_bytes`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use cudarc::driver::{CudaContext, result, sys::CUdeviceptr};

pub struct Pool {
    ctx: Arc<CudaContext>,
    free: Mutex<HashMap<usize, Vec<CUdeviceptr>>>,
    in_use: AtomicUsize,
    peak: AtomicUsize,
    reserved: AtomicUsize,
}

/// The size class of a request: powers of two up to 1 MiB, then multiples of 2 MiB (so a class
/// wastes at most half of a small buffer and 2 MiB of a large one).
fn class_of(bytes: usize) -> usize {
    if bytes <= 1 << 20 {
        bytes.next_power_of_two().max(256)
    } else {
        bytes.div_ceil(2 << 20) * (2 << 20)
    }
}

impl Pool {
    pub fn new(ctx: Arc<CudaContext>) -> Self {
        Pool {
            ctx,
            free: Mutex::new(HashMap::new()),
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
        }
    }

    /// A device allocation of at least `bytes` (its class returned with it), counted as `bytes`
    /// in use. Panics with the sizes when the device is out of memory even after the cache is
    /// returned to the driver.
    pub fn alloc(&self, bytes: usize) -> (CUdeviceptr, usize) {
        let class = class_of(bytes);
        let cached = self
            .free
            .lock()
            .unwrap()
            .get_mut(&class)
            .and_then(|v| v.pop());
        let ptr = match cached {
            Some(p) => p,
            None => {
                self.ctx.bind_to_thread().expect("bind CUDA context");
                // SAFETY: a plain device allocation, freed by `trim` or `Drop`.
                let p = match unsafe { result::malloc_sync(class) } {
                    Ok(p) => p,
                    Err(_) => {
                        self.trim();
                        unsafe { result::malloc_sync(class) }.unwrap_or_else(|e| {
                            panic!(
                                "CUDA out of memory: {class} bytes requested with {} in live \
                                 buffers ({e:?})",
                                self.in_use.load(Ordering::Relaxed)
                            )
                        })
                    }
                };
                self.reserved.fetch_add(class, Ordering::Relaxed);
                p
            }
        };
        let now = self.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        (ptr, class)
    }

    /// Return an allocation from `alloc(bytes)` to the cache.
    pub fn release(&self, ptr: CUdeviceptr, class: usize, bytes: usize) {
        self.in_use.fetch_sub(bytes, Ordering::Relaxed);
        self.free
            .lock()
            .unwrap()
            .entry(class)
            .or_default()
            .push(ptr);
    }

    /// Give every cached (unused) allocation back to the driver.
    pub fn trim(&self) {
        let mut free = self.free.lock().unwrap();
        let _ = self.ctx.bind_to_thread();
        for (class, ptrs) in free.drain() {
            for p in ptrs {
                // SAFETY: `p` came from malloc_sync and no live buffer holds it.
                let _ = unsafe { result::free_sync(p) };
                self.reserved.fetch_sub(class, Ordering::Relaxed);
            }
        }
    }

    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
    pub fn reset_peak(&self) {
        self.peak.store(self.in_use(), Ordering::Relaxed);
    }
    /// Bytes held from the driver (live buffers + cache, by class).
    pub fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.trim();
    }
}
