// Tiled attention on the tensor cores, FlashAttention-2 style (Dao 2023): forward with an online
// softmax and log-sum-exp output; backward with recompute from the log-sum-exp, a rowsum(dO∘O)
// pre-pass, dK/dV per key tile, dQ by fp32 atomics (fast) or by its own kernel (deterministic).
// The building blocks (tile layout, fragments, copies) are in attention_flash.cuh.
//
// Contract (the Backend trait's, as cuda/attention_simple.cu): q/out/dout [q_len, n_q, D],
// k/v [kv_len, n_kv, D], all bf16, 16-byte aligned; lse and dsum [n_q, q_len] fp32; dq/dk/dv in
// the dtype given by their code (fp32 accumulation throughout, one rounding at the store). Causal:
// query i sees key j iff k_pos0 + j <= q_pos0 + i, any offsets, so the ring's diagonal, full and
// half steps and the zigzag chunks are all one kernel. A row that sees no key gets output 0 and
// lse −∞ (no NaN); its gradients are 0. GQA: query head h reads KV head h / (n_q / n_kv).
// D = 64 and 128 are instantiated; lengths need not be multiples of the tiles.
//
// Tiles: each warp owns 16 rows of the block's "own" operand (query rows in the forward and dQ
// kernels, key rows in dK/dV), so softmax statistics stay within the 4 lanes that share a row.
// Fully masked tiles are never loaded; only tiles that cross the diagonal or the end of the keys
// are masked element by element. K/V (or Q/dO) tiles are double-buffered with cp.async so the
// next tile's copy overlaps the current tile's arithmetic.
#include "attention_flash.cuh"

using namespace flash;

