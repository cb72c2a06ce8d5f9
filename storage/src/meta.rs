//! Small metadata that is not a log, behind the narrow [`MetaStore`] trait: bytes in, bytes out,
//! per named key space, every write durable when it returns. The layer above owns the key spaces
//! and the encodings (the broker keeps Raft votes, node identity and consumer-group offsets
//! here); this crate knows none of them. Two implementations pass one conformance suite: sled,
//! and an in-memory map for tests and simulation.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// One write in an atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaOp {
    /// Set a key.
    Put(Vec<u8>, Vec<u8>),
    /// Remove a key.
    Delete(Vec<u8>),
}

/// A durable key/value store for metadata, with separate named key spaces.
pub trait MetaStore: Send + Sync + std::fmt::Debug {
    /// Reads a key of `space`.
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Applies writes to one space atomically and durably.
    fn apply(&self, space: &str, ops: Vec<MetaOp>) -> Result<()>;
    /// Applies writes to one space atomically, durable only once something syncs the store
    /// (sled syncs on its own every half second): for values where an older one read after a
    /// crash is still correct, such as a lower bound.
    fn apply_unsynced(&self, space: &str, ops: Vec<MetaOp>) -> Result<()> {
        self.apply(space, ops)
    }
    /// All entries of `space` whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, space: &str, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
}

/// The sled-backed store: one sled tree per space.
#[derive(Debug, Clone)]
pub struct SledMetaStore {
    db: sled::Db,
}

/// How long [`SledMetaStore::open`] waits for a lock the process let go of a moment before.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn sled_error(error: sled::Error) -> Error {
    Error::Meta(error.to_string())
}

impl SledMetaStore {
    /// Opens (or creates) the store in `dir`. A store this process closed a moment before may
    /// still hold its file lock (sled's flusher thread lets it go when it next wakes): the
    /// lock is tried again for up to [`LOCK_WAIT`]; one that another process holds stays
    /// refused. Before, such a reopen failed at once ("could not acquire lock"), now and then.
    pub fn open(dir: impl AsRef<Path>) -> Result<SledMetaStore> {
        let started = std::time::Instant::now();
        loop {
            match sled::Config::new()
                .path(dir.as_ref())
                .mode(sled::Mode::HighThroughput)
                .open()
            {
                Ok(db) => return Ok(SledMetaStore { db }),
                Err(sled::Error::Io(e))
                    if e.to_string().starts_with("could not acquire lock")
                        && started.elapsed() < LOCK_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(sled_error(e)),
            }
        }
    }

    fn tree(&self, space: &str) -> Result<sled::Tree> {
        if space.is_empty() {
            return Err(Error::Meta("a key space needs a name".into()));
        }
        self.db.open_tree(space).map_err(sled_error)
    }
}

impl MetaStore for SledMetaStore {
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .tree(space)?
            .get(key)
            .map_err(sled_error)?
            .map(|v| v.to_vec()))
    }

    fn apply(&self, space: &str, ops: Vec<MetaOp>) -> Result<()> {
        self.apply_unsynced(space, ops)?;
        self.db.flush().map_err(sled_error)?;
        Ok(())
    }

    fn apply_unsynced(&self, space: &str, ops: Vec<MetaOp>) -> Result<()> {
        let tree = self.tree(space)?;
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                MetaOp::Put(key, value) => batch.insert(key, value),
                MetaOp::Delete(key) => batch.remove(key),
            }
        }
        tree.apply_batch(batch).map_err(sled_error)
    }

    fn scan_prefix(&self, space: &str, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.tree(space)?
            .scan_prefix(prefix)
            .map(|item| {
                item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(sled_error)
            })
            .collect()
    }
}

type MemoryMap = BTreeMap<(String, Vec<u8>), Vec<u8>>;

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
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .lock()?
            .get(&(space.to_string(), key.to_vec()))
            .cloned())
    }

    fn apply(&self, space: &str, ops: Vec<MetaOp>) -> Result<()> {
        let mut map = self.lock()?;
        for op in ops {
            match op {
                MetaOp::Put(key, value) => {
                    map.insert((space.to_string(), key), value);
                }
                MetaOp::Delete(key) => {
                    map.remove(&(space.to_string(), key));
                }
            }
        }
        Ok(())
    }

    fn scan_prefix(&self, space: &str, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .lock()?
            .range((space.to_string(), prefix.to_vec())..)
            .take_while(|((s, k), _)| s == space && k.starts_with(prefix))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conformance suite every store passes.
    fn conformance(store: &dyn MetaStore) {
        assert_eq!(store.get("a", b"k").expect("read"), None);
        store
            .apply(
                "a",
                vec![
                    MetaOp::Put(b"k1".to_vec(), b"v1".to_vec()),
                    MetaOp::Put(b"k2".to_vec(), b"v2".to_vec()),
                    MetaOp::Put(b"j".to_vec(), b"vj".to_vec()),
                ],
            )
            .expect("write");
        store
            .apply("b", vec![MetaOp::Put(b"k1".to_vec(), b"other".to_vec())])
            .expect("write");
        assert_eq!(
            store.get("a", b"k1").expect("read").as_deref(),
            Some(&b"v1"[..])
        );
        assert_eq!(
            store.get("b", b"k1").expect("read").as_deref(),
            Some(&b"other"[..]),
            "spaces are separate"
        );
        let scanned = store.scan_prefix("a", b"k").expect("scan");
        assert_eq!(
            scanned,
            vec![
                (b"k1".to_vec(), b"v1".to_vec()),
                (b"k2".to_vec(), b"v2".to_vec())
            ],
            "prefix scan in key order, within the space"
        );
        store
            .apply(
                "a",
                vec![
                    MetaOp::Delete(b"k1".to_vec()),
                    MetaOp::Put(b"k2".to_vec(), b"v2b".to_vec()),
                ],
            )
            .expect("atomic batch");
        assert_eq!(store.get("a", b"k1").expect("read"), None);
        assert_eq!(
            store.get("a", b"k2").expect("read").as_deref(),
            Some(&b"v2b"[..])
        );
        assert_eq!(store.scan_prefix("a", b"").expect("scan").len(), 2);
    }

    #[test]
    fn memory_store_conforms() {
        conformance(&MemoryMetaStore::new());
    }

    /// A store closed a moment before in this process opens again once its lock is let go;
    /// one still open stays refused. Before, the reopen failed at once while sled's flusher
    /// still held the lock (`sled_store_conforms_and_survives_reopen` failed now and then in
    /// CI: "could not acquire lock").
    #[test]
    fn a_store_closed_a_moment_ago_opens_again_and_an_open_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = SledMetaStore::open(dir.path()).expect("open");
        first
            .apply("a", vec![MetaOp::Put(b"k".to_vec(), b"v".to_vec())])
            .expect("write");
        let closing = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        let again = SledMetaStore::open(dir.path()).expect("open again once closed");
        assert_eq!(
            again.get("a", b"k").expect("read").as_deref(),
            Some(&b"v"[..])
        );
        closing.join().expect("closing thread");
        let refused = SledMetaStore::open(dir.path()).map(|_| ());
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("lock")),
            "{refused:?}"
        );
    }

    #[test]
    fn sled_store_conforms_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledMetaStore::open(dir.path()).expect("open");
            conformance(&store);
        }
        let store = SledMetaStore::open(dir.path()).expect("reopen");
        assert_eq!(
            store.get("a", b"k2").expect("read").as_deref(),
            Some(&b"v2b"[..])
        );
        assert!(store.get("", b"k").is_err(), "an unnamed space is an error");
    }
}
