//! Parallelism over ranks: the world split into DP × CP × TP groups (`topology`), how ranks talk
//! (`comm` trait; `mpi`, `thread`, and the world of one in `comm::SelfComm`, all behind `any`),
//! tensor + sequence parallelism as conjugate pairs (`tensor`), the context-parallel zigzag ring
//! attention (`context`), the ZeRO-1 partition of the optimizer state over DP × CP (`zero`; the
//! optimizer itself is `train::optim`), and which GPU a rank drives (`local_rank`).

pub mod any;
pub mod comm;
pub mod context;
pub mod device_comm;
pub mod local_rank;
pub mod loopback;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tensor;
#[cfg(test)]
mod tests;
pub mod thread;
pub mod topology;
pub mod zero;
