//! The Rust client for Weft.
//!
//! # Layout
//! - [`Client`]: a connection to one or several brokers (load-balanced channel), with every call
//!   carrying a deadline and the `weft-topic` / `weft-partition` metadata that meshes match on.
//! - [`Admin`]: topics and cluster status.
//! - [`Producer`]: batches records per partition by size and linger (a partition with nothing in
//!   flight sends at once: natural batching), keeps a bounded number of batches in flight, and retries with the same producer sequence, so a retry never stores a
//!   record twice.
//! - [`Consumer`]: reads a topic over `Subscribe`, by offset or as a consumer-group member, with
//!   credit-based flow control, heartbeats, automatic reconnection, and manual or automatic commits.
//! - [`Error`]: gRPC statuses decoded into codes and reasons.
//!
//! ```no_run
//! # async fn demo() -> Result<(), weft_client::Error> {
//! use weft_client::{Client, ConsumerConfig, ProducerConfig, Record, StartFrom};
//! let client = Client::connect(["127.0.0.1:7400"]).await?;
//! client.admin().create_topic("orders", 3).await?;
//! let producer = client.producer(ProducerConfig::default());
//! let ack = producer.send("orders", Record::new("hello").key("customer-1")).await?;
//! println!("stored at partition {} offset {}", ack.partition, ack.offset);
//! producer.close().await?;
//! let mut consumer = client
//!     .consumer(ConsumerConfig::new("orders").group("billing").start(StartFrom::Earliest))
//!     .await?;
//! if let Some(message) = consumer.next().await? {
//!     println!("{}", String::from_utf8_lossy(&message.value));
//! }
//! # Ok(()) }
//! ```

mod admin;
mod consumer;
mod error;
mod producer;
mod router;
mod stream;

use std::time::Duration;

use bytes::Bytes;
use tonic::transport::Endpoint;

pub use weft_proto::transport::{self, Transport};
/// The connection every generated client of this crate runs on.
type Channel = Transport;

pub use admin::{Admin, PartitionStatus, Removal, TopicSettings, TopicUpdate};
pub use consumer::{Consumer, ConsumerConfig, Message, StartFrom};
pub use error::{Error, Result};
pub use producer::{
    Ack, AckFuture, IN_FLIGHT_PER_PARTITION_MAX, NOT_STORED_REASONS, Producer, ProducerConfig,
    PublishTransport, murmur2, partition_for_key,
};
pub use weft_proto::v1 as proto;

/// Traces (OpenTelemetry): the producer records a `create` span per record (its context goes
/// into the record's `traceparent` header) and a `publish` span per batch; the consumer a
/// `process` span per record, a child of its creation context. Nothing is recorded until
/// [`telemetry::install_otlp`] exports to a collector, or [`telemetry::enable`] is called after
/// the application installed its own global tracer provider.
pub mod telemetry {
    pub use weft_proto::otel::{Telemetry, enable, enabled, install_otlp};
}

/// A record to publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Key (empty: none). Records with a key go to the partition its hash selects.
    pub key: Bytes,
    /// Value.
    pub value: Bytes,
    /// Ordered headers (name, value).
    pub headers: Vec<(String, Bytes)>,
    /// Creation time in ms since the Unix epoch (0: the broker's clock).
    pub timestamp_ms: i64,
    /// An explicit partition, overriding the key.
    pub partition: Option<u32>,
}

