//! RoPE: inverse frequencies and attention factor for default/linear/llama3/yarn, exact angles.
//!
//! Two precisions. `Exact` computes every formula in f64 and the angle `p·inv_freq` with an
//! error-free product, reduced mod 2π before cos/sin, so a table entry at position 4M is right to
//! ~1e-15 rad. `Fp32` repeats the float32 arithmetic of HF transformers / Megatron step by step
//! (inv_freq built in f32, one f32 product per angle), which at position 4M is off by up to ~0.1 rad
//! (docs/RECIPE.md §3): the switch exists to match checkpoints trained that way.

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail, ensure};
use rayon::prelude::*;

use super::config::{ModelConfig, RopeScaling};
use crate::util::Real;

/// How angles are computed; see the module comment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePrecision {
    Exact,
    Fp32,
}

impl FromStr for RopePrecision {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exact" => Ok(RopePrecision::Exact),
            "fp32" => Ok(RopePrecision::Fp32),
            _ => bail!(
                "unknown RoPE precision {s:?}: expected \"exact\" (f64 angles reduced mod 2π) or \
                 \"fp32\" (HF/Megatron float32 angles)"
            ),
        }
    }
}

impl fmt::Display for RopePrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RopePrecision::Exact => "exact",
            RopePrecision::Fp32 => "fp32",
        })
    }
}

