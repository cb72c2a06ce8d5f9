//! A broker asked to stop (SIGTERM) while clients hold long calls open, over HTTP/2 and over
//! QUIC: it ends its Subscribe and PublishStream streams with UNAVAILABLE (the broker is
//! shutting down: resume elsewhere), answers a waiting long-poll Fetch with what it has, and
//! exits well within its shutdown grace instead of waiting the whole grace out for streams
//! that never end on their own.

use std::time::{Duration, Instant};

use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{Body, StdError};
use weft_client::{Client, ProducerConfig, Record};
use weft_proto::v1::publisher_client::PublisherClient;
use weft_proto::v1::subscriber_client::SubscriberClient;
use weft_proto::v1::{
    Credit, FetchRequest, FetchResponse, PublishRequest, StartPosition, SubscribeRequest,
    SubscribeResponse, SubscribeStart, publish_request, start_position, subscribe_request,
};
use weft_tests::pki::Pki;
use weft_tests::{Broker, within};

/// Far longer than the test lets the broker take to stop.
const GRACE_MS: u64 = 25_000;
/// How long a stop may take with every long call ended at once.
const PROMPT: Duration = Duration::from_secs(8);

fn publish_request(id: u64, value: &str) -> PublishRequest {
    PublishRequest {
        topic: "held".into(),
        target: Some(publish_request::Target::Partition(0)),
        records: vec![weft_proto::v1::Record {
            value: value.as_bytes().to_vec().into(),
            ..Default::default()
        }],
        request_id: id,
        ..Default::default()
    }
}

fn subscribe_start() -> SubscribeRequest {
    SubscribeRequest {
        request: Some(subscribe_request::Request::Start(SubscribeStart {
            topic: "held".into(),
            start: Some(StartPosition {
                position: Some(start_position::Position::Earliest(
                    start_position::Earliest {},
                )),
            }),
            credit: Some(Credit {
                records: 1000,
                bytes: 1 << 20,
            }),
            ..Default::default()
        })),
    }
}

/// SIGTERM from a blocking thread; the broker back with its exit code and how long it took.
async fn stop(mut broker: Broker) -> (Broker, Option<i32>, Duration) {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let code = broker.stop();
        (broker, code, started.elapsed())
    })
    .await
    .expect("stop")
}

/// Reads a stream until it ends; the status it ended with (OK when it ended cleanly).
async fn end_of<T>(stream: &mut tonic::Streaming<T>) -> tonic::Status {
    within("the stream to end", Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return tonic::Status::ok(""),
                Err(status) => return status,
            }
        }
    })
    .await
}

fn assert_shutting_down(what: &str, status: &tonic::Status) {
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "{what} ends as UNAVAILABLE: {status:?}"
    );
    assert!(
        status.message().contains("shutting down"),
        "{what} says why: {status:?}"
    );
}

