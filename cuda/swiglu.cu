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
