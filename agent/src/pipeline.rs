//! The user-space pipeline: capture events -> connections -> protocol sessions -> span
//! contexts -> finished spans -> sinks. Plain function calls, no reaching back.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

pub use crate::tracer::Sinks;
use crate::{
    clock::Clock,
    conn::{
        ConnKey, ConnTable, Role,
        table::{Conn, DataIn, Direction},
    },
    discovery::{SeededSocket, socket_addrs},
    logs::{LogStage, LogStream},
    metrics::MetricsStore,
    protocol::SessionEvent,
    stats::Stats,
    trace::{context::Injected, http_attrs::ConnAddrs, resource::Resource, sampler::Sampler},
    tracer::{Mirror, Tracer, Unjoinable, unjoinable_reason},
};

/// Injected traceparents kept per connection until their write is seen.
const MAX_INJECTED_PER_CONN: usize = 64;
/// Early own-address reports kept for connections about to open (each is consumed at once).
const MAX_EARLY_LOCALS: usize = 4096;

pub struct Pipeline {
    conns: ConnTable,
    tracer: Tracer,
    /// Local address of listening sockets, by (pid, listen fd).
    listen_addrs: HashMap<(u32, u32), Option<SocketAddr>>,
    /// Client connections by the server address they connected to: the candidates for the
    /// other end of a traced server's connection.
    clients_by_peer: HashMap<SocketAddr, Vec<ConnKey>>,
    /// Own addresses of connecting sockets reported before their connect returned (loopback
    /// handshakes complete inside connect), for the connection about to open.
    early_locals: HashMap<ConnKey, SocketAddr>,
    /// Network namespace of each process (loopback addresses repeat across namespaces).
    netns: HashMap<u32, Option<u64>>,
    /// The kernel's latest-loss mark (every record carries it) and how often it changed.
    last_loss: u32,
    loss_epoch: u64,
    events: Vec<SessionEvent>,
    /// Present when log capture is on.
    logs: Option<LogStage>,
}

impl Pipeline {
    pub fn new(sampler: Sampler, stats: Arc<Stats>, sinks: Sinks, metrics: Arc<MetricsStore>) -> Self {
        Self {
            conns: ConnTable::default(),
            tracer: Tracer::new(sampler, stats, sinks, metrics),
            listen_addrs: HashMap::new(),
            clients_by_peer: HashMap::new(),
            early_locals: HashMap::new(),
            netns: HashMap::new(),
            last_loss: 0,
            loss_epoch: 0,
            events: Vec::new(),
            logs: None,
        }
    }

    /// Turns log records on: what traced processes write to their log fds goes to `stage`.
    pub fn enable_logs(&mut self, stage: LogStage) {
        self.logs = Some(stage);
    }

    pub fn logs(&self) -> Option<&LogStage> {
        self.logs.as_ref()
    }

    pub fn logs_mut(&mut self) -> Option<&mut LogStage> {
        self.logs.as_mut()
    }

    /// One write of a traced thread to one of its log fds.
    #[expect(clippy::too_many_arguments, reason = "one write's fields, as the kernel reports them")]
    pub fn on_log_write(
        &mut self,
        pid: u32,
        tid: u32,
        fd: u32,
        stream: LogStream,
        ts_ns: u64,
        payload: &[u8],
        byte_count: u64,
    ) {
        if let Some(logs) = &mut self.logs {
            logs.on_write(&self.tracer, pid, tid, fd, stream, ts_ns, payload, byte_count);
        }
    }

    /// Every record carries the kernel's mark of its latest lost record: a change means some
    /// connection may have lost bytes, so request positions of connections opened before no
    /// longer prove anything.
    pub fn note_kernel_losses(&mut self, last_loss: u32) {
        if last_loss != self.last_loss {
            self.last_loss = last_loss;
            self.loss_epoch += 1;
        }
    }

    /// Queues the partly filled export batch once it has waited the batch timeout, and gives up
    /// same-host joins that waited too long (call after each drain of the ring buffer).
    pub fn flush_exports_if_due(&mut self) {
        let now = Clock::monotonic_now();
        self.tracer.tick(now);
        if let Some(logs) = &mut self.logs {
            logs.tick(&self.tracer, now);
        }
    }

