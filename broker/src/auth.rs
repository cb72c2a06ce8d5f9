//! Who is calling: every call on every listener gets an [`Identity`] before its handler runs.
//!
//! Where an identity comes from, first match wins:
//! 1. A bearer token (`authorization: Bearer ...`) whose SHA-256 is one of `auth.tokens`: the
//!    token's name. A token that matches none is refused (UNAUTHENTICATED / 401), never
//!    downgraded to anonymous.
//! 2. On a listener configured to trust a sidecar (`auth.*_sidecar`), the identity the sidecar
//!    forwards: the last element of Envoy's (Istio's) `x-forwarded-client-cert` (its SPIFFE
//!    `URI`, else its `Subject`), or Linkerd's `l5d-client-id`. Never read on other listeners:
//!    any caller can send those headers.
//! 3. The TLS client certificate: its SPIFFE URI SAN (`spiffe://td/ns/N/sa/S`), else its
//!    subject (`CN=alice, O=acme`).
//! 4. Otherwise the caller is `anonymous`.
//!
//! On the peer listener, when `auth.broker_identities` is set, only those identities (exact, or
//! a prefix ending in `*`) are served: another broker, never an application. Refusals answer
//! UNAUTHENTICATED or PERMISSION_DENIED with the reason, and write one audit line (target
//! `weft::audit`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::Serialize;
use tonic::body::Body;
use weft_proto::tls::ConnInfo;

use crate::config::{AuthConfig, ConfigError};

/// Where an identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// No credential: `anonymous`.
    Anonymous,
    /// The TLS client certificate.
    Certificate,
    /// A trusted sidecar's header.
    Sidecar,
    /// A bearer token.
    Token,
}

impl Source {
    /// Its name, as JSON spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Anonymous => "anonymous",
            Source::Certificate => "certificate",
            Source::Sidecar => "sidecar",
            Source::Token => "token",
        }
    }
}

/// A caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Identity {
    /// `spiffe://...`, a certificate subject, a Linkerd identity, a token's name, or
    /// `anonymous`.
    pub principal: String,
    /// Where it came from.
    pub source: Source,
    /// A broker of this cluster (one of `auth.broker_identities`, on the peer port): ACLs
    /// allow it everything, and it may speak for the callers it forwards calls for.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub broker: bool,
    /// The caller of a call a broker forwarded (the broker vouches for it).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub forwarded: bool,
}

impl Identity {
    /// The caller without credentials.
    pub fn anonymous() -> Identity {
        Identity {
            principal: "anonymous".into(),
            source: Source::Anonymous,
            broker: false,
            forwarded: false,
        }
    }

    fn new(principal: impl Into<String>, source: Source) -> Identity {
        Identity {
            principal: principal.into(),
            source,
            broker: false,
            forwarded: false,
        }
    }

    /// The identity of the caller a broker forwarded this call for, from the peer call's
    /// metadata (None: the broker called on its own behalf).
    fn forwarded(headers: &http::HeaderMap) -> Option<Identity> {
        Identity::from_forwarded(
            headers
                .get(weft_proto::CALLER_PRINCIPAL_HEADER)?
                .to_str()
                .ok()?,
            headers
                .get(weft_proto::CALLER_SOURCE_HEADER)
                .and_then(|v| v.to_str().ok()),
        )
    }

    /// An identity from its forwarded form (see [`Identity::forwarded_pairs`]).
    pub fn from_forwarded(principal: &str, source: Option<&str>) -> Option<Identity> {
        let source = match source {
            Some("token") => Source::Token,
            Some("sidecar") => Source::Sidecar,
            Some("certificate") => Source::Certificate,
            _ => Source::Anonymous,
        };
        Some(Identity::new(percent_decode(principal), source))
    }

