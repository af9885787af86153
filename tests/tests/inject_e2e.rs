//! Traceparent injection (`propagation.inject_http`), privileged: sonde writes the CLIENT span's
//! ids into outgoing HTTP/1.x requests, and a server it does not trace receives exactly one valid
//! header per request, while bodies, pipelined requests, a header the application sent itself,
//! FIONREAD-sized reads and connections older than sonde stay intact.
//!
//! Kernels whose FIONREAD lies about sockets in a sock hash (6.18 here, and Debian's 6.12) make
//! sonde refuse injection: there these tests assert the refusal, and the kernel matrix (`cargo
//! xtask kernels`, part of `cargo xtask test`) runs them in full on 5.10 and 6.1.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    time::Duration,
};

use sonde_e2e::{
    TempDir,
    clients::Launcher,
    free_port,
    otlp::HttpReceiver,
    privileged_test,
    servers::{self, fixture},
    sonde::{Finished, Sonde, binary, test_config},
    span::TestSpan,
};

const WAIT: Duration = Duration::from_secs(90);

/// What the recording server received for one request.
#[derive(Debug)]
struct Received {
    path: String,
    traceparent: Vec<String>,
    body_len: usize,
    body_sha256: String,
}

fn received(log: &Path) -> Vec<Received> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            Received {
                path: v["path"].as_str().unwrap_or_default().to_owned(),
                traceparent: v["traceparent"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default(),
                body_len: v["body_len"].as_u64().unwrap_or(0) as usize,
                body_sha256: v["body_sha256"].as_str().unwrap_or_default().to_owned(),
            }
        })
        .collect()
}

fn traceparent_of(s: &TestSpan) -> String {
    format!("00-{}-{}-01", s.trace_id, s.span_id)
}

fn path_of(s: &TestSpan) -> String {
    let url = s.s("url.full").unwrap_or_default();
    url.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap_or_default()
}

fn counter(finished: &Finished, name: &str) -> u64 {
    finished.counter(name).unwrap_or_else(|| panic!("no {name} in the final counters:\n{}", finished.stderr))
}

/// `sonde check`'s verdict on injection here: Ok, or the reason it is unavailable.
fn injection_available() -> Result<(), String> {
    let out = Command::new(binary()).arg("check").output().expect("run sonde check");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.contains("traceparent inject")).unwrap_or_else(|| panic!("{text}"));
    if line.starts_with("[ok") { Ok(()) } else { Err(line.to_owned()) }
}

/// On a kernel with the FIONREAD hazard, `sonde run` with injection must refuse, naming why,
/// and exit non-zero. Returns true when that is the case here (the caller then stops).
fn refused_for_fionread() -> bool {
    let why = match injection_available() {
        Ok(()) => return false,
        Err(why) => why,
    };
    assert!(why.contains("FIONREAD"), "injection unavailable for another reason: {why}");
    let out = Command::new(binary())
        .args(["run", "--inject-traceparent", "--pid", &std::process::id().to_string()])
        .output()
        .expect("run sonde");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sonde ran with injection on a FIONREAD-hazard kernel:\n{stderr}");
    assert!(stderr.contains("FIONREAD") && stderr.contains("929e30f93125"), "{stderr}");
    eprintln!(
        "this kernel reports FIONREAD 0 for sockets in a sock hash: sonde refuses injection (asserted); \
         the injection checks run in full on the kernel matrix's 5.10 and 6.1"
    );
    true
}

