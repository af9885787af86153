//! Spans -> OTLP protobuf messages (the generated structs), grouped by resource: the reference
//! encoding that `otlp_wire` (which writes every exported batch, HTTP and gRPC) is tested against.

use std::sync::Arc;

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource as OtlpResource,
    trace::v1::{
        ResourceSpans, ScopeSpans, Span as OtlpSpan, Status as OtlpStatus, span::SpanKind as OtlpKind,
        status::StatusCode,
    },
};

use crate::trace::{
    resource::Resource,
    span::{AttrValue, Span, SpanKind, Status},
};

pub(crate) fn any(v: &AttrValue) -> AnyValue {
    let value = match v {
        AttrValue::Str(s) => any_value::Value::StringValue(s.to_string()),
        AttrValue::Int(i) => any_value::Value::IntValue(*i),
        AttrValue::Bool(b) => any_value::Value::BoolValue(*b),
    };
    AnyValue { value: Some(value) }
}

pub(crate) fn kv(key: &str, v: &AttrValue) -> KeyValue {
    KeyValue { key: key.to_owned(), value: Some(any(v)) }
}

fn encode_span(s: &Span) -> OtlpSpan {
    let kind = match s.kind {
        SpanKind::Server => OtlpKind::Server,
        SpanKind::Client => OtlpKind::Client,
    };
    let status = match &s.status {
        Status::Unset => None,
        Status::Error(m) => Some(OtlpStatus { message: m.clone(), code: StatusCode::Error as i32 }),
    };
    OtlpSpan {
        trace_id: s.context.trace_id.0.to_vec(),
        span_id: s.context.span_id.0.to_vec(),
        parent_span_id: s.context.parent_id.map(|p| p.0.to_vec()).unwrap_or_default(),
        // W3C sampled flag; only sampled spans are exported.
        flags: 0x100 | 1,
        name: s.name.to_string(),
        kind: kind as i32,
        start_time_unix_nano: s.start_unix_ns,
        end_time_unix_nano: s.end_unix_ns,
        attributes: s.attributes.iter().map(|a| kv(a.key, &a.value)).collect(),
        status,
        ..Default::default()
    }
}

pub(crate) fn encode_resource(r: &Resource) -> OtlpResource {
    OtlpResource { attributes: r.attributes.iter().map(|(k, v)| kv(k, v)).collect(), ..Default::default() }
}

/// One request for a batch: one ResourceSpans per distinct resource, in first-seen order.
pub fn encode(spans: &[Span]) -> ExportTraceServiceRequest {
    let mut groups: Vec<(Arc<Resource>, Vec<OtlpSpan>)> = Vec::new();
    for s in spans {
        match groups.iter_mut().find(|(r, _)| Arc::ptr_eq(r, &s.resource) || **r == *s.resource) {
            Some((_, v)) => v.push(encode_span(s)),
            None => groups.push((s.resource.clone(), vec![encode_span(s)])),
        }
    }
    let scope =
        InstrumentationScope { name: "sonde".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() };
    ExportTraceServiceRequest {
        resource_spans: groups
            .into_iter()
            .map(|(r, spans)| ResourceSpans {
                resource: Some(encode_resource(&r)),
                scope_spans: vec![ScopeSpans { scope: Some(scope.clone()), spans, schema_url: String::new() }],
                schema_url: "https://opentelemetry.io/schemas/1.37.0".into(),
            })
            .collect(),
    }
}
