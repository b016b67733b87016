//! The CUDA build without a GPU: every `cuda/*.cu` is compiled by build.rs (nvcc, warnings as
//! errors) and embedded; RoPE's PTX has no approximate sin/cos; the flash-attention PTX uses
//! mma.sync m16n8k16 bf16, ldmatrix and cp.async, and its sm_90a cubin has every entry; every kernel the backend looks up
//! is in its module; `--backend cuda` without a driver fails with a clear message; `make test`
//! cannot skip these tests for want of nvcc; and a build without nvcc still succeeds (ignored by
//! default: a second full `cargo check`).
#![cfg(feature = "cuda")]

use std::process::Command;

use ultralong::backend::cuda::kernels::{KERNELS, MODULES, built_with_kernels, module};

/// Kernels must be present unless this build had no nvcc and nothing asked for them. `make test`
/// exports ULTRALONG_REQUIRE_NVCC=1, which makes a missing nvcc a build error (build.rs); should a
/// kernel-less build still reach this test under make (MAKELEVEL is set for everything make runs),
/// or with the variable set when the test was compiled or run, it fails here. Only a plain
/// `cargo test` on a machine without nvcc skips.
fn kernels_or_skip() -> bool {
    if built_with_kernels() {
        return true;
    }
    let required = std::env::var("ULTRALONG_REQUIRE_NVCC").is_ok_and(|v| v == "1")
        || option_env!("ULTRALONG_REQUIRE_NVCC") == Some("1")
        || std::env::var_os("MAKELEVEL").is_some();
    assert!(
        !required,
        "the build has no CUDA kernels, but ULTRALONG_REQUIRE_NVCC=1 or `make` asked for them \
         (make deps installs nvcc; docs/DEVELOPERS.md, CUDA)"
    );
    eprintln!("skipped: built without nvcc (make deps installs it; see docs/DEVELOPERS.md)");
    false
}

/// `make test` runs this file's tests with the requirement in their environment: the Makefile
/// exports it to every recipe (tested through make itself, as `make test` would see it).
#[test]
fn make_test_requires_nvcc() {
    let o = Command::new("make")
        .args([
            "--no-print-directory",
            "--eval",
            "ul-env-probe: ; @echo \"$$ULTRALONG_REQUIRE_NVCC\"",
            "ul-env-probe",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("ULTRALONG_REQUIRE_NVCC")
        .output()
        .expect("run make (the Makefile is the README's test command)");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.trim() == "1",
        "the Makefile does not export ULTRALONG_REQUIRE_NVCC=1 to its recipes: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn every_cu_file_is_compiled_and_embedded() {
    if !kernels_or_skip() {
        return;
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/cuda");
    let mut stems: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "cu").then(|| p.file_stem().unwrap().to_string_lossy().into())
        })
        .collect();
    stems.sort();
    let mut embedded: Vec<String> = MODULES.iter().map(|m| m.name.to_string()).collect();
    embedded.sort();
    assert_eq!(stems, embedded, "cuda/*.cu and the embedded modules differ");
    for m in MODULES {
        assert!(
            m.ptx_sm80.contains(".target sm_80"),
            "{}: sm_80 PTX",
            m.name
        );
        assert!(
            m.ptx_sm90.contains(".target sm_90"),
            "{}: sm_90 PTX",
            m.name
        );
        // An ELF image for sm_90a.
        assert_eq!(&m.cubin_sm90a[..4], b"\x7fELF", "{}: sm_90a cubin", m.name);
    }
}

#[test]
fn every_kernel_the_backend_loads_is_an_entry_of_its_module() {
    if !kernels_or_skip() {
        return;
    }
    for (name, entries) in KERNELS {
        let m = module(name).unwrap_or_else(|| panic!("module {name} not embedded"));
        for e in *entries {
            for (arch, ptx) in [("sm_80", m.ptx_sm80), ("sm_90", m.ptx_sm90)] {
                assert!(
                    ptx.contains(&format!(".entry {e}(")),
                    "kernel {e} missing from cuda/{name}.cu ({arch} PTX)"
                );
            }
        }
    }
    let listed: usize = KERNELS.iter().map(|(_, e)| e.len()).sum();
    let entries: usize = MODULES
        .iter()
        .map(|m| m.ptx_sm90.matches(".entry ").count())
        .sum();
    assert_eq!(
        listed, entries,
        "a kernel in cuda/ is not listed in kernels::KERNELS"
    );
}

