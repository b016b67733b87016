//! Token data: Megatron indexed datasets (`indexed`), `prepare cpt` (tokenize, resample by length
//! per domain, join with the `<s>` separator, pack) in `prepare`, `prepare sft` (loss masks,
//! packing) in `sft`, the Llama-3.1 chat template in `chat`, and the training loader
//! (deterministic, resumable, zigzag context-parallel slices) in `loader`; the synthetic recall
//! task of the toy HSA comparison (`prepare recall`) in `recall`.

pub mod chat;
pub mod indexed;
pub mod loader;
pub mod prepare;
pub mod recall;
pub mod sft;
