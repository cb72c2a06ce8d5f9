//! Every topic setting changed while the topic holds data, through each of the three ways in
//! (gRPC UpdateTopic through the Rust client, the admin API's PATCH, `weft topic alter`): the
//! change takes effect, the data written before it stays readable, and both survive a restart.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;
use weft_client::{Client, ProducerConfig, Record, TopicSettings, TopicUpdate};
use weft_proto::v1::publish_request::Target;
use weft_proto::v1::{PublishRequest, Record as ProtoRecord};
use weft_tests::{Broker, fetch_range, grpc, ok_stdout, wait_for};

/// Publishes `count` records of `bytes` each to `partition`, one per batch; returns
/// offset -> value.
async fn publish(
    client: &Client,
    partition: u32,
    tag: &str,
    count: usize,
    bytes: usize,
) -> BTreeMap<u64, Vec<u8>> {
    let producer = client.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    for i in 0..count {
        let mut value = format!("{tag}-{i}-").into_bytes();
        value.resize(bytes, b'.');
        let ack = producer
            .send_nowait("settings", Record::new(value.clone()).partition(partition))
            .await
            .expect("queued");
        acks.push((value, ack));
    }
    let mut out = BTreeMap::new();
    for (value, ack) in acks {
        let ack = ack.await.expect("stored");
        out.insert(ack.offset, value);
    }
    producer.close().await.expect("close");
    out
}

/// One record of `bytes` published as is: the broker's answer.
async fn publish_one(broker: &Broker, bytes: usize) -> Result<(), tonic::Status> {
    let channel = grpc::channel(&broker.client_addr).await;
    grpc::publisher(&channel)
        .publish(PublishRequest {
            topic: "settings".into(),
            target: Some(Target::Partition(0)),
            records: vec![ProtoRecord {
                value: vec![b'b'; bytes].into(),
                ..ProtoRecord::default()
            }],
            ..PublishRequest::default()
        })
        .await
        .map(|_| ())
}

fn assert_batch_too_large(result: Result<(), tonic::Status>, why: &str) {
    let status = result.expect_err(why);
    assert_eq!(status.code(), Code::ResourceExhausted, "{why}: {status:?}");
    assert_eq!(
        status.get_details_error_info().expect("ErrorInfo").reason,
        "BATCH_TOO_LARGE",
        "{why}"
    );
}

/// Segment data files of partition 0 of the only topic.
fn segments(data_dir: &Path) -> usize {
    let topics = data_dir.join("topics");
    let topic = std::fs::read_dir(&topics)
        .expect("topics dir")
        .next()
        .expect("one topic")
        .expect("entry")
        .path();
    std::fs::read_dir(topic.join("0"))
        .expect("partition dir")
        .filter(|e| {
            e.as_ref()
                .expect("entry")
                .path()
                .extension()
                .is_some_and(|x| x == "log")
        })
        .count()
}

async fn bounds(client: &Client, partition: u32) -> weft_proto::v1::PartitionOffsets {
    client
        .admin()
        .offsets("settings", None)
        .await
        .expect("offsets")
        .into_iter()
        .find(|p| p.partition == partition)
        .expect("the partition")
}

async fn log_start(client: &Client) -> u64 {
    bounds(client, 0).await.log_start_offset
}

