//! NATS JetStream through async-nats: a `nats-server -js` started on loopback with its store in
//! the run's data directory (or a running one at `nats@host:port`), or (`nats-cluster`) three of
//! them routed into one JetStream cluster, every stream with three replicas (R3). A topic partition is one
//! stream (`<topic>-<p>`, subject `<topic>.<p>`), so partitions are as independent as JetStream
//! allows; a consumer group is a durable pull consumer per stream with no acknowledgements (the
//! cheapest way to read, like a Kafka consumer that commits rarely). Producers publish
//! asynchronously with `in_flight` acknowledgements pending at most.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};

use super::process::{Server, find_program, free_port};
use super::{
    AckFuture, BenchConsumer, BenchProducer, Driver, DriverSpec, Durability, StreamConsumer,
};

const API_TIMEOUT: Duration = Duration::from_secs(30);

/// A JetStream server (started or reached).
#[derive(Debug)]
pub struct NatsDriver {
    url: String,
    context: jetstream::Context,
    servers: Vec<Server>,
    /// Stream replicas (3 in a cluster).
    replicas: usize,
}

/// How many servers a `nats-cluster` runs.
const CLUSTER_SIZE: usize = 3;

impl NatsDriver {
    /// Starts `nats-server` at the spec's durability unless the spec names a running one.
    pub async fn start(spec: &DriverSpec, data_dir: &Path) -> Result<NatsDriver> {
        let (url, servers) = match &spec.endpoint {
            Some(endpoint) => (endpoint.clone(), Vec::new()),
            None => {
                let (address, server) = spawn(spec, data_dir, None).await?;
                (address, vec![server])
            }
        };
        NatsDriver::connected(url, servers, 1).await
    }

    /// Starts three servers routed into one JetStream cluster (streams with R3).
    pub async fn start_cluster(spec: &DriverSpec, data_dir: &Path) -> Result<NatsDriver> {
        let routes: Vec<u16> = (0..CLUSTER_SIZE)
            .map(|_| free_port())
            .collect::<Result<_>>()?;
        let mut servers = Vec::new();
        let mut addresses = Vec::new();
        for i in 0..CLUSTER_SIZE {
            let (address, server) = spawn(spec, data_dir, Some((i, &routes))).await?;
            addresses.push(address);
            servers.push(server);
        }
        NatsDriver::connected(addresses.join(","), servers, CLUSTER_SIZE).await
    }

    async fn connected(url: String, servers: Vec<Server>, replicas: usize) -> Result<NatsDriver> {
        let client = connect(&url).await?;
        let context = jetstream::ContextBuilder::new()
            .timeout(API_TIMEOUT)
            .build(client);
        Ok(NatsDriver {
            url,
            context,
            servers,
            replicas,
        })
    }
}

/// Starts one `nats-server` (server `i` of a cluster whose route ports are `routes`, when
/// given); returns its client address.
async fn spawn(
    spec: &DriverSpec,
    data_dir: &Path,
    cluster: Option<(usize, &[u16])>,
) -> Result<(String, Server)> {
    let program = find_program("nats-server")?;
    let port = free_port()?;
    let name = match cluster {
        Some((i, _)) => format!("nats-{}", i + 1),
        None => "nats".to_string(),
    };
    let store = data_dir.join(&name);
    std::fs::create_dir_all(&store)?;
    let sync = match spec.durability {
        Durability::Default => "",
        Durability::Fsync => "  sync_interval: always\n",
    };
    let mut config = format!(
        "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\nmax_payload: 8MB\njetstream {{\n  store_dir: {store:?}\n{sync}}}\n"
    );
    if let Some((i, routes)) = cluster {
        let urls: Vec<String> = routes
            .iter()
            .map(|p| format!("\"nats://127.0.0.1:{p}\""))
            .collect();
        config.push_str(&format!(
            "cluster {{\n  name: weft-bench\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
            routes[i],
            urls.join(", ")
        ));
    }
    let config_path = data_dir.join(format!("{name}.conf"));
    std::fs::write(&config_path, config)?;
    let mut server = Server::spawn(
        &format!("{name}-server"),
        &program,
        &["-c".to_string(), config_path.display().to_string()],
        data_dir,
    )?;
    let address = format!("127.0.0.1:{port}");
    server.wait_for_port(&address).await?;
    Ok((address, server))
}

