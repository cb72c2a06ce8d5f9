//! gRPC over QUIC: the same calls, paths, protobuf messages, metadata and trailers as over
//! HTTP/2, carried by HTTP/3 (h3 over quinn, TLS 1.3 by rustls). For clients outside a mesh: one
//! UDP flow, no head-of-line blocking between calls, connection set-up in one round trip.
//!
//! [`serve`] hands each HTTP/3 request to a tower service as an `http::Request` (the broker's
//! gRPC routes, the same stack as its HTTP/2 listener's); [`QuicChannel`] is the calling side,
//! a tower service that tonic's generated clients use as they use a `Channel`. Both sides
//! move bodies through bounded queues (a full queue stops reading the QUIC stream, so flow
//! control reaches the sender).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::{Mutex, mpsc};
use tokio_rustls::rustls;
use tonic::body::Body;

use crate::tls::ConnInfo;

/// The ALPN of HTTP/3.
pub const ALPN: &[u8] = b"h3";
/// Body frames queued per direction of a call.
const FRAMES_QUEUED: usize = 16;
/// Calls (bidirectional streams) open at once per connection.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 1024;
/// A connection with no traffic for this long is closed (keep-alives keep a used one open).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often an idle connection is kept alive.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// What a client offers instead: QUIC takes the smaller of the two ends' idle timeouts, so a
/// client learns within this long that its server is gone (killed, or its host lost: no
/// connection close ever comes), and fails over; its keep-alives keep a live connection open.
const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(6);
/// How often a client keeps its connection alive.
const CLIENT_KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Largest header section a call may send (HTTP/2's usual limit).
const HEADER_BYTES_MAX: u64 = 16 * 1024;
/// Longest wait for a QUIC handshake (with one server; a channel to several tries each in turn).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a handshake with one server of several, before the next is tried.
const CONNECT_TIMEOUT_OF_SEVERAL: Duration = Duration::from_secs(3);

/// A body fed from a queue (a request body read from QUIC on the server, a response body on
/// the client).
struct QueueBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, tonic::Status>>,
}

impl http_body::Body for QueueBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx)
    }
}

/// The transport settings of either end, with its keep-alive interval and idle timeout.
fn transport_config(keep_alive: Duration, idle_timeout: Duration) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(STREAMS_PER_CONNECTION_MAX.into());
    transport.max_concurrent_uni_streams(16u32.into());
    transport.keep_alive_interval(Some(keep_alive));
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle_timeout) {
        transport.max_idle_timeout(Some(idle));
    }
    Arc::new(transport)
}

/// A quinn server configuration from a rustls one (its ALPN set to h3; TLS 1.3 only).
pub fn server_config(mut tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, String> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| format!("this TLS configuration cannot serve QUIC: {e}"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(KEEP_ALIVE, IDLE_TIMEOUT));
    Ok(config)
}

/// Reads a request body from QUIC into a queue (data, then trailers if any).
async fn read_body<S>(
    mut recv: h3::server::RequestStream<S, Bytes>,
    tx: mpsc::Sender<Result<Frame<Bytes>, tonic::Status>>,
) where
    S: h3::quic::RecvStream,
{
    loop {
        match recv.recv_data().await {
            Ok(Some(mut chunk)) => {
                let bytes = chunk.copy_to_bytes(chunk.remaining());
                if tx.send(Ok(Frame::data(bytes))).await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                if let Ok(Some(trailers)) = recv.recv_trailers().await {
                    let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                }
                return;
            }
            Err(e) => {
                let _ = tx
                    .send(Err(tonic::Status::cancelled(format!(
                        "the QUIC request stream failed: {e}"
                    ))))
                    .await;
                return;
            }
        }
    }
}

