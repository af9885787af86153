//! PostgreSQL 15 wire fixtures recorded from psql and psycopg 3, split sweeps, uncopied bytes,
//! and never-panic properties.

use super::*;
use crate::protocol::testing::{completed, errors, load, replay, splits};

const PSQL: &[u8] = include_bytes!("../fixtures/pg15_psql_simple.conv");
const PSYCOPG: &[u8] = include_bytes!("../fixtures/pg15_psycopg_extended.conv");
const SSL: &[u8] = include_bytes!("../fixtures/pg15_sslrequest.conv");

fn pg(events: &[SessionEvent]) -> Vec<PgExchange> {
    completed(events)
        .into_iter()
        .filter_map(|d| match d {
            ExchangeDetail::Postgres(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn run(fixture: &[u8]) -> Vec<SessionEvent> {
    replay(&mut PostgresSession::new(false), &load(fixture))
}

#[test]
fn detects_startup_ssl_and_mid_stream_queries() {
    for f in [PSQL, PSYCOPG, SSL] {
        assert_eq!(classify_start(&load(f)[0].1), Some(true));
    }
    assert_eq!(classify_start(b"Q\x00\x00\x00\x0dSELECT 1\x00"), Some(true));
    // psycopg's Parse (with one parameter type) + Bind + Execute + Sync, mid-stream.
    let psycopg = &load(PSYCOPG)[4].1;
    assert_eq!(psycopg[0], b'P');
    assert_eq!(classify_start(psycopg), Some(true));
    assert_eq!(classify_start(b"\x00\x00"), None);
    assert_eq!(classify_start(b"GET / HTTP/1.1\r\n"), Some(false));
    assert_eq!(classify_start(b"*1\r\n$4\r\nPING\r\n"), Some(false));
}

#[test]
fn psql_simple_queries_multi_statement_and_error() {
    let ev = run(PSQL);
    let done = pg(&ev);
    assert_eq!(done.len(), 3, "{ev:?}");
    assert_eq!(done[0].statements, 2, "CREATE + INSERT in one Query message");
    assert_eq!(
        done[0].query.as_deref(),
        Some("CREATE TABLE users (id int, name text); INSERT INTO users VALUES (1,'alice'),(2,'bob')")
    );
    assert_eq!(done[1].returned_rows, Some(1));
    assert_eq!(done[1].database.as_deref(), Some("postgres"));
    assert_eq!(done[2].sqlstate.as_deref(), Some("42P01"));
    assert!(done.iter().take(2).all(|d| d.sqlstate.is_none()));
    assert_eq!(errors(&ev), 0);
}

#[test]
fn psycopg_prepared_pipelined_and_copy() {
    let ev = run(PSYCOPG);
    let done = pg(&ev);
    let queries: Vec<&str> = done.iter().map(|d| d.query.as_deref().unwrap_or("?")).collect();
    assert_eq!(
        queries,
        vec![
            "BEGIN",
            "SELECT name FROM users WHERE id = $1",
            "SELECT name FROM users WHERE id = $1",
            "INSERT INTO users VALUES ($1, $2)",
            "INSERT INTO users VALUES ($1, $2)",
            "INSERT INTO users VALUES ($1, $2)",
            "COPY users (id, name) FROM STDIN",
            "COMMIT",
        ]
    );
    assert_eq!(done[1].returned_rows, Some(1), "named statement _pg3_0 executed through a portal");
    assert_eq!(errors(&ev), 0);
    // Pipelined: the three Executes were all sent before their results came back.
    let starts: Vec<u64> = ev
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Completed(x) => Some(x.start_ns),
            _ => None,
        })
        .collect();
    assert!(starts[3] < starts[4] && starts[4] < starts[5]);
}

#[test]
fn ssl_request_answered_n_continues_in_plaintext() {
    let done = pg(&run(SSL));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].query.as_deref(), Some("SELECT 1"));
}

