//! Self-test of the world communicator, run by `tests/mpi_comm.rs` under `mpirun -np 4`:
//! every collective, splits, the exchange ring, f64/f32/u64/i32/u8 reductions, each checked
//! against values computed here independently; then again on a communicator whose calls are cut
//! into pieces of 3 elements (the large-count paths). Prints `ok rank R (N ranks, KIND)`.
//!
//! Failure injection (the job must end non-zero quickly, the others being blocked in a barrier):
//! `UL_SELFTEST_FAIL_RANK=r` makes rank r return an error, `UL_SELFTEST_PANIC_RANK=r` panic.

use anyhow::{Result, bail, ensure};
use ultralong::parallel::any::{self, AnyComm};
use ultralong::parallel::comm::{Comm, ReduceOp};

fn env_rank(k: &str) -> Option<usize> {
    std::env::var(k).ok().and_then(|v| v.parse().ok())
}

fn main() {
    any::install_panic_hook();
    let r = any::run_world(|world| {
        let c = world.comm();
        let fail = env_rank("UL_SELFTEST_FAIL_RANK");
        let panic_at = env_rank("UL_SELFTEST_PANIC_RANK");
        if fail.is_some() || panic_at.is_some() {
            if fail == Some(c.rank()) {
                bail!("selftest: injected failure");
            }
            if panic_at == Some(c.rank()) {
                panic!("selftest: injected panic");
            }
            // The others wait for the failed rank forever.
            c.barrier();
            bail!(
                "selftest: rank {} passed a barrier that a failed rank never entered",
                c.rank()
            );
        }
        suite(c, "world")?;
        #[allow(unused_mut)]
        let mut small = c.split(0, c.rank());
        #[cfg(feature = "mpi")]
        if let AnyComm::Mpi(m) = &mut small {
            m.set_max_count(3);
        }
        suite(&small, "pieces of 3")?;
        println!("ok rank {} ({} ranks, {})", c.rank(), c.size(), c.kind());
        Ok(())
    });
    if let Err(e) = r {
        any::report_error(&e);
        std::process::exit(1);
    }
}

/// Exact in binary floating point whatever the summation order: multiples of 1/4.
fn val(rank: usize, i: usize) -> f64 {
    ((rank * 7 + i * 3) % 11) as f64 * 0.25 - 1.0
}

