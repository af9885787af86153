//! OTLP trace export over gRPC or HTTP/protobuf, configured from the OpenTelemetry environment
//! variables. Spans wait in a bounded queue; a full queue drops new spans and counts them, so a
//! dead backend costs bounded memory and never blocks the pipeline. A batch the collector could
//! not take for a transient reason (unreachable, timeout, 429/502/503/504, gRPC UNAVAILABLE...)
//! is retried with exponential backoff for up to [`RETRY_MAX_ELAPSED`], then dropped and counted;
//! a permanent refusal (400, 401, 413...) is dropped and counted at once.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use tokio::sync::mpsc;

use super::otlp_encode::encode;

/// First wait before retrying a failed batch; doubles up to [`RETRY_MAX_BACKOFF`].
const RETRY_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const RETRY_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long one batch is retried before it is dropped (and counted) to make room for newer spans.
const RETRY_MAX_ELAPSED: Duration = Duration::from_secs(60);
/// How often a partly filled batch is topped up from the queue (see [`gather`]). At 400k spans/s
/// this is 2,000 spans per poll, well inside the default queue of 8,192.
const GATHER_POLL: Duration = Duration::from_millis(5);
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

/// The pipeline's handle: never blocks.
#[derive(Clone)]
pub struct SpanQueue {
    tx: mpsc::Sender<Span>,
    stats: Arc<Stats>,
}

impl SpanQueue {
    pub fn push(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            Stats::add(&self.stats.spans_dropped_queue_full, 1);
        }
    }
}

enum Transport {
    Grpc(TraceServiceClient<tonic::transport::Channel>),
    Http(hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>),
}

/// Starts the exporter task; returns the queue and the task to await on shutdown (after the
/// queue's senders are dropped it drains what is left, then ends).
pub fn start(settings: OtlpSettings, stats: Arc<Stats>) -> Result<(SpanQueue, tokio::task::JoinHandle<()>), String> {
    let (tx, rx) = mpsc::channel(settings.queue_spans);
    let transport = match settings.protocol {
        OtlpProtocol::Grpc => {
            let channel = tonic::transport::Endpoint::from_shared(settings.endpoint.clone())
                .map_err(|e| format!("OTLP endpoint {}: {e}", settings.endpoint))?
                .timeout(settings.timeout)
                .connect_timeout(settings.timeout)
                .connect_lazy();
            Transport::Grpc(TraceServiceClient::new(channel))
        }
        OtlpProtocol::HttpProtobuf => Transport::Http(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
        ),
    };
    let task = tokio::spawn(export_loop(rx, transport, settings, stats.clone()));
    Ok((SpanQueue { tx, stats }, task))
}

async fn export_loop(
    mut rx: mpsc::Receiver<Span>,
    mut transport: Transport,
    settings: OtlpSettings,
    stats: Arc<Stats>,
) {
    let mut batch = Vec::with_capacity(settings.batch_spans);
    let mut outage = Outage::default();
    loop {
        let Some(first) = rx.recv().await else { break };
        batch.push(first);
        gather(&mut rx, &mut batch, &settings).await;
        deliver(&mut transport, &settings, &stats, &mut batch, &rx, &mut outage).await;
        if rx.is_closed() && outage.since.is_some() {
            // Shutting down with the collector failing: what is still queued cannot be sent in
            // time either. Count it rather than let the flush deadline lose it silently.
            let mut rest = 0;
            while rx.try_recv().is_ok() {
                rest += 1;
            }
            Stats::add(&stats.spans_dropped_export_failed, rest);
            if rest > 0 {
                log::warn!("shutting down while the collector fails: dropped {rest} queued spans");
            }
        }
    }
}

/// Fills `batch` from the queue until it is full, the queue is closed, or the batch timeout
/// passes. Polled every [`GATHER_POLL`]: waiting on the queue itself would wake this task (a
/// thread switch) for every span the pipeline queues on a busy host.
async fn gather(rx: &mut mpsc::Receiver<Span>, batch: &mut Vec<Span>, settings: &OtlpSettings) {
    let deadline = tokio::time::Instant::now() + settings.batch_timeout;
    loop {
        while batch.len() < settings.batch_spans {
            let Ok(span) = rx.try_recv() else { break };
            batch.push(span);
        }
        let now = tokio::time::Instant::now();
        if batch.len() >= settings.batch_spans || rx.is_closed() || now >= deadline {
            return;
        }
        tokio::time::sleep_until((now + GATHER_POLL).min(deadline)).await;
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
    batch: &mut Vec<Span>,
    rx: &mpsc::Receiver<Span>,
    outage: &mut Outage,
) {
    let n = batch.len() as u64;
    let started = tokio::time::Instant::now();
    let mut backoff = RETRY_INITIAL_BACKOFF;
    loop {
        match send(transport, settings, batch).await {
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
    batch.clear();
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

async fn send(transport: &mut Transport, settings: &OtlpSettings, batch: &[Span]) -> Result<(), ExportError> {
    match transport {
        Transport::Grpc(client) => {
            let mut req = tonic::Request::new(encode(batch));
            for (k, v) in &settings.headers {
                if let (Ok(k), Ok(v)) = (
                    k.to_ascii_lowercase().parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
                    v.parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>(),
                ) {
                    req.metadata_mut().insert(k, v);
                }
            }
            client.export(req).await.map(|_| ()).map_err(|e| {
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
            })
        }
        Transport::Http(client) => {
            let mut builder = hyper::Request::post(&settings.endpoint).header("content-type", "application/x-protobuf");
            for (k, v) in &settings.headers {
                builder = builder.header(k.as_str(), v.as_str());
            }
            match builder.body(Full::new(Bytes::from(super::otlp_wire::encode(batch)))) {
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
