//! Small metadata that is not a log: Raft votes and memberships, topic configs, consumer-group
//! offsets, the node's identity. Behind the narrow [`MetaStore`] trait (bytes in, bytes out, per
//! key space) so the sled implementation can be swapped or simulated; [`Metadata`] adds the typed,
//! versioned encodings on top.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// Separate key spaces (sled trees).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Space {
    /// Node identity.
    Node,
    /// Raft state per group: vote, membership, purge point, committed index.
    Raft,
    /// Topic configurations by name.
    Topics,
    /// Consumer-group committed offsets.
    GroupOffsets,
}

impl Space {
    fn name(self) -> &'static str {
        match self {
            Space::Node => "node",
            Space::Raft => "raft",
            Space::Topics => "topics",
            Space::GroupOffsets => "group_offsets",
        }
    }
}

/// One write in an atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaOp {
    /// Set a key.
    Put(Vec<u8>, Vec<u8>),
    /// Remove a key.
    Delete(Vec<u8>),
}

/// A durable key/value store for metadata. Every write is durable when it returns.
pub trait MetaStore: Send + Sync + std::fmt::Debug {
    /// Reads a key.
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Applies writes to one space atomically and durably.
    fn apply(&self, space: Space, ops: Vec<MetaOp>) -> Result<()>;
    /// All entries whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, space: Space, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
}

/// The sled-backed store.
#[derive(Debug, Clone)]
pub struct SledMetaStore {
    db: sled::Db,
}

fn sled_error(error: sled::Error) -> Error {
    Error::Meta(error.to_string())
}

impl SledMetaStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<SledMetaStore> {
        let db = sled::Config::new()
            .path(dir.as_ref())
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(sled_error)?;
        Ok(SledMetaStore { db })
    }

    fn tree(&self, space: Space) -> Result<sled::Tree> {
        self.db.open_tree(space.name()).map_err(sled_error)
    }
}

impl MetaStore for SledMetaStore {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .tree(space)?
            .get(key)
            .map_err(sled_error)?
            .map(|v| v.to_vec()))
    }

    fn apply(&self, space: Space, ops: Vec<MetaOp>) -> Result<()> {
        let tree = self.tree(space)?;
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                MetaOp::Put(key, value) => batch.insert(key, value),
                MetaOp::Delete(key) => batch.remove(key),
            }
        }
        tree.apply_batch(batch).map_err(sled_error)?;
        self.db.flush().map_err(sled_error)?;
        Ok(())
    }

    fn scan_prefix(&self, space: Space, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.tree(space)?
            .scan_prefix(prefix)
            .map(|item| {
                item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(sled_error)
            })
            .collect()
    }
}

type MemoryMap = BTreeMap<(Space, Vec<u8>), Vec<u8>>;

/// An in-memory store, for tests and simulation.
#[derive(Debug, Clone, Default)]
pub struct MemoryMetaStore {
    map: Arc<Mutex<MemoryMap>>,
}

impl MemoryMetaStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, MemoryMap>> {
        self.map
            .lock()
            .map_err(|_| Error::Meta("memory store lock poisoned".into()))
    }
}

impl MetaStore for MemoryMetaStore {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.lock()?.get(&(space, key.to_vec())).cloned())
    }

    fn apply(&self, space: Space, ops: Vec<MetaOp>) -> Result<()> {
        let mut map = self.lock()?;
        for op in ops {
            match op {
                MetaOp::Put(key, value) => {
                    map.insert((space, key), value);
                }
                MetaOp::Delete(key) => {
                    map.remove(&(space, key));
                }
            }
        }
        Ok(())
    }

    fn scan_prefix(&self, space: Space, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .lock()?
            .range((space, prefix.to_vec())..)
            .take_while(|((s, k), _)| *s == space && k.starts_with(prefix))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }
}

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
    /// The last committed log id.
    Committed,
    /// The last purged log id.
    LastPurged,
    /// The applied membership (state machine side).
    Membership,
}

