//! Publishes forwarded by a broker that does not lead the partition keep their order: a plain
//! gRPC client pipelines idempotent publishes over one PublishStream to a follower, which hands
//! them to the leader over one ordered stream per partition; every request is stored once, at
//! the offset its place in the stream gives it, with no sequence gap (real processes on
//! 127.0.0.x, free ports, temp dirs).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use weft_proto::v1::publish_request::Target;
use weft_proto::v1::{PublishRequest, Record};
use weft_tests::{Firewall, fetch_range, grpc, start_cluster, wait_for};

/// Leader of partition 0 of `topic` as `broker` sees it (0: none yet).
fn leader(broker: &weft_tests::Broker, topic: &str) -> u64 {
    let (status, body) = broker.http("GET", &format!("/v1/topics/{topic}"), None);
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    value["partition_details"][0]["leader_id"]
        .as_u64()
        .unwrap_or(0)
}

/// Creates `topic` (one partition) through the first of `brokers`; its leader's node id, once
/// there is one.
async fn one_partition_topic(brokers: &[weft_tests::Broker], topic: &str) -> u64 {
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(&format!(r#"{{"name":"{topic}","partitions":1}}"#)),
    );
    assert_eq!(status, 201, "{body}");
    wait_for("a leader", Duration::from_secs(30), || {
        let l = leader(&brokers[0], topic);
        async move { (l != 0).then_some(l) }
    })
    .await
}

/// Creates `topic` (one partition) on a three-broker cluster; the cluster, the leader's node id
/// and the index of a follower of it, ready to serve.
async fn topic_with_a_follower(topic: &str) -> (Vec<weft_tests::Broker>, u64, usize) {
    let brokers = start_cluster(3);
    let led_by = one_partition_topic(&brokers, topic).await;
    let follower = (0..brokers.len())
        .find(|i| *i as u64 + 1 != led_by)
        .expect("a follower");
    // Its replica of the new partition may still be opening (UNAVAILABLE, retry).
    brokers[follower].wait_ready();
    (brokers, led_by, follower)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_through_a_follower_keep_their_order() {
    let (brokers, led_by, follower) = topic_with_a_follower("ordered").await;
    let follower = &brokers[follower];

    const REQUESTS: u64 = 3000;
    let channel = grpc::channel(&follower.client_addr).await;
    // Every request is in the stream at once: the server takes them as fast as it can.
    let requests: Vec<PublishRequest> = (0..REQUESTS)
        .map(|i| PublishRequest {
            topic: "ordered".into(),
            target: Some(Target::Partition(0)),
            records: vec![Record {
                value: format!("v{i:05}").into_bytes().into(),
                ..Record::default()
            }],
            producer_id: 4242,
            producer_epoch: 0,
            base_sequence: i,
            request_id: i + 1,
            trace_context: Default::default(),
        })
        .collect();
    let mut responses = grpc::publisher(&channel)
        .publish_stream(futures::stream::iter(requests))
        .await
        .expect("stream")
        .into_inner();
    let mut answered = 0u64;
    while let Some(response) = responses
        .message()
        .await
        .unwrap_or_else(|status| panic!("request {} failed: {status:?}", answered + 1))
    {
        assert_eq!(
            response.request_id,
            answered + 1,
            "answers in request order"
        );
        assert_eq!(
            response.base_offset, answered,
            "stored in the order of the stream"
        );
        assert!(!response.duplicate, "{response:?}");
        answered += 1;
    }
    assert_eq!(answered, REQUESTS);
    let read = fetch_range(
        &brokers[(led_by - 1) as usize].client_addr,
        "ordered",
        0,
        0,
        REQUESTS,
    )
    .await;
    for (i, (offset, value)) in read.iter().enumerate() {
        assert_eq!(*offset, i as u64);
        assert_eq!(value.as_ref(), format!("v{i:05}").as_bytes());
    }
    assert_eq!(read.len() as u64, REQUESTS);
}

/// The follower's link to the leader breaks again and again (a TCP reset, as a restarted proxy
/// or a dropped NAT entry gives) while a plain gRPC client pipelines idempotent publishes
/// through the follower: the publishes in flight on the broken forwarding stream go again,
/// ahead of those queued behind them, so every request is answered, stored once and in order,
/// with no sequence gap. (Before, those in flight were answered UNAVAILABLE while later ones
/// went on a new stream and reached the leader first: SEQUENCE_GAP.) Needs root (iptables).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_survive_a_broken_link_to_the_leader() {
    let (brokers, led_by, follower) = topic_with_a_follower("relinked").await;
    let leader_broker = &brokers[(led_by - 1) as usize];
    let follower = &brokers[follower];
    let follower_ip = follower
        .peer_addr
        .rsplit_once(':')
        .map(|(ip, _)| ip.to_string())
        .expect("ip:port");
    let leader_peer = leader_broker.peer_addr.clone();

    // Resets the follower's connections to the leader's peer port every 100 ms, for 20 ms each
    // time, until told to stop (at most 200 times).
    let stop = Arc::new(AtomicBool::new(false));
    let breaker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut firewall = Firewall::new();
            let mut breaks = 0u32;
            while !stop.load(Ordering::SeqCst) && breaks < 200 {
                std::thread::sleep(Duration::from_millis(100));
                firewall.reset_tcp(Some(&follower_ip), &leader_peer);
                std::thread::sleep(Duration::from_millis(20));
                firewall.heal();
                breaks += 1;
            }
            breaks
        })
    };

    const REQUESTS: u64 = 10_000;
    // Producers take turns, so none has more than four of the (at most 1,024) forwarded
    // publishes in flight: a leader remembers the last five batches of each producer (as Kafka
    // does, and as many as our producer keeps in flight), so a publish sent again is answered
    // with its offsets. (Beyond that, the answer is DUPLICATE_SEQUENCE: stored, offsets
    // forgotten.)
    const PRODUCERS: u64 = 256;
    let channel = grpc::channel(&follower.client_addr).await;
    let requests: Vec<PublishRequest> = (0..REQUESTS)
        .map(|i| PublishRequest {
            topic: "relinked".into(),
            target: Some(Target::Partition(0)),
            records: vec![Record {
                value: format!("v{i:05}").into_bytes().into(),
                ..Record::default()
            }],
            producer_id: 10_000 + i % PRODUCERS,
            producer_epoch: 0,
            base_sequence: i / PRODUCERS,
            request_id: i + 1,
            trace_context: Default::default(),
        })
        .collect();
    let mut responses = grpc::publisher(&channel)
        .publish_stream(futures::stream::iter(requests))
        .await
        .expect("stream")
        .into_inner();
    let mut answered = 0u64;
    let mut duplicates = 0u64;
    // Offset of each request, by request index.
    let mut offsets = Vec::with_capacity(REQUESTS as usize);
    let outcome = loop {
        match responses.message().await {
            Ok(Some(response)) => {
                assert_eq!(response.request_id, answered + 1, "answers in order");
                assert_eq!(response.record_count, 1, "{response:?}");
                offsets.push(response.base_offset);
                duplicates += u64::from(response.duplicate);
                answered += 1;
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    stop.store(true, Ordering::SeqCst);
    let breaks = breaker.join().expect("breaker thread");
    if let Err(status) = outcome {
        panic!(
            "request {} failed after {breaks} link breaks: {status:?}",
            answered + 1
        );
    }
    assert_eq!(answered, REQUESTS);
    let resent = metric_sum(follower, "weft_forward_publishes_resent_total");
    eprintln!(
        "{breaks} link breaks, {resent} publishes sent again, {duplicates} answered as stored already"
    );
    // The breaks hit publishes in flight (else this test proved nothing), and only those can
    // be answered as stored already.
    assert!(
        resent >= 1.0,
        "{breaks} link breaks, yet no forwarded publish in flight was sent again"
    );
    assert!(
        duplicates as f64 <= resent,
        "{duplicates} answered as duplicates, only {resent} sent again"
    );
    // Each producer's publishes are stored in its order. (Across producers the order may
    // differ from the stream's where a link broke: the leader may still be taking requests of
    // the broken stream when those sent again arrive on the new one.)
    for p in 0..PRODUCERS as usize {
        let mine: Vec<u64> = offsets
            .iter()
            .skip(p)
            .step_by(PRODUCERS as usize)
            .copied()
            .collect();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "producer {p}'s publishes stored out of its order: {mine:?}"
        );
    }
    // Stored once each, at the offsets answered.
    let read = fetch_range(&leader_broker.client_addr, "relinked", 0, 0, REQUESTS).await;
    assert_eq!(read.len() as u64, REQUESTS, "every record once");
    let mut at = vec![None; REQUESTS as usize];
    for (offset, value) in &read {
        let text = std::str::from_utf8(value).expect("utf-8");
        let i: usize = text[1..].parse().expect("v<index>");
        assert!(at[i].is_none(), "{text} stored twice");
        at[i] = Some(*offset);
    }
    for (i, offset) in offsets.iter().enumerate() {
        assert_eq!(
            at[i],
            Some(*offset),
            "request {} was answered offset {offset}",
            i + 1
        );
    }
}

/// Sum of every sample of `name` (any labels) a broker exports.
fn metric_sum(broker: &weft_tests::Broker, name: &str) -> f64 {
    let (status, body) = broker.http("GET", "/metrics", None);
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_appends_of_idle_partitions_travel_together() {
    let brokers = start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"idle","partitions":24}"#),
    );
    assert_eq!(status, 201, "{body}");
    wait_for(
        "every partition to have a leader",
        Duration::from_secs(30),
        || {
            let (_, body) = brokers[0].http("GET", "/v1/topics/idle", None);
            async move { (!body.contains("\"leader_id\":0")).then_some(()) }
        },
    )
    .await;
    // Heartbeats only, for a few heartbeat intervals.
    let calls = |b: &weft_tests::Broker| metric_sum(b, "weft_raft_append_groups_per_call_count");
    let appends = |b: &weft_tests::Broker| metric_sum(b, "weft_raft_append_groups_per_call_sum");
    let before: Vec<(f64, f64)> = brokers.iter().map(|b| (calls(b), appends(b))).collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (broker, (calls_before, appends_before)) in brokers.iter().zip(before) {
        let calls = calls(broker) - calls_before;
        let appends = appends(broker) - appends_before;
        eprintln!(
            "{}: {appends} group appends in {calls} calls",
            broker.client_addr
        );
        // Each broker leads 8 groups of 24 and heartbeats each to 2 peers every 500 ms: about
        // 128 appends in 4 s, which would be 128 calls one by one.
        assert!(appends >= 32.0, "{appends} appends");
        assert!(
            appends >= 1.25 * calls,
            "{appends} appends in {calls} calls: heartbeats are not batched"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_producer_sends_each_partition_to_its_leader() {
    let brokers = start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"direct","partitions":3}"#),
    );
    assert_eq!(status, 201, "{body}");
    let leaders = partition_leaders(&brokers, "direct", 3).await;
    assert!(
        leaders.iter().any(|l| *l != 1),
        "leaders are spread, so broker 1 leads not all of them: {leaders:?}"
    );
    // The client is given broker 1 only; it learns the leaders from the cluster's metadata.
    let client = weft_client::Client::connect([brokers[0].client_addr.clone()])
        .await
        .expect("connect");
    let producer = client.producer(weft_client::ProducerConfig::default());
    let mut acks = Vec::new();
    for i in 0..300u32 {
        let record = weft_client::Record::new(format!("d{i}")).partition(i % 3);
        acks.push(
            producer
                .send_nowait("direct", record)
                .await
                .expect("queued"),
        );
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    producer.close().await.expect("close");
    for broker in &brokers {
        let forwarded =
            weft_tests::metric(broker, r#"weft_forwarded_calls_total{method="Publish"}"#)
                .unwrap_or(0.0);
        assert_eq!(
            forwarded, 0.0,
            "{}: every batch went to its partition's leader",
            broker.client_addr
        );
    }
    for partition in 0..3 {
        let bounds = weft_tests::offsets(&brokers[0].client_addr, "direct", partition, None)
            .await
            .expect("offsets");
        assert_eq!(bounds.high_watermark, 100, "partition {partition}");
    }
}

/// The leader of each of `topic`'s `partitions` partitions, once every one has one (a broker
/// knows the leaders of the partitions it hosts: each is asked).
async fn partition_leaders(
    brokers: &[weft_tests::Broker],
    topic: &str,
    partitions: usize,
) -> Vec<u64> {
    wait_for(
        "every partition to have a leader",
        Duration::from_secs(30),
        || {
            let mut leaders = vec![0u64; partitions];
            for broker in brokers {
                let (_, body) = broker.http("GET", &format!("/v1/topics/{topic}"), None);
                let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                for (i, p) in value["partition_details"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    if let Some(l) = p["leader_id"].as_u64().filter(|l| *l != 0)
                        && i < partitions
                    {
                        leaders[i] = l;
                    }
                }
            }
            async move { leaders.iter().all(|l| *l != 0).then_some(leaders) }
        },
    )
    .await
}

/// A topic of three single-replica partitions on three brokers; returns the brokers, a
/// partition the entry broker leads (`near`), one another broker leads (`far`), and the
/// indexes of the entry broker and of `far`'s leader in the list.
async fn one_replica_partitions_on_two_brokers(
    topic: &str,
) -> (Vec<weft_tests::Broker>, u32, u32, usize, usize) {
    one_replica_partitions_on_two_brokers_with(topic, &[], &[]).await
}

/// [`one_replica_partitions_on_two_brokers`] with more flags and environment variables for
/// every broker.
async fn one_replica_partitions_on_two_brokers_with(
    topic: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> (Vec<weft_tests::Broker>, u32, u32, usize, usize) {
    let brokers = weft_tests::start_cluster_env(3, extra, envs);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(&format!(
            r#"{{"name":"{topic}","partitions":3,"replication_factor":1}}"#
        )),
    );
    assert_eq!(status, 201, "{body}");
    let leaders = partition_leaders(&brokers, topic, 3).await;
    let near = 0u32;
    let far = (1..3u32)
        .find(|p| leaders[*p as usize] != leaders[0])
        .unwrap_or_else(|| panic!("leaders are spread over the brokers: {leaders:?}"));
    let entry = (leaders[near as usize] - 1) as usize;
    let frozen = (leaders[far as usize] - 1) as usize;
    for broker in &brokers {
        broker.wait_ready();
    }
    (brokers, near, far, entry, frozen)
}

/// Publishes one record per id of `ids` to `partition` (each [`one_record`]), one after the
/// other.
async fn publish_each(
    channel: &tonic::transport::Channel,
    topic: &str,
    partition: u32,
    ids: impl IntoIterator<Item = u64>,
) {
    let mut publisher = grpc::publisher(channel);
    for id in ids {
        publisher
            .publish(one_record(topic, partition, id))
            .await
            .expect("publish");
    }
}

fn one_record(topic: &str, partition: u32, request_id: u64) -> PublishRequest {
    PublishRequest {
        topic: topic.into(),
        target: Some(Target::Partition(partition)),
        records: vec![Record {
            value: format!("r{request_id}").into_bytes().into(),
            ..Record::default()
        }],
        request_id,
        ..PublishRequest::default()
    }
}

/// With `weft-answer-order: any`, a PublishStream answers each request once it is stored: the
/// answer for a partition the entry broker leads does not wait behind an earlier request for a
/// partition whose leader is frozen. Without the header the same stream keeps request order, so
/// that answer waits until the frozen broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_answer_does_not_wait_behind_another_partition_when_asked() {
    let topic = "unordered";
    let (brokers, near, far, entry, frozen) = one_replica_partitions_on_two_brokers(topic).await;
    let channel = grpc::channel(&brokers[entry].client_addr).await;
    for any_order in [true, false] {
        brokers[frozen].pause();
        let (requests, outbound) = tokio::sync::mpsc::channel(4);
        let mut call = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outbound));
        if any_order {
            call.metadata_mut().insert(
                weft_proto::ANSWER_ORDER_HEADER,
                tonic::metadata::MetadataValue::from_static("any"),
            );
        }
        requests
            .send(one_record(topic, far, 1))
            .await
            .expect("send");
        let mut answers = grpc::publisher(&channel)
            .publish_stream(call)
            .await
            .expect("stream")
            .into_inner();
        requests
            .send(one_record(topic, near, 2))
            .await
            .expect("send");
        let first = tokio::time::timeout(Duration::from_secs(3), answers.message()).await;
        if any_order {
            let answer = first
                .expect("the near partition answered while the far one's leader is frozen")
                .expect("answer")
                .expect("not ended");
            assert_eq!(answer.request_id, 2, "{answer:?}");
            assert_eq!(answer.partition, near, "{answer:?}");
        } else {
            assert!(
                first.is_err(),
                "in request order nothing is answered before the frozen partition: {first:?}"
            );
        }
        brokers[frozen].resume();
        let expected: &[u64] = if any_order { &[1] } else { &[1, 2] };
        for id in expected {
            let answer = weft_tests::within(
                "the answer once the frozen broker is back",
                Duration::from_secs(30),
                answers.message(),
            )
            .await
            .expect("answer")
            .expect("not ended");
            assert_eq!(answer.request_id, *id, "{answer:?}");
        }
    }
}

