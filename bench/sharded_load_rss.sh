#!/usr/bin/env bash
# Peak host memory (max RSS) per rank of `forward --tp N` on a ~193M-parameter random Llama stored
# in bf16 (369 MB on disk, 772 MB as f32): with sharded loading each rank reads only its TP slice
# of each tensor, so the peak should fall roughly as 1/tp. Writes bench/results/sharded-load-rss-DATE.json.
# Needs GNU time (/usr/bin/time: Debian package `time`) and mpirun; uses target/release/ultralong.
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/release/ultralong
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
cat > "$W/cfg.json" <<'J'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32768, "hidden_size": 1024,
 "intermediate_size": 4096, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 8,
 "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
 "tie_word_embeddings": false, "initializer_range": 0.02}
J
"$B" init --config "$W/cfg.json" --out "$W/model" --dtype bf16 >/dev/null
python3 -c "import json;print(json.dumps(list(range(1,65))))" > "$W/ids.json"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 \
  OMPI_MCA_hwloc_base_binding_policy=none OMPI_MCA_btl_vader_single_copy_mechanism=none
raw=""
for tp in 1 2 4; do
  out=$(mpirun -np $tp /usr/bin/time -f "RSS_KB %M" "$B" forward --model "$W/model" --tokens "$W/ids.json" --tp $tp 2>&1)
  raw+="tp=$tp"$'\n'"$out"$'\n'
done
python3 - "$raw" <<'P'
import json, sys, datetime, re
raw = sys.argv[1]
rows = []
for block in re.split(r"(?m)^tp=", raw)[1:]:
    tp = int(block.split("\n", 1)[0])
    kb = [int(x) for x in re.findall(r"RSS_KB (\d+)", block)]
    rows.append({"name": f"max RSS per rank, tp {tp} (largest of {len(kb)} ranks)", "value": round(max(kb) / 1024, 1),
                 "unit": "MiB", "peer": "whole model as f32 (772 MB) + its bf16 file (369 MB), the pre-sharding floor",
                 "peer_value": round((192955392 * 4 + 369e6) / 2**20, 1)})
date = datetime.date.today().isoformat()
res = {"device": "CPU (2-core x86_64 VM, Debian bookworm)", "command": "bash bench/sharded_load_rss.sh",
       "date": date, "rows": rows, "raw": raw}
path = f"bench/results/sharded-load-rss-{date}.json"
open(path, "w").write(json.dumps(res, indent=1) + "\n")
print(path); [print(r["name"], r["value"], r["unit"]) for r in rows]
P