impl RaftKey {
    fn tag(self) -> u8 {
        match self {
            RaftKey::Vote => 1,
            RaftKey::Committed => 2,
            RaftKey::LastPurged => 3,
            RaftKey::Membership => 4,
        }
    }
}

/// A consumer group's committed offset for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOffset {
    /// Topic name.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Next offset to consume.
    pub offset: u64,
}

const VALUE_VERSION: u8 = 1;

/// Typed access to a [`MetaStore`]. Values carry a version byte so their encoding can evolve.
#[derive(Debug, Clone)]
pub struct Metadata {
    store: Arc<dyn MetaStore>,
}

impl Metadata {
    /// Wraps a store.
    pub fn new(store: Arc<dyn MetaStore>) -> Self {
        Metadata { store }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn MetaStore> {
        &self.store
    }

    /// The stored node identity, if this node has one.
    pub fn node_identity(&self) -> Result<Option<NodeIdentity>> {
        let Some(value) = self.store.get(Space::Node, b"identity")? else {
            return Ok(None);
        };
        let body = versioned(&value, "node identity")?;
        if body.len() < 8 {
            return Err(Error::Meta("node identity is truncated".into()));
        }
        let node_id = u64::from_le_bytes(body[..8].try_into().unwrap_or_default());
        let cluster_id = String::from_utf8(body[8..].to_vec())
            .map_err(|_| Error::Meta("node identity cluster id is not UTF-8".into()))?;
        Ok(Some(NodeIdentity {
            node_id,
            cluster_id,
        }))
    }

    /// Stores the node identity.
    pub fn set_node_identity(&self, identity: &NodeIdentity) -> Result<()> {
        let mut value = vec![VALUE_VERSION];
        value.extend_from_slice(&identity.node_id.to_le_bytes());
        value.extend_from_slice(identity.cluster_id.as_bytes());
        self.store
            .apply(Space::Node, vec![MetaOp::Put(b"identity".to_vec(), value)])
    }

    fn raft_key(group: u64, key: RaftKey) -> Vec<u8> {
        let mut k = group.to_be_bytes().to_vec();
        k.push(key.tag());
        k
    }

    /// Raft state `key` of `group` (bytes encoded by the Raft layer).
    pub fn raft(&self, group: u64, key: RaftKey) -> Result<Option<Vec<u8>>> {
        self.store
            .get(Space::Raft, &Self::raft_key(group, key))?
            .map(|v| versioned(&v, "raft state").map(<[u8]>::to_vec))
            .transpose()
    }

    /// Stores Raft state `key` of `group`, durably.
    pub fn set_raft(&self, group: u64, key: RaftKey, value: &[u8]) -> Result<()> {
        let mut v = vec![VALUE_VERSION];
        v.extend_from_slice(value);
        self.store.apply(
            Space::Raft,
            vec![MetaOp::Put(Self::raft_key(group, key), v)],
        )
    }

    /// Removes all Raft state of `group` (the group was deleted).
    pub fn delete_raft_group(&self, group: u64) -> Result<()> {
        let ops = self
            .store
            .scan_prefix(Space::Raft, &group.to_be_bytes())?
            .into_iter()
            .map(|(k, _)| MetaOp::Delete(k))
            .collect();
        self.store.apply(Space::Raft, ops)
    }

    /// A topic's stored configuration (bytes encoded by the broker).
    pub fn topic(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.store
            .get(Space::Topics, name.as_bytes())?
            .map(|v| versioned(&v, "topic").map(<[u8]>::to_vec))
            .transpose()
    }

    /// Stores a topic's configuration.
    pub fn put_topic(&self, name: &str, config: &[u8]) -> Result<()> {
        let mut v = vec![VALUE_VERSION];
        v.extend_from_slice(config);
        self.store.apply(
            Space::Topics,
            vec![MetaOp::Put(name.as_bytes().to_vec(), v)],
        )
    }

    /// Removes a topic's configuration.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        self.store.apply(
            Space::Topics,
            vec![MetaOp::Delete(name.as_bytes().to_vec())],
        )
    }

    /// All topics, by name.
    pub fn topics(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.store
            .scan_prefix(Space::Topics, b"")?
            .into_iter()
            .map(|(k, v)| {
                let name = String::from_utf8(k)
                    .map_err(|_| Error::Meta("topic name is not UTF-8".into()))?;
                Ok((name, versioned(&v, "topic")?.to_vec()))
            })
            .collect()
    }

    fn group_prefix(group: &str) -> Vec<u8> {
        let mut k = (group.len() as u32).to_be_bytes().to_vec();
        k.extend_from_slice(group.as_bytes());
        k
    }

    fn group_key(group: &str, topic: &str, partition: u32) -> Vec<u8> {
        let mut k = Self::group_prefix(group);
        k.extend_from_slice(&(topic.len() as u32).to_be_bytes());
        k.extend_from_slice(topic.as_bytes());
        k.extend_from_slice(&partition.to_be_bytes());
        k
    }

    /// Stores committed offsets of `group` atomically.
    pub fn commit_group_offsets(&self, group: &str, offsets: &[GroupOffset]) -> Result<()> {
        let ops = offsets
            .iter()
            .map(|o| {
                let mut v = vec![VALUE_VERSION];
                v.extend_from_slice(&o.offset.to_le_bytes());
                MetaOp::Put(Self::group_key(group, &o.topic, o.partition), v)
            })
            .collect();
        self.store.apply(Space::GroupOffsets, ops)
    }

    /// The committed offset of one partition for `group`.
    pub fn group_offset(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>> {
        self.store
            .get(
                Space::GroupOffsets,
                &Self::group_key(group, topic, partition),
            )?
            .map(|v| decode_offset(&v))
            .transpose()
    }

    /// Every committed offset of `group`.
    pub fn group_offsets(&self, group: &str) -> Result<Vec<GroupOffset>> {
        let prefix = Self::group_prefix(group);
        self.store
            .scan_prefix(Space::GroupOffsets, &prefix)?
            .into_iter()
            .map(|(k, v)| {
                let rest = &k[prefix.len()..];
                let bad = || Error::Meta("undecodable group offset key".into());
                let len = u32::from_be_bytes(
                    rest.get(..4)
                        .ok_or_else(bad)?
                        .try_into()
                        .map_err(|_| bad())?,
                ) as usize;
                let topic = rest.get(4..4 + len).ok_or_else(bad)?;
                let partition = rest.get(4 + len..8 + len).ok_or_else(bad)?;
                Ok(GroupOffset {
                    topic: String::from_utf8(topic.to_vec()).map_err(|_| bad())?,
                    partition: u32::from_be_bytes(partition.try_into().map_err(|_| bad())?),
                    offset: decode_offset(&v)?,
                })
            })
            .collect()
    }

    /// Names of all groups with committed offsets.
    pub fn groups(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = Vec::new();
        for (k, _) in self.store.scan_prefix(Space::GroupOffsets, b"")? {
            let len =
                u32::from_be_bytes(k.get(..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]))
                    as usize;
            let name = k
                .get(4..4 + len)
                .and_then(|n| std::str::from_utf8(n).ok())
                .ok_or_else(|| Error::Meta("undecodable group offset key".into()))?;
            if names.last().map(String::as_str) != Some(name) {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }

    /// Removes every committed offset of `group`.
    pub fn delete_group(&self, group: &str) -> Result<()> {
        let ops = self
            .store
            .scan_prefix(Space::GroupOffsets, &Self::group_prefix(group))?
            .into_iter()
            .map(|(k, _)| MetaOp::Delete(k))
            .collect();
        self.store.apply(Space::GroupOffsets, ops)
    }
}

fn versioned<'a>(value: &'a [u8], what: &str) -> Result<&'a [u8]> {
    match value.split_first() {
        Some((&VALUE_VERSION, body)) => Ok(body),
        Some((version, _)) => Err(Error::Meta(format!(
            "{what}: unknown encoding version {version}"
        ))),
        None => Err(Error::Meta(format!("{what}: empty value"))),
    }
}

