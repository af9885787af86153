//! Wire types shared by the eBPF programs (`no_std`) and the agent.
//!
//! Every type here is `#[repr(C)]`, `Copy`, uses explicit padding and `u32` flags instead of `bool`,
//! so both sides agree on the layout byte for byte.
#![no_std]

/// Largest prefix of one syscall's payload the kernel copies. Power of two: the eBPF side masks
/// lengths with `MAX_CAPTURE - 1` so the verifier can prove bounds. The runtime limit
/// (`capture.max_bytes`) is at most this.
pub const MAX_CAPTURE: usize = 8192;
/// Bytes copied per syscall unless configured otherwise: enough for typical HTTP headers and SQL.
pub const DEFAULT_CAPTURE: u32 = 4096;
/// Size of the per-CPU scratch payload area: the iovec loop writes at offsets below
/// `MAX_CAPTURE` with lengths masked below `2 * MAX_CAPTURE`, so the verifier can bound every copy.
pub const SCRATCH_PAYLOAD: usize = 3 * MAX_CAPTURE;
/// iovecs read per readv/writev/recvmsg/sendmsg call; the byte count still covers all of them.
/// gRPC (C-core) writes each HTTP/2 frame header and payload as iovecs of their own: 14 for a
/// unary response, 27 for a connection's first request, 36 for a relay's first burst of 8
/// concurrent calls. A header block in the uncopied part loses the connection's HPACK table.
/// 6.18's verifier takes 64 in about a second and refuses 128. Kernels whose verifier refuses
/// the walk (5.10, 6.1) get the exit program built for [`COMPACT_IOVECS`].
pub const MAX_IOVECS: u32 = 64;
/// iovecs read per call where the verifier refuses [`MAX_IOVECS`].
pub const COMPACT_IOVECS: u32 = 16;
/// Entries in the traced-process filter map.
pub const MAX_TRACED_PIDS: u32 = 16384;
/// Map flag: the map's values can be mmapped by user space (the traced-process bitmap).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Entries in the socket map (pid, fd) -> role. LRU, so a leak can never grow it further.
pub const MAX_SOCKETS: u32 = 65536;
/// Syscalls in flight between enter and exit (one per thread at most).
pub const MAX_INFLIGHT: u32 = 16384;

/// Kind of a record in the event ring buffer. Stable numbers: user space matches on them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Payload bytes read from or written to a socket: a [`DataEvent`].
    Data = 1,
    /// A connection was accepted or connected: a [`ConnEvent`].
    ConnOpen = 2,
    /// A tracked socket fd was closed: a [`ConnEvent`].
    ConnClose = 3,
    /// A traced process forked a child that is now traced too: a [`ProcEvent`].
    ProcFork = 4,
    /// Any process called exec: a [`ProcEvent`] (discovery re-checks selectors).
    ProcExec = 5,
    /// A traced process (thread group) exited: a [`ProcEvent`].
    ProcExit = 6,
    /// Any process started listening on a socket: a [`ProcEvent`] (discovery re-checks `open_ports`).
    Listen = 7,
    /// A traced process mapped a file executable (a library loading, dlopen included): a
    /// [`ProcEvent`]; user space looks for a TLS library to probe.
    ExecMapping = 8,
    /// A socket a traced process connected is established: its own address, in a [`ConnEvent`]
    /// (`local`).
    ConnLocal = 9,
    /// The injection program wrote a traceparent into an outgoing request, or gave a
    /// connection up: an [`InjectEvent`].
    Inject = 10,
    /// A traced process wrote to one of its log fds (`logs.capture`): a [`DataEvent`] whose
    /// `role` is a `LOG_STREAM_*` and whose payload is the written bytes' prefix.
    LogWrite = 11,
    /// A traced process opened a file for writing while log files are watched: a
    /// [`DataEvent`] whose `fd` is the new fd, `flags` the open flags and payload the path as
    /// the process passed it (user space decides whether it is a log file).
    LogOpen = 12,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Data,
            2 => Self::ConnOpen,
            3 => Self::ConnClose,
            4 => Self::ProcFork,
            5 => Self::ProcExec,
            6 => Self::ProcExit,
            7 => Self::Listen,
            8 => Self::ExecMapping,
            9 => Self::ConnLocal,
            10 => Self::Inject,
            11 => Self::LogWrite,
            12 => Self::LogOpen,
            _ => return None,
        })
    }
}

