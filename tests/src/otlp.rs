//! OTLP receivers for the tests, decoding with the official OpenTelemetry protobuf types:
//! HTTP/protobuf on a plain socket, and gRPC with tonic; either in clear or behind rustls (see
//! `pki`), recording the headers each request carried.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::collector::{
    logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
        logs_service_server::{LogsService, LogsServiceServer},
    },
    metrics::v1::ExportMetricsServiceRequest,
    trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
};
use prost::Message;

use crate::{
    log_record::{TestLog, logs_from_otlp},
    span::{TestSpan, from_otlp},
};

/// What one export request carried, besides its body.
#[derive(Clone, Debug, Default)]
pub struct Received {
    /// Header (gRPC: metadata) names in lower case, with their values.
    pub headers: Vec<(String, String)>,
    /// The body arrived gzip-compressed (HTTP `content-encoding`, gRPC `grpc-encoding`).
    pub gzip: bool,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// How a receiver behaves: TLS (with or without client certificates) and a forced answer.
#[derive(Clone, Default)]
pub struct ReceiverOptions {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Answer every request with this HTTP status line (e.g. "401 Unauthorized") instead of 200.
    pub answer: Option<&'static str>,
}

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
    /// Every log record received (POST /v1/logs), in arrival order.
    pub logs: Arc<Mutex<Vec<TestLog>>>,
    /// Every metrics request received, newest last.
    pub metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    /// Every request body as received (protobuf, decompressed), traces and metrics: what left the host.
    pub raw: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Every request's headers, in arrival order.
    pub requests: Arc<Mutex<Vec<Received>>>,
    scheme: &'static str,
}

/// What the HTTP receiver's connection threads share.
#[derive(Clone)]
struct HttpState {
    collected: Collected,
    logs: Arc<Mutex<Vec<TestLog>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    raw: Arc<Mutex<Vec<Vec<u8>>>>,
    requests: Arc<Mutex<Vec<Received>>>,
    answer: Option<&'static str>,
}

impl HttpReceiver {
    pub fn start() -> Self {
        Self::start_on(0)
    }

    /// A receiver on a given port (0: any), e.g. a collector coming back after an outage.
    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, ReceiverOptions::default())
    }

    pub fn start_with(port: u16, options: ReceiverOptions) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind receiver");
        let port = listener.local_addr().expect("addr").port();
        let state = HttpState {
            collected: Collected::default(),
            logs: Arc::new(Mutex::new(Vec::new())),
            metrics: Arc::new(Mutex::new(Vec::new())),
            raw: Arc::new(Mutex::new(Vec::new())),
            requests: Arc::new(Mutex::new(Vec::new())),
            answer: options.answer,
        };
        let shared = state.clone();
        let tls = options.tls.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (state, tls) = (shared.clone(), tls.clone());
                std::thread::spawn(move || match tls {
                    None => serve_http(stream, &state),
                    Some(config) => {
                        // A failed handshake (untrusted client certificate...) ends at the first read.
                        if let Ok(conn) = rustls::ServerConnection::new(config) {
                            serve_http(rustls::StreamOwned::new(conn, stream), &state);
                        }
                    }
                });
            }
        });
        let scheme = if options.tls.is_some() { "https" } else { "http" };
        Self {
            port,
            collected: state.collected,
            logs: state.logs,
            metrics: state.metrics,
            raw: state.raw,
            requests: state.requests,
            scheme,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.requests.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The log records received so far.
    pub fn log_records(&self) -> Vec<TestLog> {
        self.logs.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits until `done` holds for the log records received (or the timeout), then returns them.
    pub fn wait_for_logs(&self, timeout: Duration, done: impl Fn(&[TestLog]) -> bool) -> Vec<TestLog> {
        crate::wait_for(timeout, || done(&self.log_records()).then_some(()));
        std::thread::sleep(Duration::from_millis(700));
        self.log_records()
    }

    /// The newest metrics request, if any.
    pub fn latest_metrics(&self) -> Option<ExportMetricsServiceRequest> {
        self.metrics.lock().ok().and_then(|v| v.last().cloned())
    }

    /// `http://127.0.0.1:port`, or `https://localhost:port` behind TLS (the certificate's name).
    pub fn endpoint(&self) -> String {
        match self.scheme {
            "https" => format!("https://localhost:{}", self.port),
            _ => format!("http://127.0.0.1:{}", self.port),
        }
    }
}

fn gunzip(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body).read_to_end(&mut out).ok()?;
    Some(out)
}

