//! Damaged bytes in a partition's durable data, as a client sees them: the partition still opens
//! and serves, reads of the damaged range answer DATA_LOSS naming where the damage is (never the
//! bytes), reads elsewhere and new publishes work, and the damage is reported in metrics and the
//! admin API.

use std::time::Duration;

use tonic_types::StatusExt;
use weft_client::{ConsumerConfig, ProducerConfig, Record, StartFrom};
use weft_proto::v1::FetchRequest;
use weft_tests::{Broker, fetch_range, grpc, metric, offsets, segment_files, wait_for};

/// The (offset, Raft index, position) points of a sealed segment's `.index` file (layout in
/// storage/FORMAT.md: an 80-byte header, then 24-byte entries, then a CRC); none for the active
/// segment of a broker that crashed (it has no index file yet).
fn index_points(segment: &std::path::Path) -> Vec<(u64, u64, u64)> {
    let Ok(bytes) = std::fs::read(segment.with_extension("index")) else {
        return Vec::new();
    };
    let count = u32::from_le_bytes(bytes[12..16].try_into().expect("count")) as usize;
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("u64"));
    (0..count)
        .map(|i| {
            let at = 80 + i * 24;
            (u64_at(at), u64_at(at + 8), u64_at(at + 16))
        })
        .collect()
}

