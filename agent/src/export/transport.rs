//! Sending one encoded OTLP request (traces or metrics) over gRPC or HTTP/protobuf, plain or
//! TLS, optionally gzip-compressed; and what a failure means: whether trying again can help,
//! and what the operator should change.

use std::io::Write;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};

use super::{
    grpc_raw::RawGrpcClient,
    settings::{Compression, OtlpProtocol, OtlpSettings, Signal},
    tls,
};

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub enum Transport {
    Grpc(RawGrpcClient),
    Http(HttpClient),
}

/// Why an export failed, and whether trying again later can help (OTLP spec's retryable cases).
pub struct ExportError {
    pub message: String,
    pub retryable: bool,
    /// Refused credentials or a TLS failure: only the operator can fix it.
    pub misconfigured: bool,
}

impl ExportError {
    fn transient(message: String) -> Self {
        Self { message, retryable: true, misconfigured: false }
    }

    fn misconfigured(message: String) -> Self {
        Self { message, retryable: false, misconfigured: true }
    }
}

impl Transport {
    pub fn new(settings: &OtlpSettings) -> Result<Self, String> {
        let connector =
            tls::connector(settings.tls.as_deref(), settings.protocol == OtlpProtocol::Grpc, settings.timeout);
        Ok(match settings.protocol {
            OtlpProtocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(settings.endpoint.clone())
                    .map_err(|e| format!("OTLP endpoint {}: {e}", settings.endpoint))?
                    .timeout(settings.timeout)
                    .connect_timeout(settings.timeout)
                    .connect_with_connector_lazy(connector);
                Transport::Grpc(RawGrpcClient::new(channel, settings.signal, settings.compression))
            }
            OtlpProtocol::HttpProtobuf => {
                Transport::Http(Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector))
            }
        })
    }

    /// Sends one encoded export request of the settings' signal.
    pub async fn send(&mut self, settings: &OtlpSettings, body: Bytes) -> Result<(), ExportError> {
        let signal = settings.signal.upper();
        match self {
            Transport::Grpc(client) => client.export(body, &settings.headers).await.map_err(|e| {
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
                if let Some(why) = tls::explain(&e, signal) {
                    return ExportError::misconfigured(why);
                }
                match e.code() {
                    Code::Unauthenticated | Code::PermissionDenied => ExportError::misconfigured(format!(
                        "gRPC export refused ({:?}): {}; {}",
                        e.code(),
                        e.message(),
                        auth_hint(signal)
                    )),
                    // Over TLS 1.3 a collector checks the client certificate after the handshake;
                    // its alert is lost inside the HTTP/2 connection, and the call only sees the
                    // connection close. Say what that usually means, as a possibility.
                    _ if settings.tls.is_some() && connection_closed(&e) => {
                        ExportError::transient(format!(
                            "gRPC export: the collector closed the TLS connection ({}); a collector that requires client certificates (mTLS) does this when sonde presents none or one it does not trust: then set {}",
                            e.message(),
                            tls::client_certificate_variables(signal)
                        ))
                    }
                    _ => ExportError { message: format!("gRPC export: {}", e.message()), retryable, misconfigured: false },
                }
            }),
            Transport::Http(client) => {
                let mut builder =
                    hyper::Request::post(&settings.endpoint).header("content-type", "application/x-protobuf");
                let body = match settings.compression {
                    Compression::None => body,
                    Compression::Gzip => {
                        builder = builder.header("content-encoding", "gzip");
                        Bytes::from(gzip(&body))
                    }
                };
                for (k, v) in &settings.headers {
                    builder = builder.header(k.as_str(), v.as_str());
                }
                // The builder's error would quote the value; a header value is a credential.
                let req = builder.body(Full::new(body)).map_err(|_| {
                    ExportError::misconfigured(
                        "a header in OTEL_EXPORTER_OTLP_HEADERS has a value HTTP cannot carry".into(),
                    )
                })?;
                match tokio::time::timeout(settings.timeout, client.request(req)).await {
                    Err(_) => Err(ExportError::transient("HTTP export timed out".into())),
                    Ok(Err(e)) => match tls::explain(&e, signal) {
                        Some(why) => Err(ExportError::misconfigured(why)),
                        None => Err(ExportError::transient(format!("HTTP export: {}", error_chain(&e)))),
                    },
                    Ok(Ok(resp)) => {
                        let status = resp.status();
                        let _ = resp.into_body().collect().await;
                        match status.as_u16() {
                            200..=299 => Ok(()),
                            401 | 403 => Err(ExportError::misconfigured(format!(
                                "collector answered {status}: {}",
                                auth_hint(signal)
                            ))),
                            code => Err(ExportError {
                                message: format!("HTTP export: collector answered {status}"),
                                retryable: matches!(code, 429 | 502 | 503 | 504),
                                misconfigured: false,
                            }),
                        }
                    }
                }
            }
        }
    }
}

/// The call failed because the connection went away (hyper reports it as canceled, or the
/// write found the socket closed).
fn connection_closed(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_canceled() || h.is_closed())
            || c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(io.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof)
            })
        {
            return true;
        }
        cause = c.source();
    }
    false
}

fn auth_hint(signal: &str) -> String {
    format!(
        "the credentials were refused; check the authorization header in OTEL_EXPORTER_OTLP_HEADERS (or OTEL_EXPORTER_OTLP_{signal}_HEADERS); values are never logged"
    )
}

/// An error and its causes on one line (hyper's own message is often just "client error").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 3), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(body);
    encoder.finish().unwrap_or_default()
}

impl Signal {
    /// The gRPC method that takes this signal's export request.
    pub fn grpc_path(self) -> &'static str {
        match self {
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        }
    }
}
