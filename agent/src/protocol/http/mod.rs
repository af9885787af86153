//! HTTP/1.x: request/response heads, Content-Length and chunked bodies, bodiless responses
//! (HEAD, 1xx, 204, 304), keep-alive, pipelining (pairing is FIFO per connection), and
//! Upgrade/CONNECT (the connection turns opaque after the switch, except an accepted
//! `Upgrade: h2c`, after which an HTTP/2 session parses it, the upgrading request as stream 1).

mod framing;
#[cfg(test)]
mod tests;

use std::{collections::VecDeque, mem::MaybeUninit};

use framing::{BodyFraming, HalfStream, Step};

use super::{
    Exchange, ExchangeDetail, Protocol, RequestStart, Segment, Session, SessionEvent, Side,
    http2::{Http2Session, UpgradedRequest},
};
use crate::trace::{context::TraceParent, span::Text};

/// Requests waiting for a response before the oldest is given up as unmatched.
pub const MAX_PENDING_REQUESTS: usize = 1024;
/// Headers parsed per message; a head with more is reported as a parse error.
const MAX_HEADERS: usize = 128;

/// A request line longer than this is not taken for HTTP when detecting.
const MAX_REQUEST_LINE: usize = 8192;

const METHODS: [&[u8]; 9] = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE"];

/// Whether `bytes` can begin a message: Some(true) yes, Some(false) no, None: too short to say.
pub fn classify_start(side: Side, bytes: &[u8]) -> Option<bool> {
    match side {
        Side::Request => {
            let mut undecided = false;
            for m in METHODS {
                let n = bytes.len().min(m.len() + 1);
                let candidate = &bytes[..n];
                if n == m.len() + 1 && candidate[..m.len()] == *m && candidate[m.len()] == b' ' {
                    // The request line must end with the HTTP version (an inline Redis
                    // `GET key` must not pass for HTTP).
                    return match bytes.iter().position(|c| *c == b'\n') {
                        Some(end) => {
                            let line = bytes[..end].strip_suffix(b"\r").unwrap_or(&bytes[..end]);
                            Some(line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0"))
                        }
                        None if bytes.len() < MAX_REQUEST_LINE => None,
                        None => Some(false),
                    };
                }
                if n <= m.len() && candidate == &m[..n] {
                    undecided = true;
                }
            }
            if undecided { None } else { Some(false) }
        }
        Side::Response => {
            const START: &[u8] = b"HTTP/1.";
            let n = bytes.len().min(START.len());
            if bytes[..n] != START[..n] {
                Some(false)
            } else if n == START.len() {
                Some(true)
            } else {
                None
            }
        }
    }
}

/// True only when `bytes` certainly begins an HTTP/1.x message on `side`.
pub fn looks_like_start(side: Side, bytes: &[u8]) -> bool {
    classify_start(side, bytes) == Some(true)
}

/// The protocol version an exchange travelled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http10,
    Http11,
    Http2,
}

impl HttpVersion {
    /// `network.protocol.version`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http10 => "1.0",
            Self::Http11 => "1.1",
            Self::Http2 => "2",
        }
    }
}

/// A paired HTTP request and response, as parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpExchange {
    pub method: Text,
    /// The request-target as sent: origin form (`/a?b`) or absolute form.
    pub target: Text,
    pub version: HttpVersion,
    pub host: Option<Text>,
    pub user_agent: Option<Text>,
    /// 0 when the stream was reset before a response (HTTP/2).
    pub status: u16,
    /// Body sizes; None when bytes moved that sonde could not frame (HTTP/2 after lost frames).
    pub request_body_bytes: Option<u64>,
    pub response_body_bytes: Option<u64>,
    /// The HTTP/2 error code (`CANCEL`, ...) of a stream reset before its response ended.
    pub reset: Option<&'static str>,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    start_ns: u64,
    method: Text,
    target: Text,
    version: HttpVersion,
    host: Option<Text>,
    user_agent: Option<Text>,
    request_body_bytes: u64,
    /// The request asked to switch to cleartext HTTP/2 (`Upgrade: h2c`).
    h2c: bool,
}

/// Both directions of one HTTP/1.x connection.
#[derive(Debug, Default)]
pub struct HttpSession {
    requests: HalfStream,
    responses: HalfStream,
    pending: VecDeque<Pending>,
    next_seq: u64,
    /// The request whose body is being read.
    body_of: Option<u64>,
    /// Status of the response whose body is being read.
    response_status: u16,
    /// After 101 Switching Protocols or a successful CONNECT the bytes are not HTTP any more.
    upgraded: bool,
    /// After an accepted `Upgrade: h2c`, the session the connection continues in.
    h2: Option<Box<Http2Session>>,
}

