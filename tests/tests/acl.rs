//! Access control with real processes: callers known by bearer token (one broker) or by
//! certificate and forwarded identity (three brokers over peer mutual TLS).
//! - deny by default once enabled: a publish, a subscription, a group, an admin route or a
//!   PublishStream request (per topic, with or without the `weft-topic` header) that no rule
//!   allows is refused (PERMISSION_DENIED / 403, UNAUTHENTICATED for anonymous callers) with an
//!   audit line; lists show only what the caller may describe;
//! - a Subscribe stream already open ends (PERMISSION_DENIED) once a deny rule takes its access away;
//! - rules added with `weft acl add` are stored in the controller and survive a restart;
//! - a call a follower forwards to the leader is checked there as the original caller's.

use std::time::Duration;

use weft_client::{Client, ConnectOptions, ConsumerConfig, ProducerConfig, Record, StartFrom};
use weft_proto::v1::PublishRequest;
use weft_proto::v1::publish_request::Target;
use weft_tests::pki::{Pki, sha256_hex};
use weft_tests::{Broker, wait_for};

const OPS: &str = "ops-secret";
const ORDERS: &str = "orders-secret";
const BILLING: &str = "billing-secret";

async fn as_token(address: &str, token: &str) -> Client {
    Client::connect_with(
        [address],
        ConnectOptions {
            tls: None,
            token: Some(token.into()),
        },
    )
    .await
    .expect("connect")
}

/// A plain HTTP/1.1 request with a bearer token: (status, body).
fn http_as(address: &str, token: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let authorization = format!("Bearer {token}");
    weft_tests::http_with_headers(
        address,
        method,
        path,
        Some(body),
        &[("Authorization", &authorization)],
    )
}

