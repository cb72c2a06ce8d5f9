//! The transport of every Weft gRPC caller (the Rust client, and a broker calling its peers):
//! tonic's [`Channel`] plus one translation. A proxy in front of a
//! broker (a mesh sidecar, nginx, an API gateway) that refuses or fails a call answers with a
//! plain HTTP status, often with an HTML body, and tonic would read that body as a gRPC message
//! ("protocol error: received message with invalid compression flag: 60"). Such an answer
//! becomes the gRPC status the gRPC specification maps its HTTP status to (403 ->
//! PERMISSION_DENIED, 502/503/504 -> UNAVAILABLE...), with a message that says a proxy, not the
//! broker, answered.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Code;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt;

/// How the message of a translated answer (a proxy's, not the broker's) begins.
pub const PROXY_ANSWER_PREFIX: &str = "a proxy on the way to the broker answered";

/// Metadata key of a translated answer: the proxy's HTTP status.
pub const PROXY_STATUS_KEY: &str = "weft-proxy-http-status";

/// A [`Channel`] whose non-gRPC answers become gRPC statuses, and that may carry the caller's
/// credentials (`authorization`) on every call.
#[derive(Debug, Clone)]
pub struct Transport {
    via: Via,
    authorization: Option<http::HeaderValue>,
}

/// What carries the calls.
#[derive(Debug, Clone)]
enum Via {
    /// HTTP/2 (h2c or TLS).
    Http2(Channel),
    /// HTTP/3 over QUIC.
    Quic(crate::quic::QuicChannel),
    /// HTTP/2 to several brokers in turn, leaving out those that cannot be reached.
    Spread(Arc<Spread>),
}

/// Calls spread over several brokers, one after the other (from a random one), each over its
/// own connection (opened on first use). A broker whose call failed at the transport (no
/// connection: it is down, or its address leads nowhere) is left out until it answers a
/// probe: a WhoAmI call with a short deadline, on a connection of its own, in the background,
/// after [`PROBE_FIRST`], then less often, up to [`PROBE_MAX`] (each time it is left out again
/// without having answered a call in between, the first wait doubles too). A call that ran
/// out of time is probed at once, and its broker is left out only when the probe fails too (a
/// host that died without closing its connections, a stopped broker). A broker that answers
/// the probe gets the probe's connection for its next calls. While every broker is left out,
/// calls go to them in turn anyway. A call that names a deadline (`grpc-timeout`) ends with
/// DEADLINE_EXCEEDED soon after it even while it waits for its broker's connection (a
/// connection attempt to a host that drops it takes the endpoint's connect timeout, and calls
/// queue behind it). tonic's balancer, used before, kept sending calls to a broker that was
/// down, and they failed.
#[derive(Debug)]
pub struct Spread {
    targets: Vec<Target>,
    next: AtomicUsize,
}

#[derive(Debug)]
struct Target {
    endpoint: Endpoint,
    /// The connection calls take (replaced by the probe's once the broker answers it again).
    channel: std::sync::Mutex<Channel>,
    /// Left out: a call failed at the transport, and no probe was answered since.
    down: AtomicBool,
    /// A background task is probing it.
    probing: AtomicBool,
    /// Times it was left out since it last answered a call.
    outages: AtomicU32,
}

/// First wait before a broker left out is tried again.
const PROBE_FIRST: Duration = Duration::from_millis(500);
/// Longest wait between two tries.
const PROBE_MAX: Duration = Duration::from_secs(5);
/// A probe's deadline.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);
/// How long after its deadline a call still waiting for its broker's connection is ended
/// (tonic's own deadline, which starts once the call is sent, normally ends it first).
const DEADLINE_GRACE: Duration = Duration::from_millis(500);

