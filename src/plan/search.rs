//! The layout search of `ultralong plan`: which (tp, cp, dp) of N GPUs the layout rules allow,
//! each one's memory and step time, and the one to use (the fastest that fits, the config's
//! preference first, ties broken by the smaller peak); the fewest GPUs on which a run fits.

use serde::Serialize;

use super::RunShape;
use super::memory::{Memory, RankShape, Target, memory};
use super::time::{Hardware, StepTime, step_time};
use crate::model::config::ModelConfig;
use crate::parallel::topology::Layout;

/// Why a layout cannot run this config, or `None` when it can (`parallel::topology` rules and
/// the trainer's: tp ≤ KV heads, heads/FFN/vocab divisible by tp, seq_len a multiple of
/// 2·cp·tp, the global batch divisible by dp).
pub fn layout_problem(cfg: &ModelConfig, run: &RunShape, layout: Layout) -> Option<String> {
    if let Err(e) = layout.check_model(cfg) {
        return Some(e.to_string());
    }
    if let Err(e) = layout.check_seq_len(run.seq_len) {
        return Some(e.to_string());
    }
    if !run.seq_len.is_multiple_of(layout.cp * layout.tp) {
        return Some(format!(
            "seq_len {} does not split over cp {} × tp {}",
            run.seq_len, layout.cp, layout.tp
        ));
    }
    if !run.global_batch.is_multiple_of(layout.dp) {
        return Some(format!(
            "the global batch of {} sequences does not divide over dp {}",
            run.global_batch, layout.dp
        ));
    }
    None
}

/// Every (tp, cp, dp) with tp·cp·dp = `gpus` and tp a power of two ≤ the KV heads.
pub fn factorisations(cfg: &ModelConfig, gpus: usize) -> Vec<Layout> {
    let mut out = Vec::new();
    let mut tp = 1;
    while tp <= cfg.num_key_value_heads {
        if gpus.is_multiple_of(tp) {
            let rest = gpus / tp;
            for cp in (1..=rest).filter(|cp| rest.is_multiple_of(*cp)) {
                out.push(Layout {
                    tp,
                    cp,
                    dp: rest / cp,
                });
            }
        }
        tp *= 2;
    }
    out
}

/// One candidate layout: valid or not, its memory and time.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    pub layout: Layout,
    /// Why the layout rules refuse it.
    pub problem: Option<String>,
    pub peak_bytes: u64,
    pub fits: bool,
    pub step: Option<StepTime>,
    #[serde(skip)]
    pub memory: Option<Memory>,
}

/// The layouts of `gpus` GPUs for a run, and the one to use.
#[derive(Clone, Debug, Serialize)]
pub struct Search {
    pub candidates: Vec<Candidate>,
    /// Index into `candidates` of the chosen layout.
    pub chosen: Option<usize>,
    /// Why it was chosen.
    pub reason: String,
}

/// Step times within this fraction of the fastest count as equal: the model cannot tell them
/// apart, and the layout with the most memory headroom is the safer choice among them.
pub const TIE: f64 = 0.01;

/// What the config (or the command line) asks for: a tensor- and/or context-parallel size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefer {
    pub tp: Option<usize>,
    pub cp: Option<usize>,
}

impl Prefer {
    fn matches(&self, l: &Layout) -> bool {
        self.tp.is_none_or(|t| t == l.tp) && self.cp.is_none_or(|c| c == l.cp)
    }
    fn is_some(&self) -> bool {
        self.tp.is_some() || self.cp.is_some()
    }
    fn text(&self) -> String {
        let mut v = Vec::new();
        if let Some(t) = self.tp {
            v.push(format!("tp {t}"));
        }
        if let Some(c) = self.cp {
            v.push(format!("cp {c}"));
        }
        v.join(" × ")
    }
}

