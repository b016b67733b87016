//! The training loop, optimizer step, LR schedule, checkpoints and metrics.