impl Session for HttpSession {
    fn protocol(&self) -> Protocol {
        if self.h2.is_some() { Protocol::Http2 } else { Protocol::Http }
    }

    fn feed(&mut self, seg: &Segment<'_>, out: &mut Vec<SessionEvent>) {
        if let Some(h2) = &mut self.h2 {
            return h2.feed(seg, out);
        }
        if self.upgraded {
            return;
        }
        let starts = looks_like_start(seg.side, seg.bytes);
        if !self.half(seg.side).resync_at(starts) {
            return;
        }
        let mut input = seg.bytes;
        loop {
            match self.half(seg.side).step(&mut input, seg.ts_ns, seg.tid) {
                Step::NeedMore => break,
                Step::Head => self.on_head(seg.side, seg.ts_ns, out),
                Step::BodyDone => self.on_body_done(seg.side, seg.ts_ns, out),
                Step::Broken(reason) => {
                    out.push(SessionEvent::ParseError { reason });
                    break;
                }
            }
            if self.upgraded {
                // The server's first HTTP/2 frames may share the write of its 101.
                if let Some(h2) = &mut self.h2 {
                    let rest = Segment { bytes: input, byte_count: input.len() as u64 + seg.uncopied(), ..*seg };
                    h2.feed(&rest, out);
                }
                return;
            }
        }
        match self.half(seg.side).skip_uncopied(seg.uncopied()) {
            Step::BodyDone => self.on_body_done(seg.side, seg.ts_ns, out),
            Step::Broken(reason) => out.push(SessionEvent::ParseError { reason }),
            Step::NeedMore | Step::Head => {}
        }
    }

    fn close(&mut self, ts_ns: u64, out: &mut Vec<SessionEvent>) {
        if let Some(h2) = &mut self.h2 {
            return h2.close(ts_ns, out);
        }
        if self.responses.in_until_close_body() {
            self.complete_response(ts_ns, out);
        }
        for _ in self.pending.drain(..) {
            out.push(SessionEvent::UnmatchedRequest);
        }
        // A request whose head never finished is not silently forgotten.
        if self.requests.has_partial_head() {
            out.push(SessionEvent::ParseError { reason: "request head cut off by close" });
        }
    }
}

impl HttpSession {
    fn half(&mut self, side: Side) -> &mut HalfStream {
        match side {
            Side::Request => &mut self.requests,
            Side::Response => &mut self.responses,
        }
    }

    fn on_head(&mut self, side: Side, ts_ns: u64, out: &mut Vec<SessionEvent>) {
        let parsed = match side {
            Side::Request => self.on_request_head(out),
            Side::Response => self.on_response_head(ts_ns, out),
        };
        if let Err(reason) = parsed {
            self.half(side).desync();
            out.push(SessionEvent::ParseError { reason });
        }
    }

