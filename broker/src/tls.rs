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
/// ALPN of the QUIC listener (HTTP/3).
pub const QUIC_ALPN: &[&[u8]] = &[weft_proto::quic::ALPN];
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

/// The QUIC listener's endpoint on `socket`, with the reloading TLS of `tls.quic` (else
/// `tls.client`): a changed certificate is used for new connections (until `stop`).
pub fn quic_endpoint(
    socket: std::net::UdpSocket,
    config: &Config,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<quinn::Endpoint> {
    let tls = config
        .quic_tls()
        .ok_or_else(|| anyhow::anyhow!("QUIC needs TLS: set [tls.quic] or [tls.client]"))?;
    let reloading = server("QUIC TLS", Some(tls), QUIC_ALPN, config)?
        .ok_or_else(|| anyhow::anyhow!("QUIC needs TLS"))?;
    let current = reloading.current();
    let server_config =
        weft_proto::quic::server_config((*current).clone()).map_err(anyhow::Error::msg)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    // Follow the reloads (a task that ends with the endpoint).
    let weak = endpoint.clone();
    let every = Duration::from_millis(config.tls.reload_interval_ms);
    tokio::spawn(async move {
        let mut in_force = current;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let now = reloading.current();
            if Arc::ptr_eq(&now, &in_force) {
                continue;
            }
            match weft_proto::quic::server_config((*now).clone()) {
                Ok(next) => {
                    weak.set_server_config(Some(next));
                    tracing::info!("the QUIC listener uses the reloaded TLS files");
                }
                Err(e) => tracing::warn!("reloaded TLS files cannot serve QUIC: {e}"),
            }
            in_force = now;
        }
    });
    Ok(endpoint)
}
