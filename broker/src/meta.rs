//! The broker's small durable metadata, in the metadata store's key spaces: this node's identity,
//! Raft state per group (vote, purge point), and consumer-group committed offsets. Every value
//! carries a version byte so its encoding can evolve; the store (`weft_storage::MetaStore`, sled)
//! knows none of this.
//!
//! Committed offsets are keyed by the topic's id, not its name: a topic deleted and created again
//! under the same name is a different topic, and starts with no committed offsets.

use std::sync::Arc;

use weft_storage::{MetaOp, MetaStore};

/// Key space of the node identity.
const NODE: &str = "node";
/// Key space of Raft state, keyed by group id (big-endian) and a tag.
const RAFT: &str = "raft";
/// Key space of committed offsets, keyed by group, topic id and partition.
const GROUP_OFFSETS: &str = "group_offsets_by_topic_id";
/// The key space of an older layout, keyed by topic name; migrated once and emptied.
const LEGACY_GROUP_OFFSETS: &str = "group_offsets";

const VALUE_VERSION: u8 = 1;

/// A metadata error: the store failed, or a value does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metadata: {0}")]
pub struct MetaError(pub String);

impl From<weft_storage::Error> for MetaError {
    fn from(e: weft_storage::Error) -> Self {
        MetaError(e.to_string())
    }
}

type Result<T> = std::result::Result<T, MetaError>;

/// This node's identity, stored once at first start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Node id (unique in the cluster, never reused).
    pub node_id: u64,
    /// Id of the cluster this node belongs to.
    pub cluster_id: String,
}

/// Raft state kept per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaftKey {
    /// The current vote.
    Vote,
    /// The last purged log id.
    LastPurged,
    /// A log index known committed (a lower bound, saved lazily): at open, a log that ends
    /// before it lost committed entries, which are fetched again before the group may vote.
    Committed,
}

impl RaftKey {
    fn tag(self) -> u8 {
        match self {
            RaftKey::Vote => 1,
            RaftKey::LastPurged => 3,
            // Tags are never reused or renumbered.
            RaftKey::Committed => 4,
        }
    }
}

/// A consumer group's committed offset for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOffset {
    /// The topic's id.
    pub topic_id: String,
    /// Partition.
    pub partition: u32,
    /// Next offset to consume.
    pub offset: u64,
}

/// Typed, versioned access to the metadata store.
#[derive(Debug, Clone)]
pub struct Metadata {
    store: Arc<dyn MetaStore>,
}

fn versioned<'a>(value: &'a [u8], what: &str) -> Result<&'a [u8]> {
    match value.split_first() {
        Some((&VALUE_VERSION, body)) => Ok(body),
        Some((version, _)) => Err(MetaError(format!(
            "{what}: unknown encoding version {version}"
        ))),
        None => Err(MetaError(format!("{what}: empty value"))),
    }
}

fn with_version(body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 1);
    v.push(VALUE_VERSION);
    v.extend_from_slice(body);
    v
}

fn decode_offset(value: &[u8]) -> Result<u64> {
    let body = versioned(value, "group offset")?;
    let bytes: [u8; 8] = body
        .try_into()
        .map_err(|_| MetaError("group offset has the wrong length".into()))?;
    Ok(u64::from_le_bytes(bytes))
}

/// A length-prefixed string, so no name is a prefix of another's key.
fn put_str(key: &mut Vec<u8>, s: &str) {
    key.extend_from_slice(&(s.len() as u32).to_be_bytes());
    key.extend_from_slice(s.as_bytes());
}

/// Reads a length-prefixed string at the start of `bytes`; returns it and the rest.
fn take_str(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let s = std::str::from_utf8(bytes.get(4..4 + len)?).ok()?;
    Some((s, &bytes[4 + len..]))
}

impl Metadata {
    /// Wraps a store.
    pub fn new(store: Arc<dyn MetaStore>) -> Self {
        Metadata { store }
    }

    /// The stored node identity, if this node has one.
    pub fn node_identity(&self) -> Result<Option<NodeIdentity>> {
        let Some(value) = self.store.get(NODE, b"identity")? else {
            return Ok(None);
        };
        let body = versioned(&value, "node identity")?;
        let (id, cluster) = body
            .split_at_checked(8)
            .ok_or_else(|| MetaError("node identity is truncated".into()))?;
        let node_id = u64::from_le_bytes(id.try_into().unwrap_or_default());
        let cluster_id = String::from_utf8(cluster.to_vec())
            .map_err(|_| MetaError("node identity cluster id is not UTF-8".into()))?;
        Ok(Some(NodeIdentity {
            node_id,
            cluster_id,
        }))
    }

