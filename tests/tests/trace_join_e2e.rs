//! Connected traces, privileged: a request crossing several traced services on this host is one
//! trace (same-host joins by connection and request position), in-process parents are set only
//! on evidence, and nothing is ever linked to the wrong request, under concurrency.

use std::{collections::BTreeMap, time::Duration};

use sonde_e2e::{
    clients::Launcher,
    free_port,
    otlp::HttpReceiver,
    privileged_test,
    servers::{self, fixture},
    sonde::{Finished, Sonde, test_config},
    span::TestSpan,
};

const WAIT: Duration = Duration::from_secs(60);

fn env(r: &HttpReceiver) -> Vec<(&'static str, String)> {
    vec![("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint())]
}

fn selectors(services: &[(&str, u16)]) -> String {
    let mut yaml = String::from("discovery:\n");
    for (name, port) in services {
        yaml.push_str(&format!("  - service.name: {name}\n    open_ports: {port}\n"));
    }
    test_config(&yaml)
}

/// Spans of each trace.
fn traces(spans: &[TestSpan]) -> BTreeMap<String, Vec<&TestSpan>> {
    let mut by_trace: BTreeMap<String, Vec<&TestSpan>> = BTreeMap::new();
    for s in spans {
        by_trace.entry(s.trace_id.clone()).or_default().push(s);
    }
    by_trace
}

/// The one span of `trace` matching `pred`.
fn one<'a>(trace: &[&'a TestSpan], what: &str, pred: impl Fn(&TestSpan) -> bool) -> &'a TestSpan {
    let found: Vec<&&TestSpan> = trace.iter().filter(|s| pred(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "{what}: {:#?}",
        trace.iter().map(|s| (&s.kind, &s.name, s.service())).collect::<Vec<_>>()
    );
    found[0]
}

fn path_is(s: &TestSpan, path: &str) -> bool {
    s.s("url.path") == Some(path) || s.s("url.full").is_some_and(|u| u.ends_with(path))
}

fn counter(finished: &Finished, name: &str) -> u64 {
    finished.counter(name).unwrap_or_else(|| panic!("no {name} in the final counters:\n{}", finished.stderr))
}

