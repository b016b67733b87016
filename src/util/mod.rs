//! Small shared pieces: the scalar trait the CPU kernels are generic over, a counter-based RNG.

pub mod real;
pub mod rng;

pub use real::Real;