/// How the broker went down before its data was damaged.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// A clean stop: a snapshot covers the whole log, so the restart re-applies nothing.
    Clean,
    /// kill -9: no snapshot covers the records, so the restart re-applies the whole log and
    /// runs into the damage while doing so.
    Crash,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_durable_data_is_refused_with_data_loss_and_the_rest_serves() {
    damaged_data_serves_around_the_damage(Stop::Clean).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_the_log_a_crash_restart_replays_is_skipped_and_the_rest_serves() {
    damaged_data_serves_around_the_damage(Stop::Crash).await;
}

async fn damaged_data_serves_around_the_damage(stop: Stop) {
    let mut broker = Broker::start();
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"damaged","partitions":1,"segment_bytes":1048576,"max_message_bytes":65536}"#),
    );
    assert_eq!(status, 201, "{body}");
    let client = broker.client().await;
    let producer = client.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    for i in 0..4000u64 {
        acks.push(
            producer
                .send_nowait("damaged", Record::new(format!("{i:>1000}")).partition(0))
                .await
                .expect("queued"),
        );
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    producer.close().await.expect("close");
    drop(client);
    match stop {
        Stop::Clean => assert_eq!(broker.stop(), Some(0)),
        Stop::Crash => broker.kill9(),
    }

    // Damage the entry in the middle of the log (by Raft index: the one a restart that searched
    // the log for term changes would read first), inside a sealed segment. Every frame of this
    // topic is large enough to have an index point, so the segments' .index files locate it.
    let files = segment_files(&broker);
    assert!(files.len() >= 3, "several segments: {files:?}");
    let points: Vec<Vec<(u64, u64, u64)>> = files.iter().map(|f| index_points(f)).collect();
    let last_index = points
        .iter()
        .flatten()
        .map(|(_, index, _)| *index)
        .max()
        .expect("index points");
    let target = last_index / 2;
    let (damaged_segment, position) = points
        .iter()
        .enumerate()
        .find_map(|(i, p)| {
            p.iter()
                .find(|(_, index, _)| *index == target)
                .map(|(_, _, position)| (i, *position))
        })
        .expect("the middle entry has an index point");
    assert!(damaged_segment + 1 < files.len(), "a sealed segment");
    let mut bytes = std::fs::read(&files[damaged_segment]).expect("read segment");
    for b in &mut bytes[position as usize + 200..position as usize + 216] {
        *b ^= 0x5a;
    }
    std::fs::write(&files[damaged_segment], &bytes).expect("damage the segment");
    let damaged_name = files[damaged_segment]
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_string();
    let second_base: u64 = files[damaged_segment + 1]
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("segment files are named by base offset");

    broker.start_again();
    let address = broker.client_addr.clone();
    let bounds = wait_for("the partition to serve", Duration::from_secs(60), || {
        let address = address.clone();
        async move { offsets(&address, "damaged", 0, None).await.ok() }
    })
    .await;
    assert_eq!(bounds.high_watermark, 4000, "the damaged partition opens");

    // Reading from the start: intact records up to the damage, then DATA_LOSS naming the place.
    // (Start at the damaged segment: the segments before it are intact.)
    let channel = grpc::channel(&broker.client_addr).await;
    let mut subscriber = grpc::subscriber(&channel);
    let mut next = 0u64;
    let status = loop {
        let response = subscriber
            .fetch(FetchRequest {
                topic: "damaged".into(),
                partition: 0,
                offset: next,
                max_bytes: 64 * 1024,
                ..FetchRequest::default()
            })
            .await;
        match response {
            Ok(r) => {
                let r = r.into_inner();
                assert!(
                    !r.records.is_empty(),
                    "an answer without records or error at {next}"
                );
                for record in &r.records {
                    assert_eq!(record.offset, next);
                    assert_eq!(
                        record.value.as_ref(),
                        format!("{next:>1000}").as_bytes(),
                        "an intact record before the damage"
                    );
                    next += 1;
                }
                assert!(next < second_base, "read past the damage without an error");
            }
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "DATA_LOSS");
    let segment = info.metadata.get("segment").expect("the segment is named");
    assert!(segment.ends_with(&damaged_name), "{segment}");
    assert!(info.metadata.contains_key("position"), "{info:?}");
    assert!(
        !status.message().contains(&format!("{next:>1000}")),
        "no record bytes in the error"
    );

    // The rest of the log reads, and publishing goes on.
    let rest = fetch_range(&broker.client_addr, "damaged", 0, second_base, 4000).await;
    assert_eq!(rest.len() as u64, 4000 - second_base);
    for (offset, value) in &rest {
        assert_eq!(value.as_ref(), format!("{offset:>1000}").as_bytes());
    }
    let client = broker.client().await;
    let ack = client
        .producer(ProducerConfig::default())
        .send("damaged", Record::new("after").partition(0))
        .await
        .expect("publish after damage");
    assert_eq!(ack.offset, 4000);

    // A subscriber gets DATA_LOSS too, never the damaged bytes.
    let mut consumer = client
        .consumer(ConsumerConfig::new("damaged").start(StartFrom::Earliest))
        .await
        .expect("subscribe");
    let error = loop {
        match consumer.next_timeout(Duration::from_secs(20)).await {
            Ok(Some(m)) => assert!(m.offset < next + 1, "delivered past the damage"),
            Ok(None) => panic!("no error and no record within 20 s"),
            Err(e) => break e,
        }
    };
    assert_eq!(error.code(), Some(tonic::Code::DataLoss), "{error}");

    // Reported: a metric and the admin API.
    let found = metric(
        &broker,
        r#"weft_partition_damaged_ranges{topic="damaged",partition="0"}"#,
    )
    .expect("damage metric");
    assert!(found >= 1.0);
    let (status, body) = broker.http("GET", "/v1/topics/damaged", None);
    assert_eq!(status, 200);
    let topic: serde_json::Value = serde_json::from_str(&body).expect("json");
    let damaged = &topic["partition_details"][0]["damaged"];
    assert!(
        damaged[0]["segment"]
            .as_str()
            .is_some_and(|s| s.ends_with(&damaged_name)),
        "{body}"
    );
    let (status, _) = broker.http("GET", "/readyz", None);
    assert_eq!(
        status, 200,
        "damage in old data does not make the broker unready"
    );
}

/// A damaged snapshot file of a partition with no other replica: the partition opens with its
/// state rebuilt from its log (the records, its high watermark, the next offset), and the
/// damaged file is set aside. Before, the snapshot's CRC check failed the open at every
/// attempt and the partition never served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_of_a_sole_replica_is_rebuilt_from_its_log() {
    let mut broker = Broker::start();
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"snap","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    let client = broker.client().await;
    let producer = client.producer(ProducerConfig::default());
    for i in 0..50u64 {
        producer
            .send("snap", Record::new(format!("r-{i}")).partition(0))
            .await
            .expect("stored");
    }
    producer.close().await.expect("close");
    drop(client);
    // A clean stop writes the snapshot.
    assert_eq!(broker.stop(), Some(0));
    let dir = segment_files(&broker)[0]
        .parent()
        .expect("partition directory")
        .to_path_buf();
    let snapshot = dir.join("snapshot");
    let mut bytes = std::fs::read(&snapshot).expect("a snapshot after a clean stop");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&snapshot, &bytes).expect("damage the snapshot");

    broker.start_again();
    let address = broker.client_addr.clone();
    let bounds = wait_for("the partition to serve", Duration::from_secs(30), || {
        let address = address.clone();
        async move { offsets(&address, "snap", 0, None).await.ok() }
    })
    .await;
    assert_eq!(bounds.high_watermark, 50, "{bounds:?}");
    let records = fetch_range(&broker.client_addr, "snap", 0, 0, 50).await;
    let values: Vec<String> = records
        .iter()
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect();
    let expected: Vec<String> = (0..50).map(|i| format!("r-{i}")).collect();
    assert_eq!(values, expected);
    assert!(dir.join("snapshot.damaged").exists(), "kept aside");
    let log = broker.log();
    assert!(
        !log.contains("cannot open partition"),
        "opened at the first attempt: {log}"
    );
    let client = broker.client().await;
    let producer = client.producer(ProducerConfig::default());
    let next = producer
        .send("snap", Record::new("after").partition(0))
        .await
        .expect("stored");
    assert_eq!(next.offset, 50, "{next:?}");
}
