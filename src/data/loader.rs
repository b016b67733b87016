//! The training loader: whole packed sequences of a `prepare`d dataset in a deterministic
//! shuffled order per epoch, resumable from a two-number state, and each sequence's slice for a
//! context-parallel rank in the zigzag layout (docs/ARCHITECTURE.md, "Parallel layout").
//!
//! A dataset directory holds `tokens.bin/.idx` (int32, every sequence `seq_len` tokens, packed so
//! the token stream continues from one stored sequence into the next) and, for SFT,
//! `loss_mask.bin/.idx` (uint8, same sizes, 1 where the token is a counted target).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use super::indexed::IndexedDataset;
use crate::util::rng;

/// Token file prefix inside a dataset directory.
pub const TOKENS_PREFIX: &str = "tokens";
/// Loss-mask file prefix inside a dataset directory (SFT only).
pub const LOSS_MASK_PREFIX: &str = "loss_mask";

/// One training sequence (or one rank's zigzag slice of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub ids: Vec<u32>,
    /// Next-token targets; -1 where no loss is counted.
    pub targets: Vec<i32>,
    /// Global token positions within the sequence (RoPE positions).
    pub positions: Vec<u64>,
}

/// Where the loader stands: the next sample is element `index` of epoch `epoch`'s permutation.
/// Saved in checkpoints; after the last sample of an epoch it reads `(epoch + 1, 0)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    pub index: u64,
}

/// Reads a dataset directory in the training order.
pub struct Loader {
    dir: PathBuf,
    tokens: IndexedDataset,
    loss_mask: Option<IndexedDataset>,
    seq_len: usize,
    seed: u64,
    state: LoaderState,
    /// The permutation of `state.epoch`, rebuilt when the epoch changes.
    order: Vec<usize>,
    order_epoch: u64,
}

/// Fisher–Yates permutation of `0..n` for `epoch`, drawn from counter-based uniforms so that it is
/// a pure function of (seed, epoch): nothing but the state needs saving to resume.
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let stream = rng::mix64(rng::stream_of("data.loader.shuffle").wrapping_add(epoch));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let u = rng::uniform(seed, stream, i as u64);
        let j = ((u * (i + 1) as f64) as usize).min(i);
        order.swap(i, j);
    }
    order
}

impl Loader {
    /// `dir`: dataset directory; `seq_len` must equal the stored sequence length (error otherwise, naming both);
    pub fn open(dir: &Path, seq_len: usize, seed: u64) -> Result<Self> {
        let tokens = IndexedDataset::open(&dir.join(TOKENS_PREFIX))
            .with_context(|| format!("opening the token data of dataset {}", dir.display()))?;
        ensure!(
            !tokens.is_empty(),
            "dataset {} holds no sequences",
            dir.display()
        );
        ensure!(seq_len > 0, "seq_len must be positive");
        if let Some(i) = tokens.sizes().iter().position(|&s| s as usize != seq_len) {
            anyhow::bail!(
                "dataset {} stores sequences of {} tokens (sequence {i}), but seq_len is {seq_len}: \
                 prepare the data with --seq-len {seq_len} or train at {}",
                dir.display(),
                tokens.sizes()[i],
                tokens.sizes()[i]
            );
        }
        let mask_prefix = dir.join(LOSS_MASK_PREFIX);
        let loss_mask = if mask_prefix.with_extension("idx").exists() {
            let mask = IndexedDataset::open(&mask_prefix)
                .with_context(|| format!("opening the loss mask of dataset {}", dir.display()))?;
            ensure!(
                mask.sizes() == tokens.sizes(),
                "dataset {}: loss_mask has {} sequences and tokens {}, or their sizes differ",
                dir.display(),
                mask.len(),
                tokens.len()
            );
            Some(mask)
        } else {
            None
        };
        let order = epoch_permutation(tokens.len(), seed, 0);
        Ok(Self {
            dir: dir.to_path_buf(),
            tokens,
            loss_mask,
            seq_len,
            seed,
            state: LoaderState { epoch: 0, index: 0 },
            order,
            order_epoch: 0,
        })
    }

    pub fn num_sequences(&self) -> usize {
        self.tokens.len()
    }

    pub fn state(&self) -> LoaderState {
        self.state.clone()
    }

    /// Resumes at `s`; an index at or past the end of an epoch continues with the next epoch.
    pub fn set_state(&mut self, s: LoaderState) {
        self.state = s;
    }

