//! PostgreSQL and Redis end to end, privileged: real servers (SERVER spans from the server's own
//! processes, PostgreSQL's forked backends included) and real clients run by a traced launcher
//! shell (CLIENT spans). Exact counts, names, sanitized text, namespaces, errors, no secrets.

use std::{collections::BTreeMap, time::Duration};

use sonde_e2e::{
    clients::Launcher,
    free_port,
    otlp::HttpReceiver,
    privileged_test,
    servers::{self, PG_PASSWORD, fixture},
    sonde::{Sonde, test_config},
    span::{TestSpan, V},
};

const WAIT: Duration = Duration::from_secs(30);

fn env(r: &HttpReceiver) -> Vec<(&'static str, String)> {
    vec![("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint())]
}

fn dump(spans: &[TestSpan]) {
    if std::env::var_os("SONDE_TEST_DEBUG").is_some() {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for s in spans {
            *m.entry(format!("{:?} {} {} {:?}", s.service(), s.kind, s.name, s.resource.get("process.pid")))
                .or_default() += 1;
        }
        for (k, v) in m {
            eprintln!("DEBUG {v:5} {k}");
        }
    }
}

fn count(spans: &[TestSpan], service: &str, kind: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in spans.iter().filter(|s| s.service() == Some(service) && s.kind == kind) {
        *m.entry(s.name.clone()).or_default() += 1;
    }
    m
}

/// Every exported attribute and resource value, as one string to search for secrets.
fn everything(spans: &[TestSpan]) -> String {
    format!("{spans:?}")
}

#[test]
fn privileged_postgres_client_and_server_spans() {
    let Some(_guard) = privileged_test("PostgreSQL") else { return };
    let port = free_port();
    let pg = servers::postgres(port);
    let mut launcher = Launcher::start();
    let receiver = HttpReceiver::start();
    let cfg = test_config(&format!(
        "discovery:\n  - service.name: pg-server\n    open_ports: {port}\n  - service.name: pg-client\n    pid: [{}]\n",
        launcher.pid()
    ));
    let sonde = Sonde::start(&[], &cfg, &env(&receiver));
    let conn = format!("-h 127.0.0.1 -p {port} -U postgres");
    let pw = format!("PGPASSWORD={PG_PASSWORD}");
    // Simple protocol, with literals that must not leave the host.
    let rc = launcher.run(&format!(
        "{pw} psql {conn} -d postgres -c \"SELECT abalance FROM pgbench_accounts WHERE aid = 987654321 AND filler <> 'sup3rsecretliteral'\""
    ));
    assert_eq!(rc, 0);
    // Extended protocol, unnamed and named (prepared) statements, known transaction counts.
    assert_eq!(launcher.run(&format!("{pw} pgbench -n -S -M extended -t 50 -c 1 {conn} postgres")), 0);
    assert_eq!(launcher.run(&format!("{pw} pgbench -n -S -M prepared -t 50 -c 1 {conn} postgres")), 0);
    // Pipelined extended protocol: 20 Execute before one Sync.
    assert_eq!(launcher.run(&format!("python3 {} {port} {PG_PASSWORD} 20", fixture("pg_pipeline.py").display())), 0);
    // A failing statement.
    assert_ne!(launcher.run(&format!("{pw} psql {conn} -d postgres -c 'SELECT * FROM no_such_table'")), 0);

    // Each side: 101 pgbench_accounts selects, per pgbench run a scale probe and a partition probe
    // (a join: named `SELECT`), CREATE, 20 INSERT, 1 error.
    let spans = receiver.collected.wait_for(2 * 127, WAIT);
    let finished = sonde.stop();
    dump(&spans);
    if std::env::var_os("SONDE_TEST_DEBUG").is_some() {
        eprintln!("{}", finished.stderr);
    }
    for (service, kind) in [("pg-client", "CLIENT"), ("pg-server", "SERVER")] {
        let by = count(&spans, service, kind);
        assert_eq!(by.get("SELECT pgbench_accounts"), Some(&101), "{service}: {by:?}");
        assert_eq!(by.get("INSERT items"), Some(&20), "{service}: {by:?}");
        assert_eq!(by.get("SELECT no_such_table"), Some(&1), "{service}: {by:?}");
        assert_eq!(by.get("CREATE"), Some(&1), "{service}: {by:?}");
        assert_eq!(by.get("SELECT pgbench_branches"), Some(&2), "{service}: {by:?}");
        assert_eq!(by.get("SELECT"), Some(&2), "{service}: {by:?}");
        assert_eq!(by.values().sum::<usize>(), 127, "{service}: {by:?}");
    }
    let psql = spans
        .iter()
        .find(|s| s.kind == "CLIENT" && s.s("db.query.text").is_some_and(|t| t.contains("filler")))
        .expect("psql span");
    assert_eq!(psql.s("db.query.text"), Some("SELECT abalance FROM pgbench_accounts WHERE aid = ? AND filler <> ?"));
    assert_eq!(psql.s("db.system.name"), Some("postgresql"));
    assert_eq!(psql.s("db.namespace"), Some("postgres"));
    assert_eq!(psql.s("db.operation.name"), Some("SELECT"));
    assert_eq!(psql.s("db.collection.name"), Some("pgbench_accounts"));
    assert_eq!(psql.s("db.query.summary"), Some("SELECT pgbench_accounts"));
    assert_eq!(psql.i("db.response.returned_rows"), Some(0));
    assert_eq!(psql.i("server.port"), Some(port as i64));
    let prepared: Vec<&TestSpan> = spans
        .iter()
        .filter(|s| {
            s.kind == "CLIENT" && s.s("db.query.text") == Some("SELECT abalance FROM pgbench_accounts WHERE aid = $1;")
        })
        .collect();
    assert_eq!(prepared.len(), 100, "parameterized text kept as is, for unnamed and named statements");
    assert!(prepared.iter().all(|s| s.i("db.response.returned_rows") == Some(1)));
    let failed: Vec<&TestSpan> = spans.iter().filter(|s| s.error).collect();
    assert_eq!(failed.len(), 2, "the failing statement, seen by client and server");
    for f in failed {
        assert_eq!(f.s("db.response.status_code"), Some("42P01"));
        assert_eq!(f.s("error.type"), Some("42P01"));
    }
    let server_span = spans.iter().find(|s| s.kind == "SERVER").unwrap();
    assert_eq!(server_span.i("server.port"), Some(port as i64), "server spans carry the local address");
    assert!(server_span.resource.get("process.pid") != Some(&V::I(pg.pid() as i64)), "served by a forked backend");
    let all = everything(&spans);
    for secret in ["sup3rsecretliteral", "987654321", PG_PASSWORD, "pipelined-secret"] {
        assert!(!all.contains(secret), "{secret} leaked");
        assert!(!finished.stdout.contains(secret) && !finished.stderr.contains(secret), "{secret} leaked to output");
    }
    assert_eq!(finished.counter("postgres_parse_errors"), Some(0));
    assert_eq!(finished.counter("events_lost"), Some(0));
    drop(pg);
}

#[test]
fn privileged_redis_client_and_server_spans() {
    let Some(_guard) = privileged_test("Redis") else { return };
    let port = free_port();
    let redis = servers::redis(port);
    let mut launcher = Launcher::start();
    let receiver = HttpReceiver::start();
    let cfg = test_config(&format!(
        "discovery:\n  - service.name: redis-server\n    open_ports: {port}\n  - service.name: redis-client\n    pid: [{}]\n",
        launcher.pid()
    ));
    let sonde = Sonde::start(&[], &cfg, &env(&receiver));
    let cli = format!("redis-cli -p {port}");
    assert_eq!(launcher.run(&format!("{cli} SET greeting 'v3rysecretvalue'")), 0);
    assert_eq!(launcher.run(&format!("{cli} -n 3 SET k v")), 0);
    // MULTI/EXEC in one connection (redis-py's transaction pipeline).
    assert_eq!(launcher.run(&format!("python3 {} {port}", fixture("redis_multi.py").display())), 0);
    // WRONGTYPE error.
    launcher.run(&format!("{cli} LPUSH greeting x"));
    // AUTH arguments never leave the host (no password is set: the server answers ERR).
    launcher.run(&format!("{cli} AUTH 'hunter2secret'"));
    // Pub/sub: one SUBSCRIBE span, three PUBLISH spans, pushed messages are not spans.
    assert_eq!(
        launcher.run(&format!(
            "({cli} SUBSCRIBE news & sleep 0.5; for i in 1 2 3; do {cli} PUBLISH news hello$i; done; sleep 0.5; kill %1)"
        )),
        0
    );
    // A pipelined benchmark: 16 commands per write, known request counts.
    assert_eq!(launcher.run(&format!("redis-benchmark -p {port} -q -P 16 -n 1600 -c 4 -t set,get")), 0);

    // SET, SELECT+SET, MULTI+2 INCR+EXEC, LPUSH, AUTH, SUBSCRIBE, 3 PUBLISH, benchmark's 2 CONFIG GET,
    // plus redis-py's HELLO and 3 CLIENT handshakes.
    let expected_client = 1 + 2 + 4 + 1 + 1 + 1 + 3 + 2 + 4 + 1600 * 2;
    let spans = receiver.collected.wait_for(2 * expected_client, WAIT);
    let finished = sonde.stop();
    dump(&spans);
    if std::env::var_os("SONDE_TEST_DEBUG").is_some() {
        eprintln!("{}", finished.stderr);
    }
    for (service, kind) in [("redis-client", "CLIENT"), ("redis-server", "SERVER")] {
        let by = count(&spans, service, kind);
        assert_eq!(by.get("GET"), Some(&1600), "{service}: {by:?}");
        assert_eq!(by.get("SET"), Some(&(1600 + 2)), "{service}: {by:?}");
        assert_eq!(by.get("MULTI"), Some(&1), "{service}: {by:?}");
        assert_eq!(by.get("INCRBY"), Some(&2), "{service}: {by:?}");
        assert_eq!(by.get("EXEC"), Some(&1), "{service}: {by:?}");
        assert_eq!(by.get("SELECT"), Some(&1), "{service}: {by:?}");
        assert_eq!(by.get("LPUSH"), Some(&1), "{service}: {by:?}");
        assert_eq!(by.get("AUTH"), Some(&1), "{service}: {by:?}");
        assert_eq!(by.get("SUBSCRIBE"), Some(&1), "{service}: {by:?}");
        assert_eq!(by.get("PUBLISH"), Some(&3), "{service}: {by:?}");
    }
    let selected = spans.iter().find(|s| s.kind == "CLIENT" && s.name == "SET" && s.s("db.namespace") == Some("3"));
    assert!(selected.is_some(), "SET after SELECT 3 runs in namespace 3");
    let first_set =
        spans.iter().find(|s| s.kind == "CLIENT" && s.name == "SET" && s.s("db.namespace") == Some("0")).unwrap();
    assert_eq!(first_set.s("db.query.text"), Some("SET ? ?"));
    assert_eq!(first_set.s("db.system.name"), Some("redis"));
    assert_eq!(first_set.i("server.port"), Some(port as i64));
    let wrongtype: Vec<&TestSpan> = spans.iter().filter(|s| s.name == "LPUSH").collect();
    assert!(wrongtype.iter().all(|s| s.error && s.s("db.response.status_code") == Some("WRONGTYPE")));
    let auth: Vec<&TestSpan> = spans.iter().filter(|s| s.name == "AUTH").collect();
    assert!(auth.iter().all(|s| s.s("db.query.text") == Some("AUTH ?") && s.s("error.type") == Some("ERR")));
    let all = everything(&spans);
    for secret in ["hunter2secret", "v3rysecretvalue", "hello1"] {
        assert!(!all.contains(secret), "{secret} leaked");
    }
    assert_eq!(finished.counter("redis_parse_errors"), Some(0));
    assert_eq!(finished.counter("unmatched_responses"), Some(0), "pushed messages are not replies");
    drop(redis);
}

#[test]
fn privileged_http_service_with_database_children_in_one_trace() {
    let Some(_guard) = privileged_test("application trace") else { return };
    let (app_port, pg_port, redis_port) = (free_port(), free_port(), free_port());
    let pg = servers::postgres(pg_port);
    let redis = servers::redis(redis_port);
    let app = servers::python_app(app_port, pg_port, redis_port);
    let receiver = HttpReceiver::start();
    let cfg = test_config(&format!("discovery:\n  - service.name: orders\n    open_ports: {app_port}\n"));
    let sonde = Sonde::start(&[], &cfg, &env(&receiver));
    const N: usize = 10;
    let urls: Vec<String> = (1..=N).map(|i| format!("http://127.0.0.1:{app_port}/order/{i}")).collect();
    sonde_e2e::clients::curl(&["-o", "/dev/null"], &urls);
    let spans = receiver.collected.wait_for(4 * N, WAIT);
    let finished = sonde.stop();
    dump(&spans);
    let servers: Vec<&TestSpan> = spans.iter().filter(|s| s.kind == "SERVER").collect();
    assert_eq!(servers.len(), N);
    assert_eq!(spans.len(), 4 * N, "a server span, a PostgreSQL span and two Redis spans per request");
    for server in &servers {
        assert_eq!(server.name, "GET /order/{id}");
        let children: Vec<&TestSpan> = spans.iter().filter(|c| c.parent_id.as_ref() == Some(&server.span_id)).collect();
        let mut names: Vec<&str> = children.iter().map(|c| c.name.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["GET", "INCRBY", "SELECT customers"], "children of {}", server.span_id);
        for c in children {
            assert_eq!(c.kind, "CLIENT");
            assert_eq!(c.trace_id, server.trace_id, "one trace");
            assert!(c.start_ns >= server.start_ns && c.end_ns <= server.end_ns, "child within its parent");
            assert_eq!(c.service(), Some("orders"));
        }
    }
    let select = spans.iter().find(|s| s.name == "SELECT customers").unwrap();
    assert_eq!(select.s("db.query.text"), Some("SELECT name FROM customers WHERE id = $1"));
    assert_eq!(select.i("server.port"), Some(pg_port as i64), "connection opened before sonde: addresses from /proc");
    assert_eq!(finished.counter("events_lost"), Some(0));
    drop((app, pg, redis));
}

/// A connection pool opened and warmed before sonde starts: psycopg has already prepared the
/// SELECT (after 5 runs), so sonde never sees its Parse, only Bind/Execute. Concurrent requests
/// (8 parallel keep-alive connections into a thread-per-connection server) must still give each
/// request its server span and its three children, the SELECT named by the server's
/// CommandComplete.
#[test]
fn privileged_pool_warmed_before_sonde_prepared_statements_are_traced() {
    let Some(_guard) = privileged_test("prepared before sonde") else { return };
    let (app_port, pg_port, redis_port) = (free_port(), free_port(), free_port());
    let pg = servers::postgres(pg_port);
    let redis = servers::redis(redis_port);
    let app = servers::python_app(app_port, pg_port, redis_port);
    let url = |i: usize| format!("http://127.0.0.1:{app_port}/order/{i}");
    sonde_e2e::clients::curl(&["-o", "/dev/null"], &(1..=10).map(url).collect::<Vec<_>>());
    let receiver = HttpReceiver::start();
    let cfg = test_config(&format!("discovery:\n  - service.name: orders\n    open_ports: {app_port}\n"));
    let sonde = Sonde::start(&[], &cfg, &env(&receiver));
    const N: usize = 48;
    sonde_e2e::clients::curl_parallel(&(1..=N).map(url).collect::<Vec<_>>(), 8);
    let spans = receiver.collected.wait_for(4 * N, WAIT);
    let finished = sonde.stop();
    dump(&spans);
    assert_eq!(spans.len(), 4 * N, "a server span, a PostgreSQL span and two Redis spans per request");
    for server in spans.iter().filter(|s| s.kind == "SERVER") {
        let mut names: Vec<&str> =
            spans.iter().filter(|c| c.parent_id.as_ref() == Some(&server.span_id)).map(|c| c.name.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["GET", "INCRBY", "SELECT"], "children of {}", server.span_id);
    }
    let select = spans.iter().find(|s| s.name == "SELECT").unwrap();
    assert_eq!(select.s("db.operation.name"), Some("SELECT"));
    assert_eq!(select.s("db.query.text"), None, "its text went by before sonde started");
    assert_eq!(select.i("db.response.returned_rows"), Some(1));
    assert_eq!(finished.counter("streams_unrecognized"), Some(0), "{}", finished.stderr);
    assert_eq!(finished.counter("events_lost"), Some(0));
    drop((app, pg, redis));
}

/// A burst of connections: PostgreSQL accepts, forks, closes and accepts again on the same fd
/// number before the first backends run; each backend must still find its own connection.
#[test]
fn privileged_postgres_connection_burst_every_backend_traced() {
    let Some(_guard) = privileged_test("PostgreSQL connection burst") else { return };
    let port = free_port();
    let _pg = servers::postgres(port);
    let receiver = HttpReceiver::start();
    let cfg = test_config(&format!("discovery:\n  - service.name: pg-server\n    open_ports: {port}\n"));
    let sonde = Sonde::start(&[], &cfg, &env(&receiver));
    for _ in 0..3 {
        let status = std::process::Command::new("pgbench")
            .args(["-n", "-S", "-M", "extended", "-c", "8", "-j", "2", "-t", "25", "-h", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["-U", "postgres", "postgres"])
            .env("PGPASSWORD", PG_PASSWORD)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("pgbench");
        assert!(status.success());
    }
    // 3 runs x 8 clients x 25 selects, and each run's scale and partition probes.
    let spans = receiver.collected.wait_for(3 * 8 * 25 + 6, WAIT);
    let finished = sonde.stop();
    dump(&spans);
    let by = count(&spans, "pg-server", "SERVER");
    assert_eq!(by.get("SELECT pgbench_accounts"), Some(&600), "{by:?}");
    let backends: std::collections::BTreeSet<_> = spans
        .iter()
        .filter(|s| s.name == "SELECT pgbench_accounts")
        .filter_map(|s| s.resource.get("process.pid").map(|v| format!("{v:?}")))
        .collect();
    assert_eq!(backends.len(), 24, "every one of the 24 backends produced spans");
    assert_eq!(finished.counter("events_lost"), Some(0));
    assert_eq!(finished.counter("unmatched_responses"), Some(0));
}
