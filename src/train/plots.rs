//! The PNG plots of a run, from its `metrics.jsonl`: `loss.png` (loss per step and its moving
//! average) and `throughput.png` (tokens/s per step). Written by rank 0 at the end of a run (also
//! when it stops for preemption) and on demand with `ultralong plot --run DIR`, which works while
//! a job is still writing the file (a partly written last line is ignored).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::plot::{LineChart, Series, line_chart};

/// The values of one metrics line that the plots use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub step: f64,
    pub loss: f64,
    pub tokens_per_s: f64,
}

/// Reads the `step`, `loss` and `tokens_per_s` of every complete line of `path`. A line that is
/// not JSON is an error naming the file and line, except a last line without its newline (a
/// writer still at work).
pub fn read_metrics(path: &Path) -> Result<Vec<Point>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == lines.len() && !complete => break,
            Err(e) => bail!("{}:{}: not a JSON metrics line: {e}", path.display(), i + 1),
        };
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
        let Some(step) = num("step") else {
            bail!(
                "{}:{}: metrics line has no numeric \"step\"",
                path.display(),
                i + 1
            );
        };
        out.push(Point {
            step,
            loss: num("loss").unwrap_or(f64::NAN),
            tokens_per_s: num("tokens_per_s").unwrap_or(f64::NAN),
        });
    }
    Ok(out)
}

/// Exponential moving average with bias correction (as TensorBoard's smoothing), skipping NaN.
pub fn ema(values: &[f64], alpha: f64) -> Vec<f64> {
    let mut m = 0.0;
    let mut w = 0.0;
    values
        .iter()
        .map(|&v| {
            if v.is_finite() {
                m = alpha * m + (1.0 - alpha) * v;
                w = alpha * w + (1.0 - alpha);
            }
            if w > 0.0 { m / w } else { f64::NAN }
        })
        .collect()
}

/// Writes `loss.png` and `throughput.png` into `out_dir` from `out_dir/metrics.jsonl`; returns
/// the files written.
pub fn write_run_plots(out_dir: &Path) -> Result<Vec<PathBuf>> {
    let metrics = out_dir.join("metrics.jsonl");
    let pts = read_metrics(&metrics)?;
    if pts.is_empty() {
        bail!("{}: no steps to plot", metrics.display());
    }
    let steps: Vec<f64> = pts.iter().map(|p| p.step).collect();
    let loss: Vec<f64> = pts.iter().map(|p| p.loss).collect();
    // Smoothing over ~1/20 of the run (at least 1 step).
    let alpha = 1.0 - 1.0 / (pts.len() as f64 / 20.0).max(1.0);
    let smooth = ema(&loss, alpha);
    let zip = |ys: &[f64]| steps.iter().copied().zip(ys.iter().copied()).collect();
    let loss_png = out_dir.join("loss.png");
    let mut series = vec![Series {
        name: "loss".into(),
        points: zip(&loss),
    }];
    if alpha > 0.0 {
        series.push(Series {
            name: "moving average".into(),
            points: zip(&smooth),
        });
    }
    line_chart(
        &loss_png,
        &LineChart {
            title: "Training loss",
            x_label: "step",
            y_label: "loss (nats per target token)",
            series: &series,
            log_x: false,
            log_y: false,
        },
    )?;
    let tps: Vec<f64> = pts.iter().map(|p| p.tokens_per_s).collect();
    let tp_png = out_dir.join("throughput.png");
    line_chart(
        &tp_png,
        &LineChart {
            title: "Throughput",
            x_label: "step",
            y_label: "tokens/s (whole job)",
            series: &[Series {
                name: "tokens/s".into(),
                points: zip(&tps),
            }],
            log_x: false,
            log_y: false,
        },
    )?;
    Ok(vec![loss_png, tp_png])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_is_bias_corrected_and_skips_nan() {
        let e = ema(&[2.0, f64::NAN, 4.0], 0.5);
        assert_eq!(e[0], 2.0, "first value is itself after bias correction");
        assert_eq!(e[1], 2.0);
        // (0.5·0.5·2 + 0.5·4) / (0.5·0.5 + 0.5) = 3 / 0.75 = 10/3
        assert!((e[2] - 10.0 / 3.0).abs() < 1e-15);
        assert!(ema(&[f64::NAN], 0.9)[0].is_nan());
    }

    #[test]
    fn reads_lines_tolerates_a_partial_last_line_and_names_bad_ones() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("metrics.jsonl");
        std::fs::write(
            &p,
            "{\"step\":1,\"loss\":2.5,\"tokens_per_s\":100}\n{\"step\":2,\"loss\":2.0}\n{\"step\":3,\"lo",
        )
        .unwrap();
        let v = read_metrics(&p).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[0],
            Point {
                step: 1.0,
                loss: 2.5,
                tokens_per_s: 100.0
            }
        );
        assert!(v[1].tokens_per_s.is_nan());
        std::fs::write(&p, "{\"step\":1}\nnot json\n{\"step\":3}\n").unwrap();
        let e = read_metrics(&p).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:2"), "{e}");
    }

    #[test]
    fn writes_both_pngs() {
        let d = tempfile::tempdir().unwrap();
        let lines: String = (1..=30)
            .map(|s| {
                format!(
                    "{{\"step\":{s},\"loss\":{},\"tokens_per_s\":{}}}\n",
                    3.0 / s as f64,
                    1000 + s
                )
            })
            .collect();
        std::fs::write(d.path().join("metrics.jsonl"), lines).unwrap();
        let files = write_run_plots(d.path()).unwrap();
        assert_eq!(files.len(), 2);
        for f in files {
            assert_eq!(&std::fs::read(&f).unwrap()[..4], b"\x89PNG");
        }
        let e = write_run_plots(&d.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing/metrics.jsonl"), "{e}");
    }
}
