//! GPU collectives through NCCL (cudarc, loaded at run time): one communicator per TP/CP/DP group,
//! bootstrapped over the group's existing host `Comm` (MPI): the group's rank 0 makes the NCCL
//! unique id and broadcasts its 128 bytes, every rank then joins with `ncclCommInitRank`.
//!
//! [`NcclGroup`] is a whole communicator of the model's: host collectives (losses, flags, the
//! bootstrap) over the group's MPI communicator, and the buffer collectives the model calls
//! (`Comm::*_buf`: the TP pairs, the CP ring) through NCCL on the backend's stream when the
//! buffers are the CUDA backend's — device memory never goes through the host. The TP pairs run
//! on the compute stream (the next kernel needs their result); the CP ring's exchanges run on a
//! communication stream ordered against the compute stream by events, so the next ring step's
//! transfer overlaps this step's attention and no layer waits on the host.
//!
//! Status: compiled, not yet run on a GPU (needs a GPU task: the world-of-1 test of
//! `gpu-check`). The host-staged MPI path stays the fallback: NCCL missing, ranks sharing one GPU
//! (NCCL refuses that), or `ULTRALONG_COMM=mpi`.

use std::any::Any;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::{result, sys};

use crate::backend::Backend;
use crate::backend::cuda::{CudaBackend, CudaBuf, DType};
use crate::backend::timed::Annotation;
use crate::parallel::any::AnyComm;
use crate::parallel::comm::{
    BufExchange, Comm, Elem, Exchange, PendingDevice, ReduceOp, WaitClock,
};

/// A NCCL communicator over the ranks of one group, issuing on the backend's stream.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    stream: sys::cudaStream_t,
    rank: usize,
    size: usize,
}

// SAFETY: a NCCL communicator may be used from any thread, one call at a time; collectives are
// issued through `&mut self`.
unsafe impl Send for NcclComm {}

fn nccl_type(d: DType) -> sys::ncclDataType_t {
    match d {
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        DType::Bf16 => sys::ncclDataType_t::ncclBfloat16,
    }
}

fn check<T>(what: &str, r: Result<T, result::NcclError>) -> Result<T> {
    r.map_err(|e| anyhow!("NCCL {what}: {e:?}"))
}

impl NcclComm {
    /// Join the NCCL communicator of `group` (collective over the group's ranks).
    pub fn from_group<C: Comm>(b: &CudaBackend, group: &C) -> Result<Self> {
        // SAFETY: only tries to load libnccl.
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "NCCL not found (cudarc opens libnccl.so; the pip wheel has only libnccl.so.2: \
                 link it); the host-staged MPI path works without it"
            );
        }
        let mut id = [0u8; 128];
        if group.rank() == 0 {
            let uid = check("get unique id", result::get_uniqueid())?;
            for (d, s) in id.iter_mut().zip(uid.internal.iter()) {
                *d = *s as u8;
            }
        }
        group.broadcast(&mut id, 0);
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(id.iter()) {
            *d = *s as _;
        }
        b.context().bind_to_thread()?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: every rank of the group calls this with the same id and its own rank.
        let comm = unsafe {
            check(
                "comm init",
                result::comm_init_rank(
                    comm.as_mut_ptr(),
                    group.size() as i32,
                    uid,
                    group.rank() as i32,
                ),
            )?;
            comm.assume_init()
        };
        Ok(NcclComm {
            comm,
            stream: b.stream().cu_stream() as sys::cudaStream_t,
            rank: group.rank(),
            size: group.size(),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.size
    }

    /// `buf ← Σ_ranks buf`, in place.
    pub fn all_reduce_sum(&mut self, buf: &mut CudaBuf) -> Result<()> {
        let p = buf.device_ptr() as *mut std::ffi::c_void;
        // SAFETY: the buffer is live and the same length on every rank (caller's contract).
        unsafe {
            check(
                "all_reduce",
                result::all_reduce(
                    p,
                    p,
                    buf.len(),
                    nccl_type(buf.dtype()),
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    self.stream,
                ),
            )?;
        }
        Ok(())
    }

    /// `recv = concat_ranks(send)`; `recv.len() == size · send.len()`.
    pub fn all_gather(&mut self, send: &CudaBuf, recv: &mut CudaBuf) -> Result<()> {
        if recv.len() != send.len() * self.size || send.dtype() != recv.dtype() {
            bail!(
                "NCCL all_gather: {} -> {} over {} ranks",
                send.len(),
                recv.len(),
                self.size
            );
        }
        // SAFETY: sizes checked above.
        unsafe {
            check(
                "all_gather",
                result::all_gather(
                    send.device_ptr() as *const _,
                    recv.device_ptr() as *mut _,
                    send.len(),
                    nccl_type(send.dtype()),
                    self.comm,
                    self.stream,
                ),
            )?;
        }
        Ok(())
    }

    /// `recv = (Σ_ranks send)[rank·n .. (rank+1)·n]`, `n = recv.len()`.
    pub fn reduce_scatter_sum(&mut self, send: &CudaBuf, recv: &mut CudaBuf) -> Result<()> {
        if send.len() != recv.len() * self.size || send.dtype() != recv.dtype() {
            bail!(
                "NCCL reduce_scatter: {} -> {} over {} ranks",
                send.len(),
                recv.len(),
                self.size
            );
        }
        // SAFETY: sizes checked above.
        unsafe {
            check(
                "reduce_scatter",
                result::reduce_scatter(
                    send.device_ptr() as *const _,
                    recv.device_ptr() as *mut _,
                    recv.len(),
                    nccl_type(send.dtype()),
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    self.stream,
                ),
            )?;
        }
        Ok(())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: created in `from_group`, not used after this.
        unsafe {
            let _ = result::comm_destroy(self.comm);
        }
    }
}

