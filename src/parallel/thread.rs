//! `ThreadComm`: a world of N ranks as N threads of one process, for unit tests of the parallel
//! algorithms (ring attention, tensor-parallel pairs) without `mpirun`.
//!
//! Every collective is a rendezvous: each rank deposits its contribution, the last to arrive
//! publishes all of them, and every rank computes its result from the same contributions in rank
//! order, so reductions are bitwise identical on every rank (and independent of arrival order).
//! Point-to-point sends are buffered in mailboxes keyed by (from, to), FIFO per pair, so a ring
//! where every rank sends then receives cannot deadlock.
//!
//! A panic on one rank wakes the others (they panic with "another rank panicked") and
//! `ThreadComm::run` re-raises the first rank's own panic.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::panic;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::any::AnyComm;
use super::comm::{Comm, Elem, Exchange, PendingExchange, ReduceOp, WaitClock};

type Item = Box<dyn Any + Send + Sync>;

/// How often a blocked rank looks at the family's panic flag.
const POLL: Duration = Duration::from_millis(50);

/// The payload of the panic raised on ranks woken by another rank's panic; `run` prefers the
/// original payload when re-raising.
struct PeerPanicked;

/// One communicator's shared state (the world, or one group of a split).
struct Group {
    size: usize,
    /// Set when any thread of the whole family (parent and split groups) panicked.
    poisoned: Arc<AtomicBool>,
    coll: Mutex<Rendezvous>,
    coll_cv: Condvar,
    mail: Mutex<HashMap<(usize, usize), VecDeque<Item>>>,
    mail_cv: Condvar,
}

struct Rendezvous {
    /// Rounds completed so far.
    round: u64,
    arrived: usize,
    slots: Vec<Option<Item>>,
    /// The contributions of the last completed round, in rank order. Stays valid until every rank
    /// has read it: the next round cannot complete before all ranks arrive at it.
    published: Arc<Vec<Item>>,
}

impl Group {
    fn new(size: usize, poisoned: Arc<AtomicBool>) -> Arc<Group> {
        Arc::new(Group {
            size,
            poisoned,
            coll: Mutex::new(Rendezvous {
                round: 0,
                arrived: 0,
                slots: (0..size).map(|_| None).collect(),
                published: Arc::new(Vec::new()),
            }),
            coll_cv: Condvar::new(),
            mail: Mutex::new(HashMap::new()),
            mail_cv: Condvar::new(),
        })
    }

    fn check_poison(&self) {
        if self.poisoned.load(Ordering::SeqCst) {
            panic::panic_any(PeerPanicked);
        }
    }

    fn poison(&self) {
        self.poisoned.store(true, Ordering::SeqCst);
        self.coll_cv.notify_all();
        self.mail_cv.notify_all();
    }
}

/// Lock, ignoring std's lock poisoning: no code panics while holding these locks, and rank panics
/// are handled by the family flag instead.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One rank of a thread world. `Send` (it may be created on one thread and used on another) but
/// not `Sync`, like every `Comm`.
pub struct ThreadComm {
    rank: usize,
    group: Arc<Group>,
    clock: WaitClock,
}

/// Marks the family poisoned when the owning thread unwinds.
struct PoisonOnPanic(Arc<Group>);

impl Drop for PoisonOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.poison();
        }
    }
}

impl ThreadComm {
    /// The `n` ranks of a new thread world, in rank order. Each must be driven by its own thread;
    /// prefer `run`, which also turns a panic on one rank into a panic of the whole run.
    pub fn world(n: usize) -> Vec<ThreadComm> {
        assert!(n >= 1, "ThreadComm: a world needs at least one rank");
        let group = Group::new(n, Arc::new(AtomicBool::new(false)));
        (0..n)
            .map(|rank| ThreadComm {
                rank,
                group: group.clone(),
                clock: WaitClock::default(),
            })
            .collect()
    }

