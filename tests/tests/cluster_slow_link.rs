//! A follower behind a slow link still gets an entry that takes longer to cross the link than
//! openraft waits for an append (one heartbeat interval, 500 ms): three brokers on 127.0.0.x,
//! node 3 reached by the others through a proxy that carries 2 MiB/s towards it, and one record
//! of 12 MB (one entry, more than the sockets' buffers take in at once). The leader sends such
//! an entry as a call of its own that openraft's retries wait for, instead of cutting it off
//! after 450 ms and sending it again. Before, node 3 never got the entry (each attempt was cut
//! off part-way and sent again, for good), nor anything after it: not within 40 s; now within
//! about 5 s (12 MB at 2 MiB/s is 5.7 s).

use std::time::{Duration, Instant};

use weft_proto::v1::publish_request::Target;
use weft_proto::v1::{FetchRequest, PublishRequest, Record};
use weft_tests::{Broker, SlowLink, free_port_on, grpc, wait_for};

const LARGE: usize = 12_000_000;

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

/// The values node `broker` serves of `partition` from offset 0 (a Fetch that waits briefly).
async fn served(broker: &Broker, partition: u32) -> Vec<usize> {
    let channel = grpc::channel(&broker.client_addr).await;
    let mut subscriber = grpc::subscriber(&channel);
    let mut sizes = Vec::new();
    let mut next = 0;
    while sizes.len() < 2 {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_a_slow_link_gets_an_entry_larger_than_a_heartbeat_carries() {
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
    let _link = SlowLink::start(&proxy, &listen[2][1], 2 * 1024 * 1024);
    let peers = format!("1@{},2@{},3@{proxy}", listen[0][1], listen[1][1]);
    let mut brokers: Vec<Broker> = listen
        .iter()
        .enumerate()
        .rev()
        .map(|(i, l)| {
            let id = (i + 1).to_string();
            Broker::start_on(l.clone(), &["--node-id", &id, "--peers", &peers], &[])
        })
        .collect();
    brokers.reverse();
    for b in &brokers {
        b.wait_ready();
    }
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"big","partitions":3,"max_message_bytes":16777216}"#),
    );
    assert_eq!(status, 201, "{body}");
    // A partition that node 1 leads (its leaders spread over the brokers): node 3 follows it.
    let brokers_ref = &brokers;
    let partition = wait_for("a partition led by node 1", Duration::from_secs(30), || {
        let led = leaders(&brokers_ref[0]);
        let all = led.len() == 3 && led.iter().all(|(_, l)| *l != 0);
        let mine = led.iter().find(|(_, l)| *l == 1).map(|(p, _)| *p);
        async move { if all { mine } else { None } }
    })
    .await;
    let channel = grpc::channel(&brokers[0].client_addr).await;
    let mut publisher = grpc::publisher(&channel);
    for (i, size) in [LARGE, 100].into_iter().enumerate() {
        let started = Instant::now();
        let response = publisher
            .publish(PublishRequest {
                topic: "big".into(),
                target: Some(Target::Partition(partition)),
                records: vec![Record {
                    value: vec![b'x'; size].into(),
                    ..Record::default()
                }],
                ..PublishRequest::default()
            })
            .await
            .expect("acknowledged by nodes 1 and 2")
            .into_inner();
        assert_eq!(response.base_offset, i as u64);
        eprintln!("record {i} acknowledged after {:?}", started.elapsed());
    }
    let published = Instant::now();
    let node3 = &brokers[2];
    wait_for(
        "node 3 serving both records",
        Duration::from_secs(40),
        || async move { (served(node3, partition).await == [LARGE, 100]).then_some(()) },
    )
    .await;
    eprintln!(
        "node 3 had both records {:?} after they were acknowledged",
        published.elapsed()
    );
    let large = weft_tests::metric(&brokers[0], "weft_raft_large_appends_total{peer=\"3\"}");
    assert!(
        large.is_some_and(|n| n >= 1.0),
        "sent as a large append: {large:?}"
    );
    for b in &mut brokers {
        b.stop();
    }
}
