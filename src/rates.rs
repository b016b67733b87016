//! Measured kernel rates per device (bench/rates.toml) and the phase-time model built on them:
//! a phase's predicted time is its FLOPs over the measured rate of its kernel (GEMM, attention
//! forward/backward at the sequence length), or the bytes it moves over the measured bandwidth
//! (elementwise kernels, device copies, host transfers, links). `plan`'s step time, the predicted
//! column of `gpu-check --only rank4m` and `bench phases` all come from here, so a new
//! measurement in bench/results/ changes every prediction through one table.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::backend::timed::PhaseReport;

/// The table in the repository.
pub const RATES_FILE: &str = "bench/rates.toml";

/// One device's rates (a section of bench/rates.toml).
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceRates {
    pub name: String,
    /// Where the numbers were measured (results files).
    pub source: String,
    pub gemm_tflops: f64,
    /// (sequence length, TFLOP/s), ascending.
    pub attention_fwd_tflops: Vec<(f64, f64)>,
    pub attention_bwd_tflops: Vec<(f64, f64)>,
    pub copy_gbps: f64,
    pub elementwise_gbps: f64,
    pub host_gbps: f64,
    pub intra_node_gbps: f64,
    pub inter_node_gbps: f64,
    pub peak_tflops: f64,
}

/// Every device of a rates file, by section name.
pub fn load(path: &Path) -> Result<BTreeMap<String, DeviceRates>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the rates table {}", path.display()))?;
    let map: BTreeMap<String, DeviceRates> = toml::from_str(&text)
        .with_context(|| format!("{}: invalid rates table", path.display()))?;
    for (k, r) in &map {
        r.validate()
            .with_context(|| format!("{}: section [{k}]", path.display()))?;
    }
    Ok(map)
}

/// The section `device` of the repository's table (or of `path`).
pub fn device(path: Option<&Path>, device: &str) -> Result<DeviceRates> {
    let p = path.unwrap_or(Path::new(RATES_FILE));
    let mut all = load(p)?;
    let names: Vec<String> = all.keys().cloned().collect();
    all.remove(device).with_context(|| {
        format!(
            "{}: no section [{device}] (the table has {})",
            p.display(),
            names.join(", ")
        )
    })
}

impl DeviceRates {
    fn validate(&self) -> Result<()> {
        for (what, v) in [
            ("gemm_tflops", self.gemm_tflops),
            ("copy_gbps", self.copy_gbps),
            ("elementwise_gbps", self.elementwise_gbps),
            ("host_gbps", self.host_gbps),
            ("intra_node_gbps", self.intra_node_gbps),
            ("inter_node_gbps", self.inter_node_gbps),
            ("peak_tflops", self.peak_tflops),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                bail!("{what} = {v}; expected a positive rate");
            }
        }
        for (what, pts) in [
            ("attention_fwd_tflops", &self.attention_fwd_tflops),
            ("attention_bwd_tflops", &self.attention_bwd_tflops),
        ] {
            if pts.is_empty() {
                bail!("{what} is empty; expected [sequence length, TFLOP/s] points");
            }
            if pts.iter().any(|&(s, r)| !(s > 0.0 && r > 0.0)) {
                bail!("{what}: every point needs a positive length and rate");
            }
            if pts.windows(2).any(|w| w[1].0 <= w[0].0) {
                bail!("{what}: lengths must ascend");
            }
        }
        Ok(())
    }

    /// Attention TFLOP/s at sequence length `s` (forward or backward): linear in log s between
    /// measured points, the end value beyond them.
    pub fn attention_tflops(&self, backward: bool, s: f64) -> f64 {
        let pts = if backward {
            &self.attention_bwd_tflops
        } else {
            &self.attention_fwd_tflops
        };
        interpolate_log(pts, s)
    }

    /// Predicted seconds of a phase of `Timed`'s breakdown, from its FLOPs or elements.
    /// `bytes_per_elem` is the storage width (2 for bf16, 4 for f32), `seq` the attention length
    /// the rates are looked up at. `None` for a phase the model has no rate for.
    pub fn predict_phase(
        &self,
        phase: &str,
        flops: f64,
        elems: f64,
        bytes_per_elem: f64,
        seq: f64,
        link_gbps: f64,
    ) -> Option<f64> {
        let bytes = elems * bytes_per_elem;
        let t = match phase {
            "gemm" => flops / (self.gemm_tflops * 1e12),
            "attention fwd" | "attention fwd (recompute)" => {
                flops / (self.attention_tflops(false, seq) * 1e12)
            }
            "attention bwd" => flops / (self.attention_tflops(true, seq) * 1e12),
            "elementwise" | "lse merge" | "cross-entropy" | "optimizer" => {
                bytes / (self.elementwise_gbps * 1e9)
            }
            "device copy" => bytes / (self.copy_gbps * 1e9),
            "host<->device" => bytes / (self.host_gbps * 1e9),
            "communication" => bytes / (link_gbps * 1e9),
            _ => return None,
        };
        Some(t)
    }

    /// Every phase of `r` with its measured and predicted seconds (see [`Self::predict_phase`]).
    pub fn compare(
        &self,
        r: &PhaseReport,
        bytes_per_elem: f64,
        seq: f64,
        link_gbps: f64,
    ) -> Vec<PhaseComparison> {
        r.phases
            .iter()
            .map(|p| PhaseComparison {
                phase: p.name.clone(),
                calls: p.calls,
                measured_s: p.seconds,
                predicted_s: self.predict_phase(
                    &p.name,
                    p.flops,
                    p.elems,
                    bytes_per_elem,
                    seq,
                    link_gbps,
                ),
                flops: p.flops,
                elems: p.elems,
            })
            .collect()
    }
}

