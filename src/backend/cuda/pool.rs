//! Device memory of the CUDA backend: a caching pool of raw driver allocations by size class, so
//! the buffers a training step frees and asks for again (activations, GEMM operand scratch) cost
//! no `cuMemAlloc`. Counts the bytes held by live buffers and their peak (`Backend::peak_bytes`).
//! An allocation that fails — the driver is out of memory even after the cache went back to it,
//! or the pool's optional byte limit would be passed — is an `OutOfMemory` with the sizes, never
//! a panic. The pool is generic over the raw allocator so that this logic is tested without a GPU.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use cudarc::driver::{CudaContext, result, sys::CUdeviceptr};

/// Raw device allocations: what the pool asks of the driver.
pub trait RawAlloc: Send + Sync {
    /// `bytes` of device memory, or the driver's reason.
    fn malloc(&self, bytes: usize) -> Result<CUdeviceptr, String>;
    /// Give back an allocation of `malloc`.
    fn free(&self, ptr: CUdeviceptr);
}

/// The CUDA driver on one context.
pub struct Driver(pub Arc<CudaContext>);

impl RawAlloc for Driver {
    fn malloc(&self, bytes: usize) -> Result<CUdeviceptr, String> {
        self.0.bind_to_thread().map_err(|e| format!("{e:?}"))?;
        // SAFETY: a plain device allocation, freed by `free`.
        unsafe { result::malloc_sync(bytes) }.map_err(|e| format!("{e:?}"))
    }
    fn free(&self, ptr: CUdeviceptr) {
        let _ = self.0.bind_to_thread();
        // SAFETY: `ptr` came from `malloc` and no live buffer holds it.
        let _ = unsafe { result::free_sync(ptr) };
    }
}

/// A failed allocation, with what the pool held at the time.
#[derive(Clone, Debug)]
pub struct OutOfMemory {
    /// Bytes asked for, and the size class that was to be allocated for them.
    pub bytes: usize,
    pub class: usize,
    /// Bytes in live buffers, and held from the driver (live + cached), when it failed.
    pub in_use: usize,
    pub reserved: usize,
    /// Why: the pool's limit, or the driver's error.
    pub cause: String,
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "out of memory: {} bytes ({}) requested, {} bytes in live buffers, {} held from the \
             driver ({})",
            self.bytes,
            human(self.bytes),
            self.in_use,
            self.reserved,
            self.cause
        )
    }
}

/// `bytes` in MiB or GiB with two decimals, for messages.
pub fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    }
}

pub struct Pool<A: RawAlloc = Driver> {
    raw: A,
    free: Mutex<HashMap<usize, Vec<CUdeviceptr>>>,
    in_use: AtomicUsize,
    peak: AtomicUsize,
    reserved: AtomicUsize,
    /// At most this many bytes held from the driver (0: no limit but the device's).
    limit: AtomicUsize,
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

impl<A: RawAlloc> Pool<A> {
    pub fn new(raw: A) -> Self {
        Pool {
            raw,
            free: Mutex::new(HashMap::new()),
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            limit: AtomicUsize::new(0),
        }
    }

    /// Hold at most `bytes` from the driver (`None`: no limit but the device's): emulates a
    /// smaller device, and lets a test force an out-of-memory.
    pub fn set_limit(&self, bytes: Option<usize>) {
        self.limit.store(bytes.unwrap_or(0), Ordering::Relaxed);
    }

