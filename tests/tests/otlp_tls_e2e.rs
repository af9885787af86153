//! OTLP export to backends behind TLS: a private CA, a localhost server certificate, mTLS,
//! authorization headers and gzip, over HTTP/protobuf and gRPC; and the failures an operator
//! meets (an untrusted certificate, a missing client certificate, refused credentials), which
//! must deliver nothing, say what to fix once, and count every dropped span.

use std::time::Duration;

use sonde_e2e::{
    clients::curl,
    free_port,
    otlp::{GrpcReceiver, HttpReceiver, ReceiverOptions},
    pki::TestPki,
    privileged_test, servers,
    sonde::{Finished, Sonde, test_config},
    wait_for,
};

const WAIT: Duration = Duration::from_secs(20);
/// The credential the tests send; it must reach the receiver and never sonde's log.
const BASIC: &str = "Basic c29uZGU6czNjcjN0LXBhc3N3b3Jk";
const BASIC_ENCODED: &str = "Authorization=Basic%20c29uZGU6czNjcjN0LXBhc3N3b3Jk";

/// `n` requests to a traced Python server, each a span.
fn traffic(port: u16, n: usize, tag: &str) {
    let urls: Vec<String> = (0..n).map(|i| format!("http://127.0.0.1:{port}/{tag}/{i}")).collect();
    curl(&["-o", "/dev/null"], &urls);
}

/// OTLP/HTTP behind TLS with the test CA's localhost certificate.
fn https_receiver(pki: &TestPki) -> HttpReceiver {
    HttpReceiver::start_with(
        0,
        ReceiverOptions { tls: Some(pki.server_config(false, &[b"http/1.1"])), ..Default::default() },
    )
}

/// OTLP/gRPC behind TLS that requires a client certificate signed by the test CA.
fn mtls_grpc_receiver(pki: &TestPki) -> GrpcReceiver {
    GrpcReceiver::start_with(ReceiverOptions { tls: Some(pki.server_config(true, &[b"h2"])), ..Default::default() })
}

fn start(port: u16, env: Vec<(&'static str, String)>) -> Sonde {
    Sonde::start(&["--open-ports", &port.to_string()], &test_config(""), &env)
}

fn assert_secret_not_logged(finished: &Finished) {
    assert!(!finished.stderr.contains("c29uZGU6czNjcjN0"), "the Authorization value was logged:\n{}", finished.stderr);
}

#[test]
fn privileged_http_protobuf_over_tls_with_private_ca_authorization_and_gzip() {
    let Some(_guard) = privileged_test("OTLP HTTP/protobuf over TLS") else {
        return;
    };
    let pki = TestPki::new();
    let receiver = https_receiver(&pki);
    let port = free_port();
    let server = servers::python_http(port, None);
    let sonde = start(
        port,
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", pki.path("ca.pem")),
            ("OTEL_EXPORTER_OTLP_HEADERS", BASIC_ENCODED.into()),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip".into()),
        ],
    );
    traffic(port, 40, "tls");
    let spans = receiver.collected.wait_for(40, WAIT);
    let finished = sonde.stop();
    assert_eq!(spans.len(), 40, "every span over TLS; sonde log:\n{}", finished.stderr);
    assert_eq!(finished.counter("spans_dropped_export_failed"), Some(0));
    let received = receiver.received();
    assert!(!received.is_empty());
    for r in &received {
        assert_eq!(r.header("authorization"), Some(BASIC), "the decoded header reached the collector");
        assert!(r.gzip, "gzip was asked for: {:?}", r.headers);
    }
    assert!(finished.stderr.contains("TLS (configured CA)"), "{}", finished.stderr);
    assert_secret_not_logged(&finished);
    drop(server);
}

#[test]
fn privileged_grpc_over_mtls_with_client_certificate_authorization_and_gzip() {
    let Some(_guard) = privileged_test("OTLP gRPC over mTLS") else {
        return;
    };
    let pki = TestPki::new();
    let receiver = mtls_grpc_receiver(&pki);
    let port = free_port();
    let server = servers::python_http(port, None);
    let sonde = start(
        port,
        vec![
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint()),
            ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", pki.path("ca.pem")),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", pki.path("client.pem")),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", pki.path("client.key")),
            ("OTEL_EXPORTER_OTLP_HEADERS", BASIC_ENCODED.into()),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip".into()),
        ],
    );
    traffic(port, 40, "mtls");
    let spans = receiver.collected.wait_for(40, WAIT);
    let finished = sonde.stop();
    assert_eq!(spans.len(), 40, "every span over mTLS; sonde log:\n{}", finished.stderr);
    let received = receiver.received();
    assert!(!received.is_empty());
    for r in &received {
        assert_eq!(r.header("authorization"), Some(BASIC));
        assert!(r.gzip, "gzip was asked for: {:?}", r.headers);
    }
    assert!(finished.stderr.contains("client certificate"), "{}", finished.stderr);
    assert_secret_not_logged(&finished);
    drop(server);
}

