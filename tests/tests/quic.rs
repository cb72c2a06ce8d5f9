//! gRPC over QUIC (HTTP/3), with real processes: a broker with a QUIC listener (TLS 1.3 from a
//! CA the test makes) serves our Rust client and the `weft` CLI at `quic://127.0.0.1:PORT`:
//! topic admin, pipelined publishes on a PublishStream, a consumer group's Subscribe stream and
//! its commits, the caller's identity from its client certificate; what went in over QUIC is
//! what HTTP/2 callers read. A client given several brokers carries on through another when
//! its broker dies. A client that does not trust the broker's certificate is refused, and a
//! QUIC listener without TLS is a configuration error.

use std::process::Command;
use std::time::Duration;

use weft_client::{
    Client, ConnectOptions, ConsumerConfig, ProducerConfig, Record, StartFrom, TlsOptions,
};
use weft_tests::pki::Pki;
use weft_tests::{Broker, binary, fetch_range, ok_stdout, start_cluster_with, within};

fn options(
    ca: &std::path::Path,
    cert: Option<(&std::path::Path, &std::path::Path)>,
) -> ConnectOptions {
    ConnectOptions {
        tls: Some(TlsOptions {
            ca_file: Some(ca.to_path_buf()),
            cert_file: cert.map(|c| c.0.to_path_buf()),
            key_file: cert.map(|c| c.1.to_path_buf()),
            server_name: None,
        }),
        token: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_publish_and_consume_over_quic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "quic");
    let (cert, key) = pki.issue("broker", "weft-0", None, true);
    let alice = pki.issue("alice", "alice", None, false);
    let ca = pki.ca_file();
    let config = dir.path().join("weft.toml");
    std::fs::write(
        &config,
        format!(
            "[tls.quic]\ncert_file = {cert:?}\nkey_file = {key:?}\nca_file = {ca:?}\nclient_auth = \"optional\"\n\
             [auth]\nclient_sidecar = \"envoy\"\n"
        ),
    )
    .expect("config");
    let broker = Broker::start_with(&[
        "--config",
        config.to_str().expect("path"),
        "--quic-listen",
        "127.0.0.1:0",
    ]);
    assert!(
        !broker.quic_addr.is_empty(),
        "the broker says where QUIC listens"
    );
    let quic = format!("quic://{}", broker.quic_addr);

    // Our client, with a client certificate: the broker knows it by its subject.
    let client = Client::connect_with([quic.as_str()], options(&ca, Some((&alice.0, &alice.1))))
        .await
        .expect("connect over QUIC");
    assert!(client.is_quic());
    let (principal, source) = client.who_am_i().await.expect("WhoAmI over QUIC");
    assert_eq!(
        (principal.as_str(), source.as_str()),
        ("O=weft-tests,CN=alice", "certificate")
    );
    // The client port trusts a sidecar (auth.client_sidecar = envoy), but no sidecar stands
    // in front of the QUIC port: an identity header a QUIC client sends is not believed.
    let tls = weft_proto::tls::client_config(&weft_proto::tls::TlsFiles {
        cert_file: Some(alice.0.clone()),
        key_file: Some(alice.1.clone()),
        ca_file: Some(ca.clone()),
    })
    .expect("TLS");
    let channel =
        weft_proto::quic::QuicChannel::new(&broker.quic_addr, "127.0.0.1", tls).expect("channel");
    let mut metadata = weft_proto::v1::metadata_client::MetadataClient::new(
        weft_proto::transport::Transport::quic(channel),
    );
    let mut forged = tonic::Request::new(weft_proto::v1::WhoAmIRequest {});
    forged.metadata_mut().insert(
        "x-forwarded-client-cert",
        "URI=spiffe://cluster.local/ns/weft/sa/admin"
            .parse()
            .expect("header"),
    );
    let answer = metadata
        .who_am_i(forged)
        .await
        .expect("WhoAmI")
        .into_inner();
    assert_eq!(
        (answer.principal.as_str(), answer.source.as_str()),
        ("O=weft-tests,CN=alice", "certificate"),
        "a forged sidecar header over QUIC"
    );
    client
        .admin()
        .create_topic("over-quic", 2)
        .await
        .expect("create a topic over QUIC");

    // Pipelined publishes (the producer's PublishStream) over QUIC.
    let producer = client.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    for i in 0..500u32 {
        let record = Record::new(format!("q-{i:04}")).partition(i % 2);
        acks.push(
            producer
                .send_nowait("over-quic", record)
                .await
                .expect("queue"),
        );
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    producer.close().await.expect("close");

    // A consumer group over QUIC: a Subscribe stream, then commits.
    let mut consumer = client
        .consumer(
            ConsumerConfig::new("over-quic")
                .group("quic-readers")
                .start(StartFrom::Earliest),
        )
        .await
        .expect("subscribe over QUIC");
    let mut got = Vec::new();
    while got.len() < 500 {
        let message = consumer
            .next_timeout(Duration::from_secs(20))
            .await
            .expect("consume")
            .expect("every record within 20 s");
        got.push(String::from_utf8_lossy(&message.value).into_owned());
    }
    consumer.commit().await.expect("commit over QUIC");
    consumer.close().await.expect("close");
    got.sort();
    let want: Vec<String> = (0..500).map(|i| format!("q-{i:04}")).collect();
    assert_eq!(got, want, "every record, once");

    // HTTP/2 callers read what QUIC callers wrote, and see the group's commits.
    let read = fetch_range(&broker.client_addr, "over-quic", 0, 0, 250).await;
    assert_eq!(read.len(), 250);
    assert_eq!(read[0].1.as_ref(), b"q-0000");
    let committed = weft_tests::offsets(&broker.client_addr, "over-quic", 1, Some("quic-readers"))
        .await
        .expect("offsets");
    assert_eq!(committed.committed_offset, Some(250), "{committed:?}");

    // The CLI at a quic:// address.
    let cli = |args: &[&str]| {
        Command::new(binary("weft"))
            .args([
                "--server",
                &quic,
                "--tls-ca-file",
                ca.to_str().expect("path"),
            ])
            .args(args)
            .output()
            .expect("run weft")
    };
    ok_stdout(&cli(&[
        "produce",
        "over-quic",
        "from-the-cli",
        "--partition",
        "0",
    ]));
    let out = ok_stdout(&cli(&[
        "consume",
        "over-quic",
        "--partition",
        "0",
        "--from",
        "250",
        "--count",
        "1",
    ]));
    assert!(out.contains("from-the-cli"), "{out}");

    // A client that does not trust the broker's CA is refused at the handshake.
    let other = Pki::new(dir.path(), "other");
    let refused = Client::connect_with([quic.as_str()], options(&other.ca_file(), None)).await;
    let error = refused.expect_err("an untrusted certificate");
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );
    // A malformed QUIC address is a clear error.
    let bad = Client::connect_with(["quic://no-port"], options(&ca, None)).await;
    assert!(
        bad.expect_err("no port")
            .to_string()
            .contains("quic://HOST:PORT")
    );
}

