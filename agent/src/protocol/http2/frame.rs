//! HTTP/2 framing (RFC 9113 section 4): one [`FrameReader`] per direction turns syscall-sized
//! pieces into frames. Payloads are kept only where sonde reads them (header blocks, resets,
//! settings); DATA is counted, never copied. Bytes the capture did not copy are skipped by the
//! frame lengths, so framing survives them as long as no frame header falls among them.

/// The client connection preface (RFC 9113 section 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADER_LEN: usize = 9;
/// Payload bytes kept of one frame; a header block beyond this is cut (and its table lost).
pub const MAX_KEPT_PAYLOAD: usize = 65536;
/// The largest frame length a valid header can carry (2^24 - 1; SETTINGS_MAX_FRAME_SIZE's
/// ceiling).
const MAX_FRAME_LEN: u32 = (1 << 24) - 1;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const FLAG_END_STREAM: u8 = 0x1;
pub const FLAG_END_HEADERS: u8 = 0x4;
pub const FLAG_PADDED: u8 = 0x8;
pub const FLAG_PRIORITY: u8 = 0x20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl FrameHeader {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    /// Whether this could be a real frame header: a known type on the kind of stream it needs,
    /// with the length its type fixes. Used to find frames on a connection seen mid-stream.
    pub fn plausible(&self) -> bool {
        let on_stream = self.stream != 0;
        self.len <= MAX_FRAME_LEN
            && match self.kind {
                DATA | HEADERS | CONTINUATION | PUSH_PROMISE => on_stream,
                PRIORITY => on_stream && self.len == 5,
                RST_STREAM => on_stream && self.len == 4,
                SETTINGS => !on_stream && self.len.is_multiple_of(6),
                PING => !on_stream && self.len == 8,
                GOAWAY => !on_stream && self.len >= 8,
                WINDOW_UPDATE => self.len == 4,
                _ => false,
            }
    }

    /// Payload bytes worth keeping: header blocks and the few fixed fields sonde reads.
    fn kept_len(&self) -> usize {
        let len = self.len as usize;
        match self.kind {
            HEADERS | CONTINUATION | PUSH_PROMISE | SETTINGS => len.min(MAX_KEPT_PAYLOAD),
            RST_STREAM => len.min(4),
            GOAWAY => len.min(8),
            // The pad length, to count DATA bytes without padding.
            DATA if self.flags & FLAG_PADDED != 0 => len.min(1),
            _ => 0,
        }
    }
}

/// A frame as far as it was kept.
#[derive(Debug)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    /// The kept prefix of the payload (see `kept_len`).
    pub payload: &'a [u8],
    /// Part of the kept prefix was never seen (not captured, or beyond the keep limit).
    pub cut: bool,
}

