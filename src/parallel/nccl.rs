//! GPU collectives through NCCL (cudarc, loaded at run time): one communicator per TP/CP/DP group,
//! bootstrapped over the group's existing host `Comm` (MPI): the group's rank 0 makes the NCCL
//! unique id and broadcasts its 128 bytes, every rank then joins with `ncclCommInitRank`.
//!
//! Status (docs/DEVELOPERS.md, CUDA): compiled, not yet wired and not yet run on a GPU. The model
//! code talks to ranks through the host-buffer `Comm` trait, which with the CUDA backend stages
//! device buffers through `read_host`/`write_host` (the host-staged MPI fallback, also what lets
//! several ranks share one GPU in tests). Moving `parallel::tensor`/`context`/`zero` onto device
//! collectives is the step that uses this module.

use anyhow::{Result, anyhow, bail};
use cudarc::nccl::{result, sys};

use crate::backend::cuda::{CudaBackend, CudaBuf, DType};
use crate::parallel::comm::Comm;

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
