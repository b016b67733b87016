"""A CPU model of the index math of cuda/attention_flash.cuh, checked without a GPU.

It mirrors `swz`, the four ldmatrix address helpers and `c_to_a`, models `ldmatrix` (plain and
.trans) and `mma.m16n8k16` from the fragment tables of the PTX ISA, and checks that the products the
kernels build from them are the matrix products they mean: S = Q·Kᵀ and O = P·V (forward), the
transposed products of the dK/dV kernel, and dQ = dS·K from dSᵀ stored in shared memory. Plain
Python (no numpy), small integer matrices, exact. Run: python3 bench/gpu/flash_fragments.py
"""
import random
import sys


def swz(w, row, ch):
    x = (row & 7) if w >= 8 else ((row >> 1) & 3)
    return (row * w + (ch ^ x)) * 16


def a_addr(w, lane, r0, c0):
    return swz(w, r0 + (lane & 15), (c0 >> 3) + (lane >> 4))


def b_nk_addr(w, lane, n0, k0):
    return swz(w, n0 + (lane & 7) + ((lane >> 4) << 3), (k0 >> 3) + ((lane >> 3) & 1))


def b_kn_addr(w, lane, k0, n0):
    return swz(w, k0 + (lane & 7) + (((lane >> 3) & 1) << 3), (n0 >> 3) + (lane >> 4))


def at_addr(w, lane, k0, m0):
    return swz(w, k0 + (lane & 7) + ((lane >> 4) << 3), (m0 >> 3) + ((lane >> 3) & 1))


