//! The `Backend` trait: where tensors live and how each kernel runs. The model code
//! (`model::layer`, `model::llama`) is written once against this trait; `cpu` is the numerics
//! oracle, a CUDA backend arrives with its own issue and is tested op by op against `cpu`.
//!
//! Conventions: buffers are flat, row-major; a "matrix [m, k]" is `m` rows of `k` contiguous
//! elements. Weights keep Hugging Face's layout `[out_features, in_features]`, so a projection is
//! `y = x · Wᵀ`. Every `*_backward` that produces a parameter gradient accumulates (`+=`) into it,
//! so gradient accumulation over micro-batches needs no extra buffers.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod select;
pub mod timed;

/// Shape of one attention call: queries `[q_len, n_q_heads, head_dim]` against keys/values
/// `[kv_len, n_kv_heads, head_dim]` (GQA: query head `h` reads KV head `h / (n_q_heads/n_kv_heads)`).
/// With `causal`, query row `i` sees key row `j` iff `k_pos0 + j <= q_pos0 + i`: the offsets let the
/// context-parallel ring reuse one kernel for its diagonal, full and half blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub q_len: usize,
    pub kv_len: usize,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub q_pos0: i64,
    pub k_pos0: i64,
    pub causal: bool,
}

/// One AdamW step's hyper-parameters (Loshchilov & Hutter: decoupled weight decay; Kingma & Ba:
/// bias correction with `step` counted from 1). `grad_scale` multiplies the gradient first
/// (global-norm clipping and loss normalisation folded into one factor).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
    pub grad_scale: f64,
}

/// One row's cross-entropy statistics over a vocabulary shard (see `cross_entropy_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CeStats {
    pub max: f64,
    pub sum: f64,
    pub target: Option<f64>,
}

/// Target code for a row that is not counted (loss mask 0, padding).
pub const TARGET_IGNORE: i32 = -1;
/// Target code for a counted row whose target token lives on another vocabulary shard.
pub const TARGET_ELSEWHERE: i32 = -2;
pub use cpu::kernels::NOT_IN_SHARD;

