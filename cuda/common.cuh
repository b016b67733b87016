// Shared helpers of every kernel file: storage types, loads and stores through a run-time dtype,
// warp and block reductions.
//
// Every buffer of the CUDA backend carries its element type (src/backend/cuda/mod.rs, DType), so a
// kernel receives each pointer with a dtype code: UL_F32 or UL_BF16. The code is the same for every
// thread of a launch, so the branch in `ld`/`st` never diverges. Arithmetic is always fp32 (fp64
// where a comment says so); bf16 is storage only.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#define UL_F32 0
#define UL_BF16 1

typedef long long i64;

__device__ __forceinline__ float ld(const void *p, int dt, i64 i) {
    if (dt == UL_BF16) return __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[i]);
    return static_cast<const float *>(p)[i];
}

__device__ __forceinline__ void st(void *p, int dt, i64 i, float v) {
    if (dt == UL_BF16) {
        static_cast<__nv_bfloat16 *>(p)[i] = __float2bfloat16_rn(v);
    } else {
        static_cast<float *>(p)[i] = v;
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of at most 1024 threads (blockDim.x a multiple of 32); every thread gets the
// result. `scratch` holds 32 values. Fixed order: deterministic.
__device__ __forceinline__ double block_sum_d(double v, double *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double r = 0.0;
    for (int w = 0; w < nwarps; ++w) r += scratch[w];
    return r;
}

__device__ __forceinline__ float block_max(float v, float *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = -INFINITY;
    for (int w = 0; w < nwarps; ++w) r = fmaxf(r, scratch[w]);
    return r;
}

// 16-byte vectors of 8 bf16 (the fast paths of the memory-bound kernels: one load instruction
// per 8 elements; used when every operand is bf16, 16-byte aligned and the length divides by 8).
union UlBf16x8 {
    uint4 u;
    __nv_bfloat162 h[4];
};

__device__ __forceinline__ void unpack8(const uint4 &v, float *f) {
    UlBf16x8 x;
    x.u = v;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        float2 t = __bfloat1622float2(x.h[k]);
        f[2 * k] = t.x;
        f[2 * k + 1] = t.y;
    }
}

__device__ __forceinline__ uint4 pack8(const float *f) {
    UlBf16x8 x;
#pragma unroll
    for (int k = 0; k < 4; ++k) x.h[k] = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
    return x.u;
}