    /// Next sample (whole sequence, one rank): ids = sequence tokens; targets[t] = ids[t+1], and for the last
    /// token the first token of the NEXT stored sequence (stream continuity) or -1 if it is the last one;
    /// with a loss mask, targets[t] = -1 where mask of the target token is 0. positions = 0..seq_len
    /// (each sequence restarts positions at 0: no cross-document mask, one causal attention per sequence, as the paper).
    /// Order: a deterministic permutation of sequence indices per epoch from (seed, epoch) (Fisher–Yates with
    /// crate::util::rng::uniform); advancing past the end starts the next epoch.
    pub fn next_sample(&mut self) -> Result<Sample> {
        let n = self.tokens.len() as u64;
        if self.state.index >= n {
            self.state = LoaderState {
                epoch: self.state.epoch + 1,
                index: 0,
            };
        }
        if self.order_epoch != self.state.epoch {
            self.order = epoch_permutation(self.tokens.len(), self.seed, self.state.epoch);
            self.order_epoch = self.state.epoch;
        }
        let seq = self.order[self.state.index as usize];
        let sample = self.read_sample(seq)?;
        self.state.index += 1;
        if self.state.index == n {
            self.state = LoaderState {
                epoch: self.state.epoch + 1,
                index: 0,
            };
        }
        Ok(sample)
    }

    /// Stored sequence `seq` with its targets: the token stream shifted by one, continuing into
    /// the next stored sequence.
    fn read_sample(&self, seq: usize) -> Result<Sample> {
        let ids = self.tokens.get(seq)?;
        let last = seq + 1 == self.tokens.len();
        let mut next_ids: Vec<u32> = ids[1..].to_vec();
        if !last {
            next_ids.extend(self.tokens.read_range(seq + 1, 0, 1)?);
        }
        let mut targets = next_ids
            .iter()
            .map(|&t| {
                i32::try_from(t).with_context(|| {
                    format!("dataset {}: token {t} exceeds int32", self.dir.display())
                })
            })
            .collect::<Result<Vec<i32>>>()?;
        if last {
            targets.push(-1);
        }
        if let Some(mask) = &self.loss_mask {
            // The mask of target t is the mask of token t + 1 of the stream.
            let mut m = mask.read_range(seq, 1, self.seq_len - 1)?;
            if !last {
                m.extend(mask.read_range(seq + 1, 0, 1)?);
            }
            for (t, &keep) in targets.iter_mut().zip(&m) {
                if keep == 0 {
                    *t = -1;
                }
            }
        }
        Ok(Sample {
            ids,
            targets,
            positions: (0..self.seq_len as u64).collect(),
        })
    }
}

/// (start, len) of rank `rank`'s two chunks in the zigzag layout: the sequence is cut into
/// `2 * cp` equal chunks and rank r holds chunks r and 2*cp-1-r, so that under the causal mask
/// every rank does the same attention work. Panics on an invalid layout (`zigzag_slice` checks
/// it and errors first).
pub fn zigzag_chunks(seq_len: usize, cp: usize, rank: usize) -> [(usize, usize); 2] {
    assert!(
        cp > 0 && rank < cp && seq_len.is_multiple_of(2 * cp),
        "zigzag layout needs rank < cp and seq_len divisible by 2*cp (seq_len {seq_len}, cp {cp}, rank {rank})"
    );
    let c = seq_len / (2 * cp);
    [(rank * c, c), ((2 * cp - 1 - rank) * c, c)]
}

