//! Hugging Face `config.json` of the Llama 3.x family.
