#!/usr/bin/env bash
# `make demo`: the UltraLong recipe at toy scale on the CPU, in a few minutes on 2 cores.
#   0. generate a corpus of documents with retrievable facts; train a byte-level BPE tokenizer
#   1. init a tiny Llama (llama3 RoPE, 128-token window) and pretrain it at 128 tokens
#   2. measure its loss on 1024-token sequences: beyond its window it degrades
#   3. extend the window 8x in one step with YaRN (beta_fast 4, beta_slow 1) and continue
#      pretraining at 1024 tokens on 4 MPI ranks (tensor parallel 2 x context parallel 2, zigzag
#      ring attention); measure again
#   4. export a Hugging Face directory
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/ultralong}
D=runs/demo
rm -rf "$D"
mkdir -p "$D"
t_start=$(date +%s)
# 4 ranks on whatever cores there are: oversubscribe, one compute thread per rank, root-safe.
MPIRUN=(mpirun -np 4 --oversubscribe -x RAYON_NUM_THREADS=1)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  OMPI_MCA_hwloc_base_binding_policy=none OMPI_MCA_btl_vader_single_copy_mechanism=none

echo "== 0. corpus: documents of facts (generated), a tokenizer trained on them, and datasets made by prepare"
# Each document: a topic, facts "the code of <thing> is <number>", filler, and a recall of an
# earlier fact, so long-range context helps prediction.
awk 'BEGIN {
  srand(7);
  split("red blue green amber violet silver golden black white orange", col, " ");
  split("door box key lamp gate ship tower river bridge garden", obj, " ");
  for (d = 0; d < 960; d++) {
    printf "Document %d.\n", d;
    n = 6 + int(rand() * 10);
    for (i = 0; i < n; i++) {
      c[i] = col[1 + int(rand() * 10)]; o[i] = obj[1 + int(rand() * 10)]; v[i] = 1000 + int(rand() * 9000);
      printf "The code of the %s %s is %d. ", c[i], o[i], v[i];
      if (rand() < 0.5) printf "Nothing else is known about the %s %s. ", c[i], o[i];
    }
    for (i = 0; i < n; i++) { j = int(rand() * n); printf "Recall: the %s %s has code %d. ", c[j], o[j], v[j]; }
    printf "\n\n";
  }
}' > "$D/all.txt"
# Three lines per document: the first 900 documents train, the last 60 are held out.
head -n 2700 "$D/all.txt" > "$D/corpus.txt"
# Held-out documents in the training format: "Document N.\n<facts>", joined by the <s> separator.
tail -n +2701 "$D/all.txt" | awk 'NR % 3 == 1 { head = $0 } NR % 3 == 2 { printf "%s%s\n%s", (n++ ? "<s>" : ""), head, $0 }' > "$D/eval.txt"
echo "   training text $(wc -c < "$D/corpus.txt") bytes, held-out text $(wc -c < "$D/eval.txt") bytes"
$BIN init --config configs/demo/model.json --seed 1 --out "$D/init" --train-tokenizer "$D/corpus.txt"
# One JSON line per document ("Document N." line + its facts), as a user's corpus would come.
awk 'NR % 3 == 1 { head = $0 } NR % 3 == 2 { gsub(/"/, "\\\""); printf "{\"text\": \"%s\\n%s\", \"domain\": \"facts\"}\n", head, $0 }' \
  "$D/corpus.txt" > "$D/corpus.jsonl"
# The paper's data recipe at toy scale: length-based resampling (thresholds scaled down from
# 4K/8K to 150/300 tokens), documents joined by the <s> separator, packed to the stage's length.
for L in 128 1024; do
  $BIN prepare cpt --input "$D/corpus.jsonl" --tokenizer "$D/init" --seq-len $L --tokens 400000 \
    --short 150 --long 300 --domain-field domain --seed 1 --out "$D/data-$L" > /dev/null 2> "$D/data-$L.report"
done
cat "$D/data-1024.report"

loss_at() { # model dir, tokens -> mean next-token loss on the held-out tail of the corpus
  $BIN forward --model "$1" --text "$D/eval.txt" --max-tokens "$2" | sed -E 's/.*"loss":([0-9.eE+-]+).*/\1/' | xargs printf '%.4f'
}

echo "== 1. pretrain at 128 tokens (llama3 RoPE)"
$BIN train --config configs/demo/stage0-short.toml --set log.quiet=true > "$D/stage0.jsonl"
$BIN export --checkpoint "$D/stage0" --out "$D/stage0-hf" --dtype f32
loss_of() { sed -E 's/.*"loss":([0-9.eE+-]+).*/\1/' | xargs printf '%.4f'; }
first=$(head -1 "$D/stage0.jsonl" | loss_of)
last=$(tail -1 "$D/stage0.jsonl" | loss_of)

echo "== 2. losses before the extension"
s0_128=$(loss_at "$D/stage0-hf" 128)
s0_1024=$(loss_at "$D/stage0-hf" 1024)

echo "== 3a. YaRN alone, before any training at the new length (one step at LR 0: weights unchanged)"
$BIN train --config configs/demo/stage1-extend.toml --tp 1 --cp 1 --set log.quiet=true --set train.steps=1 --set optim.lr=0.0 \
  --set optim.warmup_steps=0 --set optim.weight_decay=0.0 --set train.out_dir=\"$D/yarn0\" > /dev/null
$BIN export --checkpoint "$D/yarn0" --out "$D/yarn0-hf" --dtype f32
y0_128=$(loss_at "$D/yarn0-hf" 128)
y0_1024=$(loss_at "$D/yarn0-hf" 1024)

echo "== 3. extend to 1024 tokens with YaRN (factor 16 over the original 64, beta_fast 4, beta_slow 1) and continue on 4 ranks (tp 2 x cp 2)"
"${MPIRUN[@]}" $BIN train --config configs/demo/stage1-extend.toml --set log.quiet=true > "$D/stage1.jsonl"
$BIN export --checkpoint "$D/stage1" --out "$D/final" --dtype bf16
e_first=$(head -1 "$D/stage1.jsonl" | loss_of)
e_last=$(tail -1 "$D/stage1.jsonl" | loss_of)
s1_128=$(loss_at "$D/final" 128)
s1_1024=$(loss_at "$D/final" 1024)

t_end=$(date +%s)
cat <<REPORT

== what happened (all losses are mean next-token cross-entropy, nats; measured by this run)
stage 0, 128-token window, llama3 RoPE: training loss ${first} -> ${last}
  held-out loss, first 128 tokens:          ${s0_128}
  held-out loss, 1024 tokens (8x window):   ${s0_1024}
YaRN x16 applied, no training yet:
  held-out loss, first 128 tokens:          ${y0_128}
  held-out loss, 1024 tokens:               ${y0_1024}
stage 1, YaRN x16 (window 1024), training at 1024 tokens on 4 ranks (tp 2 x cp 2): loss ${e_first} -> ${e_last}
  held-out loss, first 128 tokens:          ${s1_128}
  held-out loss, 1024 tokens:               ${s1_1024}
exported: $D/final (config.json with YaRN in both transformers 4.x/5.x forms, bf16 weights, tokenizer)
metrics:  $D/stage0.jsonl $D/stage1.jsonl
time:     $((t_end - t_start)) s
REPORT
