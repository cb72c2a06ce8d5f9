//! The partitions this node hosts, each with a supervisor task that owns its life: open the log
//! and the Raft group, replay the tail after the snapshot, serve, take snapshots, apply
//! retention, and, when the group stops on a storage error (a full disk, an I/O error), report it
//! down with the reason and open it again from its durable state once it can.
//!
//! A partition answers calls only when it is ready (open and caught up): before, calls get
//! UNAVAILABLE with a retry hint, never a state that is not yet current (a high watermark of 0, a
//! committed group offset clamped to it).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::meta::Metadata;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::BrokerError;
use crate::partition::{Partition, PartitionSpec};
use crate::raft::{Flusher, GroupSpec, NodeId, PartitionGroup, RaftConfig};

/// (topic, partition).
pub type PartitionKey = (String, u32);

/// Where a hosted partition is in its life.
#[derive(Debug, Clone)]
pub enum Phase {
    /// Opening its log and Raft group.
    Opening,
    /// Open, re-applying the log after its snapshot; not serving yet.
    Replaying(Arc<Partition>),
    /// Serving.
    Ready(Arc<Partition>),
    /// Stopped on an error; it is opened again after a pause.
    Down {
        /// Why.
        reason: String,
    },
}

impl Phase {
    /// A short name for logs, metrics and the admin API.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Opening => "opening",
            Phase::Replaying(_) => "replaying",
            Phase::Ready(_) => "ready",
            Phase::Down { .. } => "down",
        }
    }
}

/// What every supervisor needs from its node.
#[derive(Debug)]
pub struct HostContext {
    /// This node.
    pub node_id: NodeId,
    /// This node's peer address.
    pub peer_address: String,
    /// Where topic data lives: `<data_dir>/topics`.
    pub topics_dir: PathBuf,
    /// The metadata store.
    pub meta: Metadata,
    /// Raft settings of partition groups.
    pub raft_config: Arc<RaftConfig>,
    /// Publishes queued per partition.
    pub queue_max: usize,
    /// Bytes of publishes queued on this broker, all partitions together
    /// (`publish_queue_bytes_max`): a permit per byte.
    pub queue_bytes: crate::partition::QueueBytes,
    /// How often retention runs.
    pub retention_interval: Duration,
    /// Snapshot after this many applied record bytes.
    pub snapshot_interval_bytes: u64,
    /// Each partition's tail cache.
    pub read_cache_bytes: usize,
    /// Write segments with direct I/O.
    pub direct_io: bool,
    /// Forget producers idle this long.
    pub producer_expiration_ms: u64,
    /// Most producers one partition remembers.
    pub producers_per_partition_max: usize,
    /// The node's flusher.
    pub flusher: Flusher,
    /// The node's peer connections and Raft group directory.
    pub peers: crate::raft::Peers,
}

/// One hosted partition.
#[derive(Debug)]
pub struct Slot {
    /// Its topic's name and id and its partition number: fixed for the slot's life (a topic
    /// deleted and created again under the same name gets a new slot).
    topic: String,
    topic_id: String,
    partition: u32,
    spec: Mutex<PartitionSpec>,
    phase: watch::Sender<Phase>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Slot {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }

    /// Topic id.
    pub fn topic_id(&self) -> &str {
        &self.topic_id
    }

    /// The serving partition, or UNAVAILABLE saying why not.
    pub fn serving(&self) -> Result<Arc<Partition>, BrokerError> {
        let (topic, partition) = (&self.topic, self.partition);
        match &*self.phase.borrow() {
            Phase::Ready(p) => Ok(p.clone()),
            Phase::Down { reason } => Err(BrokerError::Unavailable {
                reason: format!("partition {topic}/{partition} is down: {reason}"),
                leader: None,
            }),
            other => Err(BrokerError::Unavailable {
                reason: format!("partition {topic}/{partition} is {}", other.name()),
                leader: None,
            }),
        }
    }
}

