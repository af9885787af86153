//! HTTP/2 (RFC 9113), cleartext or decrypted TLS: frames per direction, header blocks decoded
//! with each direction's HPACK table, and requests paired with responses by stream id, so any
//! number of concurrent streams pair exactly. A stream is one exchange: the request's HEADERS
//! (+ CONTINUATION) to the response's END_STREAM or a reset. gRPC calls (`application/grpc*`)
//! become [`grpc::GrpcExchange`]s, other streams HTTP exchanges with version 2.
//!
//! The sequence number of a stream's exchange is its stream id (offset past the HTTP/1.1
//! requests of a connection upgraded by `Upgrade: h2c`): both ends of a connection see the same
//! ids, so same-host joins tie a client stream to its server stream by id.

mod frame;
pub mod grpc;
mod hpack;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use frame::{Frame, FrameReader, Read};
use grpc::{GrpcExchange, MessageCounter};

use super::{
    Exchange, ExchangeDetail, Protocol, RequestStart, Segment, Session, SessionEvent, Side,
    http::{HttpExchange, HttpVersion},
};
use crate::trace::{context::TraceParent, span::Text};

/// Streams open at once before the oldest is given up as unmatched.
pub const MAX_OPEN_STREAMS: usize = 1024;

/// Whether `bytes`, the first seen of a connection, start HTTP/2: the client preface (request
/// side), or, on a connection seen mid-stream, a run of well-formed frames.
pub fn classify_start(side: Side, bytes: &[u8]) -> Option<bool> {
    let n = bytes.len().min(frame::PREFACE.len());
    if side == Side::Request && bytes[..n] == frame::PREFACE[..n] {
        return if n == frame::PREFACE.len() { Some(true) } else { None };
    }
    Some(frame::plausible_frames(bytes))
}

/// Whether `bytes` (the first bytes a session was detected on) start with the preface.
fn starts_with_preface(bytes: &[u8]) -> bool {
    bytes.starts_with(frame::PREFACE)
}

/// The HTTP/2 error code names (RFC 9113 section 7), for `error.type` of reset streams.
fn error_code_name(code: u32) -> &'static str {
    const NAMES: [&str; 14] = [
        "NO_ERROR",
        "PROTOCOL_ERROR",
        "INTERNAL_ERROR",
        "FLOW_CONTROL_ERROR",
        "SETTINGS_TIMEOUT",
        "STREAM_CLOSED",
        "FRAME_SIZE_ERROR",
        "REFUSED_STREAM",
        "CANCEL",
        "COMPRESSION_ERROR",
        "CONNECT_ERROR",
        "ENHANCE_YOUR_CALM",
        "INADEQUATE_SECURITY",
        "HTTP_1_1_REQUIRED",
    ];
    NAMES.get(code as usize).copied().unwrap_or("_OTHER")
}

/// What the HEADERS (or PUSH_PROMISE) frame that starts a header block says about it.
#[derive(Clone, Copy, Debug)]
struct BlockHead {
    stream: u32,
    push: bool,
    end_stream: bool,
    /// Part of the block was not seen.
    cut: bool,
}

/// A header block being assembled from HEADERS/PUSH_PROMISE and CONTINUATION frames (a block in
/// one frame is decoded where it lies, without this copy).
#[derive(Debug)]
struct Block {
    head: BlockHead,
    bytes: Vec<u8>,
}

/// One direction: its frames and its sender's HPACK table.
#[derive(Debug)]
struct Half {
    reader: FrameReader,
    table: hpack::Decoder,
    block: Option<Block>,
}

#[derive(Debug, Default)]
struct Stream {
    /// The exchange's sequence number (see [`Http2Session::seq_base`]).
    seq: u64,
    start_ns: u64,
    method: Option<Text>,
    path: Option<Text>,
    authority: Option<Text>,
    user_agent: Option<Text>,
    grpc: bool,
    request_bytes: u64,
    /// Final (non-1xx) response status, once its headers came.
    status: Option<u16>,
    grpc_status: Option<u32>,
    response_bytes: u64,
    /// gRPC messages each way (counted only on gRPC streams).
    request_messages: MessageCounter,
    response_messages: MessageCounter,
    /// Frames of this side were lost while the stream was open: its byte counts are unknown.
    request_bytes_unknown: bool,
    response_bytes_unknown: bool,
}