#[test]
fn ssl_accepted_turns_opaque() {
    let mut s = PostgresSession::new(false);
    let parts = vec![
        (Side::Request, b"\x00\x00\x00\x08\x04\xd2\x16\x2f".to_vec()),
        (Side::Response, b"S".to_vec()),
        (Side::Request, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec()),
        (Side::Response, b"\x16\x03\x03\x00\x7a\x02\x00".to_vec()),
    ];
    let ev = replay(&mut s, &parts);
    assert!(ev.is_empty(), "{ev:?}");
}

#[test]
fn every_split_offset_gives_the_same_operations() {
    for fixture in [PSQL, PSYCOPG, SSL] {
        let parts = load(fixture);
        let expected = pg(&replay(&mut PostgresSession::new(false), &parts));
        for (idx, cut, variant) in splits(&parts) {
            let ev = replay(&mut PostgresSession::new(false), &variant);
            assert_eq!(pg(&ev), expected, "part {idx} cut at {cut}");
            assert_eq!(errors(&ev), 0, "part {idx} cut at {cut}");
        }
    }
}

#[test]
fn uncopied_data_rows_keep_framing() {
    // A SELECT whose 1 MB DataRow was mostly not copied, followed by another query.
    let mut s = PostgresSession::new(true);
    let mut out = Vec::new();
    let q = b"Q\x00\x00\x00\x1cSELECT big FROM blobs;\x00\x00\x00\x00\x00";
    let q = &q[..1 + 0x1c];
    s.feed(&Segment { side: Side::Request, bytes: q, byte_count: q.len() as u64, ts_ns: 1, tid: 1 }, &mut out);
    let row_len: u32 = 4 + 2 + 4 + 1_000_000;
    let mut head = vec![b'D'];
    head.extend_from_slice(&row_len.to_be_bytes());
    head.extend_from_slice(&[0, 1]);
    head.extend_from_slice(&1_000_000u32.to_be_bytes());
    head.extend_from_slice(&[b'x'; 100]);
    let total = 1 + row_len as u64;
    s.feed(&Segment { side: Side::Response, bytes: &head, byte_count: 4096, ts_ns: 2, tid: 1 }, &mut out);
    s.feed(&Segment { side: Side::Response, bytes: b"", byte_count: total - 4096, ts_ns: 3, tid: 1 }, &mut out);
    let tail = b"C\x00\x00\x00\x0dSELECT 1\x00Z\x00\x00\x00\x05I";
    s.feed(&Segment { side: Side::Response, bytes: tail, byte_count: tail.len() as u64, ts_ns: 4, tid: 1 }, &mut out);
    let done = pg(&out);
    assert_eq!(done.len(), 1, "{out:?}");
    assert_eq!(done[0].returned_rows, Some(1));
    assert_eq!(errors(&out), 0);
}

#[test]
fn error_in_a_pipeline_abandons_the_rest_until_sync() {
    let mut s = PostgresSession::new(true);
    let parse = |q: &str| {
        let mut m = vec![b'P'];
        let body = [b"\0".as_slice(), q.as_bytes(), b"\0\0\0"].concat();
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(&body);
        m
    };
    let bind = b"B\x00\x00\x00\x0c\x00\x00\x00\x00\x00\x00\x00\x00".to_vec();
    let exec = b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00".to_vec();
    let mut req = Vec::new();
    for q in ["SELECT 1", "SELECT * FROM nope", "SELECT 3"] {
        req.extend(parse(q));
        req.extend(&bind);
        req.extend(&exec);
    }
    req.extend(b"S\x00\x00\x00\x04");
    let resp = b"1\x00\x00\x00\x042\x00\x00\x00\x04C\x00\x00\x00\x0dSELECT 1\x00E\x00\x00\x00\x11SERROR\x00C42P01\x00\x00Z\x00\x00\x00\x05I".to_vec();
    let ev = replay(&mut s, &[(Side::Request, req), (Side::Response, resp)]);
    let done = pg(&ev);
    assert_eq!(done.len(), 2);
    assert_eq!(done[1].sqlstate.as_deref(), Some("42P01"));
    assert_eq!(done[1].query.as_deref(), Some("SELECT * FROM nope"));
    assert_eq!(ev.iter().filter(|e| matches!(e, SessionEvent::Abandoned { .. })).count(), 1);
}

