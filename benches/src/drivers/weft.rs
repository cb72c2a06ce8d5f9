//! Weft through `weft-client` over gRPC: a `weft-broker` process started on loopback with its own
//! data directory (or a running broker at `weft@host:port`). Producers batch on the client
//! (records per publish, linger 1 ms, a few publishes in flight per partition); consumers are
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

use super::process::{START_TIMEOUT, Server};
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
    let binary = broker_binary()?;
    let log = data_dir.join("weft-broker.log");
    let err = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = tokio::process::Command::new(&binary)
        .arg("--data-dir")
        .arg(data_dir.join("data"))
        .args(LISTEN_ON_FREE_PORTS)
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
    let server = Server::from_child("weft-broker", child, log);
    let line = match ready {
        Ok(Ok(Some(line))) => line,
        _ => bail!("weft-broker did not start; its log:\n{}", server.log_tail()),
    };
    // Keep draining stdout so the broker never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((ready_address(&line, "client=")?, server))
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
        // The harness bounds unacknowledged messages; batches of a quarter of that window keep
        // several publishes in flight instead of one window-sized batch at a time.
        let producer = self.client.producer(ProducerConfig {
            linger: Duration::from_millis(1),
            batch_records_max: (in_flight / 4).max(1),
            in_flight_per_partition: 4,
            queue_records_max: in_flight.max(1),
            ..ProducerConfig::default()
        });
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
        // Group members share the partitions through the broker's coordinator, as Kafka users
        // would run them.
        let mut consumer = self
            .client
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

    async fn shutdown(self: Box<Self>) -> Result<()> {
        if let Some(server) = self.server {
            server.stop().await?;
        }
        Ok(())
    }
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
        let mut record = Record::new(payload).partition(partition);
        if let Some(key) = key {
            record = record.key(key);
        }
        let ack = self.producer.send_nowait(&self.topic, record).await?;
        Ok(async move {
            match ack.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(anyhow!(e)),
                Err(_) => Err(anyhow!("producer closed")),
            }
        }
        .boxed())
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
