//! Streams: PublishStream answers in order (or as stored, when asked) and names a failing
//! request; Subscribe streams are rotated by the server after
//! `stream_age_ms_max` and the consumer resumes with no record lost or repeated; Fetch long-polls.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use weft_client::{ConsumerConfig, ProducerConfig, Record, StartFrom};
use weft_proto::v1::publish_request::Target;
use weft_proto::v1::publisher_client::PublisherClient;
use weft_proto::v1::subscriber_client::SubscriberClient;
use weft_proto::v1::{FetchRequest, PublishRequest};
use weft_tests::Broker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_stream_answers_every_request_in_order() {
    let broker = Broker::start();
    broker
        .client()
        .await
        .admin()
        .create_topic("piped", 1)
        .await
        .expect("create");
    let mut publisher = PublisherClient::connect(format!("http://{}", broker.client_addr))
        .await
        .expect("connect");
    let requests: Vec<PublishRequest> = (0..50u64)
        .map(|i| PublishRequest {
            topic: "piped".into(),
            target: Some(Target::Partition(0)),
            records: (0..10)
                .map(|j| weft_proto::v1::Record {
                    value: format!("{i}-{j}").into(),
                    ..Default::default()
                })
                .collect(),
            producer_id: 99,
            producer_epoch: 0,
            base_sequence: i * 10,
            request_id: i,
            trace_context: Default::default(),
        })
        .collect();
    let mut responses = publisher
        .publish_stream(futures::stream::iter(requests))
        .await
        .expect("stream")
        .into_inner();
    let mut i = 0u64;
    while let Some(response) = responses.message().await.expect("response") {
        assert_eq!(response.request_id, i, "answers come in request order");
        assert_eq!(response.base_offset, i * 10);
        assert_eq!(response.record_count, 10);
        i += 1;
    }
    assert_eq!(i, 50);

    // The first failure ends the stream with its status, naming its request in a trailer.
    let bad = || {
        vec![
            PublishRequest {
                topic: "piped".into(),
                target: Some(Target::Partition(0)),
                records: vec![Default::default()],
                request_id: 7,
                ..Default::default()
            },
            PublishRequest {
                topic: "missing".into(),
                records: vec![Default::default()],
                request_id: 8,
                ..Default::default()
            },
        ]
    };
    let named = |error: &tonic::Status| {
        error
            .metadata()
            .get(weft_proto::REQUEST_ID_TRAILER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut responses = publisher
        .publish_stream(futures::stream::iter(bad()))
        .await
        .expect("stream")
        .into_inner();
    let first = responses.message().await.expect("first answered");
    assert_eq!(first.map(|r| r.request_id), Some(7));
    let error = responses.message().await.expect_err("second fails");
    assert_eq!(error.code(), tonic::Code::NotFound);
    assert_eq!(named(&error).as_deref(), Some("8"), "{error:?}");

    // Answered as stored (`weft-answer-order: any`): the failure still ends the stream and
    // names its request; an answer before it is the other request's.
    let mut call = tonic::Request::new(futures::stream::iter(bad()));
    call.metadata_mut().insert(
        weft_proto::ANSWER_ORDER_HEADER,
        tonic::metadata::MetadataValue::from_static("any"),
    );
    let mut responses = publisher
        .publish_stream(call)
        .await
        .expect("stream")
        .into_inner();
    let error = loop {
        match responses.message().await {
            Ok(Some(answer)) => assert_eq!(answer.request_id, 7, "{answer:?}"),
            Ok(None) => panic!("the stream ended without the failure"),
            Err(error) => break error,
        }
    };
    assert_eq!(error.code(), tonic::Code::NotFound);
    assert_eq!(named(&error).as_deref(), Some("8"), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_survive_server_side_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(
        &config,
        "stream_age_ms_max = 1000\nstream_heartbeat_ms = 100\n",
    )
    .expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("utf-8")]);
    let client = broker.client().await;
    client
        .admin()
        .create_topic("rotating", 2)
        .await
        .expect("create");
    let mut consumer = client
        .consumer(ConsumerConfig::new("rotating").start(StartFrom::Earliest))
        .await
        .expect("subscribe");

    // The producer goes on (20 records every 100 ms, at most 600 rounds) until the consumer's
    // stream has been rotated and reopened at least twice: rotations happen during delivery,
    // however slow the machine.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let producer = {
        let (client, stop, sent) = (client.clone(), stop.clone(), sent.clone());
        tokio::spawn(async move {
            let producer = client.producer(ProducerConfig::default());
            for round in 0..600u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                for i in 0..20 {
                    producer
                        .send(
                            "rotating",
                            Record::new(format!("{}", round * 20 + i)).key(format!("k{i}")),
                        )
                        .await
                        .expect("stored");
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            producer.close().await.expect("close");
        })
    };
    let subscribes = || {
        let (_, metrics) = broker.http("GET", "/metrics", None);
        metrics
            .lines()
            .find(|l| l.starts_with("weft_rpc_requests_total{method=\"Subscribe\",code=\"Ok\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut seen: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut values = std::collections::HashSet::new();
    let mut producer = Some(producer);
    loop {
        if producer
            .as_ref()
            .is_some_and(|p| stop.load(Ordering::Relaxed) || p.is_finished())
        {
            // Stopped (within a round) or done: from now on `sent` is final.
            producer.take().expect("producer").await.expect("producer");
        }
        if producer.is_none() && values.len() as u64 == sent.load(Ordering::Relaxed) {
            break;
        }
        let m = consumer
            .next_timeout(Duration::from_secs(30))
            .await
            .expect("next")
            .unwrap_or_else(|| {
                panic!(
                    "{} of {} records, then nothing for 30 s",
                    values.len(),
                    sent.load(Ordering::Relaxed)
                )
            });
        assert!(
            values.insert(String::from_utf8_lossy(&m.value).into_owned()),
            "record delivered twice"
        );
        seen.entry(m.partition).or_default().push(m.offset);
        if values.len() % 20 == 0 && !stop.load(Ordering::Relaxed) && subscribes() >= 3 {
            stop.store(true, Ordering::Relaxed);
        }
    }
    assert!(
        stop.load(Ordering::Relaxed),
        "the stream was rotated and reopened twice within 600 rounds ({} subscribes)",
        subscribes()
    );
    for (partition, offsets) in &seen {
        assert_eq!(
            offsets,
            &(0..offsets.len() as u64).collect::<Vec<_>>(),
            "partition {partition}: in order, none skipped"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_long_polls_until_data_or_deadline() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("polled", 1)
        .await
        .expect("create");
    let mut subscriber = SubscriberClient::connect(format!("http://{}", broker.client_addr))
        .await
        .expect("connect");
    let request = |offset, wait| FetchRequest {
        topic: "polled".into(),
        partition: 0,
        offset,
        max_bytes: 0,
        max_wait_ms: wait,
        min_bytes: 1,
        max_records: 0,
    };

    // Nothing there: answers empty after about max_wait.
    let started = Instant::now();
    let empty = subscriber
        .fetch(request(0, 300))
        .await
        .expect("fetch")
        .into_inner();
    assert!(empty.records.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "waited for data"
    );
    assert_eq!(empty.high_watermark, 0);

    // Data arriving during the wait wakes the fetch at once.
    let publisher = client.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        publisher
            .producer(ProducerConfig::default())
            .send("polled", Record::new("late"))
            .await
            .expect("stored");
    });
    let started = Instant::now();
    let woke = subscriber
        .fetch(request(0, 30_000))
        .await
        .expect("fetch")
        .into_inner();
    assert_eq!(woke.records.len(), 1);
    assert_eq!(woke.records[0].value, "late".as_bytes());
    // The deadline is 30 s: an answer well before it was woken by the publish.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "woken by the publish, not the deadline"
    );
    assert_eq!(woke.next_offset, 1);

    // min_bytes above max_bytes is capped by it: a full answer is sent at once.
    client
        .producer(ProducerConfig::default())
        .send("polled", Record::new(vec![b'x'; 2048]))
        .await
        .expect("stored");
    let started = Instant::now();
    let capped = subscriber
        .fetch(FetchRequest {
            max_bytes: 1024,
            min_bytes: 8 * 1024 * 1024,
            ..request(1, 30_000)
        })
        .await
        .expect("fetch")
        .into_inner();
    assert_eq!(capped.records.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered when max_bytes were there, not at the 30 s deadline"
    );

    // Reading past the high watermark or below the log start is OUT_OF_RANGE.
    let past = subscriber
        .fetch(request(5, 0))
        .await
        .expect_err("past the end");
    assert_eq!(past.code(), tonic::Code::OutOfRange);
}

/// A Subscribe stream whose topic is deleted and created again under its name ends with
/// NOT_FOUND. Partitions are found by name, so before, the stream went on reading the new
/// topic from the old one's positions: the new topic's first records were skipped unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_ends_when_its_topic_is_deleted_and_created_again() {
    use weft_proto::v1::subscribe_request::Request as Inbound;
    use weft_proto::v1::subscribe_response::Event;
    use weft_proto::v1::{Credit, StartPosition, SubscribeRequest, SubscribeStart, start_position};

    let broker = Broker::start();
    let admin = broker.client().await.admin();
    admin.create_topic("reborn", 1).await.expect("create");
    let mut publisher = PublisherClient::connect(format!("http://{}", broker.client_addr))
        .await
        .expect("connect");
    let mut publish = async |count: usize| {
        publisher
            .publish(PublishRequest {
                topic: "reborn".into(),
                target: Some(Target::Partition(0)),
                records: (0..count)
                    .map(|i| weft_proto::v1::Record {
                        value: format!("r{i}").into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .expect("publish");
    };
    publish(10).await;
    let (tx, mut responses) = weft_tests::grpc::subscribe(
        &broker.client_addr,
        SubscribeStart {
            topic: "reborn".into(),
            start: Some(StartPosition {
                position: Some(start_position::Position::Earliest(
                    start_position::Earliest {},
                )),
            }),
            credit: Some(Credit {
                records: 10,
                bytes: 1 << 20,
            }),
            ..Default::default()
        },
    )
    .await;
    let mut read = 0;
    while read < 10 {
        let message = tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .expect("in time")
            .expect("stream")
            .expect("open");
        if let Some(Event::Delivery(d)) = message.event {
            read += d.records.len();
        }
    }
    // Out of credit: the stream waits. The topic goes and comes back with 20 records.
    admin.delete_topic("reborn").await.expect("delete");
    admin.create_topic("reborn", 1).await.expect("create again");
    publish(20).await;
    tx.send(SubscribeRequest {
        request: Some(Inbound::Credit(Credit {
            records: 100,
            bytes: 1 << 20,
        })),
    })
    .await
    .expect("grant credit");
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .expect("in time")
        {
            Ok(Some(message)) => match message.event {
                Some(Event::Delivery(d)) => panic!(
                    "delivered from the new topic at offset {:?}",
                    d.records.first().map(|r| r.offset)
                ),
                _ => continue,
            },
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::NotFound, "{ended:?}");
}

/// A Subscribe stream whose first message never comes is ended after `request_timeout_ms`
/// with DEADLINE_EXCEEDED. Before, the broker waited for it as long as the connection lived (a
/// task held per such stream, and a clean shutdown held for its whole grace period).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_first_message_never_comes_is_ended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "request_timeout_ms = 500\n").expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("utf-8")]);
    let channel = weft_tests::grpc::channel(&broker.client_addr).await;
    let (_silent, rx) = tokio::sync::mpsc::channel::<weft_proto::v1::SubscribeRequest>(1);
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        SubscriberClient::new(channel).subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("answered, not left waiting");
    let status = answer.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("start"), "{status:?}");
}

/// A subscriber's credit goes round its partitions: one partition with a backlog larger than
/// the credit does not take every delivery. Before, each round started at the lowest
/// partition, so a subscriber catching up read all of partition 0 before anything of
/// partition 1 (and partition 1 starved for as long as partition 0 kept its backlog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_with_a_backlog_does_not_starve_the_others() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("backlog", 2)
        .await
        .expect("create");
    let producer = client.producer(ProducerConfig::default());
    let backlog = 8_000u64;
    let mut acks = Vec::new();
    for i in 0..backlog {
        acks.push(
            producer
                .send_nowait("backlog", Record::new(format!("p0-{i}")).partition(0))
                .await
                .expect("queued"),
        );
    }
    acks.push(
        producer
            .send_nowait("backlog", Record::new("p1").partition(1))
            .await
            .expect("queued"),
    );
    for ack in acks {
        ack.await.expect("stored");
    }
    producer.close().await.expect("close");

    let mut consumer = client
        .consumer(ConsumerConfig::new("backlog").start(StartFrom::Earliest))
        .await
        .expect("consumer");
    let mut read = 0u64;
    loop {
        let message = consumer
            .next_timeout(Duration::from_secs(10))
            .await
            .expect("next")
            .expect("a record within 10 s");
        read += 1;
        if message.partition == 1 {
            break;
        }
        assert!(
            read <= backlog,
            "read all of partition 0 before partition 1"
        );
    }
    // A round's credit (2,000 records by default) goes to partition 0 at most once before
    // partition 1 gets its turn.
    assert!(
        read <= backlog / 2,
        "partition 1's record came after {read} of partition 0's {backlog}"
    );
}
