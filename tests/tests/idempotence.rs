//! Idempotent publishing: a retried batch is stored once and answered with its original offsets,
//! also after a restart; gaps and stale epochs are refused with FAILED_PRECONDITION.

use tonic::Code;
use tonic_types::StatusExt;
use weft_proto::v1::publish_request::Target;
use weft_proto::v1::publisher_client::PublisherClient;
use weft_proto::v1::subscriber_client::SubscriberClient;
use weft_proto::v1::{FetchRequest, PublishRequest, Record};
use weft_tests::Broker;

fn batch(producer_id: u64, epoch: u32, base_sequence: u64, values: &[&str]) -> PublishRequest {
    PublishRequest {
        topic: "idem".into(),
        target: Some(Target::Partition(0)),
        records: values
            .iter()
            .map(|v| Record {
                value: bytes::Bytes::from(v.to_string()),
                ..Record::default()
            })
            .collect(),
        producer_id,
        producer_epoch: epoch,
        base_sequence,
        request_id: base_sequence,
        trace_context: Default::default(),
    }
}

async fn fetch_all(broker: &Broker) -> Vec<String> {
    let mut subscriber = SubscriberClient::connect(format!("http://{}", broker.client_addr))
        .await
        .expect("connect");
    let response = subscriber
        .fetch(FetchRequest {
            topic: "idem".into(),
            partition: 0,
            offset: 0,
            max_bytes: 0,
            max_wait_ms: 0,
            min_bytes: 0,
            max_records: 0,
        })
        .await
        .expect("fetch")
        .into_inner();
    response
        .records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect()
}

