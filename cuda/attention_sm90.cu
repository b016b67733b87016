// The Hopper-native attention forward (sm_90a only), FlashAttention-3 style (Shah et al. 2024):
// Q/K/V tiles brought by the tensor-copy engine (TMA, `cp.async.bulk.tensor`) into 128-byte-swizzled
// shared memory on an mbarrier pipeline, S = Q·Kᵀ and O += P·V on the warpgroup tensor-core
// instructions (`wgmma.mma_async`, P from registers), one producer warpgroup and two consumer
// warpgroups with registers moved to the consumers (`setmaxnreg`), the consumers taking turns on
// the tensor cores (one's softmax runs while the other's products do) and, inside each, the next
// Q·Kᵀ issued before the current tile's softmax.
//
// Same contract as ul_flash_fwd_d* of cuda/attention_flash.cu, so src/backend/cuda/flash_sm90.rs
// swaps it in behind the same Backend call: q/out [q_len, n_q, D], k/v [kv_len, n_kv, D] bf16,
// lse [n_q, q_len] fp32; causal visibility j <= i + (q_pos0 − k_pos0) with any offsets (the ring's
// steps), GQA by h / (n_q / n_kv); a row that sees no key gets out 0 and lse −∞. The global tensors
// are reached through TMA tensor maps built on the host (cuTensorMapEncodeTiled), one per operand:
// rank 3 (D, heads, len), box (64, 1, rows), 128-byte swizzle; rows past the end read as zeros and
// are not written (the copy engine clips), so tails need no code here.
//
// The whole kernel exists only in the sm_90a cubin: build.rs also compiles this file to sm_80 and
// sm_90 PTX, where `wgmma` and `setmaxnreg` do not exist, and there the file is empty.
//
// Index math (modelled and checked on the CPU in bench/gpu/sm90_fragments.py):
// - Shared tiles: a tile of R rows × D bf16 is D/64 column blocks of R × 128 bytes; in each block,
//   row r's 16-byte chunk c sits at r·128 + ((c ^ (r mod 8)) · 16): the TMA SWIZZLE_128B pattern
//   on a 1024-byte-aligned base, which is also wgmma's 128-byte swizzle.
// - wgmma descriptors: K-major (Q as A, K as B of Q·Kᵀ): stride between 8-row groups (SBO) 1024,
//   a k16 step = +32 bytes inside a block, +R·128 to the next block. MN-major (V as B of P·V,
//   transposed): 8-key groups 1024 apart (SBO), the two 64-wide column blocks R·128 apart (LBO),
//   a k16 step = +2048 bytes.
// - Accumulators m64nN: warp w of the warpgroup holds rows 16w..16w+15; register 4·b + e holds
//   (row 16w + lane/4 + 8·(e/2), col 8b + 2·(lane%4) + e%2): the mma.m16n8 C layout per 8 columns,
//   so attention_flash.cuh's softmax code and c_to_a (C → A fragment, P stays in registers) apply.
#include "attention_flash.cuh"

// A CUtensorMap of the driver API: 128 opaque bytes, 64-byte aligned, passed by value.
struct alignas(64) UlTmaMap {
    unsigned long long opaque[16];
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

using namespace flash;

namespace sm90 {

// ---- mbarrier (PTX ISA: "Parallel Synchronization and Communication Instructions: mbarrier") ----
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// One arrival that also announces `bytes` of transactions (the copies completing on it).
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
    uint32_t ok;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(ok)
        : "r"(bar), "r"(parity)
        : "memory");
    return ok != 0;
}
// Wait until the phase of parity `parity` has completed (a fresh barrier counts parity 1 done).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    while (!mbar_try_wait(bar, parity)) {
    }
}

