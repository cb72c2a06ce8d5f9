//! Consumer groups: members join by subscribing with a group id; the coordinator spreads the
//! topic's partitions over the live members, bumps the generation on every membership change,
//! refuses commits from stale generations, and stores committed offsets durably (sled). A member
//! that stops heartbeating is removed after its session timeout. A member whose stream ends (a
//! rotation, a network blip) keeps its place until then, and rejoins with its member id without a
//! rebalance.
//!
//! One group consumes one topic at a time. On this single-node broker the coordinator is local;
//! committed offsets move to the controller group with the multi-node cluster.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use weft_storage::{GroupOffset, Metadata};

use crate::error::BrokerError;

/// Spreads `partitions` over `members` (sorted by id): partition i goes to member i mod n.
/// Deterministic and balanced to within one partition.
pub fn assign(members: &[&str], partitions: u32) -> BTreeMap<String, Vec<u32>> {
    let mut sorted: Vec<&str> = members.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: BTreeMap<String, Vec<u32>> =
        sorted.iter().map(|m| (m.to_string(), Vec::new())).collect();
    if sorted.is_empty() {
        return out;
    }
    for p in 0..partitions {
        let member = sorted[p as usize % sorted.len()];
        out.entry(member.to_string()).or_default().push(p);
    }
    out
}

/// A group's assignment at one generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupView {
    /// Generation, bumped on every membership change.
    pub generation: u64,
    /// Partitions by member id.
    pub assignments: BTreeMap<String, Vec<u32>>,
}

/// A member as reported by [`Coordinator::describe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    /// Member id.
    pub member_id: String,
    /// Assigned partitions.
    pub partitions: Vec<u32>,
    /// Whether its stream is open.
    pub connected: bool,
    /// Milliseconds since it was last heard from.
    pub idle_ms: u64,
}

/// A group as reported by [`Coordinator::describe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    /// Group id.
    pub group_id: String,
    /// Topic consumed (empty for a group that only has stored offsets).
    pub topic: String,
    /// Current generation.
    pub generation: u64,
    /// Live members.
    pub members: Vec<MemberDescription>,
    /// Committed offsets.
    pub committed: Vec<GroupOffset>,
}

#[derive(Debug)]
struct Member {
    last_seen: Instant,
    session: Duration,
    connected: bool,
}

#[derive(Debug)]
struct Group {
    topic: String,
    partitions: u32,
    generation: u64,
    members: BTreeMap<String, Member>,
    view: watch::Sender<Arc<GroupView>>,
}

impl Group {
    fn rebalance(&mut self) {
        self.generation += 1;
        let ids: Vec<&str> = self.members.keys().map(String::as_str).collect();
        let view = GroupView {
            generation: self.generation,
            assignments: assign(&ids, self.partitions),
        };
        self.view.send_replace(Arc::new(view));
    }
}

#[derive(Debug)]
struct Inner {
    meta: Metadata,
    default_session: Duration,
    groups: Mutex<HashMap<String, Group>>,
}

/// The consumer-group coordinator of this node.
#[derive(Debug, Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

/// Longest session timeout a member may ask for.
pub const SESSION_TIMEOUT_MAX: Duration = Duration::from_secs(3600);