impl Stream {
    /// Frames of `side` were lost: whatever this stream sent that way is not known.
    fn lose_bytes(&mut self, side: Side) {
        match side {
            Side::Request => {
                self.request_bytes_unknown = true;
                self.request_messages.skip(None);
            }
            Side::Response => {
                self.response_bytes_unknown = true;
                self.response_messages.skip(None);
            }
        }
    }
}

/// Both directions of one HTTP/2 connection.
#[derive(Debug)]
pub struct Http2Session {
    requests: Half,
    responses: Half,
    streams: HashMap<u32, Stream>,
    /// A stream's exchange has sequence number `seq_base + stream id`. 0, except after an h2c
    /// upgrade, where the HTTP/1.1 requests before it took the numbers up to the upgrading one.
    seq_base: u64,
    /// Both HPACK tables are known from the connection's start (else they may refer to
    /// entries inserted before sonde saw the connection).
    tables_from_start: bool,
}

/// An HTTP/1.1 request whose `Upgrade: h2c` the server accepted (RFC 7540 section 3.2; RFC
/// 9113 deprecates it, but curl and servers still speak it): it becomes stream 1, answered in
/// HTTP/2.
#[derive(Debug)]
pub struct UpgradedRequest {
    /// Its HTTP/1.1 sequence number, which its start already carried.
    pub seq: u64,
    pub start_ns: u64,
    pub method: Text,
    pub path: Text,
    pub authority: Option<Text>,
    pub user_agent: Option<Text>,
    pub request_bytes: u64,
}

impl Http2Session {
    /// A session for a connection whose first bytes were `first`: from its start when they are
    /// the preface, else seen mid-stream (HPACK tables unknown).
    pub fn new(first: &[u8]) -> Self {
        let from_start = starts_with_preface(first);
        let table = || if from_start { hpack::Decoder::from_start() } else { hpack::Decoder::mid_stream() };
        Self {
            requests: Half {
                // Detected on the server's first frames, the client's preface may still come.
                reader: if from_start {
                    FrameReader::client_from_start()
                } else {
                    FrameReader::client_at_frame_or_preface()
                },
                table: table(),
                block: None,
            },
            responses: Half { reader: FrameReader::at_frame(), table: table(), block: None },
            streams: HashMap::new(),
            seq_base: 0,
            tables_from_start: from_start,
        }
    }

    /// The session of a connection that switched from HTTP/1.1 by `Upgrade: h2c`: the client's
    /// preface comes next, the server's frames follow its 101 at once, both tables start empty.
    pub fn after_upgrade(req: UpgradedRequest) -> Self {
        let stream = Stream {
            seq: req.seq,
            start_ns: req.start_ns,
            method: Some(req.method),
            path: Some(req.path),
            authority: req.authority,
            user_agent: req.user_agent,
            request_bytes: req.request_bytes,
            ..Stream::default()
        };
        Self {
            requests: Half {
                reader: FrameReader::client_from_start(),
                table: hpack::Decoder::from_start(),
                block: None,
            },
            responses: Half { reader: FrameReader::at_frame(), table: hpack::Decoder::from_start(), block: None },
            streams: HashMap::from([(UPGRADED_STREAM, stream)]),
            // Above the upgrading request's number, so no later stream reuses an HTTP/1 one.
            seq_base: req.seq + 1,
            tables_from_start: true,
        }
    }
}

/// The stream an upgrading HTTP/1.1 request is answered on.
const UPGRADED_STREAM: u32 = 1;

impl Session for Http2Session {
    fn protocol(&self) -> Protocol {
        Protocol::Http2
    }

