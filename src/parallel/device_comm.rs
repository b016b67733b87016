//! Which path a run's buffer collectives take, decided once the backend exists (a module of its
//! own so that `topology` and `nccl` need not import each other).

use super::topology::Topology;

/// The communication path of a run's buffer collectives, decided once the backend exists: NCCL
/// when `b` is the CUDA backend and NCCL can work (`parallel::nccl::device_collectives`: NCCL
/// loads on every rank, one GPU per rank, `ULTRALONG_COMM` is not `mpi`), else the host-staged
/// MPI path. Collective over the world. Returns the topology to use and the line to print at
/// start-up.
pub fn with_device_collectives<B: crate::backend::Backend>(
    b: &B,
    topo: Topology,
) -> anyhow::Result<(Topology, String)> {
    #[cfg(feature = "cuda")]
    if let Some(cuda) =
        (b as &dyn std::any::Any).downcast_ref::<crate::backend::cuda::CudaBackend>()
    {
        let (topo, c) = crate::parallel::nccl::device_collectives(topo, cuda)?;
        return Ok((topo, format!("collectives: {} ({})", c.path, c.why)));
    }
    let _ = b;
    let why = if topo.layout.world() == 1 {
        "one rank"
    } else {
        "host buffers"
    };
    Ok((topo, format!("collectives: host-staged MPI ({why})")))
}