/// Our producer's publish stream asks for answers in any order and matches them by request id:
/// sent through one broker (leaders not followed), a record for a partition that broker leads is
/// acknowledged while an earlier record for a partition on a frozen broker waits, and that one
/// is acknowledged once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_producer_takes_answers_as_partitions_store_them() {
    let topic = "unordered-client";
    let (brokers, near, far, entry, frozen) = one_replica_partitions_on_two_brokers(topic).await;
    let client = weft_client::Client::connect([brokers[entry].client_addr.clone()])
        .await
        .expect("connect");
    let producer = client.producer(weft_client::ProducerConfig {
        to_leaders: false,
        ..weft_client::ProducerConfig::default()
    });
    // Opens the stream and learns the topic first.
    producer
        .send(
            "unordered-client",
            weft_client::Record::new("warm").partition(near),
        )
        .await
        .expect("stored");
    brokers[frozen].pause();
    let far_ack = producer
        .send_nowait(topic, weft_client::Record::new("far").partition(far))
        .await
        .expect("queued");
    // The far record is in the stream (the entry broker is forwarding it) before the near one.
    wait_for(
        "the far record to be forwarded",
        Duration::from_secs(10),
        || {
            let forwarded = weft_tests::metric(
                &brokers[entry],
                r#"weft_forwarded_calls_total{method="Publish"}"#,
            );
            async move { forwarded.filter(|n| *n >= 1.0) }
        },
    )
    .await;
    let near_ack = producer
        .send_nowait(topic, weft_client::Record::new("near").partition(near))
        .await
        .expect("queued");
    let near_stored = tokio::time::timeout(Duration::from_secs(5), near_ack)
        .await
        .expect("the near partition acknowledged while the far one's leader is frozen")
        .expect("stored");
    assert_eq!(near_stored.offset, 1, "{near_stored:?}");
    brokers[frozen].resume();
    let far_stored = weft_tests::within(
        "the far record's acknowledgement",
        Duration::from_secs(30),
        far_ack,
    )
    .await
    .expect("stored");
    assert_eq!(far_stored.offset, 0, "{far_stored:?}");
    producer.close().await.expect("close");
}

