//! The Rust client against a real broker: the producer keeps each partition's order with many
//! small batches in flight; a group consumer commits what it consumed, continues from its
//! commits after the broker restarts under it, and hands over at its commits when it closes.

use std::time::Duration;

use weft_client::{
    Client, Consumer, ConsumerConfig, ProducerConfig, PublishTransport, Record, StartFrom,
};
use weft_tests::{Broker, offsets, ok_stdout, wait_for};

/// Publishes values `tag-from .. tag-to` to partition 0 and waits for every acknowledgement.
async fn publish(client: &Client, tag: &str, from: u64, to: u64) {
    let producer = client.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    for i in from..to {
        acks.push(
            producer
                .send_nowait("c", Record::new(format!("{tag}-{i}")).partition(0))
                .await
                .expect("queued"),
        );
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    producer.close().await.expect("close");
}

/// The next `count` records: (offset, value).
async fn take(consumer: &mut Consumer, count: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    while out.len() < count {
        let message = consumer
            .next_timeout(Duration::from_secs(30))
            .await
            .expect("next")
            .unwrap_or_else(|| panic!("only {} of {count} records arrived", out.len()));
        out.push((
            message.offset,
            String::from_utf8(message.value.to_vec()).expect("utf-8"),
        ));
    }
    out
}

async fn committed(broker: &Broker, group: &str) -> Option<u64> {
    offsets(&broker.client_addr, "c", 0, Some(group))
        .await
        .expect("offsets")
        .committed_offset
}

/// Publishes `count` records to partition 0 of a new one-partition topic "c" in batches of at
/// most 7 with 5 in flight, over `transport`: every acknowledgement names the next offset, and
/// every record reads back at it.
async fn publish_in_order(broker: &Broker, transport: PublishTransport, count: u64) {
    let client = broker.client().await;
    client.admin().create_topic("c", 1).await.expect("create");
    let producer = client.producer(ProducerConfig {
        batch_records_max: 7,
        in_flight_per_partition: 5,
        transport,
        ..ProducerConfig::default()
    });
    let mut acks = Vec::new();
    for i in 0..count {
        acks.push(
            producer
                .send_nowait("c", Record::new(format!("v-{i}")).partition(0))
                .await
                .expect("queued"),
        );
    }
    for (i, ack) in acks.into_iter().enumerate() {
        let ack = ack.await.expect("stored");
        assert_eq!(ack.offset, i as u64, "record {i} stored out of order");
        assert!(!ack.duplicate);
    }
    producer.close().await.expect("close");
    let stored = weft_tests::fetch_range(&broker.client_addr, "c", 0, 0, count).await;
    for (offset, value) in stored {
        assert_eq!(value.as_ref(), format!("v-{offset}").as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_batches_in_flight_keep_the_partition_order() {
    let broker = Broker::start();
    // About 430 publishes for 3,000 records, over the topic's shared stream.
    publish_in_order(&broker, PublishTransport::Stream, 3000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_continues_from_its_commits_after_the_consumer_and_the_broker_restart() {
    let mut broker = Broker::start();
    let client = broker.client().await;
    client.admin().create_topic("c", 1).await.expect("create");
    publish(&client, "a", 0, 100).await;

    let mut consumer = client
        .consumer(
            ConsumerConfig::new("c")
                .group("g")
                .start(StartFrom::Earliest)
                .auto_commit(false),
        )
        .await
        .expect("join");
    let first = take(&mut consumer, 60).await;
    assert_eq!(first.first().map(|r| r.0), Some(0));
    assert_eq!(first.last().map(|r| r.0), Some(59));
    consumer.commit().await.expect("commit");
    assert_eq!(committed(&broker, "g").await, Some(60));

    // The consuming process goes away without committing more, and the broker restarts (on new
    // ports: the fixture binds port 0); a new member of the group continues at the commit.
    drop(consumer);
    broker.restart();
    let client = broker.client().await;
    publish(&client, "b", 100, 150).await;
    let mut consumer = client
        .consumer(
            ConsumerConfig::new("c")
                .group("g")
                .start(StartFrom::Earliest)
                .auto_commit(false),
        )
        .await
        .expect("rejoin");
    let rest = take(&mut consumer, 90).await;
    let offsets: Vec<u64> = rest.iter().map(|r| r.0).collect();
    assert_eq!(
        offsets,
        (60..150).collect::<Vec<_>>(),
        "continues exactly at the commit"
    );
    assert_eq!(rest[39].1, "a-99");
    assert_eq!(rest[40].1, "b-100");
    consumer.commit().await.expect("commit");
    assert_eq!(committed(&broker, "g").await, Some(150));
    consumer.close().await.expect("close");
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_commits_what_was_consumed_and_the_next_member_starts_there() {
    let broker = Broker::start();
    let client = broker.client().await;
    client.admin().create_topic("c", 1).await.expect("create");
    publish(&client, "x", 0, 80).await;

    let config = ConsumerConfig::new("c")
        .group("h")
        .start(StartFrom::Earliest)
        .auto_commit(true);
    let mut first = client.consumer(config.clone()).await.expect("join");
    let got = take(&mut first, 30).await;
    assert_eq!(got.last().map(|r| r.0), Some(29));
    // Records buffered but not handed out are not committed: only the 30 taken.
    first.close().await.expect("close");
    assert_eq!(committed(&broker, "h").await, Some(30));

    let mut second = client.consumer(config).await.expect("join");
    let got = take(&mut second, 50).await;
    assert_eq!(got.first().map(|r| r.0), Some(30));
    assert_eq!(got.last().map(|r| r.0), Some(79));
    second.close().await.expect("close");
    wait_for("the final commit", Duration::from_secs(10), || async {
        (committed(&broker, "h").await == Some(80)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_on_the_shared_stream_fails_alone_and_the_rest_is_stored_once() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic_with(
            "c",
            weft_client::TopicSettings {
                partitions: 4,
                max_message_bytes: Some(64 * 1024),
                ..weft_client::TopicSettings::default()
            },
        )
        .await
        .expect("create");
    // Every partition's batches share one stream; the broker ends it at the oversized batch, and
    // the batches sent after it (other partitions') are resent with their sequences.
    let producer = client.producer(ProducerConfig {
        batch_records_max: 5,
        ..ProducerConfig::default()
    });
    let mut acks = Vec::new();
    for i in 0..2000u32 {
        let record = if i == 1000 {
            Record::new(vec![b'x'; 100 * 1024]).partition(1)
        } else {
            Record::new(format!("v-{i}")).partition(i % 4)
        };
        acks.push((i, producer.send_nowait("c", record).await.expect("queued")));
    }
    for (i, ack) in acks {
        let outcome = ack.await;
        if i == 1000 {
            let error = outcome.expect_err("the oversized record is refused");
            assert_eq!(error.reason(), "BATCH_TOO_LARGE", "{error}");
        } else {
            outcome.unwrap_or_else(|e| panic!("record {i}: {e}"));
        }
    }
    producer.close().await.expect("close");
    let mut seen = std::collections::HashSet::new();
    for partition in 0..4 {
        let end = offsets(&broker.client_addr, "c", partition, None)
            .await
            .expect("offsets")
            .high_watermark;
        for (_, value) in weft_tests::fetch_range(&broker.client_addr, "c", partition, 0, end).await
        {
            let value = String::from_utf8(value.to_vec()).expect("utf-8");
            assert!(seen.insert(value.clone()), "{value} stored twice");
        }
    }
    assert_eq!(seen.len(), 1999, "every other record stored once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unary_transport_keeps_the_partition_order_too() {
    let broker = Broker::start();
    publish_in_order(&broker, PublishTransport::Unary, 1000).await;
    let calls = weft_tests::metric(
        &broker,
        "weft_rpc_requests_total{method=\"Publish\",code=\"Ok\"}",
    )
    .expect("unary publishes counted");
    assert!(calls >= 1000.0 / 7.0, "{calls} unary calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_group_takes_a_member_out_and_rebalances_at_once() {
    let broker = Broker::start();
    let client = broker.client().await;
    client.admin().create_topic("lg", 4).await.expect("create");
    let start = || weft_proto::v1::SubscribeStart {
        topic: "lg".into(),
        group_id: "leavers".into(),
        session_timeout_ms: 60_000,
        start: Some(weft_tests_earliest()),
        credit: Some(weft_proto::v1::Credit {
            records: 1000,
            bytes: 1 << 20,
        }),
        ..Default::default()
    };
    // Two members on raw streams, two partitions each.
    let (_a_requests, mut a_responses) =
        weft_tests::grpc::subscribe(&broker.client_addr, start()).await;
    let a = weft_tests::grpc::next_assignment(&mut a_responses, 1).await;
    let (b_requests, mut b_responses) =
        weft_tests::grpc::subscribe(&broker.client_addr, start()).await;
    let b = weft_tests::grpc::next_assignment(&mut b_responses, a.generation + 1).await;
    assert_eq!(b.partitions.len(), 2, "{b:?}");
    // LeaveGroup takes it out at once: b gets every partition.
    let channel = weft_tests::grpc::channel(&broker.client_addr).await;
    let mut subscriber = weft_tests::grpc::subscriber(&channel);
    let left = subscriber
        .leave_group(weft_proto::v1::LeaveGroupRequest {
            group_id: "leavers".into(),
            member_id: a.member_id.clone(),
        })
        .await
        .expect("leave")
        .into_inner();
    assert!(left.left);
    let all = tokio::time::timeout(
        Duration::from_secs(5),
        weft_tests::grpc::next_assignment(&mut b_responses, b.generation + 1),
    )
    .await
    .expect("b is reassigned at once");
    assert_eq!(all.partitions.len(), 4, "{all:?}");
    // a's own stream ends: it is no longer a member (its client rejoins as a new one).
    let ended = loop {
        match a_responses.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a's stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::FailedPrecondition, "{ended:?}");
    // Again: it is gone already. Bad input: no member id.
    let again = subscriber
        .leave_group(weft_proto::v1::LeaveGroupRequest {
            group_id: "leavers".into(),
            member_id: a.member_id,
        })
        .await
        .expect("leave again")
        .into_inner();
    assert!(!again.left, "it had left already");
    let bad = subscriber
        .leave_group(weft_proto::v1::LeaveGroupRequest {
            group_id: "leavers".into(),
            member_id: String::new(),
        })
        .await
        .expect_err("no member id");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    drop(b_requests);
}

fn weft_tests_earliest() -> weft_proto::v1::StartPosition {
    weft_proto::v1::StartPosition {
        position: Some(weft_proto::v1::start_position::Position::Earliest(
            weft_proto::v1::start_position::Earliest {},
        )),
    }
}

/// `eager_in_flight`: a partition with fewer publishes than that in flight sends a new record
/// at once instead of lingering; at the limit the record waits until an answer frees a place
/// (the linger here, 30 s, is never what sends anything). The broker is frozen while three
/// records are sent one after another, so the first stays in flight; the broker counts the
/// publishes it took. Eager 1: the first alone, then the second and third together. Eager 2:
/// the first and second each alone at once, the third after the first's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_in_flight_sends_below_it_without_lingering() {
    for (eager, expected_publishes) in [(1, 2.0), (2, 3.0)] {
        let broker = Broker::start();
        let client = broker.client().await;
        client.admin().create_topic("c", 1).await.expect("create");
        let producer = client.producer(ProducerConfig {
            linger: Duration::from_secs(30),
            in_flight_per_partition: 4,
            eager_in_flight: eager,
            ..ProducerConfig::default()
        });
        // The producer learns the topic (and its leader) with a first record.
        producer
            .send("c", Record::new("warm").partition(0))
            .await
            .expect("stored");
        // Batches stored (each entry's batch count, summed): a publish the broker takes twice
        // (held while the producer table reloads, then taken again) still stores one batch.
        let counted =
            |broker: &Broker| weft_tests::metric(broker, "weft_entry_batches_sum").unwrap_or(0.0);
        let before = counted(&broker);
        broker.pause();
        let mut acks = Vec::new();
        for i in 0..3 {
            acks.push(
                producer
                    .send_nowait("c", Record::new(format!("v-{i}")).partition(0))
                    .await
                    .expect("queued"),
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        broker.resume();
        for (i, ack) in acks.into_iter().enumerate() {
            let ack = tokio::time::timeout(Duration::from_secs(10), ack)
                .await
                .unwrap_or_else(|_| panic!("eager {eager}: record {i} lingered"))
                .expect("stored");
            assert_eq!(ack.offset, 1 + i as u64);
        }
        assert_eq!(
            counted(&broker) - before,
            expected_publishes,
            "eager {eager}: batches the broker stored for three records"
        );
        producer.close().await.expect("close");
    }
}

/// Consumers that share one client (one HTTP/2 connection) and the connection's flow-control
/// window: while one waits for its commit to be answered, its and the others' deliveries sit
/// unread in that window. A commit answered over a unary call on the same connection waited
/// behind them for good (the `fanout` benchmark's four groups all stopped for the rest of the
/// run once the machine was loaded); commits now travel over the consumer's own stream, which
/// it reads while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_answered_while_deliveries_fill_the_shared_connection() {
    const RECORDS: usize = 16_000;
    const CONSUMERS: usize = 4;
    let broker = Broker::start();
    let client = broker.client().await.with_timeout(Duration::from_secs(5));
    client.admin().create_topic("c", 1).await.expect("create");
    let producer = client.producer(ProducerConfig::default());
    let value = vec![b'x'; 1024];
    let mut acks = Vec::new();
    for _ in 0..RECORDS {
        acks.push(
            producer
                .send_nowait("c", Record::new(value.clone()).partition(0))
                .await
                .expect("queued"),
        );
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    producer.close().await.expect("close");

    // Credit far beyond the connection's window: the broker sends as fast as HTTP/2 lets it,
    // so every stream fills its share of the window as soon as it is assigned.
    let mut consumers = Vec::new();
    for g in 0..CONSUMERS {
        let mut config = ConsumerConfig::new("c")
            .group(format!("shared-{g}"))
            .start(StartFrom::Earliest);
        config.credit_records = 1_000_000;
        config.credit_bytes = 256 * 1024 * 1024;
        config.auto_commit_interval = Duration::from_millis(5);
        consumers.push(client.consumer(config).await.expect("subscribe"));
    }
    for consumer in &mut consumers {
        take(consumer, 1).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // An explicit commit by each, the others unread meanwhile.
    for (g, consumer) in consumers.iter_mut().enumerate() {
        tokio::time::timeout(Duration::from_secs(20), consumer.commit())
            .await
            .unwrap_or_else(|_| panic!("consumer {g}'s commit hung"))
            .unwrap_or_else(|e| panic!("consumer {g}'s commit failed: {e}"));
        let committed = offsets(&broker.client_addr, "c", 0, Some(&format!("shared-{g}")))
            .await
            .expect("offsets")
            .committed_offset;
        assert_eq!(committed, Some(1), "group shared-{g}");
    }
    // Everything, one record from each consumer in turn, with automatic commits every 5 ms:
    // no commit may hold a consumer (and with it the others) up.
    let read_all = async {
        let mut next = [1u64; CONSUMERS];
        while next.iter().any(|&n| n < RECORDS as u64) {
            for (g, consumer) in consumers.iter_mut().enumerate() {
                if next[g] == RECORDS as u64 {
                    continue;
                }
                let message = consumer.next().await.expect("next").expect("a record");
                assert_eq!(message.offset, next[g], "consumer {g}");
                next[g] += 1;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_all)
        .await
        .expect("every consumer read everything within 60 s");
    for consumer in consumers {
        consumer.close().await.expect("close commits");
    }
    for g in 0..CONSUMERS {
        let committed = offsets(&broker.client_addr, "c", 0, Some(&format!("shared-{g}")))
            .await
            .expect("offsets")
            .committed_offset;
        assert_eq!(committed, Some(RECORDS as u64), "group shared-{g}");
    }
}

/// A member that loses a partition while records of it sit in its buffer (read from the stream
/// while it waited for a commit's answer) drops them and credits them back: the broker counted
/// them against the stream's credit, and without them given back a consumer whose whole credit
/// was in that buffer received nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_dropped_by_a_reassignment_are_credited_back() {
    use weft_proto::v1::{Credit, SubscribeStart};
    let broker = Broker::start();
    let client = broker.client().await;
    client.admin().create_topic("cr", 2).await.expect("create");
    let producer = client.producer(ProducerConfig::default());
    for p in 0..2u32 {
        for i in 0..20 {
            producer
                .send("cr", Record::new(format!("p{p}-{i}")).partition(p))
                .await
                .expect("stored");
        }
    }
    producer.close().await.expect("close");

    // Member A: credit for 4 records, which the broker spends on partition 0 (it serves the
    // partitions in order). A reads nothing yet.
    let mut config = ConsumerConfig::new("cr")
        .group("cg")
        .start(StartFrom::Earliest)
        .auto_commit(false);
    config.credit_records = 4;
    let mut a = client.consumer(config).await.expect("member a");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Member B, whose id sorts first: it gets partition 0, A keeps partition 1.
    let (b_requests, mut b) = weft_tests::grpc::subscribe(
        &broker.client_addr,
        SubscribeStart {
            topic: "cr".into(),
            group_id: "cg".into(),
            member_id: "a".into(),
            credit: Some(Credit {
                records: 1,
                bytes: 1 << 20,
            }),
            ..SubscribeStart::default()
        },
    )
    .await;
    let assignment = weft_tests::within(
        "b's assignment",
        Duration::from_secs(20),
        weft_tests::grpc::next_assignment(&mut b, 0),
    )
    .await;
    assert_eq!(
        assignment
            .partitions
            .iter()
            .map(|p| p.partition)
            .collect::<Vec<_>>(),
        vec![0]
    );
    // A's commit reads its stream until answered: the 4 records of partition 0, then the new
    // assignment (partition 1 only), then the answer. Refused or not, it does not matter here.
    let _ = a.commit().await;
    assert_eq!(a.assignment(), vec![1]);
    let records = take(&mut a, 20).await;
    let expected: Vec<(u64, String)> = (0..20).map(|i| (i, format!("p1-{i}"))).collect();
    assert_eq!(records, expected);
    drop(b_requests);
}

/// `queue_records_max` bounds the records given to a producer and not yet answered: with the
/// broker frozen, the records up to the bound are taken at once and the next one waits for
/// room until answers free it; every record is then stored once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_holds_at_most_queue_records_max_unanswered_records() {
    let broker = Broker::start();
    let client = broker.client().await;
    client.admin().create_topic("c", 1).await.expect("create");
    let producer = client.producer(ProducerConfig {
        queue_records_max: 4,
        ..ProducerConfig::default()
    });
    producer
        .send("c", Record::new("warm").partition(0))
        .await
        .expect("stored");
    broker.pause();
    let mut acks = Vec::new();
    for i in 0..4 {
        let ack = tokio::time::timeout(
            Duration::from_secs(5),
            producer.send_nowait("c", Record::new(format!("v-{i}")).partition(0)),
        )
        .await
        .unwrap_or_else(|_| panic!("record {i} is within the bound and must be taken at once"))
        .expect("queued");
        acks.push(ack);
    }
    let fifth = producer.send_nowait("c", Record::new("v-4").partition(0));
    tokio::pin!(fifth);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut fifth)
            .await
            .is_err(),
        "a fifth unanswered record must wait for room"
    );
    broker.resume();
    acks.push(
        tokio::time::timeout(Duration::from_secs(10), fifth)
            .await
            .expect("room once the broker answers")
            .expect("queued"),
    );
    for (i, ack) in acks.into_iter().enumerate() {
        assert_eq!(ack.await.expect("stored").offset, 1 + i as u64);
    }
}

/// Records given to a producer that is then dropped (not closed) are still sent and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_given_to_a_dropped_producer_are_still_stored() {
    let broker = Broker::start();
    let client = broker.client().await;
    client.admin().create_topic("c", 2).await.expect("create");
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_secs(30),
        ..ProducerConfig::default()
    });
    let mut acks = Vec::new();
    for i in 0..200u32 {
        acks.push(
            producer
                .send_nowait("c", Record::new(format!("v-{i}")).partition(i % 2))
                .await
                .expect("queued"),
        );
    }
    drop(producer);
    for (i, ack) in acks.into_iter().enumerate() {
        let ack = tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .unwrap_or_else(|_| panic!("record {i} left unanswered by the dropped producer"))
            .expect("stored");
        assert_eq!(ack.partition, i as u32 % 2);
        assert_eq!(ack.offset, i as u64 / 2, "record {i} stored in order");
    }
}

/// A send given up before its record found a batch (here: cancelled while the producer still
/// asks the frozen broker about the topic) gives its unit of `queue_records_max` back: the next
/// send is not left waiting for room that no answer will ever free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_send_gives_its_room_back() {
    let broker = Broker::start();
    let client = broker.client().await;
    client.admin().create_topic("c", 1).await.expect("create");
    let producer = client.producer(ProducerConfig {
        queue_records_max: 1,
        ..ProducerConfig::default()
    });
    broker.pause();
    for _ in 0..3 {
        let attempt = tokio::time::timeout(
            Duration::from_millis(200),
            producer.send("c", Record::new("given up").partition(0)),
        )
        .await;
        assert!(attempt.is_err(), "the broker is frozen: {attempt:?}");
    }
    broker.resume();
    let ack = tokio::time::timeout(
        Duration::from_secs(10),
        producer.send("c", Record::new("kept").partition(0)),
    )
    .await
    .expect("room is back once the cancelled sends are gone")
    .expect("stored");
    assert_eq!(ack.partition, 0);
    producer.close().await.expect("close");
}

/// `flush` returns once the records given before it are answered, while another task keeps
/// the partition's window full with records of its own (before, a flush waited for a moment
/// with no publish in flight, which a busy producer never has).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_returns_while_another_task_keeps_sending() {
    let broker = Broker::start();
    let client = broker.client().await;
    client.admin().create_topic("c", 1).await.expect("create");
    let producer = std::sync::Arc::new(client.producer(ProducerConfig {
        batch_records_max: 64,
        queue_records_max: 20_000,
        ..ProducerConfig::default()
    }));
    producer
        .send("c", Record::new("warm").partition(0))
        .await
        .expect("stored");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let (producer, stop) = (producer.clone(), stop.clone());
        tokio::spawn(async move {
            // As fast as the producer's room allows (its acknowledgements are not awaited), so
            // the partition always has batches waiting; bounded: at most 2 million records,
            // stopped as soon as the flush is done.
            for i in 0..2_000_000u32 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let ack = producer
                    .send_nowait("c", Record::new(format!("busy-{i}")).partition(0))
                    .await
                    .expect("queued");
                drop(ack);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let marker = producer
        .send_nowait("c", Record::new("marker").partition(0))
        .await
        .expect("queued");
    tokio::time::timeout(Duration::from_secs(10), producer.flush())
        .await
        .expect("the flush waits only for what was given before it")
        .expect("flushed");
    use futures::FutureExt;
    let marker = marker
        .now_or_never()
        .expect("the record given before the flush is answered when it returns")
        .expect("stored");
    assert!(marker.offset > 0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    busy.await.expect("the busy task ends");
}

/// A partition idle for `partition_idle_timeout` gives up its sender task and batching state
/// (a producer that wrote to many partitions once does not keep a task for each), and the next
/// record there continues the partition's producer sequence: restarting it at 0 would make the
/// broker answer the record as a duplicate of the partition's first batch, with its offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_partitions_give_up_their_senders_and_keep_their_sequences() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("idle", 3)
        .await
        .expect("create");
    let producer = client.producer(ProducerConfig {
        partition_idle_timeout: Duration::from_millis(500),
        ..ProducerConfig::default()
    });
    let mut last = Vec::new();
    for partition in 0..3 {
        for i in 0..2 {
            let ack = producer
                .send(
                    "idle",
                    Record::new(format!("{partition}-{i}")).partition(partition),
                )
                .await
                .expect("stored");
            assert!(!ack.duplicate);
            if i == 1 {
                last.push(ack.offset);
            }
        }
    }
    // (No count of the lanes here: on a slow machine a partition may already have idled.)
    wait_for(
        "idle partitions to drop their senders",
        Duration::from_secs(10),
        || async { (producer.active_partitions() == 0).then_some(()) },
    )
    .await;
    for partition in 0..3u32 {
        let ack = producer
            .send("idle", Record::new("after").partition(partition))
            .await
            .expect("stored after idling");
        assert!(
            !ack.duplicate,
            "partition {partition}: the record after idling was taken for a retry"
        );
        assert_eq!(
            ack.offset,
            last[partition as usize] + 1,
            "partition {partition}"
        );
    }
    producer.close().await.expect("close");
    // Every record is stored once.
    for partition in 0..3u32 {
        let bounds = offsets(&broker.client_addr, "idle", partition, None)
            .await
            .expect("offsets");
        assert_eq!(bounds.high_watermark, 3, "partition {partition}");
    }
}

/// A client given two brokers, one of them down (nothing listens on its port), sends its calls
/// to the other. Before, tonic's balancer kept picking the broker that was down, and about half
/// the calls failed with a connection error for as long as it stayed down (a producer in a
/// cluster whose broker was killed used its retries up on it). Now a broker whose connection
/// failed is left out until a connection to it succeeds again (tried in the background): of
/// 40 calls, at most the first fails. And once it is up again, calls reach it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_over_brokers_leave_out_one_that_is_down() {
    let live = Broker::start();
    let mut other = Broker::start();
    for broker in [&live, &other] {
        let (status, body) = broker.http(
            "POST",
            "/v1/topics",
            Some(r#"{"name":"spread","partitions":1}"#),
        );
        assert_eq!(status, 201, "{body}");
    }
    let down = other.client_addr.clone();
    other.stop();
    let client = Client::connect([down.as_str(), live.client_addr.as_str()])
        .await
        .expect("connect");
    let mut failed = Vec::new();
    for _ in 0..40 {
        if let Err(e) = client.topic_metadata("spread").await {
            failed.push(e.to_string());
        }
    }
    assert!(
        failed.len() <= 1,
        "{} of 40 calls failed: {failed:?}",
        failed.len()
    );
    other.start_again_same_ports();
    // Both brokers answer again; calls go to each of them (the broker answering is told by its
    // request counter).
    let served = |b: &Broker| {
        weft_tests::metric(
            b,
            r#"weft_rpc_requests_total{method="Metadata.GetTopic",code="Ok"}"#,
        )
        .unwrap_or(0.0)
    };
    let before = served(&other);
    wait_for(
        "calls to reach the broker back up",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            let other = &other;
            async move {
                for _ in 0..10 {
                    client.topic_metadata("spread").await.ok()?;
                }
                (served(other) > before).then_some(())
            }
        },
    )
    .await;
}

/// A broker whose address drops connection attempts (a host that is gone: no refusal, no
/// answer) does not hold the calls sent to it past their deadline. Before, those calls queued
/// behind one connection attempt after another (5 s each, the connect timeout), and the k-th
/// of them waited about 5k seconds whatever its deadline. Now each ends with DEADLINE_EXCEEDED
/// soon after its deadline (1 s here), the broker is left out, and the next calls go to the
/// other broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_drops_connections_holds_no_call_past_its_deadline() {
    let live = Broker::start();
    let (status, body) = live.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"spread","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    let silent = format!("127.0.0.1:{}", weft_tests::free_port());
    let mut firewall = weft_tests::Firewall::new();
    firewall.drop_tcp(None, &silent);
    let client = Client::connect([silent.as_str(), live.client_addr.as_str()])
        .await
        .expect("connect")
        .with_timeout(Duration::from_secs(1));
    let started = std::time::Instant::now();
    let answers = futures::future::join_all((0..8).map(|_| {
        let client = client.clone();
        async move { client.topic_metadata("spread").await }
    }))
    .await;
    let took = started.elapsed();
    let failed: Vec<String> = answers
        .iter()
        .filter_map(|a| a.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        took < Duration::from_secs(4),
        "8 calls with a 1 s deadline took {took:?}; failures: {failed:?}"
    );
    assert!(
        failed.len() < 8,
        "the calls to the live broker were answered: {failed:?}"
    );
    for _ in 0..10 {
        client
            .topic_metadata("spread")
            .await
            .expect("the silent broker is left out");
    }
    firewall.heal();
}

/// A broker that stops answering while the client's connection to it stays open (its process
/// stopped, as a host that died without closing its connections) is left out too: its calls
/// run out of time, a probe finds it silent, and the next calls go to the other broker. Found
/// by review: a call that ran out of time never took its broker out, so every other call
/// waited its whole deadline for as long as the connection looked open. Once it answers again,
/// calls reach it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_broker_with_open_connections_is_left_out() {
    let brokers = [Broker::start(), Broker::start()];
    for broker in &brokers {
        let (status, body) = broker.http(
            "POST",
            "/v1/topics",
            Some(r#"{"name":"spread","partitions":1}"#),
        );
        assert_eq!(status, 201, "{body}");
    }
    let client = Client::connect([
        brokers[0].client_addr.as_str(),
        brokers[1].client_addr.as_str(),
    ])
    .await
    .expect("connect")
    .with_timeout(Duration::from_secs(1));
    // Connections to both.
    for _ in 0..6 {
        client.topic_metadata("spread").await.expect("both answer");
    }
    brokers[0].pause();
    wait_for(
        "ten calls in a row answered",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            async move {
                for _ in 0..10 {
                    client.topic_metadata("spread").await.ok()?;
                }
                Some(())
            }
        },
    )
    .await;
    brokers[0].resume();
    let served = |b: &Broker| {
        weft_tests::metric(
            b,
            r#"weft_rpc_requests_total{method="Metadata.GetTopic",code="Ok"}"#,
        )
        .unwrap_or(0.0)
    };
    let before = served(&brokers[0]);
    wait_for(
        "calls to reach the broker again",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            let broker = &brokers[0];
            async move {
                for _ in 0..10 {
                    client.topic_metadata("spread").await.ok()?;
                }
                (served(broker) > before).then_some(())
            }
        },
    )
    .await;
}

/// A member that opened its stream with resume offsets (where it was when its last stream
/// ended) starts its first assignment there; a partition given back to it after a rebalance
/// starts at the group's commit, which the partition's owner meanwhile moved on. Before, the
/// resume offset won again: the records in between came again, and the member's next commit
/// was refused as going backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_offsets_place_only_the_first_assignment() {
    let broker = Broker::start();
    let client = broker.client().await;
    client.admin().create_topic("rs", 2).await.expect("create");
    let addresses = [broker.client_addr.clone()];
    for partition in 0..2u32 {
        for i in 0..10u64 {
            weft_tests::publish_until_acknowledged(
                &addresses,
                "rs",
                partition,
                i,
                &format!("p{partition}-{i}"),
            )
            .await;
        }
    }
    let start = |resume: Vec<weft_proto::v1::PartitionOffset>| weft_proto::v1::SubscribeStart {
        topic: "rs".into(),
        group_id: "resumers".into(),
        session_timeout_ms: 60_000,
        start: Some(weft_tests_earliest()),
        resume,
        credit: Some(weft_proto::v1::Credit {
            records: 1000,
            bytes: 1 << 20,
        }),
        ..Default::default()
    };
    let at = |partition, offset| weft_proto::v1::PartitionOffset { partition, offset };
    let (_a_requests, mut a_responses) =
        weft_tests::grpc::subscribe(&broker.client_addr, start(vec![at(0, 2), at(1, 2)])).await;
    let a = weft_tests::grpc::next_assignment(&mut a_responses, 1).await;
    assert_eq!(a.partitions, [at(0, 2), at(1, 2)], "{a:?}");
    // A second member takes one partition and commits further in it.
    let (b_requests, mut b_responses) =
        weft_tests::grpc::subscribe(&broker.client_addr, start(Vec::new())).await;
    let b = weft_tests::grpc::next_assignment(&mut b_responses, a.generation + 1).await;
    assert_eq!(b.partitions.len(), 1, "{b:?}");
    let taken = b.partitions[0].partition;
    let channel = weft_tests::grpc::channel(&broker.client_addr).await;
    let mut subscriber = weft_tests::grpc::subscriber(&channel);
    subscriber
        .commit_offsets(weft_proto::v1::CommitOffsetsRequest {
            group_id: "resumers".into(),
            member_id: b.member_id.clone(),
            generation: b.generation,
            topic: "rs".into(),
            offsets: vec![at(taken, 8)],
            ..Default::default()
        })
        .await
        .expect("commit");
    subscriber
        .leave_group(weft_proto::v1::LeaveGroupRequest {
            group_id: "resumers".into(),
            member_id: b.member_id.clone(),
        })
        .await
        .expect("leave");
    // The partition comes back to the first member, at the commit.
    let back = tokio::time::timeout(
        Duration::from_secs(10),
        weft_tests::grpc::next_assignment(&mut a_responses, b.generation + 1),
    )
    .await
    .expect("reassigned");
    let given_back = back
        .partitions
        .iter()
        .find(|p| p.partition == taken)
        .unwrap_or_else(|| panic!("{back:?}"));
    assert_eq!(given_back.offset, 8, "{back:?}");
    drop(b_requests);
}

/// A consumer outside a group that started at the latest offset reads a partition added to its
/// topic while its stream was down from that partition's start: every record there came after
/// the consumer started. Before, the new stream placed the partition it had never seen at the
/// latest offset too, and the records published there in between were skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_consumer_reads_a_partition_added_while_its_stream_was_down_from_its_start() {
    let mut broker = Broker::start();
    let client = broker.client().await;
    client.admin().create_topic("c", 1).await.expect("create");
    publish(&client, "old", 0, 3).await;
    let mut consumer = client
        .consumer(ConsumerConfig::new("c").start(StartFrom::Latest))
        .await
        .expect("subscribe");
    assert_eq!(consumer.positions().get(&0), Some(&3));
    publish(&client, "a", 3, 4).await;
    assert_eq!(take(&mut consumer, 1).await, vec![(3, "a-3".to_string())]);

    // The topic grows to two partitions, and its stream goes down with the broker.
    let (status, body) = broker.http("PATCH", "/v1/topics/c", Some(r#"{"partitions":2}"#));
    assert_eq!(status, 200, "{body}");
    let producer = client.producer(ProducerConfig::default());
    producer
        .send("c", Record::new("b-0").partition(1))
        .await
        .expect("stored in the new partition");
    producer.close().await.expect("close");
    broker.stop();
    broker.start_again_same_ports();
    broker.wait_ready();

    let message = consumer
        .next_timeout(Duration::from_secs(30))
        .await
        .expect("next")
        .expect("the record of the new partition");
    assert_eq!(
        (message.partition, message.offset, &message.value[..]),
        (1, 0, &b"b-0"[..])
    );
    assert_eq!(
        consumer.positions().get(&0),
        Some(&4),
        "partition 0 resumed"
    );
}

/// A consumer whose broker hangs (SIGSTOP: its connections stay open and nothing comes) does
/// not wait for good: its stream is taken as lost after three of the heartbeat intervals the
/// broker announced in the assignment (`stream_heartbeat_ms`), at least 15 s, and with no
/// reconnection allowed `next` fails (UNAVAILABLE, STREAM_SILENT); a consumer made while the
/// broker hangs fails within the client's timeout. Before, both waited until the HTTP/2 keep-alive gave up (about 50 s),
/// or for good behind a proxy that answers pings itself (helper-90).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_of_a_hung_broker_fails_instead_of_waiting_for_good() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "stream_heartbeat_ms = 200\n").expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    let client = broker.client().await.with_timeout(Duration::from_secs(2));
    client
        .admin()
        .create_topic("hung", 1)
        .await
        .expect("create");
    let consumer_config = || ConsumerConfig {
        reconnects_max: 0,
        ..ConsumerConfig::new("hung").start(StartFrom::Earliest)
    };
    let mut consumer = client.consumer(consumer_config()).await.expect("consumer");
    broker.pause();
    let next = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .expect("next ends within 30 s of the broker hanging");
    let error = next.expect_err("no record from a hung broker");
    assert_eq!(error.reason(), "STREAM_SILENT", "{error}");
    let made = tokio::time::timeout(Duration::from_secs(15), client.consumer(consumer_config()))
        .await
        .expect("a consumer made while the broker hangs fails within 15 s");
    assert!(made.is_err(), "no consumer of a hung broker");
    broker.resume();
    // Served again once the broker runs.
    let consumer = client.consumer(consumer_config()).await.expect("consumer");
    assert_eq!(consumer.assignment(), vec![0]);
}

/// A consumer polled with short timeouts (`next_timeout`, as a Kafka-style poll loop) whose
/// broker is gone gets the error once its reconnections (`reconnects_max`) are used up, each
/// after its wait: the count, the waits and the stream's silence carry over from one call to
/// the next, and an attempt cut short by the caller's timeout counts. Killed, the broker
/// refuses connections at once; hung (SIGSTOP), nothing answers. Before, each call started
/// over, made one attempt, was cut short in its wait, and answered "no record" for good,
/// reconnecting at the polling rate (helper-90, helper-91).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_a_consumer_of_a_dead_broker_ends_in_an_error() {
    polling_ends_in_an_error(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_a_consumer_of_a_hung_broker_ends_in_an_error() {
    polling_ends_in_an_error(true).await;
}

async fn polling_ends_in_an_error(hang: bool) {
    let mut broker = Broker::start();
    let client = broker.client().await.with_timeout(Duration::from_secs(2));
    client
        .admin()
        .create_topic("gone", 1)
        .await
        .expect("create");
    let mut consumer = client
        .consumer(ConsumerConfig {
            reconnects_max: 3,
            ..ConsumerConfig::new("gone")
                .group("pollers")
                .start(StartFrom::Earliest)
        })
        .await
        .expect("consumer");
    if hang {
        broker.pause();
    } else {
        broker.kill9();
    }
    let began = std::time::Instant::now();
    let mut polls = 0u32;
    let error = loop {
        assert!(
            began.elapsed() < Duration::from_secs(45),
            "still no error after {polls} polls in 45 s"
        );
        polls += 1;
        match consumer.next_timeout(Duration::from_millis(50)).await {
            Ok(None) => continue,
            Ok(Some(m)) => panic!("a record from a dead broker: {m:?}"),
            Err(e) => break e,
        }
    };
    assert!(error.is_retriable(), "{error}");
    if hang {
        broker.resume();
    }
}

/// A client of `broker` through a slow link: what the client sends crawls at 1,500 bytes a
/// second, so a new connection's preface, settings and Subscribe call take a few hundred
/// milliseconds to reach the broker (answers come back at full speed).
async fn through_a_slow_link(broker: &Broker) -> (weft_tests::SlowLink, Client) {
    let listen = format!("127.0.0.1:{}", weft_tests::free_port());
    let link = weft_tests::SlowLink::start(&listen, &broker.client_addr, 1_500);
    let client = Client::connect([listen.as_str()])
        .await
        .expect("connect")
        .with_timeout(Duration::from_secs(10));
    (link, client)
}

/// The next record's value, polling with 20 ms timeouts (at most 30 s); an error fails the test.
async fn poll_in_short_steps(consumer: &mut Consumer) -> String {
    let began = std::time::Instant::now();
    loop {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "no record within 30 s"
        );
        match consumer.next_timeout(Duration::from_millis(20)).await {
            Ok(None) => continue,
            Ok(Some(m)) => return String::from_utf8_lossy(&m.value).into_owned(),
            Err(e) => panic!("polling failed: {e}"),
        }
    }
}

/// A consumer polled with timeouts shorter than the broker takes to answer a subscription (a
/// slow link) reconnects all the same: its Subscribe call goes on across polls, and the next
/// poll waits for the same one. Before, each poll's timeout cancelled the call under way, every
/// attempt was cut short, and `reconnects_max` ran out with the broker up and answering
/// ("no subscription stream opened in 4 attempts").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_shorter_than_the_subscribe_call_do_not_cut_it_short() {
    let broker = Broker::start();
    let direct = broker.client().await;
    direct
        .admin()
        .create_topic("slow", 1)
        .await
        .expect("create");
    let (link, client) = through_a_slow_link(&broker).await;
    let mut consumer = client
        .consumer(ConsumerConfig {
            reconnects_max: 3,
            ..ConsumerConfig::new("slow").start(StartFrom::Earliest)
        })
        .await
        .expect("consumer");
    let publish = |value: &'static str| {
        let direct = direct.clone();
        async move {
            direct
                .producer(ProducerConfig::default())
                .send("slow", Record::new(value).partition(0))
                .await
                .expect("stored")
        }
    };
    publish("before").await;
    assert_eq!(poll_in_short_steps(&mut consumer).await, "before");
    // The stream lived a while: its end is no quick end (no wait before the first attempt).
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    link.cut();
    publish("after").await;
    assert_eq!(poll_in_short_steps(&mut consumer).await, "after");
}

/// Two members of group `group` on a new two-partition topic `topic`: a, our consumer through a
/// slow link (1,500 B/s towards the broker) with session timeout `session`, and b, a raw
/// Subscribe stream (session 30 s), one partition each. Then a's stream lives a while and is
/// cut, and a few short polls start its reconnection.
async fn two_members_and_a_cut(
    topic: &str,
    group: &str,
    session: Duration,
) -> (
    Broker,
    weft_tests::SlowLink,
    Consumer,
    (
        tokio::sync::mpsc::Sender<weft_proto::v1::SubscribeRequest>,
        tonic::Streaming<weft_proto::v1::SubscribeResponse>,
    ),
) {
    let broker = Broker::start();
    broker
        .client()
        .await
        .admin()
        .create_topic(topic, 2)
        .await
        .expect("create");
    let (link, client) = through_a_slow_link(&broker).await;
    let mut a = client
        .consumer(ConsumerConfig {
            session_timeout: Some(session),
            // No commit as the stream ends: the first bytes across the link after the cut are
            // the new Subscribe call's.
            auto_commit: false,
            ..ConsumerConfig::new(topic)
                .group(group)
                .start(StartFrom::Earliest)
        })
        .await
        .expect("a");
    assert_eq!(a.assignment().len(), 2);
    let (b_requests, mut b_responses) = weft_tests::grpc::subscribe(
        &broker.client_addr,
        weft_proto::v1::SubscribeStart {
            topic: topic.into(),
            group_id: group.into(),
            session_timeout_ms: 30_000,
            start: Some(weft_tests_earliest()),
            credit: Some(weft_proto::v1::Credit {
                records: 1000,
                bytes: 1 << 20,
            }),
            ..Default::default()
        },
    )
    .await;
    let b = weft_tests::grpc::next_assignment(&mut b_responses, a.generation() + 1).await;
    assert_eq!(b.partitions.len(), 1, "{b:?}");
    // a's stream lives a while (its end is no quick end), is cut, and a few short polls start
    // its reconnection.
    for _ in 0..30 {
        let _ = a.next_timeout(Duration::from_millis(40)).await;
    }
    let before = link.carried();
    link.cut();
    // Short polls until a's new Subscribe call has started (bytes cross the link again): the
    // polls see the cut, then start the call, which the last one cuts short.
    let began = std::time::Instant::now();
    while link.carried() == before {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "no new call within 10 s of the cut"
        );
        let _ = a.next_timeout(Duration::from_millis(20)).await;
    }
    (broker, link, a, (b_requests, b_responses))
}

/// A group member closed while it reconnects (its stream cut, a new one being opened through a
/// slow link) leaves its group: the other member gets every partition at once, not once the
/// closed member's session (30 s) expires. helper-94 read that `close` took the stream that had
/// ended for the member's own and sent no LeaveGroup; this test passed before the change too
/// (the end of the stream being opened tells the broker), and now guards both ways out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_closed_while_it_reconnects_leaves_its_group() {
    let (_broker, _link, a, (_b_requests, mut b_responses)) =
        two_members_and_a_cut("rejoin", "rejoiners", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    tokio::time::timeout(Duration::from_secs(10), a.close())
        .await
        .expect("close within 10 s")
        .expect("closed");
    let all = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let next = weft_tests::grpc::next_assignment(&mut b_responses, 0).await;
            if next.partitions.len() == 2 {
                return next;
            }
        }
    })
    .await
    .expect("b gets every partition within 5 s of a's close");
    assert_eq!(all.partitions.len(), 2, "{all:?}");
}

