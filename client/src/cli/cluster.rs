//! `weft cluster status | transfer | drain`.

use clap::Subcommand;
use serde_json::json;
use weft_client::Client;

use super::{Output, print_json};

/// Cluster commands.
#[derive(Debug, Subcommand)]
pub(crate) enum ClusterCommand {
    /// Nodes, controller and counts.
    Status,
    /// Move a partition's leadership to another replica (ask the partition's leader: -s).
    Transfer {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The replica to lead (default: the most caught-up other replica).
        #[arg(long)]
        to: Option<u64>,
    },
    /// Move every leadership the broker (-s) holds to other replicas, before it stops.
    Drain,
}

/// Runs a cluster command.
pub(crate) async fn run(
    client: &Client,
    output: Output,
    command: ClusterCommand,
) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Status => {
            let s = client.admin().cluster_status().await?;
            match output {
                Output::Json => print_json(&json!({
                    "cluster_id": s.cluster_id,
                    "controller_id": s.controller_id,
                    "topic_count": s.topic_count,
                    "partition_count": s.partition_count,
                    "nodes": s.nodes.iter().map(|n| json!({
                        "id": n.id, "client_address": n.client_address, "peer_address": n.peer_address,
                        "reachable": n.reachable, "voter": n.voter,
                    })).collect::<Vec<_>>(),
                })),
                Output::Text => {
                    println!(
                        "cluster {}  controller {}  topics {}  partitions {}",
                        s.cluster_id, s.controller_id, s.topic_count, s.partition_count
                    );
                    for n in &s.nodes {
                        println!(
                            "  node {}  client {}  peer {}  reachable {}",
                            n.id, n.client_address, n.peer_address, n.reachable
                        );
                    }
                }
            }
        }
        ClusterCommand::Transfer {
            topic,
            partition,
            to,
        } => {
            let leader = client
                .admin()
                .transfer_leadership(&topic, partition, to)
                .await?;
            match output {
                Output::Json => print_json(&json!({
                    "topic": topic, "partition": partition, "leader_id": leader,
                })),
                Output::Text => println!("{topic}/{partition} is led by node {leader}"),
            }
        }
        ClusterCommand::Drain => {
            let (moved, kept) = client.admin().drain().await?;
            match output {
                Output::Json => print_json(&json!({ "moved": moved, "kept": kept })),
                Output::Text => {
                    for m in &moved {
                        println!("moved {m}");
                    }
                    for k in &kept {
                        println!("kept {k}");
                    }
                    if moved.is_empty() && kept.is_empty() {
                        println!("this broker leads no partition");
                    }
                }
            }
            if !kept.is_empty() {
                anyhow::bail!("{} partitions are still led by this broker", kept.len());
            }
        }
    }
    Ok(())
}