/// Serves one HTTP/3 request with `service`.
async fn serve_request<S, B>(
    request: http::Request<()>,
    stream: h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>,
    mut service: S,
    info: ConnInfo,
) where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>> + Send,
    S::Future: Send,
    S::Error: std::fmt::Display + Send,
    B: http_body::Body<Data = Bytes> + Send + Unpin,
    B::Error: std::fmt::Display + Send,
{
    let (mut send, recv) = stream.split();
    let (tx, rx) = mpsc::channel(FRAMES_QUEUED);
    let reader = tokio::spawn(read_body(recv, tx));
    let (parts, ()) = request.into_parts();
    let mut request = http::Request::from_parts(parts, Body::new(QueueBody { rx }));
    request.extensions_mut().insert(info);
    let response = match std::future::poll_fn(|cx| service.poll_ready(cx)).await {
        Ok(()) => service.call(request).await,
        Err(e) => Err(e),
    };
    let response = match response {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!("a QUIC call failed in the service: {e}");
            send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
            reader.abort();
            return;
        }
    };
    let (parts, mut body) = response.into_parts();
    if send
        .send_response(http::Response::from_parts(parts, ()))
        .await
        .is_err()
    {
        reader.abort();
        return;
    }
    let mut trailers_sent = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => {
                    if send.send_data(data).await.is_err() {
                        reader.abort();
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        trailers_sent = send.send_trailers(trailers).await.is_ok();
                    }
                }
            },
            Err(e) => {
                tracing::debug!("a QUIC response body failed: {e}");
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                reader.abort();
                return;
            }
        }
    }
    if !trailers_sent {
        let _ = send.finish().await;
    }
    reader.abort();
}

/// What a QUIC connection tells of its caller.
fn conn_info(connection: &quinn::Connection, local: Option<SocketAddr>) -> ConnInfo {
    let peer_certificates = connection
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .map(|certs| Arc::from(certs.into_iter().collect::<Vec<_>>()));
    ConnInfo {
        remote: Some(connection.remote_address()),
        local,
        peer_certificates,
    }
}

