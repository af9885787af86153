//! PostgreSQL frontend/backend protocol v3: startup (user, database), SSLRequest/GSSENCRequest
//! ('N' continues in plaintext; 'S'/'G' turn the connection opaque), simple query (one span per
//! Query message, even with several statements), extended query with named and unnamed
//! statements and portals, pipelining (many Execute before one Sync), COPY, and errors.
//! Authentication and password messages are skipped unread.

mod framing;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};

use framing::{Expect, Fed, Framer, Message, cstr};

use super::{Exchange, ExchangeDetail, Protocol, RequestStart, Segment, Session, SessionEvent, Side};

const PROTOCOL_V3: u32 = 196_608;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// Prepared statements and portals remembered per connection.
const MAX_NAMED: usize = 512;
/// Operations waiting for their results.
const MAX_PENDING: usize = 4096;

/// Whether the first bytes of a connection's request side are PostgreSQL: a startup-family
/// message, or (mid-stream) a complete Query/Parse/Bind message.
pub fn classify_start(bytes: &[u8]) -> Option<bool> {
    if bytes.len() < 8 {
        // Too short for a startup message; a typed Query needs at least 6 bytes.
        return if bytes.first().is_some_and(|b| matches!(b, 0 | b'Q' | b'P' | b'B')) { None } else { Some(false) };
    }
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let code = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let startup = match code {
        PROTOCOL_V3 => (9..=10_000).contains(&len),
        SSL_REQUEST | GSSENC_REQUEST => len == 8,
        CANCEL_REQUEST => len == 16,
        _ => false,
    };
    Some(startup || looks_like_typed_query(bytes))
}

/// A whole Query (`Q text\0`), Parse (`P name\0 text\0 int16 n, n x int32`) or Bind message:
/// how a connection opened before sonde looks when its next statement arrives (a Bind of a
/// statement prepared before sonde started, with no Parse, once a driver reuses it).
fn looks_like_typed_query(b: &[u8]) -> bool {
    if b.len() < 6 {
        return false;
    }
    let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    if !(5..=framing::MAX_KEPT_BODY).contains(&len) || 1 + len > b.len() {
        return false;
    }
    let body = &b[5..1 + len];
    let is_text =
        |t: &[u8]| !t.is_empty() && t.iter().all(|c| c.is_ascii_graphic() || c.is_ascii_whitespace() || *c >= 0x80);
    match b[0] {
        b'Q' => body.last() == Some(&0) && is_text(&body[..body.len() - 1]),
        b'P' => {
            let Some(name_end) = body.iter().position(|c| *c == 0) else { return false };
            let rest = &body[name_end + 1..];
            let Some(text_end) = rest.iter().position(|c| *c == 0) else { return false };
            let params = &rest[text_end + 1..];
            is_text(&rest[..text_end])
                && params.len() >= 2
                && params.len() == 2 + 4 * u16::from_be_bytes([params[0], params[1]]) as usize
        }
        b'B' => is_whole_bind(body),
        _ => false,
    }
}

/// A Bind body that parses to its last byte: portal\0 statement\0, parameter formats (each 0
/// or 1), parameters (int32 length or -1, then the bytes), result formats.
fn is_whole_bind(body: &[u8]) -> bool {
    fn int16(rest: &mut &[u8]) -> Option<usize> {
        let (n, r) = rest.split_first_chunk::<2>()?;
        *rest = r;
        Some(u16::from_be_bytes(*n) as usize)
    }
    fn formats(rest: &mut &[u8]) -> Option<()> {
        for _ in 0..int16(rest)? {
            (int16(rest)? <= 1).then_some(())?;
        }
        Some(())
    }
    fn parameters(rest: &mut &[u8]) -> Option<()> {
        for _ in 0..int16(rest)? {
            let (n, r) = rest.split_first_chunk::<4>()?;
            let n = i32::from_be_bytes(*n);
            *rest = if n >= 0 {
                r.get(n as usize..)?
            } else if n == -1 {
                r
            } else {
                return None;
            };
        }
        Some(())
    }
    let mut names = body.splitn(3, |c| *c == 0);
    let (Some(_portal), Some(_statement), Some(mut rest)) = (names.next(), names.next(), names.next()) else {
        return false;
    };
    formats(&mut rest).and_then(|()| parameters(&mut rest)).and_then(|()| formats(&mut rest)).is_some()
        && rest.is_empty()
}

