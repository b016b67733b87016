// Memory-level kernels of the backend: fill (poisoning in checks), dtype conversion/copy, add,
// scale, and the sum of squares behind gradient norms (per-block f64 partials, summed in a fixed
// order on the host or by `ul_clip_scale` in adamw.cu: deterministic).
#include "common.cuh"

extern "C" __global__ void ul_fill(void *p, int dt, i64 n, float v) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(p, dt, i, v);
}

// dst[i] = src[i] with conversion between the two dtypes.
extern "C" __global__ void ul_convert(const void *src, int dts, void *dst, int dtd, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(dst, dtd, i, ld(src, dts, i));
}

// dst[i] += src[i].
extern "C" __global__ void ul_add(void *dst, int dtd, const void *src, int dts, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(dst, dtd, i, ld(dst, dtd, i) + ld(src, dts, i));
}

extern "C" __global__ void ul_scale(void *p, int dt, i64 n, float s) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(p, dt, i, ld(p, dt, i) * s);
}

// partials[blockIdx.x] = Σ x² over this block's grid-stride share, in f64.
extern "C" __global__ void ul_sum_squares(const void *p, int dt, i64 n, double *partials) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        double x = ld(p, dt, i);
        acc += x * x;
    }
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// p[i] = scale · u, u uniform in [-1, 1) from a counter hash (splitmix64 of seed + i): random
// benchmark inputs made on the device (never time on zeros; no host RNG for gigabytes).
extern "C" __global__ void ul_fill_random(void *p, int dt, i64 n, unsigned long long seed,
                                          float scale) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        unsigned long long z = seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(i + 1);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 8388608.0f) - 1.0f;  // 24 bits -> [-1, 1)
        st(p, dt, i, u * scale);
    }
}
