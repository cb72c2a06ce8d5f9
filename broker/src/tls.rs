//! The broker's listeners, plain or TLS (see `weft_proto::tls`): the accepted connections of
//! the gRPC listeners as tonic takes them, and of the admin listener as axum takes them, each
//! with its [`ConnInfo`] for identities.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// The connections of a gRPC listener, as tonic's `serve_with_incoming` takes them. With
/// `slots`, a connection beyond them is closed as soon as it is accepted.
pub fn grpc_incoming(
    listener: TcpListener,
    tls: Option<Arc<Reloading<ServerConfig>>>,
    name: &'static str,
    stopping: Stopping,
    slots: Option<ConnectionSlots>,
) -> impl futures::Stream<Item = Result<Guarded, std::io::Error>> {
    let rx = weft_proto::tls::incoming(listener, tls, name);
    futures::StreamExt::filter_map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        move |conn| {
            let admitted = match &slots {
                None => Some(Guarded::new(conn, &stopping, None)),
                // When full, one of the few places kept for probes and operators; past them,
                // dropped unserved (the client sees its connection closed).
                Some(slots) => slots
                    .take_or_reserved(name)
                    .map(|slot| Guarded::new(conn, &stopping, Some(slot))),
            };
            std::future::ready(admitted.map(Ok))
        },
    )
}

/// The client connections a broker holds at once (`connections_max`), over HTTP/2 and QUIC
/// together: a bound on what clients can make it keep (each connection's streams are bounded
/// by `streams_per_connection_max`). Shown by the `weft_client_connections` gauge. When they
/// are all taken, [`RESERVED_CONNECTIONS`] more HTTP/2 connections may only check health or
/// drain the broker ([`OnlyProbes`]): the kubelet's gRPC probes and the preStop drain still
/// get through to a broker full of clients, as PostgreSQL keeps connections for superusers.
#[derive(Debug, Clone)]
pub struct ConnectionSlots {
    slots: Arc<tokio::sync::Semaphore>,
    reserved: Arc<tokio::sync::Semaphore>,
    max: u32,
    /// `connections_idle_ms`: how long a connection may have no call open before it is closed.
    idle: Option<Duration>,
}

/// Connections beyond `connections_max` kept for health checks and drains.
pub const RESERVED_CONNECTIONS: usize = 8;

/// The calls a connection in a reserved place may make.
const PROBE_CALLS: &[&str] = &["/grpc.health.v1.Health/Check", "/weft.v1.Cluster/Drain"];

impl ConnectionSlots {
    /// `max` connections (`connections_max`), each closed once it has had no call open for
    /// `idle` (`connections_idle_ms`; never with `None`).
    pub fn new(max: u32, idle: Option<Duration>) -> ConnectionSlots {
        metrics::gauge!("weft_client_connections").set(0.0);
        for listener in ["client", "quic"] {
            metrics::counter!("weft_client_connections_idle_closed_total", "listener" => listener)
                .absolute(0);
        }
        ConnectionSlots {
            slots: Arc::new(tokio::sync::Semaphore::new(max as usize)),
            reserved: Arc::new(tokio::sync::Semaphore::new(RESERVED_CONNECTIONS)),
            max,
            idle,
        }
    }

    /// How long a connection may have no call open before it is closed (`connections_idle_ms`).
    pub fn idle(&self) -> Option<Duration> {
        self.idle
    }

    /// A slot for one more connection, held as long as it is open; none (counted in
    /// `weft_client_connections_refused_total`) when every slot is taken.
    pub fn take(&self, listener: &'static str) -> Option<ConnectionSlot> {
        self.admit(listener, false)
    }

    /// [`ConnectionSlots::take`], or when every slot is taken one of the reserved places
    /// (still counted as refused: only probes and drains are served on it).
    pub fn take_or_reserved(&self, listener: &'static str) -> Option<ConnectionSlot> {
        self.admit(listener, true)
    }