/// The demo's chain, all four traced: frontend -> orders -> PostgreSQL + Redis. One trace per
/// request with exactly its nine spans and the right parent at every hop.
#[test]
fn privileged_frontend_orders_and_databases_are_one_trace_per_request() {
    let Some(_guard) = privileged_test("same-host chain") else { return };
    let (frontend_port, orders_port, pg_port, redis_port) = (free_port(), free_port(), free_port(), free_port());
    let pg = servers::postgres(pg_port);
    let redis = servers::redis(redis_port);
    let orders = servers::python_app_with(orders_port, pg_port, redis_port, true);
    let frontend = servers::python_http(frontend_port, Some(orders_port));
    let receiver = HttpReceiver::start();
    let config = selectors(&[
        ("frontend", frontend_port),
        ("orders", orders_port),
        ("postgres", pg_port),
        ("redis", redis_port),
    ]);
    let metrics_port = free_port();
    let sonde = Sonde::start(&["--prometheus-port", &metrics_port.to_string()], &config, &env(&receiver));

    // The first request opens the database connections (their setup spans join its trace).
    sonde_e2e::clients::curl(&["-o", "/dev/null"], &[format!("http://127.0.0.1:{frontend_port}/call/100")]);
    const N: usize = 12;
    let urls: Vec<String> = (1..=N).map(|i| format!("http://127.0.0.1:{frontend_port}/call/{i}")).collect();
    sonde_e2e::clients::curl(&["-o", "/dev/null"], &urls);
    let _ = receiver.collected.wait_for(9 * (N + 1), WAIT);
    std::thread::sleep(Duration::from_secs(2));
    let exposition = sonde_e2e::clients::scrape(metrics_port);
    let finished = sonde.stop();
    let spans = receiver.collected.spans();
    let by_trace = traces(&spans);

    // Service graph: one edge per pair of services that talked, counting exactly the requests
    // whose server span joined a client span of the other service.
    let mut edges: BTreeMap<(String, String), usize> = BTreeMap::new();
    for s in spans.iter().filter(|s| s.kind == "SERVER") {
        if let Some(parent) = spans.iter().find(|p| s.parent_id.as_ref() == Some(&p.span_id)) {
            *edges.entry((parent.service().unwrap_or("").into(), s.service().unwrap_or("").into())).or_default() += 1;
        }
    }
    assert_eq!(edges.get(&("frontend".into(), "orders".into())), Some(&(N + 1)), "{edges:?}");
    assert_eq!(edges.len(), 3, "frontend->orders, orders->postgres, orders->redis: {edges:?}");
    for ((client, server), n) in &edges {
        let series = format!(
            "traces_service_graph_request_total{{client=\"{client}\",server=\"{server}\",connection_type=\"\"}}"
        );
        assert_eq!(sonde_e2e::clients::sample(&exposition, &series), Some(*n as f64), "{series}\n{exposition}");
        let count = format!(
            "traces_service_graph_request_client_seconds_count{{client=\"{client}\",server=\"{server}\",connection_type=\"\"}}"
        );
        assert_eq!(sonde_e2e::clients::sample(&exposition, &count), Some(*n as f64), "{count}");
    }
    // curl is not traced, so the frontend's server spans are no edge; nothing else is either.
    assert_eq!(exposition.lines().filter(|l| l.starts_with("traces_service_graph_request_total{")).count(), 3);

    for i in (1..=N).chain([100]) {
        let root = spans
            .iter()
            .find(|s| s.kind == "SERVER" && s.service() == Some("frontend") && path_is(s, &format!("/call/{i}")))
            .unwrap_or_else(|| panic!("no frontend span for /call/{i}"));
        let trace = &by_trace[&root.trace_id];
        assert_eq!(root.parent_id, None);
        let call = one(trace, "frontend CLIENT", |s| s.kind == "CLIENT" && s.service() == Some("frontend"));
        assert!(path_is(call, &format!("/inner/{i}")), "{call:?}");
        assert_eq!(call.parent_id.as_ref(), Some(&root.span_id));
        let orders = one(trace, "orders SERVER", |s| s.kind == "SERVER" && s.service() == Some("orders"));
        assert!(path_is(orders, &format!("/inner/{i}")), "{orders:?}");
        assert_eq!(orders.parent_id.as_ref(), Some(&call.span_id), "orders continues the frontend's call");
        // Every database call of orders is its child, and each has its server span as child.
        let db_calls: Vec<&&TestSpan> =
            trace.iter().filter(|s| s.kind == "CLIENT" && s.service() == Some("orders")).collect();
        for c in &db_calls {
            assert_eq!(c.parent_id.as_ref(), Some(&orders.span_id), "{c:?}");
            let server =
                one(trace, "database SERVER", |s| s.kind == "SERVER" && s.parent_id.as_ref() == Some(&c.span_id));
            assert_eq!(server.name, c.name);
            assert!(matches!(server.service(), Some("postgres" | "redis")), "{server:?}");
        }
        // Everything in the trace hangs off the root.
        for s in trace {
            assert!(
                s.span_id == root.span_id || trace.iter().any(|p| s.parent_id.as_ref() == Some(&p.span_id)),
                "{s:?}"
            );
        }
        if i != 100 {
            let mut names: Vec<&str> = db_calls.iter().map(|c| c.name.as_str()).collect();
            names.sort_unstable();
            assert_eq!(names, ["GET", "INCRBY", "SELECT customers"], "/call/{i}");
            assert_eq!(trace.len(), 9, "/call/{i}: {:?}", trace.iter().map(|s| &s.name).collect::<Vec<_>>());
        }
    }
    assert_eq!(by_trace.len(), N + 1, "one trace per request and nothing else");
    assert_eq!(counter(&finished, "events_lost"), 0);
    // Four joins per request (orders, and the three database calls), more in the first.
    assert!(counter(&finished, "context_joined") >= 4 * (N as u64 + 1), "{}", finished.stderr);
    assert_eq!(counter(&finished, "context_unlinked"), 0, "{}", finished.stderr);
    drop((frontend, orders, pg, redis));
}

