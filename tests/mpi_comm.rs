//! `MpiComm` under a real `mpirun -np 4`: the `mpi_selftest` example checks every collective on
//! each rank; a failing or panicking rank must end the whole job non-zero within seconds.
//!
//! MPI initialises once per process, so each multi-rank run is a separate `mpirun` of the example
//! (built here with `cargo build --example`, same profile as this test).
#![cfg(feature = "mpi")]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The example binary, built once per test process.
fn selftest_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "--example",
            "mpi_selftest",
            "--message-format=json",
        ]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo build");
        assert!(
            out.status.success(),
            "cargo build --example mpi_selftest failed"
        );
        // The last compiler-artifact line of the example names its executable.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "mpi_selftest")
            .find_map(|v| v["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no executable for the mpi_selftest example")
    })
    .clone()
}

/// `mpirun -np N` of the self-test (as root, more ranks than cores, no binding), with `env`
/// added; killed after `limit`.
fn mpirun(n: usize, env: &[(&str, &str)], limit: Duration) -> (Output, Duration) {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &n.to_string(), "--oversubscribe"])
        .arg(selftest_bin())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_hwloc_base_binding_policy", "none")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .envs(env.iter().copied());
    run_limited(cmd, limit)
}

fn run_limited(mut cmd: Command, limit: Duration) -> (Output, Duration) {
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e} (is OpenMPI's mpirun installed?)"));
    // Drain the pipes on threads so a chatty job cannot block on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let ho = std::thread::spawn(move || {
        let mut v = Vec::new();
        so.read_to_end(&mut v).ok();
        v
    });
    let he = std::thread::spawn(move || {
        let mut v = Vec::new();
        se.read_to_end(&mut v).ok();
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            // SIGTERM first: mpirun then takes its ranks down with it.
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .ok();
            std::thread::sleep(Duration::from_secs(3));
            child.kill().ok();
            let s = child.wait().unwrap();
            let (o, e) = (ho.join().unwrap(), he.join().unwrap());
            panic!(
                "timed out after {limit:?} ({s}):\n--- stdout\n{}\n--- stderr\n{}",
                String::from_utf8_lossy(&o),
                String::from_utf8_lossy(&e)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = t0.elapsed();
    let out = Output {
        status,
        stdout: ho.join().unwrap(),
        stderr: he.join().unwrap(),
    };
    (out, elapsed)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn collectives_on_four_ranks() {
    let (out, took) = mpirun(4, &[], Duration::from_secs(120));
    let (so, se) = text(&out);
    assert!(
        out.status.success(),
        "mpirun failed ({}):\n{so}\n{se}",
        out.status
    );
    for r in 0..4 {
        assert!(
            so.contains(&format!("ok rank {r} (4 ranks, mpi)")),
            "rank {r} did not report ok:\n{so}\n{se}"
        );
    }
    eprintln!("4 ranks: {took:?}");
}

#[test]
fn without_launcher_no_mpi_is_initialised() {
    let (out, took) = run_limited(Command::new(selftest_bin()), Duration::from_secs(60));
    let (so, se) = text(&out);
    assert!(out.status.success(), "{so}\n{se}");
    assert_eq!(so.trim(), "ok rank 0 (1 ranks, single)");
    eprintln!("single: {took:?}");
}

/// Rank 1 reports an error while ranks 0, 2, 3 wait in a barrier: `MPI_Abort` ends the job.
#[test]
fn failing_rank_ends_the_job_quickly() {
    let (out, took) = mpirun(
        4,
        &[("UL_SELFTEST_FAIL_RANK", "1")],
        Duration::from_secs(60),
    );
    let (so, se) = text(&out);
    assert!(!out.status.success(), "the job must fail:\n{so}\n{se}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        se.contains("error: [rank 1] selftest: injected failure"),
        "stderr:\n{se}"
    );
    assert!(!so.contains("ok rank"), "{so}");
    eprintln!("error abort: {took:?}, {}", out.status);
}

/// The same for a panic, through `install_panic_hook`.
#[test]
fn panicking_rank_ends_the_job_quickly() {
    let (out, took) = mpirun(
        4,
        &[("UL_SELFTEST_PANIC_RANK", "2")],
        Duration::from_secs(60),
    );
    let (so, se) = text(&out);
    assert!(!out.status.success(), "the job must fail:\n{so}\n{se}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        se.lines()
            .any(|l| l.starts_with("error: [rank 2] panicked at ")
                && l.ends_with(": selftest: injected panic")),
        "stderr:\n{se}"
    );
    eprintln!("panic abort: {took:?}, {}", out.status);
}
