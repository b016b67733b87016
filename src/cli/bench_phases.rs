//! `ultralong bench phases`: one rank of a layout (any tp × cp, over `LoopbackComm`) on the CPU
//! backend, its forward + backward broken down by phase (`backend::timed`), each phase beside the
//! time the rates table predicts for it (`rates`). With `--measure-rates` it first measures this
//! machine's rates (GEMM, attention forward/backward, elementwise, copy) and writes them into the
//! table's section, so the prediction is built from kernel measurements and checked against a
//! whole step: the CPU counterpart of `gpu-check --only rank4m`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::backend::cpu::CpuBackend;
use crate::backend::timed::{Timed, attention_flops};
use crate::backend::{AttnShape, Backend};
use crate::data::loader::{Sample, zigzag_slice};
use crate::model::config::ModelConfig;
use crate::model::llama::{Head, Llama, Workspace};
use crate::model::params::ParamStore;
use crate::model::rope::RopePrecision;
use crate::parallel::loopback::loopback_topology;
use crate::parallel::topology::Layout;
use crate::rates::{self, DeviceRates};
use crate::util::rng;

#[derive(Args, Debug)]
pub struct BenchPhasesArgs {
    /// A Hugging Face config.json (random weights are used).
    #[arg(long)]
    pub model_config: PathBuf,
    /// Override the config's number of layers.
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    #[arg(long, default_value_t = 1)]
    pub cp: usize,
    #[arg(long, default_value_t = 256)]
    pub ce_chunk: usize,
    /// The section of the rates table to predict with.
    #[arg(long, default_value = "cpu-2core")]
    pub device: String,
    /// The rates table.
    #[arg(long, default_value = rates::RATES_FILE)]
    pub rates: PathBuf,
    /// Measure this machine's rates first and write them into `--device`'s section.
    #[arg(long)]
    pub measure_rates: bool,
    /// Results JSON (bench/results format).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Median seconds of `reps` runs of `f` after one warm-up.
fn time_it(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// This machine's rates on the CPU backend, at the rank's shapes: the layer's up-projection
/// GEMM, causal attention of the rank's local tokens with its heads, an elementwise add and a
/// copy of a 16M-element buffer.
fn measure_rates(cfg: &ModelConfig, layout: Layout, t: usize, name: &str) -> DeviceRates {
    let b = CpuBackend::<f32>::new();
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size / layout.tp);
    let x = b.upload(&vec![0.5; t * h]);
    let w = b.upload(&vec![0.25; f * h]);
    let mut y = b.zeros(t * f);
    let gemm_s = time_it(3, || {
        b.gemm(&mut y, 0, &x, 0, &w, 0, t, f, h, false, true, false)
    });
    let gemm_tflops = 2.0 * (t * f * h) as f64 / gemm_s / 1e12;

    let (nq, nkv, d) = (
        cfg.num_attention_heads / layout.tp,
        (cfg.num_key_value_heads / layout.tp).max(1),
        cfg.head_dim,
    );
    let shape = AttnShape {
        q_len: t,
        kv_len: t,
        n_q_heads: nq,
        n_kv_heads: nkv,
        head_dim: d,
        q_pos0: 0,
        k_pos0: 0,
        causal: true,
    };
    let vals = |n: usize, s: u64| -> Vec<f32> {
        (0..n as u64)
            .map(|i| rng::uniform(s, 0, i) as f32 - 0.5)
            .collect()
    };
    let q = b.upload(&vals(t * nq * d, 1));
    let k = b.upload(&vals(t * nkv * d, 2));
    let v = b.upload(&vals(t * nkv * d, 3));
    let (mut o, mut lse) = (b.zeros(t * nq * d), b.zeros(t * nq));
    let scale = 1.0 / (d as f64).sqrt();
    let fwd_s = time_it(3, || {
        b.attention_forward(&q, &k, &v, &shape, scale, &mut o, &mut lse)
    });
    let dout = b.upload(&vals(t * nq * d, 4));
    let (mut dq, mut dk, mut dv) = (
        b.zeros(t * nq * d),
        b.zeros(t * nkv * d),
        b.zeros(t * nkv * d),
    );
    let bwd_s = time_it(3, || {
        b.attention_backward(
            &q, &k, &v, &o, &dout, &lse, &shape, scale, &mut dq, &mut dk, &mut dv,
        )
    });
    let n = 1 << 24;
    let src = b.upload(&vec![1.0; n]);
    let mut dst = b.zeros(n);
    let add_s = time_it(5, || b.add_at(&mut dst, 0, &src, 0, n));
    let copy_s = time_it(5, || b.copy(&src, 0, &mut dst, 0, n));
    let mut host = vec![0f32; n];
    let host_s = time_it(5, || b.read_host(&src, 0, &mut host));
    let gbps = |elems: f64, s: f64| elems * 4.0 / s / 1e9;
    let copy_gbps = gbps(2.0 * n as f64, copy_s);
    DeviceRates {
        name: name.to_string(),
        source: String::new(),
        gemm_tflops,
        attention_fwd_tflops: vec![(t as f64, attention_flops(&shape, false) / fwd_s / 1e12)],
        attention_bwd_tflops: vec![(t as f64, attention_flops(&shape, true) / bwd_s / 1e12)],
        copy_gbps,
        // The timed breakdown counts an add as 3 elements (two reads, one write).
        elementwise_gbps: gbps(3.0 * n as f64, add_s),
        host_gbps: gbps(n as f64, host_s),
        // Ranks of one machine talk through shared memory: copy speed.
        intra_node_gbps: copy_gbps,
        inter_node_gbps: copy_gbps,
        peak_tflops: gemm_tflops,
    }
}

/// `[section]` of a rates file as TOML text.
fn section_text(key: &str, r: &DeviceRates) -> String {
    let pts = |v: &[(f64, f64)]| {
        let p: Vec<String> = v
            .iter()
            .map(|(s, x)| format!("[{s}, {}]", round(*x)))
            .collect();
        format!("[{}]", p.join(", "))
    };
    format!(
        "[{key}]\nname = {:?}\nsource = {:?}\ngemm_tflops = {}\nattention_fwd_tflops = {}\n\
         attention_bwd_tflops = {}\ncopy_gbps = {}\nelementwise_gbps = {}\nhost_gbps = {}\n\
         intra_node_gbps = {}\ninter_node_gbps = {}\npeak_tflops = {}\n",
        r.name,
        r.source,
        round(r.gemm_tflops),
        pts(&r.attention_fwd_tflops),
        pts(&r.attention_bwd_tflops),
        round(r.copy_gbps),
        round(r.elementwise_gbps),
        round(r.host_gbps),
        round(r.intra_node_gbps),
        round(r.inter_node_gbps),
        round(r.peak_tflops),
    )
}

/// Four significant digits.
fn round(x: f64) -> f64 {
    if x == 0.0 {
        return 0.0;
    }
    let p = 10f64.powi(3 - x.abs().log10().floor() as i32);
    (x * p).round() / p
}

/// Replace (or append) section `key` of the rates file at `path`, keeping everything else.
fn write_section(path: &Path, key: &str, r: &DeviceRates) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the rates table {}", path.display()))?;
    let header = format!("[{key}]");
    let new = section_text(key, r);
    let out = match text.lines().position(|l| l.trim() == header) {
        None => format!("{}\n\n{new}", text.trim_end()),
        Some(start) => {
            let lines: Vec<&str> = text.lines().collect();
            let end = lines[start + 1..]
                .iter()
                .position(|l| l.trim_start().starts_with('['))
                .map_or(lines.len(), |i| start + 1 + i);
            let mut s = lines[..start].join("\n");
            if !s.is_empty() {
                s.push('\n');
            }
            s.push_str(&new);
            if end < lines.len() {
                s.push('\n');
                s.push_str(&lines[end..].join("\n"));
                s.push('\n');
            }
            s
        }
    };
    // The result must still be a valid table.
    toml::from_str::<toml::Table>(&out).context("the rewritten rates table does not parse")?;
    crate::io::write_atomic(path, out.as_bytes())
}