    fn admit(&self, listener: &'static str, reserve: bool) -> Option<ConnectionSlot> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            metrics::gauge!("weft_client_connections").increment(1.0);
            return Some(ConnectionSlot {
                _permit: permit,
                reserved: false,
                idle: self.idle,
            });
        }
        if let Some(permit) = reserve
            .then(|| self.reserved.clone().try_acquire_owned().ok())
            .flatten()
        {
            // Counted as refused only if it makes a call other than a probe's ([`OnlyProbes`]).
            tracing::debug!(listener, "a connection in a place kept for probes");
            metrics::gauge!("weft_client_connections").increment(1.0);
            return Some(ConnectionSlot {
                _permit: permit,
                reserved: true,
                idle: self.idle,
            });
        }
        refused(listener, self.max, "it was closed");
        None
    }
}

/// Counts and logs a client connection refused for want of a place.
fn refused(listener: &'static str, connections_max: u32, how: &str) {
    metrics::counter!("weft_client_connections_refused_total", "listener" => listener).increment(1);
    tracing::warn!(
        listener,
        connections_max,
        "a client connection was refused ({how}): connections_max are open already"
    );
}

/// One open client connection's place among [`ConnectionSlots`].
#[derive(Debug)]
pub struct ConnectionSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// One of the places kept for probes and drains.
    reserved: bool,
    /// How long the connection may have no call open before it is closed.
    idle: Option<Duration>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        metrics::gauge!("weft_client_connections").decrement(1.0);
    }
}

/// Marks the calls of a connection in a reserved place ([`ConnectionSlots`]); set once a call
/// other than a probe's was refused on it, which closes it ([`Guarded`]).
#[derive(Debug, Clone)]
pub struct ReservedPlace(Arc<std::sync::atomic::AtomicBool>);

/// Answers UNAVAILABLE (naming `connections_max`; retriable: our client tries again, through
/// another broker if it knows one) to every call but a health check or a drain made over a
/// connection in a reserved place, which is then cut (see [`Guarded`]). After [`CountCalls`].
#[derive(Debug, Clone, Copy)]
pub struct OnlyProbes {
    pub connections_max: u32,
}

impl<S> tower::Layer<S> for OnlyProbes {
    type Service = OnlyProbesService<S>;

    fn layer(&self, inner: S) -> OnlyProbesService<S> {
        OnlyProbesService {
            inner,
            connections_max: self.connections_max,
        }
    }
}

/// The service of [`OnlyProbes`].
#[derive(Debug, Clone)]
pub struct OnlyProbesService<S> {
    inner: S,
    connections_max: u32,
}

impl<S, B> tower::Service<http::Request<B>> for OnlyProbesService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(ReservedPlace(refused_here)) = request.extensions().get::<ReservedPlace>()
            && !PROBE_CALLS.contains(&request.uri().path())
        {
            // Counted once per connection, which then closes.
            if !refused_here.swap(true, Ordering::SeqCst) {
                refused(
                    "client",
                    self.connections_max,
                    "only probes and drains are served on it",
                );
            }
            let refused = crate::error::BrokerError::Unavailable {
                reason: format!(
                    "this broker holds as many client connections as it may (connections_max \
                     = {}); this one may only check health or drain it, and closes: connect \
                     again later, or to another broker",
                    self.connections_max
                ),
                leader: None,
            };
            let response = tonic::Status::from(refused).into_http();
            return Box::pin(std::future::ready(Ok(response)));
        }
        Box::pin(self.inner.call(request))
    }
}

/// The stop of the broker as its connections see it: once `token` is cancelled, a connection
/// that moves no byte for `stall` is cut.
#[derive(Debug, Clone)]
pub struct Stopping {
    /// Cancelled when the broker begins to stop.
    pub token: tokio_util::sync::CancellationToken,
    /// How long a connection may move no byte, once the broker is stopping, before it is cut.
    pub stall: Duration,
}

