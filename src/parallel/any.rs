//! `AnyComm`: one type over every `Comm` (the trait has generic methods, so no `dyn Comm`), and
//! the world's start-up and shutdown.
//!
//! `init_world` reads the environment: only a process started by a multi-process launcher
//! (`mpirun`, `srun`, hydra) initialises MPI. A plain run, and every test, gets the world of one
//! rank without touching MPI (no singleton `MPI_Init`, which with OpenMPI forks a runtime daemon).
//!
//! Failure on one rank must end the job rather than leave the others blocked in a collective:
//! `report_error` (main's error path) and the hook of `install_panic_hook` print
//! `error: [rank R] ...` and call `abort_world`, which is `MPI_Abort` on `MPI_COMM_WORLD`.

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Result, bail};

use super::comm::{BufExchange, Comm, Elem, Exchange, ReduceOp, SelfComm, WaitClock};
use super::loopback::LoopbackComm;
#[cfg(feature = "mpi")]
use super::mpi::MpiComm;
use super::thread::ThreadComm;
use crate::backend::Backend;

/// Every communicator this crate has, behind one `Comm`.
pub enum AnyComm {
    /// The world of one rank (no MPI).
    Single(SelfComm),
    /// A rank of a thread world (`ThreadComm::run`, tests).
    Thread(ThreadComm),
    /// A rank of an MPI world or a split of it.
    #[cfg(feature = "mpi")]
    Mpi(MpiComm),
    /// One rank of a pretended world, collectives as local copies (`loopback`).
    Loopback(LoopbackComm),
    /// A group on GPUs: host collectives over its MPI communicator, device buffers over NCCL.
    #[cfg(feature = "cuda")]
    Nccl(super::nccl::NcclGroup),
}

macro_rules! dispatch {
    ($self:expr, $c:ident => $e:expr) => {
        match $self {
            AnyComm::Single($c) => $e,
            AnyComm::Thread($c) => $e,
            #[cfg(feature = "mpi")]
            AnyComm::Mpi($c) => $e,
            AnyComm::Loopback($c) => $e,
            #[cfg(feature = "cuda")]
            AnyComm::Nccl($c) => $e,
        }
    };
}

impl AnyComm {
    /// Split collectively over this communicator (`MPI_Comm_split` semantics): ranks with the same
    /// `color` form a new communicator, ordered by `key`, ties broken by rank here.
    pub fn split(&self, color: usize, key: usize) -> AnyComm {
        match self {
            AnyComm::Single(_) => AnyComm::Single(SelfComm::default()),
            AnyComm::Thread(c) => AnyComm::Thread(c.split(color, key)),
            #[cfg(feature = "mpi")]
            AnyComm::Mpi(c) => AnyComm::Mpi(c.split(color, key)),
            AnyComm::Loopback(_) => {
                panic!("a LoopbackComm does not split: build the topology with loopback_topology")
            }
            #[cfg(feature = "cuda")]
            AnyComm::Nccl(_) => {
                panic!("split the host communicators, then join NCCL over each group")
            }
        }
    }

    /// "single", "thread" or "mpi", for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyComm::Single(_) => "single",
            AnyComm::Thread(_) => "thread",
            #[cfg(feature = "mpi")]
            AnyComm::Mpi(_) => "mpi",
            AnyComm::Loopback(_) => "loopback",
            #[cfg(feature = "cuda")]
            AnyComm::Nccl(_) => "nccl",
        }
    }
}

