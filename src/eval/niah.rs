//! Needle in a haystack (the standard test; the paper reports 100% at every length and depth up to
//! each model's window): a needle sentence carrying a random number is inserted at a depth of a
//! haystack filled to a length, a question asks for the number, the model answers greedily, and
//! the answer is correct when the number appears in it (exact match of a whole digit run).
//!
//! Construction of one cell (length `L`, depth `d`%, trial `k`), all at the token level:
//! - the prompt is `prefix + haystack′ + suffix`, where prefix/suffix are the template's tokens
//!   (`PromptFormat::wrap`: Llama-3.1 chat, or plain text ending in "Answer:") and `haystack′` is
//!   the haystack with the needle's tokens spliced in;
//! - the haystack is a sequence of sentences, each tokenized on its own (with its leading
//!   whitespace), so sentence boundaries are exact token indices; it takes whole sentences while
//!   `prefix + haystack + needle + suffix ≤ L` (the prompt is at most `L` tokens, at most one
//!   sentence short of it);
//! - the needle goes at the sentence boundary nearest to `d/100 × (haystack tokens)` (ties to the
//!   earlier one): depth 0 is the very start, 100 the very end;
//! - the number has `digits` digits (first digit non-zero), drawn from the counter-based RNG by
//!   (seed, cell index), so a grid is reproducible from its seed.
//!
//! Haystack text: the user's file (sentences cycled when it is shorter than needed) or, by default,
//! generated filler: plain English sentences drawn from small word lists by the seeded RNG,
//! independent of any tokenizer (and free of digits, so the needle is the only number).

use anyhow::{Result, bail};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::eval::generate::{Sampling, generate};
use crate::eval::lm::EvalLm;
use crate::eval::{PromptFormat, decode, encode};
use crate::util::rng;

/// The sentences of a haystack, each as its own token ids; cycled when more are needed.
pub struct Haystack {
    sentences: Vec<Vec<u32>>,
}

/// A haystack cut to a budget: its tokens and the token index where each sentence starts (the
/// first is 0; the end, `ids.len()`, is included).
#[derive(Clone, Debug, PartialEq)]
pub struct Cut {
    pub ids: Vec<u32>,
    pub bounds: Vec<usize>,
}

impl Haystack {
    /// The sentences of `text` (see `split_sentences`), tokenized one by one.
    pub fn from_text(tok: &Tokenizer, text: &str, source: &str) -> Result<Self> {
        let pieces = split_sentences(text);
        if pieces.is_empty() {
            bail!("{source}: the haystack text is empty");
        }
        Self::tokenize(tok, &pieces, source)
    }

    /// Generated filler (`filler_sentence`) of at least `min_tokens` tokens.
    pub fn generated(tok: &Tokenizer, seed: u64, min_tokens: usize) -> Result<Self> {
        let mut h = Haystack {
            sentences: Vec::new(),
        };
        let mut total = 0;
        let mut next = 0u64;
        while total < min_tokens {
            // A batch sized from the tokens still missing (about 12 per sentence, at least 64).
            let n = ((min_tokens - total) / 12).clamp(64, 100_000) as u64;
            let pieces: Vec<String> = (next..next + n).map(|i| filler_sentence(seed, i)).collect();
            next += n;
            let part = Self::tokenize(tok, &pieces, "generated filler")?;
            total += part.sentences.iter().map(Vec::len).sum::<usize>();
            h.sentences.extend(part.sentences);
        }
        Ok(h)
    }

    fn tokenize<S: AsRef<str> + Send + Sync>(
        tok: &Tokenizer,
        pieces: &[S],
        source: &str,
    ) -> Result<Self> {
        let inputs: Vec<&str> = pieces.iter().map(|p| p.as_ref()).collect();
        let enc = tok
            .encode_batch(inputs, false)
            .map_err(|e| anyhow::anyhow!("{source}: tokenization failed: {e}"))?;
        let sentences: Vec<Vec<u32>> = enc
            .iter()
            .map(|e| e.get_ids().to_vec())
            .filter(|s| !s.is_empty())
            .collect();
        if sentences.is_empty() {
            bail!("{source}: the haystack text gives no tokens");
        }
        Ok(Haystack { sentences })
    }

