//! Token data: Megatron indexed datasets (`indexed`), `prepare cpt` (tokenize, resample by length
//! per domain, join with the `<s>` separator, pack) in `prepare`, `prepare sft` (Llama-3 chat
//! template, loss masks) in `sft`, and the training loader (deterministic, resumable, zigzag
//! context-parallel slices) in `loader`.

pub mod indexed;
pub mod loader;
pub mod prepare;
pub mod sft;
