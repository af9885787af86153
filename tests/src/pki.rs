//! A private CA for the TLS tests: a server certificate for localhost/127.0.0.1 and a client
//! certificate, written as PEM files for sonde and as rustls configurations for the receivers.

use std::{path::PathBuf, sync::Arc};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
};

use crate::TempDir;

pub struct TestPki {
    pub dir: TempDir,
    ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
}

impl TestPki {
    pub fn new() -> Self {
        let dir = TempDir::new("pki");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "sonde test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key")).expect("ca cert");

        let leaf = |names: Vec<String>, cn: &str| {
            let mut params = CertificateParams::new(names).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, cn);
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &ca).expect("leaf cert");
            (cert, key)
        };
        let (server, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], "localhost");
        let (client, client_key) = leaf(vec!["sonde-client".into()], "sonde-client");

        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write pem");
        write("ca.pem", &ca.pem());
        write("server.pem", &server.pem());
        write("server.key", &server_key.serialize_pem());
        write("client.pem", &client.pem());
        write("client.key", &client_key.serialize_pem());
        Self {
            ca_der: ca.der().clone(),
            server_chain: vec![server.der().clone()],
            server_key: server_key.serialize_der(),
            dir,
        }
    }

    pub fn path(&self, name: &str) -> String {
        let p: PathBuf = self.dir.path().join(name);
        p.to_string_lossy().into_owned()
    }

    /// The receiver's TLS: the localhost certificate; with `require_client_cert`, mTLS with
    /// client certificates signed by this CA. `alpn` is what the receiver offers (h2 for gRPC).
    pub fn server_config(&self, require_client_cert: bool, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = if require_client_cert {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca_der.clone()).expect("ca root");
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().expect("verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let mut config = builder.with_single_cert(self.server_chain.clone(), key).expect("server cert");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
