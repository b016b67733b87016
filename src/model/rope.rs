//! RoPE: inverse frequencies and attention factor for default/linear/llama3/yarn, exact angles.
