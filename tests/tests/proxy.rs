//! A broker behind a real HTTP/2 gRPC proxy (Debian's nginx, `grpc_pass`), as a mesh sidecar
//! or gateway puts it, with the natural policy: producers and consumers may not administer
//! (`/weft.v1.TopicAdmin/` and `/weft.v1.Cluster/` answer 403 at the proxy).
//! - A client that only publishes and consumes needs only Publisher, Subscriber and the
//!   read-only Metadata service, so the policy does not stop it (it did: the producer asked
//!   TopicAdmin/GetTopic for the topic's partitions first).
//! - A call the proxy refuses, or cannot pass on because the broker is gone, gets the gRPC code
//!   the gRPC spec maps the HTTP status to (PERMISSION_DENIED, UNAVAILABLE), saying the proxy
//!   answered (it was "protocol error: received message with invalid compression flag: 60").
//! - nginx's access log shows each call by its gRPC path and status.

use std::process::Command;

use weft_tests::{Broker, Nginx, binary, free_port, ok_stdout};

struct Proxy {
    nginx: Nginx,
    address: String,
}

impl Proxy {
    /// nginx on 127.0.0.1:`port` in front of `broker` (h2c both ways), refusing the admin
    /// services with 403.
    fn start(port: u16, broker: &str) -> Proxy {
        let address = format!("127.0.0.1:{port}");
        let nginx = Nginx::start(
            "$request_method $request_uri $status grpc-status=$sent_trailer_grpc_status",
            |_| {
                format!(
                    r#"    server {{
        listen 127.0.0.1:{port} http2;
        # Producers and consumers do not administer.
        location /weft.v1.TopicAdmin/ {{ return 403; }}
        location /weft.v1.Cluster/ {{ return 403; }}
        location / {{
            grpc_pass grpc://{broker};
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
        }}
    }}"#
                )
            },
            &address,
        );
        Proxy { nginx, address }
    }

    fn access_log(&self) -> String {
        self.nginx.access_log()
    }

    /// The `weft` CLI through the proxy.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("weft"))
            .args(["--server", &self.address, "--timeout-ms", "10000"])
            .args(args)
            .env_remove("WEFT_SERVER")
            .output()
            .expect("run weft")
    }
}

#[test]
fn producers_and_consumers_pass_a_proxy_that_keeps_administration_for_operators() {
    // The broker advertises the proxy's address: clients that learn leaders from the metadata
    // (ours do) come back through the proxy, as they would through a gateway.
    let proxy_port = free_port();
    let advertised = format!("127.0.0.1:{proxy_port}");
    let mut broker = Broker::start_on(
        [0, 0, 0].map(|_| format!("127.0.0.1:{}", free_port())),
        &["--advertised-client-address", &advertised],
        &[],
    );
    ok_stdout(&broker.cli(&["topic", "create", "orders", "--partitions", "2"]));
    let proxy = Proxy::start(proxy_port, &broker.client_addr);

    // Publish and consume as a group, through the proxy only.
    ok_stdout(&proxy.cli(&["produce", "orders", "a", "b", "c"]));
    let consumed = ok_stdout(&proxy.cli(&[
        "consume", "orders", "--group", "billing", "--from", "earliest", "--count", "3",
    ]));
    let mut values: Vec<&str> = consumed.lines().collect();
    values.sort();
    assert_eq!(values, ["a", "b", "c"]);

    // Administration is refused by the proxy, and the client says so.
    let refused = proxy.cli(&["topic", "create", "payments", "--partitions", "1"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "the proxy let CreateTopic through"
    );
    assert!(
        stderr.contains("PermissionDenied") || stderr.contains("permission denied"),
        "{stderr}"
    );
    assert!(stderr.contains("HTTP 403"), "{stderr}");
    assert!(stderr.contains("proxy"), "{stderr}");
    assert!(
        !stderr.contains("compression flag"),
        "the proxy's HTML was read as gRPC: {stderr}"
    );
    // The broker never saw it: the topic does not exist.
    let topics = ok_stdout(&broker.cli(&["topic", "list"]));
    assert!(!topics.contains("payments"), "{topics}");

    // The access log shows each call by its gRPC path and status.
    let log = proxy.access_log();
    for line in [
        "POST /weft.v1.Metadata/GetTopic 200 grpc-status=0",
        "POST /weft.v1.Publisher/PublishStream 200",
        "POST /weft.v1.Subscriber/Subscribe 200",
        "POST /weft.v1.TopicAdmin/CreateTopic 403",
    ] {
        assert!(log.contains(line), "no {line:?} in the access log:\n{log}");
    }
    assert!(
        !log.contains("/weft.v1.TopicAdmin/GetTopic"),
        "a producer or consumer asked TopicAdmin:\n{log}"
    );

    // The broker gone: the proxy answers 502, which is UNAVAILABLE (retry elsewhere).
    broker.stop();
    let gone = proxy.cli(&["produce", "orders", "d"]);
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(!gone.status.success());
    assert!(
        stderr.contains("Unavailable") || stderr.contains("unavailable"),
        "{stderr}"
    );
    assert!(stderr.contains("HTTP 502"), "{stderr}");
}