/// Plausible start of a typed message, for resynchronizing at a syscall boundary.
fn plausible_typed(tags: &[u8], b: &[u8]) -> bool {
    b.len() >= 5 && tags.contains(&b[0]) && (4..=1 << 24).contains(&u32::from_be_bytes([b[1], b[2], b[3], b[4]]))
}

const FRONTEND_TAGS: &[u8] = b"QPBEDSCHXdcfF";
const BACKEND_TAGS: &[u8] = b"123CDEGHIKNRSTZcdnstvWAV";

/// A paired PostgreSQL operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgExchange {
    /// Raw text as sent (sanitized before export), None when the statement was prepared before
    /// sonde saw the connection.
    pub query: Option<String>,
    /// The text was cut (longer than what was captured).
    pub query_truncated: bool,
    pub database: Option<String>,
    /// Rows from the CommandComplete tag (`SELECT 3` -> 3), for row-returning commands.
    pub returned_rows: Option<u64>,
    /// SQLSTATE of an ErrorResponse.
    pub sqlstate: Option<String>,
    /// Statements the query string held (simple protocol can send several).
    pub statements: u32,
    /// The command of the CommandComplete tag (`SELECT`, `INSERT`), kept only when the query is
    /// unknown: all that names a statement prepared before sonde started.
    pub command: Option<String>,
}

#[derive(Debug)]
enum Op {
    Simple {
        seq: u64,
        start: u64,
        query: String,
        truncated: bool,
        rows: Option<u64>,
        sqlstate: Option<String>,
        statements: u32,
    },
    Execute {
        seq: u64,
        start: u64,
        query: Option<String>,
        truncated: bool,
    },
    Sync,
}

#[derive(Debug, Default)]
struct Pairing {
    pending: VecDeque<Op>,
    next_seq: u64,
    statements: HashMap<Vec<u8>, (String, bool)>,
    portals: HashMap<Vec<u8>, (String, bool)>,
    database: Option<String>,
    /// TLS or GSS encryption was accepted: nothing after is plaintext.
    encrypted: bool,
}

pub struct PostgresSession {
    frontend: Framer,
    backend: Framer,
    pairing: Pairing,
}

impl PostgresSession {
    /// A session that starts with the startup message (`mid_stream` = false) or in the middle of
    /// an established connection.
    pub fn new(mid_stream: bool) -> Self {
        let first = if mid_stream { Expect::Typed } else { Expect::Untyped };
        Self { frontend: Framer::new(first), backend: Framer::new(Expect::Typed), pairing: Pairing::default() }
    }
}

impl Session for PostgresSession {
    fn protocol(&self) -> Protocol {
        Protocol::Postgres
    }

    fn feed(&mut self, seg: &Segment<'_>, out: &mut Vec<SessionEvent>) {
        if self.pairing.encrypted {
            return;
        }
        let Self { frontend, backend, pairing } = self;
        let uncopied = seg.uncopied();
        let fed = match seg.side {
            Side::Request => frontend.feed(
                seg.bytes,
                uncopied,
                seg.ts_ns,
                seg.tid,
                |b| plausible_typed(FRONTEND_TAGS, b),
                |tag| matches!(tag, 0 | b'Q' | b'P' | b'B' | b'E' | b'C'),
                |framer, msg| pairing.on_frontend(framer, backend, &msg, out),
            ),
            Side::Response => backend.feed(
                seg.bytes,
                uncopied,
                seg.ts_ns,
                seg.tid,
                |b| plausible_typed(BACKEND_TAGS, b),
                |tag| matches!(tag, b'C' | b'E'),
                |_, msg| pairing.on_backend(&msg, seg.ts_ns, out),
            ),
        };
        if let Fed::Broken(reason) = fed {
            out.push(SessionEvent::ParseError { reason });
        }
    }

