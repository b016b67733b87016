// Vocabulary-parallel cross-entropy on one chunk of LM-head logits [rows, vocab] (src/model/llama.rs
// computes the chunk with a GEMM, takes each row's statistics over its vocabulary shard, combines
// them across the shard group, writes the gradient in place and consumes it with two GEMMs before
// the next chunk: never more than one chunk of logits alive). One block per row; max and Σexp in
// fp32 per thread, combined in f64.
//
// Targets: ≥ 0 an index into this row's vocabulary (shard); -1 ignored (zero gradient, no loss);
// -2 counted but the target lives on another vocabulary shard.
#include "common.cuh"

// stats[r] = (max, Σ exp(z − max), target logit, has_target) over this shard's row.
extern "C" __global__ void ul_ce_stats(const void *logits, int dt, const int *targets, int rows,
                                       int vocab, double *stats) {
    __shared__ double dscratch[32];
    __shared__ float fscratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    i64 base = (i64)r * vocab;
    int tgt = targets[r];
    if (tgt == -1) {
        if (threadIdx.x == 0)
            for (int q = 0; q < 4; ++q) stats[4 * r + q] = 0.0;
        return;
    }
    float m = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, ld(logits, dt, base + j));
    m = block_max(m, fscratch);
    float part = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) part += expf(ld(logits, dt, base + j) - m);
    double sum = block_sum_d((double)part, dscratch);
    if (threadIdx.x == 0) {
        stats[4 * r + 0] = m;
        stats[4 * r + 1] = sum;
        stats[4 * r + 2] = tgt >= 0 ? (double)ld(logits, dt, base + tgt) : 0.0;
        stats[4 * r + 3] = tgt >= 0 ? 1.0 : 0.0;
    }
}

// logits ← grad_scale · (exp(z − max[r]) / sum[r] − [j = target]) with the global max and sum.
extern "C" __global__ void ul_ce_grad(void *logits, int dt, const int *targets, int rows, int vocab,
                                      const double *maxv, const double *sumv, float grad_scale) {
    int r = blockIdx.x;
    if (r >= rows) return;
    i64 base = (i64)r * vocab;
    int tgt = targets[r];
    if (tgt == -1) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) st(logits, dt, base + j, 0.f);
        return;
    }
    float m = (float)maxv[r];
    float k = (float)((double)grad_scale / sumv[r]);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float g = expf(ld(logits, dt, base + j) - m) * k;
        if (j == tgt) g -= grad_scale;
        st(logits, dt, base + j, g);
    }
}
