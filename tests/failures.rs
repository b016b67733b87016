//! Failures: a rank killed (SIGKILL) during a step or inside a checkpoint write, then a restart:
//! the run resumes from the last complete checkpoint and ends with the weights of an uninterrupted
//! run; a full disk while writing leaves the previous checkpoint intact and says so.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ultralong::train::checkpoint::{find_latest, load_full};

const STEPS: u64 = 30;

fn config(out: &str) -> String {
    run_config(STEPS, out)
}

fn final_weights(dir: &Path, out: &str) -> ultralong::io::TensorMap {
    load_full(&dir.join(out).join(format!("checkpoints/step-{STEPS:08}")))
        .unwrap()
        .1
}

fn mpirun_cmd(dir: &Path, args: &[&str]) -> Command {
    mpirun_command(dir, 2, args)
}

/// An uninterrupted 2-rank (cp 2) run and the checkpoint directory of a second, interrupted one.
fn reference(d: &Path) -> ultralong::io::TensorMap {
    tiny_model(d);
    std::fs::write(d.join("a.toml"), config("runs/a")).unwrap();
    std::fs::write(d.join("b.toml"), config("runs/b")).unwrap();
    let o = mpirun_cmd(d, &["train", "--config", "a.toml", "--cp", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    final_weights(d, "runs/a")
}

fn resume_and_compare(d: &Path, want: &ultralong::io::TensorMap) {
    let o = mpirun_cmd(d, &["train", "--config", "b.toml", "--cp", "2", "--resume"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming from"), "{err}");
    assert_eq!(
        &final_weights(d, "runs/b"),
        want,
        "the resumed run must end bit-identical"
    );
}

#[test]
fn kill_9_of_a_rank_during_a_step_then_restart() {
    let d = tempfile::tempdir().unwrap();
    let want = reference(d.path());
    let mut child = mpirun_cmd(d.path(), &["train", "--config", "b.toml", "--cp", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // After the checkpoint of step 10, kill -9 one rank (a child of mpirun) mid-run.
    let t0 = Instant::now();
    while find_latest(&d.path().join("runs/b/checkpoints"))
        .ok()
        .flatten()
        .is_none_or(|(_, s)| s.step < 10)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint at step 10"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kids = Command::new("pgrep")
        .args(["-P", &child.id().to_string()])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&kids.stdout)
        .lines()
        .last()
        .expect("a rank process")
        .to_string();
    assert!(
        Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(!status.success(), "the job must fail when a rank is killed");
    let (_, st) = find_latest(&d.path().join("runs/b/checkpoints"))
        .unwrap()
        .unwrap();
    assert!(
        st.step >= 10 && st.step < STEPS,
        "killed at step {}",
        st.step
    );
    eprintln!(
        "kill -9 after checkpoint {}: job ended {:?} after the kill",
        st.step,
        t0.elapsed()
    );
    resume_and_compare(d.path(), &want);
}

#[test]
fn kill_9_inside_a_checkpoint_write_then_restart() {
    let d = tempfile::tempdir().unwrap();
    let want = reference(d.path());
    let o = mpirun_cmd(d.path(), &["train", "--config", "b.toml", "--cp", "2"])
        .env("ULTRALONG_CRASH_IN_CHECKPOINT", "15")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let root = d.path().join("runs/b/checkpoints");
    assert!(
        root.join(".tmp-step-00000015").exists(),
        "the half-written checkpoint stays temporary"
    );
    let (dir, st) = find_latest(&root).unwrap().unwrap();
    assert_eq!(
        st.step,
        10,
        "the last complete checkpoint is {}",
        dir.display()
    );
    resume_and_compare(d.path(), &want);
    assert!(
        !root.join(".tmp-step-00000015").exists(),
        "the stale temporary directory is replaced"
    );
}

#[test]
fn a_full_disk_leaves_the_previous_checkpoint_intact() {
    let d = tempfile::tempdir().unwrap();
    tiny_model(d.path());
    // The size of one checkpoint, from a run on the normal disk.
    std::fs::write(d.path().join("probe.toml"), run_config(5, "runs/probe")).unwrap();
    ok(d.path(), &["train", "--config", "probe.toml"]);
    let (probe, _) = find_latest(&d.path().join("runs/probe/checkpoints"))
        .unwrap()
        .unwrap();
    let bytes: u64 = std::fs::read_dir(&probe)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    // A tmpfs with room for one checkpoint and a half.
    let mnt = d.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let size = format!("size={}k", bytes * 3 / 2 / 1024 + 1);
    let m = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        m.success(),
        "mounting a small tmpfs needs root (make test runs as root in CI)"
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&mnt);
    std::fs::write(d.path().join("c.toml"), run_config(10, "runs/c")).unwrap();
    let o = run(
        d.path(),
        &[
            "train",
            "--config",
            "c.toml",
            "--set",
            "checkpoint.dir=\"small/ck\"",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "the second checkpoint cannot fit: {err}"
    );
    assert!(
        err.contains("writing checkpoint step-00000010 failed") && err.contains("untouched"),
        "{err}"
    );
    let (dir, st) = find_latest(&mnt.join("ck")).unwrap().unwrap();
    assert_eq!(st.step, 5, "{}", dir.display());
    assert!(
        !mnt.join("ck/.tmp-step-00000010").exists(),
        "the failed write is cleaned up"
    );
    eprintln!("full disk ({size}): {}", err.lines().last().unwrap_or(""));
}
