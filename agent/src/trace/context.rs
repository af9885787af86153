//! W3C Trace Context (`traceparent`), and the context a span runs in.

use super::ids::{SpanId, TraceId};

/// A parsed `traceparent` header: version 00 layout, `00-<trace-id>-<parent-id>-<flags>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    pub sampled: bool,
}

impl TraceParent {
    /// Parses a header value; None for anything malformed (all-zero ids, bad hex, version ff).
    pub fn parse(value: &[u8]) -> Option<Self> {
        let value = value.trim_ascii();
        // Future versions may append fields after the flags; the first 55 bytes keep the layout.
        if value.len() < 55 || (value.len() > 55 && value[55] != b'-') {
            return None;
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let version = hex_byte(&value[0..2])?;
        if version == 0xff || (version == 0 && value.len() != 55) {
            return None;
        }
        let mut trace = [0u8; 16];
        for (i, b) in trace.iter_mut().enumerate() {
            *b = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
        }
        let mut parent = [0u8; 8];
        for (i, b) in parent.iter_mut().enumerate() {
            *b = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&value[53..55])?;
        if trace == [0; 16] || parent == [0; 8] {
            return None;
        }
        Some(Self { trace_id: TraceId(trace), parent_id: SpanId(parent), sampled: flags & 1 == 1 })
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None, // W3C requires lowercase hex.
    };
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

/// Identity of one span and where it hangs in its trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    pub sampled: bool,
}

/// The ids the kernel wrote into an outgoing request (`propagation.inject_http`): the request's
/// CLIENT span must carry them, since the callee continues from them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injected {
    /// Where the request starts in the connection's stream of sent bytes.
    pub offset: u64,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The server span the calling thread was serving, when the kernel found it current.
    pub parent_id: Option<SpanId>,
    pub sampled: bool,
}

/// A same-host join that has not resolved yet (see `join.rs`).
pub type PendingId = u64;

/// Which trace a span in progress belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceRef {
    Known {
        trace_id: TraceId,
        sampled: bool,
    },
    /// The trace of a server request whose same-host client has not been seen yet.
    Pending(PendingId),
}

/// A span in progress: its id, its parent, and its trace, known or pending a same-host join.
/// It becomes a [`SpanContext`] when the trace is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lineage {
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    pub trace: TraceRef,
}

impl Lineage {
    /// A child span of this one, in the same trace.
    pub fn child(&self) -> Lineage {
        Lineage { span_id: SpanId::random(), parent_id: Some(self.span_id), trace: self.trace }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_w3c_example() {
        let tp = TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(tp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id.to_string(), "00f067aa0ba902b7");
        assert!(tp.sampled);
        let unsampled = TraceParent::parse(b" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00 ").unwrap();
        assert!(!unsampled.sampled);
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"",
            b"garbage",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert!(TraceParent::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future").is_some());
    }
}