    /// Whole sentences (cycled) while the total stays within `budget` tokens.
    pub fn cut(&self, budget: usize) -> Cut {
        let mut c = Cut {
            ids: Vec::with_capacity(budget),
            bounds: vec![0],
        };
        for s in self.sentences.iter().cycle() {
            if c.ids.len() + s.len() > budget {
                break;
            }
            c.ids.extend_from_slice(s);
            c.bounds.push(c.ids.len());
        }
        c
    }
}

/// Split text into sentences: a piece ends after `.`, `!` or `?` (and any closing quotes or
/// brackets) that is followed by whitespace; the whitespace starts the next piece (as a
/// tokenizer's pre-tokenizer would attach it to the next word). Whitespace-only pieces are dropped.
pub fn split_sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        if matches!(b[i], b'.' | b'!' | b'?') {
            let mut j = i + 1;
            while j < b.len() && matches!(b[j], b'"' | b'\'' | b')' | b']') {
                j += 1;
            }
            if j == b.len() || b[j].is_ascii_whitespace() {
                out.push(&text[start..j]);
                start = j;
                i = j;
                continue;
            }
        }
        i += 1;
    }
    out.push(&text[start..]);
    out.retain(|s| !s.trim().is_empty());
    out
}

const ADJ: [&str; 16] = [
    "quiet", "green", "old", "bright", "narrow", "gentle", "distant", "wooden", "silver", "cold",
    "busy", "small", "tall", "patient", "golden", "calm",
];
const NOUN: [&str; 16] = [
    "river", "garden", "teacher", "village", "lamp", "market", "bridge", "farmer", "window",
    "forest", "painter", "harbor", "library", "road", "cloud", "meadow",
];
const VERB: [&str; 12] = [
    "watches",
    "follows",
    "passes",
    "reaches",
    "crosses",
    "remembers",
    "finds",
    "leaves",
    "circles",
    "greets",
    "shelters",
    "faces",
];
const TAIL: [&str; 12] = [
    "in the morning",
    "after the rain",
    "without a sound",
    "near the old wall",
    "as the sun sets",
    "every other day",
    "under a grey sky",
    "before the winter",
    "at the end of the lane",
    "while the town sleeps",
    "beside the water",
    "long after noon",
];

/// Filler sentence `i` of `seed`, with a leading space: "The quiet river watches the old lamp in
/// the morning." Pure function of (seed, i).
pub fn filler_sentence(seed: u64, i: u64) -> String {
    let stream = rng::stream_of("niah-filler");
    let pick = |k: u64, n: usize| (rng::uniform(seed, stream, 6 * i + k) * n as f64) as usize % n;
    format!(
        " The {} {} {} the {} {} {}.",
        ADJ[pick(0, ADJ.len())],
        NOUN[pick(1, NOUN.len())],
        VERB[pick(2, VERB.len())],
        ADJ[pick(3, ADJ.len())],
        NOUN[pick(4, NOUN.len())],
        TAIL[pick(5, TAIL.len())],
    )
}

/// The token index of the boundary nearest to `depth`% of the cut (ties: the earlier one).
pub fn needle_index(cut: &Cut, depth: f64) -> usize {
    let target = depth / 100.0 * cut.ids.len() as f64;
    let mut best = 0;
    for &b in &cut.bounds {
        if (b as f64 - target).abs() < (best as f64 - target).abs() {
            best = b;
        }
    }
    best
}

/// The cut with `needle` spliced in at `at`.
pub fn insert_needle(cut: &Cut, needle: &[u32], at: usize) -> Vec<u32> {
    let mut v = Vec::with_capacity(cut.ids.len() + needle.len());
    v.extend_from_slice(&cut.ids[..at]);
    v.extend_from_slice(needle);
    v.extend_from_slice(&cut.ids[at..]);
    v
}

