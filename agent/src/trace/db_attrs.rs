//! PostgreSQL and Redis exchanges -> span name, attributes and status, per the OpenTelemetry
//! database semantic conventions. Query text is exported sanitized: literal values and command
//! arguments never leave the host.

use compact_str::ToCompactString;

use super::{
    http_attrs::{ConnAddrs, Mapped, ip_text},
    span::{Attr, SpanKind, Status, Text},
};
use crate::protocol::{postgres::PgExchange, redis::RedisExchange, sql};

/// `server.*` is the database's address: the peer for a client, the local socket for the server.
fn server_and_peer(kind: SpanKind, addrs: &ConnAddrs, attrs: &mut Vec<Attr>) {
    let server = match kind {
        SpanKind::Client => addrs.peer,
        SpanKind::Server => addrs.local,
    };
    if let Some(s) = server {
        attrs.push(Attr::new("server.address", ip_text(s.ip())));
        attrs.push(Attr::new("server.port", s.port() as i64));
    }
    if let Some(p) = addrs.peer {
        attrs.push(Attr::new("network.peer.address", ip_text(p.ip())));
        attrs.push(Attr::new("network.peer.port", p.port() as i64));
    }
}

pub fn map_postgres(ex: &PgExchange, kind: SpanKind, addrs: &ConnAddrs) -> Mapped {
    let mut attrs = Vec::with_capacity(12);
    attrs.push(Attr::new("db.system.name", Text::const_new("postgresql")));
    if let Some(db) = &ex.database {
        attrs.push(Attr::new("db.namespace", db.clone()));
    }
    let mut summary = None;
    if let Some(q) = &ex.query {
        let clean = sql::sanitize(q);
        let statement = sql::describe(&clean);
        let (operation, collection) = if ex.statements > 1 {
            // Several statements in one Query message: one span, named as a batch.
            (Some(batch_operation(&clean)), None)
        } else {
            (statement.operation.clone(), statement.collection.clone())
        };
        if let Some(op) = &operation {
            attrs.push(Attr::new("db.operation.name", op.clone()));
        }
        if let Some(t) = &collection {
            attrs.push(Attr::new("db.collection.name", t.clone()));
        }
        summary = sql::summary(&sql::Statement { operation, collection });
        if let Some(s) = &summary {
            attrs.push(Attr::new("db.query.summary", s.clone()));
        }
        attrs.push(Attr::new("db.query.text", if ex.query_truncated { format!("{clean}...") } else { clean }));
    } else if let Some(command) = &ex.command {
        // A statement prepared before sonde started: the server's CommandComplete names it.
        attrs.push(Attr::new("db.operation.name", command.clone()));
        summary = Some(command.clone());
    }
    if let Some(rows) = ex.returned_rows {
        attrs.push(Attr::new("db.response.returned_rows", rows as i64));
    }
    server_and_peer(kind, addrs, &mut attrs);
    let status = match &ex.sqlstate {
        Some(code) => {
            attrs.push(Attr::new("db.response.status_code", code.clone()));
            attrs.push(Attr::new("error.type", code.clone()));
            Status::Error(String::new())
        }
        None => Status::Unset,
    };
    Mapped { name: summary.map_or_else(|| Text::const_new("postgresql"), Text::from), attributes: attrs, status }
}

/// `BATCH SELECT` when every statement has the same operation, else `BATCH`.
fn batch_operation(sanitized: &str) -> String {
    let ops: Vec<Option<String>> =
        sanitized.split(';').map(str::trim).filter(|s| !s.is_empty()).map(|s| sql::describe(s).operation).collect();
    match ops.first() {
        Some(Some(first)) if ops.iter().all(|o| o.as_ref() == Some(first)) => {
            format!("BATCH {first}")
        }
        _ => "BATCH".into(),
    }
}

