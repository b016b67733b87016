//! `ultralong report`: one Markdown page comparing models from their `eval niah`, `eval ppl` and
//! `eval recall` outputs — what the numbers mean, NIAH accuracy by context length (and overall),
//! exact and by digits, a heatmap of each per depth × length under the report's model names, loss
//! by position bucket, and one chart (log-log) with every model's loss-by-position curve; recall
//! accuracy by length with its sample counts and one chart (log x) of every model's curve. `make
//! demo` writes its report with it; it equally compares a user's checkpoints (before/after an
//! extension, ablations, the two architectures).
//!
//! ```text
//! ultralong report --niah base=runs/x/niah-base --niah yarn=runs/x/niah-yarn \
//!                  --ppl base=runs/x/ppl-base --ppl yarn=runs/x/ppl-yarn \
//!                  --recall base=runs/x/recall-base --recall hsa=runs/x/recall-hsa \
//!                  [--preamble notes.md] [--title T] --out runs/x/REPORT.md
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::plot::{Heatmap, LineChart, Series, heatmap, line_chart, line_chart_in};

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// NAME=DIR of an `eval niah --out DIR` (niah.json, niah.png); repeat per model, in order.
    #[arg(long)]
    pub niah: Vec<String>,
    /// NAME=DIR of an `eval ppl --out DIR` (ppl.json); repeat per model, in order.
    #[arg(long)]
    pub ppl: Vec<String>,
    /// NAME=DIR of an `eval recall --out DIR` (recall.json); repeat per model, in order.
    #[arg(long)]
    pub recall: Vec<String>,
    /// Markdown put before the tables (what was run, training losses, timings).
    #[arg(long)]
    pub preamble: Option<PathBuf>,
    #[arg(long, default_value = "Evaluation report")]
    pub title: String,
    /// The Markdown file to write; the charts go next to it (`ppl-compare.png`,
    /// `recall-compare.png`).
    #[arg(long)]
    pub out: PathBuf,
}

fn named(arg: &str, flag: &str) -> Result<(String, PathBuf)> {
    let (n, d) = arg
        .split_once('=')
        .with_context(|| format!("--{flag} {arg:?}: expected NAME=DIR"))?;
    if n.is_empty() || d.is_empty() {
        bail!("--{flag} {arg:?}: expected NAME=DIR with both parts non-empty");
    }
    Ok((n.to_string(), PathBuf::from(d)))
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
}

/// Accuracy by length: (length → (correct, total)) from niah.json's `cells`.
fn niah_by_length(v: &Value, src: &Path) -> Result<BTreeMap<u64, (u64, u64)>> {
    let cells = v["cells"]
        .as_array()
        .with_context(|| format!("{}: no \"cells\" array", src.display()))?;
    let mut m: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for (i, c) in cells.iter().enumerate() {
        let len = c["length"]
            .as_u64()
            .with_context(|| format!("{}: cells[{i}] has no \"length\"", src.display()))?;
        let ok = c["correct"]
            .as_bool()
            .with_context(|| format!("{}: cells[{i}] has no \"correct\"", src.display()))?;
        let e = m.entry(len).or_default();
        e.0 += ok as u64;
        e.1 += 1;
    }
    Ok(m)
}

/// Mean digit accuracy by length (length → (Σ digits_correct, cells)); `None` when the cells carry
/// no `digits_correct` (an older niah.json).
fn niah_digits_by_length(v: &Value) -> Option<BTreeMap<u64, (f64, u64)>> {
    let mut m: BTreeMap<u64, (f64, u64)> = BTreeMap::new();
    for c in v["cells"].as_array()? {
        let e = m.entry(c["length"].as_u64()?).or_default();
        e.0 += c["digits_correct"].as_f64()?;
        e.1 += 1;
    }
    Some(m)
}

/// One model's NIAH grids from niah.json's cells: lengths, depths, and per `[depth][length]` the
/// share of trials answered exactly and the mean share of digits in place (NaN: no such cell, or
/// no `digits_correct` in an older niah.json).
struct NiahGrid {
    lengths: Vec<u64>,
    depths: Vec<f64>,
    exact: Vec<Vec<f64>>,
    digits: Vec<Vec<f64>>,
    /// Trials per (length, depth) cell, when every cell has the same number.
    trials: Option<u64>,
}

