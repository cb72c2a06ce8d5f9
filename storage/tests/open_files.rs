//! A log of more segments than the process may open files opens: at most
//! `open_segments_max` sealed segments' files are open at any time of the open (a test binary
//! of its own: it lowers the process's limit of open files).

mod common;

use common::{append_random, read_all_entries, rng, small_config};
use weft_storage::{LogConfig, PartitionLog};

/// Files this process has open now.
fn open_files() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

#[test]
fn a_log_of_more_segments_than_the_file_limit_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        open_segments_max: 4,
        ..small_config()
    };
    let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    let mut rng = rng(21);
    let written = (0..1_500)
        .map(|_| append_random(&mut log, &mut rng, 200))
        .count();
    let segments = log.segment_count() as u64;
    drop(log);
    // Room for what is open now and 40 more: fewer than the segments.
    let limit = open_files() + 40;
    assert!(segments > 2 * 40, "{segments} segments");
    let before = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(limit),
            maximum: before.maximum,
        },
    )
    .expect("lower the limit of open files");
    let opened = PartitionLog::open(dir.path(), config).map(|log| {
        let read = read_all_entries(&log).map(|e| e.len());
        (read, log.open_segment_files())
    });
    rustix::process::setrlimit(rustix::process::Resource::Nofile, before)
        .expect("restore the limit");
    let (read, open) = opened.expect("the log opens under the limit");
    assert_eq!(read.expect("read under the limit"), written);
    assert!(open <= 4, "{open} sealed segment files open");
}
