//! Damaged data on one replica is repaired from the others (real processes, three brokers on
//! 127.0.0.x): a follower's segment file loses a chunk of durable bytes while it is down (zeroed,
//! as a failing disk or a stray write leaves it). Restarted, it scrubs its log, finds the damage,
//! reads the same entries from another replica over the peer port and writes them over the
//! damaged bytes: its own copy then serves every record again, and it reports no damage. Before,
//! the replica refused the damaged range for good (DATA_LOSS) and its reads never got past it.
//!
//! A follower whose log lost its durable tail (the file cut short while it was down) although its
//! snapshot says those entries were applied fetches the missing entries from another replica
//! before it starts its Raft group. Before, openraft took the entries as purged (the snapshot
//! covers them) and never sent them again: the replica's own copy stopped at the cut for good.
//! The same holds for committed entries past its snapshot (killed, no snapshot at stop): it
//! fetches them before its group starts, so it never votes without them.
//!
//! A follower that applied damaged entries (killed, so no snapshot covered them) folds their
//! producer batches into its producer table once it has repaired them: leading, it answers a
//! retry of such a batch as a duplicate instead of storing it twice.

use std::time::Duration;

use weft_proto::v1::publish_request::Target;
use weft_proto::v1::{FetchRequest, PublishRequest, Record};
use weft_tests::{Broker, grpc, metric, offsets, segment_files, start_cluster, wait_for};

const RECORDS: u64 = 2000;

fn value(i: u64) -> Vec<u8> {
    format!("heal-{i:06}-{}", "x".repeat(150)).into_bytes()
}