    pub fn recalibrate_clock(&mut self) {
        self.tracer.clock = Clock::calibrated();
    }

    /// Client spans to this node's pods name the pod's service as `server.address`.
    pub fn name_peers(&mut self, pods: Arc<crate::k8s::PodCache>) {
        self.tracer.peers = Some(pods);
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// A process is traced from now on (its identity is known). Its network namespace is read
    /// now, while it surely lives: a short-lived process may be gone when its connections are
    /// looked at.
    pub fn set_resource(&mut self, pid: u32, resource: Arc<Resource>) {
        self.tracer.set_resource(pid, resource);
        self.netns_of(pid);
    }

    /// A process exited: its connections close (what they complete becomes spans, what they
    /// leave unanswered is counted), then everything kept for it goes.
    pub fn remove_process(&mut self, pid: u32) {
        let now = Clock::monotonic_now();
        for key in self.conns.keys_of(pid) {
            self.on_close(key.pid, key.fd, now);
        }
        if let Some(logs) = &mut self.logs {
            logs.remove_process(&self.tracer, pid);
        }
        self.tracer.remove_process(pid);
        self.listen_addrs.retain(|(p, _), _| *p != pid);
        self.netns.remove(&pid);
    }

    /// A traced process forked: the child starts with its parent's connections, and its
    /// network namespace unless it got a new one.
    pub fn on_fork(&mut self, parent: u32, child: u32, new_netns: bool) {
        self.conns.inherit(parent, child);
        if let Some(logs) = &mut self.logs {
            logs.on_fork(parent, child);
        }
        let netns = if new_netns { None } else { self.netns_of(parent) };
        self.netns.insert(child, netns);
        for key in self.conns.keys_of(child) {
            if let Some(peer) = self.conns.get(&key).filter(|c| c.role == Role::Client).and_then(|c| c.addrs.peer) {
                self.clients_by_peer.entry(canonical(peer)).or_default().push(key);
            }
        }
    }

    /// A connection that existed before the process was traced.
    pub fn open_seeded(&mut self, pid: u32, s: &SeededSocket) {
        let addrs = ConnAddrs { local: Some(s.local), peer: Some(s.peer) };
        self.open(ConnKey { pid, fd: s.fd }, s.role, addrs, Clock::monotonic_now(), false);
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
            (Role::Client, _) => self.early_locals.remove(&ConnKey { pid, fd }),
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
        self.open(ConnKey { pid, fd }, role, addrs, ts_ns, true);
    }

    /// A connection the process made is established: its own address (the kernel reports it
    /// before the first byte can be sent on it).
    pub fn on_local_addr(&mut self, pid: u32, fd: u32, local: Option<SocketAddr>) {
        let (key, Some(local)) = (ConnKey { pid, fd }, local) else { return };
        match self.conns.get_mut(&key) {
            Some(conn) if conn.role == Role::Client && !conn.saw_bytes => conn.addrs.local = Some(local),
            _ => {
                if self.early_locals.len() >= MAX_EARLY_LOCALS {
                    self.early_locals.clear();
                }
                self.early_locals.insert(key, local);
            }
        }
    }

    fn open(&mut self, key: ConnKey, role: Role, addrs: ConnAddrs, ts_ns: u64, from_birth: bool) {
        let mut events = std::mem::take(&mut self.events);
        if let Some(mut old) = self.conns.close(key, ts_ns, &mut events) {
            self.finish_conn(key, &mut old, &mut events);
        }
        self.conns.open(key, role, addrs, ts_ns, &mut events);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.from_birth = from_birth;
            conn.loss_epoch = self.loss_epoch;
        }
        if role == Role::Client
            && let Some(peer) = addrs.peer
        {
            self.clients_by_peer.entry(canonical(peer)).or_default().push(key);
        }
        self.events = events;
    }

