//! Counter-based random numbers: every value is a pure function of (seed, stream, index), so a
//! tensor initialised on one rank equals the same tensor initialised shard by shard on many ranks,
//! and the RNG "state" saved in a checkpoint is just a seed and a counter.

/// SplitMix64's finaliser: a bijective mix of 64 bits (Steele, Lea, Flood 2014).
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stream id from a name (FNV-1a), e.g. a parameter's HF name.
pub fn stream_of(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Uniform in [0, 1) with 53 random bits.
pub fn uniform(seed: u64, stream: u64, index: u64) -> f64 {
    let r = mix64(mix64(seed ^ mix64(stream)).wrapping_add(index));
    (r >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Standard normal by Box–Muller on two uniforms drawn from (seed, stream, 2i) and (.., 2i+1).
pub fn normal(seed: u64, stream: u64, index: u64) -> f64 {
    let u1 = uniform(seed, stream, 2 * index).max(f64::MIN_POSITIVE);
    let u2 = uniform(seed, stream, 2 * index + 1);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_has_unit_moments() {
        let n = 200_000u64;
        let (mut s, mut s2) = (0.0, 0.0);
        for i in 0..n {
            let x = normal(7, stream_of("w"), i);
            s += x;
            s2 += x * x;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn streams_differ() {
        assert_ne!(uniform(1, stream_of("a"), 0), uniform(1, stream_of("b"), 0));
        assert_eq!(uniform(1, 5, 9), uniform(1, 5, 9));
    }
}
