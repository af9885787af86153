//! TLS for OTLP export: one rustls client configuration for gRPC and HTTP/protobuf, built while
//! the configuration is validated (so a CA or client certificate that cannot be read stops
//! `sonde config` with the variable named), and the explanation of a TLS failure in terms of
//! what the operator can change.

use std::{error::Error as StdError, path::Path, sync::Arc, time::Duration};

use hyper_util::client::legacy::connect::HttpConnector;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

/// A PEM file and the setting that named it (kept for error messages).
#[derive(Clone, Debug)]
pub struct PemSetting {
    pub key: String,
    pub path: String,
}

/// The TLS files an exporter was configured with.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`: the CA the collector's certificate must chain to. When
    /// set, only this CA is trusted (as the OpenTelemetry SDKs do).
    pub ca: Option<PemSetting>,
    pub client_certificate: Option<PemSetting>,
    pub client_key: Option<PemSetting>,
}

/// A setting that cannot be used, and why.
#[derive(Debug)]
pub struct TlsSettingError {
    pub key: String,
    pub message: String,
}

fn setting_error(s: &PemSetting, message: impl Into<String>) -> TlsSettingError {
    TlsSettingError { key: s.key.clone(), message: message.into() }
}

fn read_certificates(s: &PemSetting) -> Result<Vec<CertificateDer<'static>>, TlsSettingError> {
    let bytes =
        std::fs::read(Path::new(&s.path)).map_err(|e| setting_error(s, format!("cannot read {}: {e}", s.path)))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| setting_error(s, format!("{} is not a PEM certificate file: {e}", s.path)))?;
    if certs.is_empty() {
        return Err(setting_error(s, format!("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", s.path)));
    }
    Ok(certs)
}

fn read_private_key(s: &PemSetting) -> Result<PrivateKeyDer<'static>, TlsSettingError> {
    let bytes =
        std::fs::read(Path::new(&s.path)).map_err(|e| setting_error(s, format!("cannot read {}: {e}", s.path)))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| setting_error(s, format!("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}", s.path)))
}

/// Where the trusted roots came from, for the startup log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootSource {
    ConfiguredCa,
    Platform,
    WebpkiFallback,
}

fn roots(files: &TlsFiles) -> Result<(RootCertStore, RootSource), TlsSettingError> {
    let mut store = RootCertStore::empty();
    if let Some(ca) = &files.ca {
        for cert in read_certificates(ca)? {
            store.add(cert).map_err(|e| setting_error(ca, format!("{}: not a usable CA certificate: {e}", ca.path)))?;
        }
        return Ok((store, RootSource::ConfiguredCa));
    }
    // The platform's store first (what the operator already manages); the bundled Mozilla roots
    // when the platform has none (distroless images, minimal hosts).
    let (added, _ignored) = store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if added > 0 {
        return Ok((store, RootSource::Platform));
    }
    store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    Ok((store, RootSource::WebpkiFallback))
}

/// The client configuration for one exporter (ALPN is set by [`connector`]).
pub fn client_config(files: &TlsFiles) -> Result<(Arc<ClientConfig>, RootSource), TlsSettingError> {
    let (roots, source) = roots(files)?;
    let builder = builder().with_root_certificates(roots);
    let config = match (&files.client_certificate, &files.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = read_certificates(cert)?;
            let key_der = read_private_key(key)?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                setting_error(key, format!("{} does not go with the certificate in {}: {e}", key.path, cert.path))
            })?
        }
        (Some(cert), None) => {
            return Err(TlsSettingError {
                key: cert.key.replace("CLIENT_CERTIFICATE", "CLIENT_KEY").replace("client_certificate", "client_key"),
                message: format!("a client certificate ({}) needs its private key too", cert.key),
            });
        }
        (None, Some(key)) => {
            return Err(TlsSettingError {
                key: key.key.replace("CLIENT_KEY", "CLIENT_CERTIFICATE").replace("client_key", "client_certificate"),
                message: format!("a client key ({}) needs its certificate too", key.key),
            });
        }
    };
    Ok((Arc::new(config), source))
}

/// A connector that speaks TLS to `https://` URIs (with `config`) and plain TCP to `http://`
/// ones. `http2` asks for h2 by ALPN (gRPC); otherwise HTTP/1.1 only.
pub fn connector(
    config: Option<&ClientConfig>,
    http2: bool,
    connect_timeout: Duration,
) -> hyper_rustls::HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    // A plain endpoint never reaches TLS; an empty trust store makes sure it could not succeed.
    let config = config
        .cloned()
        .unwrap_or_else(|| builder().with_root_certificates(RootCertStore::empty()).with_no_client_auth());
    let schemes = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_or_http();
    if http2 { schemes.enable_http2().wrap_connector(http) } else { schemes.enable_http1().wrap_connector(http) }
}

fn builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls' default protocol versions")
}

