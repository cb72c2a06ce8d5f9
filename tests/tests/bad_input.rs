//! Bad input gets a clear error (a real gRPC status with details, an HTTP 4xx with a JSON body, a
//! non-zero exit naming the config key) and the broker keeps serving.

use tonic::Code;
use tonic_types::StatusExt;
use weft_proto::v1::publish_request::Target;
use weft_proto::v1::publisher_client::PublisherClient;
use weft_proto::v1::{PublishRequest, Record};
use weft_tests::{Broker, binary, ok_stdout};

fn request(topic: &str, values: usize, value_bytes: usize) -> PublishRequest {
    PublishRequest {
        topic: topic.into(),
        target: Some(Target::Partition(0)),
        records: (0..values)
            .map(|_| Record {
                value: vec![b'x'; value_bytes].into(),
                ..Record::default()
            })
            .collect(),
        ..PublishRequest::default()
    }
}

async fn still_serving(publisher: &mut PublisherClient<tonic::transport::Channel>) {
    let ok = publisher
        .publish(request("t", 1, 10))
        .await
        .expect("the broker keeps serving")
        .into_inner();
    assert_eq!(ok.record_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grpc_requests_get_statuses_with_details() {
    let broker = Broker::start_with(&[]);
    broker
        .client()
        .await
        .admin()
        .create_topic("t", 1)
        .await
        .expect("create");
    let mut publisher = PublisherClient::connect(format!("http://{}", broker.client_addr))
        .await
        .expect("connect");

    let unknown = publisher
        .publish(request("no-such-topic", 1, 10))
        .await
        .expect_err("unknown topic");
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(
        unknown.get_details_error_info().expect("ErrorInfo").reason,
        "TOPIC_NOT_FOUND"
    );
    still_serving(&mut publisher).await;

    // Over the topic's max_message_bytes (1 MiB by default).
    let big = publisher
        .publish(request("t", 3, 600 * 1024))
        .await
        .expect_err("oversize batch");
    assert_eq!(big.code(), Code::ResourceExhausted);
    // Over batch_records_max (10 000 by default): said in records, not bytes.
    let many = publisher
        .publish(request("t", 10_001, 1))
        .await
        .expect_err("too many records");
    assert_eq!(many.code(), Code::ResourceExhausted);
    assert_eq!(
        many.get_details_error_info().expect("ErrorInfo").reason,
        "TOO_MANY_RECORDS"
    );
    assert!(
        many.message().contains("10001 records"),
        "{}",
        many.message()
    );
    // Over grpc_message_bytes_max (16 MiB): RESOURCE_EXHAUSTED, as gRPC convention has it.
    let mut big_publisher = publisher
        .clone()
        .max_encoding_message_size(64 * 1024 * 1024);
    let huge = big_publisher
        .publish(request("t", 20, 1024 * 1024))
        .await
        .expect_err("a 20 MiB request");
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    // A hostile 10 000-character topic name is refused as invalid (no topic can have it) and not
    // echoed whole into the response headers.
    let long = "x".repeat(10_000);
    let unknown_long = publisher
        .publish(request(&long, 1, 1))
        .await
        .expect_err("a topic name too long");
    assert_eq!(unknown_long.code(), Code::InvalidArgument);
    assert!(
        unknown_long.message().len() < 300,
        "{} characters",
        unknown_long.message().len()
    );
    still_serving(&mut publisher).await;

    // Malformed: no records, no topic, a bad header name.
    let empty = publisher
        .publish(request("t", 0, 0))
        .await
        .expect_err("no records");
    assert_eq!(empty.code(), Code::InvalidArgument);
    let bad = empty.get_details_bad_request().expect("BadRequest");
    assert_eq!(bad.field_violations[0].field, "records");
    let no_topic = publisher
        .publish(request("", 1, 1))
        .await
        .expect_err("no topic");
    assert_eq!(no_topic.code(), Code::InvalidArgument);
    let mut bad_header = request("t", 1, 1);
    bad_header.records[0].headers.push(weft_proto::v1::Header {
        key: String::new(),
        value: bytes::Bytes::new(),
    });
    assert_eq!(
        publisher
            .publish(bad_header)
            .await
            .expect_err("empty header name")
            .code(),
        Code::InvalidArgument
    );
    let missing_partition = PublishRequest {
        target: Some(Target::Partition(7)),
        ..request("t", 1, 1)
    };
    assert_eq!(
        publisher
            .publish(missing_partition)
            .await
            .expect_err("no partition 7")
            .code(),
        Code::NotFound
    );
    still_serving(&mut publisher).await;

    // The weft-topic header must match the body.
    let mut mismatched = tonic::Request::new(request("t", 1, 1));
    mismatched
        .metadata_mut()
        .insert("weft-topic", "other".parse().expect("ascii"));
    let status = publisher
        .publish(mismatched)
        .await
        .expect_err("header mismatch");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status
            .get_details_bad_request()
            .expect("BadRequest")
            .field_violations[0]
            .field,
        "metadata.weft-topic"
    );
    still_serving(&mut publisher).await;

    // Bytes that are not a protobuf message at all.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", broker.client_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut raw = tonic::client::Grpc::new(channel);
    raw.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/weft.v1.Publisher/Publish");
    let garbage: Result<tonic::Response<bytes::Bytes>, tonic::Status> = raw
        .unary(
            tonic::Request::new(bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f])),
            path,
            RawCodec,
        )
        .await;
    let status = garbage.expect_err("garbage is refused");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status.message().contains("decode"),
        "says the message did not decode: {status:?}"
    );
    still_serving(&mut publisher).await;
}

