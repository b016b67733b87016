//! FLOP accounting, written once: the model FLOPs that MFU is defined on (what `train` reports
//! and `plan` predicts), the attention-kernel FLOPs that the kernel benchmarks report (`bench`,
//! `gpu-check`, bench/gpu/attn_torch.py), and the GPU peaks they are divided by.
//!
//! **Model FLOPs (docs/RECIPE.md §7, and docs/ARCHITECTURE.md).** Per trained token, causal:
//!
//! ```text
//! 6·N + 6·q·S·L        N = matmul parameters, q = heads × head_dim, S = sequence length, L = layers
//! ```
//!
//! `N` counts the weights that multiply activations: per layer q, k, v, o, gate, up and down, and
//! the LM head (the embedding matrix when tied). A weight of a matrix product costs 2 FLOPs per
//! token in the forward and 4 in the backward (input gradient and weight gradient): 6. Not
//! counted: the input embedding, which is a row gather (no arithmetic; it is 6.5% of Llama-3.1-8B's
//! parameters, so counting it would inflate MFU by that much), and the RMSNorm gains (one multiply
//! per element, 3·10⁻⁵ of N). This is Kaplan et al.'s non-embedding N with the un-embedding
//! counted, and docs/RECIPE.md §7's N ≈ 7.5e9 for Llama-3.1-8B.
//!
//! The attention term: per token and layer the forward multiplies the query by the S keys (2·q·S)
//! and the probabilities by the S values (2·q·S); causal masking halves it (2·q·S); the backward
//! is counted as 2× the forward (dQ, dK, dV, dP: two products per forward product), giving
//! 6·q·S. The model count does not include work the implementation chooses to repeat (activation
//! recompute, the backward's recomputation of P): that is hardware FLOPs, and MFU on model FLOPs is
//! comparable across implementations. [`recompute_flops_per_token`] gives what full recompute adds.
//!
//! **Attention-kernel FLOPs** (FlashAttention's benchmark convention, [`attention_kernel_flops`]):
//! forward `4·Sq·Sk·d·H`, halved when causal with Sq = Sk; backward 2.5× the forward, because a
//! flash backward recomputes P = softmax(QKᵀ) (five products: QKᵀ, dV, dP, dQ, dK, against the
//! forward's two). It measures a kernel, so it counts the work the kernel does; it is not the
//! model count and must not be used for MFU.
//!
//! **Peaks.** [`PEAKS`]: dense bf16 tensor-core FLOP/s per GPU model (NVIDIA's datasheets, without
//! sparsity). Any reported TFLOP/s above the peak is a bug.

use crate::model::config::ModelConfig;
use crate::model::hsa::config::HsaConfig;

/// One GPU model's dense bf16 peak.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    /// How `plan --gpu` names it.
    pub key: &'static str,
    /// What the CUDA device name contains (`cudaGetDeviceProperties`), e.g. "NVIDIA H100 80GB HBM3".
    pub device_name: &'static str,
    pub name: &'static str,
    /// Dense bf16 FLOP/s (no 2:4 sparsity).
    pub bf16_dense: f64,
}

/// H100 SXM5: 989.4 TFLOP/s dense bf16 (NVIDIA H100 datasheet; 1,979 is with sparsity).
pub const H100_SXM_BF16_DENSE: f64 = 989e12;

/// The GPUs the project plans for. The H200 is the H100's GH100 die at the same clocks with more
/// and faster HBM: the same tensor peak.
pub const PEAKS: [Peak; 2] = [
    Peak {
        key: "h100-80g",
        device_name: "H100",
        name: "H100 SXM 80GB",
        bf16_dense: H100_SXM_BF16_DENSE,
    },
    Peak {
        key: "h200-141g",
        device_name: "H200",
        name: "H200 SXM 141GB",
        bf16_dense: 989e12,
    },
];

/// The peak of the GPU `plan --gpu` names (`"h100-80g"`, `"h200-141g"`).
pub fn peak_by_key(key: &str) -> Option<&'static Peak> {
    PEAKS.iter().find(|p| p.key == key)
}

/// The peak of a CUDA device by its name (e.g. "NVIDIA H200"), if the table knows it.
pub fn peak_of_device(device_name: &str) -> Option<&'static Peak> {
    PEAKS.iter().find(|p| device_name.contains(p.device_name))
}

