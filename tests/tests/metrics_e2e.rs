//! RED metrics end to end, privileged: a real Prometheus scrapes sonde while real clients make
//! requests; the OTLP metrics sonde pushes are read back; the cardinality cap is driven past.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, any_value::Value},
    metrics::v1::{HistogramDataPoint, metric::Data},
};
use sonde_e2e::{
    clients::{curl, prometheus_api, prometheus_query},
    free_port,
    otlp::HttpReceiver,
    privileged_test, servers,
    sonde::{Sonde, test_config},
    wait_for,
};

const WAIT: Duration = Duration::from_secs(30);

fn shipped_alert_rules() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose/prometheus/alerts.yml")
}

/// One round of traffic: `items` fast 200s, `errors` 500s, `missing` 404s, `slow` 300 ms requests.
fn traffic(port: u16, round: usize, items: usize, errors: usize, missing: usize, slow: usize) {
    let base = format!("http://127.0.0.1:{port}");
    let mut urls: Vec<String> = (0..items).map(|i| format!("{base}/items/{}", round * 1000 + i)).collect();
    urls.extend((0..errors).map(|_| format!("{base}/status/500")));
    urls.extend((0..missing).map(|_| format!("{base}/status/404")));
    urls.extend((0..slow).map(|_| format!("{base}/sleep/300")));
    curl(&["-o", "/dev/null"], &urls);
}

fn scalar(port: u16, expr: &str) -> Option<f64> {
    prometheus_query(port, expr).first().map(|(_, v)| *v)
}

fn wait_scalar(port: u16, expr: &str, want: f64) -> f64 {
    wait_for(WAIT, || scalar(port, expr).filter(|v| (*v - want).abs() < 1e-9))
        .unwrap_or_else(|| panic!("Prometheus never showed {expr} == {want}; last: {:?}", scalar(port, expr)))
}