/// The hosted partitions.
#[derive(Debug)]
pub struct Registry {
    context: Arc<HostContext>,
    /// By topic name, then partition (looked up on every call: no key is built to find one).
    slots: RwLock<HashMap<String, BTreeMap<u32, Arc<Slot>>>>,
    /// Bumped whenever a slot changes phase, for waiters.
    changed: watch::Sender<u64>,
}

impl Registry {
    /// An empty registry.
    pub fn new(context: HostContext) -> Registry {
        Registry {
            context: Arc::new(context),
            slots: RwLock::new(HashMap::new()),
            changed: watch::Sender::new(0),
        }
    }

    /// A hosted partition's slot.
    pub fn slot(&self, topic: &str, partition: u32) -> Option<Arc<Slot>> {
        self.slots.read().ok()?.get(topic)?.get(&partition).cloned()
    }

    /// Every slot, in (topic, partition) order.
    pub fn slots(&self) -> Vec<(PartitionKey, Arc<Slot>)> {
        let mut all: Vec<(PartitionKey, Arc<Slot>)> = self
            .slots
            .read()
            .map(|m| {
                m.iter()
                    .flat_map(|(topic, partitions)| {
                        partitions
                            .iter()
                            .map(|(&p, slot)| ((topic.clone(), p), slot.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Watches phase changes.
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The partition directory of one partition of a topic.
    pub fn partition_dir(&self, topic_id: &str, partition: u32) -> PathBuf {
        self.context
            .topics_dir
            .join(topic_id)
            .join(partition.to_string())
    }

    /// Makes the hosted partitions match `wanted`: starts missing ones, applies configuration
    /// changes, stops and deletes the data of those no longer wanted (a deleted topic).
    pub async fn reconcile(&self, wanted: Vec<PartitionSpec>) {
        let mut wanted: HashMap<PartitionKey, PartitionSpec> = wanted
            .into_iter()
            .map(|s| ((s.topic.clone(), s.partition), s))
            .collect();
        let mut removed = Vec::new();
        if let Ok(mut slots) = self.slots.write() {
            for partitions in slots.values_mut() {
                partitions.retain(|_, slot| {
                    let key = (slot.topic.clone(), slot.partition);
                    match wanted.get(&key) {
                        Some(spec) if slot.topic_id == spec.topic_id => true,
                        _ => {
                            removed.push(slot.clone());
                            false
                        }
                    }
                });
            }
            slots.retain(|_, partitions| !partitions.is_empty());
            for slot in slots.values().flat_map(|partitions| partitions.values()) {
                let key = (slot.topic.clone(), slot.partition);
                if let Some(spec) = wanted.remove(&key)
                    && let Ok(mut s) = slot.spec.lock()
                    && s.config != spec.config
                {
                    // The spec first, then the phase, both under the spec's lock: a partition
                    // that starts meanwhile finds the new spec once it is Replaying (supervise
                    // checks it then). Before, a change made while the partition opened was
                    // stored here and never applied to it.
                    let config = spec.config.clone();
                    *s = spec;
                    if let Phase::Ready(p) | Phase::Replaying(p) = slot.phase() {
                        p.set_config(config);
                    }
                }
            }
            for ((topic, partition), spec) in wanted {
                let slot = Arc::new(Slot {
                    topic: topic.clone(),
                    topic_id: spec.topic_id.clone(),
                    partition,
                    spec: Mutex::new(spec),
                    phase: watch::Sender::new(Phase::Opening),
                    stop: watch::Sender::new(false),
                    task: Mutex::new(None),
                });
                let task = tokio::spawn(supervise(
                    self.context.clone(),
                    slot.clone(),
                    self.changed.clone(),
                ));
                if let Ok(mut t) = slot.task.lock() {
                    *t = Some(task);
                }
                slots.entry(topic).or_default().insert(partition, slot);
            }
        }
        self.changed.send_modify(|g| *g += 1);
        for slot in removed {
            let (topic_id, partition, group_id) = slot
                .spec
                .lock()
                .map(|s| (s.topic_id.clone(), s.partition, s.group_id))
                .unwrap_or_default();
            stop_slot(&slot, false).await;
            if let Err(e) = self.context.meta.delete_raft_group(group_id) {
                tracing::warn!(
                    group_id,
                    "cannot delete the Raft state of a removed partition: {e}"
                );
            }
            let dir = self.partition_dir(&topic_id, partition);
            let topic_dir = self.context.topics_dir.join(&topic_id);
            let deleted = tokio::task::spawn_blocking(move || {
                remove_dir_durably(&dir)?;
                // The topic directory goes once its last partition is gone.
                remove_dir_if_empty(&topic_dir)
            })
            .await;
            if !matches!(deleted, Ok(Ok(()))) {
                tracing::warn!(
                    topic_id,
                    partition,
                    "cannot delete the data of a removed partition: {deleted:?}"
                );
            }
        }
    }

    /// Removes the data of partitions that no slot holds and `keep` does not claim: what a
    /// broker down when a topic was deleted or a replica moved away still holds on disk (the
    /// reconcile that removes them runs only for partitions open here then). Only directories
    /// laid out as this registry makes them are looked at (a topic id, then partition numbers);
    /// anything else in the topics directory stays. Returns the (topic id, partition) removed.
    /// Called between reconciles, never beside one (a partition that starts meanwhile would
    /// not be seen as held).
    pub async fn remove_unheld(
        &self,
        keep: impl Fn(&str, u32) -> bool + Send + 'static,
    ) -> Vec<(String, u32)> {
        let held: std::collections::HashSet<(String, u32)> = self
            .slots()
            .into_iter()
            .map(|(_, slot)| (slot.topic_id.clone(), slot.partition))
            .collect();
        let topics_dir = self.context.topics_dir.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let mut removed = Vec::new();
            let Ok(topics) = std::fs::read_dir(&topics_dir) else {
                return removed;
            };
            for topic in topics.flatten() {
                let Some(topic_id) = topic.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if uuid::Uuid::parse_str(&topic_id).is_err() || !topic.path().is_dir() {
                    continue;
                }
                let Ok(partitions) = std::fs::read_dir(topic.path()) else {
                    continue;
                };
                let mut removed_here = false;
                for partition in partitions.flatten() {
                    let Some(number) = partition
                        .file_name()
                        .to_str()
                        .and_then(|n| n.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    let key = (topic_id.clone(), number);
                    if held.contains(&key) || keep(&topic_id, number) {
                        continue;
                    }
                    match remove_dir_durably(&partition.path()) {
                        Ok(()) => {
                            removed.push(key);
                            removed_here = true;
                        }
                        Err(e) => tracing::warn!(
                            topic_id,
                            partition = number,
                            "cannot delete the data of a partition this broker no longer hosts: {e}"
                        ),
                    }
                }
                if removed_here && let Err(e) = remove_dir_if_empty(&topic.path()) {
                    tracing::warn!(topic_id, "cannot delete an empty topic directory: {e}");
                }
            }
            removed
        })
        .await;
        swept.unwrap_or_default()
    }

    /// The Raft group ids of the partitions held here.
    pub fn held_groups(&self) -> std::collections::HashSet<crate::raft::GroupId> {
        self.slots()
            .into_iter()
            .filter_map(|(_, slot)| slot.spec.lock().ok().map(|s| s.group_id))
            .collect()
    }

    /// Stops every partition (snapshotting each, so the next start replays nothing).
    pub async fn shutdown(&self) {
        let slots: Vec<Arc<Slot>> = self.slots().into_iter().map(|(_, s)| s).collect();
        let stops = slots.iter().map(|slot| stop_slot(slot, true));
        futures::future::join_all(stops).await;
    }
}

/// Removes a directory and makes its removal durable (fsync of the parent).
fn remove_dir_durably(dir: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Removes `dir` (durably) if it is empty: a directory that is not (a partition of the topic
/// is being opened here meanwhile) stays, and so does all in it.
fn remove_dir_if_empty(dir: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty
            ) =>
        {
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Tells the slot's supervisor to stop its partition (snapshotting it first when `snapshot`) and
/// waits until it has.
async fn stop_slot(slot: &Slot, snapshot: bool) {
    slot.stop.send_replace(snapshot);
    let task = slot.task.lock().ok().and_then(|mut t| t.take());
    if let Some(task) = task {
        let _ = task.await;
    }
}

/// Drives one partition: open, replay, serve; down and reopen after a storage error; stop.
async fn supervise(context: Arc<HostContext>, slot: Arc<Slot>, changed: watch::Sender<u64>) {
    let mut stop = slot.stop.subscribe();
    let set_phase = |phase: Phase| {
        slot.phase.send_replace(phase);
        changed.send_modify(|g| *g += 1);
    };
    let mut pause = Duration::from_millis(200);
    loop {
        if stop.has_changed().unwrap_or(true) {
            return;
        }
        set_phase(Phase::Opening);
        let spec = match slot.spec.lock() {
            Ok(s) => s.clone(),
            Err(_) => return,
        };
        let dir = context
            .topics_dir
            .join(&spec.topic_id)
            .join(spec.partition.to_string());
        let group_spec = GroupSpec {
            group_id: spec.group_id,
            dir: dir.clone(),
            node_id: context.node_id,
            peer_address: context.peer_address.clone(),
            members: spec.members.clone(),
            log_config: weft_storage::LogConfig {
                tail_cache_bytes: context.read_cache_bytes,
                direct_io: context.direct_io,
                ..spec.config.log_config()
            },
            snapshot_interval_bytes: context.snapshot_interval_bytes,
            producer_expiration_ms: context.producer_expiration_ms,
        };
        if let Some(delay) = crate::test_hook_ms("WEFT_TEST_OPEN_DELAY_MS") {
            // Tests: a partition that takes this long to open (a long log scan).
            tokio::time::sleep(delay).await;
        }
        let opened = tokio::select! {
            opened = PartitionGroup::open(group_spec, context.meta.clone(), context.raft_config.clone(), context.flusher.clone(), context.peers.clone()) => opened,
            _ = stop.changed() => return,
        };
        let group = match opened {
            Ok(group) => group,
            Err(reason) => {
                tracing::error!(topic = %spec.topic, partition = spec.partition, "cannot open partition: {reason}");
                set_phase(Phase::Down { reason });
                if pause_or_stop(&mut stop, &mut pause).await {
                    return;
                }
                continue;
            }
        };
        let partition = Partition::start(
            spec.clone(),
            &dir,
            group.clone(),
            context.queue_max,
            context.queue_bytes.clone(),
            context.producer_expiration_ms,
            context.producers_per_partition_max,
        );
        set_phase(Phase::Replaying(partition.clone()));
        if let Ok(current) = slot.spec.lock()
            && current.config != spec.config
        {
            // Changed while the partition opened (reconcile had no partition to give it to).
            partition.set_config(current.config.clone());
        }
        let caught_up = tokio::select! {
            caught_up = group.caught_up() => caught_up,
            _ = stop.changed() => {
                let snapshot = *stop.borrow();
                partition.shutdown(snapshot).await;
                return;
            }
        };
        if let Err(e) = caught_up {
            let reason = e.to_string();
            tracing::error!(topic = %spec.topic, partition = spec.partition, "partition stopped while replaying: {reason}");
            partition.shutdown(false).await;
            set_phase(Phase::Down { reason });
            if pause_or_stop(&mut stop, &mut pause).await {
                return;
            }
            continue;
        }
        let (entries, bytes) = group.replayed();
        crate::metrics::replayed(&spec.topic, spec.partition, entries, bytes);
        tracing::info!(topic = %spec.topic, partition = spec.partition, entries, bytes, "partition ready");
        partition.set_ready();
        set_phase(Phase::Ready(partition.clone()));
        if let Err(e) = group.forget_bootstrap_entries().await {
            tracing::warn!(topic = %spec.topic, partition = spec.partition, "purging the bootstrap entries: {e}");
        }
        pause = Duration::from_millis(200);

        let mut retention = tokio::time::interval(context.retention_interval);
        retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Every leader this replica sees elected (the one it found on opening included).
        let elected = |leader: Option<u64>| {
            if let Some(leader) = leader {
                tracing::info!(topic = %spec.topic, partition = spec.partition, leader, "partition leader elected");
                metrics::counter!(
                    "weft_partition_leader_changes_total",
                    "topic" => spec.topic.clone(),
                    "partition" => spec.partition.to_string()
                )
                .increment(1);
            }
        };
        // Find damage anywhere in the log, and repair it from another replica (retried while
        // no replica can give the entries).
        let repairer = tokio::spawn(scrub_and_repair(partition.clone()));
        let _repairer = AbortOnDrop(repairer);
        let mut leaders = group.watch_leader();
        let mut leaders_open = true;
        elected(*leaders.borrow_and_update());
        let reason = loop {
            tokio::select! {
                changed = leaders.changed(), if leaders_open => match changed {
                    Ok(()) => elected(*leaders.borrow_and_update()),
                    Err(_) => leaders_open = false,
                },
                _ = stop.changed() => {
                    let snapshot = *stop.borrow();
                partition.shutdown(snapshot).await;
                    return;
                }
                reason = group.stopped_wait() => break reason,
                () = group.snapshot_due() => {
                    if let Err(e) = group.snapshot_now(Duration::from_secs(30)).await {
                        tracing::warn!(topic = %spec.topic, partition = spec.partition, "snapshot: {e}");
                    }
                }
                _ = retention.tick() => {
                    if let Err(e) = group.forget_bootstrap_entries().await {
                        tracing::warn!(topic = %spec.topic, partition = spec.partition, "purging the bootstrap entries: {e}");
                    }
                    match partition.apply_retention(now_ms()).await {
                        Ok(Some(index)) => tracing::info!(topic = %spec.topic, partition = spec.partition, index, "retention purged old segments"),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(topic = %spec.topic, partition = spec.partition, "retention: {e}"),
                    }
                }
            }
        };
        tracing::error!(topic = %spec.topic, partition = spec.partition, "partition stopped: {reason}");
        partition.shutdown(false).await;
        set_phase(Phase::Down { reason });
        if pause_or_stop(&mut stop, &mut pause).await {
            return;
        }
    }
}

/// Aborts a task when dropped (when the supervisor leaves the partition's serving loop).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Scrubs the partition's log once (so damage anywhere in it is found), then repairs damaged
/// ranges from other replicas, looking again every 10 s (reads may find more damage later).
async fn scrub_and_repair(partition: Arc<crate::partition::Partition>) {
    let (topic, number) = (partition.topic.clone(), partition.partition);
    tokio::time::sleep(Duration::from_secs(1)).await;
    match partition.group().scrub().await {
        Ok(0) => {}
        Ok(damaged) => {
            tracing::warn!(%topic, partition = number, damaged, "the scrub found damaged entries; repairing them from other replicas")
        }
        Err(e) => tracing::warn!(%topic, partition = number, "scrubbing the log: {e}"),
    }
    loop {
        let left = partition.group().repair_damage().await;
        partition.forget_repaired();
        if left > 0 {
            tracing::info!(%topic, partition = number, left, "damaged ranges not repaired yet; retrying in 10 s");
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Waits before reopening (doubling up to 30 s); true when asked to stop meanwhile.
async fn pause_or_stop(stop: &mut watch::Receiver<bool>, pause: &mut Duration) -> bool {
    let wait = *pause;
    *pause = (*pause * 2).min(Duration::from_secs(30));
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = stop.changed() => true,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A topic's directory goes with its last partition, but never with a partition that
    /// arrived meanwhile (before, an emptiness check and then `remove_dir_all`: a partition
    /// created between the two lost its files while open).
    #[test]
    fn a_topic_directory_goes_only_when_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let topic = dir.path().join("topic-id");
        std::fs::create_dir_all(topic.join("1")).expect("mkdir");
        std::fs::write(topic.join("1").join("00000000000000000000.log"), b"x").expect("write");
        remove_dir_if_empty(&topic).expect("a directory in use stays, no error");
        assert!(topic.join("1").join("00000000000000000000.log").exists());
        std::fs::remove_dir_all(topic.join("1")).expect("remove the partition");
        remove_dir_if_empty(&topic).expect("removed");
        assert!(!topic.exists());
        remove_dir_if_empty(&topic).expect("already gone: no error");
    }
}
