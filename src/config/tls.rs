//! TLS material from PEM files: the sensors' TLS listener (server side) and the upstream
//! connection (client side, optional client certificate for mTLS). Loaded when the configuration
//! is compiled, so `check-config` reports a bad file under its key. Uses the ring provider
//! explicitly: no dependence on the process-wide default being installed.
//!
//! Layer: config: the rustls configurations are part of the validated `Config` (the guard's TLS
//! listener, the forwarder, the fleet agent and `fleet push` use them); it imports nothing from
//! the crate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A secret read from a file (password); never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why TLS material could not be loaded. Each message names the file it concerns (never the
/// content of a key).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not PEM certificates: {source}", .path.display())]
    NotPemCertificates {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no certificate in the file", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no private key in the file", .path.display())]
    NoKey { path: PathBuf },
    #[error("{}: not a PEM private key", .path.display())]
    NotPemKey { path: PathBuf },
    /// A CA certificate the trust store does not take.
    #[error("{}: {source}", .path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("no CA certificates in the system trust store (install ca-certificates or set upstream.ca_file)")]
    NoSystemRoots,
    /// The crypto provider offers none of the default protocol versions.
    #[error("{0}")]
    Versions(rustls::Error),
    #[error("certificate and key do not form a usable pair: {0}")]
    ServerPair(rustls::Error),
    #[error("client certificate and key do not form a usable pair: {0}")]
    ClientPair(rustls::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::NotPemCertificates {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The private key; its content never appears in an error.
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    let path = path.to_path_buf();
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(TlsError::NoKey { path }),
        Err(_) => Err(TlsError::NotPemKey { path }),
    }
}

/// Server configuration for the sensors' TLS listener (no client certificates).
pub fn server_config(cert: &Path, key_file: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certs(cert)?;
    let key = key(key_file)?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Versions)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::ServerPair)?;
    Ok(Arc::new(cfg))
}

/// Client configuration for the upstream: roots from `ca` or the system trust store, and an
/// optional client certificate and key (mTLS).
pub fn client_config(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for c in certs(path)? {
                roots.add(c).map_err(|source| TlsError::BadCa {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(TlsError::NoSystemRoots);
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Versions)?
        .with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key_file)) => builder
            .with_client_auth_cert(certs(cert)?, key(key_file)?)
            .map_err(TlsError::ClientPair)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}
