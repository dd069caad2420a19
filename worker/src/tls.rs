//! TLS on the coordinator's API, with certificates reloaded when their files
//! change (the client side is `sluice_proto::tls`).
//!
//! tonic's own `ServerTlsConfig` reads its certificate once. To rotate without
//! a restart (cert-manager renews into the same files), Sluice accepts TLS
//! itself with tokio-rustls and hands tonic the established streams; each new
//! connection checks the files' modification times and, when they changed,
//! builds a new rustls configuration. A certificate that does not load (a
//! rotation half-written) leaves the previous one in use, with an error logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// The server-side TLS flags (`sluice-coordinator`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// Serve the API over TLS with this certificate chain (PEM); read again
    /// when it changes, so it can be rotated in place.
    #[arg(long, env = "SLUICE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "SLUICE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require clients to present a certificate signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "SLUICE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The TLS configuration, loaded once now so that a broken file stops the
    /// process at start; `None` without `--tls-cert`.
    pub fn load(&self) -> Result<Option<Arc<ServerTls>>, String> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else { return Ok(None) };
        let files = ServerFiles { cert: cert.clone(), key: key.clone(), client_ca: self.tls_client_ca.clone() };
        let config = files.build()?;
        let stamp = files.stamp();
        Ok(Some(Arc::new(ServerTls { files, current: Mutex::new((stamp, config)) })))
    }
}

#[derive(Debug, Clone)]
struct ServerFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

type Stamp = Vec<Option<SystemTime>>;

impl ServerFiles {
    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.cert, &self.key].into_iter().chain(&self.client_ca)
    }

    /// The files' modification times: a change means reload.
    fn stamp(&self) -> Stamp {
        self.paths().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
    }

    fn build(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certs = read_certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| format!("{}: not a PEM private key: {e}", self.key.display()))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs(ca)? {
                    roots.add(cert).map_err(|e| format!("{}: {e}", ca.display()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            format!("{} and {} do not make a certificate: {e}", self.cert.display(), self.key.display())
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// A server's TLS configuration, rebuilt when its files change.
pub struct ServerTls {
    files: ServerFiles,
    current: Mutex<(Stamp, Arc<rustls::ServerConfig>)>,
}

impl ServerTls {
    /// The configuration for a new connection: the files' as they are now, or
    /// the last one that loaded when they do not.
    fn config(&self) -> Arc<rustls::ServerConfig> {
        let stamp = self.files.stamp();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.0 != stamp {
            match self.files.build() {
                Ok(config) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                    current.1 = config;
                }
                Err(e) => tracing::error!(%e, "cannot reload the TLS certificate; keeping the previous one"),
            }
            // Not retried until the files change again.
            current.0 = stamp;
        }
        current.1.clone()
    }
}

/// Serves `router` on `listener` until `shutdown`, over TLS when `tls` is set.
pub fn serve(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let stop = async move { shutdown.cancelled().await };
    match tls {
        None => tokio::spawn(router.serve_with_incoming_shutdown(crate::cluster_cli::incoming(listener), stop)),
        Some(tls) => tokio::spawn(router.serve_with_incoming_shutdown(tls_incoming(listener, tls), stop)),
    }
}

/// The TLS connections a listener accepts. Handshakes run concurrently (a slow
/// or silent client holds up no one) and fail alone, logged at debug level.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
) -> impl futures::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while !sender.is_closed() {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(%e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, sender) = (TlsAcceptor::from(tls.config()), sender.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::unfold(receiver, |mut receiver| async move { receiver.recv().await.map(|item| (item, receiver)) })
}
