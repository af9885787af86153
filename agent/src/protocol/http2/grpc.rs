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