/// The rotary embedding of one model: frequencies, attention factor, and how angles are rounded.
#[derive(Clone, Debug)]
pub struct Rope {
    pub head_dim: usize,
    /// `head_dim / 2` inverse frequencies from the f64 formulas (in both precisions).
    pub inv_freq: Vec<f64>,
    /// Multiplies cos and sin (YaRN's temperature; 1 for the other types).
    pub attention_factor: f64,
    pub precision: RopePrecision,
    /// The same frequencies as HF computes them in float32; used by `Fp32`.
    inv_freq_fp32: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, precision: RopePrecision) -> Result<Self> {
        let d = cfg.head_dim;
        let theta = cfg.rope_theta;
        ensure!(
            d >= 2 && d.is_multiple_of(2),
            "RoPE needs an even head_dim, got {d}"
        );
        ensure!(
            theta.is_finite() && theta > 1.0,
            "RoPE needs rope_theta > 1, got {theta}"
        );
        let (inv_freq, inv_freq_fp32, attention_factor) = match cfg.rope_scaling {
            RopeScaling::Default => (
                default_inv_freq(d, theta),
                default_inv_freq_fp32(d, theta),
                1.0,
            ),
            RopeScaling::Linear { factor } => {
                ensure!(factor > 0.0, "linear RoPE factor must be > 0, got {factor}");
                let f32_factor = factor as f32;
                (
                    default_inv_freq(d, theta)
                        .into_iter()
                        .map(|x| x / factor)
                        .collect(),
                    // HF: `inv_freq /= factor`, in float32.
                    default_inv_freq_fp32(d, theta)
                        .into_iter()
                        .map(|x| x / f32_factor)
                        .collect(),
                    1.0,
                )
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let p = Llama3Params {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original: original_max_position_embeddings,
                };
                ensure!(
                    factor > 0.0 && high_freq_factor > low_freq_factor && p.original > 0.0,
                    "invalid llama3 RoPE parameters: {:?}",
                    cfg.rope_scaling
                );
                (
                    llama3_inv_freq(d, theta, &p),
                    llama3_inv_freq_fp32(d, theta, &p),
                    1.0,
                )
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                ensure!(
                    factor > 0.0
                        && original_max_position_embeddings > 0.0
                        && beta_fast > 0.0
                        && beta_slow > 0.0,
                    "invalid yarn RoPE parameters: {:?}",
                    cfg.rope_scaling
                );
                let (low, high) = yarn_find_correction_range(
                    beta_fast,
                    beta_slow,
                    d,
                    theta,
                    original_max_position_embeddings,
                    truncate,
                );
                (
                    yarn_inv_freq(d, theta, factor, low, high),
                    yarn_inv_freq_fp32(d, theta, factor, low, high),
                    yarn_attention_factor(factor, mscale, mscale_all_dim, attention_factor),
                )
            }
        };
        Ok(Rope {
            head_dim: d,
            inv_freq,
            attention_factor,
            precision,
            inv_freq_fp32,
        })
    }

    /// The inverse frequencies as HF computes them in float32 (what `Fp32` multiplies by).
    pub fn inv_freq_fp32(&self) -> &[f32] {
        &self.inv_freq_fp32
    }

    /// The angle `pos · inv_freq[i]` (radians, not reduced mod 2π) as this precision computes it:
    /// `Exact`: the f64 nearest the exact product of `pos` and the f64 `inv_freq[i]` (error
    /// ≤ half an ulp, ~2e-10 rad at 4M); `Fp32`: HF's `float32(pos) * inv_freq_fp32[i]` in f32.
    pub fn angle(&self, pos: u64, i: usize) -> f64 {
        match self.precision {
            RopePrecision::Exact => exact_product(pos, self.inv_freq[i]).0,
            RopePrecision::Fp32 => fp32_angle(pos, self.inv_freq_fp32[i]) as f64,
        }
    }

    /// cos/sin tables for `positions`, each `[positions.len(), head_dim/2]` row-major, already
    /// multiplied by `attention_factor`, in working precision `T`.
    pub fn cos_sin<T: Real>(&self, positions: &[u64]) -> (Vec<T>, Vec<T>) {
        let half = self.head_dim / 2;
        let mut cos = vec![T::zero(); positions.len() * half];
        let mut sin = vec![T::zero(); positions.len() * half];
        cos.par_chunks_mut(half)
            .zip(sin.par_chunks_mut(half))
            .zip(positions.par_iter())
            .with_min_len(64)
            .for_each(|((c, s), &pos)| self.fill_row(pos, c, s));
        (cos, sin)
    }

    fn fill_row<T: Real>(&self, pos: u64, cos: &mut [T], sin: &mut [T]) {
        match self.precision {
            RopePrecision::Exact => {
                for (i, &inv) in self.inv_freq.iter().enumerate() {
                    let (s, c) = reduce_mod_2pi(exact_product(pos, inv)).sin_cos();
                    cos[i] = T::of(c * self.attention_factor);
                    sin[i] = T::of(s * self.attention_factor);
                }
            }
            RopePrecision::Fp32 => {
                // HF: `emb.cos() * attention_scaling`, both factors float32.
                let factor = self.attention_factor as f32;
                for (i, &inv) in self.inv_freq_fp32.iter().enumerate() {
                    let (s, c) = (fp32_angle(pos, inv) as f64).sin_cos();
                    cos[i] = T::of(((c as f32) * factor) as f64);
                    sin[i] = T::of(((s as f32) * factor) as f64);
                }
            }
        }
    }
}

/// HF's `position_ids.float()` times the float32 inverse frequency: one f32 rounding of the product.
fn fp32_angle(pos: u64, inv: f32) -> f32 {
    (pos as f32) * inv
}

/// `pos · inv` as an unevaluated sum `hi + lo` equal to the exact product (pos < 2^53).
fn exact_product(pos: u64, inv: f64) -> (f64, f64) {
    let p = pos as f64;
    let hi = p * inv;
    (hi, p.mul_add(inv, -hi))
}

/// `hi + lo` reduced to about [-π, π] with 2π split in two parts (Cody–Waite), so the ~1e6
/// multiples of 2π removed at position 4M add no more than ~1e-15 rad of error.
fn reduce_mod_2pi((hi, lo): (f64, f64)) -> f64 {
    // 2π = TWO_PI_HI + TWO_PI_LO to ~1e-32.
    const TWO_PI_HI: f64 = 2.0 * PI;
    const TWO_PI_LO: f64 = 2.449_293_598_294_706_4e-16;
    let k = (hi / TWO_PI_HI).round();
    (-k).mul_add(TWO_PI_HI, hi) - k * TWO_PI_LO + lo
}