/// Direction of a data event, seen from the traced process.
pub const DIR_INGRESS: u32 = 0;
pub const DIR_EGRESS: u32 = 1;

/// Role of a socket, from how it was born.
pub const ROLE_UNKNOWN: u32 = 0;
/// Returned by accept: the process serves on it.
pub const ROLE_SERVER: u32 = 1;
/// Connected by the process: it is the client.
pub const ROLE_CLIENT: u32 = 2;

/// Data event flag: bytes moved by sendfile/splice; the count is real, nothing was copied.
pub const DATA_FLAG_UNCOPIED: u32 = 1;
/// Data event flag: plaintext captured at the TLS library boundary (SSL_read/SSL_write).
pub const DATA_FLAG_TLS: u32 = 2;

/// What a log fd is (value of the `LOG_FDS` map, and `role` of a [`EventKind::LogWrite`]).
pub const LOG_STREAM_STDOUT: u32 = 1;
pub const LOG_STREAM_STDERR: u32 = 2;
/// A file whose path matches `logs.files`.
pub const LOG_STREAM_FILE: u32 = 3;
/// Opened for writing after sonde started and not classified by user space yet: its writes are
/// sent, and user space keeps them only if the [`EventKind::LogOpen`] before them named a log file.
pub const LOG_STREAM_PENDING: u32 = 4;
/// Entries in the log fd map.
pub const MAX_LOG_FDS: u32 = 16384;
/// Longest path a [`EventKind::LogOpen`] carries.
pub const MAX_LOG_PATH: u32 = 256;

/// Value of the `LOG_FDS` map, keyed by [`SocketKey`] (pid, fd).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogFd {
    /// A `LOG_STREAM_*`.
    pub stream: u32,
    pub _pad: u32,
}

/// Socket flag: the socket carries TLS; its syscall-level bytes are ciphertext and not emitted.
pub const SOCKET_FLAG_TLS: u32 = 1;

/// Value bits in the PID filter map. Every traced process has TRACED_FLAG_TRACED.
pub const TRACED_FLAG_TRACED: u32 = 1;
/// The process has called into the TLS library (set by the TLS probes on its first call, inherited
/// by children): only then do its socket syscalls look for a TLS call around them. A server that
/// links OpenSSL but serves plaintext never pays for that bookkeeping.
pub const TRACED_FLAG_TLS: u32 = 2;

/// Header common to every ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An [`EventKind`] number.
    pub kind: u32,
    /// Thread group id (the process id).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Low 32 bits of the kernel time of the latest record that could not be queued (any CPU),
    /// read when this one was made: a record made after a loss carries a changed value.
    pub last_loss: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the syscall returned.
    pub ts_ns: u64,
}

/// Payload moved by one syscall on a tracked socket. Followed in the ring buffer by
/// `captured_len` bytes of the payload prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DataEvent {
    pub header: EventHeader,
    pub fd: u32,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub direction: u32,
    /// The syscall's return value: how many bytes really moved.
    pub byte_count: u64,
    /// How many bytes follow (<= byte_count, <= the configured capture size).
    pub captured_len: u32,
    /// `DATA_FLAG_*` bits.
    pub flags: u32,
    /// `ROLE_*` of the socket, as the socket map knows it.
    pub role: u32,
    pub _pad: u32,
}

/// A socket address as the kernel wrote it (sockaddr_in or sockaddr_in6), raw.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RawSockaddr {
    /// AF_INET (2), AF_INET6 (10), or 0 when unknown.
    pub family: u16,
    /// Network byte order.
    pub port_be: u16,
    /// IPv4 in the first 4 bytes, or the IPv6 address.
    pub addr: [u8; 16],
}

impl RawSockaddr {
    pub const EMPTY: Self = Self { family: 0, port_be: 0, addr: [0; 16] };
}

/// A connection opened (accept/connect) or closed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnEvent {
    pub header: EventHeader,
    pub fd: u32,
    /// `ROLE_*`.
    pub role: u32,
    /// For accept: the listening fd the connection came from; otherwise u32::MAX.
    pub listen_fd: u32,
    pub _pad: u32,
    /// The peer's address when the syscall exposed it (accept with a buffer, connect).
    pub peer: RawSockaddr,
    /// [`EventKind::ConnLocal`]: the socket's own address and port; empty otherwise.
    pub local: RawSockaddr,
}

