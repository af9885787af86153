//! Spans and log records on stdout: one human line each (`text`) or one JSON object per line
//! (`json`; log records have `"signal": "log"`).

use std::io::Write;

use serde_json::{Map, Value, json};

use crate::{
    logs::LogRecord,
    trace::span::{AttrValue, Span, Status},
};

fn attr_json(v: &AttrValue) -> Value {
    match v {
        AttrValue::Str(s) => Value::String(s.to_string()),
        AttrValue::Int(i) => json!(i),
        AttrValue::Bool(b) => json!(b),
    }
}

pub fn to_json(span: &Span) -> Value {
    let attributes: Map<String, Value> =
        span.attributes.iter().map(|a| (a.key.to_owned(), attr_json(&a.value))).collect();
    let resource: Map<String, Value> =
        span.resource.attributes.iter().map(|(k, v)| (k.clone(), attr_json(v))).collect();
    let (status, message) = match &span.status {
        Status::Unset => ("unset", String::new()),
        Status::Error(m) => ("error", m.clone()),
    };
    json!({
        "trace_id": span.context.trace_id.to_string(),
        "span_id": span.context.span_id.to_string(),
        "parent_span_id": span.context.parent_id.map(|p| p.to_string()),
        "name": span.name.as_str(),
        "kind": span.kind.as_str(),
        "start_unix_nano": span.start_unix_ns,
        "end_unix_nano": span.end_unix_ns,
        "attributes": attributes,
        "status": {"code": status, "message": message},
        "resource": resource,
    })
}

pub fn to_text(span: &Span) -> String {
    let dur_ms = span.end_unix_ns.saturating_sub(span.start_unix_ns) as f64 / 1e6;
    let status = match span.attr("http.response.status_code") {
        Some(AttrValue::Int(code)) => code.to_string(),
        _ => "-".into(),
    };
    let err = if matches!(span.status, Status::Error(_)) { " ERROR" } else { "" };
    let parent = span.context.parent_id.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    format!(
        "{:<6} {:<28} {:>4} {:>9.3}ms{err}  service={} trace={} span={} parent={}",
        span.kind.as_str(),
        span.name,
        status,
        dur_ms,
        span.resource.service_name,
        span.context.trace_id,
        span.context.span_id,
        parent
    )
}

pub fn log_to_json(r: &LogRecord) -> Value {
    let resource: Map<String, Value> = r.resource.attributes.iter().map(|(k, v)| (k.clone(), attr_json(v))).collect();
    json!({
        "signal": "log",
        "time_unix_nano": r.time_unix_ns,
        "observed_time_unix_nano": r.observed_unix_ns,
        "severity_number": r.severity.as_ref().map(|s| s.number),
        "severity_text": r.severity.as_ref().map(|s| s.text.as_str()),
        "body": r.body,
        "log.iostream": r.stream.iostream(),
        "log.file.path": r.file_path.as_deref(),
        "trace_id": r.trace.map(|t| t.trace_id.to_string()),
        "span_id": r.trace.map(|t| t.span_id.to_string()),
        "resource": resource,
    })
}

pub fn log_to_text(r: &LogRecord) -> String {
    let severity = r.severity.as_ref().map_or("-", |s| s.text.as_str());
    let source = r.file_path.as_deref().or(r.stream.iostream()).unwrap_or("-");
    let (trace, span) = match &r.trace {
        Some(t) => (t.trace_id.to_string(), t.span_id.to_string()),
        None => ("-".into(), "-".into()),
    };
    format!(
        "LOG    {source:<28} {severity:>5}  service={} trace={trace} span={span}  {}",
        r.resource.service_name,
        r.body.replace('\n', "\n    ")
    )
}

/// Writes spans to stdout; a closed stdout (e.g. `| head`) is not an error worth dying for.
pub struct Printer {
    json: bool,
    out: std::io::Stdout,
}

impl Printer {
    pub fn new(json: bool) -> Self {
        Self { json, out: std::io::stdout() }
    }

    pub fn print(&mut self, span: &Span) {
        let line = if self.json { to_json(span).to_string() } else { to_text(span) };
        self.write_line(&line);
    }

    pub fn print_log(&mut self, record: &LogRecord) {
        let line = if self.json { log_to_json(record).to_string() } else { log_to_text(record) };
        self.write_line(&line);
    }

    fn write_line(&mut self, line: &str) {
        let mut lock = self.out.lock();
        let _ = writeln!(lock, "{line}");
        let _ = lock.flush();
    }
}