impl Record {
    /// A record with this value.
    pub fn new(value: impl Into<Bytes>) -> Self {
        Record {
            value: value.into(),
            ..Record::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = key.into();
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sends to this partition.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Sets the timestamp.
    pub fn timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = timestamp_ms;
        self
    }

    /// An upper bound of the record's encoded size in a batch (28 bytes of framing, 8 per header).
    pub(crate) fn size(&self) -> usize {
        self.key.len()
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
            + 32
    }

    pub(crate) fn to_proto(&self) -> proto::Record {
        proto::Record {
            key: self.key.clone(),
            value: self.value.clone(),
            timestamp_ms: self.timestamp_ms,
            headers: self
                .headers
                .iter()
                .map(|(k, v)| proto::Header {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            offset: 0,
        }
    }
}

/// A connection to a Weft cluster.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    /// The brokers' addresses over TCP (empty over QUIC), to open more connections to them.
    addresses: std::sync::Arc<Vec<String>>,
    timeout: Duration,
    message_bytes_max: usize,
    options: std::sync::Arc<ConnectOptions>,
}

/// How a client reaches the brokers: TLS and credentials. The default is plaintext HTTP/2
/// (h2c), what a pod whose sidecar does mutual TLS wants; an `https://` address turns TLS on
/// with the system's CAs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    /// TLS to every broker (also to the leaders that metadata names).
    pub tls: Option<TlsOptions>,
    /// A bearer token, sent as `authorization: Bearer TOKEN` on every call (for callers
    /// outside a mesh; the broker knows it by its hash).
    pub token: Option<String>,
}

/// TLS settings of a client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM CA bundle that signs the brokers' certificates (None: the system's CAs).
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate, for brokers that ask for one (mutual TLS).
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key of the client certificate.
    pub key_file: Option<std::path::PathBuf>,
    /// The name the brokers' certificates must carry, when it is not the host dialled.
    pub server_name: Option<String>,
}

impl ConnectOptions {
    /// tonic's TLS configuration for these options (None: plaintext).
    fn tls_config(&self, address: &str) -> Result<Option<tonic::transport::ClientTlsConfig>> {
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path).map_err(|e| {
                Error::InvalidArgument(format!("cannot read the {what} {}: {e}", path.display()))
            })
        };
        let Some(tls) = &self.tls else {
            return Ok(address
                .starts_with("https://")
                .then(|| tonic::transport::ClientTlsConfig::new().with_native_roots()));
        };
        let mut config = tonic::transport::ClientTlsConfig::new();
        config = match &tls.ca_file {
            Some(ca) => config.ca_certificate(tonic::transport::Certificate::from_pem(read(
                ca, "CA file",
            )?)),
            None => config.with_native_roots(),
        };
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                config = config.identity(tonic::transport::Identity::from_pem(
                    read(cert, "client certificate")?,
                    read(key, "client key")?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(Error::InvalidArgument(
                    "a client certificate needs both a certificate and a key file".into(),
                ));
            }
        }
        if let Some(name) = &tls.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(Some(config))
    }
}

fn endpoint(address: &str, options: &ConnectOptions) -> Result<Endpoint> {
    let tls = options.tls_config(address)?;
    let uri = if address.contains("://") {
        address.to_string()
    } else if tls.is_some() {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(uri.clone())
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
        })
        .map_err(|e| Error::InvalidArgument(format!("bad endpoint {address:?}: {e}")))?;
    match tls {
        Some(tls) => endpoint
            .tls_config(tls)
            .map_err(|e| Error::InvalidArgument(format!("TLS for {address:?}: {e}"))),
        None => Ok(endpoint),
    }
}

/// Calls spread over several brokers, leaving out those that cannot be reached (see
/// [`weft_proto::transport::Spread`]).
fn spread(endpoints: Vec<Endpoint>, options: &ConnectOptions) -> Result<Transport> {
    Transport::spread(endpoints)
        .with_bearer_token(options.token.as_deref())
        .map_err(Error::InvalidArgument)
}

fn transport(channel: tonic::transport::Channel, options: &ConnectOptions) -> Result<Transport> {
    Transport::new(channel)
        .with_bearer_token(options.token.as_deref())
        .map_err(Error::InvalidArgument)
}

impl Client {
    /// Connects to one or several brokers (`host:port`); calls go to them in turn, each over
    /// its own connection, and one that cannot be reached is left out until a connection to it
    /// succeeds again (tried in the background).
    pub async fn connect<I, S>(addresses: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Client::connect_with(addresses, ConnectOptions::default()).await
    }

