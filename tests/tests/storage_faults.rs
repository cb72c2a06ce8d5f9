//! The disk under a partition: fsync before ack versus the interval policy, counted in the
//! broker's own fsync metric; and a full disk, which takes the partition down (said by /readyz
//! and the metrics) until space is back, when it reopens by itself with every acknowledged record.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use weft_proto::v1::publish_request::Target;
use weft_proto::v1::{PublishRequest, Record, UpdateTopicRequest};
use weft_tests::{Broker, fetch_range, grpc, metric, offsets, ok_stdout, wait_for};

fn one_record(topic: &str, value: String) -> PublishRequest {
    PublishRequest {
        topic: topic.into(),
        target: Some(Target::Partition(0)),
        records: vec![Record {
            value: value.into(),
            ..Record::default()
        }],
        ..PublishRequest::default()
    }
}

fn fsyncs(broker: &Broker) -> f64 {
    // The counter exists from the first flush (the topic's creation is flushed).
    metric(broker, "weft_flush_fsyncs_total").expect("weft_flush_fsyncs_total")
}

/// Publishes `count` records one at a time, each waiting for its acknowledgement; returns how
/// many fsyncs the broker ran meanwhile.
async fn sequential_publishes(broker: &Broker, topic: &str, count: usize) -> f64 {
    let channel = grpc::channel(&broker.client_addr).await;
    let mut publisher = grpc::publisher(&channel);
    let before = fsyncs(broker);
    for i in 0..count {
        publisher
            .publish(one_record(topic, format!("{i}")))
            .await
            .expect("publish");
    }
    fsyncs(broker) - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_before_ack_syncs_every_acknowledgement_and_the_interval_policy_syncs_on_time() {
    let broker = Broker::start();
    ok_stdout(&broker.cli(&["topic", "create", "safe", "--partitions", "1"]));
    ok_stdout(&broker.cli(&[
        "topic",
        "create",
        "lazy",
        "--partitions",
        "1",
        "--fsync-interval-ms",
        "60000",
    ]));
    // Fsync before ack: every acknowledgement of a lone publish waited for its own fsync.
    let safe = sequential_publishes(&broker, "safe", 100).await;
    assert!(safe >= 100.0, "100 acknowledged publishes, {safe} fsyncs");
    // Interval policy (1 minute): acknowledged once written, not one fsync for them.
    let lazy = sequential_publishes(&broker, "lazy", 100).await;
    assert_eq!(lazy, 0.0, "fsyncs under a 1-minute interval");

    // Changing the policy takes effect at once: back to fsync before ack...
    let channel = grpc::channel(&broker.client_addr).await;
    let mut admin = grpc::topic_admin(&channel);
    let update = |policy: i32, interval: Option<u32>| UpdateTopicRequest {
        name: "lazy".into(),
        config: Some(weft_proto::v1::TopicConfig {
            fsync_policy: policy,
            fsync_interval_ms: interval,
            ..weft_proto::v1::TopicConfig::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["fsync_policy".into(), "fsync_interval_ms".into()],
        }),
    };
    admin
        .update_topic(update(weft_proto::v1::FsyncPolicy::Always as i32, None))
        .await
        .expect("update to always");
    let again = sequential_publishes(&broker, "lazy", 50).await;
    assert!(
        again >= 50.0,
        "50 publishes after the change, {again} fsyncs"
    );

    // ... and to a short interval: the flusher syncs what was acknowledged within it.
    admin
        .update_topic(update(
            weft_proto::v1::FsyncPolicy::Interval as i32,
            Some(5_000),
        ))
        .await
        .expect("update to 5 s");
    // (5 s: the 20 acknowledgements come well within one interval, however slow the machine;
    // the interval sync comes after, without a publish to trigger it.)
    let before = fsyncs(&broker);
    let during = sequential_publishes(&broker, "lazy", 20).await;
    assert!(
        during < 20.0,
        "interval policy: {during} fsyncs for 20 publishes"
    );
    wait_for("the interval sync", Duration::from_secs(60), || {
        let synced = fsyncs(&broker) > before;
        async move { synced.then_some(()) }
    })
    .await;
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, size_mb: u32) -> SmallDisk {
        std::fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount (the test needs root)");
        assert!(status.success(), "mounting a tmpfs needs root");
        SmallDisk {
            path: path.to_path_buf(),
        }
    }

    /// Writes a file until the disk is full; returns its path.
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        // Bounded: a 64 MiB disk takes at most 1024 chunks.
        for _ in 0..4096 {
            if file.write_all(&chunk).is_err() {
                break;
            }
        }
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_takes_the_partition_down_until_space_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let disk = SmallDisk::mount(&data, 48);
    let mut broker = Broker::start_at(dir, data.clone(), &[]);
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"full","partitions":1,"segment_bytes":1048576,"max_message_bytes":65536}"#),
    );
    assert_eq!(status, 201, "{body}");
    let channel = grpc::channel(&broker.client_addr).await;
    let mut publisher = grpc::publisher(&channel);
    let mut acked = 0u64;
    for i in 0..500u64 {
        let ack = publisher
            .publish(one_record("full", format!("{i:>1000}")))
            .await
            .expect("publish with room on the disk")
            .into_inner();
        assert_eq!(ack.base_offset, i);
        acked += 1;
    }

    // Fill the disk: the next publishes fail and the partition goes down, saying why.
    let filler = disk.fill();
    let mut i = acked;
    // Bounded: the disk is full, so this fails within a few publishes.
    for _ in 0..200 {
        match publisher
            .publish(one_record("full", format!("{i:>1000}")))
            .await
        {
            Ok(ack) => {
                assert_eq!(ack.into_inner().base_offset, i);
                i += 1;
                acked = i;
            }
            Err(_) => break,
        }
    }
    let reason = wait_for(
        "/readyz to report the partition down",
        Duration::from_secs(30),
        || {
            let (status, body) = broker.http("GET", "/readyz", None);
            async move { (status == 503 && body.contains("\"down\"")).then_some(body) }
        },
    )
    .await;
    let ready: serde_json::Value = serde_json::from_str(&reason).expect("a JSON body");
    assert_eq!(ready["status"], "not ready", "{reason}");
    let down = &ready["not_ready"][0];
    assert_eq!(down["partition"], "full/0", "{reason}");
    assert_eq!(down["phase"], "down", "{reason}");
    assert!(
        down["reason"]
            .as_str()
            .is_some_and(|r| r.contains("No space left on device")),
        "the reason is the full disk: {reason}"
    );
    assert_eq!(
        metric(
            &broker,
            r#"weft_partition_state{topic="full",partition="0",state="down"}"#
        ),
        Some(1.0)
    );

    // Space comes back: the partition reopens by itself and serves every acknowledged record.
    std::fs::remove_file(&filler).expect("free the disk");
    wait_for(
        "the partition to come back",
        Duration::from_secs(60),
        || {
            let (status, _) = broker.http("GET", "/readyz", None);
            async move { (status == 200).then_some(()) }
        },
    )
    .await;
    let bounds = offsets(&broker.client_addr, "full", 0, None)
        .await
        .expect("offsets");
    assert!(
        bounds.high_watermark >= acked,
        "{} < {acked}",
        bounds.high_watermark
    );
    let records = fetch_range(&broker.client_addr, "full", 0, 0, acked).await;
    for (offset, value) in &records {
        assert_eq!(value.as_ref(), format!("{offset:>1000}").as_bytes());
    }
    assert_eq!(records.len() as u64, acked);
    let channel = grpc::channel(&broker.client_addr).await;
    let after = grpc::publisher(&channel)
        .publish(one_record("full", "after".into()))
        .await
        .expect("publishing works again")
        .into_inner();
    assert_eq!(after.base_offset, bounds.high_watermark);
    broker.kill9();
    drop(disk);
}

