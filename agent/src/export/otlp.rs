//! OTLP trace export over gRPC or HTTP/protobuf, configured from the OpenTelemetry environment
//! variables. The pipeline collects finished spans into batches and encodes each batch itself
//! (the spans are freed on the thread that built them, and a queued span costs its encoded
//! size, a few hundred bytes); the exporter task only sends bytes. The queue is bounded by the
//! spans it holds: a batch that does not fit is dropped and counted, so a dead backend costs
//! bounded memory and never blocks the pipeline. A batch the collector could not take for a
//! transient reason (unreachable, timeout, 429/502/503/504, gRPC UNAVAILABLE...) is retried with
//! exponential backoff for up to [`RETRY_MAX_ELAPSED`], then dropped and counted; a permanent
//! refusal (400, 401, 413...) is dropped and counted at once.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;

use super::{grpc_raw::RawGrpcClient, otlp_wire};

/// First wait before retrying a failed batch; doubles up to [`RETRY_MAX_BACKOFF`].
const RETRY_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const RETRY_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long one batch is retried before it is dropped (and counted) to make room for newer spans.
const RETRY_MAX_ELAPSED: Duration = Duration::from_secs(60);
use crate::{config::OtlpFileConfig, stats::Stats, trace::span::Span};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// Which OTLP signal settings are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

#[derive(Clone, Debug)]
pub struct OtlpSettings {
    pub protocol: OtlpProtocol,
    /// For HTTP the full traces URL; for gRPC the collector's base URL.
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub queue_spans: usize,
    pub batch_spans: usize,
    pub batch_timeout: Duration,
}

#[derive(Debug)]
pub struct OtlpSettingsError {
    pub key: String,
    pub message: String,
}

fn err(key: &str, message: impl Into<String>) -> OtlpSettingsError {
    OtlpSettingsError { key: key.into(), message: message.into() }
}

impl OtlpSettings {
    /// None when no endpoint is configured anywhere (then sonde only prints).
    /// Settings for traces.
    pub fn from_env(file: &OtlpFileConfig, env: crate::config::Env<'_>) -> Result<Option<Self>, OtlpSettingsError> {
        Self::for_signal(Signal::Traces, file, env)
    }