/// Creates the one-partition topic `idem` and connects a plain Publisher client.
async fn idem_topic(broker: &Broker) -> PublisherClient<tonic::transport::Channel> {
    broker
        .client()
        .await
        .admin()
        .create_topic("idem", 1)
        .await
        .expect("create");
    PublisherClient::connect(format!("http://{}", broker.client_addr))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_stored_once() {
    let mut broker = Broker::start();
    let mut publisher = idem_topic(&broker).await;

    let first = publisher
        .publish(batch(42, 0, 0, &["a", "b"]))
        .await
        .expect("publish")
        .into_inner();
    assert_eq!(
        (first.base_offset, first.record_count, first.duplicate),
        (0, 2, false)
    );
    let retry = publisher
        .publish(batch(42, 0, 0, &["a", "b"]))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        (retry.base_offset, retry.record_count, retry.duplicate),
        (0, 2, true),
        "the retry gets the original offsets"
    );
    let next = publisher
        .publish(batch(42, 0, 2, &["c"]))
        .await
        .expect("publish")
        .into_inner();
    assert_eq!(next.base_offset, 2);
    assert_eq!(fetch_all(&broker).await, ["a", "b", "c"], "stored once");

    // A gap is refused, with the expected sequence in the details.
    let gap = publisher
        .publish(batch(42, 0, 10, &["x"]))
        .await
        .expect_err("gap");
    assert_eq!(gap.code(), Code::FailedPrecondition);
    let info = gap.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "SEQUENCE_GAP");
    assert_eq!(
        info.metadata.get("expected_sequence").map(String::as_str),
        Some("3")
    );

    // A new epoch fences the old one.
    publisher
        .publish(batch(42, 1, 0, &["d"]))
        .await
        .expect("new epoch starts at 0");
    let fenced = publisher
        .publish(batch(42, 0, 3, &["y"]))
        .await
        .expect_err("fenced");
    assert_eq!(fenced.code(), Code::FailedPrecondition);
    assert_eq!(
        fenced.get_details_error_info().expect("ErrorInfo").reason,
        "PRODUCER_FENCED"
    );

    // An idempotent publish needs a partition or a key.
    let mut no_target = batch(42, 1, 1, &["z"]);
    no_target.target = None;
    let status = publisher.publish(no_target).await.expect_err("no target");
    assert_eq!(status.code(), Code::InvalidArgument);

    // After a restart the producer state is rebuilt from the log: the last batch is still a duplicate.
    broker.restart();
    let mut publisher = PublisherClient::connect(format!("http://{}", broker.client_addr))
        .await
        .expect("connect");
    let again = publisher
        .publish(batch(42, 1, 0, &["d"]))
        .await
        .expect("retry after restart")
        .into_inner();
    assert!(
        again.duplicate,
        "a retry after a restart is still recognised"
    );
    assert_eq!(again.base_offset, 3);
    assert_eq!(fetch_all(&broker).await, ["a", "b", "c", "d"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_kill_9_is_answered_with_the_original_offsets() {
    let mut broker = Broker::start();
    let mut publisher = idem_topic(&broker).await;
    for (sequence, value) in ["a", "b", "c"].iter().enumerate() {
        publisher
            .publish(batch(7, 0, sequence as u64, &[value]))
            .await
            .expect("publish");
    }
    // No clean shutdown: the producer table must come back from the snapshot and the tail.
    broker.kill9();
    broker.start_again();
    let mut publisher = weft_tests::wait_for(
        "the partition to serve",
        std::time::Duration::from_secs(60),
        || {
            let address = broker.client_addr.clone();
            async move {
                let mut p = PublisherClient::connect(format!("http://{address}"))
                    .await
                    .ok()?;
                p.publish(batch(7, 0, 2, &["c"])).await.ok()?;
                Some(p)
            }
        },
    )
    .await;
    let again = publisher
        .publish(batch(7, 0, 2, &["c"]))
        .await
        .expect("retry after a crash")
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.base_offset, 2);
    // Move past the batches a partition remembers per producer; a retry of an older one is
    // refused as stored long ago, never stored again.
    for sequence in 3..10u64 {
        publisher
            .publish(batch(7, 0, sequence, &["n"]))
            .await
            .expect("publish");
    }
    let old = publisher
        .publish(batch(7, 0, 0, &["a"]))
        .await
        .expect_err("too old to be answered with offsets");
    assert_eq!(old.code(), Code::FailedPrecondition);
    assert_eq!(
        old.get_details_error_info().expect("ErrorInfo").reason,
        "DUPLICATE_SEQUENCE"
    );
    let stored = fetch_all(&broker).await;
    assert_eq!(stored.len(), 10, "nothing stored twice: {stored:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_retries_store_every_record_once_across_broker_crashes() {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex};
    use weft_client::{ProducerConfig, Record};

    let mut broker = Broker::start();
    let address = broker.client_addr.clone();
    broker
        .client()
        .await
        .admin()
        .create_topic("once", 2)
        .await
        .expect("create");
    // Producers keep publishing while the broker is killed and restarted four times, down for
    // less than, about, and more than their retry budget (5 x 100 ms): some batches are stored
    // and never answered, some retries run out.
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let failed: Arc<Mutex<u64>> = Arc::default();
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut producers = Vec::new();
    for p in 0..3 {
        let (acked, failed, running) = (acked.clone(), failed.clone(), running.clone());
        let address = address.clone();
        producers.push(tokio::spawn(async move {
            let client = weft_client::Client::connect([address.as_str()])
                .await
                .expect("connect")
                .with_timeout(std::time::Duration::from_secs(2));
            let producer = client.producer(ProducerConfig {
                linger: std::time::Duration::from_millis(2),
                retries_max: 5,
                retry_backoff: std::time::Duration::from_millis(100),
                ..ProducerConfig::default()
            });
            let mut i = 0u64;
            // Bounded: at most 200 000 sends per producer.
            while running.load(std::sync::atomic::Ordering::Relaxed) && i < 200_000 {
                let value = format!("p{p}-{i}");
                let ack = producer
                    .send_nowait(
                        "once",
                        Record::new(value.clone()).key(format!("k{}", i % 7)),
                    )
                    .await
                    .expect("queued");
                let (acked, failed) = (acked.clone(), failed.clone());
                tokio::spawn(async move {
                    match ack.await {
                        Ok(ack) => {
                            acked.lock().expect("lock").insert(value, ack.offset);
                        }
                        _ => *failed.lock().expect("lock") += 1,
                    }
                });
                i += 1;
                if i.is_multiple_of(64) {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            }
            let _ = producer.close().await;
        }));
    }
    // Each crash comes once the producers have had 200 more records acknowledged, so every
    // outage hits producers that are publishing (the broker comes back on the same ports, and
    // the producers' retries reach it there).
    let acked_count = || acked.lock().expect("lock").len();
    for down in [300u64, 550, 800, 1500] {
        let before = acked_count();
        weft_tests::wait_for(
            "200 more acknowledgements",
            std::time::Duration::from_secs(120),
            || async { (acked_count() >= before + 200).then_some(()) },
        )
        .await;
        broker.kill9();
        tokio::time::sleep(std::time::Duration::from_millis(down)).await;
        broker.start_again_same_ports();
    }
    let before = acked_count();
    weft_tests::wait_for(
        "acknowledgements after the last restart",
        std::time::Duration::from_secs(120),
        || async { (acked_count() >= before + 200).then_some(()) },
    )
    .await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    for p in producers {
        tokio::time::timeout(std::time::Duration::from_secs(120), p)
            .await
            .expect("a producer finished")
            .expect("a producer did not panic");
    }
    let acked = acked.lock().expect("lock").clone();
    eprintln!(
        "{} acknowledged, {} failed for good (retries ran out during an outage)",
        acked.len(),
        failed.lock().expect("lock")
    );

    // Read both partitions whole.
    let mut stored = Vec::new();
    for partition in 0..2 {
        let bounds = weft_tests::offsets(&broker.client_addr, "once", partition, None)
            .await
            .expect("offsets");
        stored.extend(
            weft_tests::fetch_range(
                &broker.client_addr,
                "once",
                partition,
                0,
                bounds.high_watermark,
            )
            .await
            .into_iter()
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned()),
        );
    }
    let mut seen = HashSet::new();
    for value in &stored {
        assert!(seen.insert(value), "{value} stored twice");
    }
    for value in acked.keys() {
        assert!(seen.contains(value), "acknowledged {value} is missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_producers_are_forgotten_and_start_over_in_a_new_epoch() {
    use weft_client::{ProducerConfig, Record as ClientRecord};

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "producer_expiration_ms = 1000\n").expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("utf-8")]);
    let mut publisher = idem_topic(&broker).await;
    let client = broker.client().await;
    let t0 = 1_700_000_000_000i64;
    let stamped = |producer_id: u64, sequence: u64, value: &str, timestamp_ms: i64| {
        let mut request = batch(producer_id, 0, sequence, &[value]);
        request.records[0].timestamp_ms = timestamp_ms;
        request
    };
    publisher
        .publish(stamped(5, 0, "five", t0))
        .await
        .expect("publish");
    let producer = client.producer(ProducerConfig::default());
    producer
        .send(
            "idem",
            ClientRecord::new("before").partition(0).timestamp_ms(t0),
        )
        .await
        .expect("the client's first record");
    // Another producer writes 1 100 batches ten seconds of record time later: the others have
    // been idle for longer than producer_expiration_ms.
    for sequence in 0..1100u64 {
        publisher
            .publish(stamped(6, sequence, "six", t0 + 10_000))
            .await
            .expect("publish");
    }
    let producers = weft_tests::metric(
        &broker,
        r#"weft_partition_producers{topic="idem",partition="0"}"#,
    )
    .expect("producer table size");
    assert_eq!(producers, 1.0, "only the active producer is remembered");
    // The forgotten producer's next batch is refused as unknown, not taken as a gap.
    let unknown = publisher
        .publish(stamped(5, 1, "five again", t0 + 10_001))
        .await
        .expect_err("forgotten producer");
    assert_eq!(unknown.code(), Code::FailedPrecondition);
    assert_eq!(
        unknown.get_details_error_info().expect("ErrorInfo").reason,
        "UNKNOWN_PRODUCER"
    );
    // The Rust client starts over in a new epoch by itself.
    let after = producer
        .send(
            "idem",
            ClientRecord::new("after")
                .partition(0)
                .timestamp_ms(t0 + 10_001),
        )
        .await
        .expect("the client continues after being forgotten");
    assert_eq!(after.offset, 1102);
    producer.close().await.expect("close");
    let stored = fetch_all(&broker).await;
    assert_eq!(stored.iter().filter(|v| *v == "before").count(), 1);
    assert_eq!(stored.iter().filter(|v| *v == "after").count(), 1);
}

/// A partition remembers at most `producers_per_partition_max` idempotent producers: a new
/// one past it is refused with RESOURCE_EXHAUSTED (LIMIT_REACHED, a QuotaFailure naming the
/// setting) while known producers go on, and producers idle past `producer_expiration_ms`
/// make room. Before, every new producer id (the Rust client picks a random one per
/// `Producer`) was remembered for a day, without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_past_the_limit_are_refused_until_idle_ones_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(
        &config,
        "producer_expiration_ms = 1000\nproducers_per_partition_max = 3\n",
    )
    .expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("utf-8")]);
    let mut publisher = idem_topic(&broker).await;
    let t0 = 1_700_000_000_000i64;
    let stamped = |producer_id: u64, sequence: u64, timestamp_ms: i64| {
        let mut request = batch(producer_id, 0, sequence, &[&format!("p{producer_id}")]);
        request.records[0].timestamp_ms = timestamp_ms;
        request
    };
    for producer in 1..=3 {
        publisher
            .publish(stamped(producer, 0, t0))
            .await
            .expect("publish");
    }
    let refused = publisher
        .publish(stamped(4, 0, t0))
        .await
        .expect_err("a fourth producer is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(
        refused.get_details_error_info().expect("ErrorInfo").reason,
        "LIMIT_REACHED"
    );
    let quota = refused.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "producers_per_partition_max");
    let producers = weft_tests::metric(
        &broker,
        r#"weft_partition_producers{topic="idem",partition="0"}"#,
    )
    .expect("producer table size");
    assert_eq!(producers, 3.0);
    // A known producer goes on.
    publisher
        .publish(stamped(3, 1, t0 + 1))
        .await
        .expect("a known producer goes on");
    // Ten seconds of record time later, by the new producer's own batch (nothing else was
    // stored meanwhile), the others have been idle past the expiration: the fourth takes a
    // place. Before, only an accepted batch moved the partition's clock on, so with every new
    // producer refused the partition stayed full for good.
    publisher
        .publish(stamped(4, 0, t0 + 10_000))
        .await
        .expect("room after the idle ones expired");
    let stored = fetch_all(&broker).await;
    assert_eq!(stored, ["p1", "p2", "p3", "p3", "p4"]);
}
