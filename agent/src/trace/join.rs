//! Same-host joins: when both ends of a connection are traced here, the SERVER span continues the
//! CLIENT span's trace, as its child. The evidence is the connection and the request's position
//! on it (the Nth request written on the client socket is the Nth request read on the server
//! socket), never timing; the pipeline offers only connections whose ends both saw the stream
//! from its first byte and lost nothing since (see `Pipeline::joinable`).
//!
//! The two ends are seen in either order. A client request is remembered for a while; a server
//! request whose traced client has not been seen yet gets a pending trace, and every span of that
//! trace is held here until the client is seen, or until [`PARTNER_WAIT_NS`] runs out, when the
//! server request starts its own trace (counted). The hold is bounded.

use std::collections::{HashMap, VecDeque};

use super::{
    context::{Lineage, PendingId, SpanContext, TraceRef},
    ids::{SpanId, TraceId},
    sampler::Sampler,
    span::Span,
};

/// How long a server request waits for its client's request to be seen. Both come through one
/// ring buffer in commit order, so a traced client's record follows within microseconds; the
/// wait only covers the agent draining the two in different batches.
pub const PARTNER_WAIT_NS: u64 = 250_000_000;
/// How long a client request waits for its server (an untraced server never comes).
const CLIENT_TTL_NS: u64 = 2_000_000_000;
/// How long a resolved join is remembered for spans that started before it resolved.
const RESOLVED_TTL_NS: u64 = 60_000_000_000;
/// Bounds: client requests remembered, joins pending or resolved, spans held.
const MAX_CLIENTS: usize = 65536;
const MAX_ROOTS: usize = 65536;
const MAX_HELD_SPANS: usize = 16384;

/// A request on a connection: the client socket's unique connection id and the position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct JoinKey {
    pub client_conn: u64,
    pub seq: u64,
}

/// The outcome of a server request's lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerJoin {
    /// The client's request was seen: the server span is its child.
    Joined(Lineage),
    /// The traced client's request is not seen yet: the server span's trace is pending.
    Waiting(Lineage),
}

/// A span's trace, once resolved.
#[derive(Debug, PartialEq)]
pub enum Resolved {
    Known(SpanContext),
    /// Still pending on join `id`; `parent_id` is the span's parent as far as the joins already
    /// resolved tell it (a server span joined to a pending client span has its parent already).
    Pending {
        id: PendingId,
        parent_id: Option<SpanId>,
    },
    /// Its join was forgotten (bounds or age): the span starts its own trace.
    Expired,
}

#[derive(Clone, Copy, Debug)]
enum State {
    Waiting {
        key: JoinKey,
    },
    /// Joined: the server span's parent is `parent`, its trace is the client's.
    Joined {
        parent: SpanId,
        trace: TraceRef,
    },
    /// The client never came: the server span started its own trace.
    Own {
        trace_id: TraceId,
        sampled: bool,
    },
}

#[derive(Clone, Copy, Debug)]
struct Root {
    /// The server span whose join this is.
    span_id: SpanId,
    state: State,
    /// Kernel time it was created (waiting) or resolved.
    since_ns: u64,
}

/// Counts of what happened to joins, for the agent's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JoinCounts {
    pub joined: u64,
    /// A traced client's request never came within the wait.
    pub partner_missing: u64,
    /// A span's join was forgotten before it finished.
    pub expired: u64,
}

#[derive(Default)]
pub struct Joiner {
    clients: HashMap<JoinKey, Lineage>,
    client_order: VecDeque<(JoinKey, u64)>,
    waiting: HashMap<JoinKey, PendingId>,
    /// Waiting joins in creation order (the wait is the same for all: the front expires first).
    waiting_order: VecDeque<(PendingId, u64)>,
    roots: HashMap<PendingId, Root>,
    root_order: VecDeque<PendingId>,
    held: HashMap<PendingId, Vec<Span>>,
    held_count: usize,
    next_id: PendingId,
    pub counts: JoinCounts,
}

impl Joiner {
    /// A client request on a joinable connection: remembered for its server, or it resolves a
    /// server request that was seen first. Returns the spans that resolution releases.
    pub fn client_request(
        &mut self,
        key: JoinKey,
        lineage: Lineage,
        now_ns: u64,
        sampler: &Sampler,
        out: &mut Vec<Span>,
    ) {
        if let Some(id) = self.waiting.remove(&key) {
            self.counts.joined += 1;
            if let Some(root) = self.roots.get_mut(&id) {
                root.state = State::Joined { parent: lineage.span_id, trace: lineage.trace };
                root.since_ns = now_ns;
            }
            self.release(id, sampler, out);
            return;
        }
        if self.clients.len() >= MAX_CLIENTS
            && let Some((old, _)) = self.client_order.pop_front()
        {
            self.clients.remove(&old);
        }
        self.clients.insert(key, lineage);
        self.client_order.push_back((key, now_ns));
    }

