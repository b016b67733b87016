//! HSA-UltraLong (Hierarchical Sparse Attention, ../shared/HSA.md): the `DRTForCausalLM` model
//! variant. `config` parses its config.json.

pub mod config;
