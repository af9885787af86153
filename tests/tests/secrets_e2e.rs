//! Secrets stay on the host, privileged: passwords, tokens, cookies and literal values sent in
//! HTTP headers, URLs and bodies, SQL (simple and extended protocol, DDL, errors) and Redis
//! commands and replies, traced from both ends at default settings. None of them may appear in
//! anything sonde emits: the raw OTLP trace and metric requests, the Prometheus endpoint, its
//! stdout and its log.

use std::time::Duration;

use sonde_e2e::{
    clients::{Launcher, scrape},
    free_port,
    otlp::HttpReceiver,
    privileged_test,
    servers::{self, PG_PASSWORD},
    sonde::{Sonde, test_config},
};

/// Every secret in the corpus, and the form it crosses the wire in when that differs.
const SECRETS: &[&str] = &[
    "tok-SECRET-A1",
    "SECRET-COOKIE-B2",
    "SECRET-APIKEY-C3",
    "SECRET-QUERY-D4",
    "SECRET-QUERY-E5",
    "SECRET-BASIC-F6",
    // base64("alice:SECRET-BASIC-F6"), as curl -u sends it.
    "YWxpY2U6U0VDUkVULUJBU0lDLUY2",
    "SECRET-BODY-G7",
    PG_PASSWORD,
    "SECRET-SQL-I9",
    "48151623",
    "SECRET-SQL-J10",
    "SECRET-PARAM-K11",
    "SECRET-ALTER-L12",
    "SECRET-REDIS-AUTH-M13",
    "SECRET-REDIS-VAL-N14",
    "SECRET-REDIS-HASH-O15",
    "SECRET-ERR-P16",
    "SECRET-ECHO-Q17",
];

fn leaks(haystack: &[u8], what: &str) -> Vec<&'static str> {
    SECRETS
        .iter()
        .copied()
        .filter(|s| haystack.windows(s.len()).any(|w| w == s.as_bytes()))
        .inspect(|s| eprintln!("LEAK: {s} in {what}"))
        .collect()
}

#[test]
fn privileged_no_secret_leaves_the_host_at_default_settings() {
    let Some(_guard) = privileged_test("secrets corpus") else {
        return;
    };
    let http = servers::python_http(free_port(), None);
    let pg = servers::postgres(free_port());
    let redis = servers::redis(free_port());
    let mut launcher = Launcher::start();
    let receiver = HttpReceiver::start();
    let metrics_port = free_port();
    let cfg = test_config(&format!(
        "discovery:\n  - open_ports: {},{},{}\n  - service.name: clients\n    pid: [{}]\n",
        http.port,
        pg.port,
        redis.port,
        launcher.pid()
    ));
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1000".to_owned()),
    ];
    let sonde = Sonde::start(&["--prometheus-port", &metrics_port.to_string()], &cfg, &env);

    // HTTP: headers, query values, basic auth, a body echoed back in the response.
    let h = format!("http://127.0.0.1:{}", http.port);
    for cmd in [
        format!(
            "curl -sf -H 'Authorization: Bearer tok-SECRET-A1' -H 'Cookie: session=SECRET-COOKIE-B2' -H 'X-Api-Key: SECRET-APIKEY-C3' '{h}/login?password=SECRET-QUERY-D4&token=SECRET-QUERY-E5'"
        ),
        format!("curl -sf -u alice:SECRET-BASIC-F6 {h}/account"),
        format!("curl -sf -X POST --data 'user=alice&password=SECRET-BODY-G7' {h}/echo"),
    ] {
        assert_eq!(launcher.run(&cmd), 0, "{cmd}");
    }
    // PostgreSQL: md5 password authentication, literals, bind parameters, a password in DDL, and
    // an error whose message quotes the literal.
    let pg_env = format!("PGPASSWORD={PG_PASSWORD}");
    let psql = format!("{pg_env} psql -h 127.0.0.1 -p {} -U postgres -d postgres -q", pg.port);
    for (sql, ok) in [
        ("CREATE TABLE users (email text, pin int)", true),
        ("INSERT INTO users VALUES ('SECRET-SQL-J10', 1)", true),
        ("SELECT * FROM users WHERE email = 'SECRET-SQL-I9' AND pin = 48151623", true),
        ("CREATE ROLE app LOGIN PASSWORD 'SECRET-ALTER-L12'", true),
        ("SELECT 'SECRET-ERR-P16'::int", false),
    ] {
        assert_eq!(launcher.run(&format!("{psql} -c \"{sql}\"")) == 0, ok, "{sql}");
    }
    let params = format!(
        "python3 -c \"import psycopg; c=psycopg.connect('host=127.0.0.1 port={} user=postgres password={PG_PASSWORD} dbname=postgres'); c.execute('SELECT count(*) FROM users WHERE email = %s', ('SECRET-PARAM-K11',)).fetchall()\"",
        pg.port
    );
    assert_eq!(launcher.run(&params), 0, "{params}");
    // Redis: AUTH, values set and read back, hash fields, an echoed value.
    let cli = format!("redis-cli -p {}", redis.port);
    for args in [
        "AUTH SECRET-REDIS-AUTH-M13",
        "SET apikey SECRET-REDIS-VAL-N14",
        "GET apikey",
        "HSET user:1 password SECRET-REDIS-HASH-O15",
        "HGETALL user:1",
        "ECHO SECRET-ECHO-Q17",
    ] {
        launcher.run(&format!("{cli} {args}"));
    }

    // Everything traced from both ends, then at least two metric exports and a scrape.
    let spans = receiver.collected.wait_for(2 * (3 + 7 + 6), Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(3));
    let exposition = scrape(metrics_port);
    let finished = sonde.stop();
    assert!(finished.status.success(), "{}", finished.stderr);

    // The corpus really was traced (or this test would prove nothing).
    let count = |system: &str| spans.iter().filter(|s| s.s("db.system.name") == Some(system)).count();
    assert!(spans.iter().filter(|s| s.s("http.request.method").is_some()).count() >= 6, "HTTP both ends");
    assert!(count("postgresql") >= 12, "PostgreSQL both ends: {}", count("postgresql"));
    assert!(count("redis") >= 12, "Redis both ends: {}", count("redis"));
    assert!(
        spans.iter().any(|s| s.s("db.query.text") == Some("SELECT * FROM users WHERE email = ? AND pin = ?")),
        "the SELECT is exported, sanitized"
    );
    assert!(receiver.metrics.lock().map(|m| !m.is_empty()).unwrap_or(false), "metrics were exported");

    let raw = receiver.raw.lock().map(|r| r.concat()).unwrap_or_default();
    let mut leaked = leaks(&raw, "OTLP requests");
    leaked.extend(leaks(exposition.as_bytes(), "the Prometheus endpoint"));
    leaked.extend(leaks(finished.stdout.as_bytes(), "stdout"));
    leaked.extend(leaks(finished.stderr.as_bytes(), "the log"));
    assert!(leaked.is_empty(), "secrets left the host: {leaked:?}");
}
