//! Hugging Face directories: safetensors (single file or sharded with an index), tokenizer files.
//!
//! Tensors cross this boundary as f32 on the host ([`HostTensor`]); the file dtype (bf16, f16,
//! f32) is converted on the way in and out. `tensors` holds the safetensors reading and writing,
//! `torch_bin` the reading of PyTorch state-dict files (`pytorch_model.bin`, a restricted
//! unpickler), `files` the plain-file helpers (digests, tokenizer files), `atomic` the outputs that appear
//! whole or not at all (files, plots, dataset and checkpoint directories).

mod atomic;
mod files;
mod tensors;
mod torch_bin;

use std::fmt;
use std::str::FromStr;

use anyhow::bail;

pub use atomic::{AtomicDir, AtomicPath, write_atomic};
pub use files::{TOKENIZER_FILES, copy_tokenizer_files, copy_tokenizer_files_layered, sha256_file};
pub use tensors::{
    INDEX_FILE, MappedTensors, SINGLE_FILE, load_safetensors_dir, load_safetensors_file,
    save_safetensors_dir, save_safetensors_file,
};
pub use torch_bin::{TORCH_INDEX_FILE, TORCH_SINGLE_FILE};

/// The floating-point dtypes a model file may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    pub(crate) fn safetensors_dtype(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
        }
    }
}

impl FromStr for DType {
    type Err = anyhow::Error;

    /// "f32"/"float32", "bf16"/"bfloat16", "f16"/"float16" (any case).
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" => Ok(DType::F16),
            _ => bail!(
                "unknown dtype \"{s}\"; expected f32, bf16 or f16 (or float32, bfloat16, float16)"
            ),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        })
    }
}

/// A dense row-major f32 tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Panics if `data.len()` is not the product of `shape` (a programming error, not bad input).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        let numel: usize = shape.iter().product();
        assert_eq!(
            numel,
            data.len(),
            "HostTensor::new: shape {shape:?} has {numel} elements but data has {}",
            data.len()
        );
        Self { shape, data }
    }

    /// Number of elements (the product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Tensors by Hugging Face parameter name, in name order.
pub type TensorMap = std::collections::BTreeMap<String, HostTensor>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_parses_and_displays() {
        for (s, d) in [
            ("f32", DType::F32),
            ("float32", DType::F32),
            ("bf16", DType::BF16),
            ("bfloat16", DType::BF16),
            ("f16", DType::F16),
            ("float16", DType::F16),
            ("BF16", DType::BF16),
        ] {
            assert_eq!(s.parse::<DType>().unwrap(), d, "{s}");
        }
        for d in [DType::F32, DType::BF16, DType::F16] {
            assert_eq!(d.to_string().parse::<DType>().unwrap(), d);
        }
        let e = "int8".parse::<DType>().unwrap_err().to_string();
        assert!(e.contains("int8") && e.contains("bf16"), "{e}");
    }

    #[test]
    fn host_tensor_numel() {
        assert_eq!(HostTensor::new(vec![2, 3], vec![0.0; 6]).numel(), 6);
        assert_eq!(HostTensor::new(vec![], vec![1.0]).numel(), 1);
        assert_eq!(HostTensor::new(vec![0, 5], vec![]).numel(), 0);
    }

    #[test]
    #[should_panic(expected = "HostTensor::new")]
    fn host_tensor_new_checks_numel() {
        HostTensor::new(vec![2, 2], vec![0.0; 3]);
    }
}
