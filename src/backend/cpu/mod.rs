//! The CPU reference backend: every kernel written plainly, generic over f32/f64, GEMMs through the
//! `gemm` crate, threads through rayon. It is the numerics oracle of the project: the CUDA kernels
//! and every parallel layout are tested against it.

pub mod attention;
pub mod kernels;

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backend::{AdamW, AttnShape, Backend, CeStats};
use crate::util::Real;

static BYTES_IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// A host buffer that counts itself in the backend's memory statistics.
#[derive(Debug)]
pub struct CpuBuf<T: Real> {
    data: Vec<T>,
}

impl<T: Real> CpuBuf<T> {
    fn from_vec(data: Vec<T>) -> Self {
        let bytes = data.len() * std::mem::size_of::<T>();
        let now = BYTES_IN_USE.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PEAK_BYTES.fetch_max(now, Ordering::Relaxed);
        CpuBuf { data }
    }
}

impl<T: Real> Drop for CpuBuf<T> {
    fn drop(&mut self) {
        BYTES_IN_USE.fetch_sub(
            self.data.len() * std::mem::size_of::<T>(),
            Ordering::Relaxed,
        );
    }
}

impl<T: Real> Clone for CpuBuf<T> {
    fn clone(&self) -> Self {
        CpuBuf::from_vec(self.data.clone())
    }
}

impl<T: Real> Deref for CpuBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.data
    }
}

impl<T: Real> DerefMut for CpuBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
}

/// The CPU backend in precision `T` (f32 for work, f64 for gradient checks).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend<T: Real> {
    _t: PhantomData<T>,
}

impl<T: Real> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend { _t: PhantomData }
    }
}

impl<T: Real> Backend for CpuBackend<T> {
    type Buf = CpuBuf<T>;
    type Host = T;

    fn name(&self) -> String {
        format!("cpu-{}", T::NAME)
    }

    fn zeros(&self, n: usize) -> CpuBuf<T> {
        CpuBuf::from_vec(vec![T::zero(); n])
    }
    fn len(&self, b: &CpuBuf<T>) -> usize {
        b.data.len()
    }
    fn upload(&self, host: &[f32]) -> CpuBuf<T> {
        CpuBuf::from_vec(host.iter().map(|&x| T::of(x as f64)).collect())
    }
    fn download(&self, b: &CpuBuf<T>) -> Vec<f32> {
        b.data.iter().map(|&x| x.as_f64() as f32).collect()
    }
    fn upload_f64(&self, host: &[f64]) -> CpuBuf<T> {
        CpuBuf::from_vec(host.iter().map(|&x| T::of(x)).collect())
    }
    fn download_f64(&self, b: &CpuBuf<T>) -> Vec<f64> {
        b.data.iter().map(|&x| x.as_f64()).collect()
    }
    fn fill_zero(&self, b: &mut CpuBuf<T>) {
        b.data.fill(T::zero());
    }
    fn read_host(&self, b: &CpuBuf<T>, off: usize, out: &mut [T]) {
        out.copy_from_slice(&b.data[off..off + out.len()]);
    }
    fn write_host(&self, b: &mut CpuBuf<T>, off: usize, data: &[T]) {
        b.data[off..off + data.len()].copy_from_slice(data);
    }
    fn add_at(
        &self,
        dst: &mut CpuBuf<T>,
        dst_off: usize,
        src: &CpuBuf<T>,
        src_off: usize,
        n: usize,
    ) {
        kernels::add_assign(
            &mut dst.data[dst_off..dst_off + n],
            &src.data[src_off..src_off + n],
        );
    }
    fn copy(&self, src: &CpuBuf<T>, src_off: usize, dst: &mut CpuBuf<T>, dst_off: usize, n: usize) {
        dst.data[dst_off..dst_off + n].copy_from_slice(&src.data[src_off..src_off + n]);
    }
    fn bytes_in_use(&self) -> usize {
        BYTES_IN_USE.load(Ordering::Relaxed)
    }
    fn peak_bytes(&self) -> usize {
        PEAK_BYTES.load(Ordering::Relaxed)
    }

    fn add_assign(&self, dst: &mut CpuBuf<T>, src: &CpuBuf<T>) {
        kernels::add_assign(&mut dst.data, &src.data);
    }
    fn scale(&self, b: &mut CpuBuf<T>, s: f64) {
        kernels::scale(&mut b.data, T::of(s));
    }
    fn sum_squares(&self, b: &CpuBuf<T>) -> f64 {
        kernels::sum_squares(&b.data)
    }

    fn gemm(
        &self,
        c: &mut CpuBuf<T>,
        c_off: usize,
        a: &CpuBuf<T>,
        a_off: usize,
        b: &CpuBuf<T>,
        b_off: usize,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) {
        kernels::gemm(
            &mut c.data[c_off..c_off + m * n],
            &a.data[a_off..a_off + m * k],
            &b.data[b_off..b_off + k * n],
            m,
            n,
            k,
            trans_a,
            trans_b,
            accumulate,
        );
    }

    fn embedding_forward(&self, table: &CpuBuf<T>, ids: &[u32], dim: usize, out: &mut CpuBuf<T>) {
        kernels::embedding_forward(&table.data, ids, dim, &mut out.data);
    }
    fn embedding_backward(
        &self,
        dtable: &mut CpuBuf<T>,
        ids: &[u32],
        dim: usize,
        dout: &CpuBuf<T>,
    ) {
        kernels::embedding_backward(&mut dtable.data, ids, dim, &dout.data);
    }

