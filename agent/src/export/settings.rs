//! OTLP exporter settings from the OpenTelemetry environment variables (the per-signal
//! `OTEL_EXPORTER_OTLP_<SIGNAL>_*` win over the shared ones, which win over the config file),
//! validated up front: a bad value names its variable or key and the fix.

use std::{fmt, sync::Arc, time::Duration};

use super::tls::{self, PemSetting, RootSource, TlsFiles};
use crate::config::{Env, OtlpFileConfig};

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
    Logs,
}

impl Signal {
    /// The signal's part of the variable names.
    pub fn upper(self) -> &'static str {
        match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
            Signal::Logs => "LOGS",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Signal::Traces => "v1/traces",
            Signal::Metrics => "v1/metrics",
            Signal::Logs => "v1/logs",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

#[derive(Clone)]
pub struct OtlpSettings {
    pub signal: Signal,
    pub protocol: OtlpProtocol,
    /// For HTTP the full URL of the signal; for gRPC the collector's base URL.
    pub endpoint: String,
    /// Sent with every request; the values are credentials and never logged.
    pub headers: Vec<(String, String)>,
    pub compression: Compression,
    /// The TLS client configuration, for `https` endpoints.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub tls_roots: Option<RootSource>,
    pub timeout: Duration,
    pub queue_spans: usize,
    pub batch_spans: usize,
    pub batch_timeout: Duration,
}

/// Header values are credentials: only their names are shown.
impl fmt::Debug for OtlpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpSettings")
            .field("signal", &self.signal)
            .field("protocol", &self.protocol)
            .field("endpoint", &self.endpoint)
            .field("headers", &self.headers.iter().map(|(k, _)| format!("{k}=<redacted>")).collect::<Vec<_>>())
            .field("compression", &self.compression)
            .field("tls", &self.tls_roots)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct OtlpSettingsError {
    pub key: String,
    pub message: String,
}

fn err(key: &str, message: impl Into<String>) -> OtlpSettingsError {
    OtlpSettingsError { key: key.into(), message: message.into() }
}

/// A value and the variable or config key it came from.
struct Sourced {
    key: String,
    value: String,
}

impl OtlpSettings {
    /// Settings for traces; None when no endpoint is configured anywhere (then sonde only prints).
    pub fn from_env(file: &OtlpFileConfig, env: Env<'_>) -> Result<Option<Self>, OtlpSettingsError> {
        Self::for_signal(Signal::Traces, file, env)
    }