impl Comm for AnyComm {
    fn rank(&self) -> usize {
        dispatch!(self, c => c.rank())
    }
    fn size(&self) -> usize {
        dispatch!(self, c => c.size())
    }
    fn all_reduce<T: Elem>(&self, buf: &mut [T], op: ReduceOp) {
        dispatch!(self, c => c.all_reduce(buf, op))
    }
    fn all_gather<T: Elem>(&self, send: &[T], recv: &mut [T]) {
        dispatch!(self, c => c.all_gather(send, recv))
    }
    fn reduce_scatter<T: Elem>(&self, send: &[T], recv: &mut [T]) {
        dispatch!(self, c => c.reduce_scatter(send, recv))
    }
    fn broadcast<T: Elem>(&self, buf: &mut [T], root: usize) {
        dispatch!(self, c => c.broadcast(buf, root))
    }
    fn barrier(&self) {
        dispatch!(self, c => c.barrier())
    }
    fn exchange_start<T: Elem>(
        &self,
        send: Vec<T>,
        to: usize,
        recv: Vec<T>,
        from: usize,
    ) -> Exchange<T> {
        dispatch!(self, c => c.exchange_start(send, to, recv, from))
    }
    fn wait_clock(&self) -> &WaitClock {
        dispatch!(self, c => c.wait_clock())
    }
    fn buf_path(&self) -> &'static str {
        dispatch!(self, c => c.buf_path())
    }
    fn all_gather_buf<B: Backend>(
        &self,
        b: &B,
        send: &B::Buf,
        off: usize,
        n: usize,
        recv: &mut B::Buf,
    ) {
        dispatch!(self, c => c.all_gather_buf(b, send, off, n, recv))
    }
    fn reduce_scatter_buf<B: Backend>(
        &self,
        b: &B,
        send: &B::Buf,
        n: usize,
        recv: &mut B::Buf,
        accumulate: bool,
    ) {
        dispatch!(self, c => c.reduce_scatter_buf(b, send, n, recv, accumulate))
    }
    fn all_reduce_buf<B: Backend>(&self, b: &B, buf: &mut B::Buf, n: usize) {
        dispatch!(self, c => c.all_reduce_buf(b, buf, n))
    }
    fn exchange_buf_start<'a, B: Backend>(
        &self,
        b: &B,
        send: &'a B::Buf,
        n: usize,
        to: usize,
        recv: &'a mut B::Buf,
        from: usize,
    ) -> BufExchange<'a, B> {
        dispatch!(self, c => c.exchange_buf_start(b, send, n, to, recv, from))
    }
    fn wait_buf<B: Backend>(&self, b: &B, x: BufExchange<'_, B>) {
        dispatch!(self, c => c.wait_buf(b, x))
    }
}

// ---------------------------------------------------------------------------------------------
// The launcher, from the environment.

/// What the environment says about the launcher that started this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Which variables told: "mpirun", "PMI", "srun" or "PMIx".
    pub launcher: &'static str,
    /// The number of ranks, where the launcher says (PMIx alone does not).
    pub size: Option<usize>,
    pub rank: Option<usize>,
}

impl Launch {
    /// Whether this is a launch of one process only (then MPI is not worth initialising).
    fn is_single(&self) -> bool {
        self.size == Some(1) || (self.size.is_none() && self.rank.is_none())
    }
}

/// Detect a multi-process launcher from environment variables (`env` looks one up). `None`: no
/// launcher, or one that started a single process.
///
/// In order: OpenMPI's `mpirun` (`OMPI_COMM_WORLD_SIZE`), PMI-1/2 (`PMI_SIZE`: MPICH's hydra,
/// `srun --mpi=pmi2`), Slurm's `srun` (`SLURM_STEP_ID` with `SLURM_STEP_NUM_TASKS` or
/// `SLURM_NTASKS` above 1; a batch script alone runs no step), then PMIx (`PMIX_RANK`, no size).
pub fn detect_launch(env: &dyn Fn(&str) -> Option<String>) -> Option<Launch> {
    let num = |k: &str| env(k).and_then(|v| v.trim().parse::<usize>().ok());
    let found = if let Some(size) = num("OMPI_COMM_WORLD_SIZE") {
        Launch {
            launcher: "mpirun",
            size: Some(size),
            rank: num("OMPI_COMM_WORLD_RANK"),
        }
    } else if let Some(size) = num("PMI_SIZE") {
        Launch {
            launcher: "PMI",
            size: Some(size),
            rank: num("PMI_RANK"),
        }
    } else if let (Some(_), Some(size)) = (
        env("SLURM_STEP_ID"),
        num("SLURM_STEP_NUM_TASKS").or_else(|| num("SLURM_NTASKS")),
    ) {
        Launch {
            launcher: "srun",
            size: Some(size),
            rank: num("SLURM_PROCID"),
        }
    } else if let Some(rank) = num("PMIX_RANK") {
        Launch {
            launcher: "PMIx",
            size: None,
            rank: Some(rank),
        }
    } else {
        return None;
    };
    (!found.is_single()).then_some(found)
}

