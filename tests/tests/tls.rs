//! TLS and identities, with real processes and certificates made by the test (a CA, brokers'
//! certificates with SPIFFE URIs and IP SANs, clients' certificates):
//! - a broker with TLS on its client and admin listeners (client certificates optional) knows
//!   its callers by certificate (SPIFFE URI, else subject), bearer token, or (only where it is
//!   configured to trust a sidecar) the sidecar's `x-forwarded-client-cert`; refuses an
//!   unknown token with UNAUTHENTICATED / 401 and an audit line; refuses plaintext; and takes
//!   a renewed certificate from its files without a restart;
//! - three brokers replicate over mutual TLS on the peer port, which serves only broker
//!   identities.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use weft_client::{Client, ConnectOptions, ConsumerConfig, ProducerConfig, Record, StartFrom};
use weft_proto::v1::metadata_client::MetadataClient;
use weft_tests::pki::Pki;
use weft_tests::{Broker, start_cluster_with, wait_for};

const TOKEN: &str = "let-me-in";
const ORDERS: &str = "spiffe://weft.test/ns/shop/sa/orders";
const BROKER_ID: &str = "spiffe://weft.test/ns/weft/sa/weft";

/// A gRPC channel with TLS: `ca` checks the server; `identity` is a client certificate.
async fn tls_channel(
    address: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("ca")));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).expect("cert"),
            std::fs::read(key).expect("key"),
        ));
    }
    Endpoint::from_shared(format!("https://{address}"))
        .expect("endpoint")
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// WhoAmI over `channel`, with extra request headers.
async fn who_am_i(
    channel: Channel,
    headers: &[(&'static str, &str)],
) -> Result<(String, String), tonic::Status> {
    let mut request = tonic::Request::new(weft_proto::v1::WhoAmIRequest {});
    for (key, value) in headers {
        request
            .metadata_mut()
            .insert(*key, value.parse().expect("header value"));
    }
    request.set_timeout(Duration::from_secs(10));
    let answer = MetadataClient::new(channel)
        .who_am_i(request)
        .await?
        .into_inner();
    Ok((answer.principal, answer.source))
}

/// An HTTPS/1.1 GET: (status, body).
async fn https_get(
    address: &str,
    path: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let files = weft_proto::tls::TlsFiles {
        cert_file: identity.map(|i| i.0.to_path_buf()),
        key_file: identity.map(|i| i.1.to_path_buf()),
        ca_file: Some(ca.to_path_buf()),
    };
    let mut config = weft_proto::tls::client_config(&files).expect("client config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let host = address.rsplit_once(':').expect("host:port").0.to_string();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone()).expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the admin port");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (key, value) in headers {
        request.push_str(&format!("{key}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    weft_tests::parse_http_response(&answer)
}

fn principal_of(body: &str) -> (String, String) {
    let value: serde_json::Value =
        serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body}"));
    (
        value["principal"].as_str().unwrap_or_default().to_string(),
        value["source"].as_str().unwrap_or_default().to_string(),
    )
}

fn tls_options(ca: &Path, identity: Option<(&Path, &Path)>, token: Option<&str>) -> ConnectOptions {
    ConnectOptions {
        tls: Some(weft_client::TlsOptions {
            ca_file: Some(ca.to_path_buf()),
            cert_file: identity.map(|i| i.0.to_path_buf()),
            key_file: identity.map(|i| i.1.to_path_buf()),
            server_name: None,
        }),
        token: token.map(str::to_string),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_broker_knows_callers_by_certificate_token_and_trusted_sidecar_and_reloads_its_certificate()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "first");
    let (server_cert, server_key) = pki.issue("server", "weft-0", Some(BROKER_ID), true);
    let orders = pki.issue("orders", "orders", Some(ORDERS), false);
    let alice = pki.issue("alice", "alice", None, false);
    let ca = pki.ca_file();
    let config = dir.path().join("weft.toml");
    let listener = |name: &str| {
        format!(
            "[tls.{name}]\ncert_file = {server_cert:?}\nkey_file = {server_key:?}\nca_file = {ca:?}\nclient_auth = \"optional\"\n"
        )
    };
    std::fs::write(
        &config,
        format!(
            "[tls]\nreload_interval_ms = 200\n{}{}[auth]\nadmin_sidecar = \"envoy\"\ntokens = [\"ci=sha256:{}\"]\n",
            listener("client"),
            listener("admin"),
            weft_tests::pki::sha256_hex(TOKEN)
        ),
    )
    .expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    let address = broker.client_addr.clone();

    // Plaintext to a TLS port: refused (no HTTP/2 exchange happens).
    let plain = async {
        let client = Client::connect([address.as_str()])
            .await?
            .with_timeout(Duration::from_secs(3));
        client.who_am_i().await
    };
    let started = std::time::Instant::now();
    let plain = plain.await;
    eprintln!("PLAIN {:?} {plain:?}", started.elapsed());
    assert!(
        plain.is_err(),
        "a plaintext client was served on a TLS port"
    );

    // TLS without a client certificate: anonymous.
    let anonymous = Client::connect_with([address.as_str()], tls_options(&ca, None, None))
        .await
        .expect("TLS connect");
    assert_eq!(
        anonymous.who_am_i().await.expect("whoami"),
        ("anonymous".to_string(), "anonymous".to_string())
    );

    // A client certificate with a SPIFFE URI: that URI. Records go round trip.
    let client = Client::connect_with(
        [address.as_str()],
        tls_options(&ca, Some((&orders.0, &orders.1)), None),
    )
    .await
    .expect("mTLS connect");
    assert_eq!(
        client.who_am_i().await.expect("whoami"),
        (ORDERS.to_string(), "certificate".to_string())
    );
    client
        .admin()
        .create_topic("secure", 1)
        .await
        .expect("create topic over TLS");
    let producer = client.producer(ProducerConfig::default());
    for i in 0..20 {
        producer
            .send("secure", Record::new(format!("record-{i}")))
            .await
            .expect("publish over TLS");
    }
    producer.close().await.expect("close");
    let mut consumer = client
        .consumer(ConsumerConfig::new("secure").start(StartFrom::Earliest))
        .await
        .expect("subscribe over TLS");
    for i in 0..20 {
        let message = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a record in time")
            .expect("consume")
            .expect("a record");
        assert_eq!(message.value, format!("record-{i}").as_bytes());
    }

    // A certificate without a SPIFFE URI: its subject.
    let by_subject = Client::connect_with(
        [address.as_str()],
        tls_options(&ca, Some((&alice.0, &alice.1)), None),
    )
    .await
    .expect("connect");
    let (principal, source) = by_subject.who_am_i().await.expect("whoami");
    // RFC 4514, as nginx's $ssl_client_s_dn and Envoy's x-forwarded-client-cert write it.
    assert_eq!(principal, "O=weft-tests,CN=alice");
    assert_eq!(source, "certificate");

    // A bearer token: its name. An unknown one: UNAUTHENTICATED, and an audit line.
    let with_token = Client::connect_with([address.as_str()], tls_options(&ca, None, Some(TOKEN)))
        .await
        .expect("connect");
    assert_eq!(
        with_token.who_am_i().await.expect("whoami"),
        ("ci".to_string(), "token".to_string())
    );
    let bad_token = Client::connect_with([address.as_str()], tls_options(&ca, None, Some("guess")))
        .await
        .expect("connect");
    let refused = bad_token
        .who_am_i()
        .await
        .expect_err("an unknown token is refused");
    assert_eq!(
        refused.code(),
        Some(tonic::Code::Unauthenticated),
        "{refused:?}"
    );
    let log = broker.log();
    assert!(
        log.lines().any(|l| l.contains("weft::audit")
            && l.contains("call refused")
            && l.contains("unauthenticated")),
        "no audit line for the refused call:\n{log}"
    );

    // The CLI: the same flags a user types.
    let cli = broker.cli(&[
        "--tls-ca-file",
        ca.to_str().expect("path"),
        "--token",
        TOKEN,
        "-o",
        "json",
        "whoami",
    ]);
    let stdout = weft_tests::ok_stdout(&cli);
    assert_eq!(
        principal_of(&stdout),
        ("ci".to_string(), "token".to_string())
    );

    // A sidecar's header counts only where the broker trusts that sidecar: not on the client
    // listener (any caller can send it)...
    let channel = tls_channel(&address, &ca, None).await.expect("channel");
    let xfcc =
        "By=spiffe://weft.test/ns/weft/sa/weft;Hash=00;URI=spiffe://weft.test/ns/shop/sa/payments";
    assert_eq!(
        who_am_i(channel, &[("x-forwarded-client-cert", xfcc)])
            .await
            .expect("whoami"),
        ("anonymous".to_string(), "anonymous".to_string())
    );
    // ... but on the admin listener, configured to trust Envoy's.
    let admin = broker.admin_addr.clone();
    let (status, body) = https_get(
        &admin,
        "/v1/whoami",
        &ca,
        None,
        &[("x-forwarded-client-cert", xfcc)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        principal_of(&body),
        (
            "spiffe://weft.test/ns/shop/sa/payments".to_string(),
            "sidecar".to_string()
        )
    );
    let (status, body) =
        https_get(&admin, "/v1/whoami", &ca, Some((&orders.0, &orders.1)), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        principal_of(&body),
        (ORDERS.to_string(), "certificate".to_string())
    );
    let (status, body) = https_get(
        &admin,
        "/v1/whoami",
        &ca,
        None,
        &[("authorization", "Bearer guess")],
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("UNAUTHENTICATED"), "{body}");
    // Probes carry no credentials and still pass.
    let (status, _) = https_get(
        &admin,
        "/healthz",
        &ca,
        None,
        &[("authorization", "Bearer guess")],
    )
    .await;
    assert_eq!(status, 200);

    // Renewal: new files from another CA replace the old ones in place (as a mounted Secret
    // is updated); new connections get the new certificate, without a restart.
    let renewed = Pki::new(dir.path(), "second");
    let (new_cert, new_key) = renewed.issue("server-renewed", "weft-0", Some(BROKER_ID), true);
    for (from, to) in [(&new_key, &server_key), (&new_cert, &server_cert)] {
        let staging = to.with_extension("staging");
        std::fs::copy(from, &staging).expect("stage");
        std::fs::rename(&staging, to).expect("replace");
    }
    let new_ca = renewed.ca_file();
    wait_for("the renewed certificate", Duration::from_secs(20), || {
        let (address, new_ca) = (address.clone(), new_ca.clone());
        async move {
            let client = Client::connect_with([address.as_str()], tls_options(&new_ca, None, None))
                .await
                .ok()?;
            client.who_am_i().await.ok()
        }
    })
    .await;
    let old_trust = Client::connect_with([address.as_str()], tls_options(&ca, None, None)).await;
    let still_old = match old_trust {
        Ok(client) => client.who_am_i().await.is_ok(),
        Err(_) => false,
    };
    assert!(
        !still_old,
        "a client trusting only the old CA still got through"
    );
    assert!(
        broker.log().contains("reloaded TLS files"),
        "no log line says the files were reloaded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_replicate_over_mutual_tls_and_the_peer_port_serves_only_brokers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "cluster");
    let (cert, key) = pki.issue("broker", "weft", Some(BROKER_ID), true);
    let orders = pki.issue("orders", "orders", Some(ORDERS), false);
    let ca = pki.ca_file();
    let config = dir.path().join("weft.toml");
    std::fs::write(
        &config,
        format!(
            "[tls.peer]\ncert_file = {cert:?}\nkey_file = {key:?}\nca_file = {ca:?}\n[auth]\nbroker_identities = [\"spiffe://weft.test/ns/weft/sa/*\"]\n"
        ),
    )
    .expect("config");
    let brokers = start_cluster_with(3, &["--config", config.to_str().expect("path")]);

    // A replicated topic: the controller and the partition's group both run over peer mTLS.
    let client = Client::connect([brokers[0].client_addr.as_str()])
        .await
        .expect("connect");
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"replicated","partitions":1,"replication_factor":3}"#),
    );
    assert_eq!(status, 201, "{body}");
    let producer = client.producer(ProducerConfig::default());
    for i in 0..50 {
        producer
            .send("replicated", Record::new(format!("v{i}")))
            .await
            .expect("publish (acknowledged by a majority over peer TLS)");
    }
    producer.close().await.expect("close");
    // Every replica has every record: each broker answers from its own copy.
    for broker in &brokers {
        let address = broker.client_addr.clone();
        let read = wait_for("a caught-up replica", Duration::from_secs(20), || {
            let address = address.clone();
            async move {
                // A replica still opening answers UNAVAILABLE ("replaying"): not yet.
                let read = weft_tests::try_fetch_range(&address, "replicated", 0, 0, 50).await;
                read.ok().filter(|read| read.len() == 50)
            }
        })
        .await;
        assert_eq!(read[49].1.as_ref(), b"v49");
    }

    // The peer port: no client certificate, no handshake.
    let peer = brokers[1].peer_addr.clone();
    let anonymous = match tls_channel(&peer, &ca, None).await {
        Ok(channel) => who_am_i(channel, &[]).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e)),
    };
    assert!(
        anonymous.is_err(),
        "the peer port served a caller without a certificate"
    );
    // An application's certificate from the same CA: PERMISSION_DENIED, with the reason.
    let channel = tls_channel(&peer, &ca, Some((&orders.0, &orders.1)))
        .await
        .expect("handshake with a certificate of the cluster's CA");
    let denied = who_am_i(channel, &[])
        .await
        .expect_err("an application on the peer port");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains(ORDERS), "{}", denied.message());
    // A broker's certificate passes (the peer port has no WhoAmI: UNIMPLEMENTED, not denied).
    let channel = tls_channel(&peer, &ca, Some((&cert, &key)))
        .await
        .expect("handshake");
    let passed = who_am_i(channel, &[])
        .await
        .expect_err("no such service on the peer port");
    assert_eq!(passed.code(), tonic::Code::Unimplemented, "{passed:?}");
}