    /// This identity as the metadata of a call forwarded for it: (key, value) pairs, the
    /// principal percent-encoded so that any principal fits a header.
    pub fn forwarded_pairs(&self) -> [(&'static str, String); 2] {
        [
            (
                weft_proto::CALLER_PRINCIPAL_HEADER,
                percent_encode(&self.principal),
            ),
            (
                weft_proto::CALLER_SOURCE_HEADER,
                self.source.as_str().into(),
            ),
        ]
    }

    /// Sets this identity as the caller of a peer call.
    pub fn apply_forwarded(&self, headers: &mut http::HeaderMap) {
        for (key, value) in self.forwarded_pairs() {
            if let Ok(value) = http::HeaderValue::from_str(&value) {
                headers.insert(key, value);
            }
        }
    }
}

/// Percent-encodes every byte outside printable ASCII, and `%`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x21..0x7f).contains(&byte) && byte != b'%' || byte == b' ' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which sidecar's forwarded identity a listener trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sidecar {
    /// None: the headers are ignored.
    None,
    /// Envoy (Istio, Consul): `x-forwarded-client-cert`.
    Envoy,
    /// Linkerd: `l5d-client-id`.
    Linkerd,
}

impl Sidecar {
    /// Parses a config value; `key` names it in the error.
    pub fn parse(key: &'static str, value: &str) -> Result<Sidecar, ConfigError> {
        match value {
            "none" | "" => Ok(Sidecar::None),
            "envoy" | "istio" => Ok(Sidecar::Envoy),
            "linkerd" => Ok(Sidecar::Linkerd),
            other => Err(ConfigError::Invalid {
                key,
                reason: format!("{other:?} is none of \"none\", \"envoy\", \"linkerd\""),
            }),
        }
    }
}

/// Why a caller is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Bad or unknown credentials.
    Unauthenticated(String),
    /// Known, but not allowed here.
    Denied(String),
}

/// The static bearer tokens: SHA-256 of the token to its name.
#[derive(Debug, Clone, Default)]
pub struct Tokens(HashMap<[u8; 32], String>);

impl Tokens {
    /// Parses `NAME=sha256:HEX` entries.
    pub fn parse(entries: &[String]) -> Result<Tokens, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            key: "auth.tokens",
            reason,
        };
        let mut map = HashMap::new();
        for entry in entries {
            let (name, hash) = entry
                .split_once('=')
                .ok_or_else(|| invalid(format!("{entry:?} is not NAME=sha256:HEX")))?;
            let hex = hash.strip_prefix("sha256:").ok_or_else(|| {
                invalid(format!(
                    "{name}: the hash must start with sha256: (the token itself never goes in the config)"
                ))
            })?;
            if name.is_empty() || name == "anonymous" {
                return Err(invalid(format!(
                    "{entry:?}: a token needs a name (not anonymous)"
                )));
            }
            let digest = decode_hex32(hex).ok_or_else(|| {
                invalid(format!(
                    "{name}: {hex:?} is not 64 hex digits (sha256sum's output)"
                ))
            })?;
            if map.insert(digest, name.to_string()).is_some() {
                return Err(invalid(format!(
                    "{name}: the same token hash appears twice"
                )));
            }
        }
        Ok(Tokens(map))
    }

    fn name_of(&self, token: &str) -> Option<&str> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let key: [u8; 32] = digest.as_ref().try_into().ok()?;
        self.0.get(&key).map(String::as_str)
    }
}

fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Whether `principal` matches `pattern`: `*`, an exact identity, or a prefix ending in `*`.
pub fn matches(pattern: &str, principal: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => principal.starts_with(prefix),
        None => pattern == principal,
    }
}

/// How one listener identifies its callers.
#[derive(Debug, Clone)]
pub struct Authenticator {
    listener: &'static str,
    sidecar: Sidecar,
    tokens: Arc<Tokens>,
    /// Who may call (the peer listener's broker identities); empty: anyone.
    allowed: Arc<Vec<String>>,
}

impl Authenticator {
    /// The same authenticator for the QUIC listener: meshes do not intercept UDP, so no sidecar
    /// stands in front of it to strip client-sent identity headers, and they are never
    /// trusted there (callers are known by certificate or token).
    pub fn for_quic(&self) -> Authenticator {
        Authenticator {
            listener: "quic",
            sidecar: Sidecar::None,
            tokens: self.tokens.clone(),
            allowed: self.allowed.clone(),
        }
    }