    pub fn on_close(&mut self, pid: u32, fd: u32, ts_ns: u64) {
        if let Some(logs) = &mut self.logs {
            logs.on_close(&self.tracer, pid, fd);
        }
        let key = ConnKey { pid, fd };
        let mut events = std::mem::take(&mut self.events);
        if let Some(mut conn) = self.conns.close(key, ts_ns, &mut events) {
            self.finish_conn(key, &mut conn, &mut events);
        }
        events.clear();
        self.events = events;
    }

    /// A connection left the table: what its close completed becomes spans, and it is no
    /// longer a candidate for anything.
    fn finish_conn(&mut self, key: ConnKey, conn: &mut Conn, events: &mut Vec<SessionEvent>) {
        self.tracer.apply(key, conn, false, None, events);
        self.tracer.closed(key, conn);
        if conn.role == Role::Client
            && let Some(peer) = conn.addrs.peer
            && let Some(list) = self.clients_by_peer.get_mut(&canonical(peer))
        {
            list.retain(|k| *k != key);
            if list.is_empty() {
                self.clients_by_peer.remove(&canonical(peer));
            }
        }
    }

    /// The kernel wrote a traceparent into the request that starts at stream byte `offset` of the
    /// client connection: its CLIENT span takes those ids when its write is seen.
    pub fn on_injected(&mut self, pid: u32, fd: u32, injected: Injected) {
        if let Some(conn) = self.conns.get_mut(&ConnKey { pid, fd }) {
            if conn.injected.len() >= MAX_INJECTED_PER_CONN {
                conn.injected.pop_front();
            }
            conn.injected.push_back(injected);
        }
    }

    /// Turns injection bookkeeping on: server requests then tell the kernel which trace their
    /// thread serves (see [`Pipeline::take_thread_contexts`]).
    pub fn enable_injection(&mut self) {
        self.tracer.inject_contexts = true;
    }

    /// Thread contexts decided since the last call, for the kernel's `THREAD_CONTEXT` map.
    pub fn take_thread_contexts(&mut self) -> Vec<(u64, sonde_common::ThreadContext)> {
        std::mem::take(&mut self.tracer.thread_contexts)
    }

    /// One syscall's bytes on socket `fd` of `pid`; `role` is what the kernel's socket map knows.
    pub fn on_data(&mut self, pid: u32, fd: u32, role: Role, data: DataIn<'_>) {
        let key = ConnKey { pid, fd };
        let ts_ns = data.ts_ns;
        let uncopied = data.byte_count.saturating_sub(data.payload.len() as u64);
        if uncopied > 0 {
            Stats::add(&self.tracer.stats().bytes_not_captured, uncopied);
        }
        if self.conns.get(&key).is_none() && role != Role::Unknown {
            // Inherited from a parent, or the open event was lost: the kernel knows the role.
            let addrs =
                socket_addrs(pid, fd).map(|(l, p)| ConnAddrs { local: Some(l), peer: Some(p) }).unwrap_or_default();
            self.open(key, role, addrs, ts_ns, false);
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.io_ts_ns = ts_ns;
            conn.io_tid = data.tid;
            if conn.role == Role::Server && data.dir == Direction::Ingress {
                self.tracer.server_read(pid, data.tid);
            }
            if data.dir == Direction::Egress {
                // A traceparent written at this write's first byte belongs to the request that
                // starts there; older ones lost their write (a lost event) and are dropped.
                let at = conn.sent;
                while conn.injected.front().is_some_and(|i| i.offset < at) {
                    conn.injected.pop_front();
                }
                if conn.injected.front().is_some_and(|i| i.offset == at) {
                    conn.injected_now = conn.injected.pop_front();
                }
                conn.sent += data.byte_count;
            }
        }
        let mut events = std::mem::take(&mut self.events);
        self.conns.on_data(key, data, &mut events);
        if !events.is_empty() {
            let starts = events.iter().any(|e| matches!(e, SessionEvent::RequestStarted(_)));
            let mirror = if starts { self.mirror(key) } else { None };
            let epoch = self.loss_epoch;
            if let Some(conn) = self.conns.get_mut(&key) {
                let joinable = joinable(conn, epoch);
                self.tracer.apply(key, conn, joinable, mirror, &mut events);
            }
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.injected_now = None;
        }
        events.clear();
        self.events = events;
    }

