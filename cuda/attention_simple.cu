// A simple, correct causal GQA attention (forward, backward, ring merge): one warp per (head, query
// row) with an online softmax over its visible keys, fp32 arithmetic, no [q_len, kv_len] matrix.
// It is the stand-in until the tiled FlashAttention-style kernel of the attention issue lands; it
// is not fast (no tiling, no tensor cores) and is named so.
//
// Layouts as the Backend trait: q/out [q_len, n_q, d], k/v [kv_len, n_kv, d], lse [n_q, q_len]
// (−∞ for a row that sees no key; its output is 0). Causal: query i sees key j iff
// k_pos0 + j <= q_pos0 + i. GQA: query head h reads KV head h / (n_q / n_kv). head_dim <= 256.
#include "common.cuh"

#define UL_MAXU 8  // head_dim <= 32 * UL_MAXU

struct UlAttnShape {
    int q_len, kv_len, n_q, n_kv, d, causal;
    i64 q_pos0, k_pos0;
};

// Last visible key of query row i (−1: none).
__device__ __forceinline__ int last_key(const UlAttnShape &s, int i) {
    if (!s.causal) return s.kv_len - 1;
    i64 j = s.q_pos0 + i - s.k_pos0;
    if (j < 0) return -1;
    return (int)min(j, (i64)s.kv_len - 1);
}

// First query row that sees key j (q_len: none).
__device__ __forceinline__ int first_query(const UlAttnShape &s, int j) {
    if (!s.causal) return 0;
    i64 i = s.k_pos0 + j - s.q_pos0;
    if (i < 0) return 0;
    return (int)min(i, (i64)s.q_len);
}

__device__ __forceinline__ float dot_row(const float *a, const void *p, int dt, i64 base, int d,
                                         int lane) {
    float acc = 0.f;
#pragma unroll
    for (int u = 0; u < UL_MAXU; ++u) {
        int c = lane + 32 * u;
        if (c < d) acc += a[u] * ld(p, dt, base + c);
    }
    return warp_sum(acc);
}

__device__ __forceinline__ void load_row(float *a, const void *p, int dt, i64 base, int d,
                                         int lane) {
#pragma unroll
    for (int u = 0; u < UL_MAXU; ++u) {
        int c = lane + 32 * u;
        a[u] = c < d ? ld(p, dt, base + c) : 0.f;
    }
}

extern "C" __global__ void ul_attn_fwd(const void *q, const void *k, const void *v, int dt,
                                       UlAttnShape s, float scale, void *out, int dto, void *lse,
                                       int dtl) {
    int lane = threadIdx.x & 31;
    i64 w = blockIdx.x * (i64)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (w >= (i64)s.n_q * s.q_len) return;
    int h = (int)(w / s.q_len), i = (int)(w % s.q_len);
    int kvh = h / (s.n_q / s.n_kv);
    float qr[UL_MAXU], acc[UL_MAXU];
    load_row(qr, q, dt, ((i64)i * s.n_q + h) * s.d, s.d, lane);
#pragma unroll
    for (int u = 0; u < UL_MAXU; ++u) acc[u] = 0.f;
    float m = -INFINITY, l = 0.f;
    int jmax = last_key(s, i);
    for (int j = 0; j <= jmax; ++j) {
        i64 kb = ((i64)j * s.n_kv + kvh) * s.d;
        float sc = dot_row(qr, k, dt, kb, s.d, lane) * scale;
        float mn = fmaxf(m, sc);
        float corr = expf(m - mn), p = expf(sc - mn);
        l = l * corr + p;
#pragma unroll
        for (int u = 0; u < UL_MAXU; ++u) {
            int c = lane + 32 * u;
            acc[u] = acc[u] * corr + (c < s.d ? p * ld(v, dt, kb + c) : 0.f);
        }
        m = mn;
    }
    i64 ob = ((i64)i * s.n_q + h) * s.d;
#pragma unroll
    for (int u = 0; u < UL_MAXU; ++u) {
        int c = lane + 32 * u;
        if (c < s.d) st(out, dto, ob + c, jmax >= 0 ? acc[u] / l : 0.f);
    }
    if (lane == 0) st(lse, dtl, (i64)h * s.q_len + i, jmax >= 0 ? m + logf(l) : -INFINITY);
}

