//! Loss by position (`eval ppl`): the mean next-token loss as a function of how many tokens of
//! context precede the target, over sequences of `seq_len` tokens, bucketed on a log scale. The
//! standard check that a context extension worked: after it, the loss keeps falling (or stays
//! flat) out to the new window instead of rising past the old one.
//!
//! A sequence's row `i` predicts token `i+1` from `i+1` tokens of context: its "position" is
//! `i+1`, in `1 .. seq_len−1`. Buckets are `[e_k, e_{k+1})` with `e_k = round(seq_len^(k/B))`
//! (duplicates dropped), so each covers the same ratio of positions. Under CP each rank computes
//! the losses of its zigzag rows (`Session::hidden_states` + `row_losses`: ring attention, the
//! vocab-parallel LM head in chunks, never `[seq_len, vocab]`; under TP every rank of the group
//! gets every row's loss), and the rows are all-gathered back in order over CP.

use anyhow::Result;
use serde::Serialize;

use crate::backend::Backend;
use crate::data::loader::zigzag_chunks;
use crate::model::infer::Session;
use crate::model::llama::Llama;
use crate::parallel::comm::Comm;

/// Per-row losses of one sequence (`ids.len()` values; the last, with no target, NaN), on every
/// rank of the TP group `tp` and CP group `cp`. The length must divide by `2·cp·tp` when
/// cp·tp > 1 (checked by the caller: `Layout::check_seq_len`).
pub fn sequence_losses<B: Backend, C: Comm>(
    b: &B,
    model: &Llama<B>,
    tp: &C,
    cp: &C,
    ids: &[u32],
) -> Result<Vec<f64>> {
    let (n_cp, r) = (cp.size(), cp.rank());
    let len = ids.len();
    let chunks = |q: usize| -> Vec<(usize, usize)> {
        if n_cp == 1 {
            vec![(0, len)]
        } else {
            zigzag_chunks(len, n_cp, q).to_vec()
        }
    };
    let (mut local, mut pos, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for (start, n) in chunks(r) {
        for i in start..start + n {
            local.push(ids[i]);
            pos.push(i as u64);
            targets.push(if i + 1 < len { ids[i + 1] as i32 } else { -1 });
        }
    }
    let mut s = Session::new(b, model, tp, cp);
    let x = s.hidden_states(&local, &pos)?;
    let mine = s.row_losses(&x, &targets);
    if n_cp == 1 {
        return Ok(mine);
    }
    let mut all = vec![0f64; mine.len() * n_cp];
    cp.all_gather(&mine, &mut all);
    let mut out = vec![f64::NAN; len];
    for (q, part) in all.chunks(mine.len()).enumerate() {
        let mut row = 0;
        for (start, n) in chunks(q) {
            out[start..start + n].copy_from_slice(&part[row..row + n]);
            row += n;
        }
    }
    Ok(out)
}

/// Bucket edges over positions `1 .. seq_len` (see the module comment).
pub fn bucket_edges(seq_len: usize, buckets: usize) -> Vec<usize> {
    let mut e: Vec<usize> = (0..=buckets.max(1))
        .map(|k| {
            (seq_len as f64)
                .powf(k as f64 / buckets.max(1) as f64)
                .round() as usize
        })
        .map(|x| x.clamp(1, seq_len))
        .collect();
    e[0] = 1;
    *e.last_mut().expect("at least two edges") = seq_len;
    e.dedup();
    e
}

/// One bucket of positions `[start, end)`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Bucket {
    pub start: usize,
    pub end: usize,
    pub tokens: u64,
    pub mean_loss: f64,
    /// Mean position of the bucket's counted targets (the x of the plot).
    pub mean_position: f64,
}

/// Buckets from per-row loss sums and counts (row `i` = position `i+1`).
pub fn bucketize(sum: &[f64], count: &[u64], buckets: usize) -> Vec<Bucket> {
    let seq_len = sum.len();
    let edges = bucket_edges(seq_len, buckets);
    edges
        .windows(2)
        .map(|w| {
            let (mut s, mut n, mut p) = (0.0, 0u64, 0.0);
            for pos in w[0]..w[1] {
                let i = pos - 1;
                s += sum[i];
                n += count[i];
                p += count[i] as f64 * pos as f64;
            }
            Bucket {
                start: w[0],
                end: w[1],
                tokens: n,
                mean_loss: if n > 0 { s / n as f64 } else { f64::NAN },
                mean_position: if n > 0 { p / n as f64 } else { f64::NAN },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log_spaced_and_cover_every_position_once() {
        let e = bucket_edges(1024, 10);
        assert_eq!(e, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]);
        let e = bucket_edges(100, 50);
        assert_eq!(e[0], 1);
        assert_eq!(*e.last().unwrap(), 100);
        assert!(e.windows(2).all(|w| w[0] < w[1]));
        let sum: Vec<f64> = (0..100).map(|i| i as f64).collect();
        let mut count = vec![1u64; 100];
        count[99] = 0; // the last row has no target
        let b = bucketize(&sum, &count, 4);
        assert_eq!(b.iter().map(|x| x.tokens).sum::<u64>(), 99);
        let total: f64 = b.iter().map(|x| x.mean_loss * x.tokens as f64).sum();
        assert!((total - (0..99).map(|i| i as f64).sum::<f64>()).abs() < 1e-9);
        // Edges 100^(k/4): 1, 3, 10, 32, 100. Bucket [1, 3) holds rows 0 and 1 (losses 0, 1).
        assert_eq!(
            b.iter().map(|x| x.start).collect::<Vec<_>>(),
            vec![1, 3, 10, 32]
        );
        assert_eq!((b[0].end, b[0].tokens, b[0].mean_loss), (3, 2, 0.5));
        assert_eq!(b[0].mean_position, 1.5);
        assert_eq!(b[3].tokens, 68); // positions 32..=99
    }
}
