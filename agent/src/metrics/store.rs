//! Cumulative histograms keyed by (resource, attributes), with the cardinality guard.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use super::instruments::{INSTRUMENTS, measurements};
use crate::trace::{
    resource::Resource,
    span::{AttrValue, Span},
};

/// The attribute an overflow series carries (OpenTelemetry's cardinality-limit convention).
pub const OVERFLOW_ATTRIBUTE: &str = "otel.metric.overflow";

#[derive(Clone, Debug, PartialEq)]
pub struct HistogramPoint {
    /// Count per bucket (not cumulative); the last one is above the last bound.
    pub bucket_counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
    pub start_unix_ns: u64,
}

impl HistogramPoint {
    pub(crate) fn new(buckets: usize, now: u64) -> Self {
        Self { bucket_counts: vec![0; buckets + 1], sum: 0.0, count: 0, start_unix_ns: now }
    }

    pub(crate) fn record(&mut self, bounds: &[f64], v: f64) {
        let i = bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len());
        self.bucket_counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }
}

/// One series, copied out for an exporter.
#[derive(Clone, Debug)]
pub struct SeriesSnapshot {
    pub instrument: usize,
    pub resource: Arc<Resource>,
    pub attributes: Vec<(&'static str, AttrValue)>,
    pub point: HistogramPoint,
}

type Attributes = Vec<(&'static str, AttrValue)>;
/// (the process's resource, by address; the metric attributes).
type SeriesKey = (usize, Attributes);
/// Series are looked up for every measurement: a fast non-cryptographic hash (keys come from
/// the traced traffic, but the cap bounds how many there are).
type FastHash = foldhash::fast::RandomState;

#[derive(Default)]
struct InstrumentSeries {
    points: HashMap<SeriesKey, (Arc<Resource>, HistogramPoint), FastHash>,
    /// Distinct attribute sets admitted (the cap counts these, across resources).
    admitted: std::collections::HashSet<Attributes, FastHash>,
}

pub struct MetricsStore {
    max_series: usize,
    /// Edges between services (same cap on edges as on attribute sets).
    pub service_graph: super::service_graph::ServiceGraph,
    instruments: std::sync::Mutex<Vec<InstrumentSeries>>,
    /// Measurements that went to an overflow series because the cap was reached.
    pub overflowed: AtomicU64,
}

pub fn attr_text(v: &AttrValue) -> String {
    match v {
        AttrValue::Str(s) => s.to_string(),
        AttrValue::Int(i) => i.to_string(),
        AttrValue::Bool(b) => b.to_string(),
    }
}

impl std::fmt::Debug for MetricsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsStore").field("max_series", &self.max_series).finish_non_exhaustive()
    }
}

impl MetricsStore {
    pub fn new(max_series: usize) -> Self {
        Self {
            max_series,
            service_graph: super::service_graph::ServiceGraph::new(max_series),
            instruments: std::sync::Mutex::new(INSTRUMENTS.iter().map(|_| InstrumentSeries::default()).collect()),
            overflowed: AtomicU64::new(0),
        }
    }

