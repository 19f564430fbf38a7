//! TLS for listeners, with credentials laid out like QEMU's `tls-creds-x509`
//! directory: `server-cert.pem` and `server-key.pem`, and `ca-cert.pem` when client
//! certificates are required (as QEMU's `verify-peer=on`, its default for servers).
//!
//! A client's identity is what its verified certificate names: every common name,
//! every subject alternative name and the whole subject ([`CertIdentity`]);
//! plugins see it as the client's `tls` record. Every string type a certificate
//! may use is decoded (UTF8String, PrintableString, IA5String, BMPString, ...); a
//! certificate whose names cannot be read fully is refused at the handshake, so
//! that a rule scoped by identity never meets a client it cannot read. TLS is
//! for listeners only: qmpgate's link
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

/// The names in a client's verified certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// Every common name (CN) of the subject, in the certificate's order.
    pub common_names: Vec<String>,
    /// Every subject alternative name with its kind: `DNS:host` (lower case, no
    /// final dot), `email:a@b` (domain in lower case),
    /// `URI:spiffe://x`, `IP:192.0.2.1`, `DirName:CN=x`, `RID:1.2.3`,
    /// `othername:1.2.3`.
    pub subject_alt_names: Vec<String>,
    /// The subject, RFC 4514 style (`CN=admin,O=Example`).
    pub subject: String,
}

/// Completes the handshake; returns the TLS stream and the names in the client's
/// certificate (none when the listener does not ask for one). A client that has
/// not completed it within `timeout` is dropped; so is one whose certificate's
/// names cannot be read.
pub async fn accept(
    acceptor: &TlsAcceptor,
    stream: Stream,
    timeout: std::time::Duration,
) -> std::io::Result<(Stream, Option<CertIdentity>)> {
    let tls = tokio::time::timeout(timeout, acceptor.accept(stream))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
        })??;
    let identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => Some(cert_identity(cert.as_ref()).map_err(|reason| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("client certificate refused: {reason}"),
            )
        })?),
        None => None,
    };
    Ok((Stream::Tls(Box::new(tls)), identity))
}

/// The names in a DER certificate, or why they cannot all be read.
pub fn cert_identity(der: &[u8]) -> Result<CertIdentity, String> {
    use x509_parser::extensions::GeneralName;

    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("cannot parse it: {e}"))?;
    let subject = cert.subject();
    let common_names = subject
        .iter_common_name()
        .map(|attr| decode(attr.attr_value()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut subject_alt_names = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subject alternative names: {e}"))?;
    for name in san.iter().flat_map(|san| &san.value.general_names) {
        subject_alt_names.push(match name {
            // Host names and mail domains compare without case or a final dot:
            // written one way only, so a rule matches however the CA spelled them.
            GeneralName::DNSName(s) => format!("DNS:{}", s.trim_end_matches('.').to_lowercase()),
            GeneralName::RFC822Name(s) => format!("email:{}", lowercase_domain(s)),
            GeneralName::URI(s) => format!("URI:{s}"),
            GeneralName::IPAddress(bytes) => format!("IP:{}", ip_text(bytes)?),
            GeneralName::DirectoryName(name) => format!("DirName:{}", rfc4514(name)?),
            GeneralName::RegisteredID(oid) => format!("RID:{oid}"),
            GeneralName::OtherName(oid, _) => format!("othername:{oid}"),
            other => return Err(format!("unsupported subject alternative name {other:?}")),
        });
    }
    Ok(CertIdentity {
        common_names,
        subject_alt_names,
        subject: rfc4514(subject)?,
    })
}

/// An X.509 name as RFC 4514 writes it: last RDN first, `,` between RDNs and `+`
/// within one, attribute types by their short name (else their OID), values
/// escaped.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> Result<String, String> {
    let registry = x509_parser::objects::oid_registry();
    let mut rdns = Vec::new();
    for rdn in name.iter() {
        let mut parts = Vec::new();
        for attr in rdn.iter() {
            let oid = attr.attr_type();
            let key = x509_parser::objects::oid2abbrev(oid, registry)
                .map(str::to_string)
                .unwrap_or_else(|_| oid.to_id_string());
            parts.push(format!(
                "{key}={}",
                escape_dn_value(&decode(attr.attr_value())?)
            ));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Ok(rdns.join(","))
}

/// RFC 4514 section 2.4's escapes.
fn escape_dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        if c == '\0' {
            out.push_str("\\00");
        } else {
            out.push(c);
        }
    }
    out
}

/// A directory string in any of the types X.509 uses, as text.
fn decode(value: &x509_parser::der_parser::asn1_rs::Any<'_>) -> Result<String, String> {
    use x509_parser::der_parser::asn1_rs::Tag;

    let data = value.data;
    let text = match value.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::VisibleString
        | Tag::NumericString => std::str::from_utf8(data).map(str::to_string).ok(),
        // Latin-1 in practice (T.61's full repertoire is not used in certificates).
        Tag::TeletexString => Some(data.iter().map(|&b| char::from(b)).collect()),
        Tag::BmpString if data.len().is_multiple_of(2) => char::decode_utf16(
            data.chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]])),
        )
        .collect::<Result<String, _>>()
        .ok(),
        Tag::UniversalString if data.len().is_multiple_of(4) => data
            .chunks_exact(4)
            .map(|quad| char::from_u32(u32::from_be_bytes([quad[0], quad[1], quad[2], quad[3]])))
            .collect::<Option<String>>(),
        _ => None,
    };
    text.ok_or_else(|| format!("a name of type {} that cannot be decoded", value.tag()))
}

/// An iPAddress SAN as text (4 bytes IPv4, 16 bytes IPv6; an IPv4-mapped IPv6
/// address as the IPv4 address it is).
fn ip_text(bytes: &[u8]) -> Result<String, String> {
    match bytes.len() {
        4 => Ok(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).expect("4 bytes")).to_string()),
        16 => {
            let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).expect("16 bytes"));
            Ok(match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => v6.to_string(),
            })
        }
        n => Err(format!("an IP address of {n} bytes")),
    }
}

/// A mail address with its domain (after the last `@`) in lower case; the local
/// part is the mail server's to interpret, so it is kept as written.
fn lowercase_domain(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.trim_end_matches('.').to_lowercase()),
        None => address.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dn_values_are_escaped_as_rfc_4514_says() {
        assert_eq!(escape_dn_value("admin"), "admin");
        assert_eq!(
            escape_dn_value("a,b+c\"d\\e<f>g;h"),
            "a\\,b\\+c\\\"d\\\\e\\<f\\>g\\;h"
        );
        assert_eq!(escape_dn_value("#x "), "\\#x\\ ");
        assert_eq!(escape_dn_value(" y"), "\\ y");
        assert_eq!(escape_dn_value("n\0"), "n\\00");
    }

    #[test]
    fn ip_sans_are_written_as_addresses() {
        assert_eq!(ip_text(&[192, 0, 2, 1]).unwrap(), "192.0.2.1");
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert_eq!(ip_text(&v6).unwrap(), "::1");
        assert!(ip_text(&[1, 2, 3]).is_err());
        let mapped = "::ffff:10.0.0.5".parse::<std::net::Ipv6Addr>().unwrap();
        assert_eq!(ip_text(&mapped.octets()).unwrap(), "10.0.0.5");
        assert_eq!(lowercase_domain("Ops@Example.COM."), "Ops@example.com");
    }
}
