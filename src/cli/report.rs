//! `ultralong report`: one Markdown page comparing models from their `eval niah` and `eval ppl`
//! outputs — NIAH accuracy by context length (and overall), loss by position bucket, the heatmaps,
//! and one chart with every model's loss-by-position curve. `make demo` writes its report with it;
//! it equally compares a user's checkpoints (before/after an extension, ablations).
//!
//! ```text
//! ultralong report --niah base=runs/x/niah-base --niah yarn=runs/x/niah-yarn \
//!                  --ppl base=runs/x/ppl-base --ppl yarn=runs/x/ppl-yarn \
//!                  [--preamble notes.md] [--title T] --out runs/x/REPORT.md
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::plot::{LineChart, Series, line_chart};

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// NAME=DIR of an `eval niah --out DIR` (niah.json, niah.png); repeat per model, in order.
    #[arg(long)]
    pub niah: Vec<String>,
    /// NAME=DIR of an `eval ppl --out DIR` (ppl.json); repeat per model, in order.
    #[arg(long)]
    pub ppl: Vec<String>,
    /// Markdown put before the tables (what was run, training losses, timings).
    #[arg(long)]
    pub preamble: Option<PathBuf>,
    #[arg(long, default_value = "Evaluation report")]
    pub title: String,
    /// The Markdown file to write; the comparison chart goes next to it (`ppl-compare.png`).
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

/// A path to `target` as seen from the directory of `from` (for Markdown image links), falling
/// back to the path itself when they share no prefix.
fn relative_to(target: &Path, from_dir: &Path) -> String {
    let t: Vec<_> = target.components().collect();
    let f: Vec<_> = from_dir.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    if common == 0 && (target.is_absolute() != from_dir.is_absolute()) {
        return target.display().to_string();
    }
    let mut p = PathBuf::new();
    for _ in common..f.len() {
        p.push("..");
    }
    for c in &t[common..] {
        p.push(c);
    }
    p.display().to_string()
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
    if a.niah.is_empty() && a.ppl.is_empty() {
        bail!("nothing to report: give --niah NAME=DIR and/or --ppl NAME=DIR");
    }
    let out_dir = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
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
            writeln!(
                md,
                "Partial credit, the same cells: the share of the number's digits the answer has \
                 in place (mean over cells; exact match above needs all of them).\n"
            )?;
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
        for (name, dir, _, _) in &rows {
            let png = dir.join("niah.png");
            if png.exists() {
                writeln!(
                    md,
                    "**{name}**\n\n![NIAH {name}]({})\n",
                    relative_to(&png, &out_dir)
                )?;
            }
        }
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
            "\n(mean next-token loss in nats per bucket of positions)\n"
        )?;
        let png = out_dir.join("ppl-compare.png");
        line_chart(
            &png,
            &LineChart {
                title: "Loss by position",
                x_label: "position (tokens of context)",
                y_label: "mean next-token loss (nats)",
                series: &series,
                log_x: true,
            },
        )?;
        writeln!(md, "![loss by position](ppl-compare.png)\n")?;
    }
    crate::io::write_atomic(&a.out, md.as_bytes())?;
    println!("{}", a.out.display());
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
    fn paths_and_labels() {
        assert_eq!(
            relative_to(
                Path::new("runs/demo/niah-base/niah.png"),
                Path::new("runs/demo")
            ),
            "niah-base/niah.png"
        );
        assert_eq!(
            relative_to(Path::new("a/b.png"), Path::new("c")),
            "../a/b.png"
        );
        assert_eq!(count_label(4096), "4K");
        assert_eq!(count_label(1 << 20), "1M");
        assert_eq!(count_label(300), "300");
        assert!(named("x", "niah").is_err());
    }
}