/// An accepted gRPC connection that is cut (its reads and writes fail) when, after the broker
/// began to stop, it has moved no byte for [`Stopping::stall`] and no call on it is still being
/// answered ([`CountCalls`]). The stop waits for every connection to finish its calls, and a
/// client that stopped reading would otherwise hold it for the whole grace: its HTTP/2
/// flow-control window is full, so not even the end of its stream can be sent. A connection
/// still moving bytes, or whose unary call is still being worked on, is not cut.
pub struct Guarded {
    inner: Conn,
    /// Calls of this connection whose handler has not answered yet ([`CountCalls`]).
    calls: Arc<AtomicUsize>,
    stopping: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    stall: Duration,
    /// Armed once the broker is stopping: fires `stall` after the last byte moved.
    cut_at: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the last byte moved (or the stop began, if later).
    last: tokio::time::Instant,
    /// Its place among the listener's connections, if they are bounded.
    slot: Option<ConnectionSlot>,
    /// Until the client's HTTP/2 preface and first frame header arrived: when it fires, the
    /// connection is cut (a socket opened and left silent, or sending a byte now and then,
    /// would keep its place for good: hyper has no handshake timeout, and its keepalive pings
    /// start only after the handshake).
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes read so far, until [`FIRST_BYTES`].
    first_bytes_read: usize,
    /// In a place kept for probes: set once a call other than a probe's was refused on it
    /// ([`OnlyProbes`]); it is then cut [`REFUSED_LINGER`] after that (or after its last call
    /// answered, if later), however busy its client keeps it.
    refused: Arc<std::sync::atomic::AtomicBool>,
    /// When the refusal was first seen.
    refused_seen: Option<tokio::time::Instant>,
    /// A call was being answered at the last look.
    answering: bool,
    /// When the last call being answered was answered (seen from here).
    answered_at: Option<tokio::time::Instant>,
    /// Calls open on this connection: unary calls until answered, streams until their answer
    /// ends ([`CountCalls`]).
    open: Arc<AtomicUsize>,
    /// Bumped when a call on this connection starts or ends ([`CountCalls`]): a short call may
    /// start and end between two looks at `open`, in a task of its own.
    activity: Arc<AtomicUsize>,
    /// `activity` at the last look.
    activity_seen: usize,
    /// `connections_idle_ms`: the connection is closed once it has had no call open for that
    /// long (Kafka's `connections.max.idle.ms`), and nothing came from its client for
    /// [`IDLE_QUIET`].
    idle: Option<Duration>,
    /// Since when no call has been open (seen from here).
    idle_since: Option<tokio::time::Instant>,
    /// Wakes the connection now and then to look at how long it has been idle.
    idle_look: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the last byte came from the client.
    last_read: tokio::time::Instant,
}

/// An idle connection is closed only once nothing came from its client for this long (its
/// answers to the keep-alive pings included), and only when a read finds nothing to read: a
/// call whose bytes have arrived is read, and served, rather than cut off.
const IDLE_QUIET: Duration = Duration::from_millis(500);

/// How long an accepted connection may take to send its first [`FIRST_BYTES`] (an HTTP/2
/// client sends its preface and SETTINGS at once): past it, the connection is cut.
const FIRST_BYTE_WAIT: Duration = Duration::from_secs(10);
/// The HTTP/2 client preface (24 bytes) and a frame header (9).
const FIRST_BYTES: usize = 33;
/// How long a connection in a place kept for probes stays open with nothing to do.
const RESERVED_IDLE: Duration = Duration::from_secs(1);
/// How long a connection in a place kept for probes stays open after a call was refused on it
/// (for the refusal to be written).
const REFUSED_LINGER: Duration = Duration::from_millis(200);

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("stopping", &self.cut_at.is_some())
            .finish_non_exhaustive()
    }
}