/// Element `off` of `buf` as a device address.
fn at(buf: &CudaBuf, off: usize) -> *mut std::ffi::c_void {
    (buf.device_ptr() as usize + off * buf.dtype().size()) as *mut std::ffi::c_void
}

fn must(what: &str, r: Result<()>) {
    // A failed NCCL call leaves the group's collectives out of step: nothing can continue, and
    // the world's error path (MPI_Abort on the first failing rank) names it.
    if let Err(e) = r {
        panic!("{what}: {e:#}");
    }
}

impl NcclComm {
    /// `recv[0 .. size·n]` = every rank's `send[off .. off+n]`.
    fn all_gather_at(
        &self,
        send: &CudaBuf,
        off: usize,
        n: usize,
        recv: &mut CudaBuf,
    ) -> Result<()> {
        if off + n > send.len() || recv.len() < n * self.size || send.dtype() != recv.dtype() {
            bail!(
                "NCCL all_gather: {n} elements at {off} of {} -> {}",
                send.len(),
                recv.len()
            );
        }
        // SAFETY: ranges checked above; both buffers outlive the call's stream work (the caller
        // holds them, and later kernels on the same stream are ordered after it).
        unsafe {
            check(
                "all_gather",
                result::all_gather(
                    at(send, off),
                    at(recv, 0),
                    n,
                    nccl_type(send.dtype()),
                    self.comm,
                    self.stream,
                ),
            )?;
        }
        Ok(())
    }

    /// `recv[0 .. n]` = this rank's block of `Σ over ranks of send[0 .. size·n]`.
    fn reduce_scatter_at(&self, send: &CudaBuf, n: usize, recv: &mut CudaBuf) -> Result<()> {
        if send.len() < n * self.size || recv.len() < n || send.dtype() != recv.dtype() {
            bail!(
                "NCCL reduce_scatter: {} -> {n} over {} ranks",
                send.len(),
                self.size
            );
        }
        // SAFETY: ranges checked above.
        unsafe {
            check(
                "reduce_scatter",
                result::reduce_scatter(
                    at(send, 0),
                    at(recv, 0),
                    n,
                    nccl_type(send.dtype()),
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    self.stream,
                ),
            )?;
        }
        Ok(())
    }

    /// `buf[0 .. n] ← Σ over ranks`.
    fn all_reduce_at(&self, buf: &mut CudaBuf, n: usize) -> Result<()> {
        if n > buf.len() {
            bail!("NCCL all_reduce: {n} elements of {}", buf.len());
        }
        // SAFETY: range checked above.
        unsafe {
            check(
                "all_reduce",
                result::all_reduce(
                    at(buf, 0),
                    at(buf, 0),
                    n,
                    nccl_type(buf.dtype()),
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    self.stream,
                ),
            )?;
        }
        Ok(())
    }