/// At shutdown, how long a connection whose calls are all answered stays open for the client to
/// receive the last answers (and close it).
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Serves every connection `endpoint` accepts with `service` (a clone per call) until
/// `shutdown` resolves. `admit` is asked for each new connection: it is refused on `None`, and
/// otherwise holds what `admit` gave until it closes (a place among bounded connections). A
/// connection with no call open for `idle` is told to open no new calls (an HTTP/3 GOAWAY) and
/// closed (its client connects again for its next call). At
/// shutdown, stops accepting, tells every connection's client to open no new calls (an HTTP/3
/// GOAWAY), waits for the calls in flight to finish (the caller bounds the wait), and closes
/// the endpoint.
pub async fn serve<S, B, A>(
    endpoint: quinn::Endpoint,
    service: S,
    admit: impl Fn() -> Option<A>,
    idle: Option<Duration>,
    shutdown: impl std::future::Future<Output = ()>,
) where
    A: Send + 'static,
    S: tower::Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Display + Send,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    let local = endpoint.local_addr().ok();
    let handshakes = Arc::new(tokio::sync::Semaphore::new(crate::tls::HANDSHAKES_MAX));
    // Every connection's task (each waits for its own calls before it ends).
    let connections = tokio_util::task::TaskTracker::new();
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = &mut shutdown => break,
        };
        let Some(incoming) = incoming else { break };
        // Handshakes in progress are bounded, as on the TCP listeners: beyond, refuse.
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        // And so are the connections held, if the caller bounds them.
        let Some(admitted) = admit() else {
            incoming.refuse();
            continue;
        };
        let service = service.clone();
        let mut closing = closing.clone();
        connections.spawn(async move {
            let _admitted = admitted;
            let connection = tokio::time::timeout(CONNECT_TIMEOUT, incoming).await;
            drop(permit);
            let connection = match connection {
                Ok(Ok(connection)) => connection,
                Ok(Err(e)) => {
                    tracing::debug!("a QUIC handshake failed: {e}");
                    return;
                }
                Err(_) => return,
            };
            let info = conn_info(&connection, local);
            let quic = connection.clone();
            // Header sections as large as HTTP/2's default limit, not h3's unbounded one.
            let mut h3 = match h3::server::builder()
                .max_field_section_size(HEADER_BYTES_MAX)
                .build::<_, Bytes>(h3_quinn::Connection::new(connection))
                .await
            {
                Ok(h3) => h3,
                Err(e) => {
                    tracing::debug!("an HTTP/3 connection failed to start: {e}");
                    return;
                }
            };
            let calls = tokio_util::task::TaskTracker::new();
            // After the GOAWAY, accepting goes on until the calls taken are answered: h3 refuses
            // (H3_REQUEST_REJECTED) the requests the client opened past it, so their callers
            // know they were not served rather than losing them with the connection.
            let mut goaway = false;
            // Looked at every quarter of `idle`: since when no call is open.
            let look_every = idle.map_or(Duration::from_secs(3600), |idle| idle / 4);
            let mut look = tokio::time::interval(look_every);
            look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut idle_since = Some(tokio::time::Instant::now());
            // After an idle connection's GOAWAY: until when requests the client opened before
            // it heard the GOAWAY are still read, so that one racing it is refused with
            // H3_REQUEST_REJECTED (the client knows it was not served) rather than lost with
            // the connection. (h3 then ends `accept`: a second racing request is not read. A
            // client that has heard the GOAWAY starts its calls on a new connection.)
            let mut refusing_until: Option<tokio::time::Instant> = None;
            loop {
                let accepted = tokio::select! {
                    accepted = h3.accept() => accepted,
                    () = async {
                        match refusing_until {
                            Some(until) => tokio::time::sleep_until(until).await,
                            None => std::future::pending().await,
                        }
                    }, if goaway => {
                        if calls.is_empty() {
                            break;
                        }
                        refusing_until = None;
                        continue;
                    }
                    _ = look.tick(), if idle.is_some() && !goaway => {
                        let now = tokio::time::Instant::now();
                        if !calls.is_empty() {
                            idle_since = None;
                            continue;
                        }
                        let since = *idle_since.get_or_insert(now);
                        if idle.is_some_and(|idle| now >= since + idle) {
                            tracing::debug!(?idle, "closing a QUIC connection with no call open");
                            metrics::counter!(
                                "weft_client_connections_idle_closed_total",
                                "listener" => "quic"
                            )
                            .increment(1);
                            if let Err(e) = h3.shutdown(0).await {
                                tracing::debug!("an HTTP/3 GOAWAY was not sent: {e}");
                            }
                            goaway = true;
                            refusing_until = Some(now + CLOSE_LINGER);
                            calls.close();
                        }
                        continue;
                    }
                    () = async { let _ = closing.wait_for(|closing| *closing).await; }, if !goaway => {
                        if let Err(e) = h3.shutdown(0).await {
                            tracing::debug!("an HTTP/3 GOAWAY was not sent: {e}");
                        }
                        goaway = true;
                        calls.close();
                        continue;
                    }
                    () = calls.wait(), if goaway && refusing_until.is_none() => break,
                };
                match accepted {
                    Ok(Some(resolver)) => {
                        // A call: the connection is not idle.
                        idle_since = None;
                        let service = service.clone();
                        let info = info.clone();
                        calls.spawn(async move {
                            match resolver.resolve_request().await {
                                Ok((request, stream)) => {
                                    serve_request(request, stream, service, info).await;
                                }
                                Err(e) => tracing::debug!("a bad HTTP/3 request: {e}"),
                            }
                        });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!("an HTTP/3 connection ended: {e}");
                        break;
                    }
                }
            }
            // The connection closes when `h3` is dropped: only after its calls are answered,
            // and after the client had time to receive the last answers (closing a QUIC
            // connection discards stream data still in flight). The client closes it once it
            // has them, or it lingers at most `CLOSE_LINGER`.
            calls.close();
            calls.wait().await;
            let _ = tokio::time::timeout(CLOSE_LINGER, quic.closed()).await;
            drop(h3);
        });
    }
    let _ = closing_tx.send(true);
    connections.close();
    connections.wait().await;
    // H3_NO_ERROR; then a moment for the closes to reach the clients.
    endpoint.close(0x100u32.into(), b"shutting down");
    let _ = tokio::time::timeout(CLOSE_LINGER, endpoint.wait_idle()).await;
}

type Sender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// After a failed connection attempt, calls fail at once for this long (with that attempt's
/// error) instead of each waiting for a handshake of its own.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// A gRPC channel over QUIC to one server at a time: connected on first use, again after the
/// connection is lost (one attempt at a time; the others wait for it). Given several servers
/// (brokers of one cluster, any of which serves any call), it connects to the first that
/// answers, starting after the one whose connection was lost, so calls carry on when a broker
/// goes away. Transport failures come back as UNAVAILABLE gRPC answers (trailers only), never as
/// errors of the channel; a call's `grpc-timeout` bounds the wait for its answer
/// (DEADLINE_EXCEEDED).
#[derive(Clone)]
pub struct QuicChannel {
    inner: Arc<Inner>,
}