/// A group member whose stream was opened again in the background (a reconnection a short poll
/// started) keeps its session while the application does not poll: the stream heartbeats from
/// the moment it opens, not from the next poll. So the other member's assignment stays as it is
/// while the reconnected member's application is busy for more than three of its 3 s sessions
/// (helper-94).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opened_in_the_background_keeps_its_members_session() {
    let (_broker, _link, mut a, (_b_requests, mut b_responses)) =
        two_members_and_a_cut("busy", "busy-group", Duration::from_secs(3)).await;
    // a's application is busy for 10 s: what b is given meanwhile.
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let next = weft_tests::grpc::next_assignment(&mut b_responses, 0).await;
            seen.push((next.generation, next.partitions.len()));
        }
    })
    .await;
    assert!(
        seen.last().is_none_or(|(_, partitions)| *partitions == 1),
        "a's session expired while its application was busy: b's assignments {seen:?}"
    );
    // a goes on.
    let _ = a.next_timeout(Duration::from_millis(500)).await;
}

/// The producer holds at most `queue_bytes_max` bytes of unanswered records (64 MiB by
/// default, as Kafka's `buffer.memory` bounds its producer): with the broker hung, sends of
/// 512 KiB records wait for room once 64 MiB are given, and every record given is stored once
/// the broker runs again. Before, only the record count was bounded (100,000), so a producer
/// of large records could hold gigabytes (helper-90).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_bounds_the_bytes_it_holds_unanswered() {
    let broker = Broker::start();
    let client = broker.client().await;
    client.admin().create_topic("big", 1).await.expect("create");
    let producer = client.producer(ProducerConfig::default());
    producer
        .send("big", Record::new(vec![1u8; 16]))
        .await
        .expect("the producer knows the topic");
    broker.pause();
    const RECORD: usize = 512 * 1024;
    let mut acks = Vec::new();
    // At most 300 (150 MiB): past 128, room is wanting.
    for _ in 0..300 {
        match tokio::time::timeout(
            Duration::from_millis(500),
            producer.send_nowait("big", Record::new(vec![7u8; RECORD])),
        )
        .await
        {
            Ok(ack) => acks.push(ack.expect("queued")),
            Err(_) => break,
        }
    }
    let held = acks.len();
    broker.resume();
    assert!(
        held <= 64 * 1024 * 1024 / RECORD,
        "{held} records of 512 KiB given while nothing was answered"
    );
    assert!(held >= 100, "only {held} records given: the room is 64 MiB");
    for ack in acks {
        ack.await.expect("stored once the broker runs");
    }
}