// ---------------------------------------------------------------------------------------------
// Forward: block = WARPS warps = BM = 16·WARPS query rows of one head; loops over key tiles of BN.
// Grid (n_q, ceil(q_len / BM)), the last query tiles (most keys under the causal mask) first;
// neighbouring blocks are the heads of one query tile, which read the same KV tiles (L2 reuse for
// GQA). Shared memory: Q [BM][D] + 2 stages × (K, V) [BN][D], bf16.
template <int D, int WARPS, int BN>
__device__ __forceinline__ void flash_fwd(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                                          const bf16 *__restrict__ v, const UlAttnShape &s,
                                          float scale, bf16 *__restrict__ out,
                                          float *__restrict__ lse) {
    constexpr int BM = 16 * WARPS, W = D / 8, T = 32 * WARPS;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t sQ = smem_u32(smem);
    const uint32_t sK = sQ + BM * D * 2, sV = sK + 2 * BN * D * 2;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int h = blockIdx.x, kvh = h / (s.n_q / s.n_kv);
    const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;
    const int delta = visibility_delta(s);
    const int n_end = visible_key_end(s, m0, BM, delta);
    const int n_tiles = (n_end + BN - 1) / BN;

    load_tile<BM, D, T>(sQ, q, m0, s.q_len, s.n_q, h, tid);
    cp_async_commit();
    if (n_tiles > 0) {
        load_tile<BN, D, T>(sK, k, 0, s.kv_len, s.n_kv, kvh, tid);
        load_tile<BN, D, T>(sV, v, 0, s.kv_len, s.n_kv, kvh, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(sQ + a_addr<W>(lane, warp * 16, kk * 16), qf[kk]);

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    // Running max (in raw score units) and this lane's part of the running sum, rows g and g+8.
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
    const float sl2 = scale * LOG2E;
    const int row_base = m0 + warp * 16 + g;

    for (int it = 0; it < n_tiles; ++it) {
        const int st = it & 1, n0 = it * BN;
        if (it + 1 < n_tiles) {
            load_tile<BN, D, T>(sK + (st ^ 1) * BN * D * 2, k, n0 + BN, s.kv_len, s.n_kv, kvh, tid);
            load_tile<BN, D, T>(sV + (st ^ 1) * BN * D * 2, v, n0 + BN, s.kv_len, s.n_kv, kvh, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const uint32_t kS = sK + st * BN * D * 2, vS = sV + st * BN * D * 2;

        // S = Q·Kᵀ for this warp's 16 rows × BN keys.
        float sc[BN / 8][4];
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                uint32_t b[4];
                ldsm_x4(kS + b_nk_addr<W>(lane, np * 16, kk * 16), b);
                mma16816(sc[2 * np], qf[kk], b[0], b[1]);
                mma16816(sc[2 * np + 1], qf[kk], b[2], b[3]);
            }
        }
        // Mask only tiles that cross the end of the keys or the diagonal of some row.
        if (tile_needs_mask(s, delta, m0, n0, BN)) {
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int j = n0 + nt * 8 + 2 * t4 + (c & 1), i = row_base + 8 * (c >> 1);
                    if (key_hidden(s, delta, i, j)) sc[nt][c] = -INFINITY;
                }
            }
        }
        // Online softmax. A row with no visible key so far keeps max −∞; `ms` = 0 then makes
        // every exp2 of −∞ exactly 0 instead of NaN.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = mrow[r];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
                mx = fmaxf(mx, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float ms = mx == -INFINITY ? 0.f : mx * sl2;
            const float corr = exp2f(mrow[r] * sl2 - ms);
            mrow[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                const float p0 = exp2f(fmaf(sc[nt][2 * r], sl2, -ms));
                const float p1 = exp2f(fmaf(sc[nt][2 * r + 1], sl2, -ms));
                sc[nt][2 * r] = p0;
                sc[nt][2 * r + 1] = p1;
                sum += p0 + p1;
            }
            lrow[r] = lrow[r] * corr + sum;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                o[dt][2 * r] *= corr;
                o[dt][2 * r + 1] *= corr;
            }
        }
        // O += P·V, P rounded to bf16 in registers (the sum above used the unrounded values).
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4];
            c_to_a(sc[2 * kk], sc[2 * kk + 1], a);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t b[4];
                ldsm_x4_t(vS + b_kn_addr<W>(lane, kk * 16, dp * 16), b);
                mma16816(o[2 * dp], a, b[0], b[1]);
                mma16816(o[2 * dp + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }

    // Normalise, write lse, then the output through this warp's own rows of the Q tile (16-byte
    // coalesced stores).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = lrow[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            o[dt][2 * r] *= inv;
            o[dt][2 * r + 1] *= inv;
        }
        const int i = row_base + 8 * r;
        if (t4 == 0 && i < s.q_len)
            lse[(i64)h * s.q_len + i] = l > 0.f ? mrow[r] * scale + logf(l) : -INFINITY;
    }
    __syncthreads();
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = warp * 16 + g + 8 * r;
            *reinterpret_cast<uint32_t *>(smem + swz<W>(row, dt) + 4 * t4) =
                pack_bf16(o[dt][2 * r], o[dt][2 * r + 1]);
        }
    }
    __syncwarp();
#pragma unroll
    for (int c = lane; c < 16 * W; c += 32) {
        const int row = warp * 16 + c / W, ch = c % W, i = m0 + row;
        if (i < s.q_len)
            *reinterpret_cast<uint4 *>(out + ((i64)i * s.n_q + h) * D + ch * 8) =
                *reinterpret_cast<const uint4 *>(smem + swz<W>(row, ch));
    }
}