// ---------------------------------------------------------------------------------------------
// The world.

static WORLD_RANK: AtomicUsize = AtomicUsize::new(0);
static WORLD_SIZE: AtomicUsize = AtomicUsize::new(1);

/// This process's rank in the world (0 when single), for log prefixes. Set by `init_world` and
/// kept after the world is finalised.
pub fn world_rank() -> usize {
    WORLD_RANK.load(Ordering::Relaxed)
}

/// The number of ranks of the world (1 when single, or before `init_world`).
pub fn world_size() -> usize {
    WORLD_SIZE.load(Ordering::Relaxed)
}

/// Whether MPI is initialised and not yet finalised.
pub fn mpi_active() -> bool {
    #[cfg(feature = "mpi")]
    {
        super::mpi::is_active()
    }
    #[cfg(not(feature = "mpi"))]
    {
        false
    }
}

/// The world communicator, and the MPI universe when there is one. Dropping it finalises MPI.
///
/// `MPI_Finalize` is collective: a rank that drops the world on an error while the others wait
/// in a collective hangs the job. End a multi-rank run through `run_world` (or call
/// `report_error` before dropping), which aborts the job instead. A drop while panicking aborts.
pub struct World {
    // Field order is drop order: the communicator before the universe.
    comm: AnyComm,
    #[cfg(feature = "mpi")]
    universe: Option<mpi::environment::Universe>,
}

impl World {
    /// The world of one rank, without looking at the environment.
    pub fn single() -> World {
        World {
            comm: AnyComm::Single(SelfComm::default()),
            #[cfg(feature = "mpi")]
            universe: None,
        }
    }