/// A consumer whose application takes longer over a record than the stream's silence limit
/// (15 s with the broker's default heartbeat) is not cut when it comes back: the broker may
/// have sent nothing meanwhile (here a 3 MiB delivery fills the stream's window, and the
/// heartbeats wait behind it), and the silence counts only while the consumer waits. Found by
/// helper-93 in the first version of the silence limit, which cut such a stream
/// (STREAM_SILENT) and delivered its records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_takes_its_time_over_a_record_is_not_cut_as_silent() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic_with(
            "slow",
            weft_client::TopicSettings {
                partitions: 1,
                max_message_bytes: Some(4 * 1024 * 1024),
                ..weft_client::TopicSettings::default()
            },
        )
        .await
        .expect("create");
    let producer = client.producer(ProducerConfig::default());
    producer
        .send("slow", Record::new("first"))
        .await
        .expect("stored");
    let mut consumer = client
        .consumer(ConsumerConfig {
            reconnects_max: 0,
            ..ConsumerConfig::new("slow").start(StartFrom::Earliest)
        })
        .await
        .expect("consumer");
    let first = consumer.next().await.expect("first").expect("a record");
    assert_eq!(first.offset, 0);
    producer
        .send("slow", Record::new(vec![3u8; 3 * 1024 * 1024]))
        .await
        .expect("stored");
    // The application works on the first record for longer than the silence limit.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let second = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("within 20 s")
        .expect("not cut as silent")
        .expect("a record");
    assert_eq!(second.offset, 1);
    assert_eq!(second.value.len(), 3 * 1024 * 1024);
}

