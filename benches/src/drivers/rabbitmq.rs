//! RabbitMQ Streams through rabbitmq-stream-client (the stream protocol, not AMQP): a
//! `rabbitmq-server` with the `rabbitmq_stream` plugin started on loopback, its node, ports,
//! configuration, Mnesia and stream data all inside the run's data directory (or a running one at
//! `rabbitmq@host:port`, its stream port). A topic partition is one stream (`<topic>-<p>`); a
//! producer holds one stream producer per partition, each batching what is queued; a consumer group
//! reads every partition from its first offset (like the NATS driver's unacknowledged pull
//! consumers), so every group receives every message.
//!
//! Durability: RabbitMQ Streams have one setting. The stream log (osiris) writes chunks to the
//! page cache and never calls fsync; a publish is confirmed once written (and replicated, on a
//! cluster). There is no fsync-before-confirm option, so `rabbitmq:fsync` is refused rather than
//! faked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use rabbitmq_stream_client::types::{Message, OffsetSpecification};
use rabbitmq_stream_client::{Environment, NoDedup, Producer};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::process::{Server, find_program, free_port};
use super::{AckFuture, BenchConsumer, BenchProducer, Driver, DriverSpec, StreamConsumer};

/// Limit on every request to the server (connect, create, subscribe, close).
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// RabbitMQ boots an Erlang VM and a dozen applications: slower to listen than the others.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Messages per publish frame at most.
const MAX_BATCH: usize = 1000;
/// Payload bytes per publish frame at most: the client does not split frames and the server's
/// frame limit is 1 MiB.
const MAX_BATCH_BYTES: usize = 512 * 1024;

/// Where Debian puts the real start script (`/usr/sbin/rabbitmq-server` is a wrapper that
/// switches to the `rabbitmq` user and its data in /var/lib).
const DEBIAN_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// The `rabbitmq-server` start script.
pub fn server_program() -> Result<PathBuf> {
    let debian = Path::new(DEBIAN_SERVER);
    if debian.is_file() {
        return Ok(debian.to_path_buf());
    }
    find_program("rabbitmq-server")
}

/// Whether the server and Erlang's port mapper are installed.
pub fn available() -> Result<()> {
    server_program()?;
    find_program("epmd")?;
    Ok(())
}

/// A RabbitMQ node with the stream plugin (started or reached).
pub struct RabbitDriver {
    host: String,
    port: u16,
    environment: Environment,
    /// The node, then the Erlang port mapper it registered with.
    servers: Vec<Server>,
}

impl std::fmt::Debug for RabbitDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitDriver")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

impl RabbitDriver {
    /// Starts a node unless the spec names a running one.
    pub async fn start(spec: &DriverSpec, data_dir: &Path) -> Result<RabbitDriver> {
        let (host, port, servers) = match &spec.endpoint {
            Some(endpoint) => {
                let (host, port) = endpoint
                    .rsplit_once(':')
                    .context("rabbitmq endpoint must be host:port (the stream port)")?;
                let port = port
                    .parse()
                    .with_context(|| format!("rabbitmq endpoint port {port:?}"))?;
                (host.to_string(), port, Vec::new())
            }
            None => {
                let (port, servers) = start_node(data_dir).await?;
                ("127.0.0.1".to_string(), port, servers)
            }
        };
        let environment = if servers.is_empty() {
            connect(&host, port).await?
        } else {
            // The stream listener opens before the node has finished booting; until then it
            // closes connections.
            let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT;
            loop {
                match connect(&host, port).await {
                    Ok(environment) => break environment,
                    Err(e) if tokio::time::Instant::now() > deadline => {
                        let log = servers[0].log_tail();
                        for server in servers {
                            server.stop().await.ok();
                        }
                        return Err(e.context(format!("the node's log:\n{log}")));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        };
        Ok(RabbitDriver {
            host,
            port,
            environment,
            servers,
        })
    }
}

/// Starts `epmd` and a RabbitMQ node on free loopback ports, everything under
/// `data_dir/rabbitmq`; returns the stream port.
async fn start_node(data_dir: &Path) -> Result<(u16, Vec<Server>)> {
    let program = server_program()?;
    let epmd = find_program("epmd")?;
    let dir = data_dir.join("rabbitmq");
    std::fs::create_dir_all(&dir)?;
    let (epmd_port, dist_port, amqp_port, stream_port) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    std::fs::write(
        dir.join("rabbitmq.conf"),
        format!(
            "listeners.tcp.default = 127.0.0.1:{amqp_port}\n\
             stream.listeners.tcp.1 = 127.0.0.1:{stream_port}\n\
             stream.advertised_host = 127.0.0.1\n\
             stream.advertised_port = {stream_port}\n"
        ),
    )?;
    std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_stream].\n")?;
    std::fs::write(dir.join("rabbitmq-env.conf"), "")?;

    // Our own port mapper, so that nothing outlives the run (the one Erlang starts by itself
    // daemonizes).
    let mut mapper = Server::spawn(
        "epmd",
        &epmd,
        &["-port".to_string(), epmd_port.to_string()],
        &dir,
    )?;
    mapper
        .wait_for_port(&format!("127.0.0.1:{epmd_port}"))
        .await?;

    let path = |name: &str| dir.join(name).display().to_string();
    let env = [
        ("HOME", dir.display().to_string()),
        ("ERL_EPMD_PORT", epmd_port.to_string()),
        (
            "RABBITMQ_NODENAME",
            format!("weftbench{stream_port}@localhost"),
        ),
        ("RABBITMQ_DIST_PORT", dist_port.to_string()),
        ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
        ("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config")),
        ("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf")),
        ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
        ("RABBITMQ_MNESIA_BASE", path("mnesia")),
        ("RABBITMQ_LOG_BASE", path("log")),
        ("RABBITMQ_LOGS", "-".to_string()),
        // Makes the script exec the VM (no signal-forwarding shell in between), so stopping the
        // child stops the node; `-noinput` below keeps the shell off.
        ("RABBITMQ_ALLOW_INPUT", "1".to_string()),
    ];
    let mut node = Server::spawn_with_env(
        "rabbitmq-server",
        &program,
        &["-noinput".to_string()],
        &env,
        &dir,
    )?;
    if let Err(e) = node
        .wait_for_port_within(&format!("127.0.0.1:{stream_port}"), BOOT_TIMEOUT)
        .await
    {
        node.stop().await.ok();
        mapper.stop().await.ok();
        return Err(e);
    }
    Ok((stream_port, vec![node, mapper]))
}