pub fn map_redis(ex: &RedisExchange, kind: SpanKind, addrs: &ConnAddrs) -> Mapped {
    // Room for every attribute a Redis span can have: no regrowth per span.
    let mut attrs = Vec::with_capacity(10);
    attrs.push(Attr::new("db.system.name", Text::const_new("redis")));
    attrs.push(Attr::new("db.operation.name", ex.operation.clone()));
    attrs.push(Attr::new("db.namespace", ex.db.to_compact_string()));
    // Arguments (keys, values, passwords) are replaced: the command and its arity stay visible.
    let mut text = ex.operation.clone();
    for _ in 0..ex.args.min(64) {
        text.push_str(" ?");
    }
    if ex.args > 64 {
        text.push_str(" ...");
    }
    attrs.push(Attr::new("db.query.text", text));
    server_and_peer(kind, addrs, &mut attrs);
    let status = match &ex.error {
        Some(prefix) => {
            attrs.push(Attr::new("db.response.status_code", prefix.clone()));
            attrs.push(Attr::new("error.type", prefix.clone()));
            Status::Error(String::new())
        }
        None => Status::Unset,
    };
    Mapped { name: ex.operation.clone(), attributes: attrs, status }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::span::AttrValue;

    fn get<'a>(m: &'a Mapped, key: &str) -> Option<&'a AttrValue> {
        m.attributes.iter().find(|a| a.key == key).map(|a| &a.value)
    }

    fn pg(query: &str, statements: u32, sqlstate: Option<&str>) -> PgExchange {
        PgExchange {
            query: Some(query.into()),
            query_truncated: false,
            database: Some("shop".into()),
            returned_rows: Some(2),
            sqlstate: sqlstate.map(Into::into),
            statements,
            command: None,
        }
    }

    #[test]
    fn postgres_span_is_sanitized_and_named_by_summary() {
        let addrs = ConnAddrs { local: None, peer: Some("127.0.0.1:5432".parse().unwrap()) };
        let m =
            map_postgres(&pg("SELECT name FROM users WHERE email = 'bob@x.org'", 1, None), SpanKind::Client, &addrs);
        assert_eq!(m.name, "SELECT users");
        assert_eq!(get(&m, "db.query.text"), Some(&"SELECT name FROM users WHERE email = ?".into()));
        assert_eq!(get(&m, "db.collection.name"), Some(&"users".into()));
        assert_eq!(get(&m, "db.namespace"), Some(&"shop".into()));
        assert_eq!(get(&m, "server.port"), Some(&AttrValue::Int(5432)));
        assert!(!format!("{:?}", m.attributes).contains("bob@x.org"));
        let e = map_postgres(&pg("SELECT * FROM nosuch", 1, Some("42P01")), SpanKind::Client, &addrs);
        assert_eq!(get(&e, "db.response.status_code"), Some(&"42P01".into()));
        assert!(matches!(e.status, Status::Error(_)));
        let batch =
            map_postgres(&pg("CREATE TABLE t (a int); INSERT INTO t VALUES (1)", 2, None), SpanKind::Client, &addrs);
        assert_eq!(batch.name, "BATCH");
        let same =
            map_postgres(&pg("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)", 2, None), SpanKind::Client, &addrs);
        assert_eq!(same.name, "BATCH INSERT");
        let unknown = map_postgres(&PgExchange { query: None, ..pg("", 1, None) }, SpanKind::Server, &addrs);
        assert_eq!(unknown.name, "postgresql");
        let prepared_before = PgExchange { query: None, command: Some("SELECT".into()), ..pg("", 1, None) };
        let named = map_postgres(&prepared_before, SpanKind::Client, &addrs);
        assert_eq!(named.name, "SELECT");
        assert_eq!(get(&named, "db.operation.name"), Some(&"SELECT".into()));
        assert_eq!(get(&named, "db.query.text"), None, "no text was seen");
    }

    #[test]
    fn redis_span_hides_arguments() {
        let addrs =
            ConnAddrs { local: Some("127.0.0.1:6379".parse().unwrap()), peer: Some("127.0.0.1:5000".parse().unwrap()) };
        let ex = RedisExchange { operation: "AUTH".into(), args: 1, db: 3, error: Some("WRONGPASS".into()) };
        let m = map_redis(&ex, SpanKind::Server, &addrs);
        assert_eq!(m.name, "AUTH");
        assert_eq!(get(&m, "db.query.text"), Some(&"AUTH ?".into()));
        assert_eq!(get(&m, "db.namespace"), Some(&"3".into()));
        assert_eq!(get(&m, "server.port"), Some(&AttrValue::Int(6379)));
        assert_eq!(get(&m, "error.type"), Some(&"WRONGPASS".into()));
    }
}
