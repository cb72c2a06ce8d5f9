//! The faults and their schedule: a quiet start, then one fault at a time (held 5-10 s, then
//! healed, then 3-8 s of calm), until the workload ends; then everything is healed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use weft_proto::v1::ListPartitionsRequest;
use weft_proto::v1::cluster_client::ClusterClient;

use crate::cluster::{Cluster, State};
use crate::history::{Function, Kind, Op, Recorder};
use crate::power;
use crate::workload::{Clients, TOPIC};

/// A class of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Network partitions: one node isolated, halves, a bridge, a majorities ring (5+ nodes), an
    /// isolated leader, a node that receives nothing (one way).
    Partition,
    /// Each node drops 5-20% of the packets it receives.
    Loss,
    /// kill -9 a minority, restarted at heal.
    Kill,
    /// kill -9 the leader of a random partition, restarted at heal.
    LeaderKill,
    /// SIGSTOP a minority, SIGCONT at heal.
    Pause,
    /// Every node loses power at one instant: all frozen (SIGSTOP), then killed, each partition
    /// file cut back to what its sync journal says was durable plus a torn tail; restarted at heal.
    PowerLossAll,
    /// One node is killed and its segment files damaged (bit flips, truncation, zeroed chunks);
    /// restarted at heal.
    CorruptionMinority,
    /// A minority restarts with its clock off by up to 30 s (faketime); restarted without at heal.
    ClockSkew,
    /// Membership changes, in turn: a spare broker is added (it joins; replicas are rebalanced
    /// onto it), then a broker is removed (its replicas move away, it leaves the cluster, and at
    /// heal it is stopped and its data wiped), then the wiped broker is added again.
    Membership,
    /// Every broker in turn is stopped gracefully (SIGTERM), started again, and waited for
    /// until ready, as a rolling upgrade does.
    RollingRestart,
}

impl Fault {
    /// Every fault class.
    pub const ALL: [Fault; 10] = [
        Fault::Partition,
        Fault::Loss,
        Fault::Kill,
        Fault::LeaderKill,
        Fault::Pause,
        Fault::PowerLossAll,
        Fault::CorruptionMinority,
        Fault::ClockSkew,
        Fault::Membership,
        Fault::RollingRestart,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Partition => "partition",
            Fault::Loss => "loss",
            Fault::Kill => "kill",
            Fault::LeaderKill => "leader-kill",
            Fault::Pause => "pause",
            Fault::PowerLossAll => "power-loss-all",
            Fault::CorruptionMinority => "corruption-minority",
            Fault::ClockSkew => "clock-skew",
            Fault::Membership => "membership",
            Fault::RollingRestart => "rolling-restart",
        }
    }
}

/// The nemesis: the cluster (shared with the final phase) and the rng of the run.
#[derive(Debug)]
pub struct Nemesis {
    cluster: Arc<Mutex<Cluster>>,
    clients: Clients,
    recorder: Arc<Recorder>,
    rng: StdRng,
    /// Faults injected so far, by class.
    pub injected: std::collections::BTreeMap<&'static str, u64>,
    /// A broker being removed (stopped and wiped at heal, once it has left the cluster).
    removing: Option<u64>,
    /// Corruption flips bits in partition data only (many of them), never truncates or zeroes:
    /// for the crc-off canary, whose damage must be of the kind only a batch CRC catches.
    pub flips_only: bool,
    /// Partitions always cut a partition's leader off from the other brokers: for the
    /// dirty-read canary, whose uncommitted writes exist only on a leader cut off.
    pub leaders_only: bool,
}

