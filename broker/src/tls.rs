//! The broker's listeners, plain or TLS (see `weft_proto::tls`): the accepted connections of
//! the gRPC listeners as tonic takes them, and of the admin listener as axum takes them, each
//! with its [`ConnInfo`] for identities.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use weft_proto::tls::{Conn, ConnInfo, Reloading, rustls::ServerConfig};

use crate::config::{Config, ListenerTls};

/// ALPN of the gRPC listeners.
pub const GRPC_ALPN: &[&[u8]] = &[b"h2"];
/// ALPN of the admin listener (curl and browsers speak HTTP/1.1 too).
pub const HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The reloading server configuration of one listener, if it has TLS.
pub fn server(
    what: &str,
    tls: Option<&ListenerTls>,
    alpn: &'static [&'static [u8]],
    config: &Config,
) -> anyhow::Result<Option<Arc<Reloading<ServerConfig>>>> {
    let Some(tls) = tls else {
        return Ok(None);
    };
    let reloading = weft_proto::tls::reloading_server(what, tls.files(), tls.client_auth(), alpn)
        .map_err(|e| anyhow::anyhow!(e))?;
    reloading.watch(Duration::from_millis(config.tls.reload_interval_ms));
    Ok(Some(reloading))
}

/// The reloading TLS configuration of this broker's calls to its peers, with `tls.peer`.
pub fn peer_client(
    config: &Config,
) -> anyhow::Result<Option<Arc<Reloading<weft_proto::tls::rustls::ClientConfig>>>> {
    let Some(tls) = &config.tls.peer else {
        return Ok(None);
    };
    let reloading = weft_proto::tls::reloading_client("peer client TLS", tls.files())
        .map_err(|e| anyhow::anyhow!(e))?;
    reloading.watch(Duration::from_millis(config.tls.reload_interval_ms));
    Ok(Some(reloading))
}

/// The connections of a gRPC listener, as tonic's `serve_with_incoming` takes them.
pub fn grpc_incoming(
    listener: TcpListener,
    tls: Option<Arc<Reloading<ServerConfig>>>,
    name: &'static str,
) -> impl futures::Stream<Item = Result<Conn, std::io::Error>> {
    let rx = weft_proto::tls::incoming(listener, tls, name);
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

/// The admin listener as axum's `serve` takes it.
#[derive(Debug)]
pub struct AdminListener {
    rx: mpsc::Receiver<Conn>,
    local: SocketAddr,
}

impl AdminListener {
    /// Over `listener`, through TLS when `tls` is given.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<Reloading<ServerConfig>>>,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(AdminListener {
            rx: weft_proto::tls::incoming(listener, tls, "admin"),
            local,
        })
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = Conn;
    type Addr = ConnInfo;

    async fn accept(&mut self) -> (Conn, ConnInfo) {
        match self.rx.recv().await {
            Some(conn) => {
                let info = conn.info();
                (conn, info)
            }
            // The accept task ended (it only does when this receiver is gone): nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<ConnInfo> {
        Ok(ConnInfo {
            remote: None,
            local: Some(self.local),
            peer_certificates: None,
        })
    }
}

/// What an admin handler knows of its connection (axum's `ConnectInfo`).
#[derive(Debug, Clone)]
pub struct AdminConn(pub ConnInfo);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, AdminListener>>
    for AdminConn
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, AdminListener>) -> Self {
        AdminConn(stream.remote_addr().clone())
    }
}