// dq for one (head, query row); also writes Di = dout·out to dsum [n_q, q_len] for ul_attn_bwd_dkdv.
extern "C" __global__ void ul_attn_bwd_dq(const void *q, const void *k, const void *v,
                                          const void *out, const void *dout, const void *lse,
                                          int dt, int dtl, UlAttnShape s, float scale, void *dq,
                                          int dtq, float *dsum) {
    int lane = threadIdx.x & 31;
    i64 w = blockIdx.x * (i64)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (w >= (i64)s.n_q * s.q_len) return;
    int h = (int)(w / s.q_len), i = (int)(w % s.q_len);
    int kvh = h / (s.n_q / s.n_kv);
    i64 rb = ((i64)i * s.n_q + h) * s.d;
    float qr[UL_MAXU], gr[UL_MAXU], acc[UL_MAXU];
    load_row(qr, q, dt, rb, s.d, lane);
    load_row(gr, dout, dt, rb, s.d, lane);
    float di = dot_row(gr, out, dt, rb, s.d, lane);
    if (lane == 0) dsum[(i64)h * s.q_len + i] = di;
#pragma unroll
    for (int u = 0; u < UL_MAXU; ++u) acc[u] = 0.f;
    float L = ld(lse, dtl, (i64)h * s.q_len + i);
    int jmax = L == -INFINITY ? -1 : last_key(s, i);
    for (int j = 0; j <= jmax; ++j) {
        i64 kb = ((i64)j * s.n_kv + kvh) * s.d;
        float p = expf(dot_row(qr, k, dt, kb, s.d, lane) * scale - L);
        float dp = dot_row(gr, v, dt, kb, s.d, lane);
        float ds = p * (dp - di) * scale;
#pragma unroll
        for (int u = 0; u < UL_MAXU; ++u) {
            int c = lane + 32 * u;
            if (c < s.d) acc[u] += ds * ld(k, dt, kb + c);
        }
    }
#pragma unroll
    for (int u = 0; u < UL_MAXU; ++u) {
        int c = lane + 32 * u;
        if (c < s.d) st(dq, dtq, rb + c, acc[u]);
    }
}

// dk, dv for one (KV head, key row): sums over the query heads of its group and the query rows
// that see the key, in a fixed order (deterministic, no atomics).
extern "C" __global__ void ul_attn_bwd_dkdv(const void *q, const void *k, const void *v,
                                            const void *dout, const void *lse, int dt, int dtl,
                                            UlAttnShape s, float scale, const float *dsum,
                                            void *dk, void *dv, int dtg) {
    int lane = threadIdx.x & 31;
    i64 w = blockIdx.x * (i64)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (w >= (i64)s.n_kv * s.kv_len) return;
    int kvh = (int)(w / s.kv_len), j = (int)(w % s.kv_len);
    int group = s.n_q / s.n_kv;
    i64 kb = ((i64)j * s.n_kv + kvh) * s.d;
    float kr[UL_MAXU], vr[UL_MAXU], dka[UL_MAXU], dva[UL_MAXU];
    load_row(kr, k, dt, kb, s.d, lane);
    load_row(vr, v, dt, kb, s.d, lane);
#pragma unroll
    for (int u = 0; u < UL_MAXU; ++u) dka[u] = dva[u] = 0.f;
    int i0 = first_query(s, j);
    for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
        for (int i = i0; i < s.q_len; ++i) {
            float L = ld(lse, dtl, (i64)h * s.q_len + i);
            if (L == -INFINITY) continue;
            i64 rb = ((i64)i * s.n_q + h) * s.d;
            float p = expf(dot_row(kr, q, dt, rb, s.d, lane) * scale - L);
            float dp = dot_row(vr, dout, dt, rb, s.d, lane);
            float ds = p * (dp - dsum[(i64)h * s.q_len + i]) * scale;
#pragma unroll
            for (int u = 0; u < UL_MAXU; ++u) {
                int c = lane + 32 * u;
                if (c < s.d) {
                    dva[u] += p * ld(dout, dt, rb + c);
                    dka[u] += ds * ld(q, dt, rb + c);
                }
            }
        }
    }
#pragma unroll
    for (int u = 0; u < UL_MAXU; ++u) {
        int c = lane + 32 * u;
        if (c < s.d) {
            st(dk, dtg, kb + c, dka[u]);
            st(dv, dtg, kb + c, dva[u]);
        }
    }
}

// Ring merge of a partial result (out_b [rows, heads, d], lse_b [heads, rows]) into rows
// row0 .. row0+rows of out [q_len, heads, d], lse [heads, q_len]:
// out −= σ(lse_b − lse)(out − out_b), lse = max + log1p(exp(min − max)). One thread per (row, head).
extern "C" __global__ void ul_attn_merge(void *out, int dto, void *lse, int dtl, const void *out_b,
                                         int dtob, const void *lse_b, int dtlb, int row0, int rows,
                                         int q_len, int heads, int d) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * heads) return;
    int r = idx / heads, h = idx % heads;
    i64 li = (i64)h * q_len + row0 + r;
    float a = ld(lse, dtl, li), b = ld(lse_b, dtlb, (i64)h * rows + r);
    if (b == -INFINITY) return;
    float wgt, nl;
    if (a == -INFINITY) {
        wgt = 1.f;
        nl = b;
    } else {
        wgt = 1.f / (1.f + expf(a - b));
        float hi = fmaxf(a, b), lo = fminf(a, b);
        nl = hi + log1pf(expf(lo - hi));
    }
    st(lse, dtl, li, nl);
    i64 ob = ((i64)(row0 + r) * heads + h) * d, bb = ((i64)r * heads + h) * d;
    for (int c = 0; c < d; ++c) {
        float x = ld(out, dto, ob + c);
        st(out, dto, ob + c, x - wgt * (x - ld(out_b, dtob, bb + c)));
    }
}
