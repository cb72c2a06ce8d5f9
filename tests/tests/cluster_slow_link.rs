//! A follower behind a slow link still gets entries that take longer to cross the link than
//! openraft waits for an append (one heartbeat interval, 500 ms): three brokers on 127.0.0.x,
//! node 3 reached by the others through a proxy that carries 2 MiB/s towards it.
//!
//! - One record of 12 MB (one entry, more than the sockets' buffers take in at once). The leader
//!   sends such an entry as a call of its own that openraft's retries wait for, instead of
//!   cutting it off after 450 ms and sending it again. Before, node 3 never got the entry (each
//!   attempt was cut off part-way and sent again, for good), nor anything after it: not within
//!   40 s; now within about 5 s (12 MB at 2 MiB/s is 5.7 s).
//! - Three partitions led by node 1 each get a record of 6 MB at once. Their large appends to
//!   node 3 cross one at a time: before, the three shared the link, none crossed within its
//!   deadline (each was given the time it needs alone), and all were sent again and again.
//!
//! Both check that the link carried each entry about once (the bytes through the proxy).

use std::time::{Duration, Instant};

use weft_proto::v1::publish_request::Target;
use weft_proto::v1::{FetchRequest, PublishRequest, Record};
use weft_tests::{Broker, SlowLink, free_port_on, grpc, wait_for};

/// The link towards node 3, bytes per second.
const LINK: u64 = 2 * 1024 * 1024;

