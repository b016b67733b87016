//! Learning-rate schedule: linear warm-up, then constant, cosine or linear decay to a floor.
//! The paper publishes only the peak LR (3e-5 CPT, 5e-6 SFT); the shape is the user's choice.

use crate::train::config::OptimSection;

/// LR of optimizer step `step` (1-based) of `total`.
pub fn learning_rate(o: &OptimSection, step: u64, total: u64) -> f64 {
    let step = step.max(1);
    if o.warmup_steps > 0 && step <= o.warmup_steps {
        return o.lr * step as f64 / o.warmup_steps as f64;
    }
    let min = o.lr * o.min_lr_ratio;
    let span = total.saturating_sub(o.warmup_steps).max(1) as f64;
    let progress = ((step - o.warmup_steps) as f64 / span).clamp(0.0, 1.0);
    match o.schedule.as_str() {
        "cosine" => min + (o.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        "linear" => o.lr - (o.lr - min) * progress,
        _ => o.lr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_shapes() {
        let mut o = OptimSection {
            lr: 1.0,
            warmup_steps: 4,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert_eq!(learning_rate(&o, 1, 14), 0.25);
        assert_eq!(learning_rate(&o, 4, 14), 1.0);
        assert_eq!(learning_rate(&o, 10, 14), 1.0);
        o.schedule = "cosine".into();
        assert!(
            (learning_rate(&o, 9, 14) - (0.1 + 0.9 * 0.5)).abs() < 1e-12,
            "half way down"
        );
        assert!((learning_rate(&o, 14, 14) - 0.1).abs() < 1e-12);
        o.schedule = "linear".into();
        assert!((learning_rate(&o, 9, 14) - 0.55).abs() < 1e-12);
    }
}