    /// Stores the node identity.
    pub fn set_node_identity(&self, identity: &NodeIdentity) -> Result<()> {
        self.create_node_identity(identity, false)
    }

    /// Stores the node identity of a first start, and, with `recovering`, the mark of a broker
    /// whose data directory was empty in a cluster ([`Metadata::recovering`]), in one write: a
    /// crash between the two could leave an identity without the mark.
    pub fn create_node_identity(&self, identity: &NodeIdentity, recovering: bool) -> Result<()> {
        let mut body = identity.node_id.to_le_bytes().to_vec();
        body.extend_from_slice(identity.cluster_id.as_bytes());
        let mut ops = vec![MetaOp::Put(b"identity".to_vec(), with_version(&body))];
        if recovering {
            ops.push(MetaOp::Put(b"recovering".to_vec(), with_version(&[])));
        }
        Ok(self.store.apply(NODE, ops)?)
    }

    /// Whether this broker started with an empty data directory in a cluster and has not yet
    /// settled that it was a new broker, or caught up in every group after losing its data.
    /// Until then it withholds its votes again after a restart: an identity alone would make a
    /// broker stopped half way through that look like one that never lost anything.
    pub fn recovering(&self) -> Result<bool> {
        Ok(self.store.get(NODE, b"recovering")?.is_some())
    }

    /// Removes the mark of [`Metadata::recovering`].
    pub fn clear_recovering(&self) -> Result<()> {
        Ok(self
            .store
            .apply(NODE, vec![MetaOp::Delete(b"recovering".to_vec())])?)
    }

    fn raft_key(group: u64, key: RaftKey) -> Vec<u8> {
        let mut k = group.to_be_bytes().to_vec();
        k.push(key.tag());
        k
    }

    /// Raft state `key` of `group` (bytes encoded by the Raft layer).
    pub fn raft(&self, group: u64, key: RaftKey) -> Result<Option<Vec<u8>>> {
        self.store
            .get(RAFT, &Self::raft_key(group, key))?
            .map(|v| versioned(&v, "raft state").map(<[u8]>::to_vec))
            .transpose()
    }

    /// Stores Raft state `key` of `group`, durable at the store's next sync (for a value whose
    /// older copy is still correct after a crash).
    pub fn set_raft_unsynced(&self, group: u64, key: RaftKey, value: &[u8]) -> Result<()> {
        Ok(self.store.apply_unsynced(
            RAFT,
            vec![MetaOp::Put(Self::raft_key(group, key), with_version(value))],
        )?)
    }

    /// Stores Raft state `key` of `group`, durably.
    pub fn set_raft(&self, group: u64, key: RaftKey, value: &[u8]) -> Result<()> {
        Ok(self.store.apply(
            RAFT,
            vec![MetaOp::Put(Self::raft_key(group, key), with_version(value))],
        )?)
    }

    /// Removes Raft state `key` of `group`, durably.
    pub fn delete_raft_key(&self, group: u64, key: RaftKey) -> Result<()> {
        Ok(self
            .store
            .apply(RAFT, vec![MetaOp::Delete(Self::raft_key(group, key))])?)
    }

    /// Every group with Raft state stored here.
    pub fn raft_groups(&self) -> Result<std::collections::BTreeSet<u64>> {
        Ok(self
            .store
            .scan_prefix(RAFT, &[])?
            .into_iter()
            .filter_map(|(k, _)| Some(u64::from_be_bytes(k.get(..8)?.try_into().ok()?)))
            .collect())
    }

    /// Removes all Raft state of `group` (the group was deleted).
    pub fn delete_raft_group(&self, group: u64) -> Result<()> {
        let ops = self
            .store
            .scan_prefix(RAFT, &group.to_be_bytes())?
            .into_iter()
            .map(|(k, _)| MetaOp::Delete(k))
            .collect();
        Ok(self.store.apply(RAFT, ops)?)
    }

    fn group_prefix(group: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(group.len() + 4);
        put_str(&mut k, group);
        k
    }

    fn group_key(group: &str, topic_id: &str, partition: u32) -> Vec<u8> {
        let mut k = Self::group_prefix(group);
        put_str(&mut k, topic_id);
        k.extend_from_slice(&partition.to_be_bytes());
        k
    }