async fn connect(url: &str) -> Result<async_nats::Client> {
    let addresses: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|a| a.trim().parse())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("nats address {url:?}"))?;
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(10))
        .request_timeout(Some(API_TIMEOUT))
        .connect(addresses)
        .await
        .with_context(|| format!("connecting to nats at {url}"))
}

fn stream_name(topic: &str, partition: u32) -> String {
    format!("{topic}-{partition}")
}

fn subject(topic: &str, partition: u32) -> String {
    format!("{topic}.{partition}")
}

#[async_trait]
impl Driver for NatsDriver {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        // A cluster answers "JetStream not ready" (or nothing at all) until its meta group has
        // a leader and every server has joined: ask with a short timeout, again for a while.
        let context = if self.replicas > 1 {
            jetstream::ContextBuilder::new()
                .timeout(Duration::from_secs(5))
                .build(self.context.client())
        } else {
            self.context.clone()
        };
        for p in 0..partitions {
            let deadline = std::time::Instant::now() + 2 * API_TIMEOUT;
            loop {
                let created = context
                    .create_stream(stream::Config {
                        name: stream_name(topic, p),
                        subjects: vec![subject(topic, p)],
                        storage: stream::StorageType::File,
                        num_replicas: self.replicas,
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(_) => break,
                    Err(_) if self.replicas > 1 && std::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => bail!("creating stream {}: {e}", stream_name(topic, p)),
                }
            }
        }
        Ok(())
    }

    async fn producer(
        &self,
        topic: &str,
        partitions: u32,
        in_flight: usize,
    ) -> Result<Box<dyn BenchProducer>> {
        // Each producer has its own connection, like a separate client process would.
        let client = connect(&self.url).await?;
        let context = jetstream::ContextBuilder::new()
            .timeout(API_TIMEOUT)
            .max_ack_inflight(in_flight.max(1))
            .backpressure_on_inflight(true)
            .build(client);
        Ok(Box::new(NatsProducer {
            context,
            subjects: (0..partitions)
                .map(|p| async_nats::Subject::from(subject(topic, p)))
                .collect(),
        }))
    }

    async fn consumer(
        &self,
        topic: &str,
        partitions: &[u32],
        group: &str,
    ) -> Result<Box<dyn BenchConsumer>> {
        let client = connect(&self.url).await?;
        let context = jetstream::new(client);
        let mut streams = Vec::new();
        for &p in partitions {
            let stream = context
                .get_stream(stream_name(topic, p))
                .await
                .map_err(|e| anyhow!("stream {}: {e}", stream_name(topic, p)))?;
            let consumer: consumer::PullConsumer = stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(group.to_string()),
                    ack_policy: consumer::AckPolicy::None,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow!("consumer {group} on {}: {e}", stream_name(topic, p)))?;
            let messages = consumer
                .stream()
                .max_messages_per_batch(1000)
                .messages()
                .await
                .map_err(|e| anyhow!("pulling from {}: {e}", stream_name(topic, p)))?;
            streams.push(
                messages
                    .map(|m| m.map(|m| m.message.payload.clone()).map_err(|e| anyhow!(e)))
                    .boxed(),
            );
        }
        if streams.is_empty() {
            bail!("a consumer needs at least one partition");
        }
        Ok(Box::new(StreamConsumer::new(Box::pin(
            futures::stream::select_all(streams),
        ))))
    }

    async fn shutdown(self: Box<Self>) -> Result<()> {
        for server in self.servers {
            server.stop().await?;
        }
        Ok(())
    }
}

struct NatsProducer {
    context: jetstream::Context,
    /// Per partition; cloning a `Subject` is a reference count, not a copy.
    subjects: Vec<async_nats::Subject>,
}

#[async_trait]
impl BenchProducer for NatsProducer {
    async fn send(
        &mut self,
        partition: u32,
        _key: Option<Bytes>,
        payload: Bytes,
    ) -> Result<AckFuture> {
        let subject = self
            .subjects
            .get(partition as usize)
            .context("partition out of range")?
            .clone();
        let ack = self
            .context
            .publish(subject, payload)
            .await
            .map_err(|e| anyhow!("publish: {e}"))?;
        Ok(async move {
            ack.await
                .map(|_| ())
                .map_err(|e| anyhow!("publish ack: {e}"))
        }
        .boxed())
    }

    async fn close(self: Box<Self>) -> Result<()> {
        self.context
            .client()
            .flush()
            .await
            .map_err(|e| anyhow!("flush: {e}"))
    }
}
