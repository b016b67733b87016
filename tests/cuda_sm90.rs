//! The Hopper attention forward (cuda/attention_sm90.cu) checked without a GPU: it is embedded in
//! the sm_90a cubin only (the sm_80/sm_90 PTX of the file has no entry); the machine code uses the
//! warpgroup tensor-core instructions (HGMMA), the tensor-copy engine (UTMALDG/UTMASTG), mbarriers
//! (SYNCS) and register reallocation (USETMAXREG) with budgets that fit the register file, and no
//! local memory; ptxas reports no spills, registers within the launch-bound cap, and none of the
//! notes that mean setmaxnreg was ignored or the wgmma pipeline serialised; and the CPU model of
//! its index math and synchronisation (bench/gpu/sm90_fragments.py) passes.
//!
//! The SASS check needs `cuobjdump` (a CUDA wheel on PyPI: docs/DEVELOPERS.md, CUDA) and the
//! ptxas check nvcc; each says so and skips without them, unless ULTRALONG_REQUIRE_CUOBJDUMP=1 /
//! ULTRALONG_REQUIRE_NVCC=1 make a missing tool a failure.
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::process::Command;

use ultralong::backend::cuda::kernels::{built_with_kernels, module};

const ENTRIES: [&str; 2] = ["ul_attn_sm90_fwd_d64", "ul_attn_sm90_fwd_d128"];
/// `__launch_bounds__(384, 1)`: 65536 / 384 registers per thread, rounded down to a multiple of 8.
const ENTRY_REG_CAP: u32 = 168;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

fn kernels_or_skip() -> bool {
    if built_with_kernels() {
        return true;
    }
    assert!(
        !required("ULTRALONG_REQUIRE_NVCC"),
        "ULTRALONG_REQUIRE_NVCC=1 but the build has no kernels"
    );
    eprintln!("skipped: built without nvcc");
    false
}