    fn parse_group_key(key: &[u8]) -> Result<(String, GroupOffset)> {
        let bad = || MetaError("undecodable group offset key".into());
        let (group, rest) = take_str(key).ok_or_else(bad)?;
        let (topic_id, rest) = take_str(rest).ok_or_else(bad)?;
        let partition = u32::from_be_bytes(rest.try_into().map_err(|_| bad())?);
        Ok((
            group.to_string(),
            GroupOffset {
                topic_id: topic_id.to_string(),
                partition,
                offset: 0,
            },
        ))
    }

    /// Stores committed offsets of `group` atomically.
    pub fn commit_group_offsets(&self, group: &str, offsets: &[GroupOffset]) -> Result<()> {
        let ops = offsets
            .iter()
            .map(|o| {
                MetaOp::Put(
                    Self::group_key(group, &o.topic_id, o.partition),
                    with_version(&o.offset.to_le_bytes()),
                )
            })
            .collect();
        Ok(self.store.apply(GROUP_OFFSETS, ops)?)
    }

    /// The committed offset of one partition for `group`.
    pub fn group_offset(&self, group: &str, topic_id: &str, partition: u32) -> Result<Option<u64>> {
        self.store
            .get(GROUP_OFFSETS, &Self::group_key(group, topic_id, partition))?
            .map(|v| decode_offset(&v))
            .transpose()
    }

    /// Every committed offset of `group`.
    pub fn group_offsets(&self, group: &str) -> Result<Vec<GroupOffset>> {
        self.store
            .scan_prefix(GROUP_OFFSETS, &Self::group_prefix(group))?
            .into_iter()
            .map(|(k, v)| {
                let (_, mut offset) = Self::parse_group_key(&k)?;
                offset.offset = decode_offset(&v)?;
                Ok(offset)
            })
            .collect()
    }

    /// Names of all groups with committed offsets.
    pub fn groups(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = Vec::new();
        for (k, _) in self.store.scan_prefix(GROUP_OFFSETS, b"")? {
            let (group, _) = Self::parse_group_key(&k)?;
            if names.last() != Some(&group) {
                names.push(group);
            }
        }
        Ok(names)
    }

    /// Removes every committed offset of `group`; returns whether it had any.
    pub fn delete_group(&self, group: &str) -> Result<bool> {
        let ops: Vec<MetaOp> = self
            .store
            .scan_prefix(GROUP_OFFSETS, &Self::group_prefix(group))?
            .into_iter()
            .map(|(k, _)| MetaOp::Delete(k))
            .collect();
        let had = !ops.is_empty();
        self.store.apply(GROUP_OFFSETS, ops)?;
        Ok(had)
    }

    /// Removes the committed offsets of every topic not in `live` (topics deleted since);
    /// returns how many were removed.
    pub fn retain_group_offsets(&self, live: &dyn Fn(&str) -> bool) -> Result<usize> {
        let mut ops = Vec::new();
        for (k, _) in self.store.scan_prefix(GROUP_OFFSETS, b"")? {
            let (_, offset) = Self::parse_group_key(&k)?;
            if !live(&offset.topic_id) {
                ops.push(MetaOp::Delete(k));
            }
        }
        let removed = ops.len();
        if removed > 0 {
            self.store.apply(GROUP_OFFSETS, ops)?;
        }
        Ok(removed)
    }

