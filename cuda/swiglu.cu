// SwiGLU: out = silu(gate) · up, and its backward (dgate, dup overwritten); fp32 arithmetic with
// an accurate expf (no fast math).
#include "common.cuh"

__device__ __forceinline__ float sigmoidf_(float g) { return 1.f / (1.f + expf(-g)); }

extern "C" __global__ void ul_swiglu_fwd(const void *gate, int dtg, const void *up, int dtu,
                                         void *out, int dto, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float g = ld(gate, dtg, i);
        st(out, dto, i, g * sigmoidf_(g) * ld(up, dtu, i));
    }
}

extern "C" __global__ void ul_swiglu_bwd(const void *gate, int dtg, const void *up, int dtu,
                                         const void *dout, int dtd, void *dgate, int dtdg,
                                         void *dup, int dtdu, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float g = ld(gate, dtg, i), u = ld(up, dtu, i), d = ld(dout, dtd, i);
        float s = sigmoidf_(g);
        st(dgate, dtdg, i, d * u * s * (1.f + g * (1.f - s)));
        st(dup, dtdu, i, d * g * s);
    }
}

// bf16 fast paths: 8 elements per thread through 16-byte loads; n8 = n / 8.
extern "C" __global__ void ul_swiglu_fwd_bf16x8(const uint4 *gate, const uint4 *up, uint4 *out,
                                                i64 n8) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n8; i += (i64)gridDim.x * blockDim.x) {
        float g[8], u[8], o[8];
        unpack8(gate[i], g);
        unpack8(up[i], u);
#pragma unroll
        for (int k = 0; k < 8; ++k) o[k] = g[k] * sigmoidf_(g[k]) * u[k];
        out[i] = pack8(o);
    }
}

extern "C" __global__ void ul_swiglu_bwd_bf16x8(const uint4 *gate, const uint4 *up,
                                                const uint4 *dout, uint4 *dgate, uint4 *dup,
                                                i64 n8) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n8; i += (i64)gridDim.x * blockDim.x) {
        float g[8], u[8], d[8], dg[8], du[8];
        unpack8(gate[i], g);
        unpack8(up[i], u);
        unpack8(dout[i], d);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            float s = sigmoidf_(g[k]);
            dg[k] = d[k] * u[k] * s * (1.f + g[k] * (1.f - s));
            du[k] = d[k] * g[k] * s;
        }
        dgate[i] = pack8(dg);
        dup[i] = pack8(du);
    }
}
