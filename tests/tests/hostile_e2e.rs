//! Hostile and broken input sent to traced servers, privileged: garbage, truncated requests,
//! 1 MiB headers, 10,000 pipelined requests, half-closed and reset connections, one byte per
//! write, and protocol switches (HTTP Upgrade, PostgreSQL SSLRequest). sonde stays up with
//! bounded memory, every bad stream is counted, and well-formed requests on other connections
//! still give exact spans.

use std::{collections::BTreeMap, process::Command, time::Duration};

use sonde_e2e::{
    clients::{curl, sample, scrape},
    free_port,
    otlp::HttpReceiver,
    privileged_test,
    servers::{self, PG_PASSWORD, fixture},
    sonde::{Sonde, test_config},
    span::TestSpan,
};

fn hostile(mode: &str, port: u16, extra: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(fixture("hostile_client.py"))
        .args([mode, &port.to_string()])
        .args(extra)
        .output()
        .expect("run hostile_client.py");
    assert!(out.status.success(), "hostile client {mode} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Spans by the first segment of their path (`/pipe/7` -> `/pipe`), with the status code.
fn by_route(spans: &[TestSpan]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in spans {
        let path = s.s("url.path").unwrap_or("?");
        let first = path.split('/').nth(1).unwrap_or("");
        *m.entry(format!(
            "{} /{first} {}",
            s.service().unwrap_or("?"),
            s.i("http.response.status_code").unwrap_or(0)
        ))
        .or_default() += 1;
    }
    m
}

/// sonde's bad-stream counters, from its metrics endpoint.
fn bad_streams(metrics_port: u16) -> BTreeMap<&'static str, u64> {
    let text = scrape(metrics_port);
    let get = |series: &str| sample(&text, series).unwrap_or(-1.0) as u64;
    BTreeMap::from([
        ("parse_errors", get("sonde_parse_errors_total{protocol=\"http\"}")),
        ("postgres_parse_errors", get("sonde_parse_errors_total{protocol=\"postgresql\"}")),
        ("redis_parse_errors", get("sonde_parse_errors_total{protocol=\"redis\"}")),
        ("unrecognized", get("sonde_streams_unrecognized_total")),
        ("unmatched_requests", get("sonde_unmatched_requests_total")),
        ("unmatched_responses", get("sonde_unmatched_responses_total")),
        ("events_lost", get("sonde_events_lost_total")),
        ("bytes_not_captured", get("sonde_bytes_not_captured_total")),
    ])
}

fn delta(before: &BTreeMap<&'static str, u64>, after: &BTreeMap<&'static str, u64>) -> BTreeMap<&'static str, u64> {
    after.iter().map(|(k, v)| (*k, v - before[k])).filter(|(_, v)| *v > 0).collect()
}