fn serve_http<S: Read + Write>(stream: S, state: &HttpState) {
    let HttpState { collected, logs, metrics, raw, requests, answer } = state;
    let mut reader = BufReader::new(stream);
    loop {
        let mut received = Received::default();
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
            if let Some((k, v)) = line.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                if k == "content-length" {
                    content_length = v.parse().unwrap_or(0);
                }
                if k == "content-encoding" && v == "gzip" {
                    received.gzip = true;
                }
                received.headers.push((k, v));
            }
        }
        let mut body = vec![0; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if received.gzip {
            body = gunzip(&body).unwrap_or_default();
        }
        if let Ok(mut r) = requests.lock() {
            r.push(received);
        }
        if let Ok(mut r) = raw.lock() {
            r.push(body.clone());
        }
        let status = if let Some(forced) = answer {
            forced
        } else if request_line.starts_with("POST /v1/traces ") {
            match ExportTraceServiceRequest::decode(body.as_slice()) {
                Ok(req) => {
                    collected.add(&req);
                    "200 OK"
                }
                Err(_) => "400 Bad Request",
            }
        } else if request_line.starts_with("POST /v1/logs ") {
            match ExportLogsServiceRequest::decode(body.as_slice()) {
                Ok(req) => {
                    if let Ok(mut l) = logs.lock() {
                        l.extend(logs_from_otlp(&req));
                    }
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
        let writer = reader.get_mut();
        if writer
            .write_all(head.as_bytes())
            .and_then(|_| writer.write_all(&reply))
            .and_then(|_| writer.flush())
            .is_err()
        {
            return;
        }
    }
}

struct GrpcSink {
    collected: Collected,
    requests: Arc<Mutex<Vec<Received>>>,
    unauthenticated: bool,
}

#[tonic::async_trait]
impl TraceService for GrpcSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers: Vec<(String, String)> = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect();
        let gzip = headers.iter().any(|(k, v)| k == "grpc-encoding" && v == "gzip");
        if let Ok(mut r) = self.requests.lock() {
            r.push(Received { headers, gzip });
        }
        if self.unauthenticated {
            return Err(tonic::Status::unauthenticated("invalid API key"));
        }
        self.collected.add(request.get_ref());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Log records over gRPC, into the same receiver.
struct GrpcLogSink(Arc<Mutex<Vec<TestLog>>>);

#[tonic::async_trait]
impl LogsService for GrpcLogSink {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        if let Ok(mut l) = self.0.lock() {
            l.extend(logs_from_otlp(request.get_ref()));
        }
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

/// OTLP/gRPC receiver (tonic) on its own runtime thread; accepts gzip. Takes traces and logs.
pub struct GrpcReceiver {
    pub port: u16,
    pub collected: Collected,
    /// Every log record received, in arrival order.
    pub logs: Arc<Mutex<Vec<TestLog>>>,
    pub requests: Arc<Mutex<Vec<Received>>>,
    tls: bool,
}

impl GrpcReceiver {
    pub fn start() -> Self {
        Self::start_with(ReceiverOptions::default())
    }

    /// With `options.answer` set, every export is refused as UNAUTHENTICATED.
    pub fn start_with(options: ReceiverOptions) -> Self {
        let std_listener = TcpListener::bind("127.0.0.1:0").expect("bind grpc receiver");
        let port = std_listener.local_addr().expect("addr").port();
        std_listener.set_nonblocking(true).expect("nonblocking");
        let collected = Collected::default();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let log_sink = GrpcLogSink(logs.clone());
        let sink = GrpcSink {
            collected: collected.clone(),
            requests: requests.clone(),
            unauthenticated: options.answer.is_some(),
        };
        let tls = options.tls.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
                let service = TraceServiceServer::new(sink).accept_compressed(tonic::codec::CompressionEncoding::Gzip);
                let router = tonic::transport::Server::builder()
                    .add_service(service)
                    .add_service(LogsServiceServer::new(log_sink));
                let _ = match tls {
                    None => router.serve_with_incoming(tokio_stream_from(listener)).await,
                    Some(config) => router.serve_with_incoming(tls_incoming(listener, config)).await,
                };
            });
        });
        Self { port, collected, logs, requests, tls: options.tls.is_some() }
    }

    pub fn received(&self) -> Vec<Received> {
        self.requests.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// `http://127.0.0.1:port`, or `https://localhost:port` behind TLS.
    pub fn endpoint(&self) -> String {
        if self.tls { format!("https://localhost:{}", self.port) } else { format!("http://127.0.0.1:{}", self.port) }
    }
}

/// A server-side TLS connection tonic can serve (it needs `Connected`).
struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accepted connections after their TLS handshake; failed handshakes are left out.
fn tls_incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl tokio_stream::Stream<Item = std::io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok(TlsConn(tls))).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}