#[test]
fn rope_ptx_has_exact_angles_no_approximate_sin_cos() {
    if !kernels_or_skip() {
        return;
    }
    let m = module("rope").expect("rope module");
    for (arch, ptx) in [("sm_80", m.ptx_sm80), ("sm_90", m.ptx_sm90)] {
        for bad in ["sin.approx", "cos.approx"] {
            assert!(!ptx.contains(bad), "rope {arch} PTX contains {bad}");
        }
        // The range reduction is in f64: fused multiply-adds on doubles.
        assert!(ptx.contains("fma.rn.f64"), "rope {arch} PTX has no f64 fma");
    }
}

#[test]
fn flash_attention_ptx_uses_the_tensor_cores_and_async_copies() {
    if !kernels_or_skip() {
        return;
    }
    let m = module("attention_flash").expect("attention_flash module");
    for (arch, ptx) in [("sm_80", m.ptx_sm80), ("sm_90", m.ptx_sm90)] {
        for d in [64, 128] {
            for k in ["fwd", "bwd_dsum", "bwd_dkdv", "bwd_dq"] {
                let e = format!(".entry ul_flash_{k}_d{d}(");
                assert!(ptx.contains(&e), "{arch}: {e} missing");
            }
        }
        for needle in [
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
            "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
            "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
            "cp.async.cg.shared.global",
            "cp.async.wait_group",
        ] {
            assert!(
                ptx.contains(needle),
                "attention_flash {arch} PTX has no {needle}"
            );
        }
        // The dQ atomics of the fast backward.
        assert!(
            ptx.contains("red.global.add.f32") || ptx.contains("atom.global.add.f32"),
            "attention_flash {arch} PTX has no fp32 global atomic add"
        );
    }
    assert_eq!(
        &m.cubin_sm90a[..4],
        b"\x7fELF",
        "attention_flash sm_90a cubin"
    );
    // The cubin holds machine code for every entry (symbol names are in the ELF string table).
    let cubin = String::from_utf8_lossy(m.cubin_sm90a);
    for d in [64, 128] {
        assert!(
            cubin.contains(&format!("ul_flash_fwd_d{d}")),
            "sm_90a cubin: fwd d{d}"
        );
        assert!(
            cubin.contains(&format!("ul_flash_bwd_dkdv_d{d}")),
            "sm_90a cubin: dkdv d{d}"
        );
    }
}

#[test]
fn backend_cuda_without_a_driver_fails_clearly() {
    // SAFETY: only tries to load libcuda.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_ultralong");
    let dir = tempfile::tempdir().unwrap();
    // eval checks its --model directory before it starts the backend: give it a real one.
    let model = dir.path().join("m");
    let init = Command::new(bin)
        .args([
            "init",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.json"),
        ])
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let model = model.to_str().unwrap();
    let out = dir.path().to_str().unwrap();
    let runs: [&[&str]; 4] = [
        &[
            "forward",
            "--backend",
            "cuda",
            "--model",
            "/nonexistent",
            "--tokens",
            "/nonexistent.json",
        ],
        &[
            "generate",
            "--backend",
            "cuda",
            "--model",
            "/nonexistent",
            "--prompt",
            "/nonexistent.txt",
        ],
        &[
            "eval",
            "niah",
            "--backend",
            "cuda",
            "--model",
            model,
            "--out",
            out,
        ],
        &["gpu-check", "--out", out],
    ];
    for args in runs {
        let o = Command::new(bin).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded without a driver");
        assert!(
            err.contains("no CUDA driver found (libcuda.so"),
            "{args:?}: unclear message: {err}"
        );
        // gpu-check has no --backend option: the message must not suggest one.
        assert!(
            args[0] != "gpu-check" || !err.contains("--backend"),
            "{args:?}: {err}"
        );
    }
}

/// `cargo check` of the crate as a machine without nvcc builds it (ULTRALONG_NO_NVCC=1 forces
/// that path): the build succeeds and warns. A second target directory: run it on purpose,
/// `cargo test --test cuda_build -- --ignored`.
#[test]
#[ignore]
fn builds_without_nvcc() {
    let target = concat!(env!("CARGO_MANIFEST_DIR"), "/target/no-nvcc");
    let o = Command::new(env!("CARGO"))
        .args(["check", "--lib", "--target-dir", target])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("ULTRALONG_NO_NVCC", "1")
        .env_remove("ULTRALONG_REQUIRE_NVCC")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "cargo check without nvcc failed: {err}");
    assert!(err.contains("building without CUDA kernels"), "{err}");
}
