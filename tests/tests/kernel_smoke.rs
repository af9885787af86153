//! The end-to-end run of the kernel matrix (`cargo xtask kernels` boots each kernel and runs this
//! binary inside it; on this host it runs with the rest of the suite): every hook family on one
//! kernel, with exact spans. Plaintext HTTP (syscall tracepoints, both roles, fork tracking
//! through the launcher) and HTTPS (OpenSSL uprobes in nginx and in curl).

use std::time::Duration;

use sonde_e2e::{
    clients::Launcher,
    free_port,
    otlp::HttpReceiver,
    privileged_test, servers,
    sonde::{Sonde, test_config},
    span::TestSpan,
};

/// Requests per scheme: few, since the matrix runs under emulation.
const REQUESTS: usize = 5;

fn spans_of<'a>(spans: &'a [TestSpan], kind: &str, scheme: &str) -> Vec<&'a TestSpan> {
    spans
        .iter()
        .filter(|s| s.kind == kind)
        .filter(|s| match kind {
            "SERVER" => s.s("url.scheme") == Some(scheme),
            _ => s.s("url.full").is_some_and(|u| u.starts_with(&format!("{scheme}://"))),
        })
        .collect()
}

#[test]
fn privileged_kernel_smoke_http_and_https_give_exact_spans() {
    let Some(_guard) = privileged_test("kernel smoke (HTTP and HTTPS)") else { return };
    let (plain, tls) = (free_port(), free_port());
    let plain_server = servers::python_http(plain, None);
    let tls_server = servers::nginx_with(tls, Some(()));
    let mut launcher = Launcher::start();
    let receiver = HttpReceiver::start();
    let config = test_config(&format!(
        "discovery:\n  - service.name: plain-server\n    open_ports: {plain}\n  - service.name: tls-server\n    open_ports: {tls}\n  - service.name: client\n    pid: [{}]\n",
        launcher.pid()
    ));
    let sonde = Sonde::start(&[], &config, &[("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())]);

    let urls = |scheme: &str, port: u16| -> String {
        (0..REQUESTS)
            .map(|i| format!("-o /dev/null {scheme}://127.0.0.1:{port}/smoke/{scheme}/{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(launcher.run(&format!("curl -sk {}", urls("http", plain))), 0);
    assert_eq!(launcher.run(&format!("curl -sk {}", urls("https", tls))), 0);

    let spans = receiver.collected.wait_for(4 * REQUESTS, Duration::from_secs(60));
    let finished = sonde.stop();
    let names: Vec<(&str, &str)> = spans.iter().map(|s| (s.kind.as_str(), s.name.as_str())).collect();
    assert_eq!(spans.len(), 4 * REQUESTS, "{names:?}\n{}", finished.stderr);
    for (scheme, port, service) in [("http", plain, "plain-server"), ("https", tls, "tls-server")] {
        let servers = spans_of(&spans, "SERVER", scheme);
        let clients = spans_of(&spans, "CLIENT", scheme);
        assert_eq!((servers.len(), clients.len()), (REQUESTS, REQUESTS), "{scheme}: {names:?}");
        let mut paths: Vec<&str> = servers.iter().filter_map(|s| s.s("url.path")).collect();
        paths.sort_unstable();
        let expected: Vec<String> = (0..REQUESTS).map(|i| format!("/smoke/{scheme}/{i}")).collect();
        assert_eq!(paths, expected, "{scheme}");
        for s in &servers {
            assert_eq!(s.i("server.port"), Some(i64::from(port)), "{s:?}");
            assert_eq!(s.service(), Some(service), "{s:?}");
        }
        for c in &clients {
            assert_eq!(c.i("network.peer.port"), Some(i64::from(port)), "{c:?}");
            assert_eq!(c.service(), Some("client"), "{c:?}");
        }
    }
    // nginx serves the files it has (404 for the smoke paths); Python's server answers 200.
    assert!(spans_of(&spans, "SERVER", "http").iter().all(|s| s.i("http.response.status_code") == Some(200)));
    assert!(spans_of(&spans, "SERVER", "https").iter().all(|s| s.i("http.response.status_code") == Some(404)));
    assert_eq!(finished.counter("events_lost"), Some(0), "{}", finished.stderr);
    assert_eq!(finished.counter("http_parse_errors"), Some(0), "{}", finished.stderr);
    assert_eq!(finished.counter("tls_unattributed"), Some(0), "{}", finished.stderr);
    drop((plain_server, tls_server));
}
