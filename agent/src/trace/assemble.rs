//! Span assembly: a paired exchange plus what the connection knows -> a finished [`Span`].

use std::sync::Arc;

use super::{
    context::SpanContext,
    db_attrs,
    http_attrs::{self, ConnAddrs},
    resource::Resource,
    rpc_attrs,
    span::{Span, SpanKind},
};
use crate::protocol::{Exchange, ExchangeDetail};

/// Builds the span for `ex`. `to_unix` converts kernel monotonic ns to unix ns.
pub fn assemble(
    ex: &Exchange,
    kind: SpanKind,
    context: SpanContext,
    addrs: &ConnAddrs,
    tls: bool,
    resource: Arc<Resource>,
    to_unix: impl Fn(u64) -> u64,
) -> Span {
    let mapped = match &ex.detail {
        ExchangeDetail::Http(h) => http_attrs::map(h, kind, addrs, if tls { "https" } else { "http" }),
        ExchangeDetail::Grpc(g) => rpc_attrs::map(g, kind, addrs),
        ExchangeDetail::Postgres(p) => db_attrs::map_postgres(p, kind, addrs),
        ExchangeDetail::Redis(r) => db_attrs::map_redis(r, kind, addrs),
    };
    Span {
        context,
        name: mapped.name,
        kind,
        start_unix_ns: to_unix(ex.start_ns),
        end_unix_ns: to_unix(ex.end_ns),
        attributes: mapped.attributes,
        status: mapped.status,
        resource,
        counted_in: None,
    }
}
