//! End-to-end traces through real software: three brokers (real processes) export their spans
//! over OTLP to a collector this test runs (a tonic server implementing the OTLP trace service),
//! and so does our Rust client in this process. One record, published through a follower (which
//! forwards it to the partition's leader) and consumed through that follower, must yield one
//! trace: the producer's `create` and `publish` spans, the follower's and the leader's `receive`,
//! the leader's `replicate`, the follower's `deliver` and the consumer's `process`, each a child
//! of the one before it (deliver and process of the record's creation context, and linked to it),
//! with the messaging attributes; whether the producer publishes over a PublishStream (each
//! request names its own publish span in `trace_context`) or with unary calls.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use weft_client::{Client, ConsumerConfig, ProducerConfig, PublishTransport, Record, StartFrom};
use weft_tests::{Broker, binary, start_cluster_env, wait_for};

/// A span as the collector received it, with the `service.name` of its resource.
#[derive(Debug, Clone)]
struct Collected {
    service: String,
    span: Span,
}

/// The OTLP trace service: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Collected>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.spans.lock().expect("lock");
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| string_attribute(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    kept.push(Collected {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key)? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int_attribute(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key)? {
        Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn bool_attribute(attributes: &[KeyValue], key: &str) -> Option<bool> {
    match attribute(attributes, key)? {
        Value::BoolValue(b) => Some(*b),
        _ => None,
    }
}

/// The leader of `topic`'s partition 0 as `broker` sees it (0: none).
fn leader_of_0(broker: &Broker, topic: &str) -> u64 {
    let (status, body) = broker.http("GET", &format!("/v1/topics/{topic}"), None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["partition_details"][0]["leader_id"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_record_makes_one_trace_from_producer_through_follower_and_leader_to_consumer() {
    one_record_makes_one_trace(PublishTransport::Stream).await;
}

/// The same through unary Publish calls (each carries its context in its own headers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_record_published_by_a_unary_call_makes_one_trace() {
    one_record_makes_one_trace(PublishTransport::Unary).await;
}

/// One record published with `transport` through a follower and consumed through it: one
/// trace, each span a child of the one before. On a PublishStream each request names its own
/// publish span (`trace_context`), as the stream's headers are shared.
async fn one_record_makes_one_trace(transport: PublishTransport) {
    // The collector.
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // Three brokers exporting to it (a batch of spans every 100 ms).
    let brokers = start_cluster_env(
        3,
        &[],
        &[
            ("WEFT_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"traced","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    let leader = wait_for("a leader of partition 0", Duration::from_secs(30), || {
        let l = leader_of_0(&brokers[0], "traced");
        async move { (l != 0).then_some(l) }
    })
    .await;
    let follower_index = (0..3)
        .find(|i| *i as u64 + 1 != leader)
        .expect("a follower");
    let follower_id = follower_index as u64 + 1;
    let follower = &brokers[follower_index];
    // Every replica open, so the follower serves the record it holds.
    wait_for("the follower's replica", Duration::from_secs(30), || {
        let address = follower.client_addr.clone();
        async move { weft_tests::offsets(&address, "traced", 0, None).await.ok() }
    })
    .await;

    // Our client, exporting to the same collector, talks to the follower only: its publishes
    // are forwarded to the leader.
    let telemetry = weft_client::telemetry::install_otlp(&endpoint, "weft-tests-app", Vec::new())
        .expect("install the exporter");
    let client = Client::connect([follower.client_addr.clone()])
        .await
        .expect("connect");
    let producer = client.producer(ProducerConfig {
        transport,
        to_leaders: false,
        ..ProducerConfig::default()
    });
    let ack = producer
        .send("traced", Record::new("followed"))
        .await
        .expect("publish through the follower");
    assert_eq!(ack.offset, 0);
    producer.close().await.expect("close the producer");

    let mut consumer = client
        .consumer(ConsumerConfig::new("traced").start(StartFrom::Earliest))
        .await
        .expect("consumer");
    let message = consumer
        .next_timeout(Duration::from_secs(20))
        .await
        .expect("consume")
        .expect("the record");
    assert_eq!(&message.value[..], b"followed");
    let traceparent = message
        .headers
        .iter()
        .find(|(k, _)| k == "traceparent")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .expect("the record carries its creation context");
    consumer.close().await.expect("close the consumer"); // ends the process span
    let flushing = telemetry.clone();
    tokio::task::spawn_blocking(move || flushing.flush())
        .await
        .expect("flush");

    // Every span of the record's trace, once the brokers have exported theirs.
    let wanted = [
        "create traced",
        "publish traced",
        "receive traced",
        "replicate traced",
        "deliver traced",
        "process traced",
    ];
    let spans = wait_for("every span of the trace", Duration::from_secs(30), || {
        let spans = collector.spans.lock().expect("lock").clone();
        async move {
            let receives = spans
                .iter()
                .filter(|c| c.span.name == "receive traced")
                .count();
            (wanted
                .iter()
                .all(|name| spans.iter().any(|c| c.span.name == *name))
                && receives >= 2)
                .then_some(spans)
        }
    })
    .await;
    let by_name =
        |name: &str| -> Vec<&Collected> { spans.iter().filter(|c| c.span.name == name).collect() };
    let one = |name: &str| -> &Collected {
        let found = by_name(name);
        assert_eq!(found.len(), 1, "one {name:?} span: {found:#?}");
        found[0]
    };
    let create = one("create traced");
    let publish = one("publish traced");
    let replicate = one("replicate traced");
    let deliver = one("deliver traced");
    let process = one("process traced");
    let receives = by_name("receive traced");
    let node_of = |c: &Collected| int_attribute(&c.span.attributes, "weft.node.id");
    let on_follower = receives
        .iter()
        .find(|c| node_of(c) == Some(follower_id as i64))
        .expect("the follower's receive span");
    let on_leader = receives
        .iter()
        .find(|c| node_of(c) == Some(leader as i64))
        .expect("the leader's receive span");

    // Who recorded what.
    for c in [create, publish, process] {
        assert_eq!(c.service, "weft-tests-app", "{c:#?}");
    }
    for c in [*on_follower, *on_leader, replicate, deliver] {
        assert_eq!(c.service, "weft-broker", "{c:#?}");
    }
    assert_eq!(
        node_of(replicate),
        Some(leader as i64),
        "the leader replicates"
    );
    assert_eq!(
        node_of(deliver),
        Some(follower_id as i64),
        "the follower delivers"
    );
    assert_eq!(
        bool_attribute(&on_follower.span.attributes, "weft.forwarded"),
        Some(false)
    );
    assert_eq!(
        bool_attribute(&on_leader.span.attributes, "weft.forwarded"),
        Some(true)
    );

    // One trace, each span a child of the one before.
    let trace = &create.span.trace_id;
    assert_eq!(
        traceparent,
        format!("00-{}-{}-01", hex(trace), hex(&create.span.span_id)),
        "the record's traceparent is its create span"
    );
    let chain = [
        ("publish", publish, create),
        ("the follower's receive", on_follower, publish),
        ("the leader's receive", on_leader, on_follower),
        ("replicate", replicate, on_leader),
        ("deliver", deliver, create),
        ("process", process, create),
    ];
    for (what, child, parent) in chain {
        assert_eq!(
            &child.span.trace_id, trace,
            "{what} is in the record's trace"
        );
        assert_eq!(
            child.span.parent_span_id, parent.span.span_id,
            "{what}'s parent is {}",
            parent.span.name
        );
    }
    // Spans that handle records link to their creation contexts.
    for (what, c) in [
        ("publish", publish),
        ("the follower's receive", *on_follower),
        ("deliver", deliver),
        ("process", process),
    ] {
        assert!(
            c.span
                .links
                .iter()
                .any(|l| &l.trace_id == trace && l.span_id == create.span.span_id),
            "{what} links to the record's creation context: {:?}",
            c.span.links
        );
    }

    // Messaging attributes (OpenTelemetry semantic conventions).
    for c in [
        create,
        publish,
        *on_follower,
        *on_leader,
        replicate,
        deliver,
        process,
    ] {
        let a = &c.span.attributes;
        assert_eq!(
            string_attribute(a, "messaging.system").as_deref(),
            Some("weft"),
            "{}",
            c.span.name
        );
        assert_eq!(
            string_attribute(a, "messaging.destination.name").as_deref(),
            Some("traced"),
            "{}",
            c.span.name
        );
    }
    for c in [
        publish,
        *on_follower,
        *on_leader,
        replicate,
        deliver,
        process,
    ] {
        assert_eq!(
            string_attribute(&c.span.attributes, "messaging.destination.partition.id").as_deref(),
            Some("0"),
            "{}",
            c.span.name
        );
    }
    for c in [publish, *on_follower, *on_leader, deliver, process] {
        assert_eq!(
            int_attribute(&c.span.attributes, "messaging.weft.offset"),
            Some(0),
            "{}",
            c.span.name
        );
    }
    for c in [publish, *on_follower, deliver] {
        assert_eq!(
            int_attribute(&c.span.attributes, "messaging.batch.message_count"),
            Some(1),
            "{}",
            c.span.name
        );
    }
    assert_eq!(
        string_attribute(&publish.span.attributes, "messaging.operation.type").as_deref(),
        Some("send")
    );
    assert_eq!(
        string_attribute(&process.span.attributes, "messaging.operation.type").as_deref(),
        Some("process")
    );
    // Kinds: producer spans, the brokers' server spans, the consumer's.
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    assert_eq!(create.span.kind, SpanKind::Producer as i32);
    assert_eq!(publish.span.kind, SpanKind::Producer as i32);
    assert_eq!(on_follower.span.kind, SpanKind::Server as i32);
    assert_eq!(process.span.kind, SpanKind::Consumer as i32);

    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .expect("shutdown");
    server.abort();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_bad_otlp_endpoint_is_a_config_error() {
    let out = std::process::Command::new(binary("weft-broker"))
        .args(["--otlp-endpoint", "collector:4317", "--check-config"])
        .output()
        .expect("run weft-broker");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("telemetry.otlp_endpoint") && stderr.contains("http://HOST:PORT"),
        "{stderr}"
    );
    // OTLP over TLS is refused at start with the reason (the exporter is built without TLS),
    // not accepted by --check-config and then failing when the broker starts.
    let out = std::process::Command::new(binary("weft-broker"))
        .args([
            "--otlp-endpoint",
            "https://collector:4317",
            "--check-config",
        ])
        .output()
        .expect("run weft-broker");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not supported"),
        "{out:?}"
    );
    // The CLI refuses it too, with its own message.
    let out = std::process::Command::new(binary("weft"))
        .args(["--otlp-endpoint", "nonsense", "topic", "list"])
        .output()
        .expect("run weft");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--otlp-endpoint"),
        "{out:?}"
    );
}