impl Coordinator {
    /// A coordinator storing offsets in `meta`.
    pub fn new(meta: Metadata, default_session: Duration) -> Self {
        Coordinator {
            inner: Arc::new(Inner {
                meta,
                default_session,
                groups: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn groups(&self) -> Result<MutexGuard<'_, HashMap<String, Group>>, BrokerError> {
        self.inner
            .groups
            .lock()
            .map_err(|_| BrokerError::Internal("group table poisoned".into()))
    }

    /// Joins (or rejoins, with `member_id`) `group` to consume `topic` with `partitions`
    /// partitions. Returns the member id and a watch of the group's assignments.
    pub fn join(
        &self,
        group_id: &str,
        member_id: Option<&str>,
        topic: &str,
        partitions: u32,
        session: Option<Duration>,
    ) -> Result<(String, watch::Receiver<Arc<GroupView>>), BrokerError> {
        if group_id.is_empty() || group_id.len() > 249 {
            return Err(BrokerError::invalid(
                "group_id",
                "must be 1 to 249 characters",
            ));
        }
        let session = session
            .unwrap_or(self.inner.default_session)
            .min(SESSION_TIMEOUT_MAX);
        let mut groups = self.groups()?;
        let group = groups.entry(group_id.to_string()).or_insert_with(|| Group {
            topic: topic.to_string(),
            partitions,
            generation: 0,
            members: BTreeMap::new(),
            view: watch::Sender::new(Arc::new(GroupView::default())),
        });
        if group.topic != topic {
            if !group.members.is_empty() {
                return Err(BrokerError::invalid(
                    "group_id",
                    format!(
                        "group {group_id:?} is consuming topic {:?}; one group consumes one topic",
                        group.topic
                    ),
                ));
            }
            group.topic = topic.to_string();
        }
        let now = Instant::now();
        let rejoining = member_id.filter(|id| group.members.contains_key(*id));
        let id = match rejoining {
            Some(id) => {
                if let Some(m) = group.members.get_mut(id) {
                    m.connected = true;
                    m.last_seen = now;
                    m.session = session;
                }
                if group.partitions != partitions {
                    group.partitions = partitions;
                    group.rebalance();
                }
                id.to_string()
            }
            None => {
                let id = member_id.filter(|id| !id.is_empty()).map_or_else(
                    || format!("member-{}", uuid::Uuid::new_v4()),
                    str::to_string,
                );
                group.members.insert(
                    id.clone(),
                    Member {
                        last_seen: now,
                        session,
                        connected: true,
                    },
                );
                group.partitions = partitions;
                group.rebalance();
                id
            }
        };
        Ok((id, group.view.subscribe()))
    }

    /// Records that `member` is alive.
    pub fn heartbeat(&self, group_id: &str, member_id: &str) -> Result<(), BrokerError> {
        let mut groups = self.groups()?;
        let member = groups
            .get_mut(group_id)
            .and_then(|g| g.members.get_mut(member_id));
        match member {
            Some(m) => {
                m.last_seen = Instant::now();
                Ok(())
            }
            None => Err(BrokerError::StaleGeneration {
                group: group_id.into(),
                current: 0,
                got: 0,
            }),
        }
    }

    /// The member's stream ended: it keeps its partitions until its session times out.
    pub fn disconnect(&self, group_id: &str, member_id: &str) {
        if let Ok(mut groups) = self.groups()
            && let Some(m) = groups
                .get_mut(group_id)
                .and_then(|g| g.members.get_mut(member_id))
        {
            m.connected = false;
            m.last_seen = Instant::now();
        }
    }

    /// Removes `member` now and rebalances.
    pub fn leave(&self, group_id: &str, member_id: &str) {
        if let Ok(mut groups) = self.groups()
            && let Some(group) = groups.get_mut(group_id)
            && group.members.remove(member_id).is_some()
        {
            group.rebalance();
        }
    }

    /// Removes members whose session expired; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let Ok(mut groups) = self.groups() else {
            return 0;
        };
        let mut removed = 0;
        for (group_id, group) in groups.iter_mut() {
            let before = group.members.len();
            group.members.retain(|id, m| {
                let alive = now.saturating_duration_since(m.last_seen) < m.session;
                if !alive {
                    tracing::info!(group = %group_id, member = %id, "member session expired");
                }
                alive
            });
            if group.members.len() != before {
                removed += before - group.members.len();
                group.rebalance();
            }
        }
        removed
    }

    /// Starts the task that expires silent members.
    pub fn start_reaper(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Some(inner) = weak.upgrade() else { return };
                Coordinator { inner }.expire(Instant::now());
            }
        });
    }

    /// Stores offsets for `group`. `member_id` empty with generation 0 is a commit from outside
    /// membership, allowed only while the group has no members. Otherwise the member must be in
    /// the current generation and own every partition it commits. Offsets never go backwards.
    pub fn commit(
        &self,
        group_id: &str,
        member_id: &str,
        generation: u64,
        topic: &str,
        offsets: &[(u32, u64)],
    ) -> Result<Vec<(u32, u64)>, BrokerError> {
        if group_id.is_empty() {
            return Err(BrokerError::invalid("group_id", "is empty"));
        }
        {
            let groups = self.groups()?;
            match groups.get(group_id) {
                Some(group) if !group.members.is_empty() || !member_id.is_empty() => {
                    let stale = || BrokerError::StaleGeneration {
                        group: group_id.into(),
                        current: group.generation,
                        got: generation,
                    };
                    if generation != group.generation
                        || !group.members.contains_key(member_id)
                        || group.topic != topic
                    {
                        return Err(stale());
                    }
                    let owned = group
                        .view
                        .borrow()
                        .assignments
                        .get(member_id)
                        .cloned()
                        .unwrap_or_default();
                    if offsets.iter().any(|(p, _)| !owned.contains(p)) {
                        return Err(stale());
                    }
                }
                None if !member_id.is_empty() => {
                    return Err(BrokerError::StaleGeneration {
                        group: group_id.into(),
                        current: 0,
                        got: generation,
                    });
                }
                _ => {}
            }
        }
        let meta = &self.inner.meta;
        for &(partition, offset) in offsets {
            let current = meta
                .group_offset(group_id, topic, partition)
                .map_err(|e| BrokerError::Internal(e.to_string()))?;
            if current.is_some_and(|c| offset < c) {
                return Err(BrokerError::invalid(
                    "offsets",
                    format!(
                        "partition {partition}: committed offsets never go backwards ({offset} < {})",
                        current.unwrap_or(0)
                    ),
                ));
            }
        }
        let records: Vec<GroupOffset> = offsets
            .iter()
            .map(|&(partition, offset)| GroupOffset {
                topic: topic.into(),
                partition,
                offset,
            })
            .collect();
        meta.commit_group_offsets(group_id, &records)
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        Ok(offsets.to_vec())
    }

    /// The committed offset of one partition.
    pub fn committed(
        &self,
        group_id: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<u64>, BrokerError> {
        self.inner
            .meta
            .group_offset(group_id, topic, partition)
            .map_err(|e| BrokerError::Internal(e.to_string()))
    }

    /// Every group: live ones and those with stored offsets.
    pub fn list(&self) -> Result<Vec<String>, BrokerError> {
        let mut names: Vec<String> = self
            .inner
            .meta
            .groups()
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        names.extend(self.groups()?.keys().cloned());
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Describes a group; None if it has neither members nor offsets.
    pub fn describe(&self, group_id: &str) -> Result<Option<GroupDescription>, BrokerError> {
        let committed = self
            .inner
            .meta
            .group_offsets(group_id)
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        let groups = self.groups()?;
        let now = Instant::now();
        let description = match groups.get(group_id) {
            Some(group) => {
                let view = group.view.borrow().clone();
                GroupDescription {
                    group_id: group_id.into(),
                    topic: group.topic.clone(),
                    generation: group.generation,
                    members: group
                        .members
                        .iter()
                        .map(|(id, m)| MemberDescription {
                            member_id: id.clone(),
                            partitions: view.assignments.get(id).cloned().unwrap_or_default(),
                            connected: m.connected,
                            idle_ms: now.saturating_duration_since(m.last_seen).as_millis() as u64,
                        })
                        .collect(),
                    committed,
                }
            }
            None if committed.is_empty() => return Ok(None),
            None => GroupDescription {
                group_id: group_id.into(),
                topic: committed
                    .first()
                    .map(|o| o.topic.clone())
                    .unwrap_or_default(),
                generation: 0,
                members: Vec::new(),
                committed,
            },
        };
        Ok(Some(description))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_storage::MemoryMetaStore;

    #[test]
    fn assignment_table() {
        // (members, partitions) -> expected
        type Case<'a> = (Vec<&'a str>, u32, Vec<(&'a str, Vec<u32>)>);
        let cases: Vec<Case<'_>> = vec![
            (vec![], 3, vec![]),
            (vec!["a"], 3, vec![("a", vec![0, 1, 2])]),
            (vec!["b", "a"], 3, vec![("a", vec![0, 2]), ("b", vec![1])]),
            (
                vec!["a", "b", "c"],
                6,
                vec![("a", vec![0, 3]), ("b", vec![1, 4]), ("c", vec![2, 5])],
            ),
            (
                vec!["a", "b", "c"],
                2,
                vec![("a", vec![0]), ("b", vec![1]), ("c", vec![])],
            ),
        ];
        for (members, partitions, expected) in cases {
            let got = assign(&members, partitions);
            let expected: BTreeMap<String, Vec<u32>> = expected
                .into_iter()
                .map(|(m, p)| (m.to_string(), p))
                .collect();
            assert_eq!(got, expected, "{members:?} over {partitions}");
        }
    }

    fn coordinator() -> Coordinator {
        Coordinator::new(
            Metadata::new(Arc::new(MemoryMetaStore::new())),
            Duration::from_secs(10),
        )
    }

    #[test]
    fn generations_fence_stale_commits_and_offsets_never_go_back() {
        let c = coordinator();
        let (a, view) = c.join("g", Some("a"), "t", 4, None).expect("join a");
        assert_eq!(view.borrow().generation, 1);
        let gen1 = view.borrow().generation;
        c.commit("g", &a, gen1, "t", &[(0, 10), (3, 5)])
            .expect("a owns everything");
        let (b, _) = c.join("g", Some("b"), "t", 4, None).expect("join b");
        let gen2 = view.borrow().generation;
        assert_eq!(gen2, 2, "a join bumps the generation");
        let err = c
            .commit("g", &a, gen1, "t", &[(0, 11)])
            .expect_err("stale generation");
        assert!(matches!(
            err,
            BrokerError::StaleGeneration {
                current: 2,
                got: 1,
                ..
            }
        ));
        let owned_by_b = view.borrow().assignments[&b].clone();
        let err = c
            .commit("g", &a, gen2, "t", &[(owned_by_b[0], 1)])
            .expect_err("not a's partition");
        assert!(matches!(err, BrokerError::StaleGeneration { .. }));
        let err = c
            .commit("g", &a, gen2, "t", &[(0, 9)])
            .expect_err("backwards");
        assert!(matches!(err, BrokerError::InvalidArgument(_)));
        c.commit("g", &a, gen2, "t", &[(0, 12)]).expect("forward");
        assert_eq!(c.committed("g", "t", 0).expect("read"), Some(12));
        let err = c
            .commit("g", "", 0, "t", &[(1, 1)])
            .expect_err("no simple commits while members live");
        assert!(matches!(err, BrokerError::StaleGeneration { .. }));
        // Rejoining with a known id does not rebalance.
        c.disconnect("g", &a);
        c.join("g", Some(&a), "t", 4, None).expect("rejoin");
        assert_eq!(view.borrow().generation, 2);
        c.leave("g", &b);
        assert_eq!(view.borrow().generation, 3);
        assert_eq!(
            view.borrow().assignments[&a],
            vec![0, 1, 2, 3],
            "b's partitions move to a"
        );
    }

    #[test]
    fn silent_members_expire() {
        let c = coordinator();
        let (a, view) = c
            .join("g", None, "t", 2, Some(Duration::from_millis(50)))
            .expect("join");
        let (_b, _) = c
            .join("g", None, "t", 2, Some(Duration::from_secs(60)))
            .expect("join");
        assert_eq!(c.expire(Instant::now()), 0);
        assert_eq!(c.expire(Instant::now() + Duration::from_millis(100)), 1);
        assert!(!view.borrow().assignments.contains_key(&a));
        assert!(
            c.heartbeat("g", &a).is_err(),
            "an expired member is unknown"
        );
    }
}
