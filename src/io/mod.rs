//! Hugging Face directories: safetensors (single file or sharded with an index), tokenizer files.
