"""A CPU model of the index math and the synchronisation of cuda/attention_sm90.cu, checked without a GPU.

bench/gpu/flash_fragments.py does this for the mma.sync kernels; this file does it for the Hopper
forward. Each piece of hardware behaviour is written once below from its definition in the PTX ISA
(CUDA 13.0), and the kernel's own formulas (mirrored here: keep them in step with the .cu) are
checked against it, exhaustively over every index, with exact integer products:

- TMA's 128-byte swizzle (PTX ISA, "Tensor Swizzling Modes" under "Tensor Copy"): a box is laid out
  densely, row-major with its innermost dimension contiguous, and within each 1024-byte span the
  16-byte chunk index (address bits 4-6) is XORed with the 128-byte row index (bits 7-9).
- The wgmma shared-memory operand layouts (PTX ISA, "Asynchronous Warpgroup Level Matrix Shared
  Memory Layout": "Shared Memory Matrix Layout" with its K-major and MN-major canonical layouts per
  swizzle mode, and "Matrix Descriptor Format"): a descriptor holds start address, leading and
  stride byte offsets (LBO, SBO) >> 4 and the swizzle mode; with the 128-byte swizzle an operand is
  made of 8-row × 128-byte atoms. K-major: element (mn, k) at start + (mn / 8)·SBO + (mn % 8)·128
  + 2k; MN-major: element (k, mn) at start + (mn / 64)·LBO + (k / 8)·SBO + (k % 8)·128 + 2·(mn % 64);
  the swizzle then applies to the address as TMA's does (pattern bases 1024-byte aligned, base
  offset 0; a k16 step inside an atom moves the start by 32 bytes).
- The wgmma register fragments (PTX ISA, "Register Fragments" of "Asynchronous Warpgroup Level
  Matrix Multiply-Accumulate", shapes .m64nNk16): accumulator D register i of thread T (warp
  w = T / 32 of the warpgroup, lane l): row 16w + l/4 + 8·((i/2) % 2), column 8·(i/4) + 2·(l % 4)
  + i % 2; A from registers (.bf16, 8 elements a0..a7 in 4 registers): row 16w + l/4 + 8·((e/2) % 2),
  column 2·(l % 4) + e % 2 + 8·(e / 4).
- mbarrier phases (PTX ISA, "mbarrier" and "mbarrier.test_wait/try_wait"): a phase completes when its
  pending arrivals and transaction bytes reach zero; try_wait.parity(P) succeeds once the phase
  with parity P, the current or the one before it, has completed.
- Named barriers (PTX ISA, "bar, barrier"): a generation completes when `count` threads have
  arrived (bar.arrive or bar.sync); bar.sync waits for it.

Run: python3 bench/gpu/sm90_fragments.py (plain Python, a few seconds; run by tests/cuda_sm90.rs).
"""
import random
import sys

BM = BN = 128


# ---------------------------------------------------------------- definitions (PTX ISA)
def swizzle128(addr):
    """The 128-byte swizzle of a shared-memory byte address (1024-byte-aligned pattern base)."""
    return addr ^ (((addr >> 7) & 7) << 4)


def tma_box_addr(base, row, col):
    """Where a TMA copy with SWIZZLE_128B puts element (row, col) of a box 64 bf16 wide."""
    assert base % 1024 == 0 and 0 <= col < 64
    return swizzle128(base + row * 128 + col * 2)


def desc_fields(desc):
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    base_offset = (desc >> 49) & 7
    mode = desc >> 62
    return start, lbo, sbo, base_offset, mode