    /// The authenticators of the client, peer and admin listeners.
    pub fn from_config(
        auth: &AuthConfig,
    ) -> Result<(Authenticator, Authenticator, Authenticator), ConfigError> {
        let tokens = Arc::new(Tokens::parse(&auth.tokens)?);
        let make = |listener, key, sidecar: &str, allowed: Vec<String>| {
            Ok::<_, ConfigError>(Authenticator {
                listener,
                sidecar: Sidecar::parse(key, sidecar)?,
                tokens: tokens.clone(),
                allowed: Arc::new(allowed),
            })
        };
        Ok((
            make(
                "client",
                "auth.client_sidecar",
                &auth.client_sidecar,
                Vec::new(),
            )?,
            make(
                "peer",
                "auth.peer_sidecar",
                &auth.peer_sidecar,
                auth.broker_identities.clone(),
            )?,
            make(
                "admin",
                "auth.admin_sidecar",
                &auth.admin_sidecar,
                Vec::new(),
            )?,
        ))
    }

    /// The caller of a request with `headers` on connection `conn`.
    pub fn identify(
        &self,
        headers: &http::HeaderMap,
        conn: Option<&ConnInfo>,
    ) -> Result<Identity, Refusal> {
        let mut identity = self.identity(headers, conn)?;
        if self.allowed.is_empty() {
            return Ok(identity);
        }
        if !self.allowed.iter().any(|p| matches(p, &identity.principal)) {
            return Err(Refusal::Denied(format!(
                "the {} port serves only brokers (auth.broker_identities); {} is not one",
                self.listener, identity.principal
            )));
        }
        // A broker: a call it forwards is its caller's.
        if let Some(mut caller) = Identity::forwarded(headers) {
            caller.forwarded = true;
            return Ok(caller);
        }
        identity.broker = true;
        Ok(identity)
    }

    fn identity(
        &self,
        headers: &http::HeaderMap,
        conn: Option<&ConnInfo>,
    ) -> Result<Identity, Refusal> {
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let value = value.to_str().unwrap_or_default();
            let Some(token) = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
            else {
                return Err(Refusal::Unauthenticated(
                    "the authorization header is not \"Bearer <token>\"".into(),
                ));
            };
            return match self.tokens.name_of(token.trim()) {
                Some(name) => Ok(Identity::new(name, Source::Token)),
                None => Err(Refusal::Unauthenticated(
                    "the bearer token is not one of this broker's tokens".into(),
                )),
            };
        }
        match self.sidecar {
            Sidecar::None => {}
            Sidecar::Envoy => {
                if let Some(value) = headers.get("x-forwarded-client-cert") {
                    let principal =
                        value
                            .to_str()
                            .ok()
                            .and_then(xfcc_principal)
                            .ok_or_else(|| {
                                Refusal::Unauthenticated(
                                    "the sidecar's x-forwarded-client-cert names no URI or Subject"
                                        .into(),
                                )
                            })?;
                    return Ok(Identity::new(principal, Source::Sidecar));
                }
            }
            Sidecar::Linkerd => {
                if let Some(value) = headers.get("l5d-client-id") {
                    let principal = value
                        .to_str()
                        .ok()
                        .map(str::trim)
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| {
                            Refusal::Unauthenticated("the sidecar's l5d-client-id is empty".into())
                        })?;
                    return Ok(Identity::new(principal, Source::Sidecar));
                }
            }
        }
        if let Some(leaf) = conn
            .and_then(|c| c.peer_certificates.as_ref())
            .and_then(|chain| chain.first())
        {
            let principal = certificate_principal(leaf.as_ref()).ok_or_else(|| {
                Refusal::Unauthenticated(
                    "the client certificate has neither a SPIFFE URI nor a subject".into(),
                )
            })?;
            return Ok(Identity::new(principal, Source::Certificate));
        }
        Ok(Identity::anonymous())
    }
}

/// A certificate's principal: its first `spiffe://` URI SAN, else its subject.
pub fn certificate_principal(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && uri.starts_with("spiffe://")
            {
                return Some((*uri).to_string());
            }
        }
    }
    let subject = rfc4514(cert.subject());
    (!subject.is_empty()).then_some(subject)
}

