//! Redis RESP2/RESP3: commands (arrays of bulk strings, or inline), replies of every type,
//! pipelines (N commands -> N spans in order), MULTI/EXEC, pub/sub (pushed messages are not
//! replies), SELECT (tracks `db.namespace`), errors.

mod resp;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use resp::{Fed, Reader, Value};

use crate::trace::span::Text;

use super::{Exchange, ExchangeDetail, Protocol, RequestStart, Segment, Session, SessionEvent, Side};

/// Commands waiting for replies before the oldest is given up.
const MAX_PENDING: usize = 16_384;

/// Commands whose first argument is a subcommand that belongs in the operation name.
const CONTAINER_COMMANDS: [&str; 16] = [
    "ACL", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "DEBUG", "FUNCTION", "LATENCY", "MEMORY", "MODULE", "OBJECT",
    "PUBSUB", "SCRIPT", "SLOWLOG", "XGROUP", "XINFO",
];

const SUBSCRIBE_FAMILY: [&str; 6] =
    ["SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE"];

/// Inline commands recognized when detecting a connection (a plain-text first line).
const INLINE_FIRST: [&str; 16] = [
    "PING",
    "ECHO",
    "AUTH",
    "HELLO",
    "SELECT",
    "INFO",
    "SET",
    "GET",
    "DEL",
    "INCR",
    "KEYS",
    "EXISTS",
    "MULTI",
    "SUBSCRIBE",
    "PUBLISH",
    "QUIT",
];

/// Whether the first bytes of a connection's request side are a Redis command:
/// `*<count>\r\n$...` or a known inline command line. None: too few bytes to say.
pub fn classify_start(b: &[u8]) -> Option<bool> {
    const ARRAY_TAIL: &[u8] = b"\r\n$";
    match b.first() {
        None => None,
        Some(b'*') => {
            let digits = b[1..].iter().take_while(|c| c.is_ascii_digit()).count();
            let tail = &b[1 + digits..];
            if tail.len() < ARRAY_TAIL.len() {
                let could_be = digits < 8 && tail.iter().zip(ARRAY_TAIL).all(|(x, y)| x == y);
                return if could_be { None } else { Some(false) };
            }
            Some(digits > 0 && &tail[..ARRAY_TAIL.len()] == ARRAY_TAIL)
        }
        Some(_) => {
            let text = String::from_utf8_lossy(&b[..b.len().min(64)]).to_ascii_uppercase();
            let Some(line) = text.split('\n').next().filter(|_| text.contains('\n')) else {
                let word = text.split(' ').next().unwrap_or("");
                let could_be = b.len() < 64
                    && INLINE_FIRST
                        .iter()
                        .any(|c| c.starts_with(word) || (text.starts_with(c) && text.len() > c.len()));
                return if could_be { None } else { Some(false) };
            };
            let first = line.split_ascii_whitespace().next().unwrap_or("");
            let http = line.ends_with(" HTTP/1.1\r") || line.ends_with(" HTTP/1.0\r");
            Some(line.ends_with('\r') && !http && INLINE_FIRST.contains(&first))
        }
    }
}

/// A paired Redis command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisExchange {
    /// Command name, upper case, with the subcommand for container commands (`CONFIG GET`).
    pub operation: Text,
    /// Arguments after the operation name (their values are never kept).
    pub args: u64,
    /// Database index the command ran against.
    pub db: u32,
    /// Error prefix of an error reply (`ERR`, `WRONGTYPE`, ...).
    pub error: Option<Text>,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    start: u64,
    operation: Text,
    args: u64,
    /// SELECT's argument, applied when it succeeds.
    select_db: Option<u32>,
}

pub struct RedisSession {
    requests: Reader,
    replies: Reader,
    pending: VecDeque<Pending>,
    next_seq: u64,
    db: u32,
    /// Subscriptions active on the connection: while any, pushed messages arrive.
    subscribed: bool,
    /// When the last reply bytes were seen.
    last_reply_ts: u64,
    /// Values completed by the syscall being fed.
    values: Vec<Value>,
}

impl Default for RedisSession {
    fn default() -> Self {
        Self {
            requests: Reader::new(true),
            replies: Reader::new(false),
            pending: VecDeque::new(),
            next_seq: 0,
            db: 0,
            subscribed: false,
            last_reply_ts: 0,
            values: Vec::new(),
        }
    }
}

impl Session for RedisSession {
    fn protocol(&self) -> Protocol {
        Protocol::Redis
    }

    fn feed(&mut self, seg: &Segment<'_>, out: &mut Vec<SessionEvent>) {
        if seg.side == Side::Response {
            self.last_reply_ts = seg.ts_ns;
        }
        // The scratch list keeps its capacity from one syscall to the next.
        let mut values = std::mem::take(&mut self.values);
        let reader = match seg.side {
            Side::Request => &mut self.requests,
            Side::Response => &mut self.replies,
        };
        if let Fed::Broken(reason) = reader.feed(seg.bytes, seg.uncopied(), seg.ts_ns, seg.tid, &mut |v| values.push(v))
        {
            out.push(SessionEvent::ParseError { reason });
        }
        for v in values.drain(..) {
            match seg.side {
                Side::Request => self.on_command(v, out),
                Side::Response => self.on_reply(v, seg.ts_ns, out),
            }
        }
        self.values = values;
    }