    /// Run `f` on `n` ranks, one scoped thread each, and return the results in rank order. A panic
    /// on any rank wakes the ranks blocked on it and is re-raised here (the first rank's own
    /// panic, not the secondary "another rank panicked" ones).
    pub fn run<R, F>(n: usize, f: F) -> Vec<R>
    where
        R: Send,
        F: Fn(AnyComm) -> R + Sync,
    {
        let comms = ThreadComm::world(n);
        let f = &f;
        let outcomes: Vec<std::thread::Result<R>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let guard = PoisonOnPanic(c.group.clone());
                    std::thread::Builder::new()
                        .name(format!("rank{}", c.rank))
                        .spawn_scoped(s, move || {
                            let _guard = guard;
                            f(AnyComm::Thread(c))
                        })
                        .expect("ThreadComm: cannot spawn a rank thread")
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        let mut results = Vec::with_capacity(n);
        let mut first_panic: Option<Box<dyn Any + Send>> = None;
        for o in outcomes {
            match o {
                Ok(r) => results.push(r),
                Err(p) => {
                    let secondary = p.is::<PeerPanicked>();
                    let have_primary = first_panic
                        .as_ref()
                        .is_some_and(|q| !q.is::<PeerPanicked>());
                    if first_panic.is_none() || (!secondary && !have_primary) {
                        first_panic = Some(p);
                    }
                }
            }
        }
        if let Some(p) = first_panic {
            panic::resume_unwind(p);
        }
        results
    }

    /// Split into sub-communicators, collectively over this one (`MPI_Comm_split` semantics):
    /// ranks with the same `color` form a group, ordered by `key`, then by rank here.
    pub fn split(&self, color: usize, key: usize) -> ThreadComm {
        let all = self.gather_items(Box::new((color, key)));
        let members: Vec<(usize, usize)> = (0..self.size())
            .map(|r| *all[r].downcast_ref::<(usize, usize)>().unwrap())
            .collect();
        let mut mine: Vec<usize> = (0..self.size())
            .filter(|&r| members[r].0 == color)
            .collect();
        mine.sort_by_key(|&r| (members[r].1, r));
        let new_rank = mine.iter().position(|&r| r == self.rank).unwrap();
        // The group's first member creates its shared state; a second round hands it out.
        let leader = mine[0];
        let created: Option<Arc<Group>> =
            (new_rank == 0).then(|| Group::new(mine.len(), self.group.poisoned.clone()));
        let all = self.gather_items(Box::new(created));
        let group = all[leader]
            .downcast_ref::<Option<Arc<Group>>>()
            .unwrap()
            .clone()
            .expect("ThreadComm::split: the leader published no group");
        ThreadComm {
            rank: new_rank,
            group,
            clock: WaitClock::default(),
        }
    }

