//! `prepare recall`: a synthetic long-context recall task (multi-key associative recall, after
//! docs/HSA.md §7) for the toy comparison of a RoPE Llama, its YaRN extension and the HSA model.
//!
//! A sample of `len` tokens is `<bos>`, a haystack of filler symbols drawn uniformly (or, with a
//! `period`, a random phrase of that many repeated, as passkey retrieval repeats a filler
//! sentence), then `queries` queries `<Q> key value` at the end, each asking for a different one of
//! the `needles` needles hidden in the haystack, in random order. Each needle is one *pair* token
//! that stands for (key, value), overwriting the haystack at a uniformly random place. Keys are
//! distinct within a sample, so each answer is determined by the context. Training counts the
//! loss only on the queried value tokens (`loss_mask`); evaluation (`eval::recall`) scores exactly
//! those tokens, teacher-forced.
//!
//! Why pair tokens and, by default, a periodic haystack (measured while building the toy of
//! scripts/demo.sh; docs/HSA.md §7): with needles `<K> key value` spelt out, recall needs an
//! induction circuit (a previous-token head feeding a matching head), and the demo's 2-layer,
//! 64-wide Llama stayed near chance after 1200 steps; with a pair token, recall is one attention
//! hop (match the key, copy the value), learnt in a few hundred steps. With uniform filler the
//! HSA model's mean landmarks carry the filler's noise and its loss after 1200 steps was 0.1 to
//! 0.5 depending on the run; with a repeated 8-token phrase every needle-free chunk of 8 has the
//! same landmark, and it reached 0.01.
//!
//! Every sample is a pure function of (spec, seed, length, index) through counter-based random
//! numbers (`util::rng`), so the training set and the evaluation sets at any length are
//! reproducible, and an evaluation seed different from the training one gives held-out samples.
//!
//! Output (`<out>/`): `tokens.{bin,idx}` (int32) and `loss_mask.{bin,idx}` (uint8), one sample
//! per row and document, as the training loader reads them (`data::loader`), and `manifest.json`
//! (kind "recall", the spec, the seed, the row length, `vocab_size`) from which `eval recall`
//! draws its samples.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use super::indexed::{IndexedWriter, TokenDType};
use crate::io::{AtomicDir, write_atomic};
use crate::util::rng;

/// Sequence start (the models' `bos_token_id`).
pub const BOS: u32 = 0;
/// Reserved as end of text (the models' `eos_token_id`); never generated.
pub const EOS: u32 = 1;
/// Marker before a query's key.
pub const QUERY_MARK: u32 = 2;
/// First id of the filler range; keys, values and pair tokens follow it.
pub const FIRST_SYMBOL: u32 = 3;
/// Tokens of one query: `<Q> key value`.
pub const QUERY_LEN: usize = 3;

/// The task: vocabulary ranges and the shape of the haystack, needles and queries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecallSpec {
    /// Filler symbols: ids `3 .. 3 + filler`.
    pub filler: u32,
    /// 0: every haystack token drawn uniformly from the filler symbols; else the length of a
    /// phrase drawn per sample and repeated through the haystack.
    pub period: usize,
    /// Key symbols, after the filler.
    pub keys: u32,
    /// Value symbols, after the keys; then one pair token per (key, value), key-major.
    pub values: u32,
    /// Needles per sample.
    pub needles: usize,
    /// Queries per sample (each a different needle; at most `needles`).
    pub queries: usize,
    /// No needle lies fewer than this many tokens before the first query (0: anywhere).
    pub min_distance: usize,
}

impl Default for RecallSpec {
    /// 127 ids; 6 needles, 3 of them queried, in a haystack repeating 8 filler tokens.
    fn default() -> Self {
        RecallSpec {
            filler: 8,
            period: 8,
            keys: 8,
            values: 12,
            needles: 6,
            queries: 3,
            min_distance: 0,
        }
    }
}

/// One sample: its tokens and where its needles, queries and scored answers are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecallSample {
    pub ids: Vec<u32>,
    /// Position of each needle, in increasing order.
    pub needles: Vec<usize>,
    /// The needle each query asks for (an index into `needles`), in query order.
    pub queried: Vec<usize>,
    /// Position of each query's answer (its value token), in query order: the scored targets.
    pub answers: Vec<usize>,
}

impl RecallSample {
    /// The loss mask: 1 on the answer tokens, 0 elsewhere.
    pub fn mask(&self) -> Vec<u32> {
        let mut m = vec![0; self.ids.len()];
        for &p in &self.answers {
            m[p] = 1;
        }
        m
    }
}

/// A counter-based stream of uniforms: sample `index` of length `len` under `seed`.
struct Draw {
    seed: u64,
    stream: u64,
    n: u64,
}

