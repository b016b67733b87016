#!/usr/bin/env python3
"""Python peer of `ultralong prepare cpt`: what a user would otherwise run.

    prepare_peer.py --input corpus.jsonl --tokenizer tokenizer.json --out-prefix DIR/peer [--batch 1000]

Streams the JSON Lines file, batch-encodes the "text" field with HF `tokenizers`
(Tokenizer.encode_batch, add_special_tokens=False, both cores via RAYON_NUM_THREADS /
TOKENIZERS_PARALLELISM), appends the `<s>` separator id after each document, and writes a Megatron
indexed dataset with megatron-core's IndexedDatasetBuilder (int32; one item + end_document() per
document; finalize() writes the .idx). No resampling, no packing: it does less work than ours.
Prints one JSON line: {tokens, docs, seconds, tokens_per_s, peak_rss_bytes, ...}; `tokens` counts
document tokens without separators (the same quantity as our report's tokens_in).
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("RAYON_NUM_THREADS", str(os.cpu_count() or 2))

import argparse
import json
import resource
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import numpy
import torch
import tokenizers
from tokenizers import Tokenizer
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out-prefix", required=True)
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--separator", default="<s>")
    ap.add_argument("--batch", type=int, default=1000)
    a = ap.parse_args()

    rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(a.tokenizer)
    sep = tok.token_to_id(a.separator)
    if sep is None:
        sys.exit(f"separator {a.separator!r} not in the tokenizer")
    builder = IndexedDatasetBuilder(a.out_prefix + ".bin", dtype=numpy.int32)
    n_tokens = n_docs = 0

    def flush(texts):
        nonlocal n_tokens, n_docs
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            ids = enc.ids
            n_tokens += len(ids)
            n_docs += 1
            builder.add_item(torch.IntTensor(ids + [sep]))
            builder.end_document()

    batch = []
    with open(a.input, "r", encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)[a.text_field])
            if len(batch) >= a.batch:
                flush(batch)
                batch = []
    if batch:
        flush(batch)
    builder.finalize(a.out_prefix + ".idx")
    dt = time.perf_counter() - t0
    print(json.dumps({
        "tokens": n_tokens,
        "tokens_with_separators": n_tokens + n_docs,
        "docs": n_docs,
        "seconds": round(dt, 3),
        "tokens_per_s": n_tokens / dt,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_import_bytes": rss_import,
        "tokenizers": tokenizers.__version__,
        "rayon_threads": os.environ.get("RAYON_NUM_THREADS"),
        "batch": a.batch,
    }))


if __name__ == "__main__":
    main()