    /// The rendezvous: deposit `item`, wait for every rank's, get all of them in rank order.
    fn gather_items(&self, item: Item) -> Arc<Vec<Item>> {
        let g = &*self.group;
        g.check_poison();
        let mut st = lock(&g.coll);
        let round = st.round;
        debug_assert!(
            st.slots[self.rank].is_none(),
            "rank entered a collective twice"
        );
        st.slots[self.rank] = Some(item);
        st.arrived += 1;
        if st.arrived == g.size {
            let items: Vec<Item> = st.slots.iter_mut().map(|s| s.take().unwrap()).collect();
            st.published = Arc::new(items);
            st.arrived = 0;
            st.round += 1;
            g.coll_cv.notify_all();
            return st.published.clone();
        }
        while st.round == round {
            st = g
                .coll_cv
                .wait_timeout(st, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if st.round == round && g.poisoned.load(Ordering::SeqCst) {
                drop(st);
                panic::panic_any(PeerPanicked);
            }
        }
        st.published.clone()
    }

    /// Every rank's `v`, in rank order.
    fn gather_vecs<T: Elem>(&self, v: Vec<T>) -> Arc<Vec<Item>> {
        self.gather_items(Box::new(v))
    }
}

fn as_vec<T: Elem>(item: &Item) -> &Vec<T> {
    item.downcast_ref::<Vec<T>>()
        .expect("ThreadComm: ranks called different collectives or element types")
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.group.poison();
        }
    }
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.group.size
    }

    fn all_reduce<T: Elem>(&self, buf: &mut [T], op: ReduceOp) {
        let all = self.gather_vecs(buf.to_vec());
        for (r, item) in all.iter().enumerate() {
            let v = as_vec::<T>(item);
            assert_eq!(
                v.len(),
                buf.len(),
                "all_reduce: ranks passed different lengths"
            );
            if r == 0 {
                buf.copy_from_slice(v);
                continue;
            }
            for (b, &x) in buf.iter_mut().zip(v) {
                *b = match op {
                    ReduceOp::Sum => b.add(x),
                    ReduceOp::Max => b.max_of(x),
                };
            }
        }
    }

    fn all_gather<T: Elem>(&self, send: &[T], recv: &mut [T]) {
        let n = send.len();
        assert_eq!(
            recv.len(),
            n * self.size(),
            "all_gather: recv.len() != send.len() * size"
        );
        let all = self.gather_vecs(send.to_vec());
        for (r, item) in all.iter().enumerate() {
            let v = as_vec::<T>(item);
            assert_eq!(v.len(), n, "all_gather: ranks passed different lengths");
            recv[r * n..(r + 1) * n].copy_from_slice(v);
        }
    }

    fn reduce_scatter<T: Elem>(&self, send: &[T], recv: &mut [T]) {
        let n = recv.len();
        assert_eq!(
            send.len(),
            n * self.size(),
            "reduce_scatter: send.len() != recv.len() * size"
        );
        let all = self.gather_vecs(send.to_vec());
        let block = self.rank * n..(self.rank + 1) * n;
        for (r, item) in all.iter().enumerate() {
            let v = as_vec::<T>(item);
            assert_eq!(
                v.len(),
                send.len(),
                "reduce_scatter: ranks passed different lengths"
            );
            if r == 0 {
                recv.copy_from_slice(&v[block.clone()]);
            } else {
                for (b, &x) in recv.iter_mut().zip(&v[block.clone()]) {
                    *b = b.add(x);
                }
            }
        }
    }

    fn broadcast<T: Elem>(&self, buf: &mut [T], root: usize) {
        assert!(root < self.size(), "broadcast: root {root} out of range");
        let mine = if self.rank == root {
            buf.to_vec()
        } else {
            Vec::new()
        };
        let all = self.gather_vecs(mine);
        if self.rank != root {
            let v = as_vec::<T>(&all[root]);
            assert_eq!(
                v.len(),
                buf.len(),
                "broadcast: ranks passed different lengths"
            );
            buf.copy_from_slice(v);
        }
    }

    fn barrier(&self) {
        self.gather_items(Box::new(()));
    }

    fn exchange_start<T: Elem>(
        &self,
        send: Vec<T>,
        to: usize,
        recv: Vec<T>,
        from: usize,
    ) -> Exchange<T> {
        let size = self.size();
        assert!(
            to < size && from < size,
            "exchange: rank out of range (size {size})"
        );
        self.group.check_poison();
        {
            let mut mail = lock(&self.group.mail);
            mail.entry((self.rank, to))
                .or_default()
                .push_back(Box::new(send.clone()));
        }
        self.group.mail_cv.notify_all();
        Exchange::new(Box::new(ThreadPending {
            group: self.group.clone(),
            key: (from, self.rank),
            send,
            recv,
        }))
    }

    fn wait_clock(&self) -> &WaitClock {
        &self.clock
    }
}

/// An exchange in flight: the send is already in the peer's mailbox; `wait` takes the message
/// from `from` out of ours.
struct ThreadPending<T> {
    group: Arc<Group>,
    key: (usize, usize),
    send: Vec<T>,
    recv: Vec<T>,
}

