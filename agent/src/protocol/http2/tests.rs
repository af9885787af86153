//! Recorded conversations (fuzz/record.py): grpcio client and server (unary, errors, server,
//! client and bidirectional streaming, an unknown method), and Node's http2 client to nginx's
//! cleartext HTTP/2 (10 concurrent streams, GET/POST, 404s). Each is replayed whole, split at
//! every offset, truncated, and started mid-stream; the last two may lose fields, never change one.

use std::collections::BTreeMap;

use super::*;
use crate::protocol::testing::{errors, load, replay, splits};

const GRPC: &[u8] = include_bytes!("../fixtures/h2_grpcio_mixed.conv");
const NODE_NGINX: &[u8] = include_bytes!("../fixtures/h2c_node_to_nginx.conv");
const CURL_NGINX: &[u8] = include_bytes!("../fixtures/h2c_curl_to_nginx.conv");

fn session_for(parts: &[(Side, Vec<u8>)]) -> Http2Session {
    Http2Session::new(parts.first().map(|(_, b)| b.as_slice()).unwrap_or_default())
}

/// Completed exchanges by stream id.
fn by_stream(events: &[SessionEvent]) -> BTreeMap<u64, ExchangeDetail> {
    events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Completed(x) => Some((x.seq, x.detail.clone())),
            _ => None,
        })
        .collect()
}

fn run(parts: &[(Side, Vec<u8>)]) -> Vec<SessionEvent> {
    run_from(session_for(parts), parts)
}

/// Replays `parts` through `s` and closes it.
fn run_from(mut s: Http2Session, parts: &[(Side, Vec<u8>)]) -> Vec<SessionEvent> {
    let mut out = replay(&mut s, parts);
    s.close(u64::MAX, &mut out);
    out
}

fn grpc_calls(events: &[SessionEvent]) -> BTreeMap<(String, String), usize> {
    let mut calls = BTreeMap::new();
    for d in by_stream(events).values() {
        let ExchangeDetail::Grpc(g) = d else { panic!("not gRPC: {d:?}") };
        let status = g.status.map_or("none".into(), |c| grpc::status_name(c).to_string());
        *calls.entry((g.path.to_string(), status)).or_insert(0) += 1;
    }
    calls
}

#[test]
fn grpcio_calls_pair_by_stream_with_their_status() {
    let events = run(&load(GRPC));
    assert_eq!(errors(&events), 0, "{events:#?}");
    assert!(!events.iter().any(|e| matches!(
        e,
        SessionEvent::UnmatchedRequest | SessionEvent::UnmatchedResponse | SessionEvent::Undecodable { .. }
    )));
    let expected: BTreeMap<(String, String), usize> = [
        ("/demo.Greeter/SayHello", "OK", 3),
        ("/demo.Greeter/SayHello", "INVALID_ARGUMENT", 1),
        ("/demo.Greeter/SayHello", "NOT_FOUND", 1),
        ("/demo.Greeter/SayHello", "INTERNAL", 1),
        ("/demo.Greeter/SayHello", "UNAVAILABLE", 1),
        ("/demo.Greeter/SayHello", "PERMISSION_DENIED", 1),
        ("/demo.Greeter/Countdown", "OK", 3),
        ("/demo.Greeter/Collect", "OK", 2),
        ("/demo.Greeter/Chat", "OK", 2),
        ("/demo.Greeter/Missing", "UNIMPLEMENTED", 1),
    ]
    .into_iter()
    .map(|(p, s, n)| ((p.to_owned(), s.to_owned()), n))
    .collect();
    assert_eq!(grpc_calls(&events), expected);
    // Stream ids are the client's odd ids in order, and every call started before it ended.
    let started: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::RequestStarted(r) => Some(r.seq),
            _ => None,
        })
        .collect();
    assert_eq!(started, (0..16).map(|i| 1 + 2 * i).collect::<Vec<u64>>());
    for d in by_stream(&events).values() {
        let ExchangeDetail::Grpc(g) = d else { unreachable!() };
        assert_eq!(g.authority.as_deref(), Some("127.0.0.1:50072"));
        assert!(g.user_agent.as_deref().is_some_and(|ua| ua.starts_with("grpc-python/")), "{g:?}");
        if g.path.ends_with("/Countdown") {
            // Five replies of one byte each, with their 5-byte gRPC prefix.
            assert_eq!(g.response_bytes, 5 * 6);
        }
    }
}

