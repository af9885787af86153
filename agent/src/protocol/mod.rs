//! Protocol parsers. Each protocol is one [`Session`] implementation that consumes both
//! directions of one connection and emits paired exchanges; the connection layer does not know
//! any protocol's details.

pub mod detect;
pub mod http;
pub mod http2;
pub mod postgres;
pub mod redis;
pub mod sql;
#[cfg(test)]
pub mod testing;

use crate::trace::context::TraceParent;

/// Protocols sonde understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Http2,
    Postgres,
    Redis,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Postgres => "postgresql",
            Protocol::Redis => "redis",
        }
    }
}

/// Which half of an exchange some bytes belong to (the connection layer maps direction and role).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

/// The bytes one syscall moved in one direction.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    pub side: Side,
    /// The captured prefix of what moved.
    pub bytes: &'a [u8],
    /// How many bytes really moved (>= bytes.len()); the rest were not copied.
    pub byte_count: u64,
    /// Monotonic kernel time of the syscall's return.
    pub ts_ns: u64,
    /// Thread that made the syscall.
    pub tid: u32,
}

impl Segment<'_> {
    /// Bytes that moved but were not copied; parsers skip them to keep framing.
    pub fn uncopied(&self) -> u64 {
        self.byte_count.saturating_sub(self.bytes.len() as u64)
    }
}

/// A request whose head has been parsed; its response has not been seen yet.
#[derive(Clone, Debug)]
pub struct RequestStart {
    /// Per-connection sequence number; the matching [`Exchange`] carries the same one.
    pub seq: u64,
    pub tid: u32,
    pub ts_ns: u64,
    /// Trace context the request carried (W3C traceparent).
    pub traceparent: Option<TraceParent>,
    /// HTTP request target (path and query): evidence for parenting a proxy's upstream call.
    pub target: Option<crate::trace::span::Text>,
}

/// A request paired with its response.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub seq: u64,
    /// First byte of the request seen.
    pub start_ns: u64,
    /// Last byte of the response seen.
    pub end_ns: u64,
    pub detail: ExchangeDetail,
}

#[derive(Clone, Debug)]
pub enum ExchangeDetail {
    Http(http::HttpExchange),
    Grpc(http2::grpc::GrpcExchange),
    Postgres(postgres::PgExchange),
    Redis(redis::RedisExchange),
}

/// What a session reports while it consumes bytes.
#[derive(Clone, Debug)]
pub enum SessionEvent {
    RequestStarted(RequestStart),
    Completed(Exchange),
    /// Bytes that could not be parsed; the session skips to the next plausible message start.
    ParseError {
        reason: &'static str,
    },
    /// The connection's first bytes matched no supported protocol: it is not parsed further.
    Unrecognized,
    /// Header fields that referred to compression state sonde never saw (HTTP/2 seen
    /// mid-stream, or a header block not captured whole): left out of the span, not guessed.
    Undecodable {
        fields: u32,
    },
    /// A response with no request waiting for it.
    UnmatchedResponse,
    /// A request dropped without a response (connection closed, or too many outstanding).
    UnmatchedRequest,
    /// A request that will have no span, whose in-flight record goes now: one the server skipped
    /// by protocol rule (PostgreSQL: Executes after an error, up to Sync; it never ran, so it is
    /// not a loss), or one given up at a bound (HTTP/2's open streams; counted by the
    /// `UnmatchedRequest` that follows).
    Abandoned {
        seq: u64,
    },
}

/// One connection's protocol state machine: parsing both directions and pairing.
///
/// Implementations never panic on any input and bound their own memory.
pub trait Session: Send {
    fn protocol(&self) -> Protocol;
    /// Consumes one syscall's bytes.
    fn feed(&mut self, seg: &Segment<'_>, out: &mut Vec<SessionEvent>);
    /// The connection closed: finish what the close completes, report what stays unmatched.
    fn close(&mut self, ts_ns: u64, out: &mut Vec<SessionEvent>);
}
