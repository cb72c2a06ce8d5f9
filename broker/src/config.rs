//! The broker's one configuration type. Precedence: command-line flags > `WEFT_*` environment
//! variables > the TOML file (`--config`) > defaults. Every key is documented in
//! `broker/weft.example.toml`; [`Config::validate`] names the offending key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

/// A configuration error, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file is not valid TOML for this config (unknown key, wrong type...).
    #[error("invalid config file {path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, which names the key and line.
        reason: String,
    },
    /// A value is out of range.
    #[error("invalid config: {key}: {reason}")]
    Invalid {
        /// The key, as written in the file.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// Broker configuration. Keys end in their unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's id (unique, never reused; the StatefulSet ordinal + 1 in Kubernetes).
    pub node_id: u64,
    /// Where all data lives: partition logs, the controller log, metadata.
    pub data_dir: PathBuf,
    /// Client gRPC listener (Publisher, Subscriber, TopicAdmin, Cluster, health, reflection).
    pub client_listen: SocketAddr,
    /// Broker-to-broker gRPC listener.
    pub peer_listen: SocketAddr,
    /// Admin HTTP listener (/healthz, /readyz, /metrics, /v1, /openapi.json).
    pub admin_listen: SocketAddr,
    /// An optional QUIC listener (UDP) serving the client gRPC services over HTTP/3, for
    /// clients outside a mesh (`quic://HOST:PORT`); it needs TLS (`tls.quic`, else
    /// `tls.client`). None: no QUIC.
    pub quic_listen: Option<SocketAddr>,
    /// Address clients are told to use for this node; defaults to the client listener.
    pub advertised_client_address: Option<String>,
    /// Name of the Raft cluster (must match on every node).
    pub cluster_name: String,
    /// Every broker of the cluster as `ID@HOST:PORT` (its node id and peer address), this one
    /// included; empty for a single node. The broker with the lowest id initialises a new
    /// cluster; every other one joins it through any broker of the list.
    pub peers: Vec<String>,
    /// Take the node id from the ordinal at the end of the host name, plus one (`weft-0` is node
    /// 1, `weft-2` node 3), as a StatefulSet's pods are named. Node ids start at 1: 0 means "no
    /// node" in Raft votes on the wire.
    pub node_id_from_host_name: bool,
    /// Instead of `peers`: every broker's peer address from a pattern in which `{ordinal}` is
    /// replaced by 0 .. `cluster_size` - 1 (node ids 1 .. `cluster_size`), e.g.
    /// `weft-{ordinal}.weft-peers.default.svc:7401`. Stable DNS names, never stored IPs.
    pub peer_address_pattern: Option<String>,
    /// Number of brokers the `peer_address_pattern` names.
    pub cluster_size: u32,
    /// Sidecar upstreams, as `PEER_ADDRESS=LOCAL_ADDRESS`: this broker reaches the peer whose
    /// address is PEER_ADDRESS (as in `peers`, or as it registered) by dialling LOCAL_ADDRESS,
    /// a local proxy's outbound listener that carries the call to it (Consul's upstreams, an
    /// nginx or Envoy sidecar without transparent interception). Empty: peers are dialled at
    /// their own addresses.
    pub peer_upstreams: Vec<String>,

    /// Most records in one publish.
    pub batch_records_max: u32,
    /// Largest gRPC message accepted, in bytes (a publish or a fetch response). A topic
    /// created or changed through this broker may not allow larger records.
    pub grpc_message_bytes_max: u32,
    /// Deadline for any unary call that sets none (and the ceiling for those that do).
    pub request_timeout_ms: u64,
    /// Longest a Fetch may wait for data.
    pub fetch_wait_ms_max: u64,
    /// Record bytes a Fetch returns when it asks for no limit, and the most it may ask for.
    pub fetch_bytes_max: u32,
    /// Most concurrent streams (Subscribe, PublishStream) per connection.
    pub streams_per_connection_max: u32,
    /// Most client connections held at once (HTTP/2 and QUIC together). Past it, a few more
    /// HTTP/2 connections may only check health or drain (`tls::ConnectionSlots`); beyond
    /// those one is closed at once. Counted in `weft_client_connections_refused_total`.
    pub connections_max: u32,
    /// How long a client connection may have no call open (no unary call being answered, no
    /// stream) before the broker closes it, as Kafka's `connections.max.idle.ms` (10 minutes
    /// by default, as Kafka's); 0 keeps idle connections open. Our client connects again on
    /// its next call.
    pub connections_idle_ms: u64,
    /// Most admin API (HTTP) connections held at once: one past it is closed once accepted
    /// (counted in `weft_admin_connections_refused_total`). An admin request is answered 504
    /// once it has taken four times `request_timeout_ms` plus 2 s (its steps each wait up to
    /// `request_timeout_ms`), and an admin connection is closed once nothing has gone out on
    /// it for 2 s more than that (a request that does not come whole, an idle keep-alive).
    pub admin_connections_max: u32,
    /// Most partition replicas per broker that topic creation and growth may reach: a topic
    /// created or grown past it (on any broker it would place replicas on) is refused with
    /// LIMIT_REACHED, and so is a replica move onto a broker that holds that many; rebalances
    /// and removals plan no replica onto a full broker. Checked by the broker receiving the
    /// call, against its copy of the metadata, and again by the controller when it applies the
    /// change (with the receiving broker's value).
    pub partition_replicas_max: u32,
    /// Age after which the server ends a Subscribe stream with UNAVAILABLE, so meshes rebalance.
    pub stream_age_ms_max: u64,
    /// Heartbeat interval on idle Subscribe streams.
    pub stream_heartbeat_ms: u64,
    /// Consumer-group session timeout when the client asks for none.
    pub session_timeout_ms: u64,
    /// Most consumer groups with members or committed offsets; a new group past it (its
    /// first join or commit) is refused with RESOURCE_EXHAUSTED (LIMIT_REACHED). At most
    /// 50,000, so a list of every group fits in one answer.
    pub groups_max: u32,
    /// Most stored ACL rules (`weft acl add`, `POST /v1/acls`): one more is refused with
    /// RESOURCE_EXHAUSTED (LIMIT_REACHED). Every rule is in the replicated controller state
    /// and its snapshots, and every authorised call reads them.
    pub acl_rules_max: u32,
    /// A consumer group with no members that committed nothing for this long loses its
    /// committed offsets, as with Kafka's `offsets.retention.minutes` (default 7 days).
    pub offsets_retention_ms: u64,
    /// Most members of one consumer group; one more is refused with RESOURCE_EXHAUSTED
    /// (LIMIT_REACHED).
    pub group_members_max: u32,
    /// Most publishes queued per partition before RESOURCE_EXHAUSTED.
    pub publish_queue_max: u32,
    /// Most bytes of publishes queued on this broker, all partitions together, before
    /// RESOURCE_EXHAUSTED (OVERLOADED, with a retry hint): what publishes waiting for their
    /// partitions hold in memory during a slow disk. One partition holds at most a quarter of it
    /// (the others keep room while its queue does not drain). A batch larger than that is taken
    /// alone.
    pub publish_queue_bytes_max: u64,
    /// How often retention runs.
    pub retention_check_interval_ms: u64,
    /// A partition writes a snapshot of its state after this many record bytes were applied
    /// since the last one (and before retention, and at shutdown). A restart after a crash
    /// re-applies at most about this much of the log.
    pub snapshot_interval_bytes: u64,
    /// Bytes of each partition's most recent record batches kept in memory, so consumers that
    /// keep up read without touching the disk or the log's lock; older reads go to the segments
    /// on blocking threads. 0 keeps none.
    pub partition_read_cache_bytes: u64,
    /// How the flusher makes a round of several partitions' appends durable: "syncfs" (one
    /// syncfs of the data filesystem; best on a volume of its own) or "fdatasync" (one per
    /// partition log, side by side; for a filesystem shared with other busy writers).
    pub flush_sync: String,
    /// Write partition segments with direct I/O (`O_DIRECT`, whole 4 KiB blocks) instead of
    /// through the page cache: no copy into the kernel per append and no page cache charged to
    /// the broker's memory limit for its writes; reads older than the tail cache then come from
    /// the disk. The sync before an acknowledgement is unchanged. A filesystem that refuses
    /// direct I/O gets buffered writes (with a warning in the log). Off by default.
    pub direct_io: bool,
    /// A partition forgets an idempotent producer that sent nothing for this long by the
    /// partition's clock (the latest record time it stored), as Kafka's
    /// `producer.id.expiration.ms` does: its state no longer grows with every producer that ever
    /// wrote. A producer idle that long starts over in a new epoch.
    pub producer_expiration_ms: u64,
    /// Most idempotent producers one partition remembers: a new one past it is refused with
    /// RESOURCE_EXHAUSTED (LIMIT_REACHED) until idle ones expire.
    pub producers_per_partition_max: u32,
    /// Graceful shutdown: how long in-flight work may take before the broker exits anyway.
    pub shutdown_grace_ms: u64,

    /// In a cluster, how often a broker moves the leadership of partitions it leads back to
    /// their preferred replica (the first, so leaders spread) when that broker is up, caught up
    /// and not draining; 0 never does; otherwise 100 to 86,400,000.
    pub leader_balance_interval_ms: u64,
    /// Raft heartbeat interval; also how long a leader waits for a follower to take an
    /// AppendEntries (written and synced there).
    pub raft_heartbeat_ms: u64,
    /// Raft election timeout (minimum; the maximum is a quarter more). A follower that stops
    /// hearing its leader stands for election after the leader's lease (the maximum) plus a
    /// random election timeout: about 3.4-3.8 s with the default.
    pub raft_election_timeout_ms: u64,

    /// Log line format on stderr: "text" (colours only on a terminal) or "json" (one object
    /// per line, for log collectors).
    pub log_format: String,
    /// Which log lines are written, as `tracing` filter directives (`info`,
    /// `info,weft_broker::raft=debug`); the `WEFT_LOG` environment variable overrides it, and
    /// `PUT /v1/log-level` on the admin API changes it at run time.
    pub log_level: String,
    /// Defaults for topics that do not set them.
    pub topic_defaults: TopicDefaults,
    /// TLS per listener (none by default: plaintext h2c, what a pod behind a mesh sidecar
    /// wants, since the sidecar does mutual TLS and application TLS would hide the calls).
    pub tls: TlsConfig,
    /// Who callers are: trusted sidecar headers, bearer tokens, the brokers' own identities.
    pub auth: AuthConfig,
    /// Access control by identity, resource and operation (see `acl.rs`).
    pub acl: AclConfig,
    /// Traces exported over OTLP (none by default).
    pub telemetry: TelemetryConfig,
}