/// Pipelined requests from a traced client to a traced server over one connection: the Nth
/// request written is the Nth read, each server span the child of its client span.
#[test]
fn privileged_pipelined_requests_join_in_order() {
    let Some(_guard) = privileged_test("pipelined join") else { return };
    let port = free_port();
    let server = servers::python_http(port, None);
    let mut launcher = Launcher::start();
    let receiver = HttpReceiver::start();
    // A loaded machine lets the client read all 30 responses (about 4.5 KB) in one recv: the
    // capture must hold them, or the last ones are lost (counted, but not what this tests).
    let config = test_config(&format!(
        "capture:\n  max_bytes: 8192\ndiscovery:\n  - service.name: server\n    open_ports: {port}\n  - service.name: client\n    pid: [{}]\n",
        launcher.pid()
    ));
    let sonde = Sonde::start(&[], &config, &env(&receiver));
    const N: usize = 30;
    let client = fixture("http_pipeline_client.py");
    assert_eq!(launcher.run(&format!("python3 {} {port} {N}", client.display())), 0);
    let spans = receiver.collected.wait_for(2 * N, WAIT);
    let finished = sonde.stop();
    let missing: Vec<String> = (0..N)
        .flat_map(|i| ["CLIENT", "SERVER"].map(|k| (i, k)))
        .filter(|(i, k)| !spans.iter().any(|s| s.kind == *k && path_is(s, &format!("/pipe/{i}"))))
        .map(|(i, k)| format!("{k} /pipe/{i}"))
        .collect();
    assert_eq!(spans.len(), 2 * N, "missing {missing:?}\n{}", finished.stderr);
    for i in 0..N {
        let path = format!("/pipe/{i}");
        let c = one(&spans.iter().collect::<Vec<_>>(), "client", |s| s.kind == "CLIENT" && path_is(s, &path));
        let s = one(&spans.iter().collect::<Vec<_>>(), "server", |s| s.kind == "SERVER" && path_is(s, &path));
        assert_eq!(s.parent_id.as_ref(), Some(&c.span_id), "{path}");
        assert_eq!(s.trace_id, c.trace_id, "{path}");
    }
    assert_eq!(counter(&finished, "context_joined"), N as u64);
    drop(server);
}

