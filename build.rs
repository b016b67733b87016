//! Build script: native pieces compiled beside the Rust crate, one section per optional backend.
//!
//! - `mpi` feature: `csrc/mpi_shim.c` compiled with `$MPICC` or `mpicc` (what rsmpi 0.8 lacks, such
//!   as `MPI_IN_PLACE`, whose value differs between MPI implementations).
//!
//! - `cuda` feature: every `cuda/*.cu` compiled with nvcc (found through `$NVCC`,
//!   `$CUDA_HOME/bin/nvcc`, then `PATH`) to PTX for sm_80 and sm_90 and a cubin for sm_90a, written
//!   to `OUT_DIR` and embedded by `src/backend/cuda/kernels.rs` through the generated
//!   `OUT_DIR/cuda_modules.rs`. Warnings are errors. Without nvcc the build still succeeds: the
//!   modules are empty, cfg `ul_no_kernels` is set and `--backend cuda` says the binary was built
//!   without kernels; with `ULTRALONG_REQUIRE_NVCC=1` (CI, `make test`) a missing nvcc is an error.
//!
//! Each section only runs when its Cargo feature is on (`CARGO_FEATURE_*`), so
//! `cargo build --no-default-features` needs no native toolchain beyond rustc.

use std::env;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if feature("MPI") {
        mpi_shim();
    }
    println!("cargo::rustc-check-cfg=cfg(ul_no_kernels)");
    if feature("CUDA") {
        cuda_kernels();
    }
}

/// Whether Cargo feature `name` (upper case, `-` as `_`) is on for this build.
fn feature(name: &str) -> bool {
    env::var_os(format!("CARGO_FEATURE_{name}")).is_some()
}

/// `csrc/mpi_shim.c` → static library `ul_mpi_shim`, linked into the crate. The MPI libraries
/// themselves are linked by `mpi-sys`.
fn mpi_shim() {
    println!("cargo:rerun-if-changed=csrc/mpi_shim.c");
    println!("cargo:rerun-if-env-changed=MPICC");
    let mpicc = env::var("MPICC").unwrap_or_else(|_| "mpicc".to_string());
    // A clear message when the wrapper is missing, rather than cc's generic "failed to find tool".
    if let Err(e) = Command::new(&mpicc).arg("--version").output() {
        panic!(
            "feature `mpi`: cannot run the MPI C compiler `{mpicc}` ({e}). Install OpenMPI \
             (`make deps`: libopenmpi-dev openmpi-bin libclang-dev clang pkg-config), set MPICC, \
             or build without MPI: `cargo build --no-default-features`"
        );
    }
    cc::Build::new()
        .compiler(&mpicc)
        .file("csrc/mpi_shim.c")
        .warnings(true)
        .compile("ul_mpi_shim");
}

