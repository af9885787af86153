//! In-process parents: a CLIENT span becomes the child of a SERVER span of its own process only
//! on unambiguous evidence, never on a guess (a wrong parent is a defect, a missing one a known
//! limit). The evidence, in order:
//! 1. exactly one server request is in flight on the thread that makes the call
//!    (thread-per-request servers);
//! 2. among the requests in flight on that thread (or, when it serves none, in the process),
//!    exactly one has the same request target as the outgoing request (HTTP proxies: nginx
//!    forwards `/a/b` upstream as `/a/b`; gRPC relays forward the same method).
//!
//! A request read from an HTTP/2 connection is no evidence for its thread: many streams share
//! one connection, and its reads are made by whichever I/O thread polls it (gRPC's C core, Go,
//! Netty), not by the thread that handles the stream. Such requests count for rule 2 only, over
//! the whole process.
//!
//! Otherwise the span starts its own trace and [`Unlinked`] says why, for the counters.

use std::collections::VecDeque;

use foldhash::HashMap;

use super::{context::Lineage, span::Text};

/// Server requests in flight kept per process; beyond, the oldest is forgotten (its calls then
/// go unparented, which is a counted limit, not a wrong link).
const MAX_IN_FLIGHT_PER_PROCESS: usize = 4096;

/// A server request whose response is not complete yet.
#[derive(Clone, Debug)]
pub struct Serving {
    /// Thread that read the request.
    pub tid: u32,
    /// The connection (its unique id) and the request's position on it.
    pub conn_id: u64,
    pub seq: u64,
    pub lineage: Lineage,
    /// HTTP request target (path and query), for the proxy rule.
    pub target: Option<Text>,
    /// Whether the thread that read the request is the one that serves it (false for
    /// HTTP/2: see the module comment).
    pub thread_evidence: bool,
}

/// Why a client span with server requests in flight in its process got no parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unlinked {
    /// Several requests in flight on the calling thread, and no unique target match.
    Ambiguous,
    /// Requests in flight only on other threads of the process, none with a unique target match.
    OtherThread,
}

impl Unlinked {
    pub fn label(self) -> &'static str {
        match self {
            Unlinked::Ambiguous => "ambiguous",
            Unlinked::OtherThread => "other_thread",
        }
    }
}

/// The parent chosen for a new client span.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Choice {
    Parent(Lineage),
    /// Nothing in flight in the process: the call is a root (a client program, a background job).
    Root,
    Unlinked(Unlinked),
}

impl Serving {
    /// Whether this request is evidence that thread `tid` is serving it.
    fn serves_on(&self, tid: u32) -> bool {
        self.thread_evidence && self.tid == tid
    }
}

/// Per process, oldest first: requests mostly finish in the order they started, so the one
/// that finishes is found near the front and removed without moving the rest.
#[derive(Default)]
pub struct InFlightServers {
    by_pid: HashMap<u32, VecDeque<Serving>>,
}

impl InFlightServers {
    pub fn start(&mut self, pid: u32, serving: Serving) {
        let list = self.by_pid.entry(pid).or_default();
        if list.len() >= MAX_IN_FLIGHT_PER_PROCESS {
            list.pop_front();
        }
        list.push_back(serving);
    }

    /// The request at `seq` on the connection finished (or will never finish).
    pub fn finish(&mut self, pid: u32, conn_id: u64, seq: u64) {
        let Some(list) = self.by_pid.get_mut(&pid) else { return };
        // A (connection, position) pair is started once, so the first match is the only one.
        if let Some(i) = list.iter().position(|s| s.conn_id == conn_id && s.seq == seq) {
            list.remove(i);
        }
        if list.is_empty() {
            self.by_pid.remove(&pid);
        }
    }

    /// The connection closed: nothing on it is in flight any more.
    pub fn close_conn(&mut self, pid: u32, conn_id: u64) {
        self.retain(pid, |s| s.conn_id != conn_id);
    }

    pub fn remove_process(&mut self, pid: u32) {
        self.by_pid.remove(&pid);
    }

    /// Requests in flight, over all processes.
    pub fn count(&self) -> usize {
        self.by_pid.values().map(VecDeque::len).sum()
    }

    fn retain(&mut self, pid: u32, keep: impl Fn(&Serving) -> bool) {
        if let Some(list) = self.by_pid.get_mut(&pid) {
            list.retain(keep);
            if list.is_empty() {
                self.by_pid.remove(&pid);
            }
        }
    }

    /// Requests in flight on thread `tid` of `pid` that the thread serves itself: how many, and
    /// the first.
    pub fn on_thread(&self, pid: u32, tid: u32) -> (usize, Option<&Serving>) {
        let Some(all) = self.by_pid.get(&pid) else { return (0, None) };
        let mut on_thread = all.iter().filter(|s| s.serves_on(tid));
        let first = on_thread.next();
        (first.map_or(0, |_| 1 + on_thread.count()), first)
    }

