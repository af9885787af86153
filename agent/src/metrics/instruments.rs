//! The instruments sonde records and which span attributes each keeps (low-cardinality only:
//! no `url.path`, query text or client addresses).

use crate::trace::span::SpanKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Seconds,
    Bytes,
}

#[derive(Debug)]
pub struct Instrument {
    /// OpenTelemetry name.
    pub name: &'static str,
    /// Prometheus name without the unit suffix the exposition adds.
    pub prometheus_base: &'static str,
    pub unit: Unit,
    pub description: &'static str,
    pub bounds: &'static [f64],
    /// Span attributes that become metric attributes.
    pub attributes: &'static [&'static str],
}

/// Duration buckets the HTTP semantic conventions advise (seconds).
pub const DURATION_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];
/// Body sizes (bytes), powers of four from 64 B to 64 MiB.
pub const SIZE_BOUNDS: &[f64] =
    &[64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262_144.0, 1_048_576.0, 4_194_304.0, 16_777_216.0, 67_108_864.0];

const HTTP_SERVER_ATTRS: &[&str] = &[
    "http.request.method",
    "http.response.status_code",
    "http.route",
    "url.scheme",
    "network.protocol.version",
    "error.type",
];
const HTTP_CLIENT_ATTRS: &[&str] = &[
    "http.request.method",
    "http.response.status_code",
    "server.address",
    "server.port",
    "url.scheme",
    "network.protocol.version",
    "error.type",
];
const DB_ATTRS: &[&str] = &[
    "db.system.name",
    "db.operation.name",
    "db.namespace",
    "db.collection.name",
    "db.response.status_code",
    "error.type",
    "server.address",
    "server.port",
];

const RPC_SERVER_ATTRS: &[&str] = &["rpc.system.name", "rpc.method", "rpc.status_code", "error.type"];
const RPC_CLIENT_ATTRS: &[&str] =
    &["rpc.system.name", "rpc.method", "rpc.status_code", "error.type", "server.address", "server.port"];

const fn instrument(
    name: &'static str,
    prometheus_base: &'static str,
    unit: Unit,
    description: &'static str,
    attributes: &'static [&'static str],
) -> Instrument {
    let bounds = match unit {
        Unit::Seconds => DURATION_BOUNDS,
        Unit::Bytes => SIZE_BOUNDS,
    };
    Instrument { name, prometheus_base, unit, description, bounds, attributes }
}

pub const HTTP_SERVER_DURATION: usize = 0;
pub const HTTP_CLIENT_DURATION: usize = 1;
pub const DB_CLIENT_DURATION: usize = 2;
pub const HTTP_SERVER_REQUEST_BODY: usize = 3;
pub const HTTP_SERVER_RESPONSE_BODY: usize = 4;
pub const HTTP_CLIENT_REQUEST_BODY: usize = 5;
pub const HTTP_CLIENT_RESPONSE_BODY: usize = 6;
pub const RPC_SERVER_DURATION: usize = 7;
pub const RPC_CLIENT_DURATION: usize = 8;

pub static INSTRUMENTS: [Instrument; 9] = [
    instrument(
        "http.server.request.duration",
        "http_server_request_duration",
        Unit::Seconds,
        "Duration of HTTP server requests.",
        HTTP_SERVER_ATTRS,
    ),
    instrument(
        "http.client.request.duration",
        "http_client_request_duration",
        Unit::Seconds,
        "Duration of HTTP client requests.",
        HTTP_CLIENT_ATTRS,
    ),
    instrument(
        "db.client.operation.duration",
        "db_client_operation_duration",
        Unit::Seconds,
        "Duration of database client operations.",
        DB_ATTRS,
    ),
    instrument(
        "http.server.request.body.size",
        "http_server_request_body_size",
        Unit::Bytes,
        "Size of HTTP server request bodies.",
        HTTP_SERVER_ATTRS,
    ),
    instrument(
        "http.server.response.body.size",
        "http_server_response_body_size",
        Unit::Bytes,
        "Size of HTTP server response bodies.",
        HTTP_SERVER_ATTRS,
    ),
    instrument(
        "http.client.request.body.size",
        "http_client_request_body_size",
        Unit::Bytes,
        "Size of HTTP client request bodies.",
        HTTP_CLIENT_ATTRS,
    ),
    instrument(
        "http.client.response.body.size",
        "http_client_response_body_size",
        Unit::Bytes,
        "Size of HTTP client response bodies.",
        HTTP_CLIENT_ATTRS,
    ),
    instrument(
        "rpc.server.call.duration",
        "rpc_server_call_duration",
        Unit::Seconds,
        "Duration of incoming RPCs.",
        RPC_SERVER_ATTRS,
    ),
    instrument(
        "rpc.client.call.duration",
        "rpc_client_call_duration",
        Unit::Seconds,
        "Duration of outgoing RPCs.",
        RPC_CLIENT_ATTRS,
    ),
];

/// The (instrument, value) pairs of one span: at most three, kept inline (no allocation per
/// span).
#[derive(Clone, Copy, Debug)]
pub struct Measurements {
    items: [(usize, f64); 3],
    len: usize,
}

impl Measurements {
    fn of(items: &[(usize, f64)]) -> Self {
        let mut m = Self { items: [(0, 0.0); 3], len: items.len() };
        m.items[..items.len()].copy_from_slice(items);
        m
    }

    pub fn first(&self) -> Option<&(usize, f64)> {
        self.items[..self.len].first()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl IntoIterator for Measurements {
    type Item = (usize, f64);
    type IntoIter = std::iter::Take<std::array::IntoIter<(usize, f64), 3>>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter().take(self.len)
    }
}

/// Which conventions a span follows, as its attributes tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Http,
    Db,
    Rpc,
    Other,
}

/// (instrument, value) pairs a finished span contributes to.
pub fn measurements(
    kind: SpanKind,
    family: Family,
    seconds: f64,
    request_body: i64,
    response_body: i64,
) -> Measurements {
    let is_http = family == Family::Http;
    let is_db = family == Family::Db;
    if family == Family::Rpc {
        return Measurements::of(&[(
            if kind == SpanKind::Server { RPC_SERVER_DURATION } else { RPC_CLIENT_DURATION },
            seconds,
        )]);
    }
    match (is_http, is_db, kind) {
        (true, _, SpanKind::Server) => Measurements::of(&[
            (HTTP_SERVER_DURATION, seconds),
            (HTTP_SERVER_REQUEST_BODY, request_body as f64),
            (HTTP_SERVER_RESPONSE_BODY, response_body as f64),
        ]),
        (true, _, SpanKind::Client) => Measurements::of(&[
            (HTTP_CLIENT_DURATION, seconds),
            (HTTP_CLIENT_REQUEST_BODY, request_body as f64),
            (HTTP_CLIENT_RESPONSE_BODY, response_body as f64),
        ]),
        // Database servers traced from their own side get spans; the conventions define
        // client-side operation metrics only.
        (false, true, SpanKind::Client) => Measurements::of(&[(DB_CLIENT_DURATION, seconds)]),
        _ => Measurements::of(&[]),
    }
}