/// The connection in use, or the last failure.
enum Slot {
    Empty,
    Open {
        sender: Sender,
        generation: u64,
        /// Which of the channel's servers it is connected to.
        target: usize,
    },
    Failed {
        at: std::time::Instant,
        error: String,
    },
}

/// One server a channel may call.
#[derive(Debug, Clone)]
pub struct QuicTarget {
    /// host:port, resolved at each connection.
    pub address: String,
    /// The name its certificate must carry.
    pub server_name: String,
}

struct Inner {
    /// At least one.
    targets: Vec<QuicTarget>,
    /// The server the next connection tries first.
    first: std::sync::atomic::AtomicUsize,
    client_config: quinn::ClientConfig,
    /// A UDP socket per address family, made when first needed.
    endpoints: std::sync::Mutex<(Option<quinn::Endpoint>, Option<quinn::Endpoint>)>,
    slot: Mutex<Slot>,
    generations: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for QuicChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicChannel")
            .field("targets", &self.inner.targets)
            .finish_non_exhaustive()
    }
}

impl QuicChannel {
    /// A channel to `address` (host:port) whose certificate must name `server_name`, with
    /// `tls` (its CAs and client certificate; the ALPN is set here).
    pub fn new(
        address: &str,
        server_name: &str,
        tls: rustls::ClientConfig,
    ) -> Result<QuicChannel, String> {
        QuicChannel::to_any(
            vec![QuicTarget {
                address: address.to_string(),
                server_name: server_name.to_string(),
            }],
            tls,
        )
    }

