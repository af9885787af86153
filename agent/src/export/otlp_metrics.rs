//! OTLP metrics: the RED histograms, cumulative, every `OTEL_METRIC_EXPORT_INTERVAL`, over gRPC or
//! HTTP/protobuf (same environment variables as traces, with `_METRICS_` variants).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Exemplar, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
        ScopeMetrics, Sum, exemplar, metric::Data, number_data_point,
    },
    resource::v1::Resource as OtlpResource,
};
use prost::Message;

use super::{otlp::OtlpSettings, transport::Transport};
use crate::{
    metrics::{
        MetricsStore,
        instruments::{DURATION_BOUNDS, INSTRUMENTS, Unit},
        service_graph::{self, Edge, EdgePoint},
    },
    stats::Stats,
    trace::span::AttrValue,
};

fn any(v: &AttrValue) -> AnyValue {
    AnyValue {
        value: Some(match v {
            AttrValue::Str(s) => any_value::Value::StringValue(s.to_string()),
            AttrValue::Int(i) => any_value::Value::IntValue(*i),
            AttrValue::Bool(b) => any_value::Value::BoolValue(*b),
        }),
    }
}

/// One request with every series: one ResourceMetrics per process, one Metric per instrument.
pub fn encode(store: &MetricsStore, now_unix_ns: u64) -> ExportMetricsServiceRequest {
    let mut by_resource: Vec<(Arc<crate::trace::resource::Resource>, Vec<Metric>)> = Vec::new();
    for s in store.snapshot() {
        let spec = &INSTRUMENTS[s.instrument];
        let point = HistogramDataPoint {
            attributes: s
                .attributes
                .iter()
                .map(|(k, v)| KeyValue { key: (*k).to_owned(), value: Some(any(v)) })
                .collect(),
            start_time_unix_nano: s.point.start_unix_ns,
            time_unix_nano: now_unix_ns,
            count: s.point.count,
            sum: Some(s.point.sum),
            bucket_counts: s.point.bucket_counts.clone(),
            explicit_bounds: spec.bounds.to_vec(),
            // Only spans the trace backend accepted (see metrics::exemplars).
            exemplars: s
                .point
                .exemplars()
                .map(|(_, e)| Exemplar {
                    time_unix_nano: e.time_unix_ns,
                    value: Some(exemplar::Value::AsDouble(e.value)),
                    span_id: e.span_id.to_vec(),
                    trace_id: e.trace_id.to_vec(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let group = match by_resource.iter_mut().find(|(r, _)| Arc::ptr_eq(r, &s.resource) || **r == *s.resource) {
            Some(g) => &mut g.1,
            None => {
                by_resource.push((s.resource.clone(), Vec::new()));
                &mut by_resource.last_mut().expect("just pushed").1
            }
        };
        match group.iter_mut().find(|m| m.name == spec.name) {
            Some(Metric { data: Some(Data::Histogram(h)), .. }) => h.data_points.push(point),
            _ => group.push(Metric {
                name: spec.name.to_owned(),
                description: spec.description.to_owned(),
                unit: match spec.unit {
                    Unit::Seconds => "s".into(),
                    Unit::Bytes => "By".into(),
                },
                data: Some(Data::Histogram(Histogram {
                    data_points: vec![point],
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                })),
                ..Default::default()
            }),
        }
    }
    let scope =
        InstrumentationScope { name: "sonde".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() };
    let graph = service_graph_metrics(store, now_unix_ns);
    let mut resource_metrics: Vec<ResourceMetrics> = by_resource
        .into_iter()
        .map(|(r, metrics)| ResourceMetrics {
            resource: Some(OtlpResource {
                attributes: r
                    .attributes
                    .iter()
                    .map(|(k, v)| KeyValue { key: k.clone(), value: Some(any(v)) })
                    .collect(),
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics { scope: Some(scope.clone()), metrics, schema_url: String::new() }],
            schema_url: String::new(),
        })
        .collect();
    if !graph.is_empty() {
        // Edges join two services: they belong to no process's resource.
        let host = crate::discovery::procfs::host_name();
        resource_metrics.push(ResourceMetrics {
            resource: Some(OtlpResource {
                attributes: vec![
                    KeyValue { key: "service.name".into(), value: Some(any(&AttrValue::from("sonde"))) },
                    KeyValue { key: "host.name".into(), value: Some(any(&AttrValue::from(host))) },
                ],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics { scope: Some(scope), metrics: graph, schema_url: String::new() }],
            schema_url: String::new(),
        });
    }
    ExportMetricsServiceRequest { resource_metrics }
}

/// Tempo's service-graph metrics: two cumulative sums and two histograms per edge.
fn service_graph_metrics(store: &MetricsStore, now_unix_ns: u64) -> Vec<Metric> {
    let edges = store.service_graph.snapshot();
    if edges.is_empty() {
        return Vec::new();
    }
    let attributes = |e: &Edge| -> Vec<KeyValue> {
        let kv = |k: &str, v: &str| KeyValue { key: k.into(), value: Some(any(&AttrValue::from(v))) };
        if e.overflow {
            return vec![KeyValue { key: "otel.metric.overflow".into(), value: Some(any(&AttrValue::Bool(true))) }];
        }
        vec![kv("client", &e.client), kv("server", &e.server), kv("connection_type", e.connection_type)]
    };
    let sum = |name: &str, pick: fn(&EdgePoint) -> u64| Metric {
        name: name.into(),
        data: Some(Data::Sum(Sum {
            data_points: edges
                .iter()
                .map(|(e, p)| NumberDataPoint {
                    attributes: attributes(e),
                    start_time_unix_nano: p.server.start_unix_ns.min(p.client.start_unix_ns),
                    time_unix_nano: now_unix_ns,
                    value: Some(number_data_point::Value::AsInt(pick(p) as i64)),
                    ..Default::default()
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    };
    let histogram = |name: &str, server_side: bool| Metric {
        name: name.into(),
        unit: "s".into(),
        data: Some(Data::Histogram(Histogram {
            data_points: edges
                .iter()
                .map(|(e, p)| (e, if server_side { &p.server } else { &p.client }))
                .filter(|(_, h)| h.count > 0)
                .map(|(e, h)| HistogramDataPoint {
                    attributes: attributes(e),
                    start_time_unix_nano: h.start_unix_ns,
                    time_unix_nano: now_unix_ns,
                    count: h.count,
                    sum: Some(h.sum),
                    bucket_counts: h.bucket_counts.clone(),
                    explicit_bounds: DURATION_BOUNDS.to_vec(),
                    ..Default::default()
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })),
        ..Default::default()
    };
    vec![
        sum(service_graph::REQUEST_TOTAL, |p| p.total),
        sum(service_graph::REQUEST_FAILED_TOTAL, |p| p.failed),
        histogram(service_graph::SERVER_SECONDS, true),
        histogram(service_graph::CLIENT_SECONDS, false),
    ]
}

/// Exports every `interval` until the task is aborted; a final export runs on `flush`.
pub async fn run(
    settings: OtlpSettings,
    interval: Duration,
    store: Arc<MetricsStore>,
    stats: Arc<Stats>,
    mut flush: tokio::sync::oneshot::Receiver<()>,
) {
    let mut transport = match Transport::new(&settings) {
        Ok(t) => t,
        Err(e) => {
            log::error!("metrics export disabled: {e}");
            return;
        }
    };
    // Logged when failures start and when they end, not for every interval.
    let mut failing = false;
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        let last = tokio::select! {
            _ = ticker.tick() => false,
            _ = &mut flush => true,
        };
        let now = crate::clock::Clock::calibrated().to_unix_ns(crate::clock::Clock::monotonic_now());
        let request = encode(&store, now);
        if !request.resource_metrics.is_empty() {
            match transport.send(&settings, Bytes::from(request.encode_to_vec())).await {
                Ok(()) => {
                    if std::mem::take(&mut failing) {
                        log::info!("metrics export to {} recovered", settings.endpoint);
                    }
                }
                Err(e) => {
                    Stats::add(&stats.export_errors, 1);
                    if !std::mem::replace(&mut failing, true) {
                        log::warn!(
                            "metrics export to {} failing: {}; trying again every interval",
                            settings.endpoint,
                            e.message
                        );
                    }
                }
            }
        }
        if last {
            return;
        }
    }
}
