//! TLS for NBD with QEMU's x509 credentials: the files a `tls-creds-x509`
//! object's `dir` holds — `ca-cert.pem`, and `server-cert.pem` with
//! `server-key.pem` for a server. rustls with the *ring* provider does the
//! work (no C library to find at build time, no OpenSSL configuration to
//! inherit).

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// A server's TLS settings, made from a credentials directory. Two are
/// equal when they are the same loaded object.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    /// What it was made from, for messages.
    dir: String,
    /// The one client certificate subject let in (QEMU's `authz-simple`
    /// `identity`), when there is such a rule.
    identity: Option<String>,
    /// Whether clients must show a certificate.
    verify_peer: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("dir", &self.dir).finish()
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &ServerTls) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.identity == other.identity
    }
}

impl Eq for ServerTls {}

fn bad(dir: &Path, what: String) -> Error {
    Error::Tls(format!("{}: {what}", dir.display()))
}

fn certificates(dir: &Path, file: &str) -> Result<Vec<CertificateDer<'static>>> {
    let path = dir.join(file);
    let certs = CertificateDer::pem_file_iter(&path)
        .map_err(|e| bad(dir, format!("cannot read {file}: {e}")))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(dir, format!("{file} is not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad(dir, format!("{file} holds no certificate")));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTls {
    /// Loads `dir/server-cert.pem` (with any intermediate certificates
    /// after it), `dir/server-key.pem` and `dir/ca-cert.pem`. With
    /// `verify_peer` (QEMU's default), clients must present a certificate
    /// the CA signed; without, they need none.
    pub fn load(dir: &Path, verify_peer: bool) -> Result<ServerTls> {
        let chain = certificates(dir, "server-cert.pem")?;
        let key = PrivateKeyDer::from_pem_file(dir.join("server-key.pem")).map_err(|e| {
            bad(
                dir,
                format!("cannot read a private key in server-key.pem: {e}"),
            )
        })?;
        let mut roots = RootCertStore::empty();
        for ca in certificates(dir, "ca-cert.pem")? {
            roots
                .add(ca)
                .map_err(|e| bad(dir, format!("ca-cert.pem: {e}")))?;
        }
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(dir, e.to_string()))?;
        let builder = if verify_peer {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| bad(dir, format!("ca-cert.pem: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| bad(dir, format!("server-cert.pem and server-key.pem: {e}")))?;
        Ok(ServerTls {
            config: Arc::new(config),
            dir: dir.display().to_string(),
            identity: None,
            verify_peer,
        })
    }

    /// Whether clients must show a certificate the CA signed.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }

    /// These credentials, letting in only clients whose certificate's
    /// subject is `identity` (see [`subject_dn`]).
    pub fn with_identity(&self, identity: &str) -> ServerTls {
        ServerTls {
            identity: Some(identity.to_owned()),
            ..self.clone()
        }
    }

    /// Checks a client's certificate chain against the identity rule:
    /// QEMU's words when it is denied.
    pub(crate) fn authorize(&self, peer: Option<&[CertificateDer<'_>]>) -> Result<()> {
        let Some(identity) = &self.identity else {
            return Ok(());
        };
        let dn = peer
            .and_then(|chain| chain.first())
            .and_then(|cert| subject_dn(cert));
        match dn {
            Some(dn) if dn == *identity => Ok(()),
            Some(dn) => Err(Error::Tls(format!(
                "TLS x509 authz check for {dn} is denied"
            ))),
            None => Err(Error::Tls(
                "TLS x509 authz check is denied: the client showed no certificate".into(),
            )),
        }
    }

    /// The acceptor for one connection's upgrade.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

/// A client's TLS settings, made from a credentials directory. Two are
/// equal when they are the same loaded object.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    dir: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("dir", &self.dir).finish()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &ClientTls) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
    }
}

impl Eq for ClientTls {}

impl ClientTls {
    /// Loads `dir/ca-cert.pem` (the CA that must have signed the server's
    /// certificate) and, when both are there, `dir/client-cert.pem` and
    /// `dir/client-key.pem` to show servers that verify their peers.
    pub fn load(dir: &Path) -> Result<ClientTls> {
        let mut roots = RootCertStore::empty();
        for ca in certificates(dir, "ca-cert.pem")? {
            roots
                .add(ca)
                .map_err(|e| bad(dir, format!("ca-cert.pem: {e}")))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(dir, e.to_string()))?
            .with_root_certificates(roots);
        let config = if dir.join("client-cert.pem").exists() {
            let chain = certificates(dir, "client-cert.pem")?;
            let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).map_err(|e| {
                bad(
                    dir,
                    format!("cannot read a private key in client-key.pem: {e}"),
                )
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad(dir, format!("client-cert.pem and client-key.pem: {e}")))?
        } else {
            builder.with_no_client_auth()
        };
        Ok(ClientTls {
            config: Arc::new(config),
            dir: dir.display().to_string(),
        })
    }

    /// The connector for one connection's upgrade.
    pub(crate) fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }
}

/// A DER element: its tag and contents, and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The short name of an attribute type, as GnuTLS prints it; the dotted
/// OID for others.
fn attribute_name(oid: &[u8]) -> String {
    const NAMES: &[(&[u8], &str)] = &[
        (&[0x55, 0x04, 0x03], "CN"),
        (&[0x55, 0x04, 0x06], "C"),
        (&[0x55, 0x04, 0x07], "L"),
        (&[0x55, 0x04, 0x08], "ST"),
        (&[0x55, 0x04, 0x0a], "O"),
        (&[0x55, 0x04, 0x0b], "OU"),
        (&[0x55, 0x04, 0x09], "street"),
        (&[0x55, 0x04, 0x05], "serialNumber"),
        (&[0x55, 0x04, 0x0c], "title"),
        (
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
            "EMAIL",
        ),
        (
            &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19],
            "DC",
        ),
        (
            &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01],
            "UID",
        ),
    ];
    if let Some((_, name)) = NAMES.iter().find(|(o, _)| *o == oid) {
        return (*name).to_owned();
    }
    // Dotted form: the first byte holds two arcs.
    let mut arcs = Vec::new();
    let mut value = 0u64;
    for &b in oid {
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        }
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// An attribute value escaped as RFC 4514 asks.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The subject of a DER certificate as a distinguished-name string, the
/// way QEMU 10 (through GnuTLS) writes it for `authz-simple`: the RDNs in
/// the certificate's order (`C=GB,O=Example Org\, Ltd,CN=laptop`, checked
/// against `qemu-nbd --tls-authz`), `TYPE=value` joined by commas, values
/// escaped as RFC 4514 says. `None` when the certificate cannot be read.
pub fn subject_dn(cert: &[u8]) -> Option<String> {
    let (_, certificate, _) = der(cert)?;
    let (_, tbs, _) = der(certificate)?;
    let mut fields = tbs;
    let mut taken = Vec::new();
    while !fields.is_empty() && taken.len() < 6 {
        let (tag, body, rest) = der(fields)?;
        taken.push((tag, body));
        fields = rest;
    }
    // [0] version (optional), serial, signature, issuer, validity, subject.
    let skip = usize::from(taken.first()?.0 == 0xa0);
    let (tag, subject) = *taken.get(skip + 4)?;
    if tag != 0x30 {
        return None;
    }
    let mut rdns = Vec::new();
    let mut rest = subject;
    while !rest.is_empty() {
        let (_, set, next) = der(rest)?;
        rest = next;
        let mut parts = Vec::new();
        let mut attrs = set;
        while !attrs.is_empty() {
            let (_, attr, next) = der(attrs)?;
            attrs = next;
            let (_, oid, after) = der(attr)?;
            let (_, value, _) = der(after)?;
            let value = String::from_utf8_lossy(value);
            parts.push(format!("{}={}", attribute_name(oid), escape(&value)));
        }
        rdns.push(parts.join("+"));
    }
    Some(rdns.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_follows_rfc4514() {
        assert_eq!(escape("Example Org, Ltd"), r"Example Org\, Ltd");
        assert_eq!(escape("#tag"), r"\#tag");
        assert_eq!(escape(" lead"), r"\ lead");
        assert_eq!(escape("a+b;c<d>\"e\\"), r#"a\+b\;c\<d\>\"e\\"#);
        assert_eq!(attribute_name(&[0x55, 0x04, 0x03]), "CN");
        assert_eq!(attribute_name(&[0x2b, 0x06, 0x01]), "1.3.6.1");
    }

    #[test]
    fn garbage_is_no_certificate() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = subject_dn(&bytes);
            // Valid-looking nesting with lengths past the end.
            let mut nested = vec![0x30, 0x84, 0xff, 0xff, 0xff, 0xff];
            nested.extend_from_slice(&bytes);
            assert_eq!(subject_dn(&nested), None);
        }
    }
}