impl Guarded {
    fn new(inner: Conn, stopping: &Stopping, slot: Option<ConnectionSlot>) -> Guarded {
        // A connection in a place kept for probes is cut as a stopping broker cuts them: once
        // it moved no byte for a moment with no call on it being answered (a probe's or a
        // drain's done, or another call refused). Its client then connects again, to a place
        // of its own if one came free.
        let reserved = slot.as_ref().is_some_and(|s| s.reserved);
        let idle = slot.as_ref().and_then(|s| s.idle);
        let now = tokio::time::Instant::now();
        let stall = if reserved {
            RESERVED_IDLE.min(stopping.stall)
        } else {
            stopping.stall
        };
        Guarded {
            inner,
            slot,
            first_byte: Some(Box::pin(tokio::time::sleep(
                crate::test_hook_ms("WEFT_TEST_FIRST_BYTE_MS").unwrap_or(FIRST_BYTE_WAIT),
            ))),
            first_bytes_read: 0,
            refused: Arc::default(),
            refused_seen: None,
            answering: false,
            answered_at: None,
            stopping: Box::pin(stopping.token.clone().cancelled_owned()),
            stall,
            cut_at: reserved.then(|| Box::pin(tokio::time::sleep_until(now + stall))),
            last: now,
            calls: Arc::default(),
            open: Arc::default(),
            activity: Arc::default(),
            activity_seen: 0,
            idle,
            idle_since: Some(now),
            idle_look: None,
            last_read: now,
        }
    }

    /// Whether the connection has had no call open for `connections_idle_ms` and nothing came
    /// from its client for [`IDLE_QUIET`] (asked when a read finds nothing to read); registers
    /// `cx` to be woken to look again.
    fn idle_for_too_long(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        let Some(idle) = self.idle else {
            return false;
        };
        let now = tokio::time::Instant::now();
        let activity = self.activity.load(Ordering::SeqCst);
        if activity != self.activity_seen || self.open.load(Ordering::SeqCst) > 0 {
            self.activity_seen = activity;
            self.idle_since = None;
        }
        let since = *self.idle_since.get_or_insert(now);
        if now >= since + idle && now >= self.last_read + IDLE_QUIET {
            metrics::counter!("weft_client_connections_idle_closed_total", "listener" => "client")
                .increment(1);
            tracing::debug!(?idle, "closed a client connection with no call open");
            return true;
        }
        // Looked at again a quarter of the limit later (a call may open and end meanwhile).
        let next = now + (idle / 4).max(IDLE_QUIET / 4);
        let look = self
            .idle_look
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next)));
        while look.as_mut().poll(cx).is_ready() {
            look.as_mut().reset(next);
        }
        false
    }

    /// Fails once the connection has stalled past its limit during a stop; registers `cx` to
    /// be woken when the stop begins and when the limit runs out.
    fn check(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        let answering = self.calls.load(Ordering::SeqCst) > 0;
        if self.answering && !answering {
            // An answer was just produced: the stall starts again from now, so it is written
            // before the connection is cut.
            let now = tokio::time::Instant::now();
            self.last = now;
            self.answered_at = Some(now);
        }
        self.answering = answering;
        if self.cut_at.is_none() {
            if self.stopping.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            self.last = self.last.max(tokio::time::Instant::now());
            self.cut_at = Some(Box::pin(tokio::time::sleep_until(self.last + self.stall)));
        }
        let mut deadline = self.last + self.stall;
        if self.refused.load(Ordering::SeqCst) {
            // A call was refused here: cut soon, however many bytes its client keeps moving.
            let seen = *self
                .refused_seen
                .get_or_insert_with(tokio::time::Instant::now);
            let quiet_since = self.answered_at.map_or(seen, |at| at.max(seen));
            deadline = deadline.min(quiet_since + REFUSED_LINGER);
        }
        let Some(cut_at) = self.cut_at.as_mut() else {
            return Ok(());
        };
        if cut_at.deadline() != deadline {
            cut_at.as_mut().reset(deadline);
        }
        if cut_at.as_mut().poll(cx).is_ready() {
            if self.calls.load(Ordering::SeqCst) > 0 {
                // A call is still being answered (a publish waiting for a slow disk, say): it
                // finishes, within the grace. Looked at again after another stall.
                self.last = tokio::time::Instant::now();
                let deadline = self.last + self.stall;
                cut_at.as_mut().reset(deadline);
                let _ = cut_at.as_mut().poll(cx);
                return Ok(());
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "this connection moved nothing for too long (the broker is stopping, or the \
                 connection was in a place kept for probes)",
            ));
        }
        Ok(())
    }

    fn moved(&mut self) {
        self.last = tokio::time::Instant::now();
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = GuardedInfo;

    fn connect_info(&self) -> GuardedInfo {
        GuardedInfo {
            info: self.inner.info(),
            calls: self.calls.clone(),
            open: self.open.clone(),
            activity: self.activity.clone(),
            reserved: self
                .slot
                .as_ref()
                .is_some_and(|s| s.reserved)
                .then(|| self.refused.clone()),
        }
    }
}

