//! The connection table: routes each syscall's bytes to the right protocol session.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use crate::{
    protocol::{
        Protocol, Segment, Session, SessionEvent, Side,
        detect::{Detection, detect},
    },
    trace::{
        context::{Injected, Lineage},
        http_attrs::ConnAddrs,
        span::Text,
    },
};

/// Bytes kept while a connection's protocol is undecided (e.g. a client writing 1 byte at a time).
const DETECT_BUFFER_BYTES: usize = 64;
/// Segments tried before a connection is declared opaque (not a protocol we parse).
const DETECT_ATTEMPTS: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub pid: u32,
    pub fd: u32,
}

/// The traced process's role on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// It accepted the connection: ingress bytes are requests.
    Server,
    /// It connected: egress bytes are requests.
    Client,
    /// Seen before its birth (e.g. lost open event); decided by what the first bytes look like.
    Unknown,
}

enum Parser {
    Undecided {
        buffered: Vec<u8>,
        side: Option<Side>,
        first_ts: u64,
        first_tid: u32,
        attempts: u32,
    },
    Active(Box<dyn Session>),
    /// Not a protocol we know; bytes are counted, not parsed.
    Opaque,
}

pub struct Conn {
    /// Unique over the agent's life: an fd number is reused, a connection id never is.
    pub id: u64,
    pub role: Role,
    pub addrs: ConnAddrs,
    parser: Parser,
    /// Spans of requests seen and not yet answered, by session sequence number, with the
    /// thread that made the request.
    pub contexts: VecDeque<(u64, u32, Lineage)>,
    /// The connection carries TLS: only plaintext from the TLS library is parsed.
    pub tls: bool,
    /// Its birth (accept/connect) was seen, so its stream was seen from the first byte.
    pub from_birth: bool,
    /// Bytes were seen on it (a child inheriting it then starts mid-stream).
    pub saw_bytes: bool,
    /// The parser lost its place once (a parse error, a response without request): request
    /// positions on it no longer match the other end's.
    pub desynced: bool,
    /// The agent's count of kernel event losses when it opened: any loss since may have taken
    /// some of its bytes.
    pub loss_epoch: u64,
    /// Server connections: the traced client socket at the other end, once looked up
    /// (`Some(None)`: none is traced here).
    pub mirror: Option<Option<(ConnKey, u64)>>,
    /// The service at the other end when that end is traced here too (for the service graph).
    pub peer_service: Option<Text>,
    /// Bytes the process sent on it: the stream offset of its next write.
    pub sent: u64,
    /// Kernel time of the data event being processed.
    pub io_ts_ns: u64,
    /// Thread of that syscall (the one that wrote a response's end, for access-log lines).
    pub io_tid: u32,
    /// Traceparents the kernel wrote into requests on it, oldest first, not yet matched.
    pub injected: VecDeque<Injected>,
    /// The one written into the request that starts at the write being processed.
    pub injected_now: Option<Injected>,
}

/// Source of connection ids.
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

impl Conn {
    pub fn new(role: Role, addrs: ConnAddrs) -> Self {
        Self {
            id: NEXT_CONN_ID.fetch_add(1, Relaxed),
            role,
            addrs,
            parser: Parser::Undecided { buffered: Vec::new(), side: None, first_ts: 0, first_tid: 0, attempts: 0 },
            contexts: VecDeque::new(),
            tls: false,
            from_birth: false,
            saw_bytes: false,
            desynced: false,
            loss_epoch: 0,
            mirror: None,
            peer_service: None,
            sent: 0,
            io_ts_ns: 0,
            io_tid: 0,
            injected: VecDeque::new(),
            injected_now: None,
        }
    }

    pub fn protocol(&self) -> Option<Protocol> {
        match &self.parser {
            Parser::Active(s) => Some(s.protocol()),
            _ => None,
        }
    }
}

