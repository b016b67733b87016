#!/usr/bin/env python3
"""Writes tests/fixtures/parquet/docs.{parquet,jsonl}: the same 40 documents as Parquet (snappy,
row groups of 7 rows, as HF datasets ship them) and as JSON Lines, so a test can check that
`prepare cpt` reads both to identical datasets. Needs pyarrow (`.venv/bin/pip install pyarrow`)."""
import json, pathlib
import pyarrow as pa, pyarrow.parquet as pq

out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/parquet"
out.mkdir(parents=True, exist_ok=True)
docs = [{"text": f"document {i}: " + " ".join(f"w{(i * 7 + w) % 50}" for w in range(5 + (i * 37) % 90)) + f" end{i}",
         "domain": ["web", "code", "books"][i % 3], "id": i} for i in range(40)]
pq.write_table(pa.Table.from_pylist(docs), out / "docs.parquet", row_group_size=7, compression="snappy")
with open(out / "docs.jsonl", "w") as f:
    for d in docs:
        f.write(json.dumps(d) + "\n")
print("wrote", out)
