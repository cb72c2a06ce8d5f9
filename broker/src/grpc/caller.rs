//! The caller's W3C trace context (`traceparent`, `tracestate`) and `x-request-id` follow every
//! call a broker makes on the caller's behalf: a call forwarded to a partition's leader, to the
//! group coordinator or to the controller's leader carries the headers of the call that caused
//! it, so a mesh (or any tracer) joins the hops in one trace.
//!
//! [`CallerLayer`] wraps the gRPC servers: each request's handler runs with its caller's
//! headers in a task-local. [`PeerChannel`], the channel of every peer call, copies them onto
//! the outgoing request when it has none of its own. Calls made outside a request's handler
//! (Raft's replication, background tasks) carry none.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderValue;
use tonic::body::Body;
use weft_proto::transport::Transport;

/// The headers passed on.
pub const KEYS: [&str; 3] = ["traceparent", "tracestate", "x-request-id"];

/// One caller's headers among [`KEYS`], and its identity (set by the auth layer, which runs
/// first): the broker a call is forwarded to checks the ACLs as the original caller's.
#[derive(Debug, Clone, Default)]
pub struct Caller(
    Vec<(&'static str, HeaderValue)>,
    Option<crate::auth::Identity>,
);

impl Caller {
    fn from_request<B>(request: &http::Request<B>) -> Caller {
        let headers = request.headers();
        Caller(
            KEYS.iter()
                .filter_map(|key| headers.get(*key).map(|v| (*key, v.clone())))
                .collect(),
            request
                .extensions()
                .get::<crate::auth::Identity>()
                .filter(|identity| !identity.broker)
                .cloned(),
        )
    }

    /// Sets the caller's headers on `headers` where they are absent.
    fn apply(&self, headers: &mut http::HeaderMap) {
        for (key, value) in &self.0 {
            if !headers.contains_key(*key) {
                headers.insert(*key, value.clone());
            }
        }
        if let Some(identity) = &self.1 {
            identity.apply_forwarded(headers);
        }
    }
}

tokio::task_local! {
    static CALLER: Caller;
}

/// A tower layer for the gRPC servers: each request's handler runs with its caller's headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallerLayer;

impl<S> tower::Layer<S> for CallerLayer {
    type Service = CallerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallerService { inner }
    }
}

/// See [`CallerLayer`].
#[derive(Debug, Clone)]
pub struct CallerService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for CallerService<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let caller = Caller::from_request(&request);
        let answer = self.inner.call(request);
        Box::pin(CALLER.scope(caller, answer))
    }
}

/// The channel of a peer call: [`Transport`] (a proxy's plain HTTP answer read as the gRPC
/// status it stands for), with the current caller's headers passed on.
#[derive(Debug, Clone)]
pub struct PeerChannel {
    inner: Transport,
}

impl PeerChannel {
    /// Over `inner`.
    pub fn new(inner: Transport) -> PeerChannel {
        PeerChannel { inner }
    }
}

impl tower::Service<http::Request<Body>> for PeerChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = <Transport as tower::Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let _ = CALLER.try_with(|caller| caller.apply(request.headers_mut()));
        tower::Service::call(&mut self.inner, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_callers_headers_reach_the_calls_made_for_it_and_no_others() {
        let mut incoming = http::HeaderMap::new();
        incoming.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        incoming.insert("x-request-id", HeaderValue::from_static("req-1"));
        incoming.insert("authorization", HeaderValue::from_static("secret"));
        let mut request = http::Request::new(());
        *request.headers_mut() = incoming;
        request
            .extensions_mut()
            .insert(crate::auth::Identity::anonymous());
        let caller = Caller::from_request(&request);
        let mut outgoing = http::HeaderMap::new();
        outgoing.insert("x-request-id", HeaderValue::from_static("own"));
        CALLER
            .scope(caller, async {
                CALLER
                    .try_with(|c| c.apply(&mut outgoing))
                    .expect("in scope");
            })
            .await;
        assert_eq!(
            outgoing["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        // A header the outgoing call set itself stays; others are never copied.
        assert_eq!(outgoing["x-request-id"], "own");
        assert!(!outgoing.contains_key("authorization"));
        // The caller's identity travels, for the ACL check of the broker that serves the call.
        assert_eq!(outgoing[weft_proto::CALLER_PRINCIPAL_HEADER], "anonymous");
        assert!(
            CALLER.try_with(|_| ()).is_err(),
            "no caller outside a handler"
        );
    }
}