    /// A channel to whichever of `targets` answers (tried in order at first), with `tls`.
    pub fn to_any(
        targets: Vec<QuicTarget>,
        mut tls: rustls::ClientConfig,
    ) -> Result<QuicChannel, String> {
        if targets.is_empty() {
            return Err("a QUIC channel needs at least one server".into());
        }
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.enable_early_data = false;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| format!("this TLS configuration cannot call over QUIC: {e}"))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
        client_config.transport_config(transport_config(CLIENT_KEEP_ALIVE, CLIENT_IDLE_TIMEOUT));
        Ok(QuicChannel {
            inner: Arc::new(Inner {
                targets,
                first: std::sync::atomic::AtomicUsize::new(0),
                client_config,
                endpoints: std::sync::Mutex::new((None, None)),
                slot: Mutex::new(Slot::Empty),
                generations: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// Connects now (else the first call does): Err says why not.
    pub async fn connect(&self) -> Result<(), String> {
        self.sender().await.map(|_| ())
    }

    /// The open connection's request sender, its generation and its server's address,
    /// connecting when there is none (one attempt at a time: the others wait for its outcome).
    async fn sender(&self) -> Result<(Sender, u64, String), String> {
        let mut slot = self.inner.slot.lock().await;
        match &*slot {
            Slot::Open {
                sender,
                generation,
                target,
            } => {
                let address = self.inner.targets[*target].address.clone();
                return Ok((sender.clone(), *generation, address));
            }
            Slot::Failed { at, error } if at.elapsed() < RECONNECT_BACKOFF => {
                return Err(error.clone());
            }
            _ => {}
        }
        // Each server in turn, from the one after the last lost connection's.
        let count = self.inner.targets.len();
        let first = self.inner.first.load(std::sync::atomic::Ordering::Relaxed) % count;
        let limit = if count == 1 {
            CONNECT_TIMEOUT
        } else {
            CONNECT_TIMEOUT_OF_SEVERAL
        };
        let mut failures = Vec::new();
        for target in (0..count).map(|k| (first + k) % count) {
            let address = &self.inner.targets[target].address;
            match tokio::time::timeout(limit, self.open(target)).await {
                Ok(Ok((sender, generation))) => {
                    self.inner
                        .first
                        .store(target, std::sync::atomic::Ordering::Relaxed);
                    *slot = Slot::Open {
                        sender: sender.clone(),
                        generation,
                        target,
                    };
                    return Ok((sender, generation, address.clone()));
                }
                Ok(Err(e)) => failures.push(e),
                Err(_) => {
                    failures.push(format!("no QUIC connection to {address} within {limit:?}"))
                }
            }
        }
        let error = failures.join("; ");
        *slot = Slot::Failed {
            at: std::time::Instant::now(),
            error: error.clone(),
        };
        Err(error)
    }

    /// The UDP endpoint for `remote`'s address family.
    fn endpoint_for(&self, remote: SocketAddr) -> Result<quinn::Endpoint, String> {
        let mut endpoints = self
            .inner
            .endpoints
            .lock()
            .map_err(|_| "the QUIC endpoints' lock is poisoned".to_string())?;
        let (slot, bind): (&mut Option<quinn::Endpoint>, SocketAddr) = if remote.is_ipv4() {
            (&mut endpoints.0, SocketAddr::from(([0, 0, 0, 0], 0)))
        } else {
            (&mut endpoints.1, SocketAddr::from(([0u16; 8], 0)))
        };
        if let Some(endpoint) = slot {
            return Ok(endpoint.clone());
        }
        let endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| format!("cannot open a UDP socket for QUIC: {e}"))?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// A new connection to server `target`: resolve, handshake, HTTP/3 set-up; its driver task
    /// clears the slot when it ends (only if the slot still holds this connection), and the
    /// next connection then tries the following server first.
    async fn open(&self, target: usize) -> Result<(Sender, u64), String> {
        let inner = &self.inner;
        let QuicTarget {
            address: name,
            server_name,
        } = &inner.targets[target];
        let candidates: Vec<SocketAddr> = tokio::net::lookup_host(name)
            .await
            .map_err(|e| format!("cannot resolve {name}: {e}"))?
            .collect();
        if candidates.is_empty() {
            return Err(format!("{name} resolves to no address"));
        }
        let mut failures = Vec::new();
        for address in candidates {
            let attempt = async {
                let endpoint = self.endpoint_for(address)?;
                let connection = endpoint
                    .connect_with(inner.client_config.clone(), address, server_name)
                    .map_err(|e| format!("cannot connect to {address} over QUIC: {e}"))?
                    .await
                    .map_err(|e| format!("QUIC handshake with {address}: {e}"))?;
                h3::client::new(h3_quinn::Connection::new(connection))
                    .await
                    .map_err(|e| format!("HTTP/3 with {address}: {e}"))
            };
            match attempt.await {
                Ok((mut driver, sender)) => {
                    let generation = inner
                        .generations
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        + 1;
                    // Weak: the task must not keep the channel (and its connection) alive.
                    let weak = Arc::downgrade(&self.inner);
                    tokio::spawn(async move {
                        let error = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
                        let Some(inner) = weak.upgrade() else { return };
                        let name = &inner.targets[target].address;
                        tracing::debug!("the QUIC connection to {name} ended: {error}");
                        let mut slot = inner.slot.lock().await;
                        if matches!(&*slot, Slot::Open { generation: g, .. } if *g == generation) {
                            *slot = Slot::Empty;
                            inner.first.store(
                                (target + 1) % inner.targets.len(),
                                std::sync::atomic::Ordering::Relaxed,
                            );
                        }
                    });
                    return Ok((sender, generation));
                }
                Err(e) => failures.push(e),
            }
        }
        Err(failures.join("; "))
    }

    /// Forgets connection `generation` (a call could not start on it).
    async fn forget(&self, generation: u64) {
        let mut slot = self.inner.slot.lock().await;
        if matches!(&*slot, Slot::Open { generation: g, .. } if *g == generation) {
            *slot = Slot::Empty;
        }
    }

    /// One call.
    async fn call_inner(
        &self,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, String> {
        let (parts, mut body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        // A connection the server is closing (an idle one's GOAWAY) refuses to start the call:
        // nothing of it was sent, so it starts once more, on a new connection.
        let mut attempt = 0;
        let stream = loop {
            let (mut sender, generation, authority) = self.sender().await?;
            let mut head = http::Request::new(());
            *head.method_mut() = parts.method.clone();
            *head.headers_mut() = parts.headers.clone();
            *head.version_mut() = parts.version;
            // HTTP/3 wants an absolute URI: the authority this channel calls.
            *head.uri_mut() = format!("https://{authority}{path}")
                .parse()
                .map_err(|e| format!("bad request path {path:?}: {e}"))?;
            match sender.send_request(head).await {
                Ok(stream) => break stream,
                Err(e) => {
                    self.forget(generation).await;
                    attempt += 1;
                    // Only a connection going away is worth a new one: a request that cannot
                    // be sent (its headers too large, say) fails the same way anywhere.
                    let closing = matches!(
                        e,
                        h3::error::StreamError::RemoteClosing { .. }
                            | h3::error::StreamError::ConnectionError { .. }
                    );
                    if attempt >= 2 || !closing {
                        return Err(format!("cannot start a call over QUIC: {e}"));
                    }
                    tracing::debug!("cannot start a call over QUIC ({e}); on a new connection");
                }
            }
        };
        let (mut send, mut recv) = stream.split();
        // The request body goes out beside the response (streaming calls need both at once).
        let writer = AbortOnDrop(tokio::spawn(async move {
            let mut trailers_sent = false;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    // The caller's body failed: a reset, not a clean end.
                    send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
                    return;
                };
                match frame.into_data() {
                    Ok(data) => {
                        if send.send_data(data).await.is_err() {
                            return;
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            trailers_sent = send.send_trailers(trailers).await.is_ok();
                        }
                    }
                }
            }
            if !trailers_sent {
                let _ = send.finish().await;
            }
        }));
        let response = recv
            .recv_response()
            .await
            .map_err(|e| format!("no answer over QUIC: {e}"))?;
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, tonic::Status>>(FRAMES_QUEUED);
        tokio::spawn(async move {
            // Owns the request body's writer: the call ends with its response.
            let _writer = writer;
            loop {
                let next = tokio::select! {
                    next = recv.recv_data() => next,
                    () = tx.closed() => {
                        // The caller dropped the response: tell the server to stop.
                        recv.stop_sending(h3::error::Code::H3_REQUEST_CANCELLED);
                        break;
                    }
                };
                match next {
                    Ok(Some(mut chunk)) => {
                        let bytes = chunk.copy_to_bytes(chunk.remaining());
                        if tx.send(Ok(Frame::data(bytes))).await.is_err() {
                            recv.stop_sending(h3::error::Code::H3_REQUEST_CANCELLED);
                            break;
                        }
                    }
                    Ok(None) => {
                        if let Ok(Some(trailers)) = recv.recv_trailers().await {
                            let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                        }
                        break;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(tonic::Status::unavailable(format!(
                                "the QUIC stream failed: {e}"
                            ))))
                            .await;
                        break;
                    }
                }
            }
        });
        let (parts, ()) = response.into_parts();
        Ok(http::Response::from_parts(
            parts,
            Body::new(QueueBody { rx }),
        ))
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A call's `grpc-timeout`.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    crate::parse_grpc_timeout(headers.get("grpc-timeout")?.to_str().ok()?)
}

/// A trailers-only gRPC answer: UNAVAILABLE with `message`.
fn unavailable(message: &str) -> http::Response<Body> {
    status_only("14", message)
}

/// A trailers-only gRPC answer with `code` (decimal) and `message`.
fn status_only(code: &'static str, message: &str) -> http::Response<Body> {
    let mut response = http::Response::new(Body::empty());
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", http::HeaderValue::from_static(code));
    let encoded: String = message
        .bytes()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    if let Ok(value) = http::HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", value);
    }
    response
}

impl tower::Service<http::Request<Body>> for QuicChannel {
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<http::Response<Body>, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let channel = self.clone();
        let deadline = grpc_timeout(request.headers());
        Box::pin(async move {
            let call = channel.call_inner(request);
            let outcome = match deadline {
                Some(deadline) => match tokio::time::timeout(deadline, call).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        // DEADLINE_EXCEEDED (4): no answer within the call's deadline.
                        return Ok(status_only("4", "no answer over QUIC within the deadline"));
                    }
                },
                None => call.await,
            };
            Ok(match outcome {
                Ok(response) => response,
                Err(message) => unavailable(&message),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_as_grpc_writes_them() {
        let at = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", value.parse().expect("header"));
            grpc_timeout(&headers)
        };
        assert_eq!(at("30S"), Some(Duration::from_secs(30)));
        assert_eq!(at("250m"), Some(Duration::from_millis(250)));
        assert_eq!(at("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(at("5x"), None);
        assert_eq!(at("S"), None);
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn a_failed_call_is_a_grpc_status_not_a_transport_error() {
        let response = status_only("14", "the broker went away: 100%");
        assert_eq!(response.headers()["grpc-status"], "14");
        assert_eq!(
            response.headers()["grpc-message"],
            "the broker went away: 100%25"
        );
    }
}
