//! A streaming RESP2/RESP3 reader: walks values of any nesting without buffering them, keeping
//! only what pairing and naming need (type, first strings, element count). Bulk payloads are
//! skipped by length, so values larger than the capture keep framing.

use smallvec::SmallVec;

use crate::trace::span::Text;

/// Leaf strings kept per value (command name, subcommand or first argument, third element).
const KEPT_STRINGS: usize = 3;
/// Bytes kept per kept string.
const KEPT_STRING_BYTES: usize = 64;
/// Longest line (simple string, error, number, inline command) accumulated.
const MAX_LINE: usize = 64 * 1024;
/// Deepest nesting accepted.
const MAX_DEPTH: usize = 64;

/// What one complete top-level value looked like.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Value {
    /// RESP type byte of the top value (`*`, `+`, `-`, `$`, `>`, ...), or `i` for an inline command.
    pub kind: u8,
    /// For aggregates, their first leaf strings; for simple values, the value itself. Inline:
    /// a value per command must not cost an allocation.
    pub strings: SmallVec<[Text; KEPT_STRINGS]>,
    /// Elements of a top-level aggregate (arguments of a command).
    pub elements: u64,
    /// Time of the syscall that carried its first byte.
    pub first_ts: u64,
    pub first_tid: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Expecting a type byte.
    Type,
    /// Reading the rest of a line for a value of this type.
    Line(u8),
    /// Inside a bulk payload: bytes left.
    Bulk(u64),
    /// The CRLF after a bulk payload: bytes left.
    BulkEnd(u8),
    /// An inline command line.
    Inline,
    Desync,
}

#[derive(Debug)]
pub struct Reader {
    /// Whether plain-text inline commands are allowed (request side only).
    inline_allowed: bool,
    state: State,
    line: Vec<u8>,
    /// Open aggregates: elements left, and whether it is an attribute (not an element itself).
    stack: Vec<(u64, bool)>,
    bulk: Vec<u8>,
    current: Value,
    started: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Fed {
    Ok,
    Broken(&'static str),
}

fn is_type_byte(b: u8) -> bool {
    b"+-:$*_,#!=(%~>|".contains(&b)
}

impl Reader {
    pub fn new(inline_allowed: bool) -> Self {
        Self {
            inline_allowed,
            state: State::Type,
            line: Vec::new(),
            stack: Vec::new(),
            bulk: Vec::new(),
            current: Value::default(),
            started: false,
        }
    }

    /// Part of a value arrived, not all of it.
    pub fn mid_value(&self) -> bool {
        self.state != State::Desync && (self.started || self.state != State::Type)
    }

    /// Feeds one syscall's captured bytes and its uncopied count; complete values go to `emit`.
    pub fn feed(&mut self, mut b: &[u8], uncopied: u64, ts: u64, tid: u32, emit: &mut impl FnMut(Value)) -> Fed {
        if self.state == State::Desync {
            // Resynchronize where a syscall starts a new command or reply.
            if b.first().is_some_and(|c| is_type_byte(*c)) {
                self.reset();
            } else {
                return Fed::Ok;
            }
        }
        while !b.is_empty() {
            if !self.started {
                self.started = true;
                self.current.first_ts = ts;
                self.current.first_tid = tid;
            }
            match self.state {
                State::Desync => return Fed::Ok,
                State::Type => {
                    let c = b[0];
                    if is_type_byte(c) {
                        self.state = State::Line(c);
                        if self.stack.is_empty() && self.current.kind == 0 {
                            self.current.kind = c;
                        }
                        b = &b[1..];
                    } else if self.stack.is_empty() && self.inline_allowed && c != b'\r' && c != b'\n' {
                        self.current.kind = b'i';
                        self.state = State::Inline;
                    } else if self.stack.is_empty() && (c == b'\r' || c == b'\n') {
                        b = &b[1..];
                        self.started = false;
                    } else {
                        self.state = State::Desync;
                        return Fed::Broken("not a RESP type byte");
                    }
                }
                State::Line(_) | State::Inline => match b.iter().position(|c| *c == b'\n') {
                    Some(pos) => {
                        self.push_line(&b[..pos]);
                        b = &b[pos + 1..];
                        if let Err(reason) = self.line_done(emit) {
                            self.state = State::Desync;
                            return Fed::Broken(reason);
                        }
                    }
                    None => {
                        self.push_line(b);
                        b = &[];
                        if self.line.len() > MAX_LINE {
                            self.state = State::Desync;
                            return Fed::Broken("line too long");
                        }
                    }
                },
                State::Bulk(left) => {
                    let take = left.min(b.len() as u64) as usize;
                    let room = KEPT_STRING_BYTES.saturating_sub(self.bulk.len());
                    self.bulk.extend_from_slice(&b[..take.min(room)]);
                    b = &b[take..];
                    self.state = if left == take as u64 { State::BulkEnd(2) } else { State::Bulk(left - take as u64) };
                }
                State::BulkEnd(left) => {
                    let expected: &[u8] = if left == 2 { b"\r\n" } else { b"\n" };
                    let take = (left as usize).min(b.len());
                    if b[..take] != expected[..take] {
                        self.state = State::Desync;
                        return Fed::Broken("bulk string not followed by CRLF");
                    }
                    b = &b[take..];
                    if take as u8 == left {
                        self.state = State::Type;
                        let s = keep(&self.bulk);
                        self.bulk.clear();
                        self.element_done(Some(s), emit);
                    } else {
                        self.state = State::BulkEnd(left - take as u8);
                    }
                }
            }
        }
        // Bytes that moved but were not copied: only a bulk payload (and its CRLF) can hold them.
        let mut gap = uncopied;
        while gap > 0 {
            match self.state {
                State::Bulk(left) => {
                    let take = gap.min(left);
                    gap -= take;
                    self.state = if take == left { State::BulkEnd(2) } else { State::Bulk(left - take) };
                }
                State::BulkEnd(left) => {
                    let take = gap.min(left as u64) as u8;
                    gap -= take as u64;
                    if take == left {
                        self.state = State::Type;
                        let s = keep(&self.bulk);
                        self.bulk.clear();
                        self.element_done(Some(s), emit);
                    } else {
                        self.state = State::BulkEnd(left - take);
                    }
                }
                State::Desync => break,
                _ => {
                    self.state = State::Desync;
                    return Fed::Broken("bytes not captured outside a bulk string");
                }
            }
        }
        Fed::Ok
    }

    pub fn is_desynced(&self) -> bool {
        self.state == State::Desync
    }

    /// Gives up on the value being read and expects a new one at the next byte.
    pub fn restart(&mut self) {
        self.reset();
    }

    fn push_line(&mut self, part: &[u8]) {
        let room = (MAX_LINE + 1).saturating_sub(self.line.len());
        self.line.extend_from_slice(&part[..part.len().min(room)]);
    }

    fn line_done(&mut self, emit: &mut impl FnMut(Value)) -> Result<(), &'static str> {
        // The buffer goes back afterwards, so its capacity serves the next line.
        let mut line = std::mem::take(&mut self.line);
        let done = self.complete_line(&line, emit);
        line.clear();
        self.line = line;
        done
    }

    fn complete_line(&mut self, line: &[u8], emit: &mut impl FnMut(Value)) -> Result<(), &'static str> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let state = self.state;
        self.state = State::Type;
        match state {
            State::Inline => {
                let words: Vec<&[u8]> = line.split(|c| c.is_ascii_whitespace()).filter(|w| !w.is_empty()).collect();
                self.current.elements = words.len() as u64;
                self.current.strings = words.iter().take(KEPT_STRINGS).map(|w| keep(w)).collect();
                self.finish_top(emit);
            }
            State::Line(kind) => match kind {
                b'$' | b'=' | b'!' => {
                    let n = parse_len(line)?;
                    if n < 0 {
                        self.element_done(None, emit);
                    } else {
                        self.state = State::Bulk(n as u64);
                        if n == 0 {
                            self.state = State::BulkEnd(2);
                        }
                    }
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    let n = parse_len(line)?;
                    let elements = if kind == b'%' || kind == b'|' { n.saturating_mul(2) } else { n };
                    if self.stack.is_empty() && kind != b'|' {
                        self.current.elements = n.max(0) as u64;
                    }
                    if elements <= 0 {
                        self.element_done(None, emit);
                    } else {
                        if self.stack.len() >= MAX_DEPTH {
                            return Err("nesting too deep");
                        }
                        self.stack.push((elements as u64, kind == b'|'));
                        if kind == b'|' && self.stack.len() == 1 {
                            // A top-level attribute precedes the real value: that one names the kind.
                            self.current.kind = 0;
                        }
                    }
                }
                _ => self.element_done(Some(keep(line)), emit),
            },
            _ => {}
        }
        Ok(())
    }

