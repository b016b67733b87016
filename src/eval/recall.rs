//! `eval recall`: accuracy on the synthetic recall task of `prepare recall` (`data::recall`) by
//! context length, for either architecture (a Llama with any RoPE, YaRN included, or the HSA
//! model). Samples are drawn from the task's manifest at each length with an evaluation seed
//! (by default one more than the training seed, so they are held out). The protocol is
//! docs/HSA.md §6's: one teacher-forced pass over the whole sample, the argmax of the row before
//! each answer token, and a sample counts as correct when every queried value is exactly right.
//! Results go to `recall.json` in `--out`: per length, the samples and how many were correct,
//! and the same for single queries.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::Serialize;

use crate::backend::cpu::CpuBackend;
use crate::data::recall::{RecallManifest, RecallSpec};
use crate::eval::{format_count, parse_count, parse_list};
use crate::io::{MappedTensors, write_atomic};
use crate::model::arch::ArchConfig;
use crate::model::hsa::model::{Head as HsaHead, HsaModel};
use crate::model::infer::Session;
use crate::model::llama::{Dims, Llama};
use crate::model::params::Shard;
use crate::model::rope::RopePrecision;
use crate::parallel::comm::SelfComm;
use crate::util::Real;

#[derive(Args, Debug)]
pub struct RecallArgs {
    /// Hugging Face model directory (a Llama or the HSA model).
    #[arg(long)]
    pub model: PathBuf,
    /// A `prepare recall` output: its manifest defines the task (and its training length).
    #[arg(long)]
    pub task: PathBuf,
    /// Context lengths in tokens, e.g. 256,1K,16K (K = 1024).
    #[arg(long)]
    pub lengths: String,
    /// Samples per length.
    #[arg(long, default_value_t = 32)]
    pub samples: usize,
    /// At most this many tokens per length (fewer samples at long lengths, never fewer than
    /// --min-samples): bounds the time of full attention, quadratic in the length.
    #[arg(long)]
    pub max_tokens: Option<String>,
    #[arg(long, default_value_t = 4)]
    pub min_samples: usize,
    /// Seed of the samples (default: the training seed + 1, so they are held out).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Working precision of the CPU backend: f32 or f64.
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Output directory (recall.json).
    #[arg(long)]
    pub out: PathBuf,
}

/// A model under evaluation: the argmax of the logits of some rows of a teacher-forced pass.
pub trait RowArgmax {
    /// For each of `rows`, the most likely next token after `ids[..=row]` (row r predicts
    /// token r + 1), from one causal pass over `ids`.
    fn argmax_rows(&mut self, ids: &[u32], rows: &[usize]) -> Result<Vec<u32>>;
}

/// The index of the largest logit (the first of equal ones); an error on a NaN.
pub fn argmax<T: Copy + Into<f64>>(logits: &[T]) -> Result<u32> {
    let mut best = (0usize, f64::NEG_INFINITY);
    for (i, &x) in logits.iter().enumerate() {
        let x: f64 = x.into();
        ensure!(!x.is_nan(), "logit {i} is NaN");
        if x > best.1 {
            best = (i, x);
        }
    }
    Ok(best.0 as u32)
}

/// Accuracy at one length.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LengthResult {
    pub length: usize,
    /// `length` over the task's training length.
    pub multiple: f64,
    pub samples: usize,
    /// Samples with every queried value right.
    pub correct: usize,
    pub accuracy: f64,
    pub queries: usize,
    pub queries_correct: usize,
    pub query_accuracy: f64,
    pub seconds: f64,
}