def kmajor_addr(desc, mn, k):
    """Byte address of element (mn, k), k < 16, of a K-major operand with the 128-byte swizzle."""
    start, _lbo, sbo, base_offset, mode = desc_fields(desc)
    assert mode == 1 and base_offset == 0 and 0 <= k < 16
    return swizzle128(start + (mn // 8) * sbo + (mn % 8) * 128 + 2 * k)


def mnmajor_addr(desc, k, mn):
    """Byte address of element (k, mn), k < 16, of an MN-major operand with the 128-byte swizzle."""
    start, lbo, sbo, base_offset, mode = desc_fields(desc)
    assert mode == 1 and base_offset == 0 and 0 <= k < 16
    return swizzle128(start + (mn // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + 2 * (mn % 64))


def d_frag(thread, i):
    """(row, col) of accumulator register i of warpgroup thread `thread` (m64nNk16)."""
    w, l = thread // 32, thread % 32
    return 16 * w + l // 4 + 8 * ((i // 2) % 2), 8 * (i // 4) + 2 * (l % 4) + i % 2


def a_frag(thread, e):
    """(row, col) of A element e (0..7; register e / 2, half e % 2) of thread `thread` (m64nNk16)."""
    w, l = thread // 32, thread % 32
    return 16 * w + l // 4 + 8 * ((e // 2) % 2), 2 * (l % 4) + e % 2 + 8 * (e // 4)


# ---------------------------------------------------------------- the kernel's formulas (mirrored)
def desc_sw128(addr, lbo, sbo):  # sm90::desc_sw128
    return ((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (1 << 62)


def dsc(d, nbytes):  # the lambda `dsc` in fwd_consumer
    return d + (nbytes >> 4)


class Layout:
    """Fwd<D>'s shared-memory offsets (from the 1024-byte-aligned base, taken as `base`)."""

    def __init__(self, d, base=0x400):
        self.d, self.base = d, base
        self.halves = d // 64
        self.q_bytes, self.kv_bytes = BM * d * 2, BN * d * 2
        self.off_k = self.q_bytes
        self.off_v = self.off_k + 2 * self.kv_bytes
        self.off_bar = self.off_v + 2 * self.kv_bytes
        self.smem = 1024 + self.off_bar + 8 * 9  # flash_sm90.rs's smem_fwd


def tma_fill(mem, lay, off, mat):
    """The producer's copies of a [rows][D] tile: one box per 64-column block at off + hf·rows·128."""
    rows = len(mat)
    for hf in range(lay.halves):
        blk = lay.base + off + hf * rows * 128
        for r in range(rows):
            for c in range(64):
                a = tma_box_addr(blk, r, c)
                assert a not in mem, "two elements at one address"
                mem[a] = mat[r][64 * hf + c]


def rand(r, c):
    return [[random.randint(-3, 3) for _ in range(c)] for _ in range(r)]


def matmul(a, b):
    return [[sum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]


def tr(a):
    return [list(x) for x in zip(*a)]


def wgmma(acc, a_of, b_of, n):
    """acc[64][n] += A·B for one k16 step, A and B given as element functions."""
    for m in range(64):
        row = [a_of(m, k) for k in range(16)]
        for j in range(n):
            acc[m][j] += sum(row[k] * b_of(k, j) for k in range(16))


def check_forward(d, wgc, st):
    """S = Q·Kᵀ and O = P·V of consumer `wgc` through the descriptors of stage `st`."""
    lay = Layout(d)
    Q, K, V = rand(BM, d), rand(BN, d), rand(BN, d)
    mem = {}
    tma_fill(mem, lay, 0, Q)
    tma_fill(mem, lay, lay.off_k + st * lay.kv_bytes, K)
    tma_fill(mem, lay, lay.off_v + st * lay.kv_bytes, V)
    dq = desc_sw128(lay.base + 64 * wgc * 128, 16, 1024)
    dk = desc_sw128(lay.base + lay.off_k, 16, 1024)
    dv = desc_sw128(lay.base + lay.off_v, BN * 128, 1024)
    # issue_qk
    S = [[0] * BN for _ in range(64)]
    for kk in range(d // 16):
        koff = (kk // 4) * BN * 128 + (kk % 4) * 32
        qoff = (kk // 4) * BM * 128 + (kk % 4) * 32
        da, db = dsc(dq, qoff), dsc(dk, st * lay.kv_bytes + koff)
        wgmma(S, lambda m, k: mem[kmajor_addr(da, m, k)], lambda k, n: mem[kmajor_addr(db, n, k)], BN)
    assert S == matmul(Q[64 * wgc:64 * wgc + 64], tr(K)), "S = Q·Kᵀ through the descriptors"
    # The accumulator in registers: sc[nt][e] of thread T = register 4·nt + e.
    sc = [[[None] * 4 for _ in range(BN // 8)] for _ in range(128)]
    for T in range(128):
        for i in range(BN // 2):
            r, c = d_frag(T, i)
            sc[T][i // 4][i % 4] = S[r][c]
    # The softmax's row bookkeeping: the kernel's row_base + 8·r and column n0 + 8·nt + 2·t4 + (c & 1).
    for T in range(128):
        warp, lane = T // 32, T % 32
        for nt in range(BN // 8):
            for c in range(4):
                assert d_frag(T, 4 * nt + c) == (warp * 16 + lane // 4 + 8 * (c >> 1), nt * 8 + 2 * (lane % 4) + (c & 1))
    # c_to_a: p[kk] = (sc[2kk][0,1], sc[2kk][2,3], sc[2kk+1][0,1], sc[2kk+1][2,3]) → A elements a0..a7.
    O = [[0] * d for _ in range(64)]
    for kk in range(BN // 16):
        A = [[None] * 16 for _ in range(64)]
        for T in range(128):
            lo, hi = sc[T][2 * kk], sc[T][2 * kk + 1]
            elems = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
            for e in range(8):
                r, c = a_frag(T, e)
                A[r][c] = elems[e]
        assert A == [row[16 * kk:16 * kk + 16] for row in S], "P from the S registers (c_to_a)"
        db = dsc(dv, st * lay.kv_bytes + kk * 16 * 128)
        wgmma(O, lambda m, k: A[m][k], lambda k, n: mem[mnmajor_addr(db, k, n)], d)
    assert O == matmul(S, V), "O = P·V through the transposed descriptor"
    return lay, O


def check_epilogue(d, wgc):
    """The kernel's st.shared addresses of O equal where the out tensor map's box (64 rows at
    base + hf·BM·128 + 64·wgc·128) expects each element; no bank conflicts per store."""
    lay = Layout(d)
    for T in range(128):
        warp, lane = T // 32, T % 32
        g, t4 = lane // 4, lane % 4
        for dt in range(d // 8):
            for r in range(2):
                row = 64 * wgc + warp * 16 + g + 8 * r
                a = lay.base + (dt // 8) * BM * 128 + row * 128 + (((dt % 8) ^ (row & 7)) << 4) + 4 * t4
                box = lay.base + (dt // 8) * BM * 128 + 64 * wgc * 128
                col = dt * 8 + 2 * t4
                assert a == tma_box_addr(box, row - 64 * wgc, col % 64), "epilogue address"
    for warp in range(4):
        for dt in range(d // 8):
            for r in range(2):
                banks = set()
                for lane in range(32):
                    row = 64 * wgc + warp * 16 + lane // 4 + 8 * r
                    a = lay.base + (dt // 8) * BM * 128 + row * 128 + (((dt % 8) ^ (row & 7)) << 4) + 4 * (lane % 4)
                    banks.add((a // 4) % 32)
                assert len(banks) == 32, "bank conflict in the O store"


def check_descriptors(d):
    """Every descriptor the kernel forms: fields as meant, no carry out of the address field,
    the smem fits Hopper's 227 KiB per block, every TMA destination 1024-byte aligned."""
    lay = Layout(d)
    assert lay.smem <= 227 * 1024, lay.smem
    for off in [0] + [lay.off_k + s * lay.kv_bytes for s in range(2)] + [lay.off_v + s * lay.kv_bytes for s in range(2)]:
        for hf in range(lay.halves):
            assert (lay.base + off + hf * 128 * 128) % 1024 == 0
    top = lay.base + lay.off_bar
    for wgc in range(2):
        dq = desc_sw128(lay.base + 64 * wgc * 128, 16, 1024)
        for kk in range(d // 16):
            x = dsc(dq, (kk // 4) * BM * 128 + (kk % 4) * 32)
            assert desc_fields(x)[0] == lay.base + 64 * wgc * 128 + (kk // 4) * BM * 128 + (kk % 4) * 32 < top
            assert desc_fields(x)[1:] == (16, 1024, 0, 1)
    dv = desc_sw128(lay.base + lay.off_v, BN * 128, 1024)
    for st in range(2):
        for kk in range(BN // 16):
            x = dsc(dv, st * lay.kv_bytes + kk * 2048)
            assert desc_fields(x)[:3] == (lay.base + lay.off_v + st * lay.kv_bytes + kk * 2048, BN * 128, 1024)
    assert top < (1 << 18)


# ---------------------------------------------------------------- synchronisation
class MBar:
    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def arrive(self, tx=0):
        self.pending -= 1
        self.tx += tx
        self._maybe_complete()

    def complete_tx(self, n):
        self.tx -= n
        self._maybe_complete()

    def _maybe_complete(self):
        assert self.pending >= 0
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def try_wait(self, parity):
        # The current phase has parity `phase % 2`; the wait passes once the phase of the other
        # parity (the one before) is complete. A fresh barrier (no phase complete) passes parity 1.
        return self.phase % 2 != parity


def agents(n_tiles, stages=2):
    """The kernel's producer and two consumers as generators of actions (mirroring the .cu)."""

    def producer():
        yield ("expect", "Q", 1)
        yield ("tma", "Q", 0)
        def load(kind, j):
            st = j % stages
            if j >= stages:
                yield ("wait", kind + "E", st, (j // stages - 1) & 1)
            yield ("expect", kind + "F", st)
            yield ("tma", kind, j)
        if n_tiles > 0:
            yield from load("K", 0)
        for j in range(1, n_tiles):
            yield from load("K", j)
            yield from load("V", j - 1)
        if n_tiles > 0:
            yield from load("V", n_tiles - 1)

    def consumer(wgc):
        my, other = 1 + wgc, 1 + (wgc ^ 1)
        yield ("wait", "Q", 0, 0)
        if wgc == 1:
            yield ("arrive_nb", other)
        if n_tiles > 0:
            yield ("wait", "KF", 0, 0)
            yield ("sync_nb", my)
            yield ("read", "K", 0)
            yield ("arrive_nb", other)
            yield ("release", "KE", 0)
            for j in range(1, n_tiles):
                st, sv = j % stages, (j - 1) % stages
                yield ("wait", "KF", st, (j // stages) & 1)
                yield ("wait", "VF", sv, ((j - 1) // stages) & 1)
                yield ("sync_nb", my)
                yield ("read", "K", j)
                yield ("read", "V", j - 1)
                yield ("arrive_nb", other)
                yield ("release", "KE", st)
                yield ("release", "VE", sv)
            jl = n_tiles - 1
            yield ("wait", "VF", jl % stages, (jl // stages) & 1)
            yield ("sync_nb", my)
            yield ("read", "V", jl)
            yield ("arrive_nb", other)
        else:
            yield ("sync_nb", my)
            yield ("arrive_nb", other)
        if wgc == 0:
            yield ("sync_nb", my)

    return [producer(), consumer(0), consumer(1)]


def run_protocol(n_tiles, seed, stages=2):
    """Random interleavings of the three roles; checks that no wait deadlocks, every read sees the
    tile it wants, no stage is overwritten while a consumer still needs it, and every barrier is
    balanced at exit."""
    rng = random.Random(seed)
    bars = {"Q": [MBar(1)]}
    for k in ("KF", "VF"):
        bars[k] = [MBar(1) for _ in range(stages)]
    for k in ("KE", "VE"):
        bars[k] = [MBar(8) for _ in range(stages)]  # 4 warps × 2 consumers
    stage = {"K": [None] * stages, "V": [None] * stages}
    needed = {"K": [set() for _ in range(stages)], "V": [set() for _ in range(stages)]}
    inflight = []  # TMA copies not yet landed: (kind, j)
    nb = {1: {"gen": 0, "arrived": []}, 2: {"gen": 0, "arrived": []}}
    gens = [agents(n_tiles, stages)[i] for i in range(3)]
    cur = [next(g, None) for g in gens]
    waiting_nb = {}  # agent → (barrier, generation it waits to complete)
    steps = 0
    while any(c is not None for c in cur) or inflight:
        steps += 1
        assert steps < 100000, "livelock"
        runnable = []
        for a, act in enumerate(cur):
            if act is None:
                continue
            if act[0] == "wait":
                _, b, st, par = act
                if not bars[b][st].try_wait(par):
                    continue
            if act[0] == "sync_nb" and a in waiting_nb:
                b, g = waiting_nb[a]
                if nb[b]["gen"] <= g:
                    continue
            runnable.append(a)
        choices = runnable + (["land"] if inflight else [])
        assert choices, f"deadlock at n_tiles={n_tiles}: {cur}"
        a = rng.choice(choices)
        if a == "land":
            kind, j = inflight.pop(rng.randrange(len(inflight)))
            if kind == "Q":
                bars["Q"][0].complete_tx(1)
            else:
                st = j % stages
                stage[kind][st] = j
                needed[kind][st] = {1, 2}
                bars[kind + "F"][st].complete_tx(1)
            continue
        act = cur[a]
        op = act[0]
        advance = True
        if op == "expect":
            if act[1] == "Q":
                bars["Q"][0].arrive(tx=1)
            else:
                bars[act[1]][act[2]].arrive(tx=1)
        elif op == "tma":
            kind, j = act[1], act[2]
            if kind != "Q":
                st = j % stages
                assert not needed[kind][st], f"{kind}{j} issued over a tile still needed"
                stage[kind][st] = None  # being written
            inflight.append((kind, j))
        elif op == "read":
            kind, j = act[1], act[2]
            st = j % stages
            assert stage[kind][st] == j, f"consumer reads {kind}{j} but stage holds {stage[kind][st]}"
        elif op == "release":
            kind = act[1][0]
            st = act[2]
            needed[kind][st].discard(a)
            for _ in range(4):
                bars[act[1]][st].arrive()
        elif op == "arrive_nb":
            b = act[1]
            assert a not in nb[b]["arrived"], "one warpgroup arrived twice in one generation"
            nb[b]["arrived"].append(a)
            if len(nb[b]["arrived"]) == 2:
                nb[b]["gen"] += 1
                nb[b]["arrived"] = []
        elif op == "sync_nb":
            b = act[1]
            if a not in waiting_nb:
                assert a not in nb[b]["arrived"], "one warpgroup arrived twice in one generation"
                waiting_nb[a] = (b, nb[b]["gen"])
                nb[b]["arrived"].append(a)
                if len(nb[b]["arrived"]) == 2:
                    nb[b]["gen"] += 1
                    nb[b]["arrived"] = []
                advance = nb[b]["gen"] > waiting_nb[a][1]
            if advance:
                del waiting_nb[a]
        if advance:
            cur[a] = next(gens[a], None)
    for b in (1, 2):
        assert nb[b]["arrived"] == [], f"named barrier {b} half-arrived at exit"


def main():
    random.seed(1)
    # try_wait.parity on a fresh barrier: parity 1 passes at once, parity 0 waits.
    m = MBar(1)
    assert m.try_wait(1) and not m.try_wait(0)
    m.arrive()
    assert m.try_wait(0) and not m.try_wait(1)
    m.arrive()
    assert m.try_wait(1) and not m.try_wait(0)
    for d in (64, 128):
        check_descriptors(d)
        for wgc in (0, 1):
            check_epilogue(d, wgc)
        for wgc, st in ((0, 0), (1, 1)):
            check_forward(d, wgc, st)
    for n_tiles in range(0, 7):
        for seed in range(40):
            run_protocol(n_tiles, seed)
    print("sm90 model: swizzle, descriptors, fragments, products, epilogue, pipeline protocol: all pass")


if __name__ == "__main__":
    sys.exit(main())