    fn rmsnorm_forward(
        &self,
        x: &CpuBuf<T>,
        w: &CpuBuf<T>,
        eps: f64,
        rows: usize,
        dim: usize,
        out: &mut CpuBuf<T>,
        rstd: &mut CpuBuf<T>,
    ) {
        kernels::rmsnorm_forward(
            &x.data,
            &w.data,
            eps,
            rows,
            dim,
            &mut out.data,
            &mut rstd.data,
        );
    }
    fn rmsnorm_backward(
        &self,
        dout: &CpuBuf<T>,
        x: &CpuBuf<T>,
        w: &CpuBuf<T>,
        rstd: &CpuBuf<T>,
        rows: usize,
        dim: usize,
        dx: &mut CpuBuf<T>,
        dw: &mut CpuBuf<T>,
    ) {
        kernels::rmsnorm_backward(
            &dout.data,
            &x.data,
            &w.data,
            &rstd.data,
            rows,
            dim,
            &mut dx.data,
            &mut dw.data,
        );
    }

    fn rope_forward(
        &self,
        x: &mut CpuBuf<T>,
        cos: &CpuBuf<T>,
        sin: &CpuBuf<T>,
        rows: usize,
        heads: usize,
        head_dim: usize,
    ) {
        kernels::rope_rotate(
            &mut x.data,
            &cos.data,
            &sin.data,
            rows,
            heads,
            head_dim,
            false,
        );
    }
    fn rope_backward(
        &self,
        dx: &mut CpuBuf<T>,
        cos: &CpuBuf<T>,
        sin: &CpuBuf<T>,
        rows: usize,
        heads: usize,
        head_dim: usize,
    ) {
        kernels::rope_rotate(
            &mut dx.data,
            &cos.data,
            &sin.data,
            rows,
            heads,
            head_dim,
            true,
        );
    }

    fn attention_forward(
        &self,
        q: &CpuBuf<T>,
        k: &CpuBuf<T>,
        v: &CpuBuf<T>,
        shape: &AttnShape,
        scale: f64,
        out: &mut CpuBuf<T>,
        lse: &mut CpuBuf<T>,
    ) {
        attention::attention_forward(
            &q.data,
            &k.data,
            &v.data,
            shape,
            T::of(scale),
            &mut out.data,
            &mut lse.data,
        );
    }
    fn attention_backward(
        &self,
        q: &CpuBuf<T>,
        k: &CpuBuf<T>,
        v: &CpuBuf<T>,
        out: &CpuBuf<T>,
        dout: &CpuBuf<T>,
        lse: &CpuBuf<T>,
        shape: &AttnShape,
        scale: f64,
        dq: &mut CpuBuf<T>,
        dk: &mut CpuBuf<T>,
        dv: &mut CpuBuf<T>,
    ) {
        attention::attention_backward(
            &q.data,
            &k.data,
            &v.data,
            &out.data,
            &dout.data,
            &lse.data,
            shape,
            T::of(scale),
            &mut dq.data,
            &mut dk.data,
            &mut dv.data,
        );
    }

    fn swiglu_forward(&self, gate: &CpuBuf<T>, up: &CpuBuf<T>, out: &mut CpuBuf<T>) {
        kernels::swiglu_forward(&gate.data, &up.data, &mut out.data);
    }
    fn swiglu_backward(
        &self,
        gate: &CpuBuf<T>,
        up: &CpuBuf<T>,
        dout: &CpuBuf<T>,
        dgate: &mut CpuBuf<T>,
        dup: &mut CpuBuf<T>,
    ) {
        kernels::swiglu_backward(
            &gate.data,
            &up.data,
            &dout.data,
            &mut dgate.data,
            &mut dup.data,
        );
    }

    fn cross_entropy_stats(
        &self,
        logits: &CpuBuf<T>,
        targets: &[i32],
        vocab: usize,
    ) -> Vec<CeStats> {
        kernels::cross_entropy_stats(&logits.data, targets, vocab)
    }
    fn cross_entropy_grad(
        &self,
        logits: &mut CpuBuf<T>,
        targets: &[i32],
        vocab: usize,
        max: &[f64],
        sum: &[f64],
        grad_scale: f64,
    ) {
        kernels::cross_entropy_grad(&mut logits.data, targets, vocab, max, sum, grad_scale)
    }
    fn attention_merge(
        &self,
        out: &mut CpuBuf<T>,
        lse: &mut CpuBuf<T>,
        out_b: &CpuBuf<T>,
        lse_b: &CpuBuf<T>,
        row0: usize,
        rows: usize,
        q_len: usize,
        heads: usize,
        head_dim: usize,
    ) {
        kernels::attention_merge(
            &mut out.data,
            &mut lse.data,
            &out_b.data,
            &lse_b.data,
            row0,
            rows,
            q_len,
            heads,
            head_dim,
        )
    }
    fn adamw(
        &self,
        param: &mut CpuBuf<T>,
        grad: &CpuBuf<T>,
        m: &mut CpuBuf<T>,
        v: &mut CpuBuf<T>,
        hp: &AdamW,
    ) {
        kernels::adamw(&mut param.data, &grad.data, &mut m.data, &mut v.data, hp);
    }
}