fn publish_request(topic: &str, value: &str) -> PublishRequest {
    PublishRequest {
        topic: topic.into(),
        target: Some(Target::Partition(0)),
        records: vec![weft_proto::v1::Record {
            value: value.to_string().into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn with_token<T>(body: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request.set_timeout(Duration::from_secs(20));
    request
}

fn audit_lines(broker: &Broker) -> Vec<String> {
    broker
        .log()
        .lines()
        .filter(|l| l.contains("weft::audit"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acls_deny_by_default_on_every_path_and_weft_acl_rules_persist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(
        &config,
        format!(
            r#"[auth]
tokens = ["ops=sha256:{}", "orders=sha256:{}", "billing=sha256:{}"]
[acl]
enabled = true
[[acl.rules]]
identity = "ops"
resource = "*"
operations = ["all"]
[[acl.rules]]
identity = "orders"
resource = "topic:orders"
operations = ["publish"]
"#,
            sha256_hex(OPS),
            sha256_hex(ORDERS),
            sha256_hex(BILLING)
        ),
    )
    .expect("config");
    let mut broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    let address = broker.client_addr.clone();

    let ops = as_token(&address, OPS).await;
    ops.admin()
        .create_topic("orders", 1)
        .await
        .expect("ops creates");
    ops.admin()
        .create_topic("payments", 1)
        .await
        .expect("ops creates");

    // orders may publish to its topic (and describe it: the producer reads its metadata)...
    let orders = as_token(&address, ORDERS).await;
    let producer = orders.producer(ProducerConfig::default());
    for i in 0..5 {
        producer
            .send("orders", Record::new(format!("order-{i}")))
            .await
            .expect("publish allowed by a config rule");
    }
    producer.close().await.expect("close");
    // ... and nothing else.
    let publisher = weft_tests::grpc::publisher(&weft_tests::grpc::channel(&address).await);
    let denied = publisher
        .clone()
        .publish(with_token(publish_request("payments", "x"), ORDERS))
        .await
        .expect_err("no rule lets orders publish to payments");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(
        denied
            .message()
            .contains("orders may not publish topic:payments"),
        "{}",
        denied.message()
    );
    let created = orders.admin().create_topic("sneaky", 1).await;
    assert!(created.is_err(), "orders created a topic");
    // Without credentials: UNAUTHENTICATED, with a hint.
    let anonymous = publisher
        .clone()
        .publish({
            let mut r = tonic::Request::new(publish_request("orders", "x"));
            r.set_timeout(Duration::from_secs(20));
            r
        })
        .await
        .expect_err("anonymous");
    assert_eq!(
        anonymous.code(),
        tonic::Code::Unauthenticated,
        "{anonymous:?}"
    );

    // PublishStream: every request is checked on its own topic, with no weft-topic header.
    let requests = vec![
        publish_request("orders", "streamed"),
        publish_request("payments", "smuggled"),
    ];
    let mut answers = publisher
        .clone()
        .publish_stream(with_token(futures::stream::iter(requests), ORDERS))
        .await
        .expect("stream opens")
        .into_inner();
    let first = answers.message().await.expect("first answer");
    assert!(first.is_some(), "the publish to orders is answered");
    let second = answers
        .message()
        .await
        .expect_err("the publish to payments ends the stream");
    assert_eq!(second.code(), tonic::Code::PermissionDenied, "{second:?}");

    // billing may not read orders yet, nor see it listed.
    let billing = as_token(&address, BILLING).await;
    let refused = billing
        .consumer(ConsumerConfig::new("orders").start(StartFrom::Earliest))
        .await;
    assert!(refused.is_err(), "billing subscribed without a rule");
    let (status, body) = http_as(&broker.admin_addr, BILLING, "GET", "/v1/topics", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), "[]", "billing sees no topic: {body}");
    let (status, body) = http_as(&broker.admin_addr, BILLING, "GET", "/v1/topics/orders", "");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("PERMISSION_DENIED"), "{body}");
    let (status, body) = http_as(
        &broker.admin_addr,
        BILLING,
        "POST",
        "/v1/topics",
        r#"{"name":"via-http"}"#,
    );
    assert_eq!(status, 403, "the admin API is a write path too: {body}");
    let (status, body) = http_as(&broker.admin_addr, BILLING, "POST", "/v1/drain", "");
    assert_eq!(status, 403, "{body}");

    // The operator allows it with the CLI; the rules live in the controller.
    let cli_as_ops = |args: &[&str]| {
        let output = std::process::Command::new(weft_tests::binary("weft"))
            .args(["--server", &address, "--token", OPS])
            .args(args)
            .output()
            .expect("weft");
        weft_tests::ok_stdout(&output)
    };
    cli_as_ops(&[
        "acl",
        "add",
        "--identity",
        "billing",
        "--resource",
        "topic:orders",
        "--operations",
        "subscribe",
    ]);
    cli_as_ops(&[
        "acl",
        "add",
        "--identity",
        "billing",
        "--resource",
        "group:billing*",
        "--operations",
        "subscribe,commit",
    ]);
    let listed = cli_as_ops(&["-o", "json", "acl", "list"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("json");
    assert_eq!(listed["enabled"], true);
    assert_eq!(listed["config_rules"].as_array().map(Vec::len), Some(2));
    assert_eq!(listed["stored_rules"].as_array().map(Vec::len), Some(2));
    // billing may not change the rules itself.
    let output = std::process::Command::new(weft_tests::binary("weft"))
        .args(["--server", &address, "--token", BILLING])
        .args(["acl", "add", "--identity", "billing", "--resource", "*"])
        .args(["--operations", "all"])
        .output()
        .expect("weft");
    assert!(
        !output.status.success(),
        "billing granted itself everything"
    );

    // Now billing reads orders as a group member and commits.
    let mut consumer = billing
        .consumer(
            ConsumerConfig::new("orders")
                .group("billing-eu")
                .start(StartFrom::Earliest),
        )
        .await
        .expect("subscribe allowed by a stored rule");
    for i in 0..5 {
        let message = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .expect("in time")
            .expect("consume")
            .expect("a record");
        assert_eq!(message.value, format!("order-{i}").as_bytes());
    }
    consumer.commit().await.expect("commit allowed");
    drop(consumer);
    // Setting a group's offsets over the admin API alters the group: committing is not enough.
    let (status, body) = http_as(
        &broker.admin_addr,
        BILLING,
        "PUT",
        "/v1/groups/billing-eu/offsets",
        r#"{"topic":"orders","offsets":[{"partition":0,"offset":0}]}"#,
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("billing may not alter group:billing-eu"),
        "{body}"
    );
    let (status, body) = http_as(&broker.admin_addr, BILLING, "GET", "/v1/topics", "");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"orders\"") && !body.contains("payments"),
        "{body}"
    );
    // Another group is still refused.
    let other = billing
        .consumer(
            ConsumerConfig::new("orders")
                .group("audit")
                .start(StartFrom::Earliest),
        )
        .await;
    assert!(other.is_err(), "billing joined a group no rule names");

    // A deny rule wins over the allow rules: billing may not read orders while it stands.
    let deny = [
        "acl",
        "add",
        "--identity",
        "billing",
        "--resource",
        "topic:orders",
        "--operations",
        "subscribe",
        "--deny",
    ];
    cli_as_ops(&deny);
    let listed = cli_as_ops(&["-o", "json", "acl", "list"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("json");
    let denials: Vec<_> = listed["stored_rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter(|r| r["permission"] == "deny")
        .collect();
    assert_eq!(denials.len(), 1, "{listed}");
    // Billing subscribing to orders (the rules reach the broker through the controller).
    let subscribe = || {
        let billing = billing.clone();
        async move {
            billing
                .consumer(ConsumerConfig::new("orders").start(StartFrom::Earliest))
                .await
        }
    };
    let refused = wait_for("the deny rule in force", Duration::from_secs(20), || {
        let subscribed = subscribe();
        async move { subscribed.await.err() }
    })
    .await;
    assert!(
        format!("{refused}").contains("a deny rule forbids it"),
        "{refused}"
    );
    // A deny rule that would take ACL changes away from the one adding it is refused.
    let lockout = std::process::Command::new(weft_tests::binary("weft"))
        .args(["--server", &address, "--token", OPS])
        .args(["acl", "add", "--identity", "*", "--resource", "cluster"])
        .args(["--operations", "admin", "--deny"])
        .output()
        .expect("weft");
    assert!(!lockout.status.success(), "ops locked itself out");
    let stderr = String::from_utf8_lossy(&lockout.stderr);
    assert!(stderr.contains("would refuse"), "{stderr}");
    // Admin routes are checked on the names their handlers act on: a percent-encoded group id
    // is decoded before the rules are applied.
    cli_as_ops(&[
        "acl",
        "add",
        "--identity",
        "ops",
        "--resource",
        "group:locked",
        "--operations",
        "delete",
        "--deny",
    ]);
    for path in ["/v1/groups/locked", "/v1/groups/%6Cocked"] {
        let (status, body) = http_as(&broker.admin_addr, OPS, "DELETE", path, "");
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("a deny rule forbids it"), "{path}: {body}");
    }
    // It denies only what it names: billing still sees the topic.
    let (status, body) = http_as(&broker.admin_addr, BILLING, "GET", "/v1/topics/orders", "");
    assert_eq!(status, 200, "{body}");
    let mut remove = deny;
    remove[1] = "remove";
    cli_as_ops(&remove);
    // Removed again: no such rule, exit 1 whatever the output (JSON answered 0 before).
    for output in ["text", "json"] {
        let again = std::process::Command::new(weft_tests::binary("weft"))
            .args(["--server", &address, "--token", OPS, "-o", output])
            .args(remove.iter())
            .output()
            .expect("weft");
        let stderr = String::from_utf8_lossy(&again.stderr);
        assert_eq!(again.status.code(), Some(1), "{output}: {stderr}");
        assert!(stderr.contains("no such stored rule"), "{output}: {stderr}");
    }
    let mut reading = wait_for("the deny rule gone", Duration::from_secs(20), || {
        let subscribed = subscribe();
        async move { subscribed.await.ok() }
    })
    .await;

    // A rule taken away applies to a stream already open: billing's subscription ends with the
    // refusal once a deny rule stands, and reads nothing published after it.
    let stored = (0..5)
        .map(|i| format!("order-{i}"))
        .chain(["streamed".to_string()]);
    for expected in stored {
        let message = tokio::time::timeout(Duration::from_secs(20), reading.next())
            .await
            .expect("in time")
            .expect("consume")
            .expect("a record");
        assert_eq!(message.value, expected.as_bytes());
    }
    cli_as_ops(&deny);
    wait_for(
        "the deny rule in force again",
        Duration::from_secs(20),
        || {
            let subscribed = subscribe();
            async move { subscribed.await.err() }
        },
    )
    .await;
    let producer = orders.producer(ProducerConfig::default());
    producer
        .send("orders", Record::new("after-the-deny-rule"))
        .await
        .expect("orders may still publish");
    producer.close().await.expect("close");
    let ended = tokio::time::timeout(Duration::from_secs(20), reading.next())
        .await
        .expect("the open subscription ends in time");
    let error = match ended {
        Ok(Some(message)) => panic!(
            "an open subscription read {:?} after a deny rule took its access away",
            String::from_utf8_lossy(&message.value)
        ),
        Ok(None) => panic!("the subscription ended without saying why"),
        Err(error) => error,
    };
    assert_eq!(
        error.code(),
        Some(tonic::Code::PermissionDenied),
        "{error:?}"
    );
    assert!(
        format!("{error}").contains("a deny rule forbids it"),
        "{error}"
    );
    drop(reading);
    cli_as_ops(&remove);
    wait_for("the deny rule gone again", Duration::from_secs(20), || {
        let subscribed = subscribe();
        async move { subscribed.await.ok() }
    })
    .await;

    let audit = audit_lines(&broker);
    assert!(
        audit
            .iter()
            .any(|l| l.contains("orders") && l.contains("topic:payments") && l.contains("denied")),
        "no audit line names the refused publish: {audit:#?}"
    );

    // Stored rules survive a restart (they are in the controller's log and snapshot).
    broker.restart();
    let address = broker.client_addr.clone();
    let billing = as_token(&address, BILLING).await;
    let mut consumer = billing
        .consumer(ConsumerConfig::new("orders").start(StartFrom::Earliest))
        .await
        .expect("the stored rule survived the restart");
    let first = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("in time")
        .expect("consume")
        .expect("a record");
    assert_eq!(first.value, b"order-0".as_slice());
}

/// The controller's leader as `broker` sees it (0: none).
fn controller_of(broker: &weft_tests::Broker) -> u64 {
    let (status, body) = http_as(&broker.admin_addr, OPS, "GET", "/v1/cluster", "");
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    value["controller_id"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_call_is_checked_by_the_leader_as_its_original_callers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "cluster");
    let (cert, key) = pki.issue(
        "broker",
        "weft",
        Some("spiffe://weft.test/ns/weft/sa/weft"),
        true,
    );
    let ca = pki.ca_file();
    let base = format!(
        r#"[tls.peer]
cert_file = {cert:?}
key_file = {key:?}
ca_file = {ca:?}
[auth]
broker_identities = ["spiffe://weft.test/ns/weft/sa/weft"]
tokens = ["ops=sha256:{}", "orders=sha256:{}"]
[acl]
enabled = true
[[acl.rules]]
identity = "ops"
resource = "*"
operations = ["all"]
"#,
        sha256_hex(OPS),
        sha256_hex(ORDERS)
    );
    // Broker 3's own file also lets orders publish, and read as group "readers"; brokers 1 and
    // 2 do not.
    let extra = "[[acl.rules]]\nidentity = \"orders\"\nresource = \"topic:orders\"\noperations = [\"publish\", \"subscribe\"]\n\
                 [[acl.rules]]\nidentity = \"orders\"\nresource = \"group:readers\"\noperations = [\"subscribe\", \"commit\"]\n";
    let configs: Vec<_> = (1..=3)
        .map(|i| {
            let path = dir.path().join(format!("weft-{i}.toml"));
            let text = if i == 3 {
                format!("{base}{extra}")
            } else {
                base.clone()
            };
            std::fs::write(&path, text).expect("config");
            path
        })
        .collect();
    let brokers = weft_tests::start_cluster_each(
        3,
        |i| vec!["--config".into(), configs[i].display().to_string()],
        &[],
    );
    let (status, body) = http_as(
        &brokers[0].admin_addr,
        OPS,
        "POST",
        "/v1/topics",
        r#"{"name":"orders","partitions":1,"replication_factor":3}"#,
    );
    assert_eq!(status, 201, "{body}");
    // The leader on broker 1, so a publish through broker 3 is forwarded to it.
    let (status, body) = http_as(
        &brokers[0].admin_addr,
        OPS,
        "POST",
        "/v1/topics/orders/partitions/0/leader",
        r#"{"node_id":1}"#,
    );
    assert!(status == 200 || status == 409, "{status} {body}");
    wait_for("broker 1 to lead orders", Duration::from_secs(30), || {
        let (status, body) = http_as(&brokers[2].admin_addr, OPS, "GET", "/v1/topics/orders", "");
        async move {
            let value: serde_json::Value = serde_json::from_str(&body).ok()?;
            (status == 200 && value["partition_details"][0]["leader_id"] == 1).then_some(())
        }
    })
    .await;

    // Broker 3 lets orders through; the leader, checking orders (not broker 3), does not.
    let publisher =
        weft_tests::grpc::publisher(&weft_tests::grpc::channel(&brokers[2].client_addr).await);
    let denied = publisher
        .clone()
        .publish(with_token(publish_request("orders", "via-3"), ORDERS))
        .await
        .expect_err("the leader has no rule for orders");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("orders may not publish"),
        "{}",
        denied.message()
    );
    let leader_audit = audit_lines(&brokers[0]);
    assert!(
        leader_audit
            .iter()
            .any(|l| l.contains("principal=\"orders\"") || l.contains("principal=orders")),
        "the leader's audit line names the original caller: {leader_audit:#?}"
    );
    // Broker 2 has no rule: it refuses at once, without forwarding.
    let via_2 =
        weft_tests::grpc::publisher(&weft_tests::grpc::channel(&brokers[1].client_addr).await)
            .publish(with_token(publish_request("orders", "via-2"), ORDERS))
            .await
            .expect_err("broker 2 has no rule for orders");
    assert_eq!(via_2.code(), tonic::Code::PermissionDenied);

    // A group member connected to broker 3 is checked again by the group's coordinator (the
    // controller's leader, moved off broker 3 if it is there), as itself: refused there.
    if controller_of(&brokers[0]) == 3 {
        let (status, body) = http_as(&brokers[2].admin_addr, OPS, "POST", "/v1/drain", "");
        assert_eq!(status, 200, "{body}");
        wait_for(
            "the controller off broker 3",
            Duration::from_secs(30),
            || {
                let id = controller_of(&brokers[0]);
                async move { (id != 0 && id != 3).then_some(()) }
            },
        )
        .await;
    }
    let reader = as_token(&brokers[2].client_addr, ORDERS).await;
    let refused = reader
        .consumer(
            weft_client::ConsumerConfig::new("orders")
                .group("readers")
                .start(weft_client::StartFrom::Earliest),
        )
        .await
        .expect_err("the coordinator has no rule for orders");
    assert_eq!(
        refused.code(),
        Some(tonic::Code::PermissionDenied),
        "{refused:?}"
    );
    assert!(
        refused.to_string().contains("orders may not subscribe"),
        "{refused}"
    );

    // A stored rule reaches every broker: the forwarded publish now passes.
    let ops = as_token(&brokers[0].client_addr, OPS).await;
    ops.admin()
        .change_acl(
            weft_proto::v1::AclRule {
                identity: "orders".into(),
                resource: "topic:orders".into(),
                operations: vec!["publish".into()],
                permission: String::new(),
            },
            true,
        )
        .await
        .expect("ops adds a rule");
    wait_for("the rule on every broker", Duration::from_secs(20), || {
        let publisher = publisher.clone();
        async move {
            publisher
                .clone()
                .publish(with_token(publish_request("orders", "via-3"), ORDERS))
                .await
                .ok()
        }
    })
    .await;
}

/// What an older build of broker `node` sends to register itself: its addresses, no feature
/// level; or, `features` given, what this build sends. Node 1 is `broker` itself (its own
/// addresses), any other a broker that is not running.
async fn register_on_peer_port(broker: &Broker, node: u64, features: Option<u32>) {
    use weft_proto::internal::v1 as internal;
    let (peer, client) = if node == 1 {
        (broker.peer_addr.clone(), broker.client_addr.clone())
    } else {
        (
            format!("127.0.0.1:{}", 1000 + node),
            format!("127.0.0.1:{}", 2000 + node),
        )
    };
    let mut command = serde_json::json!({"RegisterBroker": {
        "node_id": node,
        "peer_address": peer,
        "client_address": client,
    }});
    if let Some(features) = features {
        command["RegisterBroker"]["features"] = features.into();
    }
    let channel = weft_tests::grpc::channel(&broker.peer_addr).await;
    let mut controller = internal::controller_client::ControllerClient::new(channel);
    let request = to_node_1(
        internal::ProposeRequest {
            command: serde_json::to_vec(&command).expect("json").into(),
            hops: 0,
        },
        Duration::from_secs(20),
    );
    controller.propose(request).await.expect("registered");
}

/// A peer-port request to node 1 of cluster `weft` (the names a single test broker has).
fn to_node_1<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("weft-cluster", "weft".parse().expect("ascii"));
    request
        .metadata_mut()
        .insert("weft-target-node", "1".parse().expect("ascii"));
    request.set_timeout(timeout);
    request
}

/// `weft acl add` of a deny rule: identity `intern` may not publish to `mixed`.
const DENY_INTERN_PUBLISH: [&str; 9] = [
    "acl",
    "add",
    "--identity",
    "intern",
    "--resource",
    "topic:mixed",
    "--operations",
    "publish",
    "--deny",
];

/// A deny rule or an offset reset is refused while a broker of an older build is registered (it
/// would store the deny rule as an allow rule, and refuse the reset as a commit going back: the
/// controller's replicas would disagree), and accepted once that broker registers again from a
/// build that reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_rules_and_offset_resets_wait_until_every_broker_reads_them() {
    let broker = Broker::start();
    let ok = |args: &[&str]| weft_tests::ok_stdout(&broker.cli(args));
    ok(&["topic", "create", "mixed", "--partitions", "1"]);
    weft_tests::ok_stdout(&broker.cli_with_stdin(&["produce", "mixed"], "a\n"));
    broker
        .client()
        .await
        .admin()
        .commit_offsets("mixed-group", "mixed", &[(0, 1)])
        .await
        .expect("commit");
    let deny = DENY_INTERN_PUBLISH;
    let reset = [
        "group",
        "reset-offsets",
        "mixed-group",
        "--topic",
        "mixed",
        "--to",
        "earliest",
        "--execute",
        "-o",
        "json",
    ];

    register_on_peer_port(&broker, 7, None).await;
    for args in [&deny[..], &reset[..]] {
        let out = broker.cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} with an older broker registered"
        );
        assert!(
            stderr.contains("broker 7 is at feature level 0")
                && stderr.contains("upgrade every broker"),
            "{stderr}"
        );
    }
    // What every build reads is not held back.
    ok(&[
        "acl",
        "add",
        "--identity",
        "intern",
        "--resource",
        "topic:mixed",
        "--operations",
        "subscribe",
    ]);
    let listed = ok(&["-o", "json", "acl", "list"]);
    assert!(!listed.contains("\"deny\""), "{listed}");

    register_on_peer_port(&broker, 7, Some(1)).await;
    // A registration that lost this broker's own level (it went through a controller leader of
    // an older build, which drops the field) is made again by the broker itself.
    register_on_peer_port(&broker, 1, None).await;
    let out = broker.cli(&deny);
    assert!(!out.status.success(), "held back by broker 1's level 0");
    wait_for(
        "broker 1 to register its level again",
        Duration::from_secs(30),
        || {
            let out = broker.cli(&deny);
            async move { out.status.success().then_some(()) }
        },
    )
    .await;
    let listed = ok(&["-o", "json", "acl", "list"]);
    assert!(listed.contains("\"deny\""), "{listed}");
    let done: serde_json::Value = serde_json::from_str(&ok(&reset)).expect("json");
    assert_eq!(done["executed"], true, "{done}");
    assert_eq!(done["partitions"][0]["new_offset"], 0, "{done}");
}

/// Once the cluster has used a feature level (a deny rule: level 1), a broker of a build below
/// it is refused when it joins (an older build sends no level: 0), and a broker running such a
/// build (a downgrade) stops, saying why, instead of serving: it would apply the controller log
/// differently (a deny rule as an allow rule). The broker starts as a build of level 1 (which
/// sets no cluster id, level 2); upgraded to this build, its cluster gets its id, and then
/// level 1 may not run either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_below_the_feature_level_in_use_may_not_join_or_run() {
    use weft_proto::internal::v1 as internal;
    let mut broker = Broker::start_with_env(&[], &[("WEFT_TEST_FEATURE_LEVEL", "1")]);
    let join = |features: u32| {
        let peer = broker.peer_addr.clone();
        async move {
            let channel = weft_tests::grpc::channel(&peer).await;
            let mut controller = internal::controller_client::ControllerClient::new(channel);
            let request = to_node_1(
                internal::JoinRequest {
                    node_id: 9,
                    peer_address: "127.0.0.1:1009".into(),
                    hops: 0,
                    features,
                },
                Duration::from_secs(5),
            );
            controller.join(request).await
        }
    };
    weft_tests::ok_stdout(&broker.cli(&DENY_INTERN_PUBLISH));
    let refused = join(0)
        .await
        .expect_err("a level-0 build joins after a deny rule");
    // Not FAILED_PRECONDITION, which a joining seed reads as "no cluster here yet".
    assert_eq!(refused.code(), tonic::Code::Aborted, "{refused:?}");
    assert!(
        refused.message().contains("broker 9 is at feature level 0")
            && refused.message().contains("has used level 1"),
        "{refused:?}"
    );

    // The same broker restarted as a build of level 0 stops by itself, with the reason,
    // before its listeners take a single call (it never says it is ready).
    assert_eq!(broker.stop(), Some(0));
    broker.set_env("WEFT_TEST_FEATURE_LEVEL", "0");
    let why = broker.start_again_expecting_exit();
    assert!(
        why.contains("broker did not start (exit status: 1)"),
        "a downgraded broker exits with an error: {why}"
    );
    let log = broker.log();
    assert!(
        log.contains("this cluster has used feature level 1, above this build's level 0"),
        "{log}"
    );
    // Back on level 1, it serves again with its rule, and the cluster has no id of its own
    // yet: the broker shows its data directory's.
    broker.set_env("WEFT_TEST_FEATURE_LEVEL", "1");
    broker.start_again();
    let listed = weft_tests::ok_stdout(&broker.cli(&["-o", "json", "acl", "list"]));
    assert!(listed.contains("\"deny\""), "{listed}");
    assert_eq!(features_in_use(&broker), 1);

    // Upgraded to this build (level 2), it gives its cluster an id; a level-1 build then stops.
    assert_eq!(broker.stop(), Some(0));
    broker.set_env("WEFT_TEST_FEATURE_LEVEL", "2");
    broker.start_again();
    wait_for("the cluster id stored", Duration::from_secs(30), || {
        let seen = features_in_use(&broker);
        async move { (seen == 2).then_some(()) }
    })
    .await;
    let code = broker.stop();
    assert_eq!(code, Some(0), "{}", broker.log());
    broker.set_env("WEFT_TEST_FEATURE_LEVEL", "1");
    let why = broker.start_again_expecting_exit();
    assert!(why.contains("exit status: 1"), "{why}");
    let log = broker.log();
    assert!(
        log.contains("this cluster has used feature level 2, above this build's level 1"),
        "{log}"
    );
    broker.set_env("WEFT_TEST_FEATURE_LEVEL", "2");
    broker.start_again();
    let listed = weft_tests::ok_stdout(&broker.cli(&["-o", "json", "acl", "list"]));
    assert!(listed.contains("\"deny\""), "{listed}");
}

