//! Backpressure during an fsync stall: with every sync of the data files taking 500 ms longer (the
//! test-only `WEFT_SYNC_DELAY_MS` of the `sync-journal` feature), a flood of publishes fills the
//! partition's next entry (4 MiB) and its bounded publish queue and the rest are refused at once with RESOURCE_EXHAUSTED,
//! reason OVERLOADED and a RetryInfo, instead of piling up in memory. Everything accepted is
//! stored once the disk catches up.

use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;
use weft_proto::v1::publish_request::Target;
use weft_proto::v1::{PublishRequest, PublishResponse, Record};
use weft_tests::{Broker, fetch_range, grpc, offsets};

/// A 64 KiB value that names its publish.
fn value(i: u32) -> String {
    format!("v-{i:06}-{}", "x".repeat(64 * 1024))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_fills_the_bounded_queue_and_further_publishes_are_refused() {
    // 300 publishes of 64 KiB at once over 10 connections (19 MiB): while two entries wait for
    // the stalled disk, the next entry takes at most 4 MiB of publishes and the queue 4 more;
    // the others are refused without waiting for the disk.
    let (stored, refused) = flood("publish_queue_max = 4\n", 300).await;
    assert!(refused > 0, "the bounded queue refused some of the flood");
    assert!(
        stored >= 4,
        "at least the queue's worth was accepted ({stored} stored)"
    );
}

/// The publish queues are bounded by bytes too (`publish_queue_bytes_max`, here 1 MiB), not
/// only by count: with room for 1,000 publishes per partition, a flood of 300 publishes of
/// 64 KiB (19 MiB) during a stalled disk is refused in part instead of waiting in memory.
/// Before, every one of them waited in the queue (1,000 publishes of up to 16 MiB each could).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_queues_are_bounded_by_bytes() {
    let (stored, refused) = flood(
        "publish_queue_max = 1000\npublish_queue_bytes_max = 1048576\n",
        300,
    )
    .await;
    assert!(stored > 0, "some of the flood was stored");
    assert!(refused > 0, "{stored} stored, none refused");
}

/// A broker with `config_text` whose every sync is 500 ms late, a topic `topic` of
/// `partitions`, and 10 connections to it (the temp dir holds the config file).
async fn stalled_broker(
    config_text: &str,
    topic: &str,
    partitions: u32,
) -> (tempfile::TempDir, Broker, Vec<Channel>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, config_text).expect("config");
    let broker = Broker::start_with_env(
        &["--config", config.to_str().expect("utf-8")],
        &[("WEFT_SYNC_DELAY_MS", "500")],
    );
    let channel = grpc::channel(&broker.client_addr).await;
    weft_tests::grpc::topic_admin(&channel)
        .create_topic(weft_proto::v1::CreateTopicRequest {
            name: topic.into(),
            config: Some(weft_proto::v1::TopicConfig {
                partitions,
                ..Default::default()
            }),
        })
        .await
        .expect("create");
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(grpc::channel(&broker.client_addr).await);
    }
    (dir, broker, channels)
}

/// Publishes `value(i)` to `topic`/`partition` over `channel`.
async fn publish(
    channel: Channel,
    topic: &'static str,
    partition: u32,
    i: u32,
) -> Result<PublishResponse, tonic::Status> {
    grpc::publisher(&channel)
        .publish(PublishRequest {
            topic: topic.into(),
            target: Some(Target::Partition(partition)),
            records: vec![Record {
                value: value(i).into(),
                ..Record::default()
            }],
            ..PublishRequest::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Floods one partition of a broker with `config` and every sync 500 ms late with `count`
/// publishes of 64 KiB at once, over 10 connections; checks that each was stored or refused
/// with RESOURCE_EXHAUSTED (OVERLOADED, with a retry hint), some refused, and that everything
/// acknowledged is there once, nothing else. Returns (stored, refused).
async fn flood(config_text: &str, count: u32) -> (usize, usize) {
    let (_dir, broker, channels) = stalled_broker(config_text, "stalled", 1).await;
    let mut calls = Vec::new();
    for i in 0..count {
        let channel = channels[i as usize % channels.len()].clone();
        calls.push(tokio::spawn(async move {
            (i, publish(channel, "stalled", 0, i).await)
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
    assert_eq!(stored.len() + refused, count as usize);
    // Everything acknowledged is there, once.
    let end = offsets(&broker.client_addr, "stalled", 0, None)
        .await
        .expect("offsets")
        .high_watermark;
    assert_eq!(end, stored.len() as u64, "nothing refused was stored");
    let read = fetch_range(&broker.client_addr, "stalled", 0, 0, end).await;
    for (offset, value) in &stored {
        assert_eq!(read[*offset as usize].1.as_ref(), value.as_bytes());
    }
    (stored.len(), refused)
}

/// A partition whose queue does not drain (a flood during a stalled disk) holds at most a
/// quarter of the broker's publish-queue bytes: publishes to another partition meanwhile are
/// taken. With one bound for the whole broker and no share, the flood took all of it and the
/// other partition's publishes were refused as OVERLOADED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_partition_leaves_the_others_room_in_the_queues() {
    let (_dir, broker, channels) = stalled_broker(
        "publish_queue_max = 1000\npublish_queue_bytes_max = 4194304\n",
        "shared",
        2,
    )
    .await;
    let mut flood = Vec::new();
    for i in 0..300u32 {
        let channel = channels[i as usize % channels.len()].clone();
        flood.push(tokio::spawn(publish(channel, "shared", 0, i)));
    }
    // While the flood waits on the stalled disk.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut others = Vec::new();
    for i in 0..8u32 {
        others.push(tokio::spawn(publish(
            channels[0].clone(),
            "shared",
            1,
            1000 + i,
        )));
    }
    for other in others {
        other
            .await
            .expect("task")
            .expect("a publish to the other partition is taken");
    }
    let mut refused = 0;
    for call in flood {
        if let Err(status) = call.await.expect("task") {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            refused += 1;
        }
    }
    assert!(
        refused > 0,
        "the flooded partition's share refused some of it"
    );
    let end = offsets(&broker.client_addr, "shared", 1, None)
        .await
        .expect("offsets")
        .high_watermark;
    assert_eq!(end, 8);
}
