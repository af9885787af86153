//! HTTP exchange -> span name, attributes and status, per the OpenTelemetry HTTP semantic
//! conventions. Query values are redacted: they often carry tokens.

use std::net::{IpAddr, SocketAddr};

use compact_str::{ToCompactString, format_compact};

use super::{
    route::{path_of, route_of},
    span::{Attr, SpanKind, Status, Text},
};
use crate::protocol::http::HttpExchange;

/// Addresses of the connection an exchange travelled on, as far as they are known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnAddrs {
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
}

/// An address as text, IPv4 written by hand: two or three of these per span, and the generic
/// formatter was a visible share of the pipeline's time.
pub fn ip_text(ip: IpAddr) -> Text {
    let IpAddr::V4(v4) = ip else {
        return ip.to_compact_string();
    };
    // Digits go into a stack buffer and become one inline string: pushing char by char went
    // through the string's inline/heap checks each time.
    let mut buf = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            buf[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            buf[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        buf[len] = b'0' + octet % 10;
        len += 1;
    }
    // Only ASCII digits and dots were written.
    Text::from(std::str::from_utf8(&buf[..len]).unwrap_or_default())
}

const KNOWN_METHODS: [&str; 9] = ["CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"];

pub struct Mapped {
    pub name: Text,
    pub attributes: Vec<Attr>,
    pub status: Status,
}

pub fn map(ex: &HttpExchange, kind: SpanKind, addrs: &ConnAddrs, scheme: &'static str) -> Mapped {
    let mut attrs = Vec::with_capacity(16);
    // An empty method is one HTTP/2 could not decode (seen mid-stream): left out, not guessed.
    let method = if KNOWN_METHODS.contains(&ex.method.as_str()) || ex.method.is_empty() {
        ex.method.clone()
    } else {
        attrs.push(Attr::new("http.request.method_original", ex.method.clone()));
        Text::const_new("_OTHER")
    };
    if !method.is_empty() {
        attrs.push(Attr::new("http.request.method", method.clone()));
    }
    // 0: the stream was reset before any response.
    if ex.status != 0 {
        attrs.push(Attr::new("http.response.status_code", ex.status as i64));
    }
    attrs.push(Attr::new("network.protocol.version", Text::const_new(ex.version.as_str())));
    let (host, port) = split_host(ex.host.as_deref(), scheme);
    let query = redacted_query(&ex.target);
    // An empty target is one HTTP/2 could not decode: no path, route or URL is made up.
    let target_known = !ex.target.is_empty();

    let name = match kind {
        SpanKind::Server => {
            let route = if target_known { route_of(&ex.target) } else { Text::default() };
            if target_known {
                attrs.push(Attr::new("url.path", path_of(&ex.target)));
            }
            attrs.push(Attr::new("url.scheme", Text::const_new(scheme)));
            if let Some(q) = &query {
                attrs.push(Attr::new("url.query", q.clone()));
            }
            if target_known {
                attrs.push(Attr::new("http.route", route.clone()));
            }
            let server_address = host.or_else(|| addrs.local.map(|a| ip_text(a.ip())));
            let server_port = port.or_else(|| addrs.local.map(|a| a.port()));
            if let Some(h) = server_address {
                attrs.push(Attr::new("server.address", h));
            }
            if let Some(p) = server_port {
                attrs.push(Attr::new("server.port", p as i64));
            }
            if let Some(peer) = addrs.peer {
                attrs.push(Attr::new("client.address", ip_text(peer.ip())));
                attrs.push(Attr::new("client.port", peer.port() as i64));
            }
            if method == "_OTHER" || method.is_empty() {
                Text::const_new("HTTP")
            } else if !target_known {
                method.clone()
            } else {
                let mut name = Text::with_capacity(method.len() + 1 + route.len());
                name.push_str(&method);
                name.push(' ');
                name.push_str(&route);
                name
            }
        }
        SpanKind::Client => {
            let server_address = host.or_else(|| addrs.peer.map(|a| ip_text(a.ip())));
            let server_port = port.or_else(|| addrs.peer.map(|a| a.port()));
            let authority = match (&server_address, server_port) {
                (Some(h), Some(p)) if !is_default_port(scheme, p) => format_compact!("{h}:{p}"),
                (Some(h), _) => h.clone(),
                (None, _) => Text::default(),
            };
            if target_known {
                let mut full = format_compact!("{scheme}://{authority}{}", path_of(&ex.target));
                if let Some(q) = &query {
                    full.push('?');
                    full.push_str(q);
                }
                attrs.push(Attr::new("url.full", full));
            }
            if let Some(h) = server_address {
                attrs.push(Attr::new("server.address", h));
            }
            if let Some(p) = server_port {
                attrs.push(Attr::new("server.port", p as i64));
            }
            if method == "_OTHER" || method.is_empty() { Text::const_new("HTTP") } else { method.clone() }
        }
    };
    if let Some(peer) = addrs.peer {
        attrs.push(Attr::new("network.peer.address", ip_text(peer.ip())));
        attrs.push(Attr::new("network.peer.port", peer.port() as i64));
    }
    if let Some(ua) = &ex.user_agent {
        attrs.push(Attr::new("user_agent.original", ua.clone()));
    }
    if let Some(n) = ex.request_body_bytes {
        attrs.push(Attr::new("http.request.body.size", n as i64));
    }
    if let Some(n) = ex.response_body_bytes {
        attrs.push(Attr::new("http.response.body.size", n as i64));
    }

    // Server spans fail on 5xx only (4xx is the client's fault); client spans on >= 400.
    let failed = match kind {
        SpanKind::Server => ex.status >= 500,
        SpanKind::Client => ex.status >= 400,
    };
    let status = if let Some(reset) = ex.reset {
        // No (complete) response: the HTTP/2 error code that ended the stream.
        attrs.push(Attr::new("error.type", Text::const_new(reset)));
        Status::Error(String::new())
    } else if failed {
        attrs.push(Attr::new("error.type", ex.status.to_compact_string()));
        Status::Error(String::new())
    } else {
        Status::Unset
    };
    Mapped { name, attributes: attrs, status }
}

fn is_default_port(scheme: &str, port: u16) -> bool {
    (scheme == "http" && port == 80) || (scheme == "https" && port == 443)
}

/// Splits a Host header into host and port (IPv6 literals keep their brackets off).
pub(super) fn split_host(host: Option<&str>, scheme: &str) -> (Option<Text>, Option<u16>) {
    let Some(h) = host.map(str::trim).filter(|h| !h.is_empty()) else {
        return (None, None);
    };
    if let Some(rest) = h.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').unwrap_or((rest, ""));
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return (Some(addr.into()), port.or(default_port(scheme)));
    }
    match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !port.is_empty() => {
            (Some(name.into()), port.parse().ok())
        }
        _ => (Some(h.into()), default_port(scheme)),
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// The query with every value replaced by `REDACTED` (keys stay: they are low risk and useful).
pub fn redacted_query(target: &str) -> Option<String> {
    let query = target.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or("");
    if query.is_empty() {
        return None;
    }
    let parts: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) => format!("{k}=REDACTED"),
            None => kv.to_owned(),
        })
        .collect();
    Some(parts.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::span::AttrValue;

    fn exchange(method: &str, target: &str, status: u16) -> HttpExchange {
        HttpExchange {
            method: method.into(),
            target: target.into(),
            version: crate::protocol::http::HttpVersion::Http11,
            reset: None,
            host: Some("api.local:8080".into()),
            user_agent: Some("curl/8".into()),
            status,
            request_body_bytes: Some(3),
            response_body_bytes: Some(10),
        }
    }

    fn get<'a>(m: &'a Mapped, key: &str) -> Option<&'a AttrValue> {
        m.attributes.iter().find(|a| a.key == key).map(|a| &a.value)
    }

    #[test]
    fn addresses_as_text() {
        for ip in ["0.0.0.0", "127.0.0.1", "10.20.30.40", "255.255.255.255", "192.168.100.9", "::1", "fe80::1"] {
            assert_eq!(ip_text(ip.parse().unwrap()), ip);
        }
    }

    #[test]
    fn server_span_follows_the_conventions() {
        let addrs = ConnAddrs {
            local: Some("127.0.0.1:8080".parse().unwrap()),
            peer: Some("127.0.0.1:40000".parse().unwrap()),
        };
        let m = map(&exchange("GET", "/users/42?token=s3cret", 503), SpanKind::Server, &addrs, "http");
        assert_eq!(m.name, "GET /users/{id}");
        assert_eq!(get(&m, "url.path"), Some(&"/users/42".into()));
        assert_eq!(get(&m, "url.query"), Some(&"token=REDACTED".into()));
        assert_eq!(get(&m, "http.route"), Some(&"/users/{id}".into()));
        assert_eq!(get(&m, "server.address"), Some(&"api.local".into()));
        assert_eq!(get(&m, "server.port"), Some(&AttrValue::Int(8080)));
        assert_eq!(get(&m, "client.port"), Some(&AttrValue::Int(40000)));
        assert_eq!(get(&m, "network.peer.address"), Some(&"127.0.0.1".into()));
        assert_eq!(get(&m, "error.type"), Some(&"503".into()));
        assert!(matches!(m.status, Status::Error(_)));
        assert!(!format!("{:?}", m.attributes).contains("s3cret"));
        let ok = map(&exchange("GET", "/", 404), SpanKind::Server, &addrs, "http");
        assert_eq!(ok.status, Status::Unset, "4xx is not a server error");
    }

    #[test]
    fn undecoded_http2_fields_are_left_out() {
        let addrs = ConnAddrs::default();
        let mut ex = exchange("", "", 200);
        ex.version = crate::protocol::http::HttpVersion::Http2;
        let m = map(&ex, SpanKind::Server, &addrs, "http");
        assert_eq!(m.name, "HTTP");
        for key in ["http.request.method", "url.path", "http.route"] {
            assert_eq!(get(&m, key), None, "{key}");
        }
        assert_eq!(get(&m, "network.protocol.version"), Some(&"2".into()));
        let m = map(&exchange("POST", "", 0), SpanKind::Client, &addrs, "http");
        assert_eq!((m.name.as_str(), get(&m, "url.full"), get(&m, "http.response.status_code")), ("POST", None, None));
        let mut reset = exchange("GET", "/x", 0);
        reset.reset = Some("CANCEL");
        let m = map(&reset, SpanKind::Client, &addrs, "http");
        assert_eq!(get(&m, "error.type"), Some(&"CANCEL".into()));
        assert!(matches!(m.status, Status::Error(_)));
    }

    #[test]
    fn client_span_has_url_full_and_fails_on_4xx() {
        let addrs = ConnAddrs { local: None, peer: Some("10.1.2.3:8080".parse().unwrap()) };
        let m = map(&exchange("POST", "/v1/x?a=1&b", 404), SpanKind::Client, &addrs, "http");
        assert_eq!(m.name, "POST");
        assert_eq!(get(&m, "url.full"), Some(&"http://api.local:8080/v1/x?a=REDACTED&b".into()));
        assert!(matches!(m.status, Status::Error(_)));
        let other = map(&exchange("BREW", "/", 200), SpanKind::Client, &addrs, "http");
        assert_eq!(get(&other, "http.request.method"), Some(&"_OTHER".into()));
        assert_eq!(get(&other, "http.request.method_original"), Some(&"BREW".into()));
    }

    #[test]
    fn host_header_forms() {
        assert_eq!(split_host(Some("[::1]:9000"), "http"), (Some("::1".into()), Some(9000)));
        assert_eq!(split_host(Some("example.com"), "https"), (Some("example.com".into()), Some(443)));
        assert_eq!(split_host(Some(""), "http"), (None, None));
    }
}