/// A producer follows a topic's partitions as they grow: a key goes where every other producer
/// (and a new one) puts it. Before, the partition count the producer saw at its first send
/// stayed for its life: it kept hashing keys over 2 partitions after the topic grew to 4, and
/// one key's records went to two partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_follows_a_topic_whose_partitions_grow() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("grows", 2)
        .await
        .expect("create");
    let key = (0..1000u32)
        .map(|i| format!("key-{i}"))
        .find(|k| {
            weft_client::partition_for_key(k.as_bytes(), 2)
                != weft_client::partition_for_key(k.as_bytes(), 4)
        })
        .expect("a key that moves");
    let producer = client.producer(ProducerConfig::default());
    let first = producer
        .send("grows", Record::new("before").key(key.clone()))
        .await
        .expect("stored");
    assert_eq!(
        first.partition,
        weft_client::partition_for_key(key.as_bytes(), 2)
    );
    client
        .admin()
        .update_topic(
            "grows",
            &weft_client::TopicUpdate {
                partitions: Some(4),
                ..Default::default()
            },
        )
        .await
        .expect("grow");
    let want = weft_client::partition_for_key(key.as_bytes(), 4);
    // The producer learns of it at its next refresh of the topic (every 10 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ack = producer
            .send("grows", Record::new("after").key(key.clone()))
            .await
            .expect("stored");
        if ack.partition == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the key still goes to partition {} 30 s after the topic grew",
            ack.partition
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    producer.close().await.expect("close");
}

