//! A span as the tests see it, decoded from OTLP or from `--print json`.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, any_value::Value},
};

#[derive(Clone, Debug, PartialEq)]
pub enum V {
    S(String),
    I(i64),
    B(bool),
}

#[derive(Clone, Debug)]
pub struct TestSpan {
    pub name: String,
    /// "SERVER" or "CLIENT".
    pub kind: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_id: Option<String>,
    pub start_ns: u64,
    pub end_ns: u64,
    pub error: bool,
    pub attrs: BTreeMap<String, V>,
    pub resource: BTreeMap<String, V>,
}

impl TestSpan {
    pub fn s(&self, key: &str) -> Option<&str> {
        match self.attrs.get(key) {
            Some(V::S(s)) => Some(s),
            _ => None,
        }
    }

    pub fn i(&self, key: &str) -> Option<i64> {
        match self.attrs.get(key) {
            Some(V::I(i)) => Some(*i),
            _ => None,
        }
    }

    pub fn service(&self) -> Option<&str> {
        match self.resource.get("service.name") {
            Some(V::S(s)) => Some(s),
            _ => None,
        }
    }
}

pub(crate) fn value(v: &Option<AnyValue>) -> V {
    match v.as_ref().and_then(|a| a.value.as_ref()) {
        Some(Value::StringValue(s)) => V::S(s.clone()),
        Some(Value::IntValue(i)) => V::I(*i),
        Some(Value::BoolValue(b)) => V::B(*b),
        other => V::S(format!("{other:?}")),
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn from_otlp(req: &ExportTraceServiceRequest) -> Vec<TestSpan> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        let resource: BTreeMap<String, V> =
            rs.resource.iter().flat_map(|r| r.attributes.iter()).map(|kv| (kv.key.clone(), value(&kv.value))).collect();
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                out.push(TestSpan {
                    name: s.name.clone(),
                    kind: match s.kind {
                        2 => "SERVER".into(),
                        3 => "CLIENT".into(),
                        k => format!("kind{k}"),
                    },
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_id: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                    error: s.status.as_ref().is_some_and(|st| st.code == 2),
                    attrs: s.attributes.iter().map(|kv| (kv.key.clone(), value(&kv.value))).collect(),
                    resource: resource.clone(),
                });
            }
        }
    }
    out
}

fn json_map(v: &serde_json::Value) -> BTreeMap<String, V> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let val = match v {
                        serde_json::Value::String(s) => V::S(s.clone()),
                        serde_json::Value::Number(n) => V::I(n.as_i64().unwrap_or(0)),
                        serde_json::Value::Bool(b) => V::B(*b),
                        other => V::S(other.to_string()),
                    };
                    (k.clone(), val)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Parses one line of `sonde run --print json`.
pub fn from_json_line(line: &str) -> Option<TestSpan> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some(TestSpan {
        name: v["name"].as_str()?.to_owned(),
        kind: v["kind"].as_str()?.to_owned(),
        trace_id: v["trace_id"].as_str()?.to_owned(),
        span_id: v["span_id"].as_str()?.to_owned(),
        parent_id: v["parent_span_id"].as_str().map(str::to_owned),
        start_ns: v["start_unix_nano"].as_u64()?,
        end_ns: v["end_unix_nano"].as_u64()?,
        error: v["status"]["code"] == "error",
        attrs: json_map(&v["attributes"]),
        resource: json_map(&v["resource"]),
    })
}
