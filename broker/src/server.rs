//! Starting and stopping a broker: `run(config, listeners, shutdown)`. Tests bind port 0 and pass
//! the listeners in; `main.rs` binds the configured addresses and passes a signal future.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use weft_proto::v1::cluster_server::ClusterServer;
use weft_proto::v1::metadata_server::MetadataServer;
use weft_proto::v1::publisher_server::PublisherServer;
use weft_proto::v1::subscriber_server::SubscriberServer;
use weft_proto::v1::topic_admin_server::TopicAdminServer;

use crate::config::Config;
use crate::grpc::cluster::ClusterService;
use crate::grpc::metadata::MetadataService;
use crate::grpc::publish::PublisherService;
use crate::grpc::subscribe::SubscriberService;
use crate::grpc::topic_admin::TopicAdminService;
use crate::node::Node;

/// Calls a peer may cancel on one connection before the server has taken them up (see the
/// peer server below).
const PEER_PENDING_RESETS_MAX: usize = 4096;

/// The three TCP listeners of a broker.
#[derive(Debug)]
pub struct Listeners {
    /// Client gRPC.
    pub client: TcpListener,
    /// Peer gRPC.
    pub peer: TcpListener,
    /// Admin HTTP.
    pub admin: TcpListener,
    /// QUIC (HTTP/3), when `quic_listen` is set.
    pub quic: Option<std::net::UdpSocket>,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let bind = |addr: SocketAddr, key: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {key} {addr}: {e}"))
        };
        Ok(Listeners {
            client: bind(config.client_listen, "client_listen").await?,
            peer: bind(config.peer_listen, "peer_listen").await?,
            admin: bind(config.admin_listen, "admin_listen").await?,
            quic: match config.quic_listen {
                Some(addr) => Some(
                    std::net::UdpSocket::bind(addr)
                        .map_err(|e| anyhow::anyhow!("cannot listen on quic_listen {addr}: {e}"))?,
                ),
                None => None,
            },
        })
    }

    /// The QUIC listener's bound address, if there is one.
    pub fn quic_address(&self) -> std::io::Result<Option<SocketAddr>> {
        self.quic.as_ref().map(|s| s.local_addr()).transpose()
    }

    /// The bound addresses (client, peer, admin).
    pub fn addresses(&self) -> std::io::Result<(SocketAddr, SocketAddr, SocketAddr)> {
        Ok((
            self.client.local_addr()?,
            self.peer.local_addr()?,
            self.admin.local_addr()?,
        ))
    }
}

/// Why a broker of this build may not run a cluster that has used feature level `in_use`, if
/// it may not: it would apply the controller log differently.
fn above_this_build(in_use: u32) -> Option<String> {
    (in_use > crate::raft::feature_level()).then(|| {
        format!(
            "this cluster has used feature level {in_use}, above this build's level {} (deny \
             rules, offset resets, its cluster id, removals checked when applied): it would apply the controller log differently; run a \
             newer build",
            crate::raft::feature_level()
        )
    })
}

