//! One direction of an HTTP/1.x connection: accumulates a message head, then walks its body
//! (Content-Length, chunked, or until close), skipping body bytes that were never copied.

/// Largest head (start line + headers) we accumulate before calling the stream broken.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest chunk-size or trailer line.
const MAX_LINE_BYTES: usize = 1024;

/// How the body after a head is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// The CRLF after chunk data, this many bytes left.
    DataEnd(u8),
    /// Trailer lines after the last chunk, until an empty line.
    Trailers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    /// Lost framing: wait for a syscall whose bytes start a new message.
    Desync,
}

/// What [`HalfStream::step`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// All input consumed, message not finished.
    NeedMore,
    /// A complete head is in [`HalfStream::head`]; the caller must call [`HalfStream::start_body`].
    Head,
    /// The body of the current message ended.
    BodyDone,
    /// Framing is lost; the reason is counted by the caller.
    Broken(&'static str),
}

/// Parser state for one direction.
#[derive(Debug)]
pub struct HalfStream {
    state: State,
    head: Vec<u8>,
    line: Vec<u8>,
    /// Body bytes of the current message so far (including uncopied ones).
    pub body_bytes: u64,
    /// Timestamp of the first byte of the current message.
    pub first_byte_ns: u64,
    /// Thread that sent/received the first byte of the current message.
    pub first_tid: u32,
}

impl Default for HalfStream {
    fn default() -> Self {
        Self { state: State::Head, head: Vec::new(), line: Vec::new(), body_bytes: 0, first_byte_ns: 0, first_tid: 0 }
    }
}

impl HalfStream {
    pub fn in_until_close_body(&self) -> bool {
        self.state == State::UntilClose
    }

    /// Some of a head arrived, not all of it.
    pub fn has_partial_head(&self) -> bool {
        self.state == State::Head && !(self.head.is_empty() && self.line.is_empty())
    }

    /// The complete head after [`Step::Head`].
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Loses framing on purpose (e.g. after a parse error in the head).
    pub fn desync(&mut self) {
        self.state = State::Desync;
        self.head.clear();
        self.line.clear();
    }

    /// Tries to recover at a syscall boundary: true if the stream is (now) in sync.
    pub fn resync_at(&mut self, starts_message: bool) -> bool {
        if self.state != State::Desync {
            return true;
        }
        if starts_message {
            self.state = State::Head;
            self.head.clear();
            return true;
        }
        false
    }

    /// Sets the framing of the body that follows the head just returned; returns true when the
    /// message is already complete (no body).
    pub fn start_body(&mut self, framing: BodyFraming) -> bool {
        self.head.clear();
        self.body_bytes = 0;
        self.state = match framing {
            BodyFraming::None | BodyFraming::Length(0) => {
                self.state = State::Head;
                return true;
            }
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::Chunked(Chunk::Size),
            BodyFraming::UntilClose => State::UntilClose,
        };
        false
    }

    /// Drops the head just parsed and waits for another one (1xx interim responses).
    pub fn skip_head(&mut self) {
        self.head.clear();
        self.state = State::Head;
    }

    /// Consumes captured bytes from `input` up to the next event; advances `input` past them.
    pub fn step(&mut self, input: &mut &[u8], ts_ns: u64, tid: u32) -> Step {
        while !input.is_empty() {
            match self.state {
                State::Desync => {
                    *input = &[];
                    return Step::NeedMore;
                }
                State::Head => return self.step_head(input, ts_ns, tid),
                State::Length(left) => {
                    let take = left.min(input.len() as u64);
                    *input = &input[take as usize..];
                    self.body_bytes += take;
                    if take == left {
                        self.state = State::Head;
                        return Step::BodyDone;
                    }
                    self.state = State::Length(left - take);
                }
                State::UntilClose => {
                    self.body_bytes += input.len() as u64;
                    *input = &[];
                }
                State::Chunked(chunk) => {
                    if let Some(step) = self.step_chunked(chunk, input) {
                        return step;
                    }
                }
            }
        }
        Step::NeedMore
    }

    /// Accounts for `n` bytes that moved but were not captured. Only bodies can absorb them.
    pub fn skip_uncopied(&mut self, n: u64) -> Step {
        if n == 0 {
            return Step::NeedMore;
        }
        match self.state {
            State::Length(left) if n <= left => {
                self.body_bytes += n;
                if n == left {
                    self.state = State::Head;
                    return Step::BodyDone;
                }
                self.state = State::Length(left - n);
                Step::NeedMore
            }
            State::Chunked(Chunk::Data(left)) if n <= left => {
                self.body_bytes += n;
                self.state =
                    if n == left { State::Chunked(Chunk::DataEnd(2)) } else { State::Chunked(Chunk::Data(left - n)) };
                Step::NeedMore
            }
            State::UntilClose => {
                self.body_bytes += n;
                Step::NeedMore
            }
            State::Desync => Step::NeedMore,
            _ => {
                self.desync();
                Step::Broken("bytes not captured outside a body")
            }
        }
    }

