//! `weft topic create|list|describe|alter|delete`.

use clap::Subcommand;
use serde_json::json;
use weft_client::{Client, TopicSettings, TopicUpdate, proto};

use super::{Output, print_json};

/// Topic commands.
#[derive(Debug, Subcommand)]
pub(crate) enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// Partitions (default: the broker's).
        #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..))]
        partitions: Option<u32>,
        /// Replication factor, at most 16 (default: the broker's; capped by the number of brokers).
        #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..=16))]
        replication_factor: Option<u32>,
        /// Delete data older than this.
        #[arg(long)]
        retention_ms: Option<u64>,
        /// Keep at most about this many bytes per partition.
        #[arg(long)]
        retention_bytes: Option<u64>,
        /// Acknowledge before fsync and sync every this many ms (default: fsync before ack).
        #[arg(long)]
        fsync_interval_ms: Option<u32>,
        /// Largest batch in bytes.
        #[arg(long)]
        max_message_bytes: Option<u32>,
    },
    /// List topics.
    List,
    /// Show a topic with its partitions.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Change a topic's configuration (only the options given change).
    Alter {
        /// Topic name.
        name: String,
        /// More partitions (partitions can only grow).
        #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..))]
        partitions: Option<u32>,
        /// Delete data older than this many ms, or "none" to keep it forever.
        #[arg(long, value_parser = parse_limit)]
        retention_ms: Option<Limit>,
        /// Keep at most about this many bytes per partition, or "none".
        #[arg(long, value_parser = parse_limit)]
        retention_bytes: Option<Limit>,
        /// Largest batch in bytes.
        #[arg(long)]
        max_message_bytes: Option<u32>,
        /// Segment size in bytes (for segments created from now on).
        #[arg(long)]
        segment_bytes: Option<u64>,
        /// "always" (fsync before every acknowledgement) or a sync interval in ms
        /// (acknowledge once written, fsync every that many ms).
        #[arg(long, value_parser = parse_fsync)]
        fsync: Option<Fsync>,
    },
    /// Delete a topic and its data.
    Delete {
        /// Topic name.
        name: String,
    },
}

/// A limit, or none.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limit(Option<u64>);

fn parse_limit(text: &str) -> Result<Limit, String> {
    match text {
        "none" => Ok(Limit(None)),
        _ => text
            .parse::<u64>()
            .map(|n| Limit(Some(n)))
            .map_err(|_| format!("{text:?} is neither a number nor \"none\"")),
    }
}

/// When a topic's publishes are made durable.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fsync(Option<u32>);

fn parse_fsync(text: &str) -> Result<Fsync, String> {
    match text {
        "always" => Ok(Fsync(None)),
        _ => text
            .parse::<u32>()
            .map(|ms| Fsync(Some(ms)))
            .map_err(|_| format!("{text:?} is neither \"always\" nor an interval in ms")),
    }
}

fn topic_json(t: &proto::Topic) -> serde_json::Value {
    let c = t.config.unwrap_or_default();
    json!({
        "name": t.name,
        "topic_id": t.topic_id,
        "partitions": c.partitions,
        "replication_factor": c.replication_factor,
        "retention_ms": c.retention_ms,
        "retention_bytes": c.retention_bytes,
        "max_message_bytes": c.max_message_bytes,
        "fsync_policy": if c.fsync_policy == proto::FsyncPolicy::Interval as i32 { "interval" } else { "always" },
        "fsync_interval_ms": c.fsync_interval_ms,
        "segment_bytes": c.segment_bytes,
        "created_at_ms": t.created_at_ms,
        "under_replicated": t.under_replicated,
        "partition_details": t.partitions.iter().map(|p| json!({
            "partition": p.partition,
            "leader_id": p.leader_id,
            "replicas": p.replicas,
            "in_sync_replicas": p.in_sync_replicas,
            "under_replicated": p.under_replicated,
            "moving_to": p.moving_to,
            "log_start_offset": p.log_start_offset,
            "high_watermark": p.high_watermark,
            "size_bytes": p.size_bytes,
        })).collect::<Vec<_>>(),
    })
}