    /// A value (leaf or aggregate) ended at the current depth.
    fn element_done(&mut self, leaf: Option<Text>, emit: &mut impl FnMut(Value)) {
        if let Some(s) = leaf
            && self.stack.len() <= 1
            && self.current.strings.len() < KEPT_STRINGS
            && !self.stack.first().is_some_and(|(_, attr)| *attr)
        {
            self.current.strings.push(s);
        }
        loop {
            let Some(top) = self.stack.last_mut() else {
                self.finish_top(emit);
                return;
            };
            top.0 -= 1;
            if top.0 > 0 {
                return;
            }
            let (_, was_attribute) = self.stack.pop().unwrap_or((0, false));
            if was_attribute {
                // An attribute is not an element of its parent; at top level the value follows.
                if self.stack.is_empty() {
                    self.current.strings.clear();
                }
                return;
            }
        }
    }

    fn finish_top(&mut self, emit: &mut impl FnMut(Value)) {
        let v = std::mem::take(&mut self.current);
        self.started = false;
        emit(v);
    }

    fn reset(&mut self) {
        self.state = State::Type;
        self.line.clear();
        self.stack.clear();
        self.bulk.clear();
        self.current = Value::default();
        self.started = false;
    }
}

fn keep(w: &[u8]) -> Text {
    let w = &w[..w.len().min(KEPT_STRING_BYTES)];
    // Valid UTF-8 is the rule; the lossy conversion is slow even when it has nothing to replace.
    match std::str::from_utf8(w) {
        Ok(s) => Text::from(s),
        Err(_) => Text::from_utf8_lossy(w),
    }
}

fn parse_len(line: &[u8]) -> Result<i64, &'static str> {
    std::str::from_utf8(line).ok().and_then(|s| s.trim().parse::<i64>().ok()).filter(|n| *n >= -1).ok_or("bad length")
}