/// A `digits`-digit number (first digit non-zero) for cell `index`.
pub fn needle_number(seed: u64, digits: u32, index: u64) -> String {
    let lo = 10u64.pow(digits - 1);
    let span = 9 * lo;
    let u = rng::uniform(seed, rng::stream_of("niah-number"), index);
    (lo + ((u * span as f64) as u64).min(span - 1)).to_string()
}

/// Exact match: `number` is one of the maximal runs of ASCII digits of `output` (so a longer
/// number containing it, or a different number, does not count).
pub fn exact_match(output: &str, number: &str) -> bool {
    output
        .split(|c: char| !c.is_ascii_digit())
        .any(|run| run == number)
}

/// Partial credit: the fraction of `number`'s digits that the output's first run of digits has
/// in the same places (0 when the output has no digits). Exact match is the score; this shows
/// how close a model that fails it came (a small model often gets the tail of the number right
/// but not its head).
pub fn digit_accuracy(output: &str, number: &str) -> f64 {
    let Some(run) = output
        .split(|c: char| !c.is_ascii_digit())
        .find(|r| !r.is_empty())
    else {
        return 0.0;
    };
    let same = run
        .bytes()
        .zip(number.bytes())
        .filter(|(a, b)| a == b)
        .count();
    same as f64 / number.len().max(1) as f64
}

/// What a NIAH grid asks.
#[derive(Clone, Debug)]
pub struct NiahSpec {
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub trials: usize,
    pub seed: u64,
    /// Needle text with `{number}`.
    pub needle: String,
    pub question: String,
    /// Text after the haystack, with `{question}`.
    pub query: String,
    pub digits: u32,
    pub max_new_tokens: usize,
}

impl NiahSpec {
    pub fn cells(&self) -> usize {
        self.lengths.len() * self.depths.len() * self.trials
    }
    /// (length index, depth index, trial) of cell `i` (lengths outermost).
    pub fn cell(&self, i: usize) -> (usize, usize, usize) {
        let per_len = self.depths.len() * self.trials;
        (i / per_len, (i % per_len) / self.trials, i % self.trials)
    }
}

/// One evaluated cell.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct CellResult {
    pub length: usize,
    pub depth: f64,
    pub trial: usize,
    pub number: String,
    pub output: String,
    pub correct: bool,
    /// `digit_accuracy(output, number)`.
    #[serde(default)]
    pub digits_correct: f64,
    pub prompt_tokens: usize,
    /// Haystack tokens and the token index (within the haystack) where the needle starts.
    pub haystack_tokens: usize,
    pub needle_at: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// The prompt of cell `i`: (token ids, haystack tokens, needle index, number).
pub fn build_prompt(
    tok: &Tokenizer,
    format: &PromptFormat,
    hay: &Haystack,
    spec: &NiahSpec,
    i: usize,
) -> Result<(Vec<u32>, usize, usize, String)> {
    let (li, di, _) = spec.cell(i);
    let (length, depth) = (spec.lengths[li], spec.depths[di]);
    let number = needle_number(spec.seed, spec.digits, i as u64);
    let needle = encode(
        tok,
        &format!(" {}", spec.needle.replace("{number}", &number)),
    )?;
    let (pre, post) = format.wrap(tok, &spec.query.replace("{question}", &spec.question))?;
    let fixed = pre.len() + needle.len() + post.len();
    if fixed >= length {
        bail!(
            "--lengths: {length} tokens leave no room for a haystack: template, needle and question take {fixed}"
        );
    }
    let cut = hay.cut(length - fixed);
    let at = needle_index(&cut, depth);
    let mut ids = pre;
    ids.extend(insert_needle(&cut, &needle, at));
    ids.extend(post);
    Ok((ids, cut.ids.len(), at, number))
}

