//! One run: the network and the cluster, the topic, the workload and the nemesis for the
//! configured time, then the final phase (heal everything, read every key from offset 0 until
//! everything seen is read, read each replica's own copy), then the check.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use weft_proto::v1::cluster_client::ClusterClient;
use weft_proto::v1::topic_admin_client::TopicAdminClient;
use weft_proto::v1::{CreateTopicRequest, ListPartitionsRequest, TopicConfig};

use crate::checker::{self, Report};
use crate::cluster::Cluster;
use crate::history::{self, Function, Kind, Op, Recorder};
use crate::nemesis::{Fault, Nemesis};
use crate::net::Net;
use crate::workload::{self, Clients, Progress, TOPIC};

/// How a run is set up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// Brokers.
    pub nodes: usize,
    /// Keys (partitions of the topic).
    pub keys: u32,
    /// Seconds of workload under faults.
    pub seconds: u64,
    /// Fault classes the nemesis picks from (none: a run without faults).
    pub faults: Vec<Fault>,
    /// The run's seed (network, workload and nemesis choices).
    pub seed: u64,
    /// Concurrent senders.
    pub senders: u32,
    /// Concurrent pollers.
    pub pollers: u32,
    /// Consumer-group members.
    #[serde(default)]
    pub members: u32,
    /// The `weft-broker` binary.
    pub broker: PathBuf,
    /// Fewest acknowledged sends for the run to count.
    pub min_acked: u64,
    /// Keep the brokers' data directories of a passing run too.
    pub keep_data: bool,
    /// A deliberate break of a safety mechanism, which the checker must catch.
    #[serde(default)]
    pub canary: Option<Canary>,
}

/// A canary: the run breaks one safety mechanism on purpose, and the checker must find
/// anomalies. A checker that never fails proves nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Canary {
    /// The topic acknowledges before fsync (`FSYNC_POLICY_INTERVAL`, synced every 60 s): a
    /// power loss of every broker must lose acknowledged records.
    AckBeforeFsync,
    /// The senders publish without a producer id, so the broker cannot recognise a retry: an
    /// ambiguous attempt that was stored and retried must show up as a duplicate.
    NoDedup,
    /// The brokers check no batch CRC (`WEFT_CANARY_SKIP_CRC=1`, a test-only switch): damage
    /// to a replica's files must reach clients (crc-escape, or replica-divergence).
    CrcOff,
    /// Reads go past the commit index (`WEFT_CANARY_READ_UNCOMMITTED=1`, a test-only switch):
    /// under partitions, records a cut-off leader wrote and never committed must be read
    /// (inconsistent offsets, aborted or lost values).
    DirtyRead,
}

impl Canary {
    /// Every canary, with the faults that expose it.
    pub const ALL: [(Canary, &'static [Fault]); 4] = [
        (Canary::AckBeforeFsync, &[Fault::PowerLossAll]),
        (
            Canary::NoDedup,
            &[Fault::Kill, Fault::LeaderKill, Fault::Partition],
        ),
        (Canary::CrcOff, &[Fault::CorruptionMinority]),
        (Canary::DirtyRead, &[Fault::Partition]),
    ];

    /// The anomalies that show its defect: a run catches the canary only with one of these,
    /// not with any anomaly (final reads cut short by the lost data would count unseen records
    /// for any canary, and say nothing of whether the checks meant for it work).
    pub fn signature(self) -> &'static [&'static str] {
        match self {
            Canary::AckBeforeFsync => &["lost-write", "unseen-at-end", "inconsistent-offsets"],
            Canary::NoDedup => &["duplicate"],
            Canary::CrcOff => &["crc-escape", "replica-divergence"],
            Canary::DirtyRead => &["inconsistent-offsets", "aborted-read", "phantom"],
        }
    }

    /// The count of `report`'s anomalies that show this canary's defect.
    pub fn caught_in(self, report: &crate::checker::Report) -> u64 {
        self.signature()
            .iter()
            .map(|a| report.anomalies.get(*a).copied().unwrap_or(0))
            .sum()
    }

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Canary::AckBeforeFsync => "ack-before-fsync",
            Canary::NoDedup => "no-dedup",
            Canary::CrcOff => "crc-off",
            Canary::DirtyRead => "dirty-read",
        }
    }
}

/// What a run found.
#[derive(Debug)]
pub struct Outcome {
    /// The check of its history.
    pub report: Report,
    /// Problems other than anomalies (too few sends, replicas that did not catch up).
    pub problems: Vec<String>,
}

