//! What a cluster user reads and runs first: the paper configs run on the GPU and the toy ones on
//! the CPU; the tables and plan figures in REPRODUCE.md and the configs are what `plan` prints
//! today (scripts/gen-doc-tables.sh --check); the slurm scripts refuse to submit without a model
//! or a dataset; slurm/smoke-gpu.sh parses and its layout/compare logic runs on the CPU backend.

use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn backend_of(config: &str) -> String {
    let text = std::fs::read_to_string(repo().join(config)).unwrap();
    let doc: toml::Table = toml::from_str(&text).unwrap();
    doc["train"]
        .get("backend")
        .and_then(|v| v.as_str())
        .unwrap_or("cpu")
        .to_string()
}

#[test]
fn paper_configs_run_on_the_gpu_and_toy_configs_on_the_cpu() {
    for m in ["1m", "2m", "4m"] {
        for c in [
            format!("configs/ultralong-{m}.toml"),
            format!("configs/sft-{m}.toml"),
        ] {
            assert_eq!(backend_of(&c), "cuda", "{c}");
        }
    }
    for dir in ["configs/debug", "configs/demo"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let rel = p
                    .strip_prefix(repo())
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
                assert_eq!(backend_of(&rel), "cpu", "{rel}");
            }
        }
    }
}

/// `bash SCRIPT ARGS` from the repository, outside any Slurm job, with ENV; (status ok, stdout +
/// stderr).
fn bash(script: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut c = std::process::Command::new("bash");
    c.arg(repo().join(script)).args(args).current_dir(repo());
    for v in [
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "SLURM_JOB_NAME",
        "ULTRALONG_RUNS",
        "ULTRALONG_SBATCH_ARGS",
    ] {
        c.env_remove(v);
    }
    // No slurm/site.sh of this machine: the scripts as shipped.
    c.env("ULTRALONG_SITE", "none")
        .env("ULTRALONG_BIN", env!("CARGO_BIN_EXE_ultralong"))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("spawn bash");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn doc_tables_and_config_plan_lines_are_what_plan_prints() {
    let (ok, out) = bash("scripts/gen-doc-tables.sh", &["--check"], &[]);
    assert!(
        ok,
        "stale figures (run bash scripts/gen-doc-tables.sh):\n{out}"
    );
}

#[test]
fn every_slurm_script_parses() {
    for e in std::fs::read_dir(repo().join("slurm")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "sh") {
            let o = std::process::Command::new("bash")
                .arg("-n")
                .arg(&p)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{}: {}",
                p.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

#[test]
fn stage_scripts_check_model_and_dataset_before_sbatch() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // A stand-in sbatch on PATH: reached only when every check passed.
    let fake = t.join("bin");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(
        fake.join("sbatch"),
        "#!/bin/sh\necho SBATCH-CALLED \"$@\"\n",
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x", fake.join("sbatch").to_str().unwrap()])
        .status()
        .unwrap();
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap());
    let runs = t.join("runs");
    let env = [
        ("PATH", path.as_str()),
        ("ULTRALONG_RUNS", runs.to_str().unwrap()),
    ];
    let model = t.join("model");
    let data = t.join("data");
    let set_model = format!("model.path=\"{}\"", model.display());
    let set_data = format!("data.dataset=\"{}\"", data.display());
    let args = ["--set", set_model.as_str(), "--set", set_data.as_str()];

    // No model directory: refused before sbatch, naming the path and what is missing.
    let (ok, out) = bash("slurm/4m.sh", &args, &env);
    assert!(!ok && !out.contains("SBATCH-CALLED"), "{out}");
    assert!(
        out.contains(&model.display().to_string()) && out.contains("config.json"),
        "{out}"
    );
    // A model but no dataset.
    std::fs::create_dir_all(&model).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "model-00001-of-00001.safetensors",
    ] {
        std::fs::write(model.join(f), "{}").unwrap();
    }
    let (ok, out) = bash("slurm/4m.sh", &args, &env);
    assert!(!ok && !out.contains("SBATCH-CALLED"), "{out}");
    assert!(
        out.contains(&data.display().to_string()) && out.contains("tokens.bin"),
        "{out}"
    );
    // Both: submitted, with the training arguments.
    std::fs::create_dir_all(&data).unwrap();
    for f in ["tokens.bin", "tokens.idx"] {
        std::fs::write(data.join(f), "").unwrap();
    }
    let (ok, out) = bash("slurm/4m.sh", &args, &env);
    assert!(ok && out.contains("SBATCH-CALLED"), "{out}");
    assert!(
        out.contains("slurm/4m.sh") && out.contains(&set_model),
        "{out}"
    );
    // The paper config's own paths (models/, data/ of the repository) are checked the same way.
    let (ok, out) = bash("slurm/1m.sh", &[], &env);
    assert!(!ok && out.contains("models/Llama-3.1-8B-Instruct"), "{out}");
}

#[test]
fn smoke_gpu_layouts_and_comparison_run_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().to_str().unwrap().to_string();
    let env = [("ULTRALONG_RUNS", runs.as_str())];
    let (ok, out) = bash(
        "slurm/smoke-gpu.sh",
        &["--local", "--np", "2", "--backend", "cpu", "--steps", "3"],
        &env,
    );
    assert!(ok, "{out}");
    // Every layout of 2 ranks, each equal to the 1-rank run within 1e-3 over the 3 steps.
    for layout in ["tp2 cp1 dp1", "tp1 cp2 dp1", "tp1 cp1 dp2"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(layout))
            .unwrap_or_else(|| panic!("no line for {layout}:\n{out}"));
        assert!(line.ends_with("PASS"), "{line}\n{out}");
        let diff: f64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
        assert!(diff <= 1e-3, "{line}");
    }
    // The FAIL path: no difference passes a negative tolerance, and the exit status says so.
    let (ok, out) = bash(
        "slurm/smoke-gpu.sh",
        &[
            "--local",
            "--np",
            "2",
            "--backend",
            "cpu",
            "--steps",
            "2",
            "--layouts",
            "1x1",
            "--tol",
            "-1",
        ],
        &env,
    );
    assert!(!ok, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("tp1 cp1 dp2") && l.contains("FAIL")),
        "{out}"
    );
}

