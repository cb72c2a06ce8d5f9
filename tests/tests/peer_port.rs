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
