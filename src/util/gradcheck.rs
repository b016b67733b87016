//! Finite-difference gradient checking in f64, used by the tests of every kernel and of the whole
//! model: central differences `(f(x+h) − f(x−h)) / 2h` against an analytic gradient.

/// Numerical gradient of `f` at `x` by central differences with step `h`.
pub fn numeric_grad(f: &mut dyn FnMut(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + h;
            let fp = f(&xp);
            xp[i] = x[i] - h;
            let fm = f(&xp);
            xp[i] = x[i];
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// Relative error of `analytic` against `numeric`: max |a − n| / max |n| (the scale of the whole
/// gradient, so tiny entries do not blow the ratio up).
pub fn rel_err(analytic: &[f64], numeric: &[f64]) -> f64 {
    assert_eq!(analytic.len(), numeric.len());
    let scale = numeric
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-300);
    analytic
        .iter()
        .zip(numeric)
        .fold(0.0f64, |m, (a, n)| m.max((a - n).abs()))
        / scale
}

/// Deterministic pseudo-random values in [-1, 1) for tests.
pub fn test_values(n: usize, seed: u64) -> Vec<f64> {
    (0..n as u64)
        .map(|i| 2.0 * crate::util::rng::uniform(seed, 0xface, i) - 1.0)
        .collect()
}