/// nvcc as build.rs finds it: $NVCC, $CUDA_HOME/bin/nvcc, PATH, then the repository's .venv-cuda.
fn nvcc() -> Option<String> {
    let mut c = vec![];
    if let Ok(p) = std::env::var("NVCC") {
        c.push(p);
    }
    if let Ok(h) = std::env::var("CUDA_HOME") {
        c.push(format!("{h}/bin/nvcc"));
    }
    c.push("nvcc".into());
    c.push(root().join(".venv-cuda/nvcc").display().to_string());
    c.into_iter().find(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// cuobjdump: $CUOBJDUMP, beside nvcc's own binaries (nvcc --dryrun names that folder `_HERE_`;
/// the PyPI wheel nvidia-cuda-cuobjdump installs there), then PATH.
fn cuobjdump() -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = vec![];
    if let Ok(p) = std::env::var("CUOBJDUMP") {
        c.push(p.into());
    }
    if let Some(n) = nvcc() {
        let o = Command::new(&n)
            .args(["--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"])
            .output();
        if let Ok(o) = o {
            let text = String::from_utf8_lossy(&o.stderr).to_string()
                + &String::from_utf8_lossy(&o.stdout);
            if let Some(here) = text.lines().find_map(|l| l.strip_prefix("#$ _HERE_=")) {
                c.push(Path::new(here.trim()).join("cuobjdump"));
            }
        }
    }
    c.push("cuobjdump".into());
    c.into_iter().find(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn sm90_forward_is_only_in_the_sm90a_cubin() {
    if !kernels_or_skip() {
        return;
    }
    let m = module("attention_sm90").expect("cuda/attention_sm90.cu embedded");
    for (arch, ptx) in [("sm_80", m.ptx_sm80), ("sm_90", m.ptx_sm90)] {
        assert!(
            !ptx.contains(".entry"),
            "{arch} PTX of attention_sm90 has an entry"
        );
        assert!(
            !ptx.contains("wgmma"),
            "{arch} PTX of attention_sm90 has wgmma"
        );
    }
    assert_eq!(&m.cubin_sm90a[..4], b"\x7fELF", "sm_90a cubin");
    let cubin = String::from_utf8_lossy(m.cubin_sm90a);
    for e in ENTRIES {
        assert!(cubin.contains(e), "sm_90a cubin has no {e}");
    }
}

/// The SASS of each entry, by function name.
fn sass_by_function(sass: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![];
    for line in sass.lines() {
        if let Some(name) = line.trim().strip_prefix("Function : ") {
            out.push((name.trim().to_string(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// The register count of every `USETMAXREG` of a kind ("DEALLOC" or "TRY_ALLOC") in the SASS.
fn setmaxnreg_values(sass: &str, kind: &str) -> Vec<u32> {
    sass.lines()
        .filter(|l| l.contains("USETMAXREG") && l.contains(kind))
        .filter_map(|l| {
            let ins = l.split(';').next()?;
            let hex = ins.rsplit(',').next()?.split_whitespace().last()?;
            u32::from_str_radix(hex.trim_start_matches("0x"), 16).ok()
        })
        .collect()
}

#[test]
fn sm90_sass_has_wgmma_tma_mbarriers_and_fits_the_register_file() {
    if !kernels_or_skip() {
        return;
    }
    let Some(tool) = cuobjdump() else {
        assert!(
            !required("ULTRALONG_REQUIRE_CUOBJDUMP"),
            "ULTRALONG_REQUIRE_CUOBJDUMP=1 but no cuobjdump found"
        );
        eprintln!("skipped: no cuobjdump ($CUOBJDUMP, beside nvcc, PATH; docs/DEVELOPERS.md)");
        return;
    };
    let m = module("attention_sm90").expect("attention_sm90 module");
    let dir = tempfile::tempdir().unwrap();
    let cubin = dir.path().join("attention_sm90.cubin");
    std::fs::write(&cubin, m.cubin_sm90a).unwrap();
    let o = Command::new(&tool)
        .arg("--dump-sass")
        .arg(&cubin)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cuobjdump: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let sass = String::from_utf8_lossy(&o.stdout).to_string();
    let funcs = sass_by_function(&sass);
    for e in ENTRIES {
        let body = &funcs
            .iter()
            .find(|(n, _)| n == e)
            .unwrap_or_else(|| panic!("{e} not in the SASS"))
            .1;
        let wide = if e.ends_with("d128") {
            "HGMMA.64x128x16.F32.BF16"
        } else {
            "HGMMA.64x64x16.F32.BF16"
        };
        for needle in [
            "HGMMA.64x128x16.F32.BF16", // S = Q·Kᵀ
            wide,                       // O += P·V
            "UTMALDG.3D",               // Q, K, V tiles by TMA
            "UTMASTG.3D",               // O by TMA
            "SYNCS.PHASECHK",           // mbarrier waits
            "SYNCS.ARRIVE",             // mbarrier arrivals (expect_tx, releases)
            "USETMAXREG",
            "WARPGROUP.ARRIVE",
        ] {
            assert!(body.contains(needle), "{e}: no {needle} in the SASS");
        }
        for bad in [" LDL", " STL", "HMMA"] {
            assert!(
                !body.contains(bad),
                "{e}: {bad} in the SASS (local memory or the sm_80 path)"
            );
        }
        // One producer warpgroup giving registers away, two consumer warpgroups taking them: the
        // budgets must fit the 64 Ki-register file.
        let dec = setmaxnreg_values(body, "DEALLOC");
        let inc = setmaxnreg_values(body, "TRY_ALLOC");
        assert!(
            !dec.is_empty() && !inc.is_empty(),
            "{e}: setmaxnreg values not found"
        );
        let (p, c) = (dec.iter().max().unwrap(), inc.iter().max().unwrap());
        assert!(
            128 * p + 256 * c <= 65536,
            "{e}: 128 × {p} + 256 × {c} registers exceed the register file"
        );
        assert!(
            *p <= ENTRY_REG_CAP && *c >= ENTRY_REG_CAP,
            "{e}: budgets {p}/{c}"
        );
    }
}

#[test]
fn sm90_ptxas_reports_no_spills_and_no_ignored_setmaxnreg() {
    let Some(nvcc) = nvcc() else {
        assert!(
            !required("ULTRALONG_REQUIRE_NVCC"),
            "ULTRALONG_REQUIRE_NVCC=1 but no nvcc"
        );
        eprintln!("skipped: no nvcc");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // build.rs's flags for the sm_90a cubin, plus the resource report.
    let o = Command::new(&nvcc)
        .args([
            "-std=c++17",
            "-O3",
            "-lineinfo",
            "--Werror",
            "all-warnings",
            "-Xptxas=-Werror",
            "--cubin",
            "-gencode=arch=compute_90a,code=sm_90a",
            "-Xptxas",
            "-v",
            "-Icuda",
            "cuda/attention_sm90.cu",
            "-o",
        ])
        .arg(dir.path().join("a.cubin"))
        .current_dir(root())
        .output()
        .unwrap();
    let report =
        String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "nvcc failed:\n{report}");
    // C7508: setmaxnreg ignored; C7510/C7514/C7515: wgmma serialised; C7517/C7519: waits or
    // arrives injected around wgmma registers.
    for code in ["C7508", "C7510", "C7514", "C7515", "C7517", "C7519"] {
        assert!(!report.contains(code), "ptxas note {code}:\n{report}");
    }
    for e in ENTRIES {
        let at = report
            .find(&format!("Function properties for {e}"))
            .unwrap_or_else(|| panic!("no resource report for {e}:\n{report}"));
        let block: String = report[at..].lines().take(3).collect::<Vec<_>>().join("\n");
        assert!(
            block.contains("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"),
            "{e}: spills or a stack frame:\n{block}"
        );
        let regs: u32 = block
            .split("Used ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{e}: no register count:\n{block}"));
        assert!(regs <= ENTRY_REG_CAP, "{e}: {regs} registers at entry");
    }
}

#[test]
fn sm90_index_math_and_protocol_model_passes() {
    let o = Command::new("python3")
        .arg("bench/gpu/sm90_fragments.py")
        .current_dir(root())
        .output()
        .expect("python3 (the CPU model of cuda/attention_sm90.cu)");
    assert!(
        o.status.success(),
        "bench/gpu/sm90_fragments.py failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