/// A producer's first send to a topic through a broker that has joined but not yet registered
/// (it answers UNAVAILABLE until its copy of the cluster's metadata is current) is stored once
/// the broker can answer. Before, the producer asked for the topic's metadata once and the send
/// failed at once with UNAVAILABLE, although nothing had been sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_send_through_a_broker_not_registered_yet_waits_for_it() {
    let brokers = start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"early","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    let late =
        weft_tests::add_broker_env(&brokers, &[], &[("WEFT_TEST_REGISTER_DELAY_MS", "4000")]);
    let client = weft_client::Client::connect([late.client_addr.as_str()])
        .await
        .expect("connect");
    let producer = client.producer(weft_client::ProducerConfig::default());
    let started = std::time::Instant::now();
    let stored = producer
        .send("early", weft_client::Record::new("first").partition(0))
        .await
        .expect("stored once the broker could answer");
    eprintln!(
        "stored at offset {} after {:?}",
        stored.offset,
        started.elapsed()
    );
    producer.close().await.expect("close");
    // (Read through a replica once it has applied the record.)
    let address = brokers[0].client_addr.clone();
    let read = wait_for("the record on a replica", Duration::from_secs(30), || {
        let address = address.clone();
        async move {
            weft_tests::try_fetch_range(&address, "early", 0, 0, 1)
                .await
                .ok()
                .filter(|r| r.len() == 1)
        }
    })
    .await;
    assert_eq!(&read[0].1[..], b"first");
    drop(late);
}

