//! The partition log as a deployment lives with it: retention, then restart; restarts that read a
//! snapshot and the tail, never the whole log; a broker that serves a partition only once it is
//! open and replayed; topic limits that change under stored data.

use std::time::{Duration, Instant};

use weft_client::{ConsumerConfig, ProducerConfig, Record, StartFrom};
use weft_proto::v1::publish_request::Target;
use weft_proto::v1::{PublishRequest, Record as ProtoRecord, TopicConfig, UpdateTopicRequest};
use weft_tests::{Broker, fetch_range, grpc, metric, offsets, wait_for};

fn config_file(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("weft.toml");
    std::fs::write(&path, text).expect("config");
    path.to_str().expect("utf-8").to_string()
}

/// Publishes `count` records of `value_bytes` each to partition 0, `per_request` per call.
async fn publish_records(
    broker: &Broker,
    topic: &str,
    first: u64,
    count: u64,
    value_bytes: usize,
) -> u64 {
    let client = broker.client().await;
    let producer = client.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    for i in first..first + count {
        acks.push(
            producer
                .send_nowait(
                    topic,
                    Record::new(format!("{i:>width$}", width = value_bytes)).partition(0),
                )
                .await
                .expect("queued"),
        );
    }
    let mut last = 0;
    for ack in acks {
        last = ack.await.expect("stored").offset;
    }
    producer.close().await.expect("close");
    last + 1
}

/// Waits until the partition answers (it may be opening after a restart) and returns its bounds.
async fn bounds_when_serving(broker: &Broker, topic: &str) -> weft_proto::v1::PartitionOffsets {
    let address = broker.client_addr.clone();
    wait_for("the partition to serve", Duration::from_secs(60), || {
        let address = address.clone();
        async move { offsets(&address, topic, 0, None).await.ok() }
    })
    .await
}