/// Traces (OpenTelemetry): spans of every publish (receive, replicate), delivery and fetch,
/// joined to the producers' and consumers' spans through the W3C context each record carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Where spans go, over OTLP/gRPC: `http://HOST:4317` (an OpenTelemetry Collector, Jaeger,
    /// Tempo ...). None: no span is recorded, at no cost.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` the spans carry.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "weft-broker".into(),
        }
    }
}

/// Access control.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// Check every call against the rules; deny what no rule allows. Off: every call is
    /// allowed.
    pub enabled: bool,
    /// This broker's own allow rules (`[[acl.rules]]`: identity, resource, operations), on top
    /// of those stored in the controller (`weft acl add`).
    pub rules: Vec<crate::acl::AclRule>,
}

/// TLS of the three listeners, each optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The client listener (gRPC).
    pub client: Option<ListenerTls>,
    /// The peer listener, and this broker's calls to its peers: it presents `cert_file` as its
    /// client certificate and checks the peers' certificates against `ca_file`.
    pub peer: Option<ListenerTls>,
    /// The admin listener (HTTP/1.1 and HTTP/2).
    pub admin: Option<ListenerTls>,
    /// The QUIC listener (TLS 1.3 is part of QUIC); without it the QUIC listener uses
    /// `tls.client`'s files.
    pub quic: Option<ListenerTls>,
    /// How often certificate, key and CA files are read for changes; a change takes effect
    /// for new connections without a restart.
    pub reload_interval_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            client: None,
            peer: None,
            admin: None,
            quic: None,
            reload_interval_ms: 5_000,
        }
    }
}