fn niah_grid(v: &Value) -> NiahGrid {
    let cells = v["cells"].as_array().map(Vec::as_slice).unwrap_or_default();
    let mut lengths: Vec<u64> = cells.iter().filter_map(|c| c["length"].as_u64()).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut depths: Vec<f64> = cells.iter().filter_map(|c| c["depth"].as_f64()).collect();
    depths.sort_by(f64::total_cmp);
    depths.dedup();
    let (nd, nl) = (depths.len(), lengths.len());
    let mut sum = vec![vec![(0.0, 0.0, 0u64); nl]; nd];
    for c in cells {
        let (Some(l), Some(d)) = (c["length"].as_u64(), c["depth"].as_f64()) else {
            continue;
        };
        let (Ok(li), Some(di)) = (
            lengths.binary_search(&l),
            depths.iter().position(|&x| x == d),
        ) else {
            continue;
        };
        let e = &mut sum[di][li];
        e.0 += c["correct"].as_bool().unwrap_or(false) as u64 as f64;
        e.1 += c["digits_correct"].as_f64().unwrap_or(f64::NAN);
        e.2 += 1;
    }
    let mean = |f: fn(&(f64, f64, u64)) -> f64| -> Vec<Vec<f64>> {
        sum.iter()
            .map(|r| {
                r.iter()
                    .map(|e| if e.2 > 0 { f(e) / e.2 as f64 } else { f64::NAN })
                    .collect()
            })
            .collect()
    };
    let counts: Vec<u64> = sum.iter().flatten().map(|e| e.2).collect();
    let trials = counts
        .first()
        .copied()
        .filter(|&n| n > 0 && counts.iter().all(|&c| c == n));
    NiahGrid {
        exact: mean(|e| e.0),
        digits: mean(|e| e.1),
        lengths,
        depths,
        trials,
    }
}

/// A model name as a file name (letters, digits, `.`, `-`, `_`).
fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// One model's loss by position: name, mean loss, (start, end, mean loss) per bucket.
type PplRow = (String, f64, Vec<(u64, u64, f64)>);

fn count_label(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}K", n >> 10)
    } else {
        n.to_string()
    }
}