    /// Settings for one signal: its own variables (`OTEL_EXPORTER_OTLP_<SIGNAL>_*`) win over the
    /// shared ones, and the HTTP path is `/v1/<signal>`.
    pub fn for_signal(
        signal: Signal,
        file: &OtlpFileConfig,
        env: crate::config::Env<'_>,
    ) -> Result<Option<Self>, OtlpSettingsError> {
        let (upper, path) = match signal {
            Signal::Traces => ("TRACES", "v1/traces"),
            Signal::Metrics => ("METRICS", "v1/metrics"),
        };
        let own = |what: &str| format!("OTEL_EXPORTER_OTLP_{upper}_{what}");
        let (proto_key, proto) = [own("PROTOCOL"), "OTEL_EXPORTER_OTLP_PROTOCOL".to_string()]
            .iter()
            .find_map(|k| env(k).map(|v| (k.to_string(), v)))
            .or_else(|| file.protocol.clone().map(|p| ("export.otlp.protocol".to_string(), p)))
            .unwrap_or_else(|| ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()));
        let protocol = match proto.trim() {
            "grpc" => OtlpProtocol::Grpc,
            "http/protobuf" => OtlpProtocol::HttpProtobuf,
            other => {
                return Err(err(&proto_key, format!("{other:?} is not supported; use grpc or http/protobuf")));
            }
        };
        let own_endpoint = own("ENDPOINT");
        let (endpoint_key, endpoint) = if let Some(e) = env(&own_endpoint) {
            (own_endpoint.as_str(), e)
        } else {
            let base = env("OTEL_EXPORTER_OTLP_ENDPOINT")
                .map(|e| ("OTEL_EXPORTER_OTLP_ENDPOINT", e))
                .or_else(|| file.endpoint.clone().map(|e| ("export.otlp.endpoint", e)));
            let Some((key, base)) = base else {
                return Ok(None);
            };
            let e = match protocol {
                OtlpProtocol::HttpProtobuf => format!("{}/{path}", base.trim_end_matches('/')),
                OtlpProtocol::Grpc => base,
            };
            (key, e)
        };
        let uri: hyper::Uri = endpoint.parse().map_err(|e| {
            err(endpoint_key, format!("{endpoint:?} is not a URL ({e}); write e.g. http://localhost:4318"))
        })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(err(
                    endpoint_key,
                    "https endpoints are not supported yet (sonde has no TLS client); point sonde at a collector on the node over http://",
                ));
            }
            _ => {
                return Err(err(
                    endpoint_key,
                    format!("{endpoint:?} needs an http:// scheme, e.g. http://localhost:4318"),
                ));
            }
        }
        if uri.host().is_none() {
            return Err(err(endpoint_key, format!("{endpoint:?} has no host; write e.g. http://localhost:4318")));
        }
        let headers_key =
            [own("HEADERS"), "OTEL_EXPORTER_OTLP_HEADERS".to_string()].into_iter().find(|k| env(k).is_some());
        let headers = match headers_key {
            Some(k) => parse_headers(&env(&k).unwrap_or_default()).map_err(|m| err(&k, m))?,
            None => Vec::new(),
        };
        let timeout_ms = match env("OTEL_EXPORTER_OTLP_TIMEOUT") {
            Some(t) => {
                t.trim().parse().map_err(|_| err("OTEL_EXPORTER_OTLP_TIMEOUT", "must be milliseconds, e.g. 10000"))?
            }
            None => file.timeout_ms,
        };
        if file.queue_spans == 0 || file.batch_spans == 0 || file.batch_spans > file.queue_spans {
            return Err(err("export.otlp.batch_spans", "needs 0 < batch_spans <= queue_spans"));
        }
        Ok(Some(Self {
            protocol,
            endpoint,
            headers,
            timeout: Duration::from_millis(timeout_ms),
            queue_spans: file.queue_spans,
            batch_spans: file.batch_spans,
            batch_timeout: Duration::from_millis(file.batch_timeout_ms.max(1)),
        }))
    }
}

/// `k1=v1,k2=v2`, values percent-decoded as the OTel spec asks.
fn parse_headers(raw: &str) -> Result<Vec<(String, String)>, String> {
    crate::trace::resource::parse_resource_attributes(raw)
        .map_err(|_| format!("{raw:?} must be key=value pairs separated by commas"))
}

/// One export request: an encoded `ExportTraceServiceRequest` and the spans it holds.
struct Batch {
    body: Bytes,
    spans: u64,
}

/// The pipeline's end of the export queue: never blocks. Spans are collected into a batch,
/// which is encoded and queued when it is full or [`SpanQueue::flush_if_due`] finds it older
/// than the batch timeout; whatever is left is queued when the handle is dropped.
pub struct SpanQueue {
    tx: mpsc::UnboundedSender<Batch>,
    /// Spans in queued batches (the exporter subtracts a batch when it takes it).
    queued: Arc<AtomicU64>,
    capacity: u64,
    batch: Vec<Span>,
    batch_started: Option<Instant>,
    batch_spans: usize,
    batch_timeout: Duration,
    stats: Arc<Stats>,
}

impl SpanQueue {
    pub fn push(&mut self, span: Span) {
        if self.batch.is_empty() {
            self.batch_started = Some(Instant::now());
        }
        self.batch.push(span);
        if self.batch.len() >= self.batch_spans {
            self.flush();
        }
    }