/// Publishes forwarded by the brokers so far (a broker that leads the partition handles its
/// publishes itself: every publish that reached another one was forwarded).
fn forwarded_so_far(brokers: &[weft_tests::Broker]) -> f64 {
    brokers
        .iter()
        .map(|b| {
            weft_tests::metric(b, r#"weft_forwarded_calls_total{method="Publish"}"#).unwrap_or(0.0)
        })
        .sum()
}

/// Our producer, given one broker's address, sends straight to the partition's leader; when
/// that leader fails (killed) it avoids the leader's address for 30 s and its publishes go
/// through the broker it was given. A leader that comes back and leads again is used again
/// before then: a refresh of the topic's leaders at least 5 s after the failure names it, the
/// producer probes it (WhoAmI) and, answered, sends to it directly. Without the probe the
/// publishes stayed forwarded for the whole 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_producer_goes_back_to_a_leader_that_returned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    // Leadership moves only when the test asks.
    std::fs::write(&config, "leader_balance_interval_ms = 0\n").expect("write the config");
    let config = config.to_str().expect("utf-8 path").to_string();
    let mut brokers =
        weft_tests::start_cluster_each(3, |_| vec!["--config".into(), config.clone()], &[]);
    let topic = "returning";
    let led_by = one_partition_topic(&brokers, topic).await;
    let returning = led_by as usize - 1;
    let entry = (returning + 1) % 3;
    brokers[entry].wait_ready();
    let client = weft_client::Client::connect([brokers[entry].client_addr.clone()])
        .await
        .expect("connect");
    let producer = client.producer(weft_client::ProducerConfig::default());
    let mut sent = 0u64;
    let mut send = async |n: u64| {
        for _ in 0..n {
            producer
                .send(
                    topic,
                    weft_client::Record::new(format!("r{sent}")).partition(0),
                )
                .await
                .unwrap_or_else(|e| panic!("send {sent}: {e}"));
            sent += 1;
        }
    };
    // Straight to the leader: nothing forwarded (the first send may go through the broker
    // given, before the producer knows the leader).
    send(5).await;
    let before = forwarded_so_far(&brokers);
    send(20).await;
    assert_eq!(
        forwarded_so_far(&brokers),
        before,
        "the producer sends to the leader, node {led_by}, directly"
    );

    brokers[returning].kill9();
    let failed = std::time::Instant::now();
    // The next sends fail over: another broker is elected and they are stored.
    send(20).await;
    brokers[returning].start_again_same_ports();
    brokers[returning].wait_ready();
    // Node led_by leads again, once it has caught up (a transfer to a replica out of sync is
    // refused: asked again).
    wait_for(
        "leadership back on the returned broker",
        Duration::from_secs(20),
        || {
            let now = leader(&brokers[entry], topic);
            let brokers = &brokers;
            async move {
                if now == led_by {
                    return Some(());
                }
                if now != 0 {
                    brokers[now as usize - 1].http(
                        "POST",
                        &format!("/v1/topics/{topic}/partitions/0/leader"),
                        Some(&format!(r#"{{"node_id":{led_by}}}"#)),
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                None
            }
        },
    )
    .await;
    // Within the 30 s the failure avoids the address for, the producer sends straight to it
    // again: a run of sends that no broker forwards.
    loop {
        let before = forwarded_so_far(&brokers);
        send(20).await;
        let after = forwarded_so_far(&brokers);
        if after == before {
            break;
        }
        assert!(
            failed.elapsed() < Duration::from_secs(28),
            "28 s after node {led_by} failed and long after it led again, the producer \
             still sends through another broker ({after} publishes forwarded)"
        );
    }
    eprintln!(
        "direct to node {led_by} again {:?} after it failed",
        failed.elapsed()
    );
    producer.close().await.expect("close");
    // Every record sent is stored once, in order.
    let read = weft_tests::fetch_range(&brokers[entry].client_addr, topic, 0, 0, sent).await;
    assert_eq!(read.len() as u64, sent);
    for (i, (offset, value)) in read.iter().enumerate() {
        assert_eq!(*offset, i as u64);
        assert_eq!(&value[..], format!("r{i}").as_bytes(), "offset {offset}");
    }
}

/// A publish larger than a peer message may be, sent to a broker that does not lead the
/// partition (which allows larger gRPC messages), is refused there as too large
/// (RESOURCE_EXHAUSTED, BATCH_TOO_LARGE), and the publishes around it through the same broker
/// are stored. Before, it was put on the ordered stream to the leader, whose encoding failed and
/// reset the stream: the publishes in flight on it got UNAVAILABLE (an unknown outcome).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_too_large_to_forward_is_refused_and_the_stream_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "grpc_message_bytes_max = 134217728\n").expect("config");
    let config = config.to_str().expect("utf-8").to_string();
    let brokers = weft_tests::start_cluster_with(2, &["--config", &config]);
    let led_by = one_partition_topic(&brokers, "large").await;
    let follower = &brokers[if led_by == 1 { 1 } else { 0 }];
    follower.wait_ready();
    let channel = grpc::channel(&follower.client_addr).await;
    let publisher = grpc::publisher(&channel)
        .max_encoding_message_size(128 * 1024 * 1024)
        .max_decoding_message_size(128 * 1024 * 1024);
    let request = |value: Vec<u8>| PublishRequest {
        topic: "large".into(),
        target: Some(Target::Partition(0)),
        records: vec![Record {
            value: value.into(),
            ..Record::default()
        }],
        ..PublishRequest::default()
    };
    let small = |i: u8| {
        let mut publisher = publisher.clone();
        let request = request(vec![i; 100]);
        async move { publisher.publish(request).await }
    };
    small(0).await.expect("stored before");
    let mut big = publisher.clone();
    let (before, refused, after) = tokio::join!(
        small(1),
        big.publish(request(vec![b'x'; 70 * 1024 * 1024])),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            small(2).await
        }
    );
    let status = refused.expect_err("too large");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        format!("{status:?}").contains("BATCH_TOO_LARGE"),
        "{status:?}"
    );
    before.expect("stored around it");
    after.expect("stored around it");
    small(3).await.expect("stored after");
    let stored = fetch_range(&follower.client_addr, "large", 0, 0, 4).await;
    assert!(
        stored.iter().all(|(_, v)| v.len() == 100),
        "the four small records"
    );
}

/// A broker with no replica of a partition forwards its calls to a live replica. Four brokers,
/// three replicas: the partition's first replica is killed, and publishes and reads through the
/// fourth broker (a plain gRPC client that retries UNAVAILABLE) go on within seconds, reaching
/// the new leader (a replica that does not lead answers with a leader hint, which the
/// forwarding broker follows). Before, that broker forwarded every call to the first replica,
/// dead, and every call failed for as long as it stayed down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_a_replica_forwards_past_a_dead_one() {
    let mut brokers = start_cluster(4);
    let (replicas, outsider, _, through, channel) =
        partition_beside_an_outsider(&brokers, "past").await;
    let mut publisher = grpc::publisher(&channel);
    let publish = |n: u64| PublishRequest {
        topic: "past".into(),
        target: Some(Target::Partition(0)),
        records: vec![Record {
            value: format!("record-{n}").into_bytes().into(),
            ..Record::default()
        }],
        producer_id: 4242,
        base_sequence: n,
        ..PublishRequest::default()
    };
    publisher
        .publish(publish(0))
        .await
        .expect("a publish through the broker without a replica");

    brokers[replicas[0] as usize - 1].kill9();
    let killed = std::time::Instant::now();
    for n in 1..=10u64 {
        loop {
            match publisher.publish(publish(n)).await {
                Ok(answer) => {
                    assert_eq!(answer.into_inner().base_offset, n, "dense offsets");
                    break;
                }
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    assert!(
                        killed.elapsed() < Duration::from_secs(30),
                        "publishes through node {outsider} still fail 30 s after node {} died: \
                         {status:?}",
                        replicas[0]
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("publish {n}: {status:?}"),
            }
        }
    }
    eprintln!(
        "publishing through node {outsider} again {:?} after node {} died",
        killed.elapsed(),
        replicas[0]
    );
    let read = fetch_range(&through, "past", 0, 0, 11).await;
    let values: Vec<String> = read
        .iter()
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect();
    let expected: Vec<String> = (0..=10).map(|n| format!("record-{n}")).collect();
    assert_eq!(values, expected);
    // Reads through a broker that has learnt nothing (restarted: no publishes went through
    // it) work at once, and keep working past the time the dead replica is passed over
    // (10 s): a replica that does not answer is replaced within the call, and reads stay with
    // the replica that served them. Before, the first read failed, and reads went back to the
    // dead first replica, and failed, each time its mark ran out.
    drop(publisher);
    drop(channel);
    let outsider_broker = &mut brokers[outsider as usize - 1];
    outsider_broker.stop();
    outsider_broker.start_again_same_ports();
    outsider_broker.wait_ready();
    let channel = grpc::channel(&through).await;
    let mut subscriber = grpc::subscriber(&channel);
    let mut high_watermark = 0;
    let reading = std::time::Instant::now();
    while reading.elapsed() < Duration::from_secs(13) {
        let answer = subscriber
            .fetch(weft_proto::v1::FetchRequest {
                topic: "past".into(),
                partition: 0,
                offset: 5,
                max_bytes: 65536,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|status| {
                panic!(
                    "a read through node {outsider} failed {:?} after the reads began: {status:?}",
                    reading.elapsed()
                )
            })
            .into_inner();
        assert_eq!(answer.records.first().map(|r| r.offset), Some(5));
        assert!(
            answer.high_watermark >= high_watermark.max(11),
            "the high watermark went from {high_watermark} to {}",
            answer.high_watermark
        );
        high_watermark = answer.high_watermark;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A subscriber reading every partition through one broker keeps getting the records of the
/// partitions that answer when another partition's only replica goes down (that one is read
/// again once it is back). Before, the forwarded read of the dead partition failed the whole
/// stream, and every reconnect failed the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_keeps_reading_what_answers_when_a_partition_goes_down() {
    let topic = "survivors";
    let (mut brokers, near, far, entry, frozen) =
        one_replica_partitions_on_two_brokers(topic).await;
    let channel = grpc::channel(&brokers[entry].client_addr).await;
    let mut publisher = grpc::publisher(&channel);
    for (partition, id) in [(near, 1), (far, 2)] {
        publisher
            .publish(one_record(topic, partition, id))
            .await
            .expect("publish");
    }
    let client = brokers[entry].client().await;
    let mut consumer = client
        .consumer(weft_client::ConsumerConfig {
            reconnects_max: 0,
            ..weft_client::ConsumerConfig::new(topic).start(weft_client::StartFrom::Earliest)
        })
        .await
        .expect("consumer");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let message = consumer
            .next_timeout(Duration::from_secs(20))
            .await
            .expect("next")
            .expect("a record within 20 s");
        seen.push(message.partition);
    }
    seen.sort_unstable();
    let mut both = vec![near, far];
    both.sort_unstable();
    assert_eq!(seen, both);

    brokers[frozen].kill9();
    publisher
        .publish(one_record(topic, near, 3))
        .await
        .expect("publish");
    let message = consumer
        .next_timeout(Duration::from_secs(20))
        .await
        .expect("the stream goes on with the partitions that answer")
        .expect("a record within 20 s");
    assert_eq!((message.partition, &message.value[..]), (near, &b"r3"[..]));
}

/// A subscriber that connects while a partition's only replica is down reads the partitions
/// that answer, and gets the down one's records once its broker is back (a new Assignment of
/// the same generation adds it). Before, the stream failed at its assignment, as it did at
/// every reconnect while the broker was down: the subscriber read nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_starts_without_a_partition_that_is_down_and_takes_it_once_back() {
    let topic = "latecomer";
    let (mut brokers, near, far, entry, frozen) =
        one_replica_partitions_on_two_brokers(topic).await;
    let channel = grpc::channel(&brokers[entry].client_addr).await;
    let mut publisher = grpc::publisher(&channel);
    publisher
        .publish(one_record(topic, far, 1))
        .await
        .expect("publish");
    brokers[frozen].kill9();
    publisher
        .publish(one_record(topic, near, 2))
        .await
        .expect("publish");
    let client = brokers[entry].client().await;
    let mut consumer = client
        .consumer(weft_client::ConsumerConfig {
            reconnects_max: 0,
            ..weft_client::ConsumerConfig::new(topic).start(weft_client::StartFrom::Earliest)
        })
        .await
        .expect("the stream opens while a partition is down");
    let message = consumer
        .next_timeout(Duration::from_secs(20))
        .await
        .expect("the stream starts with the partitions that answer")
        .expect("a record within 20 s");
    assert_eq!((message.partition, &message.value[..]), (near, &b"r2"[..]));
    brokers[frozen].start_again_same_ports();
    brokers[frozen].wait_ready();
    let message = consumer
        .next_timeout(Duration::from_secs(30))
        .await
        .expect("the stream takes the partition once it is back")
        .expect("a record within 30 s");
    assert_eq!((message.partition, &message.value[..]), (far, &b"r1"[..]));
}

/// A plain consumer (no group) whose stream reopens while the only replica of its partition is
/// down keeps its position there: the broker leaves the partition out of the assignment, and
/// the consumer names its position again at every later stream. Before, the position was
/// dropped with the assignment that left the partition out, the next stream started at
/// "latest", and what was published there before the broker went down was never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_consumer_keeps_its_place_in_a_partition_down_across_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "stream_age_ms_max = 1000\n").expect("write the config");
    let config = config.to_str().expect("utf-8 path");
    let topic = "keeps-its-place";
    let (mut brokers, _near, far, entry, frozen) =
        one_replica_partitions_on_two_brokers_with(topic, &["--config", config], &[]).await;
    let channel = grpc::channel(&brokers[entry].client_addr).await;
    let client = brokers[entry].client().await;
    let mut consumer = client
        .consumer(weft_client::ConsumerConfig {
            credit_records: 1,
            ..weft_client::ConsumerConfig::new(topic).partitions(vec![far])
        })
        .await
        .expect("the consumer starts");
    publish_each(&channel, topic, far, [1]).await;
    let first = consumer
        .next_timeout(Duration::from_secs(20))
        .await
        .expect("a record")
        .expect("r1 within 20 s");
    assert_eq!((first.offset, &first.value[..]), (0, &b"r1"[..]));
    publish_each(&channel, topic, far, 2..=3).await;
    brokers[frozen].kill9();
    // Streams end every second meanwhile, each opened again without the partition (r2 may
    // have come before the broker went down).
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until {
        if let Ok(Some(m)) = consumer.next_timeout(Duration::from_millis(500)).await {
            seen.push((m.offset, String::from_utf8_lossy(&m.value).to_string()));
        }
    }
    brokers[frozen].start_again_same_ports();
    brokers[frozen].wait_ready();
    let until = tokio::time::Instant::now() + Duration::from_secs(40);
    while seen.len() < 2 && tokio::time::Instant::now() < until {
        if let Ok(Some(m)) = consumer.next_timeout(Duration::from_secs(1)).await {
            seen.push((m.offset, String::from_utf8_lossy(&m.value).to_string()));
        }
    }
    assert_eq!(
        seen,
        [(1, "r2".to_string()), (2, "r3".to_string())],
        "what was published before the broker went down comes once back"
    );
}

