//! OTLP receivers for the tests, decoding with the official OpenTelemetry protobuf types:
//! HTTP/protobuf on a plain socket, and gRPC with tonic.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::collector::{
    metrics::v1::ExportMetricsServiceRequest,
    trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
};
use prost::Message;

use crate::span::{TestSpan, from_otlp};

/// Collected spans, shared with the receiver's threads.
#[derive(Clone, Default)]
pub struct Collected(Arc<Mutex<Vec<TestSpan>>>);

impl Collected {
    pub fn spans(&self) -> Vec<TestSpan> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.0.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Spans whose `url.path` starts with `prefix`.
    pub fn count_path_prefix(&self, prefix: &str) -> usize {
        self.0
            .lock()
            .map(|v| v.iter().filter(|s| s.s("url.path").is_some_and(|p| p.starts_with(prefix))).count())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn add(&self, req: &ExportTraceServiceRequest) {
        if let Ok(mut v) = self.0.lock() {
            v.extend(from_otlp(req));
        }
    }

    /// Waits until at least `n` spans arrived, then a little longer to catch extras.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<TestSpan> {
        crate::wait_for(timeout, || (self.len() >= n).then_some(()));
        std::thread::sleep(Duration::from_millis(700));
        self.spans()
    }
}

/// OTLP/HTTP receiver: POST /v1/traces and /v1/metrics with protobuf bodies.
pub struct HttpReceiver {
    pub port: u16,
    pub collected: Collected,
    /// Every metrics request received, newest last.
    pub metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    /// Every request body as received (protobuf), traces and metrics: what left the host.
    pub raw: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl HttpReceiver {
    pub fn start() -> Self {
        Self::start_on(0)
    }

    /// A receiver on a given port (0: any), e.g. a collector coming back after an outage.
    pub fn start_on(port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind receiver");
        let port = listener.local_addr().expect("addr").port();
        let collected = Collected::default();
        let metrics = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let (c, m, r) = (collected.clone(), metrics.clone(), raw.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (c, m, r) = (c.clone(), m.clone(), r.clone());
                std::thread::spawn(move || serve_http(stream, &c, &m, &r));
            }
        });
        Self { port, collected, metrics, raw }
    }

    /// The newest metrics request, if any.
    pub fn latest_metrics(&self) -> Option<ExportMetricsServiceRequest> {
        self.metrics.lock().ok().and_then(|v| v.last().cloned())
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn serve_http(
    stream: TcpStream,
    collected: &Collected,
    metrics: &Mutex<Vec<ExportMetricsServiceRequest>>,
    raw: &Mutex<Vec<Vec<u8>>>,
) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    loop {
        let mut content_length = 0usize;
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if let Ok(mut r) = raw.lock() {
            r.push(body.clone());
        }
        let status = if request_line.starts_with("POST /v1/traces ") {
            match ExportTraceServiceRequest::decode(body.as_slice()) {
                Ok(req) => {
                    collected.add(&req);
                    "200 OK"
                }
                Err(_) => "400 Bad Request",
            }
        } else if request_line.starts_with("POST /v1/metrics ") {
            match ExportMetricsServiceRequest::decode(body.as_slice()) {
                Ok(req) => {
                    if let Ok(mut m) = metrics.lock() {
                        m.push(req);
                    }
                    "200 OK"
                }
                Err(_) => "400 Bad Request",
            }
        } else {
            "404 Not Found"
        };
        let reply = ExportTraceServiceResponse::default().encode_to_vec();
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
            reply.len()
        );
        if writer.write_all(head.as_bytes()).and_then(|_| writer.write_all(&reply)).is_err() {
            return;
        }
    }
}

struct GrpcSink(Collected);

#[tonic::async_trait]
impl TraceService for GrpcSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(request.get_ref());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// OTLP/gRPC receiver (tonic) on its own runtime thread.
pub struct GrpcReceiver {
    pub port: u16,
    pub collected: Collected,
}

impl GrpcReceiver {
    pub fn start() -> Self {
        let std_listener = TcpListener::bind("127.0.0.1:0").expect("bind grpc receiver");
        let port = std_listener.local_addr().expect("addr").port();
        std_listener.set_nonblocking(true).expect("nonblocking");
        let collected = Collected::default();
        let sink = GrpcSink(collected.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
                let incoming = tokio_stream_from(listener);
                let _ = tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(sink))
                    .serve_with_incoming(incoming)
                    .await;
            });
        });
        Self { port, collected }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}