/// Process lifecycle: fork (pid = parent, other_pid = child), exec, exit, listen (other_pid = fd).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcEvent {
    pub header: EventHeader,
    pub other_pid: u32,
    /// `PROC_FLAG_*` bits.
    pub flags: u32,
}

/// Fork flag: the child was created in a new network namespace (CLONE_NEWNET).
pub const PROC_FLAG_NEW_NETNS: u32 = 1;

/// Value in the socket map: what the kernel needs to know about a tracked fd.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SocketInfo {
    /// `ROLE_*`.
    pub role: u32,
    /// `SOCKET_FLAG_*` bits.
    pub flags: u32,
    /// When the socket was accepted/connected (0: it existed before sonde saw it).
    pub opened_ns: u64,
    /// When the process closed it; 0 while open. A process with children keeps closed entries
    /// so that a child forked while the socket was open still inherits it.
    pub closed_ns: u64,
}

pub const HISTORY_DEPTH: usize = 8;

/// Value in the socket history map: earlier sockets of one (tgid, fd) of a process with
/// children, a ring whose newest entry overwrites the oldest. User space removes a process's
/// entries when it exits.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SocketHistory {
    pub entries: [SocketInfo; HISTORY_DEPTH],
    /// Where the next entry goes.
    pub next: u32,
    pub _pad: u32,
}

/// Value in the parents map: who forked a traced child, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ParentInfo {
    pub parent: u32,
    pub _pad: u32,
    pub fork_ns: u64,
}

/// Key of the socket map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketKey {
    pub pid: u32,
    pub fd: u32,
}

/// Counters kept per CPU in the `COUNTERS` array, indexed by these numbers.
pub mod counter {
    /// Records that did not fit in the ring buffer.
    pub const RINGBUF_DROPS: u32 = 0;
    /// Data events emitted.
    pub const DATA_EVENTS: u32 = 1;
    /// Payload bytes copied to user space.
    pub const BYTES_CAPTURED: u32 = 2;
    /// Syscall exits whose enter record was missing (e.g. in-flight map full).
    pub const MISSED_ENTERS: u32 = 3;
    /// TLS plaintext whose socket could not be identified (dropped).
    pub const TLS_NO_FD: u32 = 4;
    /// TLS plaintext events emitted.
    pub const TLS_EVENTS: u32 = 5;
    /// Log writes that did not fit in the ring buffer (counted apart from `RINGBUF_DROPS`: a
    /// lost log line says nothing about the connections' byte streams).
    pub const LOG_DROPS: u32 = 6;
    /// Log write events emitted.
    pub const LOG_EVENTS: u32 = 7;
    /// Number of counters.
    pub const COUNT: u32 = 8;
}

/// Runtime settings user space writes into the `SETTINGS` array (index 0) before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Bytes to copy per syscall (<= MAX_CAPTURE).
    pub capture_bytes: u32,
    /// Offsets of `pid` and `clone_flags` in the task_newtask tracepoint record (read from tracefs:
    /// they differ across kernel versions).
    pub new_task_pid_offset: u32,
    pub new_task_clone_flags_offset: u32,
    /// Bytes to copy per log write (`logs.max_bytes`); 0: log capture is off.
    pub log_capture_bytes: u32,
    /// The agent's own pid: never traced.
    pub self_pid: u32,
    /// Wake user space once this many bytes are waiting in the ring buffer; below, it polls.
    pub wakeup_bytes: u32,
    /// Offsets of fields of the `sock:inet_sock_set_state` record (read from tracefs).
    pub sock_skaddr_offset: u32,
    pub sock_oldstate_offset: u32,
    pub sock_newstate_offset: u32,
    pub sock_sport_offset: u32,
    pub sock_family_offset: u32,
    pub sock_protocol_offset: u32,
    pub sock_saddr_offset: u32,
    pub sock_saddr_v6_offset: u32,
    pub sock_dport_offset: u32,
    pub sock_daddr_offset: u32,
    pub sock_daddr_v6_offset: u32,
    /// Non-zero: client sockets of traced processes get traceparent injection (sockops + sk_msg).
    pub inject_http: u32,
    /// Head sampling for traces the injection starts: sampled when the trace id's low 64 bits,
    /// shifted right by one, are below this (u64::MAX: always; 0: never).
    pub sample_bound: u64,
    /// Non-zero: files opened for writing by traced processes are reported (`logs.files` is set).
    pub log_watch_opens: u32,
    /// A log write is dropped (and counted) when the unread ring buffer data would exceed this:
    /// the rest of the ring stays for socket payloads, so a burst of log lines never costs a
    /// span.
    pub log_ring_limit: u32,
}