/// Lines of the span exporter's log that mention `needle` (the metrics exporter logs its own
/// failure once too).
fn lines_with(finished: &Finished, needle: &str) -> Vec<String> {
    finished
        .stderr
        .lines()
        .filter(|l| l.contains("sonde::export::otlp]") && l.contains(needle))
        .map(str::to_string)
        .collect()
}

#[test]
fn privileged_untrusted_server_certificate_delivers_nothing_says_why_and_counts_the_drops() {
    let Some(_guard) = privileged_test("OTLP untrusted certificate") else {
        return;
    };
    let pki = TestPki::new();
    let receiver = https_receiver(&pki);
    let port = free_port();
    let server = servers::python_http(port, None);
    // No CA given: the platform's roots do not include the test CA.
    let sonde = start(port, vec![("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())]);
    traffic(port, 25, "untrusted");
    wait_for(WAIT, || sonde.stderr().contains("not signed by a CA sonde trusts").then_some(()));
    std::thread::sleep(Duration::from_millis(500));
    let finished = sonde.stop();
    assert!(receiver.collected.is_empty(), "nothing may reach a collector sonde cannot verify");
    assert!(receiver.received().is_empty(), "no request was sent through the failed handshake");
    let explained = lines_with(&finished, "not signed by a CA sonde trusts");
    assert_eq!(explained.len(), 1, "the cause is logged once:\n{}", finished.stderr);
    assert!(explained[0].contains("OTEL_EXPORTER_OTLP_CERTIFICATE"), "names the variable: {}", explained[0]);
    assert_eq!(finished.counter("spans_dropped_export_failed"), Some(25), "{}", finished.stderr);
    assert_eq!(finished.counter("spans_exported"), Some(0));
    drop(server);
}

#[test]
fn privileged_mtls_collector_without_client_certificate_names_the_variables() {
    let Some(_guard) = privileged_test("OTLP mTLS refused") else {
        return;
    };
    let pki = TestPki::new();
    let receiver = mtls_grpc_receiver(&pki);
    let port = free_port();
    let server = servers::python_http(port, None);
    let sonde = start(
        port,
        vec![
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", pki.path("ca.pem")),
        ],
    );
    traffic(port, 10, "nocert");
    wait_for(WAIT, || sonde.stderr().contains("OTLP export to").then_some(()));
    std::thread::sleep(Duration::from_millis(500));
    let finished = sonde.stop();
    assert!(receiver.collected.is_empty());
    let explained = lines_with(&finished, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE");
    assert_eq!(explained.len(), 1, "one line names the client-certificate variables:\n{}", finished.stderr);
    assert_eq!(finished.counter("spans_dropped_export_failed"), Some(10), "{}", finished.stderr);
    drop(server);
}

#[test]
fn privileged_refused_credentials_are_counted_logged_once_and_not_retried_in_a_storm() {
    let Some(_guard) = privileged_test("OTLP 401") else {
        return;
    };
    let receiver =
        HttpReceiver::start_with(0, ReceiverOptions { answer: Some("401 Unauthorized"), ..Default::default() });
    let port = free_port();
    let server = servers::python_http(port, None);
    let sonde = start(
        port,
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_EXPORTER_OTLP_HEADERS", BASIC_ENCODED.into()),
        ],
    );
    traffic(port, 10, "first");
    wait_for(WAIT, || (!receiver.received().is_empty()).then_some(()));
    // Two more batches (the test config flushes every 100 ms) inside the 5 s pause.
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(300));
        traffic(port, 10, &format!("again{round}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let finished = sonde.stop();
    assert!(receiver.collected.is_empty());
    let requests = receiver.received().len();
    assert!(requests <= 2, "refused credentials are not retried batch after batch: {requests} requests");
    let refused = lines_with(&finished, "401");
    assert_eq!(refused.len(), 1, "logged once:\n{}", finished.stderr);
    assert!(refused[0].contains("OTEL_EXPORTER_OTLP_HEADERS"), "{}", refused[0]);
    assert_eq!(finished.counter("spans_dropped_export_failed"), Some(30), "{}", finished.stderr);
    assert_secret_not_logged(&finished);
    drop(server);
}
