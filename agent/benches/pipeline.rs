//! User-space throughput without the kernel: syscall-sized events through reassembly, protocol
//! parsing, pairing, span assembly and metrics (HTTP/1.1, PostgreSQL, Redis), and spans through
//! OTLP encoding. `cargo bench -p sonde --bench pipeline`; `cargo xtask bench` records the results.

use std::{net::SocketAddr, sync::Arc};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use sonde::{
    conn::table::{DataIn, Direction, Role},
    export::{otlp_encode, otlp_wire},
    metrics::MetricsStore,
    pipeline::{Pipeline, Sinks},
    stats::Stats,
    trace::{
        context::SpanContext,
        ids::{SpanId, TraceId},
        resource::{ProcessIdentity, Resource},
        sampler::Sampler,
        span::{Attr, Span, SpanKind, Status},
    },
};

/// Request/response pairs replayed per benchmark iteration.
const EXCHANGES: u64 = 1000;

fn resource() -> Arc<Resource> {
    let p = ProcessIdentity {
        pid: 4242,
        service_name: "bench".into(),
        exe_path: "/usr/bin/bench".into(),
        host_name: "host".into(),
        start_ticks: 1,
        platform: Vec::new(),
    };
    Arc::new(Resource::for_process(&p, &[]))
}

fn pipeline() -> (Pipeline, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    let mut p = Pipeline::new(Sampler::default(), stats.clone(), Sinks::default(), Arc::new(MetricsStore::new(2000)));
    p.set_resource(4242, resource());
    (p, stats)
}

/// Replays `EXCHANGES` request/response pairs on one connection (two events each).
fn replay(p: &mut Pipeline, role: Role, request: &[u8], response: &[u8], ts: &mut u64) {
    let (req_dir, resp_dir) = match role {
        Role::Client => (Direction::Egress, Direction::Ingress),
        _ => (Direction::Ingress, Direction::Egress),
    };
    for _ in 0..EXCHANGES {
        for (dir, bytes) in [(req_dir, request), (resp_dir, response)] {
            *ts += 10_000;
            let data =
                DataIn { dir, payload: bytes, byte_count: bytes.len() as u64, ts_ns: *ts, tid: 4242, tls: false };
            p.on_data(4242, 7, role, data);
        }
    }
}

fn protocol_bench(c: &mut Criterion, name: &str, role: Role, request: &[u8], response: &[u8]) {
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(2 * EXCHANGES));
    let (mut p, stats) = pipeline();
    let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
    p.on_open(4242, 7, role, None, Some(peer), 1);
    let mut ts = 1;
    // Every exchange must become a span, or the benchmark measures the wrong thing.
    replay(&mut p, role, request, response, &mut ts);
    assert_eq!(Stats::get(&stats.spans_created), EXCHANGES, "{name}: one span per exchange; {}", stats.summary());
    group.bench_function(format!("{name} events"), |b| b.iter(|| replay(&mut p, role, request, response, &mut ts)));
    group.finish();
}

fn http(c: &mut Criterion) {
    let request = b"GET /api/users/42?expand=orders HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: bench/1.0\r\nAccept: */*\r\n\r\n";
    let response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 28\r\n\r\n{\"id\":42,\"name\":\"ada\",\"x\":1}";
    protocol_bench(c, "http", Role::Server, request, &response[..]);
}

fn postgres(c: &mut Criterion) {
    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }
    let request = msg(b'Q', b"SELECT abalance FROM pgbench_accounts WHERE aid = 4711\0");
    let mut response =
        msg(b'T', b"\x00\x01abalance\0\x00\x00\x40\x01\x00\x03\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00");
    response.extend(msg(b'D', b"\x00\x01\x00\x00\x00\x010"));
    response.extend(msg(b'C', b"SELECT 1\0"));
    response.extend(msg(b'Z', b"I"));
    protocol_bench(c, "postgresql", Role::Client, &request, &response);
}

fn redis(c: &mut Criterion) {
    protocol_bench(c, "redis", Role::Client, b"*2\r\n$3\r\nGET\r\n$7\r\nuser:42\r\n", b"$5\r\nhello\r\n");
}

fn otlp(c: &mut Criterion) {
    let r = resource();
    let spans: Vec<Span> = (0..512u64)
        .map(|i| Span {
            context: SpanContext {
                trace_id: TraceId([i as u8 | 1; 16]),
                span_id: SpanId([i as u8 | 2; 8]),
                parent_id: None,
                sampled: true,
            },
            name: "GET /api/users/{id}".into(),
            kind: SpanKind::Server,
            start_unix_ns: 1_700_000_000_000_000_000 + i,
            end_unix_ns: 1_700_000_000_000_500_000 + i,
            attributes: vec![
                Attr::new("http.request.method", "GET"),
                Attr::new("http.route", "/api/users/{id}"),
                Attr::new("url.path", "/api/users/42"),
                Attr::new("url.scheme", "http"),
                Attr::new("http.response.status_code", 200i64),
                Attr::new("server.port", 8080i64),
                Attr::new("network.peer.address", "127.0.0.1"),
                Attr::new("user_agent.original", "bench/1.0"),
            ],
            status: Status::Unset,
            resource: r.clone(),
            counted_in: None,
        })
        .collect();
    let mut group = c.benchmark_group("otlp");
    group.throughput(Throughput::Elements(spans.len() as u64));
    group.bench_function("encode spans (batch of 512, direct protobuf writer, used for export)", |b| {
        b.iter(|| otlp_wire::encode(&spans))
    });
    group.bench_function(
        "encode spans (batch of 512, via generated structs, the reference it is checked against)",
        |b| b.iter(|| otlp_encode::encode(&spans).encode_to_vec()),
    );
    group.finish();
}

criterion_group!(benches, http, postgres, redis, otlp);
criterion_main!(benches);