impl Draw {
    fn new(seed: u64, len: usize, index: u64) -> Self {
        let stream = rng::mix64(rng::stream_of("data.recall") ^ rng::mix64(len as u64))
            .wrapping_add(rng::mix64(index));
        Draw { seed, stream, n: 0 }
    }

    /// Uniform in `0 .. n`.
    fn below(&mut self, n: usize) -> usize {
        let u = rng::uniform(self.seed, self.stream, self.n);
        self.n += 1;
        ((u * n as f64) as usize).min(n - 1)
    }

    /// `k` distinct values of `0 .. n` in random order (a partial Fisher–Yates shuffle).
    fn distinct(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            all.swap(i, j);
        }
        all.truncate(k);
        all
    }
}

impl RecallSpec {
    pub fn first_key(&self) -> u32 {
        FIRST_SYMBOL + self.filler
    }

    pub fn first_value(&self) -> u32 {
        self.first_key() + self.keys
    }

    pub fn first_pair(&self) -> u32 {
        self.first_value() + self.values
    }

    /// The token of the needle binding `key` to `value` (both 0-based).
    pub fn pair(&self, key: u32, value: u32) -> u32 {
        self.first_pair() + key * self.values + value
    }

    /// The smallest vocabulary holding every id of the task.
    pub fn vocab_size(&self) -> usize {
        self.first_pair() as usize + (self.keys * self.values) as usize
    }

    /// The shortest sample length that holds the needles, the queries and `min_distance`.
    pub fn min_len(&self) -> usize {
        1 + self.needles + self.min_distance + self.queries * QUERY_LEN
    }

    /// Errors name the field and what it must satisfy.
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.filler >= 1 && self.values >= 1,
            "recall: filler ({}) and values ({}) must be at least 1",
            self.filler,
            self.values
        );
        ensure!(
            self.queries >= 1 && self.queries <= self.needles,
            "recall: queries ({}) must be in 1..=needles ({})",
            self.queries,
            self.needles
        );
        ensure!(
            self.needles <= self.keys as usize,
            "recall: {} needles need that many distinct keys, but keys is {}",
            self.needles,
            self.keys
        );
        Ok(())
    }

    /// Sample `index` of length `len` under `seed` (see the module comment).
    pub fn sample(&self, len: usize, seed: u64, index: u64) -> Result<RecallSample> {
        self.check()?;
        ensure!(
            len >= self.min_len(),
            "recall: a sample of {len} tokens cannot hold {} needles {} tokens before {} queries \
             (at least {} tokens)",
            self.needles,
            self.min_distance,
            self.queries,
            self.min_len()
        );
        let mut d = Draw::new(seed, len, index);
        let n = self.needles;
        let keys = d.distinct(self.keys as usize, n);
        let values: Vec<u32> = (0..n)
            .map(|_| d.below(self.values as usize) as u32)
            .collect();
        // Haystack: positions 1 ..= hay; needles at distinct places among the first
        // `hay - min_distance`, uniformly (sorted offsets, each shifted past the ones before it).
        let hay = len - 1 - self.queries * QUERY_LEN;
        let phrase: Vec<u32> = (0..if self.period == 0 { hay } else { self.period })
            .map(|_| FIRST_SYMBOL + d.below(self.filler as usize) as u32)
            .collect();
        let free = hay - self.min_distance - n;
        let mut offsets: Vec<usize> = (0..n).map(|_| d.below(free + 1)).collect();
        offsets.sort_unstable();
        let needles: Vec<usize> = offsets
            .iter()
            .enumerate()
            .map(|(i, &o)| 1 + o + i)
            .collect();
        let mut ids = Vec::with_capacity(len);
        ids.push(BOS);
        ids.extend(phrase.iter().cycle().take(hay));
        // Needle i (in order of position) binds keys[i] to values[i].
        for (i, &at) in needles.iter().enumerate() {
            ids[at] = self.pair(keys[i] as u32, values[i]);
        }
        let queried = d.distinct(n, self.queries);
        let mut answers = Vec::with_capacity(self.queries);
        for &i in &queried {
            ids.push(QUERY_MARK);
            ids.push(self.first_key() + keys[i] as u32);
            answers.push(ids.len());
            ids.push(self.first_value() + values[i]);
        }
        debug_assert_eq!(ids.len(), len);
        Ok(RecallSample {
            ids,
            needles,
            queried,
            answers,
        })
    }
}

/// What `prepare recall` writes.
#[derive(Clone, Debug, Serialize)]
pub struct RecallOptions {
    pub spec: RecallSpec,
    pub seq_len: usize,
    pub samples: u64,
    pub seed: u64,
    pub out: PathBuf,
}

