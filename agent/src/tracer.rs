//! From a connection's session events to finished spans: each request gets its lineage (an
//! incoming traceparent, a same-host join, an in-process parent, or a new trace), each exchange
//! becomes a span, measured for metrics, held while its join is pending, then exported or counted
//! as unsampled.

use std::sync::Arc;

use crate::{
    clock::Clock,
    conn::{ConnKey, Role, table::Conn},
    export::{otlp::SpanQueue, print::Printer},
    metrics::{
        MetricsStore,
        service_graph::{DATABASE, DIRECT, Edge, End, VIRTUAL_NODE},
    },
    protocol::{Protocol, RequestStart, SessionEvent},
    stats::Stats,
    trace::context::Injected,
    trace::{
        assemble::assemble,
        context::{Lineage, SpanContext, TraceParent, TraceRef},
        ids::{SpanId, TraceId},
        join::{JoinKey, Joiner, Resolved, ServerJoin, own_trace},
        parent::{Choice, InFlightServers, Serving, Unlinked},
        resource::Resource,
        sampler::Sampler,
        serving_thread::{ServingLink, ServingThreads},
        span::{AttrValue, Span, SpanKind, Status, Text},
    },
};

/// Unanswered request contexts kept per connection.
const MAX_CONTEXTS_PER_CONN: usize = 1024;

/// Where finished spans go.
#[derive(Default)]
pub struct Sinks {
    pub printer: Option<Printer>,
    pub otlp: Option<SpanQueue>,
}

impl Sinks {
    fn emit(&mut self, span: Span) {
        if let Some(p) = &mut self.printer {
            p.print(&span);
        }
        if let Some(q) = &mut self.otlp {
            q.push(span);
        }
    }
}

/// What a server connection's other end is, when that end is traced here too.
#[derive(Clone, Copy, Debug)]
pub struct Mirror {
    /// The client connection's id.
    pub conn_id: u64,
    /// Both ends' request positions can be trusted to match (see `Pipeline::joinable`).
    pub joinable: bool,
    /// Why not, for the counters.
    pub unjoinable: Unjoinable,
}

/// Why a connection between two traced processes cannot be joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unjoinable {
    None,
    /// One end was opened before sonde saw it: its first requests were not seen.
    BeforeStart,
    /// A parse error, or a kernel event loss, since it opened.
    Desync,
    /// TLS: the first plaintext may predate the TLS probes.
    Tls,
    /// The server connection's peer address is unknown (an accept without an address buffer,
    /// the socket gone before /proc was read) while a traced client is connected to its
    /// address: the client end may be traced, but which connection is its own cannot be told.
    AddressUnknown,
}

pub struct Tracer {
    in_flight: InFlightServers,
    /// What each thread last did with server requests (for log lines).
    threads: ServingThreads,
    joiner: Joiner,
    resources: foldhash::HashMap<u32, Arc<Resource>>,
    sampler: Sampler,
    pub clock: Clock,
    stats: Arc<Stats>,
    sinks: Sinks,
    metrics: Arc<MetricsStore>,
    released: Vec<Span>,
    /// Injection is on: server requests tell the kernel which trace their thread serves.
    pub inject_contexts: bool,
    /// Those contexts, until the agent writes them to the kernel.
    pub thread_contexts: Vec<(u64, sonde_common::ThreadContext)>,
    /// This node's pods, to name the servers client spans call by their service.
    pub peers: Option<Arc<crate::k8s::PodCache>>,
}