    /// Records what a finished span measures. Called for every span, sampled or not.
    pub fn record(&self, span: &Span) {
        let is_http = span.attr("http.request.method").is_some();
        let is_db = span.attr("db.system.name").is_some();
        let int = |k: &str| match span.attr(k) {
            Some(AttrValue::Int(i)) => *i,
            _ => 0,
        };
        let seconds = span.end_unix_ns.saturating_sub(span.start_unix_ns) as f64 / 1e9;
        let values = measurements(
            span.kind,
            is_http,
            is_db,
            seconds,
            int("http.request.body.size"),
            int("http.response.body.size"),
        );
        if values.is_empty() {
            return;
        }
        let now = span.end_unix_ns;
        // The process's resource is shared (one Arc per process) and kept alive by the series
        // that use it, so its address identifies it without hashing its attributes.
        let resource_id = Arc::as_ptr(&span.resource) as usize;
        let Ok(mut all) = self.instruments.lock() else { return };
        // Instruments of one side share their attribute list: the key is built once per span and
        // borrowed for lookups; it is cloned only when a new series is created.
        let mut current: Option<(&'static [&'static str], SeriesKey)> = None;
        for (index, value) in values {
            let spec = &INSTRUMENTS[index];
            let key = match current {
                Some((list, ref key)) if std::ptr::eq(list, spec.attributes) => key,
                _ => {
                    let attrs = spec.attributes.iter().filter_map(|k| span.attr(k).map(|v| (*k, v.clone()))).collect();
                    &current.insert((spec.attributes, (resource_id, attrs))).1
                }
            };
            let series = &mut all[index];
            // Fast path: a series this process already has (one hash, no copy).
            if let Some((_, point)) = series.points.get_mut(key) {
                point.record(spec.bounds, value);
                continue;
            }
            let new_key = if series.admitted.contains(&key.1) {
                key.clone()
            } else if series.admitted.len() < self.max_series {
                series.admitted.insert(key.1.clone());
                key.clone()
            } else {
                self.overflowed.fetch_add(1, Relaxed);
                (resource_id, vec![(OVERFLOW_ATTRIBUTE, AttrValue::Bool(true))])
            };
            let (_, point) = series
                .points
                .entry(new_key)
                .or_insert_with(|| (span.resource.clone(), HistogramPoint::new(spec.bounds.len(), now)));
            point.record(spec.bounds, value);
        }
    }

    /// Every series, copied (cumulative since its start).
    pub fn snapshot(&self) -> Vec<SeriesSnapshot> {
        let Ok(all) = self.instruments.lock() else { return Vec::new() };
        let mut out = Vec::new();
        for (instrument, series) in all.iter().enumerate() {
            for ((_, attrs), (resource, point)) in &series.points {
                out.push(SeriesSnapshot {
                    instrument,
                    resource: resource.clone(),
                    attributes: attrs.clone(),
                    point: point.clone(),
                });
            }
        }
        out
    }

    pub fn series_count(&self, instrument: usize) -> usize {
        self.instruments.lock().map(|a| a[instrument].points.len()).unwrap_or(0)
    }

    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        metrics::instruments::{HTTP_SERVER_DURATION, HTTP_SERVER_RESPONSE_BODY},
        trace::{
            context::SpanContext,
            ids::{SpanId, TraceId},
            resource::ProcessIdentity,
            span::{Attr, SpanKind, Status},
        },
    };

    fn span(route: &str, status: i64, millis: u64, resource: &Arc<Resource>) -> Span {
        Span {
            context: SpanContext {
                trace_id: TraceId([1; 16]),
                span_id: SpanId([2; 8]),
                parent_id: None,
                sampled: false,
            },
            name: compact_str::format_compact!("GET {route}"),
            kind: SpanKind::Server,
            start_unix_ns: 1_000_000_000,
            end_unix_ns: 1_000_000_000 + millis * 1_000_000,
            attributes: vec![
                Attr::new("http.request.method", "GET"),
                Attr::new("http.route", route),
                Attr::new("url.path", format!("{route}/secret-path")),
                Attr::new("http.response.status_code", status),
                Attr::new("http.request.body.size", 0i64),
                Attr::new("http.response.body.size", 2000i64),
            ],
            status: Status::Unset,
            resource: resource.clone(),
        }
    }

    fn resource() -> Arc<Resource> {
        let p = ProcessIdentity {
            pid: 1,
            service_name: "web".into(),
            exe_path: "/bin/web".into(),
            host_name: "h".into(),
            start_ticks: 1,
        };
        Arc::new(Resource::for_process(&p, &[]))
    }

    #[test]
    fn durations_land_in_the_advised_buckets() {
        let store = MetricsStore::new(100);
        let r = resource();
        for ms in [1, 7, 7, 300, 20_000] {
            store.record(&span("/a", 200, ms, &r));
        }
        let snap = store.snapshot();
        let d = snap.iter().find(|s| s.instrument == HTTP_SERVER_DURATION).unwrap();
        assert_eq!(d.point.count, 5);
        assert_eq!(d.point.bucket_counts[0], 1, "1 ms <= 5 ms");
        assert_eq!(d.point.bucket_counts[1], 2, "7 ms <= 10 ms");
        assert_eq!(d.point.bucket_counts[7], 1, "300 ms <= 500 ms");
        assert_eq!(*d.point.bucket_counts.last().unwrap(), 1, "20 s above the last bound");
        assert!(!d.attributes.iter().any(|(k, _)| *k == "url.path"), "url.path is not a metric attribute");
        let body = snap.iter().find(|s| s.instrument == HTTP_SERVER_RESPONSE_BODY).unwrap();
        assert_eq!(body.point.sum, 10_000.0);
    }

    #[test]
    fn the_cap_sends_new_combinations_to_one_overflow_series() {
        let store = MetricsStore::new(10);
        let r = resource();
        for i in 0..1000 {
            store.record(&span(&format!("/r{i}"), 200, 1, &r));
        }
        assert_eq!(store.series_count(HTTP_SERVER_DURATION), 11, "10 admitted + 1 overflow");
        let snap = store.snapshot();
        let overflow = snap
            .iter()
            .find(|s| {
                s.instrument == HTTP_SERVER_DURATION
                    && s.attributes == vec![(OVERFLOW_ATTRIBUTE, AttrValue::Bool(true))]
            })
            .unwrap();
        assert_eq!(overflow.point.count, 990);
        assert_eq!(store.overflowed(), 990 * 3, "duration and two body sizes");
        // An admitted combination keeps its own series.
        store.record(&span("/r3", 200, 1, &r));
        assert_eq!(store.series_count(HTTP_SERVER_DURATION), 11);
    }
}