    fn step_head(&mut self, input: &mut &[u8], ts_ns: u64, tid: u32) -> Step {
        if self.head.is_empty() {
            // Tolerate stray CRLFs between messages (RFC 9112 section 2.2).
            let skip = input.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
            *input = &input[skip..];
            if input.is_empty() {
                return Step::NeedMore;
            }
            self.first_byte_ns = ts_ns;
            self.first_tid = tid;
        }
        // Search only where the terminator can newly appear.
        let search_from = self.head.len().saturating_sub(3);
        let old_len = self.head.len();
        let room = MAX_HEAD_BYTES.saturating_sub(old_len);
        let take = input.len().min(room);
        self.head.extend_from_slice(&input[..take]);
        match find_head_end(&self.head[search_from..]) {
            Some(pos) => {
                let end = search_from + pos + 4;
                let used = end - old_len;
                self.head.truncate(end);
                *input = &input[used..];
                Step::Head
            }
            None if self.head.len() >= MAX_HEAD_BYTES => {
                *input = &[];
                self.desync();
                Step::Broken("head larger than the limit")
            }
            None => {
                *input = &input[take..];
                Step::NeedMore
            }
        }
    }

    /// One chunked-body transition; Some(step) when the caller must return it.
    fn step_chunked(&mut self, chunk: Chunk, input: &mut &[u8]) -> Option<Step> {
        match chunk {
            Chunk::Data(left) => {
                let take = left.min(input.len() as u64);
                *input = &input[take as usize..];
                self.body_bytes += take;
                self.state = State::Chunked(if take == left { Chunk::DataEnd(2) } else { Chunk::Data(left - take) });
                None
            }
            Chunk::DataEnd(left) => {
                let expected: &[u8] = if left == 2 { b"\r\n" } else { b"\n" };
                let take = (left as usize).min(input.len());
                if input[..take] != expected[..take] {
                    self.desync();
                    return Some(Step::Broken("chunk data not followed by CRLF"));
                }
                *input = &input[take..];
                let left = left - take as u8;
                self.state = State::Chunked(if left == 0 { Chunk::Size } else { Chunk::DataEnd(left) });
                None
            }
            Chunk::Size | Chunk::Trailers => {
                let Some(line) = self.take_line(input) else {
                    if self.line.len() > MAX_LINE_BYTES {
                        self.desync();
                        return Some(Step::Broken("chunk line too long"));
                    }
                    return None;
                };
                if chunk == Chunk::Trailers {
                    if line.is_empty() {
                        self.state = State::Head;
                        return Some(Step::BodyDone);
                    }
                    return None;
                }
                match parse_chunk_size(&line) {
                    Some(0) => self.state = State::Chunked(Chunk::Trailers),
                    Some(n) => self.state = State::Chunked(Chunk::Data(n)),
                    None => {
                        self.desync();
                        return Some(Step::Broken("bad chunk size"));
                    }
                }
                None
            }
        }
    }

    /// Accumulates up to a LF; returns the line without CRLF once complete.
    fn take_line(&mut self, input: &mut &[u8]) -> Option<Vec<u8>> {
        match input.iter().position(|b| *b == b'\n') {
            Some(pos) => {
                self.line.extend_from_slice(&input[..pos]);
                *input = &input[pos + 1..];
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Some(line)
            }
            None => {
                let room = (MAX_LINE_BYTES + 1).saturating_sub(self.line.len());
                self.line.extend_from_slice(&input[..input.len().min(room)]);
                *input = &[];
                None
            }
        }
    }
}

fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    // Chunk extensions (";name=value") are allowed after the size.
    let hex = line.split(|b| *b == b';').next()?.trim_ascii();
    if hex.is_empty() || hex.len() > 15 {
        return None;
    }
    let text = std::str::from_utf8(hex).ok()?;
    u64::from_str_radix(text, 16).ok()
}

/// The end of an HTTP head is searched in every chunk: memchr's SIMD search, not a byte-by-byte
/// window compare (which was a visible share of the pipeline's time), with its searcher built
/// once (`memmem::find` builds one per call, a visible share again).
fn find_head_end(haystack: &[u8]) -> Option<usize> {
    static HEAD_END: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
    HEAD_END.find(haystack)
}