    /// Send `send[0 .. n]` to `to` and receive `from`'s into `recv[0 .. n]`, as one NCCL group
    /// (so the two directions of a ring step cannot deadlock each other).
    fn exchange_at(
        &self,
        send: &CudaBuf,
        n: usize,
        to: usize,
        recv: &mut CudaBuf,
        from: usize,
        stream: sys::cudaStream_t,
    ) -> Result<()> {
        if n > send.len() || n > recv.len() || send.dtype() != recv.dtype() {
            bail!(
                "NCCL exchange: {n} elements of {} -> {}",
                send.len(),
                recv.len()
            );
        }
        let ty = nccl_type(send.dtype());
        check("group start", result::group_start())?;
        // SAFETY: ranges checked above; the group is closed below whatever happens.
        let sent = unsafe { result::send(at(send, 0), n, ty, to as i32, self.comm, stream) };
        let got = unsafe { result::recv(at(recv, 0), n, ty, from as i32, self.comm, stream) };
        let end = result::group_end();
        check("send", sent)?;
        check("recv", got)?;
        check("group end", end)?;
        Ok(())
    }
}

/// One of the model's communicators on GPUs: the host `Comm` for host data, NCCL for device
/// buffers (see the module comment).
pub struct NcclGroup {
    host: Box<AnyComm>,
    nccl: NcclComm,
    /// The backend's compute stream, and the stream the ring's exchanges run on: a transfer
    /// starts when the compute stream reaches it (an event) and the compute stream waits for
    /// its end (another event) only where the received block is used — so the next block
    /// travels while this one's attention runs, with no host synchronisation.
    compute: Arc<CudaStream>,
    ring: Arc<CudaStream>,
}

impl NcclGroup {
    /// Join NCCL over `host`'s ranks (collective over them).
    pub fn new(b: &CudaBackend, host: AnyComm) -> Result<Self> {
        let nccl = NcclComm::from_group(b, &host)?;
        let compute = b.stream().clone();
        let ring = compute
            .fork()
            .map_err(|e| anyhow!("creating the communication stream: {e:?}"))?;
        Ok(NcclGroup {
            host: Box::new(host),
            nccl,
            compute,
            ring,
        })
    }
}

/// A ring transfer on the communication stream: waiting makes the compute stream wait for it.
struct JoinCompute {
    compute: Arc<CudaStream>,
    done: CudaEvent,
}

impl PendingDevice for JoinCompute {
    fn wait(self: Box<Self>) {
        if let Err(e) = self.compute.wait(&self.done) {
            panic!("ordering the compute stream after a ring transfer: {e:?}");
        }
    }
}

/// The CUDA buffers behind a generic backend's, when the backend is the CUDA one.
fn cuda<B: Backend>(buf: &B::Buf) -> Option<&CudaBuf> {
    (buf as &dyn Any).downcast_ref::<CudaBuf>()
}
fn cuda_mut<B: Backend>(buf: &mut B::Buf) -> Option<&mut CudaBuf> {
    (buf as &mut dyn Any).downcast_mut::<CudaBuf>()
}

