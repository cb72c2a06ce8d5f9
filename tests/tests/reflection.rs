//! A generic gRPC client that knows nothing of Weft (Python grpcio with reflection and health
//! checking) lists the services through server reflection and passes the health check.

use std::process::Command;

use weft_tests::Broker;

#[test]
fn a_generic_client_lists_services_and_checks_health() {
    let broker = Broker::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/generic_client.py");
    let output = Command::new("python3")
        .args([script, &broker.client_addr])
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "generic client failed (install grpcio, grpcio-reflection, grpcio-health-checking): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("JSON from the script");
    let services: Vec<&str> = result["services"]
        .as_array()
        .expect("services")
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    for service in [
        "weft.v1.Publisher",
        "weft.v1.Subscriber",
        "weft.v1.TopicAdmin",
        "weft.v1.Cluster",
        "weft.v1.Metadata",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.contains(&service),
            "reflection lacks {service}: {services:?}"
        );
    }
    assert!(
        !services.iter().any(|s| s.starts_with("weft.internal")),
        "the client port lists only what it serves: {services:?}"
    );
    assert_eq!(result["health"], "SERVING");
    assert_eq!(result["publisher_health"], "SERVING");
    // Reflection serves the full descriptors: the script resolved Publish's input type.
    assert_eq!(result["publish_input"], ".weft.v1.PublishRequest");
}