/// A group member that opens its stream with resume offsets while a partition's only replica
/// is down: the partition is left out of the first assignment, and once back it starts where
/// the member said it resumes, not at the group's commit. Before, the resume offsets were
/// dropped after the first assignment, also those of the partitions it left out, and the
/// member was given again the records it had processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_placed_late_starts_where_the_member_resumes() {
    use weft_proto::v1::{PartitionOffset, subscribe_response};
    let topic = "late-resume";
    let (mut brokers, near, far, entry, frozen) =
        one_replica_partitions_on_two_brokers(topic).await;
    let channel = grpc::channel(&brokers[entry].client_addr).await;
    publish_each(&channel, topic, far, 1..=3).await;
    brokers[frozen].kill9();
    // The member processed the first two records of `far` on an earlier stream.
    let resume = vec![PartitionOffset {
        partition: far,
        offset: 2,
    }];
    let (tx, mut stream) = group_stream(&channel, topic, "late-resume-group", "", resume).await;
    let mut restarted = false;
    let started_at = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let event = stream
                .message()
                .await
                .expect("the stream goes on")
                .expect("the stream stays open")
                .event;
            match event {
                Some(subscribe_response::Event::Assignment(a)) => {
                    let far_at = a.partitions.iter().find(|p| p.partition == far);
                    match far_at {
                        None => {
                            assert!(
                                a.partitions.iter().any(|p| p.partition == near),
                                "the partitions that answer are assigned: {a:?}"
                            );
                            if !restarted {
                                brokers[frozen].start_again_same_ports();
                                restarted = true;
                            }
                        }
                        Some(p) => return p.offset,
                    }
                }
                Some(subscribe_response::Event::Delivery(d)) => assert_ne!(
                    d.partition, far,
                    "a delivery of the far partition before its assignment"
                ),
                _ => {}
            }
        }
    })
    .await
    .expect("the far partition is assigned within 60 s");
    assert!(restarted, "the far partition was left out at first");
    assert_eq!(
        started_at, 2,
        "the far partition starts where the member resumes"
    );
    drop(tx);
}