/// Messages each way by method: unary 1 and 1 (`n0` -> `hello n0`), errors answer none,
/// Countdown `5` -> 5 replies, Collect 4 -> `4`, Chat 3 -> 3 echoes, the unknown method none.
#[test]
fn grpc_messages_are_counted_each_way() {
    let events = run(&load(GRPC));
    let mut got: BTreeMap<String, Vec<(u32, u64, u32, u64)>> = BTreeMap::new();
    for d in by_stream(&events).values() {
        let ExchangeDetail::Grpc(g) = d else { panic!("{d:?}") };
        let (Some(req), Some(resp)) = (g.request_messages, g.response_messages) else { panic!("exact here: {g:?}") };
        let status = g.status.map_or("none".into(), |c| grpc::status_name(c).to_string());
        got.entry(format!("{} {status}", g.path)).or_default().push((req.count, req.bytes, resp.count, resp.bytes));
    }
    let fail = |code: &str| (1, 5 + code.len() as u64, 0, 0);
    let want: BTreeMap<String, Vec<(u32, u64, u32, u64)>> = [
        ("/demo.Greeter/SayHello OK", vec![(1, 2, 1, 8); 3]),
        ("/demo.Greeter/SayHello INVALID_ARGUMENT", vec![fail("INVALID_ARGUMENT")]),
        ("/demo.Greeter/SayHello NOT_FOUND", vec![fail("NOT_FOUND")]),
        ("/demo.Greeter/SayHello INTERNAL", vec![fail("INTERNAL")]),
        ("/demo.Greeter/SayHello UNAVAILABLE", vec![fail("UNAVAILABLE")]),
        ("/demo.Greeter/SayHello PERMISSION_DENIED", vec![fail("PERMISSION_DENIED")]),
        ("/demo.Greeter/Countdown OK", vec![(1, 1, 5, 5); 3]),
        ("/demo.Greeter/Collect OK", vec![(4, 4, 1, 1); 2]),
        ("/demo.Greeter/Chat OK", vec![(3, 3, 3, 3); 2]),
        ("/demo.Greeter/Missing UNIMPLEMENTED", vec![(1, 1, 0, 0)]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn message_counter_skips_bodies_and_loses_only_prefixes() {
    use grpc::{MessageCounter, MessageTally};
    let mut m = MessageCounter::default();
    m.feed(&[0, 0, 0, 0, 3, b'a']);
    m.skip(Some(2)); // the rest of the body, not captured: still exact
    m.feed(&[1, 0, 0]);
    m.feed(&[0, 0]); // an empty (compressed-flag) message, prefix split across pieces
    assert_eq!(m.tally(), Some(MessageTally { count: 2, bytes: 3 }));
    m.feed(&[0, 0, 0, 0, 9]);
    assert_eq!(m.tally(), None, "a message still open is not a tally");
    m.skip(Some(10)); // beyond its body: a prefix was among the unseen bytes
    m.feed(&[0, 0, 0, 0, 0]);
    assert_eq!(m.tally(), None);
    let mut unknown = MessageCounter::default();
    unknown.skip(None);
    assert_eq!(unknown.tally(), None);
}

#[test]
fn node_streams_to_nginx_are_http_exchanges_with_version_2() {
    let events = run(&load(NODE_NGINX));
    assert_eq!(errors(&events), 0);
    let exchanges = by_stream(&events);
    assert_eq!(exchanges.len(), 10);
    for (i, (id, d)) in exchanges.iter().enumerate() {
        let ExchangeDetail::Http(h) = d else { panic!("{d:?}") };
        assert_eq!(*id, 1 + 2 * i as u64);
        assert_eq!(h.version, HttpVersion::Http2);
        let (method, path, status) = if i % 5 == 4 {
            (if i % 3 == 2 { "POST" } else { "GET" }, "/missing".to_owned(), 404)
        } else {
            (if i % 3 == 2 { "POST" } else { "GET" }, format!("/r/{i}?q={i}"), 200)
        };
        assert_eq!((h.method.as_str(), h.target.as_str(), h.status), (method, path.as_str(), status), "stream {id}");
        assert_eq!(h.host.as_deref(), Some("127.0.0.1:50082"));
        if method == "POST" {
            assert_eq!(h.request_body_bytes, Some(format!("body-{i}").len() as u64));
        }
        assert_eq!(h.reset, None);
    }
    let curl = by_stream(&run(&load(CURL_NGINX)));
    assert_eq!(curl.len(), 1);
    let Some(ExchangeDetail::Http(h)) = curl.get(&1) else { panic!("{curl:?}") };
    assert_eq!((h.method.as_str(), h.target.as_str(), h.status, h.response_body_bytes), ("GET", "/a", 200, Some(6)));
    assert_eq!(h.user_agent.as_deref(), Some("curl-test"));
}

/// Syscall boundaries do not matter.
#[test]
fn every_split_gives_the_same_exchanges() {
    for fixture in [GRPC, NODE_NGINX] {
        let parts = load(fixture);
        let whole = format!("{:?}", by_stream(&run(&parts)));
        for (idx, cut, v) in splits(&parts) {
            // Detection glues the first pieces before it starts the session.
            let events = run_from(session_for(&parts), &v);
            assert_eq!(format!("{:?}", by_stream(&events)), whole, "split part {idx} at {cut}");
            assert_eq!(errors(&events), 0, "split part {idx} at {cut}");
        }
    }
}

/// What a partial view reports agrees with the whole view wherever it says anything.
fn assert_consistent(partial: &BTreeMap<u64, ExchangeDetail>, whole: &BTreeMap<u64, ExchangeDetail>, what: &str) {
    for (id, got) in partial {
        let Some(want) = whole.get(id) else { panic!("{what}: stream {id} does not exist: {got:?}") };
        match (got, want) {
            (ExchangeDetail::Grpc(g), ExchangeDetail::Grpc(w)) => {
                assert!(g.path.is_empty() || g.path == w.path, "{what}: {g:?} vs {w:?}");
                assert!(g.authority.is_none() || g.authority == w.authority, "{what}: {g:?} vs {w:?}");
                assert!(g.status.is_none() || g.status == w.status, "{what}: {g:?} vs {w:?}");
                assert!(g.request_messages.is_none() || g.request_messages == w.request_messages, "{what}: {g:?}");
                assert!(g.response_messages.is_none() || g.response_messages == w.response_messages, "{what}: {g:?}");
            }
            (ExchangeDetail::Http(g), ExchangeDetail::Http(w)) => {
                assert!(g.method.is_empty() || g.method == w.method, "{what}: {g:?} vs {w:?}");
                assert!(g.target.is_empty() || g.target == w.target, "{what}: {g:?} vs {w:?}");
                assert!(g.status == 0 || g.status == w.status, "{what}: {g:?} vs {w:?}");
                assert!(g.host.is_none() || g.host == w.host, "{what}: {g:?} vs {w:?}");
                assert!(
                    g.request_body_bytes.is_none() || g.request_body_bytes == w.request_body_bytes,
                    "{what}: {g:?}"
                );
                assert!(
                    g.response_body_bytes.is_none() || g.response_body_bytes == w.response_body_bytes,
                    "{what}: {g:?}"
                );
            }
            // A gRPC call whose content-type was not decodable is reported as plain HTTP; what
            // it reports must still be right.
            (ExchangeDetail::Http(g), ExchangeDetail::Grpc(w)) => {
                assert!(g.target.is_empty() || g.target == w.path, "{what}: {g:?} vs {w:?}");
                assert!(g.method.is_empty() || g.method == "POST", "{what}: {g:?}");
            }
            _ => panic!("{what}: {got:?} vs {want:?}"),
        }
    }
}

/// A connection seen from any later piece on: no wrong field, and what could not be decoded
/// is counted (grpcio's requests lean on the dynamic table; nginx's responses do not).
#[test]
fn mid_stream_views_never_report_a_wrong_field() {
    for (fixture, indexes) in [(GRPC, true), (NODE_NGINX, false)] {
        let parts = load(fixture);
        let whole = by_stream(&run(&parts));
        let mut undecodable_seen = false;
        for start in 1..parts.len() {
            let rest = &parts[start..];
            if classify_start(rest[0].0, &rest[0].1) != Some(true) {
                continue;
            }
            let events = run(rest);
            assert_consistent(&by_stream(&events), &whole, &format!("from part {start}"));
            undecodable_seen |= events.iter().any(|e| matches!(e, SessionEvent::Undecodable { .. }));
        }
        assert_eq!(undecodable_seen, indexes, "some mid-stream view must have met unseen table entries");
    }
}

/// Captures cut at every size from 1 byte on: framing survives by the frame lengths, header
/// blocks that were cut lose their table, and nothing reported is wrong.
#[test]
fn truncated_captures_never_report_a_wrong_field() {
    for fixture in [GRPC, NODE_NGINX] {
        let parts = load(fixture);
        let whole = by_stream(&run(&parts));
        for limit in [1usize, 9, 10, 20, 40, 64, 100, 200, 400] {
            let mut s = session_for(&parts);
            let mut out = Vec::new();
            for (i, (side, bytes)) in parts.iter().enumerate() {
                let kept = &bytes[..bytes.len().min(limit)];
                s.feed(
                    &Segment { side: *side, bytes: kept, byte_count: bytes.len() as u64, ts_ns: 1 + i as u64, tid: 1 },
                    &mut out,
                );
            }
            assert_consistent(&by_stream(&out), &whole, &format!("capture limit {limit}"));
        }
    }
}

/// Any prefix, and any single byte changed: no panic, and bounded output.
#[test]
fn cut_and_mutated_input_is_handled() {
    let parts = load(GRPC);
    let flat: Vec<(Side, u8)> = parts.iter().flat_map(|(s, b)| b.iter().map(move |x| (*s, *x))).collect();
    for cut in (0..flat.len()).step_by(7) {
        let mut s = session_for(&parts);
        let mut out = Vec::new();
        for (i, (side, b)) in flat[..cut].iter().enumerate() {
            s.feed(&Segment { side: *side, bytes: &[*b], byte_count: 1, ts_ns: i as u64, tid: 1 }, &mut out);
        }
        s.close(u64::MAX, &mut out);
    }
    for at in (0..flat.len()).step_by(3) {
        let mut mutated = parts.clone();
        let (mut part, mut offset) = (0, at);
        while offset >= mutated[part].1.len() {
            offset -= mutated[part].1.len();
            part += 1;
        }
        mutated[part].1[offset] ^= 0x5a;
        let events = run(&mutated);
        assert!(by_stream(&events).len() <= 16);
    }
}

#[test]
fn detection() {
    assert_eq!(classify_start(Side::Request, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(true));
    assert_eq!(classify_start(Side::Request, b"PRI * HTTP/2"), None);
    assert_eq!(classify_start(Side::Request, b"GET / HTTP/1.1\r\n\r\n"), Some(false));
    // A SETTINGS frame alone (a server's first bytes), and a PING.
    assert_eq!(classify_start(Side::Response, &[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]), Some(true));
    assert_eq!(classify_start(Side::Request, &[0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]), Some(true));
    // Redis, PostgreSQL and TLS bytes are not frames.
    for other in
        [&b"*1\r\n$4\r\nPING\r\n"[..], b"\0\0\0\x08\x04\xd2\x16\x2f", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]
    {
        assert_eq!(classify_start(Side::Request, other), Some(false), "{other:?}");
    }
}

/// A server that speaks first (its SETTINGS before the client's preface arrives, as grpcio,
/// nginx and Node do) is detected on those frames; the preface that follows still tells a new
/// connection, so its header tables are known from the start.
#[test]
fn detected_on_the_servers_first_frames_the_preface_still_counts() {
    let parts = load(GRPC);
    let server_first: Vec<(Side, Vec<u8>)> = std::iter::once(parts[1].clone())
        .chain(std::iter::once(parts[0].clone()))
        .chain(parts[2..].iter().cloned())
        .collect();
    assert_eq!(server_first[0].0, Side::Response);
    let events = run(&server_first);
    assert_eq!(errors(&events), 0);
    assert!(!events.iter().any(|e| matches!(e, SessionEvent::Undecodable { .. })), "{events:#?}");
    assert_eq!(grpc_calls(&events), grpc_calls(&run(&parts)));
}

/// curl `--http2` on `http://` to tests/fixtures/h2c_upgrade.py: `GET /a` upgrades the
/// connection (answered 200 on stream 1), then `GET /missing` goes as stream 3 (404).
const CURL_UPGRADE: &[u8] = include_bytes!("../fixtures/h2c_upgrade_curl_to_h2.conv");

/// The upgrade as the connection layer sees it: detected as HTTP/1.1, switched by the 101.
fn run_upgrade(parts: &[(Side, Vec<u8>)]) -> (Vec<SessionEvent>, Protocol) {
    let mut s = crate::protocol::http::HttpSession::default();
    let mut out = replay(&mut s, parts);
    let protocol = s.protocol();
    s.close(u64::MAX, &mut out);
    (out, protocol)
}

fn upgrade_summary(events: &[SessionEvent]) -> Vec<(u64, String, String, u16, &'static str)> {
    by_stream(events)
        .into_iter()
        .map(|(seq, d)| {
            let ExchangeDetail::Http(h) = d else { panic!("not HTTP: {d:?}") };
            (seq, h.method.to_string(), h.target.to_string(), h.status, h.version.as_str())
        })
        .collect()
}

#[test]
fn h2c_upgrade_continues_as_stream_one() {
    let parts = load(CURL_UPGRADE);
    let (events, protocol) = run_upgrade(&parts);
    assert_eq!(protocol, Protocol::Http2);
    assert_eq!(errors(&events), 0, "{events:#?}");
    assert!(!events.iter().any(|e| matches!(e, SessionEvent::UnmatchedRequest | SessionEvent::UnmatchedResponse)));
    // The upgrading request keeps the number its start carried (0); stream 3 comes after it.
    let starts: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::RequestStarted(r) => Some(r.seq),
            _ => None,
        })
        .collect();
    assert_eq!(starts, [0, 4]);
    assert_eq!(
        upgrade_summary(&events),
        [(0, "GET".into(), "/a".into(), 200, "2"), (4, "GET".into(), "/missing".into(), 404, "2")]
    );
    let ExchangeDetail::Http(first) = &by_stream(&events)[&0] else { unreachable!() };
    assert_eq!(first.host.as_deref(), Some("127.0.0.1:18556"));
    assert_eq!(first.user_agent.as_deref(), Some("curl/7.88.1"));
    assert_eq!(first.response_body_bytes, Some(15));
}

#[test]
fn h2c_upgrade_survives_every_split_and_a_101_sharing_its_write() {
    let parts = load(CURL_UPGRADE);
    let whole = upgrade_summary(&run_upgrade(&parts).0);
    for (idx, cut, split) in splits(&parts) {
        let (events, _) = run_upgrade(&split);
        assert_eq!(upgrade_summary(&events), whole, "part {idx} cut at {cut}");
        assert_eq!(errors(&events), 0, "part {idx} cut at {cut}");
    }
    // The server's first frames in the same write as its 101 (servers often do this).
    let mut merged = parts.clone();
    let frames = merged.remove(3);
    assert_eq!(frames.0, Side::Response);
    merged[1].1.extend_from_slice(&frames.1);
    assert_eq!(upgrade_summary(&run_upgrade(&merged).0), whole);
    // As the Python server's syscalls went (strace): it answered stream 1 before reading the
    // client's preface, whose arrival must not reset the table that answer filled.
    let mut answered_first = vec![parts[0].clone(), parts[1].clone(), parts[3].clone(), parts[2].clone()];
    answered_first[3].1.extend_from_slice(&parts[4].1);
    answered_first.extend_from_slice(&parts[5..]);
    let events = run_upgrade(&answered_first).0;
    assert_eq!(errors(&events), 0, "{events:#?}");
    assert_eq!(upgrade_summary(&events), whole);
}

#[test]
fn a_refused_or_other_upgrade_stays_http1() {
    // A 200 to an `Upgrade: h2c` request: the server declined, the connection stays HTTP/1.1.
    let req = b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n";
    let parts = vec![
        (Side::Request, req.to_vec()),
        (Side::Response, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()),
        (Side::Request, b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        (Side::Response, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()),
    ];
    let (events, protocol) = run_upgrade(&parts);
    assert_eq!(protocol, Protocol::Http);
    assert_eq!(
        upgrade_summary(&events),
        [(0, "GET".into(), "/".into(), 200, "1.1"), (1, "GET".into(), "/b".into(), 404, "1.1")]
    );
    // A 101 to a websocket upgrade is not HTTP/2: opaque after the switch, as before.
    let ws = vec![
        (Side::Request, b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec()),
        (Side::Response, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n".to_vec()),
        (Side::Request, frame::PREFACE.to_vec()),
    ];
    let (events, protocol) = run_upgrade(&ws);
    assert_eq!(protocol, Protocol::Http);
    assert_eq!(upgrade_summary(&events), [(0, "GET".into(), "/ws".into(), 101, "1.1")]);
}

/// Past `MAX_OPEN_STREAMS` open streams the oldest is given up: counted unmatched, and abandoned
/// by its sequence number so that the tracer drops its in-flight record.
#[test]
fn the_oldest_open_stream_given_up_is_abandoned_by_its_seq() {
    let mut parts = vec![(Side::Request, frame::PREFACE.to_vec())];
    for i in 0..=MAX_OPEN_STREAMS as u32 {
        let path = format!("/s/{i}");
        // :method GET and :scheme http from the static table, :path a literal with its name
        // indexed (RFC 7541 6.2.2), never inserted.
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path.as_bytes());
        let mut frame = (block.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[0x1, 0x5]); // HEADERS with END_STREAM and END_HEADERS
        frame.extend_from_slice(&(2 * i + 1).to_be_bytes());
        frame.extend_from_slice(&block);
        parts.push((Side::Request, frame)); // one write each, so each stream starts later
    }
    let out = replay(&mut session_for(&parts), &parts);
    let started: BTreeMap<String, u64> = out
        .iter()
        .filter_map(|e| match e {
            SessionEvent::RequestStarted(r) => Some((r.target.as_deref()?.to_string(), r.seq)),
            _ => None,
        })
        .collect();
    assert_eq!(started.len(), MAX_OPEN_STREAMS + 1);
    let abandoned: Vec<u64> = out
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Abandoned { seq } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(abandoned, [started["/s/0"]], "the first stream is the one given up");
    assert_eq!(out.iter().filter(|e| matches!(e, SessionEvent::UnmatchedRequest)).count(), 1);
}
