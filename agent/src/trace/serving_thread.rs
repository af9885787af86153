//! Which request a thread is serving at a given moment, for log lines it writes then: the same
//! unambiguity rule as in-process parents (`parent.rs`), plus the moment right after a response,
//! when servers write their access log. A wrong link is a defect, a missing one a counted limit:
//! - the thread's latest server event is the start of a request, and it is the only request in
//!   flight on the thread: that request;
//! - the thread's latest server event is the end of a response it wrote, and no request is in
//!   flight on it: that request, until the thread reads from a server connection again;
//! - several requests in flight on the thread (event loops): none, counted as ambiguous;
//! - nothing yet, or the request finished on another thread: outside any request.

use foldhash::HashMap;

use super::{context::Lineage, parent::InFlightServers};

/// Threads remembered; beyond, the record of finished requests is forgotten (their late log
/// lines then carry no trace: a limit, never a wrong link).
const MAX_THREADS: usize = 65536;

#[derive(Clone, Copy, Debug)]
enum Latest {
    Started,
    /// The thread wrote the end of this request's response.
    Answered(Lineage),
}

/// What a log line written now by a thread belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServingLink {
    Request(Lineage),
    /// The thread serves no request now.
    Outside,
    /// Several requests could own the line.
    Ambiguous,
}

/// A record that shares its write with other records gets no trace (see `logs::lines`); it
/// counts as ambiguous when the thread was serving a request.
impl crate::logs::lines::Unproven for ServingLink {
    fn unproven(&self) -> Self {
        match self {
            ServingLink::Outside => ServingLink::Outside,
            _ => ServingLink::Ambiguous,
        }
    }
}

#[derive(Default)]
pub struct ServingThreads {
    latest: HashMap<(u32, u32), Latest>,
}

impl ServingThreads {
    /// Thread `tid` read the head of a server request.
    pub fn started(&mut self, pid: u32, tid: u32) {
        self.set(pid, tid, Latest::Started);
    }

    /// Thread `tid` wrote the end of a server response.
    pub fn answered(&mut self, pid: u32, tid: u32, lineage: Lineage) {
        self.set(pid, tid, Latest::Answered(lineage));
    }

    /// Thread `tid` read from a server connection: whatever it answered before is behind it.
    pub fn server_read(&mut self, pid: u32, tid: u32) {
        if let Some(latest @ Latest::Answered(_)) = self.latest.get_mut(&(pid, tid)) {
            *latest = Latest::Started;
        }
    }

    pub fn remove_process(&mut self, pid: u32) {
        self.latest.retain(|(p, _), _| *p != pid);
    }

    /// The request a line written now by thread `tid` of `pid` belongs to.
    pub fn link(&self, pid: u32, tid: u32, in_flight: &InFlightServers) -> ServingLink {
        let (count, first) = in_flight.on_thread(pid, tid);
        match (self.latest.get(&(pid, tid)), count) {
            (None, 0) => ServingLink::Outside,
            (Some(Latest::Answered(lineage)), 0) => ServingLink::Request(*lineage),
            (Some(Latest::Started) | None, 1) => {
                first.map_or(ServingLink::Outside, |s| ServingLink::Request(s.lineage))
            }
            (Some(Latest::Started), 0) => ServingLink::Outside,
            _ => ServingLink::Ambiguous,
        }
    }

    fn set(&mut self, pid: u32, tid: u32, latest: Latest) {
        if self.latest.len() >= MAX_THREADS && !self.latest.contains_key(&(pid, tid)) {
            self.latest.clear();
        }
        self.latest.insert((pid, tid), latest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{
        context::TraceRef,
        ids::{SpanId, TraceId},
        parent::Serving,
    };

    fn lineage(n: u8) -> Lineage {
        Lineage {
            span_id: SpanId([n; 8]),
            parent_id: None,
            trace: TraceRef::Known { trace_id: TraceId([n; 16]), sampled: true },
        }
    }

    fn serving(tid: u32, conn_id: u64, n: u8) -> Serving {
        Serving { tid, conn_id, seq: 0, lineage: lineage(n), target: None, thread_evidence: true }
    }

    #[test]
    fn thread_per_request_and_access_logs() {
        let (mut flight, mut threads) = (InFlightServers::default(), ServingThreads::default());
        assert_eq!(threads.link(1, 10, &flight), ServingLink::Outside);
        flight.start(1, serving(10, 1, 1));
        threads.started(1, 10);
        assert_eq!(threads.link(1, 10, &flight), ServingLink::Request(lineage(1)));
        assert_eq!(threads.link(1, 11, &flight), ServingLink::Outside, "another thread");
        flight.finish(1, 1, 0);
        threads.answered(1, 10, lineage(1));
        assert_eq!(threads.link(1, 10, &flight), ServingLink::Request(lineage(1)), "access log after the response");
        threads.server_read(1, 10);
        assert_eq!(threads.link(1, 10, &flight), ServingLink::Outside, "reading the next request");
    }

    #[test]
    fn event_loops_link_only_when_alone() {
        let (mut flight, mut threads) = (InFlightServers::default(), ServingThreads::default());
        flight.start(1, serving(10, 1, 1));
        threads.started(1, 10);
        flight.start(1, serving(10, 2, 2));
        threads.started(1, 10);
        assert_eq!(threads.link(1, 10, &flight), ServingLink::Ambiguous);
        // One answered while the other is in flight: the line may be either's.
        flight.finish(1, 1, 0);
        threads.answered(1, 10, lineage(1));
        assert_eq!(threads.link(1, 10, &flight), ServingLink::Ambiguous);
        flight.finish(1, 2, 0);
        threads.answered(1, 10, lineage(2));
        assert_eq!(threads.link(1, 10, &flight), ServingLink::Request(lineage(2)));
    }
}