/// Parent-based ratio sampling at 0.5 across two traced services: the callee follows the
/// caller's decision, so every trace is exported whole or not at all.
#[test]
fn privileged_sampling_keeps_joined_traces_whole() {
    let Some(_guard) = privileged_test("sampled joins") else { return };
    let (front, back) = (free_port(), free_port());
    let backend = servers::python_http(back, None);
    let frontend = servers::python_http(front, Some(back));
    let receiver = HttpReceiver::start();
    let mut e = env(&receiver);
    e.push(("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()));
    e.push(("OTEL_TRACES_SAMPLER_ARG", "0.5".into()));
    let sonde = Sonde::start(&[], &selectors(&[("front", front), ("back", back)]), &e);
    const N: usize = 60;
    let urls: Vec<String> = (0..N).map(|i| format!("http://127.0.0.1:{front}/call/{i}")).collect();
    sonde_e2e::clients::curl(&["-o", "/dev/null"], &urls);
    std::thread::sleep(Duration::from_secs(3));
    let finished = sonde.stop();
    let spans = receiver.collected.spans();
    let by_trace = traces(&spans);
    for (id, trace) in &by_trace {
        assert_eq!(trace.len(), 3, "trace {id} exported in part: {trace:#?}");
    }
    assert!((5..=N - 5).contains(&by_trace.len()), "{} of {N} traces sampled", by_trace.len());
    assert_eq!(counter(&finished, "spans_unsampled") as usize + spans.len(), 3 * N);
    assert_eq!(counter(&finished, "context_joined"), N as u64);
    drop((frontend, backend));
}

/// nginx as a reverse proxy (one worker: an event loop) in front of a traced backend, under 40
/// concurrent client connections with a distinct path per request. No upstream call may hang
/// under the wrong request; at least 95% are linked (the unique-target evidence); every backend
/// span is in the trace of the nginx request with its path.
#[test]
fn privileged_nginx_proxy_links_upstream_calls_only_to_their_request() {
    let Some(_guard) = privileged_test("nginx proxy parenting") else { return };
    let (proxy_port, backend_port) = (free_port(), free_port());
    let backend = servers::python_http(backend_port, None);
    let proxy = servers::nginx_proxy(proxy_port, backend_port);
    let receiver = HttpReceiver::start();
    let sonde = Sonde::start(&[], &selectors(&[("proxy", proxy_port), ("backend", backend_port)]), &env(&receiver));
    const N: usize = 400;
    let urls: Vec<String> = (0..N).map(|i| format!("http://127.0.0.1:{proxy_port}/p/{i}")).collect();
    sonde_e2e::clients::curl_parallel(&urls, 40);
    let spans = receiver.collected.wait_for(3 * N, WAIT);
    let finished = sonde.stop();
    assert_eq!(
        spans.len(),
        3 * N,
        "a proxy SERVER, a proxy CLIENT and a backend SERVER span per request\n{}",
        finished.stderr.lines().filter(|l| l.contains("final counters")).collect::<String>()
    );
    let find = |kind: &str, service: &str, path: &str| -> &TestSpan {
        let all: Vec<&TestSpan> = spans.iter().collect();
        one(&all, &format!("{kind} {service} {path}"), |s| {
            s.kind == kind && s.service() == Some(service) && path_is(s, path)
        })
    };
    let (mut linked, mut unlinked) = (0, 0);
    for i in 0..N {
        let path = format!("/p/{i}");
        let incoming = find("SERVER", "proxy", &path);
        let upstream = find("CLIENT", "proxy", &path);
        let backend_span = find("SERVER", "backend", &path);
        assert_eq!(
            backend_span.parent_id.as_ref(),
            Some(&upstream.span_id),
            "{path}: joined to nginx's call\n{}",
            finished.stderr.lines().filter(|l| l.contains("final counters")).collect::<String>()
        );
        assert_eq!(backend_span.trace_id, upstream.trace_id, "{path}");
        match &upstream.parent_id {
            Some(parent) => {
                assert_eq!(parent, &incoming.span_id, "{path}: the upstream call hangs under another request");
                assert_eq!(upstream.trace_id, incoming.trace_id);
                linked += 1;
            }
            None => unlinked += 1,
        }
    }
    eprintln!("nginx proxy: {linked} linked, {unlinked} unlinked, 0 wrong, of {N}");
    assert!(linked * 100 >= 95 * N, "{linked} of {N} linked");
    assert_eq!(counter(&finished, "context_unlinked"), unlinked as u64, "{}", finished.stderr);
    assert_eq!(counter(&finished, "context_joined"), N as u64);
    drop((proxy, backend));
}

/// A Node.js server (one event-loop thread) making two concurrent calls per request, with
/// requests interleaved: a client span gets a parent only when one request is in flight, so
/// none may hang under another request.
#[test]
fn privileged_node_concurrent_calls_get_no_wrong_parent() {
    let Some(_guard) = privileged_test("Node.js fan-out parenting") else { return };
    let (front, back) = (free_port(), free_port());
    let backend = servers::python_http(back, None);
    let node = servers::KillOnDrop(
        std::os::unix::process::CommandExt::process_group(&mut std::process::Command::new("node"), 0)
            .arg(fixture("node_fanout.js"))
            .args([front.to_string(), back.to_string()])
            .spawn()
            .expect("start node"),
    );
    sonde_e2e::wait_listening(front);
    let receiver = HttpReceiver::start();
    let sonde = Sonde::start(&[], &selectors(&[("fanout", front), ("backend", back)]), &env(&receiver));
    const N: usize = 100;
    let urls: Vec<String> = (0..N).map(|i| format!("http://127.0.0.1:{front}/n/{i}")).collect();
    sonde_e2e::clients::curl_parallel(&urls, 20);
    let spans = receiver.collected.wait_for(5 * N, WAIT);
    let finished = sonde.stop();
    assert_eq!(spans.len(), 5 * N);
    let all: Vec<&TestSpan> = spans.iter().collect();
    let (mut linked, mut unlinked, mut unjoined) = (0, 0, 0);
    for i in 0..N {
        let incoming = one(&all, "fanout SERVER", |s| {
            s.kind == "SERVER" && s.service() == Some("fanout") && path_is(s, &format!("/n/{i}"))
        });
        for k in [1, 2] {
            let path = format!("/b/{i}/{k}");
            let call = one(&all, "fanout CLIENT", |s| s.kind == "CLIENT" && path_is(s, &path));
            let served = one(&all, "backend SERVER", |s| {
                s.kind == "SERVER" && s.service() == Some("backend") && path_is(s, &path)
            });
            // Joined to exactly its call, or (a counted miss) to nothing.
            match &served.parent_id {
                Some(p) => assert_eq!(p, &call.span_id, "{path}: joined to another call"),
                None => unjoined += 1,
            }
            match &call.parent_id {
                Some(p) => {
                    assert_eq!(p, &incoming.span_id, "{path} hangs under another request");
                    linked += 1;
                }
                None => unlinked += 1,
            }
        }
    }
    eprintln!(
        "node fan-out: {linked} linked, {unlinked} unlinked, 0 wrong, of {} calls; {unjoined} backend spans not joined\n{}",
        2 * N,
        finished.stderr.lines().filter(|l| l.contains("final counters")).collect::<String>()
    );
    assert_eq!(counter(&finished, "context_unlinked"), (unlinked + unjoined) as u64, "{}", finished.stderr);
    drop((node, backend));
}
