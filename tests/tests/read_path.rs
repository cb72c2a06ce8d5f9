//! Consumers' reads never wait behind the writer's disk syncs. With every sync of a data file
//! taking 3 s longer (the test-only `WEFT_SYNC_DELAY_MS` of the `sync-journal` feature) and the
//! in-memory tail cache off (so reads go to the segment files), a publish that rolls the segment
//! makes the flusher seal the old segment (fdatasync of what is unsynced, index files) and create
//! the next: a Fetch of data committed before must answer at once, not after the roll's syncs.
//! (The topic syncs on an interval, so the old segment's data is unsynced when the roll comes,
//! as it is under fsync-before-ack when one flush round writes several entries.) The records on
//! both sides of the roll read back afterwards.

use std::time::{Duration, Instant};

use weft_proto::v1::publish_request::Target;
use weft_proto::v1::{FetchRequest, PublishRequest, Record};
use weft_tests::{Broker, fetch_range, grpc};

const STALL_MS: u64 = 3000;

fn value(tag: char) -> Vec<u8> {
    vec![tag as u8; 600 * 1024]
}

async fn publish(channel: &tonic::transport::Channel, tag: char) -> u64 {
    grpc::publisher(channel)
        .publish(PublishRequest {
            topic: "rolls".into(),
            target: Some(Target::Partition(0)),
            records: vec![Record {
                value: value(tag).into(),
                ..Record::default()
            }],
            ..PublishRequest::default()
        })
        .await
        .expect("publish")
        .into_inner()
        .base_offset
}

fn segment_files(broker: &Broker) -> usize {
    let topics = broker.data_dir().join("topics");
    std::fs::read_dir(&topics)
        .expect("topics")
        .map(|topic| {
            std::fs::read_dir(topic.expect("topic").path().join("0"))
                .expect("partition dir")
                .filter(|f| {
                    f.as_ref()
                        .is_ok_and(|f| f.path().extension().is_some_and(|e| e == "log"))
                })
                .count()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_does_not_wait_behind_a_segment_roll() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "partition_read_cache_bytes = 0\n").expect("config");
    let broker = Broker::start_with_env(
        &["--config", config.to_str().expect("utf-8")],
        &[("WEFT_SYNC_DELAY_MS", &STALL_MS.to_string())],
    );
    let channel = grpc::channel(&broker.client_addr).await;
    grpc::topic_admin(&channel)
        .create_topic(weft_proto::v1::CreateTopicRequest {
            name: "rolls".into(),
            config: Some(weft_proto::v1::TopicConfig {
                partitions: 1,
                segment_bytes: Some(1024 * 1024),
                max_message_bytes: Some(700 * 1024),
                // Acknowledged once written: the roll finds the old segment unsynced and syncs it.
                fsync_policy: weft_proto::v1::FsyncPolicy::Interval as i32,
                fsync_interval_ms: Some(60_000),
                ..Default::default()
            }),
        })
        .await
        .expect("create");

    // The first record fills most of the 1 MiB segment; the second one rolls it.
    assert_eq!(publish(&channel, 'a').await, 0);
    assert_eq!(segment_files(&broker), 1);
    let rolling = {
        let channel = channel.clone();
        tokio::spawn(async move { publish(&channel, 'b').await })
    };
    // Let the flusher reach the roll (its fdatasync alone now takes 3 s), then read what was
    // committed before it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!rolling.is_finished(), "the roll is still syncing");
    let started = Instant::now();
    let fetched = grpc::subscriber(&channel)
        .fetch(FetchRequest {
            topic: "rolls".into(),
            partition: 0,
            offset: 0,
            max_bytes: 4 * 1024 * 1024,
            max_wait_ms: 0,
            min_bytes: 1,
            max_records: 0,
        })
        .await
        .expect("fetch during the roll")
        .into_inner();
    let waited = started.elapsed();
    assert_eq!(fetched.records.len(), 1);
    assert_eq!(fetched.records[0].value.as_ref(), value('a').as_slice());
    assert!(
        waited < Duration::from_millis(STALL_MS / 3),
        "the fetch waited {waited:?} behind the roll's {STALL_MS} ms sync"
    );
    assert!(
        !rolling.is_finished(),
        "the fetch was answered while the roll synced"
    );

    assert_eq!(rolling.await.expect("publish task"), 1);
    assert_eq!(segment_files(&broker), 2, "the segment rolled");
    let all = fetch_range(&broker.client_addr, "rolls", 0, 0, 2).await;
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].1.as_ref(), value('a').as_slice());
    assert_eq!(all[1].1.as_ref(), value('b').as_slice());
}

