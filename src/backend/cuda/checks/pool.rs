//! Checks of the pool's failure path on the device (pool.rs; the limit logic itself is tested
//! without a GPU there): an out-of-memory forced by the pool's byte limit.

use super::Rows;
use crate::backend::Backend;
use crate::backend::cuda::{CudaBackend, DType};

/// An out-of-memory forced by the pool's byte limit: `try_alloc` returns an error naming the
/// buffer, the bytes and the device; through the trait (`zeros`) the failure is recorded with
/// the caller's source line, later work is skipped and reads NaN, and `check` returns it;
/// cleared, the backend works again.
pub fn oom_check(g: &CudaBackend) -> Rows {
    let n = 100 << 20; // 400 MiB of fp32, past a limit of 64 MiB above what is held
    let bytes = (4 * n).to_string();
    g.set_memory_limit(Some(g.reserved_bytes() + (64 << 20)));
    let e = g
        .try_alloc(n, DType::F32, "the test buffer")
        .err()
        .map_or(String::new(), |e| format!("{e:#}"));
    let named = e.contains("allocating the test buffer (104857600 x F32) on cuda:")
        && e.contains(&bytes)
        && e.contains("limit");
    let big = g.zeros_dtype(n, DType::F32);
    let mut x = g.upload(&[1.0; 4]);
    g.scale(&mut x, 2.0);
    let skipped = g.download(&x).iter().all(|v| v.is_nan());
    let c = g.check().err().map_or(String::new(), |e| format!("{e:#}"));
    let recorded = c.contains("out of memory")
        && c.contains(file!())
        && c.contains(&bytes)
        && !c.contains('\n');
    drop(big);
    g.set_memory_limit(None);
    g.clear_failure();
    let y = g.upload(&[1.0, 2.0]);
    let works = g.download(&y) == [1.0, 2.0] && g.check().is_ok();
    let row = |what: &str, ok: bool, msg: &str| {
        (format!("{what}: {msg:?}"), if ok { 0.0 } else { 1.0 }, 0.0)
    };
    vec![
        row(
            "out of memory: try_alloc names the buffer, bytes, device",
            named,
            &e,
        ),
        row(
            "out of memory: recorded by zeros, check returns one line",
            recorded,
            &c,
        ),
        row(
            "out of memory: work after it is skipped (reads NaN)",
            skipped,
            "",
        ),
        row("out of memory: cleared, the backend works again", works, ""),
    ]
}