    fn feed(&mut self, seg: &Segment<'_>, out: &mut Vec<SessionEvent>) {
        let Self { requests, responses, streams, seq_base, tables_from_start } = self;
        let (half, other) = match seg.side {
            Side::Request => (requests, responses),
            Side::Response => (responses, requests),
        };
        let Half { reader, table, block } = half;
        reader.feed(seg.bytes, seg.uncopied(), |read| match read {
            Read::Frame(f) => on_frame(seg, f, table, block, streams, *seq_base, out),
            // A new connection after all: neither side has sent a header block yet (a server
            // sends none before the client's first request), so both tables are known empty.
            // (After an h2c upgrade the server may have answered stream 1 before the preface
            // arrives: its table is known already and must be kept.)
            Read::Preface => {
                if !*tables_from_start && streams.is_empty() {
                    *table = hpack::Decoder::from_start();
                    other.table = hpack::Decoder::from_start();
                    *tables_from_start = true;
                }
            }
            // Frames of open streams go by unseen: their byte and message counts too.
            Read::Lost => {
                for s in streams.values_mut() {
                    s.lose_bytes(seg.side);
                }
            }
            Read::Resynced => {
                table.lose_sync();
                *block = None;
                // Frame boundaries were guessed from a plausible header: not evidence enough
                // for joins by stream id.
                out.push(SessionEvent::ParseError { reason: "frames lost, resumed at a plausible frame" });
            }
            Read::Broken(reason) => out.push(SessionEvent::ParseError { reason }),
            Read::Data { stream, bytes } => {
                if let Some(m) = messages_of(streams, seg.side, stream) {
                    m.feed(bytes);
                }
            }
            Read::DataSkipped { stream, n } => {
                if let Some(m) = messages_of(streams, seg.side, stream) {
                    m.skip(n);
                }
            }
        });
    }

    fn close(&mut self, _ts_ns: u64, out: &mut Vec<SessionEvent>) {
        for _ in self.streams.drain() {
            out.push(SessionEvent::UnmatchedRequest);
        }
    }
}

/// The message counter of a gRPC stream's side, when `stream` is an open gRPC stream.
fn messages_of(streams: &mut HashMap<u32, Stream>, side: Side, stream: u32) -> Option<&mut MessageCounter> {
    let s = streams.get_mut(&stream).filter(|s| s.grpc)?;
    Some(match side {
        Side::Request => &mut s.request_messages,
        Side::Response => &mut s.response_messages,
    })
}