/// The counters that mark a stream as bad (bytes beyond the capture limit are not an error).
fn bad(delta: &BTreeMap<&'static str, u64>) -> BTreeMap<&'static str, u64> {
    delta.iter().filter(|(k, _)| **k != "bytes_not_captured").map(|(k, v)| (*k, *v)).collect()
}

#[test]
fn privileged_hostile_http_input_is_counted_and_good_traffic_stays_exact() {
    let Some(_guard) = privileged_test("hostile HTTP input") else {
        return;
    };
    let nginx = servers::nginx(free_port());
    let python = servers::python_http(free_port(), None);
    let receiver = HttpReceiver::start();
    let metrics_port = free_port();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
    ];
    let cfg = test_config(&format!(
        "discovery:\n  - service.name: nginx\n    open_ports: {}\n  - service.name: python\n    open_ports: {}\n",
        nginx.port, python.port
    ));
    let sonde = Sonde::start(&["--prometheus-port", &metrics_port.to_string()], &cfg, &env);
    let rss_start = sonde.rss_kib();
    let mut good_rounds = 0;
    // Ten well-formed requests to each server on fresh connections; waits until their spans are in.
    let mut good = || {
        good_rounds += 1;
        for port in [nginx.port, python.port] {
            let urls: Vec<String> =
                (0..10).map(|i| format!("http://127.0.0.1:{port}/good/{good_rounds}-{i}")).collect();
            curl(&["-o", "/dev/null"], &urls);
        }
        let want = 20 * good_rounds;
        sonde_e2e::wait_for(Duration::from_secs(10), || {
            (receiver.collected.count_path_prefix("/good/") >= want).then_some(())
        });
    };

    let mut report = BTreeMap::new();
    let modes: &[(&str, &[&str])] = &[
        ("garbage", &[]),
        ("truncated", &[]),
        ("bigheader", &[]),
        ("halfclose", &[]),
        ("reset", &[]),
        ("bytewise", &[]),
        ("pipeline", &["10000"]),
    ];
    for (name, port) in [("nginx", nginx.port), ("python", python.port)] {
        for (mode, extra) in modes {
            let before = bad_streams(metrics_port);
            let answer = hostile(mode, port, extra);
            good();
            std::thread::sleep(Duration::from_millis(300));
            report.insert(format!("{name} {mode}"), (answer, delta(&before, &bad_streams(metrics_port))));
        }
    }
    let before = bad_streams(metrics_port);
    let answer = hostile("upgrade", python.port, &[]);
    good();
    report.insert("python upgrade".into(), (answer, delta(&before, &bad_streams(metrics_port))));

    std::thread::sleep(Duration::from_secs(2));
    let rss_end = sonde.rss_kib();
    let spans = receiver.collected.spans();
    let finished = sonde.stop();
    assert!(finished.status.success(), "sonde did not stay up: {}", finished.stderr);
    let routes = by_route(&spans);
    eprintln!("{report:#?}\n{routes:#?}\nRSS {rss_start} -> {rss_end} KiB\n{}", finished.stderr);

    // Well-formed requests on other connections: exact, whatever the hostile ones did.
    assert_eq!(routes.get("nginx /good 404"), Some(&(10 * good_rounds)));
    assert_eq!(routes.get("python /good 200"), Some(&(10 * good_rounds)));
    assert_eq!(finished.counter("events_lost"), Some(0));
    assert!(rss_end < rss_start + 16 * 1024, "sonde's memory grew from {rss_start} to {rss_end} KiB");

    let counted = |key: &str| bad(&report[key].1);
    for (server, ok_status) in [("nginx", 404), ("python", 200)] {
        // Every bad stream shows in a counter.
        for mode in ["garbage", "truncated", "bigheader", "reset"] {
            let key = format!("{server} {mode}");
            assert!(!counted(&key).is_empty(), "{key} was not counted: {:?}", report[&key]);
        }
        assert_eq!(counted(&format!("{server} reset")).get("parse_errors"), Some(&1), "head cut off by the reset");
        // Unusual but valid: exact spans, nothing counted as bad.
        for mode in ["halfclose", "bytewise"] {
            let key = format!("{server} {mode}");
            assert!(counted(&key).is_empty(), "{key}: {:?}", report[&key]);
            assert_eq!(routes.get(&format!("{server} /{mode} {ok_status}")), Some(&1), "{key}");
        }
        // 10,000 pipelined requests in one write: more than the per-syscall capture sees. Every
        // response is a span or an unmatched response, nothing in between.
        let (answered, pipeline) = &report[&format!("{server} pipeline")];
        assert_eq!(answered, "10000");
        let spans = routes.get(&format!("{server} /pipe {ok_status}")).copied().unwrap_or(0) as u64;
        assert_eq!(spans + pipeline.get("unmatched_responses").copied().unwrap_or(0), 10_000, "{pipeline:?}");
    }
    // After 101 Switching Protocols the bytes are another protocol: one span, nothing parsed.
    assert!(counted("python upgrade").is_empty(), "{:?}", report["python upgrade"]);
    assert_eq!(routes.get("python /upgrade 101"), Some(&1));
    assert!(!routes.keys().any(|k| k.contains("/not-http-anymore")));
}

