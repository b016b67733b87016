//! Which backend a command runs on, chosen in one place: `--backend cpu|cuda` (or the run
//! config's `train.backend`) and the CPU backend's working precision `f32|f64`. The model code is
//! generic over `Backend`, so `on_backend!` compiles the command's body once per backend and runs
//! the chosen one. A binary built without the `cuda` feature keeps the `cuda` choice and fails
//! with that reason (candle's dummy-backend idea); one built without kernels or run without a
//! driver fails in `CudaBackend::for_local_rank` with that reason.

use anyhow::{Result, bail};

/// A backend and its numerics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// The CPU reference in f32.
    CpuF32,
    /// The CPU reference in f64 (parity checks).
    CpuF64,
    /// One GPU per rank: bf16 GEMMs, fp32 storage and accumulation.
    Cuda,
}

impl BackendKind {
    /// From a backend name and a CPU precision; each is given with the key it came from (a flag or
    /// a config key), which the error names.
    pub fn parse((bkey, backend): (&str, &str), (pkey, precision): (&str, &str)) -> Result<Self> {
        Ok(match (backend, precision) {
            ("cpu", "f32") => BackendKind::CpuF32,
            ("cpu", "f64") => BackendKind::CpuF64,
            ("cuda", "f32") => BackendKind::Cuda,
            ("cuda", "f64") => bail!(
                "{pkey} f64 is the CPU backend's; the CUDA backend computes in f32 (bf16 GEMMs)"
            ),
            ("cpu" | "cuda", p) => bail!("{pkey} {p:?}: expected f32 or f64"),
            (b, _) => bail!("{bkey} {b:?}: expected cpu or cuda"),
        })
    }
}

/// The CUDA backend of this rank's GPU (the node-local rank picks the device).
#[cfg(feature = "cuda")]
pub fn cuda_backend() -> Result<super::cuda::CudaBackend> {
    super::cuda::CudaBackend::for_local_rank()
}

/// The stand-in for the CUDA backend in a build without the `cuda` feature: the reason.
#[cfg(not(feature = "cuda"))]
pub fn cuda_backend_missing() -> anyhow::Error {
    anyhow::anyhow!(
        "backend cuda: this binary was built without the `cuda` feature (build with the default \
         features, or `--features cuda`), so only --backend cpu is available"
    )
}

/// Evaluate `$body` (a `Result`) with `$b` bound to the backend `$kind` chose: a
/// `&CpuBackend<f32>`, `&CpuBackend<f64>` or `&CudaBackend`.
///
/// ```ignore
/// on_backend!(kind, |b| run_world(|w| run_ranks(b, w, &args)))
/// ```
#[macro_export]
macro_rules! on_backend {
    ($kind:expr, |$b:ident| $body:expr) => {
        match $kind {
            $crate::backend::select::BackendKind::CpuF32 => {
                let $b = &$crate::backend::cpu::CpuBackend::<f32>::new();
                $body
            }
            $crate::backend::select::BackendKind::CpuF64 => {
                let $b = &$crate::backend::cpu::CpuBackend::<f64>::new();
                $body
            }
            $crate::backend::select::BackendKind::Cuda => {
                #[cfg(feature = "cuda")]
                let r = match $crate::backend::select::cuda_backend() {
                    Ok(cuda) => {
                        let $b = &cuda;
                        $body
                    }
                    Err(e) => Err(e),
                };
                #[cfg(not(feature = "cuda"))]
                let r = Err($crate::backend::select::cuda_backend_missing());
                r
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;

    fn parse(b: &str, p: &str) -> Result<BackendKind> {
        BackendKind::parse(("--backend", b), ("--precision", p))
    }

    #[test]
    fn names_parse_and_bad_ones_name_their_key() {
        assert_eq!(parse("cpu", "f32").unwrap(), BackendKind::CpuF32);
        assert_eq!(parse("cpu", "f64").unwrap(), BackendKind::CpuF64);
        assert_eq!(parse("cuda", "f32").unwrap(), BackendKind::Cuda);
        let e = parse("gpu", "f32").unwrap_err().to_string();
        assert!(e.contains("--backend \"gpu\": expected cpu or cuda"), "{e}");
        let e = parse("cpu", "bf16").unwrap_err().to_string();
        assert!(
            e.contains("--precision \"bf16\": expected f32 or f64"),
            "{e}"
        );
        let e = BackendKind::parse(("train.backend", "cuda"), ("train.precision", "f64"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.precision f64"), "{e}");
    }

    #[test]
    fn the_chosen_cpu_backend_runs() {
        let name = |k| -> Result<String> { on_backend!(k, |b| Ok(b.name())) };
        assert_eq!(name(BackendKind::CpuF32).unwrap(), "cpu-f32");
        assert_eq!(name(BackendKind::CpuF64).unwrap(), "cpu-f64");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_so() {
        let r: Result<String> = on_backend!(BackendKind::Cuda, |b| Ok(b.name()));
        let e = r.unwrap_err().to_string();
        assert!(e.contains("without the `cuda` feature"), "{e}");
    }
}