/// A broker whose partition 0 of `topic` holds two records written and not yet committed:
/// the topic created at full speed, then every sync made `sync_delay_ms` slower (a restart),
/// and one publish of two records under way (its task, answered once they are committed).
async fn two_records_written_not_committed(
    topic: &'static str,
    sync_delay_ms: u64,
) -> (
    Broker,
    tonic::transport::Channel,
    tokio::task::JoinHandle<
        Result<tonic::Response<weft_proto::v1::PublishResponse>, tonic::Status>,
    >,
) {
    let mut broker = Broker::start();
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(&format!(r#"{{"name":"{topic}","partitions":1}}"#)),
    );
    assert_eq!(status, 201, "{body}");
    broker.stop();
    broker.set_env("WEFT_SYNC_DELAY_MS", &sync_delay_ms.to_string());
    broker.start_again();
    broker.wait_ready();
    let channel = grpc::channel(&broker.client_addr).await;
    let publish = tokio::spawn({
        let channel = channel.clone();
        async move {
            grpc::publisher(&channel)
                .publish(PublishRequest {
                    topic: topic.into(),
                    target: Some(Target::Partition(0)),
                    records: (0..2)
                        .map(|i| Record {
                            value: vec![b'a' + i; 10].into(),
                            ..Record::default()
                        })
                        .collect(),
                    ..PublishRequest::default()
                })
                .await
        }
    });
    weft_tests::wait_for(
        "the two records written",
        Duration::from_millis(10_000 + 4 * sync_delay_ms),
        || async {
            let o = weft_tests::offsets(&broker.client_addr, topic, 0, None)
                .await
                .ok()?;
            (o.log_end_offset == 2 && o.high_watermark == 0).then_some(())
        },
    )
    .await;
    (broker, channel, publish)
}

/// A leader asked for an offset it has written but not yet seen committed (a new leader learns
/// the commits of the term before only with its own first entry; here, syncs that take 1 s)
/// waits for it, and answers once it is committed. Before, it answered OUT_OF_RANGE, a final
/// error, for an offset the cluster may have acknowledged already. Past its log end, the
/// offset is out of range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_waits_for_an_offset_it_wrote_and_has_not_committed() {
    let (_broker, channel, publish) = two_records_written_not_committed("written", 1000).await;
    let fetch = |offset: u64, max_wait_ms: u32| {
        let channel = channel.clone();
        async move {
            grpc::subscriber(&channel)
                .fetch(FetchRequest {
                    topic: "written".into(),
                    partition: 0,
                    offset,
                    max_bytes: 1 << 20,
                    max_wait_ms,
                    ..FetchRequest::default()
                })
                .await
        }
    };
    let past = fetch(3, 0).await.expect_err("past the log end");
    assert_eq!(past.code(), tonic::Code::OutOfRange, "{past:?}");
    let read = fetch(1, 10_000)
        .await
        .expect("offset 1 is written: the read waits for its commit")
        .into_inner();
    let offsets: Vec<u64> = read.records.iter().map(|r| r.offset).collect();
    assert!(offsets.contains(&1), "offset 1 once committed: {offsets:?}");
    assert_eq!(read.high_watermark, 2);
    publish
        .await
        .expect("publish task")
        .expect("the publish is acknowledged");
}

/// A long poll on a partition whose topic is deleted (and created again) meanwhile ends at
/// once with UNAVAILABLE (ask again), and the next Fetch reads the new topic. Before, it waited
/// out its whole wait on the old partition, then answered with nothing and the old bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_ends_when_its_partition_stops() {
    let broker = Broker::start();
    let create = || {
        let (status, body) = broker.http(
            "POST",
            "/v1/topics",
            Some(r#"{"name":"gone","partitions":1}"#),
        );
        assert_eq!(status, 201, "{body}");
    };
    create();
    let channel = grpc::channel(&broker.client_addr).await;
    let request = FetchRequest {
        topic: "gone".into(),
        partition: 0,
        offset: 0,
        max_bytes: 1 << 20,
        max_wait_ms: 20_000,
        ..FetchRequest::default()
    };
    let started = Instant::now();
    let poll = tokio::spawn({
        let channel = channel.clone();
        let request = request.clone();
        async move { grpc::subscriber(&channel).fetch(request).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = broker.http("DELETE", "/v1/topics/gone", None);
    assert!(status == 200 || status == 204, "{status} {body}");
    let answer = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long poll ends within 10 s of the deletion, not after its 20 s")
        .expect("fetch task");
    let status = answer.expect_err("the partition it waited on is gone");
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::NotFound
        ),
        "{status:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    create();
    grpc::publisher(&channel)
        .publish(PublishRequest {
            topic: "gone".into(),
            target: Some(Target::Partition(0)),
            records: vec![Record {
                value: b"new".to_vec().into(),
                ..Record::default()
            }],
            ..PublishRequest::default()
        })
        .await
        .expect("publish to the new topic");
    let read = fetch_range(&broker.client_addr, "gone", 0, 0, 1).await;
    assert_eq!(read[0].1.as_ref(), b"new");
}

/// A group commit of an offset a leader has written but not yet seen committed (syncs that take
/// 3 s, longer than the 2 s a commit waits for a replica's high watermark) waits for the
/// commit and is taken. Before, it was refused as past the high watermark (INVALID_ARGUMENT, a
/// final error), as a new leader refused offsets acknowledged in the term before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_of_an_offset_a_leader_wrote_waits_for_it() {
    let (broker, _channel, publish) = two_records_written_not_committed("committing", 3000).await;
    let client = broker.client().await;
    client
        .admin()
        .commit_offsets("waits", "committing", &[(0, 2)])
        .await
        .expect("a commit of offsets the leader wrote, once they are committed");
    let committed = weft_tests::offsets(&broker.client_addr, "committing", 0, Some("waits"))
        .await
        .expect("offsets");
    assert_eq!(committed.committed_offset, Some(2));
    publish
        .await
        .expect("publish task")
        .expect("the publish is acknowledged");
}