/// Holds a Subscribe stream, a PublishStream and a long-poll Fetch open on `channel`, then
/// stops the broker and checks how each ended and how long the stop took.
async fn stop_with_long_calls_open<C>(broker: Broker, channel: C)
where
    C: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    C::Error: Into<StdError>,
    C::ResponseBody: Body<Data = bytes::Bytes> + Send + 'static,
    <C::ResponseBody as Body>::Error: Into<StdError> + Send,
    C::Future: Send,
{
    let mut subscriber = SubscriberClient::new(channel.clone());
    let mut publisher = PublisherClient::new(channel);

    // A subscription that has read the record there is and waits for more.
    let (subscribe_tx, subscribe_rx) = tokio::sync::mpsc::channel(4);
    subscribe_tx.send(subscribe_start()).await.expect("start");
    let mut subscription = subscriber
        .subscribe(ReceiverStream::new(subscribe_rx))
        .await
        .expect("subscribe")
        .into_inner();
    within("the first delivery", Duration::from_secs(10), async {
        loop {
            let message: SubscribeResponse =
                subscription.message().await.expect("stream").expect("open");
            if matches!(
                message.event,
                Some(weft_proto::v1::subscribe_response::Event::Delivery(_))
            ) {
                break;
            }
        }
    })
    .await;

    // A publish stream with one answered request, left open.
    let (publish_tx, publish_rx) = tokio::sync::mpsc::channel(4);
    publish_tx
        .send(publish_request(1, "second"))
        .await
        .expect("send");
    let mut publishing = publisher
        .publish_stream(ReceiverStream::new(publish_rx))
        .await
        .expect("publish stream")
        .into_inner();
    let answer = within("the publish answer", Duration::from_secs(10), async {
        publishing.message().await.expect("answer").expect("open")
    })
    .await;
    assert_eq!(answer.request_id, 1);

    // A long poll past the end of the log.
    let fetch = tokio::spawn(async move {
        subscriber
            .fetch(FetchRequest {
                topic: "held".into(),
                partition: 0,
                offset: 2,
                max_wait_ms: GRACE_MS as u32,
                min_bytes: 1,
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!fetch.is_finished(), "the long poll waits for data");

    let (broker, code, took) = stop(broker).await;
    let log = broker.log();
    assert_eq!(code, Some(0), "SIGTERM exits 0; log:\n{log}");
    assert!(
        took < PROMPT,
        "the broker stopped in {took:?} with streams open (grace {GRACE_MS} ms); log:\n{log}"
    );
    assert!(
        !log.contains("did not finish within shutdown_grace_ms"),
        "every call finished before the grace ran out; log:\n{log}"
    );
    assert_shutting_down("the Subscribe stream", &end_of(&mut subscription).await);
    assert_shutting_down("the PublishStream", &end_of(&mut publishing).await);
    let fetched: FetchResponse = fetch
        .await
        .expect("fetch task")
        .expect("the long poll is answered, not cut off")
        .into_inner();
    assert!(fetched.records.is_empty(), "nothing past the end");
    assert_eq!(fetched.high_watermark, 2);
    drop(publish_tx);
    drop(subscribe_tx);
}

/// A topic `held` of one partition holding one record.
async fn prepare(client: &Client) {
    client
        .admin()
        .create_topic("held", 1)
        .await
        .expect("create");
    client
        .producer(ProducerConfig::default())
        .send("held", Record::new("first").partition(0))
        .await
        .expect("publish");
}

fn config_with_grace(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("weft.toml");
    std::fs::write(&path, format!("shutdown_grace_ms = {GRACE_MS}\n{extra}")).expect("config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_long_calls_and_stops_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_with_grace(dir.path(), "");
    let broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    prepare(&broker.client().await).await;
    let channel = weft_tests::grpc::channel(&broker.client_addr).await;
    stop_with_long_calls_open(broker, channel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_long_calls_over_quic_and_stops_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "quic");
    let (cert, key) = pki.issue("broker", "weft-0", None, true);
    let ca = pki.ca_file();
    let config = config_with_grace(
        dir.path(),
        &format!("[tls.quic]\ncert_file = {cert:?}\nkey_file = {key:?}\n"),
    );
    let broker = Broker::start_with(&[
        "--config",
        config.to_str().expect("path"),
        "--quic-listen",
        "127.0.0.1:0",
    ]);
    prepare(&broker.client().await).await;
    let tls = weft_proto::tls::client_config(&weft_proto::tls::TlsFiles {
        cert_file: None,
        key_file: None,
        ca_file: Some(ca),
    })
    .expect("TLS");
    let channel =
        weft_proto::quic::QuicChannel::new(&broker.quic_addr, "127.0.0.1", tls).expect("channel");
    stop_with_long_calls_open(broker, channel).await;
}

/// A subscriber that stopped reading (its HTTP/2 flow-control window is full, so the broker
/// cannot even send the end of its stream) does not hold the broker's stop for the whole grace:
/// its connection is cut once it has made no progress for a moment after the stop began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_subscriber_that_stopped_reading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_with_grace(dir.path(), "");
    let broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    let client = broker.client().await;
    prepare(&client).await;
    // 8 MiB more than any window the subscriber's connection grants.
    let producer = client.producer(ProducerConfig::default());
    let value = vec![b'x'; 64 * 1024];
    let mut acks = Vec::new();
    for _ in 0..128 {
        acks.push(
            producer
                .send_nowait("held", Record::new(value.clone()).partition(0))
                .await
                .expect("queued"),
        );
    }
    for ack in acks {
        ack.await.expect("published");
    }
    let channel = weft_tests::grpc::channel(&broker.client_addr).await;
    let mut subscriber = SubscriberClient::new(channel);
    let (subscribe_tx, subscribe_rx) = tokio::sync::mpsc::channel(4);
    let mut start = subscribe_start();
    if let Some(subscribe_request::Request::Start(s)) = start.request.as_mut() {
        s.credit = Some(Credit {
            records: 100_000,
            bytes: 64 << 20,
        });
    }
    subscribe_tx.send(start).await.expect("start");
    let mut subscription = subscriber
        .subscribe(ReceiverStream::new(subscribe_rx))
        .await
        .expect("subscribe")
        .into_inner();
    // One message read, then nothing: the broker fills the windows and waits.
    subscription.message().await.expect("stream").expect("open");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (broker, code, took) = stop(broker).await;
    eprintln!("stopped in {took:?} with a subscriber that stopped reading");
    assert_eq!(code, Some(0), "clean exit: {}", broker.log());
    assert!(
        took < PROMPT,
        "stopping took {took:?} (grace {GRACE_MS} ms): a subscriber that stopped reading held it"
    );
    drop(subscription);
    drop(subscribe_tx);
}

/// A SIGTERM that comes while the broker starts (here a seed waiting up to 5 s for its peers
/// to say whether they have a cluster; a pod deleted at that moment) stops it gracefully, exit
/// status 0. Before, the signal handler was only installed once the broker was ready, so such
/// a SIGTERM killed the process (and so did one sent just after its ready line: seen as a
/// flaky `acl` test whose broker, stopped right after starting, died by the signal).
#[test]
fn sigterm_while_starting_stops_the_broker_gracefully() {
    weft_tests::ensure_binaries();
    let dir = tempfile::tempdir().expect("temp dir");
    let [client, peer, admin] = [(); 3].map(|()| format!("127.0.0.1:{}", weft_tests::free_port()));
    // Peers 2 and 3 never start: node 1 asks them for a while before it starts a cluster.
    let peers = format!(
        "1@{peer},2@127.0.0.1:{},3@127.0.0.1:{}",
        weft_tests::free_port(),
        weft_tests::free_port()
    );
    let log = std::fs::File::create(dir.path().join("broker.log")).expect("log");
    let mut child = std::process::Command::new(weft_tests::binary("weft-broker"))
        .args(["--node-id", "1", "--peers", &peers])
        .args([
            "--data-dir",
            dir.path().join("data").to_str().expect("utf-8"),
        ])
        .args(["--client-listen", &client, "--peer-listen", &peer])
        .args(["--admin-listen", &admin])
        .env("WEFT_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn weft-broker");
    // Its listeners are bound before it starts the node: once its client port takes a
    // connection, it is starting.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&client).is_err() {
        assert!(Instant::now() < deadline, "the broker never bound its port");
        std::thread::sleep(Duration::from_millis(10));
    }
    let read_log = || std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default();
    assert!(
        !read_log().contains("weft-broker ready"),
        "the broker was ready already: {}",
        read_log()
    );
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the broker did not stop after SIGTERM; log:\n{}",
                read_log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.code(),
        Some(0),
        "a graceful stop, not death by the signal ({status}); log:\n{}",
        read_log()
    );
    assert!(
        read_log().contains("asked to stop while starting"),
        "{}",
        read_log()
    );
}