/// A resume offset kept for a partition left out of the first assignment does not win once
/// another member held the partition in between: member M's session takes the group's
/// changes 8 s late (a test hook: a session busy when its group rebalanced twice), meanwhile
/// member N is given the partition, reads it, commits 3 and leaves; M is given it back at the
/// commit, not at its older resume offset 2. Before (42589a8), the resume offset won again and
/// M was given again what N had read (helper-110).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_offset_does_not_win_over_a_commit_made_in_between() {
    use weft_proto::v1::{PartitionOffset, subscribe_response};
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "stream_heartbeat_ms = 200\n").expect("write the config");
    let config = config.to_str().expect("utf-8 path");
    let topic = "resume-then-commit";
    let (mut brokers, _near, far, entry, frozen) = one_replica_partitions_on_two_brokers_with(
        topic,
        &["--config", config],
        &[("WEFT_TEST_GROUP_CHANGE_DELAY_MS", "8000")],
    )
    .await;
    let channel = grpc::channel(&brokers[entry].client_addr).await;
    publish_each(&channel, topic, far, 1..=3).await;
    brokers[frozen].kill9();
    let group = "resume-then-commit-group";
    // Partitions go round the members sorted by id: with 3 partitions and two members, the
    // second takes partition 1 and the first partition 2. N is the one given `far`.
    let (m, n) = if far == 1 {
        ("m-m", "m-z")
    } else {
        ("m-m", "m-a")
    };
    let resume = vec![PartitionOffset {
        partition: far,
        offset: 2,
    }];
    let (_m_tx, mut m_stream) = group_stream(&channel, topic, group, m, resume).await;
    let first = next_assignment(&mut m_stream).await;
    assert!(
        first.partitions.iter().all(|p| p.partition != far),
        "{first:?}"
    );
    let (n_tx, mut n_stream) = group_stream(&channel, topic, group, n, Vec::new()).await;
    let assigned = next_assignment(&mut n_stream).await;
    assert!(
        assigned.partitions.iter().all(|p| p.partition != far),
        "far is down: {assigned:?}"
    );
    brokers[frozen].start_again_same_ports();
    // N reads the partition once it is back, and commits its end.
    let generation = tokio::time::timeout(Duration::from_secs(30), async {
        let mut read = 0;
        loop {
            match n_stream
                .message()
                .await
                .expect("n's stream goes on")
                .expect("n's stream stays open")
                .event
            {
                Some(subscribe_response::Event::Delivery(d)) if d.partition == far => {
                    read += d.records.len();
                    if read == 3 {
                        return assigned.generation;
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .expect("n reads the partition within 30 s");
    stream_commit(&n_tx, generation, far, 3).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(subscribe_response::Event::CommitAck(ack)) = n_stream
                .message()
                .await
                .expect("n's stream goes on")
                .expect("n's stream stays open")
                .event
            {
                assert_eq!(ack.offsets.len(), 1, "{ack:?}");
                return;
            }
        }
    })
    .await
    .expect("n's commit is acknowledged within 10 s");
    drop(n_tx);
    drop(n_stream);
    // M's session takes the group's changes late: the partition comes back to it.
    let placed_at = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let a = next_assignment(&mut m_stream).await;
            if let Some(p) = a.partitions.iter().find(|p| p.partition == far) {
                return p.offset;
            }
        }
    })
    .await
    .expect("far is given back to m within 60 s");
    assert_eq!(placed_at, 3, "m starts far at the group's commit");
}

/// Commits `offset` of `partition` over a Subscribe stream, as of `generation`.
async fn stream_commit(
    tx: &tokio::sync::mpsc::Sender<weft_proto::v1::SubscribeRequest>,
    generation: u64,
    partition: u32,
    offset: u64,
) {
    use weft_proto::v1::{PartitionOffset, StreamCommit, SubscribeRequest, subscribe_request};
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Commit(StreamCommit {
            generation,
            offsets: vec![PartitionOffset { partition, offset }],
        })),
    })
    .await
    .expect("queue the commit");
}

/// The next Assignment on a Subscribe stream (within 30 s).
async fn next_assignment(
    stream: &mut tonic::Streaming<weft_proto::v1::SubscribeResponse>,
) -> weft_proto::v1::Assignment {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(weft_proto::v1::subscribe_response::Event::Assignment(a)) = stream
                .message()
                .await
                .expect("the stream goes on")
                .expect("the stream stays open")
                .event
            {
                return a;
            }
        }
    })
    .await
    .expect("an assignment within 30 s")
}

/// A group member's Subscribe stream (raw gRPC) on `topic`, from the earliest offsets or
/// `resume`, as `member` (empty: the broker names it): the sender of its requests (its start
/// already sent) and the server's messages.
async fn group_stream(
    channel: &tonic::transport::Channel,
    topic: &str,
    group: &str,
    member: &str,
    resume: Vec<weft_proto::v1::PartitionOffset>,
) -> (
    tokio::sync::mpsc::Sender<weft_proto::v1::SubscribeRequest>,
    tonic::Streaming<weft_proto::v1::SubscribeResponse>,
) {
    use weft_proto::v1::{
        StartPosition, SubscribeRequest, SubscribeStart, start_position, subscribe_request,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Start(SubscribeStart {
            topic: topic.into(),
            group_id: group.into(),
            member_id: member.into(),
            start: Some(StartPosition {
                position: Some(start_position::Position::Earliest(
                    start_position::Earliest {},
                )),
            }),
            resume,
            credit: Some(weft_proto::v1::Credit {
                records: 1000,
                bytes: 1 << 20,
            }),
            // (It sends no heartbeats.)
            session_timeout_ms: 120_000,
            ..SubscribeStart::default()
        })),
    })
    .await
    .expect("queue the start");
    let stream = grpc::subscriber(channel)
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("the stream opens")
        .into_inner();
    (tx, stream)
}

/// A member commits over its stream an offset of a partition its group gave it but that the
/// broker left out of its assignment (its only replica down): the offset is checked against
/// the partition's high watermark, as every other commit is, and not stored when it cannot be.
/// Before, only partitions the stream was reading were checked: an offset past the end of the
/// log was stored, every later commit of the partition was refused as going backwards, and
/// each new owner started past the end (helper-109).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_commit_of_a_partition_left_out_is_checked() {
    use weft_proto::v1::subscribe_response;
    let topic = "left-out-commit";
    let (mut brokers, near, far, entry, frozen) =
        one_replica_partitions_on_two_brokers(topic).await;
    brokers[frozen].kill9();
    let channel = grpc::channel(&brokers[entry].client_addr).await;
    let (tx, mut stream) = group_stream(&channel, topic, "left-out-group", "", Vec::new()).await;
    let a = next_assignment(&mut stream).await;
    let placed: Vec<u32> = a.partitions.iter().map(|p| p.partition).collect();
    assert!(placed.contains(&near), "{a:?}");
    assert!(!placed.contains(&far), "{a:?}");
    stream_commit(&tx, a.generation, far, 1_000_000).await;
    let answer = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.message().await {
                Err(status) => return Err(status),
                Ok(None) => panic!("the stream ended with no answer"),
                Ok(Some(m)) => {
                    if let Some(subscribe_response::Event::CommitAck(ack)) = m.event {
                        return Ok(ack);
                    }
                }
            }
        }
    })
    .await
    .expect("an answer within 30 s");
    // The partition's high watermark cannot be read (its replica is down): the commit is
    // refused as UNAVAILABLE (the member commits again once it reads the partition).
    match answer {
        Ok(ack) => panic!("the commit was answered: {ack:?}"),
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
    }
}

