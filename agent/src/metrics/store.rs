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
    instruments::{Family, INSTRUMENTS, Unit, measurements},
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
/// Series are looked up for every measurement: a fast non-cryptographic hash (keys come from
/// the traced traffic, but the cap bounds how many there are).
type FastHash = foldhash::fast::RandomState;

/// Where a span was counted: its series in its instrument group. An exemplar offered later goes
/// straight there, without a second lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesRef {
    group: u16,
    series: u32,
}

/// One process's attribute combination, with a point per instrument of its group.
struct Series {
    /// The resource's address: one Arc per process, kept alive by `resource`.
    resource_id: usize,
    resource: Arc<Resource>,
    attributes: Attributes,
    points: Vec<HistogramPoint>,
}

/// Instruments measured from the same span attributes (an HTTP server span's duration and body
/// sizes): one lookup per span finds the series of all of them.
struct Group {
    attribute_names: &'static [&'static str],
    /// Indices into [`INSTRUMENTS`], in the order of each series' points.
    instruments: Vec<usize>,
    /// Never removed: a [`SeriesRef`] stays valid (the metrics are cumulative).
    series: Vec<Series>,
    /// Indices into `series` by the hash of (resource, attributes); overflow series are not here.
    index: hashbrown::HashTable<u32>,
    /// Each process's overflow series, past the cap.
    overflow: HashMap<usize, u32>,
    /// Distinct attribute sets admitted (the cap counts these, across resources).
    admitted: std::collections::HashSet<Attributes, FastHash>,
}

impl Group {
    /// True when `series` holds exactly the span's values of the group's attributes.
    fn matches(&self, series: &Series, resource_id: usize, span: &Span) -> bool {
        if series.resource_id != resource_id {
            return false;
        }
        let mut stored = series.attributes.iter();
        for name in self.attribute_names {
            if let Some(value) = span.attr(name) {
                match stored.next() {
                    Some((n, v)) if n == name && v == value => {}
                    _ => return false,
                }
            }
        }
        stored.next().is_none()
    }
}

pub struct MetricsStore {
    max_series: usize,
    /// Edges between services (same cap on edges as on attribute sets).
    pub service_graph: super::service_graph::ServiceGraph,
    groups: std::sync::Mutex<Vec<Group>>,
    /// instrument -> (its group, its position in the group's points).
    placement: Vec<(u16, usize)>,
    hasher: FastHash,
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

/// The hash of a series key, fed the same way from a span (no copy) and from a stored series.
fn key_hash<'a>(
    hasher: &FastHash,
    resource_id: usize,
    attributes: impl Iterator<Item = (&'a str, &'a AttrValue)>,
) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = hasher.build_hasher();
    resource_id.hash(&mut h);
    for (name, value) in attributes {
        name.hash(&mut h);
        value.hash(&mut h);
    }
    h.finish()
}

impl MetricsStore {
    pub fn new(max_series: usize) -> Self {
        let mut groups: Vec<Group> = Vec::new();
        let mut placement = Vec::new();
        for (index, spec) in INSTRUMENTS.iter().enumerate() {
            let group = match groups.iter().position(|g| std::ptr::eq(g.attribute_names, spec.attributes)) {
                Some(g) => g,
                None => {
                    groups.push(Group {
                        attribute_names: spec.attributes,
                        instruments: Vec::new(),
                        series: Vec::new(),
                        index: hashbrown::HashTable::new(),
                        overflow: HashMap::new(),
                        admitted: Default::default(),
                    });
                    groups.len() - 1
                }
            };
            placement.push((group as u16, groups[group].instruments.len()));
            groups[group].instruments.push(index);
        }
        Self {
            max_series,
            service_graph: super::service_graph::ServiceGraph::new(max_series),
            groups: std::sync::Mutex::new(groups),
            placement,
            hasher: FastHash::default(),
            overflowed: AtomicU64::new(0),
            delivery: Arc::default(),
        }
    }

    /// Where the span exporter settles its batches.
    pub fn delivery_log(&self) -> Arc<DeliveryLog> {
        self.delivery.clone()
    }

    /// Offers a sampled span, queued for export in batch `seq`, as the exemplar of the duration
    /// bucket it was counted in (`counted_in`, from [`MetricsStore::record`]).
    pub fn offer_exemplar(&self, span: &Span, counted_in: SeriesRef, seq: u64) {
        let seconds = span.end_unix_ns.saturating_sub(span.start_unix_ns) as f64 / 1e9;
        let exemplar = Exemplar {
            trace_id: span.context.trace_id.0,
            span_id: span.context.span_id.0,
            value: seconds,
            time_unix_ns: span.end_unix_ns,
        };
        let Ok(mut groups) = self.groups.lock() else { return };
        let Some(group) = groups.get_mut(counted_in.group as usize) else { return };
        let Some(position) = group.instruments.iter().position(|i| INSTRUMENTS[*i].unit == Unit::Seconds) else {
            return;
        };
        let bounds = INSTRUMENTS[group.instruments[position]].bounds;
        if let Some(series) = group.series.get_mut(counted_in.series as usize) {
            series.points[position].offer_exemplar(bounds, exemplar, seq, &self.delivery);
        }
    }

