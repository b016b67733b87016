# The toy corpus of `make demo` (scripts/demo.sh): JSON Lines documents of filler sentences, most
# carrying one needle — "The special magic number is: NNNNNNN." at a random depth — and ending with
# the question "What is the special magic number?" and the answer "The special magic number is:
# NNNNNNN." (as RULER's prompts end with the answer's prefix, the first digit follows the same
# words as in the needle), with no "Question:"/"Answer:" labels, as RULER's prompts. A model
# learns from it to find one 7-digit number in a haystack: the skill the needle-in-a-haystack test
# measures, at any length the model can attend over. (The 4-layer demo model, in its 3,600 steps,
# learns to copy the number's later tokens but mostly misses its first: that token has to be found
# through the words before it, the others through themselves. It did so with the labels too.)
#   awk -v seed=S -v docs=N -v min_words=A -v max_words=B -v needle_rate=P [-v lists=L] \
#     -f corpus.awk > out.jsonl
# With lists=L a fraction L of the documents are number lists instead: "The numbers are: A B C.
# Again, the numbers are: A B C." They carry far more copying per token than the needle
# documents. In our runs of the 4-layer demo model (batch 4 x 256 tokens, lr 3e-3), with half the
# documents lists the loss broke from its plateau (copying began) after about 2,000 steps; without
# lists the model still answered every needle with one fixed number after 2,000 steps (and after
# 4,000 steps of half the batch).
# Lengths are drawn log-uniformly in [min_words, max_words] words. With -v haystack=1 it prints
# the filler passage instead, cycled to `docs` lines (one sentence per line, no needles): the NIAH
# haystack. With -v sft=1
# (and needle_rate=1) it prints chat samples for `prepare sft`: the user gives the haystack and the
# question, the assistant answers with the number.
BEGIN {
  na = split("red blue green amber violet silver golden quiet busy old young tall small bright dark", adj, " ");
  nn = split("door box key lamp gate ship tower river bridge garden farmer baker singer painter city", noun, " ");
  nv = split("watches finds follows paints carries visits builds opens moves leaves", verb, " ");
  np = split("near behind above beside under across", prep, " ");
  # The filler is one fixed passage of 97 sentences (the same for every seed), read from a random
  # sentence on: like the essays of the standard NIAH haystack, it becomes predictable, so what a
  # model must learn beyond it is to find and copy the needle.
  srand(1000);
  for (k = 0; k < 97; k++) passage[k] = sentence();
  srand(seed + 0);
  if (haystack) {
    for (d = 0; d < docs; d++) print passage[d % 97];
    exit;
  }
  lmin = log(min_words); lmax = log(max_words);
  for (d = 0; d < docs; d++) {
    words = int(exp(lmin + rand() * (lmax - lmin)));
    n = int(words / 8) + 1;
    has = rand() < needle_rate;
    num = 1000000 + int(rand() * 9000000);
    at = int(rand() * (n + 1));
    text = "";
    p0 = int(rand() * 97);
    for (i = 0; i <= n; i++) {
      if (has && i == at) text = text (text == "" ? "" : " ") "The special magic number is: " num ".";
      if (i < n) text = text (text == "" ? "" : " ") passage[(p0 + i) % 97];
    }
    if (!sft && rand() < lists) {
      # A list document: 2-8 numbers, then the same numbers again. Pure copying, and the first
      # number follows the same words both times ("are:"), as the answer's first digits follow
      # "is:" in the needle and in the answer: the induction a model needs for the needle.
      k = 2 + int(rand() * 7); l = "";
      for (i = 0; i < k; i++) l = l " " (1000000 + int(rand() * 9000000));
      printf "{\"text\": \"The numbers are:%s.\\nAgain, the numbers are:%s.\", \"domain\": \"list\"}\n", l, l;
      continue;
    }
    if (sft) {
      # A chat sample: the haystack and question from the user, the number from the assistant
      # (what `eval niah --template chat` asks).
      printf "{\"messages\": [{\"role\": \"user\", \"content\": \"%s\\n\\nWhat is the special magic number?\"}, {\"role\": \"assistant\", \"content\": \"The special magic number is: %s.\"}]}\n", text, num;
      continue;
    }
    if (has) text = text "\\n\\nWhat is the special magic number? The special magic number is: " num ".";
    printf "{\"text\": \"%s\", \"domain\": \"%s\"}\n", text, has ? "needle" : "filler";
  }
}
function pick(a, n) { return a[1 + int(rand() * n)]; }
function sentence(   s) {
  s = "The " pick(adj, na) " " pick(noun, nn) " " pick(verb, nv) " the " pick(adj, na) " " pick(noun, nn);
  if (rand() < 0.5) s = s " " pick(prep, np) " the " pick(noun, nn);
  return s ".";
}