/// A client given every broker's QUIC address carries on through another broker when the one
/// it is connected to is killed (no connection close reaches it: it learns from the silence,
/// within the client's idle timeout), and what it published before and after is all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_client_fails_over_when_its_broker_dies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, ca) = quic_config(dir.path(), "quic-failover", "weft", "");
    let config = config.to_str().expect("path");
    let mut brokers = start_cluster_with(3, &["--config", config, "--quic-listen", "127.0.0.1:0"]);
    let (status, body) = brokers[1].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"away","partitions":1,"replication_factor":3}"#),
    );
    assert_eq!(status, 201, "{body}");
    let addresses: Vec<String> = brokers
        .iter()
        .map(|b| format!("quic://{}", b.quic_addr))
        .collect();
    let client = Client::connect_with(addresses.iter().map(String::as_str), options(&ca, None))
        .await
        .expect("connect over QUIC");
    let producer = client.producer(ProducerConfig::default());
    let before = within(
        "the first publish",
        Duration::from_secs(30),
        producer.send("away", Record::new("before")),
    )
    .await
    .expect("stored");
    // The client connected to the first address given.
    brokers[0].kill9();
    let after = within(
        "a publish once its broker is gone",
        Duration::from_secs(60),
        producer.send("away", Record::new("after")),
    )
    .await
    .expect("stored through another broker");
    assert_eq!((before.offset, after.offset), (0, 1));
    producer.close().await.expect("close");
    let read = fetch_range(&brokers[1].client_addr, "away", 0, 0, 2).await;
    let values: Vec<&[u8]> = read.iter().map(|(_, v)| v.as_ref()).collect();
    assert_eq!(values, [b"before".as_slice(), b"after".as_slice()]);
}

#[test]
fn a_quic_listener_needs_tls() {
    let out = Command::new(binary("weft-broker"))
        .args(["--quic-listen", "127.0.0.1:0", "--check-config"])
        .output()
        .expect("run weft-broker");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("quic_listen") && stderr.contains("TLS"),
        "{stderr}"
    );
}

/// A configuration file in `dir` with `extra` keys and a QUIC listener whose certificate
/// (for `host`) comes from a new CA named `name`; and that CA's file.
fn quic_config(
    dir: &std::path::Path,
    name: &str,
    host: &str,
    extra: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let pki = Pki::new(dir, name);
    let (cert, key) = pki.issue("broker", host, None, true);
    let config = dir.join("weft.toml");
    std::fs::write(
        &config,
        format!("{extra}[tls.quic]\ncert_file = {cert:?}\nkey_file = {key:?}\n"),
    )
    .expect("config");
    (config, pki.ca_file())
}

/// A broker with a QUIC listener (on a free port) and the settings `extra`; the CA its
/// certificate is issued by.
fn quic_broker(dir: &std::path::Path, extra: &str) -> (Broker, std::path::PathBuf) {
    let (config, ca) = quic_config(dir, "quic", "weft-0", extra);
    let broker = Broker::start_with(&[
        "--config",
        config.to_str().expect("path"),
        "--quic-listen",
        "127.0.0.1:0",
    ]);
    (broker, ca)
}