pub trait Backend: Sync + 'static {
    /// `'static` so a communicator can recognise its backend's buffers (`parallel::nccl`).
    type Buf: Send + Sync + 'static;
    /// The element type buffers are staged through on the host for communication.
    type Host: crate::util::elem::Elem;

    /// Human-readable name, e.g. "cpu-f32".
    fn name(&self) -> String;

    /// Where the step is (`timed::Annotation`): read by `timed::Timed` for its breakdown, and
    /// ignored by every other backend.
    fn annotate(&self, _a: timed::Annotation) {}

    // ---- memory -------------------------------------------------------------------------------
    fn zeros(&self, n: usize) -> Self::Buf;
    /// `zeros`, for a buffer the caller names (e.g. the workspace's "gate"): a backend that can
    /// fail to allocate (CUDA) names it, with its size, in the error `check` returns.
    fn zeros_named(&self, n: usize, _name: &str) -> Self::Buf {
        self.zeros(n)
    }
    fn len(&self, b: &Self::Buf) -> usize;
    fn upload(&self, host: &[f32]) -> Self::Buf;
    fn download(&self, b: &Self::Buf) -> Vec<f32>;
    fn upload_f64(&self, host: &[f64]) -> Self::Buf;
    fn download_f64(&self, b: &Self::Buf) -> Vec<f64>;
    fn fill_zero(&self, b: &mut Self::Buf);
    /// `dst[dst_off .. dst_off+n] = src[src_off .. src_off+n]`.
    fn copy(&self, src: &Self::Buf, src_off: usize, dst: &mut Self::Buf, dst_off: usize, n: usize);
    /// `out = b[off .. off + out.len()]` in the host staging type.
    fn read_host(&self, b: &Self::Buf, off: usize, out: &mut [Self::Host]);
    /// `b[off .. off + data.len()] = data`.
    fn write_host(&self, b: &mut Self::Buf, off: usize, data: &[Self::Host]);
    /// Bytes currently held by live buffers of this backend (for peak-memory reports).
    fn bytes_in_use(&self) -> usize;
    fn peak_bytes(&self) -> usize;
    /// The first device failure since this backend was made (an allocation, a kernel launch, a
    /// kernel's error found at a synchronisation), as an error naming the operation, its sizes or
    /// bytes and the device. The ops return no `Result`; a backend that can fail this way (CUDA)
    /// records the failure, skips the work that follows, and reads NaN, so callers check before
    /// they trust or save results (the trainer once per step). The CPU never fails this way.
    fn check(&self) -> anyhow::Result<()> {
        Ok(())
    }

    // ---- elementwise --------------------------------------------------------------------------
    /// `dst += src` (residual connections, gradient sums).
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf);
    /// `dst[dst_off .. dst_off+n] += src[src_off .. src_off+n]`.
    fn add_at(
        &self,
        dst: &mut Self::Buf,
        dst_off: usize,
        src: &Self::Buf,
        src_off: usize,
        n: usize,
    );
    fn scale(&self, b: &mut Self::Buf, s: f64);
    /// Σ b² in f64 (gradient norms).
    fn sum_squares(&self, b: &Self::Buf) -> f64;

    // ---- GEMM ---------------------------------------------------------------------------------
    /// `C[m, n] (+)= op(A) · op(B)` with `op(A) = A [m, k]` or, if `trans_a`, `Aᵀ` of `A [k, m]`;
    /// likewise `op(B) = B [k, n]` or `Bᵀ` of `B [n, k]`. Offsets are in elements.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        c: &mut Self::Buf,
        c_off: usize,
        a: &Self::Buf,
        a_off: usize,
        b: &Self::Buf,
        b_off: usize,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    );

    // ---- layers -------------------------------------------------------------------------------
    /// `out[t, :] = table[ids[t], :]`.
    fn embedding_forward(&self, table: &Self::Buf, ids: &[u32], dim: usize, out: &mut Self::Buf);
    /// `dtable[ids[t], :] += dout[t, :]`, summed in token order (deterministic).
    fn embedding_backward(&self, dtable: &mut Self::Buf, ids: &[u32], dim: usize, dout: &Self::Buf);

    /// `out = x / rms(x) * w` per row; saves `rstd = 1/sqrt(mean(x²)+eps)` per row.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        eps: f64,
        rows: usize,
        dim: usize,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
    );
    /// `dx += ∂L/∂x`, `dw += ∂L/∂w`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        rows: usize,
        dim: usize,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
    );

    /// Rotate `x [rows, heads, head_dim]` in place by HF's half-split convention:
    /// `(x₁, x₂) -> (x₁·cos − x₂·sin, x₂·cos + x₁·sin)` with `x₁ = x[..d/2]`, `x₂ = x[d/2..]`.
    /// `cos`/`sin` are `[rows, head_dim/2]` and already carry the attention factor.
    fn rope_forward(
        &self,
        x: &mut Self::Buf,
        cos: &Self::Buf,
        sin: &Self::Buf,
        rows: usize,
        heads: usize,
        head_dim: usize,
    );
    /// The transpose of `rope_forward` (rotation by −θ, times the same factor), in place on dx.
    fn rope_backward(
        &self,
        dx: &mut Self::Buf,
        cos: &Self::Buf,
        sin: &Self::Buf,
        rows: usize,
        heads: usize,
        head_dim: usize,
    );

    /// Softmax attention, blockwise with an online softmax (no `[q_len, kv_len]` matrix).
    /// `out [q_len, n_q_heads, head_dim]`; `lse [n_q_heads, q_len]` = log Σ exp(scale·q·k) per row
    /// (−∞ for a row that sees no key; its output row is 0).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: &AttnShape,
        scale: f64,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    );
    /// Gradients of `attention_forward`, recomputing probabilities from `lse`; `dq`, `dk`, `dv`
    /// are overwritten.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        dout: &Self::Buf,
        lse: &Self::Buf,
        shape: &AttnShape,
        scale: f64,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
    );

    /// `out = silu(gate) * up`.
    fn swiglu_forward(&self, gate: &Self::Buf, up: &Self::Buf, out: &mut Self::Buf);
    /// `dgate`, `dup` overwritten.
    fn swiglu_backward(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        dout: &Self::Buf,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
    );

    /// Vocabulary-parallel cross-entropy, pass 1: per row of `logits [rows, vocab]` (one shard
    /// of the vocabulary) its maximum, `Σ exp(z − max)` and, if `targets[r] >= 0` (a shard-local
    /// index), the target's logit. `TARGET_IGNORE` rows give zeros; `TARGET_ELSEWHERE` rows no
    /// target. The ranks of a shard group combine these into the global max and sum.
    fn cross_entropy_stats(
        &self,
        logits: &Self::Buf,
        targets: &[i32],
        vocab: usize,
    ) -> Vec<CeStats>;
    /// Pass 2: `logits ← grad_scale · (exp(z − max[r]) / sum[r] − [j = target])` with the
    /// global `max` and `sum` of each row; `TARGET_IGNORE` rows become 0.
    fn cross_entropy_grad(
        &self,
        logits: &mut Self::Buf,
        targets: &[i32],
        vocab: usize,
        max: &[f64],
        sum: &[f64],
        grad_scale: f64,
    );

    /// Merge a ring step's attention result (`out_b [rows, heads, d]`, `lse_b [heads, rows]`)
    /// into rows `row0 .. row0+rows` of the running `out [q_len, heads, d]`, `lse [heads, q_len]`
    /// with the overflow-free log-sum-exp form (docs/ARCHITECTURE.md).
    #[allow(clippy::too_many_arguments)]
    fn attention_merge(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        out_b: &Self::Buf,
        lse_b: &Self::Buf,
        row0: usize,
        rows: usize,
        q_len: usize,
        heads: usize,
        head_dim: usize,
    );

    /// In-place AdamW on one tensor; `m`, `v` are its first and second moments.
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        hp: &AdamW,
    );
}