/// Evaluate the cells `mine` (indices into the grid) on this TP × CP group, in order.
#[allow(clippy::too_many_arguments)]
pub fn run_cells(
    lm: &dyn EvalLm,
    tok: &Tokenizer,
    format: &PromptFormat,
    hay: &Haystack,
    spec: &NiahSpec,
    mine: &[usize],
    mut progress: impl FnMut(&CellResult),
) -> Result<Vec<CellResult>> {
    let stop = format.stop_tokens(lm.cfg());
    // Every prompt can be built (each length holds the template, needle and question) before
    // any cell runs.
    for &i in mine {
        build_prompt(tok, format, hay, spec, i)?;
    }
    let mut out = Vec::with_capacity(mine.len());
    for &i in mine {
        let (li, di, trial) = spec.cell(i);
        let (ids, haystack_tokens, needle_at, number) = build_prompt(tok, format, hay, spec, i)?;
        let mut s = lm.decoder();
        let g = generate(
            s.as_mut(),
            &ids,
            spec.max_new_tokens,
            &Sampling::Greedy,
            &stop,
            false,
        )?;
        drop(s);
        let output = decode(tok, &g.tokens)?;
        let r = CellResult {
            length: spec.lengths[li],
            depth: spec.depths[di],
            trial,
            correct: exact_match(&output, &number),
            digits_correct: digit_accuracy(&output, &number),
            number,
            output,
            prompt_tokens: ids.len(),
            haystack_tokens,
            needle_at,
            prefill_s: g.prefill_s,
            decode_s: g.decode_s,
        };
        progress(&r);
        out.push(r);
    }
    Ok(out)
}