/// A Metadata client over a new QUIC channel to `broker`, trusting `ca`.
fn quic_metadata(
    broker: &Broker,
    ca: &std::path::Path,
) -> weft_proto::v1::metadata_client::MetadataClient<weft_proto::transport::Transport> {
    let tls = weft_proto::tls::client_config(&weft_proto::tls::TlsFiles {
        cert_file: None,
        key_file: None,
        ca_file: Some(ca.to_path_buf()),
    })
    .expect("TLS");
    let channel =
        weft_proto::quic::QuicChannel::new(&broker.quic_addr, "127.0.0.1", tls).expect("channel");
    weft_proto::v1::metadata_client::MetadataClient::new(weft_proto::transport::Transport::quic(
        channel,
    ))
}

/// QUIC connections count against `connections_max` with the HTTP/2 ones: past it, a QUIC
/// connection is refused (and an HTTP/2 one may only check health), and one that closes makes
/// room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_connections_count_against_connections_max() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, ca) = quic_broker(dir.path(), "connections_max = 1\n");
    let open = |broker: &Broker| weft_tests::metric(broker, "weft_client_connections ");
    weft_tests::wait_for("no client connection open", Duration::from_secs(10), || {
        std::future::ready((open(&broker) == Some(0.0)).then_some(()))
    })
    .await;
    let who_am_i = || async {
        let mut metadata = quic_metadata(&broker, &ca);
        let answer = within(
            "a WhoAmI over QUIC",
            Duration::from_secs(20),
            metadata.who_am_i(weft_proto::v1::WhoAmIRequest {}),
        )
        .await;
        (metadata, answer.map(|_| ()))
    };
    let (held, first) = who_am_i().await;
    first.expect("the first QUIC connection is served");
    assert_eq!(open(&broker), Some(1.0), "one connection open");
    let (_, second) = who_am_i().await;
    assert!(second.is_err(), "a second QUIC connection is refused");
    let refused = |listener: &str| {
        weft_tests::metric(
            &broker,
            &format!("weft_client_connections_refused_total{{listener=\"{listener}\"}} "),
        )
        .unwrap_or(0.0)
    };
    assert!(refused("quic") >= 1.0, "the QUIC refusal is counted");
    // The one place is taken for HTTP/2 too (a connection there may only check health).
    let http2 = weft_tests::grpc::channel(&broker.client_addr).await;
    let mut metadata = weft_proto::v1::metadata_client::MetadataClient::new(http2);
    assert!(
        metadata
            .who_am_i(weft_proto::v1::WhoAmIRequest {})
            .await
            .is_err(),
        "an HTTP/2 connection is closed while QUIC holds the place"
    );
    assert!(refused("client") >= 1.0, "the HTTP/2 refusal is counted");
    // Both closed, the place is free again.
    drop(metadata);
    drop(held);
    weft_tests::wait_for(
        "the QUIC connection's place freed",
        Duration::from_secs(20),
        || std::future::ready((open(&broker) == Some(0.0)).then_some(())),
    )
    .await;
    let (_, again) = who_am_i().await;
    again.expect("room again");
}

/// A QUIC connection with no call open for `connections_idle_ms` is told to open no new calls
/// (an HTTP/3 GOAWAY) and closed, which frees its place; the channel connects again for its
/// next call. Before, an idle QUIC connection (kept alive by its pings) held its place for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_quic_connections_are_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, ca) = quic_broker(dir.path(), "connections_idle_ms = 500\n");
    let open = |broker: &Broker| weft_tests::metric(broker, "weft_client_connections ");
    let open_falls_to_0 = || {
        weft_tests::wait_for("no client connection open", Duration::from_secs(10), || {
            std::future::ready((open(&broker) == Some(0.0)).then_some(()))
        })
    };
    open_falls_to_0().await;
    let mut metadata = quic_metadata(&broker, &ca);
    within(
        "a WhoAmI over QUIC",
        Duration::from_secs(20),
        metadata.who_am_i(weft_proto::v1::WhoAmIRequest {}),
    )
    .await
    .expect("served");
    assert_eq!(open(&broker), Some(1.0), "its connection is open");
    let idle_closed = || {
        weft_tests::metric(
            &broker,
            "weft_client_connections_idle_closed_total{listener=\"quic\"} ",
        )
        .unwrap_or(0.0)
    };
    // Calls every 200 ms keep it, however short they are.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        within(
            "a WhoAmI over a busy QUIC connection",
            Duration::from_secs(20),
            metadata.who_am_i(weft_proto::v1::WhoAmIRequest {}),
        )
        .await
        .expect("served");
    }
    assert_eq!(
        idle_closed(),
        0.0,
        "a busy QUIC connection is not closed as idle"
    );
    open_falls_to_0().await;
    assert_eq!(idle_closed(), 1.0, "the idle close is counted");
    within(
        "a WhoAmI over QUIC after the close",
        Duration::from_secs(20),
        metadata.who_am_i(weft_proto::v1::WhoAmIRequest {}),
    )
    .await
    .expect("served on a new connection");
}
