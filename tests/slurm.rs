//! The job scripts of `slurm/` on a real Slurm: each test brings up a private one-node cluster
//! (`scripts/slurm-cluster.sh`: its own munged, slurmctld and slurmd on free ports, under a temp
//! directory) and always tears it down (a Drop guard), then
//! - runs `slurm/debug.sh` (the toy pipeline, its multi-rank stage through `srun --mpi=pmix`) and
//!   checks that the job completed and wrote its outputs;
//! - runs a training job with the scripts' preemption logic, sends it
//!   `scancel --signal=USR1 --batch` after its first checkpoint, and checks that the binary
//!   checkpointed and exited 75, the job was requeued and resumed from the checkpoint, and the
//!   run finished with every step logged once.
//!
//! Needs slurm-wlm and munge (`make deps` installs them) and root (the daemons). Without the Slurm
//! binaries the tests skip with a message, except under `make` (MAKELEVEL set), where they fail:
//! `make test` runs `make deps` first.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn have(prog: &str) -> bool {
    [
        "/usr/bin",
        "/usr/sbin",
        "/usr/local/bin",
        "/usr/local/sbin",
        "/bin",
        "/sbin",
    ]
    .iter()
    .map(PathBuf::from)
    .chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ))
    .any(|d| d.join(prog).is_file())
}

/// Whether the Slurm tests can run here; `false` (skip) only outside `make`.
fn slurm_available(test: &str) -> bool {
    let missing: Vec<&str> = [
        "sbatch",
        "scontrol",
        "slurmctld",
        "slurmd",
        "munged",
        "srun",
    ]
    .into_iter()
    .filter(|p| !have(p))
    .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: Slurm is not installed (missing {}): apt-get install slurm-wlm munge, or `make deps`",
        missing.join(", ")
    );
    if std::env::var_os("MAKELEVEL").is_some()
        || std::env::var_os("ULTRALONG_REQUIRE_SLURM").is_some()
    {
        panic!("{msg}");
    }
    eprintln!("SKIPPED {msg}");
    false
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A private one-node Slurm cluster, torn down on drop (also when the test panics).
struct Cluster {
    dir: tempfile::TempDir,
    started: bool,
}