/// Accuracy per (depth row, length column): the mean of the cells' `correct` over trials (NaN
/// where a cell has no result).
pub fn accuracy_grid(spec: &NiahSpec, cells: &[CellResult]) -> Vec<Vec<f64>> {
    let mut sum = vec![vec![0.0; spec.lengths.len()]; spec.depths.len()];
    let mut n = vec![vec![0usize; spec.lengths.len()]; spec.depths.len()];
    for c in cells {
        let li = spec.lengths.iter().position(|&l| l == c.length);
        let di = spec.depths.iter().position(|&d| d == c.depth);
        if let (Some(li), Some(di)) = (li, di) {
            sum[di][li] += c.correct as u8 as f64;
            n[di][li] += 1;
        }
    }
    sum.iter()
        .zip(&n)
        .map(|(s, n)| {
            s.iter()
                .zip(n)
                .map(|(&s, &n)| if n == 0 { f64::NAN } else { s / n as f64 })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sentences of varied lengths 3..9 as fake token ids.
    fn haystack() -> Haystack {
        Haystack {
            sentences: (0..40u32)
                .map(|i| (0..3 + (i * 7) % 7).map(|j| 100 + i * 10 + j).collect())
                .collect(),
        }
    }

    #[test]
    fn cut_takes_whole_sentences_within_the_budget() {
        let h = haystack();
        for budget in [0, 2, 3, 50, 97, 500, 1000] {
            let c = h.cut(budget);
            assert!(c.ids.len() <= budget);
            assert_eq!(*c.bounds.last().unwrap(), c.ids.len());
            // One more sentence would not fit.
            let k = c.bounds.len() - 1;
            let next = &h.sentences[k % h.sentences.len()];
            assert!(c.ids.len() + next.len() > budget, "budget {budget}");
            for w in c.bounds.windows(2) {
                let s = &h.sentences[(c.bounds.iter().position(|&b| b == w[0]).unwrap()) % 40];
                assert_eq!(&c.ids[w[0]..w[1]], &s[..]);
            }
        }
    }

    #[test]
    fn needle_goes_to_the_sentence_boundary_nearest_the_depth() {
        let h = haystack();
        let c = h.cut(400);
        let n = c.ids.len() as f64;
        let needle = [7u32, 7, 7];
        let max_sentence = 9.0;
        for d in [0.0, 10.0, 25.0, 33.0, 50.0, 90.0, 100.0] {
            let at = needle_index(&c, d);
            assert!(c.bounds.contains(&at), "depth {d}: {at} is not a boundary");
            // Within half a sentence of d% (the nearest boundary), and no boundary is nearer.
            let target = d / 100.0 * n;
            assert!(
                (at as f64 - target).abs() <= max_sentence / 2.0,
                "depth {d}: {at} vs {target}"
            );
            for &b in &c.bounds {
                assert!((b as f64 - target).abs() >= (at as f64 - target).abs());
            }
            let ids = insert_needle(&c, &needle, at);
            assert_eq!(&ids[at..at + 3], &needle);
            assert_eq!(&ids[..at], &c.ids[..at]);
            assert_eq!(&ids[at + 3..], &c.ids[at..]);
        }
        assert_eq!(needle_index(&c, 0.0), 0);
        assert_eq!(needle_index(&c, 100.0), c.ids.len());
    }

    #[test]
    fn exact_match_wants_the_whole_number() {
        assert!(exact_match(
            " The special magic number is: 1234567.",
            "1234567"
        ));
        assert!(exact_match("1234567", "1234567"));
        assert!(exact_match("it is 42 or 1234567", "1234567"));
        assert!(!exact_match("The number is 1234568.", "1234567"));
        assert!(!exact_match("12345678", "1234567"));
        assert!(!exact_match("01234567", "1234567"));
        assert!(!exact_match("123 4567", "1234567"));
        assert!(!exact_match("", "1234567"));
    }

    #[test]
    fn digit_accuracy_counts_digits_in_place_in_the_first_run() {
        assert_eq!(digit_accuracy(" 1234567.", "1234567"), 1.0);
        // 9884000 against 3884678: places 1, 2 and 3 agree.
        assert!((digit_accuracy(" 9884000. The", "3884678") - 3.0 / 7.0).abs() < 1e-15);
        // Only the first run counts; a shorter run scores its places only.
        assert!((digit_accuracy("12 1234567", "1234567") - 2.0 / 7.0).abs() < 1e-15);
        assert_eq!(digit_accuracy("no digits", "1234567"), 0.0);
        assert_eq!(digit_accuracy("", "1234567"), 0.0);
        assert!((digit_accuracy("1234567890", "1234567") - 1.0).abs() < 1e-15);
    }

    #[test]
    fn numbers_have_the_digits_asked_and_vary_by_cell() {
        let nums: Vec<String> = (0..200).map(|i| needle_number(3, 7, i)).collect();
        for n in &nums {
            assert_eq!(n.len(), 7, "{n}");
            assert!(!n.starts_with('0'));
        }
        let mut u = nums.clone();
        u.sort();
        u.dedup();
        assert!(u.len() > 190);
        assert_eq!(needle_number(3, 7, 5), nums[5]);
        assert_ne!(needle_number(4, 7, 5), nums[5]);
    }

    #[test]
    fn sentences_split_after_terminal_punctuation() {
        let s = split_sentences("One two. Three? \"Four!\" Five 3.14 six.\nSeven");
        assert_eq!(
            s,
            vec![
                "One two.",
                " Three?",
                " \"Four!\"",
                " Five 3.14 six.",
                "\nSeven"
            ]
        );
        assert_eq!(
            s.concat(),
            "One two. Three? \"Four!\" Five 3.14 six.\nSeven"
        );
        let f = filler_sentence(1, 0);
        assert!(f.starts_with(" The ") && f.ends_with('.'), "{f}");
        assert!(!f.chars().any(|c| c.is_ascii_digit()));
        assert_eq!(f, filler_sentence(1, 0));
        assert_ne!(filler_sentence(1, 0), filler_sentence(1, 1));
    }

    #[test]
    fn grid_cells_enumerate_lengths_depths_trials() {
        let spec = NiahSpec {
            lengths: vec![10, 20],
            depths: vec![0.0, 50.0, 100.0],
            trials: 2,
            seed: 0,
            needle: String::new(),
            question: String::new(),
            query: String::new(),
            digits: 7,
            max_new_tokens: 1,
        };
        assert_eq!(spec.cells(), 12);
        let all: Vec<_> = (0..12).map(|i| spec.cell(i)).collect();
        assert_eq!(all[0], (0, 0, 0));
        assert_eq!(all[1], (0, 0, 1));
        assert_eq!(all[2], (0, 1, 0));
        assert_eq!(all[11], (1, 2, 1));
    }
}