fn suite(c: &AnyComm, label: &str) -> Result<()> {
    let (n, me) = (c.size(), c.rank());
    let ranks = 0..n;

    // all_reduce: f64 sum, f32 max, u64 sum above 2^32 (a 32-bit datatype would wrap), i32, u8.
    let len = 10;
    let mut s: Vec<f64> = (0..len).map(|i| val(me, i)).collect();
    c.all_reduce(&mut s, ReduceOp::Sum);
    let want: Vec<f64> = (0..len)
        .map(|i| ranks.clone().map(|r| val(r, i)).sum())
        .collect();
    ensure!(s == want, "{label}: f64 sum {s:?} != {want:?}");

    let mut m: Vec<f32> = (0..len).map(|i| val(me, i) as f32).collect();
    c.all_reduce(&mut m, ReduceOp::Max);
    let want: Vec<f32> = (0..len)
        .map(|i| {
            ranks
                .clone()
                .map(|r| val(r, i) as f32)
                .fold(f32::MIN, f32::max)
        })
        .collect();
    ensure!(m == want, "{label}: f32 max {m:?} != {want:?}");

    let mut u: Vec<u64> = (0..len)
        .map(|i| ((me as u64 + 1) << 40) + i as u64)
        .collect();
    c.all_reduce(&mut u, ReduceOp::Sum);
    let want: Vec<u64> = (0..len)
        .map(|i| {
            ranks
                .clone()
                .map(|r| ((r as u64 + 1) << 40) + i as u64)
                .sum()
        })
        .collect();
    ensure!(u == want, "{label}: u64 sum {u:?} != {want:?}");

    let mut k: Vec<i32> = (0..len).map(|i| i as i32 - me as i32 * 5).collect();
    c.all_reduce(&mut k, ReduceOp::Sum);
    let want: Vec<i32> = (0..len)
        .map(|i| ranks.clone().map(|r| i as i32 - r as i32 * 5).sum())
        .collect();
    ensure!(k == want, "{label}: i32 sum {k:?} != {want:?}");

    let mut b: Vec<u8> = (0..len).map(|i| ((me * 37 + i * 11) % 251) as u8).collect();
    c.all_reduce(&mut b, ReduceOp::Max);
    let want: Vec<u8> = (0..len)
        .map(|i| {
            ranks
                .clone()
                .map(|r| ((r * 37 + i * 11) % 251) as u8)
                .max()
                .unwrap()
        })
        .collect();
    ensure!(b == want, "{label}: u8 max {b:?} != {want:?}");

    // Every rank holds bitwise the same reduction.
    let bits: Vec<u64> = s.iter().map(|x| x.to_bits()).collect();
    let mut all_bits = vec![0u64; len * n];
    c.all_gather(&bits, &mut all_bits);
    for r in ranks.clone() {
        ensure!(
            all_bits[r * len..(r + 1) * len] == bits[..],
            "{label}: rank {r} reduced differently"
        );
    }

    // all_gather, reduce_scatter (7 per rank: pieces 3, 3, 1 when cut).
    let m7 = 7;
    let send: Vec<i32> = (0..m7).map(|i| (me * 100 + i) as i32).collect();
    let mut g = vec![0i32; m7 * n];
    c.all_gather(&send, &mut g);
    let want: Vec<i32> = ranks
        .clone()
        .flat_map(|r| (0..m7).map(move |i| (r * 100 + i) as i32))
        .collect();
    ensure!(g == want, "{label}: all_gather {g:?} != {want:?}");

    let send: Vec<f32> = (0..m7 * n).map(|j| (me + 1) as f32 * j as f32).collect();
    let mut rs = vec![0f32; m7];
    c.reduce_scatter(&send, &mut rs);
    let tri = (n * (n + 1) / 2) as f32;
    let want: Vec<f32> = (0..m7).map(|j| (me * m7 + j) as f32 * tri).collect();
    ensure!(rs == want, "{label}: reduce_scatter {rs:?} != {want:?}");

    // broadcast from every root.
    for root in ranks.clone() {
        let mut bb: Vec<f64> = (0..len).map(|i| val(me, i)).collect();
        c.broadcast(&mut bb, root);
        let want: Vec<f64> = (0..len).map(|i| val(root, i)).collect();
        ensure!(bb == want, "{label}: broadcast from {root}");
    }
    c.barrier();

    // Zero-length buffers.
    let mut e: Vec<f32> = Vec::new();
    c.all_reduce(&mut e, ReduceOp::Sum);
    c.all_gather(&[], &mut e);
    c.reduce_scatter(&[], &mut e);
    c.broadcast(&mut e, 0);
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    let x = c.exchange_start(Vec::<f32>::new(), next, Vec::new(), prev);
    let (s0, r0) = c.wait(x);
    ensure!(s0.is_empty() && r0.is_empty(), "{label}: empty exchange");

    // The ring: two exchanges in flight to one peer stay ordered; then a block walks the ring.
    let l8 = 8;
    let a = c.exchange_start(vec![me as f32; l8], next, vec![0f32; l8], prev);
    let b2 = c.exchange_start(vec![me as f32 + 0.5; l8], next, vec![0f32; l8], prev);
    let (_, ra) = c.wait(a);
    let (_, rb) = c.wait(b2);
    ensure!(
        ra == vec![prev as f32; l8],
        "{label}: first exchange {ra:?}"
    );
    ensure!(
        rb == vec![prev as f32 + 0.5; l8],
        "{label}: second exchange {rb:?}"
    );
    let mut cur: Vec<u64> = (0..l8).map(|i| (me * 1000 + i) as u64).collect();
    let mut spare = vec![0u64; l8];
    for k in 1..n {
        let x = c.exchange_start(cur, next, spare, prev);
        let (s, r) = c.wait(x);
        spare = s;
        cur = r;
        let src = (me + n - k) % n;
        let want: Vec<u64> = (0..l8).map(|i| (src * 1000 + i) as u64).collect();
        ensure!(cur == want, "{label}: ring step {k}: {cur:?} != {want:?}");
    }

    // Splits: pairs (tensor parallel) and the groups across pairs, keyed in reverse.
    if n % 2 == 0 {
        let pair = c.split(me / 2, me % 2);
        ensure!(
            (pair.rank(), pair.size()) == (me % 2, 2),
            "{label}: pair rank/size ({}, {})",
            pair.rank(),
            pair.size()
        );
        let mut v = [me as u64 + 1];
        pair.all_reduce(&mut v, ReduceOp::Sum);
        let base = me - me % 2;
        ensure!(v[0] == (2 * base + 3) as u64, "{label}: pair sum {}", v[0]);
        let rest = c.split(me % 2, n - me);
        let mut got = vec![0u64; rest.size()];
        rest.all_gather(&[me as u64], &mut got);
        let want: Vec<u64> = (0..n)
            .rev()
            .filter(|q| q % 2 == me % 2)
            .map(|q| q as u64)
            .collect();
        ensure!(
            got == want,
            "{label}: split by parity, reversed: {got:?} != {want:?}"
        );
        ensure!(
            rest.rank() == want.iter().position(|&q| q == me as u64).unwrap(),
            "{label}: rank in the reversed group"
        );
    }
    Ok(())
}
