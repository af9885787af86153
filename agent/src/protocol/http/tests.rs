//! Wire fixtures, an every-offset split sweep, uncopied-byte handling and a never-panic property.

use super::*;
use crate::protocol::{Segment, Session, SessionEvent, Side};

/// Bytes as curl 7.88 sends them and as Python's http.server answers.
const CURL_GET: &[u8] =
    b"GET /users/42?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n";
const PY_RESP: &[u8] = b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11.7\r\nDate: Mon, 23 Nov 2026 11:00:00 GMT\r\nContent-type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
const NGINX_CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n";
const POST_BODY: &[u8] =
    b"POST /api/items HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\nContent-Type: application/json\r\n\r\n{\"a\":12345}";
const CREATED: &[u8] = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";

fn seg(side: Side, bytes: &[u8], ts: u64) -> Segment<'_> {
    Segment { side, bytes, byte_count: bytes.len() as u64, ts_ns: ts, tid: 7 }
}

fn run(parts: &[(Side, &[u8])]) -> Vec<SessionEvent> {
    let mut s = HttpSession::default();
    let mut out = Vec::new();
    for (i, (side, bytes)) in parts.iter().enumerate() {
        s.feed(&seg(*side, bytes, 100 + i as u64), &mut out);
    }
    out
}

fn completed(events: &[SessionEvent]) -> Vec<HttpExchange> {
    events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Completed(x) => match &x.detail {
                crate::protocol::ExchangeDetail::Http(h) => Some(h.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn errors(events: &[SessionEvent]) -> usize {
    events.iter().filter(|e| matches!(e, SessionEvent::ParseError { .. })).count()
}

#[test]
fn simple_exchange_with_timestamps_and_sizes() {
    let ev = run(&[(Side::Request, CURL_GET), (Side::Response, PY_RESP)]);
    let SessionEvent::RequestStarted(start) = &ev[0] else { panic!("{ev:?}") };
    assert_eq!((start.seq, start.ts_ns, start.tid), (0, 100, 7));
    let SessionEvent::Completed(x) = &ev[1] else { panic!("{ev:?}") };
    assert_eq!((x.start_ns, x.end_ns), (100, 101));
    let h = &completed(&ev)[0];
    assert_eq!(h.method, "GET");
    assert_eq!(h.target, "/users/42?x=1");
    assert_eq!(h.host.as_deref(), Some("127.0.0.1:8080"));
    assert_eq!(h.user_agent.as_deref(), Some("curl/7.88.1"));
    assert_eq!(h.status, 200);
    assert_eq!(h.response_body_bytes, Some(5));
}

#[test]
fn chunked_body_with_extensions_and_trailers() {
    let ev = run(&[(Side::Request, CURL_GET), (Side::Response, NGINX_CHUNKED), (Side::Request, CURL_GET)]);
    let done = completed(&ev);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].response_body_bytes, Some(11));
    assert_eq!(errors(&ev), 0);
}

#[test]
fn request_body_is_framed_and_counted() {
    let ev = run(&[(Side::Request, POST_BODY), (Side::Response, CREATED)]);
    let done = completed(&ev);
    assert_eq!((done[0].method.as_str(), done[0].status, done[0].request_body_bytes), ("POST", 201, Some(11)));
}

#[test]
fn pipelined_requests_pair_in_order() {
    let mut reqs = Vec::new();
    let mut resps = Vec::new();
    for i in 0..20 {
        reqs.extend_from_slice(format!("GET /p/{i} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes());
        let body = format!("r{i}");
        resps.extend_from_slice(
            format!("HTTP/1.1 {} OK\r\nContent-Length: {}\r\n\r\n{body}", 200 + i % 3, body.len()).as_bytes(),
        );
    }
    let ev = run(&[(Side::Request, &reqs), (Side::Response, &resps)]);
    let done = completed(&ev);
    assert_eq!(done.len(), 20);
    for (i, h) in done.iter().enumerate() {
        assert_eq!(h.target, format!("/p/{i}"));
        assert_eq!(h.status, 200 + (i % 3) as u16);
    }
}

#[test]
fn bodiless_responses() {
    let head = b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n";
    let head_resp = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n";
    let not_modified = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n";
    let no_content = b"HTTP/1.1 204 No Content\r\n\r\n";
    let ev = run(&[
        (Side::Request, head),
        (Side::Response, head_resp),
        (Side::Request, CURL_GET),
        (Side::Response, not_modified),
        (Side::Request, CURL_GET),
        (Side::Response, no_content),
        (Side::Request, CURL_GET),
        (Side::Response, PY_RESP),
    ]);
    let statuses: Vec<u16> = completed(&ev).iter().map(|h| h.status).collect();
    assert_eq!(statuses, vec![200, 304, 204, 200]);
    assert_eq!(errors(&ev), 0);
}

#[test]
fn interim_100_continue_does_not_consume_the_request() {
    let req = b"PUT /f HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
    let ev = run(&[
        (Side::Request, req),
        (Side::Response, b"HTTP/1.1 100 Continue\r\n\r\n"),
        (Side::Request, b"abc"),
        (Side::Response, CREATED),
    ]);
    let done = completed(&ev);
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].status, done[0].request_body_bytes), (201, Some(3)));
}

