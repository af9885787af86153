//! Prometheus exposition (OpenMetrics text) of the RED histograms (see [`super::openmetrics`], with
//! exemplars when the scraper asks for OpenMetrics), the service graph and sonde's own counters
//! (through the maintained `prometheus-client` encoder), served read-only on GET /metrics.

use std::{borrow::Cow, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use super::{
    MetricsStore,
    instruments::DURATION_BOUNDS,
    openmetrics,
    service_graph::{self, Edge, EdgePoint},
};
use sonde_common::inject_reason;

use crate::{capture::map_usage::MapFill, stats::Stats};

/// A counter family: name, help, label key, and (label value, count) per series.
type LabelledCounter = (&'static str, &'static str, &'static str, Vec<(&'static str, u64)>);

#[derive(Debug)]
struct Exposition {
    store: Arc<MetricsStore>,
    stats: Arc<Stats>,
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_service_graph(&mut encoder)?;
        self.encode_self_metrics(&mut encoder)
    }
}

/// Labels of a service-graph edge.
fn edge_labels(edge: &Edge) -> Vec<(String, String)> {
    if edge.overflow {
        return vec![("otel_metric_overflow".into(), "true".into())];
    }
    vec![
        ("client".into(), edge.client.to_string()),
        ("server".into(), edge.server.to_string()),
        ("connection_type".into(), edge.connection_type.into()),
    ]
}

fn histogram_buckets(point: &crate::metrics::HistogramPoint) -> Vec<(f64, u64)> {
    let mut buckets: Vec<(f64, u64)> =
        DURATION_BOUNDS.iter().copied().zip(point.bucket_counts.iter().copied()).collect();
    buckets.push((f64::MAX, point.bucket_counts.last().copied().unwrap_or(0)));
    buckets
}

impl Exposition {
    /// Tempo's service-graph series (no resource labels: an edge joins two services).
    fn encode_service_graph(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let edges = self.store.service_graph.snapshot();
        for (name, help, pick) in [
            (
                service_graph::REQUEST_TOTAL,
                "Requests between two services (Tempo service graph).",
                (|p: &EdgePoint| p.total) as fn(&EdgePoint) -> u64,
            ),
            (service_graph::REQUEST_FAILED_TOTAL, "Failed requests between two services.", |p: &EdgePoint| p.failed),
        ] {
            let base = name.strip_suffix("_total").unwrap_or(name);
            let mut metric = encoder.encode_descriptor(base, help, None, MetricType::Counter)?;
            for (edge, point) in &edges {
                ConstCounter::new(pick(point)).encode(metric.encode_family(&edge_labels(edge))?)?;
            }
        }
        for (name, help, server_side) in [
            (service_graph::SERVER_SECONDS, "Request duration as the server saw it, per edge.", true),
            (service_graph::CLIENT_SECONDS, "Request duration as the client saw it, per edge.", false),
        ] {
            let base = name.strip_suffix("_seconds").unwrap_or(name);
            let mut metric = encoder.encode_descriptor(base, help, Some(&Unit::Seconds), MetricType::Histogram)?;
            for (edge, point) in &edges {
                let h = if server_side { &point.server } else { &point.client };
                if h.count == 0 {
                    continue;
                }
                metric.encode_family(&edge_labels(edge))?.encode_histogram::<Vec<(String, String)>>(
                    h.sum,
                    h.count,
                    &histogram_buckets(h),
                    None,
                )?;
            }
        }
        Ok(())
    }
}