/// Matmul parameters of one decoder layer: q, k, v, o, gate, up, down (no norm gains).
pub fn layer_matmul_params(cfg: &ModelConfig) -> u64 {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    (2 * h * q + 2 * h * kv + 3 * h * cfg.intermediate_size) as u64
}

/// The model's `N`: every layer's matmul parameters and the LM head (see the module comment).
pub fn matmul_params(cfg: &ModelConfig) -> u64 {
    cfg.num_hidden_layers as u64 * layer_matmul_params(cfg)
        + (cfg.vocab_size * cfg.hidden_size) as u64
}

/// Model training FLOPs per token, causal, from its parts: `6·n_matmul + 6·attn_width·seq·layers`
/// with `attn_width` = query heads × head_dim. For a model that is not a [`ModelConfig`] (a
/// benchmark's reduced layer, one TP rank's shard: pass its own matmul parameters and heads).
pub fn causal_flops_per_token(n_matmul: f64, attn_width: usize, seq: usize, layers: usize) -> f64 {
    6.0 * n_matmul + 6.0 * attn_width as f64 * seq as f64 * layers as f64
}

/// Model training FLOPs per token of `cfg` at sequence length `seq` (the causal count of this module's comment).
pub fn model_flops_per_token(cfg: &ModelConfig, seq: usize) -> f64 {
    causal_flops_per_token(
        matmul_params(cfg) as f64,
        cfg.num_attention_heads * cfg.head_dim,
        seq,
        cfg.num_hidden_layers,
    )
}

/// Model training FLOPs per token of the HSA model (docs/HSA.md) at sequence length `seq`, by
/// the same convention (6 per matmul weight; attention 2 products × 2 FLOPs forward per visible
/// (query, key) pair and query width, the backward 2× the forward):
///
/// ```text
/// 6·N + 12·q·(Σ_swa k̄_W) + G_u·12·q·K·S + G_u·6·d_r·C̄
/// ```
///
/// `N`: every matmul weight of the layout but the embedding (SWA, chunking, retrieval and HSA
/// projections, the LM head). k̄_W: keys a token sees in a window-W layer, averaged over the
/// sequence (min(t, W) + 1). Each of the `G_u` HSA blocks attends to K = min(chunk_topk, C)
/// chunks of S keys (counted in full: an upper bound near the sequence start), and its retrieval
/// scores the C̄ = visible chunks on average (≈ C/2) landmarks of width d_r, forward and backward.
pub fn hsa_flops_per_token(cfg: &HsaConfig, seq: usize) -> f64 {
    let layout = crate::model::hsa::params::Layout::new(cfg);
    let n: f64 = layout
        .specs
        .iter()
        .enumerate()
        .filter(|(i, s)| *i != layout.embed && s.shape.len() == 2)
        .map(|(_, s)| s.numel() as f64)
        .sum();
    let q = (cfg.base.num_attention_heads * cfg.head_dim()) as f64;
    let keys = |w: usize| -> f64 {
        let t = seq as f64;
        let w = w as f64;
        // Σ_{t<seq} (min(t, W) + 1) / seq.
        if t <= w {
            (t + 1.0) / 2.0
        } else {
            ((w + 1.0) * (w + 2.0) / 2.0 + (t - w - 1.0) * (w + 1.0)) / t
        }
    };
    let groups = cfg.num_upper_groups as f64;
    let mut swa = (cfg.num_lower_layers + cfg.num_upper_layers) as f64 * keys(cfg.sliding_window);
    if !cfg.hsa_only {
        swa += groups * keys(cfg.hsa_sliding_window);
    }
    let chunks = seq / cfg.chunk_size;
    let topk = cfg.chunk_topk.min(chunks) as f64;
    6.0 * n
        + 12.0 * q * swa
        + groups * 12.0 * q * topk * cfg.chunk_size as f64
        + groups * 6.0 * cfg.retrieval_dim as f64 * chunks as f64 / 2.0
}

/// What full activation recompute adds per token (hardware, not model, FLOPs): the forward of
/// layers `0..L-1` again — the last layer's activations are still live when its backward starts,
/// and the LM head is not recomputed. Per layer forward: `2·P_layer + 2·q·S` (causal).
pub fn recompute_flops_per_token(cfg: &ModelConfig, seq: usize) -> f64 {
    let q = (cfg.num_attention_heads * cfg.head_dim) as f64;
    let l = cfg.num_hidden_layers.saturating_sub(1) as f64;
    l * (2.0 * layer_matmul_params(cfg) as f64 + 2.0 * q * seq as f64)
}

