//! Subcommands, one file each; `Cli` is the whole command line (docs/ARCHITECTURE.md "The CLI").

pub mod bench;
pub mod bench_phases;
pub mod eval;
pub mod export;
pub mod forward;
pub mod generate;
pub mod gpu_check;
pub mod init;
pub mod plan;
pub mod plot;
pub mod prepare;
pub mod report;
pub mod train;

use std::sync::atomic::AtomicU8;

use anyhow::Result;

/// The exit code of a command that succeeded but asks for something (e.g. 75: preempted after a
/// checkpoint, requeue me); 0 otherwise. `main` returns it.
pub static EXIT_CODE: AtomicU8 = AtomicU8::new(0);
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ultralong",
    version,
    about = "UltraLong: Llama-3.1 context extension to 1M-4M tokens with YaRN; a CPU reference \
             backend and a CUDA one, over MPI (tensor, context and data parallel)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a randomly initialised model in Hugging Face layout.
    Init(init::InitArgs),
    /// One forward (and optionally backward) pass over a JSON array of token ids.
    Forward(forward::ForwardArgs),
    /// Build token datasets (Megatron indexed format).
    #[command(subcommand)]
    Prepare(prepare::PrepareCommand),
    /// Train (or resume) as a TOML run config says.
    Train(train::TrainArgs),
    /// Write a checkpoint's model as a Hugging Face directory.
    Export(export::ExportArgs),
    /// Measure training speed and memory.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The CUDA backend's checks against the CPU and its benchmarks (bench/gpu-check.sh).
    GpuCheck(gpu_check::GpuCheckArgs),
    /// Per-rank memory, step time and GPU-hours of a run on N GPUs; the layout to use.
    Plan(plan::PlanArgs),
    /// Continue a prompt (KV cache; prefill and cache spread over --cp ranks).
    Generate(generate::GenerateArgs),
    /// Evaluate a model: needle in a haystack, loss by position.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Draw a run's loss and throughput PNGs from its metrics.jsonl.
    Plot(plot::PlotArgs),
    /// A Markdown page comparing models from their `eval niah` / `eval ppl` outputs.
    Report(report::ReportArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(a) => init::run(a),
        Command::Forward(a) => forward::run(a),
        Command::Prepare(a) => prepare::run(a),
        Command::Train(a) => train::run(a),
        Command::Export(a) => export::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Report(a) => report::run(a),
        Command::GpuCheck(a) => gpu_check::run(a),
    }
}