/// Among the fitting candidates that `keep` accepts: the fastest, or within [`TIE`] of it the
/// one with the smallest peak.
fn pick(cands: &[Candidate], keep: impl Fn(&Candidate) -> bool) -> Option<usize> {
    let ok: Vec<usize> = (0..cands.len())
        .filter(|&i| cands[i].fits && keep(&cands[i]))
        .collect();
    let time = |i: usize| cands[i].step.as_ref().map_or(f64::INFINITY, |s| s.step_s);
    let best = ok.iter().map(|&i| time(i)).fold(f64::INFINITY, f64::min);
    ok.into_iter()
        .filter(|&i| time(i) <= best * (1.0 + TIE))
        .min_by_key(|&i| cands[i].peak_bytes)
}

/// Evaluate every layout of `gpus` GPUs and choose one: among those that fit (and match the
/// config's `prefer`red tp/cp when any of them does), the fastest; step times within [`TIE`]
/// of the fastest count as equal, and the smallest peak wins among them.
pub fn search(
    cfg: &ModelConfig,
    run: &RunShape,
    gpus: usize,
    hw: &Hardware,
    mfu: f64,
    target: Target,
    prefer: Prefer,
) -> Search {
    let mut cands: Vec<Candidate> = factorisations(cfg, gpus)
        .into_iter()
        .map(|layout| {
            let problem = layout_problem(cfg, run, layout);
            if problem.is_some() {
                return Candidate {
                    layout,
                    problem,
                    peak_bytes: 0,
                    fits: false,
                    step: None,
                    memory: None,
                };
            }
            let shape = RankShape {
                cfg,
                layout,
                seq_len: run.seq_len,
                recompute: run.recompute,
                ce_chunk: run.ce_chunk,
            };
            let reserve = if target == Target::Cuda {
                hw.reserve
            } else {
                0
            };
            let mem = memory(&shape, target, reserve);
            let step = step_time(cfg, run, layout, hw, mfu, &mem.dtypes);
            Candidate {
                layout,
                problem: None,
                peak_bytes: mem.device_peak,
                fits: mem.device_peak <= hw.mem_bytes,
                step: Some(step),
                memory: Some(mem),
            }
        })
        .collect();
    // Display order: valid before invalid, fitting before not, then by step time and peak.
    cands.sort_by(|a, b| {
        let key = |c: &Candidate| {
            (
                c.problem.is_some(),
                !c.fits,
                c.step.as_ref().map_or(f64::INFINITY, |s| s.step_s),
                c.peak_bytes,
            )
        };
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.cmp(&kb.1))
            .then(ka.2.total_cmp(&kb.2))
            .then(ka.3.cmp(&kb.3))
    });
    let free = pick(&cands, |_| true);
    let rule = format!(
        "the fastest that fits (step times within {:.0}% count as equal; then the smallest peak)",
        TIE * 100.0
    );
    let (chosen, reason) = if prefer.is_some() {
        match pick(&cands, |c| prefer.matches(&c.layout)) {
            Some(i) if Some(i) == free => (
                Some(i),
                format!("the config's {}, also {rule}", prefer.text()),
            ),
            Some(i) => (
                Some(i),
                format!(
                    "the config's {} (without it: tp {} × cp {} × dp {}, {rule})",
                    prefer.text(),
                    free.map_or(0, |f| cands[f].layout.tp),
                    free.map_or(0, |f| cands[f].layout.cp),
                    free.map_or(0, |f| cands[f].layout.dp),
                ),
            ),
            None => {
                // Keep the config's tp when only its cp cannot be had on this many GPUs.
                let tp_only = Prefer {
                    tp: prefer.tp,
                    cp: None,
                };
                match prefer
                    .cp
                    .and(prefer.tp)
                    .and_then(|_| pick(&cands, |c| tp_only.matches(&c.layout)))
                {
                    Some(i) => (
                        Some(i),
                        format!(
                            "the config's {}, {rule}; its {} does not fit or is not valid on {gpus} GPUs",
                            tp_only.text(),
                            prefer.text()
                        ),
                    ),
                    None => (
                        free,
                        format!(
                            "{rule}; the config's {} does not fit or is not valid on {gpus} GPUs",
                            prefer.text()
                        ),
                    ),
                }
            }
        }
    } else {
        (free, rule)
    };
    let reason = if chosen.is_none() {
        "no layout fits".to_string()
    } else {
        reason
    };
    Search {
        candidates: cands,
        chosen,
        reason,
    }
}

