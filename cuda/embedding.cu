// Token embedding forward (gather) and a deterministic backward: the host groups token positions
// by id (a stable sort, so each id's tokens stay in token order); one block per distinct id sums
// its rows in that order and adds the sum into the table row. No atomics.
#include "common.cuh"

#define UL_NOT_IN_SHARD 0xffffffffu

// grid (n_tokens, ceil(dim/blockDim)): tokens on x, whose limit is 2^31 - 1 (y stops at 65535).
extern "C" __global__ void ul_embedding_fwd(const void *table, int dtt, const unsigned *ids,
                                            int n_tokens, int dim, void *out, int dto) {
    int t = blockIdx.x;
    int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= n_tokens || i >= dim) return;
    unsigned id = ids[t];
    float v = id == UL_NOT_IN_SHARD ? 0.f : ld(table, dtt, (i64)id * dim + i);
    st(out, dto, (i64)t * dim + i, v);
}

// order[seg_start[s] .. seg_start[s+1]] are the token positions of id seg_id[s], ascending.
// grid (n_segments, ceil(dim/blockDim))
extern "C" __global__ void ul_embedding_bwd(void *dtable, int dtt, const void *dout, int dtd,
                                            const int *order, const int *seg_start,
                                            const unsigned *seg_id, int n_segments, int dim) {
    int s = blockIdx.x;
    int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (s >= n_segments || i >= dim) return;
    float acc = 0.f;
    for (int j = seg_start[s]; j < seg_start[s + 1]; ++j) acc += ld(dout, dtd, (i64)order[j] * dim + i);
    i64 o = (i64)seg_id[s] * dim + i;
    st(dtable, dtt, o, ld(dtable, dtt, o) + acc);
}