/// A distinguished name as RFC 4514 (and OpenSSL's RFC 2253 output, which nginx's
/// `$ssl_client_s_dn` and Envoy's `x-forwarded-client-cert` carry) writes it: the last RDN
/// first, `,` between RDNs, `+` within one, short names (CN, O, OU...), special characters
/// escaped. So a certificate's subject names the same identity whether the broker reads the
/// certificate itself or a sidecar forwards it.
pub fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> = name
        .iter()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let key = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                        .map_or_else(|_| attr.attr_type().to_id_string(), str::to_string);
                    let value = match attr.as_str() {
                        Ok(text) => escape_rfc4514(text),
                        Err(_) => {
                            let hex: String = attr
                                .attr_value()
                                .data
                                .iter()
                                .map(|b| format!("{b:02x}"))
                                .collect();
                            format!("#{hex}")
                        }
                    };
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.join(",")
}

fn escape_rfc4514(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The principal of the last element of an `x-forwarded-client-cert` value (the one the
/// nearest proxy added, about its own client): its `URI`, else its `Subject`.
pub fn xfcc_principal(value: &str) -> Option<String> {
    let element = split_unquoted(value, ',').into_iter().last()?;
    let mut uri = None;
    let mut subject = None;
    for pair in split_unquoted(&element, ';') {
        let Some((key, value)) = pair.split_once('=') else {
            continue;
        };
        let value = unquote(value.trim());
        match key.trim().to_ascii_lowercase().as_str() {
            "uri" if !value.is_empty() => uri = uri.or(Some(value)),
            "subject" if !value.is_empty() => subject = Some(value),
            _ => {}
        }
    }
    uri.or(subject)
}

/// Splits on `separator` outside double quotes (a backslash escapes the next character).
fn split_unquoted(text: &str, separator: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in text.chars() {
        if escaped {
            current.push(c);
            escaped = false;
        } else if c == '\\' {
            current.push(c);
            escaped = true;
        } else if c == '"' {
            current.push(c);
            quoted = !quoted;
        } else if c == separator && !quoted {
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    if !current.trim().is_empty() {
        parts.push(current);
    }
    parts
}

fn unquote(value: &str) -> String {
    let inner = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    let mut out = String::with_capacity(inner.len());
    let mut escaped = false;
    for c in inner.chars() {
        if escaped {
            out.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes the audit line of a refused call.
pub fn audit_refusal(listener: &str, path: &str, conn: Option<&ConnInfo>, refusal: &Refusal) {
    let remote = conn.and_then(|c| c.remote).map(|a| a.to_string());
    let (outcome, reason) = match refusal {
        Refusal::Unauthenticated(r) => ("unauthenticated", r),
        Refusal::Denied(r) => ("denied", r),
    };
    tracing::warn!(
        target: "weft::audit",
        listener,
        path,
        remote = remote.as_deref().unwrap_or("-"),
        outcome,
        reason = reason.as_str(),
        "call refused"
    );
}

/// A tower layer for a gRPC server: each request gets the caller's [`Identity`] as an
/// extension, or is answered UNAUTHENTICATED / PERMISSION_DENIED at once.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Authenticator,
}

impl AuthLayer {
    /// With `auth`.
    pub fn new(auth: Authenticator) -> Self {
        AuthLayer { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Authenticator,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let conn = request.extensions().get::<ConnInfo>().cloned();
        // Health checks (kubelet's gRPC probe, a mesh's) carry no credentials anywhere.
        let health = request.uri().path().starts_with("/grpc.health.v1.Health/");
        match self.auth.identify(request.headers(), conn.as_ref()) {
            Ok(identity) => {
                request.extensions_mut().insert(identity);
                Box::pin(self.inner.call(request))
            }
            Err(_) if health => {
                request.extensions_mut().insert(Identity::anonymous());
                Box::pin(self.inner.call(request))
            }
            Err(refusal) => {
                audit_refusal(
                    self.auth.listener,
                    request.uri().path(),
                    conn.as_ref(),
                    &refusal,
                );
                let status = match refusal {
                    Refusal::Unauthenticated(reason) => tonic::Status::unauthenticated(reason),
                    Refusal::Denied(reason) => tonic::Status::permission_denied(reason),
                };
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The identity of a gRPC request (set by [`AuthLayer`]); anonymous when none was set (an
/// in-process call).
pub fn identity_of<T>(request: &tonic::Request<T>) -> Identity {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .unwrap_or_else(Identity::anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfcc_gives_the_last_elements_uri_else_its_subject() {
        let istio = "By=spiffe://cluster.local/ns/weft/sa/weft;Hash=abc;Subject=\"\";URI=spiffe://cluster.local/ns/shop/sa/orders";
        assert_eq!(
            xfcc_principal(istio).as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/orders")
        );
        let chained = "By=a;URI=spiffe://td/ns/a/sa/first,By=b;Hash=x;Subject=\"CN=second,O=acme\"";
        assert_eq!(xfcc_principal(chained).as_deref(), Some("CN=second,O=acme"));
        assert_eq!(xfcc_principal("By=a;Hash=x"), None);
        assert_eq!(xfcc_principal(""), None);
    }

    #[test]
    fn tokens_are_matched_by_hash_and_bad_entries_are_refused() {
        // sha256("s3cret")
        let hash = "b4d3b3a5f0e9a0e2b8e3c7e0c2f5c0e7a0b6b1f0c3d1e2f3a4b5c6d7e8f90a1b";
        let tokens = Tokens::parse(&[format!("ci=sha256:{hash}")]).expect("parses");
        assert_eq!(tokens.name_of("wrong"), None);
        let real = ring::digest::digest(&ring::digest::SHA256, b"s3cret");
        let hex: String = real.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let tokens = Tokens::parse(&[format!("ci=sha256:{hex}")]).expect("parses");
        assert_eq!(tokens.name_of("s3cret"), Some("ci"));
        for bad in ["ci", "ci=s3cret", "ci=sha256:zz", "=sha256:00"] {
            assert!(Tokens::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_identities_survive_any_characters() {
        let who = Identity::new("CN=Zoë, O=acme %x", Source::Certificate);
        let mut headers = http::HeaderMap::new();
        who.apply_forwarded(&mut headers);
        assert_eq!(Identity::forwarded(&headers), Some(who));
        // Only a broker's word makes it the caller: see `identify`.
    }

    #[test]
    fn patterns_match_exactly_or_by_prefix() {
        assert!(matches("*", "anyone"));
        assert!(matches(
            "spiffe://td/ns/weft/*",
            "spiffe://td/ns/weft/sa/weft"
        ));
        assert!(!matches(
            "spiffe://td/ns/weft/*",
            "spiffe://td/ns/shop/sa/x"
        ));
        assert!(matches("ci", "ci"));
        assert!(!matches("ci", "ci2"));
    }

    #[test]
    fn sidecar_headers_count_only_where_trusted() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "l5d-client-id",
            "web.shop.serviceaccount.identity.linkerd.cluster.local"
                .parse()
                .expect("value"),
        );
        headers.insert(
            "x-forwarded-client-cert",
            "URI=spiffe://td/ns/shop/sa/web".parse().expect("value"),
        );
        let auth = |sidecar| Authenticator {
            listener: "client",
            sidecar,
            tokens: Arc::new(Tokens::default()),
            allowed: Arc::new(Vec::new()),
        };
        assert_eq!(
            auth(Sidecar::None).identify(&headers, None),
            Ok(Identity::anonymous())
        );
        assert_eq!(
            auth(Sidecar::Linkerd)
                .identify(&headers, None)
                .map(|i| i.principal),
            Ok("web.shop.serviceaccount.identity.linkerd.cluster.local".into())
        );
        assert_eq!(
            auth(Sidecar::Envoy)
                .identify(&headers, None)
                .map(|i| i.principal),
            Ok("spiffe://td/ns/shop/sa/web".into())
        );
        let mut bad = http::HeaderMap::new();
        bad.insert(
            http::header::AUTHORIZATION,
            "Bearer nope".parse().expect("value"),
        );
        assert!(matches!(
            auth(Sidecar::None).identify(&bad, None),
            Err(Refusal::Unauthenticated(_))
        ));
    }
}
