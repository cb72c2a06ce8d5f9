//! `weft cluster status | transfer | drain | undrain | move | rebalance | end-recovery | remove-broker`.

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
        /// The replica to lead (default: the most caught-up other replica). Node ids start at 1.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        to: Option<u64>,
    },
    /// Move every leadership the broker (-s) holds to other replicas, before it stops.
    Drain,
    /// Clear the draining mark of the broker (-s) (a drain sets it, a restart clears it): it
    /// gets new replicas and its preferred leaderships back.
    Undrain,
    /// Move a partition's replicas to other brokers (the first becomes the preferred leader).
    Move {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Node ids to hold the replicas, comma-separated: 1,2,4.
        #[arg(long, value_delimiter = ',', required = true,
              value_parser = clap::value_parser!(u64).range(1..))]
        replicas: Vec<u64>,
        /// Wait until the move is done.
        #[arg(long)]
        wait: bool,
    },
    /// Spread replicas and preferred leaders evenly over the brokers (after adding one).
    Rebalance {
        /// Wait until every move is done.
        #[arg(long)]
        wait: bool,
    },
    /// Make a broker (-s, named again by its node id) vote at once although it lost its data
    /// and has not caught up everywhere. Unsafe: only for a group most of whose replicas lost
    /// their data.
    EndRecovery {
        /// The broker's node id (a broker that is not this one refuses).
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        node_id: u64,
        /// Accept that records acknowledged before the loss may be lost (required).
        #[arg(long)]
        accept_data_loss: bool,
    },
    /// Move every replica off a broker; it then leaves the cluster and can be stopped.
    RemoveBroker {
        /// Its node id.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        node_id: u64,
        /// Wait until it has left the cluster.
        #[arg(long)]
        wait: bool,
    },
}

/// How long `--wait` waits.
const WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// The moves a reassignment answer names as started (`topic/partition: [from] -> [to]`, or
/// `topic/partition: -> [to] (under way)`): partition name and target replicas.
fn started_targets(started: &[String]) -> std::collections::HashMap<String, Vec<u64>> {
    started
        .iter()
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let target = rest.split_once("-> [")?.1.split_once(']')?.0;
            let ids: Option<Vec<u64>> = target
                .split(',')
                .map(str::trim)
                .filter(|id| !id.is_empty())
                .map(|id| id.parse().ok())
                .collect();
            Some((name.to_string(), ids?))
        })
        .collect()
}

/// How long a partition whose move this command started may be listed as not moving, away
/// from its target, before the move counts as replaced: a broker's copy of the metadata lags a
/// move just started by a few seconds at most (the broker that started it waits for its own
/// copy), while a move replaced by another that ended between two looks never shows again.
const REPLACED_AFTER: std::time::Duration = std::time::Duration::from_secs(15);

/// Whether the move to `target` of a partition listed with `replicas`, moving to `moving_to`
/// (empty: not moving), is over: at its target; replaced by another move that started from it
/// (its replicas hold the whole target; a view from before the move would not); or listed as
/// not moving, away from its target, for `idle_for` of at least [`REPLACED_AFTER`] (replaced
/// by a move that ended between two looks; before, `--wait` waited for it its whole 600 s).
fn move_over(
    replicas: &[u64],
    moving_to: &[u64],
    target: &[u64],
    idle_for: Option<std::time::Duration>,
) -> bool {
    replicas == target && moving_to.is_empty()
        || !moving_to.is_empty()
            && moving_to != target
            && target.iter().all(|id| replicas.contains(id))
        || idle_for.is_some_and(|idle| idle >= REPLACED_AFTER)
}