pub fn bench_phases(a: BenchPhasesArgs) -> Result<()> {
    let mut cfg = ModelConfig::from_file(&a.model_config)?;
    if let Some(l) = a.layers {
        let mut v = cfg.to_hf_json();
        v["num_hidden_layers"] = json!(l);
        cfg = ModelConfig::from_json_str(&v.to_string(), &a.model_config.display().to_string())?;
    }
    let layout = Layout {
        tp: a.tp,
        cp: a.cp,
        dp: 1,
    };
    layout.check_model(&cfg)?;
    layout.check_seq_len(a.seq_len)?;
    let t = a.seq_len / a.cp;
    if a.measure_rates {
        let mut r = measure_rates(&cfg, layout, t, &format!("this machine ({})", a.device));
        r.source = format!(
            "ultralong bench phases --measure-rates (model {}, seq {}, tp {}, cp {}), {}",
            a.model_config.display(),
            a.seq_len,
            a.tp,
            a.cp,
            chrono_date()
        );
        write_section(&a.rates, &a.device, &r)?;
        print!(
            "measured rates, written to {}:\n{}",
            a.rates.display(),
            section_text(&a.device, &r)
        );
    }
    let rates = rates::device(Some(&a.rates), &a.device)?;

    let b = Timed::on_host(CpuBackend::<f32>::new());
    let topo = loopback_topology(layout, 0, None);
    let params = ParamStore::init_random_shard(&b, &cfg, 1, topo.shard());
    let model = Llama::new(cfg.clone(), RopePrecision::Exact, params)?;
    let mut ws = Workspace::for_rank(&b, &cfg, &topo, t, true, a.ce_chunk);
    let mut g = model.params.zeros_like(&b);
    let vocab = cfg.vocab_size as f64;
    let s = Sample {
        ids: (0..a.seq_len as u64)
            .map(|i| (rng::uniform(3, 0, i) * vocab) as u32)
            .collect(),
        targets: (0..a.seq_len as u64)
            .map(|i| (rng::uniform(3, 1, i) * vocab) as i32)
            .collect(),
        positions: (0..a.seq_len as u64).collect(),
    };
    let s = zigzag_slice(&s, a.cp, topo.cp_rank)?;
    let mut pass = || {
        model.forward_backward_rank(
            &b,
            &topo,
            &mut ws,
            &s.ids,
            &s.positions,
            Head::Loss {
                targets: &s.targets,
                grad_scale: 1.0 / a.seq_len as f64,
            },
            Some(&mut g),
        )
    };
    pass();
    b.reset();
    let t0 = Instant::now();
    let loss = pass();
    let step = t0.elapsed().as_secs_f64();
    if !loss.is_finite() {
        bail!("the pass gave a non-finite loss ({loss})");
    }
    let report = b.report();
    // The loopback's communication is copies in memory: predicted at copy speed.
    let rows = rates.compare(&report, 4.0, t as f64, rates.copy_gbps);
    let predicted: f64 = rows.iter().filter_map(|r| r.predicted_s).sum();
    let mut raw = format!(
        "bench phases: {} layers, seq {}, tp {} x cp {} rank 0 ({t} local tokens), rates [{}]\n",
        cfg.num_hidden_layers, a.seq_len, a.tp, a.cp, a.device
    );
    raw.push_str(&format!(
        "{:<28} {:>6} {:>11} {:>11} {:>8}\n",
        "phase", "calls", "measured s", "predicted s", "ratio"
    ));
    let mut out_rows = vec![];
    for r in &rows {
        let (p, ratio) = match r.predicted_s {
            Some(p) => (format!("{p:.4}"), format!("{:.2}", r.measured_s / p)),
            None => ("-".into(), "-".into()),
        };
        raw.push_str(&format!(
            "{:<28} {:>6} {:>11.4} {:>11} {:>8}\n",
            r.phase, r.calls, r.measured_s, p, ratio
        ));
        out_rows.push(
            json!({"name": format!("phase {}: time", r.phase), "value": r.measured_s,
            "unit": "s", "peer": r.predicted_s.map(|_| "predicted from kernel rates"),
            "peer_value": r.predicted_s, "calls": r.calls, "flops": r.flops, "elems": r.elems}),
        );
    }
    raw.push_str(&format!(
        "step {step:.4} s (calls {:.4} s, outside the backend {:.4} s); sum of predicted phases \
         {predicted:.4} s; step / predicted = {:.3}\n",
        report.busy_seconds(),
        step - report.busy_seconds(),
        step / predicted
    ));
    print!("{raw}");
    out_rows.push(
        json!({"name": "step: forward+backward time", "value": step, "unit": "s",
        "peer": "sum of predicted phases", "peer_value": predicted}),
    );
    out_rows.push(
        json!({"name": "step / sum of predicted phases", "value": step / predicted,
        "unit": "ratio", "peer": null, "peer_value": null}),
    );
    if let Some(path) = &a.out {
        let res = json!({
            "device": rates.name, "command": std::env::args().collect::<Vec<_>>().join(" "),
            "date": chrono_date(), "rows": out_rows, "raw": raw,
        });
        crate::io::write_atomic(path, serde_json::to_string_pretty(&res)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
fn chrono_date() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86400)
        .unwrap_or(0) as i64;
    civil_date(days)
}

/// The date `days` after 1970-01-01 (Howard Hinnant's civil-from-days).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{m:02}-{d:02}", if m <= 2 { y + 1 } else { y })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_of_known_day_numbers() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(20_791), "2026-12-04");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(civil_date(-1), "1969-12-31");
    }

    #[test]
    fn a_section_is_replaced_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.toml");
        let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/rates.toml"))
            .unwrap();
        std::fs::write(&p, &src).unwrap();
        let mut r = rates::device(Some(&p), "h200").unwrap();
        r.gemm_tflops = 123.0;
        write_section(&p, "cpu-x", &r).unwrap();
        write_section(&p, "h200", &r).unwrap();
        let all = rates::load(&p).unwrap();
        assert_eq!(all["h200"].gemm_tflops, 123.0);
        assert_eq!(all["cpu-x"], all["h200"]);
        // The other sections are untouched.
        let before = rates::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/bench/rates.toml"
        )))
        .unwrap();
        for (k, v) in &before {
            if k != "h200" {
                assert_eq!(&all[k], v, "{k}");
            }
        }
    }
}
