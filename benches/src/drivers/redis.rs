//! Redis Streams through redis-rs: a `redis-server` started on loopback with AOF on and its
//! files in the run's data directory (or a running one at `redis@host:port`). A topic partition
//! is one stream key (`<topic>:<p>`); producers `XADD` over one multiplexed connection each
//! (requests pipelined up to the in-flight window); a consumer group is a Redis consumer group
//! read with `XREADGROUP ... NOACK` (no pending-entry bookkeeping, the cheapest way to read).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;

use super::process::{Server, find_program, free_port};
use super::{AckFuture, BenchConsumer, BenchProducer, Driver, DriverSpec, Durability};

/// A Redis server (started or reached).
#[derive(Debug)]
pub struct RedisDriver {
    client: redis::Client,
    server: Option<Server>,
}

impl RedisDriver {
    /// Starts `redis-server` with AOF at the spec's fsync policy unless the spec names a
    /// running one (whose persistence settings are then its own).
    pub async fn start(spec: &DriverSpec, data_dir: &Path) -> Result<RedisDriver> {
        let (address, server) = match &spec.endpoint {
            Some(endpoint) => (endpoint.clone(), None),
            None => {
                let program = find_program("redis-server")?;
                let port = free_port()?;
                let fsync = match spec.durability {
                    Durability::Default => "everysec",
                    Durability::Fsync => "always",
                };
                let args: Vec<String> = [
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    &data_dir.display().to_string(),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    fsync,
                    "--save",
                    "",
                    "--protected-mode",
                    "no",
                    "--daemonize",
                    "no",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                let mut server = Server::spawn("redis-server", &program, &args, data_dir)?;
                let address = format!("127.0.0.1:{port}");
                server.wait_for_port(&address).await?;
                (address, Some(server))
            }
        };
        let client = redis::Client::open(format!("redis://{address}/"))
            .with_context(|| format!("redis address {address}"))?;
        // Fail early if it does not answer.
        let mut conn = connect(&client).await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .context("PING")?;
        Ok(RedisDriver { client, server })
    }
}

async fn connect(client: &redis::Client) -> Result<MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("connecting to redis")
}

fn stream_key(topic: &str, partition: u32) -> String {
    format!("{topic}:{partition}")
}

#[async_trait]
impl Driver for RedisDriver {
    async fn create_topic(&self, _topic: &str, _partitions: u32) -> Result<()> {
        // Streams come into being with their first XADD or XGROUP CREATE ... MKSTREAM.
        Ok(())
    }

    async fn producer(
        &self,
        topic: &str,
        partitions: u32,
        _in_flight: usize,
    ) -> Result<Box<dyn BenchProducer>> {
        Ok(Box::new(RedisProducer {
            conn: connect(&self.client).await?,
            keys: (0..partitions)
                .map(|p| Bytes::from(stream_key(topic, p)))
                .collect(),
        }))
    }

    async fn consumer(
        &self,
        topic: &str,
        partitions: &[u32],
        group: &str,
    ) -> Result<Box<dyn BenchConsumer>> {
        if partitions.is_empty() {
            bail!("a consumer needs at least one partition");
        }
        // Its own connection: XREADGROUP BLOCK would hold up anything sharing it.
        let mut conn = connect(&self.client).await?;
        let keys: Vec<String> = partitions.iter().map(|&p| stream_key(topic, p)).collect();
        for key in &keys {
            let created: redis::RedisResult<String> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(key)
                .arg(group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match created {
                Ok(_) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(anyhow!("XGROUP CREATE {key} {group}: {e}")),
            }
        }
        Ok(Box::new(RedisConsumer {
            conn,
            group: group.to_string(),
            name: format!("{group}-{}", partitions[0]),
            keys,
        }))
    }

    async fn shutdown(self: Box<Self>) -> Result<()> {
        if let Some(server) = self.server {
            server.stop().await?;
        }
        Ok(())
    }
}

struct RedisProducer {
    conn: MultiplexedConnection,
    /// Stream key per partition (`Bytes`: cloned per message without copying).
    keys: Vec<Bytes>,
}

#[async_trait]
impl BenchProducer for RedisProducer {
    async fn send(
        &mut self,
        partition: u32,
        _key: Option<Bytes>,
        payload: Bytes,
    ) -> Result<AckFuture> {
        let key = self
            .keys
            .get(partition as usize)
            .context("partition out of range")?
            .clone();
        let mut conn = self.conn.clone();
        Ok(async move {
            let _id: String = redis::cmd("XADD")
                .arg(&key[..])
                .arg("*")
                .arg("v")
                .arg(payload.as_ref())
                .query_async(&mut conn)
                .await
                .map_err(|e| anyhow!("XADD {}: {e}", String::from_utf8_lossy(&key)))?;
            Ok(())
        }
        .boxed())
    }

    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

struct RedisConsumer {
    conn: MultiplexedConnection,
    group: String,
    name: String,
    keys: Vec<String>,
}

#[async_trait]
impl BenchConsumer for RedisConsumer {
    async fn poll(&mut self, wait: Duration) -> Result<Vec<Bytes>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(wait.as_millis().clamp(1, 60_000) as u64)
            .arg("NOACK")
            .arg("STREAMS")
            .arg(&self.keys);
        for _ in &self.keys {
            cmd.arg(">");
        }
        let reply: Option<StreamReadReply> = cmd
            .query_async(&mut self.conn)
            .await
            .map_err(|e| anyhow!("XREADGROUP: {e}"))?;
        let mut out = Vec::new();
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in stream.ids {
                let value = entry
                    .map
                    .get("v")
                    .with_context(|| format!("entry {} without field v", entry.id))?;
                let bytes: Vec<u8> = redis::from_redis_value_ref(value)
                    .map_err(|e| anyhow!("entry {}: {e}", entry.id))?;
                out.push(Bytes::from(bytes));
            }
        }
        Ok(out)
    }

    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}