// ---------------------------------------------------------------------------------------------
// Backward pre-pass: dsum[h, i] = Σ_c dout[i, h, c] · out[i, h, c] (fp32), D/8 lanes per row, one
// 16-byte load of each per lane.
template <int D>
__device__ __forceinline__ void flash_dsum(const bf16 *__restrict__ out,
                                           const bf16 *__restrict__ dout, const UlAttnShape &s,
                                           float *__restrict__ dsum) {
    constexpr int W = D / 8;
    const i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    const i64 row = idx / W;
    const int ch = (int)(idx % W);
    const bool ok = row < (i64)s.q_len * s.n_q;
    float acc = 0.f;
    if (ok) {
        float a[8], b[8];
        unpack8(reinterpret_cast<const uint4 *>(out)[row * W + ch], a);
        unpack8(reinterpret_cast<const uint4 *>(dout)[row * W + ch], b);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = fmaf(a[e], b[e], acc);
    }
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (ok && ch == 0) {
        const int i = (int)(row / s.n_q), h = (int)(row % s.n_q);
        dsum[(i64)h * s.q_len + i] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward dK, dV: block = WARPS warps = BN = 16·WARPS key rows of one KV head; loops over the
// query heads of its group and the query tiles (BM rows) that see these keys, in a fixed order, so
// dK and dV are deterministic. Works with the transposed scores, so each warp's 16 key rows are
// the rows of every product and its dK/dV accumulators stay in registers:
//   Sᵀ = K·Qᵀ, Pᵀ = exp(Sᵀ·scale − lse), dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − dsum),
//   dK += dSᵀ·Q (× scale at the end), and with `dq_acc` non-null dQ += dS·K (× scale) by fp32
//   atomics, dSᵀ passing through shared memory.
// The lse of rows past q_len, and lse = −∞ (a row that sees no key), become +∞ so that their P is
// exactly 0; Q and dO rows past q_len are zeros. Grid (n_kv, ceil(kv_len / BN)); the first key
// tiles (seen by most queries) first.
// Shared memory: K, V [BN][D]; 2 stages × (Q, dO [BM][D], lse, dsum [BM]); dSᵀ [BN][BM].
template <int D, int WARPS, int BM>
__device__ __forceinline__ void flash_bwd_dkdv(
    const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
    const bf16 *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ dsum,
    const UlAttnShape &s, float scale, float *__restrict__ dq_acc, void *dk, void *dv, int dtg) {
    constexpr int BN = 16 * WARPS, W = D / 8, T = 32 * WARPS, WS = BM / 8;
    static_assert(2 * BM <= T, "one thread per row statistic");
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t sK = smem_u32(smem), sV = sK + BN * D * 2, sQ = sV + BN * D * 2;
    const uint32_t sdO = sQ + 2 * BM * D * 2, sdS = sdO + 2 * BM * D * 2;
    const uint32_t sStat = sdS + BN * BM * 2;  // [stage][lse BM, dsum BM] floats
    const float *stat = reinterpret_cast<const float *>(smem + (sStat - sK));
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int kvh = blockIdx.x, n0 = blockIdx.y * BN, group = s.n_q / s.n_kv;
    const int delta = visibility_delta(s);
    // Query rows >= n0 − delta see key n0 (the first of the tile); earlier tiles see none.
    int m_start = 0;
    if (s.causal) m_start = max(0, n0 - delta) / BM * BM;
    const int n_m = m_start < s.q_len ? (s.q_len - m_start + BM - 1) / BM : 0;
    const int total = group * n_m;

    load_tile<BN, D, T>(sK, k, n0, s.kv_len, s.n_kv, kvh, tid);
    load_tile<BN, D, T>(sV, v, n0, s.kv_len, s.n_kv, kvh, tid);
    cp_async_commit();
    auto prefetch = [&](int it, int st) {
        const int h = kvh * group + it / n_m, m0 = m_start + (it % n_m) * BM;
        load_tile<BM, D, T>(sQ + st * BM * D * 2, q, m0, s.q_len, s.n_q, h, tid);
        load_tile<BM, D, T>(sdO + st * BM * D * 2, dout, m0, s.q_len, s.n_q, h, tid);
        const uint32_t so = sStat + st * 2 * BM * 4;
        if (tid < BM)
            load_row_stats<BM>(so, lse + (i64)h * s.q_len, m0, s.q_len, tid);
        else
            load_row_stats<BM>(so + BM * 4, dsum + (i64)h * s.q_len, m0, s.q_len, tid - BM);
        cp_async_commit();
    };
    if (total > 0) prefetch(0, 0);

    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) dka[i][c] = dva[i][c] = 0.f;
    const float sl2 = scale * LOG2E;
    const int jrow = n0 + warp * 16 + g;  // this lane's key rows: jrow, jrow + 8

    for (int it = 0; it < total; ++it) {
        const int st = it & 1;
        const int h = kvh * group + it / n_m, m0 = m_start + (it % n_m) * BM;
        if (it + 1 < total) {
            prefetch(it + 1, st ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const uint32_t qS = sQ + st * BM * D * 2, gS = sdO + st * BM * D * 2;
        const float *sL = stat + st * 2 * BM, *sD = sL + BM;

        // Sᵀ = K·Qᵀ (16 key rows × BM queries per warp).
        float p[BM / 8][4];
#pragma unroll
        for (int i = 0; i < BM / 8; ++i) p[i][0] = p[i][1] = p[i][2] = p[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[4];
            ldsm_x4(sK + a_addr<W>(lane, warp * 16, kk * 16), a);
#pragma unroll
            for (int mp = 0; mp < BM / 16; ++mp) {
                uint32_t b[4];
                ldsm_x4(qS + b_nk_addr<W>(lane, mp * 16, kk * 16), b);
                mma16816(p[2 * mp], a, b[0], b[1]);
                mma16816(p[2 * mp + 1], a, b[2], b[3]);
            }
        }
        // Pᵀ = exp(Sᵀ·scale − lse), masked across the diagonal and past the last key (a zero key
        // row's exp(−lse) can overflow when every score of a row is very negative).
        const bool need_mask = tile_needs_mask(s, delta, m0, n0, BN);
#pragma unroll
        for (int mt = 0; mt < BM / 8; ++mt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = mt * 8 + 2 * t4 + e;
                const float L = sL[col];
                const float Ls = (m0 + col >= s.q_len || L == -INFINITY) ? INFINITY : L * LOG2E;
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float x = exp2f(fmaf(p[mt][2 * r + e], sl2, -Ls));
                    if (need_mask) {
                        if (key_hidden(s, delta, m0 + col, jrow + 8 * r)) x = 0.f;
                    }
                    p[mt][2 * r + e] = x;
                }
            }
        }
        // dPᵀ = V·dOᵀ.
        float dp[BM / 8][4];
#pragma unroll
        for (int i = 0; i < BM / 8; ++i) dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[4];
            ldsm_x4(sV + a_addr<W>(lane, warp * 16, kk * 16), a);
#pragma unroll
            for (int mp = 0; mp < BM / 16; ++mp) {
                uint32_t b[4];
                ldsm_x4(gS + b_nk_addr<W>(lane, mp * 16, kk * 16), b);
                mma16816(dp[2 * mp], a, b[0], b[1]);
                mma16816(dp[2 * mp + 1], a, b[2], b[3]);
            }
        }
        // dV += Pᵀ·dO.
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            uint32_t a[4];
            c_to_a(p[2 * kk], p[2 * kk + 1], a);
#pragma unroll
            for (int dq2 = 0; dq2 < D / 16; ++dq2) {
                uint32_t b[4];
                ldsm_x4_t(gS + b_kn_addr<W>(lane, kk * 16, dq2 * 16), b);
                mma16816(dva[2 * dq2], a, b[0], b[1]);
                mma16816(dva[2 * dq2 + 1], a, b[2], b[3]);
            }
        }
        // dSᵀ = Pᵀ∘(dPᵀ − dsum), into p.
#pragma unroll
        for (int mt = 0; mt < BM / 8; ++mt) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int col = mt * 8 + 2 * t4 + (c & 1);
                p[mt][c] = p[mt][c] * (dp[mt][c] - sD[col]);
            }
        }
        // dK += dSᵀ·Q.
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            uint32_t a[4];
            c_to_a(p[2 * kk], p[2 * kk + 1], a);
