//! `weft group list|describe|delete`.

use clap::Subcommand;
use serde_json::json;
use weft_client::Client;

use super::{Output, print_json};

/// Group commands.
#[derive(Debug, Subcommand)]
pub(crate) enum GroupCommand {
    /// List consumer groups.
    List,
    /// Show a group's members, assignments, commits and lag.
    Describe {
        /// Group id.
        group: String,
    },
    /// Delete a group's committed offsets (refused while it has live members).
    Delete {
        /// Group id.
        group: String,
    },
}

/// Runs a group command.
pub(crate) async fn run(
    client: &Client,
    output: Output,
    command: GroupCommand,
) -> anyhow::Result<()> {
    let admin = client.admin();
    match command {
        GroupCommand::List => {
            let groups = admin.groups().await?;
            match output {
                Output::Json => print_json(&json!(groups)),
                Output::Text => groups.iter().for_each(|g| println!("{g}")),
            }
        }
        GroupCommand::Delete { group } => {
            admin.delete_group(&group).await?;
            match output {
                Output::Json => print_json(&json!({ "deleted": group })),
                Output::Text => println!("deleted group {group}"),
            }
        }
        GroupCommand::Describe { group } => {
            let d = admin.group(&group).await?;
            match output {
                Output::Json => print_json(&json!({
                    "group_id": d.group_id,
                    "topic": d.topic,
                    "generation": d.generation,
                    "lag": d.lag,
                    "members": d.members.iter().map(|m| json!({
                        "member_id": m.member_id, "partitions": m.partitions, "connected": m.connected, "idle_ms": m.idle_ms,
                    })).collect::<Vec<_>>(),
                    "partitions": d.partitions.iter().map(|p| json!({
                        "topic": p.topic, "partition": p.partition, "committed_offset": p.committed_offset,
                        "high_watermark": p.high_watermark, "lag": p.lag,
                    })).collect::<Vec<_>>(),
                })),
                Output::Text => {
                    println!(
                        "group {}  topic {}  generation {}  lag {}",
                        d.group_id, d.topic, d.generation, d.lag
                    );
                    for m in &d.members {
                        println!(
                            "  member {}  partitions {:?}  connected {}",
                            m.member_id, m.partitions, m.connected
                        );
                    }
                    println!(
                        "  {:>9}  {:>10}  {:>14}  {:>8}",
                        "partition", "committed", "high watermark", "lag"
                    );
                    for p in &d.partitions {
                        println!(
                            "  {:>9}  {:>10}  {:>14}  {:>8}",
                            p.partition, p.committed_offset, p.high_watermark, p.lag
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
