//! Splits one direction of a PostgreSQL v3 connection into messages: typed messages (tag +
//! int32 length), the untyped startup family, and the single-byte answer to SSLRequest /
//! GSSENCRequest. Bodies sonde does not need are skipped by length, copied or not.

/// Bodies kept per message; longer ones are kept truncated (query text beyond this is cut).
pub const MAX_KEPT_BODY: usize = 64 * 1024;
/// A length above this is not PostgreSQL (the server's own limit is 1 GB).
const MAX_MESSAGE_LEN: u32 = 1 << 30;

/// What the next message on this side looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Tag byte + int32 length.
    Typed,
    /// int32 length + body (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest).
    Untyped,
    /// One byte, no length ('S'/'N' after SSLRequest, 'G'/'N' after GSSENCRequest).
    SingleByte,
}

#[derive(Debug)]
pub struct Message<'a> {
    /// Tag byte; 0 for untyped messages.
    pub tag: u8,
    pub body: &'a [u8],
    /// The body was longer than what was kept or copied.
    pub truncated: bool,
    /// Time of the syscall that carried the first byte.
    pub first_ts: u64,
    /// Thread of that syscall.
    pub first_tid: u32,
    /// The one-byte answer to SSLRequest/GSSENCRequest (not a typed message).
    pub single_byte: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Header,
    Body { left: u64 },
    Desync,
}

#[derive(Debug)]
pub struct Framer {
    pub expect: Expect,
    state: State,
    header: Vec<u8>,
    tag: u8,
    keep: bool,
    body: Vec<u8>,
    truncated: bool,
    first_ts: u64,
    first_tid: u32,
}

/// Result of feeding one syscall's bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Fed {
    Ok,
    /// Framing is lost; the caller counts it. Later syscalls that start with a plausible
    /// message resynchronize.
    Broken(&'static str),
}

impl Framer {
    pub fn new(expect: Expect) -> Self {
        Self {
            expect,
            state: State::Header,
            header: Vec::with_capacity(5),
            tag: 0,
            keep: false,
            body: Vec::new(),
            truncated: false,
            first_ts: 0,
            first_tid: 0,
        }
    }

    /// Part of a message arrived, not all of it.
    pub fn mid_message(&self) -> bool {
        match self.state {
            State::Header => !self.header.is_empty(),
            State::Body { .. } => true,
            State::Desync => false,
        }
    }

    /// Feeds captured `bytes` followed by `uncopied` bytes that moved but were not copied.
    /// `keep(tag)` says whether a message's body is needed. Complete messages go to `on_msg`.
    #[expect(clippy::too_many_arguments, reason = "one syscall's data plus two callbacks")]
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        uncopied: u64,
        ts: u64,
        tid: u32,
        resync_ok: impl Fn(&[u8]) -> bool,
        keep: impl Fn(u8) -> bool,
        mut on_msg: impl FnMut(&mut Self, Message<'_>),
    ) -> Fed {
        if self.state == State::Desync {
            if !resync_ok(bytes) {
                return Fed::Ok;
            }
            self.expect = Expect::Typed;
            self.reset_message();
        }
        while !bytes.is_empty() {
            match self.state {
                State::Desync => return Fed::Ok,
                State::Header => {
                    if self.header.is_empty() {
                        self.first_ts = ts;
                        self.first_tid = tid;
                    }
                    let need = match self.expect {
                        Expect::Typed => 5,
                        Expect::Untyped => 4,
                        Expect::SingleByte => 1,
                    };
                    let take = (need - self.header.len()).min(bytes.len());
                    self.header.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.header.len() < need {
                        continue;
                    }
                    if self.expect == Expect::SingleByte {
                        let tag = self.header[0];
                        self.header.clear();
                        self.expect = Expect::Typed;
                        let msg = Message {
                            tag,
                            body: &[],
                            truncated: false,
                            first_ts: self.first_ts,
                            first_tid: self.first_tid,
                            single_byte: true,
                        };
                        on_msg(self, msg);
                        continue;
                    }
                    let (tag, len_bytes) = match self.expect {
                        Expect::Typed => (self.header[0], &self.header[1..5]),
                        _ => (0, &self.header[0..4]),
                    };
                    let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
                    if !(4..=MAX_MESSAGE_LEN).contains(&len) {
                        self.state = State::Desync;
                        return Fed::Broken("message length out of range");
                    }
                    self.tag = tag;
                    self.keep = keep(tag);
                    self.body.clear();
                    self.truncated = false;
                    self.state = State::Body { left: (len - 4) as u64 };
                    if len == 4 {
                        self.finish(&mut on_msg);
                    }
                }
                State::Body { left } => {
                    let take = left.min(bytes.len() as u64) as usize;
                    if self.keep {
                        let room = MAX_KEPT_BODY.saturating_sub(self.body.len());
                        self.body.extend_from_slice(&bytes[..take.min(room)]);
                        self.truncated |= take > room;
                    }
                    bytes = &bytes[take..];
                    let left = left - take as u64;
                    self.state = State::Body { left };
                    if left == 0 {
                        self.finish(&mut on_msg);
                    }
                }
            }
        }
        if uncopied > 0 {
            match self.state {
                State::Body { left } if uncopied <= left => {
                    self.truncated = true;
                    self.state = State::Body { left: left - uncopied };
                    if left == uncopied {
                        self.finish(&mut on_msg);
                    }
                }
                State::Desync => {}
                _ => {
                    self.state = State::Desync;
                    return Fed::Broken("bytes not captured outside a message body");
                }
            }
        }
        Fed::Ok
    }

    fn finish(&mut self, on_msg: &mut impl FnMut(&mut Self, Message<'_>)) {
        let body = std::mem::take(&mut self.body);
        let msg = Message {
            tag: self.tag,
            body: &body,
            truncated: self.truncated,
            first_ts: self.first_ts,
            first_tid: self.first_tid,
            single_byte: false,
        };
        // After an untyped message the next one is typed unless the session says otherwise.
        if self.expect == Expect::Untyped {
            self.expect = Expect::Typed;
        }
        self.reset_message();
        on_msg(self, msg);
        self.body = body;
        self.body.clear();
    }

    fn reset_message(&mut self) {
        self.state = State::Header;
        self.header.clear();
    }
}

/// A NUL-terminated string at the start of `b`, and the rest after the NUL.
pub fn cstr(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|c| *c == 0) {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}
