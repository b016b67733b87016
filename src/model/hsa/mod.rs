//! HSA-UltraLong (Hierarchical Sparse Attention, ../shared/HSA.md): the `DRTForCausalLM` model
//! variant. `config` parses its config.json; `ops` holds the operations it adds to a decoder
//! (trait `HsaOps` over a Backend, implemented for the CPU backend).

pub mod config;
pub mod ops;
