//! Test helpers: replaying recorded conversations (fixtures/*.conv) through a session.
//!
//! A `.conv` file is a sequence of records: one byte `C` (client to server) or `S` (server to
//! client), a big-endian u32 length, and the bytes one recv() returned on a recording proxy.

use super::{Segment, Session, SessionEvent, Side};

pub fn load(bytes: &[u8]) -> Vec<(Side, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 5 <= bytes.len() {
        let side = if bytes[i] == b'C' { Side::Request } else { Side::Response };
        let n = u32::from_be_bytes([bytes[i + 1], bytes[i + 2], bytes[i + 3], bytes[i + 4]]) as usize;
        out.push((side, bytes[i + 5..i + 5 + n].to_vec()));
        i += 5 + n;
    }
    out
}

/// Feeds `parts` (one syscall each, timestamps 1, 2, ...) and closes.
pub fn replay(session: &mut dyn Session, parts: &[(Side, Vec<u8>)]) -> Vec<SessionEvent> {
    let mut out = Vec::new();
    for (i, (side, bytes)) in parts.iter().enumerate() {
        session.feed(
            &Segment { side: *side, bytes, byte_count: bytes.len() as u64, ts_ns: 1 + i as u64, tid: 1 },
            &mut out,
        );
    }
    out
}

/// Every way of cutting one part in two: the results must not depend on syscall boundaries.
pub fn splits(parts: &[(Side, Vec<u8>)]) -> impl Iterator<Item = (usize, usize, Vec<(Side, Vec<u8>)>)> + '_ {
    parts.iter().enumerate().flat_map(move |(idx, (_, bytes))| {
        (0..=bytes.len()).map(move |cut| {
            let mut v = Vec::with_capacity(parts.len() + 1);
            for (j, (side, b)) in parts.iter().enumerate() {
                if j == idx {
                    v.push((*side, b[..cut].to_vec()));
                    v.push((*side, b[cut..].to_vec()));
                } else {
                    v.push((*side, b.clone()));
                }
            }
            (idx, cut, v)
        })
    })
}

pub fn completed(events: &[SessionEvent]) -> Vec<super::ExchangeDetail> {
    events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Completed(x) => Some(x.detail.clone()),
            _ => None,
        })
        .collect()
}

pub fn errors(events: &[SessionEvent]) -> usize {
    events.iter().filter(|e| matches!(e, SessionEvent::ParseError { .. })).count()
}
