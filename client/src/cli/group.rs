//! `weft group list|describe|delete|reset-offsets`.

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
    /// Move a group's committed offsets on a topic, backwards to read again or forwards to skip
    /// (refused while it has live members). Prints the plan; --execute applies it.
    ResetOffsets(ResetArgs),
}

/// `weft group reset-offsets`.
#[derive(Debug, clap::Args)]
pub(crate) struct ResetArgs {
    /// Group id.
    group: String,
    /// The topic whose offsets move.
    #[arg(long)]
    topic: String,
    /// Where to: earliest, latest, an offset, @<ms since epoch> (the first record at or after
    /// that time), or +N / -N to shift from the committed offset (from the log start where the
    /// group has none).
    #[arg(long, allow_hyphen_values = true)]
    to: String,
    /// Only these partitions, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    partitions: Vec<u32>,
    /// Apply the plan (without it, only print it).
    #[arg(long)]
    execute: bool,
}

/// Where `--to` moves a partition.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Earliest,
    Latest,
    Offset(u64),
    Time(i64),
    Shift(i64),
}

fn parse_target(to: &str) -> anyhow::Result<Target> {
    let bad = || {
        anyhow::anyhow!(
            "--to {to:?}: expected earliest, latest, an offset, @<timestamp ms>, +N or -N"
        )
    };
    Ok(match to {
        "earliest" => Target::Earliest,
        "latest" => Target::Latest,
        s if s.starts_with('@') => Target::Time(s[1..].parse().map_err(|_| bad())?),
        s if s.starts_with('+') || s.starts_with('-') => {
            Target::Shift(s.parse().map_err(|_| bad())?)
        }
        s => Target::Offset(s.parse().map_err(|_| bad())?),
    })
}

/// The new offset of one partition, kept within its retained log.
fn new_offset(target: Target, p: &weft_client::proto::PartitionOffsets) -> u64 {
    let (start, end) = (p.log_start_offset, p.high_watermark);
    let wanted = match target {
        Target::Earliest => start,
        Target::Latest => end,
        Target::Offset(offset) => offset,
        Target::Time(_) => p.timestamp_offset.unwrap_or(end),
        Target::Shift(by) => p
            .committed_offset
            .unwrap_or(start)
            .saturating_add_signed(by),
    };
    wanted.clamp(start, end)
}

async fn reset_offsets(
    admin: &weft_client::Admin,
    output: Output,
    args: ResetArgs,
) -> anyhow::Result<()> {
    let target = parse_target(&args.to)?;
    let time = match target {
        Target::Time(ms) => Some(ms),
        _ => None,
    };
    // Retention may move a partition's start past the planned offset between the read and the
    // reset (the broker refuses a reset to removed records): then plan again from fresh
    // offsets, at most three times (not for a shift: see below).
    let mut attempts = 0;
    let plan = loop {
        attempts += 1;
        let offsets = admin
            .offsets_at(&args.topic, Some(&args.group), time)
            .await?;
        if let Some(missing) = args
            .partitions
            .iter()
            .find(|p| !offsets.iter().any(|o| o.partition == **p))
        {
            anyhow::bail!("topic {} has no partition {missing}", args.topic);
        }
        let plan: Vec<(u32, Option<u64>, u64)> = offsets
            .iter()
            .filter(|o| args.partitions.is_empty() || args.partitions.contains(&o.partition))
            .map(|o| (o.partition, o.committed_offset, new_offset(target, o)))
            .collect();
        if !args.execute {
            break plan;
        }
        let moves: Vec<(u32, u64)> = plan.iter().map(|&(p, _, to)| (p, to)).collect();
        match admin.reset_offsets(&args.group, &args.topic, &moves).await {
            Ok(()) => break plan,
            // A shift is relative to the committed offset, which a reset whose answer was lost
            // may have moved already: never planned twice.
            Err(error) if attempts < 3 && !matches!(target, Target::Shift(_)) => {
                // If the offsets cannot be read now, the reset's own error is the one to show.
                let Ok(now) = admin.offsets_at(&args.topic, Some(&args.group), time).await else {
                    return Err(error.into());
                };
                let overtaken = plan.iter().any(|&(p, _, to)| {
                    now.iter()
                        .any(|o| o.partition == p && o.log_start_offset > to)
                });
                if !overtaken {
                    return Err(error.into());
                }
            }
            Err(error) => return Err(error.into()),
        }
    };
    match output {
        Output::Json => print_json(&json!({
            "group_id": args.group,
            "topic": args.topic,
            "executed": args.execute,
            "partitions": plan.iter().map(|(p, from, to)| json!({
                "partition": p, "committed_offset": from, "new_offset": to,
            })).collect::<Vec<_>>(),
        }))?,
        Output::Text => {
            outln!(
                "  {:>9}  {:>10}  {:>10}",
                "partition",
                "committed",
                "new offset"
            );
            for (p, from, to) in &plan {
                let from = from.map_or_else(|| "-".to_string(), |o| o.to_string());
                outln!("  {p:>9}  {from:>10}  {to:>10}");
            }
            if args.execute {
                outln!("group {} moved on topic {}", args.group, args.topic);
            } else {
                outln!("(a plan only: add --execute to apply it)");
            }
        }
    }
    Ok(())
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
                Output::Json => print_json(&json!(groups))?,
                Output::Text => {
                    for g in &groups {
                        outln!("{g}");
                    }
                }
            }
        }
        GroupCommand::ResetOffsets(args) => reset_offsets(&admin, output, args).await?,
        GroupCommand::Delete { group } => {
            admin.delete_group(&group).await?;
            match output {
                Output::Json => print_json(&json!({ "deleted": group }))?,
                Output::Text => outln!("deleted group {group}"),
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
                        "unavailable": (!p.unavailable.is_empty()).then_some(&p.unavailable),
                    })).collect::<Vec<_>>(),
                }))?,
                Output::Text => {
                    outln!(
                        "group {}  topic {}  generation {}  lag {}",
                        d.group_id,
                        d.topic,
                        d.generation,
                        d.lag
                    );
                    for m in &d.members {
                        outln!(
                            "  member {}  partitions {:?}  connected {}",
                            m.member_id,
                            m.partitions,
                            m.connected
                        );
                    }
                    outln!(
                        "  {:>9}  {:>10}  {:>14}  {:>8}",
                        "partition",
                        "committed",
                        "high watermark",
                        "lag"
                    );
                    for p in &d.partitions {
                        if p.unavailable.is_empty() {
                            outln!(
                                "  {:>9}  {:>10}  {:>14}  {:>8}",
                                p.partition,
                                p.committed_offset,
                                p.high_watermark,
                                p.lag
                            );
                        } else {
                            outln!(
                                "  {:>9}  {:>10}  {:>14}  {:>8}  ({})",
                                p.partition,
                                p.committed_offset,
                                "unknown",
                                "unknown",
                                p.unavailable
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