fn on_frame(
    seg: &Segment<'_>,
    f: Frame<'_>,
    table: &mut hpack::Decoder,
    block: &mut Option<Block>,
    streams: &mut HashMap<u32, Stream>,
    seq_base: u64,
    out: &mut Vec<SessionEvent>,
) {
    let h = f.header;
    // A header block must be finished by CONTINUATIONs on its stream before anything else.
    if block.is_some() && h.kind != frame::CONTINUATION {
        *block = None;
        table.lose_sync();
        out.push(SessionEvent::ParseError { reason: "header block interrupted" });
    }
    match h.kind {
        frame::HEADERS | frame::PUSH_PROMISE => {
            let Some(fragment) = f.block_fragment() else {
                table.lose_sync();
                out.push(SessionEvent::ParseError { reason: "malformed HEADERS frame" });
                return;
            };
            let head = BlockHead {
                stream: h.stream,
                push: h.kind == frame::PUSH_PROMISE,
                end_stream: h.kind == frame::HEADERS && h.flags & frame::FLAG_END_STREAM != 0,
                cut: f.cut,
            };
            if h.flags & frame::FLAG_END_HEADERS != 0 {
                on_block(seg, head, fragment, table, streams, seq_base, out);
            } else {
                *block = Some(Block { head, bytes: fragment.to_vec() });
            }
        }
        frame::CONTINUATION => {
            let Some(mut open) = block.take().filter(|b| b.head.stream == h.stream) else {
                table.lose_sync();
                out.push(SessionEvent::ParseError { reason: "CONTINUATION without its HEADERS" });
                return;
            };
            open.bytes.extend_from_slice(f.payload);
            open.head.cut |= f.cut;
            if h.flags & frame::FLAG_END_HEADERS != 0 {
                on_block(seg, open.head, &open.bytes, table, streams, seq_base, out);
            } else if open.bytes.len() > frame::MAX_KEPT_PAYLOAD {
                open.head.cut = true;
                open.bytes.truncate(frame::MAX_KEPT_PAYLOAD);
                *block = Some(open);
            } else {
                *block = Some(open);
            }
        }
        frame::DATA => {
            let Some(stream) = streams.get_mut(&h.stream) else {
                if seg.side == Side::Response && h.flags & frame::FLAG_END_STREAM != 0 && h.stream % 2 == 1 {
                    out.push(SessionEvent::UnmatchedResponse);
                }
                return;
            };
            if f.cut && h.flags & frame::FLAG_PADDED != 0 && f.payload.is_empty() {
                // The pad length was not captured: how much of it was data is unknown.
                stream.lose_bytes(seg.side);
            }
            match seg.side {
                Side::Request => stream.request_bytes += f.data_len(),
                Side::Response => {
                    stream.response_bytes += f.data_len();
                    if h.flags & frame::FLAG_END_STREAM != 0 {
                        complete(h.stream, seg.ts_ns, None, streams, out);
                    }
                }
            }
        }
        frame::RST_STREAM => complete(h.stream, seg.ts_ns, f.error_code(), streams, out),
        // SETTINGS, PING, PRIORITY, WINDOW_UPDATE, GOAWAY: nothing a span needs. Streams a
        // GOAWAY abandons end as unmatched when the connection closes.
        _ => {}
    }
}

/// A whole header block: decoded (keeping the table in step), then applied to its stream.
fn on_block(
    seg: &Segment<'_>,
    block: BlockHead,
    bytes: &[u8],
    table: &mut hpack::Decoder,
    streams: &mut HashMap<u32, Stream>,
    seq_base: u64,
    out: &mut Vec<SessionEvent>,
) {
    let mut fields = Fields::default();
    let decoded = table.decode(bytes, |name, value| fields.take(name, value));
    if block.cut {
        // The part never seen inserted entries sonde cannot know.
        table.lose_sync();
    } else if let Err(e) = decoded {
        out.push(SessionEvent::ParseError { reason: e.0 });
    }
    let undecodable = decoded.map_or(0, |o| o.undecodable) + u32::from(block.cut);
    if undecodable > 0 {
        out.push(SessionEvent::Undecodable { fields: undecodable });
    }
    if block.push {
        // A promised request: the pushed response on its even stream is not a traced exchange.
        return;
    }
    match seg.side {
        Side::Request => on_request_headers(seg, block, fields, streams, seq_base, out),
        Side::Response => on_response_headers(seg, block, fields, streams, out),
    }
}

fn on_request_headers(
    seg: &Segment<'_>,
    block: BlockHead,
    fields: Fields,
    streams: &mut HashMap<u32, Stream>,
    seq_base: u64,
    out: &mut Vec<SessionEvent>,
) {
    if streams.contains_key(&block.stream) {
        // Request trailers: nothing a span needs.
        return;
    }
    if streams.len() >= MAX_OPEN_STREAMS {
        let oldest = streams.iter().min_by_key(|(_, s)| s.start_ns).map(|(id, _)| *id);
        if let Some(given_up) = oldest.and_then(|id| streams.remove(&id)) {
            // Its in-flight record goes too: left until the connection closes, it could still
            // parent a later client call by its target.
            out.push(SessionEvent::Abandoned { seq: given_up.seq });
            out.push(SessionEvent::UnmatchedRequest);
        }
    }
    let seq = seq_base + u64::from(block.stream);
    out.push(SessionEvent::RequestStarted(RequestStart {
        seq,
        tid: seg.tid,
        ts_ns: seg.ts_ns,
        traceparent: fields.traceparent,
        target: fields.path.clone(),
    }));
    streams.insert(
        block.stream,
        Stream {
            seq,
            start_ns: seg.ts_ns,
            method: fields.method,
            path: fields.path,
            authority: fields.authority,
            user_agent: fields.user_agent,
            grpc: fields.grpc,
            ..Stream::default()
        },
    );
}

