//! Logs joined to traces: what real services write to stdout, stderr and their log files
//! arrives as OTLP log records with the trace and span of the request that wrote them.

use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::Duration,
};

use sonde_e2e::{
    TempDir,
    clients::curl_parallel,
    free_port,
    log_record::TestLog,
    otlp::HttpReceiver,
    privileged_test,
    servers::{Server, fixture},
    sonde::{Sonde, test_config},
    wait_listening,
};

const WAIT: Duration = Duration::from_secs(20);

fn otlp_http_env(r: &HttpReceiver) -> Vec<(&'static str, String)> {
    vec![("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint()), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into())]
}

/// tests/fixtures/log_app.py on `port`, logging into `dir`, its stdout and stderr into files there.
fn log_app(port: u16, dir: &TempDir) -> Server {
    let out = std::fs::File::create(dir.path().join("stdout.txt")).expect("stdout file");
    let err = std::fs::File::create(dir.path().join("stderr.txt")).expect("stderr file");
    let child = Command::new("python3")
        .arg(fixture("log_app.py"))
        .arg(port.to_string())
        .arg(dir.path())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start log_app.py");
    wait_listening(port);
    Server::from_child(child, port)
}

/// The records whose body is exactly `body`.
fn with_body<'a>(logs: &'a [TestLog], body: &str) -> Vec<&'a TestLog> {
    logs.iter().filter(|l| l.body == body).collect()
}

