//! gRPC call -> span name, attributes and status, per the OpenTelemetry RPC semantic
//! conventions (`rpc.system.name`, `rpc.method`, `rpc.status_code`). `grpc-message` is never
//! exported: it can quote request values.
//!
//! Message counts and sizes: the conventions removed their per-message metrics and events
//! with no replacement, so they go on the span under sonde's own names
//! (`sonde.rpc.{request,response}.message_count` and `.message_bytes`), only when exact.

use super::{
    http_attrs::{ConnAddrs, Mapped, ip_text, split_host},
    span::{Attr, SpanKind, Status, Text},
};
use crate::protocol::http2::grpc::{self, GrpcExchange};

pub fn map(ex: &GrpcExchange, kind: SpanKind, addrs: &ConnAddrs) -> Mapped {
    let mut attrs = Vec::with_capacity(12);
    attrs.push(Attr::new("rpc.system.name", Text::const_new("grpc")));
    // `package.Service/Method`. A method the server says it does not have (UNIMPLEMENTED) is
    // `_OTHER`, as the conventions ask of methods the framework does not recognize; so is a
    // path that is not of that shape.
    let original = ex.path.strip_prefix('/').unwrap_or(&ex.path);
    let well_formed =
        original.split_once('/').is_some_and(|(svc, m)| !svc.is_empty() && !m.is_empty() && !m.contains('/'));
    let method = if well_formed && ex.status != Some(grpc::UNIMPLEMENTED) {
        Text::from(original)
    } else {
        if !original.is_empty() {
            attrs.push(Attr::new("rpc.method_original", Text::from(original)));
        }
        Text::const_new("_OTHER")
    };
    attrs.push(Attr::new("rpc.method", method.clone()));
    if let Some(code) = ex.status {
        attrs.push(Attr::new("rpc.status_code", grpc::status_name(code)));
    }
    let tallies = [
        ("sonde.rpc.request.message_count", "sonde.rpc.request.message_bytes", ex.request_messages),
        ("sonde.rpc.response.message_count", "sonde.rpc.response.message_bytes", ex.response_messages),
    ];
    for (count_key, bytes_key, tally) in tallies {
        if let Some(t) = tally {
            attrs.push(Attr::new(count_key, i64::from(t.count)));
            attrs.push(Attr::new(bytes_key, i64::try_from(t.bytes).unwrap_or(i64::MAX)));
        }
    }
    let (host, port) = split_host(ex.authority.as_deref(), "");
    let own_end = match kind {
        SpanKind::Server => addrs.local,
        SpanKind::Client => addrs.peer,
    };
    let server_address = host.or_else(|| own_end.map(|a| ip_text(a.ip())));
    let server_port = port.or_else(|| own_end.map(|a| a.port()));
    if let Some(h) = server_address {
        attrs.push(Attr::new("server.address", h));
        if let Some(p) = server_port {
            attrs.push(Attr::new("server.port", i64::from(p)));
        }
    }
    if let Some(peer) = addrs.peer {
        attrs.push(Attr::new("network.peer.address", ip_text(peer.ip())));
        attrs.push(Attr::new("network.peer.port", i64::from(peer.port())));
    }
    let failed = ex.status.is_some_and(|code| match kind {
        SpanKind::Client => code != 0,
        SpanKind::Server => grpc::server_error(code),
    });
    let status = match ex.status {
        Some(code) if failed => {
            attrs.push(Attr::new("error.type", grpc::status_name(code)));
            Status::Error(String::new())
        }
        _ => Status::Unset,
    };
    let name = if method == "_OTHER" { Text::const_new("grpc") } else { method };
    Mapped { name, attributes: attrs, status }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::span::AttrValue;

    fn call(path: &str, status: Option<u32>) -> GrpcExchange {
        GrpcExchange {
            path: path.into(),
            authority: Some("greeter.local:50051".into()),
            user_agent: None,
            status,
            request_bytes: 7,
            response_bytes: 9,
            request_messages: Some(grpc::MessageTally { count: 1, bytes: 2 }),
            response_messages: None,
        }
    }

    fn get<'a>(m: &'a Mapped, key: &str) -> Option<&'a AttrValue> {
        m.attributes.iter().find(|a| a.key == key).map(|a| &a.value)
    }

    const ADDRS: ConnAddrs = ConnAddrs { local: None, peer: None };

    #[test]
    fn names_and_status_follow_the_conventions() {
        let m = map(&call("/demo.Greeter/SayHello", Some(0)), SpanKind::Client, &ADDRS);
        assert_eq!(m.name, "demo.Greeter/SayHello");
        assert_eq!(get(&m, "rpc.system.name"), Some(&"grpc".into()));
        assert_eq!(get(&m, "rpc.method"), Some(&"demo.Greeter/SayHello".into()));
        assert_eq!(get(&m, "rpc.status_code"), Some(&"OK".into()));
        assert_eq!(get(&m, "server.address"), Some(&"greeter.local".into()));
        assert_eq!(get(&m, "server.port"), Some(&AttrValue::Int(50051)));
        assert_eq!(m.status, Status::Unset);
        // Exact tallies only: the response's was not known.
        assert_eq!(get(&m, "sonde.rpc.request.message_count"), Some(&AttrValue::Int(1)));
        assert_eq!(get(&m, "sonde.rpc.request.message_bytes"), Some(&AttrValue::Int(2)));
        assert_eq!(get(&m, "sonde.rpc.response.message_count"), None);
    }

    #[test]
    fn errors_differ_between_client_and_server() {
        // NOT_FOUND: the client's failure, not the server's.
        let client = map(&call("/demo.Greeter/SayHello", Some(5)), SpanKind::Client, &ADDRS);
        assert_eq!(
            (get(&client, "error.type"), &client.status),
            (Some(&"NOT_FOUND".into()), &Status::Error(String::new()))
        );
        let server = map(&call("/demo.Greeter/SayHello", Some(5)), SpanKind::Server, &ADDRS);
        assert_eq!((get(&server, "error.type"), &server.status), (None, &Status::Unset));
        for code in [2, 4, 12, 13, 14, 15] {
            let m = map(&call("/demo.Greeter/SayHello", Some(code)), SpanKind::Server, &ADDRS);
            assert!(matches!(m.status, Status::Error(_)), "{code}");
        }
        // No status known: neither ok nor failed.
        let unknown = map(&call("/demo.Greeter/SayHello", None), SpanKind::Client, &ADDRS);
        assert_eq!((get(&unknown, "rpc.status_code"), &unknown.status), (None, &Status::Unset));
    }

    #[test]
    fn unrecognized_methods_are_other() {
        let m = map(&call("/demo.Greeter/Nope", Some(12)), SpanKind::Server, &ADDRS);
        assert_eq!(m.name, "grpc");
        assert_eq!(get(&m, "rpc.method"), Some(&"_OTHER".into()));
        assert_eq!(get(&m, "rpc.method_original"), Some(&"demo.Greeter/Nope".into()));
        let odd = map(&call("/not-a-method", Some(0)), SpanKind::Server, &ADDRS);
        assert_eq!(get(&odd, "rpc.method"), Some(&"_OTHER".into()));
    }
}