    /// Moves offsets stored by an older build (keyed by topic name) to topic ids, for the topics
    /// `topic_id` resolves; drops the others. Returns how many were moved.
    pub fn migrate_legacy_group_offsets(
        &self,
        topic_id: &dyn Fn(&str) -> Option<String>,
    ) -> Result<usize> {
        let legacy = self.store.scan_prefix(LEGACY_GROUP_OFFSETS, b"")?;
        if legacy.is_empty() {
            return Ok(0);
        }
        let mut moved = Vec::new();
        let mut deletes = Vec::new();
        for (k, v) in legacy {
            // The older key has the same layout, with the topic's name where the id is now.
            if let Ok((group, mut offset)) = Self::parse_group_key(&k)
                && let Some(id) = topic_id(&offset.topic_id)
            {
                offset.topic_id = id;
                offset.offset = decode_offset(&v)?;
                moved.push((group, offset));
            }
            deletes.push(MetaOp::Delete(k));
        }
        for (group, offset) in &moved {
            self.commit_group_offsets(group, std::slice::from_ref(offset))?;
        }
        self.store.apply(LEGACY_GROUP_OFFSETS, deletes)?;
        Ok(moved.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_storage::MemoryMetaStore;

    fn offset(topic_id: &str, partition: u32, offset: u64) -> GroupOffset {
        GroupOffset {
            topic_id: topic_id.into(),
            partition,
            offset,
        }
    }

    #[test]
    fn typed_values_round_trip_and_groups_stay_apart() {
        let meta = Metadata::new(Arc::new(MemoryMetaStore::new()));
        assert_eq!(meta.node_identity().expect("read"), None);
        let identity = NodeIdentity {
            node_id: 3,
            cluster_id: "c-1".into(),
        };
        meta.set_node_identity(&identity).expect("write");
        assert_eq!(meta.node_identity().expect("read"), Some(identity));

        meta.set_raft(0, RaftKey::Vote, b"vote-0").expect("write");
        meta.set_raft(7, RaftKey::Vote, b"vote-7").expect("write");
        meta.set_raft(7, RaftKey::LastPurged, b"p").expect("write");
        meta.delete_raft_group(7).expect("delete");
        assert_eq!(meta.raft(7, RaftKey::Vote).expect("read"), None);
        assert_eq!(meta.raft(7, RaftKey::LastPurged).expect("read"), None);
        assert_eq!(
            meta.raft(0, RaftKey::Vote).expect("read").as_deref(),
            Some(&b"vote-0"[..])
        );

        let offsets = vec![offset("id-t", 0, 10), offset("id-t", 1, 20)];
        meta.commit_group_offsets("g", &offsets).expect("commit");
        meta.commit_group_offsets("g2", &offsets[..1])
            .expect("commit");
        // A group whose name is a prefix of another's must not see the other's offsets.
        meta.commit_group_offsets("g-longer", &[offset("id-u", 0, 5)])
            .expect("commit");
        assert_eq!(meta.group_offsets("g").expect("read"), offsets);
        assert_eq!(meta.group_offset("g", "id-t", 1).expect("read"), Some(20));
        assert_eq!(meta.group_offset("g", "id-other", 1).expect("read"), None);
        assert_eq!(meta.groups().expect("list"), ["g", "g2", "g-longer"]);

        // Offsets of deleted topics go; others stay.
        assert_eq!(
            meta.retain_group_offsets(&|id| id == "id-t")
                .expect("retain"),
            1
        );
        assert_eq!(meta.groups().expect("list"), ["g", "g2"]);
        assert!(meta.delete_group("g").expect("delete"));
        assert!(!meta.delete_group("g").expect("delete again"));
        assert_eq!(meta.group_offsets("g").expect("read"), vec![]);
        assert_eq!(meta.group_offsets("g2").expect("read").len(), 1);
    }

    #[test]
    fn legacy_offsets_keyed_by_name_move_to_topic_ids() {
        let store = Arc::new(MemoryMetaStore::new());
        let legacy_key = Metadata::group_key("g", "orders", 2);
        let gone_key = Metadata::group_key("g", "deleted-topic", 0);
        store
            .apply(
                LEGACY_GROUP_OFFSETS,
                vec![
                    MetaOp::Put(legacy_key, with_version(&7u64.to_le_bytes())),
                    MetaOp::Put(gone_key, with_version(&9u64.to_le_bytes())),
                ],
            )
            .expect("write");
        let meta = Metadata::new(store.clone());
        let moved = meta
            .migrate_legacy_group_offsets(&|name| (name == "orders").then(|| "id-orders".into()))
            .expect("migrate");
        assert_eq!(moved, 1);
        assert_eq!(
            meta.group_offset("g", "id-orders", 2).expect("read"),
            Some(7)
        );
        assert!(
            store
                .scan_prefix(LEGACY_GROUP_OFFSETS, b"")
                .expect("scan")
                .is_empty()
        );
        assert_eq!(
            meta.migrate_legacy_group_offsets(&|_| None).expect("again"),
            0
        );
    }

    #[test]
    fn undecodable_values_are_errors() {
        let store = Arc::new(MemoryMetaStore::new());
        store
            .apply(
                GROUP_OFFSETS,
                vec![MetaOp::Put(Metadata::group_key("g", "t", 0), vec![9, 1])],
            )
            .expect("write");
        store
            .apply(NODE, vec![MetaOp::Put(b"identity".to_vec(), vec![1, 2])])
            .expect("write");
        let meta = Metadata::new(store);
        assert!(meta.group_offset("g", "t", 0).is_err());
        assert!(meta.node_identity().is_err());
    }
}