/// Waits until no partition moves and every move in `started` has reached its target (or
/// was replaced by another move), or, with `leaving`, until that broker is no longer listed;
/// printing progress every few seconds. A broker whose copy of the metadata is behind lists
/// a move just started as not moving yet: the targets tell that from a move that ended.
async fn wait_for_moves(
    client: &Client,
    leaving: Option<u64>,
    started: &[String],
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
    let mut last_report = tokio::time::Instant::now();
    let mut targets = started_targets(started);
    // Since when each started move's partition is listed as not moving, away from its target.
    let mut idle_since: std::collections::HashMap<String, tokio::time::Instant> =
        std::collections::HashMap::new();
    loop {
        let partitions = client.admin().partitions("").await?;
        // A partition no longer listed (its topic deleted) has nothing left to wait for.
        targets.retain(|name, _| {
            partitions
                .iter()
                .any(|p| format!("{}/{}", p.topic, p.partition) == *name)
        });
        for p in &partitions {
            let name = format!("{}/{}", p.topic, p.partition);
            let Some(target) = targets.get(&name) else {
                continue;
            };
            let idle = p.moving_to.is_empty() && p.replicas != *target;
            if !idle {
                idle_since.remove(&name);
            }
            let idle_for = idle.then(|| {
                idle_since
                    .entry(name.clone())
                    .or_insert_with(tokio::time::Instant::now)
                    .elapsed()
            });
            if move_over(&p.replicas, &p.moving_to, target, idle_for) {
                if idle {
                    eprintln!(
                        "{name}: no longer moving, on {:?} rather than {target:?} (another move \
                         replaced this one, or it was given up)",
                        p.replicas
                    );
                }
                targets.remove(&name);
            }
        }
        let mut moving: Vec<String> = partitions
            .into_iter()
            .filter(|p| !p.moving_to.is_empty())
            .map(|p| format!("{}/{}", p.topic, p.partition))
            .collect();
        for name in targets.keys() {
            if !moving.contains(name) {
                moving.push(name.clone());
            }
        }
        let still_there = match leaving {
            Some(id) => client
                .admin()
                .cluster_status()
                .await?
                .nodes
                .iter()
                .any(|n| n.id == id),
            None => false,
        };
        if moving.is_empty() && !still_there {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "still moving after {}s: {}",
                WAIT_LIMIT.as_secs(),
                moving.join(" ")
            );
        }
        if last_report.elapsed() >= std::time::Duration::from_secs(5) {
            eprintln!("waiting: {} partitions moving", moving.len());
            last_report = tokio::time::Instant::now();
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Every partition as its leader reports it (in-sync replicas and lag are known there): asked
/// of the broker this client reaches, then of each leader for the partitions it leads.
async fn partitions_from_leaders(
    client: &Client,
) -> anyhow::Result<Vec<weft_client::proto::PartitionInfo>> {
    let mut partitions = client.admin().partitions("").await?;
    let leaders: std::collections::BTreeMap<u64, String> = partitions
        .iter()
        .filter(|p| p.leader_id != 0 && !p.leader_address.is_empty() && p.replica_lag.is_empty())
        .map(|p| (p.leader_id, p.leader_address.clone()))
        .collect();
    for (leader, address) in leaders {
        // Each within the command's deadline (`--timeout-ms`): a leader that does not answer
        // costs that long, and its partitions are shown as this broker reports them.
        let timeout = client.timeout();
        let Ok(Ok(there)) = tokio::time::timeout(
            timeout,
            Client::connect_with([address.as_str()], client.options().clone()),
        )
        .await
        else {
            continue;
        };
        let there = there.with_timeout(timeout);
        let Ok(Ok(led)) = tokio::time::timeout(timeout, there.admin().partitions("")).await else {
            continue;
        };
        for p in led.into_iter().filter(|p| p.leader_id == leader) {
            if let Some(known) = partitions
                .iter_mut()
                .find(|k| k.topic == p.topic && k.partition == p.partition)
            {
                *known = p;
            }
        }
    }
    Ok(partitions)
}

fn print_reassign(
    output: Output,
    started: &[String],
    waiting: &[String],
    done: &[String],
) -> anyhow::Result<()> {
    match output {
        Output::Json => {
            print_json(&json!({ "started": started, "waiting": waiting, "done": done }))?
        }
        Output::Text => {
            for d in done {
                outln!("{d}");
            }
            for m in started {
                outln!("moving {m}");
            }
            for w in waiting {
                outln!("waiting {w}");
            }
            if started.is_empty() && waiting.is_empty() && done.is_empty() {
                outln!("nothing to move");
            }
        }
    }
    Ok(())
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
            let partitions = partitions_from_leaders(client).await?;
            let ids = |ids: &[u64]| ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
            match output {
                Output::Json => print_json(&json!({
                    "cluster_id": s.cluster_id,
                    "controller_id": s.controller_id,
                    "topic_count": s.topic_count,
                    "partition_count": s.partition_count,
                    "nodes": s.nodes.iter().map(|n| json!({
                        "id": n.id, "client_address": n.client_address, "peer_address": n.peer_address,
                        "reachable": n.reachable, "voter": n.voter, "removing": n.removing,
                        "unregistered": n.unregistered,
                    })).collect::<Vec<_>>(),
                    "partitions": partitions.iter().map(|p| json!({
                        "topic": p.topic, "partition": p.partition, "leader_id": p.leader_id,
                        "replicas": p.replicas, "in_sync_replicas": p.in_sync_replicas,
                        "under_replicated": p.under_replicated, "moving_to": p.moving_to,
                        "replica_lag": p.replica_lag.iter().map(|l| json!({
                            "node_id": l.node_id, "entries": l.entries, "bytes": l.bytes,
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                }))?,
                Output::Text => {
                    outln!(
                        "cluster {}  controller {}  topics {}  partitions {}",
                        s.cluster_id,
                        s.controller_id,
                        s.topic_count,
                        s.partition_count
                    );
                    for n in &s.nodes {
                        outln!(
                            "  node {}  client {}  peer {}  reachable {}{}",
                            n.id,
                            n.client_address,
                            n.peer_address,
                            n.reachable,
                            if n.removing {
                                "  REMOVING"
                            } else if n.unregistered {
                                "  UNREGISTERED (a controller member that has not registered: \
                                 still catching up, or lost before it registered; `weft cluster \
                                 remove-broker` takes a lost one out once it is stopped)"
                            } else {
                                ""
                            }
                        );
                    }
                    for p in &partitions {
                        let lag = p
                            .replica_lag
                            .iter()
                            .map(|l| format!("{}:{}/{}B", l.node_id, l.entries, l.bytes))
                            .collect::<Vec<_>>()
                            .join(" ");
                        outln!(
                            "  partition {}/{}  leader {}  replicas {}  in sync {}  lag {}{}{}",
                            p.topic,
                            p.partition,
                            p.leader_id,
                            ids(&p.replicas),
                            ids(&p.in_sync_replicas),
                            if lag.is_empty() { "-" } else { &lag },
                            if p.under_replicated {
                                "  UNDER-REPLICATED"
                            } else {
                                ""
                            },
                            if p.moving_to.is_empty() {
                                String::new()
                            } else {
                                format!("  moving to {}", ids(&p.moving_to))
                            },
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
                }))?,
                Output::Text => outln!("{topic}/{partition} is led by node {leader}"),
            }
        }
        ClusterCommand::EndRecovery {
            node_id,
            accept_data_loss,
        } => {
            if !accept_data_loss {
                anyhow::bail!(
                    "end-recovery makes a broker that lost its data vote before it has caught \
                     up: a leader it helps elect may lack acknowledged records. Pass \
                     --accept-data-loss to go on"
                );
            }
            let was = client.admin().end_recovery(node_id, true).await?;
            match output {
                Output::Json => print_json(&json!({ "node_id": node_id, "was": was }))?,
                Output::Text if was == "normal" => {
                    outln!("node {node_id} was not recovering: nothing to end")
                }
                Output::Text => {
                    outln!("recovery of node {node_id} ended (was {was}): it votes everywhere")
                }
            }
        }
        ClusterCommand::Drain => {
            let (moved, kept) = client.admin().drain().await?;
            match output {
                Output::Json => print_json(&json!({ "moved": moved, "kept": kept }))?,
                Output::Text => {
                    for m in &moved {
                        outln!("moved {m}");
                    }
                    for k in &kept {
                        outln!("kept {k}");
                    }
                    if moved.is_empty() && kept.is_empty() {
                        outln!("this broker leads no partition");
                    }
                }
            }
            let unmarked = kept.iter().any(|k| k.starts_with("draining mark:"));
            let led = kept.len() - usize::from(unmarked);
            match (led, unmarked) {
                (0, false) => {}
                (0, true) => anyhow::bail!(
                    "the broker could not be marked as draining: other brokers may hand it leaderships back"
                ),
                (led, false) => anyhow::bail!("{led} partitions are still led by this broker"),
                (led, true) => anyhow::bail!(
                    "{led} partitions are still led by this broker, and it could not be marked as draining"
                ),
            }
        }
        ClusterCommand::Undrain => {
            let was_draining = client.admin().undrain().await?;
            match output {
                Output::Json => print_json(&json!({ "was_draining": was_draining }))?,
                Output::Text if was_draining => outln!(
                    "no longer draining: the broker gets new replicas and its preferred leaderships back"
                ),
                Output::Text => outln!("the broker was not draining"),
            }
        }
        ClusterCommand::Move {
            topic,
            partition,
            replicas,
            wait,
        } => {
            let p = client
                .admin()
                .move_partition(&topic, partition, replicas)
                .await?;
            let ids = |ids: &[u64]| ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
            if wait && !p.moving_to.is_empty() {
                let started = vec![format!("{topic}/{partition}: -> [{}]", ids(&p.moving_to))];
                wait_for_moves(client, None, &started).await?;
            }
            match output {
                Output::Json => print_json(&json!({
                    "topic": topic, "partition": partition, "replicas": p.replicas,
                    "moving_to": p.moving_to, "done": wait || p.moving_to.is_empty(),
                }))?,
                Output::Text if p.moving_to.is_empty() => {
                    outln!("{topic}/{partition} is on {}", ids(&p.replicas))
                }
                Output::Text if wait => {
                    outln!("{topic}/{partition} moved to {}", ids(&p.moving_to))
                }
                Output::Text => outln!(
                    "{topic}/{partition} is moving from {} to {}",
                    ids(&p.replicas),
                    ids(&p.moving_to)
                ),
            }
        }
        ClusterCommand::Rebalance { wait } => {
            let (started, waiting) = client.admin().rebalance().await?;
            print_reassign(output, &started, &waiting, &[])?;
            if wait {
                wait_for_moves(client, None, &started).await?;
            }
        }
        ClusterCommand::RemoveBroker { node_id, wait } => {
            let removal = client.admin().remove_broker(node_id).await?;
            print_reassign(output, &removal.started, &removal.waiting, &removal.done)?;
            if wait {
                // Done once the broker is gone: its moves may be planned again meanwhile.
                wait_for_moves(client, Some(node_id), &[]).await?;
                if output == Output::Text {
                    outln!("node {node_id} has left the cluster: stop it");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_targets_of_started_moves_are_read_from_the_answer() {
        let targets = started_targets(&[
            "moves/0: [1, 2, 3] -> [2, 4, 3]".to_string(),
            "moves/1: -> [4] (under way)".to_string(),
            "orders/12: -> [3,1]".to_string(),
            "not a move".to_string(),
        ]);
        assert_eq!(targets.len(), 3);
        assert_eq!(targets["moves/0"], vec![2, 4, 3]);
        assert_eq!(targets["moves/1"], vec![4]);
        assert_eq!(targets["orders/12"], vec![3, 1]);
    }

    #[test]
    fn a_move_is_over_at_its_target_or_once_replaced() {
        let target = [2, 4, 3];
        assert!(move_over(&[2, 4, 3], &[], &target, None), "at its target");
        assert!(!move_over(&[1, 2, 3], &[2, 4, 3], &target, None), "moving");
        assert!(
            move_over(&[2, 4, 3, 5], &[4, 3, 5], &target, None),
            "replaced by a move from its target"
        );
        // Not moving and away from its target: a view from before the move (a few seconds at
        // most), or a move replaced by another that ended between two looks.
        let away = Some(std::time::Duration::from_secs(2));
        assert!(!move_over(&[1, 2, 3], &[], &target, away));
        assert!(move_over(&[4, 3, 5], &[], &target, Some(REPLACED_AFTER)));
    }
}
