//! Preemption: SIGUSR1 (Slurm's `--signal`) or SIGTERM stops training after the current step with
//! a checkpoint and exit code 75; `--resume` then ends with the same weights as an uninterrupted run.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn config(out: &str) -> String {
    run_config(60, out).replace("interval = 5", "interval = 4")
}

/// Wait until the run has written its first checkpoint, then send `sig` to `child`.
fn signal_after_first_checkpoint(child: &mut Child, run: &Path, sig: &str) {
    let t0 = Instant::now();
    while !run.join("checkpoints/latest").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no checkpoint within 60 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before the signal"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn weights(dir: &Path, out: &str) -> ultralong::io::TensorMap {
    ultralong::train::checkpoint::load_full(&dir.join(out).join("checkpoints/step-00000060"))
        .unwrap()
        .1
}

fn interrupted_then_resumed(sig: &str, ranks: usize) {
    let d = tempfile::tempdir().unwrap();
    tiny_model(d.path());
    std::fs::write(d.path().join("a.toml"), config("runs/a")).unwrap();
    std::fs::write(d.path().join("b.toml"), config("runs/b")).unwrap();
    ok(d.path(), &["train", "--config", "a.toml"]);

    let mut cmd = if ranks == 1 {
        let mut c = Command::new(bin());
        c.args(["train", "--config", "b.toml"]);
        c
    } else {
        mpirun_command(
            d.path(),
            ranks,
            &["train", "--config", "b.toml", "--cp", "2"],
        )
    };
    let mut child = cmd
        .current_dir(d.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    signal_after_first_checkpoint(&mut child, &d.path().join("runs/b"), sig);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{sig} with {ranks} rank(s): {err}"
    );
    assert!(err.contains("signal received: stopped after step"), "{err}");
    let (_, st) = ultralong::train::checkpoint::find_latest(&d.path().join("runs/b/checkpoints"))
        .unwrap()
        .unwrap();
    assert!(st.step < 60, "stopped early, at step {}", st.step);
    eprintln!("{sig}, {ranks} rank(s): stopped at step {} of 60", st.step);

    let o = if ranks == 1 {
        run(d.path(), &["train", "--config", "b.toml", "--resume"])
    } else {
        mpirun(
            d.path(),
            ranks,
            &["train", "--config", "b.toml", "--cp", "2", "--resume"],
            &[],
        )
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resuming from"));
    let (a, b) = (weights(d.path(), "runs/a"), weights(d.path(), "runs/b"));
    for (name, t) in &a {
        if ranks == 1 {
            assert_eq!(t.data, b[name].data, "{name}: resumed run differs");
        } else {
            let e = t
                .data
                .iter()
                .zip(&b[name].data)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(e < 1e-3, "{name}: resumed 2-rank run differs by {e}");
        }
    }
}

#[test]
fn sigusr1_checkpoints_exits_75_and_resume_is_bit_identical() {
    interrupted_then_resumed("-USR1", 1);
}

#[test]
fn sigterm_does_the_same() {
    interrupted_then_resumed("-TERM", 1);
}

#[test]
fn sigusr1_to_mpirun_stops_every_rank_together() {
    interrupted_then_resumed("-USR1", 2);
}
