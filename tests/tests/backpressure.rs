//! Backpressure during an fsync stall: with every sync of the data files taking 500 ms longer (the
//! test-only `WEFT_SYNC_DELAY_MS` of the `sync-journal` feature), a flood of publishes fills the
//! partition's next entry (4 MiB) and its bounded publish queue and the rest are refused at once with RESOURCE_EXHAUSTED,
//! reason OVERLOADED and a RetryInfo, instead of piling up in memory. Everything accepted is
//! stored once the disk catches up.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;
use weft_proto::v1::publish_request::Target;
use weft_proto::v1::{PublishRequest, Record};
use weft_tests::{Broker, fetch_range, grpc, offsets};

/// A 64 KiB value that names its publish.
fn value(i: u32) -> String {
    format!("v-{i:06}-{}", "x".repeat(64 * 1024))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_fills_the_bounded_queue_and_further_publishes_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "publish_queue_max = 4\n").expect("config");
    let broker = Broker::start_with_env(
        &["--config", config.to_str().expect("utf-8")],
        &[("WEFT_SYNC_DELAY_MS", "500")],
    );
    let channel = grpc::channel(&broker.client_addr).await;
    weft_tests::grpc::topic_admin(&channel)
        .create_topic(weft_proto::v1::CreateTopicRequest {
            name: "stalled".into(),
            config: Some(weft_proto::v1::TopicConfig {
                partitions: 1,
                ..Default::default()
            }),
        })
        .await
        .expect("create");

    // 300 publishes of 64 KiB at once over 10 connections (19 MiB): while two entries wait for
    // the stalled disk, the next entry takes at most 4 MiB of publishes and the queue 4 more;
    // the others are refused without waiting for the disk.
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(grpc::channel(&broker.client_addr).await);
    }
    let mut calls = Vec::new();
    for i in 0..300u32 {
        let mut publisher = grpc::publisher(&channels[i as usize % channels.len()]);
        calls.push(tokio::spawn(async move {
            let result = publisher
                .publish(PublishRequest {
                    topic: "stalled".into(),
                    target: Some(Target::Partition(0)),
                    records: vec![Record {
                        value: value(i).into(),
                        ..Record::default()
                    }],
                    ..PublishRequest::default()
                })
                .await;
            (i, result.map(|r| r.into_inner()))
        }));
    }
    let mut stored = Vec::new();
    let mut refused = 0;
    for call in calls {
        let (i, result) = call.await.expect("task");
        match result {
            Ok(response) => stored.push((response.base_offset, value(i))),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(
                    status.get_details_error_info().expect("ErrorInfo").reason,
                    "OVERLOADED",
                    "{status:?}"
                );
                assert!(
                    status.get_details_retry_info().is_some(),
                    "tells when to retry: {status:?}"
                );
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "the bounded queue refused some of the flood");
    assert!(
        stored.len() >= 4,
        "at least the queue's worth was accepted ({} stored)",
        stored.len()
    );
    assert_eq!(stored.len() + refused, 300);
    // Everything acknowledged is there, once.
    let end = offsets(&broker.client_addr, "stalled", 0, None)
        .await
        .expect("offsets")
        .high_watermark;
    assert_eq!(end, stored.len() as u64, "nothing refused was stored");
    let read = fetch_range(&broker.client_addr, "stalled", 0, 0, end).await;
    for (offset, value) in stored {
        assert_eq!(read[offset as usize].1.as_ref(), value.as_bytes());
    }
}

/// The bytes of publishes a broker holds are bounded (`publish_bytes_in_flight_max`, 8 MiB
/// here), however many streams send: with every sync 300 ms slower, three PublishStreams each
/// send 64 publishes of 512 KiB at once. The broker reads a stream's next publish only when it
/// has room for it, so its resident memory grows by well under the 96 MiB sent, the bytes in
/// flight it reports stay within the budget, and every publish is stored once the disk
/// catches up (none refused: they waited). Before, each stream held up to 64 publishes and the
/// partition's queue 1,024: the broker read all 96 MiB into memory at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bytes_of_publishes_held_at_once_stay_within_the_budget() {
    use futures::StreamExt;
    const STREAMS: usize = 3;
    const PER_STREAM: u32 = 64;
    const BUDGET: u64 = 8 * 1024 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, format!("publish_bytes_in_flight_max = {BUDGET}\n")).expect("config");
    let broker = Broker::start_with_env(
        &["--config", config.to_str().expect("utf-8")],
        &[("WEFT_SYNC_DELAY_MS", "300")],
    );
    let channel = grpc::channel(&broker.client_addr).await;
    weft_tests::grpc::topic_admin(&channel)
        .create_topic(weft_proto::v1::CreateTopicRequest {
            name: "budget".into(),
            config: Some(weft_proto::v1::TopicConfig {
                partitions: 1,
                ..Default::default()
            }),
        })
        .await
        .expect("create");
    let before = broker.resident_bytes();
    let value = bytes::Bytes::from(vec![b'x'; 512 * 1024]);
    let mut streams = Vec::new();
    for s in 0..STREAMS {
        // A connection each: one connection's HTTP/2 window would hold the others back.
        let channel = grpc::channel(&broker.client_addr).await;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let value = value.clone();
        let sender = tokio::spawn(async move {
            for i in 0..PER_STREAM {
                let request = PublishRequest {
                    topic: "budget".into(),
                    target: Some(Target::Partition(0)),
                    records: vec![Record {
                        key: format!("{s}-{i}").into_bytes().into(),
                        value: value.clone(),
                        ..Record::default()
                    }],
                    request_id: u64::from(i),
                    ..PublishRequest::default()
                };
                if tx.send(request).await.is_err() {
                    return;
                }
            }
        });
        let answers = grpc::publisher(&channel)
            .publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        streams.push((sender, answers, channel));
    }
    // While the disk holds them back: the broker's memory and what it says it holds.
    let mut grown = 0u64;
    let mut reported = 0f64;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        grown = grown.max(broker.resident_bytes().saturating_sub(before));
        let held = weft_tests::metric(&broker, r#"weft_publish_bytes_in_flight{path="client"} "#)
            .expect("weft_publish_bytes_in_flight");
        reported = reported.max(held);
    }
    assert!(
        reported <= BUDGET as f64,
        "the broker reports {reported} bytes in flight, past the budget of {BUDGET}"
    );
    assert!(
        grown < 48 * 1024 * 1024,
        "the broker's resident memory grew by {} MiB with {} MiB sent",
        grown / (1024 * 1024),
        STREAMS as u32 * PER_STREAM / 2
    );
    assert!(
        weft_tests::metric(
            &broker,
            r#"weft_publish_budget_waits_total{path="client"} "#
        )
        .is_some_and(|w| w >= 1.0),
        "publishes waited for room"
    );
    // Every publish is stored, none refused.
    for (sender, mut answers, _channel) in streams {
        let mut answered = 0;
        while answered < PER_STREAM {
            let answer = tokio::time::timeout(Duration::from_secs(60), answers.next())
                .await
                .expect("an answer within 60 s")
                .expect("the stream goes on")
                .expect("stored");
            assert_eq!(answer.record_count, 1);
            answered += 1;
        }
        sender.await.expect("sender");
    }
    let end = offsets(&broker.client_addr, "budget", 0, None)
        .await
        .expect("offsets");
    assert_eq!(end.high_watermark, u64::from(STREAMS as u32 * PER_STREAM));
}
