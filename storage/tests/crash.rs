//! Power-loss simulation. After each fsync the log tells a listener (file, durable length). A
//! "power loss" cuts every file back to its last durable length and adds a torn tail: random bytes,
//! part of what had been written but not synced, or that with a page garbled. After reopening, the
//! log must hold exactly a prefix of what was appended that includes every acknowledged batch
//! (acknowledged = covered by a flush that returned).

mod common;

use std::fs;
use std::path::Path;

use common::*;
use rand::Rng;
use rand::rngs::StdRng;
use weft_storage::{LogConfig, PartitionLog};

/// Cuts every file in `dir` back to what a power loss would leave, with a random torn tail on data
/// files that had unsynced bytes.
fn power_loss(dir: &Path, recorder: &SyncRecorder, rng: &mut StdRng) {
    let mut files: Vec<_> = fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let last_data = files
        .iter()
        .rfind(|p| p.extension().is_some_and(|e| e == "log"))
        .cloned();
    for path in files {
        let Some(synced) = recorder.synced_len(&path) else {
            // Never synced: its directory entry or contents may not have survived.
            fs::remove_file(&path).expect("rm");
            continue;
        };
        let content = fs::read(&path).expect("read");
        let synced = (synced as usize).min(content.len());
        let mut kept = content[..synced].to_vec();
        let unsynced = &content[synced..];
        let is_data = path.extension().is_some_and(|e| e == "log");
        let torn = is_data
            && (!unsynced.is_empty()
                || (Some(&path) == last_data.as_ref() && rng.random_ratio(1, 3)));
        if torn {
            match rng.random_range(0..4) {
                0 => {}
                1 => kept.extend((0..rng.random_range(1..3000)).map(|_| rng.random::<u8>())),
                2 => kept.extend_from_slice(&unsynced[..rng.random_range(0..=unsynced.len())]),
                _ => {
                    // Pages reach the disk in any order: some later ones intact, one garbled.
                    let mut tail = unsynced.to_vec();
                    if !tail.is_empty() {
                        let page = rng.random_range(0..tail.len().div_ceil(512));
                        let end = ((page + 1) * 512).min(tail.len());
                        for b in &mut tail[page * 512..end] {
                            *b = if rng.random() { 0 } else { rng.random() };
                        }
                    }
                    let cut = rng.random_range(0..=tail.len());
                    kept.extend_from_slice(&tail[..cut]);
                }
            }
        }
        fs::write(&path, kept).expect("write");
    }
}

#[test]
fn power_loss_keeps_every_acknowledged_batch() {
    let seed = seed("power_loss_keeps_every_acknowledged_batch");
    let mut rng = rng(seed);
    let mut torn_tails = 0;
    for round in 0..120 {
        let dir = tempfile::tempdir().expect("tempdir");
        let recorder = SyncRecorder::new();
        let config = LogConfig {
            sync_listener: Some(recorder.clone()),
            // Every other round writes with direct I/O (whole blocks, the last one padded).
            direct_io: round % 2 == 1,
            ..small_config()
        };
        let mut log = PartitionLog::open(dir.path(), config.clone()).expect("open");
        let mut appended: Vec<Expected> = Vec::new();
        let mut acked = 0usize;
        for cycle in 0..3 {
            for _ in 0..rng.random_range(1..80) {
                appended.push(append_random(&mut log, &mut rng, 300));
                if rng.random_ratio(1, 4) {
                    let durable = if rng.random() {
                        log.flush().expect("flush")
                    } else {
                        // The overlapped path: appends go on while the sync runs; only what the
                        // ticket covered is acknowledged.
                        match log.begin_sync().expect("begin sync") {
                            Some(ticket) => {
                                for _ in 0..rng.random_range(0..4) {
                                    appended.push(append_random(&mut log, &mut rng, 300));
                                }
                                let outcome = ticket.sync();
                                log.complete_sync(&ticket, outcome).expect("complete sync")
                            }
                            None => log.durable(),
                        }
                    };
                    acked = appended
                        .iter()
                        .take_while(|e| e.index < durable.next_index)
                        .count();
                }
            }
            drop(log); // the process dies: no close, no final flush
            power_loss(dir.path(), &recorder, &mut rng);
            log = PartitionLog::open(dir.path(), config.clone()).expect("reopen after power loss");
            let report = log.recovery_report().clone();
            assert!(
                report.corruptions.is_empty(),
                "seed {seed} round {round} cycle {cycle}: power loss is not corruption: {report:?}"
            );
            torn_tails += usize::from(report.torn_tail.is_some());
            let got = read_all_entries(&log).expect("read after recovery");
            assert!(
                got.len() >= acked,
                "seed {seed} round {round} cycle {cycle}: lost acknowledged batches: {} of {acked} left",
                got.len()
            );
            assert!(got.len() <= appended.len());
            for (i, (g, e)) in got.iter().zip(&appended).enumerate() {
                assert_eq!(
                    g.bytes(),
                    &e.bytes,
                    "seed {seed} round {round} cycle {cycle}: entry {i} differs"
                );
            }
            // What survived is now durable, and the log continues right after it.
            appended.truncate(got.len());
            acked = got.len();
            assert_eq!(
                log.end().next_index,
                appended.last().map_or(0, |e| e.index + 1)
            );
        }
    }
    assert!(
        torn_tails > 50,
        "the simulation must actually tear tails ({torn_tails})"
    );
}