/// Keyless records sent one at a time spread over the topic's partitions: the sticky
/// partitioner moves on with every batch that closes. Before, only a full batch moved it, so
/// a producer sending few records at a time put all of them in one partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_records_sent_one_at_a_time_spread_over_the_partitions() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("spread", 4)
        .await
        .expect("create");
    let producer = client.producer(ProducerConfig::default());
    let mut partitions = std::collections::BTreeSet::new();
    for i in 0..40 {
        let ack = producer
            .send("spread", Record::new(format!("r{i}")))
            .await
            .expect("stored");
        partitions.insert(ack.partition);
    }
    assert_eq!(partitions.len(), 4, "{partitions:?}");
    producer.close().await.expect("close");
}

/// A record larger than the broker's gRPC message limit (yet within what the client sends) ends
/// the topic's publish stream: the broker cannot read it, so it cannot name it by its request
/// id. It names the last request it read whole instead, and refuses the unreadable one as
/// RESOURCE_EXHAUSTED, BATCH_TOO_LARGE. Only that record fails; the small records in flight
/// beside it on the same stream are stored. Before, the stream's oldest unanswered request
/// took the blame (OUT_OF_RANGE, an unknown outcome: a small record that was stored reported
/// as failed) and the large one was sent again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_cannot_read_fails_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(
        &config,
        "grpc_message_bytes_max = 1048576\nfetch_bytes_max = 524288\n",
    )
    .expect("config");
    let config = config.to_str().expect("utf-8").to_string();
    let broker = Broker::start_with(&["--config", &config]);
    let client = broker.client().await;
    client.admin().create_topic("big", 2).await.expect("create");
    let producer = client.producer(ProducerConfig::default());
    for round in 0..5 {
        let mut smalls = Vec::new();
        for i in 0..8 {
            smalls.push(
                producer
                    .send_nowait("big", Record::new(format!("s{round}-{i}")).partition(0))
                    .await
                    .expect("queued"),
            );
        }
        let large = producer
            .send_nowait("big", Record::new(vec![b'x'; 2 * 1024 * 1024]).partition(1))
            .await
            .expect("queued: within the client's own limit");
        match large.await {
            Err(e) => assert_eq!(e.reason(), "BATCH_TOO_LARGE", "round {round}: {e}"),
            Ok(ack) => panic!("round {round}: a record the broker cannot read was stored: {ack:?}"),
        }
        for small in smalls {
            small
                .await
                .unwrap_or_else(|e| panic!("round {round}: a small record failed: {e}"));
        }
    }
    producer.close().await.expect("close");
    for (partition, stored) in [(0, 40), (1, 0)] {
        let end = offsets(&broker.client_addr, "big", partition, None)
            .await
            .expect("offsets");
        assert_eq!(end.high_watermark, stored, "partition {partition}: {end:?}");
    }
}

