//! `MpiComm`: `Comm` over MPI, for ranks launched by `mpirun` / `srun`.
//!
//! rsmpi 0.8 initialises and finalises MPI (`any::init_world`); the collectives are raw
//! `mpi::ffi` calls because rsmpi has no `MPI_IN_PLACE` (its `all_reduce_into` is out of place)
//! and its non-blocking requests borrow their buffers for a scope, whereas `exchange_start` hands
//! back an `Exchange` that owns them. `MPI_IN_PLACE` comes from `csrc/mpi_shim.c`, compiled with
//! mpicc: its value differs between OpenMPI and MPICH.
//!
//! Counts above `i32::MAX` elements (MPI's `int` counts) are split into several calls.

use std::ffi::{c_int, c_void};

use mpi::ffi;

use super::comm::{Comm, Elem, ElemKind, Exchange, PendingExchange, ReduceOp, WaitClock};

unsafe extern "C" {
    /// `MPI_IN_PLACE` of the MPI library this crate was built against (csrc/mpi_shim.c).
    safe fn ul_mpi_in_place() -> *mut c_void;
}

/// The tag of `exchange_start` messages. Messages between two ranks with one tag arrive in the
/// order they were sent, so several exchanges in flight to one peer stay matched.
const EXCHANGE_TAG: c_int = 0x554c;

/// Largest element count of one MPI call.
const MAX_COUNT: usize = i32::MAX as usize;

/// Elements per temporary buffer when a gather or reduce-scatter over more than `max_count`
/// elements per rank is split (each piece is packed or unpacked through a buffer of
/// `piece * size` elements).
const PACK_PIECE: usize = 1 << 24;

/// The MPI datatype of an element kind.
pub fn datatype(kind: ElemKind) -> ffi::MPI_Datatype {
    // SAFETY: reading constants exported by mpi-sys's C shim; they are initialised statics.
    unsafe {
        match kind {
            ElemKind::F32 => ffi::RSMPI_FLOAT,
            ElemKind::F64 => ffi::RSMPI_DOUBLE,
            ElemKind::U8 => ffi::RSMPI_UINT8_T,
            ElemKind::I32 => ffi::RSMPI_INT32_T,
            ElemKind::U64 => ffi::RSMPI_UINT64_T,
        }
    }
}

fn op(op: ReduceOp) -> ffi::MPI_Op {
    // SAFETY: as in `datatype`.
    unsafe {
        match op {
            ReduceOp::Sum => ffi::RSMPI_SUM,
            ReduceOp::Max => ffi::RSMPI_MAX,
        }
    }
}

/// MPI's error handler on our communicators is `MPI_ERRORS_ARE_FATAL` (the default, inherited
/// by splits): a failing call aborts the job before returning. This catches anything else.
fn check(rc: c_int, what: &str) {
    assert!(rc == 0, "{what} failed with MPI error code {rc}");
}

fn cint(n: usize, what: &str) -> c_int {
    c_int::try_from(n).unwrap_or_else(|_| panic!("{what} {n} does not fit an MPI int"))
}

/// Whether `MPI_Init` has been called and `MPI_Finalize` has not.
pub fn is_active() -> bool {
    let (mut init, mut fin): (c_int, c_int) = (0, 0);
    // SAFETY: both may be called at any time, before `MPI_Init` and after `MPI_Finalize`.
    unsafe {
        ffi::MPI_Initialized(&mut init);
        ffi::MPI_Finalized(&mut fin);
    }
    init != 0 && fin == 0
}

/// One communicator of an initialised MPI world: `MPI_COMM_WORLD`, or a split of it (freed on
/// drop unless MPI was already finalised). Not `Send`: use it on the thread that initialised MPI
/// (`MPI_THREAD_SERIALIZED` is requested, so any one thread at a time would do, but nothing here
/// serialises calls from several threads).
pub struct MpiComm {
    raw: ffi::MPI_Comm,
    owned: bool,
    rank: usize,
    size: usize,
    max_count: usize,
    clock: WaitClock,
}

impl MpiComm {
    /// `MPI_COMM_WORLD`. Panics if MPI is not initialised (see `any::init_world`).
    pub fn world() -> MpiComm {
        assert!(is_active(), "MpiComm::world: MPI is not initialised");
        // SAFETY: MPI is initialised; COMM_WORLD lives until MPI_Finalize.
        unsafe { MpiComm::from_raw(ffi::RSMPI_COMM_WORLD, false) }
    }

    /// # Safety
    /// `raw` is a live intra-communicator; if `owned`, nothing else frees it.
    unsafe fn from_raw(raw: ffi::MPI_Comm, owned: bool) -> MpiComm {
        let (mut rank, mut size): (c_int, c_int) = (0, 0);
        // SAFETY: `raw` is live (caller).
        unsafe {
            check(ffi::MPI_Comm_rank(raw, &mut rank), "MPI_Comm_rank");
            check(ffi::MPI_Comm_size(raw, &mut size), "MPI_Comm_size");
        }
        MpiComm {
            raw,
            owned,
            rank: rank as usize,
            size: size as usize,
            max_count: MAX_COUNT,
            clock: WaitClock::default(),
        }
    }