/// (partition, leader id) of topic `big` as `broker` sees them.
fn leaders(broker: &Broker) -> Vec<(u32, u64)> {
    let (status, body) = broker.http("GET", "/v1/topics/big", None);
    if status != 200 {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["partition_details"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    (
                        p["partition"].as_u64().unwrap_or(0) as u32,
                        p["leader_id"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The sizes of the values node `broker` serves of `partition` from offset 0 (Fetches that wait
/// briefly), up to `want` records.
async fn served(broker: &Broker, partition: u32, want: usize) -> Vec<usize> {
    let channel = grpc::channel(&broker.client_addr).await;
    let mut subscriber = grpc::subscriber(&channel);
    let mut sizes = Vec::new();
    let mut next = 0;
    while sizes.len() < want {
        let Ok(response) = subscriber
            .fetch(FetchRequest {
                topic: "big".into(),
                partition,
                offset: next,
                max_bytes: 16 * 1024 * 1024,
                max_wait_ms: 200,
                min_bytes: 1,
                max_records: 0,
            })
            .await
        else {
            break;
        };
        let response = response.into_inner();
        if response.records.is_empty() {
            break;
        }
        sizes.extend(response.records.iter().map(|r| r.value.len()));
        next = response.next_offset;
    }
    sizes
}

/// Three brokers on 127.0.0.x, node 3 behind the slow link, and topic `big` of `partitions`
/// partitions, every one led by node 1 (leadership handed over where needed).
async fn cluster(partitions: u32) -> (Vec<Broker>, SlowLink) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64)
        ^ u64::from(std::process::id());
    let first = 2 + seed % 240;
    let ips: Vec<String> = (0..3).map(|i| format!("127.0.0.{}", first + i)).collect();
    let listen: Vec<[String; 3]> = ips
        .iter()
        .map(|ip| [(); 3].map(|()| format!("{ip}:{}", free_port_on(ip))))
        .collect();
    // Node 3 is reached through the slow link: its address in everyone's list is the proxy's.
    let proxy = format!("{}:{}", ips[2], free_port_on(&ips[2]));
    let link = SlowLink::start(&proxy, &listen[2][1], LINK);
    let peers = format!("1@{},2@{},3@{proxy}", listen[0][1], listen[1][1]);
    // Leaders stay where the test puts them (no preferred-leader balance moving them back).
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "leader_balance_interval_ms = 0\n").expect("config");
    let config = config.to_string_lossy().into_owned();
    let mut brokers: Vec<Broker> = listen
        .iter()
        .enumerate()
        .rev()
        .map(|(i, l)| {
            let id = (i + 1).to_string();
            Broker::start_on(
                l.clone(),
                &["--node-id", &id, "--peers", &peers, "--config", &config],
                &[],
            )
        })
        .collect();
    brokers.reverse();
    for b in &brokers {
        b.wait_ready();
    }
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(&format!(
            r#"{{"name":"big","partitions":{partitions},"max_message_bytes":16777216}}"#
        )),
    );
    assert_eq!(status, 201, "{body}");
    let brokers_ref = &brokers;
    let led = wait_for("every partition's leader", Duration::from_secs(30), || {
        let led = leaders(&brokers_ref[0]);
        let all = led.len() == partitions as usize && led.iter().all(|(_, l)| *l != 0);
        async move { all.then_some(led) }
    })
    .await;
    for (partition, first) in led {
        // Asked of the partition's leader, which hands it over; again while it answers
        // UNAVAILABLE (node 1 has not answered that new leader yet, say).
        let started = Instant::now();
        let mut leader = first;
        while leader != 1 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "partition {partition} never moved to node 1"
            );
            if leader != 0 {
                let (status, body) = brokers[leader as usize - 1].http(
                    "POST",
                    &format!("/v1/topics/big/partitions/{partition}/leader"),
                    Some(r#"{"node_id":1}"#),
                );
                if status == 200 {
                    break;
                }
                assert_eq!(status, 503, "partition {partition} to node 1: {body}");
                eprintln!("partition {partition} to node 1: {body}; again");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            leader = leaders(&brokers[0])
                .into_iter()
                .find(|(p, _)| *p == partition)
                .map_or(0, |(_, l)| l);
        }
    }
    wait_for(
        "node 1 leading every partition",
        Duration::from_secs(30),
        || {
            let led = leaders(&brokers_ref[0]);
            let all = led.len() == partitions as usize && led.iter().all(|(_, l)| *l == 1);
            async move { all.then_some(()) }
        },
    )
    .await;
    (brokers, link)
}

/// Publishes a record of `size` bytes to `partition` through node 1 and checks its offset
/// (retried while a leadership handed over a moment ago settles: refused, not stored).
async fn publish(broker: &Broker, partition: u32, size: usize, offset: u64) {
    let channel = grpc::channel(&broker.client_addr).await;
    let mut publisher = grpc::publisher(&channel);
    let started = Instant::now();
    let response = loop {
        let result = publisher
            .publish(PublishRequest {
                topic: "big".into(),
                target: Some(Target::Partition(partition)),
                records: vec![Record {
                    value: vec![b'x'; size].into(),
                    ..Record::default()
                }],
                ..PublishRequest::default()
            })
            .await;
        match result {
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && started.elapsed() < Duration::from_secs(10) =>
            {
                eprintln!("partition {partition}: {}; again", status.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            result => break result.expect("acknowledged by nodes 1 and 2").into_inner(),
        }
    };
    assert_eq!(response.base_offset, offset);
    eprintln!(
        "partition {partition}: {size} bytes acknowledged after {:?}",
        started.elapsed()
    );
}

/// Waits until node 3 serves `sizes` from every partition of `partitions`, then checks that
/// the link carried them about once and that they took the large path.
async fn delivered(
    brokers: &[Broker],
    link: &SlowLink,
    partitions: &[u32],
    sizes: &[usize],
    carried_before: u64,
    within: Duration,
) {
    let published = Instant::now();
    let node3 = &brokers[2];
    wait_for("node 3 serving every record", within, || async move {
        for p in partitions {
            if served(node3, *p, sizes.len()).await != sizes {
                return None;
            }
        }
        Some(())
    })
    .await;
    let payload = (sizes.iter().sum::<usize>() * partitions.len()) as u64;
    let carried = link.carried() - carried_before;
    eprintln!(
        "node 3 had every record {:?} after they were acknowledged; the link carried {carried} bytes for {payload}",
        published.elapsed()
    );
    // Each entry once, plus Raft's heartbeats and framing (an entry sent twice would pass
    // 2x; one cut off after a heartbeat interval, 1.25x).
    assert!(
        carried < payload + payload / 4 + 1024 * 1024,
        "the link carried {carried} bytes for {payload} bytes of records"
    );
    let large = weft_tests::metric(&brokers[0], "weft_raft_large_appends_total{peer=\"3\"}");
    assert!(
        large.is_some_and(|n| n >= partitions.len() as f64),
        "sent as large appends: {large:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_a_slow_link_gets_an_entry_larger_than_a_heartbeat_carries() {
    let (mut brokers, link) = cluster(1).await;
    let before = link.carried();
    const LARGE: usize = 12_000_000;
    publish(&brokers[0], 0, LARGE, 0).await;
    publish(&brokers[0], 0, 100, 1).await;
    delivered(
        &brokers,
        &link,
        &[0],
        &[LARGE, 100],
        before,
        Duration::from_secs(40),
    )
    .await;
    for b in &mut brokers {
        b.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_follower_gets_several_groups_large_entries_one_at_a_time() {
    let (mut brokers, link) = cluster(3).await;
    let before = link.carried();
    const LARGE: usize = 6_000_000;
    // At once: all three large appends to node 3 want the link together.
    let node1 = &brokers[0];
    futures::future::join_all((0..3).map(|p| publish(node1, p, LARGE, 0))).await;
    futures::future::join_all((0..3).map(|p| publish(node1, p, 100, 1))).await;
    delivered(
        &brokers,
        &link,
        &[0, 1, 2],
        &[LARGE, 100],
        before,
        Duration::from_secs(60),
    )
    .await;
    for b in &mut brokers {
        b.stop();
    }
}