impl Spread {
    /// The next broker to call: the next one in turn that is not left out (the next in turn
    /// when every one is).
    fn pick(&self) -> usize {
        let n = self.targets.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| (start + i) % n)
            .find(|i| !self.targets[*i].down.load(Ordering::Relaxed))
            .unwrap_or(start)
    }

    /// The connection to broker `i`.
    fn channel(&self, i: usize) -> Channel {
        self.targets[i]
            .channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Broker `i` answered a call.
    fn answered(&self, i: usize) {
        self.targets[i].outages.store(0, Ordering::Relaxed);
    }

    /// Broker `i`'s call failed at the transport: it is left out until it answers a probe.
    fn failed(self: &Arc<Self>, i: usize) {
        let target = &self.targets[i];
        if !target.down.swap(true, Ordering::AcqRel) {
            target.outages.fetch_add(1, Ordering::Relaxed);
        }
        self.probe(i, false);
    }

    /// Broker `i`'s call ran out of time: it is probed at once, and left out if the probe
    /// fails.
    fn timed_out(self: &Arc<Self>, i: usize) {
        self.probe(i, true);
    }

    /// Probes broker `i` in the background until it answers (one task per broker; it ends
    /// when the client is dropped). `now`: the first try at once.
    fn probe(self: &Arc<Self>, i: usize, now: bool) {
        let target = &self.targets[i];
        if target.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            target.probing.store(false, Ordering::Release);
            return;
        };
        let outages = target.outages.load(Ordering::Relaxed).clamp(1, 8) - 1;
        let spread: Weak<Spread> = Arc::downgrade(self);
        let endpoint = target.endpoint.clone();
        runtime.spawn(async move {
            let mut wait = PROBE_FIRST.saturating_mul(1 << outages).min(PROBE_MAX);
            let mut first = now;
            loop {
                if !first {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(PROBE_MAX);
                }
                first = false;
                let answered = answers(&endpoint).await;
                let Some(spread) = spread.upgrade() else {
                    return;
                };
                let target = &spread.targets[i];
                match answered {
                    Some(channel) => {
                        // Its next calls take this connection: the old one may hold the
                        // failure of a connection attempt that a call gave up waiting for, and
                        // would hand it to the next call.
                        *target
                            .channel
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = channel;
                        target.down.store(false, Ordering::Release);
                        target.probing.store(false, Ordering::Release);
                        return;
                    }
                    None => {
                        if !target.down.swap(true, Ordering::AcqRel) {
                            target.outages.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
    }
}

/// A connection to the broker at `endpoint` if it answers a call on it (any gRPC answer,
/// refusals included: a broker that wants credentials answers UNAUTHENTICATED) within
/// [`PROBE_DEADLINE`]. A TCP or TLS connection alone does not tell: a stopped or stuck broker's
/// kernel still accepts them.
async fn answers(endpoint: &Endpoint) -> Option<Channel> {
    let Ok(Ok(channel)) = tokio::time::timeout(PROBE_DEADLINE, endpoint.connect()).await else {
        return None;
    };
    let mut request = tonic::Request::new(crate::v1::WhoAmIRequest {});
    request.set_timeout(PROBE_DEADLINE);
    let mut client = crate::v1::metadata_client::MetadataClient::new(channel.clone());
    let alive =
        match tokio::time::timeout(PROBE_DEADLINE + DEADLINE_GRACE, client.who_am_i(request)).await
        {
            Ok(Ok(_)) => true,
            Ok(Err(status)) => !matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            ),
            Err(_) => false,
        };
    alive.then_some(channel)
}

/// The deadline a call names in its `grpc-timeout` header, if any.
fn deadline_of(request: &http::Request<Body>) -> Option<Duration> {
    crate::parse_grpc_timeout(request.headers().get("grpc-timeout")?.to_str().ok()?)
}

/// Whether a transport error is tonic's own deadline running out (the broker was reached).
fn is_deadline(error: &tonic::transport::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}

impl Transport {
    /// `channel` with the translation.
    pub fn new(channel: Channel) -> Self {
        Transport {
            via: Via::Http2(channel),
            authorization: None,
        }
    }

    /// Calls over QUIC (HTTP/3) through `channel`.
    pub fn quic(channel: crate::quic::QuicChannel) -> Self {
        Transport {
            via: Via::Quic(channel),
            authorization: None,
        }
    }

    /// Calls spread over `endpoints` (see [`Spread`]), each connected on first use.
    pub fn spread(endpoints: Vec<Endpoint>) -> Self {
        let targets = endpoints
            .into_iter()
            .map(|endpoint| Target {
                channel: std::sync::Mutex::new(endpoint.connect_lazy()),
                endpoint,
                down: AtomicBool::new(false),
                probing: AtomicBool::new(false),
                outages: AtomicU32::new(0),
            })
            .collect();
        // From a random broker: each client (each consumer's own connection, say) starts
        // elsewhere, so long-lived streams opened first spread over the brokers.
        let start = {
            use std::hash::BuildHasher;
            std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
        };
        Transport {
            via: Via::Spread(Arc::new(Spread {
                targets,
                next: AtomicUsize::new(usize::try_from(start % 1_000_003).unwrap_or(0)),
            })),
            authorization: None,
        }
    }

    /// Whether the calls go over QUIC.
    pub fn is_quic(&self) -> bool {
        matches!(self.via, Via::Quic(_))
    }

    /// Sends `authorization: Bearer <token>` on every call that has no authorization of its
    /// own. Err: the token cannot be a header value.
    pub fn with_bearer_token(mut self, token: Option<&str>) -> Result<Self, String> {
        self.authorization = match token {
            None => None,
            Some(token) => {
                let mut value = http::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .map_err(|_| {
                        "the bearer token holds characters a header cannot carry".to_string()
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(self)
    }
}

impl tower::Service<http::Request<Body>> for Transport {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<http::Response<Body>, tonic::transport::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match &mut self.via {
            Via::Http2(channel) => tower::Service::poll_ready(channel, cx),
            // Each call waits for its own broker's channel.
            Via::Quic(_) | Via::Spread(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if let Some(value) = &self.authorization
            && !request.headers().contains_key(http::header::AUTHORIZATION)
        {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value.clone());
        }
        match &mut self.via {
            Via::Http2(channel) => {
                let answer = tower::Service::call(channel, request);
                Box::pin(async move { answer.await.map(translate) })
            }
            Via::Spread(spread) if spread.targets.is_empty() => Box::pin(async { Ok(no_broker()) }),
            Via::Spread(spread) => {
                let spread = spread.clone();
                let i = spread.pick();
                let channel = spread.channel(i);
                let deadline = deadline_of(&request);
                Box::pin(async move {
                    let call = channel.oneshot(request);
                    let answer = match deadline {
                        Some(deadline) => {
                            match tokio::time::timeout(deadline + DEADLINE_GRACE, call).await {
                                Ok(answer) => answer,
                                Err(_) => {
                                    spread.failed(i);
                                    return Ok(tonic::Status::deadline_exceeded(format!(
                                        "no answer from {} within the call's deadline ({deadline:?}): \
                                         no connection to it yet",
                                        spread.targets[i].endpoint.uri()
                                    ))
                                    .into_http());
                                }
                            }
                        }
                        None => call.await,
                    };
                    match &answer {
                        Ok(_) => spread.answered(i),
                        Err(e) if is_deadline(e) => spread.timed_out(i),
                        Err(_) => spread.failed(i),
                    }
                    answer.map(translate)
                })
            }
            Via::Quic(channel) => {
                let answer = tower::Service::call(channel, request);
                Box::pin(async move {
                    match answer.await {
                        Ok(response) => Ok(translate(response)),
                        Err(never) => match never {},
                    }
                })
            }
        }
    }
}

/// The answer of a spread over no broker at all.
fn no_broker() -> http::Response<Body> {
    tonic::Status::unavailable("no broker address to call").into_http()
}

/// The gRPC code for an HTTP status that did not come with a gRPC status, as the gRPC
/// specification's "HTTP to gRPC status code mapping" gives it.
pub fn code_for_http_status(status: u16) -> Code {
    match status {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// A gRPC answer passes; anything else becomes a trailers-only gRPC status.
fn translate(response: http::Response<Body>) -> http::Response<Body> {
    let headers = response.headers();
    if headers.contains_key("grpc-status") {
        // A gRPC status (trailers-only, whatever the HTTP status): tonic reads it.
        return response;
    }
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if response.status() == http::StatusCode::OK && content_type.starts_with("application/grpc") {
        return response;
    }
    let status = response.status();
    let server = headers
        .get(http::header::SERVER)
        .and_then(|v| v.to_str().ok())
        .map(|s| format!(" (server: {s})"))
        .unwrap_or_default();
    let kind = if content_type.is_empty() {
        "no content type".to_string()
    } else {
        format!("content type {content_type}")
    };
    let mut grpc = tonic::Status::new(
        code_for_http_status(status.as_u16()),
        format!(
            "{PROXY_ANSWER_PREFIX} HTTP {status}{server} with {kind}, not the broker: a mesh or \
             proxy policy refused the call, or the proxy could not reach a broker"
        ),
    );
    if let Ok(value) = status.as_u16().to_string().parse() {
        grpc.metadata_mut().insert(PROXY_STATUS_KEY, value);
    }
    grpc.into_http()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_calls_deadline_is_read_from_its_grpc_timeout() {
        let with = |value: &str| {
            let request = http::Request::builder()
                .header("grpc-timeout", value)
                .body(Body::empty())
                .expect("request");
            deadline_of(&request)
        };
        assert_eq!(with("30S"), Some(Duration::from_secs(30)));
        assert_eq!(with("2500m"), Some(Duration::from_millis(2500)));
        assert_eq!(with("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(with("7u"), Some(Duration::from_micros(7)));
        assert_eq!(with("x"), None);
        assert_eq!(with("12"), None);
        assert_eq!(with(""), None);
        let none = http::Request::builder()
            .body(Body::empty())
            .expect("request");
        assert_eq!(deadline_of(&none), None);
    }

    fn answer(
        status: u16,
        content_type: Option<&str>,
        grpc_status: Option<&str>,
    ) -> http::Response<Body> {
        let mut builder = http::Response::builder()
            .status(status)
            .header("server", "nginx");
        if let Some(ct) = content_type {
            builder = builder.header("content-type", ct);
        }
        if let Some(code) = grpc_status {
            builder = builder.header("grpc-status", code);
        }
        builder.body(Body::empty()).expect("response")
    }

    #[test]
    fn plain_http_answers_become_the_specified_grpc_codes() {
        for (http, code) in [
            (403, Code::PermissionDenied),
            (401, Code::Unauthenticated),
            (404, Code::Unimplemented),
            (502, Code::Unavailable),
            (503, Code::Unavailable),
            (504, Code::Unavailable),
            (429, Code::Unavailable),
            (400, Code::Internal),
            (500, Code::Unknown),
        ] {
            let translated = translate(answer(http, Some("text/html"), None));
            let status =
                tonic::Status::from_header_map(translated.headers()).expect("a gRPC status");
            assert_eq!(status.code(), code, "HTTP {http}");
            assert!(status.message().contains("a proxy"), "{}", status.message());
            assert!(status.message().contains("nginx"), "{}", status.message());
            assert_eq!(
                status
                    .metadata()
                    .get(PROXY_STATUS_KEY)
                    .and_then(|v| v.to_str().ok()),
                Some(http.to_string().as_str())
            );
        }
        // A 200 that is not gRPC (an HTML page) is not a broker's answer either.
        let translated = translate(answer(200, Some("text/html"), None));
        let status = tonic::Status::from_header_map(translated.headers()).expect("a gRPC status");
        assert_eq!(status.code(), Code::Unknown);
    }

    #[test]
    fn grpc_answers_pass_untouched() {
        let ok = translate(answer(200, Some("application/grpc"), None));
        assert!(tonic::Status::from_header_map(ok.headers()).is_none());
        let refused = translate(answer(200, Some("application/grpc+proto"), Some("7")));
        let status = tonic::Status::from_header_map(refused.headers()).expect("status");
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(!status.message().contains("proxy"));
    }
}