/// TLS on one listener.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerTls {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of the certificate.
    pub key_file: PathBuf,
    /// PEM CA bundle that signs client certificates (and, on the peer listener, the other
    /// brokers' certificates). Unset: callers are not asked for a certificate.
    pub ca_file: Option<PathBuf>,
    /// With `ca_file`: "required" (mutual TLS, the default) or "optional" (checked when given;
    /// a caller without one may identify by a bearer token, or stay anonymous).
    pub client_auth: Option<String>,
}

impl ListenerTls {
    /// The files, as the TLS module takes them.
    pub fn files(&self) -> weft_proto::tls::TlsFiles {
        weft_proto::tls::TlsFiles {
            cert_file: Some(self.cert_file.clone()),
            key_file: Some(self.key_file.clone()),
            ca_file: self.ca_file.clone(),
        }
    }

    /// Whether callers are asked for a certificate.
    pub fn client_auth(&self) -> weft_proto::tls::ClientAuth {
        match (&self.ca_file, self.client_auth.as_deref()) {
            (None, _) => weft_proto::tls::ClientAuth::None,
            (Some(_), Some("optional")) => weft_proto::tls::ClientAuth::Optional,
            (Some(_), _) => weft_proto::tls::ClientAuth::Required,
        }
    }
}

/// Identities (see `auth.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The sidecar whose forwarded client identity the client listener trusts: "none" (the
    /// default), "envoy" (Istio, Consul: `x-forwarded-client-cert`) or "linkerd"
    /// (`l5d-client-id`). Set it only when the listener is reachable through that sidecar
    /// alone: anyone can send those headers.
    pub client_sidecar: String,
    /// The same for the peer listener.
    pub peer_sidecar: String,
    /// The same for the admin listener.
    pub admin_sidecar: String,
    /// Static bearer tokens for callers outside a mesh, as `NAME=sha256:HEX` (the SHA-256 of
    /// the token in hex, as `printf %s "$TOKEN" | sha256sum` prints it; never the token).
    /// A call with `authorization: Bearer TOKEN` is NAME; an unknown token is refused.
    pub tokens: Vec<String>,
    /// The brokers' identities (exact, or a prefix ending in `*`, such as
    /// `spiffe://cluster.local/ns/weft/sa/weft`): when set, the peer listener serves only
    /// them. Empty: the peer port is open to whoever reaches it (keep it unreachable).
    pub broker_identities: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            client_sidecar: "none".into(),
            peer_sidecar: "none".into(),
            admin_sidecar: "none".into(),
            tokens: Vec::new(),
            broker_identities: Vec::new(),
        }
    }
}

/// Topic settings used when a create request leaves them unset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicDefaults {
    /// Partitions.
    pub partitions: u32,
    /// Replication factor, 1 to 16 (capped by the number of brokers).
    pub replication_factor: u32,
    /// Largest batch, encoded.
    pub max_message_bytes: u32,
    /// Segment file size.
    pub segment_bytes: u64,
    /// "always" (fsync before ack) or "interval".
    pub fsync_policy: String,
    /// Sync interval for "interval".
    pub fsync_interval_ms: u32,
    /// Retention by size per partition (none when absent).
    pub retention_bytes: Option<u64>,
    /// Retention by age (none when absent).
    pub retention_ms: Option<u64>,
}

