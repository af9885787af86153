//! Log records as the tests see them, from OTLP `ExportLogsServiceRequest`s.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::{collector::logs::v1::ExportLogsServiceRequest, common::v1::any_value::Value};

use crate::span::{V, hex, value};

#[derive(Clone, Debug)]
pub struct TestLog {
    pub body: String,
    pub severity_number: i32,
    pub severity_text: String,
    /// Hex; empty when the record carries no trace.
    pub trace_id: String,
    pub span_id: String,
    pub flags: u32,
    pub time_unix_nano: u64,
    pub attrs: BTreeMap<String, V>,
    pub resource: BTreeMap<String, V>,
}

impl TestLog {
    pub fn s(&self, key: &str) -> Option<&str> {
        match self.attrs.get(key) {
            Some(V::S(s)) => Some(s),
            _ => None,
        }
    }

    pub fn has_trace(&self) -> bool {
        !self.trace_id.is_empty()
    }
}

pub fn logs_from_otlp(req: &ExportLogsServiceRequest) -> Vec<TestLog> {
    let mut out = Vec::new();
    for rl in &req.resource_logs {
        let resource: BTreeMap<String, V> =
            rl.resource.iter().flat_map(|r| r.attributes.iter()).map(|kv| (kv.key.clone(), value(&kv.value))).collect();
        for sl in &rl.scope_logs {
            for r in &sl.log_records {
                let body = match r.body.as_ref().and_then(|b| b.value.as_ref()) {
                    Some(Value::StringValue(s)) => s.clone(),
                    other => format!("{other:?}"),
                };
                out.push(TestLog {
                    body,
                    severity_number: r.severity_number,
                    severity_text: r.severity_text.clone(),
                    trace_id: hex(&r.trace_id),
                    span_id: hex(&r.span_id),
                    flags: r.flags,
                    time_unix_nano: r.time_unix_nano,
                    attrs: r.attributes.iter().map(|kv| (kv.key.clone(), value(&kv.value))).collect(),
                    resource: resource.clone(),
                });
            }
        }
    }
    out
}