/// The `weft-group` header (mirrored by our client, matched by mesh policies) must name the
/// group the body names, on every group call: a client cannot pass a policy for one group with
/// a call for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_header_that_disagrees_with_the_body_is_refused() {
    use weft_proto::v1::{
        CommitOffsetsRequest, DescribeGroupRequest, PartitionOffset, SubscribeRequest,
        SubscribeStart, subscribe_request,
    };
    let broker = Broker::start();
    ok_stdout(&broker.cli(&["topic", "create", "t", "--partitions", "1"]));
    let channel = weft_tests::grpc::channel(&broker.client_addr).await;
    let mut subscriber = weft_tests::grpc::subscriber(&channel);
    fn with_group<T>(body: T, group: &str) -> tonic::Request<T> {
        let mut request = tonic::Request::new(body);
        request
            .metadata_mut()
            .insert("weft-group", group.parse().expect("ascii"));
        request
    }
    fn refused_for_the_header(status: tonic::Status) {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(
            status
                .get_details_bad_request()
                .expect("BadRequest")
                .field_violations[0]
                .field,
            "metadata.weft-group"
        );
    }
    let commit = CommitOffsetsRequest {
        group_id: "billing".into(),
        topic: "t".into(),
        offsets: vec![PartitionOffset {
            partition: 0,
            offset: 0,
        }],
        ..CommitOffsetsRequest::default()
    };
    refused_for_the_header(
        subscriber
            .commit_offsets(with_group(commit.clone(), "audit"))
            .await
            .expect_err("CommitOffsets for billing under an audit header"),
    );
    subscriber
        .commit_offsets(with_group(commit, "billing"))
        .await
        .expect("a matching header passes");
    refused_for_the_header(
        subscriber
            .describe_group(with_group(
                DescribeGroupRequest {
                    group_id: "billing".into(),
                },
                "audit",
            ))
            .await
            .expect_err("DescribeGroup under another group's header"),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Start(SubscribeStart {
            topic: "t".into(),
            group_id: "billing".into(),
            ..SubscribeStart::default()
        })),
    })
    .await
    .expect("queue the start");
    let opened = subscriber
        .subscribe(with_group(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            "audit",
        ))
        .await;
    let status = match opened {
        Err(status) => status,
        Ok(response) => response
            .into_inner()
            .message()
            .await
            .expect_err("the stream ends with the refusal"),
    };
    refused_for_the_header(status);
    // Our client mirrors the group it consumes as: the broker accepts its calls.
    ok_stdout(&broker.cli(&["produce", "t", "x"]));
    let consumed = ok_stdout(&broker.cli(&[
        "consume", "t", "--group", "billing", "--from", "earliest", "--count", "1",
    ]));
    assert_eq!(consumed.trim(), "x");
}