impl Default for TopicDefaults {
    fn default() -> Self {
        TopicDefaults {
            partitions: 1,
            replication_factor: 3,
            max_message_bytes: 1024 * 1024,
            segment_bytes: 256 * 1024 * 1024,
            fsync_policy: "always".into(),
            fsync_interval_ms: 100,
            retention_bytes: None,
            retention_ms: Some(7 * 24 * 3600 * 1000),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            data_dir: PathBuf::from("weft-data"),
            client_listen: ([0, 0, 0, 0], 7400).into(),
            peer_listen: ([0, 0, 0, 0], 7401).into(),
            admin_listen: ([0, 0, 0, 0], 7402).into(),
            quic_listen: None,
            advertised_client_address: None,
            cluster_name: "weft".into(),
            peers: Vec::new(),
            node_id_from_host_name: false,
            peer_address_pattern: None,
            peer_upstreams: Vec::new(),
            cluster_size: 0,
            batch_records_max: 10_000,
            grpc_message_bytes_max: 16 * 1024 * 1024,
            request_timeout_ms: 30_000,
            fetch_wait_ms_max: 30_000,
            fetch_bytes_max: 4 * 1024 * 1024,
            streams_per_connection_max: 256,
            connections_max: 10_000,
            connections_idle_ms: 600_000,
            admin_connections_max: 128,
            partition_replicas_max: 10_000,
            stream_age_ms_max: 15 * 60 * 1000,
            stream_heartbeat_ms: 5_000,
            session_timeout_ms: 10_000,
            groups_max: 10_000,
            acl_rules_max: 10_000,
            offsets_retention_ms: 7 * 24 * 3600 * 1000,
            group_members_max: 1_000,
            publish_queue_max: 1024,
            publish_queue_bytes_max: 256 * 1024 * 1024,
            retention_check_interval_ms: 60_000,
            snapshot_interval_bytes: 64 * 1024 * 1024,
            partition_read_cache_bytes: 2 * 1024 * 1024,
            flush_sync: "syncfs".into(),
            direct_io: false,
            producer_expiration_ms: 24 * 3600 * 1000,
            producers_per_partition_max: 10_000,
            shutdown_grace_ms: 10_000,
            leader_balance_interval_ms: 5000,
            raft_heartbeat_ms: 500,
            raft_election_timeout_ms: 1500,
            log_format: "text".into(),
            log_level: crate::logging::DEFAULT_FILTER.into(),
            topic_defaults: TopicDefaults::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            acl: AclConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

/// This machine's (or pod's) host name: `$HOSTNAME`, else /etc/hostname.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_default()
}

/// Command-line flags; each also reads a `WEFT_*` environment variable.
#[derive(Debug, Default, Parser)]
#[command(name = "weft-broker", version, about = "The Weft message broker")]
pub struct Flags {
    /// TOML config file.
    #[arg(long, env = "WEFT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Node id.
    #[arg(long, env = "WEFT_NODE_ID")]
    pub node_id: Option<u64>,
    /// Data directory.
    #[arg(long, env = "WEFT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Client gRPC listen address.
    #[arg(long, env = "WEFT_CLIENT_LISTEN")]
    pub client_listen: Option<SocketAddr>,
    /// Peer gRPC listen address.
    #[arg(long, env = "WEFT_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Admin HTTP listen address.
    #[arg(long, env = "WEFT_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// QUIC (HTTP/3) listen address, UDP; needs TLS.
    #[arg(long, env = "WEFT_QUIC_LISTEN")]
    pub quic_listen: Option<SocketAddr>,
    /// Address advertised to clients.
    #[arg(long, env = "WEFT_ADVERTISED_CLIENT_ADDRESS")]
    pub advertised_client_address: Option<String>,
    /// Every broker of the cluster, `ID@HOST:PORT` (node id and peer address), comma-separated.
    #[arg(long, env = "WEFT_PEERS", value_delimiter = ',')]
    pub peers: Option<Vec<String>>,
    /// Take the node id from the host name's ordinal, plus one (`weft-2` is node 3).
    #[arg(long, env = "WEFT_NODE_ID_FROM_HOST_NAME")]
    pub node_id_from_host_name: bool,
    /// Every broker's peer address from a pattern with `{ordinal}` (with --cluster-size).
    #[arg(long, env = "WEFT_PEER_ADDRESS_PATTERN")]
    pub peer_address_pattern: Option<String>,
    /// Sidecar upstreams, `PEER_ADDRESS=LOCAL_ADDRESS`, comma-separated: dial LOCAL_ADDRESS
    /// to reach the peer at PEER_ADDRESS.
    #[arg(long, env = "WEFT_PEER_UPSTREAMS", value_delimiter = ',')]
    pub peer_upstreams: Option<Vec<String>>,
    /// Number of brokers the peer address pattern names.
    #[arg(long, env = "WEFT_CLUSTER_SIZE")]
    pub cluster_size: Option<u32>,
    /// Default replication factor of new topics.
    #[arg(long, env = "WEFT_DEFAULT_REPLICATION_FACTOR")]
    pub default_replication_factor: Option<u32>,
    /// Log filter (`info`, `warn,weft_broker::raft=debug`).
    #[arg(long, env = "WEFT_LOG")]
    pub log_level: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "WEFT_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Export traces over OTLP/gRPC to this endpoint (`http://collector:4317`).
    #[arg(long, env = "WEFT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Check the configuration (file, environment, flags) and exit: 0 and a one-line summary
    /// when it is valid, 2 and the reason when not. Binds nothing, touches no data.
    #[arg(long)]
    pub check_config: bool,
}

/// Whether `address` is HOST:PORT (a host, and a port from 1 to 65535).
fn is_host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

impl Config {
    /// Loads the file (if any), then applies environment variables and flags, then validates.
    pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
        let mut config = match &flags.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => {
                $(if let Some(value) = &flags.$field { config.$field = value.clone().into(); })*
            };
        }
        set!(node_id, data_dir, client_listen, peer_listen, admin_listen);
        if let Some(address) = flags.quic_listen {
            config.quic_listen = Some(address);
        }
        if let Some(address) = &flags.advertised_client_address {
            config.advertised_client_address = Some(address.clone());
        }
        if let Some(peers) = &flags.peers {
            config.peers = peers.clone();
        }
        if let Some(upstreams) = &flags.peer_upstreams {
            config.peer_upstreams = upstreams.clone();
        }
        if let Some(rf) = flags.default_replication_factor {
            config.topic_defaults.replication_factor = rf;
        }
        if flags.node_id_from_host_name {
            config.node_id_from_host_name = true;
        }
        if let Some(pattern) = &flags.peer_address_pattern {
            config.peer_address_pattern = Some(pattern.clone());
        }
        if let Some(size) = flags.cluster_size {
            config.cluster_size = size;
        }
        if let Some(level) = &flags.log_level {
            config.log_level = level.clone();
        }
        if let Some(format) = &flags.log_format {
            config.log_format = format.clone();
        }
        if let Some(endpoint) = &flags.otlp_endpoint {
            config.telemetry.otlp_endpoint = Some(endpoint.clone());
        }
        config.resolve_identity(&host_name())?;
        config.validate()?;
        Ok(config)
    }

    /// Applies `node_id_from_host_name` (with `host_name`, the machine's or pod's name) and
    /// `peer_address_pattern`: the node id and the `peers` list they stand for.
    pub fn resolve_identity(&mut self, host_name: &str) -> Result<(), ConfigError> {
        if self.node_id_from_host_name {
            let ordinal = host_name
                .rsplit_once('-')
                .and_then(|(_, tail)| tail.parse::<u64>().ok())
                .ok_or_else(|| ConfigError::Invalid {
                    key: "node_id_from_host_name",
                    reason: format!(
                        "the host name {host_name:?} does not end in -<ordinal> (as weft-2 does)"
                    ),
                })?;
            self.node_id = ordinal
                .checked_add(1)
                .filter(|id| *id <= u64::MAX / 2)
                .ok_or_else(|| ConfigError::Invalid {
                    key: "node_id_from_host_name",
                    reason: format!(
                        "the ordinal of the host name {host_name:?} is too large for a node id"
                    ),
                })?;
        }
        if let Some(pattern) = &self.peer_address_pattern {
            let invalid = |reason: String| ConfigError::Invalid {
                key: "peer_address_pattern",
                reason,
            };
            if !pattern.contains("{ordinal}") {
                return Err(invalid(format!("{pattern:?} has no {{ordinal}}")));
            }
            if !(1..=1000).contains(&self.cluster_size) {
                return Err(ConfigError::Invalid {
                    key: "cluster_size",
                    reason: format!(
                        "{} is outside 1 ..= 1000 (the brokers the pattern names)",
                        self.cluster_size
                    ),
                });
            }
            let named: Vec<String> = (0..self.cluster_size)
                .map(|i| format!("{}@{}", i + 1, pattern.replace("{ordinal}", &i.to_string())))
                .collect();
            // `peers` as the pattern names them is what `--print-config` writes (with the
            // pattern): such a file loads again. Other peers beside a pattern are refused.
            if !self.peers.is_empty() && self.peers != named {
                return Err(invalid(
                    "give peers or peer_address_pattern, not both (peers differ from the ones \
                     the pattern names)"
                        .into(),
                ));
            }
            self.peers = named;
        }
        Ok(())
    }