/// What tonic puts in the requests of a [`Guarded`] connection; [`CountCalls`] takes it out
/// again and leaves the [`ConnInfo`] that the layers and handlers after it read.
#[derive(Debug, Clone)]
pub struct GuardedInfo {
    info: ConnInfo,
    calls: Arc<AtomicUsize>,
    /// Calls open: unary calls until answered, streams until their answer ends.
    open: Arc<AtomicUsize>,
    /// Bumped when a call starts or ends.
    activity: Arc<AtomicUsize>,
    /// The connection is in a place kept for probes ([`ConnectionSlots`]): the flag set once
    /// a call was refused on it.
    reserved: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// Counts, per [`Guarded`] connection, the calls whose handler has not answered yet (a stream's
/// handler answers at once: its messages follow), so a stop cuts a connection that stalled only
/// when no call on it is still being worked on. The outermost layer of the gRPC servers.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountCalls;

impl<S> tower::Layer<S> for CountCalls {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner }
    }
}

/// The service of [`CountCalls`].
#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
}

/// Lowers its connection's count of calls being answered when dropped.
struct Answering(Arc<AtomicUsize>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a call as open until dropped, and bumps its connection's activity when it starts
/// and ends.
struct OpenCall {
    open: Arc<AtomicUsize>,
    activity: Arc<AtomicUsize>,
}

impl OpenCall {
    fn new(open: Arc<AtomicUsize>, activity: Arc<AtomicUsize>) -> OpenCall {
        open.fetch_add(1, Ordering::SeqCst);
        activity.fetch_add(1, Ordering::SeqCst);
        OpenCall { open, activity }
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.activity.fetch_add(1, Ordering::SeqCst);
    }
}

/// A call's answer body that keeps its call counted as open until it ends or is dropped.
struct OpenBody {
    inner: tonic::body::Body,
    _open: OpenCall,
}

impl http_body::Body for OpenBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let counted = request
            .extensions_mut()
            .remove::<GuardedInfo>()
            .map(|guarded| {
                guarded.calls.fetch_add(1, Ordering::SeqCst);
                let open = OpenCall::new(guarded.open, guarded.activity);
                request.extensions_mut().insert(guarded.info);
                if let Some(refused) = guarded.reserved {
                    request.extensions_mut().insert(ReservedPlace(refused));
                }
                (Answering(guarded.calls), open)
            });
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answered = answer.await;
            let Some((answering, open)) = counted else {
                return answered;
            };
            drop(answering);
            // Open until its answer (a stream's messages) ends.
            answered.map(|response| {
                response.map(|inner| tonic::body::Body::new(OpenBody { inner, _open: open }))
            })
        })
    }
}

impl tokio::io::AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = this.unless_cut(cx, |conn, cx| conn.poll_read(cx, buf));
        if matches!(polled, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.moved();
            this.last_read = this.last;
            this.first_bytes_read += buf.filled().len() - before;
            if this.first_bytes_read >= FIRST_BYTES {
                this.first_byte = None;
            }
        } else if polled.is_pending()
            && let Some(first_byte) = this.first_byte.as_mut()
            && first_byte.as_mut().poll(cx).is_ready()
        {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection sent nothing since it was accepted",
            )));
        } else if polled.is_pending() && this.idle_for_too_long(cx) {
            // Only with nothing to read: a call whose bytes arrived is served, not cut off.
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "this connection had no call open for connections_idle_ms",
            )));
        }
        polled
    }
}