// ---- named barriers among warpgroups (bar.sync waits; bar.arrive only counts) ----
__device__ __forceinline__ void bar_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- the tensor-copy engine ----
// Box (c0 .. c0+63 columns, head c1, rows c2 ..) of the tensor map → shared `dst`, completing
// `bytes` of transactions on `bar`.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const UlTmaMap *map, int c0, int c1,
                                            int c2, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void tma_store_3d(const UlTmaMap *map, int c0, int c1, int c2,
                                             uint32_t src) {
    asm volatile(
        "cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group [%0, {%1, %2, %3}], [%4];\n" ::
            "l"(reinterpret_cast<uint64_t>(map)),
        "r"(c0), "r"(c1), "r"(c2), "r"(src)
        : "memory");
}
__device__ __forceinline__ void tma_store_commit_and_drain() {
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
    // Shared memory may be reused (or the block exit) only once the engine has read it.
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
__device__ __forceinline__ void prefetch_map(const UlTmaMap *map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// Ordinary shared-memory stores made visible to the async proxy (TMA, wgmma) that reads next.
__device__ __forceinline__ void fence_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- wgmma (PTX ISA: "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions") ----
// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
// offsets, all >> 4 ("Matrix Descriptor Format"); base offset 0 (tiles are 1024-byte aligned).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) |
           ((uint64_t)(sbo >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wg_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Wait until at most N committed wgmma groups of this warpgroup are in flight.
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pin registers an asynchronous wgmma reads or writes: the compiler may not move their uses
// across this point (after a wait: reads of results; before an issue: their last writes).
template <int N>
__device__ __forceinline__ void reg_fence(float (&d)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
}
template <int N>
__device__ __forceinline__ void reg_fence(uint32_t (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

#define UL_ACC4(d, i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define UL_ACC32(d, b)                                                                        \
    UL_ACC4(d, b + 0), UL_ACC4(d, b + 1), UL_ACC4(d, b + 2), UL_ACC4(d, b + 3),               \
        UL_ACC4(d, b + 4), UL_ACC4(d, b + 5), UL_ACC4(d, b + 6), UL_ACC4(d, b + 7)
#define UL_REGS32                                                                              \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define UL_REGS64                                                                              \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
    "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
    "%56, %57, %58, %59, %60, %61, %62, %63}"

// d (64 × 128, fp32) = A·B (+ d when accumulate): A 64×16 and B 16×128 from shared memory, both
// K-major (B stored as 128 rows of k), bf16.
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[16][4], uint64_t da, uint64_t db,
                                              int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " UL_REGS64
        ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : UL_ACC32(d, 0), UL_ACC32(d, 8)
        : "l"(da), "l"(db), "r"(accumulate));
}
// d (64 × 128) += A·B: A 64×16 bf16 from registers (the mma.m16n8k16 A layout per warp), B 16×128
// from shared memory, MN-major (transposed: B stored as 16 rows of 128 n).
__device__ __forceinline__ void wgmma_rs_n128_tb(float (&d)[16][4], const uint32_t (&a)[4],
                                                 uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " UL_REGS64
        ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : UL_ACC32(d, 0), UL_ACC32(d, 8)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
// As wgmma_rs_n128_tb for a 64-column result (head_dim 64).
__device__ __forceinline__ void wgmma_rs_n64_tb(float (&d)[8][4], const uint32_t (&a)[4],
                                                uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " UL_REGS32
        ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : UL_ACC32(d, 0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
template <int D>
__device__ __forceinline__ void wgmma_pv(float (&o)[D / 8][4], const uint32_t (&a)[4],
                                         uint64_t db) {
    if constexpr (D == 128)
        wgmma_rs_n128_tb(o, a, db);
    else
        wgmma_rs_n64_tb(o, a, db);
}

// ---- the forward ----
// Tiles: BM = 128 query rows per block (64 per consumer warpgroup), BN = 128 keys per stage,
// STAGES K and V stages. Shared memory from a 1024-byte-aligned base: Q [BM × D], K[STAGES],
// V[STAGES] [BN × D], then the mbarriers. The host mirrors these sizes (flash_sm90.rs).
template <int D>
struct Fwd {
    static constexpr int BM = 128, BN = 128, STAGES = 2, HALVES = D / 64;
    static constexpr uint32_t Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2;
    static constexpr uint32_t OFF_K = Q_BYTES, OFF_V = OFF_K + STAGES * KV_BYTES;
    static constexpr uint32_t OFF_BAR = OFF_V + STAGES * KV_BYTES;
    // Barriers (8 bytes each): Q full; K full, V full, K empty, V empty per stage.
    static constexpr int BAR_Q = 0, BAR_KF = 1, BAR_VF = BAR_KF + STAGES,
                         BAR_KE = BAR_VF + STAGES, BAR_VE = BAR_KE + STAGES,
                         N_BARS = BAR_VE + STAGES;
    static constexpr uint32_t SMEM = 1024 + OFF_BAR + 8 * N_BARS;
    // Consumer warps arriving on an "empty" barrier per release (4 per warpgroup).
    static constexpr uint32_t CONSUMER_WARPS = 8;
    // Named barriers: 1, 2 = the tensor-core turn of consumer 0, 1; 3, 4 = consumer 0, 1 alone.
    static constexpr int NB_TURN = 1, NB_WG = 3;
};

template <int D>
__device__ __forceinline__ void fwd_producer(const UlTmaMap *tq, const UlTmaMap *tk,
                                             const UlTmaMap *tv, uint32_t base, int h, int kvh,
                                             int m0, int n_tiles) {
    using F = Fwd<D>;
    auto bar = [&](int i) { return base + F::OFF_BAR + 8 * i; };
    prefetch_map(tq);
    prefetch_map(tk);
    prefetch_map(tv);
    mbar_expect_tx(bar(F::BAR_Q), F::Q_BYTES);
#pragma unroll
    for (int hf = 0; hf < F::HALVES; ++hf)
        tma_load_3d(base + hf * F::BM * 128, tq, 64 * hf, h, m0, bar(F::BAR_Q));
    // Tile j goes to stage j % STAGES once the consumers released tile j − STAGES there: the
    // release of use u of a stage completes phase u of its "empty" barrier, parity u & 1.
    auto load = [&](const UlTmaMap *map, uint32_t off, int full, int empty, int j) {
        const int st = j % F::STAGES;
        if (j >= F::STAGES) mbar_wait(bar(empty + st), (j / F::STAGES - 1) & 1);
        mbar_expect_tx(bar(full + st), F::KV_BYTES);
        const uint32_t dst = base + off + st * F::KV_BYTES;
#pragma unroll
        for (int hf = 0; hf < F::HALVES; ++hf)
            tma_load_3d(dst + hf * F::BN * 128, map, 64 * hf, kvh, j * F::BN, bar(full + st));
    };
    // The consumers' order: K_j is needed before V_{j−1} (S_j is issued with P_{j−1}·V_{j−1}).
    if (n_tiles > 0) load(tk, F::OFF_K, F::BAR_KF, F::BAR_KE, 0);
    for (int j = 1; j < n_tiles; ++j) {
        load(tk, F::OFF_K, F::BAR_KF, F::BAR_KE, j);
        load(tv, F::OFF_V, F::BAR_VF, F::BAR_VE, j - 1);
    }
    if (n_tiles > 0) load(tv, F::OFF_V, F::BAR_VF, F::BAR_VE, n_tiles - 1);
}

// One consumer warpgroup (`wgc` 0 or 1): query rows m0 + 64·wgc .. +63 of head h.
template <int D>
__device__ __forceinline__ void fwd_consumer(const UlTmaMap *to, uint32_t base,
                                             const UlAttnShape &s, float scale,
                                             float *__restrict__ lse, int h, int m0, int n_tiles,
                                             int delta, int wgc) {
    using F = Fwd<D>;
    constexpr int BM = F::BM, BN = F::BN, ST = F::STAGES;
    auto bar = [&](int i) { return base + F::OFF_BAR + 8 * i; };
    const int ct = threadIdx.x & 127, warp = ct >> 5, lane = ct & 31, g = lane >> 2, t4 = lane & 3;
    const int m0w = m0 + 64 * wgc;
    const int row_base = m0w + warp * 16 + g;  // this lane's rows: row_base, row_base + 8
    const float sl2 = scale * LOG2E;

    // Descriptors: Q rows of this warpgroup (K-major), K and V stage 0; offsets added per step.
    const uint64_t dq = desc_sw128(base + 64 * wgc * 128, 16, 1024);
    const uint64_t dk = desc_sw128(base + F::OFF_K, 16, 1024);
    const uint64_t dv = desc_sw128(base + F::OFF_V, BN * 128, 1024);
    auto dsc = [](uint64_t d, uint32_t bytes) { return d + (bytes >> 4); };

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float sc[BN / 8][4];
    uint32_t p[BN / 16][4];
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};

    // S = Q·K_jᵀ into sc (wgmma; issued, not waited).
    auto issue_qk = [&](int j) {
        const int st = j % ST;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const uint32_t koff = (kk / 4) * BN * 128 + (kk % 4) * 32;
            const uint32_t qoff = (kk / 4) * BM * 128 + (kk % 4) * 32;
            wgmma_ss_n128(sc, dsc(dq, qoff), dsc(dk, st * F::KV_BYTES + koff), kk > 0);
        }
        wg_commit();
    };
    // O += P·V_j (P of tile j in registers).
    auto issue_pv = [&](int j) {
        const int st = j % ST;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
            wgmma_pv<D>(o, p[kk], dsc(dv, st * F::KV_BYTES + kk * 16 * 128));
        wg_commit();
    };
    // Each warp's lane 0 releases a stage buffer once its warpgroup's products read it.
    auto release = [&](int b) {
        __syncwarp();
        if (lane == 0) mbar_arrive(bar(b));
    };

    // Mask (only tiles that cross the end of the keys or the diagonal of one of these rows), then
    // the online softmax in place: sc becomes exp(S·scale − running max); corr rescales what came
    // before. A row with no visible key so far keeps max −∞; `ms` = 0 then makes every exp2 of −∞
    // exactly 0 instead of NaN.
    float corr[2], sum[2];
    auto softmax = [&](int j) {
        const int n0 = j * BN;
        if (n0 + BN > s.kv_len || (s.causal && n0 + BN - 1 > m0w + delta)) {
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int jj = n0 + nt * 8 + 2 * t4 + (c & 1), i = row_base + 8 * (c >> 1);
                    if (jj >= s.kv_len || (s.causal && jj > i + delta)) sc[nt][c] = -INFINITY;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = mrow[r];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
                mx = fmaxf(mx, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float ms = mx == -INFINITY ? 0.f : mx * sl2;
            corr[r] = exp2f(mrow[r] * sl2 - ms);
            mrow[r] = mx;
            float acc = 0.f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                const float p0 = exp2f(fmaf(sc[nt][2 * r], sl2, -ms));
                const float p1 = exp2f(fmaf(sc[nt][2 * r + 1], sl2, -ms));
                sc[nt][2 * r] = p0;
                sc[nt][2 * r + 1] = p1;
                acc += p0 + p1;
            }
            sum[r] = acc;
        }
    };
    // Once no product reads O or P: rescale O and the running sums (from the unrounded
    // probabilities), and round P to bf16 A fragments for the next turn's P·V.
    auto rescale_and_convert = [&]() {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            lrow[r] = lrow[r] * corr[r] + sum[r];
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                o[dt][2 * r] *= corr[r];
                o[dt][2 * r + 1] *= corr[r];
            }
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) c_to_a(sc[2 * kk], sc[2 * kk + 1], p[kk]);
    };

    mbar_wait(bar(F::BAR_Q), 0);
    // The tensor-core turn: consumer 0 goes first (consumer 1 lends it the first arrival). Each
    // consumer takes n_tiles + 1 turns (one with no tile), each a sync on its own barrier and an
    // arrival on the other's.
    const int my_turn = F::NB_TURN + wgc, other_turn = F::NB_TURN + (wgc ^ 1);
    if (wgc == 1) bar_arrive(other_turn, 256);

    if (n_tiles > 0) {
        // Tile 0: S only.
        mbar_wait(bar(F::BAR_KF), 0);
        bar_sync(my_turn, 256);
        wg_fence();
        issue_qk(0);
        bar_arrive(other_turn, 256);
        wg_wait<0>();
        reg_fence(sc);
        release(F::BAR_KE);
        softmax(0);
        rescale_and_convert();
        // Tile j: S_j = Q·K_jᵀ and O += P_{j−1}·V_{j−1} in one turn; softmax of S_j while the
        // second product runs; O rescaled once it is done.
        for (int j = 1; j < n_tiles; ++j) {
            const int st = j % ST, sv = (j - 1) % ST;
            mbar_wait(bar(F::BAR_KF + st), (j / ST) & 1);
            mbar_wait(bar(F::BAR_VF + sv), ((j - 1) / ST) & 1);
            bar_sync(my_turn, 256);
            reg_fence(o);
            reg_fence(p);
            wg_fence();
            issue_qk(j);
            issue_pv(j - 1);
            bar_arrive(other_turn, 256);
            wg_wait<1>();
            reg_fence(sc);
            release(F::BAR_KE + st);
            softmax(j);
            wg_wait<0>();
            reg_fence(o);
            reg_fence(p);
            release(F::BAR_VE + sv);
            rescale_and_convert();
        }
        // The last tile's P·V.
        const int jl = n_tiles - 1;
        mbar_wait(bar(F::BAR_VF + jl % ST), (jl / ST) & 1);
        bar_sync(my_turn, 256);
        reg_fence(o);
        reg_fence(p);
        wg_fence();
        issue_pv(jl);
        bar_arrive(other_turn, 256);
        wg_wait<0>();
        reg_fence(o);
    } else {
        bar_sync(my_turn, 256);
        bar_arrive(other_turn, 256);
    }
    // Consumer 1 arrived on consumer 0's turn once more than consumer 0 waited (the first
    // arrival): take it, so no barrier is left half-arrived at exit.
    if (wgc == 0) bar_sync(my_turn, 256);

    // Normalise; log-sum-exp; O (bf16) into this warpgroup's rows of the Q tile (no longer read)
    // in the swizzled layout, then one tensor store per 64-column block (rows past q_len clipped).
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
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = 64 * wgc + warp * 16 + g + 8 * r;  // row of the 128-row tile
            const uint32_t a = base + (dt / 8) * BM * 128 + row * 128 +
                               (((dt % 8) ^ (row & 7)) << 4) + 4 * t4;
            const uint32_t v = pack_bf16(o[dt][2 * r], o[dt][2 * r + 1]);
            asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(a), "r"(v) : "memory");
        }
    }
    fence_async_shared();
    bar_sync(F::NB_WG + wgc, 128);
    if (ct == 0 && m0w < s.q_len) {
#pragma unroll
        for (int hf = 0; hf < F::HALVES; ++hf)
            tma_store_3d(to, 64 * hf, h, m0w, base + hf * BM * 128 + 64 * wgc * 128);
        tma_store_commit_and_drain();
    }
}