/// Scores `samples` samples of length `len` (indices `0..samples` under `seed`).
pub fn score_length(
    model: &mut dyn RowArgmax,
    spec: &RecallSpec,
    train_len: usize,
    len: usize,
    samples: usize,
    seed: u64,
) -> Result<LengthResult> {
    let t0 = Instant::now();
    let (mut correct, mut queries_correct) = (0, 0);
    for i in 0..samples {
        let s = spec.sample(len, seed, i as u64)?;
        let rows: Vec<usize> = s.answers.iter().map(|&p| p - 1).collect();
        let got = model
            .argmax_rows(&s.ids, &rows)
            .with_context(|| format!("sample {i} of length {len}"))?;
        ensure!(
            got.len() == rows.len(),
            "the model gave {} predictions for {} rows",
            got.len(),
            rows.len()
        );
        let right = s
            .answers
            .iter()
            .zip(&got)
            .filter(|&(&p, &g)| s.ids[p] == g)
            .count();
        queries_correct += right;
        correct += usize::from(right == s.answers.len());
    }
    let queries = samples * spec.queries;
    Ok(LengthResult {
        length: len,
        multiple: len as f64 / train_len as f64,
        samples,
        correct,
        accuracy: correct as f64 / samples.max(1) as f64,
        queries,
        queries_correct,
        query_accuracy: queries_correct as f64 / queries.max(1) as f64,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A Llama: `Session::hidden_states` over the sample, the LM head on the answer rows only.
struct LlamaRows<'a, T: Real> {
    b: &'a CpuBackend<T>,
    model: Llama<CpuBackend<T>>,
    one: SelfComm,
}

impl<T: Real> RowArgmax for LlamaRows<'_, T> {
    fn argmax_rows(&mut self, ids: &[u32], rows: &[usize]) -> Result<Vec<u32>> {
        let positions: Vec<u64> = (0..ids.len() as u64).collect();
        let mut s = Session::new(self.b, &self.model, &self.one, &self.one);
        let x = s.hidden_states(ids, &positions)?;
        let d = Dims::local(&self.model.cfg, ids.len(), Shard::WHOLE);
        rows.iter()
            .map(|&r| argmax(&self.model.logits_of_row(self.b, &self.one, &d, &x, r)))
            .collect()
    }
}

/// The HSA model: one pass over the sample padded to a multiple of `chunk_size` (padding after
/// the last scored row changes nothing before it: the model is causal).
struct HsaRows<'a, T: Real> {
    b: &'a CpuBackend<T>,
    model: HsaModel<CpuBackend<T>>,
}

impl<T: Real> RowArgmax for HsaRows<'_, T> {
    fn argmax_rows(&mut self, ids: &[u32], rows: &[usize]) -> Result<Vec<u32>> {
        let s = self.model.cfg.chunk_size;
        let mut padded = ids.to_vec();
        padded.resize(
            ids.len().next_multiple_of(s),
            *ids.last().context("empty sample")?,
        );
        let (_, logits) = self
            .model
            .forward_backward(self.b, &padded, 0, HsaHead::Logits, None)?;
        let v = self.model.cfg.base.vocab_size;
        rows.iter()
            .map(|&r| argmax(&logits[r * v..(r + 1) * v]))
            .collect()
    }
}

/// `eval recall` (see the module comment).
pub fn run(a: &RecallArgs) -> Result<()> {
    match a.precision.as_str() {
        "f32" => run_on(&CpuBackend::<f32>::new(), a),
        "f64" => run_on(&CpuBackend::<f64>::new(), a),
        p => bail!("--precision {p:?}: expected f32 or f64"),
    }
}

fn run_on<T: Real>(b: &CpuBackend<T>, a: &RecallArgs) -> Result<()> {
    let t_start = Instant::now();
    crate::model::hf::require_model_dir(&a.model, "--model")?;
    let task = RecallManifest::read(&a.task)?;
    let lengths = parse_list("--lengths", &a.lengths, parse_count)?;
    let max_tokens = a
        .max_tokens
        .as_deref()
        .map(parse_count)
        .transpose()
        .context("--max-tokens")?;
    ensure!(
        a.samples >= 1,
        "--samples {}: expected at least 1",
        a.samples
    );
    let seed = a.seed.unwrap_or(task.seed.wrapping_add(1));
    let (arch, mut model) = load(b, &a.model)?;
    ensure!(
        task.vocab_size <= arch.base().vocab_size,
        "{}: the task uses {} token ids, more than the model's vocab_size {}",
        a.task.display(),
        task.vocab_size,
        arch.base().vocab_size
    );
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("--out: cannot create {}", a.out.display()))?;
    let mut results = Vec::new();
    for &len in &lengths {
        let n = match max_tokens {
            Some(m) => (m / len).clamp(a.min_samples.min(a.samples), a.samples),
            None => a.samples,
        };
        let r = score_length(model.as_mut(), &task.spec, task.seq_len, len, n, seed)?;
        eprintln!(
            "length {:>6}: {}/{} samples exactly right ({:.1}%), queries {:.1}%, {:.1} s",
            format_count(len),
            r.correct,
            r.samples,
            100.0 * r.accuracy,
            100.0 * r.query_accuracy,
            r.seconds
        );
        results.push(r);
        // Written after every length, so a run cut short keeps what it measured.
        write_json(
            &a.out.join("recall.json"),
            a,
            &arch,
            &task,
            seed,
            &results,
            t_start,
        )?;
    }
    Ok(())
}