    /// Queues a partial batch once its first span has waited the batch timeout. Called after
    /// every drain of the ring buffer (at least every `capture.poll_interval_ms`).
    pub fn flush_if_due(&mut self) {
        if self.batch_started.is_some_and(|t| t.elapsed() >= self.batch_timeout) {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.batch_started = None;
        let spans = self.batch.len() as u64;
        if spans == 0 {
            return;
        }
        if self.queued.load(Relaxed) + spans > self.capacity {
            Stats::add(&self.stats.spans_dropped_queue_full, spans);
        } else {
            let body = Bytes::from(otlp_wire::encode(&self.batch));
            self.queued.fetch_add(spans, Relaxed);
            if self.tx.send(Batch { body, spans }).is_err() {
                // The exporter has ended (only at shutdown).
                self.queued.fetch_sub(spans, Relaxed);
                Stats::add(&self.stats.spans_dropped_export_failed, spans);
            }
        }
        self.batch.clear();
    }
}

impl Drop for SpanQueue {
    fn drop(&mut self) {
        self.flush();
    }
}

enum Transport {
    Grpc(RawGrpcClient),
    Http(hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>),
}

/// Starts the exporter task; returns the queue and the task to await on shutdown (after the
/// queue is dropped it sends what is left, then ends).
pub fn start(settings: OtlpSettings, stats: Arc<Stats>) -> Result<(SpanQueue, tokio::task::JoinHandle<()>), String> {
    let (tx, rx) = mpsc::unbounded_channel();
    let transport = match settings.protocol {
        OtlpProtocol::Grpc => {
            let channel = tonic::transport::Endpoint::from_shared(settings.endpoint.clone())
                .map_err(|e| format!("OTLP endpoint {}: {e}", settings.endpoint))?
                .timeout(settings.timeout)
                .connect_timeout(settings.timeout)
                .connect_lazy();
            Transport::Grpc(RawGrpcClient::new(channel))
        }
        OtlpProtocol::HttpProtobuf => Transport::Http(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
        ),
    };
    let queued = Arc::new(AtomicU64::new(0));
    let queue = SpanQueue {
        tx,
        queued: queued.clone(),
        capacity: settings.queue_spans as u64,
        batch: Vec::with_capacity(settings.batch_spans),
        batch_started: None,
        batch_spans: settings.batch_spans,
        batch_timeout: settings.batch_timeout,
        stats: stats.clone(),
    };
    let task = tokio::spawn(export_loop(rx, queued, transport, settings, stats));
    Ok((queue, task))
}

async fn export_loop(
    mut rx: mpsc::UnboundedReceiver<Batch>,
    queued: Arc<AtomicU64>,
    mut transport: Transport,
    settings: OtlpSettings,
    stats: Arc<Stats>,
) {
    let mut outage = Outage::default();
    while let Some(batch) = rx.recv().await {
        queued.fetch_sub(batch.spans, Relaxed);
        deliver(&mut transport, &settings, &stats, &batch, &rx, &mut outage).await;
        if rx.is_closed() && outage.since.is_some() {
            // Shutting down with the collector failing: what is still queued cannot be sent in
            // time either. Count it rather than let the flush deadline lose it silently.
            let mut rest = 0;
            while let Ok(b) = rx.try_recv() {
                rest += b.spans;
            }
            Stats::add(&stats.spans_dropped_export_failed, rest);
            if rest > 0 {
                log::warn!("shutting down while the collector fails: dropped {rest} queued spans");
            }
        }
    }
}

/// The collector has been failing since `since`; logged once when it starts and once when it ends.
#[derive(Default)]
struct Outage {
    since: Option<tokio::time::Instant>,
    dropped_before: u64,
}

/// Sends one batch, retrying transient failures with backoff; counts it exported or dropped.
async fn deliver(
    transport: &mut Transport,
    settings: &OtlpSettings,
    stats: &Stats,
    batch: &Batch,
    rx: &mpsc::UnboundedReceiver<Batch>,
    outage: &mut Outage,
) {
    let n = batch.spans;
    let started = tokio::time::Instant::now();
    let mut backoff = RETRY_INITIAL_BACKOFF;
    loop {
        match send(transport, settings, batch.body.clone()).await {
            Ok(()) => {
                Stats::add(&stats.spans_exported, n);
                if let Some(since) = outage.since.take() {
                    let dropped = dropped(stats) - outage.dropped_before;
                    log::info!(
                        "OTLP export recovered after {:.1} s; {dropped} spans were dropped meanwhile (counted in spans_dropped_*)",
                        since.elapsed().as_secs_f64()
                    );
                }
                break;
            }
            Err(e) => {
                Stats::add(&stats.export_errors, 1);
                if outage.since.is_none() {
                    outage.since = Some(tokio::time::Instant::now());
                    outage.dropped_before = dropped(stats);
                    log::warn!(
                        "OTLP export to {} failing: {}; {} (queue holds {} spans, beyond that new spans are dropped and counted)",
                        settings.endpoint,
                        e.message,
                        if e.retryable { "retrying with backoff" } else { "not retryable, batches dropped" },
                        settings.queue_spans
                    );
                }
                let out_of_time = started.elapsed() + backoff > RETRY_MAX_ELAPSED;
                if !e.retryable || rx.is_closed() || out_of_time {
                    Stats::add(&stats.spans_dropped_export_failed, n);
                    log::debug!("dropped {n} spans: {}", e.message);
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
            }
        }
    }
}

fn dropped(stats: &Stats) -> u64 {
    Stats::get(&stats.spans_dropped_export_failed) + Stats::get(&stats.spans_dropped_queue_full)
}

/// Why an export failed, and whether trying again later can help (OTLP spec's retryable cases).
struct ExportError {
    message: String,
    retryable: bool,
}

impl ExportError {
    fn transient(message: String) -> Self {
        Self { message, retryable: true }
    }
}

async fn send(transport: &mut Transport, settings: &OtlpSettings, body: Bytes) -> Result<(), ExportError> {
    match transport {
        Transport::Grpc(client) => client.export_traces(body, &settings.headers).await.map_err(|e| {
            use tonic::Code;
            let retryable = matches!(
                e.code(),
                Code::Unavailable
                    | Code::ResourceExhausted
                    | Code::DeadlineExceeded
                    | Code::Aborted
                    | Code::Cancelled
                    | Code::OutOfRange
                    | Code::DataLoss
            );
            ExportError { message: format!("gRPC export: {}", e.message()), retryable }
        }),
        Transport::Http(client) => {
            let mut builder = hyper::Request::post(&settings.endpoint).header("content-type", "application/x-protobuf");
            for (k, v) in &settings.headers {
                builder = builder.header(k.as_str(), v.as_str());
            }
            match builder.body(Full::new(body)) {
                Err(e) => Err(ExportError { message: format!("building the OTLP request: {e}"), retryable: false }),
                Ok(req) => match tokio::time::timeout(settings.timeout, client.request(req)).await {
                    Err(_) => Err(ExportError::transient("HTTP export timed out".into())),
                    Ok(Err(e)) => Err(ExportError::transient(format!("HTTP export: {e}"))),
                    Ok(Ok(resp)) => {
                        let status = resp.status();
                        let _ = resp.into_body().collect().await;
                        if status.is_success() {
                            Ok(())
                        } else {
                            Err(ExportError {
                                message: format!("HTTP export: collector answered {status}"),
                                retryable: matches!(status.as_u16(), 429 | 502 | 503 | 504),
                            })
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Option<OtlpSettings>, OtlpSettingsError> {
        let owned: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let env = move |k: &str| owned.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        OtlpSettings::from_env(&OtlpFileConfig::default(), &env)
    }

    #[test]
    fn endpoints_follow_the_spec() {
        assert!(settings(&[]).unwrap().is_none());
        let s = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]).unwrap().unwrap();
        assert_eq!((s.protocol, s.endpoint.as_str()), (OtlpProtocol::HttpProtobuf, "http://c:4318/v1/traces"));
        let s = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])
            .unwrap()
            .unwrap();
        assert_eq!((s.protocol, s.endpoint.as_str()), (OtlpProtocol::Grpc, "http://c:4317"));
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9/custom"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%3Db"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(s.endpoint, "http://t:9/custom");
        assert_eq!(s.headers, vec![("api-key".to_string(), "a=b".to_string())]);
    }

    #[test]
    fn bad_settings_name_the_variable() {
        let e = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")])
            .unwrap_err();
        assert_eq!(e.key, "OTEL_EXPORTER_OTLP_PROTOCOL");
        let e = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4317 x")]).unwrap_err();
        assert_eq!(e.key, "OTEL_EXPORTER_OTLP_ENDPOINT");
        let e = settings(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://c")]).unwrap_err();
        assert_eq!(e.key, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    }
}