    /// Parses a TOML file (unknown keys are errors).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Config::from_toml(&text).map_err(|reason| ConfigError::Parse {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))
    }

    /// The cluster's brokers (node id, peer address), parsed from `peers`.
    pub fn peer_list(&self) -> Result<Vec<(u64, String)>, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            key: "peers",
            reason,
        };
        let mut out: Vec<(u64, String)> = Vec::with_capacity(self.peers.len());
        for entry in &self.peers {
            let (id, address) = entry
                .split_once('@')
                .ok_or_else(|| invalid(format!("{entry:?} is not ID@HOST:PORT")))?;
            let id: u64 = id.trim().parse().ok().filter(|id| *id > 0).ok_or_else(|| {
                invalid(format!("{entry:?}: the node id must be a positive integer"))
            })?;
            let address = address.trim();
            let port = address
                .rsplit_once(':')
                .and_then(|(host, port)| (!host.is_empty()).then_some(port))
                .and_then(|port| port.parse::<u16>().ok());
            if port.is_none_or(|p| p == 0) {
                return Err(invalid(format!("{entry:?}: the address must be HOST:PORT")));
            }
            if out.iter().any(|(other, _)| *other == id) {
                return Err(invalid(format!("node id {id} appears twice")));
            }
            out.push((id, address.to_string()));
        }
        if !out.is_empty() && !out.iter().any(|(id, _)| *id == self.node_id) {
            return Err(invalid(format!(
                "this node's id {} is not in the list",
                self.node_id
            )));
        }
        out.sort();
        Ok(out)
    }

    /// `peer_upstreams` as a map: a peer's address to the local address this broker dials
    /// to reach it.
    pub fn peer_upstream_map(&self) -> Result<HashMap<String, String>, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            key: "peer_upstreams",
            reason,
        };
        let mut map = HashMap::new();
        for entry in &self.peer_upstreams {
            let (peer, local) = entry
                .split_once('=')
                .map(|(p, l)| (p.trim(), l.trim()))
                .ok_or_else(|| invalid(format!("{entry:?} is not PEER_ADDRESS=LOCAL_ADDRESS")))?;
            if !is_host_port(peer) || !is_host_port(local) {
                return Err(invalid(format!(
                    "{entry:?}: both addresses must be HOST:PORT"
                )));
            }
            if map.insert(peer.to_string(), local.to_string()).is_some() {
                return Err(invalid(format!("the peer address {peer} appears twice")));
            }
        }
        Ok(map)
    }

    /// The address peers use to reach this broker: its entry in `peers`, else the peer listener.
    pub fn peer_address(&self) -> String {
        self.peer_list()
            .ok()
            .and_then(|list| {
                list.into_iter()
                    .find(|(id, _)| *id == self.node_id)
                    .map(|(_, a)| a)
            })
            .unwrap_or_else(|| {
                if self.peer_listen.ip().is_unspecified() {
                    format!("127.0.0.1:{}", self.peer_listen.port())
                } else {
                    self.peer_listen.to_string()
                }
            })
    }

    /// The address clients are told to use: `advertised_client_address`; else, for a wildcard
    /// listener, this node's host in the peer list (a stable DNS name in a StatefulSet) with the
    /// client port, or 127.0.0.1 for a single node; else the listen address.
    pub fn client_address(&self) -> String {
        self.advertised_client_address.clone().unwrap_or_else(|| {
            if self.client_listen.ip().is_unspecified() {
                let peer_host = self.peer_list().ok().and_then(|list| {
                    list.into_iter()
                        .find(|(id, _)| *id == self.node_id)
                        .and_then(|(_, a)| a.rsplit_once(':').map(|(host, _)| host.to_string()))
                });
                format!(
                    "{}:{}",
                    peer_host.unwrap_or_else(|| "127.0.0.1".into()),
                    self.client_listen.port()
                )
            } else {
                self.client_listen.to_string()
            }
        })
    }

    /// Checks every value; the error names the first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn range<T: PartialOrd + std::fmt::Display>(
            key: &'static str,
            value: T,
            min: T,
            max: T,
        ) -> Result<(), ConfigError> {
            if value < min || value > max {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{value} is outside {min} ..= {max}"),
                });
            }
            Ok(())
        }
        range("node_id", self.node_id, 1, u64::MAX / 2)?;
        if let Some(address) = &self.advertised_client_address {
            // What clients dial: HOST:PORT, after an optional scheme. Before, anything was
            // taken: "weft-0" (no port) sent every client of this broker to port 80, and an
            // empty one turned routing to partition leaders off.
            let bare = ["http://", "https://", "quic://"]
                .iter()
                .find_map(|scheme| address.strip_prefix(scheme))
                .unwrap_or(address);
            if !is_host_port(bare) {
                return Err(ConfigError::Invalid {
                    key: "advertised_client_address",
                    reason: format!(
                        "{address:?} is not HOST:PORT (optionally after http://, https:// or \
                         quic://)"
                    ),
                });
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "data_dir",
                reason: "must not be empty".into(),
            });
        }
        if self.cluster_name.is_empty() {
            return Err(ConfigError::Invalid {
                key: "cluster_name",
                reason: "must not be empty".into(),
            });
        }
        if !["text", "json"].contains(&self.log_format.as_str()) {
            return Err(ConfigError::Invalid {
                key: "log_format",
                reason: format!("{:?} is neither \"text\" nor \"json\"", self.log_format),
            });
        }
        if let Err(reason) = crate::logging::parse_filter(&self.log_level) {
            return Err(ConfigError::Invalid {
                key: "log_level",
                reason,
            });
        }
        range("batch_records_max", self.batch_records_max, 1, 1_000_000)?;
        range(
            "grpc_message_bytes_max",
            self.grpc_message_bytes_max,
            64 * 1024,
            256 * 1024 * 1024,
        )?;
        range("request_timeout_ms", self.request_timeout_ms, 100, 600_000)?;
        range("fetch_wait_ms_max", self.fetch_wait_ms_max, 0, 600_000)?;
        range(
            "fetch_bytes_max",
            self.fetch_bytes_max,
            1024,
            self.grpc_message_bytes_max,
        )?;
        range(
            "streams_per_connection_max",
            self.streams_per_connection_max,
            1,
            100_000,
        )?;
        range("connections_max", self.connections_max, 1, 1_000_000)?;
        range(
            "admin_connections_max",
            self.admin_connections_max,
            1,
            100_000,
        )?;
        if self.connections_idle_ms != 0 {
            range(
                "connections_idle_ms",
                self.connections_idle_ms,
                100,
                604_800_000,
            )?;
        }
        range(
            "partition_replicas_max",
            self.partition_replicas_max,
            1,
            1_000_000,
        )?;
        range(
            "stream_age_ms_max",
            self.stream_age_ms_max,
            1_000,
            24 * 3600 * 1000,
        )?;
        range("stream_heartbeat_ms", self.stream_heartbeat_ms, 10, 600_000)?;
        range(
            "session_timeout_ms",
            self.session_timeout_ms,
            100,
            3_600_000,
        )?;
        range("groups_max", self.groups_max, 1, 50_000)?;
        range("acl_rules_max", self.acl_rules_max, 1, 100_000)?;
        range(
            "offsets_retention_ms",
            self.offsets_retention_ms,
            1_000,
            365 * 24 * 3600 * 1000,
        )?;
        range("group_members_max", self.group_members_max, 1, 100_000)?;
        range("publish_queue_max", self.publish_queue_max, 1, 1_000_000)?;
        range(
            "publish_queue_bytes_max",
            self.publish_queue_bytes_max,
            1024 * 1024,
            1024 * 1024 * 1024 * 1024,
        )?;
        range(
            "retention_check_interval_ms",
            self.retention_check_interval_ms,
            10,
            86_400_000,
        )?;
        range(
            "snapshot_interval_bytes",
            self.snapshot_interval_bytes,
            64 * 1024,
            64 * 1024 * 1024 * 1024,
        )?;
        range(
            "partition_read_cache_bytes",
            self.partition_read_cache_bytes,
            0,
            1024 * 1024 * 1024,
        )?;
        self.peer_list()?;
        self.peer_upstream_map()?;
        if !matches!(self.flush_sync.as_str(), "syncfs" | "fdatasync") {
            return Err(ConfigError::Invalid {
                key: "flush_sync",
                reason: format!(
                    "{:?} is neither \"syncfs\" nor \"fdatasync\"",
                    self.flush_sync
                ),
            });
        }
        range(
            "producer_expiration_ms",
            self.producer_expiration_ms,
            1_000,
            30 * 24 * 3600 * 1000,
        )?;
        range(
            "producers_per_partition_max",
            self.producers_per_partition_max,
            1,
            10_000_000,
        )?;
        range("shutdown_grace_ms", self.shutdown_grace_ms, 0, 600_000)?;
        range("raft_heartbeat_ms", self.raft_heartbeat_ms, 10, 60_000)?;
        if self.leader_balance_interval_ms != 0 {
            // 0 turns the balance off; otherwise once per 100 ms at most (a pass goes over
            // every partition the broker leads).
            range(
                "leader_balance_interval_ms",
                self.leader_balance_interval_ms,
                100,
                86_400_000,
            )?;
        }
        range(
            "raft_election_timeout_ms",
            self.raft_election_timeout_ms,
            self.raft_heartbeat_ms * 2,
            600_000,
        )?;
        self.validate_tls()?;
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            weft_proto::otel::check_endpoint(endpoint).map_err(|reason| ConfigError::Invalid {
                key: "telemetry.otlp_endpoint",
                reason,
            })?;
        }
        if self.telemetry.service_name.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "telemetry.service_name",
                reason: "must not be empty".into(),
            });
        }
        crate::auth::Authenticator::from_config(&self.auth)?;
        for rule in &self.acl.rules {
            rule.validate().map_err(|reason| ConfigError::Invalid {
                key: "acl.rules",
                reason: format!("{rule:?}: {reason}"),
            })?;
        }
        if self.acl.enabled && self.peers.len() > 1 && self.auth.broker_identities.is_empty() {
            return Err(ConfigError::Invalid {
                key: "acl.enabled",
                reason: "a cluster with ACLs needs auth.broker_identities: brokers forward calls \
                         with their callers' identities, which are believed only from brokers"
                    .into(),
            });
        }
        let peer_certificates = self
            .tls
            .peer
            .as_ref()
            .is_some_and(|t| t.client_auth() != weft_proto::tls::ClientAuth::None);
        if !self.auth.broker_identities.is_empty()
            && self.auth.peer_sidecar == "none"
            && !peer_certificates
        {
            return Err(ConfigError::Invalid {
                key: "auth.broker_identities",
                reason: "brokers are known on the peer port by their client certificate \
                         ([tls.peer] with ca_file) or through a sidecar (auth.peer_sidecar), \
                         and neither is set: every broker's call would be refused"
                    .into(),
            });
        }
        let d = &self.topic_defaults;
        range(
            "topic_defaults.partitions",
            d.partitions,
            1,
            crate::topic::PARTITIONS_MAX,
        )?;
        range(
            "topic_defaults.replication_factor",
            d.replication_factor,
            1,
            crate::topic::REPLICATION_FACTOR_MAX,
        )?;
        range(
            "topic_defaults.max_message_bytes",
            d.max_message_bytes,
            128,
            crate::topic::MESSAGE_BYTES_MAX,
        )?;
        if u64::from(d.max_message_bytes) > u64::from(self.grpc_message_bytes_max) {
            return Err(ConfigError::Invalid {
                key: "topic_defaults.max_message_bytes",
                reason: "must not exceed grpc_message_bytes_max".into(),
            });
        }
        range(
            "topic_defaults.segment_bytes",
            d.segment_bytes,
            1024 * 1024,
            u64::from(u32::MAX),
        )?;
        if !matches!(d.fsync_policy.as_str(), "always" | "interval") {
            return Err(ConfigError::Invalid {
                key: "topic_defaults.fsync_policy",
                reason: format!(
                    "{:?} is neither \"always\" nor \"interval\"",
                    d.fsync_policy
                ),
            });
        }
        range(
            "topic_defaults.fsync_interval_ms",
            d.fsync_interval_ms,
            1,
            60_000,
        )?;
        if d.retention_bytes == Some(0) {
            return Err(ConfigError::Invalid {
                key: "topic_defaults.retention_bytes",
                reason: "must be positive".into(),
            });
        }
        if d.retention_ms == Some(0) {
            return Err(ConfigError::Invalid {
                key: "topic_defaults.retention_ms",
                reason: "must be positive".into(),
            });
        }
        if u64::from(d.max_message_bytes) + 1024 > d.segment_bytes {
            // As a topic's own limits are checked: every topic made with the defaults would
            // be refused, naming a field its creator never set.
            return Err(ConfigError::Invalid {
                key: "topic_defaults.max_message_bytes",
                reason: format!(
                    "must be at least 1 KiB smaller than topic_defaults.segment_bytes ({})",
                    d.segment_bytes
                ),
            });
        }
        Ok(())
    }
}

