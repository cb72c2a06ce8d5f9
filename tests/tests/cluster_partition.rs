//! A network partition in a three-broker cluster (real processes, each broker on its own
//! 127.0.0.x, the partition made with iptables as root): the broker leading a partition is cut
//! off from both others. The majority elects a new leader and keeps committing; the isolated
//! leader refuses publishes at once with UNAVAILABLE (it cannot reach a majority) instead of
//! leaving clients to time out; healed, it follows the new leader and catches up, and every
//! acknowledged record is on it, once, in order.

use std::time::{Duration, Instant};

use tonic::Code;
use weft_proto::v1::publish_request::Target;
use weft_proto::v1::{PublishRequest, Record};
use weft_tests::{Broker, Firewall, fetch_range, grpc, start_cluster, wait_for};

fn value(i: u64) -> String {
    format!("r-{i:05}")
}

/// A publish of records `from .. to` to partition 0, with a 3 s deadline.
fn request(from: u64, to: u64) -> tonic::Request<PublishRequest> {
    let mut request = tonic::Request::new(PublishRequest {
        topic: "split".into(),
        target: Some(Target::Partition(0)),
        records: (from..to)
            .map(|i| Record {
                value: value(i).into_bytes().into(),
                ..Record::default()
            })
            .collect(),
        ..PublishRequest::default()
    });
    request.set_timeout(Duration::from_secs(3));
    request
}

/// The leader of partition 0 as `broker` sees it (0: none).
fn leader_of_0(broker: &Broker) -> u64 {
    let (status, body) = broker.http("GET", "/v1/topics/split", None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["partition_details"][0]["leader_id"].as_u64().unwrap_or(0)
}

/// (entries, bytes) that `replica` lacks of partition 0's log, as `leader` reports it in
/// `/v1/cluster` ((0, 0) when it reports no lag for it).
fn lag_of(leader: &Broker, replica: u64) -> (u64, u64) {
    let (status, body) = leader.http("GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let Some(p) = v["led_partitions"].as_array().and_then(|a| {
        a.iter()
            .find(|p| p["topic"] == "split" && p["partition"] == 0)
    }) else {
        return (0, 0);
    };
    let key = replica.to_string();
    (
        p["replica_lag"][&key].as_u64().unwrap_or(0),
        p["replica_lag_bytes"][&key].as_u64().unwrap_or(0),
    )
}

fn ip(address: &str) -> &str {
    address.rsplit_once(':').expect("ip:port").0
}

