//! The peer port's HTTP/2 server keeps a connection through a burst of cancelled calls. One
//! connection per peer carries the Raft traffic of every group, so when a cut heals, a peer
//! cancels many calls at once (their deadlines passed while they waited); h2's default refuses
//! a connection on which more than 20 calls were cancelled before the server took them up, and
//! it closed the whole connection with every call on it: seen as "cannot fetch the entries
//! before the installed snapshot ... h2 protocol error" after a heal (the replica then started
//! its log after the snapshot, without the entries retention keeps).

use std::time::Duration;

use weft_tests::Broker;

fn health_check(address: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://{address}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_keeps_a_connection_through_a_burst_of_cancelled_calls() {
    let broker = Broker::start();
    let tcp = tokio::net::TcpStream::connect(&broker.peer_addr)
        .await
        .expect("connect to the peer port");
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    // 100 calls opened and cancelled at once: each call's headers and its reset leave together,
    // before the server has taken the call up.
    for _ in 0..100 {
        let (_response, mut stream) = client
            .send_request(health_check(&broker.peer_addr), false)
            .expect("open a call");
        stream.send_reset(h2::Reason::CANCEL);
    }
    // The connection still serves a call.
    let mut client = tokio::time::timeout(Duration::from_secs(5), client.ready())
        .await
        .expect("in time")
        .expect("the connection is still open");
    let (response, mut stream) = client
        .send_request(health_check(&broker.peer_addr), false)
        .expect("open a call");
    // An empty HealthCheckRequest: the gRPC frame header alone.
    stream
        .send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .expect("send");
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("answered in time")
        .expect("answered on the same connection, not refused");
    assert_eq!(response.status(), 200);
    assert!(!connection.is_finished(), "the connection ended");
}

/// A snapshot chunk far past the bytes received so far is refused. openraft writes each chunk
/// at its offset into a buffer that first grows to that offset, so one forged chunk at 1 TiB
/// (past a first chunk that opens the stream) made the broker abort on the allocation: any
/// host that reached the peer port could stop a broker with two calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_chunk_far_past_what_came_is_refused_and_the_broker_lives() {
    use weft_proto::internal::v1 as internal;

    let mut broker = Broker::start();
    let channel = weft_tests::grpc::channel(&broker.peer_addr).await;
    let mut raft = internal::raft_client::RaftClient::new(channel);
    let chunk = |offset: u64, data: &[u8]| {
        let mut request = tonic::Request::new(internal::InstallSnapshotChunk {
            group_id: 0,
            vote: Some(internal::Vote {
                term: 1_000_000,
                node_id: 2,
                committed: true,
            }),
            meta: Some(internal::SnapshotMeta {
                last_log_id: None,
                last_membership_log_id: None,
                last_membership: Some(internal::Membership::default()),
                snapshot_id: "forged".into(),
            }),
            offset,
            data: data.to_vec().into(),
            done: false,
        });
        request
            .metadata_mut()
            .insert("weft-cluster", "weft".parse().expect("ascii"));
        request
            .metadata_mut()
            .insert("weft-target-node", "1".parse().expect("ascii"));
        request
    };
    raft.install_snapshot(chunk(0, &[7; 10]))
        .await
        .expect("a first chunk opens the stream");
    raft.install_snapshot(chunk(10, &[7; 10]))
        .await
        .expect("the next chunk continues it");
    for (offset, why) in [(1 << 20, "does not follow"), (1 << 40, "would exceed")] {
        let status = raft
            .install_snapshot(chunk(offset, &[7; 10]))
            .await
            .expect_err("a chunk far past the bytes received is refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(why), "{status:?}");
    }
    let (code, body) = broker.http("GET", "/healthz", None);
    assert_eq!(code, 200, "the broker still serves: {body}");
    assert_eq!(
        broker.stop(),
        Some(0),
        "and stops cleanly: {}",
        broker.log()
    );
}