impl Tracer {
    pub fn new(sampler: Sampler, stats: Arc<Stats>, sinks: Sinks, metrics: Arc<MetricsStore>) -> Self {
        Self {
            in_flight: InFlightServers::default(),
            threads: ServingThreads::default(),
            joiner: Joiner::default(),
            resources: Default::default(),
            sampler,
            clock: Clock::calibrated(),
            stats,
            sinks,
            metrics,
            released: Vec::new(),
            peers: None,
            inject_contexts: false,
            thread_contexts: Vec::new(),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// `service.name` of a traced process, when its identity is known.
    pub fn service_of(&self, pid: u32) -> Option<Text> {
        self.resources.get(&pid).map(|r| Text::from(r.service_name.as_str()))
    }

    pub fn set_resource(&mut self, pid: u32, resource: Arc<Resource>) {
        self.resources.insert(pid, resource);
    }

    pub fn remove_process(&mut self, pid: u32) {
        self.resources.remove(&pid);
        self.in_flight.remove_process(pid);
        self.threads.remove_process(pid);
    }

    /// Thread `tid` of `pid` read from one of its server connections.
    pub fn server_read(&mut self, pid: u32, tid: u32) {
        self.threads.server_read(pid, tid);
    }

    /// The connection closed: nothing on it is in flight any more.
    pub fn closed(&mut self, key: ConnKey, conn: &Conn) {
        self.in_flight.close_conn(key.pid, conn.id);
    }

    /// Queues the partly filled export batch once it has waited the batch timeout, and gives up
    /// same-host joins that waited too long.
    pub fn tick(&mut self, now_ns: u64) {
        let mut out = std::mem::take(&mut self.released);
        self.joiner.expire(now_ns, &self.sampler, &mut out);
        self.emit_released(&mut out);
        self.released = out;
        self.sync_counts();
        if let Some(q) = &mut self.sinks.otlp {
            q.flush_if_due();
        }
    }

    /// Shutdown: joins still waiting give up, so their spans are exported.
    pub fn finish(&mut self) {
        let mut out = std::mem::take(&mut self.released);
        self.joiner.give_up_all(&self.sampler, &mut out);
        self.emit_released(&mut out);
        self.sync_counts();
    }

    pub fn apply(
        &mut self,
        key: ConnKey,
        conn: &mut Conn,
        joinable: bool,
        mirror: Option<Mirror>,
        events: &mut Vec<SessionEvent>,
    ) {
        let protocol = conn.protocol();
        for ev in events.drain(..) {
            match ev {
                SessionEvent::RequestStarted(rs) => {
                    let lineage = match conn.role {
                        Role::Server => self.server_lineage(conn, joinable, mirror, &rs),
                        Role::Client => {
                            let injected = conn.injected_now.take();
                            self.client_lineage(key.pid, conn, joinable, &rs, injected)
                        }
                        Role::Unknown => self.new_trace(None),
                    };
                    if conn.role == Role::Server {
                        // An HTTP/2 stream is read by whichever thread polls the connection.
                        let thread_evidence = protocol != Some(Protocol::Http2);
                        let serving = Serving {
                            tid: rs.tid,
                            conn_id: conn.id,
                            seq: rs.seq,
                            lineage,
                            target: rs.target,
                            thread_evidence,
                        };
                        self.in_flight.start(key.pid, serving);
                        if thread_evidence {
                            self.threads.started(key.pid, rs.tid);
                        }
                        if self.inject_contexts {
                            self.note_thread_context(key.pid, rs.tid, conn.io_ts_ns, &lineage);
                        }
                    }
                    conn.contexts.push_back((rs.seq, rs.tid, lineage));
                    if conn.contexts.len() > MAX_CONTEXTS_PER_CONN {
                        conn.contexts.pop_front();
                    }
                }
                SessionEvent::Completed(ex) => {
                    let found = conn.contexts.iter().position(|(seq, _, _)| *seq == ex.seq);
                    let lineage = match found.and_then(|i| conn.contexts.remove(i)) {
                        Some((_, _, lineage)) => lineage,
                        None => self.new_trace(None),
                    };
                    if conn.role == Role::Server {
                        self.in_flight.finish(key.pid, conn.id, ex.seq);
                        if protocol != Some(Protocol::Http2) {
                            self.threads.answered(key.pid, conn.io_tid, lineage);
                        }
                    }
                    Stats::add(&self.stats.spans_created, 1);
                    let kind = if conn.role == Role::Client { SpanKind::Client } else { SpanKind::Server };
                    let resource =
                        self.resources.get(&key.pid).cloned().unwrap_or_else(|| Arc::new(unknown_resource(key.pid)));
                    let clock = self.clock;
                    // Ids as far as known; the trace id is filled in below once the trace is.
                    let provisional = SpanContext {
                        trace_id: TraceId([0; 16]),
                        span_id: lineage.span_id,
                        parent_id: lineage.parent_id,
                        sampled: false,
                    };
                    let mut span =
                        assemble(&ex, kind, provisional, &conn.addrs, conn.tls, resource, |t| clock.to_unix_ns(t));
                    if kind == SpanKind::Client
                        && let Some(pods) = &self.peers
                    {
                        crate::k8s::peers::name_server_address(&mut span.attributes, pods);
                    }
                    // Metrics count every request; sampling only decides what is exported.
                    span.counted_in = self.metrics.record(&span);
                    self.record_edge(conn, &span);
                    let mut out = std::mem::take(&mut self.released);
                    match self.joiner.resolve(&lineage) {
                        Resolved::Known(ctx) => {
                            span.context = ctx;
                            out.push(span);
                        }
                        Resolved::Pending { id, parent_id } => {
                            span.context.parent_id = parent_id;
                            self.joiner.hold(id, span, &self.sampler, &mut out)
                        }
                        Resolved::Expired => {
                            self.joiner.counts.expired += 1;
                            out.push(own_trace(span, &self.sampler));
                        }
                    }
                    self.emit_released(&mut out);
                    self.released = out;
                }
                SessionEvent::Abandoned { seq } => {
                    conn.contexts.retain(|(s, _, _)| *s != seq);
                    if conn.role == Role::Server {
                        self.in_flight.finish(key.pid, conn.id, seq);
                    }
                }
                SessionEvent::ParseError { reason } => {
                    conn.desynced = true;
                    match protocol {
                        Some(Protocol::Http) => Stats::add(&self.stats.http_parse_errors, 1),
                        Some(Protocol::Http2) => Stats::add(&self.stats.http2_parse_errors, 1),
                        Some(Protocol::Postgres) => Stats::add(&self.stats.postgres_parse_errors, 1),
                        Some(Protocol::Redis) => Stats::add(&self.stats.redis_parse_errors, 1),
                        None => {}
                    }
                    log::debug!("pid {} fd {}: parse error: {reason}", key.pid, key.fd);
                }
                SessionEvent::UnmatchedRequest => {
                    conn.desynced = true;
                    Stats::add(&self.stats.unmatched_requests, 1);
                }
                SessionEvent::Unrecognized => Stats::add(&self.stats.streams_unrecognized, 1),
                SessionEvent::Undecodable { fields } => {
                    Stats::add(&self.stats.http2_fields_undecodable, u64::from(fields))
                }
                SessionEvent::UnmatchedResponse => {
                    conn.desynced = true;
                    Stats::add(&self.stats.unmatched_responses, 1);
                }
            }
        }
        self.sync_counts();
    }

    /// A server request continues an incoming traceparent; else the trace of its client's
    /// request when that client is traced here (same-host join); else it starts a trace.
    fn server_lineage(&mut self, conn: &Conn, joinable: bool, mirror: Option<Mirror>, rs: &RequestStart) -> Lineage {
        if rs.traceparent.is_some() {
            return self.new_trace(rs.traceparent.as_ref());
        }
        let Some(mirror) = mirror else {
            log::trace!("server request {} on conn {}: no traced client end", rs.seq, conn.id);
            return self.new_trace(None);
        };
        if !(joinable && mirror.joinable) {
            log::debug!(
                "server request {} on conn {}: not joinable (this end {joinable}, client {:?})",
                rs.seq,
                conn.id,
                mirror.unjoinable
            );
            let why = if mirror.unjoinable != Unjoinable::None { mirror.unjoinable } else { unjoinable_reason(conn) };
            self.count_unjoinable(why);
            return self.new_trace(None);
        }
        let key = JoinKey { client_conn: mirror.conn_id, seq: rs.seq };
        let mut out = std::mem::take(&mut self.released);
        // The wait runs from now, not from the request's kernel time: when the agent is behind,
        // the client's record may still be on its way however old the server's is.
        let now = Clock::monotonic_now();
        let joined = self.joiner.server_request(key, SpanId::random(), now, &self.sampler, &mut out);
        self.emit_released(&mut out);
        self.released = out;
        match joined {
            ServerJoin::Joined(lineage) | ServerJoin::Waiting(lineage) => lineage,
        }
    }

    /// A client request is the child of the server request its process is serving, on evidence
    /// (`parent.rs`); it is remembered for the server end when that may be traced here.
    fn client_lineage(
        &mut self,
        pid: u32,
        conn: &Conn,
        joinable: bool,
        rs: &RequestStart,
        injected: Option<Injected>,
    ) -> Lineage {
        let choice = self.in_flight.choose(pid, rs.tid, rs.target.as_deref());
        let lineage = match (injected, choice) {
            // The ids on the wire are the span's, whatever user space would have chosen.
            (Some(i), _) => {
                Stats::add(&self.stats.traceparent_matched, 1);
                Lineage {
                    span_id: i.span_id,
                    parent_id: i.parent_id,
                    trace: TraceRef::Known { trace_id: i.trace_id, sampled: i.sampled },
                }
            }
            (None, choice) => {
                if self.inject_contexts && !conn.from_birth {
                    Stats::add(&self.stats.traceparent_skipped_before_start, 1);
                }
                self.lineage_from(choice)
            }
        };
        if joinable {
            let key = JoinKey { client_conn: conn.id, seq: rs.seq };
            let mut out = std::mem::take(&mut self.released);
            self.joiner.client_request(key, lineage, rs.ts_ns, &self.sampler, &mut out);
            self.emit_released(&mut out);
            self.released = out;
        }
        lineage
    }

    /// A thread that starts serving a request, alone on that thread, serves it until its next
    /// server I/O: the kernel may put that trace into the thread's outgoing requests until then.
    fn note_thread_context(&mut self, pid: u32, tid: u32, io_ts_ns: u64, lineage: &Lineage) {
        let Choice::Parent(only) = self.in_flight.choose(pid, tid, None) else { return };
        let TraceRef::Known { trace_id, sampled } = only.trace else { return };
        if only.span_id != lineage.span_id {
            return;
        }
        let ctx = sonde_common::ThreadContext {
            io_ts_ns,
            trace_id: trace_id.0,
            span_id: only.span_id.0,
            sampled: sampled as u32,
            _pad: 0,
        };
        self.thread_contexts.push((((pid as u64) << 32) | tid as u64, ctx));
    }

    fn lineage_from(&mut self, choice: Choice) -> Lineage {
        match choice {
            Choice::Parent(parent) => parent.child(),
            Choice::Root => self.new_trace(None),
            Choice::Unlinked(why) => {
                match why {
                    Unlinked::Ambiguous => Stats::add(&self.stats.context_unlinked_ambiguous, 1),
                    Unlinked::OtherThread => Stats::add(&self.stats.context_unlinked_other_thread, 1),
                }
                self.new_trace(None)
            }
        }
    }

    /// A span that starts a trace, or continues a remote caller's.
    fn new_trace(&self, remote: Option<&TraceParent>) -> Lineage {
        let trace_id = remote.map(|p| p.trace_id).unwrap_or_else(TraceId::random);
        Lineage {
            span_id: SpanId::random(),
            parent_id: remote.map(|p| p.parent_id),
            trace: TraceRef::Known { trace_id, sampled: self.sampler.should_sample(trace_id, remote) },
        }
    }

    /// The service-graph edge a finished span measures: towards the traced service at the other
    /// end of its connection, or (a client span) towards a peer that is not traced.
    fn record_edge(&self, conn: &Conn, span: &Span) {
        let own = Text::from(span.resource.service_name.as_str());
        let seconds = span.end_unix_ns.saturating_sub(span.start_unix_ns) as f64 / 1e9;
        let failed = matches!(span.status, Status::Error(_));
        let graph = &self.metrics.service_graph;
        let direct = |client: Text, server: Text| Edge { client, server, connection_type: DIRECT, overflow: false };
        match (span.kind, &conn.peer_service) {
            (SpanKind::Server, Some(peer)) => {
                graph.record(direct(peer.clone(), own), End::Server, seconds, failed, span.end_unix_ns)
            }
            (SpanKind::Server, None) => {}
            (SpanKind::Client, Some(peer)) => {
                graph.record(direct(own, peer.clone()), End::ClientOfTraced, seconds, failed, span.end_unix_ns)
            }
            (SpanKind::Client, None) => {
                let (server, connection_type) = match span.attr("db.system.name") {
                    Some(AttrValue::Str(system)) => (system.clone(), DATABASE),
                    _ => (peer_name(span), VIRTUAL_NODE),
                };
                let edge = Edge { client: own, server, connection_type, overflow: false };
                graph.record(edge, End::ClientOnly, seconds, failed, span.end_unix_ns);
            }
        }
    }

    fn emit_released(&mut self, spans: &mut Vec<Span>) {
        for span in spans.drain(..) {
            if span.context.sampled {
                if let (Some(queue), Some(counted_in)) = (&self.sinks.otlp, span.counted_in) {
                    // Shown as an exemplar only once its batch reaches the backend.
                    self.metrics.offer_exemplar(&span, counted_in, queue.next_batch_seq());
                }
                self.sinks.emit(span);
            } else {
                Stats::add(&self.stats.spans_unsampled, 1);
            }
        }
    }

    fn count_unjoinable(&self, why: Unjoinable) {
        let counter = match why {
            Unjoinable::BeforeStart | Unjoinable::None => &self.stats.context_unlinked_before_start,
            Unjoinable::Desync => &self.stats.context_unlinked_desync,
            Unjoinable::Tls => &self.stats.context_unlinked_tls,
            Unjoinable::AddressUnknown => &self.stats.context_unlinked_address_unknown,
        };
        Stats::add(counter, 1);
    }

    fn sync_counts(&self) {
        let c = self.joiner.counts;
        let set = |a: &std::sync::atomic::AtomicU64, v| a.store(v, std::sync::atomic::Ordering::Relaxed);
        set(&self.stats.context_joined, c.joined);
        set(&self.stats.context_unlinked_partner_missing, c.partner_missing);
        set(&self.stats.context_unlinked_expired, c.expired);
        set(&self.stats.joins_waiting, self.joiner.waiting_count() as u64);
        set(&self.stats.spans_held, self.joiner.held_count() as u64);
    }
}

impl crate::logs::TraceView for Tracer {
    fn serving(&self, pid: u32, tid: u32) -> ServingLink {
        self.threads.link(pid, tid, &self.in_flight)
    }

    fn resolve(&self, lineage: &Lineage) -> Resolved {
        self.joiner.resolve(lineage)
    }

    fn resource(&self, pid: u32) -> Arc<Resource> {
        self.resources.get(&pid).cloned().unwrap_or_else(|| Arc::new(unknown_resource(pid)))
    }

    fn to_unix_ns(&self, monotonic_ns: u64) -> u64 {
        self.clock.to_unix_ns(monotonic_ns)
    }
}

/// Why this end of a connection cannot be joined.
pub fn unjoinable_reason(conn: &Conn) -> Unjoinable {
    if conn.tls {
        Unjoinable::Tls
    } else if !conn.from_birth || conn.role == Role::Unknown {
        Unjoinable::BeforeStart
    } else {
        Unjoinable::Desync
    }
}

/// `server.address:server.port` of a client span (the node of a peer that is not traced).
fn peer_name(span: &Span) -> Text {
    let text = |k: &str| match span.attr(k) {
        Some(AttrValue::Str(s)) => s.to_string(),
        Some(AttrValue::Int(i)) => i.to_string(),
        _ => String::new(),
    };
    let (address, port) = (text("server.address"), text("server.port"));
    Text::from(if port.is_empty() { address } else { format!("{address}:{port}") })
}

fn unknown_resource(pid: u32) -> Resource {
    let identity = crate::trace::resource::ProcessIdentity {
        pid,
        service_name: "unknown_service".into(),
        exe_path: String::new(),
        host_name: crate::discovery::procfs::host_name(),
        start_ticks: 0,
        platform: Vec::new(),
    };
    Resource::for_process(&identity, &[])
}