impl Outcome {
    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        !self.report.failed() && self.problems.is_empty()
    }
}

/// How long the final reads may take after healing.
const FINAL_READ_LIMIT: Duration = Duration::from_secs(60);
/// How long a replica may take to catch up after healing.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);

/// Runs one test into `dir` and checks it.
pub async fn run(config: &RunConfig, dir: &Path) -> Result<Outcome> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("run.json"), serde_json::to_vec_pretty(config)?)?;
    if !config.broker.is_file() {
        bail!("no broker binary at {}", config.broker.display());
    }
    // A fault that cannot be injected proves nothing: refuse to start without the tools.
    let mut tools = vec!["ip", "iptables"];
    if config.faults.contains(&Fault::ClockSkew) {
        tools.push("faketime");
    }
    for tool in tools {
        let found = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            bail!(
                "{tool} is not installed (apt-get install iproute2 iptables faketime): \
                 the harness cannot run without it"
            );
        }
    }
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(config.seed);
    // The membership fault needs a spare broker to add (and a removed one to re-add).
    let spares = usize::from(config.faults.contains(&Fault::Membership));
    let net = Net::create(config.nodes + spares, dir, &mut rng)?;
    let mut cluster = Cluster::new(net, dir, &config.broker, config.nodes)?;
    match config.canary {
        Some(Canary::CrcOff) => cluster
            .env
            .push(("WEFT_CANARY_SKIP_CRC".into(), "1".into())),
        Some(Canary::DirtyRead) => cluster
            .env
            .push(("WEFT_CANARY_READ_UNCOMMITTED".into(), "1".into())),
        _ => {}
    }
    eprintln!(
        "[jepsen] {} nodes on 10.213.{}.0/24, seed {}, faults {:?}",
        config.nodes,
        cluster.net.subnet,
        config.seed,
        config.faults.iter().map(|f| f.name()).collect::<Vec<_>>()
    );
    cluster.start_all().await?;
    let addresses: Vec<(u64, String)> = cluster
        .ids()
        .into_iter()
        .map(|id| (id, cluster.client_address(id)))
        .collect();
    let clients = Clients::new(&addresses)?;
    create_topic(&clients, config).await?;
    let cluster = Arc::new(Mutex::new(cluster));

    let recorder = Arc::new(Recorder::create(
        &dir.join("history.jsonl"),
        Instant::now(),
    )?);
    let progress = Arc::new(Progress::new(config.keys));
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..config.senders {
        tasks.push(tokio::spawn(workload::sender(
            (i, config.canary == Some(Canary::NoDedup)),
            config.keys,
            clients.clone(),
            recorder.clone(),
            progress.clone(),
            stop.clone(),
            rng.random(),
        )));
    }
    for i in 0..config.pollers {
        tasks.push(tokio::spawn(workload::poller(
            i,
            config.keys,
            clients.clone(),
            recorder.clone(),
            progress.clone(),
            stop.clone(),
            rng.random(),
        )));
    }
    for i in 0..config.members {
        tasks.push(tokio::spawn(crate::groups::member(
            i,
            config.keys,
            clients.clone(),
            recorder.clone(),
            stop.clone(),
            rng.random(),
        )));
    }
    let (observer_stop_tx, observer_stop) = watch::channel(false);
    let observer = tokio::spawn(workload::observer(
        clients.clone(),
        recorder.clone(),
        observer_stop,
    ));
    let mut nemesis = Nemesis::new(
        cluster.clone(),
        clients.clone(),
        recorder.clone(),
        rng.random(),
    );
    nemesis.flips_only = config.canary == Some(Canary::CrcOff);
    nemesis.leaders_only = config.canary == Some(Canary::DirtyRead);
    let faults = config.faults.clone();
    let nemesis_stop = stop.clone();
    let nemesis_task = tokio::spawn(async move {
        let result = nemesis
            .run(&faults, Duration::from_secs(5), nemesis_stop)
            .await;
        (nemesis, result)
    });

    let deadline = Instant::now() + Duration::from_secs(config.seconds);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(5).min(deadline - Instant::now())).await;
        eprintln!(
            "[jepsen] {:>4.0} s: {} sends acknowledged",
            started.elapsed().as_secs_f64(),
            progress.acked.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let (mut nemesis, nemesis_result) = nemesis_task.await.context("nemesis task")?;
    let mut problems = Vec::new();
    if let Err(e) = nemesis_result {
        problems.push(format!("the nemesis failed: {e:#}"));
    }
    eprintln!("[jepsen] healing everything");
    if let Err(e) = nemesis.heal().await {
        problems.push(format!("healing failed: {e:#}"));
    }
    // A canary is meant to lose or damage data: what it lost is never read, so its final phase
    // is cut short rather than waiting out the full limits.
    let scale = if config.canary.is_some() { 3 } else { 1 };
    let limits = (FINAL_READ_LIMIT / scale, CATCH_UP_LIMIT / scale);
    final_reads(
        &clients,
        &recorder,
        &progress,
        config.keys,
        limits.0,
        &mut problems,
    )
    .await;
    replica_reads(
        &clients,
        &recorder,
        &progress,
        config.keys,
        limits.1,
        &mut problems,
    )
    .await;
    if config.members > 0
        && !crate::groups::final_read_committed(config.keys, &clients, &recorder).await
    {
        problems.push("the group's committed offsets could not be read at the end".into());
    }
    let _ = observer_stop_tx.send(true);
    let _ = observer.await;
    recorder.flush()?;
    drop(nemesis);
    match Arc::try_unwrap(cluster) {
        Ok(cluster) => {
            let mut cluster = cluster
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            tokio::task::block_in_place(|| cluster.stop_all());
            drop(cluster);
        }
        Err(_) => problems.push("the cluster was still shared at the end".into()),
    }

    let report = check_dir(dir)?;
    let acked = report.acked();
    if acked < config.min_acked {
        problems.push(format!(
            "only {acked} sends were acknowledged (at least {} required)",
            config.min_acked
        ));
    }
    let outcome = Outcome { report, problems };
    crate::report::write(
        dir,
        &outcome.report,
        serde_json::json!({
            "seed": config.seed,
            "config": config,
            "problems": outcome.problems,
            "passed": outcome.passed(),
            "seconds": started.elapsed().as_secs_f64(),
        }),
    )?;
    // A caught canary is the expected outcome: its data is not needed either.
    let expected = if config.canary.is_some() {
        outcome.report.failed()
    } else {
        outcome.passed()
    };
    if expected && !config.keep_data {
        for node in std::fs::read_dir(dir.join("nodes"))?.flatten() {
            let _ = std::fs::remove_dir_all(node.path().join("data"));
        }
    }
    Ok(outcome)
}