#[test]
fn privileged_prometheus_scrapes_red_metrics_and_otlp_metrics_match_requests() {
    let Some(_guard) = privileged_test("Prometheus scrape + OTLP metrics") else {
        return;
    };
    let port = free_port();
    let _server = servers::python_http(port, None);
    let receiver = HttpReceiver::start();
    let metrics_port = free_port();
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1000".into()),
        ("OTEL_SERVICE_NAME", "shop".into()),
    ];
    let sonde = Sonde::start(
        &["--open-ports", &port.to_string(), "--prometheus-port", &metrics_port.to_string()],
        &test_config(""),
        &env,
    );
    let prom_port = free_port();
    let _prometheus = servers::prometheus(prom_port, &[format!("127.0.0.1:{metrics_port}")], &[shipped_alert_rules()]);
    wait_scalar(prom_port, r#"up{job="sonde"}"#, 1.0);

    // Two rounds, each scraped before the next, so rates over them are not zero.
    let total = r#"sum(http_server_request_duration_seconds_count{job="sonde"})"#;
    traffic(port, 0, 30, 8, 5, 6);
    wait_scalar(prom_port, total, 49.0);
    traffic(port, 1, 30, 8, 5, 6);
    wait_scalar(prom_port, total, 98.0);

    // Exact counts per route and status, from Prometheus's API.
    let by_route: BTreeMap<(String, String), f64> = prometheus_query(
        prom_port,
        "sum by (http_route, http_response_status_code) (http_server_request_duration_seconds_count)",
    )
    .into_iter()
    .map(|(m, v)| {
        let label = |k: &str| m[k].as_str().unwrap_or("").to_owned();
        ((label("http_route"), label("http_response_status_code")), v)
    })
    .collect();
    let expected: BTreeMap<(String, String), f64> = [
        (("/items/{id}", "200"), 60.0),
        (("/status/{id}", "500"), 16.0),
        (("/status/{id}", "404"), 10.0),
        (("/sleep/{id}", "200"), 12.0),
    ]
    .into_iter()
    .map(|((r, s), v)| ((r.to_owned(), s.to_owned()), v))
    .collect();
    assert_eq!(by_route, expected);

    // Attributes: the service, the method, error.type only on the 500s (404 is not a server error).
    let services = prometheus_query(prom_port, "count by (service_name) (http_server_request_duration_seconds_count)");
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].0["service_name"], "shop");
    assert_eq!(scalar(prom_port, r#"sum(http_server_request_duration_seconds_count{error_type="500"})"#), Some(16.0));
    assert_eq!(
        scalar(prom_port, r#"sum(http_server_request_duration_seconds_count{http_request_method="GET"})"#),
        Some(98.0)
    );

    // Quantiles that mean something: the 300 ms route lands in the (0.25, 0.5] bucket, the fast
    // route well under 50 ms.
    let quantile = |q: f64, route: &str| {
        scalar(
            prom_port,
            &format!(
                r#"histogram_quantile({q}, sum by (le) (http_server_request_duration_seconds_bucket{{http_route="{route}"}}))"#
            ),
        )
        .expect("quantile")
    };
    for q in [0.5, 0.95, 0.99] {
        let slow = quantile(q, "/sleep/{id}");
        assert!(slow > 0.25 && slow <= 0.5, "p{q} of /sleep/300 = {slow}s");
        let fast = quantile(q, "/items/{id}");
        assert!(fast > 0.0 && fast < 0.05, "p{q} of /items = {fast}s");
    }
    let slow_sum = scalar(prom_port, r#"sum(http_server_request_duration_seconds_sum{http_route="/sleep/{id}"})"#);
    assert!(slow_sum.is_some_and(|s| (12.0 * 0.3..12.0 * 0.4).contains(&s)), "12 x 300 ms took {slow_sum:?}s");
    // Body sizes: every 500 and 404 answers "status" (6 bytes).
    assert_eq!(
        scalar(prom_port, r#"sum(http_server_response_body_size_bytes_sum{http_route="/status/{id}"})"#),
        Some(26.0 * 6.0)
    );

    // Self-metrics.
    assert_eq!(scalar(prom_port, "sonde_events_lost_total"), Some(0.0));
    assert_eq!(scalar(prom_port, "sonde_traced_processes"), Some(1.0));
    assert_eq!(scalar(prom_port, r#"sonde_parse_errors_total{protocol="http"}"#), Some(0.0));
    assert!(scalar(prom_port, "sonde_events_read_total").is_some_and(|v| v >= 98.0 * 2.0));

    // The shipped alert rules evaluate cleanly on real data, and the error-ratio alert is pending
    // (16 of 98 requests failed: above 5%, not yet for 5 minutes).
    let alert_state = wait_for(WAIT, || {
        let rules = prometheus_api(prom_port, "/api/v1/rules", &[]);
        let all: Vec<serde_json::Value> = rules["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if all.len() != 6 || all.iter().any(|r| r["health"] != "ok") {
            return None;
        }
        let errors = all.iter().find(|r| r["name"] == "HighErrorRatio")?;
        let alert = errors["alerts"].as_array()?.first()?.clone();
        Some(alert)
    })
    .expect("HighErrorRatio never became active with all rules healthy");
    assert_eq!(alert_state["state"], "pending");
    assert_eq!(alert_state["labels"]["http_route"], "/status/{id}");
    assert_eq!(alert_state["labels"]["service_name"], "shop");

    // OTLP metrics: the latest cumulative push carries the same counts per route and status.
    let otlp_counts = wait_for(WAIT, || {
        let counts = receiver.latest_metrics().map(|m| histogram_counts(&m, "http.server.request.duration"))?;
        (counts.values().sum::<u64>() == 98).then_some(counts)
    })
    .unwrap_or_else(|| panic!("OTLP metrics never reached 98 requests: {:?}", receiver.latest_metrics().is_some()));
    let want: BTreeMap<(String, i64), u64> = [
        (("/items/{id}", 200), 60),
        (("/status/{id}", 500), 16),
        (("/status/{id}", 404), 10),
        (("/sleep/{id}", 200), 12),
    ]
    .into_iter()
    .map(|((r, s), v)| ((r.to_owned(), s), v))
    .collect();
    assert_eq!(otlp_counts, want);
    let latest = receiver.latest_metrics().expect("metrics");
    let resource = latest.resource_metrics[0].resource.as_ref().expect("resource");
    assert!(resource.attributes.iter().any(|a| a.key == "service.name" && str_value(&a.value) == Some("shop")));

    let finished = sonde.stop();
    assert!(finished.status.success(), "sonde exit: {:?}\n{}", finished.status, finished.stderr);
    assert_eq!(finished.counter("events_lost"), Some(0));
}

fn str_value(v: &Option<AnyValue>) -> Option<&str> {
    match v.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn int_value(v: &Option<AnyValue>) -> Option<i64> {
    match v.as_ref()?.value.as_ref()? {
        Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn histogram_points<'a>(req: &'a ExportMetricsServiceRequest, name: &str) -> Vec<&'a HistogramDataPoint> {
    req.resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .filter(|m| m.name == name)
        .filter_map(|m| match &m.data {
            Some(Data::Histogram(h)) => Some(h.data_points.iter()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Count per (http.route, http.response.status_code) of one histogram.
fn histogram_counts(req: &ExportMetricsServiceRequest, name: &str) -> BTreeMap<(String, i64), u64> {
    let mut out = BTreeMap::new();
    for p in histogram_points(req, name) {
        let attr = |k: &str| p.attributes.iter().find(|a| a.key == k).map(|a| &a.value);
        let route = attr("http.route").and_then(str_value).unwrap_or("").to_owned();
        let status = attr("http.response.status_code").and_then(int_value).unwrap_or(0);
        *out.entry((route, status)).or_default() += p.count;
    }
    out
}

#[test]
fn privileged_cardinality_cap_holds_with_ten_thousand_distinct_paths() {
    let Some(_guard) = privileged_test("cardinality cap, 10,000 paths") else {
        return;
    };
    let port = free_port();
    let _server = servers::python_http(port, None);
    let metrics_port = free_port();
    let cap = 2000; // the default metrics.max_series
    let sonde = Sonde::start(
        &["--open-ports", &port.to_string(), "--prometheus-port", &metrics_port.to_string(), "--print", "none"],
        &test_config(""),
        &[],
    );

    // 10,000 distinct routes: words, not identifiers, so the route heuristic keeps them apart.
    let dir = sonde_e2e::TempDir::new("paths");
    let list = dir.path().join("urls");
    let lines: Vec<String> = (0..10_000)
        .map(|i| format!("url = \"http://127.0.0.1:{port}/page/{}\"\noutput = \"/dev/null\"\n", word(i)))
        .collect();
    std::fs::write(&list, lines.concat()).expect("write curl config");
    curl(&["-K", list.to_str().expect("utf-8 path")], &[]);

    let scrape = || curl(&[], &[format!("http://127.0.0.1:{metrics_port}/metrics")]);
    let counted = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("http_server_request_duration_seconds_count{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let text = wait_for(WAIT, || Some(scrape()).filter(|t| counted(t) == 10_000))
        .unwrap_or_else(|| panic!("sonde never counted 10,000 requests: {}", counted(&scrape())));

    let series: Vec<&str> =
        text.lines().filter(|l| l.starts_with("http_server_request_duration_seconds_count{")).collect();
    assert_eq!(series.len(), cap + 1, "the cap plus one overflow series");
    let overflow: Vec<&str> = series.iter().copied().filter(|l| l.contains(r#"otel_metric_overflow="true""#)).collect();
    assert_eq!(overflow.len(), 1);
    assert!(!overflow[0].contains("http_route"), "the overflow series carries no attributes: {}", overflow[0]);
    assert!(overflow[0].ends_with(&format!(" {}", 10_000 - cap)), "{}", overflow[0]);
    // Three instruments per server request (duration, request and response body size).
    let overflowed = text.lines().find(|l| l.starts_with("sonde_metric_overflow_total ")).expect("self-metric");
    assert_eq!(overflowed, format!("sonde_metric_overflow_total {}", 3 * (10_000 - cap)));

    let finished = sonde.stop();
    assert!(finished.status.success(), "sonde exit: {:?}\n{}", finished.status, finished.stderr);
    assert_eq!(finished.counter("events_lost"), Some(0));
}

/// A lowercase word unique to `i` (base 26), e.g. `baab`.
fn word(mut i: usize) -> String {
    let mut w = String::from("p");
    loop {
        w.push((b'a' + (i % 26) as u8) as char);
        i /= 26;
        if i == 0 {
            return w;
        }
    }
}

/// The metrics endpoint listens on loopback unless configured otherwise, and answers nothing but
/// GET /metrics: no method or path changes anything in sonde.
#[test]
fn privileged_metrics_endpoint_is_loopback_only_and_read_only() {
    let Some(_guard) = privileged_test("metrics endpoint exposure") else {
        return;
    };
    let port = free_port();
    let sonde = Sonde::start(
        &["--pid", &std::process::id().to_string(), "--prometheus-port", &port.to_string(), "--print", "none"],
        &test_config(""),
        &[],
    );
    let listening = std::process::Command::new("ss").args(["-Hltn", &format!("sport = :{port}")]).output().expect("ss");
    let listening = String::from_utf8_lossy(&listening.stdout);
    let local: Vec<&str> = listening.lines().filter_map(|l| l.split_whitespace().nth(3)).collect();
    assert_eq!(local, [format!("127.0.0.1:{port}")], "bound only to loopback: {listening}");
    let status = |method: &str, path: &str| {
        curl(&["-o", "/dev/null", "-w", "%{http_code}", "-X", method], &[format!("http://127.0.0.1:{port}{path}")])
    };
    assert_eq!(status("GET", "/metrics"), "200");
    for (method, path) in
        [("POST", "/metrics"), ("PUT", "/metrics"), ("DELETE", "/metrics"), ("GET", "/"), ("POST", "/quit")]
    {
        assert_eq!(status(method, path), "404", "{method} {path}");
    }
    let finished = sonde.stop();
    assert!(finished.status.success(), "sonde still ran normally: {}", finished.stderr);
}

/// Every exemplar must point at a span the trace backend received: with a 10% sampler, nine in
/// ten requests are counted in the histograms but never exported, so an exemplar taken from
/// any request would show here.
#[test]
fn privileged_exemplars_point_only_at_exported_spans_with_a_ten_percent_sampler() {
    let Some(_guard) = privileged_test("exemplars") else {
        return;
    };
    let port = free_port();
    let _server = servers::python_http(port, None);
    let receiver = HttpReceiver::start();
    let metrics_port = free_port();
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1000".into()),
        ("OTEL_TRACES_SAMPLER", "traceidratio".into()),
        ("OTEL_TRACES_SAMPLER_ARG", "0.1".into()),
    ];
    let sonde = Sonde::start(
        &["--open-ports", &port.to_string(), "--prometheus-port", &metrics_port.to_string()],
        &test_config(""),
        &env,
    );
    let prom_port = free_port();
    let _prometheus = servers::prometheus(prom_port, &[format!("127.0.0.1:{metrics_port}")], &[]);
    wait_scalar(prom_port, r#"up{job="sonde"}"#, 1.0);

    // Fast and slow requests, 8 connections at once, in rounds so that several scrapes (and
    // several settled export batches) see exemplars.
    let base = format!("http://127.0.0.1:{port}");
    let mut total = 0;
    for round in 0..4 {
        let mut urls: Vec<String> = (0..150).map(|i| format!("{base}/items/{}", round * 1000 + i)).collect();
        urls.extend((0..10).map(|_| format!("{base}/sleep/60")));
        total += urls.len();
        sonde_e2e::clients::curl_parallel(&urls, 8);
        std::thread::sleep(Duration::from_millis(1200));
    }
    wait_scalar(prom_port, r#"sum(http_server_request_duration_seconds_count{job="sonde"})"#, total as f64);
    // Two more scrapes after the last batch settled.
    std::thread::sleep(Duration::from_millis(2500));

    let exported = receiver.collected.spans();
    let exported_ids: std::collections::BTreeSet<(String, String)> =
        exported.iter().map(|s| (s.trace_id.clone(), s.span_id.clone())).collect();
    assert!(
        exported.len() > total / 20 && exported.len() < total / 5,
        "about 10% of {total} requests sampled, got {}",
        exported.len()
    );

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let answer = prometheus_api(
        prom_port,
        "/api/v1/query_exemplars",
        &[
            ("query", "http_server_request_duration_seconds_bucket"),
            ("start", &(now - 600).to_string()),
            ("end", &(now + 60).to_string()),
        ],
    );
    assert_eq!(answer["status"], "success", "{answer}");
    let mut seen = 0;
    for series in answer["data"].as_array().expect("exemplar series") {
        let le: f64 = match series["seriesLabels"]["le"].as_str().expect("le") {
            "+Inf" => f64::INFINITY,
            v => v.parse().expect("le value"),
        };
        for e in series["exemplars"].as_array().expect("exemplars") {
            let id = (
                e["labels"]["trace_id"].as_str().expect("trace_id").to_string(),
                e["labels"]["span_id"].as_str().expect("span_id").to_string(),
            );
            assert!(exported_ids.contains(&id), "exemplar {id:?} points at a span never exported");
            let value: f64 = e["value"].as_str().expect("value").parse().expect("value");
            assert!(value <= le, "exemplar value {value} above its bucket's bound {le}");
            let span = exported.iter().find(|s| (s.trace_id.clone(), s.span_id.clone()) == id).expect("span");
            let seconds = (span.end_ns - span.start_ns) as f64 / 1e9;
            assert!((seconds - value).abs() < 1e-6, "exemplar value {value} is the span's duration {seconds}");
            seen += 1;
        }
    }
    assert!(seen >= 2, "fast and slow buckets carry exemplars: {answer}");

    // The same rule over OTLP: exemplars on the histogram data points, all exported spans.
    let request = receiver.latest_metrics().expect("an OTLP metrics request");
    let points = histogram_points(&request, "http.server.request.duration");
    let otlp_exemplars: Vec<(String, String)> = points
        .iter()
        .flat_map(|p| p.exemplars.iter())
        .map(|e| {
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            (hex(&e.trace_id), hex(&e.span_id))
        })
        .collect();
    assert!(!otlp_exemplars.is_empty(), "OTLP histogram points carry exemplars");
    for id in &otlp_exemplars {
        assert!(exported_ids.contains(id), "OTLP exemplar {id:?} points at a span never exported");
    }
    let finished = sonde.stop();
    assert_eq!(finished.counter("spans_dropped_export_failed"), Some(0));
}