/// The zigzag context-parallel layout (docs/ARCHITECTURE.md): the sequence is split into 2*cp equal chunks, rank r holds
/// chunks r and 2*cp-1-r (in that order). Returns rank r's slice of ids/targets/positions (positions are the
/// GLOBAL token indices). Error if seq_len is not divisible by 2*cp.
pub fn zigzag_slice(s: &Sample, cp: usize, rank: usize) -> Result<Sample> {
    let seq_len = s.ids.len();
    ensure!(cp > 0, "context-parallel size must be at least 1");
    ensure!(
        rank < cp,
        "context-parallel rank {rank} out of range for cp = {cp}"
    );
    ensure!(
        s.targets.len() == seq_len && s.positions.len() == seq_len,
        "sample has {seq_len} ids but {} targets and {} positions",
        s.targets.len(),
        s.positions.len()
    );
    ensure!(
        seq_len.is_multiple_of(2 * cp),
        "sequence length {seq_len} is not divisible by 2*cp = {} (zigzag context parallelism)",
        2 * cp
    );
    let mut out = Sample {
        ids: Vec::with_capacity(seq_len / cp),
        targets: Vec::with_capacity(seq_len / cp),
        positions: Vec::with_capacity(seq_len / cp),
    };
    for (start, len) in zigzag_chunks(seq_len, cp, rank) {
        out.ids.extend_from_slice(&s.ids[start..start + len]);
        out.targets
            .extend_from_slice(&s.targets[start..start + len]);
        out.positions
            .extend_from_slice(&s.positions[start..start + len]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::indexed::{IndexedWriter, TokenDType};

    /// Token at stream position p (distinct, never 0, so a -1 target stands out).
    fn token(p: usize) -> u32 {
        (p as u32) * 3 + 1
    }

    /// A packed dataset of `n` sequences of `seq_len` tokens; with `mask`, mask(p) for each
    /// stream position p.
    fn make_dataset(dir: &Path, n: usize, seq_len: usize, mask: Option<fn(usize) -> u32>) {
        let mut w = IndexedWriter::create(&dir.join(TOKENS_PREFIX), TokenDType::I32).unwrap();
        for i in 0..n {
            let seq: Vec<u32> = (0..seq_len).map(|t| token(i * seq_len + t)).collect();
            w.add_sequence(&seq).unwrap();
        }
        w.end_document();
        w.finish().unwrap();
        if let Some(m) = mask {
            let mut w = IndexedWriter::create(&dir.join(LOSS_MASK_PREFIX), TokenDType::U8).unwrap();
            for i in 0..n {
                let seq: Vec<u32> = (0..seq_len).map(|t| m(i * seq_len + t)).collect();
                w.add_sequence(&seq).unwrap();
            }
            w.end_document();
            w.finish().unwrap();
        }
    }

    /// Which stored sequence a sample is (its first token).
    fn seq_of(s: &Sample, seq_len: usize) -> usize {
        ((s.ids[0] - 1) / 3) as usize / seq_len
    }

    #[test]
    fn targets_continue_the_stream_and_end_with_minus_one() {
        let dir = tempfile::tempdir().unwrap();
        let (n, l) = (5, 8);
        make_dataset(dir.path(), n, l, None);
        let mut loader = Loader::open(dir.path(), l, 1).unwrap();
        assert_eq!(loader.num_sequences(), n);
        for _ in 0..n {
            let s = loader.next_sample().unwrap();
            let i = seq_of(&s, l);
            assert_eq!(s.positions, (0..l as u64).collect::<Vec<_>>());
            for t in 0..l {
                assert_eq!(s.ids[t], token(i * l + t));
                let p = i * l + t + 1;
                let want = if p < n * l { token(p) as i32 } else { -1 };
                assert_eq!(s.targets[t], want, "sequence {i} token {t}");
            }
        }
    }

    #[test]
    fn loss_mask_hides_targets() {
        let dir = tempfile::tempdir().unwrap();
        let (n, l) = (4, 6);
        let mask: fn(usize) -> u32 = |p| u32::from(p % 3 != 0);
        make_dataset(dir.path(), n, l, Some(mask));
        let mut loader = Loader::open(dir.path(), l, 9).unwrap();
        for _ in 0..n {
            let s = loader.next_sample().unwrap();
            let i = seq_of(&s, l);
            for t in 0..l {
                let p = i * l + t + 1;
                let want = if p >= n * l || mask(p) == 0 {
                    -1
                } else {
                    token(p) as i32
                };
                assert_eq!(s.targets[t], want, "sequence {i} token {t}");
            }
        }
    }

    #[test]
    fn epochs_visit_every_sequence_once_in_different_orders() {
        let dir = tempfile::tempdir().unwrap();
        let (n, l) = (20, 4);
        make_dataset(dir.path(), n, l, None);
        let mut loader = Loader::open(dir.path(), l, 42).unwrap();
        let mut orders = Vec::new();
        for epoch in 0..3u64 {
            assert_eq!(loader.state(), LoaderState { epoch, index: 0 });
            let order: Vec<usize> = (0..n)
                .map(|_| seq_of(&loader.next_sample().unwrap(), l))
                .collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "epoch {epoch}");
            orders.push(order);
        }
        assert_ne!(orders[0], orders[1]);
        assert_ne!(orders[1], orders[2]);
        assert_ne!(orders[0], (0..n).collect::<Vec<_>>(), "shuffled");
        // Same seed, same order; another seed, another order.
        assert_eq!(epoch_permutation(n, 42, 1), orders[1]);
        assert_ne!(epoch_permutation(n, 43, 0), orders[0]);
    }

    #[test]
    fn resume_reproduces_the_stream_across_an_epoch_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let (n, l) = (7, 4);
        make_dataset(dir.path(), n, l, Some(|p| u32::from(p % 5 != 0)));
        let mut straight = Loader::open(dir.path(), l, 5).unwrap();
        let all: Vec<Sample> = (0..3 * n)
            .map(|_| straight.next_sample().unwrap())
            .collect();
        for k in [0, 3, n - 1, n, n + 2, 2 * n] {
            let mut first = Loader::open(dir.path(), l, 5).unwrap();
            for _ in 0..k {
                first.next_sample().unwrap();
            }
            // Through the checkpoint format.
            let saved = serde_json::to_string(&first.state()).unwrap();
            let mut resumed = Loader::open(dir.path(), l, 5).unwrap();
            resumed.set_state(serde_json::from_str(&saved).unwrap());
            for (j, want) in all.iter().enumerate().skip(k) {
                assert_eq!(
                    &resumed.next_sample().unwrap(),
                    want,
                    "resumed at {k}, sample {j}"
                );
            }
        }
        // An index at the end of an epoch is the start of the next.
        let mut at_end = Loader::open(dir.path(), l, 5).unwrap();
        at_end.set_state(LoaderState {
            epoch: 0,
            index: n as u64,
        });
        assert_eq!(at_end.next_sample().unwrap(), all[n]);
    }

    #[test]
    fn wrong_seq_len_names_both() {
        let dir = tempfile::tempdir().unwrap();
        make_dataset(dir.path(), 3, 8, None);
        let err = format!("{:#}", Loader::open(dir.path(), 16, 0).err().unwrap());
        assert!(err.contains("16") && err.contains('8'), "{err}");
        let err = format!(
            "{:#}",
            Loader::open(&dir.path().join("missing"), 8, 0)
                .err()
                .unwrap()
        );
        assert!(err.contains("missing"), "{err}");
    }

    fn full_sample(l: usize) -> Sample {
        Sample {
            ids: (0..l).map(token).collect(),
            targets: (0..l).map(|p| token(p + 1) as i32).collect(),
            positions: (0..l as u64).collect(),
        }
    }

    #[test]
    fn zigzag_slices_reassemble_and_balance() {
        let l = 48;
        let s = full_sample(l);
        for cp in [1, 2, 4] {
            let mut ids = vec![None; l];
            let mut targets = vec![None; l];
            let mut work = Vec::new();
            for rank in 0..cp {
                let r = zigzag_slice(&s, cp, rank).unwrap();
                assert_eq!(r.ids.len(), l / cp, "cp {cp} rank {rank}");
                assert_eq!(r.targets.len(), l / cp);
                assert_eq!(r.positions.len(), l / cp);
                // Chunk r first, then chunk 2cp-1-r.
                let c = l / (2 * cp);
                assert_eq!(r.positions[0], (rank * c) as u64);
                assert_eq!(r.positions[c], ((2 * cp - 1 - rank) * c) as u64);
                for k in 0..r.ids.len() {
                    let p = r.positions[k] as usize;
                    assert!(ids[p].is_none(), "position {p} on two ranks");
                    ids[p] = Some(r.ids[k]);
                    targets[p] = Some(r.targets[k]);
                }
                // Causal work: query at position p attends to p + 1 keys.
                work.push(r.positions.iter().map(|&p| p + 1).sum::<u64>());
            }
            let ids: Vec<u32> = ids.into_iter().map(|x| x.unwrap()).collect();
            let targets: Vec<i32> = targets.into_iter().map(|x| x.unwrap()).collect();
            assert_eq!(ids, s.ids, "cp {cp}");
            assert_eq!(targets, s.targets, "cp {cp}");
            assert!(work.iter().all(|&w| w == work[0]), "cp {cp}: {work:?}");
        }
    }

    #[test]
    fn zigzag_rejects_bad_layouts() {
        let s = full_sample(12);
        let err = zigzag_slice(&s, 4, 0).unwrap_err().to_string();
        assert!(err.contains("12") && err.contains('8'), "{err}");
        assert!(zigzag_slice(&s, 2, 2).is_err());
        assert!(zigzag_slice(&s, 0, 0).is_err());
        assert!(zigzag_slice(&full_sample(7), 1, 0).is_err());
        assert_eq!(zigzag_chunks(12, 3, 1), [(2, 2), (8, 2)]);
    }
}