#[test]
fn privileged_log_lines_carry_the_trace_of_the_request_that_wrote_them() {
    let Some(_guard) = privileged_test("logs joined to traces") else {
        return;
    };
    let dir = TempDir::new("logapp");
    let port = free_port();
    // Started before sonde: its stdout, stderr and app.log are open already.
    let app = log_app(port, &dir);
    let receiver = HttpReceiver::start();
    let config = test_config(&format!("logs:\n  files: [\"{}/*.log\"]\n", dir.path().display()));
    let sonde =
        Sonde::start(&["--open-ports", &port.to_string(), "--capture-logs"], &config, &otlp_http_env(&receiver));

    let mut paths: Vec<String> = (0..40).map(|i| format!("/ok/{i}")).collect();
    paths.extend((0..5).map(|i| format!("/fail/{i}")));
    paths.extend((0..3).map(|i| format!("/crash/{i}")));
    let urls: Vec<String> = paths.iter().map(|p| format!("http://127.0.0.1:{port}{p}")).collect();
    curl_parallel(&urls, 8);

    // A child started now inherits the service's stderr.
    sonde_e2e::clients::curl(&["-o", "/dev/null"], &[format!("http://127.0.0.1:{port}/spawn")]);
    paths.push("/spawn".into());
    let spans = receiver.collected.wait_for(paths.len(), WAIT);
    let logs = receiver.wait_for_logs(WAIT, |l| {
        l.iter().filter(|r| r.body.starts_with("access ")).count() >= paths.len()
            && l.iter().filter(|r| r.body.starts_with("audit ")).count() >= paths.len()
            && l.iter().any(|r| r.body == "child line")
    });
    let finished = sonde.stop();
    drop(app);

    let span_of: BTreeMap<String, (String, String)> = spans
        .iter()
        .filter(|s| s.kind == "SERVER")
        .map(|s| (s.s("url.path").unwrap_or("?").to_string(), (s.trace_id.clone(), s.span_id.clone())))
        .collect();
    assert_eq!(span_of.len(), paths.len(), "one server span per request");
    let ids = |l: &TestLog| (l.trace_id.clone(), l.span_id.clone());
    let app_log = dir.path().join("app.log").display().to_string();
    let audit_log = dir.path().join("audit.log").display().to_string();
    for path in &paths {
        let expected = &span_of[path];
        let code = if path.starts_with("/fail/") { 500 } else { 200 };
        for (body, stream, file) in [
            (format!("INFO served {path}"), Some("stderr"), None),
            (format!("access {path} {code}"), Some("stderr"), None),
            (format!("file {path}"), None, Some(&app_log)),
            (format!("audit {path}"), None, Some(&audit_log)),
        ] {
            let found = with_body(&logs, &body);
            assert_eq!(found.len(), 1, "{body:?} arrives exactly once: {found:?}");
            assert_eq!(ids(found[0]), *expected, "{body:?} carries its request's trace and span");
            assert_eq!(found[0].s("log.iostream"), stream, "{body:?}");
            assert_eq!(found[0].s("log.file.path"), file.map(String::as_str), "{body:?}");
            assert_eq!(found[0].resource.get("process.pid"), spans[0].resource.get("process.pid"));
        }
        if path.starts_with("/fail/") {
            let json: Vec<&TestLog> =
                logs.iter().filter(|l| l.body.contains(&format!("\"path\": \"{path}\""))).collect();
            assert_eq!(json.len(), 1, "{path}: one JSON error line");
            assert_eq!((json[0].severity_number, json[0].severity_text.as_str()), (17, "error"));
            assert_eq!(json[0].s("log.iostream"), Some("stdout"));
            assert_eq!(ids(json[0]), *expected);
        }
        if path.starts_with("/crash/") {
            let boom = format!("boom {path}");
            let tb: Vec<&TestLog> = logs.iter().filter(|l| l.body.contains(&boom)).collect();
            assert_eq!(tb.len(), 1, "{path}: the traceback is one record: {tb:?}");
            assert!(tb[0].body.starts_with("Traceback (most recent call last):"), "{}", tb[0].body);
            assert!(tb[0].body.ends_with(&format!("ValueError: {boom}")), "{}", tb[0].body);
            assert_eq!(ids(tb[0]), *expected);
        }
    }
    let child: Vec<&TestLog> = with_body(&logs, "child line");
    assert_eq!(child.len(), 1, "the child's line arrives once");
    assert_eq!(child[0].s("log.iostream"), Some("stderr"));
    assert_ne!(child[0].resource.get("process.pid"), spans[0].resource.get("process.pid"), "the child's own resource");
    assert!(!child[0].has_trace(), "the child serves no request");
    let heartbeats: Vec<&TestLog> = logs.iter().filter(|l| l.body.starts_with("heartbeat ")).collect();
    assert!(heartbeats.len() >= 5, "{} heartbeat lines", heartbeats.len());
    assert!(heartbeats.iter().all(|l| !l.has_trace()), "a background thread's lines carry no trace");
    assert!(logs.iter().filter(|l| l.body.starts_with("INFO served")).all(|l| l.severity_number == 9));
    assert_eq!(finished.counter("logs_dropped_kernel"), Some(0), "{}", finished.stderr);
    assert_eq!(finished.counter("logs_unlinked_ambiguous"), Some(0), "{}", finished.stderr);
}

#[test]
fn privileged_nginx_access_log_lines_carry_their_requests_ids() {
    let Some(_guard) = privileged_test("nginx access log joined to traces") else {
        return;
    };
    let dir = TempDir::new("nginx-logs");
    let access = dir.path().join("access.log");
    let port = free_port();
    // nginx opens its access log at start (before sonde) and its workers inherit it.
    let nginx = sonde_e2e::servers::nginx_logging(port, None, Some(&access));
    let receiver = HttpReceiver::start();
    let config = test_config(&format!("logs:\n  capture: true\n  files: [\"{}/*.log\"]\n", dir.path().display()));
    let sonde = Sonde::start(&["--open-ports", &port.to_string()], &config, &otlp_http_env(&receiver));
    let paths: Vec<String> = (0..200).map(|i| format!("/teapot/{i}")).collect();
    let urls: Vec<String> = paths.iter().map(|p| format!("http://127.0.0.1:{port}{p}")).collect();
    curl_parallel(&urls, 16);
    let spans = receiver.collected.wait_for(paths.len(), WAIT);
    let logs =
        receiver.wait_for_logs(WAIT, |l| l.iter().filter(|r| r.body.contains("GET /teapot/")).count() >= paths.len());
    let finished = sonde.stop();
    drop(nginx);

    let span_of: BTreeMap<&str, (&str, &str)> =
        spans.iter().map(|s| (s.s("url.path").unwrap_or("?"), (s.trace_id.as_str(), s.span_id.as_str()))).collect();
    assert_eq!(span_of.len(), paths.len(), "one span per request");
    let access = access.display().to_string();
    for path in &paths {
        let needle = format!("\"GET {path} HTTP/1.1\" 418");
        let lines: Vec<&TestLog> = logs.iter().filter(|l| l.body.contains(&needle)).collect();
        assert_eq!(lines.len(), 1, "{path}: one access log line");
        assert_eq!(lines[0].s("log.file.path"), Some(access.as_str()));
        assert_eq!((lines[0].trace_id.as_str(), lines[0].span_id.as_str()), span_of[path.as_str()], "{path}");
    }
    assert_eq!(finished.counter("logs_dropped_kernel"), Some(0), "{}", finished.stderr);
}