/// The feature level the cluster has used, as `broker`'s `/v1/cluster` shows it (2 once the
/// cluster stores its id).
fn features_in_use(broker: &Broker) -> u64 {
    let (status, body) = broker.http("GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    value["features_in_use"].as_u64().expect("features_in_use")
}

/// A broker of a build below the feature level the cluster has used, started to join it, is
/// refused and stops with the reason (before, it retried the join for ever, serving nothing);
/// the same broker on this build joins.
#[tokio::test(flavor = "multi_thread")]
async fn a_joining_broker_below_the_feature_level_in_use_stops() {
    // A cluster of level-1 builds (this build would also store the cluster id: level 2).
    let brokers = weft_tests::start_cluster_env(1, &[], &[("WEFT_TEST_FEATURE_LEVEL", "1")]);
    weft_tests::ok_stdout(&brokers[0].cli(&DENY_INTERN_PUBLISH));
    let mut old = weft_tests::add_broker_env(&brokers, &[], &[("WEFT_TEST_FEATURE_LEVEL", "0")]);
    let code = old.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "a refused broker exits with an error");
    let log = old.log();
    assert!(
        log.contains("the cluster refused this broker: broker 2 is at feature level 0")
            && log.contains("has used level 1")
            && log.contains("; stopping"),
        "{log}"
    );
    assert_eq!(
        brokers_listed(&brokers[0]),
        [1],
        "the refused broker is not a member"
    );

    // The same broker on a build of level 1 (the cluster's) joins (and serves).
    old.set_env("WEFT_TEST_FEATURE_LEVEL", "1");
    old.start_again_same_ports();
    old.wait_ready();
    wait_for("broker 2 registered", Duration::from_secs(30), || async {
        (brokers_listed(&brokers[0]) == [1, 2]).then_some(())
    })
    .await;
}

