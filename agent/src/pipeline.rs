//! The user-space pipeline: capture events -> connections -> protocol sessions -> span
//! contexts -> finished spans -> sinks. Plain function calls, no reaching back.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use crate::{
    clock::Clock,
    conn::{
        ConnKey, ConnTable, Role,
        table::{Conn, DataIn},
    },
    discovery::{SeededSocket, socket_addrs},
    export::{otlp::SpanQueue, print::Printer},
    metrics::MetricsStore,
    protocol::{Protocol, SessionEvent},
    stats::Stats,
    trace::{
        assemble::assemble,
        context::{SpanContext, TraceParent},
        http_attrs::ConnAddrs,
        ids::{SpanId, TraceId},
        resource::Resource,
        sampler::Sampler,
        span::{Span, SpanKind},
    },
};

/// Server span contexts per thread, for parenting client calls; bounded.
const MAX_THREAD_CONTEXTS: usize = 65536;
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

/// Everything span creation needs besides the connection itself.
struct Tracer {
    /// (pid, tid) -> the server span that thread is serving now.
    threads: HashMap<(u32, u32), SpanContext>,
    resources: HashMap<u32, Arc<Resource>>,
    sampler: Sampler,
    clock: Clock,
    stats: Arc<Stats>,
    sinks: Sinks,
    metrics: Arc<MetricsStore>,
}

pub struct Pipeline {
    conns: ConnTable,
    tracer: Tracer,
    /// Local address of listening sockets, by (pid, listen fd).
    listen_addrs: HashMap<(u32, u32), Option<SocketAddr>>,
    events: Vec<SessionEvent>,
}

impl Pipeline {
    pub fn new(sampler: Sampler, stats: Arc<Stats>, sinks: Sinks, metrics: Arc<MetricsStore>) -> Self {
        Self {
            conns: ConnTable::default(),
            tracer: Tracer {
                threads: HashMap::new(),
                resources: HashMap::new(),
                sampler,
                clock: Clock::calibrated(),
                stats,
                sinks,
                metrics,
            },
            listen_addrs: HashMap::new(),
            events: Vec::new(),
        }
    }

    /// Queues the partly filled export batch once it has waited the batch timeout.
    pub fn flush_exports_if_due(&mut self) {
        if let Some(q) = &mut self.tracer.sinks.otlp {
            q.flush_if_due();
        }
    }