    pub fn comm(&self) -> &AnyComm {
        &self.comm
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Whether this world runs over MPI.
    pub fn is_mpi(&self) -> bool {
        #[cfg(feature = "mpi")]
        {
            self.universe.is_some()
        }
        #[cfg(not(feature = "mpi"))]
        {
            false
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Unwinding past the world of a multi-rank job: finalising would wait for ranks that are
        // waiting for us (the panic hook normally aborted already).
        if std::thread::panicking() && self.size() > 1 && mpi_active() {
            eprintln!(
                "error: [rank {}] the world was dropped by a panic",
                world_rank()
            );
            abort_world(1);
        }
    }
}

/// Start the world from the environment: MPI when a launcher started several processes, else
/// the world of one rank (MPI untouched). Errors: MPI already initialised (one world per process),
/// a launcher's size that the MPI world does not match (e.g. `srun` without `--mpi=pmix`: every
/// process a singleton), or several ranks requested of a build without the `mpi` feature.
pub fn init_world() -> Result<World> {
    init_world_with(&|k| std::env::var(k).ok())
}

fn init_world_with(env: &dyn Fn(&str) -> Option<String>) -> Result<World> {
    let Some(launch) = detect_launch(env) else {
        return Ok(World::single());
    };
    start_mpi(launch)
}

#[cfg(not(feature = "mpi"))]
fn start_mpi(launch: Launch) -> Result<World> {
    let n = match launch.size {
        Some(n) => n.to_string(),
        None => "several".to_string(),
    };
    bail!(
        "built without MPI (feature `mpi`): cannot run {n} ranks (started by {})",
        launch.launcher
    )
}

#[cfg(feature = "mpi")]
fn start_mpi(launch: Launch) -> Result<World> {
    use mpi::Threading;
    let Some((universe, _provided)) = mpi::initialize_with_threading(Threading::Serialized) else {
        bail!("MPI is already initialised in this process (one world per process)");
    };
    let comm = MpiComm::world();
    if let Some(n) = launch.size
        && n != comm.size()
    {
        // Dropping the universe finalises: fine, the processes are not in one world.
        bail!(
            "{} started {n} processes but the MPI world has {} rank(s): the launcher and the MPI \
             library do not talk (with srun: --mpi=pmix for OpenMPI, --mpi=pmi2 for MPICH)",
            launch.launcher,
            comm.size()
        );
    }
    WORLD_RANK.store(comm.rank(), Ordering::Relaxed);
    WORLD_SIZE.store(comm.size(), Ordering::Relaxed);
    Ok(World {
        comm: AnyComm::Mpi(comm),
        universe: Some(universe),
    })
}

/// Start the world, run `f`, end the world. On an error in a multi-rank MPI world this reports it
/// (`error: [rank R] ...`) and aborts the whole job rather than finalise (which would wait for
/// ranks blocked on this one); otherwise the error is returned.
pub fn run_world<R>(f: impl FnOnce(&World) -> Result<R>) -> Result<R> {
    let world = init_world()?;
    match f(&world) {
        Ok(r) => {
            drop(world);
            Ok(r)
        }
        Err(e) => {
            if world.size() > 1 && mpi_active() {
                report_error(&e);
            }
            Err(e)
        }
    }
}

/// End the job now with `code`: `MPI_Abort` on the world if MPI is running (every rank of the job
/// is killed; mpirun exits non-zero), else `exit(code)`.
pub fn abort_world(code: i32) -> ! {
    #[cfg(feature = "mpi")]
    if mpi_active() {
        // SAFETY: MPI is initialised and not finalised.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
        }
    }
    std::process::exit(code)
}

/// Print a fatal error as one line: `error: {e:#}` when single; in a multi-rank world
/// `error: [rank R] {e:#}`, then abort the job if MPI is running (does not return then).
pub fn report_error(e: &anyhow::Error) {
    let e = one_line(e);
    if let Some(rank) = follower_before_world() {
        wait_for_rank_zero();
        eprintln!("error: [rank {rank}] {e}");
        return;
    }
    if world_size() > 1 {
        eprintln!("error: [rank {}] {e}", world_rank());
        if mpi_active() {
            abort_world(1);
        }
    } else {
        eprintln!("error: {e}");
    }
}

/// This process's rank when a launcher started several processes, this one is not rank 0, and the
/// world has not started. A failure before `init_world` (arguments, configs, input files) is the
/// same on every rank, so rank 0 alone reports it; the others wait (`wait_for_rank_zero`).
pub fn follower_before_world() -> Option<usize> {
    if world_size() > 1 {
        return None;
    }
    detect_launch(&|k| std::env::var(k).ok())?
        .rank
        .filter(|&r| r > 0)
}

/// Give rank 0 the time to print its error and the launcher the time to end the job (`mpirun`
/// kills every rank once one exits non-zero): the user reads one error, not one per rank
/// interleaved. A rank still alive after this failed on its own and says so.
pub fn wait_for_rank_zero() {
    std::thread::sleep(std::time::Duration::from_secs(3));
}

/// The whole context chain of `e` on one line: a library's multi-line message (toml's, serde's)
/// joined with spaces, so that every failure is the one `error:` line the README promises.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Make a panic on any thread of a multi-rank MPI world end the job: print
/// `error: [rank R] panicked at FILE:LINE: MESSAGE` and `abort_world(1)`. Single-process panics
/// keep the previous hook's behaviour. Call once, at the start of `main`.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if world_size() > 1 && mpi_active() {
            let msg = info
                .payload_as_str()
                .unwrap_or("(non-string panic payload)");
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            eprintln!(
                "error: [rank {}] panicked{at}: {}",
                world_rank(),
                msg.replace('\n', " ")
            );
            abort_world(1);
        }
        previous(info);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn launch_detection() {
        assert_eq!(detect_launch(&env_of(&[])), None);
        assert_eq!(
            detect_launch(&env_of(&[
                ("OMPI_COMM_WORLD_SIZE", "4"),
                ("OMPI_COMM_WORLD_RANK", "2")
            ])),
            Some(Launch {
                launcher: "mpirun",
                size: Some(4),
                rank: Some(2)
            })
        );
        // mpirun -np 1: not worth MPI.
        assert_eq!(
            detect_launch(&env_of(&[
                ("OMPI_COMM_WORLD_SIZE", "1"),
                ("PMIX_RANK", "0")
            ])),
            None
        );
        assert_eq!(
            detect_launch(&env_of(&[("PMI_SIZE", "3"), ("PMI_RANK", "0")])).map(|l| l.size),
            Some(Some(3))
        );
        // A Slurm batch script (no step) is not a launch; an srun step of 2 is.
        assert_eq!(
            detect_launch(&env_of(&[("SLURM_NTASKS", "4"), ("SLURM_PROCID", "0")])),
            None
        );
        assert_eq!(
            detect_launch(&env_of(&[
                ("SLURM_NTASKS", "4"),
                ("SLURM_STEP_NUM_TASKS", "2"),
                ("SLURM_STEP_ID", "0"),
                ("SLURM_PROCID", "1")
            ])),
            Some(Launch {
                launcher: "srun",
                size: Some(2),
                rank: Some(1)
            })
        );
        assert_eq!(
            detect_launch(&env_of(&[("SLURM_NTASKS", "1"), ("SLURM_STEP_ID", "0")])),
            None
        );
        // PMIx alone: several ranks possible, size unknown.
        assert_eq!(
            detect_launch(&env_of(&[("PMIX_RANK", "0")])).map(|l| (l.launcher, l.size)),
            Some(("PMIx", None))
        );
    }

    #[test]
    fn no_launcher_is_single_without_mpi() {
        let w = init_world_with(&env_of(&[])).unwrap();
        assert!(!w.is_mpi());
        assert_eq!((w.rank(), w.size(), w.comm().kind()), (0, 1, "single"));
        assert!(!mpi_active());
        let mut b = [1.5f32, 2.0];
        w.comm().all_reduce(&mut b, ReduceOp::Sum);
        assert_eq!(b, [1.5, 2.0]);
        let s = w.comm().split(3, 7);
        assert_eq!((s.rank(), s.size(), s.kind()), (0, 1, "single"));
        let x = s.exchange_start(vec![4u64, 5], 0, vec![0; 2], 0);
        assert_eq!(s.wait(x), (vec![4, 5], vec![4, 5]));
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn several_ranks_without_mpi_feature_is_an_error() {
        let e = init_world_with(&env_of(&[("OMPI_COMM_WORLD_SIZE", "4")]))
            .err()
            .expect("must fail");
        assert_eq!(
            e.to_string(),
            "built without MPI (feature `mpi`): cannot run 4 ranks (started by mpirun)"
        );
    }

    #[test]
    fn thread_world_through_any_comm() {
        let out = ThreadComm::run(4, |c| {
            assert_eq!(c.kind(), "thread");
            let sub = c.split(c.rank() % 2, 0);
            let mut v = [c.rank() as i32];
            sub.all_reduce(&mut v, ReduceOp::Sum);
            (sub.size(), v[0])
        });
        assert_eq!(out, vec![(2, 2), (2, 4), (2, 2), (2, 4)]);
    }
}