impl Config {
    /// The TLS of the QUIC listener: `tls.quic`, else `tls.client`.
    pub fn quic_tls(&self) -> Option<&ListenerTls> {
        self.tls.quic.as_ref().or(self.tls.client.as_ref())
    }

    /// Checks the TLS keys and loads every certificate once (a file that does not parse is a
    /// configuration error at start, not a failed handshake later).
    fn validate_tls(&self) -> Result<(), ConfigError> {
        if !(100..=3_600_000).contains(&self.tls.reload_interval_ms) {
            return Err(ConfigError::Invalid {
                key: "tls.reload_interval_ms",
                reason: format!("{} is outside 100 ..= 3600000", self.tls.reload_interval_ms),
            });
        }
        for (key, tls, alpn) in [
            ("tls.client", &self.tls.client, crate::tls::GRPC_ALPN),
            ("tls.peer", &self.tls.peer, crate::tls::GRPC_ALPN),
            ("tls.admin", &self.tls.admin, crate::tls::HTTP_ALPN),
            ("tls.quic", &self.tls.quic, crate::tls::QUIC_ALPN),
        ] {
            let Some(tls) = tls else {
                continue;
            };
            if !matches!(
                tls.client_auth.as_deref(),
                None | Some("required" | "optional")
            ) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!(
                        "client_auth {:?} is neither \"required\" nor \"optional\"",
                        tls.client_auth.as_deref().unwrap_or_default()
                    ),
                });
            }
            if tls.client_auth.is_some() && tls.ca_file.is_none() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "client_auth needs a ca_file to check client certificates".into(),
                });
            }
            weft_proto::tls::server_config(&tls.files(), tls.client_auth(), alpn)
                .map_err(|reason| ConfigError::Invalid { key, reason })?;
        }
        if self.quic_listen.is_some() && self.quic_tls().is_none() {
            return Err(ConfigError::Invalid {
                key: "quic_listen",
                reason: "QUIC needs TLS: set [tls.quic] (or [tls.client]) cert_file and key_file"
                    .into(),
            });
        }
        if let Some(peer) = &self.tls.peer {
            if peer.ca_file.is_none() {
                return Err(ConfigError::Invalid {
                    key: "tls.peer",
                    reason: "peer TLS needs a ca_file: brokers check each other's certificates"
                        .into(),
                });
            }
            weft_proto::tls::client_config(&peer.files()).map_err(|reason| {
                ConfigError::Invalid {
                    key: "tls.peer",
                    reason,
                }
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_come_from_host_names_and_peers_from_a_pattern() {
        let mut config = Config {
            node_id_from_host_name: true,
            peer_address_pattern: Some("weft-{ordinal}.weft-peers.ns.svc:7401".into()),
            cluster_size: 3,
            ..Config::default()
        };
        config.resolve_identity("weft-2").expect("resolves");
        assert_eq!(config.node_id, 3);
        assert_eq!(
            config.peers,
            [
                "1@weft-0.weft-peers.ns.svc:7401",
                "2@weft-1.weft-peers.ns.svc:7401",
                "3@weft-2.weft-peers.ns.svc:7401"
            ]
        );
        config.validate().expect("valid");
        assert_eq!(config.peer_address(), "weft-2.weft-peers.ns.svc:7401");
        // Listening on every interface, the node tells clients its own stable name, never
        // 127.0.0.1 (which would send other pods' smart clients to themselves).
        config.client_listen = "0.0.0.0:7400".parse().expect("address");
        assert_eq!(config.client_address(), "weft-2.weft-peers.ns.svc:7400");
        config.advertised_client_address = Some("weft-2.weft.ns.svc:7400".into());
        assert_eq!(config.client_address(), "weft-2.weft.ns.svc:7400");
        let single = Config {
            client_listen: "0.0.0.0:7400".parse().expect("address"),
            ..Config::default()
        };
        assert_eq!(single.client_address(), "127.0.0.1:7400");

        let mut bad_host = Config {
            node_id_from_host_name: true,
            ..Config::default()
        };
        let error = bad_host.resolve_identity("weft").expect_err("no ordinal");
        assert!(
            error.to_string().contains("node_id_from_host_name"),
            "{error}"
        );
        // An ordinal too large for a node id is named as the host name's (before: ordinal + 1
        // overflowed, a panic in a debug build).
        for host in ["weft-18446744073709551615", "weft-9223372036854775807"] {
            let error = bad_host.resolve_identity(host).expect_err("too large");
            assert!(
                error.to_string().contains("node_id_from_host_name"),
                "{host}: {error}"
            );
        }

        for (pattern, size, key) in [
            ("weft.svc:7401", 3, "peer_address_pattern"),
            ("weft-{ordinal}:7401", 0, "cluster_size"),
        ] {
            let mut config = Config {
                peer_address_pattern: Some(pattern.into()),
                cluster_size: size,
                ..Config::default()
            };
            let error = config.resolve_identity("x-0").expect_err("refused");
            assert!(error.to_string().contains(key), "{error}");
        }
        let mut both = Config {
            peers: vec!["1@a:1".into()],
            peer_address_pattern: Some("w-{ordinal}:1".into()),
            cluster_size: 1,
            ..Config::default()
        };
        assert!(both.resolve_identity("w-0").is_err());
    }

    /// A config with a peer address pattern, as `--print-config` writes it (the pattern and the
    /// peers it names), loads again; peers that differ from the pattern's are still refused.
    /// Before, the printed file was refused ("not both"), though the chart's values tell
    /// operators to take their keys from it (helper-123).
    #[test]
    fn a_printed_config_with_a_peer_pattern_loads_again() {
        let mut config = Config {
            peer_address_pattern: Some("weft-{ordinal}.weft-peers:7401".into()),
            cluster_size: 3,
            node_id: 2,
            ..Config::default()
        };
        config.resolve_identity("weft-1").expect("resolves");
        config.validate().expect("valid");
        let printed = toml::to_string_pretty(&config).expect("prints");
        let mut again = Config::from_toml(&printed).expect("parses");
        again
            .resolve_identity("weft-1")
            .expect("the printed config resolves again");
        again.validate().expect("valid again");
        assert_eq!(again, config);
        let mut other = again.clone();
        other.peers[0] = "1@elsewhere:7401".into();
        assert!(other.resolve_identity("weft-1").is_err());
    }

    /// `advertised_client_address` must be what a client can dial: HOST:PORT, after an
    /// optional scheme. Before, "weft-0" (no port: clients dialled port 80) and "" (routing to
    /// leaders off) were taken as valid (helper-123).
    #[test]
    fn an_advertised_client_address_must_be_host_and_port() {
        for good in [
            "weft-0.weft-peers:7400",
            "10.0.0.1:7400",
            "https://weft.example:443",
        ] {
            let config = Config {
                advertised_client_address: Some(good.into()),
                ..Config::default()
            };
            config.validate().expect(good);
        }
        for bad in [
            "weft-0",
            "",
            ":7400",
            "weft-0:0",
            "weft-0:http",
            "https://weft",
        ] {
            let config = Config {
                advertised_client_address: Some(bad.into()),
                ..Config::default()
            };
            let error = config.validate().expect_err(bad).to_string();
            assert!(
                error.contains("advertised_client_address"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn peer_upstreams_map_peer_addresses_to_local_proxies() {
        let config = Config {
            peer_upstreams: vec![
                "weft-1.weft-peers:7401=127.0.0.1:21001".into(),
                " weft-2.weft-peers:7401 = 127.0.0.1:21002".into(),
            ],
            ..Config::default()
        };
        config.validate().expect("valid");
        let map = config.peer_upstream_map().expect("map");
        assert_eq!(map.len(), 2);
        assert_eq!(map["weft-1.weft-peers:7401"], "127.0.0.1:21001");
        assert_eq!(map["weft-2.weft-peers:7401"], "127.0.0.1:21002");
        for (entry, why) in [
            ("weft-1:7401", "PEER_ADDRESS=LOCAL_ADDRESS"),
            ("weft-1:7401=127.0.0.1", "HOST:PORT"),
            ("=127.0.0.1:1", "HOST:PORT"),
            ("weft-1:0=127.0.0.1:1", "HOST:PORT"),
        ] {
            let config = Config {
                peer_upstreams: vec![entry.into()],
                ..Config::default()
            };
            let error = config.validate().expect_err(entry).to_string();
            assert!(
                error.contains("peer_upstreams") && error.contains(why),
                "{entry}: {error}"
            );
        }
        let twice = Config {
            peer_upstreams: vec!["a:1=127.0.0.1:2".into(), "a:1=127.0.0.1:3".into()],
            ..Config::default()
        };
        assert!(twice.validate().is_err());
    }

    #[test]
    fn the_example_file_is_the_defaults_and_valid() {
        let text = include_str!("../weft.example.toml");
        let parsed = Config::from_toml(text).expect("example parses");
        assert_eq!(
            parsed,
            Config::default(),
            "the example documents the defaults"
        );
        parsed.validate().expect("defaults are valid");
    }

    #[test]
    fn errors_name_the_key() {
        let cases: [(&str, &str); 14] = [
            ("[auth]\nclient_sidecar = \"nginx\"", "auth.client_sidecar"),
            ("connections_idle_ms = 50", "connections_idle_ms"),
            ("[auth]\ntokens = [\"ci=plaintext\"]", "auth.tokens"),
            (
                "[tls.client]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"",
                "tls.client",
            ),
            (
                "[tls.admin]\ncert_file = \"a\"\nkey_file = \"b\"\nclient_auth = \"optional\"",
                "tls.admin",
            ),
            ("flush_sync = \"sometimes\"", "flush_sync"),
            ("node_id = 0", "node_id"),
            (
                "leader_balance_interval_ms = 1",
                "leader_balance_interval_ms",
            ),
            ("fetch_bytes_max = 1", "fetch_bytes_max"),
            (
                "[topic_defaults]\nfsync_policy = \"sometimes\"",
                "topic_defaults.fsync_policy",
            ),
            (
                "raft_heartbeat_ms = 100\nraft_election_timeout_ms = 150",
                "raft_election_timeout_ms",
            ),
            (
                "[topic_defaults]\nretention_ms = 0",
                "topic_defaults.retention_ms",
            ),
            (
                "grpc_message_bytes_max = 16777216\n[topic_defaults]\nmax_message_bytes = 16777216\nsegment_bytes = 1048576",
                "topic_defaults.max_message_bytes",
            ),
            (
                "[auth]\nbroker_identities = [\"spiffe://weft.test/ns/weft/sa/weft\"]\n[acl]\nenabled = true",
                "auth.broker_identities",
            ),
        ];
        for (text, key) in cases {
            let config = Config::from_toml(text).expect("parses");
            match config.validate() {
                Err(ConfigError::Invalid { key: got, .. }) => assert_eq!(got, key, "{text}"),
                other => panic!("{text}: expected an error naming {key}, got {other:?}"),
            }
        }
        let unknown = Config::from_toml("no_such_key = 1").expect_err("unknown keys are refused");
        assert!(unknown.contains("no_such_key"), "{unknown}");
        let wrong_type = Config::from_toml("node_id = \"one\"").expect_err("types are checked");
        assert!(wrong_type.contains("node_id"), "{wrong_type}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("weft.toml");
        std::fs::write(&path, "node_id = 4\ndata_dir = \"/from/file\"\n").expect("write");
        let flags = Flags {
            config: Some(path),
            data_dir: Some(PathBuf::from("/from/flag")),
            ..Flags::default()
        };
        let config = Config::load(&flags).expect("loads");
        assert_eq!(config.node_id, 4, "from the file");
        assert_eq!(
            config.data_dir,
            PathBuf::from("/from/flag"),
            "the flag wins"
        );
    }
}