#pragma unroll
            for (int dq2 = 0; dq2 < D / 16; ++dq2) {
                uint32_t b[4];
                ldsm_x4_t(qS + b_kn_addr<W>(lane, kk * 16, dq2 * 16), b);
                mma16816(dka[2 * dq2], a, b[0], b[1]);
                mma16816(dka[2 * dq2 + 1], a, b[2], b[3]);
            }
        }
        if (dq_acc != nullptr) {
            // dSᵀ (bf16) → shared [BN][BM]; dQ[BM × D] = dS·K split over the warps; fp32 atomics.
#pragma unroll
            for (int mt = 0; mt < BM / 8; ++mt) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int row = warp * 16 + g + 8 * r;
                    *reinterpret_cast<uint32_t *>(smem + (sdS - sK) + swz<WS>(row, mt) + 4 * t4) =
                        pack_bf16(p[mt][2 * r], p[mt][2 * r + 1]);
                }
            }
            __syncthreads();
            constexpr int WARPS_M = BM / 16, WARPS_N = WARPS / WARPS_M, NTW = D / 8 / WARPS_N;
            static_assert(WARPS % WARPS_M == 0 && NTW % 2 == 0, "dQ split over the warps");
            const int wm = warp % WARPS_M, wn = warp / WARPS_M;
            float acc[NTW][4];