#[test]
fn privileged_hostile_postgres_and_redis_input_is_counted_and_good_traffic_stays_exact() {
    let Some(_guard) = privileged_test("hostile PostgreSQL and Redis input") else {
        return;
    };
    let pg = servers::postgres(free_port());
    let redis = servers::redis(free_port());
    let receiver = HttpReceiver::start();
    let metrics_port = free_port();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
    ];
    let cfg = test_config(&format!("discovery:\n  - open_ports: {},{}\n", pg.port, redis.port));
    let sonde = Sonde::start(&["--prometheus-port", &metrics_port.to_string()], &cfg, &env);
    let rss_start = sonde.rss_kib();
    let mut good_rounds = 0;
    // Well-formed traffic on other connections: 10 pgbench SELECTs and 10 redis-cli INCRs.
    let mut good = || -> usize {
        good_rounds += 1;
        let status = Command::new("pgbench")
            .args(["-n", "-S", "-M", "extended", "-t", "10", "-c", "1", "-h", "127.0.0.1", "-p"])
            .arg(pg.port.to_string())
            .args(["-U", "postgres", "postgres"])
            .env("PGPASSWORD", PG_PASSWORD)
            .output()
            .expect("pgbench");
        assert!(status.status.success(), "pgbench: {}", String::from_utf8_lossy(&status.stderr));
        for _ in 0..10 {
            let out = Command::new("redis-cli").args(["-p", &redis.port.to_string(), "INCR", "good"]).output();
            assert!(out.expect("redis-cli").status.success());
        }
        good_rounds
    };
    let good_spans = |spans: &[TestSpan]| {
        let pg = spans
            .iter()
            .filter(|s| s.s("db.query.text").is_some_and(|q| q.contains("pgbench_accounts WHERE aid")))
            .count();
        let redis = spans.iter().filter(|s| s.s("db.operation.name") == Some("INCR")).count();
        (pg, redis)
    };

    let mut report = BTreeMap::new();
    let modes: &[(&str, u16, &[&str])] = &[
        ("garbage", pg.port, &[]),
        ("pg-sslrequest-garbage", pg.port, &[]),
        ("pg-truncated", pg.port, &[]),
        ("garbage", redis.port, &[]),
        ("redis-truncated", redis.port, &[]),
        ("redis-bigvalue", redis.port, &[]),
        ("redis-bytewise", redis.port, &[]),
        ("redis-pipeline", redis.port, &["10000"]),
    ];
    for (mode, port, extra) in modes {
        let before = bad_streams(metrics_port);
        let answer = hostile(mode, *port, extra);
        let rounds = good();
        let want = (10 * rounds, 10 * rounds);
        sonde_e2e::wait_for(Duration::from_secs(10), || {
            (good_spans(&receiver.collected.spans()) >= want).then_some(())
        });
        std::thread::sleep(Duration::from_millis(300));
        let name = if *port == pg.port && *mode == "garbage" {
            "pg-garbage"
        } else if *mode == "garbage" {
            "redis-garbage"
        } else {
            mode
        };
        report.insert(name.to_owned(), (answer, delta(&before, &bad_streams(metrics_port))));
    }

    std::thread::sleep(Duration::from_secs(2));
    let rss_end = sonde.rss_kib();
    let spans = receiver.collected.spans();
    let finished = sonde.stop();
    assert!(finished.status.success(), "sonde did not stay up: {}", finished.stderr);
    let mut ops: BTreeMap<String, usize> = BTreeMap::new();
    for s in &spans {
        *ops.entry(format!("{} {}", s.s("db.system.name").unwrap_or("?"), s.s("db.operation.name").unwrap_or("?")))
            .or_default() += 1;
    }
    eprintln!("{report:#?}\n{ops:#?}\nRSS {rss_start} -> {rss_end} KiB\n{}", finished.stderr);

    assert_eq!(good_spans(&spans), (10 * good_rounds, 10 * good_rounds), "well-formed traffic stays exact");
    assert_eq!(finished.counter("events_lost"), Some(0));
    assert!(rss_end < rss_start + 16 * 1024, "sonde's memory grew from {rss_start} to {rss_end} KiB");
    for mode in ["pg-garbage", "pg-sslrequest-garbage", "pg-truncated", "redis-garbage", "redis-truncated"] {
        assert!(!bad(&report[mode].1).is_empty(), "{mode} was not counted: {:?}", report[mode]);
    }
    assert_eq!(report["pg-sslrequest-garbage"].0, "N", "the server refused TLS");
    // Valid but unusual: exact spans, nothing counted as bad.
    for valid in ["redis-bigvalue", "redis-bytewise"] {
        assert!(bad(&report[valid].1).is_empty(), "{valid}: {:?}", report[valid]);
    }
    assert!(!ops.keys().any(|op| op.trim() == "redis"), "no span without a command: {ops:?}");
    assert_eq!(ops.get("redis SET"), Some(&2), "the 1 MiB SET and the bytewise SET");
    assert_eq!(ops.get("redis GET"), Some(&1), "the 1 MiB GET");
    // 10,000 pipelined PINGs in one write: Redis answers in 16 KiB writes, more than one syscall's
    // capture holds. Replies seen are spans or unmatched; the rest is visible as bytes not captured.
    let (answered, pipeline) = &report["redis-pipeline"];
    assert_eq!(answered, "10000");
    let pings = ops.get("redis PING").copied().unwrap_or(0) as u64;
    let seen = pings + pipeline.get("unmatched_responses").copied().unwrap_or(0);
    assert!(seen <= 10_000, "{pipeline:?}");
    assert!(seen == 10_000 || pipeline.get("bytes_not_captured").is_some(), "unseen replies are counted: {pipeline:?}");
}
