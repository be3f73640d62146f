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
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("dir", &self.dir).finish()
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &ServerTls) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
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
        })
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