class Smem:
    """A tile of `rows` × (8·w) elements stored through swz (one element per 2-byte slot)."""

    def __init__(self, mat, w):
        self.w, self.mem = w, {}
        for r, row in enumerate(mat):
            for c, x in enumerate(row):
                self.mem[swz(w, r, c // 8) + 2 * (c % 8)] = x

    def row8(self, addr):
        assert addr % 16 == 0
        return [self.mem[addr + 2 * e] for e in range(8)]


def ldsm_x4(sm, addrs, trans=False):
    """addrs[lane] → regs[lane] = 4 pairs (register j from matrix j)."""
    mats = [[sm.row8(addrs[8 * j + r]) for r in range(8)] for j in range(4)]
    out = []
    for i in range(32):
        regs = []
        for j in range(4):
            m = mats[j]
            if trans:
                regs.append((m[2 * (i % 4)][i // 4], m[2 * (i % 4) + 1][i // 4]))
            else:
                regs.append((m[i // 4][2 * (i % 4)], m[i // 4][2 * (i % 4) + 1]))
        out.append(regs)
    return out


def mma(c, a, b0, b1):
    """c[lane] (4 floats) += A·B from per-lane fragments (PTX ISA m16n8k16 .bf16 tables)."""
    A = [[None] * 16 for _ in range(16)]
    B = [[None] * 8 for _ in range(16)]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for reg, (r, k) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            A[r][k], A[r][k + 1] = a[lane][reg]
        B[2 * t][g], B[2 * t + 1][g] = b0[lane]
        B[2 * t + 8][g], B[2 * t + 9][g] = b1[lane]
    out = []
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        v = list(c[lane])
        for idx, (r, n) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
            v[idx] += sum(A[r][k] * B[k][n] for k in range(16))
        out.append(v)
    return out


def c_to_a(lo, hi):
    return [[(lo[l][0], lo[l][1]), (lo[l][2], lo[l][3]), (hi[l][0], hi[l][1]), (hi[l][2], hi[l][3])] for l in range(32)]


def rand(r, c):
    return [[random.randint(-3, 3) for _ in range(c)] for _ in range(r)]


def matmul(a, b):
    return [[sum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]


def tr(a):
    return [list(x) for x in zip(*a)]


def c_matrix(cs, rows):
    """Per-lane C fragments of 16×8 tiles (list over n-tiles) → the 16 × 8·len(cs) matrix."""
    m = [[None] * (8 * len(cs)) for _ in range(rows)]
    for nt, c in enumerate(cs):
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for idx, (r, n) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
                m[r][8 * nt + n] = c[lane][idx]
    return m


def zero():
    return [[0, 0, 0, 0] for _ in range(32)]


def check_forward(d, bn, warp_row0):
    w = d // 8
    Q, K, V = rand(64, d), rand(bn, d), rand(bn, d)
    sq, sk, sv = Smem(Q, w), Smem(K, w), Smem(V, w)
    qf = [ldsm_x4(sq, [a_addr(w, l, warp_row0, kk * 16) for l in range(32)]) for kk in range(d // 16)]
    sc = [zero() for _ in range(bn // 8)]
    for kk in range(d // 16):
        for np_ in range(bn // 16):
            b = ldsm_x4(sk, [b_nk_addr(w, l, np_ * 16, kk * 16) for l in range(32)])
            sc[2 * np_] = mma(sc[2 * np_], qf[kk], [x[0] for x in b], [x[1] for x in b])
            sc[2 * np_ + 1] = mma(sc[2 * np_ + 1], qf[kk], [x[2] for x in b], [x[3] for x in b])
    S = c_matrix(sc, 16)
    want = matmul(Q[warp_row0:warp_row0 + 16], tr(K))
    assert S == want, "forward S = Q·Kᵀ"
    o = [zero() for _ in range(d // 8)]
    for kk in range(bn // 16):
        a = c_to_a(sc[2 * kk], sc[2 * kk + 1])
        for dp in range(d // 16):
            b = ldsm_x4(sv, [b_kn_addr(w, l, kk * 16, dp * 16) for l in range(32)], trans=True)
            o[2 * dp] = mma(o[2 * dp], a, [x[0] for x in b], [x[1] for x in b])
            o[2 * dp + 1] = mma(o[2 * dp + 1], a, [x[2] for x in b], [x[3] for x in b])
    assert c_matrix(o, 16) == matmul(S, V), "forward O = P·V"


def check_dq_from_transposed(d, bm, bn, wm, wn, ntw):
    """dSᵀ [bn][bm] in shared memory (W = bm/8 chunks), A by at_addr + .trans; B = K by b_kn_addr."""
    w, ws = d // 8, bm // 8
    dsT, K = rand(bn, bm), rand(bn, d)
    sds, sk = Smem(dsT, ws), Smem(K, w)
    acc = [zero() for _ in range(ntw)]
    for kk in range(bn // 16):
        a = ldsm_x4(sds, [at_addr(ws, l, kk * 16, wm * 16) for l in range(32)], trans=True)
        for np_ in range(ntw // 2):
            b = ldsm_x4(sk, [b_kn_addr(w, l, kk * 16, (wn * ntw + 2 * np_) * 8) for l in range(32)], trans=True)
            acc[2 * np_] = mma(acc[2 * np_], a, [x[0] for x in b], [x[1] for x in b])
            acc[2 * np_ + 1] = mma(acc[2 * np_ + 1], a, [x[2] for x in b], [x[3] for x in b])
    full = matmul(tr(dsT), K)
    want = [row[wn * ntw * 8:(wn + 1) * ntw * 8] for row in full[wm * 16:wm * 16 + 16]]
    assert c_matrix(acc, 16) == want, "dQ = dS·K"


def check_bank_conflicts(w):
    """The 8 row addresses of each ldmatrix matrix fall in 8 distinct 16-byte bank groups."""
    for base in range(0, 64, 16):
        for k0 in range(0, 8 * w, 16):
            for f in (lambda l: a_addr(w, l, base, k0), lambda l: b_nk_addr(w, l, base, k0),
                      lambda l: b_kn_addr(w, l, base, k0), lambda l: at_addr(w, l, base, k0)):
                for j in range(4):
                    groups = {(f(8 * j + r) % 128) // 16 for r in range(8)}
                    assert len(groups) == 8, f"bank conflict, w={w}"


def main():
    random.seed(1)
    for d in (64, 128):
        for row0 in (0, 48):
            check_forward(d, 64, row0)
        check_bank_conflicts(d // 8)
    check_bank_conflicts(4)
    # dK/dV kernel shapes: D=128, BM=32, 4 warps (2 × 2); D=64, BM=64, 4 warps (4 × 1).
    for wm in range(2):
        for wn in range(2):
            check_dq_from_transposed(128, 32, 64, wm, wn, 8)
    for wm in range(4):
        check_dq_from_transposed(64, 64, 64, wm, 0, 8)
    print("fragment model: all products and bank-group checks pass")


if __name__ == "__main__":
    sys.exit(main())