impl Comm for NcclGroup {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn size(&self) -> usize {
        self.host.size()
    }
    fn all_reduce<T: Elem>(&self, buf: &mut [T], op: ReduceOp) {
        self.host.all_reduce(buf, op)
    }
    fn all_gather<T: Elem>(&self, send: &[T], recv: &mut [T]) {
        self.host.all_gather(send, recv)
    }
    fn reduce_scatter<T: Elem>(&self, send: &[T], recv: &mut [T]) {
        self.host.reduce_scatter(send, recv)
    }
    fn broadcast<T: Elem>(&self, buf: &mut [T], root: usize) {
        self.host.broadcast(buf, root)
    }
    fn barrier(&self) {
        self.host.barrier()
    }
    fn exchange_start<T: Elem>(
        &self,
        send: Vec<T>,
        to: usize,
        recv: Vec<T>,
        from: usize,
    ) -> Exchange<T> {
        self.host.exchange_start(send, to, recv, from)
    }
    fn wait_clock(&self) -> &WaitClock {
        self.host.wait_clock()
    }
    fn buf_path(&self) -> &'static str {
        "nccl"
    }

    fn all_gather_buf<B: Backend>(
        &self,
        b: &B,
        send: &B::Buf,
        off: usize,
        n: usize,
        recv: &mut B::Buf,
    ) {
        let Some(s) = cuda::<B>(send) else {
            return self.host.all_gather_buf(b, send, off, n, recv);
        };
        let r = cuda_mut::<B>(recv).expect("send and recv come from one backend");
        b.annotate(Annotation::CommBegin {
            elems: n * self.size(),
        });
        must("NCCL all_gather", self.nccl.all_gather_at(s, off, n, r));
        b.annotate(Annotation::CommEnd);
    }
    fn reduce_scatter_buf<B: Backend>(
        &self,
        b: &B,
        send: &B::Buf,
        n: usize,
        recv: &mut B::Buf,
        accumulate: bool,
    ) {
        let Some(s) = cuda::<B>(send) else {
            return self.host.reduce_scatter_buf(b, send, n, recv, accumulate);
        };
        b.annotate(Annotation::CommBegin {
            elems: n * self.size(),
        });
        if accumulate {
            // NCCL writes, it does not add: reduce into a scratch block, then add it.
            let mut tmp = b.zeros(n);
            let t = cuda_mut::<B>(&mut tmp).expect("a CUDA backend makes CUDA buffers");
            must("NCCL reduce_scatter", self.nccl.reduce_scatter_at(s, n, t));
            b.add_at(recv, 0, &tmp, 0, n);
        } else {
            let r = cuda_mut::<B>(recv).expect("send and recv come from one backend");
            must("NCCL reduce_scatter", self.nccl.reduce_scatter_at(s, n, r));
        }
        b.annotate(Annotation::CommEnd);
    }
    fn all_reduce_buf<B: Backend>(&self, b: &B, buf: &mut B::Buf, n: usize) {
        if cuda::<B>(buf).is_none() {
            return self.host.all_reduce_buf(b, buf, n);
        }
        let r = cuda_mut::<B>(buf).expect("checked above");
        b.annotate(Annotation::CommBegin { elems: n });
        must("NCCL all_reduce", self.nccl.all_reduce_at(r, n));
        b.annotate(Annotation::CommEnd);
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
        let Some(s) = cuda::<B>(send) else {
            return self.host.exchange_buf_start(b, send, n, to, recv, from);
        };
        let r = cuda_mut::<B>(recv).expect("send and recv come from one backend");
        b.annotate(Annotation::CommBegin { elems: n });
        let started = (|| -> Result<CudaEvent> {
            let ready = self
                .compute
                .record_event(None)
                .map_err(|e| anyhow!("{e:?}"))?;
            self.ring.wait(&ready).map_err(|e| anyhow!("{e:?}"))?;
            let stream = self.ring.cu_stream() as sys::cudaStream_t;
            self.nccl.exchange_at(s, n, to, r, from, stream)?;
            self.ring.record_event(None).map_err(|e| anyhow!("{e:?}"))
        })();
        b.annotate(Annotation::CommEnd);
        let done = started.unwrap_or_else(|e| panic!("NCCL ring exchange: {e:#}"));
        let join = JoinCompute {
            compute: self.compute.clone(),
            done,
        };
        BufExchange::device(recv, n, Box::new(join))
    }
}

/// Why the buffer collectives of a run take the path they take: one line for the start-up log.
pub struct CommChoice {
    pub path: &'static str,
    pub why: String,
}