template <int D>
__device__ __forceinline__ void fwd(const UlTmaMap *tq, const UlTmaMap *tk, const UlTmaMap *tv,
                                    const UlTmaMap *to, const UlAttnShape &s, float scale,
                                    float *__restrict__ lse) {
    using F = Fwd<D>;
    extern __shared__ __align__(1024) unsigned char smem[];
    const uint32_t base = (smem_u32(smem) + 1023u) & ~1023u;
    const int h = blockIdx.x, kvh = h / (s.n_q / s.n_kv);
    // The last query tiles (most keys under the causal mask) first.
    const int m0 = (gridDim.y - 1 - blockIdx.y) * F::BM;
    const int delta = visibility_delta(s);
    const int n_tiles = (visible_key_end(s, m0, F::BM, delta) + F::BN - 1) / F::BN;

    if (threadIdx.x == 0) {
        mbar_init(base + F::OFF_BAR + 8 * F::BAR_Q, 1);
#pragma unroll
        for (int st = 0; st < F::STAGES; ++st) {
            mbar_init(base + F::OFF_BAR + 8 * (F::BAR_KF + st), 1);
            mbar_init(base + F::OFF_BAR + 8 * (F::BAR_VF + st), 1);
            mbar_init(base + F::OFF_BAR + 8 * (F::BAR_KE + st), F::CONSUMER_WARPS);
            mbar_init(base + F::OFF_BAR + 8 * (F::BAR_VE + st), F::CONSUMER_WARPS);
        }
        // The initialised barriers visible to the copy engine (the async proxy).
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        fence_async_shared();
    }
    __syncthreads();
    if (threadIdx.x < 128) {
        // Producer warpgroup: gives its registers to the consumers; one thread issues the copies.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (threadIdx.x == 0) fwd_producer<D>(tq, tk, tv, base, h, kvh, m0, n_tiles);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
        fwd_consumer<D>(to, base, s, scale, lse, h, m0, n_tiles, delta, threadIdx.x / 128 - 1);
    }
}

}  // namespace sm90

// Entry points: 384 threads (producer warpgroup, two consumer warpgroups), one block per SM
// (the register cap at entry that setmaxnreg needs). Grid (n_q, ceil(q_len / 128)). Tensor maps:
// q, k, v boxes (64, 1, 128); out box (64, 1, 64) (one consumer warpgroup's rows).
#define UL_SM90_FWD(D)                                                                         \
    extern "C" __global__ void __launch_bounds__(384, 1) ul_attn_sm90_fwd_d##D(               \
        const __grid_constant__ UlTmaMap tq, const __grid_constant__ UlTmaMap tk,              \
        const __grid_constant__ UlTmaMap tv, const __grid_constant__ UlTmaMap to,              \
        UlAttnShape s, float scale, float *lse) {                                              \
        sm90::fwd<D>(&tq, &tk, &tv, &to, s, scale, lse);                                        \
    }

UL_SM90_FWD(64)
UL_SM90_FWD(128)

#endif  // sm_90a
