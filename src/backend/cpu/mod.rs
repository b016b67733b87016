//! The CPU reference backend: every kernel written plainly, generic over f32/f64, GEMMs through the
//! `gemm` crate, threads through rayon. It is the numerics oracle of the project.

pub mod attention;
