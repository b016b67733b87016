//! The CUDA kernels' checks and benchmarks, one file per kernel family beside its launcher (llm.c's
//! dev/cuda: the kernel, its reference, its check and its benchmark together); `ultralong
//! gpu-check` (src/cli/gpu_check.rs) runs them and writes the report.
//!
//! Checks (METHOD.md): every kernel against the CPU reference in f64 on fresh random inputs,
//! outputs poisoned with NaN before each launch (an unwritten element fails), relative L2 error
//! ‖gpu − ref‖/‖ref‖ against a tolerance per storage type: 1e-5 for fp32 storage (2e-2 for GEMMs,
//! whose operands are bf16), 1e-2 for bf16 storage (inputs rounded to bf16 on both sides, so only
//! the kernel's own rounding counts). A group of checks that panics (a size assertion) or leaves a
//! failure recorded in the backend (a launch, an allocation) becomes a failed row.
//!
//! Benchmarks: device-to-device copy bandwidth (bytes read + written) as the ceiling, each
//! memory-bound kernel's bandwidth against it, GEMM and flash-attention TFLOP/s.

pub mod adamw;
pub mod attention_flash;
pub mod attention_simple;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod pool;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

use std::panic::{AssertUnwindSafe, catch_unwind};

use serde_json::Value;

use super::{CudaBackend, CudaBuf, DType};
use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::util::rng;

/// Where check and benchmark rows go (the CLI's report prints and collects them).
pub trait Sink {
    /// A check: passes when `err` is finite and at most `tol`.
    fn check(&mut self, name: &str, err: f64, tol: f64);
    /// A check that could not run, and why.
    fn fail(&mut self, name: &str, why: &str);
    /// A measurement, with a peer's value of the same quantity when there is one.
    fn metric(&mut self, name: &str, value: f64, unit: &str, peer: Option<(&str, f64)>);
    /// A measurement row with more fields (a second peer, the shape) merged into it.
    fn metric_with(
        &mut self,
        name: &str,
        value: f64,
        unit: &str,
        peer: Option<(&str, f64)>,
        extra: Value,
    );
}

/// Check rows: (name, error, tolerance).
pub type Rows = Vec<(String, f64, f64)>;

/// The CPU reference every check compares with.
pub type Cpu = CpuBackend<f64>;

/// Rows with literal names.
pub fn labelled(v: Vec<(&str, f64, f64)>) -> Rows {
    v.into_iter()
        .map(|(n, e, t)| (n.to_string(), e, t))
        .collect()
}

/// ‖a − b‖ / ‖b‖ (NaN anywhere gives NaN: a failed check).
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    if a.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    (num / den.max(1e-300)).sqrt()
}

pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na == 0.0 && nb == 0.0 {
        return 1.0;
    }
    dot / (na * nb).max(1e-300)
}

/// The message of a caught panic.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Run one group of checks on `g`: its rows go to `sink`; a panic (a size assertion) or a
/// failure the backend recorded (a launch, an allocation, a kernel's error) becomes a failed row,
/// and the backend is cleared to go on with the next group.
pub fn group(sink: &mut dyn Sink, g: &CudaBackend, name: &str, f: impl FnOnce() -> Rows) {
    let r = catch_unwind(AssertUnwindSafe(f));
    record(sink, g, name, r);
}

/// `group` for checks that reconfigure the backend (the attention options).
pub fn group_mut(
    sink: &mut dyn Sink,
    g: &mut CudaBackend,
    name: &str,
    f: impl FnOnce(&mut CudaBackend) -> Rows,
) {
    let r = catch_unwind(AssertUnwindSafe(|| f(g)));
    record(sink, g, name, r);
}

fn record(sink: &mut dyn Sink, g: &CudaBackend, name: &str, r: std::thread::Result<Rows>) {
    match r {
        Ok(rows) => {
            for (n, e, t) in rows {
                sink.check(&n, e, t);
            }
        }
        Err(p) => sink.fail(name, &panic_message(p.as_ref())),
    }
    if let Err(e) = g.check() {
        sink.fail(name, &format!("{e:#}"));
        g.clear_failure();
    }
}

/// Fresh random inputs: each call draws from a new stream of the counter RNG.
pub struct Draw {
    pub stream: u64,
    pub bf16: bool,
}

impl Draw {
    pub fn normal(&mut self, n: usize, scale: f64) -> Vec<f32> {
        self.stream += 1;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_nanos() as u64);
        (0..n as u64)
            .map(|i| {
                let x = (rng::normal(seed, self.stream, i) * scale) as f32;
                if self.bf16 {
                    half::bf16::from_f32(x).to_f32()
                } else {
                    x
                }
            })
            .collect()
    }
}

/// `x` on both sides.
pub fn up(c: &Cpu, g: &CudaBackend, x: &[f32]) -> (<Cpu as Backend>::Buf, CudaBuf) {
    (c.upload(x), g.upload(x))
}

