//! Weft through `weft-client` over gRPC: a `weft-broker` process started on loopback with its own
//! data directory (or a running broker at `weft@host:port`). Producers batch on the client
//! (records per publish, the client's default linger, a few publishes in flight per partition); consumers are
//! consumer-group members streaming with credits.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use weft_client::{Client, ConsumerConfig, Producer, ProducerConfig, Record, StartFrom};

use super::process::{START_TIMEOUT, Server, free_port};
use super::{AckFuture, BenchConsumer, BenchProducer, Driver, DriverSpec};

/// Finds `weft-broker`: `WEFT_BROKER_BIN`, next to this executable (the same `cargo build`), or
/// on `PATH`.
pub fn broker_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("WEFT_BROKER_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("WEFT_BROKER_BIN={} is not a file", path.display());
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("weft-broker");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    super::process::find_program("weft-broker").map_err(|_| {
        anyhow!(
            "weft-broker not found next to weft-bench or on PATH: build both with \
             `cargo build --release -p weft-broker -p weft-bench` (or set WEFT_BROKER_BIN)"
        )
    })
}

/// A broker (started or reached) and a client connected to it.
#[derive(Debug)]
pub struct WeftDriver {
    client: Client,
    server: Option<Server>,
}

impl WeftDriver {
    /// Starts a broker in `data_dir` unless the spec names a running one.
    pub async fn start(spec: &DriverSpec, data_dir: &Path) -> Result<WeftDriver> {
        let (address, server) = match &spec.endpoint {
            Some(endpoint) => (endpoint.clone(), None),
            None => {
                let (address, server) = spawn_broker(data_dir).await?;
                (address, Some(server))
            }
        };
        let client = Client::connect([address.as_str()])
            .await
            .with_context(|| format!("connecting to weft at {address}"))?
            .with_timeout(Duration::from_secs(30));
        Ok(WeftDriver { client, server })
    }
}

impl WeftDriver {
    /// Starts a broker with a QUIC listener (its certificate from a CA made for this run, in
    /// `data_dir`) unless the spec names a running one (`weft-quic@HOST:PORT`, its CA file in
    /// `WEFT_TLS_CA_FILE`), and connects over QUIC.
    pub async fn start_quic(spec: &DriverSpec, data_dir: &Path) -> Result<WeftDriver> {
        let (address, ca, server) = match &spec.endpoint {
            Some(endpoint) => {
                let ca = std::env::var_os("WEFT_TLS_CA_FILE")
                    .map(PathBuf::from)
                    .context(
                        "weft-quic@HOST:PORT needs the CA of the broker's certificate in \
                     WEFT_TLS_CA_FILE",
                    )?;
                (endpoint.clone(), ca, None)
            }
            None => {
                std::fs::create_dir_all(data_dir)
                    .with_context(|| format!("creating {}", data_dir.display()))?;
                let (ca, cert, key) = quic_certificates(data_dir)?;
                let config = data_dir.join("weft-quic.toml");
                std::fs::write(
                    &config,
                    format!("[tls.quic]\ncert_file = {cert:?}\nkey_file = {key:?}\n"),
                )
                .with_context(|| format!("writing {}", config.display()))?;
                let mut args: Vec<String> = LISTEN_ON_FREE_PORTS.map(String::from).to_vec();
                args.extend([
                    "--quic-listen".to_string(),
                    "127.0.0.1:0".to_string(),
                    "--config".to_string(),
                    config.display().to_string(),
                ]);
                let (line, server) = spawn_broker_line(data_dir, "weft-broker", &args).await?;
                (ready_address(&line, "quic=")?, ca, Some(server))
            }
        };
        let options = weft_client::ConnectOptions {
            tls: Some(weft_client::TlsOptions {
                ca_file: Some(ca),
                ..weft_client::TlsOptions::default()
            }),
            token: None,
        };
        let client = Client::connect_with([format!("quic://{address}")], options)
            .await
            .with_context(|| format!("connecting to weft over QUIC at {address}"))?
            .with_timeout(Duration::from_secs(30));
        Ok(WeftDriver { client, server })
    }
}