/// A replica learns of commits after its leader. A follower cut off from its leader's appends
/// (the other follower keeps the partition committing) is asked for an offset the leader has
/// committed and it has not: a Fetch there answers UNAVAILABLE with the leader (ask again),
/// and a commit of that offset, checked by the group coordinator's follower replica, is taken
/// (the coordinator asks the leader). Before, the Fetch answered OUT_OF_RANGE and the commit
/// was refused as INVALID_ARGUMENT after 2 s: final errors for a consumer that read from the
/// leader and then reached another broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_its_leader_never_calls_a_committed_offset_out_of_range() {
    let brokers = start_cluster(3);
    let topic = "behind";
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(&format!(
            r#"{{"name":"{topic}","partitions":3,"replication_factor":3}}"#
        )),
    );
    assert_eq!(status, 201, "{body}");
    let leaders = partition_leaders(&brokers, topic, 3).await;
    let client = brokers[0].client().await;
    let coordinator = wait_for("a controller leader", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let status = client.admin().cluster_status().await.ok()?;
            (status.controller_id != 0).then_some(status.controller_id)
        }
    })
    .await;
    // A partition the coordinator follows.
    let partition = (0..3u32)
        .find(|p| leaders[*p as usize] != coordinator)
        .expect("a partition another broker leads");
    let leader = &brokers[(leaders[partition as usize] - 1) as usize];
    let follower = &brokers[(coordinator - 1) as usize];
    for broker in &brokers {
        broker.wait_ready();
    }
    let ip = |address: &str| {
        address
            .rsplit_once(':')
            .map_or(address.to_string(), |(ip, _)| ip.to_string())
    };
    let mut firewall = Firewall::new();
    firewall.drop_tcp(Some(&ip(&leader.peer_addr)), &follower.peer_addr);
    let channel = grpc::channel(&leader.client_addr).await;
    let mut publisher = grpc::publisher(&channel);
    for id in 1..=10 {
        publisher
            .publish(one_record(topic, partition, id))
            .await
            .expect("publish through the leader");
    }
    let end = fetch_range(&leader.client_addr, topic, partition, 0, 10)
        .await
        .len() as u64;
    assert_eq!(end, 10);

    let fetch = grpc::subscriber(&grpc::channel(&follower.client_addr).await)
        .fetch(weft_proto::v1::FetchRequest {
            topic: topic.into(),
            partition,
            offset: end,
            max_bytes: 1 << 20,
            max_wait_ms: 0,
            ..Default::default()
        })
        .await;
    let status = fetch.expect_err("the follower has not committed offset 10");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    client
        .admin()
        .commit_offsets("behind-group", topic, &[(partition, end)])
        .await
        .expect("a commit of what the leader committed");
    firewall.heal();
}

/// A subscriber reading through a broker that holds some of its partitions and not others:
/// commits of the local partition wake its session, but the partitions held elsewhere, with
/// nothing new, are not asked again for each of them (one long poll each stays open across
/// the session's rounds). Before, each local commit sent a new read and a new long poll per
/// such partition to the brokers holding them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_commits_do_not_multiply_reads_of_partitions_held_elsewhere() {
    let topic = "quiet-elsewhere";
    let (brokers, near, far, entry, _frozen) = one_replica_partitions_on_two_brokers(topic).await;
    let channel = grpc::channel(&brokers[entry].client_addr).await;
    let mut publisher = grpc::publisher(&channel);
    publisher
        .publish(one_record(topic, far, 1))
        .await
        .expect("publish");
    let client = brokers[entry].client().await;
    let mut consumer = client
        .consumer(
            weft_client::ConsumerConfig::new(topic)
                .partitions(vec![near, far])
                .start(weft_client::StartFrom::Earliest),
        )
        .await
        .expect("consumer");
    let first = consumer
        .next_timeout(Duration::from_secs(20))
        .await
        .expect("next")
        .expect("the record of the far partition");
    assert_eq!(first.partition, far);
    let forwarded = || {
        weft_tests::metric(
            &brokers[entry],
            r#"weft_forwarded_calls_total{method="Fetch"}"#,
        )
        .unwrap_or(0.0)
    };
    let before = forwarded();
    let publishes = 300u64;
    for id in 0..publishes {
        publisher
            .publish(one_record(topic, near, 100 + id))
            .await
            .expect("publish");
    }
    let mut read = 0;
    while read < publishes {
        let message = consumer
            .next_timeout(Duration::from_secs(20))
            .await
            .expect("next")
            .expect("a record of the near partition");
        assert_eq!(message.partition, near);
        read += 1;
    }
    let calls = forwarded() - before;
    // A long poll per heartbeat interval at most, whatever the number of local commits.
    assert!(
        calls < 20.0,
        "{calls} forwarded Fetch calls for {publishes} commits of the local partition"
    );
}

/// A partition held elsewhere gets its turn while a local partition keeps a backlog: its long
/// poll is watched whatever the session does. Before, the poll was watched only when a round
/// had delivered nothing, so a record on the partition held elsewhere waited until the local
/// backlog was drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_held_elsewhere_gets_its_turn_beside_a_local_backlog() {
    let topic = "turns";
    let (brokers, near, far, entry, _frozen) = one_replica_partitions_on_two_brokers(topic).await;
    let channel = grpc::channel(&brokers[entry].client_addr).await;
    let mut publisher = grpc::publisher(&channel);
    publisher
        .publish(one_record(topic, far, 1))
        .await
        .expect("publish");
    let client = brokers[entry].client().await;
    let mut consumer = client
        .consumer(weft_client::ConsumerConfig {
            credit_records: 100,
            ..weft_client::ConsumerConfig::new(topic)
                .partitions(vec![near, far])
                .start(weft_client::StartFrom::Earliest)
        })
        .await
        .expect("consumer");
    let first = consumer
        .next_timeout(Duration::from_secs(20))
        .await
        .expect("next")
        .expect("the record of the far partition");
    assert_eq!(first.partition, far);
    // A backlog on the local partition, then one more record on the far one.
    let backlog = 20_000u64;
    for batch in 0..backlog / 500 {
        let mut request = one_record(topic, near, 1_000 + batch);
        request.records = (0..500)
            .map(|i| Record {
                value: format!("n{batch}-{i}").into_bytes().into(),
                ..Record::default()
            })
            .collect();
        publisher.publish(request).await.expect("publish");
    }
    publisher
        .publish(one_record(topic, far, 2))
        .await
        .expect("publish");
    let mut near_read = 0u64;
    loop {
        let message = consumer
            .next_timeout(Duration::from_secs(20))
            .await
            .expect("next")
            .expect("a record");
        if message.partition == far {
            break;
        }
        near_read += 1;
        assert!(
            near_read < backlog,
            "the far partition's record waited behind the whole local backlog"
        );
        // A consumer slower than the broker: the backlog stays.
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    assert!(
        near_read < backlog / 4,
        "the far partition's record came after {near_read} of the {backlog} local ones"
    );
}

