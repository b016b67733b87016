//! Blockwise causal GQA attention with an online softmax, forward and backward (CPU reference).