    fn on_request_head(&mut self, out: &mut Vec<SessionEvent>) -> Result<(), &'static str> {
        // Uninitialized: zeroing 128 headers (4 KiB) per head was a visible cost.
        let mut headers = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        match httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut req,
            self.requests.head(),
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err("incomplete request head"),
            Err(_) => return Err("malformed request head"),
        }
        let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
            return Err("malformed request line");
        };
        let mut info = HeadInfo::default();
        for h in req.headers.iter() {
            info.take(h);
        }
        let framing =
            if info.chunked { BodyFraming::Chunked } else { BodyFraming::Length(info.content_length.unwrap_or(0)) };
        let seq = self.next_seq;
        self.next_seq += 1;
        out.push(SessionEvent::RequestStarted(RequestStart {
            seq,
            tid: self.requests.first_tid,
            ts_ns: self.requests.first_byte_ns,
            traceparent: info.traceparent,
            target: Some(target.into()),
        }));
        self.pending.push_back(Pending {
            seq,
            start_ns: self.requests.first_byte_ns,
            method: method.into(),
            target: target.into(),
            version: if version == 0 { HttpVersion::Http10 } else { HttpVersion::Http11 },
            host: info.host,
            user_agent: info.user_agent,
            request_body_bytes: 0,
            h2c: info.upgrade_h2c,
        });
        if self.pending.len() > MAX_PENDING_REQUESTS {
            self.pending.pop_front();
            out.push(SessionEvent::UnmatchedRequest);
        }
        self.body_of = Some(seq);
        if self.requests.start_body(framing) {
            self.body_of = None;
        }
        Ok(())
    }

    fn on_response_head(&mut self, ts_ns: u64, out: &mut Vec<SessionEvent>) -> Result<(), &'static str> {
        let mut headers = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            self.responses.head(),
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err("incomplete response head"),
            Err(_) => return Err("malformed response head"),
        }
        let Some(status) = resp.code else {
            return Err("malformed status line");
        };
        if (100..200).contains(&status) && status != 101 {
            // Interim response: the final one is still to come for the same request.
            self.responses.skip_head();
            return Ok(());
        }
        let mut info = HeadInfo::default();
        for h in resp.headers.iter() {
            info.take(h);
        }
        if status == 101 && info.upgrade_h2c && self.pending.front().is_some_and(|p| p.h2c) {
            self.switch_to_h2(out);
            return Ok(());
        }
        let request_method = self.pending.front().map(|p| p.method.as_str());
        let tunnel = status == 101 || (request_method == Some("CONNECT") && (200..300).contains(&status));
        let bodiless = request_method == Some("HEAD") || status == 204 || status == 304 || tunnel;
        let framing = if bodiless {
            BodyFraming::None
        } else if info.chunked {
            BodyFraming::Chunked
        } else if let Some(n) = info.content_length {
            BodyFraming::Length(n)
        } else {
            BodyFraming::UntilClose
        };
        self.response_status = status;
        if self.responses.start_body(framing) {
            self.complete_response(ts_ns, out);
        }
        if tunnel {
            self.upgraded = true;
        }
        Ok(())
    }

    /// The server accepted the oldest request's `Upgrade: h2c`: that request continues as
    /// stream 1 of the HTTP/2 session that parses the rest of the connection.
    fn switch_to_h2(&mut self, out: &mut Vec<SessionEvent>) {
        let Some(p) = self.pending.pop_front() else { return };
        // Requests pipelined behind the upgrading one are not allowed to follow it.
        for _ in self.pending.drain(..) {
            out.push(SessionEvent::UnmatchedRequest);
        }
        self.upgraded = true;
        self.h2 = Some(Box::new(Http2Session::after_upgrade(UpgradedRequest {
            seq: p.seq,
            start_ns: p.start_ns,
            method: p.method,
            path: p.target,
            authority: p.host,
            user_agent: p.user_agent,
            request_bytes: p.request_body_bytes,
        })));
    }

    fn on_body_done(&mut self, side: Side, ts_ns: u64, out: &mut Vec<SessionEvent>) {
        match side {
            Side::Request => {
                let bytes = self.requests.body_bytes;
                if let Some(seq) = self.body_of.take()
                    && let Some(p) = self.pending.iter_mut().find(|p| p.seq == seq)
                {
                    p.request_body_bytes = bytes;
                }
            }
            Side::Response => self.complete_response(ts_ns, out),
        }
    }

    fn complete_response(&mut self, ts_ns: u64, out: &mut Vec<SessionEvent>) {
        let Some(p) = self.pending.pop_front() else {
            out.push(SessionEvent::UnmatchedResponse);
            return;
        };
        out.push(SessionEvent::Completed(Exchange {
            seq: p.seq,
            start_ns: p.start_ns,
            end_ns: ts_ns.max(p.start_ns),
            detail: ExchangeDetail::Http(HttpExchange {
                method: p.method,
                target: p.target,
                version: p.version,
                host: p.host,
                user_agent: p.user_agent,
                status: self.response_status,
                request_body_bytes: Some(p.request_body_bytes),
                response_body_bytes: Some(self.responses.body_bytes),
                reset: None,
            }),
        }));
    }
}

/// The headers sonde cares about, from one head.
#[derive(Default)]
struct HeadInfo {
    host: Option<Text>,
    user_agent: Option<Text>,
    traceparent: Option<TraceParent>,
    content_length: Option<u64>,
    chunked: bool,
    /// `Upgrade` names `h2c`.
    upgrade_h2c: bool,
}

impl HeadInfo {
    fn take(&mut self, h: &httparse::Header<'_>) {
        let value = || Text::from(String::from_utf8_lossy(h.value).trim());
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            self.host = Some(value());
        } else if name.eq_ignore_ascii_case("user-agent") {
            self.user_agent = Some(value());
        } else if name.eq_ignore_ascii_case("traceparent") {
            self.traceparent = TraceParent::parse(h.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            self.content_length = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok());
        } else if name.eq_ignore_ascii_case("upgrade") {
            self.upgrade_h2c = h.value.split(|b| *b == b',').any(|p| p.trim_ascii().eq_ignore_ascii_case(b"h2c"));
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked must be the final coding (RFC 9112 section 6.1).
            self.chunked = h
                .value
                .split(|b| *b == b',')
                .next_back()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
}