/// A TCP connection by its addresses, as both the sockops and the sk_msg programs see it: the
/// key of the injection maps. Ports in host order; addresses as on the wire (IPv4 in the first 4
/// bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InjectKey {
    pub family: u32,
    pub local_port: u32,
    pub remote_port: u32,
    pub _pad: u32,
    pub local: [u8; 16],
    pub remote: [u8; 16],
}

/// Per-connection state of the injection program.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct InjectState {
    /// The traced process and its fd for the socket.
    pub pid: u32,
    pub fd: u32,
    /// Bytes the application has sent on the socket so far (what it wrote, not what was added).
    pub sent: u64,
    /// Bytes of the current request's body still to come: the next request starts after them.
    pub body_left: u64,
    /// Non-zero once the program lost track of where requests start (an `inject_reason`).
    pub gave_up: u32,
    pub _pad: u32,
}

/// Why a request was not injected, or a connection given up: indexes of the per-CPU
/// `INJECT_COUNTS` array (index 0 counts injections).
pub mod inject_reason {
    pub const INJECTED: u32 = 0;
    /// The request already carried a traceparent: left as it is.
    pub const TRACEPARENT_PRESENT: u32 = 1;
    /// The connection does not start with an HTTP/1.x request (TLS, HTTP/2, another protocol).
    pub const NOT_HTTP1: u32 = 2;
    /// The request head did not end within one message and the scan window.
    pub const HEAD_INCOMPLETE: u32 = 3;
    /// A body without a Content-Length (chunked): where the next request starts is unknown.
    pub const BODY_UNKNOWN: u32 = 4;
    /// A message held more than one request (pipelining), or a request started inside one.
    pub const PIPELINED: u32 = 5;
    /// The kernel refused to grow or rewrite the message.
    pub const REWRITE_FAILED: u32 = 6;
    /// Requests on a connection given up earlier.
    /// Injected with a new trace although the thread serves a request: its context was not
    /// current (user space had not seen the request yet, or the thread did other server I/O since).
    pub const NO_CURRENT_CONTEXT: u32 = 7;
    pub const COUNT: u32 = 8;
    pub const NAMES: [&str; COUNT as usize] = [
        "injected",
        "traceparent_present",
        "not_http1",
        "head_incomplete",
        "body_unknown",
        "pipelined",
        "rewrite_failed",
        "no_current_context",
    ];
}

/// The injection program's report: `reason` INJECTED with the ids it wrote, or the reason a
/// connection was given up (user space then takes the socket out of the sock hash).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct InjectEvent {
    pub header: EventHeader,
    pub fd: u32,
    pub reason: u32,
    /// Bytes the application had sent on the socket before this message: where the request
    /// starts in the stream.
    pub offset: u64,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// 1 when the trace is sampled.
    pub sampled: u32,
    /// 1 when the trace is the one of the server request the thread was serving
    /// (`parent_id` is that request's span).
    pub has_parent: u32,
    pub parent_id: [u8; 8],
    pub key: InjectKey,
}

/// The server request a thread serves, as user space last decided it (value of
/// `THREAD_CONTEXT`, keyed by pid_tgid). The injection uses it only while `io_ts_ns` is still the
/// time of the thread's latest read or write on a server socket: any server I/O since (another
/// request, the response) makes it stale, so a late update from user space can never put a
/// request under the wrong trace.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ThreadContext {
    pub io_ts_ns: u64,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::SocketInfo {}
    unsafe impl aya::Pod for super::SocketKey {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::ParentInfo {}
    unsafe impl aya::Pod for super::SocketHistory {}
    unsafe impl aya::Pod for super::InjectKey {}
    unsafe impl aya::Pod for super::InjectState {}
    unsafe impl aya::Pod for super::ThreadContext {}
    unsafe impl aya::Pod for super::LogFd {}
}
