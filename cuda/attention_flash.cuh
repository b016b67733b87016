// The building blocks of the tiled attention kernels (cuda/attention_flash.cu): shared-memory tile
// layout, asynchronous copies into it, tensor-core fragments and the visibility rule. Kept apart
// from the kernels so that each kernel reads as its algorithm (FlashAttention-2, Dao 2023).
//
// Tensor cores through `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` (sm_80 and later):
// A is 16×16 bf16 row-major, B 16×8 bf16 "col" (stored as 8 rows of 16 k-values), C/D 16×8 fp32.
// Per lane (g = lane/4, t = lane%4), from the PTX ISA fragment tables:
//   A: a0 = (row g, cols 2t,2t+1), a1 = (row g+8, cols 2t..), a2 = (row g, cols 2t+8..),
//      a3 = (row g+8, cols 2t+8..)                          [two bf16 per 32-bit register]
//   B: b0 = (k 2t,2t+1; col g), b1 = (k 2t+8, 2t+9; col g)
//   C: c0,c1 = (row g, cols 2t, 2t+1), c2,c3 = (row g+8, cols 2t, 2t+1)
// so the C fragments of two adjacent 16×8 tiles, rounded to bf16, are exactly the A fragment of a
// 16×16 tile: the probabilities P never leave registers between Q·Kᵀ and P·V.
//
// Shared-memory tiles hold rows of D bf16 as D/8 chunks of 16 bytes, the chunk index XOR-swizzled
// with the row (`swz`), so the 8 row addresses of one `ldmatrix` 8×8 matrix — 8 consecutive rows at
// one logical chunk — fall in 8 distinct 16-byte bank groups (no bank conflicts), and `cp.async`
// writes whole 16-byte chunks.
#pragma once
#include "common.cuh"

// The same layout as cuda/attention_simple.cu's (src/backend/cuda/kernels.rs, UlAttnShape).
struct UlAttnShape {
    int q_len, kv_len, n_q, n_kv, d, causal;
    i64 q_pos0, k_pos0;
};

namespace flash {

typedef __nv_bfloat16 bf16;

constexpr float LOG2E = 1.4426950408889634f;

// Query row i sees key row j iff j <= i + delta (causal), delta = q_pos0 − k_pos0. Clamped to
// ±2^30, which changes nothing for lengths below 2^30 (every key visible, or none) and keeps the
// per-element comparison in 32-bit integers.
__device__ __forceinline__ int visibility_delta(const UlAttnShape &s) {
    i64 d = s.q_pos0 - s.k_pos0;
    const i64 lim = (i64)1 << 30;
    return (int)(d > lim ? lim : (d < -lim ? -lim : d));
}

// Keys [0, end) may be visible to some row of the query tile [m0, m0 + bm): the forward and the
// deterministic dQ kernels loop over the key tiles below it.
__device__ __forceinline__ int visible_key_end(const UlAttnShape &s, int m0, int bm, int delta) {
    if (!s.causal) return s.kv_len;
    return max(0, min(s.kv_len, min(m0 + bm, s.q_len) - 1 + delta + 1));
}

// The mask, one predicate for the forward and both backward kernels (FlashAttention-2's mask.h):
// key row j is hidden from query row i iff it lies past the keys or, causal, after i's diagonal.
__device__ __forceinline__ bool key_hidden(const UlAttnShape &s, int delta, int i, int j) {
    return j >= s.kv_len || (s.causal && j > i + delta);
}

// Whether `key_hidden` holds for some pair of the query tile starting at row m0 and the key tile
// [n0, n0 + bn) (its first query row sees the fewest keys): only such tiles pay the element test.
__device__ __forceinline__ bool tile_needs_mask(const UlAttnShape &s, int delta, int m0, int n0,
                                                int bn) {
    return n0 + bn > s.kv_len || (s.causal && n0 + bn - 1 > m0 + delta);
}

// Byte offset of 16-byte chunk `ch` of row `row` in a tile of W chunks per row. For W >= 8 the
// chunk's low three bits are XORed with row mod 8 (rows are 128 or 256 bytes: 8 consecutive rows
// at one chunk would share a bank group); for W == 4 (64-byte rows, two rows per 128 bytes) with
// (row/2) mod 4.
template <int W>
__device__ __forceinline__ uint32_t swz(int row, int ch) {
    static_assert(W == 4 || W % 8 == 0, "tile rows of 4 or a multiple of 8 chunks");
    const int x = W >= 8 ? (row & 7) : ((row >> 1) & 3);
    return (uint32_t)((row * W + (ch ^ x)) * 16);
}

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16 bytes global → shared, asynchronously; `valid == false` writes 16 zero bytes and reads none.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
                 : "memory");
}