/// What to tell the operator about a failed export whose cause was TLS, found anywhere in the
/// error's source chain. `signal` is `TRACES` or `METRICS`, for the variable names.
pub fn explain(error: &(dyn StdError + 'static), signal: &str) -> Option<String> {
    let found = find_rustls_error(error)?;
    let alert_received;
    let tls = match found {
        Found::Error(e) => e,
        Found::Alert(a) => {
            alert_received = rustls::Error::AlertReceived(a);
            &alert_received
        }
    };
    let ca_vars = format!("OTEL_EXPORTER_OTLP_CERTIFICATE (or OTEL_EXPORTER_OTLP_{signal}_CERTIFICATE)");
    let client_vars = client_certificate_variables(signal);
    Some(match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature | CertificateError::InvalidPurpose => {
                format!(
                    "TLS: the collector's certificate is not signed by a CA sonde trusts ({cert:?}); if the collector uses a private CA, set {ca_vars} to that CA's PEM file"
                )
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "TLS: the collector's certificate does not name the endpoint's host ({cert:?}); use the host name the certificate was issued for"
            ),
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => format!(
                "TLS: the collector's certificate is outside its validity period ({cert:?}); renew it, or check this host's clock"
            ),
            other => format!("TLS: the collector's certificate was refused: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError
            | AlertDescription::HandshakeFailure => format!(
                "TLS: the collector ended the handshake ({alert:?}): it wants a client certificate it trusts; set {client_vars}"
            ),
            other => format!("TLS: the collector ended the handshake with alert {other:?}"),
        },
        rustls::Error::NoApplicationProtocol => {
            "TLS: the collector does not offer the protocol asked for (h2 for grpc, http/1.1 for http/protobuf); check OTEL_EXPORTER_OTLP_PROTOCOL and the port".to_string()
        }
        other => format!("TLS: {other}"),
    })
}

/// The variables that give sonde a client certificate, for messages.
pub fn client_certificate_variables(signal: &str) -> String {
    format!(
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY (or the OTEL_EXPORTER_OTLP_{signal}_ variants)"
    )
}

enum Found<'a> {
    Error(&'a rustls::Error),
    /// HTTP/2 passes a TLS alert on as text only ("received fatal alert: CertificateRequired").
    Alert(AlertDescription),
}

fn find_rustls_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<Found<'a>> {
    let mut current: Option<&'a (dyn StdError + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(Found::Error(tls));
        }
        if let Some(alert) = e.to_string().strip_prefix("received fatal alert: ").and_then(alert_named) {
            return Some(Found::Alert(alert));
        }
        // An io::Error's `source()` skips the error it wraps (connectors nest them): look inside.
        current = match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    None
}

/// The alerts a collector sends when it refuses a client certificate, by their Debug name.
fn alert_named(name: &str) -> Option<AlertDescription> {
    [
        AlertDescription::CertificateRequired,
        AlertDescription::BadCertificate,
        AlertDescription::UnknownCA,
        AlertDescription::CertificateUnknown,
        AlertDescription::AccessDenied,
        AlertDescription::DecryptError,
        AlertDescription::HandshakeFailure,
        AlertDescription::CertificateExpired,
        AlertDescription::CertificateRevoked,
        AlertDescription::UnsupportedCertificate,
    ]
    .into_iter()
    .find(|a| format!("{a:?}") == name.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem(key: &str, path: &str) -> Option<PemSetting> {
        Some(PemSetting { key: key.into(), path: path.into() })
    }

    #[test]
    fn unreadable_or_non_pem_files_name_their_variable() {
        let files = TlsFiles { ca: pem("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"), ..Default::default() };
        let e = client_config(&files).unwrap_err();
        assert_eq!(e.key, "OTEL_EXPORTER_OTLP_CERTIFICATE");
        assert!(e.message.contains("cannot read /nonexistent/ca.pem"), "{}", e.message);

        let dir = std::env::temp_dir().join(format!("sonde-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let files = TlsFiles { ca: pem("export.otlp.certificate", junk.to_str().unwrap()), ..Default::default() };
        let e = client_config(&files).unwrap_err();
        assert_eq!(e.key, "export.otlp.certificate");
        assert!(e.message.contains("holds no PEM certificate"), "{}", e.message);

        let files = TlsFiles {
            client_certificate: pem("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", junk.to_str().unwrap()),
            ..Default::default()
        };
        let e = client_config(&files).unwrap_err();
        assert_eq!(e.key, "OTEL_EXPORTER_OTLP_CLIENT_KEY");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn default_roots_are_never_empty() {
        let (_, source) = client_config(&TlsFiles::default()).unwrap();
        assert_ne!(source, RootSource::ConfiguredCa);
    }

    #[test]
    fn tls_causes_are_found_through_io_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let why = explain(&io, "TRACES").unwrap();
        assert!(why.contains("OTEL_EXPORTER_OTLP_CERTIFICATE"), "{why}");
        let nested = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
        ));
        let alert = std::io::Error::other(nested);
        assert!(explain(&alert, "METRICS").unwrap().contains("OTEL_EXPORTER_OTLP_METRICS_"));
        assert!(explain(&std::io::Error::other("refused"), "TRACES").is_none());
        // What the HTTP/2 connection hands on: the alert as text inside an io::Error.
        let h2 = std::io::Error::new(std::io::ErrorKind::InvalidData, "received fatal alert: CertificateRequired");
        assert!(explain(&h2, "TRACES").unwrap().contains("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"));
    }
}