#[derive(Default)]
pub struct ConnTable {
    /// Ordered by (pid, fd): a process's connections are one range.
    conns: BTreeMap<ConnKey, Conn>,
}

/// What one syscall moved on a connection.
#[derive(Clone, Copy, Debug)]
pub struct DataIn<'a> {
    pub dir: Direction,
    /// The captured prefix.
    pub payload: &'a [u8],
    /// How many bytes really moved.
    pub byte_count: u64,
    pub ts_ns: u64,
    pub tid: u32,
    /// Plaintext captured at the TLS library (the socket's own bytes are ciphertext).
    pub tls: bool,
}

/// Direction of bytes as the traced process saw them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl ConnTable {
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn get(&self, key: &ConnKey) -> Option<&Conn> {
        self.conns.get(key)
    }

    pub fn get_mut(&mut self, key: &ConnKey) -> Option<&mut Conn> {
        self.conns.get_mut(key)
    }

    /// A new connection on `key`; a previous one on the same fd is closed first.
    pub fn open(&mut self, key: ConnKey, role: Role, addrs: ConnAddrs, ts_ns: u64, out: &mut Vec<SessionEvent>) {
        self.close(key, ts_ns, out);
        self.conns.insert(key, Conn::new(role, addrs));
    }

    /// The connection closed: its session reports what it completes or leaves unmatched.
    pub fn close(&mut self, key: ConnKey, ts_ns: u64, out: &mut Vec<SessionEvent>) -> Option<Conn> {
        let mut conn = self.conns.remove(&key)?;
        match &mut conn.parser {
            Parser::Active(s) => s.close(ts_ns, out),
            // Bytes were seen but never recognized: count the stream once.
            Parser::Undecided { buffered, attempts, .. } if *attempts > 0 || !buffered.is_empty() => {
                out.push(SessionEvent::Unrecognized)
            }
            _ => {}
        }
        Some(conn)
    }

    fn range_of(pid: u32) -> std::ops::RangeInclusive<ConnKey> {
        ConnKey { pid, fd: 0 }..=ConnKey { pid, fd: u32::MAX }
    }

    /// The connections a process holds.
    pub fn keys_of(&self, pid: u32) -> Vec<ConnKey> {
        self.conns.range(Self::range_of(pid)).map(|(k, _)| *k).collect()
    }

    /// A forked child holds its parent's connections: same roles and addresses, fresh parsers
    /// (whichever process uses a socket from now on gets its own stream).
    pub fn inherit(&mut self, parent: u32, child: u32) {
        let copies: Vec<(ConnKey, Conn)> = self
            .conns
            .range(Self::range_of(parent))
            .map(|(k, c)| {
                let mut copy = Conn::new(c.role, c.addrs);
                // The child reads the stream from where the parent left it: from its start only
                // if the parent never touched it (fork-after-accept servers).
                copy.from_birth = c.from_birth && !c.saw_bytes;
                copy.loss_epoch = c.loss_epoch;
                (ConnKey { pid: child, fd: k.fd }, copy)
            })
            .collect();
        self.conns.extend(copies);
    }

    /// Routes one syscall's bytes. Unknown connections are created with [`Role::Unknown`].
    pub fn on_data(&mut self, key: ConnKey, data: DataIn<'_>, out: &mut Vec<SessionEvent>) {
        let DataIn { dir, payload: bytes, byte_count, ts_ns, tid, tls } = data;
        let conn = self.conns.entry(key).or_insert_with(|| Conn::new(Role::Unknown, ConnAddrs::default()));
        conn.saw_bytes = true;
        if tls && !conn.tls {
            // Plaintext from the TLS library from now on: whatever was parsed so far was the
            // handshake (or a protocol's own TLS negotiation), so start over.
            conn.tls = true;
            conn.parser =
                Parser::Undecided { buffered: Vec::new(), side: None, first_ts: 0, first_tid: 0, attempts: 0 };
        } else if !tls && conn.tls {
            return;
        }
        if conn.role == Role::Unknown {
            // The side that starts with a request tells the role.
            let as_request = matches!(detect(Side::Request, bytes), Detection::Matched(_));
            if as_request {
                conn.role = if dir == Direction::Ingress { Role::Server } else { Role::Client };
            } else {
                return;
            }
        }
        let side = match (conn.role, dir) {
            (Role::Server, Direction::Ingress) | (Role::Client, Direction::Egress) => Side::Request,
            _ => Side::Response,
        };
        let seg = Segment { side, bytes, byte_count, ts_ns, tid };
        match &mut conn.parser {
            Parser::Active(s) => s.feed(&seg, out),
            Parser::Opaque => {}
            Parser::Undecided { .. } => detect_then_feed(conn, seg, out),
        }
    }
}

