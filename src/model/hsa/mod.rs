//! HSA-UltraLong (Hierarchical Sparse Attention, docs/HSA.md): the `DRTForCausalLM` model
//! variant. `config` parses its config.json; `ops` holds the operations it adds to a decoder
//! (trait `HsaOps` over a Backend, implemented for the CPU backend); `params` names and lays out
//! its tensors; `model` is the whole forward and backward; `encoder` is the chunking layer's
//! front (norm + mean landmark, or the CLS chunk encoder); `infer` decodes with a cache (SWA keys
//! and values, the chunk memory and landmarks appended chunk by chunk).

pub mod config;
pub mod ctx;
pub mod encoder;
pub mod infer;
pub mod model;
pub mod ops;
pub mod params;