pub fn run(a: ReportArgs) -> Result<()> {
    if a.niah.is_empty() && a.ppl.is_empty() && a.recall.is_empty() {
        bail!("nothing to report: give --niah, --ppl or --recall NAME=DIR");
    }
    let out_dir = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("--out: cannot create {}", out_dir.display()))?;
    let mut md = String::new();
    writeln!(md, "# {}\n", a.title)?;
    if let Some(p) = &a.preamble {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        writeln!(md, "{}\n", text.trim_end())?;
    }

    if !a.niah.is_empty() {
        let mut rows = Vec::new();
        let mut lengths: Vec<u64> = Vec::new();
        for arg in &a.niah {
            let (name, dir) = named(arg, "niah")?;
            let src = dir.join("niah.json");
            let v = read_json(&src)?;
            let by = niah_by_length(&v, &src)?;
            for &l in by.keys() {
                if !lengths.contains(&l) {
                    lengths.push(l);
                }
            }
            let digits = niah_digits_by_length(&v);
            rows.push((name, dir, by, digits));
        }
        lengths.sort_unstable();
        writeln!(md, "## Needle in a haystack: accuracy by context length\n")?;
        let grids: Vec<NiahGrid> = rows
            .iter()
            .map(|(_, dir, _, _)| read_json(&dir.join("niah.json")).map(|v| niah_grid(&v)))
            .collect::<Result<_>>()?;
        let first = read_json(&rows[0].1.join("niah.json"))?;
        let digits = first["digits"]
            .as_u64()
            .map_or("all".into(), |d| d.to_string());
        let trials = grids[0]
            .trials
            .filter(|t| grids.iter().all(|g| g.trials == Some(*t)));
        let per_cell = match trials {
            Some(t) => format!(
                "{t} trials per cell (length × depth), each with its own number, so one cell's \
                 accuracy moves in steps of {}% and each length below pools {} trials",
                crate::plot::tick_label(100.0 / t as f64),
                t as usize * grids[0].depths.len()
            ),
            None => "the trials per cell differ between models (niah.json `trials`)".into(),
        };
        writeln!(
            md,
            "What is shown: a needle sentence holding a random {digits}-digit number is placed at a \
             depth of the haystack, and the model, asked for it, answers greedily; {per_cell}. \
             **Exact match** counts an answer that has all {digits} digits in order; **digits in \
             place** gives partial credit, the share of the number's digits the answer has at \
             their place (it separates models that all miss exact match). What is not shown: \
             retrieval of anything but this one needle format, and answers that are right but \
             phrased otherwise.\n"
        )?;
        write!(md, "| model | overall |")?;
        for l in &lengths {
            write!(md, " {} |", count_label(*l))?;
        }
        writeln!(md)?;
        writeln!(md, "|---|---:|{}", "---:|".repeat(lengths.len()))?;
        for (name, _, by, _) in &rows {
            let (c, t) = by.values().fold((0, 0), |(c, t), &(a, b)| (c + a, t + b));
            write!(
                md,
                "| {name} | {:.1}% ({c}/{t}) |",
                100.0 * c as f64 / t as f64
            )?;
            for l in &lengths {
                match by.get(l) {
                    Some(&(c, t)) => write!(md, " {:.0}% |", 100.0 * c as f64 / t as f64)?,
                    None => write!(md, " – |")?,
                }
            }
            writeln!(md)?;
        }
        writeln!(md)?;
        if rows.iter().all(|r| r.3.is_some()) {
            writeln!(md, "Digits in place, the same cells (mean over trials):\n")?;
            write!(md, "| model | overall |")?;
            for l in &lengths {
                write!(md, " {} |", count_label(*l))?;
            }
            writeln!(md)?;
            writeln!(md, "|---|---:|{}", "---:|".repeat(lengths.len()))?;
            for (name, _, _, digits) in &rows {
                let Some(by) = digits else { continue };
                let (c, t) = by.values().fold((0.0, 0), |(c, t), &(a, b)| (c + a, t + b));
                write!(md, "| {name} | {:.0}% |", 100.0 * c / t as f64)?;
                for l in &lengths {
                    match by.get(l) {
                        Some(&(c, t)) => write!(md, " {:.0}% |", 100.0 * c / t as f64)?,
                        None => write!(md, " – |")?,
                    }
                }
                writeln!(md)?;
            }
            writeln!(md)?;
        }
        // Heatmaps under the report's names, cells labelled as the colour bar (a fraction).
        writeln!(
            md,
            "Per depth × length (rows: depth of the needle, 0% = start of the context; each cell \
             the fraction of its trials, as the colour bar):\n"
        )?;
        writeln!(
            md,
            "| model | exact match | digits in place |\n|---|---|---|"
        )?;
        for ((name, _, _, _), g) in rows.iter().zip(&grids) {
            let x_ticks: Vec<String> = g.lengths.iter().map(|&l| count_label(l)).collect();
            let y_ticks: Vec<String> = g.depths.iter().map(|d| format!("{d}%")).collect();
            let mut links = Vec::new();
            for (what, file, values) in [
                (
                    "exact match",
                    format!("niah-{}.png", file_stem(name)),
                    &g.exact,
                ),
                (
                    "digits in place",
                    format!("niah-digits-{}.png", file_stem(name)),
                    &g.digits,
                ),
            ] {
                let all: Vec<f64> = values
                    .iter()
                    .flatten()
                    .copied()
                    .filter(|v| v.is_finite())
                    .collect();
                if all.is_empty() {
                    links.push("–".to_string());
                    continue;
                }
                let overall = all.iter().sum::<f64>() / all.len() as f64;
                let trials = g
                    .trials
                    .map_or(String::new(), |t| format!(", {t} trials per cell"));
                heatmap(
                    &out_dir.join(&file),
                    &Heatmap {
                        title: &format!(
                            "NIAH {what}: {name} ({:.0}% overall{trials})",
                            100.0 * overall
                        ),
                        x_label: "context length (tokens)",
                        y_label: "needle depth",
                        x_ticks: &x_ticks,
                        y_ticks: &y_ticks,
                        values,
                        min: 0.0,
                        max: 1.0,
                        rows_top_down: true,
                        annotate: x_ticks.len() * y_ticks.len() <= 400,
                    },
                )?;
                links.push(format!("![NIAH {what} {name}]({file})"));
            }
            writeln!(md, "| **{name}** | {} | {} |", links[0], links[1])?;
        }
        writeln!(md)?;
    }

    if !a.ppl.is_empty() {
        let mut series = Vec::new();
        let mut table: Vec<PplRow> = Vec::new();
        for arg in &a.ppl {
            let (name, dir) = named(arg, "ppl")?;
            let src = dir.join("ppl.json");
            let v = read_json(&src)?;
            let buckets = v["buckets"]
                .as_array()
                .with_context(|| format!("{}: no \"buckets\" array", src.display()))?;
            let mut rows = Vec::new();
            let mut pts = Vec::new();
            for (i, b) in buckets.iter().enumerate() {
                let field = |k: &str| {
                    b[k].as_f64()
                        .with_context(|| format!("{}: buckets[{i}] has no \"{k}\"", src.display()))
                };
                let (s, e, l) = (field("start")?, field("end")?, field("mean_loss")?);
                rows.push((s as u64, e as u64, l));
                pts.push((field("mean_position")?, l));
            }
            let mean = v["mean_loss"].as_f64().unwrap_or(f64::NAN);
            series.push(Series {
                name: name.clone(),
                points: pts,
            });
            table.push((name, mean, rows));
        }
        writeln!(md, "## Loss by position (held-out text)\n")?;
        let edges: Vec<(u64, u64)> = table[0].2.iter().map(|&(s, e, _)| (s, e)).collect();
        let same = table
            .iter()
            .all(|(_, _, r)| r.iter().map(|&(s, e, _)| (s, e)).eq(edges.iter().copied()));
        if same {
            write!(md, "| model | mean |")?;
            for (s, e) in &edges {
                write!(md, " {}–{} |", count_label(*s), count_label(*e))?;
            }
            writeln!(md)?;
            writeln!(md, "|---|---:|{}", "---:|".repeat(edges.len()))?;
            for (name, mean, rows) in &table {
                write!(md, "| {name} | {mean:.3} |")?;
                for &(_, _, l) in rows {
                    write!(md, " {l:.3} |")?;
                }
                writeln!(md)?;
            }
        } else {
            writeln!(md, "| model | mean loss |\n|---|---:|")?;
            for (name, mean, _) in &table {
                writeln!(md, "| {name} | {mean:.3} |")?;
            }
        }
        writeln!(
            md,
            "\n(mean next-token loss in nats per bucket of positions; the chart has both axes on \
             log scales, so that losses near zero stay apart)\n"
        )?;
        let png = out_dir.join("ppl-compare.png");
        line_chart(
            &png,
            &LineChart {
                title: "Loss by position (log-log)",
                x_label: "position (tokens of context)",
                y_label: "mean next-token loss (nats)",
                series: &series,
                log_x: true,
                log_y: true,
            },
        )?;
        writeln!(md, "![loss by position](ppl-compare.png)\n")?;
    }
    if !a.recall.is_empty() {
        recall_section(&mut md, &a.recall, &out_dir)?;
    }
    crate::io::write_atomic(&a.out, md.as_bytes())?;
    println!("{}", a.out.display());
    Ok(())
}