/// One row of a measured-vs-predicted breakdown.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PhaseComparison {
    pub phase: String,
    pub calls: usize,
    pub measured_s: f64,
    pub predicted_s: Option<f64>,
    pub flops: f64,
    pub elems: f64,
}

fn interpolate_log(pts: &[(f64, f64)], s: f64) -> f64 {
    let first = pts[0];
    let last = pts[pts.len() - 1];
    if s <= first.0 {
        return first.1;
    }
    if s >= last.0 {
        return last.1;
    }
    let w = pts
        .windows(2)
        .find(|w| s >= w[0].0 && s <= w[1].0)
        .expect("s lies between the first and last points");
    let (a, b) = (w[0], w[1]);
    let f = (s.ln() - a.0.ln()) / (b.0.ln() - a.0.ln());
    a.1 + f * (b.1 - a.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::timed::PhaseTime;

    fn h200() -> DeviceRates {
        device(
            Some(Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/bench/rates.toml"
            ))),
            "h200",
        )
        .unwrap()
    }

    #[test]
    fn the_repository_table_loads_and_interpolates_in_log_length() {
        let r = h200();
        assert_eq!(r.attention_tflops(false, 1024.0), 214.0);
        assert_eq!(r.attention_tflops(false, 1e7), 231.5);
        // 16384 is halfway between 8192 and 32768 in log length.
        let mid = r.attention_tflops(true, 16384.0);
        assert!((mid - (58.9 + 169.5) / 2.0).abs() < 1e-9, "{mid}");
    }

    #[test]
    fn predictions_are_work_over_rate() {
        let r = h200();
        // 1e15 FLOP of backward attention at 131072 tokens: 1e15 / 167.6e12 s.
        let p = r
            .predict_phase("attention bwd", 1e15, 0.0, 2.0, 131072.0, 50.0)
            .unwrap();
        assert!((p - 1e15 / 167.6e12).abs() < 1e-12);
        // 1e9 bf16 elements through an elementwise kernel: 2e9 bytes at the table's bandwidth.
        let p = r
            .predict_phase("elementwise", 0.0, 1e9, 2.0, 0.0, 50.0)
            .unwrap();
        assert!((p - 2e9 / (r.elementwise_gbps * 1e9)).abs() < 1e-15);
        let rep = PhaseReport {
            phases: vec![PhaseTime {
                name: "allocation".into(),
                calls: 1,
                seconds: 0.1,
                flops: 0.0,
                elems: 5.0,
            }],
            span_seconds: 0.1,
        };
        assert_eq!(r.compare(&rep, 2.0, 1.0, 1.0)[0].predicted_s, None);
    }

    #[test]
    fn a_bad_table_names_the_section_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.toml");
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/rates.toml"))
                .unwrap()
                .replacen("gemm_tflops = ", "gemm_tflops = -1.0 # was ", 1);
        std::fs::write(&p, text).unwrap();
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(
            e.contains("[h200]") && e.contains("gemm_tflops = -1"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            device(Some(Path::new("/nonexistent.toml")), "h200").unwrap_err()
        );
        assert!(e.contains("/nonexistent.toml"), "{e}");
    }
}