/// Model FLOP utilisation: `flops` done in `seconds` on `devices` GPUs of peak `peak` FLOP/s.
pub fn mfu(flops: f64, seconds: f64, devices: usize, peak: f64) -> f64 {
    flops / seconds / devices as f64 / peak
}

/// One attention call's FLOPs by the kernel-benchmark convention.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnFlops {
    pub forward: f64,
    /// 2.5 × forward: the flash backward recomputes P.
    pub backward: f64,
}

impl AttnFlops {
    pub fn forward_backward(&self) -> f64 {
        self.forward + self.backward
    }
}

/// Attention-kernel FLOPs (FlashAttention's benchmark convention, see the module comment):
/// `q_len` queries against `kv_len` keys, `q_heads` query heads of `head_dim`; `causal` halves
/// the forward (a square causal block's visible fraction, as bench/gpu/attn_torch.py counts it).
pub fn attention_kernel_flops(
    q_len: usize,
    kv_len: usize,
    q_heads: usize,
    head_dim: usize,
    causal: bool,
) -> AttnFlops {
    let pairs = q_len as f64 * kv_len as f64;
    attention_kernel_flops_of_pairs(if causal { pairs / 2.0 } else { pairs }, q_heads, head_dim)
}

/// The same convention for a counted number of visible (query, key) pairs: `4·d` per pair and
/// query head forward (Q·Kᵀ and P·V), backward 2.5× (`backend::timed` counts pairs exactly for
/// a shape's causal offsets).
pub fn attention_kernel_flops_of_pairs(pairs: f64, q_heads: usize, head_dim: usize) -> AttnFlops {
    let forward = 4.0 * pairs * (head_dim * q_heads) as f64;
    AttnFlops {
        forward,
        backward: 2.5 * forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_8b() -> ModelConfig {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/configs/llama-3.1-8b-instruct.json"
        );
        ModelConfig::from_file(std::path::Path::new(p)).unwrap()
    }

    #[test]
    fn llama_8b_matmul_params_by_hand() {
        let cfg = llama_8b();
        // hidden 4096, 32 heads × 128, 8 KV heads × 128, FFN 14336, 32 layers, vocab 128256.
        let attn = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096; // q, k, v, o = 41,943,040
        let mlp = 3 * 4096 * 14336; // gate, up, down = 176,160,768
        assert_eq!(attn, 41_943_040);
        assert_eq!(mlp, 176_160_768);
        assert_eq!(layer_matmul_params(&cfg), 218_103_808);
        let head = 128256 * 4096; // 525,336,576
        let n = 32 * 218_103_808u64 + head;
        assert_eq!(n, 7_504_658_432);
        assert_eq!(matmul_params(&cfg), n);
        // All parameters less the embedding gather and the 65 norm gains.
        assert_eq!(
            cfg.n_params() as u64 - 525_336_576 - 65 * 4096,
            matmul_params(&cfg)
        );
        // docs/RECIPE.md §7: N ≈ 7.5e9.
        assert!((n as f64 / 7.5e9 - 1.0).abs() < 0.001);
    }

    #[test]
    fn llama_8b_model_flops_by_hand_and_the_papers_costs() {
        let cfg = llama_8b();
        let n = 7_504_658_432.0_f64;
        for (s, paper) in [
            (1usize << 20, 8.70e11),
            (1 << 21, 1.69e12),
            (1 << 22, 3.34e12),
        ] {
            // 6·N + 6·(32·128)·S·32.
            let hand = 6.0 * n + 6.0 * 4096.0 * s as f64 * 32.0;
            let f = model_flops_per_token(&cfg, s);
            assert_eq!(f, hand, "S {s}");
            assert!((f / paper - 1.0).abs() < 0.01, "S {s}: {f:e} vs {paper:e}");
        }
        // At S = 1M by hand: 45,027,950,592 + 824,633,720,832 = 869,661,671,424.
        assert_eq!(model_flops_per_token(&cfg, 1 << 20), 869_661_671_424.0);
        // docs/RECIPE.md §7: one billion tokens at 4M ≈ 3.3e21 FLOP, ~2,350 H100-hours at 40% MFU.
        let total = 1e9 * model_flops_per_token(&cfg, 1 << 22);
        let hours = total / (H100_SXM_BF16_DENSE * 0.4) / 3600.0;
        assert!((total / 3.3e21 - 1.0).abs() < 0.02, "{total:e}");
        assert!((hours / 2350.0 - 1.0).abs() < 0.02, "{hours}");
    }

    #[test]
    fn recompute_is_the_forward_of_all_but_the_last_layer() {
        let cfg = llama_8b();
        let s = 1usize << 20;
        // 31 layers × (2·218,103,808 + 2·4096·2^20).
        let hand = 31.0 * (2.0 * 218_103_808.0 + 2.0 * 4096.0 * 1_048_576.0);
        assert_eq!(recompute_flops_per_token(&cfg, s), hand);
        for s in [8192, 1 << 20, 1 << 22] {
            let r = recompute_flops_per_token(&cfg, s) / model_flops_per_token(&cfg, s);
            // (L-1)/L of one forward (a third of fwd+bwd), less the LM head's share.
            assert!(r > 0.30 && r < 1.0 / 3.0, "S = {s}: {r}");
        }
    }

    #[test]
    fn attention_kernel_convention_causal_and_not() {
        // Llama-3.1-8B's 32 heads × 128 at S = 8192: 4·8192²·128·32 = 1,099,511,627,776.
        let full = attention_kernel_flops(8192, 8192, 32, 128, false);
        assert_eq!(full.forward, 1_099_511_627_776.0);
        assert_eq!(full.backward, 2_748_779_069_440.0);
        let causal = attention_kernel_flops(8192, 8192, 32, 128, true);
        assert_eq!(causal.forward, 549_755_813_888.0);
        assert_eq!(causal.backward, 1_374_389_534_720.0);
        assert_eq!(causal.forward_backward(), 3.5 * 549_755_813_888.0);
        // The model count's attention term per layer is 6·q·S per token, i.e. 3× the causal
        // forward over S tokens (backward 2×): less than the kernel's 3.5× by the recomputed P.
        let model_attn = 6.0 * 4096.0 * 8192.0 * 8192.0;
        assert_eq!(model_attn, 3.0 * causal.forward);
    }

    /// Counted by hand: N = 3 SWA layers × 1920 + chunking 384 + 2 retrieval × 128 + 2 HSA
    /// blocks × 1664 + LM head 256 = 9984; window-5 keys over 16 tokens (1+…+6 + 10·6)/16 =
    /// 5.0625 per layer; 2 blocks × 2 chunks × 4 keys; 2 × 4 chunks / 2 landmarks of 8.
    #[test]
    fn hsa_count_by_hand() {
        let cfg = HsaConfig::from_json_str(
            r#"{"architectures": ["DRTForCausalLM"], "vocab_size": 16, "hidden_size": 16,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2,
            "intermediate_size": 24, "num_lower_layers": 1, "num_upper_layers": 2,
            "num_upper_groups": 2, "sliding_window": 5, "chunk_size": 4, "chunk_topk": 2,
            "retrieval_dim": 8, "encoder_layers": 0}"#,
            "hand",
        )
        .unwrap();
        let want = 6.0 * 9984.0
            + 12.0 * 16.0 * 3.0 * 5.0625
            + 2.0 * 12.0 * 16.0 * 2.0 * 4.0
            + 2.0 * 6.0 * 8.0 * 2.0;
        assert_eq!(hsa_flops_per_token(&cfg, 16), want);
    }

    #[test]
    fn peaks_and_mfu() {
        assert_eq!(peak_by_key("h100-80g").unwrap().bf16_dense, 989e12);
        assert_eq!(peak_by_key("h200-141g").unwrap().bf16_dense, 989e12);
        assert!(peak_by_key("a100").is_none());
        assert_eq!(peak_of_device("NVIDIA H200").unwrap().key, "h200-141g");
        assert_eq!(
            peak_of_device("NVIDIA H100 80GB HBM3").unwrap().key,
            "h100-80g"
        );
        // 8 GPUs doing 3.956e15 FLOP in 1 s at 989e12 each: 50%.
        assert!((mfu(3.956e15, 1.0, 8, 989e12) - 0.5).abs() < 1e-12);
    }
}
