// RoPE (HF half-split convention) with YaRN: the frequencies (`inv_freq`, already YaRN-scaled by
// src/model/rope.rs in f64) and the attention factor enter through the cos/sin tables.
//
// `ul_rope_table` builds those tables on the device with exact angles at any position below 2^53:
// the product p·inv_freq is kept as an unevaluated f64 sum hi + lo (fma gives the exact rounding
// error), reduced mod 2π with 2π split in two parts (Cody–Waite), then f64 sincos. At position 4M the
// angle is ~4e6 rad; a float `__sinf` there is wrong in the first digit, so this file is compiled
// without fast math and tests/cuda_build.rs checks that its PTX has no `sin.approx`/`cos.approx`.
// The same arithmetic as `Rope::cos_sin` (Exact) on the host, so the tables agree to rounding.
//
// `ul_rope_rotate` rotates x [rows, heads, head_dim] in place; `transpose` = 1 is the backward pass
// (rotation by −θ, same factor).
#include "common.cuh"

extern "C" __global__ void ul_rope_table(const double *inv_freq, const i64 *positions, int rows,
                                         int half, double attention_factor, void *cos_out,
                                         void *sin_out, int dt) {
    const double TWO_PI_HI = 6.283185307179586;
    const double TWO_PI_LO = 2.4492935982947064e-16;
    i64 n = (i64)rows * half;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < n;
         idx += (i64)gridDim.x * blockDim.x) {
        int r = (int)(idx / half), i = (int)(idx % half);
        double p = (double)positions[r];
        double inv = inv_freq[i];
        double hi = p * inv;
        double lo = fma(p, inv, -hi);
        double k = rint(hi / TWO_PI_HI);
        double a = fma(-k, TWO_PI_HI, hi) - k * TWO_PI_LO + lo;
        double s, c;
        sincos(a, &s, &c);
        st(cos_out, dt, idx, (float)(c * attention_factor));
        st(sin_out, dt, idx, (float)(s * attention_factor));
    }
}

extern "C" __global__ void ul_rope_rotate(void *x, int dtx, const void *cos_t, const void *sin_t,
                                          int dtc, int rows, int heads, int half, int transpose) {
    i64 n = (i64)rows * heads * half;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < n;
         idx += (i64)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        i64 rh = idx / half;
        int r = (int)(rh / heads);
        i64 base = rh * 2 * half;
        float c = ld(cos_t, dtc, (i64)r * half + i), s = ld(sin_t, dtc, (i64)r * half + i);
        float a = ld(x, dtx, base + i), b = ld(x, dtx, base + i + half);
        float y1, y2;
        if (transpose) {
            y1 = a * c + b * s;
            y2 = b * c - a * s;
        } else {
            y1 = a * c - b * s;
            y2 = b * c + a * s;
        }
        st(x, dtx, base + i, y1);
        st(x, dtx, base + i + half, y2);
    }
}

// bf16 fast path (x, cos, sin bf16; half % 8 == 0): one thread rotates 8 consecutive pairs of one
// (row, head) with 16-byte loads of x₁, x₂, cos and sin.
extern "C" __global__ void ul_rope_rotate_bf16x8(uint4 *x, const uint4 *cos_t, const uint4 *sin_t,
                                                 int rows, int heads, int half, int transpose) {
    int h8 = half / 8;
    i64 n = (i64)rows * heads * h8;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < n;
         idx += (i64)gridDim.x * blockDim.x) {
        int j = (int)(idx % h8);
        i64 rh = idx / h8;
        int r = (int)(rh / heads);
        i64 base = rh * 2 * h8;  // in 8-element units
        float a[8], b[8], c[8], s[8], y1[8], y2[8];
        unpack8(x[base + j], a);
        unpack8(x[base + h8 + j], b);
        unpack8(cos_t[(i64)r * h8 + j], c);
        unpack8(sin_t[(i64)r * h8 + j], s);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            if (transpose) {
                y1[k] = a[k] * c[k] + b[k] * s[k];
                y2[k] = b[k] * c[k] - a[k] * s[k];
            } else {
                y1[k] = a[k] * c[k] - b[k] * s[k];
                y2[k] = b[k] * c[k] + a[k] * s[k];
            }
        }
        x[base + j] = pack8(y1);
        x[base + h8 + j] = pack8(y2);
    }
}
