//! Entry points shared by the fuzz targets (`fuzz/`, run by `cargo xtask fuzz`) and by the test
//! that replays their seed corpus and every crash ever found (`fuzz/seeds`, `fuzz/regressions`).
//!
//! Input is a recorded conversation in the `.conv` layout the protocol fixtures use: records of
//! one tag byte, a big-endian u32 length and that many bytes (a length past the end takes what is
//! left), so a real capture is a valid seed and any byte string decodes to something.

use std::{net::SocketAddr, sync::Arc};

use crate::{
    conn::table::{DataIn, Direction, Role},
    metrics::MetricsStore,
    pipeline::{Pipeline, Sinks},
    protocol::{Protocol, Segment, Session, SessionEvent, Side, http, http2, postgres, redis},
    stats::Stats,
    trace::{
        resource::{ProcessIdentity, Resource},
        sampler::Sampler,
    },
};

/// One record: its tag byte and its bytes.
pub fn records(input: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = input;
    std::iter::from_fn(move || {
        let (&tag, after) = rest.split_first()?;
        let (len, after) = match after.split_first_chunk::<4>() {
            Some((len, after)) => (u32::from_be_bytes(*len) as usize, after),
            None => (after.len(), after),
        };
        let (bytes, after) = after.split_at(len.min(after.len()));
        rest = after;
        Some((tag, bytes))
    })
}

/// Feeds the records to one protocol's session (`C`/even tags: client to server), then closes.
/// Bit 3 of the tag marks the record as a truncated capture: more bytes moved than were copied.
pub fn session(protocol: Protocol, input: &[u8]) -> Vec<SessionEvent> {
    let mut session: Box<dyn Session> = match protocol {
        Protocol::Http => Box::new(http::HttpSession::default()),
        Protocol::Http2 => Box::new(http2::Http2Session::new(input.get(5..).unwrap_or_default())),
        Protocol::Postgres => Box::new(postgres::PostgresSession::new(input.get(5).is_some_and(|b| *b != 0))),
        Protocol::Redis => Box::new(redis::RedisSession::default()),
    };
    let mut out = Vec::new();
    let mut ts = 0;
    for (tag, bytes) in records(input) {
        ts += 1_000;
        let side = if tag == b'C' || (tag != b'S' && tag % 2 == 0) { Side::Request } else { Side::Response };
        let byte_count = bytes.len() as u64 + if tag & 0x08 != 0 && tag != b'C' && tag != b'S' { 4096 } else { 0 };
        session.feed(&Segment { side, bytes, byte_count, ts_ns: ts, tid: 1 }, &mut out);
    }
    session.close(ts + 1_000, &mut out);
    out
}

/// A process id no process has, so nothing is read from /proc for it.
const FUZZ_PID: u32 = u32::MAX - 7;

/// Feeds the records through the whole user-space pipeline: connection table, protocol
/// detection, parsing, pairing, span assembly and metrics. Returns the pipeline's counters.
///
/// `C`/`S` are one server connection's two directions. Other tags pick the connection
/// (bits 1-2: one of four fds), its role (bit 3: client), the direction (bit 0), and bit 4
/// closes the connection instead of moving bytes; bit 5 marks the capture truncated and
/// bit 6 makes the clock step back, as it can between CPUs.
pub fn pipeline(input: &[u8]) -> Arc<Stats> {
    let stats = Arc::new(Stats::default());
    let mut p = Pipeline::new(Sampler::default(), stats.clone(), Sinks::default(), Arc::new(MetricsStore::new(64)));
    let identity = ProcessIdentity {
        pid: FUZZ_PID,
        service_name: "fuzz".into(),
        exe_path: "/fuzz".into(),
        host_name: "fuzz".into(),
        start_ticks: 1,
        platform: Vec::new(),
    };
    p.set_resource(FUZZ_PID, Arc::new(Resource::for_process(&identity, &[])));
    let peer: SocketAddr = ([127, 0, 0, 1], 40000).into();
    let mut open = [false; 4];
    let mut ts: u64 = 1_000_000;
    for (tag, bytes) in records(input) {
        let (fd_index, role, inbound, close, truncated, clock_back) = match tag {
            b'C' => (0, Role::Server, true, false, false, false),
            b'S' => (0, Role::Server, false, false, false, false),
            t => (
                usize::from((t >> 1) & 3),
                if t & 0x08 != 0 { Role::Client } else { Role::Server },
                t & 1 == 0,
                t & 0x10 != 0,
                t & 0x20 != 0,
                t & 0x40 != 0,
            ),
        };
        ts = if clock_back { ts.saturating_sub(5_000) } else { ts + 10_000 };
        let fd = 7 + fd_index as u32;
        if close {
            p.on_close(FUZZ_PID, fd, ts);
            open[fd_index] = false;
            continue;
        }
        if !open[fd_index] {
            p.on_open(FUZZ_PID, fd, role, None, Some(peer), ts);
            open[fd_index] = true;
        }
        // The request side is what the server reads and what the client writes.
        let dir = match (role, inbound) {
            (Role::Client, true) => Direction::Egress,
            (Role::Client, false) => Direction::Ingress,
            (_, true) => Direction::Ingress,
            (_, false) => Direction::Egress,
        };
        let byte_count = bytes.len() as u64 + if truncated { 1 << 20 } else { 0 };
        let data = DataIn { dir, payload: bytes, byte_count, ts_ns: ts, tid: FUZZ_PID, tls: false };
        p.on_data(FUZZ_PID, fd, role, data);
    }
    p.remove_process(FUZZ_PID);
    assert_eq!(p.connection_count(), 0, "a process's connections go with it");
    stats
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Every seed and every input that once crashed a fuzz target, through its target.
    #[test]
    fn fuzz_seeds_and_regressions_replay_without_panics() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut replayed = 0;
        for kind in ["seeds", "regressions"] {
            for (target, run) in [
                ("http", (|b| drop(session(Protocol::Http, b))) as fn(&[u8])),
                ("http2", |b| drop(session(Protocol::Http2, b))),
                ("postgres", |b| drop(session(Protocol::Postgres, b))),
                ("redis", |b| drop(session(Protocol::Redis, b))),
                ("pipeline", |b| drop(pipeline(b))),
            ] {
                let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else { continue };
                for entry in dir.flatten() {
                    let bytes = std::fs::read(entry.path()).expect("read corpus file");
                    run(&bytes);
                    replayed += 1;
                }
            }
        }
        assert!(replayed >= 15, "the committed seed corpus is missing: {replayed} files replayed");
    }

    #[test]
    fn records_decode_any_bytes() {
        let got: Vec<_> = records(b"C\0\0\0\x02hiS\0\0\0\x09ok").collect();
        assert_eq!(got, vec![(b'C', &b"hi"[..]), (b'S', &b"ok"[..])]);
        assert_eq!(records(b"X\0").collect::<Vec<_>>(), vec![(b'X', &b"\0"[..])]);
    }

    #[test]
    fn a_recorded_conversation_becomes_spans_through_the_pipeline() {
        let conv = include_bytes!("protocol/fixtures/redis7_resp2_pipeline.conv");
        let stats = pipeline(conv);
        assert!(Stats::get(&stats.spans_created) > 0, "{}", stats.summary());
    }
}
