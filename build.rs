//! Build script: native pieces compiled beside the Rust crate, one section per optional backend.
//!
//! - `mpi` feature: `csrc/mpi_shim.c` compiled with `$MPICC` or `mpicc` (what rsmpi 0.8 lacks, such
//!   as `MPI_IN_PLACE`, whose value differs between MPI implementations).
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
    // Later: a CUDA section (nvcc kernels → PTX / cubin in OUT_DIR) behind its own feature.
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