/// One model's recall.json: its architecture, training length, and per length (correct, samples).
struct RecallRow {
    name: String,
    arch: String,
    train_len: u64,
    by: BTreeMap<u64, (u64, u64)>,
}

fn recall_row(name: String, v: &Value, src: &Path) -> Result<RecallRow> {
    let field = |x: &Value, k: &str, at: &str| {
        x[k].as_u64()
            .with_context(|| format!("{}: {at} has no \"{k}\"", src.display()))
    };
    let mut by = BTreeMap::new();
    let lengths = v["lengths"]
        .as_array()
        .with_context(|| format!("{}: no \"lengths\" array", src.display()))?;
    for (i, l) in lengths.iter().enumerate() {
        let at = format!("lengths[{i}]");
        by.insert(
            field(l, "length", &at)?,
            (field(l, "correct", &at)?, field(l, "samples", &at)?),
        );
    }
    Ok(RecallRow {
        name,
        arch: v["arch"].as_str().unwrap_or("?").to_string(),
        train_len: field(v, "train_seq_len", "the file")?,
        by,
    })
}

/// The recall section: what the task is, accuracy by length (with counts) per model, the chart.
fn recall_section(md: &mut String, args: &[String], out_dir: &Path) -> Result<()> {
    let mut rows = Vec::new();
    let mut first: Option<Value> = None;
    for arg in args {
        let (name, dir) = named(arg, "recall")?;
        let src = dir.join("recall.json");
        let v = read_json(&src)?;
        rows.push(recall_row(name, &v, &src)?);
        first.get_or_insert(v);
    }
    let v = first.expect("at least one --recall");
    let spec = &v["spec"];
    let n = |k: &str| spec[k].as_u64().unwrap_or(0);
    let mut lengths: Vec<u64> = rows.iter().flat_map(|r| r.by.keys().copied()).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let train = rows[0].train_len;
    let same_train = rows.iter().all(|r| r.train_len == train);
    writeln!(md, "## Recall by context length (synthetic task)\n")?;
    writeln!(
        md,
        "What is shown: the synthetic recall task of `ultralong prepare recall`: {} needles, each \
         one token that binds a key to a value, at random places in a haystack ({}), and {} \
         queries at the end (`<Q> key value`) asking for the values of {} of the keys. One \
         teacher-forced pass per sample; a sample counts as right when the most likely token at \
         every queried value is that value (chance: about 1/{}^{} per sample). {} Each cell gives \
         the share of samples right and (in brackets) right/evaluated; fewer samples at the \
         longest lengths, whose passes cost most (full attention is quadratic in the length, HSA's \
         retrieval too, over the chunk size); – = not evaluated.\n",
        n("needles"),
        match n("period") {
            0 => format!("filler drawn uniformly from {} symbols", n("filler")),
            p => format!("a random {p}-token filler phrase, repeated"),
        },
        n("queries"),
        n("queries"),
        n("values"),
        n("queries"),
        if same_train {
            format!(
                "Every model was trained on {train}-token samples; the header gives each length \
                 as a multiple of that."
            )
        } else {
            "The models were trained at different lengths (recall.json `train_seq_len`).".into()
        }
    )?;
    write!(md, "| model | architecture |")?;
    for &l in &lengths {
        if same_train && l % train == 0 {
            write!(md, " {} ({}×) |", count_label(l), l / train)?;
        } else {
            write!(md, " {} |", count_label(l))?;
        }
    }
    writeln!(md)?;
    writeln!(md, "|---|---|{}", "---:|".repeat(lengths.len()))?;
    let mut series = Vec::new();
    for r in &rows {
        write!(md, "| {} | {} |", r.name, r.arch)?;
        for l in &lengths {
            match r.by.get(l) {
                Some(&(c, t)) if t > 0 => {
                    write!(md, " {:.0}% ({c}/{t}) |", 100.0 * c as f64 / t as f64)?
                }
                _ => write!(md, " – |")?,
            }
        }
        writeln!(md)?;
        series.push(Series {
            name: r.name.clone(),
            points: r
                .by
                .iter()
                .filter(|e| e.1.1 > 0)
                .map(|(&l, &(c, t))| (l as f64, c as f64 / t as f64))
                .collect(),
        });
    }
    line_chart_in(
        &out_dir.join("recall-compare.png"),
        &LineChart {
            title: "Recall accuracy by context length",
            x_label: "context length (tokens, log scale)",
            y_label: "samples exactly right",
            series: &series,
            log_x: true,
            log_y: false,
        },
        Some((-0.02, 1.02)),
    )?;
    writeln!(md, "\n![recall by length](recall-compare.png)\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digit_accuracy_by_length_averages_cells() {
        let v: Value = serde_json::json!({"cells": [
            {"length": 256, "correct": false, "digits_correct": 0.5},
            {"length": 256, "correct": true, "digits_correct": 1.0},
            {"length": 1024, "correct": false, "digits_correct": 0.25}
        ]});
        let m = niah_digits_by_length(&v).unwrap();
        assert_eq!(m[&256], (1.5, 2));
        assert_eq!(m[&1024], (0.25, 1));
        let old: Value = serde_json::json!({"cells": [{"length": 256, "correct": true}]});
        assert!(niah_digits_by_length(&old).is_none());
    }

    #[test]
    fn niah_grid_averages_trials_per_depth_and_length() {
        let cell = |l: u64, d: f64, ok: bool, dig: f64| serde_json::json!({"length": l, "depth": d, "correct": ok, "digits_correct": dig});
        let v: Value = serde_json::json!({"cells": [
            cell(512, 0.0, true, 1.0), cell(512, 0.0, false, 0.5),
            cell(256, 0.0, false, 0.25), cell(256, 0.0, false, 0.75),
            cell(256, 50.0, true, 1.0), cell(256, 50.0, true, 1.0),
            cell(512, 50.0, false, 0.0), cell(512, 50.0, false, 0.0),
        ]});
        let g = niah_grid(&v);
        assert_eq!(g.lengths, vec![256, 512]);
        assert_eq!(g.depths, vec![0.0, 50.0]);
        assert_eq!(g.exact, vec![vec![0.0, 0.5], vec![1.0, 0.0]]);
        assert_eq!(g.digits, vec![vec![0.5, 0.75], vec![1.0, 0.0]]);
        assert_eq!(g.trials, Some(2));
        // Unequal trials: no single count; a missing cell is NaN.
        let v: Value = serde_json::json!({"cells": [
            cell(256, 0.0, true, 1.0), cell(256, 0.0, true, 1.0), cell(512, 50.0, false, 0.0)
        ]});
        let g = niah_grid(&v);
        assert_eq!(g.trials, None);
        assert!(g.exact[1][0].is_nan() && g.exact[0][1].is_nan());
        assert_eq!(file_stem("yarn nosep/x"), "yarn_nosep_x");
    }

    #[test]
    fn accuracy_by_length_counts_cells() {
        let v: Value = serde_json::json!({"cells": [
            {"length": 256, "correct": true}, {"length": 256, "correct": false},
            {"length": 1024, "correct": true}
        ]});
        let m = niah_by_length(&v, Path::new("n.json")).unwrap();
        assert_eq!(m[&256], (1, 2));
        assert_eq!(m[&1024], (1, 1));
        let bad: Value = serde_json::json!({"cells": [{"length": 1}]});
        let e = niah_by_length(&bad, Path::new("n.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cells[0]") && e.contains("correct"), "{e}");
    }

    #[test]
    fn the_recall_section_tabulates_each_models_lengths_with_counts() {
        let d = tempfile::tempdir().unwrap();
        let model = |name: &str, arch: &str, cells: &[(u64, u64, u64)]| {
            let lengths: Vec<Value> = cells
                .iter()
                .map(|&(l, c, t)| serde_json::json!({"length": l, "correct": c, "samples": t}))
                .collect();
            let v = serde_json::json!({"arch": arch, "train_seq_len": 128, "lengths": lengths,
                "spec": {"needles": 6, "period": 8, "queries": 3, "values": 12}});
            std::fs::create_dir_all(d.path().join(name)).unwrap();
            std::fs::write(d.path().join(name).join("recall.json"), v.to_string()).unwrap();
            format!("{name}={}", d.path().join(name).display())
        };
        let args = vec![
            model("base", "Llama", &[(128, 32, 32), (1024, 1, 32)]),
            model(
                "hsa",
                "HSA",
                &[(128, 30, 32), (1024, 32, 32), (16384, 7, 8)],
            ),
        ];
        let mut md = String::new();
        recall_section(&mut md, &args, d.path()).unwrap();
        assert!(
            md.contains("| model | architecture | 128 (1×) | 1K (8×) | 16K (128×) |"),
            "{md}"
        );
        assert!(
            md.contains("| base | Llama | 100% (32/32) | 3% (1/32) | – |"),
            "{md}"
        );
        assert!(
            md.contains("| hsa | HSA | 94% (30/32) | 100% (32/32) | 88% (7/8) |"),
            "{md}"
        );
        assert!(d.path().join("recall-compare.png").exists());
        let bad = model("bad", "Llama", &[]);
        std::fs::write(
            d.path().join("bad/recall.json"),
            r#"{"train_seq_len": 128, "lengths": [{"length": 128}]}"#,
        )
        .unwrap();
        let e = recall_section(&mut md, &[bad], d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("lengths[0]") && e.contains("correct"), "{e}");
    }

    #[test]
    fn paths_and_labels() {
        assert_eq!(count_label(4096), "4K");
        assert_eq!(count_label(1 << 20), "1M");
        assert_eq!(count_label(300), "300");
        assert!(named("x", "niah").is_err());
    }
}