impl<T: Elem> PendingExchange<T> for ThreadPending<T> {
    fn wait(self: Box<Self>) -> (Vec<T>, Vec<T>) {
        let ThreadPending {
            group,
            key,
            send,
            mut recv,
        } = *self;
        let msg = {
            let mut mail = lock(&group.mail);
            loop {
                if let Some(m) = mail.get_mut(&key).and_then(|q| q.pop_front()) {
                    break m;
                }
                if group.poisoned.load(Ordering::SeqCst) {
                    drop(mail);
                    // Waiting inside `Exchange`'s drop during another panic must not panic again.
                    if std::thread::panicking() {
                        return (send, recv);
                    }
                    panic::panic_any(PeerPanicked);
                }
                mail = group
                    .mail_cv
                    .wait_timeout(mail, POLL)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        let v = msg
            .downcast::<Vec<T>>()
            .expect("exchange: the peer sent another element type");
        assert_eq!(
            v.len(),
            recv.len(),
            "exchange: rank {} sent {} elements, rank {} expected {}",
            key.0,
            v.len(),
            key.1,
            recv.len()
        );
        recv.copy_from_slice(&v);
        (send, recv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value that differs per rank and element, with fractional parts so summation order shows.
    fn val(rank: usize, i: usize) -> f64 {
        ((rank * 31 + i * 7) % 13) as f64 * 0.1 + rank as f64 * 1e-3 + 0.37
    }

    #[test]
    fn all_reduce_sum_and_max() {
        let n = 5;
        let len = 9;
        let out = ThreadComm::run(n, |c| {
            let mut s: Vec<f64> = (0..len).map(|i| val(c.rank(), i)).collect();
            c.all_reduce(&mut s, ReduceOp::Sum);
            let mut m: Vec<f32> = (0..len).map(|i| val(c.rank(), i) as f32).collect();
            c.all_reduce(&mut m, ReduceOp::Max);
            let mut u: Vec<u64> = (0..len).map(|i| (c.rank() * 100 + i) as u64).collect();
            c.all_reduce(&mut u, ReduceOp::Sum);
            (s, m, u)
        });
        let want_s: Vec<f64> = (0..len)
            .map(|i| (1..n).fold(val(0, i), |a, r| a + val(r, i)))
            .collect();
        let want_m: Vec<f32> = (0..len)
            .map(|i| (0..n).map(|r| val(r, i) as f32).fold(f32::MIN, f32::max))
            .collect();
        let want_u: Vec<u64> = (0..len)
            .map(|i| (0..n).map(|r| (r * 100 + i) as u64).sum())
            .collect();
        for (s, m, u) in &out {
            // Bitwise: summed in rank order on every rank.
            assert_eq!(s, &want_s);
            assert_eq!(m, &want_m);
            assert_eq!(u, &want_u);
        }
    }

    #[test]
    fn all_gather_and_reduce_scatter() {
        let n = 4;
        let m = 3;
        let out = ThreadComm::run(n, |c| {
            let send: Vec<i32> = (0..m).map(|i| (c.rank() * 10 + i) as i32).collect();
            let mut g = vec![0i32; m * n];
            c.all_gather(&send, &mut g);
            let rs_send: Vec<f32> = (0..m * n)
                .map(|i| (c.rank() + 1) as f32 * i as f32)
                .collect();
            let mut rs = vec![0f32; m];
            c.reduce_scatter(&rs_send, &mut rs);
            (g, rs)
        });
        let want_g: Vec<i32> = (0..n)
            .flat_map(|r| (0..m).map(move |i| (r * 10 + i) as i32))
            .collect();
        // Σ_r (r+1) * i = i * n(n+1)/2 for global index i.
        let tri = (n * (n + 1) / 2) as f32;
        for (rank, (g, rs)) in out.iter().enumerate() {
            assert_eq!(g, &want_g);
            let want_rs: Vec<f32> = (0..m).map(|j| (rank * m + j) as f32 * tri).collect();
            assert_eq!(rs, &want_rs, "rank {rank}");
        }
    }

    #[test]
    fn broadcast_from_each_root() {
        let n = 3;
        let out = ThreadComm::run(n, |c| {
            (0..n)
                .map(|root| {
                    let mut b: Vec<u8> = vec![c.rank() as u8; 4];
                    c.broadcast(&mut b, root);
                    b
                })
                .collect::<Vec<_>>()
        });
        for per_rank in out {
            for (root, b) in per_rank.iter().enumerate() {
                assert_eq!(b, &vec![root as u8; 4]);
            }
        }
    }

    #[test]
    fn zero_length_buffers() {
        let out = ThreadComm::run(3, |c| {
            let mut e: Vec<f32> = Vec::new();
            c.all_reduce(&mut e, ReduceOp::Sum);
            let mut g: Vec<f32> = Vec::new();
            c.all_gather(&[], &mut g);
            c.reduce_scatter(&[], &mut g);
            c.broadcast(&mut e, 1);
            let x = c.exchange_start(
                Vec::<f32>::new(),
                (c.rank() + 1) % 3,
                Vec::new(),
                (c.rank() + 2) % 3,
            );
            let (s, r) = c.wait(x);
            s.len() + r.len()
        });
        assert_eq!(out, vec![0, 0, 0]);
    }

    /// 6 ranks → tensor-parallel pairs (color rank / 2) and the orthogonal groups of 3
    /// (color rank % 2, keyed in reverse to check the key order).
    #[test]
    fn split_into_tp_pairs_and_rest() {
        let tp = 2;
        let n = 6;
        let out = ThreadComm::run(n, |c| {
            let r = c.rank();
            let pair = c.split(r / tp, r % tp);
            let rest = c.split(r % tp, n - r);
            let mut s = vec![r as u64 + 1];
            pair.all_reduce(&mut s, ReduceOp::Sum);
            let mut g = vec![0u64; rest.size()];
            rest.all_gather(&[r as u64], &mut g);
            (pair.rank(), pair.size(), s[0], rest.rank(), rest.size(), g)
        });
        for (r, (pr, ps, s, rr, rs, g)) in out.into_iter().enumerate() {
            assert_eq!((pr, ps), (r % tp, tp), "rank {r}");
            let base = r - r % tp;
            assert_eq!(s, (base + 1 + base + 2) as u64, "rank {r}");
            assert_eq!(rs, n / tp);
            // Same parity, ordered by descending world rank.
            let mut want: Vec<u64> = (0..n)
                .filter(|q| q % tp == r % tp)
                .map(|q| q as u64)
                .collect();
            want.reverse();
            assert_eq!(g, want, "rank {r}");
            assert_eq!(rr, want.iter().position(|&q| q == r as u64).unwrap());
        }
    }

    /// Every rank sends to next and receives from prev, twice in flight, then walks the full ring.
    #[test]
    fn ring_exchange_around_four() {
        let n = 4;
        let len = 5;
        let out = ThreadComm::run(n, |c| {
            let (me, next, prev) = (c.rank(), (c.rank() + 1) % n, (c.rank() + n - 1) % n);
            // Two exchanges in flight to the same peer arrive in order.
            let a = c.exchange_start(vec![me as f32; len], next, vec![0f32; len], prev);
            let b = c.exchange_start(vec![me as f32 + 0.5; len], next, vec![0f32; len], prev);
            let (_, ra) = c.wait(a);
            let (_, rb) = c.wait(b);
            // Pass a block around the whole ring: after k steps we hold rank (me - k)'s block.
            let mut cur: Vec<f32> = (0..len).map(|i| (me * 100 + i) as f32).collect();
            let mut seen = vec![cur[0]];
            let mut spare = vec![0f32; len];
            for _ in 1..n {
                let x = c.exchange_start(cur, next, spare, prev);
                let (s, r) = c.wait(x);
                spare = s;
                cur = r;
                seen.push(cur[0]);
            }
            (ra, rb, seen, cur)
        });
        for (me, (ra, rb, seen, cur)) in out.into_iter().enumerate() {
            let prev = (me + n - 1) % n;
            assert_eq!(ra, vec![prev as f32; len]);
            assert_eq!(rb, vec![prev as f32 + 0.5; len]);
            let want: Vec<f32> = (0..n).map(|k| (((me + n - k) % n) * 100) as f32).collect();
            assert_eq!(seen, want);
            // After n-1 steps: the block of rank me+1.
            let src = (me + 1) % n;
            assert_eq!(
                cur,
                (0..len).map(|i| (src * 100 + i) as f32).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn results_in_rank_order_and_single_rank() {
        assert_eq!(
            ThreadComm::run(5, |c| c.rank() * 10),
            vec![0, 10, 20, 30, 40]
        );
        let one = ThreadComm::run(1, |c| {
            let mut b = vec![2.5f32];
            c.all_reduce(&mut b, ReduceOp::Sum);
            c.barrier();
            (c.size(), b[0])
        });
        assert_eq!(one, vec![(1, 2.5)]);
    }

    #[test]
    fn panic_on_one_rank_propagates_without_deadlock() {
        let r = panic::catch_unwind(|| {
            ThreadComm::run(4, |c| {
                if c.rank() == 2 {
                    panic!("rank two failed");
                }
                // The others block in a collective and a receive that never complete.
                c.barrier();
                let x = c.exchange_start(vec![1u8], 2, vec![0u8], 2);
                c.wait(x);
            })
        });
        let p = r.expect_err("the panic must propagate");
        let msg = p.downcast_ref::<&str>().copied().unwrap_or("");
        assert_eq!(msg, "rank two failed");
    }
}