impl Frame<'_> {
    /// The header block fragment of a HEADERS, PUSH_PROMISE or CONTINUATION frame, without
    /// padding and priority fields; `None` when the frame is malformed.
    pub fn block_fragment(&self) -> Option<&[u8]> {
        let mut p = self.payload;
        let mut pad = 0usize;
        if matches!(self.header.kind, HEADERS | PUSH_PROMISE) && self.header.flags & FLAG_PADDED != 0 {
            let (&n, rest) = p.split_first()?;
            pad = n as usize;
            p = rest;
        }
        match self.header.kind {
            HEADERS if self.header.flags & FLAG_PRIORITY != 0 => p = p.get(5..)?,
            PUSH_PROMISE => p = p.get(4..)?,
            _ => {}
        }
        if self.cut {
            // Padding sits at the end, which a cut payload does not reach.
            return Some(p);
        }
        p.get(..p.len().checked_sub(pad)?)
    }

    /// DATA bytes the frame carries, padding excluded.
    pub fn data_len(&self) -> u64 {
        let len = u64::from(self.header.len);
        if self.header.flags & FLAG_PADDED == 0 {
            return len;
        }
        let pad = self.payload.first().map_or(0, |p| u64::from(*p) + 1);
        len.saturating_sub(pad)
    }

    /// The 32-bit error code of a RST_STREAM or the last one of a GOAWAY's fixed fields.
    pub fn error_code(&self) -> Option<u32> {
        let at = if self.header.kind == GOAWAY { 4 } else { 0 };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[derive(Debug)]
enum State {
    /// The client's side when it is not known whether its preface is still to come (the
    /// connection was detected on the server's first frames, which may precede it).
    MaybePreface,
    /// The client preface, `seen` bytes of it so far.
    Preface {
        seen: usize,
    },
    Header {
        buf: [u8; HEADER_LEN],
        have: usize,
    },
    Payload {
        header: FrameHeader,
        remaining: u64,
        kept: Vec<u8>,
        cut: bool,
    },
    /// A frame header fell among bytes not seen: frames resume at the next piece that starts
    /// with a plausible header.
    Lost,
}

/// What the reader reports.
#[derive(Debug)]
pub enum Read<'a> {
    Frame(Frame<'a>),
    /// The client preface went by: the connection is seen from its start.
    Preface,
    /// A frame header fell among bytes not seen: frames are lost until a piece starts with a
    /// plausible header ([`Read::Resynced`]).
    Lost,
    /// Framing was lost and found again: whatever state spans frames (header blocks, the HPACK
    /// table) is unknown.
    Resynced,
    /// The bytes do not follow HTTP/2 framing (a bad preface).
    Broken(&'static str),
    /// Captured bytes of a DATA frame's data (padding excluded), as they pass; the frame
    /// itself follows as [`Read::Frame`] once whole. Never copied.
    Data {
        stream: u32,
        bytes: &'a [u8],
    },
    /// Bytes of a DATA frame's data that moved without being captured: how many, or None when
    /// the frame's padding (and so which of them are data) is unknown.
    DataSkipped {
        stream: u32,
        n: Option<u64>,
    },
}

/// Which payload bytes `[from, to)` of a DATA frame are data: the pad length byte and the
/// padding are not. None when the frame is padded and its pad length was not seen.
fn data_part(header: &FrameHeader, kept: &[u8], from: u64, to: u64) -> Option<(u64, u64)> {
    let len = u64::from(header.len);
    let (start, end) = if header.flags & FLAG_PADDED != 0 {
        let pad = u64::from(*kept.first()?);
        (1, len.saturating_sub(pad))
    } else {
        (0, len)
    };
    let (a, b) = (from.max(start), to.min(end));
    Some((a, b.max(a)))
}

#[derive(Debug)]
pub struct FrameReader {
    state: State,
}

impl FrameReader {
    /// A reader for the client's side of a connection seen from its start.
    pub fn client_from_start() -> Self {
        Self { state: State::Preface { seen: 0 } }
    }

    /// A reader positioned at a frame boundary (the server side, or a connection seen
    /// mid-stream whose first piece starts with a frame).
    pub fn at_frame() -> Self {
        Self { state: State::Header { buf: [0; HEADER_LEN], have: 0 } }
    }

    /// The client's side of a connection first seen on the server's side: at a frame, or at
    /// the preface when the connection is new.
    pub fn client_at_frame_or_preface() -> Self {
        Self { state: State::MaybePreface }
    }

    /// Consumes one syscall's bytes: `bytes` captured, then `uncopied` more that moved but were
    /// not captured. Calls `read` for each frame completed and each change of sync.
    pub fn feed(&mut self, mut bytes: &[u8], uncopied: u64, mut read: impl FnMut(Read<'_>)) {
        if matches!(self.state, State::Lost) {
            match bytes.first_chunk::<HEADER_LEN>() {
                Some(h) if FrameHeader::parse(h).plausible() => {
                    self.state = State::Header { buf: [0; HEADER_LEN], have: 0 };
                    read(Read::Resynced);
                }
                _ => return,
            }
        }
        while !bytes.is_empty() {
            match &mut self.state {
                // The preface starts with `P`; a frame header starts with its length's top
                // byte, which is 0x50 only for frames of 5 MiB and more.
                State::MaybePreface => {
                    self.state = if bytes[0] == PREFACE[0] {
                        State::Preface { seen: 0 }
                    } else {
                        State::Header { buf: [0; HEADER_LEN], have: 0 }
                    };
                }
                State::Preface { seen } => {
                    let n = (PREFACE.len() - *seen).min(bytes.len());
                    if bytes[..n] != PREFACE[*seen..*seen + n] {
                        self.state = State::Lost;
                        read(Read::Broken("bad connection preface"));
                        return;
                    }
                    *seen += n;
                    bytes = &bytes[n..];
                    if *seen == PREFACE.len() {
                        self.state = State::Header { buf: [0; HEADER_LEN], have: 0 };
                        read(Read::Preface);
                    }
                }
                State::Header { buf, have } => {
                    let n = (HEADER_LEN - *have).min(bytes.len());
                    buf[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have == HEADER_LEN {
                        let header = FrameHeader::parse(buf);
                        self.state = State::Payload {
                            header,
                            remaining: u64::from(header.len),
                            kept: Vec::with_capacity(header.kept_len()),
                            cut: false,
                        };
                        self.finish_if_done(&mut read);
                    }
                }
                State::Payload { header, remaining, kept, .. } => {
                    let n = (*remaining).min(bytes.len() as u64) as usize;
                    let keep = header.kept_len().saturating_sub(kept.len()).min(n);
                    kept.extend_from_slice(&bytes[..keep]);
                    if header.kind == DATA {
                        let from = u64::from(header.len) - *remaining;
                        match data_part(header, kept, from, from + n as u64) {
                            Some((a, b)) if b > a => read(Read::Data {
                                stream: header.stream,
                                bytes: &bytes[(a - from) as usize..(b - from) as usize],
                            }),
                            Some(_) => {}
                            None => read(Read::DataSkipped { stream: header.stream, n: None }),
                        }
                    }
                    *remaining -= n as u64;
                    bytes = &bytes[n..];
                    self.finish_if_done(&mut read);
                }
                State::Lost => return,
            }
        }
        self.skip(uncopied, &mut read);
    }

    /// Bytes that moved without being captured.
    fn skip(&mut self, mut n: u64, read: &mut impl FnMut(Read<'_>)) {
        while n > 0 {
            match &mut self.state {
                State::Payload { header, remaining, kept, cut } => {
                    let k = (*remaining).min(n);
                    if kept.len() < header.kept_len() {
                        *cut = true;
                    }
                    if header.kind == DATA {
                        let from = u64::from(header.len) - *remaining;
                        let n = data_part(header, kept, from, from + k).map(|(a, b)| b - a);
                        if n != Some(0) {
                            read(Read::DataSkipped { stream: header.stream, n });
                        }
                    }
                    *remaining -= k;
                    n -= k;
                    self.finish_if_done(read);
                }
                State::Lost => return,
                // A frame header (or the preface) among the missing bytes: its length is unknown.
                State::Header { .. } | State::Preface { .. } | State::MaybePreface => {
                    self.state = State::Lost;
                    read(Read::Lost);
                    return;
                }
            }
        }
    }

    fn finish_if_done(&mut self, read: &mut impl FnMut(Read<'_>)) {
        if let State::Payload { header, remaining: 0, kept, cut } = &self.state {
            let cut = *cut || (header.len as usize) > MAX_KEPT_PAYLOAD && header.kept_len() == MAX_KEPT_PAYLOAD;
            read(Read::Frame(Frame { header: *header, payload: kept, cut }));
            self.state = State::Header { buf: [0; HEADER_LEN], have: 0 };
        }
    }
}

/// Whether `bytes` (the first piece seen of a connection) is a run of plausible frames that
/// ends exactly at its end, with at least one frame: the evidence for HTTP/2 mid-stream.
pub fn plausible_frames(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    let mut frames = 0;
    while !rest.is_empty() {
        let Some(h) = rest.first_chunk::<HEADER_LEN>() else { return false };
        let header = FrameHeader::parse(h);
        if !header.plausible() {
            return false;
        }
        let Some(after) = rest.get(HEADER_LEN + header.len as usize..) else { return false };
        rest = after;
        frames += 1;
    }
    frames > 0
}
