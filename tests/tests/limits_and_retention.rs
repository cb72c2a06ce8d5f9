//! The producer keeps batches within the topic's `max_message_bytes`; retention by bytes runs in
//! the background and deletes old segments while consumers keep reading what is retained.

use std::time::{Duration, Instant};

use weft_client::{ConsumerConfig, ProducerConfig, Record, StartFrom, TopicSettings};
use weft_proto::v1::{
    Credit, StartPosition, SubscribeRequest, SubscribeStart, start_position, subscribe_request,
    subscribe_response,
};
use weft_tests::Broker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_batches_respect_a_small_topic_limit() {
    let broker = Broker::start();
    let client = broker.client().await;
    let settings = TopicSettings {
        partitions: 1,
        max_message_bytes: Some(16 * 1024),
        ..TopicSettings::default()
    };
    client
        .admin()
        .create_topic_with("small", settings)
        .await
        .expect("create");
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(50),
        ..ProducerConfig::default()
    });
    let mut acks = Vec::new();
    for i in 0..400 {
        let record = Record::new(vec![b'v'; 700])
            .key(format!("key-{i}"))
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("a", "1")
            .header("b", "2")
            .header("c", "3");
        acks.push(producer.send_nowait("small", record).await.expect("queued"));
    }
    for ack in acks {
        ack.await.expect("every batch fits the topic's limit");
    }
    producer.close().await.expect("close");
    // And the batches were not trivially small: 400 records of about 800 bytes went in batches
    // of several records each (up to about 20 fit in 16 KiB).
    // (Batches, whichever call carried them: each one passes the partition's publish queue.)
    let publishes = weft_tests::metric(&broker, "weft_publish_queue_seconds_count")
        .expect("the publish queue's count");
    eprintln!("{publishes} batches");
    assert!(
        publishes <= 100.0,
        "400 records took {publishes} batches: batches fill up to the limit"
    );
}

