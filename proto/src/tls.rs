//! TLS for every Weft listener and caller (rustls with ring), with certificates reloaded when
//! their files change.
//!
//! - [`TlsFiles`]: the PEM files of one side (certificate chain, private key, CA bundle).
//! - [`server_config`] / [`client_config`]: rustls configurations built from them (HTTP/2 by
//!   ALPN; mutual TLS when a server has a client CA and a caller has a certificate).
//! - [`Reloading`]: a configuration rebuilt whenever one of its files changes (Kubernetes
//!   rewrites a mounted Secret in place, cert-manager renews it): new connections take the new
//!   one, open connections keep theirs; a file that does not parse keeps the old configuration
//!   and says why.
//! - [`incoming`]: the connections a listener accepts, plain or TLS (handshakes run beside the
//!   accept loop, bounded in number and time), each with its [`ConnInfo`] (addresses and the
//!   client's certificate chain) for identities.
//! - [`TlsConnector`]: the connector of a TLS caller (a client, a broker calling its peers).

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
pub use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The PEM files of one side of TLS connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (a server's certificate; a caller's client certificate).
    pub cert_file: Option<PathBuf>,
    /// Private key of the certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// CA bundle: on a server, the CAs that sign client certificates (mutual TLS); on a caller,
    /// the CAs that sign servers' certificates.
    pub ca_file: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<PathBuf> {
        [&self.cert_file, &self.key_file, &self.ca_file]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// Whether a TLS server asks callers for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Never (server-only TLS).
    None,
    /// Asked for and checked when given; a caller without one is let in (it may identify by a
    /// bearer token instead).
    Optional,
    /// Required: the handshake fails without a certificate signed by the CA (mutual TLS).
    Required,
}

/// The crypto provider every configuration uses.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the {what} {} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "the {what} {} holds no certificate",
            path.display()
        ));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("the private key {} is not a PEM key: {e}", path.display()))
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, "CA bundle")? {
        roots
            .add(cert)
            .map_err(|e| format!("a CA of {} is not usable: {e}", path.display()))?;
    }
    Ok(roots)
}

/// A server configuration: `cert_file` and `key_file` are required; `ca_file` (with `auth`
/// other than [`ClientAuth::None`]) checks client certificates. `alpn`: the protocols offered
/// (`h2` for gRPC; `h2` and `http/1.1` for HTTP APIs).
pub fn server_config(
    files: &TlsFiles,
    auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<ServerConfig, String> {
    let (Some(cert), Some(key)) = (&files.cert_file, &files.key_file) else {
        return Err("a TLS listener needs cert_file and key_file".into());
    };
    let chain = certificates(cert, "certificate")?;
    let key = private_key(key)?;
    let verifier = match (auth, &files.ca_file) {
        (ClientAuth::None, _) => WebPkiClientVerifier::no_client_auth(),
        (_, None) => {
            return Err("checking client certificates needs a client CA file".into());
        }
        (auth, Some(ca)) => {
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider());
            let builder = if auth == ClientAuth::Optional {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            builder
                .build()
                .map_err(|e| format!("client CA {}: {e}", ca.display()))?
        }
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate {} and its key: {e}", cert.display()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A caller's configuration: servers are checked against `ca_file` (else the system's CAs);
/// `cert_file` and `key_file`, when set, are presented as a client certificate.
pub fn client_config(files: &TlsFiles) -> Result<ClientConfig, String> {
    let roots = match &files.ca_file {
        Some(ca) => roots(ca)?,
        None => {
            let mut roots = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(
                    "no CA file given and no system CA found to check the server's certificate"
                        .into(),
                );
            }
            roots
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(certificates(cert, "certificate")?, private_key(key)?)
            .map_err(|e| format!("client certificate {} and its key: {e}", cert.display()))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("a client certificate needs both cert_file and key_file".into()),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A value built from files and rebuilt when they change.
pub struct Reloading<T> {
    what: String,
    paths: Vec<PathBuf>,
    build: Box<dyn Fn() -> Result<T, String> + Send + Sync>,
    state: RwLock<(u64, Arc<T>)>,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// A fingerprint of the files' contents (a missing file counts as a change when it comes back).
fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for path in paths {
        std::fs::read(path).ok().hash(&mut hasher);
    }
    hasher.finish()
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Builds the value once (an error here is a configuration error) and remembers the files'
    /// contents. `what` names it in log lines.
    pub fn new(
        what: impl Into<String>,
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, String> {
        let what = what.into();
        let seen = fingerprint(&paths);
        let value = build().map_err(|e| format!("{what}: {e}"))?;
        Ok(Arc::new(Reloading {
            what,
            paths,
            build: Box::new(build),
            state: RwLock::new((seen, Arc::new(value))),
        }))
    }

    /// The value in force.
    pub fn current(&self) -> Arc<T> {
        match self.state.read() {
            Ok(state) => state.1.clone(),
            Err(poisoned) => poisoned.into_inner().1.clone(),
        }
    }

    /// Rebuilds the value if a file changed since the last look: Ok(true) when a new value is
    /// in force; Err when the new files do not build (the old value stays).
    pub fn check(&self) -> Result<bool, String> {
        let seen = fingerprint(&self.paths);
        let last = self.state.read().map_or(0, |s| s.0);
        if seen == last {
            return Ok(false);
        }
        let built = (self.build)();
        let mut state = self
            .state
            .write()
            .map_err(|_| format!("{}: lock poisoned", self.what))?;
        // Either way this content has been looked at: a broken file is reported once, not on
        // every look, and its next change is tried again.
        state.0 = seen;
        let value = built.map_err(|e| format!("{}: {e}", self.what))?;
        state.1 = Arc::new(value);
        Ok(true)
    }

    /// Looks at the files every `every` (a task that ends when the value is dropped).
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else {
                    return;
                };
                let paths = this.paths.clone();
                let result = tokio::task::spawn_blocking(move || this.check()).await;
                match result {
                    Ok(Ok(true)) => tracing::info!(files = ?paths, "reloaded TLS files"),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "TLS files changed but cannot be used; the previous ones stay in force");
                    }
                    Err(e) => tracing::warn!(error = %e, "TLS reload task failed"),
                }
            }
        });
    }
}

