//! Drivers: one per system under test. Each turns the harness's topics, partitions, producers and
//! consumer groups into that system's own terms, and names the durability it runs at.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;

pub mod nats;
pub mod process;
pub mod rabbitmq;
pub mod redis;
pub mod weft;

/// Resolves when the system acknowledged one message (for Weft: stored and fsynced).
pub type AckFuture = BoxFuture<'static, Result<()>>;

/// A system under test, started (or reached) and ready.
#[async_trait]
pub trait Driver: Send + Sync {
    /// Creates a topic with this many partitions.
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<()>;
    /// A producer for one topic; `in_flight` is the harness's window per producer.
    async fn producer(
        &self,
        topic: &str,
        partitions: u32,
        in_flight: usize,
    ) -> Result<Box<dyn BenchProducer>>;
    /// A consumer of some partitions of a topic, as a member of `group` (every group receives
    /// every message). Returns once it is subscribed.
    async fn consumer(
        &self,
        topic: &str,
        partitions: &[u32],
        group: &str,
    ) -> Result<Box<dyn BenchConsumer>>;
    /// Stops what the driver started.
    async fn shutdown(self: Box<Self>) -> Result<()>;
}

/// Publishes messages.
#[async_trait]
pub trait BenchProducer: Send {
    /// Hands one message to the client; waits only for the client's own queue. The returned
    /// future resolves on the system's acknowledgement.
    async fn send(
        &mut self,
        partition: u32,
        key: Option<Bytes>,
        payload: Bytes,
    ) -> Result<AckFuture>;
    /// Flushes and closes.
    async fn close(self: Box<Self>) -> Result<()>;
}

/// Receives messages.
#[async_trait]
pub trait BenchConsumer: Send {
    /// The payloads received within `wait` (possibly none).
    async fn poll(&mut self, wait: Duration) -> Result<Vec<Bytes>>;
    /// Closes.
    async fn close(self: Box<Self>) -> Result<()>;
}

/// A stream of received payloads.
pub type PayloadStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Bytes>> + Send>>;

/// A consumer over a client's stream of deliveries (NATS, RabbitMQ): `poll` waits up to `wait`
/// for the first payload, then takes what is already there (4,096 at most).
pub struct StreamConsumer {
    messages: PayloadStream,
}

impl std::fmt::Debug for StreamConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamConsumer")
    }
}

impl StreamConsumer {
    /// Wraps the merged deliveries of every partition the consumer reads.
    pub fn new(messages: PayloadStream) -> StreamConsumer {
        StreamConsumer { messages }
    }
}

#[async_trait]
impl BenchConsumer for StreamConsumer {
    async fn poll(&mut self, wait: Duration) -> Result<Vec<Bytes>> {
        use futures::{FutureExt, StreamExt};
        let mut out = Vec::new();
        match tokio::time::timeout(wait, self.messages.next()).await {
            Ok(Some(item)) => out.push(item?),
            Ok(None) => bail!("consumer stream ended"),
            Err(_) => return Ok(out),
        }
        while out.len() < 4096 {
            match self.messages.next().now_or_never() {
                Some(Some(item)) => out.push(item?),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Durability a driver runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// The system's own default.
    Default,
    /// Every acknowledged message was fsynced first.
    Fsync,
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Durability::Default => "default",
            Durability::Fsync => "fsync",
        })
    }
}

/// The systems the harness knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Weft through weft-client (gRPC over HTTP/2).
    Weft,
    /// Weft through weft-client over QUIC (gRPC over HTTP/3, TLS 1.3).
    WeftQuic,
    /// Three Weft brokers on this machine, one cluster, every partition replicated three times.
    WeftCluster,
    /// NATS JetStream through async-nats.
    Nats,
    /// Three NATS servers on this machine, one JetStream cluster, every stream with R3.
    NatsCluster,
    /// Redis Streams (XADD / XREADGROUP) through redis-rs.
    Redis,
    /// RabbitMQ Streams (the stream protocol) through rabbitmq-stream-client.
    Rabbitmq,
    /// Not a broker: the raw bandwidth of write + fdatasync on the data directory's disk.
    Disk,
}

impl Kind {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Weft => "weft",
            Kind::WeftQuic => "weft-quic",
            Kind::WeftCluster => "weft-cluster",
            Kind::Nats => "nats",
            Kind::NatsCluster => "nats-cluster",
            Kind::Redis => "redis",
            Kind::Rabbitmq => "rabbitmq",
            Kind::Disk => "disk",
        }
    }

    /// Every kind, in the order `list` shows them.
    pub const ALL: [Kind; 8] = [
        Kind::Weft,
        Kind::WeftQuic,
        Kind::WeftCluster,
        Kind::Nats,
        Kind::NatsCluster,
        Kind::Redis,
        Kind::Rabbitmq,
        Kind::Disk,
    ];
}