    /// Records what a finished span measures. Called for every span, sampled or not. Returns
    /// the series it was counted in, for [`MetricsStore::offer_exemplar`].
    pub fn record(&self, span: &Span) -> Option<SeriesRef> {
        let family = if span.attr("http.request.method").is_some() {
            Family::Http
        } else if span.attr("rpc.system.name").is_some() {
            Family::Rpc
        } else if span.attr("db.system.name").is_some() {
            Family::Db
        } else {
            Family::Other
        };
        let int = |k: &str| match span.attr(k) {
            Some(AttrValue::Int(i)) => *i,
            _ => 0,
        };
        let seconds = span.end_unix_ns.saturating_sub(span.start_unix_ns) as f64 / 1e9;
        let values =
            measurements(span.kind, family, seconds, int("http.request.body.size"), int("http.response.body.size"));
        let (group_index, _) = *self.placement.get(values.first()?.0)?;
        // The process's resource is shared (one Arc per process) and kept alive by the series
        // that use it, so its address identifies it without hashing its attributes.
        let resource_id = Arc::as_ptr(&span.resource) as usize;
        let Ok(mut groups) = self.groups.lock() else { return None };
        let group = &mut groups[group_index as usize];
        let names = group.attribute_names;
        let from_span = || names.iter().filter_map(|k| span.attr(k).map(|v| (*k, v)));
        let hash = key_hash(&self.hasher, resource_id, from_span());
        let found = group.index.find(hash, |&i| group.matches(&group.series[i as usize], resource_id, span)).copied();
        let series = match found {
            Some(i) => i,
            None => self.add_series(group, span, resource_id, hash, values.len() as u64),
        };
        let points = &mut group.series[series as usize].points;
        for (instrument, value) in values {
            let (_, position) = self.placement[instrument];
            points[position].record(INSTRUMENTS[instrument].bounds, value);
        }
        Some(SeriesRef { group: group_index, series })
    }

    /// A combination not seen for this process: its own series while the cap allows, else the
    /// process's overflow series. `measured`: how many measurements the span brings.
    fn add_series(&self, group: &mut Group, span: &Span, resource_id: usize, hash: u64, measured: u64) -> u32 {
        let attributes: Attributes =
            group.attribute_names.iter().filter_map(|k| span.attr(k).map(|v| (*k, v.clone()))).collect();
        let admitted = group.admitted.contains(&attributes) || group.admitted.len() < self.max_series;
        let new_series = |attributes| Series {
            resource_id,
            resource: span.resource.clone(),
            attributes,
            points: group
                .instruments
                .iter()
                .map(|i| HistogramPoint::new(INSTRUMENTS[*i].bounds.len(), span.end_unix_ns))
                .collect(),
        };
        if !admitted {
            self.overflowed.fetch_add(measured, Relaxed);
            if let Some(i) = group.overflow.get(&resource_id) {
                return *i;
            }
            let series = new_series(vec![(OVERFLOW_ATTRIBUTE, AttrValue::Bool(true))]);
            group.series.push(series);
            let i = (group.series.len() - 1) as u32;
            group.overflow.insert(resource_id, i);
            return i;
        }
        group.admitted.insert(attributes.clone());
        let series = new_series(attributes);
        group.series.push(series);
        let i = (group.series.len() - 1) as u32;
        let (all, hasher) = (&group.series, &self.hasher);
        group.index.insert_unique(hash, i, |&j| {
            let s = &all[j as usize];
            key_hash(hasher, s.resource_id, s.attributes.iter().map(|(k, v)| (*k, v)))
        });
        i
    }

    /// Every series, copied (cumulative since its start), exemplars settled.
    pub fn snapshot(&self) -> Vec<SeriesSnapshot> {
        let Ok(mut groups) = self.groups.lock() else { return Vec::new() };
        let mut out = Vec::new();
        for group in groups.iter_mut() {
            for series in &mut group.series {
                for (position, instrument) in group.instruments.iter().enumerate() {
                    let point = &mut series.points[position];
                    point.settle_exemplars(&self.delivery);
                    out.push(SeriesSnapshot {
                        instrument: *instrument,
                        resource: series.resource.clone(),
                        attributes: series.attributes.clone(),
                        point: point.clone(),
                    });
                }
            }
        }
        out.sort_by_key(|s| s.instrument);
        out
    }

    pub fn series_count(&self, instrument: usize) -> usize {
        let (group, _) = self.placement[instrument];
        self.groups.lock().map(|g| g[group as usize].series.len()).unwrap_or(0)
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
            counted_in: None,
        }
    }

    fn resource() -> Arc<Resource> {
        let p = ProcessIdentity {
            pid: 1,
            service_name: "web".into(),
            exe_path: "/bin/web".into(),
            host_name: "h".into(),
            start_ticks: 1,
            platform: Vec::new(),
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
        let counted_fast = store.record(&fast).unwrap();
        let counted_slow = store.record(&slow).unwrap();
        assert_eq!(counted_fast, counted_slow, "one series");
        store.offer_exemplar(&fast, counted_fast, 1);
        store.offer_exemplar(&slow, counted_slow, 2);
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