/// Subscribe calls a broker has answered, whatever their outcome.
fn subscribe_calls(broker: &Broker) -> f64 {
    let (status, body) = broker.http("GET", "/metrics", None);
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| {
            l.starts_with("weft_rpc_requests_total{") && l.contains(r#"method="Subscribe""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A consumer whose subscription is refused for good (its topic deleted), called again and
/// again by an application that logs the error and carries on, waits longer before each new
/// attempt: a handful of Subscribe calls in 3 s. Before, a failed open left the old stream's
/// times in place, so each call found a stream that "had worked", waited nothing, and asked
/// again at once: thousands of calls a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_refused_for_good_does_not_spin() {
    let broker = Broker::start();
    ok_stdout(&broker.cli(&["topic", "create", "spin", "--partitions", "1"]));
    ok_stdout(&broker.cli(&["produce", "spin", "a"]));
    let client = broker.client().await;
    let mut consumer = client
        .consumer(ConsumerConfig::new("spin").start(StartFrom::Earliest))
        .await
        .expect("subscribe");
    let first = consumer
        .next_timeout(Duration::from_secs(10))
        .await
        .expect("read")
        .expect("a record");
    assert_eq!(first.value.as_ref(), b"a");
    // A stream that lived a while, then its topic goes.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    ok_stdout(&broker.cli(&["topic", "delete", "spin"]));
    let before = subscribe_calls(&broker);
    let (mut calls, mut errors) = (0u32, 0u32);
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until && calls < 100_000 {
        calls += 1;
        if consumer
            .next_timeout(Duration::from_millis(200))
            .await
            .is_err()
        {
            errors += 1;
        }
    }
    assert!(errors > 0, "the refusal is reported ({calls} calls)");
    let made = subscribe_calls(&broker) - before;
    assert!(
        made <= 25.0,
        "{made} Subscribe calls in 3 s ({calls} calls of next, {errors} errors)"
    );
}
