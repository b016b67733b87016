#!/usr/bin/env python3
"""Synthetic, text-like JSON Lines corpus for the `prepare cpt` benchmark.

    make_corpus.py OUT.jsonl [--mb 220] [--seed 1]

Each line is {"text": ..., "domain": "web"|"code_docs"|"books"}. Words are built from syllables
and drawn from a Zipfian distribution (each domain ranks the shared vocabulary differently), grouped
into sentences (capitalised, commas, periods) and paragraphs. Document lengths are log-normal,
clipped to 200..40000 words, so that all three `prepare cpt` length buckets (< 4096, 4096-8192,
> 8192 tokens) are populated. Deterministic for a given --seed; numpy does the sampling.
"""
import argparse
import json
import sys

import numpy as np

DOMAINS = ["web", "code_docs", "books"]
ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
          "z", "br", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr", "ch", "sp", "str"]
NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "oo", "io", "y"]
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt", "ss", "x"]


def make_vocab(rng, n):
    syll = np.array([o + v + c for o in ONSETS for v in NUCLEI for c in CODAS if (o + v + c)], dtype=object)
    seen, words = set(), []
    while len(words) < n:
        k = int(rng.choice([1, 2, 2, 3, 3, 4]))
        w = "".join(syll[rng.integers(0, len(syll), k)])
        if 2 <= len(w) <= 16 and w not in seen:
            seen.add(w)
            words.append(w)
    # shorter words are more frequent: sort by length with a little noise
    lens = np.array([len(w) + rng.normal(0, 2.0) for w in words])
    return [words[i] for i in np.argsort(lens, kind="stable")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mb", type=float, default=220.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=60000)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    words = make_vocab(rng, a.vocab)
    V = len(words)
    plain = np.array(words, dtype=object)
    cap = np.array([w.capitalize() for w in words], dtype=object)
    period = np.array([w + "." for w in words], dtype=object)
    comma = np.array([w + "," for w in words], dtype=object)
    para = np.array([w + ".\n\n" for w in words], dtype=object)
    # Zipf(s=1.05) over ranks; each domain ranks the vocabulary by a partially shuffled order
    ranks = np.arange(V, dtype=np.float64)
    cdf = np.cumsum(1.0 / (ranks + 2.7) ** 1.05)
    cdf /= cdf[-1]
    perms = []
    for d in range(len(DOMAINS)):
        p = np.arange(V)
        # swap ~30% of positions within local windows: shared core, domain-specific ordering
        for _ in range(3):
            i = rng.integers(0, V, V // 10)
            j = np.clip(i + rng.integers(-2000, 2000, len(i)), 0, V - 1)
            p[i], p[j] = p[j], p[i]
        perms.append(p)

    target = int(a.mb * 1e6)
    written, ndocs = 0, 0
    with open(a.out, "w", encoding="utf-8") as f:
        while written < target:
            d = int(rng.integers(0, len(DOMAINS)))
            n = int(np.clip(rng.lognormal(np.log(2200.0), 1.1), 200, 40000))
            idx = perms[d][np.searchsorted(cdf, rng.random(n))]
            toks = plain[idx]
            # sentence ends every ~Poisson(14)+3 words, paragraph ends every ~6 sentences
            slen = rng.poisson(14, n // 3 + 2) + 3
            ends = np.cumsum(slen) - 1
            ends = ends[ends < n - 1]
            starts = np.concatenate([[0], ends + 1])
            isp = rng.random(len(ends)) < 1.0 / 6
            toks[ends[~isp]] = period[idx[ends[~isp]]]
            toks[ends[isp]] = para[idx[ends[isp]]]
            cm = np.nonzero(rng.random(n) < 0.05)[0]
            cm = cm[~np.isin(cm, ends) & ~np.isin(cm, starts) & (cm < n - 1)]
            toks[cm] = comma[idx[cm]]
            toks[starts] = cap[idx[starts]]
            toks[n - 1] = period[idx[n - 1]]
            text = " ".join(toks).replace("\n\n ", "\n\n")
            line = json.dumps({"text": text, "domain": DOMAINS[d]}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            ndocs += 1
    print(json.dumps({"out": a.out, "bytes": written, "docs": ndocs, "vocab": V, "seed": a.seed}), file=sys.stderr)


if __name__ == "__main__":
    main()