#[test]
fn upgrade_turns_the_connection_opaque() {
    let req = b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let ev = run(&[
        (Side::Request, req),
        (Side::Response, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
        (Side::Request, b"\x81\x85garbage frames"),
        (Side::Response, b"\x81\x05hello"),
    ]);
    assert_eq!(completed(&ev).iter().map(|h| h.status).collect::<Vec<_>>(), vec![101]);
    assert_eq!(errors(&ev), 0);
}

#[test]
fn body_until_close_completes_on_close() {
    let mut s = HttpSession::default();
    let mut out = Vec::new();
    s.feed(&seg(Side::Request, CURL_GET, 1), &mut out);
    s.feed(&seg(Side::Response, b"HTTP/1.0 200 OK\r\n\r\npart one", 2), &mut out);
    s.feed(&seg(Side::Response, b" and two", 3), &mut out);
    assert!(completed(&out).is_empty());
    s.close(9, &mut out);
    let done = completed(&out);
    assert_eq!(done[0].response_body_bytes, Some(16));
    let SessionEvent::Completed(x) = out.last().unwrap() else { panic!() };
    assert_eq!(x.end_ns, 9);
}

#[test]
fn uncopied_body_bytes_keep_framing() {
    // A 1 MB response of which only the head and 10 body bytes were captured.
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n0123456789";
    let mut s = HttpSession::default();
    let mut out = Vec::new();
    s.feed(&seg(Side::Request, CURL_GET, 1), &mut out);
    s.feed(&Segment { side: Side::Response, bytes: head, byte_count: 4096, ts_ns: 2, tid: 1 }, &mut out);
    let rest = 1_000_000 - (4096 - (head.len() as u64 - 10));
    // sendfile-style: nothing copied at all.
    s.feed(&Segment { side: Side::Response, bytes: b"", byte_count: rest, ts_ns: 3, tid: 1 }, &mut out);
    s.feed(&seg(Side::Request, CURL_GET, 4), &mut out);
    s.feed(&seg(Side::Response, PY_RESP, 5), &mut out);
    let done = completed(&out);
    assert_eq!(done.len(), 2, "{out:?}");
    assert_eq!(done[0].response_body_bytes, Some(1_000_000));
    assert_eq!(errors(&out), 0);
}

#[test]
fn uncopied_head_bytes_desync_then_recover_at_next_message() {
    let mut s = HttpSession::default();
    let mut out = Vec::new();
    // Head larger than the capture: we see a prefix only.
    s.feed(
        &Segment {
            side: Side::Request,
            bytes: b"GET /big HTTP/1.1\r\nCookie: aaaa",
            byte_count: 9000,
            ts_ns: 1,
            tid: 1,
        },
        &mut out,
    );
    assert_eq!(errors(&out), 1);
    s.feed(&seg(Side::Request, b"more cookie bytes\r\n\r\n", 2), &mut out);
    s.feed(&seg(Side::Request, CURL_GET, 3), &mut out);
    s.feed(&seg(Side::Response, PY_RESP, 4), &mut out);
    assert_eq!(completed(&out).len(), 1);
}

#[test]
fn garbage_is_a_parse_error_not_a_span() {
    let ev = run(&[(Side::Request, b"GET \x00\x01\x02 nonsense\r\n\r\n"), (Side::Response, PY_RESP)]);
    assert_eq!(errors(&ev), 1);
    assert!(completed(&ev).is_empty());
    assert!(ev.iter().any(|e| matches!(e, SessionEvent::UnmatchedResponse)));
}

#[test]
fn traceparent_is_extracted() {
    let req =
        b"GET / HTTP/1.1\r\nHost: h\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n";
    let ev = run(&[(Side::Request, req)]);
    let SessionEvent::RequestStarted(s) = &ev[0] else { panic!() };
    assert_eq!(s.traceparent.unwrap().parent_id.to_string(), "00f067aa0ba902b7");
}

#[test]
fn close_reports_unanswered_requests() {
    let mut s = HttpSession::default();
    let mut out = Vec::new();
    s.feed(&seg(Side::Request, CURL_GET, 1), &mut out);
    s.close(2, &mut out);
    assert!(matches!(out.last(), Some(SessionEvent::UnmatchedRequest)));
}

#[test]
fn a_request_head_cut_off_by_close_is_counted() {
    let mut s = HttpSession::default();
    let mut out = Vec::new();
    s.feed(&seg(Side::Request, &CURL_GET[..30], 1), &mut out);
    assert!(out.is_empty());
    s.close(2, &mut out);
    assert_eq!(errors(&out), 1, "{out:?}");
    // A clean close between requests is not an error.
    let mut s = HttpSession::default();
    let mut out = Vec::new();
    s.feed(&seg(Side::Request, CURL_GET, 1), &mut out);
    s.feed(&seg(Side::Response, PY_RESP, 2), &mut out);
    s.close(3, &mut out);
    assert_eq!(errors(&out), 0, "{out:?}");
}

/// Splits a whole conversation at every offset of each message: results must not change.
#[test]
fn every_split_offset_gives_the_same_exchanges() {
    let conversation: [(Side, &[u8]); 6] = [
        (Side::Request, POST_BODY),
        (Side::Response, CREATED),
        (Side::Request, CURL_GET),
        (Side::Response, NGINX_CHUNKED),
        (Side::Request, CURL_GET),
        (Side::Response, PY_RESP),
    ];
    let expected = completed(&run(&conversation));
    assert_eq!(expected.len(), 3);
    for (idx, (_, bytes)) in conversation.iter().enumerate() {
        for cut in 0..=bytes.len() {
            let mut parts: Vec<(Side, &[u8])> = Vec::new();
            for (j, (side, b)) in conversation.iter().enumerate() {
                if j == idx {
                    parts.push((*side, &b[..cut]));
                    parts.push((*side, &b[cut..]));
                } else {
                    parts.push((*side, b));
                }
            }
            let ev = run(&parts);
            assert_eq!(completed(&ev), expected, "message {idx} split at {cut}");
            assert_eq!(errors(&ev), 0, "message {idx} split at {cut}");
        }
    }
}

#[test]
fn one_byte_per_write() {
    let mut parts: Vec<(Side, &[u8])> = Vec::new();
    for i in 0..POST_BODY.len() {
        parts.push((Side::Request, &POST_BODY[i..i + 1]));
    }
    for i in 0..NGINX_CHUNKED.len() {
        parts.push((Side::Response, &NGINX_CHUNKED[i..i + 1]));
    }
    let done = completed(&run(&parts));
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].request_body_bytes, done[0].response_body_bytes), (Some(11), Some(11)));
}