async fn connect(host: &str, port: u16) -> Result<Environment> {
    tokio::time::timeout(
        API_TIMEOUT,
        Environment::builder().host(host).port(port).build(),
    )
    .await
    .with_context(|| format!("connecting to rabbitmq at {host}:{port}: timed out"))?
    .map_err(|e| anyhow!("connecting to rabbitmq at {host}:{port}: {e}"))
}

fn stream_name(topic: &str, partition: u32) -> String {
    format!("{topic}-{partition}")
}

async fn timed<T, E: std::fmt::Display>(
    what: impl Fn() -> String,
    future: impl Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(API_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(anyhow!("{}: {e}", what())),
        Err(_) => Err(anyhow!("{}: no answer within {API_TIMEOUT:?}", what())),
    }
}

#[async_trait]
impl Driver for RabbitDriver {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        for p in 0..partitions {
            let name = stream_name(topic, p);
            timed(
                || format!("creating stream {name}"),
                self.environment.stream_creator().create(&name),
            )
            .await?;
        }
        Ok(())
    }

    async fn producer(
        &self,
        topic: &str,
        partitions: u32,
        in_flight: usize,
    ) -> Result<Box<dyn BenchProducer>> {
        // Each producer has its own environment, like a separate client process would; each
        // stream producer in it has its own connection to the stream's leader.
        let environment = connect(&self.host, self.port).await?;
        let mut queues = Vec::with_capacity(partitions as usize);
        let mut tasks = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let name = stream_name(topic, p);
            let producer = timed(
                || format!("producer on stream {name}"),
                environment.producer().build(&name),
            )
            .await?;
            // The queue holds what the harness's window allows in flight, at most.
            let (tx, rx) = mpsc::channel(in_flight.clamp(1, 65_536));
            queues.push(tx);
            tasks.push(tokio::spawn(publish_loop(producer, rx)));
        }
        Ok(Box::new(RabbitProducer { queues, tasks }))
    }

    async fn consumer(
        &self,
        topic: &str,
        partitions: &[u32],
        _group: &str,
    ) -> Result<Box<dyn BenchConsumer>> {
        if partitions.is_empty() {
            bail!("a consumer needs at least one partition");
        }
        let environment = connect(&self.host, self.port).await?;
        let mut streams = Vec::new();
        for &p in partitions {
            let name = stream_name(topic, p);
            let consumer = timed(
                || format!("consumer on stream {name}"),
                environment
                    .consumer()
                    .offset(OffsetSpecification::First)
                    .build(&name),
            )
            .await?;
            streams.push(
                consumer
                    .map(|delivery| {
                        let delivery = delivery.map_err(|e| anyhow!("delivery: {e}"))?;
                        Ok(Bytes::copy_from_slice(
                            delivery.message().data().unwrap_or_default(),
                        ))
                    })
                    .boxed(),
            );
        }
        Ok(Box::new(StreamConsumer::new(Box::pin(
            futures::stream::select_all(streams),
        ))))
    }

    async fn shutdown(self: Box<Self>) -> Result<()> {
        drop(self.environment);
        for server in self.servers {
            server.stop().await?;
        }
        Ok(())
    }
}