    /// A server request on a joinable connection whose client end is traced here. `span_id` is
    /// the server span's id. When the table of joins is full, the oldest gives up (its spans go
    /// to `out`).
    pub fn server_request(
        &mut self,
        key: JoinKey,
        span_id: SpanId,
        now_ns: u64,
        sampler: &Sampler,
        out: &mut Vec<Span>,
    ) -> ServerJoin {
        if let Some(client) = self.clients.remove(&key) {
            self.counts.joined += 1;
            return ServerJoin::Joined(Lineage { span_id, parent_id: Some(client.span_id), trace: client.trace });
        }
        if self.roots.len() >= MAX_ROOTS {
            self.forget_oldest_root(sampler, out);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.roots.insert(id, Root { span_id, state: State::Waiting { key }, since_ns: now_ns });
        self.root_order.push_back(id);
        self.waiting.insert(key, id);
        self.waiting_order.push_back((id, now_ns));
        ServerJoin::Waiting(Lineage { span_id, parent_id: None, trace: TraceRef::Pending(id) })
    }

    /// The trace of a span in progress, as far as it is known now.
    pub fn resolve(&self, lineage: &Lineage) -> Resolved {
        let mut parent_id = lineage.parent_id;
        let mut trace = lineage.trace;
        let mut first_hop = true;
        // Each hop goes to a join created earlier, so the chain ends; the bound is a backstop.
        for _ in 0..64 {
            let id = match trace {
                TraceRef::Known { trace_id, sampled } => {
                    return Resolved::Known(SpanContext { trace_id, span_id: lineage.span_id, parent_id, sampled });
                }
                TraceRef::Pending(id) => id,
            };
            let Some(root) = self.roots.get(&id) else { return Resolved::Expired };
            let is_root_span = first_hop && root.span_id == lineage.span_id;
            first_hop = false;
            match root.state {
                State::Waiting { .. } => return Resolved::Pending { id, parent_id },
                State::Joined { parent, trace: next } => {
                    if is_root_span {
                        parent_id = Some(parent);
                    }
                    trace = next;
                }
                State::Own { trace_id, sampled } => trace = TraceRef::Known { trace_id, sampled },
            }
        }
        Resolved::Expired
    }

    /// Keeps a finished span until its join resolves. When the hold is full, the oldest waiting
    /// join gives up at once (its spans are released into `out`).
    pub fn hold(&mut self, id: PendingId, span: Span, sampler: &Sampler, out: &mut Vec<Span>) {
        while self.held_count >= MAX_HELD_SPANS
            && let Some((oldest, _)) = self.waiting_order.pop_front()
        {
            self.give_up(oldest, sampler, out);
        }
        self.held.entry(id).or_default().push(span);
        self.held_count += 1;
    }

    /// Gives up joins that waited longer than [`PARTNER_WAIT_NS`] and forgets old entries.
    pub fn expire(&mut self, now_ns: u64, sampler: &Sampler, out: &mut Vec<Span>) {
        while let Some(&(key, at)) = self.client_order.front() {
            if now_ns.saturating_sub(at) < CLIENT_TTL_NS && self.client_order.len() <= MAX_CLIENTS {
                break;
            }
            self.client_order.pop_front();
            self.clients.remove(&key);
        }
        while let Some(&(id, since)) = self.waiting_order.front() {
            if self.is_waiting(id) && now_ns.saturating_sub(since) < PARTNER_WAIT_NS {
                break;
            }
            self.waiting_order.pop_front();
            self.give_up(id, sampler, out);
        }
        while let Some(&id) = self.root_order.front() {
            let old = self.roots.get(&id).is_none_or(|r| {
                !matches!(r.state, State::Waiting { .. }) && now_ns.saturating_sub(r.since_ns) >= RESOLVED_TTL_NS
            });
            if !old {
                break;
            }
            self.root_order.pop_front();
            self.roots.remove(&id);
        }
    }

    /// Joins waiting now (for the gauges).
    pub fn waiting_count(&self) -> usize {
        self.waiting.len()
    }

    /// Spans held now.
    pub fn held_count(&self) -> usize {
        self.held_count
    }

    /// Gives every waiting join up (shutdown): their spans start their own traces.
    pub fn give_up_all(&mut self, sampler: &Sampler, out: &mut Vec<Span>) {
        let waiting: Vec<PendingId> = self.waiting.values().copied().collect();
        for id in waiting {
            self.give_up(id, sampler, out);
        }
    }

    fn is_waiting(&self, id: PendingId) -> bool {
        self.roots.get(&id).is_some_and(|r| matches!(r.state, State::Waiting { .. }))
    }

    fn give_up(&mut self, id: PendingId, sampler: &Sampler, out: &mut Vec<Span>) {
        let Some(root) = self.roots.get_mut(&id) else { return };
        let State::Waiting { key } = root.state else { return };
        let trace_id = TraceId::random();
        root.state = State::Own { trace_id, sampled: sampler.should_sample(trace_id, None) };
        self.waiting.remove(&key);
        self.counts.partner_missing += 1;
        self.release(id, sampler, out);
    }

    /// Spans held on `id` whose trace is known now go to `out`; those still pending (the join
    /// resolved to another pending join) move to that join.
    fn release(&mut self, id: PendingId, sampler: &Sampler, out: &mut Vec<Span>) {
        let Some(spans) = self.held.remove(&id) else { return };
        self.held_count -= spans.len();
        for mut span in spans {
            let lineage = span_lineage(&span, id);
            match self.resolve(&lineage) {
                Resolved::Known(ctx) => {
                    span.context = ctx;
                    out.push(span);
                }
                Resolved::Pending { id: next, parent_id } => {
                    span.context.parent_id = parent_id;
                    self.held.entry(next).or_default().push(span);
                    self.held_count += 1;
                }
                Resolved::Expired => {
                    self.counts.expired += 1;
                    out.push(own_trace(span, sampler));
                }
            }
        }
    }

    /// Makes room: the oldest join gives up if it still waits, else it is forgotten (spans that
    /// started before it resolved and finish later then start their own traces, counted).
    fn forget_oldest_root(&mut self, sampler: &Sampler, out: &mut Vec<Span>) {
        let Some(id) = self.root_order.pop_front() else { return };
        self.give_up(id, sampler, out);
        self.roots.remove(&id);
    }
}

/// A held span's lineage: its ids as assembled, its trace the join it waits on.
fn span_lineage(span: &Span, id: PendingId) -> Lineage {
    Lineage { span_id: span.context.span_id, parent_id: span.context.parent_id, trace: TraceRef::Pending(id) }
}

/// A span whose join was lost starts its own trace, without a parent that would dangle.
pub fn own_trace(mut span: Span, sampler: &Sampler) -> Span {
    let trace_id = TraceId::random();
    span.context =
        SpanContext { trace_id, parent_id: None, sampled: sampler.should_sample(trace_id, None), ..span.context };
    span
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::trace::{
        resource::{ProcessIdentity, Resource},
        span::{SpanKind, Status},
    };

    fn known(n: u8, sampled: bool) -> Lineage {
        Lineage {
            span_id: SpanId([n; 8]),
            parent_id: None,
            trace: TraceRef::Known { trace_id: TraceId([n; 16]), sampled },
        }
    }

    fn span(lineage: &Lineage) -> Span {
        let identity = ProcessIdentity {
            pid: 1,
            service_name: "t".into(),
            exe_path: String::new(),
            host_name: "h".into(),
            start_ticks: 0,
            platform: Vec::new(),
        };
        Span {
            context: SpanContext {
                trace_id: TraceId([0; 16]),
                span_id: lineage.span_id,
                parent_id: lineage.parent_id,
                sampled: false,
            },
            name: "s".into(),
            kind: SpanKind::Server,
            start_unix_ns: 0,
            end_unix_ns: 0,
            attributes: Vec::new(),
            status: Status::Unset,
            resource: Arc::new(Resource::for_process(&identity, &[])),
            counted_in: None,
        }
    }

    const KEY: JoinKey = JoinKey { client_conn: 7, seq: 3 };

    #[test]
    fn client_first_then_server_joins_at_once() {
        let (mut j, sampler, mut out) = (Joiner::default(), Sampler::default(), Vec::new());
        j.client_request(KEY, known(1, true), 0, &sampler, &mut out);
        let ServerJoin::Joined(server) = j.server_request(KEY, SpanId([9; 8]), 0, &sampler, &mut out) else {
            panic!("client was seen first")
        };
        let Resolved::Known(ctx) = j.resolve(&server) else { panic!() };
        assert_eq!((ctx.trace_id, ctx.parent_id, ctx.sampled), (TraceId([1; 16]), Some(SpanId([1; 8])), true));
        // Another position on the same connection is not this join.
        assert!(matches!(
            j.server_request(JoinKey { seq: 4, ..KEY }, SpanId([8; 8]), 0, &sampler, &mut out),
            ServerJoin::Waiting(_)
        ));
        assert_eq!(j.counts.joined, 1);
    }

    #[test]
    fn server_first_holds_its_spans_until_the_client_is_seen() {
        let (mut j, sampler, mut out) = (Joiner::default(), Sampler::default(), Vec::new());
        let ServerJoin::Waiting(server) = j.server_request(KEY, SpanId([9; 8]), 0, &sampler, &mut out) else {
            panic!("no client yet")
        };
        // The server's own outgoing call started meanwhile, and both finished before the join.
        let child = server.child();
        for l in [&child, &server] {
            let Resolved::Pending { id, .. } = j.resolve(l) else { panic!("pending") };
            j.hold(id, span(l), &sampler, &mut out);
        }
        assert!(out.is_empty());
        j.client_request(KEY, known(1, true), 10, &sampler, &mut out);
        assert_eq!(out.len(), 2);
        for s in &out {
            assert_eq!(s.context.trace_id, TraceId([1; 16]));
            assert!(s.context.sampled);
        }
        assert_eq!(out[1].context.parent_id, Some(SpanId([1; 8])), "the server span's parent is the client span");
        assert_eq!(out[0].context.parent_id, Some(server.span_id), "its child keeps its parent");
        // A span of that trace finishing later resolves without waiting.
        let Resolved::Known(late) = j.resolve(&server.child()) else { panic!() };
        assert_eq!(late.trace_id, TraceId([1; 16]));
        assert_eq!(j.held_count(), 0);
    }

    #[test]
    fn a_join_to_a_pending_client_follows_it() {
        let (mut j, sampler, mut out) = (Joiner::default(), Sampler::default(), Vec::new());
        // B's server request waits for A; B's client call to C; C's server request is seen
        // before B's call is registered, and waits for it.
        let ServerJoin::Waiting(b_server) = j.server_request(KEY, SpanId([2; 8]), 0, &sampler, &mut out) else {
            panic!()
        };
        let b_call = b_server.child();
        let c_key = JoinKey { client_conn: 8, seq: 0 };
        let ServerJoin::Waiting(c_server) = j.server_request(c_key, SpanId([3; 8]), 0, &sampler, &mut out) else {
            panic!()
        };
        let Resolved::Pending { id, .. } = j.resolve(&c_server) else { panic!() };
        j.hold(id, span(&c_server), &sampler, &mut out);
        j.client_request(c_key, b_call, 0, &sampler, &mut out);
        assert!(out.is_empty(), "B's trace is still unknown");
        // A second request of C's is seen before B's second call, joins it, and finishes while
        // B's trace is still unknown: it waits on B's join, with the parent its own join gave.
        let c_key2 = JoinKey { seq: 1, ..c_key };
        let b_call2 = b_server.child();
        let ServerJoin::Waiting(c_server2) = j.server_request(c_key2, SpanId([4; 8]), 0, &sampler, &mut out) else {
            panic!()
        };
        j.client_request(c_key2, b_call2, 0, &sampler, &mut out);
        let Resolved::Pending { id, parent_id } = j.resolve(&c_server2) else { panic!() };
        assert_eq!(parent_id, Some(b_call2.span_id), "the parent from C's own join");
        let mut held = span(&c_server2);
        held.context.parent_id = parent_id;
        j.hold(id, held, &sampler, &mut out);
        j.client_request(KEY, known(1, false), 0, &sampler, &mut out);
        assert_eq!(out.len(), 2);
        let c = &out[0].context;
        assert_eq!((c.trace_id, c.parent_id, c.sampled), (TraceId([1; 16]), Some(b_call.span_id), false));
        let c2 = &out[1].context;
        assert_eq!((c2.trace_id, c2.parent_id), (TraceId([1; 16]), Some(b_call2.span_id)));
    }

    #[test]
    fn a_client_that_never_comes_lets_the_server_start_its_own_trace() {
        let (mut j, sampler, mut out) = (Joiner::default(), Sampler::default(), Vec::new());
        let ServerJoin::Waiting(server) = j.server_request(KEY, SpanId([9; 8]), 0, &sampler, &mut out) else {
            panic!()
        };
        let Resolved::Pending { id, .. } = j.resolve(&server) else { panic!() };
        j.hold(id, span(&server), &sampler, &mut out);
        j.expire(PARTNER_WAIT_NS - 1, &sampler, &mut out);
        assert!(out.is_empty());
        j.expire(PARTNER_WAIT_NS, &sampler, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].context.parent_id, None);
        assert_ne!(out[0].context.trace_id, TraceId([0; 16]));
        assert_eq!(j.counts.partner_missing, 1);
        // The client arriving late joins nothing.
        j.client_request(KEY, known(1, true), PARTNER_WAIT_NS + 1, &sampler, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(j.counts.joined, 0);
    }
}
