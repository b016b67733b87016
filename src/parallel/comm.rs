//! `Comm`: how ranks talk, on host buffers. The model and the optimizer are written against this
//! trait; `mpi` implements it over MPI (rsmpi + raw FFI for `MPI_IN_PLACE` and non-blocking
//! exchanges), `thread` over threads of one process (unit tests of the ring and the TP pairs),
//! and `SelfComm` is the world of one rank (no MPI at all).
//!
//! Every collective is blocking and called by every rank of the communicator in the same order.
//! The only non-blocking operation is `exchange_start`: the point-to-point step of the
//! context-parallel ring, overlapped with the local block's compute.
//!
//! **The model's communication boundary is the `*_buf` methods**: collectives on backend buffers
//! (the TP/sequence-parallel pairs, the vocab-parallel reductions, the CP ring). Their default
//! bodies stage through host memory with the host collectives above — the CPU backend's path and
//! the GPU fallback (NCCL missing, ranks sharing a GPU). A communicator that moves device memory
//! itself overrides them: NCCL on the GPU (`parallel::nccl`), device-local copies in the loopback
//! (`parallel::loopback`). Model code calls only these names, so it does not know which runs.

use std::cell::Cell;
use std::time::Instant;

use crate::backend::Backend;
use crate::backend::timed::Annotation;

pub use crate::util::elem::{Elem, ElemKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// A non-blocking exchange in flight: `wait` returns the send buffer (for reuse) and the filled
/// receive buffer. Dropping it without `wait` waits (the buffers must outlive the transfer).
pub struct Exchange<T: Elem> {
    inner: Option<Box<dyn PendingExchange<T>>>,
}

/// What an implementation keeps for an exchange in flight.
pub trait PendingExchange<T: Elem> {
    /// Block until both directions completed; give the buffers back.
    fn wait(self: Box<Self>) -> (Vec<T>, Vec<T>);
}

impl<T: Elem> Exchange<T> {
    pub fn new(p: Box<dyn PendingExchange<T>>) -> Self {
        Exchange { inner: Some(p) }
    }
    /// Block until done. `waited` (seconds) is added to the communicator's wait clock by
    /// `Comm::wait`; call that instead to account for the time.
    fn finish(mut self) -> (Vec<T>, Vec<T>) {
        self.inner.take().expect("exchange waited twice").wait()
    }
}

impl<T: Elem> Drop for Exchange<T> {
    fn drop(&mut self) {
        if let Some(p) = self.inner.take() {
            let _ = p.wait();
        }
    }
}

/// Seconds spent blocked in exchange waits (the ring's exposed communication).
#[derive(Default)]
pub struct WaitClock(Cell<f64>);

impl WaitClock {
    pub fn add(&self, s: f64) {
        self.0.set(self.0.get() + s);
    }
    pub fn get(&self) -> f64 {
        self.0.get()
    }
}

/// `n` elements of `buf` from `off`, on the host.
fn stage_down<B: Backend>(b: &B, buf: &B::Buf, off: usize, n: usize) -> Vec<B::Host> {
    let mut v = vec![B::Host::default(); n];
    b.read_host(buf, off, &mut v);
    v
}

/// A buffer exchange in flight (`Comm::exchange_buf_start`). It borrows both buffers until
/// `Comm::wait_buf`, so neither can be reused or freed while a transfer may still touch them.
pub struct BufExchange<'a, B: Backend> {
    recv: &'a mut B::Buf,
    n: usize,
    pending: BufPending<B>,
}

impl<'a, B: Backend> BufExchange<'a, B> {
    /// An exchange whose data is already in `recv` (or arrives on the backend's stream, ordered
    /// before any later kernel): nothing to wait for.
    pub fn done(recv: &'a mut B::Buf, n: usize) -> Self {
        BufExchange {
            recv,
            n,
            pending: BufPending::Done,
        }
    }

    /// An exchange a communicator tracks itself (`wait` blocks until `recv` may be read).
    pub fn device(recv: &'a mut B::Buf, n: usize, p: Box<dyn PendingDevice>) -> Self {
        BufExchange {
            recv,
            n,
            pending: BufPending::Device(p),
        }
    }
}

enum BufPending<B: Backend> {
    /// Staged through the host: the received data is written into `recv` at the wait.
    Staged(Exchange<B::Host>),
    Done,
    Device(Box<dyn PendingDevice>),
}

/// A device transfer a communicator tracks (e.g. NCCL send/recv on a communication stream).
pub trait PendingDevice {
    /// Block (or order the compute stream) until the received buffer may be read and the sent
    /// one reused.
    fn wait(self: Box<Self>);
}

pub trait Comm {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;

    /// In place: every rank ends with the element-wise reduction over all ranks.
    fn all_reduce<T: Elem>(&self, buf: &mut [T], op: ReduceOp);
    /// `recv.len() == send.len() * size`; rank `i`'s `send` lands at `recv[i*n .. (i+1)*n]`.
    fn all_gather<T: Elem>(&self, send: &[T], recv: &mut [T]);
    /// `send.len() == recv.len() * size`; `recv = Σ over ranks of their send[rank*n .. (rank+1)*n]`
    /// for this rank's block `rank`.
    fn reduce_scatter<T: Elem>(&self, send: &[T], recv: &mut [T]);
    fn broadcast<T: Elem>(&self, buf: &mut [T], root: usize);
    fn barrier(&self);
    /// Start sending `send` to rank `to` and receiving `recv.len()` elements from rank `from`.
    fn exchange_start<T: Elem>(
        &self,
        send: Vec<T>,
        to: usize,
        recv: Vec<T>,
        from: usize,
    ) -> Exchange<T>;
    /// The clock `wait` adds to.
    fn wait_clock(&self) -> &WaitClock;

