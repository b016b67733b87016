// AdamW (decoupled weight decay, bias correction with step counted from 1), fp32 arithmetic on
// fp32 master weights and moments; the gradient may be bf16 or fp32.
//
// `ul_adamw` updates one tensor. `ul_adamw_multi` updates every tensor of a model in one launch
// (multi-tensor apply): a table of tensors and a per-block map (tensor, first element) built once
// on the host; `ul_sum_squares_multi` gives per-block f64 partials of Σg² over the same map, and
// `ul_clip_scale` turns them into the global norm and the factor
// pre_scale · min(1, max_norm / (norm + 1e-6)) (torch's clip_grad_norm_), written to device memory
// and read by `ul_adamw_multi`, so norm, clipping and update need no host round trip.
#include "common.cuh"

struct UlTensor {
    unsigned long long param, grad, m, v;  // device pointers
    i64 n;
    int dt_param, dt_grad, dt_m, dt_v;
    float weight_decay;  // per tensor: norm weights get none
    int pad;
};

struct UlAdamHp {
    float lr, beta1, beta2, eps, bc1, bc2_sqrt;
};

__device__ __forceinline__ void adamw_one(void *p, int dtp, const void *g, int dtg, void *m, int dtm,
                                          void *v, int dtv, i64 i, UlAdamHp hp, float wd, float gs) {
    float gi = ld(g, dtg, i) * gs;
    float mi = hp.beta1 * ld(m, dtm, i) + (1.f - hp.beta1) * gi;
    float vi = hp.beta2 * ld(v, dtv, i) + (1.f - hp.beta2) * gi * gi;
    st(m, dtm, i, mi);
    st(v, dtv, i, vi);
    float denom = sqrtf(vi) / hp.bc2_sqrt + hp.eps;
    float pi = ld(p, dtp, i) * (1.f - hp.lr * wd) - (hp.lr / hp.bc1) * mi / denom;
    st(p, dtp, i, pi);
}

extern "C" __global__ void ul_adamw(void *p, int dtp, const void *g, int dtg, void *m, int dtm,
                                    void *v, int dtv, i64 n, UlAdamHp hp, float weight_decay,
                                    float grad_scale) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        adamw_one(p, dtp, g, dtg, m, dtm, v, dtv, i, hp, weight_decay, grad_scale);
}

// Block b handles elements [block_start[b], block_start[b] + chunk) of tensor block_tensor[b].
extern "C" __global__ void ul_adamw_multi(const UlTensor *tensors, const int *block_tensor,
                                          const i64 *block_start, int chunk, UlAdamHp hp,
                                          const float *grad_scale) {
    const UlTensor t = tensors[block_tensor[blockIdx.x]];
    i64 s = block_start[blockIdx.x];
    i64 e = min(t.n, s + chunk);
    float gs = *grad_scale;
    for (i64 i = s + threadIdx.x; i < e; i += blockDim.x)
        adamw_one((void *)t.param, t.dt_param, (const void *)t.grad, t.dt_grad, (void *)t.m, t.dt_m,
                  (void *)t.v, t.dt_v, i, hp, t.weight_decay, gs);
}

extern "C" __global__ void ul_sum_squares_multi(const UlTensor *tensors, const int *block_tensor,
                                                const i64 *block_start, int chunk,
                                                double *partials) {
    __shared__ double scratch[32];
    const UlTensor t = tensors[block_tensor[blockIdx.x]];
    i64 s = block_start[blockIdx.x];
    i64 e = min(t.n, s + chunk);
    double acc = 0.0;
    for (i64 i = s + threadIdx.x; i < e; i += blockDim.x) {
        double x = ld((const void *)t.grad, t.dt_grad, i);
        acc += x * x;
    }
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// One block: norm = sqrt(Σ partials) (fixed order), scale = pre_scale·min(1, max_norm/(norm+1e-6))
// (max_norm <= 0: no clipping). out_norm[0] = norm (of the pre-scaled gradient).
extern "C" __global__ void ul_clip_scale(const double *partials, int n, float pre_scale,
                                         float max_norm, float *out_scale, double *out_norm) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) {
        double norm = sqrt(acc) * pre_scale;
        double clip = (max_norm > 0.f) ? fmin(1.0, max_norm / (norm + 1e-6)) : 1.0;
        out_scale[0] = (float)(pre_scale * clip);
        out_norm[0] = norm;
    }
}

// fp32 fast path of the single-tensor update (all four tensors fp32, n % 4 == 0): float4 loads.
extern "C" __global__ void ul_adamw_f32x4(float4 *p, const float4 *g, float4 *m, float4 *v, i64 n4,
                                          UlAdamHp hp, float weight_decay, float grad_scale) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n4; i += (i64)gridDim.x * blockDim.x) {
        float4 P = p[i], G = g[i], M = m[i], V = v[i];
        float *pp = &P.x, *gg = &G.x, *mm = &M.x, *vv = &V.x;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            float gi = gg[k] * grad_scale;
            mm[k] = hp.beta1 * mm[k] + (1.f - hp.beta1) * gi;
            vv[k] = hp.beta2 * vv[k] + (1.f - hp.beta2) * gi * gi;
            float denom = sqrtf(vv[k]) / hp.bc2_sqrt + hp.eps;
            pp[k] = pp[k] * (1.f - hp.lr * weight_decay) - (hp.lr / hp.bc1) * mm[k] / denom;
        }
        p[i] = P;
        m[i] = M;
        v[i] = V;
    }
}
