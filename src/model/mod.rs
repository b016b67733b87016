//! The models: the Llama-3.x decoder (HF config, RoPE of every rope type in f64, parameters, layer
//! forward/backward, inference) and the HSA variant (`hsa`); `arch` tells them apart by config.json.

pub mod arch;
pub mod config;
pub mod hf;
pub mod hsa;
pub mod infer;
pub mod llama;
pub mod params;
pub mod rope;
