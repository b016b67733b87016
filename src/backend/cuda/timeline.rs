//! The device clock of `backend::timed::Timed` on a GPU: each mark is a CUDA event recorded on the
//! backend's stream (after all work issued so far), read after a synchronisation when the report
//! is resolved — so a phase's time is the device's time between its marks, not the launch's.
//! Events are kept in a pool and reused across resets (a 4M step makes tens of thousands).

use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};

use crate::backend::timed::PhaseClock;

pub struct EventClock {
    stream: Arc<CudaStream>,
    /// (pool of events, how many of them are marks of the current report)
    events: Mutex<(Vec<CudaEvent>, usize)>,
}

impl EventClock {
    pub fn new(b: &super::CudaBackend) -> Self {
        EventClock {
            stream: b.stream().clone(),
            events: Mutex::new((Vec::new(), 0)),
        }
    }
}

fn fail(what: &str, e: impl std::fmt::Debug) -> ! {
    // A failed event call means the device is in an error state: the run cannot continue and
    // the message says where it stopped.
    panic!("CUDA timeline: {what}: {e:?}")
}

impl PhaseClock for EventClock {
    fn mark(&self) -> usize {
        let mut g = self.events.lock().unwrap();
        let (pool, used) = &mut *g;
        if *used == pool.len() {
            let e = self
                .stream
                .context()
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap_or_else(|e| fail("creating an event", e));
            pool.push(e);
        }
        pool[*used]
            .record(&self.stream)
            .unwrap_or_else(|e| fail("recording an event", e));
        *used += 1;
        *used - 1
    }

    fn resolve(&self) -> Vec<f64> {
        let g = self.events.lock().unwrap();
        let (pool, used) = &*g;
        let Some(first) = pool[..*used].first() else {
            return Vec::new();
        };
        pool[..*used]
            .iter()
            .map(|e| {
                first
                    .elapsed_ms(e)
                    .map(|ms| ms as f64 * 1e-3)
                    .unwrap_or_else(|err| fail("reading an event", err))
            })
            .collect()
    }

    fn reset(&self) {
        self.events.lock().unwrap().1 = 0;
    }
}