/// Checks the history saved in `dir`.
pub fn check_dir(dir: &Path) -> Result<Report> {
    let ops = history::read(&dir.join("history.jsonl"))?;
    Ok(checker::check(&ops))
}

async fn create_topic(clients: &Clients, config: &RunConfig) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let replication_factor = config.nodes.min(3) as u32;
    // Spares are not up yet: create through a broker of the cluster.
    loop {
        let (_, channel) = clients.nodes[0].clone();
        let mut request = tonic::Request::new(CreateTopicRequest {
            name: TOPIC.into(),
            config: Some(TopicConfig {
                partitions: config.keys,
                replication_factor,
                ..if config.canary == Some(Canary::AckBeforeFsync) {
                    TopicConfig {
                        fsync_policy: weft_proto::v1::FsyncPolicy::Interval as i32,
                        fsync_interval_ms: Some(60_000),
                        ..TopicConfig::default()
                    }
                } else {
                    TopicConfig::default()
                }
            }),
        });
        request.set_timeout(Duration::from_secs(5));
        match TopicAdminClient::new(channel).create_topic(request).await {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::AlreadyExists => break,
            Err(s) if Instant::now() > deadline => bail!("cannot create the topic: {s}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    loop {
        // Every broker knows the topic, and each partition has a leader that its replicas see
        // (a broker holding no replica of a partition does not report its leader).
        let mut led = vec![false; config.keys as usize];
        let mut known = true;
        for (_, channel) in clients.nodes.iter().take(config.nodes) {
            let mut request = tonic::Request::new(ListPartitionsRequest {
                topic: TOPIC.into(),
            });
            request.set_timeout(Duration::from_secs(2));
            match ClusterClient::new(channel.clone())
                .list_partitions(request)
                .await
            {
                Ok(r) => {
                    let partitions = r.into_inner().partitions;
                    known &= partitions.len() == config.keys as usize;
                    for p in partitions {
                        if p.leader_id != 0
                            && let Some(slot) = led.get_mut(p.partition as usize)
                        {
                            *slot = true;
                        }
                    }
                }
                Err(_) => known = false,
            }
        }
        let led = known && led.iter().all(|l| *l);
        if led {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the topic's partitions have no leaders after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads every key from offset 0 through any broker until everything any client saw is read.
async fn final_reads(
    clients: &Clients,
    recorder: &Recorder,
    progress: &Progress,
    keys: u32,
    limit: Duration,
    problems: &mut Vec<String>,
) {
    let mut rng = StdRng::seed_from_u64(7);
    // A key is given up on when its reads make no progress for `patience` (not a deadline for
    // the whole key: a long run's keys take a while to read); once one key was given up on,
    // the others get a few seconds each.
    let mut patience = limit;
    for key in 0..keys {
        // Up to the highest offset any client saw, and on to the high watermark the reads
        // report: records stored after it (retries that were still in flight, sends that
        // failed though they were stored) are checked too.
        let mut target = progress.end(key);
        let mut position = 0u64;
        let mut progressed_at = Instant::now();
        while position < target {
            if progressed_at.elapsed() > patience {
                problems.push(format!(
                    "key {key}: the final reads reached offset {position} of {target}, then no progress for {patience:?}"
                ));
                patience = Duration::from_secs(3);
                break;
            }
            match workload::poll_once(
                "final",
                Function::FinalPoll,
                key,
                position,
                clients.any(&mut rng),
                recorder,
                progress,
            )
            .await
            {
                Some((records, high_watermark)) if !records.is_empty() => {
                    position = records.last().map_or(position, |(o, _)| o + 1);
                    target = target.max(high_watermark);
                    progressed_at = Instant::now();
                }
                Some((_, high_watermark)) => {
                    target = target.max(high_watermark);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// Reads each replica's own copy of every key (a broker serves reads of a partition it holds
/// from its own log, up to its own commit index), once it has caught up.
async fn replica_reads(
    clients: &Clients,
    recorder: &Recorder,
    progress: &Progress,
    keys: u32,
    limit: Duration,
    problems: &mut Vec<String>,
) {
    let mut replicas: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
    let mut listed = false;
    for (_, channel) in &clients.nodes {
        let mut request = tonic::Request::new(ListPartitionsRequest {
            topic: TOPIC.into(),
        });
        request.set_timeout(Duration::from_secs(2));
        if let Ok(r) = ClusterClient::new(channel.clone())
            .list_partitions(request)
            .await
        {
            for p in r.into_inner().partitions {
                replicas.insert(p.partition, p.replicas);
            }
            listed = true;
            break;
        }
    }
    if !listed {
        problems.push("no broker listed the partitions' replicas: no copy was compared".into());
    }
    // A replica is given up on when its copy makes no progress for `limit` (a long run's
    // replicas may take minutes to read, but one that is stuck is seen stuck within `limit`);
    // a replica given up on once gets a few seconds on each further key.
    let mut stuck: std::collections::BTreeSet<u64> = Default::default();
    for key in 0..keys {
        let target = progress.end(key);
        for node in replicas.get(&key).cloned().unwrap_or_default() {
            let Some(channel) = clients.node(node) else {
                continue;
            };
            let mut op = Op::new(
                "replicas",
                recorder.next_id(),
                Kind::Invoke,
                Function::ReplicaRead,
            );
            op.key = Some(key);
            op.node = Some(node);
            op.offset = Some(0);
            recorder.record(op.clone());
            let patience = if stuck.contains(&node) {
                Duration::from_secs(3)
            } else {
                limit
            };
            let mut progressed_at = Instant::now();
            let mut records = Vec::new();
            let mut position = 0u64;
            let result = loop {
                if position >= target {
                    break Ok(());
                }
                if progressed_at.elapsed() > patience {
                    stuck.insert(node);
                    break Err(format!(
                        "node {node} holds key {key} up to offset {position}, not {target}: no progress for {patience:?}"
                    ));
                }
                let fetched =
                    workload::fetch(channel.clone(), key, position, workload::FINAL_READ_RECORDS)
                        .await;
                match fetched {
                    Ok((batch, _)) if !batch.is_empty() => {
                        position = batch.last().map_or(position, |(o, _)| o + 1);
                        records.extend(batch);
                        progressed_at = Instant::now();
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            op.records = Some(records);
            match result {
                Ok(()) => op.kind = Kind::Ok,
                Err(e) => {
                    op.kind = Kind::Info;
                    op.error = Some(e.clone());
                    problems.push(e);
                }
            }
            recorder.record(op);
        }
    }
}