    /// A device allocation of at least `bytes` (its class returned with it), counted as `bytes`
    /// in use. On failure the cache is returned to the driver and the allocation tried once more.
    pub fn alloc(&self, bytes: usize) -> Result<(CUdeviceptr, usize), OutOfMemory> {
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
                let p = match self.fresh(class) {
                    Ok(p) => p,
                    Err(_) => {
                        self.trim();
                        self.fresh(class).map_err(|cause| OutOfMemory {
                            bytes,
                            class,
                            in_use: self.in_use(),
                            reserved: self.reserved(),
                            cause,
                        })?
                    }
                };
                self.reserved.fetch_add(class, Ordering::Relaxed);
                p
            }
        };
        let now = self.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Ok((ptr, class))
    }

    /// A new driver allocation of `class` bytes, within the limit.
    fn fresh(&self, class: usize) -> Result<CUdeviceptr, String> {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit > 0 && self.reserved() + class > limit {
            return Err(format!(
                "the pool's limit is {limit} bytes ({}), {} held",
                human(limit),
                self.reserved()
            ));
        }
        self.raw.malloc(class)
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
        for (class, ptrs) in free.drain() {
            for p in ptrs {
                self.raw.free(p);
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

impl<A: RawAlloc> Drop for Pool<A> {
    fn drop(&mut self) {
        self.trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pretend device of `capacity` bytes handing out increasing addresses.
    struct FakeDevice {
        capacity: usize,
        /// Live allocations by address, and the next address.
        state: Mutex<(HashMap<CUdeviceptr, usize>, CUdeviceptr)>,
    }
    impl FakeDevice {
        fn new(capacity: usize) -> Self {
            FakeDevice {
                capacity,
                state: Mutex::new((HashMap::new(), 1 << 20)),
            }
        }
    }
    impl RawAlloc for FakeDevice {
        fn malloc(&self, bytes: usize) -> Result<CUdeviceptr, String> {
            let mut s = self.state.lock().unwrap();
            if s.0.values().sum::<usize>() + bytes > self.capacity {
                return Err("CUDA_ERROR_OUT_OF_MEMORY".into());
            }
            let p = s.1;
            s.1 += bytes as u64;
            s.0.insert(p, bytes);
            Ok(p)
        }
        fn free(&self, ptr: CUdeviceptr) {
            self.state.lock().unwrap().0.remove(&ptr);
        }
    }

    const MIB: usize = 1 << 20;

    #[test]
    fn classes_round_small_requests_to_powers_of_two_and_large_ones_to_2_mib() {
        assert_eq!(class_of(1), 256);
        assert_eq!(class_of(3000), 4096);
        assert_eq!(class_of(MIB), MIB);
        assert_eq!(class_of(MIB + 1), 2 * MIB);
        assert_eq!(class_of(5 * MIB), 6 * MIB);
    }

    #[test]
    fn a_released_buffer_is_reused_and_counted_once() {
        let p = Pool::new(FakeDevice::new(100 * MIB));
        let (a, ca) = p.alloc(3 * MIB).unwrap();
        assert_eq!((p.in_use(), p.reserved()), (3 * MIB, 4 * MIB));
        p.release(a, ca, 3 * MIB);
        let (b, _) = p.alloc(4 * MIB).unwrap();
        assert_eq!(b, a, "same class: the cached allocation comes back");
        assert_eq!(
            (p.in_use(), p.reserved(), p.peak()),
            (4 * MIB, 4 * MIB, 4 * MIB)
        );
    }

    #[test]
    fn the_limit_fails_with_the_bytes_requested_and_held() {
        let p = Pool::new(FakeDevice::new(1 << 40));
        p.set_limit(Some(10 * MIB));
        let (_a, _) = p.alloc(6 * MIB).unwrap();
        let e = p.alloc(5 * MIB).unwrap_err();
        assert_eq!(
            (e.bytes, e.class, e.in_use, e.reserved),
            (5 * MIB, 6 * MIB, 6 * MIB, 6 * MIB)
        );
        let msg = e.to_string();
        for want in [
            "out of memory: 5242880 bytes (5.00 MiB) requested",
            "6291456 bytes in live buffers",
            "the pool's limit is 10485760 bytes (10.00 MiB), 6291456 held",
        ] {
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
        // Within the limit once the live buffer is gone: nothing leaked by the failure.
        assert_eq!(p.in_use(), 6 * MIB);
        p.set_limit(None);
        assert!(p.alloc(5 * MIB).is_ok());
    }

    #[test]
    fn the_cache_goes_back_to_the_driver_before_an_allocation_fails() {
        let p = Pool::new(FakeDevice::new(8 * MIB));
        let (a, ca) = p.alloc(6 * MIB).unwrap();
        p.release(a, ca, 6 * MIB);
        // 6 MiB cached + 4 MiB new > 8 MiB: the retry after trimming the cache succeeds.
        let (_b, cb) = p.alloc(4 * MIB).unwrap();
        assert_eq!((cb, p.reserved()), (4 * MIB, 4 * MIB));
        let e = p.alloc(6 * MIB).unwrap_err();
        assert!(e.cause.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{e}");
    }
}