/// The next Delivery on a raw Subscribe stream (skipping heartbeats and other events).
async fn next_delivery(
    stream: &mut tonic::Streaming<weft_proto::v1::SubscribeResponse>,
) -> weft_proto::v1::Delivery {
    loop {
        if let Some(subscribe_response::Event::Delivery(d)) =
            stream.message().await.expect("stream").expect("open").event
        {
            return d;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_bytes_deletes_old_segments_in_the_background() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    // Heartbeats far apart: a stream waiting for one shows (see the subscriber below).
    std::fs::write(
        &config,
        "retention_check_interval_ms = 100\nstream_heartbeat_ms = 120000\n",
    )
    .expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("utf-8")]);
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"rolling","partitions":1,"segment_bytes":1048576,"retention_bytes":1048576,"max_message_bytes":65536}"#),
    );
    assert_eq!(status, 201, "{body}");
    let client = broker.client().await;
    // A subscriber with credit for one record, from the start: retention will remove what it
    // has not read.
    let (credit_tx, mut stream) = weft_tests::grpc::subscribe(
        &broker.client_addr,
        SubscribeStart {
            topic: "rolling".into(),
            start: Some(StartPosition {
                position: Some(start_position::Position::Earliest(
                    start_position::Earliest {},
                )),
            }),
            credit: Some(Credit {
                records: 1,
                bytes: 1 << 20,
            }),
            ..Default::default()
        },
    )
    .await;
    let producer = client.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    for i in 0..4000 {
        acks.push(
            producer
                .send_nowait("rolling", Record::new(format!("{i:>1024}")))
                .await
                .expect("queued"),
        );
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    producer.close().await.expect("close");

    // A pass that ran while records were still arriving may have left more behind; the next
    // passes (every 100 ms) must bring the log down to about retention_bytes plus the active
    // segment, and then leave it there (the start stays put for half a second, five passes:
    // reading it while a pass was still due made the reads below race that pass).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut settled: Option<(u64, Instant)> = None;
    let start = loop {
        let (_, body) = broker.http("GET", "/v1/topics/rolling", None);
        let topic: serde_json::Value = serde_json::from_str(&body).expect("json");
        let p = &topic["partition_details"][0];
        let start = p["log_start_offset"].as_u64().expect("log_start_offset");
        let size = p["size_bytes"].as_u64().expect("size_bytes");
        if start > 0 && size < 3 * 1024 * 1024 {
            match settled {
                Some((seen, since)) if seen == start => {
                    if since.elapsed() >= Duration::from_millis(500) {
                        break start;
                    }
                }
                _ => settled = Some((start, Instant::now())),
            }
        }
        assert!(
            Instant::now() < deadline,
            "retention never brought the log to about retention_bytes plus the active segment \
             (start {start}, {size} bytes): {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(start < 4000);
    // The subscriber read its one record, then retention passed its position: credit for more
    // delivers from the retained start at once. Before, the stream moved its position and then
    // waited for the next heartbeat (or a new record) to deliver.
    let first_delivered = next_delivery(&mut stream).await;
    assert_eq!(first_delivered.records[0].offset, 0);
    credit_tx
        .send(SubscribeRequest {
            request: Some(subscribe_request::Request::Credit(Credit {
                records: 1,
                bytes: 1 << 20,
            })),
        })
        .await
        .expect("grant credit");
    let after = tokio::time::timeout(Duration::from_secs(20), next_delivery(&mut stream))
        .await
        .expect("delivered without waiting for a heartbeat");
    assert_eq!(after.records[0].offset, start, "from the retained start");
    drop(credit_tx);
    // What is retained reads from the new start, in order, to the end.
    let mut consumer = client
        .consumer(ConsumerConfig::new("rolling").start(StartFrom::Earliest))
        .await
        .expect("subscribe");
    let first = consumer
        .next_timeout(Duration::from_secs(10))
        .await
        .expect("next")
        .expect("a record");
    assert_eq!(
        first.offset, start,
        "reading from earliest starts at the retained start"
    );
    // Up to the last record written (an exact end, not an idle gap).
    let mut last = first.offset;
    while last < 3999 {
        let m = consumer
            .next_timeout(Duration::from_secs(30))
            .await
            .expect("next")
            .unwrap_or_else(|| panic!("records after {last} never arrived"));
        assert_eq!(m.offset, last + 1);
        last = m.offset;
    }
    // A Fetch of what retention removed is OUT_OF_RANGE, naming the retained start (the start
    // seen above or a later one: retention may have run again since).
    let channel = weft_tests::grpc::channel(&broker.client_addr).await;
    let removed = weft_tests::grpc::subscriber(&channel)
        .fetch(weft_proto::v1::FetchRequest {
            topic: "rolling".into(),
            partition: 0,
            offset: 0,
            max_bytes: 65536,
            ..Default::default()
        })
        .await
        .expect_err("offset 0 was removed");
    assert_eq!(removed.code(), tonic::Code::OutOfRange, "{removed:?}");
    let details = tonic_types::StatusExt::get_error_details(&removed);
    let info = details.error_info().expect("error info");
    let named: u64 = info
        .metadata
        .get("log_start_offset")
        .and_then(|s| s.parse().ok())
        .expect("log_start_offset");
    assert!(named >= start && named > 0, "{info:?}");
    // A group cannot be reset to what retention removed: the admin API refuses the offset,
    // the CLI's `earliest` is the retained start.
    let (status, body) = broker.http(
        "PUT",
        "/v1/groups/rewinders/offsets",
        Some(r#"{"topic":"rolling","offsets":[{"partition":0,"offset":0}]}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("before the log start"), "{body}");
    let plan = weft_tests::ok_stdout(&broker.cli(&[
        "-o",
        "json",
        "group",
        "reset-offsets",
        "rewinders",
        "--topic",
        "rolling",
        "--to",
        "earliest",
        "--execute",
    ]));
    let plan: serde_json::Value = serde_json::from_str(&plan).expect("json");
    let reset_to = plan["partitions"][0]["new_offset"]
        .as_u64()
        .expect("offset");
    assert!(
        reset_to >= start,
        "reset to {reset_to}, before the start {start}: {plan}"
    );
}

/// Asks `channel`'s broker whether it serves: the call's status code, OK when it does.
async fn health_check(channel: tonic::transport::Channel) -> tonic::Code {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let call = health.check(tonic_health::pb::HealthCheckRequest::default());
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(_)) => tonic::Code::Ok,
        Ok(Err(status)) => status.code(),
        Err(_) => panic!("the health check did not end in 10 s"),
    }
}

/// A connection to `address` whose first call goes out on it (none once it cannot be made).
async fn connection(address: &str) -> Option<tonic::transport::Channel> {
    tonic::transport::Channel::from_shared(format!("http://{address}"))
        .expect("uri")
        .connect()
        .await
        .ok()
}

/// A broker holds at most `connections_max` client connections (like NATS's
/// `max_connections`). Past it, a few more may only check health or drain the broker (the
/// kubelet's probes and the preStop drain still get through): any other call on them is
/// answered UNAVAILABLE naming the key (the CLI says so), and the broker closes such a
/// connection once it is idle, so its client connects again and gets a place of its own once
/// one is free. Refusals are counted in `weft_client_connections_refused_total`, open
/// connections in `weft_client_connections`; the connections held keep working. Before,
/// client connections were not bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_past_connections_max_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "connections_max = 2\n").expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    let open = |broker: &Broker| weft_tests::metric(broker, "weft_client_connections ");
    let open_falls_to = async |n: f64| {
        weft_tests::wait_for(
            &format!("{n} client connections open"),
            Duration::from_secs(10),
            || std::future::ready((open(&broker) == Some(n)).then_some(())),
        )
        .await
    };
    // The connections a start-up check made are closed by now.
    open_falls_to(0.0).await;
    let who_am_i = |channel: tonic::transport::Channel| async move {
        let mut metadata = weft_proto::v1::metadata_client::MetadataClient::new(channel);
        let call = metadata.who_am_i(weft_proto::v1::WhoAmIRequest {});
        match tokio::time::timeout(Duration::from_secs(10), call).await {
            Ok(answer) => answer.map(|_| ()),
            Err(_) => panic!("WhoAmI did not end in 10 s"),
        }
    };
    let first = connection(&broker.client_addr).await.expect("first");
    let second = connection(&broker.client_addr).await.expect("second");
    who_am_i(first.clone()).await.expect("served");
    who_am_i(second.clone()).await.expect("served");
    assert_eq!(open(&broker), Some(2.0), "two connections open");
    // A third: health checks only; anything else is refused, and the connection closed.
    let third = connection(&broker.client_addr).await.expect("third");
    assert_eq!(health_check(third.clone()).await, tonic::Code::Ok);
    let refused = who_am_i(third.clone()).await.expect_err("only probes");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("connections_max"), "{refused:?}");
    open_falls_to(2.0).await;
    assert!(
        weft_tests::metric(
            &broker,
            "weft_client_connections_refused_total{listener=\"client\"} "
        )
        .unwrap_or(0.0)
            >= 1.0,
        "the refusal is counted"
    );
    // The CLI is refused meanwhile, and says why.
    let cli = broker.cli(&["--timeout-ms", "1500", "topic", "list"]);
    assert!(
        !cli.status.success(),
        "the CLI cannot work while the broker is full"
    );
    assert!(
        String::from_utf8_lossy(&cli.stderr).contains("connections_max"),
        "the CLI names the key: {}",
        String::from_utf8_lossy(&cli.stderr)
    );
    // The two held still work. The third's client keeps calling, every 100 ms: refused, its
    // connection is closed all the same (not kept open by its traffic), and once one of the
    // two is closed, connecting again, it is served.
    who_am_i(first.clone()).await.expect("still served");
    let calling = tokio::spawn(async move {
        let began = Instant::now();
        while began.elapsed() < Duration::from_secs(15) {
            if who_am_i(third.clone()).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(second);
    assert!(
        calling.await.expect("caller"),
        "a client that kept calling on its place kept for probes was never served"
    );
    who_am_i(first).await.expect("still served");
}

/// A client connection with no call open for `connections_idle_ms` is closed (Kafka's
/// `connections.max.idle.ms`) and counted in `weft_client_connections_idle_closed_total`; its
/// client connects again on its next call. A connection with a stream open stays, however long
/// nothing moves on it (a Subscribe waiting for records, its heartbeats far apart), and the
/// stream then delivers. Before, an idle connection kept its place for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_idle_past_connections_idle_ms_are_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(
        &config,
        "connections_idle_ms = 1200\nstream_heartbeat_ms = 120000\n",
    )
    .expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    let open = |broker: &Broker| weft_tests::metric(broker, "weft_client_connections ");
    let idle_closed = |broker: &Broker| {
        weft_tests::metric(
            broker,
            "weft_client_connections_idle_closed_total{listener=\"client\"} ",
        )
        .unwrap_or(0.0)
    };
    let open_falls_to = async |n: f64| {
        weft_tests::wait_for(
            &format!("{n} client connections open"),
            Duration::from_secs(10),
            || std::future::ready((open(&broker) == Some(n)).then_some(())),
        )
        .await
    };
    let who_am_i = |channel: tonic::transport::Channel| async move {
        let mut metadata = weft_proto::v1::metadata_client::MetadataClient::new(channel);
        let call = metadata.who_am_i(weft_proto::v1::WhoAmIRequest {});
        match tokio::time::timeout(Duration::from_secs(10), call).await {
            Ok(answer) => answer.map(|_| ()),
            Err(_) => panic!("WhoAmI did not end in 10 s"),
        }
    };
    broker
        .client()
        .await
        .admin()
        .create_topic("quiet", 1)
        .await
        .expect("create");
    open_falls_to(0.0).await;
    let closed_before = idle_closed(&broker);

    // A connection whose client calls every 700 ms (more than the half second of quiet after
    // which an idle one may be cut, less than the limit) is not idle, however short its calls:
    // never cut. Before helper-92's fix, it was cut about the limit after it opened, its
    // calls being answered between two looks.
    let busy = connection(&broker.client_addr).await.expect("connect");
    for _ in 0..8 {
        who_am_i(busy.clone())
            .await
            .expect("a busy connection is kept");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_eq!(
        idle_closed(&broker),
        closed_before,
        "no busy connection closed as idle"
    );
    drop(busy);
    open_falls_to(0.0).await;
    let closed_before = idle_closed(&broker);

    let idle = connection(&broker.client_addr).await.expect("connect");
    who_am_i(idle.clone()).await.expect("served");
    open_falls_to(0.0).await;
    assert!(idle_closed(&broker) > closed_before, "the close is counted");
    // Its client connects again for its next call.
    who_am_i(idle.clone()).await.expect("served again");

    // A Subscribe stream open on a connection keeps it, though nothing moves for longer than
    // the limit.
    let (_tx, mut stream) = weft_tests::grpc::subscribe(
        &broker.client_addr,
        SubscribeStart {
            topic: "quiet".into(),
            partitions: vec![0],
            credit: Some(Credit {
                records: 100,
                bytes: 1 << 20,
            }),
            start: Some(StartPosition {
                position: Some(start_position::Position::Earliest(
                    start_position::Earliest {},
                )),
            }),
            ..SubscribeStart::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        open(&broker),
        Some(1.0),
        "only the subscriber's connection is open"
    );
    let client = broker.client().await;
    let producer = client.producer(ProducerConfig::default());
    producer
        .send_nowait("quiet", Record::new(b"after a quiet while".to_vec()))
        .await
        .expect("queued")
        .await
        .expect("acknowledged");
    let delivery = tokio::time::timeout(Duration::from_secs(10), next_delivery(&mut stream))
        .await
        .expect("the stream delivers within 10 s");
    assert_eq!(delivery.partition, 0);
}

/// Past `connections_max` and the 8 places kept for probes (each kept busy with health checks,
/// so none closes as idle), a connection is closed as soon as it is accepted, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_the_places_kept_for_probes_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "connections_max = 1\n").expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    let open = |broker: &Broker| weft_tests::metric(broker, "weft_client_connections ");
    weft_tests::wait_for("no client connection open", Duration::from_secs(10), || {
        std::future::ready((open(&broker) == Some(0.0)).then_some(()))
    })
    .await;
    let held = connection(&broker.client_addr).await.expect("held");
    assert_eq!(health_check(held.clone()).await, tonic::Code::Ok);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut probes = Vec::new();
    for _ in 0..8 {
        let probe = connection(&broker.client_addr).await.expect("probe");
        assert_eq!(health_check(probe.clone()).await, tonic::Code::Ok);
        let mut stopped = stopped.clone();
        probes.push(tokio::spawn(async move {
            // Bounded: until told to stop, at most 30 s.
            let began = Instant::now();
            while !*stopped.borrow_and_update() && began.elapsed() < Duration::from_secs(30) {
                assert_eq!(health_check(probe.clone()).await, tonic::Code::Ok);
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }));
    }
    assert_eq!(
        open(&broker),
        Some(9.0),
        "one place and the 8 kept for probes"
    );
    let before = weft_tests::metric(
        &broker,
        "weft_client_connections_refused_total{listener=\"client\"} ",
    )
    .unwrap_or(0.0);
    let closed = match connection(&broker.client_addr).await {
        Some(closed) => health_check(closed).await,
        None => tonic::Code::Unavailable,
    };
    assert_ne!(closed, tonic::Code::Ok, "a tenth connection is closed");
    let after = weft_tests::metric(
        &broker,
        "weft_client_connections_refused_total{listener=\"client\"} ",
    )
    .unwrap_or(0.0);
    assert!(
        after > before,
        "the closed connection is counted ({before} -> {after})"
    );
    stop.send(true).expect("stop the probes");
    for probe in probes {
        probe.await.expect("every probe served");
    }
    assert_eq!(health_check(held).await, tonic::Code::Ok);
}

/// A connection accepted and left silent (one byte of an HTTP/2 preface, then nothing) does not
/// keep its place among `connections_max` for good: it is cut after a while (10 s; here 500 ms
/// through a test hook), and a real client gets the place. Before, a silent socket held a place
/// until the client closed it, so a few thousand of them locked every client out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_does_not_keep_its_place() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "connections_max = 1\n").expect("config");
    let broker = Broker::start_with_env(
        &["--config", config.to_str().expect("path")],
        &[("WEFT_TEST_FIRST_BYTE_MS", "500")],
    );
    let open = |broker: &Broker| weft_tests::metric(broker, "weft_client_connections ");
    weft_tests::wait_for("no client connection open", Duration::from_secs(10), || {
        std::future::ready((open(&broker) == Some(0.0)).then_some(()))
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(&broker.client_addr)
        .await
        .expect("connect");
    silent.write_all(b"P").await.expect("one byte");
    weft_tests::wait_for(
        "the silent connection counted",
        Duration::from_secs(5),
        || std::future::ready((open(&broker) == Some(1.0)).then_some(())),
    )
    .await;
    // Cut: the broker closes it (after its own HTTP/2 settings): the read ends, at the end of
    // the stream or with a reset, within the limit (`within` fails the test otherwise).
    let mut received = Vec::new();
    let _ended = weft_tests::within(
        "the broker closing the silent connection",
        Duration::from_secs(10),
        silent.read_to_end(&mut received),
    )
    .await;
    weft_tests::wait_for("the place freed", Duration::from_secs(5), || {
        std::future::ready((open(&broker) == Some(0.0)).then_some(()))
    })
    .await;
    let client = connection(&broker.client_addr).await.expect("connect");
    let mut metadata = weft_proto::v1::metadata_client::MetadataClient::new(client);
    metadata
        .who_am_i(weft_proto::v1::WhoAmIRequest {})
        .await
        .expect("a real client is served");
}

/// A broker hosts at most `partition_replicas_max` partition replicas: a topic created or grown
/// past it is refused with RESOURCE_EXHAUSTED (reason LIMIT_REACHED, naming the key), over
/// gRPC, the admin API (HTTP 429) and the CLI alike, and nothing of it is created; deleting a
/// topic makes room. Before, topics and partitions could be created without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_past_partition_replicas_max_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "partition_replicas_max = 5\n").expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    let client = broker.client().await;
    let admin = client.admin();
    admin.create_topic("first", 3).await.expect("3 of 5");
    let refused = |e: weft_client::Error| {
        assert_eq!(e.code(), Some(tonic::Code::ResourceExhausted), "{e}");
        assert_eq!(e.reason(), "LIMIT_REACHED", "{e}");
        assert!(!e.is_retriable(), "{e}");
        assert!(e.to_string().contains("partition_replicas_max"), "{e}");
    };
    refused(
        admin
            .create_topic("second", 3)
            .await
            .expect_err("6 of 5 is refused"),
    );
    refused(
        admin
            .update_topic(
                "first",
                &weft_client::TopicUpdate {
                    partitions: Some(6),
                    ..Default::default()
                },
            )
            .await
            .expect_err("growing to 6 of 5 is refused"),
    );
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"third","partitions":3}"#),
    );
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("partition_replicas_max"), "{body}");
    let cli = broker.cli(&["topic", "create", "fourth", "--partitions", "3"]);
    assert!(!cli.status.success(), "the CLI fails");
    assert!(
        String::from_utf8_lossy(&cli.stderr).contains("partition_replicas_max"),
        "the CLI names the key: {}",
        String::from_utf8_lossy(&cli.stderr)
    );
    // Nothing of the refused topics was made; the first kept its 3 partitions.
    // A topic that exists is ALREADY_EXISTS, not a limit, however little room is left.
    let exists = admin.create_topic("first", 3).await.expect_err("it exists");
    assert_eq!(exists.code(), Some(tonic::Code::AlreadyExists), "{exists}");
    let names: Vec<String> = admin
        .topics()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["first".to_string()]);
    // Within the limit still works; a deleted topic makes room.
    admin
        .update_topic(
            "first",
            &weft_client::TopicUpdate {
                partitions: Some(5),
                ..Default::default()
            },
        )
        .await
        .expect("5 of 5");
    admin.delete_topic("first").await.expect("delete");
    admin.create_topic("second", 3).await.expect("room again");
}
