//! The admin HTTP API: health, readiness, Prometheus metrics with the documented names, the JSON
//! API for topics and groups, and the generated OpenAPI document.

use weft_tests::{Broker, ok_stdout};

#[test]
fn health_metrics_topics_groups_and_openapi() {
    let broker = Broker::start();
    assert_eq!(broker.http("GET", "/healthz", None).0, 200);
    let (status, body) = broker.http("GET", "/readyz", None);
    assert_eq!(status, 200);
    assert!(body.contains("ready"));

    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"metered","partitions":2,"retention_ms":3600000}"#),
    );
    assert_eq!(status, 201, "{body}");
    let topic: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(topic["partitions"], 2);
    assert_eq!(topic["retention_ms"], 3_600_000);
    assert_eq!(
        topic["fsync_policy"], "always",
        "fsync before ack is the default"
    );

    ok_stdout(&broker.cli(&["produce", "metered", "a", "b", "c", "--partition", "1"]));
    ok_stdout(&broker.cli(&[
        "consume", "metered", "--from", "earliest", "--group", "readers", "--count", "3",
    ]));

    let (status, metrics) = broker.http("GET", "/metrics", None);
    assert_eq!(status, 200);
    // Logs written to a file (not a terminal) carry no colour codes.
    let log = broker.log();
    assert!(log.contains("weft-broker ready"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escape codes in a log file");
    for needle in [
        // The CLI's producer sends its batches over one PublishStream.
        "weft_rpc_requests_total{method=\"PublishStream\",code=\"Ok\"}",
        "weft_rpc_duration_seconds_bucket{method=\"PublishStream\"",
        "weft_partition_log_end_offset{topic=\"metered\",partition=\"1\"} 3",
        "weft_partition_high_watermark{topic=\"metered\",partition=\"1\"} 3",
        "weft_partition_size_bytes{topic=\"metered\",partition=\"1\"}",
        "weft_group_lag_records{group=\"readers\",topic=\"metered\",partition=\"1\"} 0",
    ] {
        // A needle with a value must be the whole line (" 3" must not match " 30").
        let found = if needle.ends_with('}') || needle.ends_with('"') {
            metrics.lines().any(|l| l.starts_with(needle))
        } else {
            metrics.lines().any(|l| l == needle)
        };
        assert!(found, "metrics lack {needle}:\n{metrics}");
    }

    let (status, body) = broker.http("GET", "/v1/topics", None);
    assert_eq!(status, 200);
    assert!(body.contains("\"metered\""));
    let (status, body) = broker.http("GET", "/v1/topics/metered", None);
    assert_eq!(status, 200);
    let described: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(described["partition_details"][1]["high_watermark"], 3);

    let (status, body) = broker.http("GET", "/v1/groups/readers", None);
    assert_eq!(status, 200, "{body}");
    let group: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(group["topic"], "metered");
    assert_eq!(group["lag"], 0);
    let (status, body) = broker.http("GET", "/v1/groups", None);
    assert_eq!(status, 200);
    assert!(body.contains("readers"));
    assert_eq!(broker.http("GET", "/v1/groups/none", None).0, 404);

    let (status, body) = broker.http("GET", "/v1/cluster", None);
    assert_eq!(status, 200);
    assert!(body.contains("\"node_id\":1"));

    let (status, body) = broker.http("GET", "/openapi.json", None);
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).expect("OpenAPI is JSON");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')));
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/topics",
        "/v1/topics/{name}",
        "/v1/groups/{id}",
        "/v1/cluster",
    ] {
        assert!(doc["paths"].get(path).is_some(), "OpenAPI lacks {path}");
    }

    let (status, _) = broker.http("DELETE", "/v1/topics/metered", None);
    assert_eq!(status, 204);
    assert_eq!(broker.http("GET", "/v1/topics/metered", None).0, 404);
}

/// A topic asking for more replicas than there are brokers keeps its replication factor and says
/// it is under-replicated (never a silent downgrade); a topic left to the default gets what the
/// cluster can hold (one replica on a single node) and is not.
#[test]
fn a_replication_factor_above_the_broker_count_is_kept_and_reported() {
    let broker = Broker::start();
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"wide","partitions":2,"replication_factor":3}"#),
    );
    assert_eq!(status, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["replication_factor"], 3, "{body}");
    assert_eq!(v["under_replicated"], true, "{body}");
    assert_eq!(
        v["partition_details"][0]["replicas"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        v["partition_details"][0]["under_replicated"], true,
        "{body}"
    );
    let (status, body) = broker.http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"plain","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["replication_factor"], 1, "{body}");
    assert_eq!(v["under_replicated"], false, "{body}");
    assert_eq!(
        v["partition_details"][0]["in_sync_replicas"],
        serde_json::json!([1])
    );
    let described = weft_tests::ok_stdout(&broker.cli(&["topic", "describe", "wide"]));
    assert!(described.contains("UNDER-REPLICATED"), "{described}");
    assert_eq!(
        weft_tests::metric(&broker, "weft_under_replicated_partitions"),
        Some(2.0)
    );
}
