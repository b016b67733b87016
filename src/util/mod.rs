//! Small shared pieces: the scalar trait the CPU kernels are generic over, a counter-based RNG,
//! finite-difference gradient checking.

pub mod elem;
pub mod gradcheck;
pub mod real;
pub mod rng;

pub use real::Real;