    /// Settings for one signal; the HTTP path is `/v1/<signal>`.
    pub fn for_signal(signal: Signal, file: &OtlpFileConfig, env: Env<'_>) -> Result<Option<Self>, OtlpSettingsError> {
        let upper = signal.upper();
        // The signal's own variable, then the shared one, then the config file's key.
        let lookup = |what: &str, file_key: &str, file_value: Option<&String>| -> Option<Sourced> {
            [format!("OTEL_EXPORTER_OTLP_{upper}_{what}"), format!("OTEL_EXPORTER_OTLP_{what}")]
                .into_iter()
                .find_map(|key| env(&key).map(|value| Sourced { key, value }))
                .or_else(|| file_value.map(|v| Sourced { key: format!("export.otlp.{file_key}"), value: v.clone() }))
        };

        let protocol = match lookup("PROTOCOL", "protocol", file.protocol.as_ref()) {
            None => OtlpProtocol::HttpProtobuf,
            Some(p) => match p.value.trim() {
                "grpc" => OtlpProtocol::Grpc,
                "http/protobuf" => OtlpProtocol::HttpProtobuf,
                other => {
                    return Err(err(&p.key, format!("{other:?} is not supported; use grpc or http/protobuf")));
                }
            },
        };
        let insecure = match lookup("INSECURE", "insecure", file.insecure.map(|b| b.to_string()).as_ref()) {
            None => false,
            Some(s) => match s.value.trim().to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                other => return Err(err(&s.key, format!("{other:?} must be true or false"))),
            },
        };
        let own_endpoint = format!("OTEL_EXPORTER_OTLP_{upper}_ENDPOINT");
        let (endpoint_key, endpoint) = if let Some(e) = env(&own_endpoint) {
            (own_endpoint, e)
        } else {
            let base = env("OTEL_EXPORTER_OTLP_ENDPOINT")
                .map(|e| ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), e))
                .or_else(|| file.endpoint.clone().map(|e| ("export.otlp.endpoint".to_string(), e)));
            let Some((key, base)) = base else {
                return Ok(None);
            };
            let e = match protocol {
                OtlpProtocol::HttpProtobuf => format!("{}/{}", base.trim_end_matches('/'), signal.path()),
                OtlpProtocol::Grpc => base,
            };
            (key, e)
        };
        let endpoint = endpoint.trim().to_string();
        // gRPC endpoints may leave the scheme out; the spec makes those TLS unless INSECURE.
        let endpoint = if protocol == OtlpProtocol::Grpc && !endpoint.contains("://") {
            format!("{}://{endpoint}", if insecure { "http" } else { "https" })
        } else {
            endpoint
        };
        let uri: hyper::Uri = endpoint.parse().map_err(|e| {
            err(&endpoint_key, format!("{endpoint:?} is not a URL ({e}); write e.g. http://localhost:4318"))
        })?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(err(
                    &endpoint_key,
                    format!("{endpoint:?} needs an http:// or https:// scheme, e.g. http://localhost:4318"),
                ));
            }
        };
        if uri.host().is_none() {
            return Err(err(&endpoint_key, format!("{endpoint:?} has no host; write e.g. http://localhost:4318")));
        }

        let headers = match lookup("HEADERS", "headers", None) {
            Some(h) => parse_headers(&h.value).map_err(|m| err(&h.key, m))?,
            None => file.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        for (k, _) in &headers {
            if hyper::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                let key = lookup("HEADERS", "headers", None).map_or("export.otlp.headers".into(), |h| h.key);
                return Err(err(&key, format!("{k:?} is not a valid header name")));
            }
        }
        let compression = match lookup("COMPRESSION", "compression", file.compression.as_ref()) {
            None => Compression::None,
            Some(c) => match c.value.trim() {
                "gzip" => Compression::Gzip,
                "none" | "" => Compression::None,
                other => return Err(err(&c.key, format!("{other:?} is not supported; use gzip or none"))),
            },
        };
        let pem = |what: &str, file_key: &str, file_value: Option<&String>| {
            lookup(what, file_key, file_value).map(|s| PemSetting { key: s.key, path: s.value.trim().to_string() })
        };
        let files = TlsFiles {
            ca: pem("CERTIFICATE", "certificate", file.certificate.as_ref()),
            client_certificate: pem("CLIENT_CERTIFICATE", "client_certificate", file.client_certificate.as_ref()),
            client_key: pem("CLIENT_KEY", "client_key", file.client_key.as_ref()),
        };
        // Files are checked even for a plain endpoint: a path that is wrong now is wrong later.
        let tls_config =
            if https || files.ca.is_some() || files.client_certificate.is_some() || files.client_key.is_some() {
                let (config, roots) = tls::client_config(&files).map_err(|e| err(&e.key, e.message))?;
                Some((config, roots))
            } else {
                None
            };
        let (tls, tls_roots) = match tls_config {
            Some((c, r)) if https => (Some(c), Some(r)),
            _ => (None, None),
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
            signal,
            protocol,
            endpoint,
            headers,
            compression,
            tls,
            tls_roots,
            timeout: Duration::from_millis(timeout_ms),
            queue_spans: file.queue_spans,
            batch_spans: file.batch_spans,
            batch_timeout: Duration::from_millis(file.batch_timeout_ms.max(1)),
        }))
    }

    /// For the startup log: where spans go and how, without the header values.
    pub fn describe(&self) -> String {
        let protocol = match self.protocol {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        };
        let mut parts = vec![protocol.to_string()];
        match self.tls_roots {
            Some(RootSource::ConfiguredCa) => parts.push("TLS (configured CA)".into()),
            Some(RootSource::Platform) => parts.push("TLS (platform roots)".into()),
            Some(RootSource::WebpkiFallback) => parts.push("TLS (bundled Mozilla roots: the platform has none)".into()),
            None => {}
        }
        if self.tls.as_ref().is_some_and(|c| c.client_auth_cert_resolver.has_certs()) {
            parts.push("client certificate".into());
        }
        if self.compression == Compression::Gzip {
            parts.push("gzip".into());
        }
        if !self.headers.is_empty() {
            let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
            parts.push(format!("headers {}", names.join(",")));
        }
        format!("{} ({})", self.endpoint, parts.join(", "))
    }
}

