//! `ultralong`: command-line parsing and dispatch only; the work lives in the library.

use std::process::ExitCode;

use clap::Parser;

// Tokenization (prepare) allocates per token: with glibc malloc, malloc/free took over a third of
// its time; with mimalloc `prepare cpt` ran 1.73x the Python peer (bench/results/prepare-cpt-*).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = ultralong::cli::Cli::parse();
    match ultralong::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole context chain, outermost first.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