#[test]
fn privileged_node_console_log_in_concurrent_handlers_never_carries_a_wrong_id() {
    let Some(_guard) = privileged_test("Node.js console.log joined to traces") else {
        return;
    };
    let dir = TempDir::new("node-logs");
    let port = free_port();
    let out = std::fs::File::create(dir.path().join("stdout.txt")).expect("stdout file");
    let child = Command::new("node")
        .arg(fixture("node_logging.js"))
        .arg(port.to_string())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .expect("start node");
    wait_listening(port);
    let node = Server::from_child(child, port);
    let receiver = HttpReceiver::start();
    let sonde = Sonde::start(
        &["--open-ports", &port.to_string(), "--capture-logs"],
        &test_config(""),
        &otlp_http_env(&receiver),
    );
    // One at a time: each line's request is the only one in flight, so every line is linked.
    let alone: Vec<String> = (0..10).map(|i| format!("/alone/{i}")).collect();
    for p in &alone {
        sonde_e2e::clients::curl(&["-o", "/dev/null"], &[format!("http://127.0.0.1:{port}{p}")]);
    }
    // Many at once on one event loop: a line may belong to any of them, so it carries none.
    let together: Vec<String> = (0..100).map(|i| format!("/together/{i}")).collect();
    let urls: Vec<String> = together.iter().map(|p| format!("http://127.0.0.1:{port}{p}")).collect();
    curl_parallel(&urls, 32);
    let n = alone.len() + together.len();
    let spans = receiver.collected.wait_for(n, WAIT);
    let logs = receiver.wait_for_logs(WAIT, |l| l.iter().filter(|r| r.body.starts_with("end ")).count() >= n);
    let finished = sonde.stop();
    drop(node);

    let span_of: BTreeMap<&str, (&str, &str)> =
        spans.iter().map(|s| (s.s("url.path").unwrap_or("?"), (s.trace_id.as_str(), s.span_id.as_str()))).collect();
    assert_eq!(span_of.len(), n);
    let mut linked = 0;
    for l in &logs {
        let path = l.body.split_once(' ').map(|(_, p)| p).unwrap_or("");
        assert!(span_of.contains_key(path), "unexpected line {:?}", l.body);
        assert_eq!(logs.iter().filter(|o| o.body == l.body).count(), 1, "{:?} arrives once", l.body);
        if l.has_trace() {
            linked += 1;
            assert_eq!((l.trace_id.as_str(), l.span_id.as_str()), span_of[path], "{:?} carries a wrong id", l.body);
        }
    }
    assert_eq!(logs.len(), 2 * n, "a start and an end line per request");
    for p in &alone {
        for what in ["start", "end"] {
            let line = logs.iter().find(|l| l.body == format!("{what} {p}")).expect("line");
            assert!(line.has_trace(), "{:?}: alone in flight, so linked", line.body);
        }
    }
    let ambiguous = finished.counter("logs_unlinked_ambiguous").unwrap_or(0);
    assert_eq!(linked + ambiguous as usize, logs.len(), "every line is linked or counted: {}", finished.stderr);
    println!("node: {linked} of {} lines linked, {ambiguous} ambiguous", logs.len());
}

