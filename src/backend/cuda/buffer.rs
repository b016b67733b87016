//! Device buffers of the CUDA backend: the element type (`DType`), the buffer (`CudaBuf`, memory
//! from the pool, returned when dropped), allocation, host transfers in f32 and in raw bytes, and
//! the bf16/f32 views a kernel that reads one type takes of a buffer of the other.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use half::bf16;

use super::CudaBackend;
use super::pool::{OutOfMemory, Pool};

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
    pub(super) ptr: CUdeviceptr,
    pub(super) len: usize,
    pub(super) dtype: DType,
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
    pub(super) fn at(&self, off: usize) -> CUdeviceptr {
        assert!(
            off <= self.len,
            "offset {off} past a buffer of {}",
            self.len
        );
        self.ptr + (off * self.dtype.size()) as u64
    }
    pub(super) fn bytes(&self) -> usize {
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

/// An uninitialised buffer of `n` elements of `dtype` from `pool`.
pub(super) fn pool_buffer(
    pool: &Arc<Pool>,
    n: usize,
    dtype: DType,
) -> Result<CudaBuf, OutOfMemory> {
    let (ptr, class) = if n == 0 {
        (0, 0)
    } else {
        pool.alloc(n * dtype.size())?
    };
    Ok(CudaBuf {
        ptr,
        len: n,
        dtype,
        class,
        pool: pool.clone(),
    })
}

impl CudaBackend {
    /// An uninitialised buffer of `n` elements of `dtype`, or an error naming `what`, the bytes
    /// and the device.
    pub fn try_alloc(&self, n: usize, dtype: DType, what: &str) -> anyhow::Result<CudaBuf> {
        pool_buffer(&self.pool, n, dtype).map_err(|e| {
            anyhow::anyhow!(
                "allocating {what} ({n} x {dtype:?}) on {}: {e}",
                self.device_label()
            )
        })
    }

    /// An uninitialised buffer of `n` elements of `dtype`. A failed allocation is recorded
    /// (`Backend::check`) naming the caller's source line (the buffer: through `#[track_caller]`
    /// on `Backend::zeros`/`upload` it is the model's line that asked); the buffer returned then
    /// holds no memory, which is safe because every launch and copy is skipped from then on.
    #[track_caller]
    pub fn alloc(&self, n: usize, dtype: DType) -> CudaBuf {
        let at = std::panic::Location::caller();
        let what = format!("the buffer made at {}:{}", at.file(), at.line());
        self.try_alloc(n, dtype, &what).unwrap_or_else(|e| {
            self.fail(|| format!("{e:#}"));
            CudaBuf {
                ptr: 0,
                len: n,
                dtype,
                class: 0,
                pool: self.pool.clone(),
            }
        })
    }

    /// `zeros_dtype` for a buffer named by the caller (named in an out-of-memory).
    pub fn zeros_named_dtype(&self, n: usize, dtype: DType, name: &str) -> CudaBuf {
        let b = self
            .try_alloc(n, dtype, &format!("buffer {name}"))
            .unwrap_or_else(|e| {
                self.fail(|| format!("{e:#}"));
                CudaBuf {
                    ptr: 0,
                    len: n,
                    dtype,
                    class: 0,
                    pool: self.pool.clone(),
                }
            });
        self.memset_zero(b.ptr, b.bytes());
        b
    }

    #[track_caller]
    pub fn zeros_dtype(&self, n: usize, dtype: DType) -> CudaBuf {
        let b = self.alloc(n, dtype);
        self.memset_zero(b.ptr, b.bytes());
        b
    }

    #[track_caller]
    pub fn upload_dtype(&self, host: &[f32], dtype: DType) -> CudaBuf {
        let mut b = self.alloc(host.len(), dtype);
        self.write_f32(&mut b, 0, host);
        b
    }

    /// Bytes of plain data (indices, tables) in a temporary device buffer.
    #[track_caller]
    pub(super) fn upload_raw<T: bytemuck::Pod>(&self, host: &[T]) -> CudaBuf {
        let bytes: &[u8] = bytemuck::cast_slice(host);
        let b = self.alloc(bytes.len().div_ceil(4), DType::F32);
        if !bytes.is_empty() {
            self.htod(b.ptr, bytes);
        }
        b
    }

    pub(super) fn download_raw<T: bytemuck::Pod + Default + Clone>(
        &self,
        b: &CudaBuf,
        n: usize,
    ) -> Vec<T> {
        let mut out = vec![T::default(); n];
        if n > 0 {
            self.dtoh(bytemuck::cast_slice_mut(&mut out), b.ptr);
        }
        out
    }

    pub(super) fn write_f32(&self, b: &mut CudaBuf, off: usize, data: &[f32]) {
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

    pub(super) fn read_f32(&self, b: &CudaBuf, off: usize, out: &mut [f32]) {
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

    /// A bf16 view of `b[off .. off+n]`: the buffer itself if bf16, else a rounded copy.
    pub(super) fn bf16_operand(
        &self,
        b: &CudaBuf,
        off: usize,
        n: usize,
    ) -> (CUdeviceptr, Option<CudaBuf>) {
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

    /// `b` as an fp32 device pointer: itself, or a converted copy.
    pub(super) fn f32_operand(&self, b: &CudaBuf) -> (CUdeviceptr, Option<CudaBuf>) {
        if b.dtype == DType::F32 {
            return (b.ptr, None);
        }
        let t = self.alloc(b.len, DType::F32);
        self.convert(b.ptr, b.dtype, t.ptr, DType::F32, b.len);
        (t.ptr, Some(t))
    }

    /// `b` in `dtype`: `None` if it already is, else a converted copy (for kernels that read
    /// several operands with one dtype code).
    pub(super) fn in_dtype(&self, b: &CudaBuf, dtype: DType) -> Option<CudaBuf> {
        (b.dtype != dtype).then(|| {
            let t = self.alloc(b.len, dtype);
            self.convert(b.ptr, b.dtype, t.ptr, dtype, b.len);
            t
        })
    }
}