fn detect_then_feed(conn: &mut Conn, seg: Segment<'_>, out: &mut Vec<SessionEvent>) {
    let Parser::Undecided { buffered, side, first_ts, first_tid, attempts } = &mut conn.parser else {
        return;
    };
    // Only bytes from one side can be glued together; a switch of side restarts detection.
    if *side != Some(seg.side) || seg.uncopied() > 0 {
        buffered.clear();
    }
    if buffered.is_empty() {
        *side = Some(seg.side);
        *first_ts = seg.ts_ns;
        *first_tid = seg.tid;
    }
    let candidate_owned;
    let candidate: &[u8] = if buffered.is_empty() {
        seg.bytes
    } else {
        buffered.extend_from_slice(seg.bytes);
        candidate_owned = std::mem::take(buffered);
        &candidate_owned
    };
    match detect(seg.side, candidate) {
        Detection::Matched(mut session) => {
            let glued = Segment {
                bytes: candidate,
                byte_count: candidate.len() as u64 + seg.uncopied(),
                ts_ns: *first_ts,
                tid: *first_tid,
                ..seg
            };
            session.feed(&glued, out);
            conn.parser = Parser::Active(session);
        }
        Detection::NeedMore if candidate.len() < DETECT_BUFFER_BYTES && seg.uncopied() == 0 => {
            let keep = candidate.to_vec();
            if let Parser::Undecided { buffered, .. } = &mut conn.parser {
                *buffered = keep;
            }
        }
        _ => {
            *attempts += 1;
            if *attempts >= DETECT_ATTEMPTS {
                conn.parser = Parser::Opaque;
                out.push(SessionEvent::Unrecognized);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completed(out: &[SessionEvent]) -> usize {
        out.iter().filter(|e| matches!(e, SessionEvent::Completed(_))).count()
    }

    #[test]
    fn server_connection_pairs_ingress_requests_with_egress_responses() {
        let mut t = ConnTable::default();
        let key = ConnKey { pid: 1, fd: 5 };
        let mut out = Vec::new();
        t.open(key, Role::Server, ConnAddrs::default(), 0, &mut out);
        t.on_data(
            key,
            DataIn {
                dir: Direction::Ingress,
                tls: false,
                payload: b"GET / HTTP/1.1\r\n\r\n",
                byte_count: 18,
                ts_ns: 1,
                tid: 1,
            },
            &mut out,
        );
        t.on_data(
            key,
            DataIn {
                dir: Direction::Egress,
                tls: false,
                payload: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                byte_count: 38,
                ts_ns: 2,
                tid: 1,
            },
            &mut out,
        );
        assert_eq!(completed(&out), 1);
        assert_eq!(t.get(&key).unwrap().protocol(), Some(Protocol::Http));
    }

    #[test]
    fn one_byte_writes_are_detected() {
        let mut t = ConnTable::default();
        let key = ConnKey { pid: 1, fd: 5 };
        let mut out = Vec::new();
        t.open(key, Role::Client, ConnAddrs::default(), 0, &mut out);
        for b in b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n" {
            t.on_data(
                key,
                DataIn { dir: Direction::Egress, tls: false, payload: &[*b], byte_count: 1, ts_ns: 1, tid: 1 },
                &mut out,
            );
        }
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        t.on_data(
            key,
            DataIn {
                dir: Direction::Ingress,
                tls: false,
                payload: resp,
                byte_count: resp.len() as u64,
                ts_ns: 2,
                tid: 1,
            },
            &mut out,
        );
        assert_eq!(completed(&out), 1, "{out:?}");
    }

    #[test]
    fn unknown_role_is_learned_from_the_first_request() {
        let mut t = ConnTable::default();
        let key = ConnKey { pid: 1, fd: 9 };
        let mut out = Vec::new();
        // Mid-stream: a response body tail first, then a request.
        t.on_data(
            key,
            DataIn { dir: Direction::Egress, tls: false, payload: b"tail of a body", byte_count: 14, ts_ns: 1, tid: 1 },
            &mut out,
        );
        t.on_data(
            key,
            DataIn {
                dir: Direction::Ingress,
                tls: false,
                payload: b"GET / HTTP/1.1\r\n\r\n",
                byte_count: 18,
                ts_ns: 2,
                tid: 1,
            },
            &mut out,
        );
        t.on_data(
            key,
            DataIn {
                dir: Direction::Egress,
                tls: false,
                payload: b"HTTP/1.1 204 No Content\r\n\r\n",
                byte_count: 27,
                ts_ns: 3,
                tid: 1,
            },
            &mut out,
        );
        assert_eq!(t.get(&key).unwrap().role, Role::Server);
        assert_eq!(completed(&out), 1);
    }

    #[test]
    fn tls_plaintext_replaces_the_ciphertext_stream() {
        let mut t = ConnTable::default();
        let key = ConnKey { pid: 1, fd: 5 };
        let mut out = Vec::new();
        t.open(key, Role::Server, ConnAddrs::default(), 0, &mut out);
        let data = |dir, payload: &'static [u8], tls| DataIn {
            dir,
            payload,
            byte_count: payload.len() as u64,
            ts_ns: 1,
            tid: 1,
            tls,
        };
        // The handshake arrives through the syscalls before the TLS library is seen.
        t.on_data(key, data(Direction::Ingress, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc", false), &mut out);
        t.on_data(key, data(Direction::Ingress, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", true), &mut out);
        // Ciphertext after the switch is ignored.
        t.on_data(key, data(Direction::Egress, b"\x17\x03\x03\x00\x20garbage", false), &mut out);
        t.on_data(key, data(Direction::Egress, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", true), &mut out);
        assert_eq!(completed(&out), 1, "{out:?}");
        assert!(t.get(&key).unwrap().tls);
        assert!(!out.iter().any(|e| matches!(e, SessionEvent::ParseError { .. })));
    }

    #[test]
    fn non_http_connections_turn_opaque() {
        let mut t = ConnTable::default();
        let key = ConnKey { pid: 1, fd: 5 };
        let mut out = Vec::new();
        t.open(key, Role::Client, ConnAddrs::default(), 0, &mut out);
        for _ in 0..DETECT_ATTEMPTS {
            t.on_data(
                key,
                DataIn {
                    dir: Direction::Egress,
                    tls: false,
                    payload: b"\x16\x03\x01\x02\x00",
                    byte_count: 5,
                    ts_ns: 1,
                    tid: 1,
                },
                &mut out,
            );
        }
        t.on_data(
            key,
            DataIn {
                dir: Direction::Egress,
                tls: false,
                payload: b"GET / HTTP/1.1\r\n\r\n",
                byte_count: 18,
                ts_ns: 1,
                tid: 1,
            },
            &mut out,
        );
        assert_eq!(t.get(&key).unwrap().protocol(), None);
        // Counted once when it turned opaque, and not again at close; never a span.
        assert!(matches!(out.as_slice(), [SessionEvent::Unrecognized]), "{out:?}");
        t.close(key, 2, &mut out);
        assert_eq!(out.len(), 1);
    }
}