#[test]
fn password_message_body_is_never_kept() {
    // 'p' PasswordMessage: the framer does not keep it, and no event mentions it.
    let mut s = PostgresSession::new(true);
    let msg = b"p\x00\x00\x00\x0dhunter2hun\x00".to_vec();
    let ev = replay(&mut s, &[(Side::Request, msg)]);
    assert!(ev.is_empty());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    #[test]
    fn random_input_never_panics(chunks in proptest::collection::vec(
        (proptest::bool::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..200), 0u64..3000), 0..20), mid in proptest::bool::ANY) {
        let mut s = PostgresSession::new(mid);
        let mut out = Vec::new();
        for (req, bytes, extra) in &chunks {
            let side = if *req { Side::Request } else { Side::Response };
            s.feed(&Segment { side, bytes, byte_count: bytes.len() as u64 + extra, ts_ns: 1, tid: 1 }, &mut out);
        }
        s.close(2, &mut out);
    }

    #[test]
    fn mutated_fixtures_never_panic(pos in 0usize..1431, byte in proptest::num::u8::ANY) {
        let mut raw = PSYCOPG.to_vec();
        // Keep the recording's own framing (tag + length) intact; mutate payload bytes only.
        let parts = load(&raw);
        let mut flat: Vec<(Side, Vec<u8>)> = parts;
        let total: usize = flat.iter().map(|(_, b)| b.len()).sum();
        let mut p = pos % total;
        for (_, b) in flat.iter_mut() {
            if p < b.len() { b[p] = byte; break; }
            p -= b.len();
        }
        raw.clear();
        let _ = replay(&mut PostgresSession::new(false), &flat);
    }
}

#[test]
fn a_message_cut_off_by_close_is_counted_and_a_clean_close_is_not() {
    use crate::protocol::{Segment, Session, Side};
    let parts = load(PSQL);
    let startup = &parts[0].1;
    let mut s = PostgresSession::new(false);
    let mut out = Vec::new();
    let half = &startup[..startup.len() / 2];
    s.feed(&Segment { side: Side::Request, bytes: half, byte_count: half.len() as u64, ts_ns: 1, tid: 1 }, &mut out);
    s.close(2, &mut out);
    assert_eq!(errors(&out), 1, "{out:?}");
    let mut s = PostgresSession::new(false);
    let mut out = replay(&mut s, &parts);
    s.close(1_000, &mut out);
    assert_eq!(errors(&out), 0, "{out:?}");
}

/// A connection opened (and its statement prepared) before sonde started: the first bytes seen
/// are a Bind of `_pg3_0`, whose Parse went by unseen. The stream is recognized, and the Execute
/// is named by the server's CommandComplete.
#[test]
fn statement_prepared_before_sonde_is_recognized_and_named_by_its_command_tag() {
    let parts = load(PSYCOPG);
    let (bind, answer) = (&parts[8], &parts[9]);
    assert_eq!(bind.1[0], b'B');
    assert_eq!(classify_start(&bind.1), Some(true));
    // The Bind alone, cut anywhere short of its end, is not enough evidence.
    let bind_len = 1 + u32::from_be_bytes(bind.1[1..5].try_into().unwrap()) as usize;
    assert!(!looks_like_typed_query(&bind.1[..bind_len - 1]));
    let mut corrupt = bind.1.clone();
    corrupt[bind_len - 1] ^= 0x40;
    assert!(!is_whole_bind(&corrupt[5..bind_len]), "a result format other than 0/1");
    let ev = replay(&mut PostgresSession::new(true), &[bind.clone(), answer.clone()]);
    let done = pg(&ev);
    assert_eq!(done.len(), 1, "{ev:?}");
    assert_eq!(done[0].query, None);
    assert_eq!(done[0].command.as_deref(), Some("SELECT"));
    assert_eq!(done[0].returned_rows, Some(1));
    // With its Parse seen, the text names it and no command is kept.
    assert!(pg(&run(PSYCOPG)).iter().all(|d| d.command.is_none()));
}