/// `k1=v1,k2=v2`, values percent-decoded as the OTel spec asks (`Authorization=Basic%20...`).
fn parse_headers(raw: &str) -> Result<Vec<(String, String)>, String> {
    crate::trace::resource::parse_resource_attributes(raw)
        .map_err(|_| "must be key=value pairs separated by commas (the values are not shown)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Option<OtlpSettings>, OtlpSettingsError> {
        settings_with(vars, &OtlpFileConfig::default())
    }

    fn settings_with(vars: &[(&str, &str)], file: &OtlpFileConfig) -> Result<Option<OtlpSettings>, OtlpSettingsError> {
        let owned: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let env = move |k: &str| owned.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        OtlpSettings::from_env(file, &env)
    }

    #[test]
    fn endpoints_follow_the_spec() {
        assert!(settings(&[]).unwrap().is_none());
        let s = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]).unwrap().unwrap();
        assert_eq!((s.protocol, s.endpoint.as_str()), (OtlpProtocol::HttpProtobuf, "http://c:4318/v1/traces"));
        assert!(s.tls.is_none());
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
    fn https_grpc_without_scheme_and_insecure() {
        let s = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otlp.example:443")]).unwrap().unwrap();
        assert_eq!(s.endpoint, "https://otlp.example:443/v1/traces");
        assert!(s.tls.is_some());
        let grpc = [("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")];
        let s = settings(&grpc).unwrap().unwrap();
        assert_eq!(s.endpoint, "https://collector:4317");
        assert!(s.tls.is_some());
        let s = settings(&[grpc[0], grpc[1], ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "true")]).unwrap().unwrap();
        assert_eq!(s.endpoint, "http://collector:4317");
        assert!(s.tls.is_none());
        let e = settings(&[grpc[0], grpc[1], ("OTEL_EXPORTER_OTLP_INSECURE", "yes")]).unwrap_err();
        assert_eq!(e.key, "OTEL_EXPORTER_OTLP_INSECURE");
    }

    #[test]
    fn authorization_headers_are_decoded_and_never_shown() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otlp.example"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Basic%20dXNlcjpzZWNyZXQ=,x-scope=t%2C1"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            s.headers,
            vec![
                ("Authorization".to_string(), "Basic dXNlcjpzZWNyZXQ=".to_string()),
                ("x-scope".to_string(), "t,1".to_string())
            ]
        );
        assert_eq!(s.compression, Compression::Gzip);
        for shown in [format!("{s:?}"), s.describe()] {
            assert!(!shown.contains("dXNlcjpzZWNyZXQ") && !shown.contains("t,1"), "{shown}");
            assert!(shown.contains("Authorization"), "{shown}");
        }
        let e = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"), ("OTEL_EXPORTER_OTLP_HEADERS", "a b=secret")])
            .unwrap_err();
        assert_eq!(e.key, "OTEL_EXPORTER_OTLP_HEADERS");
        assert!(!e.message.contains("secret"), "{}", e.message);
    }

    #[test]
    fn config_file_keys_are_the_fallback() {
        let file = OtlpFileConfig {
            endpoint: Some("https://otlp.example".into()),
            headers: [("api-key".to_string(), "k".to_string())].into(),
            compression: Some("gzip".into()),
            certificate: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = settings_with(&[], &file).unwrap_err();
        assert_eq!(e.key, "export.otlp.certificate");
        let e = settings_with(&[("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/nonexistent/x.pem")], &file).unwrap_err();
        assert_eq!(e.key, "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE");
        let file = OtlpFileConfig { certificate: None, ..file };
        let s = settings_with(&[], &file).unwrap().unwrap();
        assert_eq!((s.compression, s.headers.len()), (Compression::Gzip, 1));
        let e = settings_with(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")], &file).unwrap_err();
        assert_eq!(e.key, "OTEL_EXPORTER_OTLP_COMPRESSION");
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