#[test]
fn cuda_libraries_are_linked_under_the_names_cudarc_opens() {
    // cudarc 0.19 (cuda-12090) tries libcublasLt.so / .so.12 and libnccl.so, never .so.13 / .so.2.
    let sys = std::process::Command::new("sh")
        .args(["-c", "ldconfig -p 2>/dev/null"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    if sys.contains("libnccl.so ") || sys.contains("libcublasLt.so ") {
        eprintln!("skipped: this machine has the unversioned CUDA library names already");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("cuda/lib64");
    std::fs::create_dir_all(&lib).unwrap();
    for f in ["libcublasLt.so.13", "libnccl.so.2"] {
        std::fs::write(lib.join(f), "").unwrap();
    }
    let job = tmp.path().join("job");
    let script = format!(
        "source slurm/common.sh; UL_JOB_DIR={job}; LD_LIBRARY_PATH={lib}; ul_cuda_libs; echo \"LD=$LD_LIBRARY_PATH\"",
        job = job.display(),
        lib = lib.display()
    );
    let o = std::process::Command::new("bash")
        .args(["-c", &script])
        .current_dir(repo())
        .env("ULTRALONG_SITE", "none")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}");
    for (name, target) in [
        ("libcublasLt.so", "libcublasLt.so.13"),
        ("libnccl.so", "libnccl.so.2"),
    ] {
        let link = std::fs::read_link(job.join("lib").join(name))
            .unwrap_or_else(|e| panic!("{name} not linked: {e}\n{out}"));
        assert_eq!(link, lib.join(target), "{out}");
    }
    assert!(
        out.contains(&format!("LD={}/lib:{}", job.display(), lib.display())),
        "{out}"
    );
}