/// The feature level can rise while a broker joins: a topic created between the leader's check
/// of the joiner's level and the learner's entry did not count the joiner (no member yet), so
/// its placement raised the level past the joiner's build. The joiner must then be taken out
/// and refused (before, it was made a voter, then stopped on reading the level: a dead voter
/// left in the controller group).
#[tokio::test(flavor = "multi_thread")]
async fn a_level_raised_while_a_broker_joins_refuses_it() {
    let brokers = weft_tests::start_cluster_env(1, &[], &[("WEFT_TEST_JOIN_DELAY_MS", "4000")]);
    let before = features_in_use(&brokers[0]);
    assert!(
        before < 4,
        "a cluster without topics has not used the placement level yet: {before}"
    );
    let mut old = weft_tests::add_broker_env(&brokers, &[], &[("WEFT_TEST_FEATURE_LEVEL", "3")]);
    wait_for(
        "the join to reach the leader",
        Duration::from_secs(20),
        || async {
            brokers[0]
                .log()
                .contains("WEFT_TEST_JOIN_DELAY_MS: adding the learner later")
                .then_some(())
        },
    )
    .await;
    weft_tests::ok_stdout(&brokers[0].cli(&["topic", "create", "placed", "--partitions", "2"]));
    // A placement kept as proposed (level 4); this build's creation also checks
    // partition_replicas_max when applied (level 6).
    let used = features_in_use(&brokers[0]);
    assert_eq!(
        used, 6,
        "a placement kept as proposed, checked against the limit"
    );
    let code = old.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "a refused broker exits with an error");
    let log = old.log();
    assert!(
        log.contains("the cluster refused this broker: broker 2 is at feature level 3")
            && log.contains(&format!("has used level {used}")),
        "{log}"
    );
    let (status, body) = brokers[0].http("GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    let members: Vec<u64> = value["brokers"]
        .as_array()
        .expect("brokers")
        .iter()
        .map(|b| b["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(
        members,
        [1],
        "the refused broker is no member, not even unregistered: {body}"
    );
    // The cluster still takes changes (no dead voter in its controller group).
    weft_tests::ok_stdout(&brokers[0].cli(&["topic", "create", "after", "--partitions", "1"]));
}

/// Node ids `/v1/cluster` lists, as `broker` sees them.
fn brokers_listed(broker: &Broker) -> Vec<u64> {
    let (status, body) = broker.http("GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    let mut ids: Vec<u64> = value["brokers"]
        .as_array()
        .expect("brokers")
        .iter()
        // Registered brokers only (not members of the controller group still registering).
        .filter(|b| b["unregistered"] != true)
        .map(|b| b["id"].as_u64().expect("id"))
        .collect();
    ids.sort_unstable();
    ids
}

/// A refusal never echoes a caller's name whole: an anonymous CreateTopic of a name of a
/// million characters is UNAUTHENTICATED (and an authenticated one PERMISSION_DENIED) with a
/// short message, and the audit line is short too. Before, the whole name went into
/// `grpc-message` and into the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_does_not_echo_a_huge_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\ntokens = [\"billing=sha256:{}\"]\n[acl]\nenabled = true\n",
            sha256_hex(BILLING)
        ),
    )
    .expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    let channel = weft_tests::grpc::channel(&broker.client_addr).await;
    let name = "n".repeat(1_000_000);
    let request = || weft_proto::v1::CreateTopicRequest {
        name: name.clone(),
        ..Default::default()
    };
    let anonymous = weft_tests::grpc::topic_admin(&channel)
        .create_topic(request())
        .await
        .expect_err("refused");
    let billing = weft_tests::grpc::topic_admin(&channel)
        .create_topic(with_token(request(), BILLING))
        .await
        .expect_err("refused");
    for (status, code) in [
        (&anonymous, tonic::Code::Unauthenticated),
        (&billing, tonic::Code::PermissionDenied),
    ] {
        let head: String = status.message().chars().take(200).collect();
        assert_eq!(status.code(), code, "{head}");
        assert!(
            status.message().len() < 2048,
            "{code:?}: a message of {} bytes",
            status.message().len()
        );
    }
    let audit = audit_lines(&broker);
    assert!(audit.len() >= 2, "{audit:?}");
    for line in audit {
        assert!(line.len() < 4096, "an audit line of {} bytes", line.len());
    }
}