    /// The raw handle, for libraries that take an `MPI_Comm`.
    pub fn as_raw(&self) -> ffi::MPI_Comm {
        self.raw
    }

    /// Split collectively (`MPI_Comm_split`): ranks with the same `color` form a communicator,
    /// ordered by `key`, ties by rank here. Both must fit an MPI int.
    pub fn split(&self, color: usize, key: usize) -> MpiComm {
        let color = cint(color, "MpiComm::split: color");
        let key = cint(key, "MpiComm::split: key");
        // SAFETY: an out-parameter handle; COMM_NULL is only returned for MPI_UNDEFINED colors,
        // which a non-negative int is not.
        let mut new = unsafe { ffi::RSMPI_COMM_NULL };
        unsafe {
            check(
                ffi::MPI_Comm_split(self.raw, color, key, &mut new),
                "MPI_Comm_split",
            );
        }
        // SAFETY: a new communicator that only this value frees.
        let mut c = unsafe { MpiComm::from_raw(new, true) };
        c.max_count = self.max_count;
        c
    }

    /// Lower the element count above which calls are split (default `i32::MAX`), so tests can
    /// exercise the large-count paths on small buffers. Splits made later inherit it.
    pub fn set_max_count(&mut self, n: usize) {
        assert!(
            (1..=MAX_COUNT).contains(&n),
            "max count {n} out of 1..=i32::MAX"
        );
        self.max_count = n;
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        if self.owned && is_active() {
            // SAFETY: we own the handle and MPI is still up.
            unsafe {
                ffi::MPI_Comm_free(&mut self.raw);
            }
        }
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce<T: Elem>(&self, buf: &mut [T], o: ReduceOp) {
        for piece in buf.chunks_mut(self.max_count) {
            // SAFETY: in place over `piece.len()` elements of T's datatype.
            let rc = unsafe {
                ffi::MPI_Allreduce(
                    ul_mpi_in_place(),
                    piece.as_mut_ptr().cast(),
                    piece.len() as c_int,
                    datatype(T::KIND),
                    op(o),
                    self.raw,
                )
            };
            check(rc, "MPI_Allreduce");
        }
    }

    fn all_gather<T: Elem>(&self, send: &[T], recv: &mut [T]) {
        let (n, size) = (send.len(), self.size);
        assert_eq!(
            recv.len(),
            n * size,
            "all_gather: recv.len() != send.len() * size"
        );
        if n == 0 {
            return;
        }
        let dt = datatype(T::KIND);
        if n <= self.max_count {
            // SAFETY: `send` holds n elements, `recv` n * size.
            let rc = unsafe {
                ffi::MPI_Allgather(
                    send.as_ptr().cast(),
                    n as c_int,
                    dt,
                    recv.as_mut_ptr().cast(),
                    n as c_int,
                    dt,
                    self.raw,
                )
            };
            check(rc, "MPI_Allgather");
            return;
        }
        // Piece by piece through a packed buffer: rank r's piece [off, off+len) of its block lands
        // at recv[r*n + off ..].
        let step = self.max_count.min(PACK_PIECE);
        let mut tmp = vec![T::default(); step * size];
        for off in (0..n).step_by(step) {
            let len = step.min(n - off);
            // SAFETY: `send[off..]` holds len elements, `tmp` len * size.
            let rc = unsafe {
                ffi::MPI_Allgather(
                    send[off..].as_ptr().cast(),
                    len as c_int,
                    dt,
                    tmp.as_mut_ptr().cast(),
                    len as c_int,
                    dt,
                    self.raw,
                )
            };
            check(rc, "MPI_Allgather");
            for r in 0..size {
                recv[r * n + off..r * n + off + len].copy_from_slice(&tmp[r * len..(r + 1) * len]);
            }
        }
    }

    fn reduce_scatter<T: Elem>(&self, send: &[T], recv: &mut [T]) {
        let (n, size) = (recv.len(), self.size);
        assert_eq!(
            send.len(),
            n * size,
            "reduce_scatter: send.len() != recv.len() * size"
        );
        if n == 0 {
            return;
        }
        let dt = datatype(T::KIND);
        let sum = op(ReduceOp::Sum);
        if n <= self.max_count {
            // SAFETY: `send` holds n * size elements, `recv` n.
            let rc = unsafe {
                ffi::MPI_Reduce_scatter_block(
                    send.as_ptr().cast(),
                    recv.as_mut_ptr().cast(),
                    n as c_int,
                    dt,
                    sum,
                    self.raw,
                )
            };
            check(rc, "MPI_Reduce_scatter_block");
            return;
        }
        // Piece by piece: pack [off, off+len) of every rank's block, reduce-scatter that.
        let step = self.max_count.min(PACK_PIECE);
        let mut tmp = vec![T::default(); step * size];
        for off in (0..n).step_by(step) {
            let len = step.min(n - off);
            for r in 0..size {
                tmp[r * len..(r + 1) * len].copy_from_slice(&send[r * n + off..r * n + off + len]);
            }
            // SAFETY: `tmp` holds len * size elements, `recv[off..]` len.
            let rc = unsafe {
                ffi::MPI_Reduce_scatter_block(
                    tmp.as_ptr().cast(),
                    recv[off..].as_mut_ptr().cast(),
                    len as c_int,
                    dt,
                    sum,
                    self.raw,
                )
            };
            check(rc, "MPI_Reduce_scatter_block");
        }
    }

    fn broadcast<T: Elem>(&self, buf: &mut [T], root: usize) {
        assert!(root < self.size, "broadcast: root {root} out of range");
        for piece in buf.chunks_mut(self.max_count) {
            // SAFETY: `piece.len()` elements.
            let rc = unsafe {
                ffi::MPI_Bcast(
                    piece.as_mut_ptr().cast(),
                    piece.len() as c_int,
                    datatype(T::KIND),
                    root as c_int,
                    self.raw,
                )
            };
            check(rc, "MPI_Bcast");
        }
    }

    fn barrier(&self) {
        // SAFETY: a live communicator.
        check(unsafe { ffi::MPI_Barrier(self.raw) }, "MPI_Barrier");
    }

    fn exchange_start<T: Elem>(
        &self,
        send: Vec<T>,
        to: usize,
        mut recv: Vec<T>,
        from: usize,
    ) -> Exchange<T> {
        assert!(
            to < self.size && from < self.size,
            "exchange: rank out of range (size {})",
            self.size
        );
        let dt = datatype(T::KIND);
        let mut reqs = Vec::new();
        // Post the receives first: the matching sends then land directly in place. Both sides
        // cut a message into the same pieces (same length, same max_count), and pieces with one
        // tag arrive in order. Zero-length buffers post nothing, on both sides.
        for piece in recv.chunks_mut(self.max_count) {
            // SAFETY: an out-parameter request handle.
            let mut r = unsafe { ffi::RSMPI_REQUEST_NULL };
            // SAFETY: the piece lives in `recv`'s heap buffer, which `MpiPending` owns (and does
            // not touch) until the request completed; moving a Vec does not move its buffer.
            let rc = unsafe {
                ffi::MPI_Irecv(
                    piece.as_mut_ptr().cast(),
                    piece.len() as c_int,
                    dt,
                    from as c_int,
                    EXCHANGE_TAG,
                    self.raw,
                    &mut r,
                )
            };
            check(rc, "MPI_Irecv");
            reqs.push(r);
        }
        for piece in send.chunks(self.max_count) {
            // SAFETY: an out-parameter request handle.
            let mut r = unsafe { ffi::RSMPI_REQUEST_NULL };
            // SAFETY: as for the receives, with `send`.
            let rc = unsafe {
                ffi::MPI_Isend(
                    piece.as_ptr().cast(),
                    piece.len() as c_int,
                    dt,
                    to as c_int,
                    EXCHANGE_TAG,
                    self.raw,
                    &mut r,
                )
            };
            check(rc, "MPI_Isend");
            reqs.push(r);
        }
        Exchange::new(Box::new(MpiPending { send, recv, reqs }))
    }

    fn wait_clock(&self) -> &WaitClock {
        &self.clock
    }
}

/// An exchange in flight: owns both buffers and the requests reading / writing them.
struct MpiPending<T> {
    send: Vec<T>,
    recv: Vec<T>,
    reqs: Vec<ffi::MPI_Request>,
}

impl<T> MpiPending<T> {
    fn complete(&mut self) {
        if self.reqs.is_empty() || !is_active() {
            return;
        }
        // SAFETY: live requests on buffers we own; Waitall sets them to MPI_REQUEST_NULL.
        let rc = unsafe {
            ffi::MPI_Waitall(
                self.reqs.len() as c_int,
                self.reqs.as_mut_ptr(),
                ffi::RSMPI_STATUSES_IGNORE,
            )
        };
        self.reqs.clear();
        check(rc, "MPI_Waitall");
    }
}

impl<T: Elem> PendingExchange<T> for MpiPending<T> {
    fn wait(mut self: Box<Self>) -> (Vec<T>, Vec<T>) {
        self.complete();
        (
            std::mem::take(&mut self.send),
            std::mem::take(&mut self.recv),
        )
    }
}

impl<T> Drop for MpiPending<T> {
    /// The buffers must outlive the transfer, even if the exchange is leaked by a panic.
    fn drop(&mut self) {
        self.complete();
    }
}