/// One agent tracing only the clients, a server it does not trace: every kind of request.
#[test]
fn privileged_injected_traceparent_is_exact_and_never_corrupts() {
    let Some(_guard) = privileged_test("traceparent injection") else { return };
    if refused_for_fionread() {
        return;
    }
    let dir = TempDir::new("inject");
    let log = dir.path().join("received.jsonl");
    let port = free_port();
    let _server = servers::header_recorder(port, &log);
    let base = format!("http://127.0.0.1:{port}");

    // A connection opened before sonde starts: never injected (counted), never broken.
    let go = dir.path().join("go");
    let mut early = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import os, socket, time\n\
             s = socket.create_connection(('127.0.0.1', {port}))\n\
             def get(p):\n\
             \x20   s.sendall(b'GET ' + p + b' HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n\
             \x20   d = b''\n\
             \x20   while b'\\r\\n\\r\\n' not in d: d += s.recv(65536)\n\
             \x20   h, b = d.split(b'\\r\\n\\r\\n', 1)\n\
             \x20   n = int([l for l in h.split(b'\\r\\n') if l.lower().startswith(b'content-length')][0].split(b':')[1])\n\
             \x20   while len(b) < n: b += s.recv(65536)\n\
             get(b'/before/1')\n\
             while not os.path.exists('{go}'): time.sleep(0.05)\n\
             get(b'/before/2')\n",
            go = go.display()
        ))
        .spawn()
        .expect("start the early client");
    // Generous: Python starts slowly under the kernel matrix's emulation.
    sonde_e2e::wait_for(Duration::from_secs(60), || received(&log).iter().any(|r| r.path == "/before/1").then_some(()))
        .expect("the early client's first request");

    let mut launcher = Launcher::start();
    let receiver = HttpReceiver::start();
    let config = test_config(&format!(
        "propagation:\n  inject_http: true\ndiscovery:\n  - service.name: client\n    pid: [{}, {}]\n",
        launcher.pid(),
        early.id()
    ));
    let sonde = Sonde::start(&[], &config, &[("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())]);

    std::fs::write(&go, b"").expect("signal the early client");
    assert!(early.wait().expect("early client").success());
    // Ten requests on one keep-alive connection.
    let keep_alive: Vec<String> = (0..10).map(|i| format!("-o /dev/null {base}/keep/{i}")).collect();
    assert_eq!(launcher.run(&format!("curl -sf {}", keep_alive.join(" "))), 0);
    // The application's own traceparent stays the only one.
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    assert_eq!(launcher.run(&format!("curl -sf -o /dev/null -H 'traceparent: {own}' {base}/own")), 0);
    // A 64 KiB body arrives byte for byte.
    let body = dir.path().join("body.bin");
    let bytes: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    std::fs::write(&body, &bytes).expect("write body");
    let post = format!("curl -sf -o /dev/null --data-binary @{} {base}/post", body.display());
    assert_eq!(launcher.run(&post), 0);
    // Pipelined: the first request is injected, the connection is then left alone.
    let pipeline = fixture("http_pipeline_client.py");
    assert_eq!(launcher.run(&format!("python3 {} {port} 5", pipeline.display())), 0);
    // Reads sized by FIONREAD, over several connections at once, with 100 kB bodies.
    let fionread = fixture("fionread_client.py");
    assert_eq!(launcher.run(&format!("python3 {} {port} 4 10 100000", fionread.display())), 0);

    // The CLIENT spans of the connections sonde saw open (the early client's connection is
    // checked at the server and by its counter: what a connection older than sonde yields as
    // spans is the business of the existing-connection tests).
    const CLIENT_SPANS: usize = 10 + 1 + 1 + 5 + 40;
    let is_new = |s: &&TestSpan| s.kind == "CLIENT" && !path_of(s).starts_with("/before/");
    let collected = sonde_e2e::wait_for(WAIT, || {
        let spans = receiver.collected.spans();
        (spans.iter().filter(is_new).count() >= CLIENT_SPANS).then_some(spans)
    });
    let finished = sonde.stop();
    let spans = collected.unwrap_or_else(|| receiver.collected.spans());
    let clients: Vec<&TestSpan> = spans.iter().filter(is_new).collect();
    let mut paths: BTreeMap<String, usize> = BTreeMap::new();
    for c in &clients {
        *paths.entry(path_of(c)).or_default() += 1;
    }
    assert_eq!(clients.len(), CLIENT_SPANS, "CLIENT spans by path: {paths:?}\n{}", finished.stderr);
    let got = received(&log);
    let by_path = |p: &str| -> Vec<&Received> { got.iter().filter(|r| r.path == p).collect() };
    let span_at = |p: &str| -> &TestSpan {
        let found: Vec<&&TestSpan> = clients.iter().filter(|s| path_of(s) == p).collect();
        assert_eq!(found.len(), 1, "{p}");
        found[0]
    };

    for p in ["/before/1", "/before/2"] {
        assert_eq!(by_path(p).len(), 1, "{p}");
        assert!(by_path(p)[0].traceparent.is_empty(), "{p} was injected on a connection older than sonde");
    }
    for i in 0..10 {
        let p = format!("/keep/{i}");
        let r = by_path(&p);
        assert_eq!(r.len(), 1, "{p}");
        assert_eq!(r[0].traceparent, [traceparent_of(span_at(&p))], "{p}");
    }
    assert_eq!(by_path("/own")[0].traceparent, [own], "the application's traceparent, once");
    let post = by_path("/post");
    assert_eq!((post[0].body_len, post[0].traceparent.len()), (65536, 1));
    assert_eq!(post[0].traceparent[0], traceparent_of(span_at("/post")));
    let sha = Command::new("sha256sum").arg(&body).output().expect("sha256sum").stdout;
    assert_eq!(post[0].body_sha256, String::from_utf8_lossy(&sha).split_whitespace().next().unwrap_or_default());
    assert_eq!(by_path("/pipe/0")[0].traceparent, [traceparent_of(span_at("/pipe/0"))]);
    for i in 1..5 {
        let p = format!("/pipe/{i}");
        assert_eq!(by_path(&p).len(), 1, "{p}");
        assert!(by_path(&p)[0].traceparent.is_empty(), "{p}: pipelined requests after the first are left alone");
    }
    // Every FIONREAD request carries the ids of exactly one CLIENT span, each span once.
    let sent: BTreeSet<String> =
        clients.iter().filter(|s| path_of(s) == "/bytes/100000").map(|s| traceparent_of(s)).collect();
    let seen: Vec<&Received> = by_path("/bytes/100000");
    assert_eq!(seen.len(), 40);
    assert!(seen.iter().all(|r| r.traceparent.len() == 1));
    let seen: BTreeSet<String> = seen.iter().map(|r| r.traceparent[0].clone()).collect();
    assert_eq!((sent.len(), &seen), (40, &sent));

    // 10 + 1 + 1 + 40 injected; the pipelined connection given up; one request older than sonde.
    assert_eq!(counter(&finished, "traceparent_injected"), 10 + 1 + 1 + 40, "{}", finished.stderr);
    assert_eq!(counter(&finished, "traceparent_matched"), 10 + 1 + 1 + 40);
    assert_eq!(counter(&finished, "traceparent_traceparent_present"), 1);
    assert_eq!(counter(&finished, "traceparent_pipelined"), 1);
    assert_eq!(counter(&finished, "traceparent_connection_before_start"), 1);
    assert_eq!(counter(&finished, "events_lost"), 0);
}

/// Two agents on one host with different selectors: the one tracing only the client injects, the
/// one tracing only the server continues each trace from the header, as a sonde on another host
/// (or any OpenTelemetry SDK) would.
#[test]
fn privileged_second_agent_continues_the_injected_trace() {
    let Some(_guard) = privileged_test("traceparent injection, two agents") else { return };
    if refused_for_fionread() {
        return;
    }
    let dir = TempDir::new("inject2");
    let log = dir.path().join("received.jsonl");
    let port = free_port();
    let _server = servers::header_recorder(port, &log);
    let mut launcher = Launcher::start();
    let (client_receiver, server_receiver) = (HttpReceiver::start(), HttpReceiver::start());
    let client_agent = Sonde::start(
        &["--inject-traceparent"],
        &test_config(&format!("discovery:\n  - service.name: caller\n    pid: [{}]\n", launcher.pid())),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", client_receiver.endpoint())],
    );
    let server_agent = Sonde::start(
        &[],
        &test_config(&format!("discovery:\n  - service.name: callee\n    open_ports: {port}\n")),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", server_receiver.endpoint())],
    );
    const N: usize = 10;
    let urls: Vec<String> = (0..N).map(|i| format!("-o /dev/null http://127.0.0.1:{port}/hop/{i}")).collect();
    assert_eq!(launcher.run(&format!("curl -sf {}", urls.join(" "))), 0);
    let clients = client_receiver.collected.wait_for(N, WAIT);
    let servers = server_receiver.collected.wait_for(N, WAIT);
    let (client_done, server_done) = (client_agent.stop(), server_agent.stop());
    assert_eq!(clients.len(), N, "{}", client_done.stderr);
    assert_eq!(servers.len(), N, "{}", server_done.stderr);
    let server_by_path: BTreeMap<String, &TestSpan> =
        servers.iter().map(|s| (s.s("url.path").unwrap_or_default().to_owned(), s)).collect();
    for c in &clients {
        let p = path_of(c);
        let s = server_by_path.get(&p).unwrap_or_else(|| panic!("no server span for {p}"));
        assert_eq!(s.trace_id, c.trace_id, "{p}");
        assert_eq!(s.parent_id.as_deref(), Some(c.span_id.as_str()), "{p}: the callee's parent is the caller's span");
    }
    assert_eq!(counter(&client_done, "traceparent_injected"), N as u64);
    assert!(received(&log).iter().all(|r| r.traceparent.len() == 1));
}
