//! The training loop, optimizer step, LR schedule, checkpoints and metrics.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod plots;
pub mod schedule;
pub mod trainer;
