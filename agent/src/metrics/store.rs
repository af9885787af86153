//! Cumulative histograms keyed by (resource, attributes), with the cardinality guard.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use super::{
    exemplars::{BucketExemplar, DeliveryLog, Exemplar},
    instruments::{INSTRUMENTS, Unit, measurements},
};
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
    /// Per bucket, once a sampled span was offered (duration histograms only).
    exemplars: Vec<BucketExemplar>,
}

fn bucket_of(bounds: &[f64], v: f64) -> usize {
    bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len())
}

impl HistogramPoint {
    pub(crate) fn new(buckets: usize, now: u64) -> Self {
        Self { bucket_counts: vec![0; buckets + 1], sum: 0.0, count: 0, start_unix_ns: now, exemplars: Vec::new() }
    }

    pub(crate) fn record(&mut self, bounds: &[f64], v: f64) {
        self.bucket_counts[bucket_of(bounds, v)] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn offer_exemplar(&mut self, bounds: &[f64], exemplar: Exemplar, seq: u64, log: &DeliveryLog) {
        if self.exemplars.is_empty() {
            self.exemplars = vec![BucketExemplar::default(); self.bucket_counts.len()];
        }
        self.exemplars[bucket_of(bounds, exemplar.value)].offer(exemplar, seq, log);
    }

    fn settle_exemplars(&mut self, log: &DeliveryLog) {
        self.exemplars.iter_mut().for_each(|e| e.settle(log));
    }

    /// (bucket index, exemplar) of the buckets whose exemplar span reached the backend.
    pub fn exemplars(&self) -> impl Iterator<Item = (usize, &Exemplar)> {
        self.exemplars.iter().enumerate().filter_map(|(i, e)| e.shown.as_ref().map(|x| (i, x)))
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
    /// Which export batches reached the backend: exemplars wait for theirs.
    delivery: Arc<DeliveryLog>,
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
            delivery: Arc::default(),
        }
    }

    /// Where the span exporter settles its batches.
    pub fn delivery_log(&self) -> Arc<DeliveryLog> {
        self.delivery.clone()
    }

    /// Offers a sampled span, queued for export in batch `seq`, as the exemplar of the duration
    /// bucket it was counted in (by [`MetricsStore::record`], earlier).
    pub fn offer_exemplar(&self, span: &Span, seq: u64) {
        let seconds = span.end_unix_ns.saturating_sub(span.start_unix_ns) as f64 / 1e9;
        let is_http = span.attr("http.request.method").is_some();
        let is_db = span.attr("db.system.name").is_some();
        let Some(index) = measurements(span.kind, is_http, is_db, seconds, 0, 0)
            .into_iter()
            .map(|(i, _)| i)
            .find(|i| INSTRUMENTS[*i].unit == Unit::Seconds)
        else {
            return;
        };
        let spec = &INSTRUMENTS[index];
        let exemplar = Exemplar {
            trace_id: span.context.trace_id.0,
            span_id: span.context.span_id.0,
            value: seconds,
            time_unix_ns: span.end_unix_ns,
        };
        let resource_id = Arc::as_ptr(&span.resource) as usize;
        let key = (resource_id, spec.attributes.iter().filter_map(|k| span.attr(k).map(|v| (*k, v.clone()))).collect());
        let Ok(mut all) = self.instruments.lock() else { return };
        let series = &mut all[index];
        // The series `record` counted it in: its own, or the overflow series past the cap.
        let overflow = || (resource_id, vec![(OVERFLOW_ATTRIBUTE, AttrValue::Bool(true))]);
        let point = match series.points.contains_key(&key) {
            true => series.points.get_mut(&key),
            false => series.points.get_mut(&overflow()),
        };
        if let Some((_, point)) = point {
            point.offer_exemplar(spec.bounds, exemplar, seq, &self.delivery);
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

    /// Every series, copied (cumulative since its start), exemplars settled.
    pub fn snapshot(&self) -> Vec<SeriesSnapshot> {
        let Ok(mut all) = self.instruments.lock() else { return Vec::new() };
        let mut out = Vec::new();
        for (instrument, series) in all.iter_mut().enumerate() {
            for ((_, attrs), (resource, point)) in &mut series.points {
                point.settle_exemplars(&self.delivery);
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

    #[test]
    fn exemplars_appear_once_their_batch_is_delivered_and_in_openmetrics_only() {
        let store = MetricsStore::new(100);
        let r = resource();
        let fast = span("/a", 200, 7, &r);
        let mut slow = span("/a", 200, 300, &r);
        slow.context.span_id = SpanId([3; 8]);
        store.record(&fast);
        store.record(&slow);
        store.offer_exemplar(&fast, 1);
        store.offer_exemplar(&slow, 2);
        let render = |exemplars: bool| {
            let mut out = String::new();
            crate::metrics::openmetrics::write_histograms(&store.snapshot(), exemplars, &mut out);
            out
        };
        assert!(!render(true).contains(" # {"), "nothing settled yet");
        let log = store.delivery_log();
        log.settle(1, true);
        log.settle(2, false);
        let text = render(true);
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(" # {")).collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(
            lines[0].starts_with("http_server_request_duration_seconds_bucket{")
                && lines[0].contains("le=\"0.01\"} 1 # {trace_id=\"01010101010101010101010101010101\",span_id=\"0202020202020202\"} 0.007 1.007"),
            "{}",
            lines[0]
        );
        assert!(!render(false).contains(" # {"), "no exemplars for a plain-text scraper");
        let snap = store.snapshot();
        let d = snap.iter().find(|s| s.instrument == HTTP_SERVER_DURATION).unwrap();
        assert_eq!(d.point.exemplars().count(), 1, "the dropped batch's span is not an exemplar");
    }
}