impl Search {
    /// The valid layout with the smallest peak (for a refusal: how far it is from fitting).
    pub fn smallest(&self) -> Option<&Candidate> {
        self.candidates
            .iter()
            .filter(|c| c.problem.is_none())
            .min_by_key(|c| c.peak_bytes)
    }
}

/// The smallest power-of-two GPU count (up to 2^16) on which some layout fits, if any.
pub fn min_gpus(
    cfg: &ModelConfig,
    run: &RunShape,
    hw: &Hardware,
    mfu: f64,
    target: Target,
) -> Option<usize> {
    (0..=16).map(|k| 1usize << k).find(|&g| {
        search(cfg, run, g, hw, mfu, target, Prefer::default())
            .chosen
            .is_some()
    })
}

#[cfg(test)]
mod tests {
    use super::super::{GIB, llama_8b, run};
    use super::*;

    #[test]
    fn layout_rules() {
        let cfg = llama_8b();
        let l = |tp, cp, dp| Layout { tp, cp, dp };
        let r = run(1 << 20, 8);
        assert!(layout_problem(&cfg, &r, l(8, 4, 1)).is_none());
        let e = layout_problem(&cfg, &r, l(16, 2, 1)).unwrap();
        assert!(e.contains("exceeds num_key_value_heads 8"), "{e}");
        let e = layout_problem(&cfg, &r, l(8, 3, 1)).unwrap();
        assert!(e.contains("multiple of 2·cp·tp = 48"), "{e}");
        let e = layout_problem(&cfg, &run(1 << 20, 2), l(8, 4, 4)).unwrap();
        assert!(e.contains("does not divide over dp 4"), "{e}");
        // tp: powers of two up to the KV heads, every cp × dp split of the rest.
        let f = factorisations(&cfg, 32);
        assert!(
            f.iter()
                .all(|x| x.world() == 32 && x.tp.is_power_of_two() && x.tp <= 8)
        );
        assert_eq!(f.iter().filter(|x| x.tp == 8).count(), 3);
        assert_eq!(f.len(), 6 + 5 + 4 + 3);
    }

    #[test]
    fn paper_layouts_fit_on_80gb() {
        let cfg = llama_8b();
        let hw = Hardware::parse("h100-80g").unwrap();
        for (seq, batch, gpus, cp) in [
            (1 << 20, 8, 32, 4),
            (1 << 21, 4, 128, 16),
            (1 << 22, 2, 256, 16),
        ] {
            let r = run(seq, batch);
            let p = Prefer {
                tp: Some(8),
                cp: Some(cp),
            };
            let s = search(&cfg, &r, gpus, &hw, 0.4, Target::Cuda, p);
            let c = &s.candidates[s.chosen.expect("a layout fits")];
            assert_eq!((c.layout.tp, c.layout.cp), (8, cp), "{}", s.reason);
            assert!(c.peak_bytes < hw.mem_bytes);
            eprintln!(
                "S = {seq}: tp 8 cp {cp}: peak {:.1} GiB",
                c.peak_bytes as f64 / GIB
            );
            assert!(c.step.as_ref().unwrap().ring.as_ref().unwrap().hides);
        }
    }

    #[test]
    fn too_few_gpus_for_4m_is_refused_with_the_margin() {
        let cfg = llama_8b();
        let hw = Hardware::parse("h100-80g").unwrap();
        let s = search(
            &cfg,
            &run(1 << 22, 2),
            32,
            &hw,
            0.4,
            Target::Cuda,
            Prefer::default(),
        );
        assert!(s.chosen.is_none());
        let best = s.smallest().unwrap();
        assert!(best.peak_bytes > hw.mem_bytes);
        assert_eq!(best.layout.tp * best.layout.cp, 32);
    }
}