fn lock(cluster: &Mutex<Cluster>) -> std::sync::MutexGuard<'_, Cluster> {
    cluster
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Nemesis {
    /// A nemesis for `cluster`.
    pub fn new(
        cluster: Arc<Mutex<Cluster>>,
        clients: Clients,
        recorder: Arc<Recorder>,
        seed: u64,
    ) -> Nemesis {
        Nemesis {
            cluster,
            clients,
            recorder,
            rng: StdRng::seed_from_u64(seed),
            injected: Default::default(),
            removing: None,
            flips_only: false,
            leaders_only: false,
        }
    }

    fn record(&self, kind: Kind, id: u64, detail: String) {
        let mut op = Op::new("nemesis", id, kind, Function::Nemesis);
        op.detail = Some(detail);
        self.recorder.record(op);
    }

    /// Runs the schedule until `stop`, then heals everything.
    pub async fn run(
        &mut self,
        faults: &[Fault],
        quiet: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        if faults.is_empty() {
            let _ = stop.wait_for(|s| *s).await;
            return Ok(());
        }
        let _ = tokio::time::timeout(quiet, stop.wait_for(|s| *s)).await;
        while !*stop.borrow() {
            let fault = faults[self.rng.random_range(0..faults.len())];
            let id = self.recorder.next_id();
            let detail = self
                .inject(fault)
                .await
                .with_context(|| format!("injecting {}", fault.name()))?;
            *self.injected.entry(fault.name()).or_default() += 1;
            self.record(Kind::Invoke, id, format!("{}: {detail}", fault.name()));
            // A power loss of every broker is an instant: what it tests is the crash, the cut
            // files and the restart, not the dark minutes between. The power comes back after
            // 1-3 s (a 5-10 s hold left a 60 s run more dark than lit, and too few sends).
            let hold = Duration::from_millis(match fault {
                Fault::PowerLossAll => self.rng.random_range(1_000..3_000),
                _ => self.rng.random_range(5_000..10_000),
            });
            let _ = tokio::time::timeout(hold, stop.wait_for(|s| *s)).await;
            self.heal().await?;
            self.record(Kind::Ok, id, format!("healed {}", fault.name()));
            let calm = Duration::from_millis(self.rng.random_range(3_000..8_000));
            let _ = tokio::time::timeout(calm, stop.wait_for(|s| *s)).await;
        }
        Ok(())
    }

    /// The current leaders (node ids) of the topic's partitions, as a random broker sees them.
    async fn leaders(&mut self) -> Vec<u64> {
        let (_, channel) = self.clients.any(&mut self.rng);
        let mut request = tonic::Request::new(ListPartitionsRequest {
            topic: TOPIC.into(),
        });
        request.set_timeout(Duration::from_secs(1));
        match ClusterClient::new(channel).list_partitions(request).await {
            Ok(r) => r
                .into_inner()
                .partitions
                .into_iter()
                .map(|p| p.leader_id)
                .filter(|l| *l != 0)
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    fn minority(&mut self, ids: &[u64]) -> Vec<u64> {
        let mut ids = ids.to_vec();
        ids.shuffle(&mut self.rng);
        let most = (ids.len() - 1) / 2;
        let count = self.rng.random_range(1..=most.max(1));
        ids.truncate(count);
        ids.sort_unstable();
        ids
    }

    async fn inject(&mut self, fault: Fault) -> Result<String> {
        let ids = lock(&self.cluster).members();
        match fault {
            Fault::Partition => self.partition(&ids).await,
            Fault::Loss => {
                let p = self.rng.random_range(0.05..0.20);
                let cluster = lock(&self.cluster);
                for id in &ids {
                    cluster.net.lose(*id, p)?;
                }
                Ok(format!("every node drops {:.0}% of its packets", p * 100.0))
            }
            Fault::Kill => {
                let victims = self.minority(&ids);
                let mut cluster = lock(&self.cluster);
                for id in &victims {
                    cluster.kill(*id)?;
                }
                Ok(format!("killed {victims:?}"))
            }
            Fault::LeaderKill => {
                let leaders = self.leaders().await;
                let victim = if leaders.is_empty() {
                    ids[self.rng.random_range(0..ids.len())]
                } else {
                    leaders[self.rng.random_range(0..leaders.len())]
                };
                lock(&self.cluster).kill(victim)?;
                Ok(format!("killed leader {victim}"))
            }
            Fault::Pause => {
                let victims = self.minority(&ids);
                let mut cluster = lock(&self.cluster);
                for id in &victims {
                    cluster.pause(*id)?;
                }
                Ok(format!("paused {victims:?}"))
            }
            Fault::PowerLossAll => {
                let seed = self.rng.random::<u64>();
                let cluster = self.cluster.clone();
                tokio::task::spawn_blocking(move || power_loss_all(&mut lock(&cluster), seed))
                    .await
                    .context("power loss task")?
            }
            Fault::CorruptionMinority => {
                let victim = ids[self.rng.random_range(0..ids.len())];
                let seed = self.rng.random::<u64>();
                let cluster = self.cluster.clone();
                let flips_only = self.flips_only;
                tokio::task::spawn_blocking(move || {
                    let mut cluster = lock(&cluster);
                    cluster.kill(victim)?;
                    let node = cluster
                        .nodes
                        .iter()
                        .find(|n| n.id == victim)
                        .context("victim")?;
                    let mut rng = StdRng::seed_from_u64(seed);
                    let done = if flips_only {
                        power::flip_bits(&node.data_dir(), &mut rng)?
                    } else {
                        power::corrupt(&node.data_dir(), &mut rng)?
                    };
                    Ok(format!("node {victim}: {}", done.join("; ")))
                })
                .await
                .context("corruption task")?
            }
            Fault::Membership => self.membership(&ids).await,
            Fault::RollingRestart => {
                let mut order = ids.clone();
                order.shuffle(&mut self.rng);
                for &id in &order {
                    let cluster = self.cluster.clone();
                    let address = tokio::task::spawn_blocking(move || {
                        let mut cluster = lock(&cluster);
                        cluster.stop(id)?;
                        cluster.start(id)?;
                        anyhow::Ok(cluster.admin_address(id))
                    })
                    .await
                    .context("restart task")??;
                    crate::cluster::wait_ready(id, &address, Duration::from_secs(90)).await?;
                }
                Ok(format!("restarted {order:?} one at a time"))
            }
            Fault::ClockSkew => {
                let victims = self.minority(&ids);
                let mut skews = Vec::new();
                for id in &victims {
                    let seconds =
                        self.rng.random_range(1..=30i32) * if self.rng.random() { 1 } else { -1 };
                    skews.push((*id, format!("{seconds:+}s")));
                }
                let cluster = self.cluster.clone();
                let described = format!("{skews:?}");
                tokio::task::spawn_blocking(move || {
                    let mut cluster = lock(&cluster);
                    for (id, skew) in skews {
                        cluster.stop(id)?;
                        if let Some(node) = cluster.nodes.iter_mut().find(|n| n.id == id) {
                            node.skew = Some(skew);
                        }
                        cluster.start(id)?;
                    }
                    anyhow::Ok(())
                })
                .await
                .context("clock skew task")??;
                Ok(format!("clocks skewed: {described}"))
            }
        }
    }

    /// One membership step (see [`Fault::Membership`]).
    async fn membership(&mut self, members: &[u64]) -> Result<String> {
        let (spare, admin) = {
            let cluster = lock(&self.cluster);
            let spare = cluster.nodes.iter().find(|n| !n.member).map(|n| n.id);
            let admin: Vec<(u64, String)> = cluster
                .ids()
                .into_iter()
                .map(|id| (id, cluster.admin_address(id)))
                .collect();
            (spare, admin)
        };
        let address = |id: u64| {
            admin
                .iter()
                .find(|(n, _)| *n == id)
                .map(|(_, a)| a.clone())
                .unwrap_or_default()
        };
        if self.removing.is_some() {
            return Ok("a removal is still under way: nothing more".into());
        }
        if let Some(id) = spare {
            {
                let mut cluster = lock(&self.cluster);
                cluster.node_mut(id)?.member = true;
                cluster.start(id)?;
            }
            crate::cluster::wait_ready(id, &address(id), Duration::from_secs(90)).await?;
            let via = members[self.rng.random_range(0..members.len())];
            let began = std::time::Instant::now();
            let (status, body) = crate::cluster::http_post(&address(via), "/v1/rebalance").await?;
            return Ok(format!(
                "added node {id}; rebalance through node {via} ({} ms): {status} {body}",
                began.elapsed().as_millis()
            ));
        }
        let victim = members[self.rng.random_range(0..members.len())];
        let others: Vec<u64> = members.iter().copied().filter(|m| *m != victim).collect();
        let via = others[self.rng.random_range(0..others.len())];
        let began = std::time::Instant::now();
        let (status, body) =
            crate::cluster::http_post(&address(via), &format!("/v1/brokers/{victim}/remove"))
                .await?;
        if status == 202 {
            self.removing = Some(victim);
        }
        Ok(format!(
            "removing node {victim} through node {via} ({} ms): {status} {body}",
            began.elapsed().as_millis()
        ))
    }

    /// Once the broker being removed has left the cluster (up to 90 s): stops it and wipes its
    /// data, so it can be added again as a new broker.
    async fn finish_removal(&mut self) -> Result<()> {
        let Some(victim) = self.removing else {
            return Ok(());
        };
        let asked: Vec<String> = {
            let cluster = lock(&self.cluster);
            cluster
                .members()
                .into_iter()
                .filter(|m| *m != victim)
                .map(|m| cluster.admin_address(m))
                .collect()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let mut gone = false;
            for address in &asked {
                if let Ok((200, body)) = crate::cluster::http_get(address, "/v1/cluster").await
                    && let Ok(view) = serde_json::from_str::<serde_json::Value>(&body)
                {
                    gone = view["brokers"]
                        .as_array()
                        .is_some_and(|b| !b.iter().any(|x| x["id"] == victim));
                    break;
                }
            }
            if gone {
                break;
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "node {victim} has not left the cluster 90 s after its removal began"
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let cluster = self.cluster.clone();
        tokio::task::spawn_blocking(move || {
            let mut cluster = lock(&cluster);
            cluster.stop(victim)?;
            let node = cluster.node_mut(victim)?;
            node.member = false;
            let data = node.data_dir();
            if data.exists() {
                std::fs::remove_dir_all(&data)
                    .with_context(|| format!("wiping {}", data.display()))?;
            }
            anyhow::Ok(())
        })
        .await
        .context("wipe task")??;
        self.removing = None;
        Ok(())
    }

    async fn partition(&mut self, ids: &[u64]) -> Result<String> {
        let shapes = if ids.len() >= 5 { 6 } else { 5 };
        let mut shuffled = ids.to_vec();
        shuffled.shuffle(&mut self.rng);
        let mut cuts: Vec<(u64, u64)> = Vec::new();
        let all_pairs = |a: &[u64], b: &[u64]| -> Vec<(u64, u64)> {
            a.iter()
                .flat_map(|x| b.iter().map(move |y| (*x, *y)))
                .collect()
        };
        let shape = if self.leaders_only {
            3
        } else {
            self.rng.random_range(0..shapes)
        };
        let description = match shape {
            0 => {
                let (one, rest) = shuffled.split_at(1);
                cuts = all_pairs(one, rest);
                format!("node {} isolated", one[0])
            }
            1 => {
                let minority = (ids.len() - 1) / 2;
                let (small, large) = shuffled.split_at(minority.max(1));
                cuts = all_pairs(small, large);
                format!("halves {small:?} | {large:?}")
            }
            2 => {
                // One node (the bridge) reaches both halves; the halves do not reach each other.
                let bridge = shuffled[0];
                let rest = &shuffled[1..];
                let (a, b) = rest.split_at(rest.len() / 2);
                cuts = all_pairs(a, b);
                format!("bridge {bridge} between {a:?} and {b:?}")
            }
            3 => {
                let leaders = self.leaders().await;
                let leader = if leaders.is_empty() {
                    shuffled[0]
                } else {
                    leaders[self.rng.random_range(0..leaders.len())]
                };
                let others: Vec<u64> = ids.iter().copied().filter(|i| *i != leader).collect();
                cuts = all_pairs(&[leader], &others);
                format!("leader {leader} isolated")
            }
            4 => {
                let deaf = shuffled[0];
                let cluster = lock(&self.cluster);
                for other in &shuffled[1..] {
                    cluster.net.drop_from(deaf, *other)?;
                }
                return Ok(format!(
                    "node {deaf} receives nothing from the others (one way)"
                ));
            }
            _ => {
                // Majorities ring: each node reaches its neighbours on a ring only (every node
                // sees a majority, no two see the same one).
                let n = shuffled.len();
                for i in 0..n {
                    for j in i + 1..n {
                        let distance = (j - i).min(n - (j - i));
                        if distance > 1 {
                            cuts.push((shuffled[i], shuffled[j]));
                        }
                    }
                }
                format!("majorities ring {shuffled:?}")
            }
        };
        let cluster = lock(&self.cluster);
        for (a, b) in cuts {
            cluster.net.cut(a, b)?;
        }
        Ok(description)
    }

    /// Heals everything: network rules flushed, paused nodes resumed, skewed nodes restarted
    /// without skew, down nodes started, and waits (up to 90 s) for every node to be ready.
    pub async fn heal(&mut self) -> Result<()> {
        self.finish_removal().await?;
        let cluster = self.cluster.clone();
        let admin = tokio::task::spawn_blocking(move || {
            let mut cluster = lock(&cluster);
            cluster.net.heal()?;
            for id in cluster.members() {
                let (state, skewed) = cluster
                    .nodes
                    .iter()
                    .find(|n| n.id == id)
                    .map(|n| (n.state, n.skew.is_some()))
                    .context("node")?;
                if skewed {
                    cluster.stop(id)?;
                    if let Some(node) = cluster.nodes.iter_mut().find(|n| n.id == id) {
                        node.skew = None;
                    }
                    cluster.start(id)?;
                    continue;
                }
                match state {
                    State::Paused => cluster.resume(id)?,
                    State::Down => cluster.start(id)?,
                    State::Up => {}
                }
            }
            anyhow::Ok(
                cluster
                    .members()
                    .into_iter()
                    .map(|id| (id, cluster.admin_address(id)))
                    .collect::<Vec<_>>(),
            )
        })
        .await
        .context("heal task")??;
        for (id, address) in admin {
            crate::cluster::wait_ready(id, &address, Duration::from_secs(90)).await?;
        }
        Ok(())
    }
}

/// Every node loses power at one instant (see [`Fault::PowerLossAll`]).
fn power_loss_all(cluster: &mut Cluster, seed: u64) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let ids = cluster.members();
    // Freeze everything at one instant: what the journals say then is what was durable.
    for id in &ids {
        cluster.pause(*id)?;
    }
    let mut lengths = Vec::new();
    for node in cluster.nodes.iter().filter(|n| n.member) {
        let journal = node.journal();
        let len = std::fs::metadata(&journal).map_or(0, |m| m.len() as usize);
        if len == 0 {
            anyhow::bail!(
                "node {} has no sync journal ({}): the broker must be built with the \
                 `sync-journal` feature for power-loss faults",
                node.id,
                journal.display()
            );
        }
        lengths.push(len);
    }
    for id in &ids {
        cluster.kill(*id)?;
    }
    let mut cut = Vec::new();
    for (node, len) in cluster.nodes.iter().filter(|n| n.member).zip(lengths) {
        let files = power::power_loss(&node.data_dir(), &node.journal(), len, &mut rng)?;
        cut.push(format!("node {}: {files} files cut", node.id));
    }
    Ok(cut.join(", "))
}