    fn close(&mut self, _ts_ns: u64, out: &mut Vec<SessionEvent>) {
        for op in self.pairing.pending.drain(..) {
            if !matches!(op, Op::Sync) {
                out.push(SessionEvent::UnmatchedRequest);
            }
        }
        // A message cut off by the close is not silently forgotten.
        if self.frontend.mid_message() {
            out.push(SessionEvent::ParseError { reason: "message cut off by close" });
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Pairing {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn push(&mut self, op: Op, out: &mut Vec<SessionEvent>) {
        self.pending.push_back(op);
        if self.pending.len() > MAX_PENDING {
            self.pending.pop_front();
            out.push(SessionEvent::UnmatchedRequest);
        }
    }

    fn remember(map: &mut HashMap<Vec<u8>, (String, bool)>, name: &[u8], value: (String, bool)) {
        if map.len() >= MAX_NAMED && !map.contains_key(name) {
            map.clear();
        }
        map.insert(name.to_vec(), value);
    }

    fn on_frontend(
        &mut self,
        framer: &mut Framer,
        backend: &mut Framer,
        msg: &Message<'_>,
        out: &mut Vec<SessionEvent>,
    ) {
        match msg.tag {
            0 => self.on_startup(framer, backend, msg.body),
            b'Q' => {
                let (q, _) = cstr(msg.body);
                let seq = self.seq();
                out.push(SessionEvent::RequestStarted(RequestStart {
                    seq,
                    target: None,
                    tid: msg.first_tid,
                    ts_ns: msg.first_ts,
                    traceparent: None,
                }));
                let op = Op::Simple {
                    seq,
                    start: msg.first_ts,
                    query: text(q),
                    truncated: msg.truncated,
                    rows: None,
                    sqlstate: None,
                    statements: 0,
                };
                self.push(op, out);
            }
            b'P' => {
                let (name, rest) = cstr(msg.body);
                let (q, _) = cstr(rest);
                Self::remember(&mut self.statements, name, (text(q), msg.truncated));
            }
            b'B' => {
                let (portal, rest) = cstr(msg.body);
                let (stmt, _) = cstr(rest);
                match self.statements.get(stmt).cloned() {
                    Some(s) => Self::remember(&mut self.portals, portal, s),
                    None => {
                        self.portals.remove(portal);
                    }
                }
            }
            b'E' => {
                let (portal, _) = cstr(msg.body);
                let (query, truncated) = match self.portals.get(portal) {
                    Some((q, t)) => (Some(q.clone()), *t),
                    None => (None, false),
                };
                let seq = self.seq();
                out.push(SessionEvent::RequestStarted(RequestStart {
                    seq,
                    target: None,
                    tid: msg.first_tid,
                    ts_ns: msg.first_ts,
                    traceparent: None,
                }));
                self.push(Op::Execute { seq, start: msg.first_ts, query, truncated }, out);
            }
            b'S' => self.push(Op::Sync, out),
            b'C' => {
                let (kind, rest) = msg.body.split_first().map(|(k, r)| (*k, r)).unwrap_or((0, &[]));
                let (name, _) = cstr(rest);
                match kind {
                    b'S' => self.statements.remove(name),
                    b'P' => self.portals.remove(name),
                    _ => None,
                };
            }
            _ => {}
        }
    }

    fn on_startup(&mut self, framer: &mut Framer, backend: &mut Framer, body: &[u8]) {
        if body.len() < 4 {
            return;
        }
        match u32::from_be_bytes([body[0], body[1], body[2], body[3]]) {
            SSL_REQUEST | GSSENC_REQUEST => {
                // The server answers with one byte; the client then sends a new startup message.
                backend.expect = Expect::SingleByte;
                framer.expect = Expect::Untyped;
            }
            PROTOCOL_V3 => {
                let mut rest = &body[4..];
                let mut user = None;
                while !rest.is_empty() {
                    let (k, r) = cstr(rest);
                    if k.is_empty() {
                        break;
                    }
                    let (v, r) = cstr(r);
                    match k {
                        b"database" => self.database = Some(text(v)),
                        b"user" => user = Some(text(v)),
                        _ => {}
                    }
                    rest = r;
                }
                // The server defaults the database to the user name.
                if self.database.is_none() {
                    self.database = user;
                }
            }
            _ => {}
        }
    }

    fn on_backend(&mut self, msg: &Message<'_>, ts: u64, out: &mut Vec<SessionEvent>) {
        match msg.tag {
            // Answer to SSLRequest/GSSENCRequest: 'N' continues in plaintext.
            b'S' | b'G' if msg.single_byte => self.encrypted = true,
            _ if msg.single_byte => {}
            b'C' => {
                let (tag, _) = cstr(msg.body);
                let rows = returned_rows(tag);
                match self.pending.front_mut() {
                    Some(Op::Simple { rows: r, statements, .. }) => {
                        *statements += 1;
                        if let Some(n) = rows {
                            *r = Some(r.unwrap_or(0) + n);
                        }
                    }
                    Some(Op::Execute { query, .. }) => {
                        let command = query.is_none().then(|| command_of(tag)).flatten();
                        self.complete_execute(ts, rows, None, command, out)
                    }
                    _ => out.push(SessionEvent::UnmatchedResponse),
                }
            }
            // EmptyQueryResponse, PortalSuspended: the Execute is done.
            b'I' | b's' => {
                if matches!(self.pending.front(), Some(Op::Execute { .. })) {
                    self.complete_execute(ts, None, None, None, out);
                }
            }
            b'E' => {
                let code = sqlstate(msg.body);
                match self.pending.front_mut() {
                    Some(Op::Simple { sqlstate, .. }) => *sqlstate = code,
                    Some(Op::Execute { .. }) => {
                        self.complete_execute(ts, None, code, None, out);
                        // The server skips everything up to the next Sync.
                        while let Some(Op::Execute { seq, .. }) = self.pending.front() {
                            out.push(SessionEvent::Abandoned { seq: *seq });
                            self.pending.pop_front();
                        }
                    }
                    _ => {}
                }
            }
            b'Z' => match self.pending.front() {
                Some(Op::Simple { .. }) => {
                    if let Some(Op::Simple { seq, start, query, truncated, rows, sqlstate, statements }) =
                        self.pending.pop_front()
                    {
                        out.push(SessionEvent::Completed(Exchange {
                            seq,
                            start_ns: start,
                            end_ns: ts.max(start),
                            detail: ExchangeDetail::Postgres(PgExchange {
                                query: Some(query),
                                query_truncated: truncated,
                                database: self.database.clone(),
                                returned_rows: rows,
                                sqlstate,
                                statements: statements.max(1),
                                command: None,
                            }),
                        }));
                    }
                }
                _ => {
                    // End of an extended-protocol batch: everything up to its Sync is answered.
                    while let Some(op) = self.pending.pop_front() {
                        match op {
                            Op::Sync => break,
                            Op::Execute { seq, .. } => out.push(SessionEvent::Abandoned { seq }),
                            Op::Simple { .. } => out.push(SessionEvent::UnmatchedRequest),
                        }
                    }
                }
            },
            _ => {}
        }
    }

    fn complete_execute(
        &mut self,
        ts: u64,
        rows: Option<u64>,
        sqlstate: Option<String>,
        command: Option<String>,
        out: &mut Vec<SessionEvent>,
    ) {
        let Some(Op::Execute { seq, start, query, truncated }) = self.pending.pop_front() else {
            return;
        };
        out.push(SessionEvent::Completed(Exchange {
            seq,
            start_ns: start,
            end_ns: ts.max(start),
            detail: ExchangeDetail::Postgres(PgExchange {
                query,
                query_truncated: truncated,
                database: self.database.clone(),
                returned_rows: rows,
                sqlstate,
                statements: 1,
                command,
            }),
        }));
    }
}

/// Rows a CommandComplete tag reports for row-returning commands (`SELECT 3`, `FETCH 2`).
fn returned_rows(tag: &[u8]) -> Option<u64> {
    let tag = std::str::from_utf8(tag).ok()?;
    let mut words = tag.split(' ');
    let command = words.next()?;
    if !matches!(command, "SELECT" | "FETCH") {
        return None;
    }
    words.next_back()?.parse().ok()
}

/// The command word of a CommandComplete tag (`INSERT 0 1` -> INSERT), when it is one.
fn command_of(tag: &[u8]) -> Option<String> {
    let word = tag.split(|c| *c == b' ').next()?;
    (!word.is_empty() && word.len() <= 32 && word.iter().all(u8::is_ascii_uppercase)).then(|| text(word))
}

/// The SQLSTATE (field 'C') of an ErrorResponse body.
fn sqlstate(body: &[u8]) -> Option<String> {
    let mut rest = body;
    while let Some((&field, r)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let (value, r) = cstr(r);
        if field == b'C' {
            return Some(text(value));
        }
        rest = r;
    }
    None
}
