//! `ultralong`: command-line parsing and dispatch only; the work lives in the library.

use std::process::ExitCode;

use clap::Parser;

// Tokenization (prepare) allocates per token: with glibc malloc, malloc/free took over a third of
// its time; with mimalloc `prepare cpt` ran 1.73x the Python peer (bench/results/prepare-cpt-*).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Under a multi-rank MPI world a panic on one rank aborts the job (`error: [rank R] ...`)
    // instead of leaving the other ranks blocked in a collective; single runs keep Rust's hook.
    ultralong::parallel::any::install_panic_hook();
    let cli = match ultralong::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Under mpirun every rank parses the same command line: rank 0 alone prints the usage
            // error (or the help).
            if ultralong::parallel::any::follower_before_world().is_some() {
                if !e.use_stderr() {
                    return ExitCode::SUCCESS;
                }
                ultralong::parallel::any::wait_for_rank_zero();
            }
            e.exit()
        }
    };
    match ultralong::cli::run(cli) {
        Ok(()) => {
            ExitCode::from(ultralong::cli::EXIT_CODE.load(std::sync::atomic::Ordering::Relaxed))
        }
        Err(e) => {
            // One line: the whole context chain, outermost first (`error: [rank R] ...` in a
            // multi-rank world, where MPI is then aborted so that mpirun exits at once).
            ultralong::parallel::any::report_error(&e);
            ExitCode::FAILURE
        }
    }
}