/// A CA and a certificate for 127.0.0.1 signed by it, as PEM files in `dir`: (CA, cert, key).
fn quic_certificates(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "weft-bench CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = params.signed_by(&key, &issuer)?;
    let paths = (
        dir.join("bench-ca.pem"),
        dir.join("bench-broker.pem"),
        dir.join("bench-broker-key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

/// Listen arguments that let the broker bind free loopback ports itself (port 0) and name them
/// on its ready line: no bind-release-rebind race.
pub(crate) const LISTEN_ON_FREE_PORTS: [&str; 6] = [
    "--client-listen",
    "127.0.0.1:0",
    "--peer-listen",
    "127.0.0.1:0",
    "--admin-listen",
    "127.0.0.1:0",
];

/// The address after `key` (`client=`, `admin=`, `peer=`) on the broker's ready line.
pub(crate) fn ready_address(line: &str, key: &str) -> Result<String> {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(key))
        .map(str::to_string)
        .with_context(|| format!("no {key} on the ready line {line:?}"))
}

async fn spawn_broker(data_dir: &Path) -> Result<(String, Server)> {
    spawn_broker_with(
        data_dir,
        "weft-broker",
        &LISTEN_ON_FREE_PORTS.map(String::from),
    )
    .await
}

/// Starts `weft-broker` with its data in `dir/data` (the log in `dir/<name>.log`) and `args`;
/// returns its client address once it says it is ready.
async fn spawn_broker_with(dir: &Path, name: &str, args: &[String]) -> Result<(String, Server)> {
    let (line, server) = spawn_broker_line(dir, name, args).await?;
    Ok((ready_address(&line, "client=")?, server))
}

/// [`spawn_broker_with`], returning the broker's whole ready line.
async fn spawn_broker_line(dir: &Path, name: &str, args: &[String]) -> Result<(String, Server)> {
    let binary = broker_binary()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = dir.join(format!("{name}.log"));
    let err = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = tokio::process::Command::new(&binary)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(args)
        .env("WEFT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("broker stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("weft-broker ready:") {
                return Ok::<_, std::io::Error>(Some(line));
            }
        }
        Ok(None)
    })
    .await;
    let server = Server::from_child(name, child, log);
    let line = match ready {
        Ok(Ok(Some(line))) => line,
        _ => bail!(
            "{name} exited or hung before listening on its ports; its log:\n{}",
            server.log_tail()
        ),
    };
    // Keep draining stdout so the broker never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((line, server))
}

#[async_trait]
impl Driver for WeftDriver {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        self.client
            .admin()
            .create_topic(topic, partitions)
            .await
            .with_context(|| format!("creating topic {topic}"))?;
        Ok(())
    }

    async fn producer(
        &self,
        topic: &str,
        _partitions: u32,
        in_flight: usize,
    ) -> Result<Box<dyn BenchProducer>> {
        let producer = self.client.producer(producer_config(in_flight));
        Ok(Box::new(WeftProducer {
            producer,
            topic: topic.to_string(),
        }))
    }

    async fn consumer(
        &self,
        topic: &str,
        _partitions: &[u32],
        group: &str,
    ) -> Result<Box<dyn BenchConsumer>> {
        group_member(&self.client, topic, group).await
    }

    async fn shutdown(self: Box<Self>) -> Result<()> {
        if let Some(server) = self.server {
            server.stop().await?;
        }
        Ok(())
    }
}

/// The producer settings of both Weft drivers. The harness bounds unacknowledged messages;
/// batches of a quarter of that window keep several publishes in flight instead of one
/// window-sized batch at a time. Linger and eager sends are the client's defaults (what a user
/// gets): a shorter linger closes the batches of a partition with publishes in flight before
/// their answers come back, so each publish carries fewer records and every record costs more
/// CPU on both sides (1 ms here measured 8.7 records per publish in `max-throughput-16p`
/// against 18.9 with the default 5 ms).
fn producer_config(in_flight: usize) -> ProducerConfig {
    ProducerConfig {
        batch_records_max: (in_flight / 4).max(1),
        in_flight_per_partition: 4,
        queue_records_max: in_flight.max(1),
        ..ProducerConfig::default()
    }
}