#[test]
fn bad_admin_requests_get_a_4xx_json_body() {
    let broker = Broker::start();
    let (status, body) = broker.http("POST", "/v1/topics", Some(r#"{"name":"t","partitions":2}"#));
    assert_eq!(status, 201, "{body}");
    // Topics with their configs and offsets (not sizes: a new partition's log writes its Raft
    // bootstrap entries in the background).
    let topics = || {
        let (_, body) = broker.http("GET", "/v1/topics", None);
        let mut topics: serde_json::Value = serde_json::from_str(&body).expect("json");
        for topic in topics.as_array_mut().expect("topics") {
            for p in topic["partition_details"]
                .as_array_mut()
                .expect("partitions")
            {
                p.as_object_mut().expect("partition").remove("size_bytes");
            }
        }
        topics
    };
    let before = topics();
    let big = format!(r#"{{"name":"big","padding":"{}"}}"#, "x".repeat(100 * 1024));
    // (method, path, body, status, error code, offending field)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        u16,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "POST",
            "/v1/topics",
            Some("{not json"),
            400,
            "INVALID_ARGUMENT",
            Some("body"),
        ),
        (
            "POST",
            "/v1/topics",
            Some(r#"{"name":"ok-name","partitions":"three"}"#),
            400,
            "INVALID_ARGUMENT",
            Some("body"),
        ),
        (
            "POST",
            "/v1/topics",
            Some(r#"{"name":"bad name!"}"#),
            400,
            "INVALID_ARGUMENT",
            Some("name"),
        ),
        (
            "POST",
            "/v1/topics",
            Some(r#"{"name":"x","unknown_field":1}"#),
            400,
            "INVALID_ARGUMENT",
            Some("body"),
        ),
        (
            "POST",
            "/v1/topics",
            Some(r#"{"name":"x","fsync_policy":"never"}"#),
            400,
            "INVALID_ARGUMENT",
            Some("fsync_policy"),
        ),
        (
            "POST",
            "/v1/topics",
            Some(r#"{"name":"x","partitions":100000}"#),
            400,
            "INVALID_ARGUMENT",
            Some("config.partitions"),
        ),
        (
            "POST",
            "/v1/topics",
            Some(r#"{"name":"x","partitions":0}"#),
            400,
            "INVALID_ARGUMENT",
            Some("config.partitions"),
        ),
        (
            "POST",
            "/v1/topics",
            Some(r#"{"name":"x","replication_factor":0}"#),
            400,
            "INVALID_ARGUMENT",
            Some("config.replication_factor"),
        ),
        // Before: stored, every partition under-replicated for good, and each rebalance grew
        // the topic's partitions onto every broker.
        (
            "POST",
            "/v1/topics",
            Some(r#"{"name":"x","replication_factor":4294967295}"#),
            400,
            "INVALID_ARGUMENT",
            Some("config.replication_factor"),
        ),
        // An interval with the policy that has none: refused, never dropped unseen.
        (
            "POST",
            "/v1/topics",
            Some(r#"{"name":"x","fsync_policy":"always","fsync_interval_ms":50}"#),
            400,
            "INVALID_ARGUMENT",
            Some("config.fsync_interval_ms"),
        ),
        (
            "POST",
            "/v1/brokers/abc/remove",
            Some("{}"),
            400,
            "INVALID_ARGUMENT",
            Some("path"),
        ),
        (
            "POST",
            "/v1/topics/t/partitions/4294967296/leader",
            Some("{}"),
            400,
            "INVALID_ARGUMENT",
            Some("path"),
        ),
        (
            "GET",
            "/v1/topics/%FF",
            None,
            400,
            "INVALID_ARGUMENT",
            Some("path"),
        ),
        (
            "POST",
            "/v1/topics",
            Some(r#"{"name":"t"}"#),
            409,
            "TOPIC_EXISTS",
            None,
        ),
        (
            "POST",
            "/v1/topics",
            Some(big.as_str()),
            413,
            "BODY_TOO_LARGE",
            None,
        ),
        (
            "PATCH",
            "/v1/topics/t",
            Some("{}"),
            400,
            "INVALID_ARGUMENT",
            Some("update_mask"),
        ),
        (
            "PATCH",
            "/v1/topics/t",
            Some(r#"{"colour":"red"}"#),
            400,
            "INVALID_ARGUMENT",
            Some("body"),
        ),
        (
            "PATCH",
            "/v1/topics/t",
            Some(r#"{"partitions":1}"#),
            400,
            "INVALID_ARGUMENT",
            Some("config.partitions"),
        ),
        (
            "PATCH",
            "/v1/topics/t",
            Some(r#"{"replication_factor":3}"#),
            400,
            "INVALID_ARGUMENT",
            Some("update_mask"),
        ),
        (
            "PATCH",
            "/v1/topics/t",
            Some(r#"{"retention_ms":0}"#),
            400,
            "INVALID_ARGUMENT",
            Some("config.retention_ms"),
        ),
        (
            "PATCH",
            "/v1/topics/missing",
            Some(r#"{"retention_ms":1000}"#),
            404,
            "TOPIC_NOT_FOUND",
            None,
        ),
        (
            "PATCH",
            "/v1/topics/bad%20name",
            Some(r#"{"retention_ms":1000}"#),
            400,
            "INVALID_ARGUMENT",
            Some("name"),
        ),
        (
            "GET",
            "/v1/topics/missing",
            None,
            404,
            "TOPIC_NOT_FOUND",
            None,
        ),
        (
            "DELETE",
            "/v1/topics/missing",
            None,
            404,
            "TOPIC_NOT_FOUND",
            None,
        ),
        (
            "GET",
            "/v1/groups/missing",
            None,
            404,
            "GROUP_NOT_FOUND",
            None,
        ),
        (
            "DELETE",
            "/v1/groups/missing",
            None,
            404,
            "GROUP_NOT_FOUND",
            None,
        ),
        ("GET", "/no/such/path", None, 404, "NOT_FOUND", None),
        (
            "PUT",
            "/v1/topics",
            Some("{}"),
            405,
            "METHOD_NOT_ALLOWED",
            None,
        ),
        (
            "POST",
            "/v1/cluster",
            Some("{}"),
            405,
            "METHOD_NOT_ALLOWED",
            None,
        ),
    ];
    for (method, path, request, want, code, field) in cases {
        let case = format!("{method} {path} {:.60}", request.unwrap_or(""));
        let (status, body) = broker.http(method, path, request);
        assert_eq!(status, want, "{case}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{case}: not JSON ({e}): {body}"));
        assert_eq!(body["error"]["code"], code, "{case}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{case}: a message: {body}"
        );
        if let Some(field) = field {
            let fields = body["error"]["fields"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert!(
                fields.iter().any(|f| f["field"] == field),
                "{case}: names {field}: {body}"
            );
        }
    }
    // Nothing changed, and the API still serves.
    assert_eq!(topics(), before, "bad requests changed nothing");
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"fine","partitions":2}"#),
    );
    assert_eq!(status, 201, "{body}");
}

#[test]
fn invalid_config_is_a_clear_error_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("node_id = 0\n", "node_id"),
        ("fetch_bytes_max = 1\n", "fetch_bytes_max"),
        ("no_such_key = true\n", "no_such_key"),
        (
            "[topic_defaults]\nfsync_policy = \"never\"\n",
            "topic_defaults.fsync_policy",
        ),
        ("node_id = \"one\"\n", "node_id"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("weft.toml");
        std::fs::write(&path, text).expect("write");
        let output = std::process::Command::new(binary("weft-broker"))
            .args(["--config", path.to_str().expect("utf-8")])
            .output()
            .expect("run weft-broker");
        assert_eq!(output.status.code(), Some(2), "{text:?} must be refused");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(key),
            "{text:?}: the error must name {key}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    let missing = std::process::Command::new(binary("weft-broker"))
        .args(["--config", "/nonexistent/weft.toml"])
        .output()
        .expect("run");
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn cli_failures_exit_non_zero_with_one_line() {
    let broker = Broker::start();
    ok_stdout(&broker.cli(&["topic", "create", "t", "--partitions", "2"]));
    // Failures the broker reports: exit 1, one line "weft: <reason>".
    let failures: Vec<(Vec<&str>, &str)> = vec![
        (vec!["topic", "describe", "nope"], "not found"),
        (vec!["topic", "create", "t"], "exists"),
        (vec!["topic", "create", "bad name!"], "name"),
        (
            vec!["topic", "create", "n", "--partitions", "5000"],
            "partitions",
        ),
        (
            vec!["topic", "alter", "nope", "--retention-ms", "5"],
            "not found",
        ),
        (vec!["topic", "alter", "t"], "nothing to change"),
        (
            vec!["topic", "create", "n", "--max-message-bytes", "67108864"],
            "grpc_message_bytes_max",
        ),
        (
            vec!["topic", "alter", "t", "--partitions", "1"],
            "partitions",
        ),
        (vec!["topic", "delete", "nope"], "not found"),
        (vec!["produce", "nope", "v"], "not found"),
        (vec!["produce", "t", "v", "--partition", "9"], "partition"),
        (
            vec!["consume", "nope", "--from", "earliest", "--count", "1"],
            "not found",
        ),
        (vec!["group", "describe", "nope"], "not found"),
        (vec!["group", "delete", "nope"], "not found"),
        (
            vec!["produce", "t", "v", "-H", "no-equals-sign"],
            "name=value",
        ),
        (vec!["consume", "t", "--from", "yesterday"], "--from"),
        // Refused before anything is read (before: records printed, then a failed commit).
        (
            vec!["consume", "t", "-g", "", "--from", "earliest", "-n", "1"],
            "group id is empty",
        ),
    ];
    for (args, needle) in failures {
        let output = broker.cli(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("weft: ") && stderr.to_lowercase().contains(needle),
            "{args:?}: the reason ({needle}): {stderr}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{args:?}: one line: {stderr}"
        );
    }
    // Usage errors (caught before anything is sent): exit 2, the reason on the first line.
    let usage: Vec<Vec<&str>> = vec![
        vec!["topic", "frobnicate"],
        vec!["topic", "create", "z", "--partitions", "0"],
        vec!["topic", "create", "z", "--replication-factor", "0"],
        vec!["topic", "create", "z", "--replication-factor", "1000"],
        // Node ids start at 1 (before: `--to 0` went out as "no target given", and the broker
        // moved the leadership to a replica of its own choosing).
        vec!["cluster", "transfer", "t", "0", "--to", "0"],
        vec!["cluster", "move", "t", "0", "--replicas", "1,0"],
        vec!["cluster", "remove-broker", "0"],
        vec!["topic", "alter", "t", "--partitions", "0"],
        vec!["--timeout-ms", "400000000000000", "topic", "list"],
        vec!["--timeout-ms", "0", "topic", "list"],
        vec!["topic", "alter", "t", "--retention-ms", "soon"],
        vec!["topic", "alter", "t", "--fsync", "sometimes"],
    ];
    for args in usage {
        let output = broker.cli(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr
                .lines()
                .next()
                .is_some_and(|l| l.starts_with("error: ")),
            "{args:?}: {stderr}"
        );
    }
    // A record larger than a gRPC message may be (16 MiB), on a topic that allows as much: the
    // client names the limit (the transport said only "Internal: h2 protocol error"), and
    // nothing was stored: the next record takes offset 0.
    ok_stdout(&broker.cli(&["topic", "create", "big", "--max-message-bytes", "16777216"]));
    let output = broker.cli_with_stdin(&["produce", "big"], &"x".repeat(20_000_000));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("weft: ") && stderr.contains("larger than one publish can carry"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let stored = ok_stdout(&broker.cli(&["produce", "big", "small"]));
    assert!(stored.contains("offset 0"), "{stored}");
    // Nothing to talk to: exit 1, one line naming the address.
    for server in ["127.0.0.1:1", "not an address"] {
        let output = std::process::Command::new(binary("weft"))
            .args(["--server", server, "topic", "list"])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{server}: {stderr}");
        assert!(stderr.starts_with("weft: "), "{server}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{server}: {stderr}");
    }
}

/// Passes raw bytes through unchanged, to send malformed messages.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<bytes::Bytes>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The admin API bounds what a caller can make it hold. With `request_timeout_ms = 1000` and
/// `admin_connections_max = 3`: a request whose body stops coming is answered 504 with a JSON
/// body once it has taken 6 s (four times the timeout plus 2 s); a connection that sends half
/// a request head, and then a byte every half second, is closed once nothing has gone out on
/// it for 8 s; a fourth connection is closed once accepted while three are open, and the three
/// are served. Before, the first two waited for as long as their callers kept them (a task and
/// a file descriptor each, without limit), and every connection was kept (helper-123,
/// helper-125).
#[test]
fn the_admin_api_bounds_stalled_requests_and_its_connections() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(
        &config,
        "request_timeout_ms = 1000\nadmin_connections_max = 3\n",
    )
    .expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("utf-8 path")]);
    broker.wait_ready();
    let connect = || {
        let stream = TcpStream::connect(&broker.admin_addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .expect("read timeout");
        stream
    };
    // What the broker sends until it closes the connection (or 15 s pass: an error).
    let until_closed = |stream: &mut TcpStream| {
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return Ok(String::from_utf8_lossy(&answer).into_owned()),
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    // A whole answer: its head and a JSON body.
                    if String::from_utf8_lossy(&answer).trim_end().ends_with('}') {
                        return Ok(String::from_utf8_lossy(&answer).into_owned());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Ok(String::from_utf8_lossy(&answer).into_owned());
                }
                Err(e) => return Err(e),
            }
        }
    };

    let mut half_body = connect();
    half_body
        .write_all(
            b"POST /v1/topics HTTP/1.1\r\nHost: weft\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{",
        )
        .expect("write");
    let began = Instant::now();
    let answer = until_closed(&mut half_body).expect("an answer to a request whose body stopped");
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains(r#""error""#), "{answer}");
    assert!(
        began.elapsed() < Duration::from_secs(12),
        "{:?}",
        began.elapsed()
    );
    drop(half_body);

    let mut half_head = connect();
    half_head
        .write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .expect("write");
    let began = Instant::now();
    // The head trickles on, a byte every half second, and never ends.
    let mut trickle = half_head.try_clone().expect("clone");
    let trickling = std::thread::spawn(move || {
        for _ in 0..60 {
            if trickle.write_all(b"o").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let answer = until_closed(&mut half_head).expect("a connection closed after a half head");
    assert!(!answer.starts_with("HTTP/1.1 2"), "{answer}");
    assert!(
        began.elapsed() < Duration::from_secs(15),
        "{:?}",
        began.elapsed()
    );
    drop(half_head);
    trickling.join().expect("the trickling thread");
    // The broker notices the closed connections.
    std::thread::sleep(Duration::from_millis(500));

    let mut open: Vec<TcpStream> = (0..3).map(|_| connect()).collect();
    let mut fourth = connect();
    let began = Instant::now();
    let answer = until_closed(&mut fourth).expect("the fourth connection closed");
    assert_eq!(answer, "", "nothing served on the fourth connection");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    for stream in &mut open {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: weft\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    drop(open);
    drop(fourth);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        weft_tests::metric(&broker, "weft_admin_connections_refused_total").unwrap_or(0.0) >= 1.0,
        "the refusal is counted"
    );
}

/// The CLI whose output pipe closes (`weft topic list | head -0`) ends quietly, as Unix tools
/// do: no panic, the shell's status for a closed pipe (141), nothing on stderr; a group member
/// does not commit the record it could not print. Before, printing panicked ("failed printing
/// to stdout") and the process exited 101 with the panic's message (helper-123).
#[test]
fn the_cli_ends_quietly_when_its_output_pipe_closes() {
    use std::process::{Command, Stdio};
    let broker = Broker::start();
    for n in 0..20 {
        ok_stdout(&broker.cli(&["topic", "create", &format!("t{n}")]));
    }
    ok_stdout(&broker.cli_with_stdin(&["produce", "t0"], &"v\n".repeat(5000)));
    let closed = |args: &[&str]| {
        let mut child = Command::new(binary("weft"))
            .args(["--server", &broker.client_addr])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn weft");
        // The reader goes away at once.
        drop(child.stdout.take());
        let output = child.wait_with_output().expect("weft ends");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    };
    closed(&["topic", "list"]);
    closed(&["consume", "t0", "--from", "earliest", "-n", "5000"]);
    closed(&[
        "consume", "t0", "--from", "earliest", "-g", "g", "-n", "5000",
    ]);
    // The member committed at most what it printed: none of it was read, and the group starts
    // again at most where its first record was.
    let output = broker.cli(&[
        "consume",
        "t0",
        "-g",
        "g",
        "--from",
        "earliest",
        "-n",
        "1",
        "--idle-timeout-ms",
        "5000",
    ]);
    let stdout = ok_stdout(&output);
    assert_eq!(stdout.trim(), "v", "a record left for the group");
}