fn decode_offset(value: &[u8]) -> Result<u64> {
    let body = versioned(value, "group offset")?;
    let bytes: [u8; 8] = body
        .try_into()
        .map_err(|_| Error::Meta("group offset has the wrong length".into()))?;
    Ok(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conformance suite every store passes.
    fn conformance(meta: &Metadata) {
        assert_eq!(meta.node_identity().expect("read"), None);
        let identity = NodeIdentity {
            node_id: 3,
            cluster_id: "c-1".into(),
        };
        meta.set_node_identity(&identity).expect("write");
        assert_eq!(meta.node_identity().expect("read"), Some(identity));

        meta.set_raft(0, RaftKey::Vote, b"vote-0").expect("write");
        meta.set_raft(7, RaftKey::Vote, b"vote-7").expect("write");
        meta.set_raft(7, RaftKey::Membership, b"m").expect("write");
        assert_eq!(
            meta.raft(7, RaftKey::Vote).expect("read").as_deref(),
            Some(&b"vote-7"[..])
        );
        meta.delete_raft_group(7).expect("delete");
        assert_eq!(meta.raft(7, RaftKey::Vote).expect("read"), None);
        assert_eq!(meta.raft(7, RaftKey::Membership).expect("read"), None);
        assert_eq!(
            meta.raft(0, RaftKey::Vote).expect("read").as_deref(),
            Some(&b"vote-0"[..])
        );

        meta.put_topic("b", b"cfg-b").expect("write");
        meta.put_topic("a", b"cfg-a").expect("write");
        let names: Vec<String> = meta
            .topics()
            .expect("list")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["a", "b"]);
        meta.delete_topic("a").expect("delete");
        assert_eq!(meta.topic("a").expect("read"), None);

        let offsets = vec![
            GroupOffset {
                topic: "t".into(),
                partition: 0,
                offset: 10,
            },
            GroupOffset {
                topic: "t".into(),
                partition: 1,
                offset: 20,
            },
        ];
        meta.commit_group_offsets("g", &offsets).expect("commit");
        meta.commit_group_offsets("g2", &offsets[..1])
            .expect("commit");
        // A group whose name is a prefix of another must not see the other's offsets.
        meta.commit_group_offsets("g-longer", &offsets[1..])
            .expect("commit");
        assert_eq!(meta.group_offsets("g").expect("read"), offsets);
        assert_eq!(meta.group_offset("g", "t", 1).expect("read"), Some(20));
        assert_eq!(meta.groups().expect("list"), ["g", "g2", "g-longer"]);
        meta.delete_group("g").expect("delete");
        assert_eq!(meta.group_offsets("g").expect("read"), vec![]);
        assert_eq!(meta.group_offsets("g2").expect("read").len(), 1);
    }

    #[test]
    fn memory_store_conforms() {
        conformance(&Metadata::new(Arc::new(MemoryMetaStore::new())));
    }

    #[test]
    fn sled_store_conforms_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let meta = Metadata::new(Arc::new(SledMetaStore::open(dir.path()).expect("open")));
            conformance(&meta);
        }
        let meta = Metadata::new(Arc::new(SledMetaStore::open(dir.path()).expect("reopen")));
        assert_eq!(
            meta.node_identity().expect("read").map(|i| i.node_id),
            Some(3)
        );
        assert_eq!(meta.group_offset("g2", "t", 0).expect("read"), Some(10));
    }

    #[test]
    fn undecodable_values_are_errors() {
        let store = Arc::new(MemoryMetaStore::new());
        store
            .apply(
                Space::GroupOffsets,
                vec![MetaOp::Put(Metadata::group_key("g", "t", 0), vec![9, 1])],
            )
            .expect("write");
        store
            .apply(
                Space::Node,
                vec![MetaOp::Put(b"identity".to_vec(), vec![1, 2])],
            )
            .expect("write");
        let meta = Metadata::new(store);
        assert!(matches!(
            meta.group_offset("g", "t", 0),
            Err(Error::Meta(_))
        ));
        assert!(matches!(meta.node_identity(), Err(Error::Meta(_))));
    }
}