/// A consumer-group member through `client`: group members share the partitions through the
/// group's coordinator, as Kafka users would run them.
async fn group_member(client: &Client, topic: &str, group: &str) -> Result<Box<dyn BenchConsumer>> {
    let mut consumer = client
        .consumer(
            ConsumerConfig::new(topic)
                .group(group)
                .start(StartFrom::Earliest),
        )
        .await
        .with_context(|| format!("subscribing to {topic} as {group}"))?;
    let (tx, rx) = mpsc::channel::<Result<Bytes>>(8192);
    let task = tokio::spawn(async move {
        loop {
            let next = consumer.next().await;
            let item = match next {
                Ok(Some(message)) => Ok(message.value),
                Ok(None) => Err(anyhow!("subscription ended")),
                Err(e) => Err(anyhow!(e)),
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
        let _ = consumer.close().await;
    });
    Ok(Box::new(WeftConsumer { rx, task }))
}

/// Brokers in the `weft-cluster` driver's cluster.
const CLUSTER_SIZE: usize = 3;

/// Three brokers on loopback, each with its own data directory, forming one cluster (every
/// partition replicated three times, fsync before ack on every replica, acknowledged once a
/// majority has it). Producers are the client's own: given one broker, they learn each
/// partition's leader from the cluster's metadata and send its batches there; consumers are
/// spread over the brokers (each reads from its own replica).
#[derive(Debug)]
pub struct WeftClusterDriver {
    /// A client per broker, by node id - 1.
    clients: Vec<Client>,
    servers: Vec<Server>,
    next_consumer: std::sync::atomic::AtomicUsize,
}

impl WeftClusterDriver {
    /// The client of node `node` (1-based).
    pub fn client(&self, node: u64) -> Option<&Client> {
        self.clients
            .get(usize::try_from(node).ok()?.checked_sub(1)?)
    }

    /// Sends `signal` (SIGSTOP, SIGCONT) to node `node`'s broker process.
    pub fn signal(&self, node: u64, signal: rustix::process::Signal) -> Result<()> {
        let server = usize::try_from(node)
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| self.servers.get(i))
            .with_context(|| format!("no node {node}"))?;
        server.signal(signal)
    }

    /// Starts a cluster at fsync durability in a new directory under `dir` (named from
    /// `prefix`; removed when the returned handle drops), for runs that freeze brokers.
    pub async fn start_in(
        dir: &Path,
        prefix: &str,
    ) -> Result<(tempfile::TempDir, WeftClusterDriver)> {
        let spec = DriverSpec {
            kind: super::Kind::WeftCluster,
            durability: super::Durability::Fsync,
            endpoint: None,
        };
        let data = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(dir)
            .with_context(|| format!("creating a directory in {}", dir.display()))?;
        let cluster = WeftClusterDriver::start(&spec, data.path()).await?;
        Ok((data, cluster))
    }

    /// Resumes every broker (whatever a run froze) and stops the cluster.
    pub async fn stop(self) -> Result<()> {
        for node in 1..=self.servers.len() as u64 {
            let _ = self.signal(node, rustix::process::Signal::CONT);
        }
        Box::new(self).shutdown().await
    }

    /// Starts the cluster in `data_dir` (`node1` .. `node3`).
    pub async fn start(spec: &DriverSpec, data_dir: &Path) -> Result<WeftClusterDriver> {
        if spec.endpoint.is_some() {
            bail!("weft-cluster starts its own brokers; it takes no endpoint");
        }
        let ports: Vec<[u16; 3]> = (0..CLUSTER_SIZE)
            .map(|_| Ok([free_port()?, free_port()?, free_port()?]))
            .collect::<Result<_>>()?;
        let peers = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}@127.0.0.1:{}", i + 1, p[1]))
            .collect::<Vec<_>>()
            .join(",");
        // The seed (node 1) last: it asks the others whether they have a cluster first.
        let mut started = Vec::new();
        for i in (0..CLUSTER_SIZE).rev() {
            let [client, peer, admin] = ports[i];
            let args: Vec<String> = [
                "--node-id".to_string(),
                (i + 1).to_string(),
                "--peers".to_string(),
                peers.clone(),
                "--client-listen".to_string(),
                format!("127.0.0.1:{client}"),
                "--peer-listen".to_string(),
                format!("127.0.0.1:{peer}"),
                "--admin-listen".to_string(),
                format!("127.0.0.1:{admin}"),
            ]
            .into();
            let name = format!("weft-broker-{}", i + 1);
            let (address, server) =
                spawn_broker_with(&data_dir.join(format!("node{}", i + 1)), &name, &args).await?;
            started.push((i, address, server));
        }
        started.sort_by_key(|(i, _, _)| *i);
        let mut clients = Vec::new();
        let mut servers = Vec::new();
        for (_, address, server) in started {
            clients.push(
                Client::connect([address.as_str()])
                    .await
                    .with_context(|| format!("connecting to weft at {address}"))?
                    .with_timeout(Duration::from_secs(30)),
            );
            servers.push(server);
        }
        // Every broker registered: the controller places replicas on all of them.
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let status = clients[0].admin().cluster_status().await;
            let registered = |s: &weft_proto::v1::ClusterStatus| {
                s.nodes.iter().filter(|n| !n.unregistered).count()
            };
            if status.as_ref().is_ok_and(|s| registered(s) == CLUSTER_SIZE) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the cluster did not form: {status:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(WeftClusterDriver {
            clients,
            servers,
            next_consumer: std::sync::atomic::AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl Driver for WeftClusterDriver {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        self.clients[0]
            .admin()
            .create_topic(topic, partitions)
            .await
            .with_context(|| format!("creating topic {topic}"))?;
        // Wait for a leader everywhere, preferably the preferred one (leaders spread over the
        // brokers; the leader balance moves them there within seconds).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let infos = self.clients[0].admin().partitions(topic).await?;
            // The figures mean replication factor 3: a cluster that placed fewer replicas (a
            // broker not registered yet when the topic was made) would measure something else.
            if let Some(p) = infos.iter().find(|p| p.replicas.len() != CLUSTER_SIZE) {
                bail!(
                    "partition {} of {topic} has replicas {:?}, not {CLUSTER_SIZE}",
                    p.partition,
                    p.replicas
                );
            }
            let led = infos.iter().all(|p| p.leader_id != 0);
            let preferred = infos
                .iter()
                .all(|p| p.replicas.first() == Some(&p.leader_id));
            if led && (preferred || tokio::time::Instant::now() > deadline) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline + Duration::from_secs(10) {
                bail!("partitions of {topic} have no leader: {infos:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn producer(
        &self,
        topic: &str,
        _partitions: u32,
        in_flight: usize,
    ) -> Result<Box<dyn BenchProducer>> {
        // The producer routes each partition's batches to its leader itself.
        Ok(Box::new(WeftProducer {
            producer: self.clients[0].producer(producer_config(in_flight)),
            topic: topic.to_string(),
        }))
    }

    async fn consumer(
        &self,
        topic: &str,
        _partitions: &[u32],
        group: &str,
    ) -> Result<Box<dyn BenchConsumer>> {
        let n = self
            .next_consumer
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        group_member(&self.clients[n % CLUSTER_SIZE], topic, group).await
    }

    async fn shutdown(self: Box<Self>) -> Result<()> {
        drop(self.clients);
        for server in self.servers {
            server.stop().await?;
        }
        Ok(())
    }
}

/// Hands one record for `partition` to `producer`; the future resolves on its acknowledgement.
async fn send_record(
    producer: &Producer,
    topic: &str,
    partition: u32,
    key: Option<Bytes>,
    payload: Bytes,
) -> Result<AckFuture> {
    let mut record = Record::new(payload).partition(partition);
    if let Some(key) = key {
        record = record.key(key);
    }
    let ack = producer.send_nowait(topic, record).await?;
    Ok(async move { ack.await.map(|_| ()).map_err(|e| anyhow!(e)) }.boxed())
}

struct WeftProducer {
    producer: Producer,
    topic: String,
}

#[async_trait]
impl BenchProducer for WeftProducer {
    async fn send(
        &mut self,
        partition: u32,
        key: Option<Bytes>,
        payload: Bytes,
    ) -> Result<AckFuture> {
        send_record(&self.producer, &self.topic, partition, key, payload).await
    }

    async fn close(self: Box<Self>) -> Result<()> {
        self.producer.close().await?;
        Ok(())
    }
}

struct WeftConsumer {
    rx: mpsc::Receiver<Result<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

#[async_trait]
impl BenchConsumer for WeftConsumer {
    async fn poll(&mut self, wait: Duration) -> Result<Vec<Bytes>> {
        let mut out = Vec::new();
        match tokio::time::timeout(wait, self.rx.recv()).await {
            Ok(Some(item)) => out.push(item?),
            Ok(None) => bail!("consumer stopped"),
            Err(_) => return Ok(out),
        }
        while out.len() < 4096 {
            match self.rx.try_recv() {
                Ok(item) => out.push(item?),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    async fn close(self: Box<Self>) -> Result<()> {
        // The task may be waiting for a message that will never come; the broker ends the
        // member's session when the stream drops.
        self.task.abort();
        drop(self.rx);
        Ok(())
    }
}
