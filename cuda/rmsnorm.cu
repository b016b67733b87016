// RMSNorm forward and backward (Llama: y = x / sqrt(mean(x²) + eps) · w), fp32 arithmetic.
// Forward: one block per row. Backward: dx per row (one block per row, +=); dw deterministic in
// two passes: per-chunk column sums into an fp32 scratch [chunks, dim], then a fixed-order sum
// over chunks added into dw (`ul_colsum_add`).
#include "common.cuh"

extern "C" __global__ void ul_rmsnorm_fwd(const void *x, int dtx, const void *w, int dtw, float eps,
                                          int rows, int dim, void *out, int dto, void *rstd,
                                          int dtr) {
    __shared__ double scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    i64 base = (i64)r * dim;
    double acc = 0.0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = ld(x, dtx, base + i);
        acc += (double)(v * v);
    }
    acc = block_sum_d(acc, scratch);
    float rs = (float)(1.0 / sqrt(acc / dim + (double)eps));
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        st(out, dto, base + i, ld(x, dtx, base + i) * rs * ld(w, dtw, i));
    if (threadIdx.x == 0) st(rstd, dtr, r, rs);
}

// dx[r, :] += rstd·w·g − rstd³·(Σ g·w·x)/dim · x.
extern "C" __global__ void ul_rmsnorm_bwd_dx(const void *dout, int dtg, const void *x, int dtx,
                                             const void *w, int dtw, const void *rstd, int dtr,
                                             int rows, int dim, void *dx, int dtdx) {
    __shared__ double scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    i64 base = (i64)r * dim;
    double acc = 0.0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        acc += (double)(ld(dout, dtg, base + i) * ld(w, dtw, i) * ld(x, dtx, base + i));
    acc = block_sum_d(acc, scratch);
    float rs = ld(rstd, dtr, r);
    float c = (float)((double)rs * rs * rs * acc / dim);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = rs * ld(w, dtw, i) * ld(dout, dtg, base + i) - c * ld(x, dtx, base + i);
        st(dx, dtdx, base + i, ld(dx, dtdx, base + i) + v);
    }
}

// partial[chunk, i] = Σ_{rows r of chunk} g[r,i]·x[r,i]·rstd[r]; grid (chunks, ceil(dim/blockDim)).
extern "C" __global__ void ul_rmsnorm_bwd_dw_partial(const void *dout, int dtg, const void *x,
                                                     int dtx, const void *rstd, int dtr, int rows,
                                                     int dim, int chunk_rows, float *partial) {
    int i = blockIdx.y * blockDim.x + threadIdx.x;
    int chunk = blockIdx.x;
    if (i >= dim) return;
    int r0 = chunk * chunk_rows, r1 = min(rows, r0 + chunk_rows);
    float acc = 0.f;
    for (int r = r0; r < r1; ++r) {
        i64 o = (i64)r * dim + i;
        acc += ld(dout, dtg, o) * ld(x, dtx, o) * ld(rstd, dtr, r);
    }
    partial[(i64)chunk * dim + i] = acc;
}

// out[i] += Σ_c partial[c, i], c in order.
extern "C" __global__ void ul_colsum_add(const float *partial, int chunks, int dim, void *out,
                                         int dto) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= dim) return;
    float acc = 0.f;
    for (int c = 0; c < chunks; ++c) acc += partial[(i64)c * dim + i];
    st(out, dto, i, ld(out, dto, i) + acc);
}

// bf16 fast path of the forward (x, w, out bf16; dim % 8 == 0): the row is read once into
// registers (at most UL_RMS_MAXV vectors per thread), so x crosses memory once.
#define UL_RMS_MAXV 4
extern "C" __global__ void ul_rmsnorm_fwd_bf16x8(const uint4 *x, const uint4 *w, float eps,
                                                 int rows, int dim, uint4 *out, void *rstd,
                                                 int dtr) {
    __shared__ double scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    int d8 = dim / 8;
    i64 base = (i64)r * d8;
    float v[UL_RMS_MAXV][8];
    double acc = 0.0;
#pragma unroll
    for (int u = 0; u < UL_RMS_MAXV; ++u) {
        int i = threadIdx.x + u * blockDim.x;
        if (i < d8) {
            unpack8(x[base + i], v[u]);
            float part = 0.f;
#pragma unroll
            for (int k = 0; k < 8; ++k) part += v[u][k] * v[u][k];
            acc += part;
        }
    }
    acc = block_sum_d(acc, scratch);
    float rs = (float)(1.0 / sqrt(acc / dim + (double)eps));
#pragma unroll
    for (int u = 0; u < UL_RMS_MAXV; ++u) {
        int i = threadIdx.x + u * blockDim.x;
        if (i < d8) {
            float wv[8], o[8];
            unpack8(w[i], wv);
#pragma unroll
            for (int k = 0; k < 8; ++k) o[k] = v[u][k] * rs * wv[k];
            out[base + i] = pack8(o);
        }
    }
    if (threadIdx.x == 0) st(rstd, dtr, r, rs);
}