impl Guarded {
    /// `op` on the connection, unless it is to be cut.
    fn unless_cut<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        op: impl FnOnce(
            Pin<&mut Conn>,
            &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        if let Err(e) = self.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        op(Pin::new(&mut self.inner), cx)
    }

    /// A write through `write`, unless the connection is to be cut; a byte written counts as
    /// moving.
    fn write_with(
        &mut self,
        cx: &mut std::task::Context<'_>,
        write: impl FnOnce(
            Pin<&mut Conn>,
            &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<usize>>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = self.unless_cut(cx, write);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.get_mut()
            .write_with(cx, |conn, cx| conn.poll_write(cx, data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.get_mut()
            .write_with(cx, |conn, cx| conn.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.get_mut()
            .unless_cut(cx, |conn, cx| conn.poll_flush(cx))
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.get_mut()
            .unless_cut(cx, |conn, cx| conn.poll_shutdown(cx))
    }
}

/// The admin listener as axum's `serve` takes it: at most `admin_connections_max` connections
/// at once (one past it is closed once accepted), each closed once nothing has gone out on it
/// for `idle` ([`AdminIo`]). Before, it held every connection it accepted for as long as its
/// caller kept it: a caller that sent half a request and nothing more held a task and a file
/// descriptor for good, and enough of them ran the broker out of file descriptors.
#[derive(Debug)]
pub struct AdminListener {
    rx: mpsc::Receiver<Conn>,
    local: SocketAddr,
    slots: Arc<tokio::sync::Semaphore>,
    max: u32,
    idle: Duration,
}

impl AdminListener {
    /// Over `listener`, through TLS when `tls` is given; `max` connections at once, each closed
    /// after `idle` with nothing sent.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<Reloading<ServerConfig>>>,
        max: u32,
        idle: Duration,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        metrics::counter!("weft_admin_connections_refused_total").absolute(0);
        Ok(AdminListener {
            rx: weft_proto::tls::incoming(listener, tls, "admin"),
            local,
            slots: Arc::new(tokio::sync::Semaphore::new(max as usize)),
            max,
            idle,
        })
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = AdminIo;
    type Addr = ConnInfo;

    async fn accept(&mut self) -> (AdminIo, ConnInfo) {
        loop {
            let Some(conn) = self.rx.recv().await else {
                // The accept task ended (it only does when this receiver is gone): nothing
                // more.
                return std::future::pending().await;
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                metrics::counter!("weft_admin_connections_refused_total").increment(1);
                tracing::warn!(
                    admin_connections_max = self.max,
                    "an admin connection was closed once accepted: admin_connections_max are \
                     open already"
                );
                continue;
            };
            let info = conn.info();
            let quiet_until = Box::pin(tokio::time::sleep(self.idle));
            return (
                AdminIo {
                    conn,
                    _slot: slot,
                    idle: self.idle,
                    quiet_until,
                },
                info,
            );
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

/// One admin connection: its place among `admin_connections_max`, held while it is open, and
/// an end once nothing has gone out on it for `idle` since it was accepted or since its last
/// answer (a read or a write then fails, and the HTTP server closes it): what bounds a request
/// whose head or body does not come whole, however slowly its bytes trickle in (a caller
/// sending a byte now and then would keep a timer that bytes read reset, and enough of them
/// would hold every place, the kubelet's probes refused), and an idle keep-alive connection.
#[derive(Debug)]
pub struct AdminIo {
    conn: Conn,
    _slot: tokio::sync::OwnedSemaphorePermit,
    idle: Duration,
    quiet_until: Pin<Box<tokio::time::Sleep>>,
}

impl AdminIo {
    fn moved(&mut self) {
        let until = tokio::time::Instant::now() + self.idle;
        self.quiet_until.as_mut().reset(until);
    }

    /// An error once it has been quiet for `idle`.
    fn quiet_too_long(&mut self, cx: &mut std::task::Context<'_>) -> Option<std::io::Error> {
        self.quiet_until.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "nothing went out on the admin connection for {} ms",
                    self.idle.as_millis()
                ),
            )
        })
    }
}

impl tokio::io::AsyncRead for AdminIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.conn).poll_read(cx, buf);
        if read.is_pending()
            && let Some(error) = this.quiet_too_long(cx)
        {
            return std::task::Poll::Ready(Err(error));
        }
        read
    }
}

