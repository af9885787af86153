//! gRPC over HTTP/2: what a finished call is, and how its status is known. The status comes
//! from `grpc-status` (trailers, or the headers of a trailers-only response); without one, from
//! how the stream ended, by the mappings the gRPC project documents (PROTOCOL-HTTP2.md for
//! RST_STREAM codes, http-grpc-status-mapping.md for HTTP statuses). Never from a guess.

use crate::trace::span::Text;

/// A finished gRPC call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcExchange {
    /// `/package.Service/Method` as sent in `:path`.
    pub path: Text,
    pub authority: Option<Text>,
    pub user_agent: Option<Text>,
    /// The call's status code (0 = OK), when known.
    pub status: Option<u32>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// The messages each way, when every message prefix was seen.
    pub request_messages: Option<MessageTally>,
    pub response_messages: Option<MessageTally>,
}

/// How many length-prefixed messages went one way, and their bytes as sent (compressed when
/// the message was).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageTally {
    pub count: u32,
    pub bytes: u64,
}

/// Counts one direction's gRPC messages from its DATA bytes: each message is a 1-byte flag and
/// a 4-byte length, then that many bytes (gRPC's PROTOCOL-HTTP2.md, Length-Prefixed-Message).
/// Message bodies are skipped by length, so uncaptured body bytes cost nothing; a prefix among
/// uncaptured bytes makes the tally unknown rather than wrong.
#[derive(Clone, Copy, Debug, Default)]
pub struct MessageCounter {
    tally: MessageTally,
    prefix: [u8; 5],
    have: u8,
    body_left: u64,
    lost: bool,
}

impl MessageCounter {
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.lost {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len() as u64);
                self.body_left -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            let have = usize::from(self.have);
            let n = (5 - have).min(bytes.len());
            self.prefix[have..have + n].copy_from_slice(&bytes[..n]);
            self.have += n as u8;
            bytes = &bytes[n..];
            if self.have == 5 {
                let len = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]);
                self.tally.count = self.tally.count.saturating_add(1);
                self.tally.bytes += u64::from(len);
                self.body_left = u64::from(len);
                self.have = 0;
            }
        }
    }

    /// `n` data bytes moved uncaptured (None: an unknown number).
    pub fn skip(&mut self, n: Option<u64>) {
        match n {
            Some(n) if self.have == 0 && n <= self.body_left => self.body_left -= n,
            _ => self.lost = true,
        }
    }

    /// The tally, when it is exact: every prefix seen and the last message whole.
    pub fn tally(&self) -> Option<MessageTally> {
        (!self.lost && self.have == 0 && self.body_left == 0).then_some(self.tally)
    }
}

/// The status names of gRPC's status codes (0..=16), as `rpc.status_code` carries them.
const STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

pub const UNIMPLEMENTED: u32 = 12;

/// `OK`, `DEADLINE_EXCEEDED`, ...; a code outside the table is written as its number.
pub fn status_name(code: u32) -> Text {
    match STATUS_NAMES.get(code as usize) {
        Some(name) => Text::const_new(name),
        None => compact_str::format_compact!("{code}"),
    }
}

/// Whether a status is an error on the server side (the conventions: only these).
pub fn server_error(code: u32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// The status of a call whose stream was reset before any `grpc-status`.
pub fn status_of_reset(h2_error: u32) -> u32 {
    match h2_error {
        0x7 => 14, // REFUSED_STREAM -> UNAVAILABLE
        0x8 => 1,  // CANCEL -> CANCELLED
        0xb => 8,  // ENHANCE_YOUR_CALM -> RESOURCE_EXHAUSTED
        0xc => 7,  // INADEQUATE_SECURITY -> PERMISSION_DENIED
        _ => 13,   // the others -> INTERNAL
    }
}

/// The status of a call answered with a non-200 HTTP status and no `grpc-status` (typically a
/// proxy's answer).
pub fn status_of_http(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// Whether a `content-type` is gRPC's (`application/grpc`, `application/grpc+proto`, ...).
pub fn is_grpc_content_type(value: &[u8]) -> bool {
    value.strip_prefix(b"application/grpc").is_some_and(|rest| rest.is_empty() || matches!(rest[0], b'+' | b';'))
}
