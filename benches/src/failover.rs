//! `weft-bench failover`: how long a three-broker cluster goes without a leader when a leader
//! stops answering. It starts the `weft-cluster` driver's cluster, creates a topic of one
//! partition (replication factor 3), and in each round freezes the partition's leader with
//! SIGSTOP (its sockets stay open, as when it is cut off or hung: nothing tells the followers it
//! is gone but its silence), then asks another broker for the partition's leader every 20 ms
//! until a different broker leads. The time from the SIGSTOP to that answer is the round's
//! failover. The frozen broker then gets SIGCONT, rejoins as a follower, and the cluster's
//! leader balance moves the leadership back before the next round.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rustix::process::Signal;
use serde::Serialize;

use crate::drivers::Driver;
use crate::drivers::weft::WeftClusterDriver;

const TOPIC: &str = "failover";

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverResult {
    /// Seconds from each SIGSTOP of the leader until another broker led, in round order.
    pub failover_seconds: Vec<f64>,
    /// The frozen leader and the new one, per round.
    pub leaders: Vec<(u64, u64)>,
}

impl FailoverResult {
    /// (min, median, max) of the failover times.
    pub fn summary(&self) -> (f64, f64, f64) {
        let mut sorted = self.failover_seconds.clone();
        sorted.sort_by(f64::total_cmp);
        match (sorted.first(), sorted.last()) {
            (Some(min), Some(max)) => (*min, sorted[sorted.len() / 2], *max),
            _ => (0.0, 0.0, 0.0),
        }
    }
}

/// The leader of partition 0 of `topic` as `node` sees it (0: none, or no answer).
pub(crate) async fn leader_seen_by(cluster: &WeftClusterDriver, topic: &str, node: u64) -> u64 {
    let Some(client) = cluster.client(node) else {
        return 0;
    };
    match tokio::time::timeout(Duration::from_secs(2), client.admin().partitions(topic)).await {
        Ok(Ok(partitions)) => partitions.first().map_or(0, |p| p.leader_id),
        _ => 0,
    }
}

/// Runs `rounds` failovers in a cluster kept in `dir`.
pub async fn run(rounds: usize, dir: &Path) -> Result<FailoverResult> {
    let (_data, cluster) = WeftClusterDriver::start_in(dir, "weft-bench-failover").await?;
    let outcome = rounds_on(&cluster, rounds).await;
    // Whatever happened, no broker stays frozen.
    cluster.stop().await?;
    outcome
}

async fn rounds_on(cluster: &WeftClusterDriver, rounds: usize) -> Result<FailoverResult> {
    cluster.create_topic(TOPIC, 1).await?;
    let mut result = FailoverResult {
        failover_seconds: Vec::new(),
        leaders: Vec::new(),
    };
    for round in 0..rounds {
        let leader = wait_for_leader(cluster, TOPIC, 1, None, Duration::from_secs(30)).await?;
        let witness = if leader == 1 { 2 } else { 1 };
        cluster.signal(leader, Signal::STOP)?;
        let stopped = Instant::now();
        let next = wait_for_leader(
            cluster,
            TOPIC,
            witness,
            Some(leader),
            Duration::from_secs(60),
        )
        .await;
        let seconds = stopped.elapsed().as_secs_f64();
        cluster.signal(leader, Signal::CONT)?;
        let next = next?;
        eprintln!(
            "round {}/{rounds}: node {leader} frozen, node {next} leads after {seconds:.2} s",
            round + 1
        );
        result.failover_seconds.push(seconds);
        result.leaders.push((leader, next));
        // The frozen broker catches up, and the leader balance (every 5 s) may move the
        // leadership back: wait until the partition's preferred replica leads again, or 20 s.
        if round + 1 == rounds {
            break;
        }
        let settle = Instant::now() + Duration::from_secs(20);
        while Instant::now() < settle && leader_seen_by(cluster, TOPIC, witness).await != leader {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(result)
}

/// Waits until `node` names a leader of partition 0 of `topic` other than `not`.
pub(crate) async fn wait_for_leader(
    cluster: &WeftClusterDriver,
    topic: &str,
    node: u64,
    not: Option<u64>,
    limit: Duration,
) -> Result<u64> {
    let deadline = Instant::now() + limit;
    loop {
        let leader = leader_seen_by(cluster, topic, node).await;
        if leader != 0 && Some(leader) != not {
            return Ok(leader);
        }
        if Instant::now() > deadline {
            bail!("no new leader of {topic}/0 seen by node {node} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