/// A panic in the flusher's thread ends the broker (a restart recovers from the data
/// directory, and every acknowledged record is there). Before, the thread died alone: every
/// later write waited for a flush that never came, and the broker went on running, its
/// partitions taking no write, until someone restarted it by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_flusher_stops_the_broker_and_a_restart_recovers() {
    // The write stage panics at its first round once this file exists (hook).
    let trigger = tempfile::tempdir().expect("tempdir");
    let file = trigger.path().join("panic");
    let file_name = file.to_str().expect("path").to_string();
    let mut broker = Broker::start_with_env(&[], &[("WEFT_TEST_FLUSHER_PANIC_FILE", &file_name)]);
    broker.wait_ready();
    let client = broker.client().await;
    client.admin().create_topic("t", 1).await.expect("create");
    let channel = grpc::channel(&broker.client_addr).await;
    let mut publisher = grpc::publisher(&channel);
    publisher
        .publish(one_record("t", "before".into()))
        .await
        .expect("acknowledged before the panic");
    std::fs::write(&file, b"").expect("trigger");
    // The next flush panics: this publish is never acknowledged.
    let mut request = tonic::Request::new(one_record("t", "after".into()));
    request.set_timeout(Duration::from_secs(5));
    let answer = tokio::time::timeout(Duration::from_secs(10), publisher.publish(request)).await;
    assert!(
        !matches!(answer, Ok(Ok(_))),
        "a publish was acknowledged after the flusher panicked"
    );
    let code = broker.wait_exit(Duration::from_secs(20));
    assert_eq!(code, None, "ended by abort, not an exit code");
    assert!(
        broker
            .log()
            .contains("the flusher's write stage panicked: no write can be made durable"),
        "{}",
        broker.log()
    );

    broker.set_env("WEFT_TEST_FLUSHER_PANIC_FILE", "");
    broker.start_again();
    broker.wait_ready();
    let records = fetch_range(&broker.client_addr, "t", 0, 0, 1).await;
    assert_eq!(
        records.first().map(|(offset, value)| (*offset, &value[..])),
        Some((0, &b"before"[..]))
    );
}