/// Where nvcc is: `$NVCC`, `$CUDA_HOME/bin/nvcc`, then `nvcc` on `PATH` (the first that runs).
fn find_nvcc() -> Option<String> {
    let mut candidates = Vec::new();
    if let Ok(p) = env::var("NVCC") {
        candidates.push(p);
    }
    if let Ok(h) = env::var("CUDA_HOME") {
        candidates.push(format!("{h}/bin/nvcc"));
    }
    candidates.push("nvcc".to_string());
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The three images of one kernel file: (file suffix, nvcc arguments).
const CUDA_TARGETS: [(&str, &[&str]); 3] = [
    ("sm80.ptx", &["--ptx", "-arch=sm_80"]),
    ("sm90.ptx", &["--ptx", "-arch=sm_90"]),
    (
        "sm90a.cubin",
        &["--cubin", "-gencode=arch=compute_90a,code=sm_90a"],
    ),
];

/// Flags for every kernel file. No `--use_fast_math`: RoPE's f64 range reduction and the exact
/// `sincos` must not turn into `sin.approx` (tests/cuda_build.rs reads the PTX to check). A
/// register spill is a ptxas warning, so an error (the flash kernels run near 255 registers).
const NVCC_FLAGS: &[&str] = &[
    "-std=c++17",
    "-O3",
    "-lineinfo",
    "--Werror",
    "all-warnings",
    "-Xptxas=-Werror",
    "-Xptxas=-warn-spills",
];

fn cuda_kernels() {
    let out = std::path::PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=cuda");
    for v in [
        "NVCC",
        "CUDA_HOME",
        "ULTRALONG_REQUIRE_NVCC",
        "ULTRALONG_NO_NVCC",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir("cuda")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let sources: Vec<&std::path::PathBuf> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "cu"))
        .collect();
    // ULTRALONG_NO_NVCC=1: build as a machine without nvcc would (tests/cuda_build.rs).
    let nvcc = if env::var("ULTRALONG_NO_NVCC").is_ok_and(|v| v == "1") {
        None
    } else {
        find_nvcc()
    };
    let Some(nvcc) = nvcc else {
        if env::var("ULTRALONG_REQUIRE_NVCC").is_ok_and(|v| v == "1") {
            panic!(
                "ULTRALONG_REQUIRE_NVCC=1 but no nvcc found (tried $NVCC, $CUDA_HOME/bin/nvcc, \
                 PATH): `make deps` installs it from PyPI into .venv-cuda"
            );
        }
        println!(
            "cargo:warning=nvcc not found ($NVCC, $CUDA_HOME/bin/nvcc, PATH): building without \
             CUDA kernels; `--backend cuda` will refuse to run (docs/DEVELOPERS.md, CUDA)"
        );
        println!("cargo:rustc-cfg=ul_no_kernels");
        std::fs::write(
            out.join("cuda_modules.rs"),
            "pub const MODULES: &[CudaModuleImage] = &[];\n",
        )
        .expect("write cuda_modules.rs");
        return;
    };
    // Every (file, target) pair is one nvcc process; run them a few at a time.
    let jobs: Vec<(String, &str, &[&str])> = sources
        .iter()
        .flat_map(|f| {
            let stem = f.file_stem().unwrap().to_string_lossy().to_string();
            CUDA_TARGETS
                .iter()
                .map(move |&(suf, args)| (stem.clone(), suf, args))
        })
        .collect();
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    let errors = std::sync::Mutex::new(Vec::<String>::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..parallel {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((stem, suf, args)) = jobs.get(i) else {
                        break;
                    };
                    let dst = out.join(format!("{stem}.{suf}"));
                    let o = Command::new(&nvcc)
                        .args(NVCC_FLAGS)
                        .args(*args)
                        .arg("-Icuda")
                        .arg(format!("cuda/{stem}.cu"))
                        .arg("-o")
                        .arg(&dst)
                        .output()
                        .expect("run nvcc");
                    if !o.status.success() {
                        errors.lock().unwrap().push(format!(
                            "nvcc failed on cuda/{stem}.cu ({suf}):\n{}{}",
                            String::from_utf8_lossy(&o.stdout),
                            String::from_utf8_lossy(&o.stderr)
                        ));
                    }
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    if !errors.is_empty() {
        panic!("CUDA kernels did not compile:\n{}", errors.join("\n"));
    }
    let mut rs = String::from("pub const MODULES: &[CudaModuleImage] = &[\n");
    for f in &sources {
        let stem = f.file_stem().unwrap().to_string_lossy();
        let p = |suf: &str| out.join(format!("{stem}.{suf}")).display().to_string();
        rs.push_str(&format!(
            "    CudaModuleImage {{ name: {stem:?}, ptx_sm80: include_str!({:?}), ptx_sm90: \
             include_str!({:?}), cubin_sm90a: include_bytes!({:?}) }},\n",
            p("sm80.ptx"),
            p("sm90.ptx"),
            p("sm90a.cubin")
        ));
    }
    rs.push_str("];\n");
    std::fs::write(out.join("cuda_modules.rs"), rs).expect("write cuda_modules.rs");
}