/// Every record from `start` to `end` is there, in order, holding the value it was written with.
async fn assert_dense_values(broker: &Broker, topic: &str, start: u64, end: u64, width: usize) {
    let records = fetch_range(&broker.client_addr, topic, 0, start, end).await;
    assert_eq!(records.len() as u64, end - start, "records {start}..{end}");
    for (i, (offset, value)) in records.iter().enumerate() {
        assert_eq!(*offset, start + i as u64, "dense offsets");
        assert_eq!(
            value.as_ref(),
            format!("{offset:>width$}").as_bytes(),
            "record {offset}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_then_restart_and_crash_keep_serving_the_retained_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(&dir, "retention_check_interval_ms = 100\n");
    let mut broker = Broker::start_with(&["--config", &config]);
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"kept","partitions":1,"segment_bytes":1048576,"retention_bytes":2097152,"max_message_bytes":65536}"#),
    );
    assert_eq!(status, 201, "{body}");
    let end = publish_records(&broker, "kept", 0, 10_000, 1024).await;
    assert_eq!(end, 10_000);

    // Retention runs in the background and brings the log down to its fixed point: it deletes
    // the oldest 1 MiB segment while 2 MiB would remain, so it is done once under 3 MiB (until
    // then the start moves on under the reads below).
    wait_for("retention to finish", Duration::from_secs(60), || {
        let (status, body) = broker.http("GET", "/v1/topics/kept", None);
        async move {
            assert_eq!(status, 200, "{body}");
            let topic: serde_json::Value = serde_json::from_str(&body).expect("json");
            let size = topic["partition_details"][0]["size_bytes"]
                .as_u64()
                .expect("size_bytes");
            (size < 3 * 1024 * 1024).then_some(())
        }
    })
    .await;
    let before = offsets(&broker.client_addr, "kept", 0, None)
        .await
        .expect("offsets");
    assert!(before.log_start_offset > 5_000, "{before:?}");
    assert_eq!(before.high_watermark, 10_000);

    for crash in [false, true] {
        if crash {
            broker.kill9();
            broker.start_again();
        } else {
            broker.restart();
        }
        let after = bounds_when_serving(&broker, "kept").await;
        let expected_end = if crash { 10_001 } else { 10_000 };
        assert_eq!(after.high_watermark, expected_end, "crash={crash}");
        assert!(
            after.log_start_offset >= before.log_start_offset && after.log_start_offset < 10_000,
            "the retained start survives (before {}, after {})",
            before.log_start_offset,
            after.log_start_offset
        );
        assert_dense_values(
            &broker,
            "kept",
            after.log_start_offset,
            after.high_watermark,
            1024,
        )
        .await;
        if !crash {
            // Publishing continues at the next offset.
            let next = publish_records(&broker, "kept", 10_000, 1, 1024).await;
            assert_eq!(next, 10_001);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_the_snapshot_and_replays_only_the_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(&dir, "snapshot_interval_bytes = 1048576\n");
    let mut broker = Broker::start_with(&["--config", &config]);
    broker
        .client()
        .await
        .admin()
        .create_topic("snap", 1)
        .await
        .expect("create");
    let end = publish_records(&broker, "snap", 0, 8_000, 1024).await;
    let replayed = r#"weft_partition_replayed_entries{topic="snap",partition="0"}"#;

    // A clean stop snapshots everything: nothing to replay.
    broker.restart();
    assert_eq!(
        bounds_when_serving(&broker, "snap").await.high_watermark,
        end
    );
    assert_eq!(metric(&broker, replayed), Some(0.0), "clean restart");

    // A crash replays what came after the last snapshot: about snapshot_interval_bytes (plus
    // what was applied while that snapshot was being written, which grows when the machine is
    // busy), far less than the 8 MiB published since the clean restart's snapshot.
    let end = publish_records(&broker, "snap", end, 8_000, 1024).await;
    broker.kill9();
    broker.start_again();
    assert_eq!(
        bounds_when_serving(&broker, "snap").await.high_watermark,
        end
    );
    let bytes = metric(
        &broker,
        r#"weft_partition_replayed_bytes{topic="snap",partition="0"}"#,
    )
    .expect("replayed bytes");
    assert!(
        bytes <= 5.0 * 1024.0 * 1024.0,
        "replayed {bytes} bytes of a 16 MiB log after a crash (8 MiB since the last clean stop)"
    );
    assert_dense_values(&broker, "snap", 0, end, 1024).await;
}

/// After a crash the records applied since the last snapshot are applied again at the next
/// open. They are read a few MiB at a time, so the restarting broker's memory does not grow
/// with that tail. Before, openraft applied the whole tail from one read once the partition
/// had a leader again: the broker held all of it in memory (for every partition at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_restart_re_applies_the_tail_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No snapshot while publishing: the whole log is the tail after the crash.
    let config = config_file(&dir, "snapshot_interval_bytes = 1073741824\n");
    let mut broker = Broker::start_with(&["--config", &config]);
    broker
        .client()
        .await
        .admin()
        .create_topic("tail", 1)
        .await
        .expect("create");
    // What a broker holding this partition uses without re-applying anything.
    let baseline = broker.peak_rss_bytes();
    let tail_bytes: u64 = 128 * 1024 * 1024;
    let end = publish_records(&broker, "tail", 0, tail_bytes / 1024, 1024).await;
    // The log store saves the committed index at most once a second (it is what tells the
    // next open which entries it may apply before the group has a leader).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    broker.kill9();
    broker.start_again();
    assert_eq!(
        bounds_when_serving(&broker, "tail").await.high_watermark,
        end
    );
    let replayed = metric(
        &broker,
        r#"weft_partition_replayed_bytes{topic="tail",partition="0"}"#,
    )
    .expect("replayed bytes");
    assert!(
        replayed >= tail_bytes as f64,
        "replayed {replayed} bytes: the test wants the whole {tail_bytes}-byte log re-applied"
    );
    let peak = broker.peak_rss_bytes();
    assert!(
        peak.saturating_sub(baseline) < tail_bytes / 2,
        "the broker's peak resident memory reached {peak} bytes re-applying a {tail_bytes}-byte \
         tail ({baseline} bytes at the first start)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_broker_never_serves_a_partition_before_it_is_replayed() {
    let mut broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("ready", 1)
        .await
        .expect("create");
    let end = publish_records(&broker, "ready", 0, 60_000, 500).await;
    client
        .admin()
        .commit_offsets("g", "ready", &[(0, 5_000)])
        .await
        .expect("commit outside membership");
    drop(client);
    // A crash: the whole log is in the tail after the last snapshot.
    broker.kill9();
    broker.start_again();

    // The first answer the partition gives is the true one (before it is ready it answers
    // UNAVAILABLE, never a high watermark of 0).
    let first = bounds_when_serving(&broker, "ready").await;
    assert_eq!(first.high_watermark, end, "first answer after the restart");
    let (status, body) = broker.http("GET", "/readyz", None);
    assert_eq!(status, 200, "{body}");
    let committed = offsets(&broker.client_addr, "ready", 0, Some("g"))
        .await
        .expect("offsets");
    assert_eq!(committed.committed_offset, Some(5_000));

    // A group member resumes at the commit, a `latest` reader sees only what comes next.
    let client = broker.client().await;
    let mut member = client
        .consumer(
            ConsumerConfig::new("ready")
                .group("g")
                .start(StartFrom::Earliest),
        )
        .await
        .expect("join");
    let first = member
        .next_timeout(Duration::from_secs(20))
        .await
        .expect("next")
        .expect("a record");
    assert_eq!(first.offset, 5_000, "the group resumes at its commit");
    member.close().await.expect("close");
    let mut latest = client
        .consumer(ConsumerConfig::new("ready").start(StartFrom::Latest))
        .await
        .expect("subscribe");
    // Subscribing returns once the subscription has its start positions (the end of the log
    // as the ready partition knows it): a record published from now on is after them.
    assert_eq!(latest.positions().get(&0).copied(), Some(end));
    publish_records(&broker, "ready", end, 1, 100).await;
    let next = latest
        .next_timeout(Duration::from_secs(20))
        .await
        .expect("next")
        .expect("the new record");
    assert_eq!(next.offset, end, "a latest reader starts at the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_message_limit_keeps_old_data_and_takes_new_batches() {
    let mut broker = Broker::start();
    let channel = grpc::channel(&broker.client_addr).await;
    let create = weft_proto::v1::CreateTopicRequest {
        name: "limits".into(),
        config: Some(TopicConfig {
            partitions: 1,
            max_message_bytes: Some(4 * 1024 * 1024),
            segment_bytes: Some(16 * 1024 * 1024),
            ..TopicConfig::default()
        }),
    };
    grpc::topic_admin(&channel)
        .create_topic(create)
        .await
        .expect("create");
    let publish = |bytes: usize, fill: u8| PublishRequest {
        topic: "limits".into(),
        target: Some(Target::Partition(0)),
        records: vec![ProtoRecord {
            value: vec![fill; bytes].into(),
            ..ProtoRecord::default()
        }],
        ..PublishRequest::default()
    };
    let set_limit = |bytes: u32| UpdateTopicRequest {
        name: "limits".into(),
        config: Some(TopicConfig {
            max_message_bytes: Some(bytes),
            ..TopicConfig::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["max_message_bytes".into()],
        }),
    };
    let mut publisher = grpc::publisher(&channel);
    publisher
        .publish(publish(3 * 1024 * 1024, 3))
        .await
        .expect("a 3 MiB record under a 4 MiB limit");
    publisher.publish(publish(10, 1)).await.expect("small");

    // Lower the limit, then crash: recovery scans the tail with the lower limit in force.
    grpc::topic_admin(&channel)
        .update_topic(set_limit(1024 * 1024))
        .await
        .expect("lower the limit");
    let refused = publisher
        .publish(publish(2 * 1024 * 1024, 2))
        .await
        .expect_err("over the new limit");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    broker.kill9();
    broker.start_again();
    let bounds = bounds_when_serving(&broker, "limits").await;
    assert_eq!(bounds.high_watermark, 2, "both records survive");
    let records = fetch_range(&broker.client_addr, "limits", 0, 0, 2).await;
    assert_eq!(records[0].1.len(), 3 * 1024 * 1024);
    assert!(records[0].1.iter().all(|&b| b == 3));

    // Raise it past what the partition was opened with: a larger batch is taken, and the
    // partition keeps working.
    let channel = grpc::channel(&broker.client_addr).await;
    let mut publisher = grpc::publisher(&channel);
    grpc::topic_admin(&channel)
        .update_topic(set_limit(12 * 1024 * 1024))
        .await
        .expect("raise the limit");
    let started = Instant::now();
    let big = publisher
        .publish(publish(9 * 1024 * 1024, 9))
        .await
        .expect("a 9 MiB record under a 12 MiB limit")
        .into_inner();
    assert_eq!(big.base_offset, 2);
    let small = publisher
        .publish(publish(10, 1))
        .await
        .expect("the partition still works")
        .into_inner();
    assert_eq!(small.base_offset, 3, "after {:?}", started.elapsed());
    let records = fetch_range(&broker.client_addr, "limits", 0, 2, 4).await;
    assert_eq!(records[0].1.len(), 9 * 1024 * 1024);
}