/// An output buffer full of NaN (an element the kernel does not write fails the check).
pub fn poisoned(g: &CudaBackend, n: usize) -> CudaBuf {
    let mut b = g.zeros(n);
    g.fill(&mut b, f32::NAN);
    b
}

/// Relative L2 error of the GPU's buffer against the reference's.
pub fn cmp(c: &Cpu, g: &CudaBackend, cb: &<Cpu as Backend>::Buf, gb: &CudaBuf) -> f64 {
    rel_l2(&g.download_f64(gb), &c.download_f64(cb))
}

/// What the kernel checks of one storage type share.
pub struct Ctx<'a> {
    pub c: Cpu,
    pub g: &'a CudaBackend,
    pub draw: Draw,
    /// bf16 storage, and the tolerance of a non-GEMM kernel for it.
    pub bf: bool,
    pub tol: f64,
    /// Size multiplier (1 with `--small`, for compute-sanitizer).
    pub s: usize,
}

/// One kernel family's checks.
type FamilyCheck = fn(&mut Ctx) -> Rows;

/// Every kernel family's checks on `g` (its storage type), rows named `<backend> <check>`.
pub fn kernel_checks(sink: &mut dyn Sink, g: &CudaBackend, s: usize) {
    let bf = g.storage() == DType::Bf16;
    let mut x = Ctx {
        c: Cpu::new(),
        g,
        draw: Draw {
            stream: 0,
            bf16: bf,
        },
        bf,
        tol: if bf { 1e-2 } else { 1e-5 },
        s,
    };
    let tag = g.name();
    let families: [(&str, FamilyCheck); 9] = [
        ("gemm", gemm::check),
        ("elementwise", elementwise::check),
        ("rmsnorm", rmsnorm::check),
        ("rope", rope::check),
        ("swiglu", swiglu::check),
        ("embedding", embedding::check),
        ("cross-entropy", cross_entropy::check),
        ("attention", attention_simple::check),
        ("adamw", adamw::check),
    ];
    for (name, check) in families {
        group(sink, g, &format!("{tag} {name}"), || {
            check(&mut x)
                .into_iter()
                .map(|(n, e, t)| (format!("{tag} {n}"), e, t))
                .collect()
        });
    }
}

/// Every kernel family's benchmarks: `g` bf16 storage, `g32` fp32 (AdamW's fp32 state).
pub fn kernel_bench(sink: &mut dyn Sink, g: &CudaBackend, g32: &CudaBackend) {
    let copy_gbs = elementwise::bench_copy(sink, g);
    rope::bench(sink, g, copy_gbs);
    rmsnorm::bench(sink, g, copy_gbs);
    swiglu::bench(sink, g, copy_gbs);
    adamw::bench(sink, g32, copy_gbs);
    gemm::bench(sink, g);
}

/// A memory-bound kernel's bandwidth (`bytes` read + written in `ms`) and its fraction of the
/// device-to-device copy's.
pub fn bandwidth(sink: &mut dyn Sink, name: &str, bytes: f64, ms: f64, copy_gbs: f64) {
    let gbs = bytes / ms / 1e6;
    sink.metric(
        &format!("{name} bandwidth"),
        gbs,
        "GB/s",
        Some(("d2d copy", copy_gbs)),
    );
    sink.metric(
        &format!("{name} fraction of copy bandwidth"),
        gbs / copy_gbs,
        "ratio",
        None,
    );
}

/// Median milliseconds of `f` over `reps` runs after `warmup`, timed with CUDA events.
pub fn time_ms(g: &CudaBackend, warmup: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    use cudarc::driver::result::event;
    use cudarc::driver::sys::CUevent_flags;
    for _ in 0..warmup {
        f();
    }
    g.synchronize();
    let mut v = Vec::with_capacity(reps);
    let s = g.stream().cu_stream();
    let e0 = event::create(CUevent_flags::CU_EVENT_DEFAULT).expect("event");
    let e1 = event::create(CUevent_flags::CU_EVENT_DEFAULT).expect("event");
    for _ in 0..reps {
        // SAFETY: events and stream belong to the backend's context, bound on this thread.
        unsafe {
            event::record(e0, s).expect("record");
            f();
            event::record(e1, s).expect("record");
            event::synchronize(e1).expect("sync");
            v.push(event::elapsed(e0, e1).expect("elapsed") as f64);
        }
    }
    // SAFETY: created above.
    unsafe {
        let _ = event::destroy(e0);
        let _ = event::destroy(e1);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Random device buffer (uniform, made on the device).
pub fn randn_dev(g: &CudaBackend, n: usize, seed: u64, scale: f64) -> CudaBuf {
    let mut b = g.zeros(n);
    g.fill_random(&mut b, seed, scale as f32);
    b
}