/// Runs a broker until `shutdown` resolves, then stops accepting, lets in-flight calls finish
/// (up to `shutdown_grace_ms`), stops every Raft group and returns.
pub async fn run(
    mut config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (client, peer, admin) = listeners.addresses()?;
    // With port 0 the real addresses are only known now.
    config.client_listen = client;
    config.peer_listen = peer;
    config.admin_listen = admin;
    if let Some(quic) = listeners.quic_address()? {
        config.quic_listen = Some(quic);
    }
    crate::metrics::install();
    // A SIGTERM while the node starts (a seed waiting for its peers, a damaged controller log
    // waiting for a broker to repair it from) stops it there: what it opened is crash-safe.
    let mut shutdown = Box::pin(shutdown);
    let node = tokio::select! {
        node = Node::start(config.clone()) => node?,
        () = &mut shutdown => {
            tracing::info!("asked to stop while starting; stopped");
            return Ok(());
        }
    };
    // A downgrade is refused before any listener takes a call: the controller state this broker
    // has applied so far (a single node has applied its whole log by now) shows a feature level
    // above this build's. (A clustered broker still catching up stops as soon as its state
    // shows it, below.)
    let in_use = node.controller_watch().borrow().features_in_use;
    if let Some(why) = above_this_build(in_use) {
        tracing::error!("{why}; stopping");
        node.shutdown().await;
        anyhow::bail!(why);
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    // Once stopping, an HTTP/2 gRPC connection that moves no byte for a quarter of the grace
    // (at most 2 s) while no call on it is being answered is cut: a client that stopped
    // reading cannot hold the stop for the whole grace.
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let stopping = crate::tls::Stopping {
        token: tokio_util::sync::CancellationToken::new(),
        stall: (grace / 4).clamp(Duration::from_millis(250), Duration::from_secs(2)),
    };
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<PublisherServer<PublisherService>>()
        .await;
    health
        .set_serving::<SubscriberServer<SubscriberService>>()
        .await;
    health
        .set_serving::<TopicAdminServer<TopicAdminService>>()
        .await;
    health.set_serving::<ClusterServer<ClusterService>>().await;
    health
        .set_serving::<MetadataServer<MetadataService>>()
        .await;
    // Reflection v1 and the older v1alpha, which many generic clients still speak.
    // Only what this port serves: the broker-to-broker services live on the peer port.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(weft_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("weft.v1.Publisher")
            .with_service_name("weft.v1.Subscriber")
            .with_service_name("weft.v1.TopicAdmin")
            .with_service_name("weft.v1.Cluster")
            .with_service_name("weft.v1.Metadata")
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    let (client_auth, peer_auth, admin_auth) =
        crate::auth::Authenticator::from_config(&config.auth)?;
    let client_tls = crate::tls::server(
        "client TLS",
        config.tls.client.as_ref(),
        crate::tls::GRPC_ALPN,
        &config,
    )?;
    let peer_tls = crate::tls::server(
        "peer TLS",
        config.tls.peer.as_ref(),
        crate::tls::GRPC_ALPN,
        &config,
    )?;
    let admin_tls = crate::tls::server(
        "admin TLS",
        config.tls.admin.as_ref(),
        crate::tls::HTTP_ALPN,
        &config,
    )?;
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let limit = config.grpc_message_bytes_max as usize;
    // The client services, served over HTTP/2 and, when configured, over QUIC (HTTP/3), with
    // the same layers: identities, the caller's trace context, size errors.
    let client_routes = tonic::service::Routes::new(health_service.clone())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            PublisherServer::new(PublisherService::new(node.clone()))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .add_service(
            SubscriberServer::new(SubscriberService::new(node.clone()))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .add_service(TopicAdminServer::new(TopicAdminService::new(node.clone())))
        .add_service(ClusterServer::new(ClusterService::new(node.clone())))
        .add_service(MetadataServer::new(MetadataService::new(node.clone())))
        .prepare();
    let quic_auth = client_auth.for_quic();
    let connections_max = config.connections_max;
    let client_layers = move |auth| {
        tower::ServiceBuilder::new()
            .layer(crate::tls::CountCalls)
            .layer(crate::tls::OnlyProbes { connections_max })
            .layer(crate::auth::AuthLayer::new(auth))
            .layer(crate::grpc::caller::CallerLayer)
            .layer(tower::util::MapResponseLayer::new(
                crate::grpc::oversized_requests_are_resource_exhausted
                    as fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body>,
            ))
    };
    // The client connections, over HTTP/2 and QUIC together, are bounded.
    let idle =
        (config.connections_idle_ms > 0).then(|| Duration::from_millis(config.connections_idle_ms));
    let slots = crate::tls::ConnectionSlots::new(config.connections_max, idle);
    let quic_task = match listeners.quic {
        Some(socket) => {
            let endpoint = crate::tls::quic_endpoint(socket, &config, stop_rx.clone())?;
            let service = client_layers(quic_auth).service(client_routes.clone());
            let slots = slots.clone();
            Some(tokio::spawn(weft_proto::quic::serve(
                endpoint,
                service,
                move || slots.take("quic"),
                idle,
                stopped(stop_rx.clone()),
            )))
        }
        None => None,
    };
    let client_server = tonic::transport::Server::builder()
        .layer(client_layers(client_auth))
        .max_concurrent_streams(config.streams_per_connection_max)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_routes(client_routes)
        // Every accepted connection has TCP_NODELAY: without it Nagle holds small responses
        // (acks) behind the delayed ACK of the peer, ~40 ms per round trip under pipelining.
        .serve_with_incoming_shutdown(
            crate::tls::grpc_incoming(
                listeners.client,
                client_tls,
                "client",
                stopping.clone(),
                Some(slots.clone()),
            ),
            stopped(stop_rx.clone()),
        );
    // The peer port: Raft for every group of this node, and health.
    let peer_server = tonic::transport::Server::builder()
        // One connection per peer carries every group's calls: when a cut heals, the peer
        // cancels many at once, and h2's default (20 cancelled before the server took them up)
        // would close the connection with every call on it. The peer port is for the cluster's
        // brokers (mutual TLS in a deployment), so its guard against a flood of resets can be
        // looser, and stays bounded.
        .http2_max_pending_accept_reset_streams(Some(PEER_PENDING_RESETS_MAX))
        .layer(
            tower::ServiceBuilder::new()
                .layer(crate::tls::CountCalls)
                .layer(crate::auth::AuthLayer::new(peer_auth))
                .layer(crate::grpc::caller::CallerLayer),
        )
        .add_service(health_service)
        .add_service(
            weft_proto::internal::v1::raft_server::RaftServer::new(crate::raft::RaftService::new(
                node.peers().clone(),
            ))
            .max_decoding_message_size(crate::raft::PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(crate::raft::PEER_MESSAGE_BYTES_MAX),
        )
        .add_service(
            weft_proto::internal::v1::controller_server::ControllerServer::new(
                crate::raft::ControllerService::new(node.peers().clone(), node.controller_watch()),
            ),
        )
        .add_service(
            weft_proto::internal::v1::forward_server::ForwardServer::new(
                crate::grpc::forward::ForwardService::new(node.clone()),
            )
            .max_decoding_message_size(crate::raft::PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(crate::raft::PEER_MESSAGE_BYTES_MAX),
        )
        .serve_with_incoming_shutdown(
            crate::tls::grpc_incoming(listeners.peer, peer_tls, "peer", stopping.clone(), None),
            stopped(stop_rx.clone()),
        );
    let admin_server = axum::serve(
        crate::tls::AdminListener::new(
            listeners.admin,
            admin_tls,
            config.admin_connections_max,
            crate::admin::request_limit(&config) + crate::admin::REQUEST_LIMIT_MARGIN,
        )?,
        crate::admin::router(node.clone(), admin_auth)
            .into_make_service_with_connect_info::<crate::tls::AdminConn>(),
    )
    .with_graceful_shutdown(stopped(stop_rx.clone()));

    let client_task = tokio::spawn(client_server);
    let peer_task = tokio::spawn(peer_server);
    let admin_task = tokio::spawn(async move { admin_server.await });
    let quic = config
        .quic_listen
        .map(|q| format!(" quic={q}"))
        .unwrap_or_default();
    println!(
        "weft-broker ready: node={} client={client} peer={peer} admin={admin}{quic}",
        node.node_id
    );
    tracing::info!(node = node.node_id, %client, %peer, %admin, quic = ?config.quic_listen, "weft-broker ready");

    // A broker of a build below the feature level the controller log has used (a downgrade)
    // would apply that log differently: it stops, saying why, instead of serving. So does one
    // whose join the cluster refused for that reason.
    let too_old = {
        let mut state = node.controller_watch();
        async move {
            loop {
                let in_use = state.borrow_and_update().features_in_use;
                if let Some(why) = above_this_build(in_use) {
                    return why;
                }
                if state.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    };
    let refused = {
        let mut refused = node.join_refused();
        async move {
            match refused.wait_for(Option::is_some).await {
                Ok(why) => format!(
                    "the cluster refused this broker: {}",
                    why.clone().unwrap_or_default()
                ),
                Err(_) => std::future::pending().await,
            }
        }
    };
    let must_stop = tokio::select! {
        () = &mut shutdown => None,
        why = too_old => Some(why),
        why = refused => Some(why),
    };
    if let Some(why) = &must_stop {
        tracing::error!("{why}; stopping");
    }
    tracing::info!("shutting down: no new calls; finishing in-flight ones");
    // Streams and long polls end first (they would otherwise hold the drain for the whole
    // grace); unary calls in flight finish.
    node.begin_closing();
    health
        .set_not_serving::<PublisherServer<PublisherService>>()
        .await;
    let _ = stop_tx.send(true);
    stopping.token.cancel();
    let drained = tokio::time::timeout(grace, async {
        let _ = client_task.await;
        let _ = peer_task.await;
        let _ = admin_task.await;
        if let Some(quic_task) = quic_task {
            let _ = quic_task.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("in-flight calls did not finish within shutdown_grace_ms; stopping anyway");
    }
    node.shutdown().await;
    tracing::info!("stopped");
    if let Some(why) = must_stop {
        anyhow::bail!(why);
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (within the
/// runtime), not when the future is first polled: a SIGTERM that comes while the broker starts,
/// or right after it says it is ready (a pod deleted at that moment), then stops it gracefully
/// instead of killing it (seen: a broker killed by a SIGTERM sent just after its ready line).
pub fn signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (term, interrupt) {
                (Ok(mut term), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                (Ok(mut term), Err(_)) => {
                    let _ = term.recv().await;
                }
                (Err(_), Ok(mut interrupt)) => {
                    let _ = interrupt.recv().await;
                }
                (Err(_), Err(_)) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async move {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Keeps `Arc<Node>` alive in tests that embed a broker.
pub type NodeHandle = Arc<Node>;