/// A driver at one durability, and where to find the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverSpec {
    /// Which system.
    pub kind: Kind,
    /// At which durability.
    pub durability: Durability,
    /// A running instance to use instead of starting one (`host:port`).
    pub endpoint: Option<String>,
}

impl DriverSpec {
    /// Short label, e.g. `nats:fsync`.
    pub fn label(&self) -> String {
        format!("{}:{}", self.kind.name(), self.durability)
    }

    /// What the durability means for this system, in words (recorded in every result).
    pub fn durability_detail(&self) -> String {
        match (self.kind, self.durability) {
            (Kind::Weft, _) => {
                "fsync before ack (Weft's default: acknowledged once stored and fdatasynced, group commit)".into()
            }
            (Kind::WeftQuic, _) => {
                "fsync before ack, as weft; the client calls over QUIC (HTTP/3, TLS 1.3) instead of HTTP/2 over TCP".into()
            }
            (Kind::WeftCluster, _) => {
                "3 brokers, replication factor 3: acknowledged once a majority of replicas stored and fdatasynced it".into()
            }
            (Kind::Nats, Durability::Default) => {
                "JetStream default: file storage, acknowledged before fsync (sync_interval 2m)".into()
            }
            (Kind::Nats, Durability::Fsync) => {
                "JetStream file storage with sync_interval: always (fsync before ack)".into()
            }
            (Kind::NatsCluster, Durability::Default) => {
                "3 servers, streams with R3: acknowledged once a majority stored it, before fsync (sync_interval 2m)".into()
            }
            (Kind::NatsCluster, Durability::Fsync) => {
                "3 servers, streams with R3, sync_interval: always (fsync before ack on each replica)".into()
            }
            (Kind::Redis, Durability::Default) => {
                "AOF on, appendfsync everysec (Redis's default AOF policy: acknowledged before fsync)".into()
            }
            (Kind::Redis, Durability::Fsync) => {
                "AOF on, appendfsync always (fsync before ack)".into()
            }
            (Kind::Rabbitmq, _) => {
                "Streams default (the only setting): written to the page cache and confirmed without fsync; RabbitMQ relies on replication".into()
            }
            (Kind::Disk, _) => "raw write + fdatasync of 1 MiB blocks (the disk's limit)".into(),
        }
    }

    /// Parses `kind[:durability][@host:port]`. A bare peer name means both of its settings
    /// when `expand` is set (as in `compare`), its default otherwise.
    pub fn parse_list(text: &str, expand: bool) -> Result<Vec<DriverSpec>> {
        let mut specs = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (head, endpoint) = match item.split_once('@') {
                Some((head, endpoint)) if !endpoint.is_empty() => {
                    (head, Some(endpoint.to_string()))
                }
                Some(_) => bail!("driver {item:?}: empty endpoint after '@'"),
                None => (item, None),
            };
            let (kind, durability) = match head.split_once(':') {
                Some((kind, durability)) => (kind, Some(durability)),
                None => (head, None),
            };
            let kind = match kind {
                "weft" => Kind::Weft,
                "weft-quic" => Kind::WeftQuic,
                "weft-cluster" => Kind::WeftCluster,
                "nats" => Kind::Nats,
                "nats-cluster" => Kind::NatsCluster,
                "redis" => Kind::Redis,
                "rabbitmq" => Kind::Rabbitmq,
                "disk" => Kind::Disk,
                other => {
                    bail!(
                        "unknown driver {other:?} (known: weft, weft-quic, weft-cluster, nats, \
                         nats-cluster, redis, rabbitmq, disk)"
                    )
                }
            };
            let durabilities = match (kind, durability) {
                (Kind::Rabbitmq, Some("fsync")) => bail!(
                    "RabbitMQ Streams cannot fsync before confirming (their log never calls \
                     fsync; there is no setting for it): use rabbitmq or rabbitmq:default"
                ),
                (_, Some("default")) => vec![Durability::Default],
                (_, Some("fsync")) => vec![Durability::Fsync],
                (_, Some(other)) => {
                    bail!("unknown durability {other:?} for {kind:?} (default or fsync)")
                }
                // Weft and the disk always fsync before acknowledging.
                (Kind::Weft | Kind::WeftQuic | Kind::WeftCluster | Kind::Disk, None) => {
                    vec![Durability::Fsync]
                }
                // RabbitMQ Streams have a single setting.
                (Kind::Rabbitmq, None) => vec![Durability::Default],
                (_, None) if expand => vec![Durability::Default, Durability::Fsync],
                (_, None) => vec![Durability::Default],
            };
            if matches!(
                kind,
                Kind::Weft | Kind::WeftQuic | Kind::WeftCluster | Kind::Disk
            ) && durabilities == [Durability::Default]
            {
                bail!(
                    "{} has one durability, fsync before ack; drop ':default'",
                    kind.name()
                );
            }
            if matches!(kind, Kind::Disk | Kind::WeftCluster | Kind::NatsCluster)
                && endpoint.is_some()
            {
                bail!("{} takes no endpoint", kind.name());
            }
            for durability in durabilities {
                specs.push(DriverSpec {
                    kind,
                    durability,
                    endpoint: endpoint.clone(),
                });
            }
        }
        if specs.is_empty() {
            bail!("no drivers given");
        }
        Ok(specs)
    }
}