    fn close(&mut self, _ts_ns: u64, out: &mut Vec<SessionEvent>) {
        for _ in self.pending.drain(..) {
            out.push(SessionEvent::UnmatchedRequest);
        }
        // A command cut off by the close is not silently forgotten.
        if self.requests.mid_value() {
            out.push(SessionEvent::ParseError { reason: "command cut off by close" });
        }
    }
}

impl RedisSession {
    fn on_command(&mut self, v: Value, out: &mut Vec<SessionEvent>) {
        if self.replies.is_desynced() {
            self.recover_replies(v.first_ts, out);
        }
        let Some(mut name) = v.strings.first().cloned() else {
            return;
        };
        name.as_mut_str().make_ascii_uppercase();
        // Redis skips empty inline lines without a reply: no command, nothing to pair.
        if v.kind == b'i' && name.trim().is_empty() {
            return;
        }
        if v.kind != b'*' && v.kind != b'i' {
            out.push(SessionEvent::ParseError { reason: "a command must be an array or an inline line" });
            return;
        }
        let (operation, args) = match v.strings.get(1) {
            Some(sub) if CONTAINER_COMMANDS.contains(&name.as_str()) => {
                (compact_str::format_compact!("{name} {}", sub.to_ascii_uppercase()), v.elements.saturating_sub(2))
            }
            _ => (name.clone(), v.elements.saturating_sub(1)),
        };
        let select_db = (name == "SELECT").then(|| v.strings.get(1).and_then(|s| s.parse().ok())).flatten();
        self.next_seq += 1;
        let seq = self.next_seq;
        out.push(SessionEvent::RequestStarted(RequestStart {
            seq,
            target: None,
            tid: v.first_tid,
            ts_ns: v.first_ts,
            traceparent: None,
        }));
        self.pending.push_back(Pending { seq, start: v.first_ts, operation, args, select_db });
        if self.pending.len() > MAX_PENDING {
            self.pending.pop_front();
            out.push(SessionEvent::UnmatchedRequest);
        }
    }

    fn on_reply(&mut self, v: Value, ts: u64, out: &mut Vec<SessionEvent>) {
        // Only an aggregate can be a subscription confirmation or a pushed message.
        let aggregate = v.kind == b'*' || v.kind == b'>';
        let first = v.strings.first().filter(|_| aggregate).map(Text::as_str).unwrap_or_default();
        let front_is_subscribe = self.pending.front().is_some_and(|p| SUBSCRIBE_FAMILY.contains(&p.operation.as_str()));
        let is_confirmation = aggregate && SUBSCRIBE_FAMILY.iter().any(|c| c.eq_ignore_ascii_case(first));
        if is_confirmation {
            // The remaining subscription count tells whether pushes can still arrive.
            self.subscribed = v.strings.get(2).and_then(|n| n.parse::<u64>().ok()).is_none_or(|n| n > 0);
            if !front_is_subscribe {
                // Further confirmations of a multi-channel (UN)SUBSCRIBE: not a reply.
                return;
            }
        } else if v.kind == b'>'
            || (self.subscribed
                && v.kind == b'*'
                && ["message", "pmessage", "smessage"].iter().any(|m| m.eq_ignore_ascii_case(first)))
        {
            // Pushed data is not an answer to any command.
            return;
        }
        let Some(p) = self.pending.pop_front() else {
            out.push(SessionEvent::UnmatchedResponse);
            return;
        };
        let error = match v.kind {
            b'-' | b'!' => Some(first_word(v.strings.first().map(Text::as_str).unwrap_or("ERR"))),
            _ => None,
        };
        if error.is_none()
            && let Some(db) = p.select_db
        {
            self.db = db;
        }
        let end_ns = ts.max(p.start);
        complete(p, end_ns, self.db, error, out);
    }
}

/// A command got its reply. A command whose name was in bytes beyond the capture kept the
/// pairing aligned, but a nameless span would say nothing: it is counted instead.
fn complete(p: Pending, end_ns: u64, db: u32, error: Option<Text>, out: &mut Vec<SessionEvent>) {
    if p.operation.is_empty() {
        out.push(SessionEvent::Abandoned { seq: p.seq });
        out.push(SessionEvent::ParseError { reason: "command name not captured" });
        return;
    }
    out.push(SessionEvent::Completed(Exchange {
        seq: p.seq,
        start_ns: p.start,
        end_ns,
        detail: ExchangeDetail::Redis(RedisExchange { operation: p.operation, args: p.args, db, error }),
    }));
}

impl RedisSession {
    /// The reply side lost framing (a large aggregate reply was not fully copied) and the client
    /// sent its next command. A client that waited for its answer has it by now: with one
    /// command outstanding, that command completes here; with several (pipelining) the split
    /// is unknowable and they are counted as unmatched. Replies resume at the next reply.
    fn recover_replies(&mut self, ts: u64, out: &mut Vec<SessionEvent>) {
        if self.pending.len() == 1
            && let Some(p) = self.pending.pop_front()
        {
            let end_ns = self.last_reply_ts.clamp(p.start, ts.max(p.start));
            complete(p, end_ns, self.db, None, out);
        }
        for _ in self.pending.drain(..) {
            out.push(SessionEvent::UnmatchedRequest);
        }
        self.replies.restart();
    }
}

fn first_word(s: &str) -> Text {
    s.split_ascii_whitespace().next().unwrap_or("ERR").into()
}