/// `theta^(-2i/d)` for i in 0..d/2.
fn default_inv_freq(d: usize, theta: f64) -> Vec<f64> {
    (0..d / 2)
        .map(|i| theta.powf(-((2 * i) as f64) / d as f64))
        .collect()
}

/// HF: `base ** (arange(0, d, 2).float() / d)` in float32; every op below rounds to f32 as torch does.
fn fp32_pos_freqs(d: usize, theta: f64) -> Vec<f32> {
    let base = theta as f32;
    (0..d / 2)
        .map(|i| base.powf((2 * i) as f32 / d as f32))
        .collect()
}

/// HF: `1.0 / pos_freqs` (torch evaluates `scalar / tensor` as `reciprocal() * scalar`).
fn default_inv_freq_fp32(d: usize, theta: f64) -> Vec<f32> {
    fp32_pos_freqs(d, theta)
        .into_iter()
        .map(|x| 1.0 / x)
        .collect()
}

struct Llama3Params {
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original: f64,
}

/// Llama 3.1's frequency-dependent scaling (HF `_compute_llama3_parameters`): wavelengths shorter
/// than original/high_freq_factor are kept, longer than original/low_freq_factor divided by
/// `factor`, and the band between blends the two linearly in `original / wavelen`.
fn llama3_inv_freq(d: usize, theta: f64, p: &Llama3Params) -> Vec<f64> {
    let low_wavelen = p.original / p.low_freq_factor;
    let high_wavelen = p.original / p.high_freq_factor;
    default_inv_freq(d, theta)
        .into_iter()
        .map(|inv| {
            let wavelen = 2.0 * PI / inv;
            if wavelen > low_wavelen {
                inv / p.factor
            } else if wavelen < high_wavelen {
                inv
            } else {
                let smooth = (p.original / wavelen - p.low_freq_factor)
                    / (p.high_freq_factor - p.low_freq_factor);
                (1.0 - smooth) * inv / p.factor + smooth * inv
            }
        })
        .collect()
}

/// `llama3_inv_freq` in HF's float32 order of operations. Python scalars meet f32 tensors as f32;
/// `tensor / scalar` is a true division (torch on CPU; CUDA multiplies by the reciprocal instead).
fn llama3_inv_freq_fp32(d: usize, theta: f64, p: &Llama3Params) -> Vec<f32> {
    let factor = p.factor as f32;
    let low_freq_factor = p.low_freq_factor as f32;
    let original = p.original as f32;
    let low_wavelen = (p.original / p.low_freq_factor) as f32;
    let high_wavelen = (p.original / p.high_freq_factor) as f32;
    let band = (p.high_freq_factor - p.low_freq_factor) as f32;
    let two_pi = (2.0 * PI) as f32;
    default_inv_freq_fp32(d, theta)
        .into_iter()
        .map(|inv| {
            let wavelen = (1.0 / inv) * two_pi;
            let inv_llama = if wavelen > low_wavelen {
                inv / factor
            } else {
                inv
            };
            let smooth = ((1.0 / wavelen) * original - low_freq_factor) / band;
            let smoothed = (1.0 - smooth) * inv_llama / factor + smooth * inv_llama;
            // HF: `~(wavelen < high) * ~(wavelen > low)`; the same for the finite wavelengths here.
            let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
            if medium { smoothed } else { inv_llama }
        })
        .collect()
}

/// YaRN's dimension range `(low, high)` of the ramp between interpolation and extrapolation:
/// `corr(n) = d·ln(L / (2πn)) / (2 ln θ)`, `low = corr(beta_fast)`, `high = corr(beta_slow)`,
/// floored/ceiled when `truncate`, then clamped to `[0, d-1]` (HF clamps to d-1, not d/2-1).
pub fn yarn_find_correction_range(
    beta_fast: f64,
    beta_slow: f64,
    dim: usize,
    base: f64,
    original_max: f64,
    truncate: bool,
) -> (f64, f64) {
    let corr = |rotations: f64| {
        dim as f64 * (original_max / (rotations * 2.0 * PI)).ln() / (2.0 * base.ln())
    };
    let (mut low, mut high) = (corr(beta_fast), corr(beta_slow));
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    (low.max(0.0), high.min((dim - 1) as f64))
}

