"""Check our Megatron indexed datasets against megatron-core (not run in CI).

`cargo test --lib data::indexed::tests::write_megatron_fixture -- --ignored` with
ULTRALONG_INDEXED_FIXTURE=DIR writes DIR/ours_{i32,u8,u16}.{bin,idx}. This script then
1. opens each with megatron-core's IndexedDataset and checks tokens, sizes and document indices
   against the same formula the Rust test used;
2. writes the same data with megatron-core's IndexedDatasetBuilder to DIR/megatron_* and checks that
   both .bin and .idx are byte-identical to ours (so each side reads what the other writes).

Usage: python bench/check_megatron_indexed.py DIR
"""

import filecmp
import sys

import numpy
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

DTYPES = {"i32": (numpy.int32, 128_256), "u8": (numpy.uint8, 256), "u16": (numpy.uint16, 65_536)}


def fixture(modulus):
    """Documents of sequences; must match `megatron_fixture_docs` in src/data/indexed.rs."""
    docs = []
    for d in range(6):
        seqs = []
        for s in range(d % 3 + 1):
            n = (7 * d + 3 * s) % 11  # includes empty sequences
            seqs.append([((d * 1000 + s * 100 + t) * 997) % modulus for t in range(n)])
        docs.append(seqs)
    return docs


def main(directory):
    ok = True
    for name, (dtype, modulus) in DTYPES.items():
        docs = fixture(modulus)
        seqs = [s for d in docs for s in d]
        ours = f"{directory}/ours_{name}"
        ds = IndexedDataset(ours)
        doc_idx = [0]
        for d in docs:
            doc_idx.append(doc_idx[-1] + len(d))
        checks = {
            "dtype": ds.index.dtype == dtype,
            "len": len(ds) == len(seqs),
            "sizes": ds.sequence_lengths.tolist() == [len(s) for s in seqs],
            "document_indices": ds.document_indices.tolist() == doc_idx,
            "tokens": all(ds[i].tolist() == s for i, s in enumerate(seqs)),
            "partial get": all(
                ds.get(i, offset=1, length=2).tolist() == s[1:3]
                for i, s in enumerate(seqs)
                if len(s) >= 3
            ),
        }
        theirs = f"{directory}/megatron_{name}"
        builder = IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
        for d in docs:
            for s in d:
                builder.add_item(torch.tensor(s, dtype=torch.int64))
            builder.end_document()
        builder.finalize(theirs + ".idx")
        for ext in ("bin", "idx"):
            checks[f"{ext} byte-identical to megatron's builder"] = filecmp.cmp(
                f"{ours}.{ext}", f"{theirs}.{ext}", shallow=False
            )
        for what, good in checks.items():
            print(f"{name:4} {what:40} {'ok' if good else 'FAIL'}")
            ok &= good
    print("megatron-core reads ours and writes the same bytes" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