impl tokio::io::AsyncWrite for AdminIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.conn).poll_write(cx, buf);
        match written {
            std::task::Poll::Ready(Ok(n)) if n > 0 => this.moved(),
            std::task::Poll::Pending => {
                if let Some(error) = this.quiet_too_long(cx) {
                    return std::task::Poll::Ready(Err(error));
                }
            }
            _ => {}
        }
        written
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().conn).poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().conn).poll_shutdown(cx)
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

#[cfg(test)]
mod guard_tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A guarded loopback connection whose broker stops cutting after `stall`, the stop (not
    /// begun yet), and the client's end.
    async fn guarded(stall: Duration) -> (Guarded, Stopping, tokio::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let stopping = Stopping {
            token: tokio_util::sync::CancellationToken::new(),
            stall,
        };
        (
            Guarded::new(Conn::Plain(server), &stopping, None),
            stopping,
            client,
        )
    }

    /// Once the broker is stopping, a connection that moves nothing is cut after the stall,
    /// but not while a call on it is still being answered (a publish waiting for a slow disk
    /// finishes within the grace); once that call is answered, it is cut after a stall.
    #[tokio::test]
    async fn a_stalled_connection_is_cut_once_stopping_unless_a_call_is_being_answered() {
        let (mut guarded, stopping, client) = guarded(Duration::from_millis(100)).await;
        let calls = guarded.calls.clone();
        let mut buf = [0u8; 16];
        // Not stopping: an idle connection stays.
        let read = tokio::time::timeout(Duration::from_millis(300), guarded.read(&mut buf)).await;
        assert!(read.is_err(), "cut before the stop: {read:?}");

        calls.fetch_add(1, Ordering::SeqCst);
        stopping.token.cancel();
        let read = tokio::time::timeout(Duration::from_millis(500), guarded.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "cut while a call was being answered: {read:?}"
        );

        calls.fetch_sub(1, Ordering::SeqCst);
        let started = std::time::Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(2), guarded.read(&mut buf))
            .await
            .expect("cut once no call is being answered");
        assert_eq!(
            read.expect_err("cut").kind(),
            std::io::ErrorKind::ConnectionAborted
        );
        assert!(started.elapsed() < Duration::from_millis(1000));
        drop(client);
    }

    /// A call answered just before the stall runs out is not cut off: the stall starts again
    /// from its answer, so the answer is written first. Before, the connection could be cut
    /// at the deadline armed while the call ran (a drain's answer lost to its CLI).
    #[tokio::test]
    async fn an_answer_produced_just_before_the_stall_runs_out_is_written_first() {
        let stall = Duration::from_millis(200);
        let (mut guarded, stopping, client) = guarded(stall).await;
        let calls = guarded.calls.clone();
        let mut buf = [0u8; 16];
        calls.fetch_add(1, Ordering::SeqCst);
        stopping.token.cancel();
        // The call runs for two and a half stalls: the deadline is armed again at each.
        let read = tokio::time::timeout(stall * 5 / 2, guarded.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "cut while a call was being answered: {read:?}"
        );
        // Answered half a stall before the deadline armed last.
        calls.fetch_sub(1, Ordering::SeqCst);
        let answered = std::time::Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(2), guarded.read(&mut buf))
            .await
            .expect("cut once no call is being answered");
        assert_eq!(
            read.expect_err("cut").kind(),
            std::io::ErrorKind::ConnectionAborted
        );
        assert!(
            answered.elapsed() >= stall - Duration::from_millis(20),
            "cut {:?} after the answer: before a whole stall",
            answered.elapsed()
        );
        drop(client);
    }
}