/// A long poll that a broker with no replica forwards is one wait in all, however many replicas
/// it asks, and a replica that does not answer in time is passed over. Four brokers, three
/// replicas: the leader, which the forwarding broker asks first (it learnt it from a publish),
/// is paused; the Fetch at the log's end with a 12 s wait goes to it, is given up after
/// `request_timeout_ms` (2 s) plus the wait, and another replica is asked for what is left of
/// the wait: nothing. Before, a replica that timed out was not passed over (the Fetch failed
/// with DEADLINE_EXCEEDED, and so did every read after it while the leader stayed paused), and
/// every replica asked after one that failed waited the whole 12 s again (26 s in all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_long_poll_waits_once_across_the_replicas_it_asks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "request_timeout_ms = 2000\n").expect("write the config");
    let config = config.to_str().expect("utf-8 path").to_string();
    let brokers =
        weft_tests::start_cluster_each(4, |_| vec!["--config".into(), config.clone()], &[]);
    let (_, _, leader_id, through, channel) = partition_beside_an_outsider(&brokers, "poll").await;
    // A publish through the outsider: it learns the leader, and asks it first from now on.
    grpc::publisher(&channel)
        .publish(PublishRequest {
            topic: "poll".into(),
            target: Some(Target::Partition(0)),
            records: vec![Record {
                value: b"r0".to_vec().into(),
                ..Record::default()
            }],
            ..PublishRequest::default()
        })
        .await
        .expect("a publish through the broker without a replica");
    assert_eq!(fetch_range(&through, "poll", 0, 0, 1).await.len(), 1);

    let leader = &brokers[leader_id as usize - 1];
    leader.pause();
    let began = std::time::Instant::now();
    let answer = grpc::subscriber(&channel)
        .fetch(weft_proto::v1::FetchRequest {
            topic: "poll".into(),
            partition: 0,
            offset: 1,
            max_bytes: 65536,
            max_wait_ms: 12_000,
            min_bytes: 1,
            ..Default::default()
        })
        .await;
    let took = began.elapsed();
    leader.resume();
    let answer = answer.expect("an answer from a replica that is not paused");
    assert!(answer.get_ref().records.is_empty(), "{answer:?}");
    // 2 s + 12 s for the paused leader, then nothing left to wait; a few seconds of slack.
    assert!(
        took < Duration::from_secs(20),
        "the forwarded long poll took {took:?}"
    );
    eprintln!("the forwarded long poll answered after {took:?}");
}

/// Publishes that a broker with no replica forwards go past a leader that stopped answering
/// (paused) once the other replicas elected another. Four brokers, three replicas: the leader,
/// which the forwarding broker learnt from a publish, is paused; an idempotent producer keeps
/// publishing through the fourth broker, each call with a 3 s deadline, and is stored again
/// within 20 s of the new leader's election. Before, the forwarding broker kept sending every
/// publish to the paused leader (a call that ran out of time taught it nothing), and every call
/// failed with DEADLINE_EXCEEDED for as long as the leader stayed paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_publishes_go_past_a_leader_that_stopped_answering() {
    let brokers = start_cluster(4);
    let (replicas, outsider, paused_id, _, channel) =
        partition_beside_an_outsider(&brokers, "frozen").await;
    let mut publisher = grpc::publisher(&channel);
    let publish = |n: u64| {
        let mut request = tonic::Request::new(PublishRequest {
            topic: "frozen".into(),
            target: Some(Target::Partition(0)),
            records: vec![Record {
                value: format!("record-{n}").into_bytes().into(),
                ..Record::default()
            }],
            producer_id: 5151,
            base_sequence: n,
            ..PublishRequest::default()
        });
        request.set_timeout(Duration::from_secs(3));
        request
    };
    publisher
        .publish(publish(0))
        .await
        .expect("a publish through the broker without a replica");

    let paused = &brokers[paused_id as usize - 1];
    paused.pause();
    let other = brokers
        .iter()
        .enumerate()
        .find(|(i, _)| replicas.contains(&(*i as u64 + 1)) && *i as u64 + 1 != paused_id)
        .map(|(_, b)| b)
        .expect("another replica");
    wait_for("a new leader", Duration::from_secs(30), || {
        let l = leader(other, "frozen");
        async move { (l != 0 && l != paused_id).then_some(l) }
    })
    .await;
    let elected = std::time::Instant::now();
    let mut stored = None;
    let mut last_error = None;
    while elected.elapsed() < Duration::from_secs(20) {
        match publisher.publish(publish(1)).await {
            Ok(answer) => {
                stored = Some(answer.into_inner().base_offset);
                break;
            }
            Err(status) => {
                last_error = Some(status);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let took = elected.elapsed();
    paused.resume();
    assert_eq!(
        stored,
        Some(1),
        "no publish through node {outsider} stored within {took:?} of the new leader's \
         election (node {paused_id} paused): last error {last_error:?}"
    );
    eprintln!(
        "a publish through node {outsider} was stored {took:?} after the new leader's election"
    );
}

/// A broker with no replica passes over a replica that does not answer a forwarded read within
/// its caller's deadline, with the default `request_timeout_ms` (30 s). Four brokers, three
/// replicas: the leader, which the forwarding broker asks first, is paused; Fetches with a 3 s
/// wait and a 6 s deadline go through the fourth broker: by the second, one is answered.
/// Before, the forwarding broker waited 33 s for the paused leader, its caller went away at 6
/// s, it learnt nothing, and every Fetch went to the paused leader again and failed
/// (helper-125).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_read_passes_over_a_replica_silent_past_its_callers_deadline() {
    let brokers = start_cluster(4);
    let (_, outsider, leader_id, _, channel) =
        partition_beside_an_outsider(&brokers, "silent").await;
    grpc::publisher(&channel)
        .publish(PublishRequest {
            topic: "silent".into(),
            target: Some(Target::Partition(0)),
            records: vec![Record {
                value: b"r0".to_vec().into(),
                ..Record::default()
            }],
            ..PublishRequest::default()
        })
        .await
        .expect("a publish through the broker without a replica");
    let leader = &brokers[leader_id as usize - 1];
    leader.pause();
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let mut fetch = tonic::Request::new(weft_proto::v1::FetchRequest {
            topic: "silent".into(),
            partition: 0,
            offset: 0,
            max_bytes: 65536,
            max_wait_ms: 3000,
            min_bytes: 1,
            ..Default::default()
        });
        fetch.set_timeout(Duration::from_secs(6));
        let outcome = grpc::subscriber(&channel).fetch(fetch).await;
        let read = outcome
            .as_ref()
            .is_ok_and(|a| a.get_ref().records.len() == 1);
        outcomes.push(outcome.map(|a| a.into_inner().records.len()));
        if read {
            break;
        }
    }
    leader.resume();
    assert!(
        outcomes
            .last()
            .is_some_and(|o| o.as_ref().is_ok_and(|n| *n == 1)),
        "reads through node {outsider} with node {leader_id} paused: {outcomes:?}"
    );
}

/// Creates `topic` (one partition, three replicas) through the first of four `brokers`, and
/// waits for its leader: its replicas, the broker that holds none (the outsider), the leader,
/// and the outsider's client address and a channel to it.
async fn partition_beside_an_outsider(
    brokers: &[weft_tests::Broker],
    topic: &str,
) -> (Vec<u64>, u64, u64, String, tonic::transport::Channel) {
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(&format!(
            r#"{{"name":"{topic}","partitions":1,"replication_factor":3}}"#
        )),
    );
    assert_eq!(status, 201, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    let replicas: Vec<u64> = view["partition_details"][0]["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    assert_eq!(replicas.len(), 3, "{body}");
    let outsider = (1..=4u64)
        .find(|id| !replicas.contains(id))
        .expect("a broker without a replica");
    let replica = &brokers[replicas[0] as usize - 1];
    let leader_id = wait_for("a leader", Duration::from_secs(30), || {
        let l = leader(replica, topic);
        async move { (l != 0).then_some(l) }
    })
    .await;
    let through = brokers[outsider as usize - 1].client_addr.clone();
    let channel = grpc::channel(&through).await;
    (replicas, outsider, leader_id, through, channel)
}