impl Exposition {
    fn encode_self_metrics(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = &self.stats;
        let g = Stats::get;
        let counters: [(&str, &str, u64); 20] = [
            ("sonde_events_read", "Records read from the kernel ring buffer.", g(&st.events_read)),
            (
                "sonde_events_lost",
                "Records the kernel could not queue (ring buffer full).",
                g(&st.kernel_ringbuf_drops),
            ),
            ("sonde_bytes_captured", "Payload bytes copied by the kernel side.", g(&st.kernel_bytes_captured)),
            (
                "sonde_bytes_not_captured",
                "Bytes beyond the per-syscall capture limit: skipped, messages inside them unseen.",
                g(&st.bytes_not_captured),
            ),
            ("sonde_unmatched_requests", "Requests that never got a response.", g(&st.unmatched_requests)),
            (
                "sonde_streams_unrecognized",
                "Connections whose bytes matched no supported protocol (not parsed).",
                g(&st.streams_unrecognized),
            ),
            ("sonde_unmatched_responses", "Responses without a request.", g(&st.unmatched_responses)),
            ("sonde_spans_exported", "Spans accepted by the OTLP backend.", g(&st.spans_exported)),
            (
                "sonde_context_joined",
                "Server spans joined to the client span of a caller traced on this host.",
                g(&st.context_joined),
            ),
            ("sonde_export_errors", "Failed OTLP export requests.", g(&st.export_errors)),
            (
                "sonde_traceparent_injected",
                "Outgoing HTTP/1.x requests into which the kernel wrote a traceparent (propagation.inject_http).",
                g(&st.kernel_inject[inject_reason::INJECTED as usize]),
            ),
            ("sonde_tls_unattributed", "TLS plaintext whose socket could not be identified.", g(&st.kernel_tls_no_fd)),
            ("sonde_logs_captured", "Log records made from what traced processes wrote.", g(&st.logs_captured)),
            ("sonde_logs_exported", "Log records accepted by the OTLP backend.", g(&st.logs_exported)),
            (
                "sonde_log_bytes_not_captured",
                "Bytes of log writes beyond logs.max_bytes (the rest of those lines is lost).",
                g(&st.log_bytes_not_captured),
            ),
            ("sonde_logs_redacted", "Credentials replaced in log records.", g(&st.logs_redacted)),
            (
                "sonde_http2_fields_undecodable",
                "HTTP/2 header fields left out of spans: they referred to compression state sonde never saw (connections seen mid-stream, header blocks not captured whole).",
                g(&st.http2_fields_undecodable),
            ),
            (
                "sonde_k8s_api_errors",
                "Failed Kubernetes API requests and watch errors (tracing goes on with the cached pods).",
                g(&st.k8s_api_errors),
            ),
            (
                "sonde_k8s_relists",
                "Full pod relists after the first (410 Gone, or a watch that could not resume).",
                g(&st.k8s_relists),
            ),
            (
                "sonde_metric_overflow",
                "Measurements recorded in an overflow series (cardinality cap).",
                self.store.overflowed(),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        let kernel = |r: u32| g(&st.kernel_inject[r as usize]);
        let labelled: [LabelledCounter; 7] = [
            (
                "sonde_logs_dropped",
                "Log records (or writes, for reason kernel) lost before export, by reason.",
                "reason",
                vec![
                    ("kernel", g(&st.logs_dropped_kernel)),
                    ("queue_full", g(&st.logs_dropped_queue_full)),
                    ("export_failed", g(&st.logs_dropped_export_failed)),
                ],
            ),
            (
                "sonde_logs_unlinked",
                "Log records written while their thread served requests that carry no trace, by reason.",
                "reason",
                vec![("ambiguous", g(&st.logs_unlinked_ambiguous)), ("expired", g(&st.logs_unlinked_expired))],
            ),
            (
                "sonde_traceparent_skipped",
                "Outgoing HTTP/1.x requests left without an injected traceparent, by reason.",
                "reason",
                vec![
                    ("traceparent_present", kernel(inject_reason::TRACEPARENT_PRESENT)),
                    ("connection_before_start", g(&st.traceparent_skipped_before_start)),
                ],
            ),
            (
                "sonde_traceparent_given_up",
                "Connections the injection stopped following (never rewritten again), by reason.",
                "reason",
                vec![
                    ("not_http1", kernel(inject_reason::NOT_HTTP1)),
                    ("head_incomplete", kernel(inject_reason::HEAD_INCOMPLETE)),
                    ("body_unknown", kernel(inject_reason::BODY_UNKNOWN)),
                    ("pipelined", kernel(inject_reason::PIPELINED)),
                    ("rewrite_failed", kernel(inject_reason::REWRITE_FAILED)),
                ],
            ),
            (
                "sonde_parse_errors",
                "Bytes a protocol parser could not frame, by protocol.",
                "protocol",
                vec![
                    ("http", g(&st.http_parse_errors)),
                    ("postgresql", g(&st.postgres_parse_errors)),
                    ("redis", g(&st.redis_parse_errors)),
                    ("http2", g(&st.http2_parse_errors)),
                ],
            ),
            (
                "sonde_spans_dropped",
                "Spans dropped before export, by reason.",
                "reason",
                vec![
                    ("queue_full", g(&st.spans_dropped_queue_full)),
                    ("export_failed", g(&st.spans_dropped_export_failed)),
                    ("unsampled", g(&st.spans_unsampled)),
                ],
            ),
            (
                "sonde_context_unlinked",
                "Spans started without the parent they may have had (no unambiguous evidence), by reason.",
                "reason",
                st.unlinked().to_vec(),
            ),
        ];
        for (name, help, key, values) in labelled {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (value_label, value) in values {
                let labels = vec![(Cow::Borrowed(key), Cow::Borrowed(value_label))];
                let family = metric.encode_family(&labels)?;
                ConstCounter::new(value).encode(family)?;
            }
        }
        let gauges: [(&str, &str, u64); 5] = [
            ("sonde_traced_processes", "Processes sonde traces now.", g(&st.traced_processes)),
            ("sonde_k8s_pods_cached", "Pods of this node the Kubernetes metadata cache holds.", g(&st.k8s_pods_cached)),
            (
                "sonde_joins_waiting",
                "Server requests waiting for their same-host client request to be seen.",
                g(&st.joins_waiting),
            ),
            ("sonde_spans_held", "Finished spans held until their same-host join resolves.", g(&st.spans_held)),
            (
                "sonde_connections_tracked",
                "Connections sonde holds state for now (user space).",
                g(&st.connections_tracked),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value as i64);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        let maps = st.kernel_maps.lock().map(|m| m.clone()).unwrap_or_default();
        for (name, help, pick) in [
            (
                "sonde_kernel_map_entries",
                "Entries in sonde's per-process and per-connection kernel maps, by map.",
                (|f: &MapFill| f.entries) as fn(&MapFill) -> u64,
            ),
            ("sonde_kernel_map_capacity", "Maximum entries of each of those kernel maps.", |f: &MapFill| f.capacity),
        ] {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for fill in &maps {
                let labels = vec![(Cow::Borrowed("map"), Cow::Borrowed(fill.name))];
                ConstGauge::new(pick(fill) as i64).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// What GET /metrics shows: the RED histograms from the store, the rest from the registry.
pub struct Endpoint {
    registry: Registry,
    store: Arc<MetricsStore>,
}

impl Endpoint {
    pub fn new(store: Arc<MetricsStore>, stats: Arc<Stats>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exposition { store: store.clone(), stats }));
        Self { registry, store }
    }

    /// The whole exposition; `exemplars` when the scraper accepts OpenMetrics.
    pub fn render(&self, exemplars: bool) -> String {
        let mut out = String::new();
        openmetrics::write_histograms(&self.store.snapshot(), exemplars, &mut out);
        if prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)
            .and_then(|_| prometheus_client::encoding::text::encode_eof(&mut out))
            .is_err()
        {
            out.clear();
        }
        out
    }
}

/// Exemplars are an OpenMetrics feature: shown only to a scraper that asks for that format
/// (Prometheus does when exemplar storage is on; a plain-text parser would reject them).
fn accepts_openmetrics(req: &Request<hyper::body::Incoming>) -> bool {
    req.headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// Serves GET /metrics on `addr` until the task is dropped. Nothing else is accepted: the
/// endpoint takes no commands.
pub async fn serve(addr: SocketAddr, endpoint: Arc<Endpoint>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    log::info!("Prometheus metrics on http://{addr}/metrics");
    loop {
        let (stream, _) = listener.accept().await?;
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let endpoint = endpoint.clone();
                async move {
                    let response = if req.method() == Method::GET && req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                            .body(Full::new(Bytes::from(endpoint.render(accepts_openmetrics(&req)))))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"only GET /metrics\n")))
                    };
                    response.map_err(std::io::Error::other)
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
