//! TLS for listeners, with credentials laid out like QEMU's `tls-creds-x509`
//! directory: `server-cert.pem` and `server-key.pem`, and `ca-cert.pem` when client
//! certificates are required (as QEMU's `verify-peer=on`, its default for servers).
//!
//! A client's identity is the common name (CN) of its verified certificate; plugins
//! see it as the client's `tls-identity`. TLS is for listeners only: qmpgate's link
//! to QEMU is a local socket, and a client socket given as an fd has no host name a
//! certificate could be checked against (QEMU refuses that too).

use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::io::Stream;

/// Errors loading TLS credentials.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant documents itself; the fields are its message.
pub enum TlsError {
    /// A credentials file is missing or unreadable.
    #[error("tls-creds {dir}: cannot read {file}: {reason}")]
    Read {
        dir: String,
        file: &'static str,
        reason: String,
    },
    /// rustls refused the credentials.
    #[error("tls-creds {dir}: {reason}")]
    Invalid { dir: String, reason: String },
}

/// Builds an acceptor from a credentials directory.
pub fn acceptor(dir: &Path) -> Result<TlsAcceptor, TlsError> {
    let shown = dir.display().to_string();
    let read = |file: &'static str| {
        let path = dir.join(file);
        std::fs::read(&path).map_err(|e| TlsError::Read {
            dir: shown.clone(),
            file,
            reason: e.to_string(),
        })
    };
    let invalid = |reason: String| TlsError::Invalid {
        dir: shown.clone(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read("server-cert.pem")?)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(format!("server-cert.pem: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(&read("server-key.pem")?)
        .map_err(|e| invalid(format!("server-key.pem: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?;
    let builder = if dir.join("ca-cert.pem").exists() {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&read("ca-cert.pem")?) {
            roots
                .add(cert.map_err(|e| invalid(format!("ca-cert.pem: {e}")))?)
                .map_err(|e| invalid(format!("ca-cert.pem: {e}")))?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Completes the handshake; returns the TLS stream and the client's certificate CN.
/// A client that has not completed it within `timeout` is dropped.
pub async fn accept(
    acceptor: &TlsAcceptor,
    stream: Stream,
    timeout: std::time::Duration,
) -> std::io::Result<(Stream, Option<String>)> {
    let tls = tokio::time::timeout(timeout, acceptor.accept(stream))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
        })??;
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| common_name(cert.as_ref()));
    Ok((Stream::Tls(Box::new(tls)), identity))
}

/// The subject's common name (CN) of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