/// The files behind a server configuration, reloading.
pub fn reloading_server(
    what: &str,
    files: TlsFiles,
    auth: ClientAuth,
    alpn: &'static [&'static [u8]],
) -> Result<Arc<Reloading<ServerConfig>>, String> {
    let paths = files.paths();
    Reloading::new(what, paths, move || server_config(&files, auth, alpn))
}

/// The files behind a caller's configuration, reloading.
pub fn reloading_client(
    what: &str,
    files: TlsFiles,
) -> Result<Arc<Reloading<ClientConfig>>, String> {
    let paths = files.paths();
    Reloading::new(what, paths, move || client_config(&files))
}

/// What a server knows of one connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The caller's address.
    pub remote: Option<SocketAddr>,
    /// This end's address.
    pub local: Option<SocketAddr>,
    /// The certificate chain the caller presented (TLS with client certificates), leaf first.
    pub peer_certificates: Option<Arc<[CertificateDer<'static>]>>,
}

/// One accepted connection: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Conn {
    /// Plain TCP (h2c).
    Plain(TcpStream),
    /// TLS.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    /// Its addresses and the caller's certificates.
    pub fn info(&self) -> ConnInfo {
        match self {
            Conn::Plain(tcp) => ConnInfo {
                remote: tcp.peer_addr().ok(),
                local: tcp.local_addr().ok(),
                peer_certificates: None,
            },
            Conn::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                ConnInfo {
                    remote: tcp.peer_addr().ok(),
                    local: tcp.local_addr().ok(),
                    peer_certificates: session
                        .peer_certificates()
                        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect()),
                }
            }
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Most TLS handshakes in progress on one listener; more wait to be accepted.
pub const HANDSHAKES_MAX: usize = 256;
/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connections `listener` accepts (TCP_NODELAY set), through TLS when `tls` is given. A
/// failed handshake drops its connection (logged at debug: scanners and health checkers of
/// the wrong protocol are common). Accepting stops when the receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Reloading<ServerConfig>>>,
    name: &'static str,
) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &tls else {
                if tx.send(Conn::Plain(tcp)).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                let remote = tcp.peer_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        drop(permit);
                        let _ = tx.send(Conn::Tls(Box::new(stream))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(listener = name, ?remote, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::debug!(listener = name, ?remote, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    rx
}

/// A TLS caller's connector for tonic's `Endpoint::connect_with_connector`: TCP (no delay, an
/// optional local address) then a TLS handshake with the configuration in force, the server
/// named by the URI's host.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    http: HttpConnector,
    tls: Arc<Reloading<ClientConfig>>,
}

impl TlsConnector {
    /// Over `tls`; `local`: the address calls leave from.
    pub fn new(
        tls: Arc<Reloading<ClientConfig>>,
        local: Option<std::net::IpAddr>,
        connect_timeout: Duration,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_local_address(local);
        http.set_connect_timeout(Some(connect_timeout));
        TlsConnector { http, tls }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower::Service::poll_ready(&mut self.http, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let config = self.tls.current();
        let tcp = tower::Service::call(&mut self.http, uri);
        Box::pin(async move {
            let name = ServerName::try_from(host.clone())
                .map_err(|e| format!("cannot name the server {host:?} for TLS: {e}"))?;
            let tcp = tcp.await?.into_inner();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {host}: {e}"))?;
            Ok(TokioIo::new(tls))
        })
    }
}