#[test]
fn privileged_a_burst_of_log_lines_costs_no_span_and_its_loss_is_counted() {
    let Some(_guard) = privileged_test("log burst under load") else {
        return;
    };
    const LINES: usize = 100_000;
    let dir = TempDir::new("logburst");
    let port = free_port();
    let app = log_app(port, &dir);
    let receiver = HttpReceiver::start();
    // A small ring buffer and export queue, so the burst overflows them: what it costs must be
    // counted, and must not be request spans.
    let config = test_config(
        "capture:\n  ring_buffer_bytes: 131072\n  wakeup_bytes: 16384\nlogs:\n  queue_records: 1000\n  batch_records: 1000\n",
    );
    let sonde =
        Sonde::start(&["--open-ports", &port.to_string(), "--capture-logs"], &config, &otlp_http_env(&receiver));
    sonde_e2e::clients::curl(&["-o", "/dev/null"], &[format!("http://127.0.0.1:{port}/burst/{LINES}")]);
    let paths: Vec<String> = (0..300).map(|i| format!("/ok/{i}")).collect();
    let urls: Vec<String> = paths.iter().map(|p| format!("http://127.0.0.1:{port}{p}")).collect();
    curl_parallel(&urls, 8);
    let spans = receiver.collected.wait_for(paths.len() + 1, WAIT);
    // The burst thread ends when its last line is written (the file grows no more).
    let stderr_file = dir.path().join("stderr.txt");
    let written = |n: &str| std::fs::read_to_string(&stderr_file).unwrap_or_default().contains(n);
    sonde_e2e::wait_for(Duration::from_secs(120), || written(&format!("burst {}\n", LINES - 1)).then_some(()));
    let logs = receiver
        .wait_for_logs(Duration::from_secs(10), |l| l.iter().filter(|r| r.body.starts_with("burst ")).count() >= LINES);
    let finished = sonde.stop();
    drop(app);

    // Requests: exact, and no socket event was lost to the burst.
    let ok: Vec<_> = spans.iter().filter(|s| s.s("url.path").is_some_and(|p| p.starts_with("/ok/"))).collect();
    assert_eq!(ok.len(), paths.len(), "every request has its span");
    assert_eq!(finished.counter("events_lost"), Some(0), "{}", finished.stderr);
    // Log lines: what did not arrive is counted (each burst line is one write, one record).
    let got = logs.iter().filter(|l| l.body.starts_with("burst ")).count();
    let c = |name| finished.counter(name).unwrap_or(0) as usize;
    let dropped = c("logs_dropped_kernel") + c("logs_dropped_queue_full") + c("logs_dropped_export_failed");
    assert!(got + dropped >= LINES, "{got} burst lines arrived, {dropped} drops counted: {}", finished.stderr);
    assert!(dropped > 0, "the small ring and queue overflowed: the drop path ran ({})", finished.stderr);
    // Shutdown flushed the rest before sonde exited.
    assert_eq!(
        c("logs_exported"),
        receiver.log_records().len(),
        "the receiver got every record sonde says it exported"
    );
    println!(
        "burst: {got} of {LINES} lines arrived, {dropped} dropped and counted (kernel {}, queue full {})",
        c("logs_dropped_kernel"),
        c("logs_dropped_queue_full")
    );
}

/// Log lines holding credentials, each secret marked by `SECRETVALUE`.
const SECRETS: [&str; 14] = [
    "GET /api Authorization: Bearer SECRETVALUE0001",
    "headers {'authorization': 'Basic U0VDUkVUVkFMVUUwMDAy'}",
    "login ok user=alice password=SECRETVALUE0003",
    "retrying with db_passwd=SECRETVALUE0004&retry=1",
    "{\"client_secret\": \"SECRETVALUE0005\", \"n\": 1}",
    "X-Api-Key: SECRETVALUE0006",
    "refresh token=SECRETVALUE0007;",
    "config api_key=SECRETVALUE0008",
    "connecting to postgres://app:SECRETVALUE0009@db:5432/shop",
    "Cookie: session=SECRETVALUE0010",
    "calling upstream with bearer SECRETVALUE0011",
    "secret: SECRETVALUE0012",
    "Proxy-Authorization: Basic SECRETVALUE0013",
    "passwd=SECRETVALUE0014 ok",
];