    pub fn recalibrate_clock(&mut self) {
        self.tracer.clock = Clock::calibrated();
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn thread_context_count(&self) -> usize {
        self.tracer.threads.len()
    }

    pub fn set_resource(&mut self, pid: u32, resource: Arc<Resource>) {
        self.tracer.resources.insert(pid, resource);
    }

    /// A process exited: its connections close (what they complete becomes spans, what they
    /// leave unanswered is counted), then everything kept for it goes.
    pub fn remove_process(&mut self, pid: u32) {
        let now = Clock::monotonic_now();
        for key in self.conns.keys_of(pid) {
            self.on_close(key.pid, key.fd, now);
        }
        self.tracer.resources.remove(&pid);
        self.tracer.threads.retain(|(p, _), _| *p != pid);
        self.listen_addrs.retain(|(p, _), _| *p != pid);
    }

    /// A traced process forked: the child starts with its parent's connections.
    pub fn on_fork(&mut self, parent: u32, child: u32) {
        self.conns.inherit(parent, child);
    }

    /// A connection that existed before the process was traced.
    pub fn open_seeded(&mut self, pid: u32, s: &SeededSocket) {
        let addrs = ConnAddrs { local: Some(s.local), peer: Some(s.peer) };
        self.open(ConnKey { pid, fd: s.fd }, s.role, addrs, Clock::monotonic_now());
    }

    /// accept/connect returned a new connection.
    pub fn on_open(
        &mut self,
        pid: u32,
        fd: u32,
        role: Role,
        listen_fd: Option<u32>,
        peer: Option<SocketAddr>,
        ts_ns: u64,
    ) {
        let local = match (role, listen_fd) {
            (Role::Server, Some(lfd)) => {
                *self.listen_addrs.entry((pid, lfd)).or_insert_with(|| socket_addrs(pid, lfd).map(|(local, _)| local))
            }
            _ => None,
        };
        let mut addrs = ConnAddrs { local, peer };
        if addrs.peer.is_none() || (role == Role::Server && addrs.local.is_none()) {
            // accept without an address buffer (e.g. libuv): ask /proc while the socket lives.
            if let Some((l, p)) = socket_addrs(pid, fd) {
                addrs.local = addrs.local.or(Some(l));
                addrs.peer = addrs.peer.or(Some(p));
            }
        }
        self.open(ConnKey { pid, fd }, role, addrs, ts_ns);
    }

    fn open(&mut self, key: ConnKey, role: Role, addrs: ConnAddrs, ts_ns: u64) {
        let mut events = std::mem::take(&mut self.events);
        if let Some(mut old) = self.conns.close(key, ts_ns, &mut events) {
            self.tracer.apply(key, &mut old, &mut events);
        }
        self.conns.open(key, role, addrs, ts_ns, &mut events);
        self.events = events;
    }

    pub fn on_close(&mut self, pid: u32, fd: u32, ts_ns: u64) {
        let key = ConnKey { pid, fd };
        let mut events = std::mem::take(&mut self.events);
        if let Some(mut conn) = self.conns.close(key, ts_ns, &mut events) {
            self.tracer.apply(key, &mut conn, &mut events);
        }
        events.clear();
        self.events = events;
    }

    /// One syscall's bytes on socket `fd` of `pid`; `role` is what the kernel's socket map knows.
    pub fn on_data(&mut self, pid: u32, fd: u32, role: Role, data: DataIn<'_>) {
        let key = ConnKey { pid, fd };
        let ts_ns = data.ts_ns;
        let uncopied = data.byte_count.saturating_sub(data.payload.len() as u64);
        if uncopied > 0 {
            Stats::add(&self.tracer.stats.bytes_not_captured, uncopied);
        }
        if self.conns.get(&key).is_none() && role != Role::Unknown {
            // Inherited from a parent, or the open event was lost: the kernel knows the role.
            let addrs =
                socket_addrs(pid, fd).map(|(l, p)| ConnAddrs { local: Some(l), peer: Some(p) }).unwrap_or_default();
            self.open(key, role, addrs, ts_ns);
        }
        let mut events = std::mem::take(&mut self.events);
        self.conns.on_data(key, data, &mut events);
        if !events.is_empty()
            && let Some(conn) = self.conns.get_mut(&key)
        {
            self.tracer.apply(key, conn, &mut events);
        }
        events.clear();
        self.events = events;
    }
}

impl Tracer {
    fn apply(&mut self, key: ConnKey, conn: &mut Conn, events: &mut Vec<SessionEvent>) {
        let protocol = conn.protocol();
        for ev in events.drain(..) {
            match ev {
                SessionEvent::RequestStarted(rs) => {
                    let ctx = self.context_for(key.pid, rs.tid, conn.role, rs.traceparent.as_ref());
                    if conn.role == Role::Server {
                        if self.threads.len() >= MAX_THREAD_CONTEXTS {
                            self.threads.clear();
                        }
                        self.threads.insert((key.pid, rs.tid), ctx);
                    }
                    conn.contexts.push_back((rs.seq, rs.tid, ctx));
                    if conn.contexts.len() > MAX_CONTEXTS_PER_CONN {
                        conn.contexts.pop_front();
                    }
                }
                SessionEvent::Completed(ex) => {
                    let found = conn.contexts.iter().position(|(seq, _, _)| *seq == ex.seq);
                    let (tid, ctx) = match found.and_then(|i| conn.contexts.remove(i)) {
                        Some((_, tid, ctx)) => (Some(tid), ctx),
                        None => (None, self.context_for(key.pid, 0, conn.role, None)),
                    };
                    if conn.role == Role::Server
                        && let Some(tid) = tid
                        && self.threads.get(&(key.pid, tid)) == Some(&ctx)
                    {
                        self.threads.remove(&(key.pid, tid));
                    }
                    Stats::add(&self.stats.spans_created, 1);
                    let kind = if conn.role == Role::Client { SpanKind::Client } else { SpanKind::Server };
                    let resource =
                        self.resources.get(&key.pid).cloned().unwrap_or_else(|| Arc::new(unknown_resource(key.pid)));
                    let clock = self.clock;
                    let span = assemble(&ex, kind, ctx, &conn.addrs, conn.tls, resource, |t| clock.to_unix_ns(t));
                    // Metrics count every request; sampling only decides what is exported.
                    self.metrics.record(&span);
                    if !ctx.sampled {
                        Stats::add(&self.stats.spans_unsampled, 1);
                        continue;
                    }
                    self.sinks.emit(span);
                }
                SessionEvent::Abandoned { seq } => conn.contexts.retain(|(s, _, _)| *s != seq),
                SessionEvent::ParseError { reason } => {
                    match protocol {
                        Some(Protocol::Http) => Stats::add(&self.stats.http_parse_errors, 1),
                        Some(Protocol::Postgres) => Stats::add(&self.stats.postgres_parse_errors, 1),
                        Some(Protocol::Redis) => Stats::add(&self.stats.redis_parse_errors, 1),
                        None => {}
                    }
                    log::debug!("pid {} fd {}: parse error: {reason}", key.pid, key.fd);
                }
                SessionEvent::UnmatchedRequest => Stats::add(&self.stats.unmatched_requests, 1),
                SessionEvent::Unrecognized => Stats::add(&self.stats.streams_unrecognized, 1),
                SessionEvent::UnmatchedResponse => Stats::add(&self.stats.unmatched_responses, 1),
            }
        }
    }

    /// Identity of a new span: a server span continues an incoming traceparent or starts a
    /// trace; a client span is a child of the server span its thread is serving, if any.
    fn context_for(&self, pid: u32, tid: u32, role: Role, incoming: Option<&TraceParent>) -> SpanContext {
        let span_id = SpanId::random();
        if role == Role::Client
            && let Some(parent) = self.threads.get(&(pid, tid))
        {
            return SpanContext {
                trace_id: parent.trace_id,
                span_id,
                parent_id: Some(parent.span_id),
                sampled: parent.sampled,
            };
        }
        let remote = if role == Role::Server { incoming } else { None };
        let trace_id = remote.map(|p| p.trace_id).unwrap_or_else(TraceId::random);
        SpanContext {
            trace_id,
            span_id,
            parent_id: remote.map(|p| p.parent_id),
            sampled: self.sampler.should_sample(trace_id, remote),
        }
    }
}

fn unknown_resource(pid: u32) -> Resource {
    let identity = crate::trace::resource::ProcessIdentity {
        pid,
        service_name: "unknown_service".into(),
        exe_path: String::new(),
        host_name: crate::discovery::procfs::host_name(),
        start_ticks: 0,
    };
    Resource::for_process(&identity, &[])
}
