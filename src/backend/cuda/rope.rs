//! Launchers of cuda/rope.cu: the cos/sin tables made on the device with exact angles (f64
//! product, two-part 2π reduction, f64 sincos: the device twin of `Rope::cos_sin` with
//! `RopePrecision::Exact`), and the rotation of `Backend::rope_forward`/`rope_backward` (HF's
//! half-split convention; the backward is the same kernel with the rotation transposed).

use super::{CudaBackend, CudaBuf, DType};

impl CudaBackend {
    /// Device cos/sin tables `[positions.len(), inv_freq.len()]` times `attention_factor`.
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
}

/// Rotate `x [rows, heads, head_dim]` in place by the angles of `cos`/`sin` `[rows, head_dim/2]`
/// (by their negatives when `transpose`: the backward).
#[allow(clippy::too_many_arguments)]
pub(super) fn rotate(
    b: &CudaBackend,
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
        let cfg = b.grid1d(n / 8);
        launch!(b, "ul_rope_rotate_bf16x8", cfg; x.ptr, cos.ptr, sin.ptr, rows as i32,
            heads as i32, half as i32, transpose as i32);
        return;
    }
    let cfg = b.grid1d(n);
    launch!(b, "ul_rope_rotate", cfg; x.ptr, x.dtype.code(), cos.ptr, sin.ptr,
        cos.dtype.code(), rows as i32, heads as i32, half as i32, transpose as i32);
}