#[test]
fn privileged_credentials_in_log_lines_never_leave_the_host() {
    let Some(_guard) = privileged_test("log redaction") else {
        return;
    };
    let dir = TempDir::new("logsecrets");
    std::fs::write(dir.path().join("secrets.txt"), SECRETS.join("\n") + "\n").expect("corpus");
    let port = free_port();
    let app = log_app(port, &dir);
    let receiver = HttpReceiver::start();
    let config = test_config(&format!("logs:\n  capture: true\n  files: [\"{}/*.log\"]\n", dir.path().display()));
    let sonde =
        Sonde::start(&["--open-ports", &port.to_string(), "--print", "json"], &config, &otlp_http_env(&receiver));
    sonde_e2e::clients::curl(&["-o", "/dev/null"], &[format!("http://127.0.0.1:{port}/secrets")]);
    // Each corpus line three times: stderr, app.log, and inside a JSON record on stdout.
    let logs = receiver
        .wait_for_logs(WAIT, |l| l.iter().filter(|r| r.body.contains("[REDACTED]")).count() >= 3 * SECRETS.len());
    let finished = sonde.stop();
    drop(app);

    let redacted = logs.iter().filter(|r| r.body.contains("[REDACTED]")).count();
    assert_eq!(redacted, 3 * SECRETS.len(), "every corpus line arrives redacted: {logs:?}");
    let raw = receiver.raw.lock().map(|v| v.concat()).unwrap_or_default();
    for needle in ["SECRETVALUE", "U0VDUkVUVkFMVUUwMDAy"] {
        assert!(memmem(&raw, needle.as_bytes()).is_none(), "{needle} left the host in an export");
        assert!(!finished.stdout.contains(needle), "{needle} printed by --print");
    }
    assert!(finished.counter("logs_redacted").unwrap_or(0) >= 3 * SECRETS.len() as u64, "{}", finished.stderr);
}

fn memmem(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn privileged_log_records_export_over_grpc_with_their_own_endpoint() {
    let Some(_guard) = privileged_test("OTLP logs over gRPC") else {
        return;
    };
    let dir = TempDir::new("loggrpc");
    let port = free_port();
    let app = log_app(port, &dir);
    let traces = HttpReceiver::start();
    let logs_receiver = sonde_e2e::otlp::GrpcReceiver::start();
    // Traces over HTTP to one receiver, logs over gRPC to another: the per-signal variables win.
    let mut env = otlp_http_env(&traces);
    env.push(("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", logs_receiver.endpoint()));
    env.push(("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "grpc".into()));
    let sonde = Sonde::start(&["--open-ports", &port.to_string(), "--capture-logs"], &test_config(""), &env);
    let urls: Vec<String> = (0..5).map(|i| format!("http://127.0.0.1:{port}/ok/{i}")).collect();
    curl_parallel(&urls, 2);
    let spans = traces.collected.wait_for(5, WAIT);
    let received = || logs_receiver.logs.lock().map(|v| v.clone()).unwrap_or_default();
    sonde_e2e::wait_for(WAIT, || {
        (received().iter().filter(|l| l.body.starts_with("access ")).count() >= 5).then_some(())
    });
    let finished = sonde.stop();
    drop(app);
    let logs = received();
    assert!(traces.log_records().is_empty(), "log records go to the logs endpoint only");
    for s in &spans {
        let path = s.s("url.path").expect("path");
        let line = logs.iter().find(|l| l.body == format!("access {path} 200")).expect("access line over gRPC");
        assert_eq!((line.trace_id.as_str(), line.span_id.as_str()), (s.trace_id.as_str(), s.span_id.as_str()));
        assert_eq!(line.resource.get("service.name"), s.resource.get("service.name"));
    }
    assert_eq!(finished.counter("logs_dropped_export_failed"), Some(0), "{}", finished.stderr);
}