/// Stored ACL rules are bounded by `acl_rules_max`: with 3, a fourth distinct rule is refused
/// with 429 LIMIT_REACHED naming the key; adding a rule stored already, or a new one once
/// another was removed, still works. Before, every rule was stored, without limit, in the
/// replicated controller state (helper-123).
#[test]
fn stored_acl_rules_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "acl_rules_max = 3\n").expect("config");
    let broker = weft_tests::Broker::start_with(&["--config", config.to_str().expect("path")]);
    broker.wait_ready();
    let rule = |n: u32| {
        format!(r#"{{"identity":"user-{n}","resource":"topic:t{n}","operations":["publish"]}}"#)
    };
    for n in 0..3 {
        let (status, body) = broker.http("POST", "/v1/acls", Some(&rule(n)));
        assert_eq!(status, 200, "rule {n}: {body}");
    }
    let (status, body) = broker.http("POST", "/v1/acls", Some(&rule(3)));
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("LIMIT_REACHED") && body.contains("acl_rules_max"),
        "{body}"
    );
    let (status, body) = broker.http("POST", "/v1/acls", Some(&rule(1)));
    assert_eq!(status, 200, "a rule stored already: {body}");
    assert!(body.contains(r#""existed":true"#), "{body}");
    let (status, body) = broker.http("DELETE", "/v1/acls", Some(&rule(0)));
    assert_eq!(status, 200, "{body}");
    let (status, body) = broker.http("POST", "/v1/acls", Some(&rule(3)));
    assert_eq!(status, 200, "room again: {body}");
}