/// Publishes records `from .. to` to partition 0 through the broker at `address` until one
/// attempt is acknowledged (within `limit`), as producer `producer_id`: idempotent, since a
/// timed-out attempt may be stored. Returns the base offset.
async fn commit_through(
    address: &str,
    (from, to, producer_id): (u64, u64, u64),
    what: &str,
    limit: Duration,
) -> u64 {
    wait_for(what, limit, || async move {
        let channel = grpc::channel(address).await;
        let mut attempt = request(from, to);
        attempt.get_mut().producer_id = producer_id;
        match grpc::publisher(&channel).publish(attempt).await {
            Ok(r) => Some(r.into_inner().base_offset),
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
                ) =>
            {
                eprintln!("not yet: {s:?}");
                None
            }
            Err(s) => panic!("{s:?}"),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_refuses_writes_and_catches_up_once_healed() {
    let brokers = start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"split","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    let leader = wait_for("a leader of partition 0", Duration::from_secs(30), || {
        let l = leader_of_0(&brokers[0]);
        async move { (l != 0).then_some(l) }
    })
    .await;
    let isolated = &brokers[leader as usize - 1];
    let majority: Vec<&Broker> = brokers
        .iter()
        .filter(|b| b.peer_addr != isolated.peer_addr)
        .collect();
    let channel = grpc::channel(&isolated.client_addr).await;
    let acked = grpc::publisher(&channel)
        .publish(request(0, 20))
        .await
        .expect("publish to the leader")
        .into_inner();
    assert_eq!(acked.base_offset, 0);

    // Cut the leader off: nobody reaches its peer port, and its own peer connections (which
    // leave from its address) reach nobody. Client traffic still reaches it.
    let mut firewall = Firewall::new();
    isolate(&mut firewall, &brokers, isolated);
    let cut_at = Instant::now();

    // The majority elects a leader among themselves and commits.
    let offset = commit_through(
        &majority[0].client_addr,
        (20, 40, 2020),
        "the majority to commit without the isolated leader",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(offset, 20, "the majority continues the log");
    let new_leader = leader_of_0(majority[0]);
    assert!(
        new_leader != 0 && new_leader != leader,
        "node {new_leader} leads now, not the isolated node {leader}"
    );

    // The new leader reports how far the isolated replica is behind, in entries and bytes: at
    // least the 20 records it committed without it.
    let lagging = lag_of(&brokers[new_leader as usize - 1], leader);
    assert!(
        lagging.0 >= 1 && lagging.1 >= 20 * value(0).len() as u64,
        "lag of node {leader} (entries, bytes): {lagging:?}"
    );

    // The isolated broker still believes it leads, but refuses writes at once.
    let asked = Instant::now();
    let refused = grpc::publisher(&channel)
        .publish(request(1000, 1001))
        .await
        .expect_err("a minority cannot commit");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("majority"),
        "{}",
        refused.message()
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "refused at once, not after a timeout: {:?}",
        asked.elapsed()
    );
    // What it served stays readable (never anything past its commit index).
    let read = fetch_range(&isolated.client_addr, "split", 0, 0, 20).await;
    assert_eq!(read.len(), 20);
    eprintln!("partitioned for {:?}", cut_at.elapsed());

    // Healed, it follows the new leader and holds every acknowledged record.
    firewall.heal();
    let address = isolated.client_addr.clone();
    wait_for(
        "the healed broker to catch up",
        Duration::from_secs(30),
        || {
            let address = address.clone();
            async move {
                weft_tests::offsets(&address, "split", 0, None)
                    .await
                    .ok()
                    .filter(|b| b.high_watermark >= 40)
            }
        },
    )
    .await;
    let leader_now = leader_of_0(majority[0]);
    if leader_now != 0 && leader_now != leader {
        let new_leader = &brokers[leader_now as usize - 1];
        wait_for("no lag once caught up", Duration::from_secs(30), || {
            let lag = lag_of(new_leader, leader);
            async move { (lag == (0, 0)).then_some(()) }
        })
        .await;
    }
    let read = fetch_range(&isolated.client_addr, "split", 0, 0, 40).await;
    let got: Vec<(u64, String)> = read
        .iter()
        .map(|(o, v)| (*o, String::from_utf8_lossy(v).into_owned()))
        .collect();
    let want: Vec<(u64, String)> = (0..40).map(|i| (i, value(i))).collect();
    assert_eq!(got, want, "every acknowledged record, once, in order");
    // And publishing through it works again (forwarded to the leader, or led here once more).
    let again = wait_for(
        "a publish through the healed broker",
        Duration::from_secs(30),
        || {
            let channel = channel.clone();
            async move {
                // Retried on any error, so idempotent: an attempt that timed out may have been
                // stored (a forward on a connection still in TCP backoff after the heal), and
                // its retry must get that attempt's offset, not store the record twice.
                let mut retry = request(40, 41);
                retry.get_mut().producer_id = 4040;
                retry.get_mut().base_sequence = 0;
                match grpc::publisher(&channel).publish(retry).await {
                    Ok(r) => Some(r.into_inner().base_offset),
                    Err(s) => {
                        eprintln!("again not yet: {s:?}");
                        None
                    }
                }
            }
        },
    )
    .await;
    assert_eq!(again, 40);
}

/// (term, leader) of partition 0 as `broker`'s replica sees it (its own current term).
async fn leadership_of_0(broker: &Broker) -> (u64, u64) {
    let channel = grpc::channel(&broker.client_addr).await;
    let mut request = tonic::Request::new(weft_proto::v1::ListPartitionsRequest {
        topic: "split".into(),
    });
    request.set_timeout(Duration::from_secs(3));
    let answer = weft_proto::v1::cluster_client::ClusterClient::new(channel)
        .list_partitions(request)
        .await
        .expect("list partitions")
        .into_inner();
    let p = answer
        .partitions
        .iter()
        .find(|p| p.partition == 0)
        .expect("partition 0");
    (p.leader_term, p.leader_id)
}

/// Cuts `broker` off from the other brokers' peer ports and theirs from it.
fn isolate(firewall: &mut Firewall, brokers: &[Broker], broker: &Broker) {
    firewall.drop_tcp(None, &broker.peer_addr);
    for other in brokers.iter().filter(|b| b.peer_addr != broker.peer_addr) {
        firewall.drop_tcp(Some(ip(&broker.peer_addr)), &other.peer_addr);
    }
}

/// Regression (found by the fault-injection harness): a replica cut off from the others stood
/// for election again and again (openraft's own timer), raising its term each time. Back, its
/// higher term unseated the leader; and when a leader was cut off just after such a replica
/// came back behind, its ever higher terms beat the one voter able to win, election after
/// election: the majority stayed without a leader for the whole 9 s cut. A replica now stands
/// only after a pre-vote that a majority granted: cut off, it asks and is refused, its term
/// stays, and back it follows the same leader in the same term. Then the leader is cut off at
/// once (the replica back may still be behind): the two others elect a leader and commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_back_from_isolation_neither_unseats_the_leader_nor_blocks_the_next_election() {
    let brokers = start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"split","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    let leader = wait_for("a leader of partition 0", Duration::from_secs(30), || {
        let l = leader_of_0(&brokers[0]);
        async move { (l != 0).then_some(l) }
    })
    .await;
    let leading = &brokers[leader as usize - 1];
    let (term, _) = leadership_of_0(leading).await;
    for broker in &brokers {
        wait_for(
            "every replica to follow the leader",
            Duration::from_secs(30),
            || async { (leadership_of_0(broker).await == (term, leader)).then_some(()) },
        )
        .await;
    }
    let isolated = brokers
        .iter()
        .find(|b| b.peer_addr != leading.peer_addr)
        .expect("a follower");
    let refused_before =
        weft_tests::metric(isolated, "weft_raft_pre_votes_total{result=\"refused\"}")
            .unwrap_or(0.0);

    let mut firewall = Firewall::new();
    isolate(&mut firewall, &brokers, isolated);
    let channel = grpc::channel(&leading.client_addr).await;
    let acked = grpc::publisher(&channel)
        .publish(request(0, 20))
        .await
        .expect("the leader and the other follower commit")
        .into_inner();
    assert_eq!(acked.base_offset, 0);
    // Cut off, it hears no leader and asks for pre-votes, which nobody answers: several
    // attempts (an election timeout apart at least) without a term of its own.
    wait_for(
        "the isolated replica to be refused three pre-votes",
        Duration::from_secs(30),
        || {
            let refused =
                weft_tests::metric(isolated, "weft_raft_pre_votes_total{result=\"refused\"}")
                    .unwrap_or(0.0);
            async move { (refused >= refused_before + 3.0).then_some(()) }
        },
    )
    .await;
    let (isolated_term, _) = leadership_of_0(isolated).await;
    assert_eq!(
        isolated_term, term,
        "the isolated replica stayed in the leader's term"
    );

    // Back: it follows the same leader, in the same term.
    firewall.heal();
    let acked = grpc::publisher(&channel)
        .publish(request(20, 40))
        .await
        .expect("the leader still leads once the replica is back")
        .into_inner();
    assert_eq!(acked.base_offset, 20);
    assert_eq!(
        leadership_of_0(leading).await,
        (term, leader),
        "the leader kept its term"
    );

    // The leader cut off at once: the two others elect one of them and commit.
    isolate(&mut firewall, &brokers, leading);
    let majority: Vec<&Broker> = brokers
        .iter()
        .filter(|b| b.peer_addr != leading.peer_addr)
        .collect();
    let cut_at = Instant::now();
    let offset = commit_through(
        &majority[0].client_addr,
        (40, 60, 4040),
        "the majority to elect a leader and commit",
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(offset, 40, "the majority continues the log");
    let (_, new_leader) = leadership_of_0(majority[0]).await;
    assert!(
        new_leader != 0 && new_leader != leader,
        "node {new_leader} leads, not the cut-off node {leader}"
    );
    eprintln!(
        "node {new_leader} leads and committed {:?} after node {leader} was cut off",
        cut_at.elapsed()
    );
}