/// Every record of `written` at or after the log start reads back with its value.
async fn assert_readable(broker: &Broker, partition: u32, written: &BTreeMap<u64, Vec<u8>>) {
    let client = broker.client().await;
    let bounds = bounds(&client, partition).await;
    let end = written.keys().next_back().expect("written") + 1;
    assert!(bounds.high_watermark >= end, "{bounds:?}");
    let from = bounds
        .log_start_offset
        .max(*written.keys().next().expect("written"));
    let read = fetch_range(&broker.client_addr, "settings", partition, from, end).await;
    assert_eq!(read.len() as u64, end - from);
    for (offset, value) in read {
        assert_eq!(
            value.as_ref(),
            written[&offset].as_slice(),
            "partition {partition} offset {offset}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_topic_setting_changes_under_data_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "retention_check_interval_ms = 100\n").expect("config");
    let mut broker = Broker::start_with(&["--config", config.to_str().expect("utf-8")]);
    let client = broker.client().await;
    client
        .admin()
        .create_topic_with(
            "settings",
            TopicSettings {
                partitions: 1,
                max_message_bytes: Some(64 * 1024),
                segment_bytes: Some(64 * 1024 * 1024),
                ..TopicSettings::default()
            },
        )
        .await
        .expect("create");
    // Old data: records of 6 KiB, larger than the limit set below.
    let mut p0 = publish(&client, 0, "old", 100, 6 * 1024).await;
    assert_eq!(segments(broker.data_dir()), 1);

    // gRPC (the Rust client): partitions, max_message_bytes, segment_bytes, fsync interval.
    let topic = client
        .admin()
        .update_topic(
            "settings",
            &TopicUpdate {
                partitions: Some(2),
                max_message_bytes: Some(4096),
                segment_bytes: Some(1024 * 1024),
                fsync_interval_ms: Some(Some(50)),
                ..TopicUpdate::default()
            },
        )
        .await
        .expect("update through gRPC");
    let c = topic.config.expect("config");
    assert_eq!(
        (
            c.partitions,
            c.max_message_bytes,
            c.segment_bytes,
            c.fsync_interval_ms
        ),
        (2, Some(4096), Some(1024 * 1024), Some(50))
    );
    assert_eq!(topic.partitions.len(), 2);
    // Effects: the new partition takes records; a batch over the new limit is refused; old
    // records larger than the new limit still read; new segments roll at 1 MiB.
    let p1 = publish(&client, 1, "new-partition", 10, 100).await;
    assert_batch_too_large(publish_one(&broker, 5000).await, "over the lowered limit");
    assert_readable(&broker, 0, &p0).await;
    p0.extend(publish(&client, 0, "rolled", 1000, 3000).await);
    assert!(
        segments(broker.data_dir()) >= 3,
        "3 MB in 1 MiB segments: {} segment files",
        segments(broker.data_dir())
    );

    // Admin HTTP PATCH: retention by bytes, fsync back to always.
    let (status, body) = broker.http(
        "PATCH",
        "/v1/topics/settings",
        Some(r#"{"retention_bytes":2097152,"fsync_policy":"always"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(view["retention_bytes"], 2097152, "{body}");
    assert_eq!(view["fsync_policy"], "always", "{body}");
    assert_eq!(view["max_message_bytes"], 4096, "unchanged: {body}");
    wait_for(
        "retention by bytes to delete old segments",
        Duration::from_secs(60),
        || async { Some(log_start(&client).await).filter(|&s| s > 0) },
    )
    .await;
    assert_readable(&broker, 0, &p0).await;

    // The CLI: no byte limit any more, retention by age instead.
    let out = broker.cli(&[
        "topic",
        "alter",
        "settings",
        "--retention-bytes",
        "none",
        "--retention-ms",
        "1500",
    ]);
    ok_stdout(&out);
    let topic = client.admin().topic("settings").await.expect("describe");
    let c = topic.config.expect("config");
    assert_eq!((c.retention_bytes, c.retention_ms), (None, Some(1500)));
    // Sealed segments whose newest record is older than 1.5 s go; the active one stays.
    let start_by_bytes = log_start(&client).await;
    p0.extend(publish(&client, 0, "aged", 400, 3000).await);
    wait_for(
        "retention by age to delete old segments",
        Duration::from_secs(60),
        || async { Some(log_start(&client).await).filter(|&s| s > start_by_bytes) },
    )
    .await;
    assert_readable(&broker, 0, &p0).await;

    // Everything holds after a restart: the configuration, the limit, the data.
    let before = client.admin().topic("settings").await.expect("describe");
    drop(client);
    broker.restart();
    let client = broker.client().await;
    let after = wait_for("the topic after restart", Duration::from_secs(60), || {
        let client = &client;
        async move { client.admin().topic("settings").await.ok() }
    })
    .await;
    assert_eq!(after.config, before.config, "configuration after restart");
    wait_for("partitions to serve", Duration::from_secs(60), || async {
        client.admin().offsets("settings", None).await.ok()
    })
    .await;
    assert_batch_too_large(publish_one(&broker, 5000).await, "the limit after restart");
    assert_readable(&broker, 0, &p0).await;
    assert_readable(&broker, 1, &p1).await;
    broker.stop();
}

/// A topic may not allow records larger than the broker's `grpc_message_bytes_max` (no publish
/// that large could reach it), but a topic that already does (made through a broker with a
/// larger limit) keeps its value through other changes: only raising it past the limit is
/// refused.
#[test]
fn the_record_limit_stays_within_the_grpc_limit_and_other_changes_keep_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "grpc_message_bytes_max = 33554432\n").expect("write the config");
    let config_arg = config.to_str().expect("utf-8 path").to_string();
    let mut broker = Broker::start_with(&["--config", &config_arg]);
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"wide","partitions":1,"segment_bytes":67108864,"max_message_bytes":33554432}"#),
    );
    assert_eq!(status, 201, "{body}");
    // The same broker with the default limit (16 MiB).
    assert_eq!(broker.stop(), Some(0));
    std::fs::write(&config, "").expect("write the config");
    broker.start_again();
    let (status, body) = broker.http(
        "PATCH",
        "/v1/topics/wide",
        Some(r#"{"retention_ms":3600000}"#),
    );
    assert_eq!(status, 200, "another change keeps the wider limit: {body}");
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(view["max_message_bytes"], 33554432, "{body}");
    assert_eq!(view["retention_ms"], 3600000, "{body}");
    let (status, body) = broker.http(
        "PATCH",
        "/v1/topics/wide",
        Some(r#"{"max_message_bytes":33554433}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("grpc_message_bytes_max"), "{body}");
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"narrow","partitions":1,"segment_bytes":67108864,"max_message_bytes":33554432}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("grpc_message_bytes_max"), "{body}");
}

/// Changes of six different fields of `topic`, made at once through the admin APIs at `admins`
/// (in turn), three rounds over: every change stands (each is applied only over the topic it
/// was made from; before, the later of two changes made at once put back what the earlier one
/// had changed).
fn changes_made_at_once_all_stand(admins: &[&str], topic: &str) {
    let path = format!("/v1/topics/{topic}");
    for round in 1..=3u64 {
        let changes = [
            ("retention_ms", 3_600_000 * round, None),
            ("retention_bytes", (1 << 30) * round, None),
            ("partitions", 1 + round, None),
            ("max_message_bytes", 100_000 * round, None),
            ("segment_bytes", (64 << 20) * round, None),
            ("fsync_interval_ms", 10 * round, Some("interval")),
        ];
        let barrier = std::sync::Barrier::new(changes.len());
        std::thread::scope(|s| {
            for (i, (field, value, policy)) in changes.iter().enumerate() {
                let (barrier, path) = (&barrier, &path);
                let admin = admins[i % admins.len()];
                s.spawn(move || {
                    let body = match policy {
                        Some(p) => format!(r#"{{"fsync_policy":"{p}","{field}":{value}}}"#),
                        None => format!(r#"{{"{field}":{value}}}"#),
                    };
                    barrier.wait();
                    let (status, answer) = weft_tests::http(admin, "PATCH", path, Some(&body));
                    assert_eq!(status, 200, "{body}: {answer}");
                });
            }
        });
        for admin in admins {
            // Every broker applies the controller's log (the one asked at once, the others soon).
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let view = loop {
                let (status, body) = weft_tests::http(admin, "GET", &path, None);
                assert_eq!(status, 200, "{body}");
                let view: serde_json::Value = serde_json::from_str(&body).expect("json");
                let missing: Vec<&str> = changes
                    .iter()
                    .filter(|(field, value, _)| view[*field] != *value)
                    .map(|(field, _, _)| *field)
                    .collect();
                if missing.is_empty() {
                    break view;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: changes lost on {admin}: {missing:?} in {view}"
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            assert_eq!(view["fsync_policy"], "interval", "round {round}: {view}");
        }
    }
}

#[test]
fn changes_of_different_fields_made_at_once_all_stand() {
    let broker = Broker::start();
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"many","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    changes_made_at_once_all_stand(&[&broker.admin_addr], "many");
}

#[test]
fn changes_made_at_once_through_three_brokers_all_stand() {
    let brokers = weft_tests::start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"many","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    let admins: Vec<&str> = brokers.iter().map(|b| b.admin_addr.as_str()).collect();
    changes_made_at_once_all_stand(&admins, "many");
}

/// The interval policy asked for without an interval keeps the topic's interval, or takes the
/// configured default (before: 100 ms whatever the topic had or the config said); an interval
/// given with the "always" policy is refused (before: dropped unseen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interval_policy_asked_again_keeps_its_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "[topic_defaults]\nfsync_interval_ms = 250\n").expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("utf-8 path")]);
    let view = |body: &str| -> serde_json::Value { serde_json::from_str(body).expect("json") };
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"iv","partitions":1,"fsync_interval_ms":500}"#),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(view(&body)["fsync_interval_ms"], 500, "{body}");
    let patch = |body: &str| {
        let (status, answer) = broker.http("PATCH", "/v1/topics/iv", Some(body));
        (status, answer)
    };
    let (status, body) = patch(r#"{"fsync_policy":"interval"}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            &view(&body)["fsync_policy"],
            &view(&body)["fsync_interval_ms"]
        ),
        (&serde_json::json!("interval"), &serde_json::json!(500)),
        "the topic's interval stays: {body}"
    );
    let (status, body) = patch(r#"{"fsync_policy":"always","fsync_interval_ms":0}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("config.fsync_interval_ms"), "{body}");
    // A gRPC client that read the topic (interval 500) and set the policy alone, its mask
    // naming the policy only: the interval left in the message is not part of the change.
    let channel = grpc::channel(&broker.client_addr).await;
    let topic = grpc::topic_admin(&channel)
        .update_topic(weft_proto::v1::UpdateTopicRequest {
            name: "iv".into(),
            config: Some(weft_proto::v1::TopicConfig {
                fsync_policy: weft_proto::v1::FsyncPolicy::Always as i32,
                fsync_interval_ms: Some(500),
                ..weft_proto::v1::TopicConfig::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["fsync_policy".into()],
            }),
        })
        .await
        .expect("the policy alone changes")
        .into_inner();
    assert_eq!(
        topic.config.expect("config").fsync_policy,
        weft_proto::v1::FsyncPolicy::Always as i32
    );
    let (status, body) = patch(r#"{"fsync_policy":"always"}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(view(&body)["fsync_policy"], "always", "{body}");
    let (status, body) = patch(r#"{"fsync_policy":"interval"}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        view(&body)["fsync_interval_ms"],
        250,
        "the configured default: {body}"
    );
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"iv2","partitions":1,"fsync_policy":"interval"}"#),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        view(&body)["fsync_interval_ms"],
        250,
        "the configured default: {body}"
    );
}

/// A topic change made while a partition opens (a restart scanning a long log) is applied to
/// it once it opens. Before, the change was stored and shown, but the partition kept the
/// limits it opened with until the next restart: a record within the raised limit was refused.
#[test]
fn a_change_made_while_the_partition_opens_is_applied() {
    let mut broker = Broker::start();
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"opening","partitions":1,"max_message_bytes":1048576}"#),
    );
    assert_eq!(status, 201, "{body}");
    broker.stop();
    broker.set_env("WEFT_TEST_OPEN_DELAY_MS", "3000");
    broker.start_again();
    let (status, body) = broker.http("GET", "/readyz", None);
    assert_ne!(status, 200, "the partition is still opening: {body}");
    let (status, body) = broker.http(
        "PATCH",
        "/v1/topics/opening",
        Some(r#"{"max_message_bytes":4194304}"#),
    );
    assert_eq!(status, 200, "{body}");
    broker.wait_ready();
    let output = broker.cli_with_stdin(&["produce", "opening"], &"x".repeat(2_000_000));
    assert_eq!(
        output.status.code(),
        Some(0),
        "a 2 MB record under the raised 4 MiB limit: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