fn print_topic(t: &proto::Topic) -> anyhow::Result<()> {
    let c = t.config.unwrap_or_default();
    outln!(
        "topic {}  id {}  partitions {}  replication {}{}",
        t.name,
        t.topic_id,
        c.partitions,
        c.replication_factor,
        if t.under_replicated {
            "  UNDER-REPLICATED"
        } else {
            ""
        }
    );
    let ids = |ids: &[u64]| ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    outln!(
        "{:>9}  {:>6}  {:>9}  {:>9}  {:>12}  {:>14}  {:>12}",
        "partition",
        "leader",
        "replicas",
        "in sync",
        "start offset",
        "high watermark",
        "bytes"
    );
    for p in &t.partitions {
        outln!(
            "{:>9}  {:>6}  {:>9}  {:>9}  {:>12}  {:>14}  {:>12}",
            p.partition,
            p.leader_id,
            ids(&p.replicas),
            ids(&p.in_sync_replicas),
            p.log_start_offset,
            p.high_watermark,
            p.size_bytes
        );
        if !p.moving_to.is_empty() {
            outln!("{:>9}  moving to {}", "", ids(&p.moving_to));
        }
    }
    Ok(())
}

/// Runs a topic command.
pub(crate) async fn run(
    client: &Client,
    output: Output,
    command: TopicCommand,
) -> anyhow::Result<()> {
    let admin = client.admin();
    match command {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            retention_ms,
            retention_bytes,
            fsync_interval_ms,
            max_message_bytes,
        } => {
            let settings = TopicSettings {
                partitions: partitions.unwrap_or(0),
                replication_factor: replication_factor.unwrap_or(0),
                retention_ms,
                retention_bytes,
                max_message_bytes,
                fsync_interval_ms,
                segment_bytes: None,
            };
            let topic = admin.create_topic_with(&name, settings).await?;
            match output {
                Output::Json => print_json(&topic_json(&topic))?,
                Output::Text => outln!(
                    "created topic {} with {} partitions",
                    topic.name,
                    topic.partitions.len()
                ),
            }
        }
        TopicCommand::List => {
            let topics = admin.topics().await?;
            match output {
                Output::Json => {
                    print_json(&json!(topics.iter().map(topic_json).collect::<Vec<_>>()))?
                }
                Output::Text => {
                    outln!("{:<40} {:>10} {:>12}", "topic", "partitions", "replication");
                    for t in &topics {
                        let c = t.config.unwrap_or_default();
                        outln!(
                            "{:<40} {:>10} {:>12}",
                            t.name,
                            c.partitions,
                            c.replication_factor
                        );
                    }
                }
            }
        }
        TopicCommand::Describe { name } => {
            let topic = admin.topic(&name).await?;
            match output {
                Output::Json => print_json(&topic_json(&topic))?,
                Output::Text => print_topic(&topic)?,
            }
        }
        TopicCommand::Alter {
            name,
            partitions,
            retention_ms,
            retention_bytes,
            max_message_bytes,
            segment_bytes,
            fsync,
        } => {
            let update = TopicUpdate {
                partitions,
                retention_bytes: retention_bytes.map(|l| l.0),
                retention_ms: retention_ms.map(|l| l.0),
                max_message_bytes,
                segment_bytes,
                fsync_interval_ms: fsync.map(|f| f.0),
            };
            if update.is_empty() {
                anyhow::bail!(
                    "nothing to change: give at least one of --partitions, --retention-ms, \
                     --retention-bytes, --max-message-bytes, --segment-bytes, --fsync"
                );
            }
            let topic = admin.update_topic(&name, &update).await?;
            match output {
                Output::Json => print_json(&topic_json(&topic))?,
                Output::Text => outln!("altered topic {}", topic.name),
            }
        }
        TopicCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            match output {
                Output::Json => print_json(&json!({ "deleted": name }))?,
                Output::Text => outln!("deleted topic {name}"),
            }
        }
    }
    Ok(())
}