#pragma unroll
            for (int i = 0; i < NTW; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                uint32_t a[4];
                ldsm_x4_t(sdS + at_addr<WS>(lane, kk * 16, wm * 16), a);
#pragma unroll
                for (int np = 0; np < NTW / 2; ++np) {
                    uint32_t b[4];
                    ldsm_x4_t(sK + b_kn_addr<W>(lane, kk * 16, (wn * NTW + 2 * np) * 8), b);
                    mma16816(acc[2 * np], a, b[0], b[1]);
                    mma16816(acc[2 * np + 1], a, b[2], b[3]);
                }
            }
#pragma unroll
            for (int nt = 0; nt < NTW; ++nt) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int i = m0 + wm * 16 + g + 8 * (c >> 1);
                    const int d = (wn * NTW + nt) * 8 + 2 * t4 + (c & 1);
                    if (i < s.q_len) atomicAdd(dq_acc + ((i64)i * s.n_q + h) * D + d, acc[nt][c] * scale);
                }
            }
        }
        __syncthreads();  // this stage (and dSᵀ) is rewritten by the next iteration
    }

#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int j = jrow + 8 * (c >> 1), d = dt * 8 + 2 * t4 + (c & 1);
            if (j < s.kv_len) {
                const i64 o = ((i64)j * s.n_kv + kvh) * D + d;
                st(dk, dtg, o, dka[dt][c] * scale);
                st(dv, dtg, o, dva[dt][c]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward dQ, deterministic: block = WARPS warps = BM = 16·WARPS query rows of one head; loops
// over key tiles like the forward: S = Q·Kᵀ, P = exp(S·scale − lse), dP = dO·Vᵀ,
// dS = P∘(dP − dsum), dQ += dS·K; written once (× scale). Grid and shared memory as the forward,
// plus dO [BM][D].
template <int D, int WARPS, int BN>
__device__ __forceinline__ void flash_bwd_dq(const bf16 *__restrict__ q,
                                             const bf16 *__restrict__ k,
                                             const bf16 *__restrict__ v,
                                             const bf16 *__restrict__ dout,
                                             const float *__restrict__ lse,
                                             const float *__restrict__ dsum, const UlAttnShape &s,
                                             float scale, void *dq, int dtq) {
    constexpr int BM = 16 * WARPS, W = D / 8, T = 32 * WARPS;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t sQ = smem_u32(smem), sdO = sQ + BM * D * 2;
    const uint32_t sK = sdO + BM * D * 2, sV = sK + 2 * BN * D * 2;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int h = blockIdx.x, kvh = h / (s.n_q / s.n_kv);
    const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;
    const int delta = visibility_delta(s);
    const int n_end = visible_key_end(s, m0, BM, delta);
    const int n_tiles = (n_end + BN - 1) / BN;

    load_tile<BM, D, T>(sQ, q, m0, s.q_len, s.n_q, h, tid);
    load_tile<BM, D, T>(sdO, dout, m0, s.q_len, s.n_q, h, tid);
    cp_async_commit();
    if (n_tiles > 0) {
        load_tile<BN, D, T>(sK, k, 0, s.kv_len, s.n_kv, kvh, tid);
        load_tile<BN, D, T>(sV, v, 0, s.kv_len, s.n_kv, kvh, tid);
    }
    cp_async_commit();

    const float sl2 = scale * LOG2E;
    const int row_base = m0 + warp * 16 + g;
    float Ls[2], Dr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = row_base + 8 * r;
        const float L = i < s.q_len ? lse[(i64)h * s.q_len + i] : -INFINITY;
        Ls[r] = L == -INFINITY ? INFINITY : L * LOG2E;
        Dr[r] = i < s.q_len ? dsum[(i64)h * s.q_len + i] : 0.f;
    }
    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

    for (int it = 0; it < n_tiles; ++it) {
        const int st = it & 1, n0 = it * BN;
        if (it + 1 < n_tiles) {
            load_tile<BN, D, T>(sK + (st ^ 1) * BN * D * 2, k, n0 + BN, s.kv_len, s.n_kv, kvh, tid);
            load_tile<BN, D, T>(sV + (st ^ 1) * BN * D * 2, v, n0 + BN, s.kv_len, s.n_kv, kvh, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const uint32_t kS = sK + st * BN * D * 2, vS = sV + st * BN * D * 2;
        float sc[BN / 8][4], dp[BN / 8][4];
#pragma unroll
        for (int i = 0; i < BN / 8; ++i)
#pragma unroll
            for (int c = 0; c < 4; ++c) sc[i][c] = dp[i][c] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t aq[4], ag[4];
            ldsm_x4(sQ + a_addr<W>(lane, warp * 16, kk * 16), aq);
            ldsm_x4(sdO + a_addr<W>(lane, warp * 16, kk * 16), ag);
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                uint32_t b[4];
                ldsm_x4(kS + b_nk_addr<W>(lane, np * 16, kk * 16), b);
                mma16816(sc[2 * np], aq, b[0], b[1]);
                mma16816(sc[2 * np + 1], aq, b[2], b[3]);
                ldsm_x4(vS + b_nk_addr<W>(lane, np * 16, kk * 16), b);
                mma16816(dp[2 * np], ag, b[0], b[1]);
                mma16816(dp[2 * np + 1], ag, b[2], b[3]);
            }
        }
        const bool need_mask = tile_needs_mask(s, delta, m0, n0, BN);
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int r = c >> 1;
                float x = exp2f(fmaf(sc[nt][c], sl2, -Ls[r]));
                if (need_mask) {
                    const int j = n0 + nt * 8 + 2 * t4 + (c & 1), i = row_base + 8 * r;
                    if (key_hidden(s, delta, i, j)) x = 0.f;
                }
                sc[nt][c] = x * (dp[nt][c] - Dr[r]);
            }
        }
        // dQ += dS·K.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4];
            c_to_a(sc[2 * kk], sc[2 * kk + 1], a);
#pragma unroll
            for (int dq2 = 0; dq2 < D / 16; ++dq2) {
                uint32_t b[4];
                ldsm_x4_t(kS + b_kn_addr<W>(lane, kk * 16, dq2 * 16), b);
                mma16816(acc[2 * dq2], a, b[0], b[1]);
                mma16816(acc[2 * dq2 + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int i = row_base + 8 * (c >> 1), d = dt * 8 + 2 * t4 + (c & 1);
            if (i < s.q_len) st(dq, dtq, ((i64)i * s.n_q + h) * D + d, acc[dt][c] * scale);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points. Tile sizes (the host side, src/backend/cuda/flash.rs, mirrors them: threads and
// shared-memory bytes): 4 warps everywhere; forward and dQ BM = BN = 64; dK/dV BN = 64 key rows
// and BM = 32 query rows for D = 128 (register budget: dK, dV accumulators 128 floats per lane),
// 64 for D = 64.
#define UL_FLASH_ENTRIES(D, BM_DKDV)                                                             \
    extern "C" __global__ void __launch_bounds__(128, 2)                                         \
        ul_flash_fwd_d##D(const bf16 *q, const bf16 *k, const bf16 *v, UlAttnShape s,             \
                          float scale, bf16 *out, float *lse) {                                   \
        flash_fwd<D, 4, 64>(q, k, v, s, scale, out, lse);                                         \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        ul_flash_bwd_dsum_d##D(const bf16 *out, const bf16 *dout, UlAttnShape s, float *dsum) {   \
        flash_dsum<D>(out, dout, s, dsum);                                                        \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(128, 2) ul_flash_bwd_dkdv_d##D(                 \
        const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout, const float *lse,          \
        const float *dsum, UlAttnShape s, float scale, float *dq_acc, void *dk, void *dv,         \
        int dtg) {                                                                                \
        flash_bwd_dkdv<D, 4, BM_DKDV>(q, k, v, dout, lse, dsum, s, scale, dq_acc, dk, dv, dtg);   \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(128, 2) ul_flash_bwd_dq_d##D(                   \
        const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout, const float *lse,          \
        const float *dsum, UlAttnShape s, float scale, void *dq, int dtq) {                       \
        flash_bwd_dq<D, 4, 64>(q, k, v, dout, lse, dsum, s, scale, dq, dtq);                      \
    }

UL_FLASH_ENTRIES(64, 64)
UL_FLASH_ENTRIES(128, 32)