/// YaRN's attention temperature: `0.1·m·ln(s) + 1` for s > 1, else 1.
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// HF's choice: an explicit `attention_factor`; else the DeepSeek ratio when both mscales are set
/// (and nonzero, Python truthiness); else `get_mscale(factor, 1)`.
fn yarn_attention_factor(
    factor: f64,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    attention_factor: Option<f64>,
) -> f64 {
    if let Some(a) = attention_factor {
        return a;
    }
    match (mscale, mscale_all_dim) {
        (Some(m), Some(m_all)) if m != 0.0 && m_all != 0.0 => {
            yarn_get_mscale(factor, m) / yarn_get_mscale(factor, m_all)
        }
        _ => yarn_get_mscale(factor, 1.0),
    }
}

/// `high` as YaRN's ramp uses it: equal bounds get 0.001 added against the division by zero.
fn yarn_ramp_high(low: f64, high: f64) -> f64 {
    if low == high { high + 0.001 } else { high }
}

/// YaRN frequencies: `inv_inter·ramp + inv_extra·(1 - ramp)` with `inv_extra = θ^(-2i/d)`,
/// `inv_inter = inv_extra / s`, `ramp = clamp((i - low) / (high - low), 0, 1)`.
fn yarn_inv_freq(d: usize, theta: f64, factor: f64, low: f64, high: f64) -> Vec<f64> {
    let high = yarn_ramp_high(low, high);
    default_inv_freq(d, theta)
        .into_iter()
        .enumerate()
        .map(|(i, extra)| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            extra / factor * ramp + extra * (1.0 - ramp)
        })
        .collect()
}