#[test]
fn start_classification() {
    assert_eq!(classify_start(Side::Request, b"GE"), None);
    assert_eq!(classify_start(Side::Request, b"GET /"), None);
    assert_eq!(classify_start(Side::Request, b"GET / HTTP/1.1\r\n"), Some(true));
    assert_eq!(classify_start(Side::Request, b"GET key\r\n"), Some(false));
    assert_eq!(classify_start(Side::Request, b"GETX"), Some(false));
    assert_eq!(classify_start(Side::Request, b"\x16\x03\x01"), Some(false));
    assert_eq!(classify_start(Side::Response, b"HTTP/1.1 200"), Some(true));
    assert_eq!(classify_start(Side::Response, b"HTT"), None);
    assert_eq!(classify_start(Side::Response, b"SSH-2.0"), Some(false));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    /// Random bytes, random sides, random uncopied counts: never a panic, memory bounded.
    #[test]
    fn random_input_never_panics(chunks in proptest::collection::vec(
        (proptest::bool::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0u64..5000), 0..20)) {
        let mut s = HttpSession::default();
        let mut out = Vec::new();
        for (is_req, bytes, extra) in &chunks {
            let side = if *is_req { Side::Request } else { Side::Response };
            s.feed(&Segment { side, bytes, byte_count: bytes.len() as u64 + extra, ts_ns: 1, tid: 1 }, &mut out);
        }
        s.close(2, &mut out);
    }

    /// Mutating one byte of a valid conversation never panics.
    #[test]
    fn mutated_fixtures_never_panic(pos in 0usize..400, byte in proptest::num::u8::ANY) {
        let mut convo = [CURL_GET.to_vec(), NGINX_CHUNKED.to_vec()];
        let total = convo[0].len() + convo[1].len();
        let p = pos % total;
        let first_len = convo[0].len();
        if p < first_len { convo[0][p] = byte } else { convo[1][p - first_len] = byte }
        let mut out = Vec::new();
        let mut s = HttpSession::default();
        s.feed(&seg(Side::Request, &convo[0], 1), &mut out);
        s.feed(&seg(Side::Response, &convo[1], 2), &mut out);
        s.close(3, &mut out);
    }
}