// 4 bytes global → shared (a float of the per-row statistics), zero when not valid.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src, bool valid) {
    const int n = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8×8 bf16 matrices from shared memory; lanes 8j..8j+7 give the row addresses of matrix j,
// register j receives matrix j's (row lane/4, cols 2·(lane%4), +1).
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// As ldsm_x4, each matrix transposed: register j receives (rows 2·(lane%4), +1; col lane/4).
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// c += a · b on the tensor cores (16×16 · 16×8, fp32 accumulation).
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a bf16 pair (lo in the low half: the lower column of a fragment), round to nearest.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

// The A fragment of the 16×16 tile made of the C fragments of two adjacent 16×8 tiles.
__device__ __forceinline__ void c_to_a(const float (&lo)[4], const float (&hi)[4],
                                       uint32_t (&a)[4]) {
    a[0] = pack_bf16(lo[0], lo[1]);
    a[1] = pack_bf16(lo[2], lo[3]);
    a[2] = pack_bf16(hi[0], hi[1]);
    a[3] = pack_bf16(hi[2], hi[3]);
}

// ldmatrix row addresses (byte offsets into a swizzled tile of W chunks per row) for each operand
// shape. `r0`/`c0` are element offsets, multiples of 16 (rows) and 16 (columns).
//
// A, 16×16 at (r0, c0) of a row-major [rows][k] tile: matrices (rows 0-7, k 0-7), (rows 8-15,
// k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) → a0..a3.
template <int W>
__device__ __forceinline__ uint32_t a_addr(int lane, int r0, int c0) {
    return swz<W>(r0 + (lane & 15), (c0 >> 3) + (lane >> 4));
}
// B of two 16×8 tiles (n0, n0+8) × k 16 from an [n][k] tile (k contiguous: Kᵀ from K), no
// transpose: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) →
// b0,b1 of tile n0 then b0,b1 of tile n0+8.
template <int W>
__device__ __forceinline__ uint32_t b_nk_addr(int lane, int n0, int k0) {
    return swz<W>(n0 + (lane & 7) + ((lane >> 4) << 3), (k0 >> 3) + ((lane >> 3) & 1));
}
// B of two 16×8 tiles from a [k][n] tile (n contiguous: V in P·V), with ldsm_x4_t: matrices
// (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15) → b0,b1 of n0, b0,b1 of n0+8.
template <int W>
__device__ __forceinline__ uint32_t b_kn_addr(int lane, int k0, int n0) {
    return swz<W>(k0 + (lane & 7) + (((lane >> 3) & 1) << 3), (n0 >> 3) + (lane >> 4));
}
// A, 16×16 (m0, k0) from a [k][m] tile (the transpose is stored), with ldsm_x4_t: matrices
// (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15) → a0..a3.
template <int W>
__device__ __forceinline__ uint32_t at_addr(int lane, int k0, int m0) {
    return swz<W>(k0 + (lane & 7) + ((lane >> 4) << 3), (m0 >> 3) + ((lane >> 3) & 1));
}

// Rows [row0, row0 + R) of head h of a [len, heads, D] bf16 tensor into a swizzled tile at `dst`
// (shared address), asynchronously; rows at or past `len` become zeros.
template <int R, int D, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t dst, const bf16 *g, int row0, int len,
                                          int heads, int h, int tid) {
    constexpr int W = D / 8;
#pragma unroll
    for (int c = tid; c < R * W; c += THREADS) {
        const int r = c / W, ch = c % W, row = row0 + r;
        const bool ok = row < len;
        const bf16 *src = g + (ok ? ((i64)row * heads + h) * D + ch * 8 : 0);
        cp_async16(dst + swz<W>(r, ch), src, ok);
    }
}

// R consecutive floats p[row0 ..] into shared memory by threads tid < R (zeros past `len`).
template <int R>
__device__ __forceinline__ void load_row_stats(uint32_t dst, const float *p, int row0, int len,
                                               int tid) {
    if (tid < R) {
        const bool ok = row0 + tid < len;
        cp_async4(dst + 4 * tid, p + (ok ? row0 + tid : 0), ok);
    }
}

}  // namespace flash
