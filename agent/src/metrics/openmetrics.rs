//! The RED histograms in OpenMetrics text, with exemplars on their buckets.
//!
//! Written here rather than through `prometheus-client`: its histogram encoder takes exemplars
//! only as values it constructs itself from live observations, and sonde's histograms are
//! cumulative counts aggregated in [`super::MetricsStore`]. The rest of the exposition (service
//! graph, sonde's own counters) still goes through `prometheus-client`.

use std::fmt::Write;

use super::{
    SeriesSnapshot,
    instruments::{INSTRUMENTS, Unit},
    store::attr_text,
};
use crate::trace::span::AttrValue;

/// OpenTelemetry attribute name -> Prometheus label name.
pub fn label_name(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

/// A label value as OpenMetrics quotes it.
fn escape(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A float as OpenMetrics writes it (`1.0`, `0.005`, `+Inf`).
fn float(v: f64) -> String {
    if v.is_infinite() { if v > 0.0 { "+Inf".into() } else { "-Inf".into() } } else { format!("{v:?}") }
}

/// The labels of one series: the process's service, then the metric's attributes.
fn series_labels(s: &SeriesSnapshot) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = vec![("service_name".into(), s.resource.service_name.clone())];
    if let Some((_, AttrValue::Str(id))) = s.resource.attributes.iter().find(|(k, _)| k == "service.instance.id") {
        labels.push(("service_instance_id".into(), id.to_string()));
    }
    labels.extend(s.attributes.iter().map(|(k, v)| (label_name(k), attr_text(v))));
    labels
}

fn write_labels(labels: &[(String, String)], le: Option<&str>, out: &mut String) {
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape(v, out);
        out.push('"');
    }
    if let Some(le) = le {
        if !labels.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "le=\"{le}\"");
    }
    out.push('}');
}

/// Every RED histogram family; `exemplars` adds each bucket's exemplar (only spans the trace
/// backend accepted), which only OpenMetrics scrapers understand.
pub fn write_histograms(snapshot: &[SeriesSnapshot], exemplars: bool, out: &mut String) {
    for (index, spec) in INSTRUMENTS.iter().enumerate() {
        let unit = match spec.unit {
            Unit::Seconds => "seconds",
            Unit::Bytes => "bytes",
        };
        let name = format!("{}_{unit}", spec.prometheus_base);
        let _ = writeln!(out, "# HELP {name} {}", spec.description.replace('\\', "\\\\").replace('\n', "\\n"));
        let _ = writeln!(out, "# TYPE {name} histogram");
        let _ = writeln!(out, "# UNIT {name} {unit}");
        for s in snapshot.iter().filter(|s| s.instrument == index) {
            let labels = series_labels(s);
            let shown: Vec<_> = if exemplars { s.point.exemplars().collect() } else { Vec::new() };
            let mut cumulative = 0;
            for (bucket, count) in s.point.bucket_counts.iter().enumerate() {
                cumulative += count;
                let le = spec.bounds.get(bucket).map_or_else(|| "+Inf".to_string(), |b| float(*b));
                let _ = write!(out, "{name}_bucket");
                write_labels(&labels, Some(&le), out);
                let _ = write!(out, " {cumulative}");
                if let Some((_, e)) = shown.iter().find(|(b, _)| *b == bucket) {
                    let _ = write!(
                        out,
                        " # {{trace_id=\"{}\",span_id=\"{}\"}} {} {:.3}",
                        hex(&e.trace_id),
                        hex(&e.span_id),
                        float(e.value),
                        e.time_unix_ns as f64 / 1e9
                    );
                }
                out.push('\n');
            }
            let _ = write!(out, "{name}_sum");
            write_labels(&labels, None, out);
            let _ = writeln!(out, " {}", float(s.point.sum));
            let _ = write!(out, "{name}_count");
            write_labels(&labels, None, out);
            let _ = writeln!(out, " {}", s.point.count);
        }
    }
}