    /// The traced client end of server connection `key`, found once per connection: a client
    /// connection to this server's address whose own address is this connection's peer (in
    /// the same network namespace for loopback addresses).
    fn mirror(&mut self, key: ConnKey) -> Option<Mirror> {
        let conn = self.conns.get(&key)?;
        if conn.role != Role::Server {
            return None;
        }
        let found = match conn.mirror {
            Some(found) => found,
            None => {
                let found = self.find_mirror(key);
                // Both ends now know whom they talk to (the service graph's edge).
                let client_service = found.and_then(|(client, _)| self.tracer.service_of(client.pid));
                let server_service = self.tracer.service_of(key.pid);
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.mirror = Some(found);
                    conn.peer_service = client_service;
                }
                if let Some((client, _)) = found
                    && let Some(c) = self.conns.get_mut(&client)
                {
                    c.peer_service = server_service;
                }
                found
            }
        };
        let Some((client_key, client_id)) = found else {
            return self.unknown_peer_with_traced_clients(key).then_some(Mirror {
                conn_id: 0,
                joinable: false,
                unjoinable: Unjoinable::AddressUnknown,
            });
        };
        let client = self.conns.get(&client_key).filter(|c| c.id == client_id)?;
        let joinable = joinable(client, self.loss_epoch);
        let unjoinable = if joinable { Unjoinable::None } else { unjoinable_reason(client) };
        Some(Mirror { conn_id: client_id, joinable, unjoinable })
    }

    /// Server connection `key` has no peer address, and a traced client is connected to its
    /// address: its client end may be traced here, and cannot be found.
    fn unknown_peer_with_traced_clients(&self, key: ConnKey) -> bool {
        let Some(conn) = self.conns.get(&key) else { return false };
        match (conn.addrs.local, conn.addrs.peer) {
            (Some(local), None) => self.clients_by_peer.get(&canonical(local)).is_some_and(|c| !c.is_empty()),
            _ => false,
        }
    }

    fn find_mirror(&mut self, key: ConnKey) -> Option<(ConnKey, u64)> {
        let conn = self.conns.get(&key)?;
        let (local, peer) = (canonical(conn.addrs.local?), canonical(conn.addrs.peer?));
        let candidates = self.clients_by_peer.get(&local)?.clone();
        // Loopback addresses repeat in every network namespace: both ends must share one (an
        // unknown namespace matches nothing).
        let server_netns = if local.ip().is_loopback() { Some(self.netns_of(key.pid)?) } else { None };
        candidates.into_iter().find_map(|candidate| {
            if let Some(ns) = server_netns
                && self.netns_of(candidate.pid) != Some(ns)
            {
                return None;
            }
            let client = self.conns.get(&candidate)?;
            (client.addrs.local.map(canonical) == Some(peer)).then_some((candidate, client.id))
        })
    }

    fn netns_of(&mut self, pid: u32) -> Option<u64> {
        *self.netns.entry(pid).or_insert_with(|| {
            let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
            let text = link.to_str()?;
            text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
        })
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.tracer.finish();
        if let Some(logs) = &mut self.logs {
            logs.finish(&self.tracer);
        }
    }
}

/// Request positions on a connection can be matched with the other end's: it was seen from its
/// first byte, its parser never lost its place, no kernel event was lost since it opened, and its
/// plaintext is the syscalls' (TLS plaintext may start after the first bytes).
fn joinable(conn: &Conn, loss_epoch: u64) -> bool {
    if conn.protocol() == Some(crate::protocol::Protocol::Http2) {
        // HTTP/2 ties requests by stream id, which both ends see the same whatever was missed
        // before (connection opened before sonde, TLS plaintext seen late, lost events): only
        // framing that was lost and found again (desync) could misread an id.
        return !conn.desynced && conn.role != Role::Unknown;
    }
    conn.from_birth && !conn.desynced && !conn.tls && conn.role != Role::Unknown && conn.loss_epoch == loss_epoch
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, a dual-stack listener's view) as IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}
