//! HTTP/2 and gRPC, privileged: real grpcio clients and servers, nginx over cleartext HTTP/2 and
//! TLS with ALPN h2 driven by curl, and Node's http2 over TLS with 100 concurrent streams on one
//! connection. Exact span counts, names, status codes, the RPC error rules, same-host joins by
//! stream, RPC metrics, and a connection opened before sonde that yields no wrong attribute.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::Duration,
};

use sonde_e2e::{
    TempDir,
    clients::{Launcher, curl, scrape},
    free_port,
    otlp::HttpReceiver,
    privileged_test,
    servers::{self, KillOnDrop, fixture},
    sonde::{Sonde, test_config},
    span::TestSpan,
};

const WAIT: Duration = Duration::from_secs(60);

fn env(r: &HttpReceiver) -> Vec<(&'static str, String)> {
    vec![("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint())]
}

fn of_kind<'a>(spans: &'a [TestSpan], kind: &str) -> Vec<&'a TestSpan> {
    spans.iter().filter(|s| s.kind == kind).collect()
}

/// (span name, rpc.status_code) -> count.
fn calls(spans: &[&TestSpan]) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    for s in spans {
        let key = (s.name.clone(), s.s("rpc.status_code").unwrap_or("none").to_owned());
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

/// `name{labels} value` samples of one metric, as label maps with their values.
fn samples(exposition: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    exposition
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.split_once("} ")?;
            let labels = labels
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            Some((labels, value.split(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// grpcio client and server, both traced: every call is one CLIENT and one SERVER span with the
/// conventions' names and status codes, errors by the client and server rules, each server
/// span the child of its client span (joined by stream id), and the RPC duration metrics count
/// each call by method and status.
#[test]
fn privileged_grpcio_calls_are_exact_on_both_sides() {
    let Some(_guard) = privileged_test("gRPC (grpcio)") else { return };
    let port = free_port();
    let _server = servers::grpc(port);
    let mut client = Launcher::start();
    let receiver = HttpReceiver::start();
    let prometheus = free_port();
    let config = test_config(&format!(
        "discovery:\n  - service.name: greeter\n    open_ports: {port}\n  - service.name: caller\n    pid: [{}]\n",
        client.pid()
    ));
    let sonde = Sonde::start(&["--prometheus-port", &prometheus.to_string()], &config, &env(&receiver));
    let script = fixture("grpc_app.py");
    assert_eq!(client.run(&format!("python3 {} call {port} mixed 10", script.display())), 0);

    // 10 OK + 5 errors + 3 server streams + 2 client streams + 2 bidi + 1 unknown method.
    let spans = receiver.collected.wait_for(2 * 23, WAIT);
    let (servers, clients) = (of_kind(&spans, "SERVER"), of_kind(&spans, "CLIENT"));
    let expected: BTreeMap<(String, String), usize> = [
        ("demo.Greeter/SayHello", "OK", 10),
        ("demo.Greeter/SayHello", "INVALID_ARGUMENT", 1),
        ("demo.Greeter/SayHello", "NOT_FOUND", 1),
        ("demo.Greeter/SayHello", "INTERNAL", 1),
        ("demo.Greeter/SayHello", "UNAVAILABLE", 1),
        ("demo.Greeter/SayHello", "PERMISSION_DENIED", 1),
        ("demo.Greeter/Countdown", "OK", 3),
        ("demo.Greeter/Collect", "OK", 2),
        ("demo.Greeter/Chat", "OK", 2),
        ("grpc", "UNIMPLEMENTED", 1),
    ]
    .into_iter()
    .map(|(n, s, c)| ((n.to_owned(), s.to_owned()), c))
    .collect();
    assert_eq!(calls(&servers), expected, "server spans: {servers:#?}");
    assert_eq!(calls(&clients), expected, "client spans: {clients:#?}");
    assert_eq!(spans.len(), 46, "no other spans");

    for s in &spans {
        assert_eq!(s.s("rpc.system.name"), Some("grpc"), "{s:#?}");
        let side = if s.kind == "SERVER" { "greeter" } else { "caller" };
        assert_eq!(s.service(), Some(side));
        let status = s.s("rpc.status_code").expect("status");
        // Errors: any non-OK on the client; on the server only the server-fault codes.
        let server_fault = ["UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"];
        let failed = if s.kind == "CLIENT" { status != "OK" } else { server_fault.contains(&status) };
        assert_eq!(s.error, failed, "{s:#?}");
        assert_eq!(s.s("error.type"), failed.then_some(status), "{s:#?}");
        assert_eq!(s.s("server.address"), Some("127.0.0.1"));
        assert_eq!(s.i("server.port"), Some(i64::from(port)));
        if s.name == "grpc" {
            assert_eq!(s.s("rpc.method"), Some("_OTHER"));
            assert_eq!(s.s("rpc.method_original"), Some("demo.Greeter/Missing"));
        } else {
            assert_eq!(s.s("rpc.method"), Some(s.name.as_str()));
        }
        assert!(!format!("{s:?}").contains("SECRETVALUE"), "metadata values are never exported: {s:#?}");
        // Messages each way, the same from both ends: unary `n0` -> `hello n0`, an error
        // answers none, Countdown `5` -> 5 replies, Collect 4 -> `4`, Chat echoes 3.
        let tally = |way: &str| {
            let n = s.i(&format!("sonde.rpc.{way}.message_count"));
            (n, s.i(&format!("sonde.rpc.{way}.message_bytes")))
        };
        let (request, response) = match (s.name.as_str(), status) {
            ("demo.Greeter/SayHello", "OK") => ((1, 2..=2), (1, 8..=8)),
            ("demo.Greeter/SayHello", _) => ((1, 10..=22), (0, 0..=0)),
            ("demo.Greeter/Countdown", _) => ((1, 1..=1), (5, 5..=5)),
            ("demo.Greeter/Collect", _) => ((4, 4..=4), (1, 1..=1)),
            ("demo.Greeter/Chat", _) => ((3, 3..=3), (3, 3..=3)),
            _ => ((1, 1..=1), (0, 0..=0)),
        };
        for (way, (count, bytes)) in [("request", request), ("response", response)] {
            let (got_count, got_bytes) = tally(way);
            assert_eq!(got_count, Some(count), "{way} messages: {s:#?}");
            assert!(got_bytes.is_some_and(|b| bytes.contains(&b)), "{way} message bytes: {s:#?}");
        }
    }

    // Same-host joins by stream id: each server span is the child of the client span of the
    // same call, in its trace.
    for server in &servers {
        let parent = clients
            .iter()
            .find(|c| Some(&c.span_id) == server.parent_id.as_ref())
            .unwrap_or_else(|| panic!("server span without its client parent: {server:#?}"));
        assert_eq!(parent.trace_id, server.trace_id);
        assert_eq!((&parent.name, parent.s("rpc.status_code")), (&server.name, server.s("rpc.status_code")));
    }

    // RPC duration metrics: every call, by method and status.
    let exposition = scrape(prometheus);
    for (metric, service) in
        [("rpc_server_call_duration_seconds_count", "greeter"), ("rpc_client_call_duration_seconds_count", "caller")]
    {
        let mut counted: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (labels, value) in samples(&exposition, metric) {
            assert_eq!(labels.get("service_name").map(String::as_str), Some(service), "{labels:?}");
            assert_eq!(labels.get("rpc_system_name").map(String::as_str), Some("grpc"));
            let method = labels["rpc_method"].replace("_OTHER", "grpc");
            *counted.entry((method, labels["rpc_status_code"].clone())).or_insert(0) += value as usize;
        }
        assert_eq!(counted, expected, "{metric}:\n{exposition}");
    }
    let finished = sonde.stop();
    assert_eq!(finished.counter("http2_parse_errors"), Some(0), "{}", finished.stderr);
    assert_eq!(finished.counter("unmatched_requests"), Some(0), "{}", finished.stderr);
}

/// A gRPC server that makes gRPC calls (a relay, grpcio): 8 client threads call it at once, it
/// forwards each call to a backend, twice. Across processes each span joins its caller by stream id.
/// Inside the relay, gRPC's I/O threads read requests and write calls for whichever handler
/// asks, so the reading thread is no evidence: a call nests under the request in flight with
/// its own method when that request is the only one (distinct methods: every call links, to
/// the right parent), and stays unlinked, counted, when several share it (one method).
#[test]
fn privileged_grpc_relay_calls_nest_only_on_evidence() {
    let Some(_guard) = privileged_test("gRPC relay parenting") else { return };
    let (back_port, relay_port) = (free_port(), free_port());
    let backend = servers::grpc(back_port);
    let relay = servers::grpc_relay(relay_port, back_port);
    let mut client = Launcher::start();
    let receiver = HttpReceiver::start();
    let config = test_config(&format!(
        "discovery:\n  - service.name: backend\n    pid: [{}]\n  - service.name: relay\n    pid: [{}]\n  - service.name: caller\n    pid: [{}]\n",
        backend.pid(),
        relay.pid(),
        client.pid()
    ));
    let sonde = Sonde::start(&[], &config, &env(&receiver));
    let script = fixture("grpc_app.py");
    for scenario in ["relay", "relay-same"] {
        assert_eq!(client.run(&format!("python3 {} call {relay_port} {scenario} 10", script.display())), 0);
    }
    // 160 calls, each seen as caller CLIENT and relay SERVER, then twice as relay CLIENT and
    // backend SERVER.
    let spans = receiver.collected.wait_for(960, WAIT);
    let mut seen: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for s in &spans {
        *seen.entry((s.service().unwrap_or("?").to_owned(), s.kind.clone(), s.name.clone())).or_insert(0) += 1;
    }
    assert_eq!(spans.len(), 960, "{seen:#?}");
    let of = |service: &str, kind: &str| -> Vec<&TestSpan> {
        spans.iter().filter(|s| s.service() == Some(service) && s.kind == kind).collect()
    };
    let (callers, relay_in, relay_out, backend_in) =
        (of("caller", "CLIENT"), of("relay", "SERVER"), of("relay", "CLIENT"), of("backend", "SERVER"));
    for (what, list, per_call) in
        [("caller", &callers, 1), ("relay in", &relay_in, 1), ("relay out", &relay_out, 2), ("backend", &backend_in, 2)]
    {
        let mut by_method: BTreeMap<String, usize> = BTreeMap::new();
        for s in list.iter() {
            assert_eq!(s.s("rpc.status_code"), Some("OK"), "{s:#?}");
            *by_method.entry(s.name.clone()).or_insert(0) += 1;
        }
        let mut want: BTreeMap<String, usize> =
            (0..8).map(|i| (format!("demo.Relay/Call{i}"), 10 * per_call)).collect();
        *want.get_mut("demo.Relay/Call0").unwrap() += 80 * per_call;
        assert_eq!(by_method, want, "{what}");
    }
    let by_id: BTreeMap<&str, &TestSpan> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let parent_of = |s: &TestSpan| s.parent_id.as_deref().and_then(|p| by_id.get(p).copied());
    // Across processes: joined by stream id, the same method.
    for (children, parents) in [(&relay_in, "caller"), (&backend_in, "relay")] {
        for s in children.iter() {
            let p = parent_of(s).unwrap_or_else(|| panic!("{} without its caller: {s:#?}", s.name));
            assert_eq!((p.service(), p.kind.as_str(), p.name.as_str()), (Some(parents), "CLIENT", s.name.as_str()));
            assert_eq!(p.trace_id, s.trace_id);
        }
    }
    // Inside the relay: a parent only on evidence, and then the right one.
    let (mut linked_distinct, mut linked_same, mut unlinked) = (0, 0, 0);
    for s in &relay_out {
        let Some(p) = parent_of(s) else {
            assert_eq!(s.name, "demo.Relay/Call0", "a call with a method of its own always has evidence: {s:#?}");
            unlinked += 1;
            continue;
        };
        assert_eq!(
            (p.service(), p.kind.as_str(), p.name.as_str()),
            (Some("relay"), "SERVER", s.name.as_str()),
            "{s:#?}"
        );
        assert!(p.start_ns <= s.start_ns && s.end_ns <= p.end_ns, "the call lies within the request it serves");
        if s.name == "demo.Relay/Call0" { linked_same += 1 } else { linked_distinct += 1 }
    }
    assert_eq!(linked_distinct, 140, "every call of Call1..Call7 nests under its request");
    eprintln!("one method from 8 threads: {linked_same} linked, {unlinked} unlinked");
    let finished = sonde.stop();
    let counted = finished.counter("context_unlinked_ambiguous").unwrap_or(0)
        + finished.counter("context_unlinked_other_thread").unwrap_or(0);
    assert_eq!(counted, unlinked, "every unlinked call is counted: {}", finished.stderr);
    assert_eq!(finished.counter("http2_parse_errors"), Some(0), "{}", finished.stderr);
    drop(relay);
    drop(backend);
}

/// nginx with HTTP/2 on a cleartext listener (curl --http2-prior-knowledge) and a TLS listener
/// (ALPN h2, decrypted at nginx's OpenSSL): one SERVER span per request, version 2.
#[test]
fn privileged_nginx_cleartext_and_tls_http2() {
    let Some(_guard) = privileged_test("nginx HTTP/2") else { return };
    let (plain, tls) = (free_port(), free_port());
    let nginx = servers::nginx_h2(plain, tls);
    let receiver = HttpReceiver::start();
    let config = test_config(&format!("discovery:\n  - service.name: edge\n    pid: [{}]\n", nginx.pid()));
    let sonde = Sonde::start(&[], &config, &env(&receiver));
    // curl 7.88 reuses a prior-knowledge connection for nothing: one request per connection.
    let paths = ["/index.html", "/missing", "/teapot", "/index.html?user=7"];
    for path in paths {
        curl(&["--http2-prior-knowledge", "-o", "/dev/null"], &[format!("http://127.0.0.1:{plain}{path}")]);
    }
    // Over TLS one connection carries all four.
    let urls: Vec<String> = paths.iter().map(|p| format!("https://127.0.0.1:{tls}{p}")).collect();
    curl(&["-k", "--http2", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null"], &urls);

    let spans = receiver.collected.wait_for(8, WAIT);
    assert_eq!(spans.len(), 8, "{spans:#?}");
    for (port, scheme) in [(plain, "http"), (tls, "https")] {
        let mut got: Vec<(String, String, i64)> = spans
            .iter()
            .filter(|s| s.i("server.port") == Some(i64::from(port)))
            .map(|s| {
                assert_eq!(s.kind, "SERVER");
                assert_eq!(s.s("network.protocol.version"), Some("2"), "{s:#?}");
                assert_eq!(s.s("url.scheme"), Some(scheme), "{s:#?}");
                assert_eq!(s.s("http.request.method"), Some("GET"));
                assert_eq!(s.service(), Some("edge"));
                (
                    s.name.clone(),
                    s.s("url.path").unwrap_or("").to_owned(),
                    s.i("http.response.status_code").unwrap_or(0),
                )
            })
            .collect();
        got.sort();
        let mut want = vec![
            ("GET /index.html".to_owned(), "/index.html".to_owned(), 200),
            ("GET /index.html".to_owned(), "/index.html".to_owned(), 200),
            ("GET /missing".to_owned(), "/missing".to_owned(), 404),
            ("GET /teapot".to_owned(), "/teapot".to_owned(), 418),
        ];
        want.sort();
        assert_eq!(got, want, "{scheme}: {spans:#?}");
        let query = spans.iter().find(|s| s.i("server.port") == Some(i64::from(port)) && s.s("url.query").is_some());
        assert_eq!(query.and_then(|s| s.s("url.query")), Some("user=REDACTED"));
    }
    // An incoming traceparent (an HPACK literal) is honored: the span continues that trace.
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    curl(
        &["--http2-prior-knowledge", "-o", "/dev/null", "-H", &format!("traceparent: 00-{trace}-{parent}-01")],
        &[format!("http://127.0.0.1:{plain}/index.html")],
    );
    let spans = receiver.collected.wait_for(9, WAIT);
    let continued: Vec<&TestSpan> = spans.iter().filter(|s| s.trace_id == trace).collect();
    assert_eq!(continued.len(), 1, "{spans:#?}");
    assert_eq!(continued[0].parent_id.as_deref(), Some(parent));
    let finished = sonde.stop();
    assert_eq!(finished.counter("http2_parse_errors"), Some(0), "{}", finished.stderr);
    drop(nginx);
}

/// curl `--http2` on `http://` asks to upgrade (`Upgrade: h2c`); a Python `h2` server accepts:
/// the upgrading request is answered on stream 1, the next two go as streams 3 and 5 on the
/// same connection. Both ends traced: exact spans, version 2, and each server span joined to
/// its own client span. curl peeks a byte (`MSG_PEEK`) before reusing the connection: a peek
/// taken for data broke the client's framing.
#[test]
fn privileged_h2c_upgrade_from_http1() {
    let Some(_guard) = privileged_test("h2c upgrade") else { return };
    let port = free_port();
    let server = servers::h2c_upgrade(port);
    let mut client = Launcher::start();
    let receiver = HttpReceiver::start();
    let config = test_config(&format!(
        "discovery:\n  - service.name: h2c-server\n    pid: [{}]\n  - service.name: h2c-client\n    pid: [{}]\n",
        server.pid(),
        client.pid()
    ));
    let sonde = Sonde::start(&[], &config, &env(&receiver));
    let urls = ["/a", "/missing", "/b?user=7"].map(|p| format!("'http://127.0.0.1:{port}{p}'")).join(" ");
    assert_eq!(client.run(&format!("curl -s --http2 -o /dev/null -o /dev/null -o /dev/null {urls}")), 0);

    let spans = receiver.collected.wait_for(6, WAIT);
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let path_of = |s: &TestSpan| {
        s.s("url.path")
            .map(str::to_owned)
            .or_else(|| s.s("url.full").and_then(|u| u.rsplit_once(&port.to_string()).map(|(_, p)| p.to_owned())))
            .unwrap_or_default()
    };
    let (servers, clients) = (of_kind(&spans, "SERVER"), of_kind(&spans, "CLIENT"));
    assert_eq!((servers.len(), clients.len()), (3, 3), "{spans:#?}");
    let mut got: Vec<(String, i64)> =
        servers.iter().map(|s| (path_of(s), s.i("http.response.status_code").unwrap_or(0))).collect();
    got.sort();
    assert_eq!(got, [("/a".to_owned(), 200), ("/b".to_owned(), 200), ("/missing".to_owned(), 404)]);
    for server in &servers {
        assert_eq!(server.s("network.protocol.version"), Some("2"), "{server:#?}");
        assert_eq!(server.s("http.request.method"), Some("GET"));
        assert_eq!(server.service(), Some("h2c-server"));
        let path = path_of(server);
        let client = clients.iter().find(|c| path_of(c).starts_with(&path)).expect("its client span");
        assert_eq!(client.s("network.protocol.version"), Some("2"), "{client:#?}");
        assert_eq!(client.i("http.response.status_code"), server.i("http.response.status_code"));
        assert_eq!(server.parent_id.as_ref(), Some(&client.span_id), "{path}: joined to its own client span");
        assert_eq!(server.trace_id, client.trace_id);
    }
    let query = servers.iter().find(|s| s.s("url.query").is_some()).and_then(|s| s.s("url.query"));
    assert_eq!(query, Some("user=REDACTED"));
    let finished = sonde.stop();
    assert_eq!(finished.counter("http2_parse_errors"), Some(0), "{}", finished.stderr);
    assert_eq!(finished.counter("http_parse_errors"), Some(0), "{}", finished.stderr);
    assert_eq!(finished.counter("unmatched_requests"), Some(0), "{}", finished.stderr);
    drop(server);
}

/// Node's http2 client and server over TLS, 100 concurrent streams on one connection, answered
/// out of order: each stream is one CLIENT and one SERVER span with its own path and status,
/// and each server span is the child of the client span of the same stream.
#[test]
fn privileged_node_http2_tls_hundred_concurrent_streams() {
    let Some(_guard) = privileged_test("Node.js http2 over TLS") else { return };
    let port = free_port();
    let server = servers::node_h2(port);
    let mut client = Launcher::start();
    let receiver = HttpReceiver::start();
    let config = test_config(&format!(
        "discovery:\n  - service.name: h2-server\n    pid: [{}]\n  - service.name: h2-client\n    pid: [{}]\n",
        server.pid(),
        client.pid()
    ));
    let sonde = Sonde::start(&[], &config, &env(&receiver));
    assert_eq!(client.run(&format!("node {} client {port} 100", fixture("node_h2.js").display())), 0);

    let spans = receiver.collected.wait_for(200, WAIT);
    assert_eq!(spans.len(), 200, "{}", spans.len());
    let by_path = |kind: &str| -> BTreeMap<String, &TestSpan> {
        let list = of_kind(&spans, kind);
        let map: BTreeMap<String, &TestSpan> = list
            .iter()
            .map(|s| {
                let path = s
                    .s("url.path")
                    .or_else(|| s.s("url.full").and_then(|u| u.rsplit_once(&port.to_string()).map(|(_, p)| p)));
                (path.unwrap_or("?").to_owned(), *s)
            })
            .collect();
        assert_eq!(map.len(), 100, "{kind}: one span per path: {list:#?}");
        map
    };
    let (servers, clients) = (by_path("SERVER"), by_path("CLIENT"));
    for i in 0..100 {
        let path = format!("/s/{i}");
        let status = if i % 10 == 0 { 404 } else { 200 };
        let (server, client) = (servers[&path], clients[&path]);
        assert_eq!(server.i("http.response.status_code"), Some(status), "{server:#?}");
        assert_eq!(client.i("http.response.status_code"), Some(status), "{client:#?}");
        assert_eq!(client.error, status == 404, "client spans fail on 4xx");
        assert_eq!(server.s("network.protocol.version"), Some("2"));
        assert_eq!(server.s("url.scheme"), Some("https"));
        assert_eq!(server.parent_id.as_ref(), Some(&client.span_id), "stream {path}: joined to its own client span");
        assert_eq!(server.trace_id, client.trace_id);
    }
    let finished = sonde.stop();
    assert_eq!(finished.counter("http2_parse_errors"), Some(0), "{}", finished.stderr);
    assert_eq!(finished.counter("unmatched_requests"), Some(0), "{}", finished.stderr);
    // Node accepts without an address buffer; the addresses come from /proc, read at once.
    assert_eq!(finished.counter("context_unlinked_address_unknown"), Some(0), "{}", finished.stderr);
}

/// A gRPC connection opened (and its header tables filled) before sonde started: the calls
/// after are traced without a wrong attribute; what refers to table entries sonde never saw is
/// left out and counted.
#[test]
fn privileged_grpc_connection_opened_before_sonde() {
    let Some(_guard) = privileged_test("gRPC mid-stream") else { return };
    let port = free_port();
    let server = servers::grpc(port);
    let dir = TempDir::new("grpc-gate");
    let gate = dir.path().join("go");
    let mut client = Command::new("python3")
        .arg(fixture("grpc_app.py"))
        .args(["call", &port.to_string(), "hold", "5"])
        .arg(&gate)
        .process_group(0)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start grpc client");
    let mut lines = BufReader::new(client.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("phase 1"));
    let client = KillOnDrop(client);
    let receiver = HttpReceiver::start();
    let config = test_config(&format!(
        "discovery:\n  - service.name: greeter\n    pid: [{}]\n  - service.name: caller\n    pid: [{}]\n",
        server.pid(),
        client.0.id()
    ));
    let metrics = free_port();
    let sonde = Sonde::start(&["--prometheus-port", &metrics.to_string()], &config, &env(&receiver));
    std::fs::write(&gate, b"").expect("open the gate");
    let summary = lines.next().and_then(Result::ok).expect("the client's summary");
    assert!(summary.contains("\"OK\": 10"), "{summary}");

    // The five calls after the gate, seen from both ends; nothing more comes.
    receiver.collected.wait_for(10, WAIT);
    std::thread::sleep(Duration::from_secs(1));
    let spans = receiver.collected.spans();
    assert_eq!(spans.len(), 10, "{spans:#?}");
    for s in &spans {
        // Whatever is said is right: the method when decoded, never another.
        if let Some(method) = s.s("rpc.method") {
            assert_eq!(method, "demo.Greeter/SayHello", "{s:#?}");
            assert_eq!(s.s("rpc.status_code").unwrap_or("OK"), "OK", "{s:#?}");
        } else {
            // gRPC's content-type was not decodable: an HTTP/2 exchange, without made-up fields.
            assert_eq!(s.s("network.protocol.version"), Some("2"), "{s:#?}");
            assert!(s.s("url.path").is_none_or(|p| p == "/demo.Greeter/SayHello"), "{s:#?}");
            assert!(s.s("http.request.method").is_none_or(|m| m == "POST"), "{s:#?}");
        }
    }
    let undecodable = sonde_e2e::clients::sample(&scrape(metrics), "sonde_http2_fields_undecodable_total");
    assert!(undecodable.is_some_and(|n| n > 0.0), "fields sonde could not decode are counted");
    let finished = sonde.stop();
    assert!(finished.status.success(), "{}", finished.stderr);
    drop(client);
    drop(server);
}
