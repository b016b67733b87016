//! `Real`: the element type of the CPU reference backend. f32 is the working precision; f64 exists
//! for finite-difference gradient checks, where f32 round-off would swamp the comparison.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

pub trait Real:
    num_traits::Float
    + Copy
    + Default
    + Debug
    + Send
    + Sync
    + Sum
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + crate::parallel::comm::Elem
    + 'static
{
    /// The nearest value of this type to `x`.
    fn of(x: f64) -> Self;
    fn as_f64(self) -> f64;
    /// "f32" or "f64", for messages and metadata.
    const NAME: &'static str;
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
    const NAME: &'static str = "f32";
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn as_f64(self) -> f64 {
        self
    }
    const NAME: &'static str = "f64";
}
