//! Client-side TLS, shared by the `sluice` CLI (to the coordinators) and the
//! etcd client of every cluster process: whom to trust, and an optional client
//! certificate for servers that require one (mutual TLS).

use std::path::PathBuf;

/// Client-side TLS: whom to trust and who we are.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    /// The CA that signed the server's certificate; the system's roots when `None`.
    pub ca: Option<PathBuf>,
    /// A client certificate and key, for servers that require one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTlsFiles {
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some()
    }

    /// tonic's client TLS configuration (etcd-client's `TlsOptions` is the same type).
    pub fn config(&self) -> Result<tonic::transport::ClientTlsConfig, String> {
        let read = |path: &PathBuf| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
        let mut config = tonic::transport::ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?)),
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(tonic::transport::Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => return Err("a client certificate needs both its certificate and its key file".into()),
        }
        Ok(config)
    }
}
