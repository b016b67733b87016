//! ultralong: the UltraLong recipe (continued pretraining of Llama-3.1 at 1M–4M tokens with YaRN,
//! document separators, short SFT, needle-in-a-haystack evaluation) as one Rust binary.
//!
//! The library target holds everything; `src/main.rs` only parses the command line and dispatches.
//! See docs/ARCHITECTURE.md for the layout as built and the data flow of one training step.

pub mod backend;
pub mod cli;
pub mod data;
pub mod eval;
pub mod flops;
pub mod io;
pub mod model;
pub mod parallel;
pub mod plan;
pub mod plot;
pub mod rates;
pub mod train;
pub mod util;