    /// Finish an exchange, adding the time blocked to `wait_clock`.
    fn wait<T: Elem>(&self, x: Exchange<T>) -> (Vec<T>, Vec<T>) {
        let t0 = Instant::now();
        let r = x.finish();
        self.wait_clock().add(t0.elapsed().as_secs_f64());
        r
    }

    /// Which path the `*_buf` collectives take, for the start-up line and the metrics.
    fn buf_path(&self) -> &'static str {
        "host-staged"
    }

    /// `recv[0 .. size·n]` = every rank's `send[off .. off+n]`, in rank order.
    fn all_gather_buf<B: Backend>(
        &self,
        b: &B,
        send: &B::Buf,
        off: usize,
        n: usize,
        recv: &mut B::Buf,
    ) {
        b.annotate(Annotation::CommBegin {
            elems: n * self.size(),
        });
        let local = stage_down(b, send, off, n);
        let mut all = vec![B::Host::default(); n * self.size()];
        self.all_gather(&local, &mut all);
        b.write_host(recv, 0, &all);
        b.annotate(Annotation::CommEnd);
    }

    /// `recv[0 .. n] (+)=` this rank's block of `Σ over ranks of send[0 .. size·n]` (with
    /// `accumulate`, added to what `recv` holds: the residual connection).
    fn reduce_scatter_buf<B: Backend>(
        &self,
        b: &B,
        send: &B::Buf,
        n: usize,
        recv: &mut B::Buf,
        accumulate: bool,
    ) {
        b.annotate(Annotation::CommBegin {
            elems: n * self.size(),
        });
        let all = stage_down(b, send, 0, n * self.size());
        let mut mine = vec![B::Host::default(); n];
        self.reduce_scatter(&all, &mut mine);
        if accumulate {
            let cur = stage_down(b, recv, 0, n);
            for (m, c) in mine.iter_mut().zip(cur) {
                *m = c.add(*m);
            }
        }
        b.write_host(recv, 0, &mine);
        b.annotate(Annotation::CommEnd);
    }

    /// `buf[0 .. n] ←` the element-wise sum of every rank's `buf[0 .. n]`.
    fn all_reduce_buf<B: Backend>(&self, b: &B, buf: &mut B::Buf, n: usize) {
        b.annotate(Annotation::CommBegin { elems: n });
        let mut v = stage_down(b, buf, 0, n);
        self.all_reduce(&mut v, ReduceOp::Sum);
        b.write_host(buf, 0, &v);
        b.annotate(Annotation::CommEnd);
    }

    /// Start sending `send[0 .. n]` to rank `to` and receiving rank `from`'s into `recv[0 .. n]`
    /// (the ring's step); `recv` is written by the time `wait_buf` returns. Every rank must start
    /// its exchanges with the same peers in the same order.
    fn exchange_buf_start<'a, B: Backend>(
        &self,
        b: &B,
        send: &'a B::Buf,
        n: usize,
        to: usize,
        recv: &'a mut B::Buf,
        from: usize,
    ) -> BufExchange<'a, B> {
        b.annotate(Annotation::CommBegin { elems: n });
        let host = stage_down(b, send, 0, n);
        b.annotate(Annotation::CommEnd);
        let x = self.exchange_start(host, to, vec![B::Host::default(); n], from);
        BufExchange {
            recv,
            n,
            pending: BufPending::Staged(x),
        }
    }

    /// Finish a buffer exchange (`recv` then holds the data), adding the time blocked to
    /// `wait_clock`.
    fn wait_buf<B: Backend>(&self, b: &B, x: BufExchange<'_, B>) {
        let t0 = Instant::now();
        let BufExchange { recv, n, pending } = x;
        match pending {
            BufPending::Staged(e) => {
                // The wait is exposed communication (0 more elements: counted at the start).
                b.annotate(Annotation::CommBegin { elems: 0 });
                let (_, got) = e.finish();
                b.write_host(recv, 0, &got[..n]);
                b.annotate(Annotation::CommEnd);
            }
            BufPending::Done => {}
            BufPending::Device(d) => d.wait(),
        }
        self.wait_clock().add(t0.elapsed().as_secs_f64());
    }
}

/// The world of one rank: every collective is the identity.
#[derive(Default)]
pub struct SelfComm {
    clock: WaitClock,
}

struct Immediate<T>(Vec<T>, Vec<T>);

impl<T: Elem> PendingExchange<T> for Immediate<T> {
    fn wait(self: Box<Self>) -> (Vec<T>, Vec<T>) {
        (self.0, self.1)
    }
}

impl Comm for SelfComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce<T: Elem>(&self, _buf: &mut [T], _op: ReduceOp) {}
    fn all_gather<T: Elem>(&self, send: &[T], recv: &mut [T]) {
        recv.copy_from_slice(send);
    }
    fn reduce_scatter<T: Elem>(&self, send: &[T], recv: &mut [T]) {
        recv.copy_from_slice(send);
    }
    fn broadcast<T: Elem>(&self, _buf: &mut [T], _root: usize) {}
    fn barrier(&self) {}
    fn exchange_start<T: Elem>(
        &self,
        send: Vec<T>,
        to: usize,
        mut recv: Vec<T>,
        from: usize,
    ) -> Exchange<T> {
        assert!(to == 0 && from == 0, "SelfComm: only rank 0 exists");
        recv.copy_from_slice(&send);
        Exchange::new(Box::new(Immediate(send, recv)))
    }
    fn wait_clock(&self) -> &WaitClock {
        &self.clock
    }
}