fn load<'a, T: Real>(
    b: &'a CpuBackend<T>,
    dir: &Path,
) -> Result<(ArchConfig, Box<dyn RowArgmax + 'a>)> {
    let arch = ArchConfig::from_file(&dir.join("config.json"))?;
    let model: Box<dyn RowArgmax + 'a> = match &arch {
        ArchConfig::Llama(_) => Box::new(LlamaRows {
            b,
            model: Llama::load(b, dir, RopePrecision::Exact)?,
            one: SelfComm::default(),
        }),
        ArchConfig::Hsa(c) => {
            let files = MappedTensors::open_dir(dir)?;
            let params =
                arch.params_from_files(b, &files, &dir.display().to_string(), Shard::WHOLE)?;
            Box::new(HsaRows {
                b,
                model: HsaModel::new(c.clone(), params)?,
            })
        }
    };
    Ok((arch, model))
}

fn write_json(
    path: &Path,
    a: &RecallArgs,
    arch: &ArchConfig,
    task: &RecallManifest,
    seed: u64,
    results: &[LengthResult],
    t_start: Instant,
) -> Result<()> {
    let v = serde_json::json!({
        "model": a.model.display().to_string(),
        "arch": arch.name(),
        "task": a.task.display().to_string(),
        "spec": task.spec,
        "train_seq_len": task.seq_len,
        "seed": seed,
        "held_out": seed != task.seed,
        "protocol": "teacher-forced argmax at each queried value; a sample is correct when all its queries are",
        "lengths": results,
        "seconds": t_start.elapsed().as_secs_f64(),
    });
    write_atomic(path, (serde_json::to_string_pretty(&v)? + "\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::recall::{BOS, QUERY_MARK};

    /// A hand-made model: reads the answer off the sample itself (the value of the needle whose
    /// key the query names, found by scanning the pair tokens), so it is always right, except on
    /// samples whose first needle sits in the first `blind` tokens, where it answers value 0 for
    /// every query. It returns logits, so `argmax` is exercised too.
    struct Oracle {
        spec: RecallSpec,
        blind: usize,
    }

    impl RowArgmax for Oracle {
        fn argmax_rows(&mut self, ids: &[u32], rows: &[usize]) -> Result<Vec<u32>> {
            let s = &self.spec;
            let first_needle = ids.iter().position(|&t| t >= s.first_pair()).unwrap();
            rows.iter()
                .map(|&r| {
                    assert_eq!(ids[r - 1], QUERY_MARK, "row {r} is not a query's key");
                    let key = ids[r] - s.first_key();
                    let pair = ids
                        .iter()
                        .find(|&&t| t >= s.first_pair() && (t - s.first_pair()) / s.values == key)
                        .unwrap();
                    let value = if first_needle < self.blind {
                        0
                    } else {
                        (pair - s.first_pair()) % s.values
                    };
                    let mut logits = vec![0f32; s.vocab_size()];
                    logits[(s.first_value() + value) as usize] = 1.0;
                    argmax(&logits)
                })
                .collect()
        }
    }

    #[test]
    fn the_score_counts_exactly_the_samples_the_oracle_gets_right() {
        let spec = RecallSpec::default();
        let (len, seed, n) = (200, 9, 40);
        let blind = 30;
        // Independently of the scorer: which samples the oracle misses, and how many of their
        // queries it still gets right by luck (the queried value is 0).
        let (mut want, mut want_q) = (0, 0);
        for i in 0..n {
            let s = spec.sample(len, seed, i).unwrap();
            assert_eq!(s.ids[0], BOS);
            if s.needles[0] < blind {
                want_q += s
                    .answers
                    .iter()
                    .filter(|&&p| s.ids[p] == spec.first_value())
                    .count();
                want += usize::from(s.answers.iter().all(|&p| s.ids[p] == spec.first_value()));
            } else {
                want += 1;
                want_q += 3;
            }
        }
        assert!(
            want > 5 && want < 35,
            "the test needs both kinds of samples: {want}"
        );
        let mut m = Oracle {
            spec: spec.clone(),
            blind,
        };
        let r = score_length(&mut m, &spec, 100, len, n as usize, seed).unwrap();
        assert_eq!((r.samples, r.correct), (40, want));
        assert_eq!((r.queries, r.queries_correct), (120, want_q));
        assert_eq!(r.accuracy, want as f64 / 40.0);
        assert_eq!(r.multiple, 2.0);
        // Blind to nothing, it is always right; blind to everything, right only by luck.
        m.blind = 0;
        assert_eq!(
            score_length(&mut m, &spec, 100, len, 40, seed)
                .unwrap()
                .correct,
            40
        );
    }

    /// Both architectures (the demo's configs, random weights) against independent passes: the
    /// Llama's session rows against the training path's logits (`forward_backward`), the HSA
    /// model's rows of a sample padded one way against a pass over it padded another way (the
    /// padding after the last row changes nothing: the model is causal).
    #[test]
    fn both_architectures_give_the_argmax_of_their_full_logits() {
        use crate::model::config::ModelConfig;
        use crate::model::hsa::config::HsaConfig;
        use crate::model::llama::{Head, Workspace};
        use crate::model::params::ParamStore;
        let b = CpuBackend::<f64>::new();
        let s = RecallSpec::default().sample(61, 3, 0).unwrap();
        let rows: Vec<usize> = (0..61).collect();
        let argmaxes = |logits: &[f64], v: usize| -> Vec<u32> {
            logits.chunks(v).map(|r| argmax(r).unwrap()).collect()
        };

        let cfg = ModelConfig::from_json_str(
            include_str!("../../configs/demo/recall-llama.json"),
            "recall-llama.json",
        )
        .unwrap();
        let v = cfg.vocab_size;
        let m = Llama::new(
            cfg.clone(),
            RopePrecision::Exact,
            ParamStore::init_random(&b, &cfg, 3),
        )
        .unwrap();
        let mut ws = Workspace::new(&b, &m.cfg, 61, false, 16);
        let mut out = Vec::new();
        m.forward_backward(&b, &mut ws, &s.ids, 0, Head::Logits(&mut out), None);
        let out: Vec<f64> = out.iter().map(|&x| x as f64).collect();
        let want = argmaxes(&out, v);
        assert!(
            want.iter().any(|&t| t != want[0]),
            "degenerate random model"
        );
        let mut l = LlamaRows {
            b: &b,
            model: m,
            one: SelfComm::default(),
        };
        assert_eq!(l.argmax_rows(&s.ids, &rows).unwrap(), want);

        let cfg = HsaConfig::from_json_str(
            include_str!("../../configs/demo/recall-hsa.json"),
            "recall-hsa.json",
        )
        .unwrap();
        assert_eq!(cfg.chunk_size, 8);
        let h = HsaModel::init_random(&b, cfg, 4).unwrap();
        let mut other = s.ids.clone();
        other.resize(64, 5);
        let (_, logits) = h
            .forward_backward(&b, &other, 0, HsaHead::Logits, None)
            .unwrap();
        let want = argmaxes(&logits[..61 * v], v);
        assert!(
            want.iter().any(|&t| t != want[0]),
            "degenerate random model"
        );
        let mut r = HsaRows { b: &b, model: h };
        assert_eq!(r.argmax_rows(&s.ids, &rows).unwrap(), want);
    }

    #[test]
    fn argmax_takes_the_first_largest_and_refuses_nan() {
        assert_eq!(argmax(&[0.0f32, 2.0, 2.0, -1.0]).unwrap(), 1);
        assert_eq!(argmax(&[-3.0f64]).unwrap(), 0);
        assert!(argmax(&[0.0f32, f32::NAN]).is_err());
    }
}