fn on_response_headers(
    seg: &Segment<'_>,
    block: BlockHead,
    fields: Fields,
    streams: &mut HashMap<u32, Stream>,
    out: &mut Vec<SessionEvent>,
) {
    let Some(stream) = streams.get_mut(&block.stream) else {
        if block.end_stream && block.stream % 2 == 1 {
            out.push(SessionEvent::UnmatchedResponse);
        }
        return;
    };
    if let Some(status) = fields.status.filter(|s| !(100..200).contains(s)) {
        stream.status.get_or_insert(status);
    }
    if fields.grpc_status.is_some() {
        stream.grpc_status = fields.grpc_status;
    }
    if block.end_stream {
        complete(block.stream, seg.ts_ns, None, streams, out);
    }
}

/// The stream ended (response END_STREAM, or a reset with `reset` as its error code).
fn complete(id: u32, ts_ns: u64, reset: Option<u32>, streams: &mut HashMap<u32, Stream>, out: &mut Vec<SessionEvent>) {
    let Some(s) = streams.remove(&id) else { return };
    let status = s.status.unwrap_or(0);
    let detail = if s.grpc {
        let code = s.grpc_status.or_else(|| match (reset, s.status) {
            (Some(code), _) => Some(grpc::status_of_reset(code)),
            (None, Some(http)) if http != 200 => Some(grpc::status_of_http(http)),
            _ => None,
        });
        ExchangeDetail::Grpc(GrpcExchange {
            path: s.path.unwrap_or_default(),
            authority: s.authority,
            user_agent: s.user_agent,
            status: code,
            request_bytes: s.request_bytes,
            response_bytes: s.response_bytes,
            request_messages: s.request_messages.tally(),
            response_messages: s.response_messages.tally(),
        })
    } else {
        ExchangeDetail::Http(HttpExchange {
            method: s.method.unwrap_or_default(),
            target: s.path.unwrap_or_default(),
            version: HttpVersion::Http2,
            host: s.authority,
            user_agent: s.user_agent,
            status,
            request_body_bytes: (!s.request_bytes_unknown).then_some(s.request_bytes),
            response_body_bytes: (!s.response_bytes_unknown).then_some(s.response_bytes),
            // A reset after a complete response head still ended the exchange early.
            reset: reset.map(error_code_name),
        })
    };
    out.push(SessionEvent::Completed(Exchange {
        seq: s.seq,
        start_ns: s.start_ns,
        end_ns: ts_ns.max(s.start_ns),
        detail,
    }));
}

/// The header fields sonde reads from one block.
#[derive(Debug, Default)]
struct Fields {
    method: Option<Text>,
    path: Option<Text>,
    authority: Option<Text>,
    user_agent: Option<Text>,
    status: Option<u16>,
    grpc: bool,
    grpc_status: Option<u32>,
    traceparent: Option<TraceParent>,
}

impl Fields {
    fn take(&mut self, name: &[u8], value: &[u8]) {
        let text = || Text::from(String::from_utf8_lossy(value).trim());
        let number = || std::str::from_utf8(value).ok().and_then(|v| v.trim().parse::<u32>().ok());
        match name {
            b":method" => self.method = Some(text()),
            b":path" => self.path = Some(text()),
            b":authority" => self.authority = Some(text()),
            b"host" if self.authority.is_none() => self.authority = Some(text()),
            b"user-agent" => self.user_agent = Some(text()),
            b":status" => self.status = number().and_then(|n| u16::try_from(n).ok()),
            b"content-type" => self.grpc = grpc::is_grpc_content_type(value),
            b"grpc-status" => self.grpc_status = number(),
            b"traceparent" => self.traceparent = TraceParent::parse(value),
            _ => {}
        }
    }
}