/// Starts (or connects to) the system a spec names. `data_dir` holds what a started system
/// stores; `disk` is run by the runner itself and has no driver.
pub async fn start(spec: &DriverSpec, data_dir: &Path) -> Result<Box<dyn Driver>> {
    // Peers are given a free port found by binding and releasing it; another process may take
    // it in between, and the server then exits before listening: try again with new ports.
    let mut attempt = 1;
    loop {
        match start_once(spec, data_dir).await {
            Err(e) if attempt < 3 && format!("{e:#}").contains("before listening on") => {
                eprintln!(
                    "{:?}: did not start ({e:#}); trying again on new ports",
                    spec.kind
                );
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

async fn start_once(spec: &DriverSpec, data_dir: &Path) -> Result<Box<dyn Driver>> {
    match spec.kind {
        Kind::Weft => Ok(Box::new(weft::WeftDriver::start(spec, data_dir).await?)),
        Kind::WeftQuic => Ok(Box::new(
            weft::WeftDriver::start_quic(spec, data_dir).await?,
        )),
        Kind::WeftCluster => Ok(Box::new(
            weft::WeftClusterDriver::start(spec, data_dir).await?,
        )),
        Kind::Nats => Ok(Box::new(nats::NatsDriver::start(spec, data_dir).await?)),
        Kind::NatsCluster => Ok(Box::new(
            nats::NatsDriver::start_cluster(spec, data_dir).await?,
        )),
        Kind::Redis => Ok(Box::new(redis::RedisDriver::start(spec, data_dir).await?)),
        Kind::Rabbitmq => Ok(Box::new(
            rabbitmq::RabbitDriver::start(spec, data_dir).await?,
        )),
        Kind::Disk => bail!("disk is not a broker"),
    }
}

/// Whether the programs a driver starts are installed (for `weft-bench drivers` and the smoke
/// test); `Err` says what is missing.
pub fn available(kind: Kind) -> Result<()> {
    match kind {
        Kind::Weft | Kind::WeftQuic | Kind::WeftCluster => weft::broker_binary().map(|_| ()),
        Kind::Nats | Kind::NatsCluster => process::find_program("nats-server").map(|_| ()),
        Kind::Redis => process::find_program("redis-server").map(|_| ()),
        Kind::Rabbitmq => rabbitmq::available(),
        Kind::Disk => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_expand() {
        let specs =
            DriverSpec::parse_list("weft,nats,redis:fsync,rabbitmq,disk", true).expect("parse");
        let labels: Vec<_> = specs.iter().map(DriverSpec::label).collect();
        assert_eq!(
            labels,
            [
                "weft:fsync",
                "nats:default",
                "nats:fsync",
                "redis:fsync",
                "rabbitmq:default",
                "disk:fsync"
            ]
        );
        let single = DriverSpec::parse_list("nats@127.0.0.1:4222", false).expect("parse");
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].durability, Durability::Default);
        assert_eq!(single[0].endpoint.as_deref(), Some("127.0.0.1:4222"));
        assert!(DriverSpec::parse_list("kafka", true).is_err());
        assert!(DriverSpec::parse_list("weft:default", true).is_err());
        assert!(DriverSpec::parse_list("nats:sometimes", true).is_err());
        let refused = DriverSpec::parse_list("rabbitmq:fsync", true).expect_err("no fsync");
        assert!(refused.to_string().contains("cannot fsync"), "{refused}");
        assert!(DriverSpec::parse_list("", true).is_err());
    }
}
