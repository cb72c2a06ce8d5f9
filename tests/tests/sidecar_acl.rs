//! ACLs by the identity a sidecar forwards: Debian's nginx stands in for an Envoy sidecar. It
//! terminates the clients' mutual TLS and passes each call on to the broker (h2c) with an
//! `x-forwarded-client-cert` naming the client certificate's subject, replacing any such header
//! the client sent. The broker trusts that header on its client listener
//! (`auth.client_sidecar = "envoy"`) and checks its ACLs against it:
//! - a client's identity through the sidecar is its certificate's subject (source: sidecar);
//! - a rule for that identity lets it publish to one topic and nothing else;
//! - an `x-forwarded-client-cert` the client forges is overwritten by the sidecar.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use weft_client::{Client, ConnectOptions, ProducerConfig, Record, TlsOptions};
use weft_proto::v1::metadata_client::MetadataClient;
use weft_tests::pki::{Pki, sha256_hex};
use weft_tests::{Broker, Nginx, free_port};

const OPS: &str = "ops-secret";

fn through_sidecar(ca: &Path, cert: &(std::path::PathBuf, std::path::PathBuf)) -> ConnectOptions {
    ConnectOptions {
        tls: Some(TlsOptions {
            ca_file: Some(ca.to_path_buf()),
            cert_file: Some(cert.0.clone()),
            key_file: Some(cert.1.clone()),
            server_name: None,
        }),
        token: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acls_follow_the_identity_a_trusted_sidecar_forwards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "mesh");
    let (sidecar_cert, sidecar_key) = pki.issue("sidecar", "weft-sidecar", None, true);
    let orders = pki.issue("orders", "orders", None, false);
    let ca = pki.ca_file();

    // The broker advertises the sidecar's address, so clients that learn leaders from the
    // metadata come back through it.
    let sidecar_port = free_port();
    let sidecar = format!("127.0.0.1:{sidecar_port}");
    let config = dir.path().join("weft.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nclient_sidecar = \"envoy\"\ntokens = [\"ops=sha256:{}\"]\n[acl]\nenabled = true\n[[acl.rules]]\nidentity = \"ops\"\nresource = \"*\"\noperations = [\"all\"]\n",
            sha256_hex(OPS)
        ),
    )
    .expect("config");
    let broker = Broker::start_on(
        [0, 0, 0].map(|_| format!("127.0.0.1:{}", free_port())),
        &[
            "--config",
            config.to_str().expect("path"),
            "--advertised-client-address",
            &sidecar,
        ],
        &[],
    );
    let ops = Client::connect_with(
        [broker.client_addr.as_str()],
        ConnectOptions {
            tls: None,
            token: Some(OPS.into()),
        },
    )
    .await
    .expect("connect");
    ops.admin().create_topic("orders", 1).await.expect("create");
    ops.admin()
        .create_topic("payments", 1)
        .await
        .expect("create");

    let upstream = broker.client_addr.clone();
    let nginx = Nginx::start(
        "$request_uri $status grpc-status=$sent_trailer_grpc_status client-dn=\"$ssl_client_s_dn\"",
        |_| {
            format!(
                r#"    server {{
        listen {sidecar} ssl http2;
        ssl_certificate {sidecar_cert};
        ssl_certificate_key {sidecar_key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        location / {{
            grpc_pass grpc://{upstream};
            # The client's identity, as Envoy forwards it; whatever the client sent is replaced.
            grpc_set_header x-forwarded-client-cert "Hash=$ssl_client_fingerprint;Subject=\"$ssl_client_s_dn\"";
            grpc_read_timeout 300s;
        }}
    }}"#,
                sidecar_cert = sidecar_cert.display(),
                sidecar_key = sidecar_key.display(),
                ca = ca.display(),
            )
        },
        &sidecar,
    );

    // Through the sidecar, orders is its certificate's subject, as the sidecar said.
    let client = Client::connect_with([sidecar.as_str()], through_sidecar(&ca, &orders))
        .await
        .expect("mutual TLS to the sidecar");
    let (principal, source) = client.who_am_i().await.expect("whoami through the sidecar");
    assert_eq!(source, "sidecar");
    // The same string the broker makes of the certificate itself (RFC 4514).
    assert_eq!(principal, "O=weft-tests,CN=orders");

    // No rule yet: refused.
    let producer = client.producer(ProducerConfig {
        retries_max: 0,
        ..ProducerConfig::default()
    });
    let refused = producer.send("orders", Record::new("early")).await;
    assert!(refused.is_err(), "published without a rule");
    // The operator allows that identity to publish to orders.
    ops.admin()
        .change_acl(
            weft_proto::v1::AclRule {
                identity: principal.clone(),
                resource: "topic:orders".into(),
                operations: vec!["publish".into()],
                permission: String::new(),
            },
            true,
        )
        .await
        .expect("add rule");
    let _ = producer.close().await;
    let producer = client.producer(ProducerConfig {
        retries_max: 0,
        ..ProducerConfig::default()
    });
    producer
        .send("orders", Record::new("allowed"))
        .await
        .expect("publish allowed for the sidecar's identity");
    let denied = producer.send("payments", Record::new("denied")).await;
    assert!(denied.is_err(), "published to a topic no rule names");
    let _ = producer.close().await;

    // A forged header does not survive the sidecar.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&ca).expect("ca")))
        .identity(Identity::from_pem(
            std::fs::read(&orders.0).expect("cert"),
            std::fs::read(&orders.1).expect("key"),
        ));
    let channel = Endpoint::from_shared(format!("https://{sidecar}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    let mut request = tonic::Request::new(weft_proto::v1::WhoAmIRequest {});
    request.metadata_mut().insert(
        "x-forwarded-client-cert",
        "Subject=\"ops\";URI=ops".parse().expect("header"),
    );
    request.set_timeout(Duration::from_secs(10));
    let answer = MetadataClient::new(channel)
        .who_am_i(request)
        .await
        .expect("whoami")
        .into_inner();
    assert_eq!(
        answer.principal, principal,
        "the forged identity got through"
    );

    // The sidecar saw each call with the client's subject.
    let log = nginx.access_log();
    assert!(
        log.lines()
            .any(|l| l.contains("/weft.v1.Metadata/WhoAmI") && l.contains("CN=orders")),
        "{log}"
    );
}
