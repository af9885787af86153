//! HTTP/1.x end to end, privileged: sonde loaded for real, real servers, real clients, spans
//! read back through an OTLP receiver. Each test asserts exact span counts.

use std::{collections::BTreeMap, time::Duration};

use sonde_e2e::{
    clients::{KeepAlive, curl, pipelined},
    free_port,
    otlp::{GrpcReceiver, HttpReceiver},
    privileged_test, servers,
    sonde::{Sonde, test_config},
    span::TestSpan,
};

const WAIT: Duration = Duration::from_secs(20);

fn otlp_http_env(r: &HttpReceiver) -> Vec<(&'static str, String)> {
    vec![("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint()), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into())]
}

fn count_by<F: Fn(&TestSpan) -> String>(spans: &[TestSpan], f: F) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in spans {
        *m.entry(f(s)).or_default() += 1;
    }
    m
}

#[test]
fn privileged_python_keepalive_and_pipelined_requests_give_exact_server_spans() {
    let Some(_guard) = privileged_test("python keep-alive + pipelining") else {
        return;
    };
    let port = free_port();
    let server = servers::python_http(port, None);
    let receiver = HttpReceiver::start();
    let sonde = Sonde::start(&["--open-ports", &port.to_string()], &test_config(""), &otlp_http_env(&receiver));

    // 200 requests over one keep-alive connection (curl reuses it for every URL).
    let urls: Vec<String> = (0..200).map(|i| format!("http://127.0.0.1:{port}/items/{i}?secret=tok{i}")).collect();
    curl(&["-o", "/dev/null"], &urls);
    // 20 requests in a single write.
    let reqs: Vec<String> =
        (0..20).map(|i| format!("GET /pipe/{i} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")).collect();
    let replies = pipelined(port, &reqs, 20);
    assert_eq!(replies.matches("HTTP/1.1 200").count(), 20);

    let spans = receiver.collected.wait_for(220, WAIT);
    let finished = sonde.stop();
    assert!(finished.status.success(), "sonde exit: {:?}\n{}", finished.status, finished.stderr);
    assert_eq!(spans.len(), 220, "exactly one span per request; got {:?}", count_by(&spans, |s| s.name.clone()));

    let by_name = count_by(&spans, |s| s.name.clone());
    assert_eq!(by_name.get("GET /items/{id}"), Some(&200));
    assert_eq!(by_name.get("GET /pipe/{id}"), Some(&20));
    for s in &spans {
        assert_eq!(s.kind, "SERVER");
        assert_eq!(s.s("http.request.method"), Some("GET"));
        assert_eq!(s.i("http.response.status_code"), Some(200));
        assert_eq!(s.i("server.port"), Some(port as i64));
        assert_eq!(s.s("url.scheme"), Some("http"));
        assert_eq!(s.s("network.protocol.version"), Some("1.1"));
        assert_eq!(s.s("network.peer.address"), Some("127.0.0.1"));
        assert!(s.i("client.port").is_some_and(|p| p > 0 && p != port as i64));
        assert!(s.end_ns >= s.start_ns && s.end_ns - s.start_ns < 1_000_000_000, "duration within bounds");
        // A runtime is named by what it runs: `python3 .../http_server.py`.
        assert_eq!(s.service(), Some("http_server"), "service.name from the command line");
        assert!(s.parent_id.is_none());
        assert!(!s.error);
    }
    // Every path was seen exactly once; the query value never leaves the host.
    let items: Vec<String> =
        spans.iter().filter_map(|s| s.s("url.path")).filter(|p| p.starts_with("/items/")).map(str::to_owned).collect();
    let mut expected: Vec<String> = (0..200).map(|i| format!("/items/{i}")).collect();
    let mut got = items.clone();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    assert!(
        spans
            .iter()
            .filter(|s| s.s("url.path").is_some_and(|p| p.starts_with("/items/")))
            .all(|s| s.s("url.query") == Some("secret=REDACTED"))
    );
    let pipelined_paths: Vec<&str> =
        spans.iter().filter_map(|s| s.s("url.path")).filter(|p| p.starts_with("/pipe/")).collect();
    assert_eq!(pipelined_paths.len(), 20);
    // Unix timestamps: within a minute of now.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    assert!(spans.iter().all(|s| s.start_ns > now - 60_000_000_000 && s.start_ns <= now));
    assert_eq!(finished.counter("events_lost"), Some(0));
    assert_eq!(finished.counter("http_parse_errors"), Some(0));
    assert_eq!(finished.counter("spans_exported"), Some(220));
    assert!(!finished.stdout.contains("tok1"));
    drop(server);
}

#[test]
fn privileged_nginx_statuses_sizes_and_sendfile() {
    let Some(_guard) = privileged_test("nginx") else {
        return;
    };
    let port = free_port();
    // Started before sonde: its workers are found as descendants of the master.
    let nginx = servers::nginx(port);
    let receiver = HttpReceiver::start();
    let sonde = Sonde::start(&["--exe-path", "/usr/sbin/nginx"], &test_config(""), &otlp_http_env(&receiver));
    let base = format!("http://127.0.0.1:{port}");
    let urls = vec![
        format!("{base}/index.html"),
        format!("{base}/big.bin"),
        format!("{base}/missing"),
        format!("{base}/teapot"),
        format!("{base}/index.html"),
    ];
    curl(&["-o", "/dev/null"], &urls);
    curl(&["-o", "/dev/null", "-I"], &[format!("{base}/big.bin")]);
    curl(&["-o", "/dev/null", "-X", "POST", "--data", "name=value"], &[format!("{base}/teapot")]);
    let spans = receiver.collected.wait_for(7, WAIT);
    let finished = sonde.stop();
    assert_eq!(spans.len(), 7, "{:?}", count_by(&spans, |s| s.name.clone()));
    let by = count_by(&spans, |s| {
        format!(
            "{} {} {}",
            s.s("http.request.method").unwrap_or("?"),
            s.s("url.path").unwrap_or("?"),
            s.i("http.response.status_code").unwrap_or(0)
        )
    });
    let expected: BTreeMap<String, usize> = [
        ("GET /index.html 200", 2),
        ("GET /big.bin 200", 1),
        ("GET /missing 404", 1),
        ("GET /teapot 418", 1),
        ("HEAD /big.bin 200", 1),
        ("POST /teapot 418", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(by, expected);
    let big = spans
        .iter()
        .find(|s| s.s("http.request.method") == Some("GET") && s.s("url.path") == Some("/big.bin"))
        .unwrap();
    assert_eq!(big.i("http.response.body.size"), Some(1 << 20), "sendfile bytes counted");
    let head = spans.iter().find(|s| s.s("http.request.method") == Some("HEAD")).unwrap();
    assert_eq!(head.i("http.response.body.size"), Some(0));
    let post = spans.iter().find(|s| s.s("http.request.method") == Some("POST")).unwrap();
    assert_eq!(post.i("http.request.body.size"), Some(10));
    assert!(spans.iter().all(|s| !s.error), "4xx is not a server error");
    assert!(
        spans.iter().all(|s| s.resource.get("process.executable.name") == Some(&sonde_e2e::span::V::S("nginx".into())))
    );
    assert_eq!(finished.counter("events_lost"), Some(0));
    drop(nginx);
}

#[test]
fn privileged_traceparent_and_child_client_spans() {
    let Some(_guard) = privileged_test("trace context") else {
        return;
    };
    let (front_port, back_port) = (free_port(), free_port());
    let back = servers::python_http(back_port, None);
    let front = servers::python_http(front_port, Some(back_port));
    let receiver = HttpReceiver::start();
    let cfg = test_config(&format!(
        "discovery:\n  - service.name: frontend\n    open_ports: {front_port}\n  - service.name: backend\n    open_ports: {back_port}\n"
    ));
    let sonde = Sonde::start(&[], &cfg, &otlp_http_env(&receiver));
    const N: usize = 10;
    let incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming_parent = "00f067aa0ba902b7";
    for i in 0..N {
        curl(
            &["-o", "/dev/null", "-H", &format!("traceparent: 00-{incoming_trace}-{incoming_parent}-01")],
            &[format!("http://127.0.0.1:{front_port}/call/{i}")],
        );
    }
    let spans = receiver.collected.wait_for(3 * N, WAIT);
    let _ = sonde.stop();
    let front_server: Vec<&TestSpan> =
        spans.iter().filter(|s| s.service() == Some("frontend") && s.kind == "SERVER").collect();
    let front_client: Vec<&TestSpan> =
        spans.iter().filter(|s| s.service() == Some("frontend") && s.kind == "CLIENT").collect();
    let back_server: Vec<&TestSpan> =
        spans.iter().filter(|s| s.service() == Some("backend") && s.kind == "SERVER").collect();
    assert_eq!((front_server.len(), front_client.len(), back_server.len(), spans.len()), (N, N, N, 3 * N));
    for s in &front_server {
        assert_eq!(s.trace_id, incoming_trace, "incoming traceparent honored");
        assert_eq!(s.parent_id.as_deref(), Some(incoming_parent));
        assert_eq!(s.name, "GET /call/{id}");
    }
    for c in &front_client {
        let parent = front_server.iter().find(|s| Some(&s.span_id) == c.parent_id.as_ref());
        let parent = parent.unwrap_or_else(|| panic!("client span {c:?} has no server parent"));
        assert_eq!(c.trace_id, parent.trace_id);
        assert_eq!(c.name, "GET");
        assert_eq!(c.i("server.port"), Some(back_port as i64));
        assert!(c.s("url.full").is_some_and(|u| u.starts_with(&format!("http://127.0.0.1:{back_port}/inner/"))));
        assert_eq!(c.i("http.response.status_code"), Some(200));
        assert!(c.start_ns >= parent.start_ns && c.end_ns <= parent.end_ns, "child inside its parent");
    }
    for b in &back_server {
        assert_eq!(b.name, "GET /inner/{id}");
    }
    drop((front, back));
}

#[test]
fn privileged_existing_connections_and_late_servers_are_traced() {
    let Some(_guard) = privileged_test("existing connections and late servers") else {
        return;
    };
    let early_port = free_port();
    let late_port = free_port();
    let early = servers::python_http(early_port, None);
    let mut conn = KeepAlive::connect(early_port);
    assert!(conn.get("/before").contains("200 OK"));

    let receiver = HttpReceiver::start();
    let sonde = Sonde::start(
        &["--open-ports", &format!("{early_port},{late_port}")],
        &test_config(""),
        &otlp_http_env(&receiver),
    );
    // The connection opened before sonde started. The server thread is already blocked in
    // recvfrom() when sonde attaches: the data syscalls are captured at their exit alone, so
    // /after/0 is traced too.
    for i in 0..3 {
        assert!(conn.get(&format!("/after/{i}")).contains("200 OK"));
    }
    // A server started after sonde: traced within a second of listening.
    let late = servers::python_http(late_port, None);
    std::thread::sleep(Duration::from_secs(1));
    curl(&["-o", "/dev/null"], &[format!("http://127.0.0.1:{late_port}/late")]);
    let spans = receiver.collected.wait_for(4, WAIT);
    let finished = sonde.stop();
    assert_eq!(finished.counter("unmatched_responses"), Some(0), "{}", finished.stderr);
    let paths = count_by(&spans, |s| format!("{}:{}", s.i("server.port").unwrap_or(0), s.s("url.path").unwrap_or("?")));
    let expected: BTreeMap<String, usize> = [
        (format!("{early_port}:/after/0"), 1),
        (format!("{early_port}:/after/1"), 1),
        (format!("{early_port}:/after/2"), 1),
        (format!("{late_port}:/late"), 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(paths, expected);
    drop((early, late));
}

/// A thread-per-connection server whose main thread is already blocked in accept() when sonde
/// attaches: accept is read from the registers at its exit, so the first connection it returns
/// is traced like the next.
#[test]
fn privileged_a_connection_from_an_accept_blocked_before_sonde_is_traced() {
    let Some(_guard) = privileged_test("accept blocked before sonde") else {
        return;
    };
    let port = free_port();
    let server = servers::h2c_upgrade_with(port, &["block-in-accept"]);
    let receiver = HttpReceiver::start();
    let sonde = Sonde::start(&["--pid", &server.pid().to_string()], &test_config(""), &otlp_http_env(&receiver));
    for path in ["/first", "/second"] {
        curl(&["-o", "/dev/null"], &[format!("http://127.0.0.1:{port}{path}")]);
    }
    let spans = receiver.collected.wait_for(2, WAIT);
    let finished = sonde.stop();
    let paths = count_by(&spans, |s| s.s("url.path").unwrap_or("?").to_owned());
    let expected: BTreeMap<String, usize> = [("/first".to_owned(), 1), ("/second".to_owned(), 1)].into_iter().collect();
    assert_eq!(paths, expected, "{}", finished.stderr);
    drop(server);
}

#[test]
fn privileged_grpc_export_and_json_printing() {
    let Some(_guard) = privileged_test("OTLP gRPC") else {
        return;
    };
    let port = free_port();
    let server = servers::python_http(port, None);
    let receiver = GrpcReceiver::start();
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_string()),
        ("OTEL_SERVICE_NAME", "from-env".to_string()),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test".to_string()),
    ];
    let sonde = Sonde::start(&["--open-ports", &port.to_string(), "--print", "json"], &test_config(""), &env);
    let urls: Vec<String> =
        (0..5).map(|i| format!("http://127.0.0.1:{port}/status/{}", if i == 4 { 503 } else { 200 })).collect();
    curl(&["-o", "/dev/null"], &urls);
    let spans = receiver.collected.wait_for(5, WAIT);
    let finished = sonde.stop();
    assert_eq!(spans.len(), 5);
    let printed = finished.json_spans();
    assert_eq!(printed.len(), 5, "--print json prints the same spans");
    let mut ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut printed_ids: Vec<&str> = printed.iter().map(|s| s.span_id.as_str()).collect();
    ids.sort();
    printed_ids.sort();
    assert_eq!(ids, printed_ids);
    assert_eq!(spans.iter().filter(|s| s.error).count(), 1, "the 503 is an error");
    let failed = spans.iter().find(|s| s.error).unwrap();
    assert_eq!(failed.s("error.type"), Some("503"));
    for s in &spans {
        assert_eq!(s.service(), Some("from-env"));
        assert_eq!(s.resource.get("deployment.environment"), Some(&sonde_e2e::span::V::S("test".into())));
        assert_eq!(s.resource.get("process.pid"), Some(&sonde_e2e::span::V::I(server.pid() as i64)));
        assert_eq!(s.s("http.route"), Some("/status/{id}"));
    }
    drop(server);
}

#[test]
fn privileged_backend_down_drops_are_counted_exactly() {
    let Some(_guard) = privileged_test("OTLP backend down") else {
        return;
    };
    let port = free_port();
    let server = servers::python_http(port, None);
    // Nothing listens on the endpoint: every export fails, and is counted.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let cfg = test_config("    queue_spans: 16\n    batch_spans: 8\n");
    let sonde = Sonde::start(&["--open-ports", &port.to_string()], &cfg, &[("OTEL_EXPORTER_OTLP_ENDPOINT", dead)]);
    let urls: Vec<String> = (0..40).map(|i| format!("http://127.0.0.1:{port}/x/{i}")).collect();
    curl(&["-o", "/dev/null"], &urls);
    std::thread::sleep(Duration::from_secs(2));
    let finished = sonde.stop();
    assert!(finished.status.success(), "{}", finished.stderr);
    let created = finished.counter("spans_created").unwrap();
    let failed = finished.counter("spans_dropped_export_failed").unwrap();
    let queue_full = finished.counter("spans_dropped_queue_full").unwrap();
    assert_eq!(created, 40);
    assert_eq!(finished.counter("spans_exported"), Some(0));
    assert_eq!(failed + queue_full, 40, "every span is accounted for: {}", finished.stderr);
    assert!(finished.counter("export_errors").unwrap() >= 1);
    drop(server);
}

#[test]
fn privileged_sampling_changes_exports_not_counts() {
    let Some(_guard) = privileged_test("sampling") else {
        return;
    };
    let port = free_port();
    let server = servers::python_http(port, None);
    let receiver = HttpReceiver::start();
    let mut env = otlp_http_env(&receiver);
    env.push(("OTEL_TRACES_SAMPLER", "parentbased_always_off".into()));
    let sonde = Sonde::start(&["--open-ports", &port.to_string()], &test_config(""), &env);
    // Root spans are dropped by always_off; a sampled incoming parent keeps its child.
    let urls: Vec<String> = (0..6).map(|i| format!("http://127.0.0.1:{port}/s/{i}")).collect();
    curl(&["-o", "/dev/null"], &urls);
    curl(
        &["-o", "/dev/null", "-H", "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
        &[format!("http://127.0.0.1:{port}/kept")],
    );
    let spans = receiver.collected.wait_for(1, WAIT);
    let finished = sonde.stop();
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].s("url.path"), Some("/kept"));
    assert_eq!(spans[0].trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(finished.counter("spans_created"), Some(7));
    assert_eq!(finished.counter("spans_unsampled"), Some(6));
    drop(server);
}