/// The manifest of a recall dataset: what `eval recall` needs to draw more samples of the task.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecallManifest {
    pub kind: String,
    pub spec: RecallSpec,
    pub seq_len: usize,
    pub samples: u64,
    pub seed: u64,
    pub vocab_size: usize,
}

impl RecallManifest {
    /// `dir/manifest.json` of a `prepare recall` output.
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join("manifest.json");
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("reading {} (made by `prepare recall`)", p.display()))?;
        let m: RecallManifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a `prepare recall` manifest", p.display()))?;
        ensure!(
            m.kind == "recall",
            "{}: kind is {:?}, expected \"recall\" (a `prepare recall` output)",
            p.display(),
            m.kind
        );
        m.spec.check().with_context(|| p.display().to_string())?;
        Ok(m)
    }
}

/// `prepare recall`: `samples` rows of `seq_len` tokens with their loss masks, and the manifest.
/// Written under a temporary directory and renamed into place (`io::AtomicDir`).
pub fn prepare_recall(o: &RecallOptions) -> Result<RecallManifest> {
    o.spec.check()?;
    if o.samples == 0 {
        bail!("prepare recall: --samples must be at least 1");
    }
    let dir = AtomicDir::create(&o.out)?;
    let mut tokens = IndexedWriter::create(&dir.tmp().join("tokens"), TokenDType::I32)?;
    let mut mask = IndexedWriter::create(&dir.tmp().join("loss_mask"), TokenDType::U8)?;
    for i in 0..o.samples {
        let s = o.spec.sample(o.seq_len, o.seed, i)?;
        tokens.add_sequence(&s.ids)?;
        tokens.end_document();
        mask.add_sequence(&s.mask())?;
        mask.end_document();
    }
    tokens.finish()?;
    mask.finish()?;
    let m = RecallManifest {
        kind: "recall".into(),
        spec: o.spec.clone(),
        seq_len: o.seq_len,
        samples: o.samples,
        seed: o.seed,
        vocab_size: o.spec.vocab_size(),
    };
    let text = serde_json::to_string_pretty(&m).context("serializing manifest.json")?;
    write_atomic(
        &dir.tmp().join("manifest.json"),
        format!("{text}\n").as_bytes(),
    )?;
    dir.commit()?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::loader::Loader;

    fn spec() -> RecallSpec {
        RecallSpec::default()
    }

    /// The token class of an id, from the documented ranges (independently of the generator):
    /// filler 3..11, keys 11..19, values 19..31, pairs 31..127.
    fn class(t: u32) -> char {
        match t {
            0 => 'B',
            2 => 'Q',
            3..=10 => 'f',
            11..=18 => 'k',
            19..=30 => 'v',
            31..=126 => 'p',
            _ => '?',
        }
    }

    #[test]
    fn samples_hold_their_needles_and_queries() {
        let s = spec();
        assert_eq!(s.vocab_size(), 127);
        for (len, index) in [(40, 0), (256, 3), (4096, 11)] {
            let x = s.sample(len, 5, index).unwrap();
            assert_eq!(x.ids.len(), len);
            let c: String = x.ids.iter().map(|&t| class(t)).collect();
            // Layout: B, the haystack, then the query block "Qkv" x 3.
            assert_eq!(&c[..1], "B");
            assert_eq!(&c[len - 9..], "QkvQkvQkv", "{c}");
            // The haystack is filler, except the six pair tokens at the recorded places.
            let hay = &x.ids[1..len - 9];
            let p: Vec<usize> = (0..hay.len()).filter(|&i| class(hay[i]) == 'p').collect();
            assert_eq!(p.iter().map(|i| i + 1).collect::<Vec<_>>(), x.needles);
            assert!(hay.iter().all(|&t| "fp".contains(class(t))), "{c}");
            // The six needles have distinct keys (pair token = 31 + key * 12 + value).
            let mut keys: Vec<u32> = x.needles.iter().map(|&n| (x.ids[n] - 31) / 12).collect();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), 6);
            // Each query asks for a different needle; its key is the needle's key and its answer
            // the needle's value.
            let mut q = x.queried.clone();
            q.sort_unstable();
            q.dedup();
            assert_eq!(q.len(), 3);
            for (j, &i) in x.queried.iter().enumerate() {
                let at = len - 9 + 3 * j;
                let pair = x.ids[x.needles[i]] - 31;
                assert_eq!(x.ids[at + 1] - 11, pair / 12, "key of query {j}");
                assert_eq!(x.answers[j], at + 2);
                assert_eq!(x.ids[at + 2] - 19, pair % 12, "value of query {j}");
            }
            // The mask marks exactly the answers.
            let m = x.mask();
            let marked: Vec<usize> = (0..len).filter(|&i| m[i] == 1).collect();
            assert_eq!(marked, x.answers);
        }
    }

    #[test]
    fn filler_is_uniform_or_a_repeated_phrase() {
        let mut s = spec();
        s.period = 0;
        let x = s.sample(4096, 1, 0).unwrap();
        let mut counts = [0usize; 8];
        for &t in &x.ids[1..4096 - 9] {
            if class(t) == 'f' {
                counts[(t - 3) as usize] += 1;
            }
        }
        // About 4080 / 8 = 510 of each symbol.
        assert!(
            counts.iter().all(|&c| (420..600).contains(&c)),
            "{counts:?}"
        );
        s.period = 5;
        let x = s.sample(300, 1, 0).unwrap();
        let hay = &x.ids[1..300 - 9];
        for i in 0..hay.len() {
            if class(hay[i]) == 'f' {
                let twin = (i % 5..hay.len())
                    .step_by(5)
                    .find(|&j| class(hay[j]) == 'f')
                    .unwrap();
                assert_eq!(hay[i], hay[twin], "not periodic at {i}");
            }
        }
    }

    #[test]
    fn needles_spread_over_the_whole_haystack_and_respect_min_distance() {
        let mut s = spec();
        let len = 1024;
        let (mut first, mut last) = (usize::MAX, 0);
        let mut hist = [0usize; 4];
        for i in 0..300 {
            let x = s.sample(len, 1, i).unwrap();
            first = first.min(x.needles[0]);
            last = last.max(*x.needles.last().unwrap());
            for &n in &x.needles {
                hist[(n - 1) * 4 / 1014] += 1;
            }
        }
        // Uniform placement over the haystack (positions 1 ..= 1014): both ends reached, each
        // quarter holds about a quarter of the 1800 needles.
        assert!(first < 10 && last > 1005, "needles in {first}..{last}");
        assert!(hist.iter().all(|&h| (350..550).contains(&h)), "{hist:?}");
        s.min_distance = 300;
        for i in 0..200 {
            let x = s.sample(len, 1, i).unwrap();
            let last = *x.needles.last().unwrap();
            assert!(len - 9 - last > 300, "needle at {last}");
        }
        assert!(s.sample(1 + 6 + 299 + 9, 1, 0).is_err());
        assert!(s.sample(1 + 6 + 300 + 9, 1, 0).is_ok());
    }

    #[test]
    fn samples_are_deterministic_and_differ_by_seed_index_and_length() {
        let s = spec();
        assert_eq!(s.sample(512, 7, 3).unwrap(), s.sample(512, 7, 3).unwrap());
        assert_ne!(
            s.sample(512, 7, 3).unwrap().ids,
            s.sample(512, 8, 3).unwrap().ids
        );
        assert_ne!(
            s.sample(512, 7, 3).unwrap().ids,
            s.sample(512, 7, 4).unwrap().ids
        );
        assert_ne!(
            s.sample(512, 7, 3).unwrap().needles,
            s.sample(1024, 7, 3).unwrap().needles
        );
    }

    #[test]
    fn bad_specs_name_the_field() {
        let mut s = spec();
        s.queries = 7;
        assert!(format!("{:#}", s.check().unwrap_err()).contains("queries"));
        let mut s = spec();
        s.keys = 5;
        assert!(format!("{:#}", s.check().unwrap_err()).contains("keys is 5"));
    }

    #[test]
    fn the_dataset_trains_on_the_answers_only() {
        let d = tempfile::tempdir().unwrap();
        let o = RecallOptions {
            spec: spec(),
            seq_len: 64,
            samples: 5,
            seed: 2,
            out: d.path().join("r"),
        };
        let m = prepare_recall(&o).unwrap();
        assert_eq!(m.vocab_size, 127);
        let again = RecallManifest::read(&o.out).unwrap();
        assert_eq!(again.spec, o.spec);
        let mut l = Loader::open(&o.out, 64, 0).unwrap();
        assert_eq!(l.num_sequences(), 5);
        let mut seen = Vec::new();
        for _ in 0..5 {
            let x = l.next_sample().unwrap();
            // Which stored sample this is: the one with these tokens.
            let i = (0..5)
                .find(|&i| o.spec.sample(64, 2, i).unwrap().ids == x.ids)
                .expect("a generated sample");
            seen.push(i);
            let s = o.spec.sample(64, 2, i).unwrap();
            // Counted targets: row p - 1 predicts answer token p, nothing else is counted.
            let counted: Vec<usize> = (0..64).filter(|&t| x.targets[t] >= 0).collect();
            let want: Vec<usize> = s.answers.iter().map(|&p| p - 1).collect();
            assert_eq!(counted, want);
            for &p in &s.answers {
                assert_eq!(x.targets[p - 1], s.ids[p] as i32);
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    }
}