    /// [`Client::connect`] with TLS and credentials.
    pub async fn connect_with<I, S>(addresses: I, options: ConnectOptions) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let addresses: Vec<String> = addresses
            .into_iter()
            .map(|a| a.as_ref().trim().to_string())
            .collect();
        if addresses.iter().any(|a| a.starts_with("quic://")) {
            return Client::connect_quic(&addresses, options).await;
        }
        let endpoints: Vec<Endpoint> = addresses
            .iter()
            .map(|a| endpoint(a, &options))
            .collect::<Result<_>>()?;
        let Some(first) = endpoints.first().cloned() else {
            return Err(Error::InvalidArgument("no broker address given".into()));
        };
        let channel = if endpoints.len() == 1 {
            transport(
                first.connect().await.map_err(|e| Error::Connect {
                    endpoint: first.uri().to_string(),
                    message: source_chain(&e),
                })?,
                &options,
            )?
        } else {
            spread(endpoints, &options)?
        };
        Ok(Client {
            channel,
            addresses: std::sync::Arc::new(addresses),
            timeout: Duration::from_secs(30),
            message_bytes_max: 16 * 1024 * 1024,
            options: std::sync::Arc::new(options),
        })
    }

    /// Over QUIC (HTTP/3): one connection at a time, to the first of `addresses` (each
    /// `quic://HOST:PORT`) that completes a handshake; when it is lost the next call connects to
    /// another of them (the one after it first), so calls carry on while a broker is away. TLS
    /// is part of QUIC: the brokers' certificates are checked against `options.tls`'s CA file
    /// (else the system's CAs), and its client certificate, if any, is presented.
    async fn connect_quic(addresses: &[String], options: ConnectOptions) -> Result<Client> {
        let tls = options.tls.clone().unwrap_or_default();
        let files = weft_proto::tls::TlsFiles {
            cert_file: tls.cert_file.clone(),
            key_file: tls.key_file.clone(),
            ca_file: tls.ca_file.clone(),
        };
        let mut targets = Vec::new();
        for address in addresses {
            let Some(host_port) = address.strip_prefix("quic://") else {
                return Err(Error::InvalidArgument(format!(
                    "{address:?}: give every broker as quic://HOST:PORT, or none"
                )));
            };
            let host_port = host_port.trim_end_matches('/');
            let host = match host_port.rsplit_once(':') {
                Some((host, port)) if port.parse::<u16>().is_ok() && !host.is_empty() => host,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "bad endpoint {address:?}: expected quic://HOST:PORT"
                    )));
                }
            };
            let server_name = tls.server_name.clone().unwrap_or_else(|| {
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            });
            targets.push(weft_proto::quic::QuicTarget {
                address: host_port.to_string(),
                server_name,
            });
        }
        let config = weft_proto::tls::client_config(&files).map_err(Error::InvalidArgument)?;
        let channel = weft_proto::quic::QuicChannel::to_any(targets, config)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", addresses.join(","))))?;
        channel.connect().await.map_err(|message| Error::Connect {
            endpoint: addresses.join(","),
            message,
        })?;
        let transport = Transport::quic(channel)
            .with_bearer_token(options.token.as_deref())
            .map_err(Error::InvalidArgument)?;
        Ok(Client {
            channel: transport,
            addresses: std::sync::Arc::new(Vec::new()),
            timeout: Duration::from_secs(30),
            message_bytes_max: 16 * 1024 * 1024,
            options: std::sync::Arc::new(options),
        })
    }

    /// Whether this client calls over QUIC (then every call goes to the broker it connected
    /// to, which forwards to leaders: the leaders' advertised addresses are TCP ones).
    pub fn is_quic(&self) -> bool {
        self.channel.is_quic()
    }

    /// The TLS and credentials this client connects with.
    pub fn options(&self) -> &ConnectOptions {
        &self.options
    }

    /// A client of the broker at `address` with this client's settings (connected on first use).
    pub(crate) fn to_address(&self, address: &str) -> Result<Client> {
        Ok(Client {
            channel: transport(
                endpoint(address, &self.options)?.connect_lazy(),
                &self.options,
            )?,
            addresses: std::sync::Arc::new(vec![address.to_string()]),
            timeout: self.timeout,
            message_bytes_max: self.message_bytes_max,
            options: self.options.clone(),
        })
    }

    /// This client on an HTTP/2 connection of its own (opened on first use), for a consumer's
    /// stream: the deliveries it has not read yet then hold only that connection's flow-control
    /// window, never the window that this client's other consumers, producers and calls share
    /// (a consumer not being read would otherwise stop them all once its deliveries filled the
    /// connection's window). Over QUIC the connection is shared: its connection-level receive
    /// window is unbounded (quinn's default), so only each stream's own window applies.
    pub(crate) fn own_connection(&self) -> Result<Client> {
        let channel = match self.addresses.as_slice() {
            [] => return Ok(self.clone()),
            [address] => return self.to_address(address),
            addresses => spread(
                addresses
                    .iter()
                    .map(|a| endpoint(a, &self.options))
                    .collect::<Result<Vec<_>>>()?,
                &self.options,
            )?,
        };
        Ok(Client {
            channel,
            ..self.clone()
        })
    }

    /// Who the broker takes this client to be (the identity its ACLs and audit lines use):
    /// (principal, source).
    pub async fn who_am_i(&self) -> Result<(String, String)> {
        let answer = self
            .metadata()
            .who_am_i(self.request(proto::WhoAmIRequest {}, None, None))
            .await
            .map_err(Error::from)?
            .into_inner();
        Ok((answer.principal, answer.source))
    }

    /// Sets the deadline of unary calls (default 30 s); also the longest a subscription waits
    /// for its stream's headers and first assignment.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The deadline of unary calls.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The admin API.
    pub fn admin(&self) -> Admin {
        Admin::new(self.clone())
    }

    /// A producer.
    pub fn producer(&self, config: ProducerConfig) -> Producer {
        Producer::new(self.clone(), config)
    }

    /// A consumer; it subscribes at once.
    pub async fn consumer(&self, config: ConsumerConfig) -> Result<Consumer> {
        Consumer::new(self.clone(), config).await
    }

    pub(crate) fn publisher(&self) -> proto::publisher_client::PublisherClient<Channel> {
        proto::publisher_client::PublisherClient::new(self.channel.clone())
            .max_decoding_message_size(self.message_bytes_max)
            .max_encoding_message_size(self.message_bytes_max)
    }

    pub(crate) fn subscriber(&self) -> proto::subscriber_client::SubscriberClient<Channel> {
        proto::subscriber_client::SubscriberClient::new(self.channel.clone())
            .max_decoding_message_size(self.message_bytes_max)
            .max_encoding_message_size(self.message_bytes_max)
    }

    pub(crate) fn topic_admin(&self) -> proto::topic_admin_client::TopicAdminClient<Channel> {
        proto::topic_admin_client::TopicAdminClient::new(self.channel.clone())
    }

    pub(crate) fn cluster(&self) -> proto::cluster_client::ClusterClient<Channel> {
        proto::cluster_client::ClusterClient::new(self.channel.clone())
    }

    pub(crate) fn metadata(&self) -> proto::metadata_client::MetadataClient<Channel> {
        proto::metadata_client::MetadataClient::new(self.channel.clone())
    }

    /// A topic's configuration in force and its partitions with their leaders, from the
    /// read-only `Metadata` service (what producers and consumers call: never `TopicAdmin` or
    /// `Cluster`, which a mesh may keep for operators).
    pub async fn topic_metadata(&self, name: &str) -> Result<proto::Topic> {
        let request = self.request(
            proto::GetTopicRequest { name: name.into() },
            Some(name),
            None,
        );
        Ok(self
            .metadata()
            .get_topic(request)
            .await
            .map_err(Error::from)?
            .into_inner())
    }

    /// A request with a deadline and the topic (and partition) mirrored into metadata.
    pub(crate) fn request<T>(
        &self,
        body: T,
        topic: Option<&str>,
        partition: Option<u32>,
    ) -> tonic::Request<T> {
        let mut request = tonic::Request::new(body);
        request.set_timeout(self.timeout);
        if let Some(topic) = topic.and_then(|t| t.parse().ok()) {
            request
                .metadata_mut()
                .insert(weft_proto::TOPIC_HEADER, topic);
        }
        if let Some(partition) = partition.and_then(|p| p.to_string().parse().ok()) {
            request
                .metadata_mut()
                .insert(weft_proto::PARTITION_HEADER, partition);
        }
        request
    }

    /// [`Client::request`] of a group call: the group mirrored into `weft-group` too.
    pub(crate) fn group_request<T>(
        &self,
        body: T,
        topic: Option<&str>,
        group: &str,
    ) -> tonic::Request<T> {
        let mut request = self.request(body, topic, None);
        mirror_group(&mut request, group);
        request
    }
}

/// Mirrors `group` into the `weft-group` request metadata (nothing for an empty group).
pub(crate) fn mirror_group<T>(request: &mut tonic::Request<T>, group: &str) {
    if group.is_empty() {
        return;
    }
    if let Ok(value) = group.parse() {
        request
            .metadata_mut()
            .insert(weft_proto::GROUP_HEADER, value);
    }
}

fn source_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}