    /// The parent of a client request that thread `tid` of `pid` starts now, whose HTTP target
    /// is `target`.
    pub fn choose(&self, pid: u32, tid: u32, target: Option<&str>) -> Choice {
        let Some(all) = self.by_pid.get(&pid) else { return Choice::Root };
        let on_thread = all.iter().filter(|s| s.serves_on(tid)).count();
        if on_thread == 1 {
            return all.iter().find(|s| s.serves_on(tid)).map_or(Choice::Root, |s| Choice::Parent(s.lineage));
        }
        let pool = |s: &&Serving| on_thread == 0 || s.serves_on(tid);
        if let Some(target) = target {
            let mut matches = all.iter().filter(pool).filter(|s| s.target.as_deref() == Some(target));
            if let (Some(only), None) = (matches.next(), matches.next()) {
                return Choice::Parent(only.lineage);
            }
        }
        Choice::Unlinked(if on_thread == 0 { Unlinked::OtherThread } else { Unlinked::Ambiguous })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{
        context::TraceRef,
        ids::{SpanId, TraceId},
    };

    fn lineage(n: u8) -> Lineage {
        Lineage {
            span_id: SpanId([n; 8]),
            parent_id: None,
            trace: TraceRef::Known { trace_id: TraceId([n; 16]), sampled: true },
        }
    }

    fn serving(tid: u32, conn_id: u64, n: u8, target: &str) -> Serving {
        Serving { tid, conn_id, seq: 0, lineage: lineage(n), target: Some(target.into()), thread_evidence: true }
    }

    fn http2_serving(tid: u32, conn_id: u64, n: u8, target: &str) -> Serving {
        Serving { thread_evidence: false, ..serving(tid, conn_id, n, target) }
    }

    #[test]
    fn http2_requests_are_no_evidence_for_their_reading_thread() {
        let mut f = InFlightServers::default();
        // An I/O thread read two streams; a handler thread makes the calls.
        f.start(1, http2_serving(10, 1, 1, "/demo.Relay/Call1"));
        assert_eq!(f.choose(1, 10, Some("/other")), Choice::Unlinked(Unlinked::OtherThread), "one stream read there");
        assert_eq!(f.on_thread(1, 10).0, 0);
        f.start(1, http2_serving(10, 1, 2, "/demo.Relay/Call2"));
        // The target links from any thread of the process, the thread that read it included.
        assert_eq!(f.choose(1, 20, Some("/demo.Relay/Call2")), Choice::Parent(lineage(2)));
        assert_eq!(f.choose(1, 10, Some("/demo.Relay/Call1")), Choice::Parent(lineage(1)));
        // An HTTP/1 request read on the calling thread still is evidence, and narrows the pool.
        f.start(1, serving(20, 2, 3, "/plain"));
        assert_eq!(f.choose(1, 20, Some("/demo.Relay/Call2")), Choice::Parent(lineage(3)));
        f.start(1, serving(20, 3, 4, "/plain2"));
        assert_eq!(f.choose(1, 20, Some("/demo.Relay/Call2")), Choice::Unlinked(Unlinked::Ambiguous));
    }

    #[test]
    fn one_request_on_the_thread_is_the_parent() {
        let mut f = InFlightServers::default();
        f.start(1, serving(10, 1, 1, "/a"));
        f.start(1, serving(11, 2, 2, "/b"));
        assert_eq!(f.choose(1, 10, None), Choice::Parent(lineage(1)));
        assert_eq!(f.choose(1, 11, Some("/x")), Choice::Parent(lineage(2)));
        assert_eq!(f.choose(2, 10, None), Choice::Root);
    }

    #[test]
    fn an_event_loop_thread_links_only_on_a_unique_target() {
        let mut f = InFlightServers::default();
        f.start(1, serving(10, 1, 1, "/a"));
        f.start(1, serving(10, 2, 2, "/b"));
        f.start(1, serving(10, 3, 3, "/b"));
        assert_eq!(f.choose(1, 10, Some("/a")), Choice::Parent(lineage(1)));
        assert_eq!(f.choose(1, 10, Some("/b")), Choice::Unlinked(Unlinked::Ambiguous));
        assert_eq!(f.choose(1, 10, None), Choice::Unlinked(Unlinked::Ambiguous));
        f.finish(1, 3, 0);
        assert_eq!(f.choose(1, 10, Some("/b")), Choice::Parent(lineage(2)));
        f.close_conn(1, 2);
        assert_eq!(f.choose(1, 10, Some("/b")), Choice::Parent(lineage(1)), "one left on the thread");
        f.close_conn(1, 1);
        assert_eq!(f.choose(1, 10, None), Choice::Root);
        assert_eq!(f.count(), 0);
    }

    #[test]
    fn requests_of_other_threads_link_only_on_a_unique_target() {
        let mut f = InFlightServers::default();
        f.start(1, serving(10, 1, 1, "/a"));
        assert_eq!(f.choose(1, 99, Some("/b")), Choice::Unlinked(Unlinked::OtherThread));
        assert_eq!(f.choose(1, 99, None), Choice::Unlinked(Unlinked::OtherThread));
        assert_eq!(f.choose(1, 99, Some("/a")), Choice::Parent(lineage(1)));
    }
}