/// Move every group of `topo` onto NCCL when that can work — NCCL loads on every rank, no two
/// ranks of the world share a GPU (NCCL refuses that), and `ULTRALONG_COMM` is not `mpi` —
/// else keep the host-staged MPI path. Collective over the world; every rank decides the same.
pub fn device_collectives(
    mut topo: crate::parallel::topology::Topology,
    b: &CudaBackend,
) -> Result<(crate::parallel::topology::Topology, CommChoice)> {
    let keep = |topo, why: String| {
        Ok((
            topo,
            CommChoice {
                path: "host-staged MPI",
                why,
            },
        ))
    };
    if topo.world.size() == 1 {
        return keep(topo, "one rank: nothing to communicate".into());
    }
    let asked_mpi = std::env::var("ULTRALONG_COMM").is_ok_and(|v| v == "mpi");
    // SAFETY: only tries to load libnccl.
    let present = unsafe { sys::is_culib_present() };
    // Every rank's (host, GPU), to find ranks sharing one; and the flags, agreed by all.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host_hash = host.trim().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
        (h ^ c as u64).wrapping_mul(0x100_0000_01b3)
    });
    let me = [
        host_hash,
        b.context().ordinal() as u64,
        asked_mpi as u64,
        (!present) as u64,
    ];
    let mut all = vec![0u64; 4 * topo.world.size()];
    topo.world.all_gather(&me, &mut all);
    if all.chunks(4).any(|x| x[2] == 1) {
        return keep(topo, "ULTRALONG_COMM=mpi".into());
    }
    if let Some(r) = all.chunks(4).position(|x| x[3] == 1) {
        return keep(
            topo,
            format!("NCCL (libnccl.so.2) could not be loaded on world rank {r}"),
        );
    }
    let mut seen = std::collections::BTreeMap::new();
    for (r, x) in all.chunks(4).enumerate() {
        if let Some(first) = seen.insert((x[0], x[1]), r) {
            return keep(
                topo,
                format!(
                    "world ranks {first} and {r} share GPU {} of one node (NCCL needs one GPU per rank)",
                    x[1]
                ),
            );
        }
    }
    let join = |c: &mut AnyComm| -> Result<()> {
        let host = std::mem::replace(c, AnyComm::Single(Default::default()));
        *c = AnyComm::Nccl(NcclGroup::new(b, host)?);
        Ok(())
    };
    join(&mut topo.tp)?;
    join(&mut topo.cp)?;
    join(&mut topo.dp)?;
    join(&mut topo.dpcp)?;
    join(&mut topo.world)?;
    Ok((
        topo,
        CommChoice {
            path: "nccl",
            why: "one GPU per rank, NCCL loaded".into(),
        },
    ))
}

/// The NCCL path with a world of one rank (gpu-check `--only nccl`): every buffer collective of
/// `NcclGroup` on real CUDA buffers against its definition — offsets, the residual add of the
/// reduce-scatter, the ring exchange on the communication stream (read after `wait_buf`, through
/// the compute stream). Rows are (name, max abs error, tolerance).
pub fn world_of_one_checks(b: &CudaBackend) -> Result<Vec<(String, f64, f64)>> {
    let g = NcclGroup::new(b, AnyComm::Single(Default::default()))?;
    let mut rows = vec![];
    let mut row = |name: &str, got: Vec<f32>, want: &[f32]| {
        let err = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(
                if got.len() == want.len() {
                    0.0
                } else {
                    f64::INFINITY
                },
                f64::max,
            );
        rows.push((format!("nccl world 1: {name}"), err, 0.0));
    };
    let src = b.upload(&[9.0, 1.0, 2.0, 3.0]);
    let mut recv = b.zeros(3);
    g.all_gather_buf(b, &src, 1, 3, &mut recv);
    row(
        "all_gather at an offset",
        b.download(&recv),
        &[1.0, 2.0, 3.0],
    );
    let mut out = b.upload(&[1.0, 1.0, 1.0, 1.0]);
    g.reduce_scatter_buf(b, &src, 4, &mut out, true);
    row(
        "reduce_scatter + residual",
        b.download(&out),
        &[10.0, 2.0, 3.0, 4.0],
    );
    g.reduce_scatter_buf(b, &src, 4, &mut out, false);
    row("reduce_scatter", b.download(&out), &[9.0, 1.0, 2.0, 3.0]);
    let mut all = b.upload(&[4.0, 5.0]);
    g.all_reduce_buf(b, &mut all, 2);
    row("all_reduce", b.download(&all), &[4.0, 5.0]);
    let mut got = b.zeros(4);
    let x = g.exchange_buf_start(b, &src, 3, 0, &mut got, 0);
    g.wait_buf(b, x);
    row(
        "ring exchange to itself",
        b.download(&got),
        &[9.0, 1.0, 2.0, 0.0],
    );
    rows.push((
        format!("nccl world 1: buffer path is nccl ({})", g.buf_path()),
        if g.buf_path() == "nccl" { 0.0 } else { 1.0 },
        0.0,
    ));
    Ok(rows)
}
