//! The snapshot file: written atomically and durably, read back whole, and refused (never
//! half-trusted) when damaged.

mod common;

use common::SyncRecorder;
use weft_storage::snapshot::{read_snapshot, write_snapshot};
use weft_storage::{Error, LogConfig};

#[test]
fn snapshots_round_trip_and_replace_each_other_atomically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recorder = SyncRecorder::new();
    let config = LogConfig {
        sync_listener: Some(recorder.clone()),
        ..LogConfig::default()
    };
    assert_eq!(read_snapshot(dir.path()).expect("read"), None, "none yet");
    write_snapshot(dir.path(), b"first state", &config).expect("write");
    assert_eq!(
        read_snapshot(dir.path()).expect("read").as_deref(),
        Some(&b"first state"[..])
    );
    let big = vec![7u8; 100_000];
    write_snapshot(dir.path(), &big, &config).expect("replace");
    assert_eq!(
        read_snapshot(dir.path()).expect("read").as_deref(),
        Some(&big[..])
    );
    // Durable: the file was replaced whole and its directory synced.
    let path = dir.path().join(weft_storage::snapshot::SNAPSHOT_FILE);
    assert!(recorder.synced_len(&path).is_some_and(|len| len > 100_000));
    assert!(recorder.synced_len(dir.path()).is_some());
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [weft_storage::snapshot::SNAPSHOT_FILE]);
}

#[test]
fn a_damaged_snapshot_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_snapshot(
        dir.path(),
        b"some state worth keeping",
        &LogConfig::default(),
    )
    .expect("write");
    let path = dir.path().join(weft_storage::snapshot::SNAPSHOT_FILE);
    let good = std::fs::read(&path).expect("read file");
    for position in [0, 9, 14, 25, good.len() - 1] {
        let mut bad = good.clone();
        bad[position] ^= 0x10;
        std::fs::write(&path, &bad).expect("damage");
        match read_snapshot(dir.path()) {
            Err(Error::Corruption { segment, .. }) => assert_eq!(segment, path),
            other => panic!("flip at {position}: expected Corruption, got {other:?}"),
        }
    }
    std::fs::write(&path, &good[..good.len() - 3]).expect("truncate");
    assert!(matches!(
        read_snapshot(dir.path()),
        Err(Error::Corruption { .. })
    ));
}
