//! `weft cluster status`.

use clap::Subcommand;
use serde_json::json;
use weft_client::Client;

use super::{Output, print_json};

/// Cluster commands.
#[derive(Debug, Subcommand)]
pub(crate) enum ClusterCommand {
    /// Nodes, controller and counts.
    Status,
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
    }
    Ok(())
}
