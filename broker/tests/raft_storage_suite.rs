//! The segment-store Raft log adapter passes openraft's own storage test suite, with each of the
//! broker's state machines, on real files and with both metadata stores.

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;
use weft_broker::meta::Metadata;
use weft_broker::raft::{
    ControllerStateMachine, Flusher, LogStore, PartitionStateMachine, StorageError, SyncMode,
    TypeConfig,
};
use weft_storage::{LogConfig, MemoryMetaStore, PartitionLog, SledMetaStore};

/// Builds a fresh store in a new temporary directory (kept alive by the returned guard).
struct Builder {
    sled: bool,
}

impl Builder {
    fn open(&self) -> (TempDir, LogStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let log =
            PartitionLog::open(dir.path().join("log"), LogConfig::default()).expect("open log");
        let meta = if self.sled {
            Metadata::new(Arc::new(
                SledMetaStore::open(dir.path().join("meta")).expect("open sled"),
            ))
        } else {
            Metadata::new(Arc::new(MemoryMetaStore::new()))
        };
        let store = LogStore::new(
            7,
            log,
            meta,
            Flusher::start(SyncMode::Syncfs).expect("flusher"),
        )
        .expect("log store");
        (dir, store)
    }
}

impl StoreBuilder<TypeConfig, LogStore, PartitionStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, PartitionStateMachine), StorageError> {
        let (dir, store) = self.open();
        let sm = PartitionStateMachine::open(
            dir.path().join("log"),
            LogConfig::default(),
            store.reader(),
            64 * 1024 * 1024,
            86_400_000,
            false,
        )
        .expect("state machine");
        Ok((dir, store, sm))
    }
}

impl StoreBuilder<TypeConfig, LogStore, ControllerStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, ControllerStateMachine), StorageError> {
        let (dir, store) = self.open();
        let sm = ControllerStateMachine::open(&dir.path().join("log"), LogConfig::default())
            .expect("state machine");
        Ok((dir, store, sm))
    }
}

#[test]
fn partition_groups_pass_the_openraft_storage_suite_with_sled() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    Suite::<TypeConfig, LogStore, PartitionStateMachine, Builder, TempDir>::test_all(Builder {
        sled: true,
    })
    .expect("suite passes");
}

#[test]
fn controller_group_passes_the_openraft_storage_suite_in_memory_metadata() {
    Suite::<TypeConfig, LogStore, ControllerStateMachine, Builder, TempDir>::test_all(Builder {
        sled: false,
    })
    .expect("suite passes");
}
