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

    let spans = receiver.collected.wait_for(paths.len(), WAIT);
    let logs = receiver.wait_for_logs(WAIT, |l| {
        l.iter().filter(|r| r.body.starts_with("access ")).count() >= paths.len()
            && l.iter().filter(|r| r.body.starts_with("audit ")).count() >= paths.len()
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
    let heartbeats: Vec<&TestLog> = logs.iter().filter(|l| l.body.starts_with("heartbeat ")).collect();
    assert!(heartbeats.len() >= 5, "{} heartbeat lines", heartbeats.len());
    assert!(heartbeats.iter().all(|l| !l.has_trace()), "a background thread's lines carry no trace");
    assert!(logs.iter().filter(|l| l.body.starts_with("INFO served")).all(|l| l.severity_number == 9));
    assert_eq!(finished.counter("logs_dropped_kernel"), Some(0), "{}", finished.stderr);
    assert_eq!(finished.counter("logs_unlinked_ambiguous"), Some(0), "{}", finished.stderr);
}