fn leader_of_0(broker: &Broker) -> u64 {
    let (status, body) = broker.http("GET", "/v1/topics/heal", None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["partition_details"][0]["leader_id"].as_u64().unwrap_or(0)
}

/// Every record of the partition as `broker` itself serves it, or the first error.
async fn read_all(broker: &Broker) -> Result<Vec<(u64, Vec<u8>)>, tonic::Status> {
    let channel = grpc::channel(&broker.client_addr).await;
    let mut subscriber = grpc::subscriber(&channel);
    let mut out = Vec::new();
    let mut next = 0;
    while next < RECORDS {
        let response = subscriber
            .fetch(FetchRequest {
                topic: "heal".into(),
                partition: 0,
                offset: next,
                max_bytes: 1024 * 1024,
                ..FetchRequest::default()
            })
            .await?
            .into_inner();
        if response.records.is_empty() {
            return Err(tonic::Status::unavailable(format!("nothing at {next}")));
        }
        for r in response.records {
            out.push((r.offset, r.value.to_vec()));
        }
        next = response.next_offset;
    }
    Ok(out)
}

/// Publishes records `start .. start + 50` idempotently (producer 1, sequence `start`), trying
/// the brokers in turn until one acknowledges them: a partition that has just elected its first
/// leader may answer UNAVAILABLE for a moment, and a retry of an ambiguous attempt is stored once.
async fn publish_batch(addresses: &[String], start: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for attempt in 0.. {
        let channel = grpc::channel(&addresses[attempt % addresses.len()]).await;
        let mut request = tonic::Request::new(PublishRequest {
            topic: "heal".into(),
            target: Some(Target::Partition(0)),
            records: (start..start + 50)
                .map(|i| Record {
                    value: value(i).into(),
                    ..Record::default()
                })
                .collect(),
            producer_id: 1,
            base_sequence: start,
            ..PublishRequest::default()
        });
        request.set_timeout(Duration::from_secs(5));
        match grpc::publisher(&channel).publish(request).await {
            Ok(response) => {
                assert_eq!(response.into_inner().base_offset, start, "dense offsets");
                return;
            }
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ),
                    "publish at {start}: {status:?}"
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "not acknowledged within 60 s: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A three-broker cluster with topic `heal` (one partition) holding [`RECORDS`] records on
/// every replica; returns the brokers and the index of a follower.
async fn cluster_with_records() -> (Vec<Broker>, usize) {
    let brokers = start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"heal","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    let leader = wait_for("a leader", Duration::from_secs(30), || {
        let l = leader_of_0(&brokers[0]);
        async move { (l != 0).then_some(l) }
    })
    .await;
    let addresses: Vec<String> = std::iter::once(leader as usize - 1)
        .chain(0..3)
        .map(|i| brokers[i].client_addr.clone())
        .collect();
    for start in (0..RECORDS).step_by(50) {
        publish_batch(&addresses, start).await;
    }
    let follower = (1..=3u64).find(|id| *id != leader).expect("a follower") as usize - 1;
    let address = brokers[follower].client_addr.clone();
    wait_for(
        "the follower to hold everything",
        Duration::from_secs(30),
        || {
            let address = address.clone();
            async move {
                offsets(&address, "heal", 0, None)
                    .await
                    .ok()
                    .filter(|o| o.high_watermark >= RECORDS)
            }
        },
    )
    .await;
    (brokers, follower)
}

/// Waits until `broker`'s own copy serves every record, and checks them.
async fn assert_serves_everything(broker: &Broker) {
    let read = wait_for(
        "the damaged replica to serve every record again",
        Duration::from_secs(60),
        || async move {
            match read_all(broker).await {
                Ok(records) => Some(records),
                Err(status) => {
                    eprintln!("not yet: {}", status.message());
                    None
                }
            }
        },
    )
    .await;
    let want: Vec<(u64, Vec<u8>)> = (0..RECORDS).map(|i| (i, value(i))).collect();
    assert_eq!(read.len(), want.len());
    assert!(read == want, "the repaired copy holds every record, intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_repairs_damaged_entries_from_the_others() {
    let (mut brokers, follower) = cluster_with_records().await;
    // Damage a chunk of the follower's durable data in the middle of its log, while it is down.
    brokers[follower].stop();
    let files = segment_files(&brokers[follower]);
    let victim = files
        .iter()
        .max_by_key(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .expect("a segment");
    let mut bytes = std::fs::read(victim).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle..middle + 3000].fill(0);
    std::fs::write(victim, &bytes).expect("damage");
    brokers[follower].start_again_same_ports();
    brokers[follower].wait_ready();

    let follower_broker = &brokers[follower];
    assert_serves_everything(follower_broker).await;
    let repaired = metric(follower_broker, "weft_partition_repaired_ranges_total").unwrap_or(0.0);
    assert!(repaired >= 1.0, "repairs counted: {repaired}");
    let damaged = metric(
        follower_broker,
        r#"weft_partition_damaged_ranges{topic="heal",partition="0"}"#,
    );
    wait_for("no damage reported", Duration::from_secs(30), || {
        let damaged = metric(
            follower_broker,
            r#"weft_partition_damaged_ranges{topic="heal",partition="0"}"#,
        );
        async move { (damaged == Some(0.0)).then_some(()) }
    })
    .await;
    eprintln!("damage reported before the metric settled: {damaged:?}");
}

/// Cuts the newest segment file of `broker` (down) to half its length.
fn cut_newest_segment_in_half(broker: &Broker) {
    let files = segment_files(broker);
    let victim = files.iter().max().expect("a segment");
    let length = std::fs::metadata(victim).expect("stat").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(victim)
        .expect("open")
        .set_len(length / 2)
        .expect("truncate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_log_lost_its_tail_fetches_it_again() {
    let (mut brokers, follower) = cluster_with_records().await;
    // A graceful stop snapshots the partition (the snapshot covers every record); then the
    // log's newest segment loses its second half while the broker is down.
    brokers[follower].stop();
    cut_newest_segment_in_half(&brokers[follower]);
    brokers[follower].start_again_same_ports();
    brokers[follower].wait_ready();
    assert_serves_everything(&brokers[follower]).await;
}

/// A broker whose controller log was damaged while it was down (a chunk zeroed in the middle)
/// still learns the cluster's metadata: the topics created before and after. Seen by the
/// fault-injection harness: such a broker answered TOPIC_NOT_FOUND for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_controller_log_is_damaged_learns_the_metadata_again() {
    let mut brokers = start_cluster(3);
    let names: Vec<String> = (0..6).map(|i| format!("before-{i}")).collect();
    for name in &names {
        let body = format!(r#"{{"name":"{name}","partitions":2}}"#);
        let (status, body) = brokers[0].http("POST", "/v1/topics", Some(&body));
        assert_eq!(status, 201, "{body}");
    }
    let victim = 2;
    for name in &names {
        let broker = &brokers[victim];
        wait_for(
            "the topics on every broker",
            Duration::from_secs(30),
            || {
                let (status, _) = broker.http("GET", &format!("/v1/topics/{name}"), None);
                async move { (status == 200).then_some(()) }
            },
        )
        .await;
    }
    brokers[victim].stop();
    let log = brokers[victim]
        .data_dir()
        .join("controller")
        .join("00000000000000000000.log");
    let mut bytes = std::fs::read(&log).expect("read the controller log");
    let middle = bytes.len() / 2;
    let end = (middle + 300).min(bytes.len());
    bytes[middle..end].fill(0);
    std::fs::write(&log, &bytes).expect("damage");
    brokers[victim].start_again_same_ports();
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"after","partitions":2}"#),
    );
    assert_eq!(status, 201, "{body}");
    let broker = &brokers[victim];
    for name in names.iter().map(String::as_str).chain(["after"]) {
        wait_for(
            "the damaged broker to know every topic",
            Duration::from_secs(30),
            || {
                let (status, body) = broker.http("GET", &format!("/v1/topics/{name}"), None);
                async move {
                    if status != 200 {
                        eprintln!("{name}: {status} {body}");
                    }
                    (status == 200).then_some(())
                }
            },
        )
        .await;
    }
    broker.wait_ready();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_committed_entries_fetches_them_before_it_votes() {
    let (mut brokers, follower) = cluster_with_records().await;
    // Killed (no snapshot at stop) once its saved committed index covers everything it
    // applied (the records are all applied: `cluster_with_records` waited for them), and
    // sled's flusher (every 500 ms) has written that out; then the newest segment loses its
    // second half.
    let follower_broker = &brokers[follower];
    wait_for(
        "the follower to save its committed index",
        Duration::from_secs(30),
        || {
            let applied = metric(
                follower_broker,
                r#"weft_partition_applied_index{topic="heal",partition="0"}"#,
            );
            let saved = metric(
                follower_broker,
                r#"weft_partition_committed_saved_index{topic="heal",partition="0"}"#,
            );
            async move { applied.zip(saved).filter(|(a, s)| s >= a).map(|_| ()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    brokers[follower].kill9();
    cut_newest_segment_in_half(&brokers[follower]);
    brokers[follower].start_again_same_ports();
    brokers[follower].wait_ready();
    let refetched = metric(&brokers[follower], "weft_partition_refetched_tails_total");
    assert!(
        refetched.is_some_and(|n| n >= 1.0),
        "the lost committed entries were fetched at open, before the group started: {refetched:?}"
    );
    assert_serves_everything(&brokers[follower]).await;
}

/// The controller leader, killed, loses the newest entries of its controller log while it is
/// down (its file cut short at the entry that created topic `before-3`), and is started again at
/// once, before the others elect a new leader (a 5 s election timeout). Seen by the
/// fault-injection harness: openraft 0.9 read the leader's vote back as committed and made it
/// leader again in the same term, with its cut log. Its next entries took Raft indexes the
/// others already held in that term, so they kept their own and skipped the leader's: the
/// brokers' metadata parted for good (the leader lost topics `before-3` to `before-5`, the
/// others never learnt the topics created after). Now its vote reads back uncommitted (it must
/// win an election in a later term to lead), and it fetches the entries it knew committed from
/// another broker before its controller group starts (so it never votes without them); every
/// broker ends up knowing every topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_leader_whose_log_lost_its_tail_does_not_lead_its_term_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "raft_election_timeout_ms = 5000\n").expect("write the config");
    let config = config.to_str().expect("utf-8 path").to_string();
    let mut brokers =
        weft_tests::start_cluster_each(3, |_| vec!["--config".into(), config.clone()], &[]);
    let names: Vec<String> = (0..6).map(|i| format!("before-{i}")).collect();
    for name in &names {
        let body = format!(r#"{{"name":"{name}","partitions":1}}"#);
        let (status, body) = brokers[0].http("POST", "/v1/topics", Some(&body));
        assert_eq!(status, 201, "{body}");
    }
    for broker in &brokers {
        for name in &names {
            wait_for(
                "every broker to know the topics",
                Duration::from_secs(30),
                || {
                    let (status, _) = broker.http("GET", &format!("/v1/topics/{name}"), None);
                    async move { (status == 200).then_some(()) }
                },
            )
            .await;
        }
    }
    let (status, body) = brokers[0].http("GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    let leader = view["controller_id"].as_u64().expect("a controller leader") as usize - 1;
    // Killed once its saved committed index covers the topics (saved at most once a second,
    // then written out by sled's flusher every 500 ms).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    brokers[leader].kill9();
    // Cut the controller log at the entry naming `before-3` (and drop any later segment).
    let controller = brokers[leader].data_dir().join("controller");
    let mut segments: Vec<_> = std::fs::read_dir(&controller)
        .expect("the controller directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    let (at, cut) = segments
        .iter()
        .enumerate()
        .find_map(|(i, path)| {
            let bytes = std::fs::read(path).expect("read a segment");
            bytes
                .windows(8)
                .position(|w| w == b"before-3")
                .map(|at| (i, at as u64))
        })
        .expect("the entry creating before-3 in the controller log");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segments[at])
        .expect("open")
        .set_len(cut)
        .expect("cut the log");
    for later in &segments[at + 1..] {
        std::fs::remove_file(later).expect("remove a later segment");
    }
    brokers[leader].start_again_same_ports();
    wait_for(
        "the lost controller entries fetched again",
        Duration::from_secs(30),
        || {
            let refetched = metric(&brokers[leader], "weft_controller_refetched_tails_total");
            async move { refetched.filter(|n| *n >= 1.0) }
        },
    )
    .await;
    let after: Vec<String> = (0..3).map(|i| format!("after-{i}")).collect();
    for name in &after {
        let body = format!(r#"{{"name":"{name}","partitions":1}}"#);
        let created = wait_for("a topic created", Duration::from_secs(60), || {
            let (status, answer) = brokers[leader].http("POST", "/v1/topics", Some(&body));
            async move {
                if status != 201 {
                    eprintln!("create: {status} {answer}");
                }
                (status == 201 || status == 409).then_some(())
            }
        });
        created.await;
    }
    for (i, broker) in brokers.iter().enumerate() {
        for name in names.iter().chain(&after) {
            wait_for(
                "every broker to know every topic",
                Duration::from_secs(30),
                || {
                    let (status, body) = broker.http("GET", &format!("/v1/topics/{name}"), None);
                    async move {
                        if status != 200 {
                            eprintln!("broker {}: {name}: {status} {body}", i + 1);
                        }
                        (status == 200).then_some(())
                    }
                },
            )
            .await;
        }
    }
}

/// A replica that applied damaged entries (killed, so no snapshot covered them, then a chunk of
/// one idempotent batch zeroed while it was down) knows that producer batch again once it has
/// repaired the entries, and, leading, answers a retry of it as the duplicate it is. Before, its
/// producer table never had the batch: the retry was the producer's next sequence, and the new
/// leader stored it a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_applied_damaged_entries_knows_their_producer_batches_when_it_leads() {
    let (mut brokers, follower) = cluster_with_records().await;
    let leader = leader_of_0(&brokers[0]);
    // A plain batch after the last idempotent one, so that batch is not the log's tail (a
    // damaged tail is cut and fetched again, never applied as lost).
    let channel = grpc::channel(&brokers[leader as usize - 1].client_addr).await;
    let response = grpc::publisher(&channel)
        .publish(PublishRequest {
            topic: "heal".into(),
            target: Some(Target::Partition(0)),
            records: (RECORDS..RECORDS + 50)
                .map(|i| Record {
                    value: value(i).into(),
                    ..Record::default()
                })
                .collect(),
            ..PublishRequest::default()
        })
        .await
        .expect("plain publish")
        .into_inner();
    assert_eq!(response.base_offset, RECORDS);
    let address = brokers[follower].client_addr.clone();
    wait_for(
        "the follower to hold the plain batch",
        Duration::from_secs(30),
        || {
            let address = address.clone();
            async move {
                offsets(&address, "heal", 0, None)
                    .await
                    .ok()
                    .filter(|o| o.high_watermark >= RECORDS + 50)
            }
        },
    )
    .await;
    // Killed: the follower's snapshot (if any) does not cover the last batches. Zero a chunk of
    // the last idempotent batch (producer 1, sequence RECORDS - 50) in its segment file.
    brokers[follower].kill9();
    let last = RECORDS - 50;
    let marker = format!("heal-{:06}-", last + 10).into_bytes();
    let files = segment_files(&brokers[follower]);
    let mut damaged = false;
    for file in &files {
        let mut bytes = std::fs::read(file).expect("read");
        if let Some(at) = bytes
            .windows(marker.len())
            .position(|w| w == marker.as_slice())
        {
            bytes[at..at + 300].fill(0);
            std::fs::write(file, &bytes).expect("damage");
            damaged = true;
        }
    }
    assert!(
        damaged,
        "the batch found in the follower's segments {files:?}"
    );
    brokers[follower].start_again_same_ports();
    brokers[follower].wait_ready();
    let follower_broker = &brokers[follower];
    wait_for(
        "the damaged entries repaired and their batches folded in",
        Duration::from_secs(60),
        || {
            let folded = follower_broker
                .log()
                .contains("folded the producer batches of repaired entries");
            async move { folded.then_some(()) }
        },
    )
    .await;
    // The repaired replica takes the leadership.
    let target = follower as u64 + 1;
    let brokers_ref = &brokers;
    wait_for(
        "the leadership moved to the repaired replica",
        Duration::from_secs(60),
        || async move {
            let leader = leader_of_0(&brokers_ref[0]);
            if leader == target {
                return Some(());
            }
            if leader != 0 {
                let (status, body) = brokers_ref[leader as usize - 1].http(
                    "POST",
                    "/v1/topics/heal/partitions/0/leader",
                    Some(&format!(r#"{{"node_id":{target}}}"#)),
                );
                eprintln!("transfer to {target}: {status} {body}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        },
    )
    .await;
    // A retry of the damaged batch (its acknowledgement lost, say) is a duplicate.
    let answer = wait_for(
        "the retry answered by the new leader",
        Duration::from_secs(60),
        || async move {
            let channel = grpc::channel(&brokers_ref[follower].client_addr).await;
            let mut request = tonic::Request::new(PublishRequest {
                topic: "heal".into(),
                target: Some(Target::Partition(0)),
                records: (last..RECORDS)
                    .map(|i| Record {
                        value: value(i).into(),
                        ..Record::default()
                    })
                    .collect(),
                producer_id: 1,
                base_sequence: last,
                ..PublishRequest::default()
            });
            request.set_timeout(Duration::from_secs(5));
            match grpc::publisher(&channel).publish(request).await {
                Ok(response) => Some(response.into_inner()),
                Err(status) => {
                    assert_eq!(
                        status.code(),
                        tonic::Code::Unavailable,
                        "retry refused: {status:?}"
                    );
                    eprintln!("not yet: {}", status.message());
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    None
                }
            }
        },
    )
    .await;
    assert!(
        answer.duplicate && answer.base_offset == last,
        "the retry is the batch stored before, not a new one: {answer:?}"
    );
    let end = offsets(&brokers[follower].client_addr, "heal", 0, None)
        .await
        .expect("offsets");
    assert_eq!(end.high_watermark, RECORDS + 50, "nothing stored twice");
}