/// A message waiting for its batch, and who to tell once it is confirmed.
type Pending = (Bytes, oneshot::Sender<Result<()>>);
/// Confirmations still due, by publishing id.
type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<()>>>>>;

struct RabbitProducer {
    /// One queue per partition, drained by that partition's publishing task.
    queues: Vec<mpsc::Sender<Pending>>,
    tasks: Vec<JoinHandle<Result<()>>>,
}

/// Publishes what is queued for one stream in batches: everything already waiting, up to
/// [`MAX_BATCH`] messages and [`MAX_BATCH_BYTES`], one publish frame each, with no timer
/// (like Weft's producer, which sends as soon as the previous batch is on its way).
///
/// The client's own `send` batches on a 100 ms timer by default, and its accumulator's count
/// can underflow (a debug build panics); `batch_send` with our own publishing ids avoids both.
async fn publish_loop(
    producer: Producer<NoDedup>,
    mut queue: mpsc::Receiver<Pending>,
) -> Result<()> {
    let waiting: Waiting = Arc::new(Mutex::new(HashMap::new()));
    // Signalled when a confirmation leaves `waiting` empty (for the wait at close).
    let drained = Arc::new(Notify::new());
    let mut next_id = 0u64;
    let mut taken = Vec::with_capacity(MAX_BATCH);
    let fail_all = |waiting: &Waiting, why: &str| {
        let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
        for (_, tx) in waiting.drain() {
            let _ = tx.send(Err(anyhow!("{why}")));
        }
    };
    while queue.recv_many(&mut taken, MAX_BATCH).await > 0 {
        let mut pending = taken.drain(..).peekable();
        while pending.peek().is_some() {
            let mut messages = Vec::new();
            let mut bytes = 0;
            {
                let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
                while let Some((payload, ack)) = pending
                    .next_if(|(p, _)| messages.is_empty() || bytes + p.len() <= MAX_BATCH_BYTES)
                {
                    bytes += payload.len();
                    waiting.insert(next_id, ack);
                    // The client's message body is a Vec: one copy per message (the NATS and
                    // Weft clients take the Bytes as they are).
                    messages.push(
                        Message::builder()
                            .body(payload.to_vec())
                            .publising_id(next_id) // (sic: the 0.4 builder misspells it)
                            .build(),
                    );
                    next_id += 1;
                }
            }
            let confirmations = waiting.clone();
            let drained = drained.clone();
            let sent = producer
                .batch_send(messages, move |confirmation| {
                    if let Ok(status) = confirmation {
                        let tx = {
                            let mut waiting =
                                confirmations.lock().unwrap_or_else(|p| p.into_inner());
                            let tx = waiting.remove(&status.publishing_id());
                            if waiting.is_empty() {
                                drained.notify_one();
                            }
                            tx
                        };
                        if let Some(tx) = tx {
                            let _ = tx.send(if status.confirmed() {
                                Ok(())
                            } else {
                                Err(anyhow!("publish refused: {:?}", status.status()))
                            });
                        }
                    }
                    async {}
                })
                .await;
            if let Err(e) = sent {
                fail_all(&waiting, &format!("publish: {e}"));
                return Err(anyhow!("publish: {e}"));
            }
        }
    }
    // The queue closed: every message was handed over; wait for the last confirmations.
    let deadline = tokio::time::Instant::now() + API_TIMEOUT;
    while !waiting.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
        // A notification sent between the check and this wait is kept, not lost.
        if tokio::time::timeout_at(deadline, drained.notified())
            .await
            .is_err()
        {
            fail_all(&waiting, "no confirmation before the producer closed");
            break;
        }
    }
    timed(|| "closing producer".to_string(), producer.close()).await
}

#[async_trait]
impl BenchProducer for RabbitProducer {
    async fn send(
        &mut self,
        partition: u32,
        _key: Option<Bytes>,
        payload: Bytes,
    ) -> Result<AckFuture> {
        let queue = self
            .queues
            .get(partition as usize)
            .context("partition out of range")?;
        let (tx, rx) = oneshot::channel();
        queue
            .send((payload, tx))
            .await
            .map_err(|_| anyhow!("the publishing task for partition {partition} stopped"))?;
        Ok(async move {
            rx.await
                .unwrap_or_else(|_| Err(anyhow!("producer stopped before confirming")))
        }
        .boxed())
    }

    async fn close(self: Box<Self>) -> Result<()> {
        drop(self.queues);
        for task in self.tasks {
            task.await.map_err(|e| anyhow!("publishing task: {e}"))??;
        }
        Ok(())
    }
}
