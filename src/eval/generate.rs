//! Generation: sampling (greedy, or temperature + top-p with a seeded counter-based RNG) and the
//! prefill + decode loop over a `model::infer::Session`, with its timings.
//!
//! Every rank of the TP × CP group runs the loop; the logits are equal on all ranks (all-gathered
//! over TP, broadcast over CP), and the token picked by CP rank 0 is broadcast over CP anyway, so a
//! rounding difference could never split the ranks' sequences.

use std::time::Instant;

use anyhow::{Result, bail};

use crate::eval::lm::Decoder;
use crate::util::rng;

/// How the next token is chosen from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (the lowest id among equal maxima).
    Greedy,
    /// Nucleus sampling (Holtzman et al. 2019): softmax of `logits / temperature`, the smallest
    /// set of most likely tokens whose probability reaches `top_p`, renormalised; the draw for
    /// step `i` is `rng::uniform(seed, stream "sample", i)`.
    Nucleus {
        temperature: f64,
        top_p: f64,
        seed: u64,
    },
}

impl Sampling {
    /// Greedy for temperature 0, else nucleus sampling; errors name the flag.
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Result<Self> {
        if !(temperature >= 0.0 && temperature.is_finite()) {
            bail!("--temperature {temperature}: expected a finite number >= 0 (0 = greedy)");
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            bail!("--top-p {top_p}: expected a number in (0, 1]");
        }
        Ok(if temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Nucleus {
                temperature,
                top_p,
                seed,
            }
        })
    }

    /// The token for decoding step `step` (0 = the first new token).
    pub fn pick(&self, logits: &[f32], step: u64) -> u32 {
        match *self {
            Sampling::Greedy => argmax(logits),
            Sampling::Nucleus {
                temperature,
                top_p,
                seed,
            } => {
                let (ids, probs) = nucleus(logits, temperature, top_p);
                let mass: f64 = probs.iter().sum();
                let mut u = rng::uniform(seed, rng::stream_of("sample"), step) * mass;
                for (&id, &p) in ids.iter().zip(&probs) {
                    if u < p {
                        return id;
                    }
                    u -= p;
                }
                *ids.last().expect("the nucleus holds at least one token")
            }
        }
    }
}

/// The first index of the largest logit (NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The nucleus: token ids by decreasing probability (ties by id) and their probabilities under
/// `softmax(logits / temperature)`, cut after the first prefix whose mass reaches `top_p`.
pub fn nucleus(logits: &[f32], temperature: f64, top_p: f64) -> (Vec<u32>, Vec<f64>) {
    let z: Vec<f64> = logits.iter().map(|&x| x as f64 / temperature).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|&x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| e[b as usize].total_cmp(&e[a as usize]).then(a.cmp(&b)));
    let (mut ids, mut probs, mut acc) = (Vec::new(), Vec::new(), 0.0);
    for id in order {
        let p = e[id as usize] / s;
        ids.push(id);
        probs.push(p);
        acc += p;
        if acc >= top_p {
            break;
        }
    }
    (ids, probs)
}

/// A finished generation.
#[derive(Clone, Debug, Default)]
pub struct Generation {
    /// New tokens (the stop token included when one ended it).
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// The logits each new token was picked from (when asked for).
    pub logits: Vec<Vec<f32>>,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Decode steps run (a token is fed back only if another one is wanted).
    pub decode_steps: usize,
    pub stopped: bool,
}

impl Generation {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_s.max(1e-12)
    }
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_steps == 0 {
            return f64::NAN;
        }
        self.decode_steps as f64 / self.decode_s.max(1e-12)
    }
}

/// Prefill `prompt`, then pick and feed back up to `max_new` tokens, stopping after a token of
/// `stop`. Collective over the decoder's group (its CP ranks go on with the leader's pick).
pub fn generate(
    s: &mut dyn Decoder,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    stop: &[u32],
    keep_logits: bool,
) -> Result<Generation> {
    let mut g = Generation {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut logits = s.prefill(prompt)?;
    g.prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for step in 0..max_new {
        let tok = s.agree(sampling.pick(&logits, step as u64));
        g.tokens.push(tok);
        if keep_logits {
            g.logits.push(std::mem::take(&mut logits));
        }
        if stop.contains(&tok) {
            g.stopped = true;
            break;
        }
        if step + 1 < max_new {
            logits = s.decode(tok)?;
            g.decode_steps += 1;
        }
    }
    g.decode_s = t1.elapsed().as_secs_f64();
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(Sampling::Greedy.pick(&[5.0, 1.0], 9), 0);
        assert_eq!(Sampling::new(0.0, 1.0, 1).unwrap(), Sampling::Greedy);
    }

    #[test]
    fn nucleus_keeps_the_smallest_prefix_reaching_top_p() {
        // softmax(ln p) = p: probabilities 0.5, 0.3, 0.15, 0.05.
        let logits: Vec<f32> = [0.15f64, 0.5, 0.05, 0.3]
            .iter()
            .map(|p| p.ln() as f32)
            .collect();
        let (ids, probs) = nucleus(&logits, 1.0, 0.75);
        assert_eq!(ids, vec![1, 3]);
        assert!((probs[0] - 0.5).abs() < 1e-6 && (probs[1] - 0.3).abs() < 1e-6);
        assert_eq!(nucleus(&logits, 1.0, 0.8).0, vec![1, 3]);
        assert_eq!(nucleus(&logits, 1.0, 0.81).0, vec![1, 3, 0]);
        assert_eq!(nucleus(&logits, 1.0, 1e-9).0, vec![1]);
    }

    #[test]
    fn sampling_frequencies_follow_the_renormalised_nucleus() {
        let logits: Vec<f32> = [0.15f64, 0.5, 0.05, 0.3]
            .iter()
            .map(|p| p.ln() as f32)
            .collect();
        let s = Sampling::new(1.0, 0.81, 42).unwrap();
        let n = 40_000;
        let mut counts = [0usize; 4];
        for step in 0..n {
            counts[s.pick(&logits, step) as usize] += 1;
        }
        assert_eq!(counts[2], 0, "a token outside the nucleus was drawn");
        for (id, p) in [(1usize, 0.5 / 0.95), (3, 0.3 / 0.95), (0, 0.15 / 0.95)] {
            let f = counts[id] as f64 / n as f64;
            assert!((f - p).abs() < 0.01, "token {id}: frequency {f} vs {p}");
        }
        // Temperature: T → large flattens towards uniform over the nucleus (top_p 1: all four).
        let hot = Sampling::new(1e6, 1.0, 7).unwrap();
        let mut c = [0usize; 4];
        for step in 0..n {
            c[hot.pick(&logits, step) as usize] += 1;
        }
        for x in c {
            assert!((x as f64 / n as f64 - 0.25).abs() < 0.015, "{c:?}");
        }
        // Same seed and step: same token; the draw is a function of (seed, step) only.
        assert_eq!(s.pick(&logits, 17), s.pick(&logits, 17));
    }

    #[test]
    fn bad_sampling_flags_name_the_flag() {
        let e = Sampling::new(-1.0, 1.0, 0).unwrap_err().to_string();
        assert!(e.contains("--temperature"), "{e}");
        let e = Sampling::new(1.0, 0.0, 0).unwrap_err().to_string();
        assert!(e.contains("--top-p"), "{e}");
    }
}
