//! The training loop, the optimizer (`optim`), LR schedule, checkpoints and metrics.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod model;
pub mod optim;
pub mod plots;
pub mod schedule;
pub mod step;
pub mod trainer;