/// `yarn_inv_freq` in HF's float32 order: `inv_inter = 1 / (factor * pos_freqs)`,
/// `extrap = 1 - ramp`, `inv = inv_inter * (1 - extrap) + inv_extra * extrap`.
fn yarn_inv_freq_fp32(d: usize, theta: f64, factor: f64, low: f64, high: f64) -> Vec<f32> {
    let high = yarn_ramp_high(low, high);
    let (low32, span32, factor32) = (low as f32, (high - low) as f32, factor as f32);
    fp32_pos_freqs(d, theta)
        .into_iter()
        .enumerate()
        .map(|(i, pos_freq)| {
            let extra = 1.0 / pos_freq;
            let inter = 1.0 / (factor32 * pos_freq);
            let ramp = ((i as f32 - low32) / span32).clamp(0.0, 1.0);
            let extrap = 1.0 - ramp;
            inter * (1.0 - extrap) + extra * extrap
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const THETA: f64 = 500000.0;
    const D: usize = 128;
    const L: f64 = 8192.0;
    /// The last position of a 4M-token sequence.
    const P_4M: u64 = 4_194_303;

    /// A Llama-3.1-8B-shaped config with the given rope scaling.
    fn config(rope: RopeScaling) -> ModelConfig {
        ModelConfig {
            vocab_size: 128256,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: D,
            rms_norm_eps: 1e-5,
            rope_theta: THETA,
            max_position_embeddings: 131072,
            tie_word_embeddings: false,
            bos_token_id: Some(128000),
            eos_token_id: Some(vec![128001]),
            rope_scaling: rope,
            raw: Value::Null,
        }
    }

    fn yarn(factor: f64, beta_fast: f64, truncate: bool) -> RopeScaling {
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: L,
            beta_fast,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate,
        }
    }

    fn llama3() -> RopeScaling {
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: L,
        }
    }

    /// `θ^(-2i/d)`, written independently of the code under test.
    fn extra(i: usize) -> f64 {
        1.0 / THETA.powf(2.0 * i as f64 / D as f64)
    }

    fn rel_err(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs()
    }

    #[test]
    fn yarn_correction_range_matches_paper_values() {
        let corr = |n: f64| D as f64 * (L / (n * 2.0 * PI)).ln() / (2.0 * THETA.ln());
        assert_eq!(
            yarn_find_correction_range(4.0, 1.0, D, THETA, L, true),
            (28.0, 35.0)
        );
        let (low, high) = yarn_find_correction_range(4.0, 1.0, D, THETA, L, false);
        eprintln!("untruncated yarn range (beta 4/1): ({low:.6}, {high:.6})");
        assert!((low - 28.223).abs() < 1e-3 && (high - 34.984).abs() < 1e-3);
        assert!((low - corr(4.0)).abs() < 1e-12 && (high - corr(1.0)).abs() < 1e-12);
        assert_eq!(
            yarn_find_correction_range(32.0, 1.0, D, THETA, L, true),
            (18.0, 35.0)
        );
        // Clamped to [0, d-1]: tiny rotation counts push `high` past d-1.
        assert_eq!(
            yarn_find_correction_range(1e6, 1e-9, D, THETA, L, true),
            (0.0, 127.0)
        );
    }

    #[test]
    fn yarn_attention_factor_for_paper_scales() {
        for (s, paper) in [(128.0, 1.4852), (256.0, 1.5545), (512.0, 1.6238)] {
            let rope = Rope::new(&config(yarn(s, 4.0, true)), RopePrecision::Exact).unwrap();
            let expected = 0.1 * f64::ln(s) + 1.0;
            eprintln!("s = {s}: attention factor {:.6}", rope.attention_factor);
            assert!((rope.attention_factor - expected).abs() < 1e-12);
            assert!((rope.attention_factor - paper).abs() < 1e-4);
        }
        assert_eq!(yarn_get_mscale(1.0, 5.0), 1.0);
        assert_eq!(yarn_get_mscale(0.5, 5.0), 1.0);
        assert!((yarn_get_mscale(4.0, 0.5) - (0.05 * 4f64.ln() + 1.0)).abs() < 1e-15);
    }

    #[test]
    fn yarn_inv_freq_matches_formula_element_by_element() {
        let s = 128.0;
        let rope = Rope::new(&config(yarn(s, 4.0, true)), RopePrecision::Exact).unwrap();
        assert_eq!(rope.inv_freq.len(), D / 2);
        let (low, high) = (28.0, 35.0);
        for (i, &got) in rope.inv_freq.iter().enumerate() {
            let e = extra(i);
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let want = (e / s) * ramp + e * (1.0 - ramp);
            assert!(rel_err(got, want) < 1e-13, "i={i}: {got} vs {want}");
            if i <= 28 {
                assert!(rel_err(got, e) < 1e-13, "i={i} should extrapolate");
            }
            if i >= 35 {
                assert!(rel_err(got, e / s) < 1e-13, "i={i} should interpolate");
            }
        }
        // Strictly inside the ramp, a blend of the two.
        let i = 31;
        assert!(rope.inv_freq[i] < extra(i) && rope.inv_freq[i] > extra(i) / s);
    }

    #[test]
    fn yarn_equal_bounds_add_a_thousandth() {
        let s = 64.0;
        // Untruncated, equal betas give low == high == 28.22..; the ramp becomes a step at 28.22.
        let cfg = config(RopeScaling::Yarn {
            factor: s,
            original_max_position_embeddings: L,
            beta_fast: 4.0,
            beta_slow: 4.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate: false,
        });
        let rope = Rope::new(&cfg, RopePrecision::Exact).unwrap();
        assert!(rel_err(rope.inv_freq[28], extra(28)) < 1e-13);
        assert!(rel_err(rope.inv_freq[29], extra(29) / s) < 1e-13);
        // Truncated, both corrections below zero: low = max(floor(-2.1), 0) = 0 and
        // high = ceil(-0.35) = 0, so high becomes 0.001 and only i = 0 extrapolates.
        let (low, high) = yarn_find_correction_range(2000.0, 1400.0, D, THETA, L, true);
        assert_eq!((low, high), (0.0, 0.0));
        let cfg = config(RopeScaling::Yarn {
            factor: s,
            original_max_position_embeddings: L,
            beta_fast: 2000.0,
            beta_slow: 1400.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate: true,
        });
        let rope = Rope::new(&cfg, RopePrecision::Exact).unwrap();
        assert_eq!(rope.inv_freq[0], 1.0);
        for i in 1..D / 2 {
            assert!(rel_err(rope.inv_freq[i], extra(i) / s) < 1e-13, "i={i}");
        }
        assert!(rope.inv_freq.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn yarn_attention_factor_from_mscale_ratio_and_override() {
        let s = 40.0;
        let with = |mscale, mscale_all_dim, attention_factor| {
            let cfg = config(RopeScaling::Yarn {
                factor: s,
                original_max_position_embeddings: 4096.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate: true,
            });
            Rope::new(&cfg, RopePrecision::Exact)
                .unwrap()
                .attention_factor
        };
        let ratio = (0.1 * 1.0 * s.ln() + 1.0) / (0.1 * 0.707 * s.ln() + 1.0);
        assert!((with(Some(1.0), Some(0.707), None) - ratio).abs() < 1e-15);
        // Equal mscales cancel (DeepSeek-V3's setting).
        assert_eq!(with(Some(1.0), Some(1.0), None), 1.0);
        // One of them missing or zero: back to 0.1 ln s + 1.
        let plain = 0.1 * s.ln() + 1.0;
        assert!((with(Some(1.0), None, None) - plain).abs() < 1e-15);
        assert!((with(Some(0.0), Some(0.707), None) - plain).abs() < 1e-15);
        // An explicit attention_factor wins over everything.
        assert_eq!(with(Some(1.0), Some(0.707), Some(1.234)), 1.234);
        let cfg = config(RopeScaling::Yarn {
            factor: s,
            original_max_position_embeddings: 4096.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: Some(1.234),
            truncate: true,
        });
        let (cos, sin) = Rope::new(&cfg, RopePrecision::Exact)
            .unwrap()
            .cos_sin::<f64>(&[0]);
        assert!(cos.iter().all(|&c| c == 1.234) && sin.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn llama3_inv_freq_matches_independent_computation() {
        let rope = Rope::new(&config(llama3()), RopePrecision::Exact).unwrap();
        let (mut kept, mut scaled, mut blended) = (0, 0, 0);
        for (i, &got) in rope.inv_freq.iter().enumerate() {
            let base = extra(i);
            let wavelen = 2.0 * PI / base;
            let want = if wavelen < L / 4.0 {
                kept += 1;
                base
            } else if wavelen > L / 1.0 {
                scaled += 1;
                base / 8.0
            } else {
                blended += 1;
                let smooth = (L / wavelen - 1.0) / (4.0 - 1.0);
                (1.0 - smooth) * base / 8.0 + smooth * base
            };
            assert!(rel_err(got, want) < 1e-13, "i={i}: {got} vs {want}");
        }
        assert!(
            kept > 0 && scaled > 0 && blended > 0,
            "{kept} {scaled} {blended}"
        );
        assert_eq!(rope.attention_factor, 1.0);
    }

    #[test]
    fn default_and_linear_inv_freq() {
        let rope = Rope::new(&config(RopeScaling::Default), RopePrecision::Exact).unwrap();
        let lin = Rope::new(
            &config(RopeScaling::Linear { factor: 4.0 }),
            RopePrecision::Exact,
        )
        .unwrap();
        for i in 0..D / 2 {
            assert!(rel_err(rope.inv_freq[i], extra(i)) < 1e-14);
            assert!(rel_err(lin.inv_freq[i], extra(i) / 4.0) < 1e-14);
        }
        assert_eq!((rope.attention_factor, lin.attention_factor), (1.0, 1.0));
    }

    #[test]
    fn fp32_inv_freq_is_the_same_formula_in_float32() {
        for rope_scaling in [
            RopeScaling::Default,
            RopeScaling::Linear { factor: 4.0 },
            llama3(),
            yarn(128.0, 4.0, true),
            yarn(512.0, 32.0, false),
        ] {
            let rope = Rope::new(&config(rope_scaling.clone()), RopePrecision::Fp32).unwrap();
            for (i, (&a, &b)) in rope.inv_freq_fp32().iter().zip(&rope.inv_freq).enumerate() {
                // A few float32 roundings, each at most 2^-24 relative.
                assert!(
                    rel_err(a as f64, b) < 4e-7,
                    "{rope_scaling:?} i={i}: {a} vs {b}"
                );
            }
        }
        // HF's two float32 roundings: θ^(1/2) rounded, then its reciprocal rounded; not f32(θ^(-1/2)).
        let rope = Rope::new(&config(RopeScaling::Default), RopePrecision::Fp32).unwrap();
        assert_eq!(rope.inv_freq_fp32()[0], 1.0);
        assert_eq!(rope.inv_freq_fp32()[D / 4], 1.0 / (THETA as f32).sqrt());
        assert_ne!(rope.inv_freq_fp32()[D / 4], (1.0 / THETA.sqrt()) as f32);
    }

    /// `angle - pos·inv` exactly, from integers: `inv = m·2^e` and `angle = M·2^E` are dyadic, so the
    /// exact product `pos·m` and `M` shifted to the common exponent fit an i128.
    fn angle_error_exact(pos: u64, inv: f64, angle: f64) -> f64 {
        fn decompose(x: f64) -> (i128, i32) {
            assert!(x > 0.0 && x.is_normal());
            let bits = x.to_bits();
            let exp = ((bits >> 52) & 0x7ff) as i32 - 1075;
            ((bits & ((1 << 52) - 1) | (1 << 52)) as i128, exp)
        }
        let (m, e) = decompose(inv);
        let (big_m, big_e) = decompose(angle);
        assert!(big_e >= e && big_e - e < 60);
        let diff = (big_m << (big_e - e)) - pos as i128 * m;
        diff as f64 * 2f64.powi(e)
    }

    #[test]
    fn exact_angle_at_4m_within_1e6_rad_and_fp32_is_not() {
        for rope_scaling in [RopeScaling::Default, llama3(), yarn(512.0, 4.0, true)] {
            let exact = Rope::new(&config(rope_scaling.clone()), RopePrecision::Exact).unwrap();
            let fp32 = Rope::new(&config(rope_scaling.clone()), RopePrecision::Fp32).unwrap();
            let (mut worst_exact, mut worst_fp32) = (0f64, 0f64);
            for i in 0..D / 2 {
                let a = exact.angle(P_4M, i);
                let err = angle_error_exact(P_4M, exact.inv_freq[i], a).abs();
                assert!(err < 1e-6, "i={i}: exact angle off by {err}");
                worst_exact = worst_exact.max(err);
                worst_fp32 = worst_fp32.max((fp32.angle(P_4M, i) - a).abs());
            }
            eprintln!(
                "{}: angle error at p = {P_4M}: exact {worst_exact:.3e} rad, fp32 {worst_fp32:.4} rad",
                rope_scaling.rope_type()
            );
            assert!(worst_exact < 1e-9);
            assert!(worst_fp32 > 0.01, "fp32 error {worst_fp32}");
            assert!(worst_fp32 < 1.0, "fp32 error {worst_fp32}");
        }
    }

    #[test]
    fn exact_cos_sin_at_4m_match_libm_reference() {
        let rope = Rope::new(&config(yarn(512.0, 4.0, true)), RopePrecision::Exact).unwrap();
        let positions = [P_4M, 1_000_003, 8191, 1];
        let (cos, sin) = rope.cos_sin::<f64>(&positions);
        let half = D / 2;
        let mut worst = 0f64;
        for (r, &pos) in positions.iter().enumerate() {
            for i in 0..half {
                // libm reduces large arguments exactly; the product's low part enters to first order.
                let p = pos as f64;
                let hi = p * rope.inv_freq[i];
                let lo = p.mul_add(rope.inv_freq[i], -hi);
                let want_cos = (hi.cos() - hi.sin() * lo) * rope.attention_factor;
                let want_sin = (hi.sin() + hi.cos() * lo) * rope.attention_factor;
                worst = worst
                    .max((cos[r * half + i] - want_cos).abs())
                    .max((sin[r * half + i] - want_sin).abs());
            }
        }
        eprintln!("exact cos/sin vs libm reference: max abs diff {worst:.3e}");
        assert!(worst < 1e-13);
    }

    #[test]
    fn fp32_cos_sin_use_the_float32_angle() {
        let rope = Rope::new(&config(yarn(512.0, 4.0, true)), RopePrecision::Fp32).unwrap();
        let (cos, sin) = rope.cos_sin::<f32>(&[P_4M]);
        let factor = rope.attention_factor as f32;
        for i in 0..D / 2 {
            let angle = (P_4M as f32 * rope.inv_freq_fp32()[i]) as f64;
            assert_eq!(cos[i], (angle.cos() as f32) * factor, "i={i}");
            assert_eq!(sin[i], (angle.sin() as f32) * factor, "i={i}");
        }
    }

    #[test]
    fn cos_sin_at_position_zero_is_attention_factor() {
        for precision in [RopePrecision::Exact, RopePrecision::Fp32] {
            let rope = Rope::new(&config(yarn(128.0, 4.0, true)), precision).unwrap();
            let (cos, sin) = rope.cos_sin::<f32>(&[0, 0]);
            assert_eq!(cos.len(), 2 * D / 2);
            assert!(
                cos.iter().all(|&c| c == rope.attention_factor as f32),
                "{precision}"
            );
            assert!(sin.iter().all(|&s| s == 0.0), "{precision}");
            assert!((rope.attention_factor - 1.4852).abs() < 1e-4);
        }
    }

    #[test]
    fn cos_sin_rows_follow_positions() {
        let rope = Rope::new(&config(llama3()), RopePrecision::Exact).unwrap();
        let positions: Vec<u64> = (0..300).map(|k| k * 7919).collect();
        let (cos, sin) = rope.cos_sin::<f64>(&positions);
        let half = D / 2;
        for (r, &pos) in positions.iter().enumerate() {
            for i in [0, 17, half - 1] {
                let a = pos as f64 * rope.inv_freq[i];
                assert!((cos[r * half + i] - a.cos()).abs() < 1e-9);
                assert!((sin[r * half + i] - a.sin()).abs() < 1e-9);
            }
        }
        assert_eq!(rope.cos_sin::<f32>(&[]).0.len(), 0);
    }

    #[test]
    fn precision_parses_from_str() {
        assert_eq!(
            "exact".parse::<RopePrecision>().unwrap(),
            RopePrecision::Exact
        );
        assert_eq!(
            "fp32".parse::<RopePrecision>().unwrap(),
            RopePrecision::Fp32
        );
        let msg = "bf16".parse::<RopePrecision>().unwrap_err().to_string();
        assert!(
            msg.contains("bf16") && msg.contains("exact") && msg.contains("fp32"),
            "{msg}"
        );
        assert_eq!(
            RopePrecision::Fp32
                .to_string()
                .parse::<RopePrecision>()
                .unwrap(),
            RopePrecision::Fp32
        );
    }

    #[test]
    fn new_rejects_odd_head_dim_and_bad_theta() {
        let mut cfg = config(RopeScaling::Default);
        cfg.head_dim = 127;
        assert!(
            Rope::new(&cfg, RopePrecision::Exact)
                .unwrap_err()
                .to_string()
                .contains("127")
        );
        let mut cfg = config(RopeScaling::Default);
        cfg.rope_theta = 1.0;
        assert!(Rope::new(&cfg, RopePrecision::Exact).is_err());
    }
}