impl Cluster {
    fn up() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("ultralong-slurm-")
            .tempdir()
            .unwrap();
        let mut c = Cluster {
            dir,
            started: false,
        };
        let t = Instant::now();
        let o = Command::new("bash")
            .arg(repo().join("scripts/slurm-cluster.sh"))
            .arg("up")
            .arg(c.path())
            .output()
            .expect("run scripts/slurm-cluster.sh");
        c.started = true; // even a failed `up` may have left daemons: `down` cleans up
        assert!(
            o.status.success(),
            "scripts/slurm-cluster.sh up failed:\n{}",
            text(&o)
        );
        eprintln!(
            "cluster up in {:.1} s at {}",
            t.elapsed().as_secs_f64(),
            c.path().display()
        );
        c
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A Slurm command against this cluster only: SLURM_CONF set, and no SLURM_*/PMI/OpenMPI
    /// variables of an enclosing job (a test run inside a Slurm job or under mpirun).
    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if [
                "SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI", "OMPI_", "PMIX_",
            ]
            .iter()
            .any(|p| k.starts_with(p))
            {
                c.env_remove(&k);
            }
        }
        c.env("SLURM_CONF", self.path().join("slurm.conf"));
        c
    }

    fn run(&self, prog: &str, args: &[&str]) -> String {
        let o = self
            .cmd(prog)
            .args(args)
            .output()
            .expect("spawn a Slurm command");
        assert!(o.status.success(), "{prog} {args:?} failed:\n{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `sbatch --parsable ARGS` with extra environment; returns the job id.
    fn sbatch(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let mut c = self.cmd("sbatch");
        c.arg("--parsable").args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().expect("spawn sbatch");
        assert!(o.status.success(), "sbatch {args:?} failed:\n{}", text(&o));
        let id = String::from_utf8_lossy(&o.stdout)
            .trim()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        assert!(!id.is_empty(), "sbatch printed no job id");
        id
    }

    /// JobState, Restarts, ExitCode, Reason... of `scontrol show job -o ID`.
    fn job(&self, id: &str) -> BTreeMap<String, String> {
        let out = self.run("scontrol", &["show", "job", "-o", id]);
        out.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn state(&self, id: &str) -> (String, u32) {
        let j = self.job(id);
        (
            j.get("JobState").cloned().unwrap_or_default(),
            j.get("Restarts").and_then(|r| r.parse().ok()).unwrap_or(0),
        )
    }

    /// Files that slurmd's spool still holds for job `id` (sockets and topology of its steps):
    /// while there are any, a step of the job's previous run is still cleaning up.
    fn step_files(&self, id: &str) -> Vec<String> {
        let (a, b) = (format!(".{id}."), format!("_{id}."));
        std::fs::read_dir(self.path().join("spool/d"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(&a) || n.contains(&b))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The tails of the daemons' logs, for failure messages.
    fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["log/slurmctld.log", "log/slurmd.log"] {
            let t = std::fs::read_to_string(self.path().join(f)).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            s += &format!(
                "--- {f} (tail)\n{}\n",
                lines[lines.len().saturating_sub(25)..].join("\n")
            );
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.started {
            return;
        }
        let o = Command::new("bash")
            .arg(repo().join("scripts/slurm-cluster.sh"))
            .arg("down")
            .arg(self.path())
            .output();
        match o {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("scripts/slurm-cluster.sh down failed:\n{}", text(&o)),
            Err(e) => eprintln!("scripts/slurm-cluster.sh down: {e}"),
        }
    }
}

const FINAL_STATES: [&str; 8] = [
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
];

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| format!("(cannot read {}: {e})", p.display()))
}

#[test]
fn debug_script_runs_under_sbatch() {
    if !slurm_available("debug_script_runs_under_sbatch") {
        return;
    }
    let t0 = Instant::now();
    let cluster = Cluster::up();
    let work = cluster.path().join("work");
    let runs = work.join("runs");
    std::fs::create_dir_all(&work).unwrap();
    let out = work.join("debug.out");
    let bin = bin();
    // 4 ranks on a 2-core node: --overcommit (debug.sh asks for it too). The script finds
    // slurm/common.sh through the job's Command, as for a user's `sbatch slurm/debug.sh`.
    let id = cluster.sbatch(
        &[
            "-n",
            "4",
            "--overcommit",
            &format!("--output={}", out.display()),
            &format!("--chdir={}", work.display()),
            repo().join("slurm/debug.sh").to_str().unwrap(),
        ],
        &[
            ("ULTRALONG_BIN", bin.to_str().unwrap()),
            ("ULTRALONG_RUNS", runs.to_str().unwrap()),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(200);
    let state = loop {
        let (s, _) = cluster.state(&id);
        if FINAL_STATES.contains(&s.as_str()) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "debug job {id} still {s} after 200 s:\n{}\n{}",
            read(&out),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let log = read(&out);
    let j = cluster.job(&id);
    assert_eq!(
        (state.as_str(), j.get("ExitCode").map(String::as_str)),
        ("COMPLETED", Some("0:0")),
        "debug job {id}:\n{log}\n{}",
        cluster.logs()
    );
    let d = runs.join("ultralong-debug").join(&id);
    assert!(log.contains("launcher: srun --mpi=pmix"), "{log}");
    assert!(
        log.contains("layout: tp 2 × cp 2 × dp 1 = 4 ranks"),
        "the multi-rank stage ran on 4 ranks:\n{log}"
    );
    assert!(log.contains("debug: OK"), "{log}");
    for f in [
        "final/config.json",
        "final/tokenizer.json",
        "summary.txt",
        "job.log",
    ] {
        assert!(
            d.join(f).exists(),
            "{} missing:\n{log}",
            d.join(f).display()
        );
    }
    let metrics = read(&d.join("stage1/metrics.jsonl"));
    assert_eq!(metrics.lines().count(), 12, "stage 1 steps:\n{metrics}");
    eprintln!(
        "debug job {id}: COMPLETED in {:.0} s (cluster up to done)\n{}",
        t0.elapsed().as_secs_f64(),
        read(&d.join("summary.txt"))
    );
}

/// Steps of the preempted run: enough that it is still running when the signal comes (a step
/// takes milliseconds here; the signal follows the first checkpoint within a second).
const REQUEUE_STEPS: u64 = 400;

#[test]
fn preempted_training_job_is_requeued_and_resumes() {
    if !slurm_available("preempted_training_job_is_requeued_and_resumes") {
        return;
    }
    let t0 = Instant::now();
    let cluster = Cluster::up();
    let work = cluster.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    tiny_model(&work);
    // Absolute paths: the job script works from the repository (common.sh's ul_begin).
    let cfg = run_config(REQUEUE_STEPS, "unused")
        .replace(
            "path = \"m\"",
            &format!("path = \"{}\"", work.join("m").display()),
        )
        .replace(
            "text = \"text.txt\"",
            &format!("text = \"{}\"", work.join("text.txt").display()),
        );
    std::fs::write(work.join("run.toml"), cfg).unwrap();
    let runs = work.join("runs");
    let run_dir = runs.join("ul-requeue/run");
    let script = format!(
        r#"#!/bin/bash
#SBATCH --job-name=ul-requeue
#SBATCH --ntasks=2
#SBATCH --overcommit
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
set -euo pipefail
source {common}
ul_begin ul-requeue
# 2 ranks on a loaded 2-core node: one thread each, and MPI that yields while it waits.
export RAYON_NUM_THREADS=1 OMPI_MCA_mpi_yield_when_idle=1
ul_set_launcher
ul_layout 1 2
ul_train {cfg} --cp 2
echo "requeue job: training done"
"#,
        common = repo().join("slurm/common.sh").display(),
        cfg = work.join("run.toml").display(),
    );
    std::fs::write(work.join("job.sh"), script).unwrap();
    let out = work.join("job.out");
    let bin = bin();
    let id = cluster.sbatch(
        &[
            &format!("--output={}", out.display()),
            &format!("--chdir={}", work.display()),
            work.join("job.sh").to_str().unwrap(),
        ],
        &[
            ("ULTRALONG_BIN", bin.to_str().unwrap()),
            ("ULTRALONG_RUNS", runs.to_str().unwrap()),
        ],
    );
    let fail = |what: &str| -> ! {
        panic!(
            "requeue job {id}: {what}\n--- job output\n{}\n{}",
            read(&out),
            cluster.logs()
        )
    };

    // 1. The first checkpoint, then USR1 to the batch shell only (as --signal=B:USR1@600 does).
    let ckpt = run_dir.join("checkpoints");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let has = std::fs::read_dir(&ckpt)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
            })
            .unwrap_or(false);
        if has {
            break;
        }
        let (s, _) = cluster.state(&id);
        if FINAL_STATES.contains(&s.as_str()) {
            fail(&format!("{s} before its first checkpoint"));
        }
        if Instant::now() > deadline {
            fail("no checkpoint after 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let t_signal = Instant::now();
    cluster.run("scancel", &["--signal=USR1", "--batch", &id]);
    eprintln!("USR1 sent at {:.1} s", t0.elapsed().as_secs_f64());

    // 2. Requeued: Slurm holds a requeued job for ~2 minutes (BeginTime), for good reasons: the
    // previous run's step may still be cleaning up (its PMIx socket, named after the job and
    // step ids, makes the new step's launch fail), and the job's old credential was revoked
    // with a 1-second resolution (a launch within that second is refused). Release it as soon
    // as both are over.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut requeued_at: Option<Instant> = None;
    let mut released = false;
    let state = loop {
        let (s, restarts) = cluster.state(&id);
        if FINAL_STATES.contains(&s.as_str()) {
            break s;
        }
        if restarts >= 1 && s == "PENDING" && requeued_at.is_none() {
            eprintln!(
                "requeued {:.1} s after the signal",
                t_signal.elapsed().as_secs_f64()
            );
            requeued_at = Some(Instant::now());
        }
        if let Some(t) = requeued_at
            && !released
            && t.elapsed() > Duration::from_secs(2)
            && cluster.step_files(&id).is_empty()
        {
            cluster.run(
                "scontrol",
                &["update", &format!("JobId={id}"), "StartTime=now"],
            );
            eprintln!(
                "released {:.1} s after the signal",
                t_signal.elapsed().as_secs_f64()
            );
            released = true;
        }
        if Instant::now() > deadline {
            fail(&format!(
                "still {s} (restarts {restarts}) 60 s after the signal"
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let log = read(&out);
    let (_, restarts) = cluster.state(&id);
    if state != "COMPLETED" || restarts != 1 {
        let hint = if log.contains("no checkpoint promised") || !log.contains("exit 75") {
            " (the binary did not exit 75 on SIGUSR1: is the preemption contract implemented?)"
        } else {
            ""
        };
        fail(&format!(
            "ended {state} with {restarts} restart(s), expected COMPLETED after 1{hint}"
        ));
    }
    assert!(log.contains("batch shell got SIGUSR1"), "{log}");
    assert!(log.contains("preempted: checkpoint written"), "{log}");
    assert!(log.contains("restart 1"), "a second log segment:\n{log}");
    assert!(log.contains("resuming from"), "{log}");
    assert!(log.contains("requeue job: training done"), "{log}");
    // Every step once, in order, to the configured end.
    let metrics = read(&run_dir.join("metrics.jsonl"));
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        (1..=REQUEUE_STEPS).collect::<Vec<_>>(),
        "metrics steps:\n{log}"
    );
    assert!(
        ckpt.join(format!("step-{REQUEUE_STEPS:08}")).is_dir(),
        "the final checkpoint:\n{log}"
    );
    let job_log = read(&runs.join("ul-requeue").join(&id).join("job.log"));
    for needle in ["restart 0", "preempted (restart 0)", "restart 1"] {
        assert!(
            job_log.contains(needle),
            "job.log lacks {needle:?}:\n{job_log}"
        );
    }
    eprintln!(
        "requeue job {id}: COMPLETED after 1 restart, {} steps, {:.0} s in all",
        steps.len(),
        t0.elapsed().as_secs_f64()
    );
}
