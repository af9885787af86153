//! TLS end to end, privileged: plaintext captured at OpenSSL's SSL_read/SSL_write through uprobes
//! (libssl.so.3 for nginx, curl, Python and PostgreSQL; OpenSSL linked statically into node),
//! tied to its connection, parsed by the same parsers. No span may come from ciphertext.

use std::{collections::BTreeMap, time::Duration};

use sonde_e2e::{
    TempDir,
    clients::Launcher,
    free_port,
    otlp::HttpReceiver,
    privileged_test,
    servers::{self, PG_PASSWORD, fixture},
    sonde::{Finished, Sonde, test_config},
    span::TestSpan,
};

const WAIT: Duration = Duration::from_secs(30);

fn env(r: &HttpReceiver) -> Vec<(&'static str, String)> {
    vec![("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint())]
}

fn config(server_port: u16, launcher: &Launcher) -> String {
    test_config(&format!(
        "discovery:\n  - service.name: tls-server\n    open_ports: {server_port}\n  - service.name: tls-client\n    pid: [{}]\n",
        launcher.pid()
    ))
}

fn by_kind(spans: &[TestSpan], kind: &str) -> Vec<TestSpan> {
    spans.iter().filter(|s| s.kind == kind).cloned().collect()
}

/// Every HTTP span is well formed (no garbage from ciphertext), and nothing failed to parse.
fn assert_clean_http(spans: &[TestSpan], finished: &Finished) {
    for s in spans {
        assert_eq!(s.s("http.request.method"), Some("GET"), "{s:?}");
        assert_eq!(s.i("http.response.status_code"), Some(200), "{s:?}");
    }
    assert_eq!(finished.counter("http_parse_errors"), Some(0), "{}", finished.stderr);
    assert_eq!(finished.counter("tls_unattributed"), Some(0), "{}", finished.stderr);
    assert_eq!(finished.counter("events_lost"), Some(0));
}

fn assert_https_pairs(spans: &[TestSpan], port: u16, n: usize, path_prefix: &str) {
    let servers = by_kind(spans, "SERVER");
    let clients = by_kind(spans, "CLIENT");
    assert_eq!((servers.len(), clients.len()), (n, n), "{:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    for s in &servers {
        assert_eq!(s.s("url.scheme"), Some("https"));
        assert!(s.s("url.path").is_some_and(|p| p.starts_with(path_prefix)), "{s:?}");
        assert_eq!(s.i("server.port"), Some(port as i64));
        assert_eq!(s.service(), Some("tls-server"));
    }
    for c in &clients {
        assert!(
            c.s("url.full").is_some_and(|u| u.starts_with(&format!("https://127.0.0.1:{port}{path_prefix}"))),
            "{c:?}"
        );
        assert_eq!(c.i("network.peer.port"), Some(port as i64));
        assert_eq!(c.service(), Some("tls-client"));
    }
}

/// `n` HTTPS requests from one curl that sonde does not trace (started by the test, not the
/// launcher), to `https://127.0.0.1:PORT{path_prefix}{i}`.
fn untraced_curl(port: u16, path_prefix: &str, n: usize) {
    let mut cmd = std::process::Command::new("curl");
    cmd.arg("-sk");
    for i in 0..n {
        cmd.args(["-o", "/dev/null", &format!("https://127.0.0.1:{port}{path_prefix}{i}")]);
    }
    assert!(cmd.status().expect("run curl").success());
}

#[test]
fn privileged_nginx_https_with_curl() {
    let Some(_guard) = privileged_test("nginx HTTPS") else { return };
    let port = free_port();
    let nginx = servers::nginx_with(port, Some(()));
    let mut launcher = Launcher::start();
    let receiver = HttpReceiver::start();
    let sonde = Sonde::start(&[], &config(port, &launcher), &env(&receiver));
    let urls: Vec<String> = (0..10).map(|_| format!("https://127.0.0.1:{port}/index.html")).collect();
    assert_eq!(launcher.run(&format!("curl -sk -o /dev/null {}", urls.join(" -o /dev/null "))), 0);
    let spans = receiver.collected.wait_for(20, WAIT);
    let finished = sonde.stop();
    assert_https_pairs(&spans, port, 10, "/index.html");
    assert_clean_http(&spans, &finished);
    assert!(finished.stderr.contains("TLS traced through OpenSSL"), "{}", finished.stderr);
    drop(nginx);
}

#[test]
fn privileged_python_https_server_and_client() {
    let Some(_guard) = privileged_test("Python HTTPS") else { return };
    let port = free_port();
    let server = servers::python_https(port);
    let mut launcher = Launcher::start();
    let receiver = HttpReceiver::start();
    let sonde = Sonde::start(&[], &config(port, &launcher), &env(&receiver));
    assert_eq!(launcher.run(&format!("python3 {} {port} 8", fixture("https_client.py").display())), 0);
    let spans = receiver.collected.wait_for(16, WAIT);
    let finished = sonde.stop();
    assert_https_pairs(&spans, port, 8, "/py/");
    assert_clean_http(&spans, &finished);
    drop(server);
}

#[test]
fn privileged_node_https_server_and_client() {
    let Some(_guard) = privileged_test("Node.js HTTPS") else { return };
    let port = free_port();
    let server = servers::node_https(port);
    let mut launcher = Launcher::start();
    let receiver = HttpReceiver::start();
    let sonde = Sonde::start(&[], &config(port, &launcher), &env(&receiver));
    assert_eq!(launcher.run(&format!("node {} client {port} 6", fixture("node_https.js").display())), 0);
    let spans = receiver.collected.wait_for(12, WAIT);
    let finished = sonde.stop();
    assert_https_pairs(&spans, port, 6, "/node/");
    assert_clean_http(&spans, &finished);
    assert!(finished.stderr.contains("OpenSSL linked statically into /usr/bin/node"), "{}", finished.stderr);
    // `sonde check` says the same for the selected process.
    let check = std::process::Command::new(sonde_e2e::sonde::binary())
        .args(["check", "--open-ports", &port.to_string()])
        .output()
        .expect("sonde check");
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains(&format!("pid {} (/usr/bin/node): TLS traced through OpenSSL linked statically", server.pid())),
        "{text}"
    );
    drop(server);
}

#[test]
fn privileged_client_with_libssl_at_an_unusual_path() {
    let Some(_guard) = privileged_test("libssl via LD_LIBRARY_PATH") else { return };
    let port = free_port();
    let server = servers::python_https(port);
    let libdir = TempDir::new("libssl-copy");
    std::fs::copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", libdir.path().join("libssl.so.3")).expect("copy libssl");
    let mut launcher = Launcher::start();
    let receiver = HttpReceiver::start();
    // Only the client is selected: its libssl is the copy, a file no other process maps, loaded
    // when Python imports ssl (after exec: found through the mmap event).
    let cfg = test_config(&format!("discovery:\n  - service.name: tls-client\n    pid: [{}]\n", launcher.pid()));
    let sonde = Sonde::start(&[], &cfg, &env(&receiver));
    let cmd = format!(
        "LD_LIBRARY_PATH={} python3 {} {port} 4",
        libdir.path().display(),
        fixture("https_client.py").display()
    );
    assert_eq!(launcher.run(&cmd), 0);
    let spans = receiver.collected.wait_for(4, WAIT);
    let finished = sonde.stop();
    let copy = format!("{}/libssl.so.3", libdir.path().display());
    assert!(finished.stderr.contains(&copy), "the copy at {copy} is found and probed:\n{}", finished.stderr);
    assert_eq!(spans.len(), 4);
    assert!(spans.iter().all(|s| s.kind == "CLIENT" && s.s("url.full").is_some_and(|u| u.starts_with("https://"))));
    assert_clean_http(&spans, &finished);
    drop(server);
}

#[test]
fn privileged_psql_over_tls() {
    let Some(_guard) = privileged_test("PostgreSQL over TLS") else { return };
    let port = free_port();
    let pg = servers::postgres_with(port, true);
    let mut launcher = Launcher::start();
    let receiver = HttpReceiver::start();
    let sonde = Sonde::start(&[], &config(port, &launcher), &env(&receiver));
    let psql = format!(
        "PGPASSWORD={PG_PASSWORD} psql 'host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=require'"
    );
    for i in 0..3 {
        assert_eq!(
            launcher.run(&format!("{psql} -c 'SELECT abalance FROM pgbench_accounts WHERE aid = {}'", 7000 + i)),
            0
        );
    }
    let spans = receiver.collected.wait_for(6, WAIT);
    let finished = sonde.stop();
    let mut by: BTreeMap<(String, String), usize> = BTreeMap::new();
    for s in &spans {
        *by.entry((s.kind.clone(), s.name.clone())).or_default() += 1;
    }
    let expected: BTreeMap<(String, String), usize> = [
        (("CLIENT".to_string(), "SELECT pgbench_accounts".to_string()), 3),
        (("SERVER".to_string(), "SELECT pgbench_accounts".to_string()), 3),
    ]
    .into_iter()
    .collect();
    assert_eq!(by, expected, "{}", finished.stderr);
    assert!(spans.iter().all(|s| s.s("db.query.text") == Some("SELECT abalance FROM pgbench_accounts WHERE aid = ?")));
    assert!(spans.iter().all(|s| s.s("db.namespace") == Some("postgres")));
    assert!(!format!("{spans:?}").contains(PG_PASSWORD));
    assert_eq!(finished.counter("postgres_parse_errors"), Some(0), "{}", finished.stderr);
    drop(pg);
}

/// The TLS probes of a process selected on its own are attached to that process only: HTTPS
/// traffic between an untraced curl and an untraced nginx, both mapping the same libssl as the
/// traced server, runs none of sonde's TLS programs (a file-wide probe would trap in both on
/// every SSL call), while the traced server's calls run them.
#[test]
fn privileged_untraced_processes_do_not_run_the_tls_probes() {
    let Some(_guard) = privileged_test("TLS probes scoped to the traced process") else { return };
    let traced_port = free_port();
    let server = servers::python_https(traced_port);
    let other_port = free_port();
    let nginx = servers::nginx_with(other_port, Some(()));
    let receiver = HttpReceiver::start();
    let cfg = test_config(&format!("discovery:\n  - service.name: tls-server\n    open_ports: {traced_port}\n"));
    let sonde = Sonde::start(&[], &cfg, &env(&receiver));
    let stats = sonde_e2e::bpf_stats::BpfStats::enable();
    // One request first: the server's probes are attached by the time its span is exported.
    untraced_curl(traced_port, "/py/warmup", 1);
    assert_eq!(receiver.collected.wait_for(1, WAIT).len(), 1);

    let runs = || sonde_e2e::bpf_stats::runs_of(sonde.pid(), "ssl_");
    let before = runs();
    // nginx answers 404 for these paths: every request still goes through SSL_read/SSL_write.
    untraced_curl(other_port, "/untraced/", 20);
    let after_untraced = runs();
    untraced_curl(traced_port, "/py/traced", 5);
    let spans = receiver.collected.wait_for(6, WAIT);
    let after_traced = runs();
    drop(stats);
    let finished = sonde.stop();
    assert_eq!(after_untraced - before, 0, "untraced curl and nginx ran sonde's TLS probes:\n{}", finished.stderr);
    // At least SSL_read and SSL_write, entry and return, per traced request.
    assert!(
        after_traced - after_untraced >= 5 * 4,
        "{} TLS probe runs for 5 traced requests",
        after_traced - after_untraced
    );
    assert_eq!(spans.len(), 6, "{:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    assert!(spans.iter().all(|s| s.kind == "SERVER" && s.s("url.scheme") == Some("https")));
    assert_eq!(finished.counter("http_parse_errors"), Some(0), "{}", finished.stderr);
    drop((server, nginx));
}

/// Each per-process probe is its own consumer of the kernel's breakpoint, checked on every hit:
/// past 16 traced processes mapping one libssl, sonde switches that file to one set of probes for
/// every process, and TLS traffic is still traced once, exactly.
#[test]
fn privileged_many_traced_processes_share_one_set_of_tls_probes() {
    let Some(_guard) = privileged_test("TLS probes shared past 16 processes") else { return };
    // Idle servers (listening: a selected process that does not listen makes every file wide).
    let idle: Vec<std::process::Child> = (0..17)
        .map(|_| {
            std::process::Command::new("python3")
                .args([
                    "-c",
                    "import ssl, socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\ntime.sleep(120)",
                ])
                .spawn()
                .expect("start python3")
        })
        .collect();
    for child in &idle {
        let maps = format!("/proc/{}/maps", child.id());
        let loaded = sonde_e2e::wait_for(WAIT, || {
            std::fs::read_to_string(&maps).ok().filter(|m| m.contains("libssl.so")).map(|_| ())
        });
        assert!(loaded.is_some(), "python3 {} did not load libssl", child.id());
        let listening = sonde_e2e::wait_for(WAIT, || {
            let fds = std::fs::read_dir(format!("/proc/{}/fd", child.id())).ok()?;
            fds.flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")))
                .then_some(())
        });
        assert!(listening.is_some(), "python3 {} did not open its socket", child.id());
    }
    let port = free_port();
    let server = servers::python_https(port);
    let receiver = HttpReceiver::start();
    let pids: Vec<String> = idle.iter().map(|c| c.id().to_string()).collect();
    let cfg = test_config(&format!(
        "discovery:\n  - service.name: tls-server\n    open_ports: {port}\n  - service.name: idle\n    pid: [{}]\n",
        pids.join(", ")
    ));
    let sonde = Sonde::start(&[], &cfg, &env(&receiver));
    untraced_curl(port, "/py/shared", 3);
    receiver.collected.wait_for(3, WAIT);
    // Late duplicates would arrive after the third span.
    std::thread::sleep(Duration::from_millis(500));
    let finished = sonde.stop();
    for mut child in idle {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        finished.stderr.contains("more traced processes map the file than get probes of their own"),
        "{}",
        finished.stderr
    );
    let spans: Vec<TestSpan> = receiver.collected.spans();
    assert_eq!(spans.len(), 3, "{:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    assert!(spans.iter().all(|s| s.kind == "SERVER" && s.s("url.scheme") == Some("https")));
    assert_clean_http(&spans, &finished);
    drop(server);
}
