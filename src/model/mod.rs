//! The Llama-3.x model: HF config, RoPE (all rope types, f64), parameters, layer forward/backward.

pub mod config;
pub mod hf;
pub mod hsa;
pub mod infer;
pub mod llama;
pub mod params;
pub mod rope;
