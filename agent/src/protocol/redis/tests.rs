//! Redis 7 wire fixtures (redis-cli, redis-py 8 over RESP3, a raw RESP2 pipeline), split sweeps,
//! pub/sub, uncopied bulk payloads, and never-panic properties.

use super::*;
use crate::protocol::testing::{completed, errors, load, replay, splits};

const SUBSCRIBE: &[u8] = include_bytes!("../fixtures/redis7_subscribe.conv");
const PIPELINE: &[u8] = include_bytes!("../fixtures/redis7_resp2_pipeline.conv");
const REDISPY: &[u8] = include_bytes!("../fixtures/redis7_resp3_redispy.conv");

fn redis(events: &[SessionEvent]) -> Vec<RedisExchange> {
    completed(events)
        .into_iter()
        .filter_map(|d| match d {
            ExchangeDetail::Redis(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn ops(events: &[SessionEvent]) -> Vec<String> {
    redis(events).into_iter().map(|r| r.operation.to_string()).collect()
}

fn run(fixture: &[u8]) -> Vec<SessionEvent> {
    replay(&mut RedisSession::default(), &load(fixture))
}

#[test]
fn detection() {
    for f in [SUBSCRIBE, PIPELINE, REDISPY] {
        assert_eq!(classify_start(&load(f)[0].1), Some(true));
    }
    assert_eq!(classify_start(b"*"), None);
    assert_eq!(classify_start(b"*3\r"), None);
    assert_eq!(classify_start(b"*x"), Some(false));
    assert_eq!(classify_start(b"PING\r\n"), Some(true));
    assert_eq!(classify_start(b"PI"), None);
    assert_eq!(classify_start(b"GET / HTTP/1.1\r\n"), Some(false));
    assert_eq!(classify_start(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), Some(false));
}

#[test]
fn resp2_pipeline_with_select_inline_and_auth() {
    let ev = run(PIPELINE);
    let done = redis(&ev);
    assert_eq!(ops(&ev), vec!["SELECT", "SET", "PING", "GET", "AUTH"]);
    assert_eq!(done[0].db, 2, "SELECT 2 applies to itself");
    assert!(done.iter().all(|d| d.db == 2));
    assert_eq!(done[1].args, 2);
    assert_eq!(done[2].args, 0, "inline PING");
    assert_eq!(done[4].error.as_deref(), Some("ERR"));
    assert!(!format!("{done:?}").contains("hunter22"), "AUTH arguments are never kept");
    assert_eq!(errors(&ev), 0);
}

#[test]
fn resp3_maps_sets_nulls_multi_exec_and_wrongtype() {
    let ev = run(REDISPY);
    let done = redis(&ev);
    assert_eq!(
        ops(&ev),
        vec![
            "HELLO",
            "CLIENT MAINT_NOTIFICATIONS",
            "CLIENT SETINFO",
            "CLIENT SETINFO",
            "SET",
            "MULTI",
            "INCRBY",
            "LPUSH",
            "EXEC",
            "LPUSH",
            "HGETALL",
            "SMEMBERS",
            "GET",
        ]
    );
    let errs: Vec<Option<&str>> = done.iter().map(|d| d.error.as_deref()).collect();
    assert_eq!(errs[1], Some("ERR"));
    assert_eq!(errs[9], Some("WRONGTYPE"));
    assert_eq!(errs.iter().filter(|e| e.is_some()).count(), 4);
    assert_eq!(errors(&ev), 0);
}

#[test]
fn subscribe_pairs_once_and_pushes_are_not_replies() {
    let ev = run(SUBSCRIBE);
    assert_eq!(ops(&ev), vec!["SUBSCRIBE"]);
    assert!(!ev.iter().any(|e| matches!(e, SessionEvent::UnmatchedResponse)), "{ev:?}");
    // In subscribed mode a PING still pairs.
    let mut s = RedisSession::default();
    let mut parts = load(SUBSCRIBE);
    parts.push((Side::Request, b"*1\r\n$4\r\nPING\r\n".to_vec()));
    parts.push((Side::Response, b"*2\r\n$4\r\npong\r\n$0\r\n\r\n".to_vec()));
    parts.push((Side::Response, b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$1\r\nx\r\n".to_vec()));
    let ev = replay(&mut s, &parts);
    assert_eq!(ops(&ev), vec!["SUBSCRIBE", "PING"]);
    assert!(!ev.iter().any(|e| matches!(e, SessionEvent::UnmatchedResponse)));
}

#[test]
fn attributes_nested_aggregates_and_big_numbers() {
    let reply = b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n*2\r\n*2\r\n(3492890328409238509324850943850943825024385\r\n=15\r\ntxt:Some string\r\n#t\r\n".to_vec();
    let parts = vec![(Side::Request, b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n".to_vec()), (Side::Response, reply)];
    let ev = replay(&mut RedisSession::default(), &parts);
    assert_eq!(ops(&ev), vec!["GET"]);
    assert_eq!(errors(&ev), 0);
}

#[test]
fn every_split_offset_gives_the_same_commands() {
    for fixture in [SUBSCRIBE, PIPELINE, REDISPY] {
        let parts = load(fixture);
        let expected = redis(&replay(&mut RedisSession::default(), &parts));
        for (idx, cut, variant) in splits(&parts) {
            let ev = replay(&mut RedisSession::default(), &variant);
            assert_eq!(redis(&ev), expected, "part {idx} cut at {cut}");
            assert_eq!(errors(&ev), 0, "part {idx} cut at {cut}");
        }
    }
}

#[test]
fn uncopied_bulk_values_keep_framing() {
    let mut s = RedisSession::default();
    let mut out = Vec::new();
    let n = 1_000_000u64;
    let head = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${n}\r\n");
    let mut first = head.clone().into_bytes();
    first.extend_from_slice(&[b'v'; 100]);
    let first_count = 4096u64;
    s.feed(&Segment { side: Side::Request, bytes: &first, byte_count: first_count, ts_ns: 1, tid: 1 }, &mut out);
    let rest = head.len() as u64 + n + 2 - first_count;
    s.feed(&Segment { side: Side::Request, bytes: b"", byte_count: rest, ts_ns: 2, tid: 1 }, &mut out);
    let ping = b"*1\r\n$4\r\nPING\r\n";
    s.feed(&Segment { side: Side::Request, bytes: ping, byte_count: ping.len() as u64, ts_ns: 3, tid: 1 }, &mut out);
    let replies = b"+OK\r\n+PONG\r\n";
    s.feed(
        &Segment { side: Side::Response, bytes: replies, byte_count: replies.len() as u64, ts_ns: 4, tid: 1 },
        &mut out,
    );
    assert_eq!(ops(&out), vec!["SET", "PING"]);
    assert_eq!(errors(&out), 0);
}

#[test]
fn a_large_reply_beyond_the_capture_completes_at_the_next_command() {
    let mut s = RedisSession::default();
    let mut out = Vec::new();
    let cmd = b"*2\r\n$7\r\nCOMMAND\r\n$4\r\nDOCS\r\n";
    s.feed(&Segment { side: Side::Request, bytes: cmd, byte_count: cmd.len() as u64, ts_ns: 1, tid: 1 }, &mut out);
    // A nested reply read in 16 KiB chunks of which 4 KiB were copied: framing is lost.
    let reply = b"%200\r\n$3\r\nget\r\n%7\r\n$7\r\nsummary\r\n$20\r\nGet the value of a k";
    s.feed(&Segment { side: Side::Response, bytes: reply, byte_count: 16384, ts_ns: 2, tid: 1 }, &mut out);
    s.feed(
        &Segment { side: Side::Response, bytes: b"ey\r\n$5\r\nsince", byte_count: 16384, ts_ns: 3, tid: 1 },
        &mut out,
    );
    assert_eq!(errors(&out), 1, "the loss is counted");
    let ping = b"*1\r\n$4\r\nPING\r\n";
    s.feed(&Segment { side: Side::Request, bytes: ping, byte_count: ping.len() as u64, ts_ns: 4, tid: 1 }, &mut out);
    s.feed(&Segment { side: Side::Response, bytes: b"+PONG\r\n", byte_count: 7, ts_ns: 5, tid: 1 }, &mut out);
    assert_eq!(ops(&out), vec!["COMMAND DOCS", "PING"]);
    let SessionEvent::Completed(docs) = out.iter().find(|e| matches!(e, SessionEvent::Completed(_))).unwrap() else {
        panic!()
    };
    assert_eq!(docs.end_ns, 3, "ends at the last reply bytes seen");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    #[test]
    fn random_input_never_panics(chunks in proptest::collection::vec(
        (proptest::bool::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..200), 0u64..3000), 0..20)) {
        let mut s = RedisSession::default();
        let mut out = Vec::new();
        for (req, bytes, extra) in &chunks {
            let side = if *req { Side::Request } else { Side::Response };
            s.feed(&Segment { side, bytes, byte_count: bytes.len() as u64 + extra, ts_ns: 1, tid: 1 }, &mut out);
        }
        s.close(2, &mut out);
    }

    #[test]
    fn resp_shaped_input_never_panics(s in "([*$%~>|+:,#(=!_-][0-9]{0,3}\r\n|[a-z]{0,5}\r\n){0,30}") {
        let parts = vec![(Side::Request, s.clone().into_bytes()), (Side::Response, s.into_bytes())];
        let _ = replay(&mut RedisSession::default(), &parts);
    }
}

#[test]
fn a_command_cut_off_by_close_is_counted_and_a_clean_close_is_not() {
    use crate::protocol::{Segment, Session, Side};
    let mut s = RedisSession::default();
    let mut out = Vec::new();
    let bytes = b"*3\r\n$3\r\nSET\r\n$4\r\nha";
    s.feed(&Segment { side: Side::Request, bytes, byte_count: bytes.len() as u64, ts_ns: 1, tid: 1 }, &mut out);
    s.close(2, &mut out);
    assert_eq!(errors(&out), 1, "{out:?}");
    let mut s = RedisSession::default();
    let mut out = replay(&mut s, &load(PIPELINE));
    s.close(1_000, &mut out);
    assert_eq!(errors(&out), 0, "{out:?}");
}

#[test]
fn a_command_written_one_byte_per_syscall_is_one_span() {
    use crate::protocol::{Segment, Session, Side};
    let mut s = RedisSession::default();
    let mut out = Vec::new();
    let cmd = b"*3\r\n$3\r\nSET\r\n$4\r\nslow\r\n$5\r\nbytes\r\n";
    for (i, b) in cmd.iter().enumerate() {
        let bytes = std::slice::from_ref(b);
        s.feed(&Segment { side: Side::Request, bytes, byte_count: 1, ts_ns: i as u64, tid: 1 }, &mut out);
    }
    s.feed(&Segment { side: Side::Response, bytes: b"+OK\r\n", byte_count: 5, ts_ns: 100, tid: 1 }, &mut out);
    assert_eq!(ops(&out), vec!["SET"], "{out:?}");
    assert_eq!(errors(&out), 0);
}

#[test]
fn a_one_mebibyte_value_read_in_partly_captured_chunks_is_one_span() {
    use crate::protocol::{Segment, Session, Side};
    let value = vec![b'v'; 1 << 20];
    let mut cmd = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${}\r\n", value.len()).into_bytes();
    cmd.extend_from_slice(&value);
    cmd.extend_from_slice(b"\r\n");
    let mut s = RedisSession::default();
    let mut out = Vec::new();
    for (i, chunk) in cmd.chunks(16 * 1024).enumerate() {
        let bytes = &chunk[..chunk.len().min(4096)];
        let seg = Segment { side: Side::Request, bytes, byte_count: chunk.len() as u64, ts_ns: i as u64, tid: 1 };
        s.feed(&seg, &mut out);
    }
    s.feed(&Segment { side: Side::Response, bytes: b"+OK\r\n", byte_count: 5, ts_ns: 1_000, tid: 1 }, &mut out);
    assert_eq!(ops(&out), vec!["SET"], "{out:?}");
    assert_eq!(errors(&out), 0);
}

#[test]
fn empty_inline_lines_are_not_commands() {
    use crate::protocol::{Segment, Session, Side};
    let mut s = RedisSession::default();
    let mut out = Vec::new();
    for (i, (side, bytes)) in
        [(Side::Request, &b"PING\r\n"[..]), (Side::Request, b"\r\n"), (Side::Response, b"+PONG\r\n")]
            .into_iter()
            .enumerate()
    {
        s.feed(&Segment { side, bytes, byte_count: bytes.len() as u64, ts_ns: i as u64, tid: 1 }, &mut out);
    }
    s.close(10, &mut out);
    assert_eq!(ops(&out), vec!["PING"], "{out:?}");
    assert!(!out.iter().any(|e| matches!(e, SessionEvent::UnmatchedRequest)), "{out:?}");
}

#[test]
fn pipelined_pings_beyond_the_capture_never_make_nameless_spans() {
    use crate::protocol::{Segment, Session, Side};
    let requests = b"*1\r\n$4\r\nPING\r\n".repeat(10_000);
    let replies = b"+PONG\r\n".repeat(10_000);
    let mut s = RedisSession::default();
    let mut out = Vec::new();
    let mut ts = 0;
    let (mut req_chunks, mut rep_chunks) = (requests.chunks(16 * 1024), replies.chunks(16 * 1024));
    loop {
        let mut fed = false;
        for (side, chunk) in [(Side::Request, req_chunks.next()), (Side::Response, rep_chunks.next())] {
            let Some(chunk) = chunk else { continue };
            fed = true;
            ts += 1;
            let bytes = &chunk[..chunk.len().min(4096)];
            s.feed(&Segment { side, bytes, byte_count: chunk.len() as u64, ts_ns: ts, tid: 1 }, &mut out);
        }
        if !fed {
            break;
        }
    }
    let names = ops(&out);
    assert!(names.iter().all(|n| n == "PING"), "{:?}", names.iter().filter(|n| *n != "PING").collect::<Vec<_>>());
    // Commands whose name was not captured are counted, not silently dropped.
    assert!(errors(&out) > 0);
}
