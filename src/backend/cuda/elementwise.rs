//! Launchers of cuda/elementwise.cu: fill (a value, or device-made random numbers), dtype
//! conversion and copy, `dst += src`, scaling, and Σx² in f64 (one partial per block, summed on
//! the host in order, so the result does not depend on timing).

use cudarc::driver::sys::CUdeviceptr;

use super::{CudaBackend, CudaBuf, DType};

impl CudaBackend {
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

    /// `dst[..n] = src[..n]` between device addresses, converting dtypes.
    pub(super) fn convert(
        &self,
        src: CUdeviceptr,
        dts: DType,
        dst: CUdeviceptr,
        dtd: DType,
        n: usize,
    ) {
        if n == 0 {
            return;
        }
        if dts == dtd {
            self.memcpy_dtod(dst, src, n * dts.size());
            return;
        }
        let cfg = self.grid1d(n);
        launch!(self, "ul_convert", cfg; src, dts.code(), dst, dtd.code(), n as i64);
    }

    /// Σ over f64 partials of one block each, summed on the host in order.
    pub(super) fn sum_squares_at(&self, ptr: CUdeviceptr, dtype: DType, n: usize) -> f64 {
        if n == 0 {
            return 0.0;
        }
        let cfg = self.grid1d(n);
        let blocks = cfg.grid_dim.0 as usize;
        let partials = self.alloc(blocks * 2, DType::F32);
        launch!(self, "ul_sum_squares", cfg; ptr, dtype.code(), n as i64, partials.ptr);
        self.download_raw::<f64>(&partials, blocks).iter().sum()
    }
}

/// `Backend::copy`.
pub(super) fn copy(
    b: &CudaBackend,
    src: &CudaBuf,
    src_off: usize,
    dst: &mut CudaBuf,
    dst_off: usize,
    n: usize,
) {
    assert!(
        src_off + n <= src.len && dst_off + n <= dst.len,
        "copy of {n}: src {src_off}/{} dst {dst_off}/{}",
        src.len,
        dst.len
    );
    b.convert(src.at(src_off), src.dtype, dst.at(dst_off), dst.dtype, n);
}

/// `Backend::add_at`: `dst[dst_off..][..n] += src[src_off..][..n]`.
pub(super) fn add_at(
    b: &CudaBackend,
    dst: &mut CudaBuf,
    dst_off: usize,
    src: &CudaBuf,
    src_off: usize,
    n: usize,
) {
    assert!(
        src_off + n <= src.len && dst_off + n <= dst.len,
        "add_at out of range"
    );
    if n == 0 {
        return;
    }
    let cfg = b.grid1d(n);
    launch!(b, "ul_add", cfg; dst.at(dst_off), dst.dtype.code(), src.at(src_off),
        src.dtype.code(), n as i64);
}

/// `Backend::scale`: `x *= s`.
pub(super) fn scale(b: &CudaBackend, x: &mut CudaBuf, s: f64) {
    if x.len == 0 {
        return;
    }
    let cfg = b.grid1d(x.len);
    launch!(b, "ul_scale", cfg; x.ptr, x.dtype.code(), x.len as i64, s as f32);
}
