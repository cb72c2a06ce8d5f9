//! Growing and shrinking a cluster under load (real processes on 127.0.0.x, free ports, temp
//! dirs): a fourth broker joins a three-broker cluster, `weft cluster rebalance` moves replicas
//! (and preferred leaders) onto it, a partition is moved by hand through the admin API, and
//! `weft cluster remove-broker` moves every replica off the first broker (the one that started
//! the cluster) and takes it out of the cluster; wiped, it joins again. An idempotent producer
//! publishes the whole time; every acknowledged record is then read back once from every
//! replica, offsets dense.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use weft_tests::{
    Broker, add_broker, add_broker_env, fetch_range, ok_stdout, publish_until_acknowledged,
    start_cluster, wait_for,
};

const TOPIC: &str = "moves";
const PARTITIONS: u32 = 4;

/// (partition, replicas, moving_to) as `broker` sees them.
fn placement(broker: &Broker) -> Vec<(u32, Vec<u64>, Vec<u64>)> {
    let (status, body) = broker.http("GET", &format!("/v1/topics/{TOPIC}"), None);
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|i| i.as_u64().expect("id"))
            .collect()
    };
    value["partition_details"]
        .as_array()
        .expect("partition details")
        .iter()
        .map(|p| {
            (
                p["partition"].as_u64().expect("partition") as u32,
                ids(&p["replicas"]),
                ids(&p["moving_to"]),
            )
        })
        .collect()
}

/// Node ids the cluster lists, as `broker` sees them.
fn brokers_listed(broker: &Broker) -> Vec<u64> {
    let (status, body) = broker.http("GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    value["brokers"]
        .as_array()
        .expect("brokers")
        .iter()
        // Registered brokers only (not members of the controller group still registering).
        .filter(|b| b["unregistered"] != true)
        .map(|b| b["id"].as_u64().expect("id"))
        .collect()
}

/// Partition directories a broker holds on disk.
fn partition_dirs(broker: &Broker) -> usize {
    let topics = broker.data_dir().join("topics");
    std::fs::read_dir(&topics)
        .map(|dirs| {
            dirs.flatten()
                .map(|d| std::fs::read_dir(d.path()).map_or(0, |p| p.count()))
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_join_and_leave_under_load_and_nothing_acknowledged_is_lost() {
    let mut brokers = start_cluster(3);
    let (status, body) = brokers[1].http(
        "POST",
        "/v1/topics",
        Some(&format!(
            r#"{{"name":"{TOPIC}","partitions":{PARTITIONS},"replication_factor":3}}"#
        )),
    );
    assert_eq!(status, 201, "{body}");

    // The producer publishes through brokers 2 and 3 (broker 1 leaves the cluster).
    let addresses: Vec<String> = brokers[1..].iter().map(|b| b.client_addr.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let load = tokio::spawn(async move {
        let mut sequences = [0u64; PARTITIONS as usize];
        let mut acknowledged = Vec::new();
        for i in 0..200_000u64 {
            if stopping.load(Ordering::SeqCst) && i >= 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            let partition = (i % u64::from(PARTITIONS)) as u32;
            let value = format!("m-{i:06}");
            let (offset, _) = publish_until_acknowledged(
                &addresses,
                TOPIC,
                partition,
                sequences[partition as usize],
                &value,
            )
            .await;
            sequences[partition as usize] += 1;
            acknowledged.push((partition, offset, value));
        }
        acknowledged
    });

    // A fourth broker joins: it holds nothing until replicas move to it.
    let fourth = add_broker(&brokers, &[]);
    brokers.push(fourth);
    wait_for(
        "the cluster to list four brokers",
        Duration::from_secs(30),
        || {
            let listed = brokers_listed(&brokers[1]);
            async move { (listed == [1, 2, 3, 4]).then_some(()) }
        },
    )
    .await;
    assert!(
        placement(&brokers[1])
            .iter()
            .all(|(_, r, _)| !r.contains(&4))
    );

    // Bad input: a broker that does not exist, a repeated one, an unknown topic.
    let (status, body) = brokers[1].http(
        "POST",
        &format!("/v1/topics/{TOPIC}/partitions/0/replicas"),
        Some(r#"{"replicas":[1,2,9]}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("node 9"), "{body}");
    let (status, body) = brokers[1].http(
        "POST",
        &format!("/v1/topics/{TOPIC}/partitions/0/replicas"),
        Some(r#"{"replicas":[2,2]}"#),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = brokers[1].http(
        "POST",
        "/v1/topics/nope/partitions/0/replicas",
        Some(r#"{"replicas":[1]}"#),
    );
    assert_eq!(status, 404, "{body}");
    let (status, body) = brokers[1].http("POST", "/v1/brokers/9/remove", None);
    assert_eq!(status, 400, "{body}");

    // Rebalance: replicas and preferred leaders spread over four brokers (12 replicas: 3 each).
    let out = brokers[1].cli(&["cluster", "rebalance", "--wait"]);
    let printed = ok_stdout(&out);
    assert!(printed.contains("moving"), "{printed}");
    let after = placement(&brokers[1]);
    let mut per_broker = [0usize; 5];
    let mut firsts = [0usize; 5];
    for (_, replicas, moving_to) in &after {
        assert!(moving_to.is_empty(), "{after:?}");
        assert_eq!(replicas.len(), 3, "{after:?}");
        assert_eq!(replicas.iter().collect::<BTreeSet<_>>().len(), 3);
        for r in replicas {
            per_broker[*r as usize] += 1;
        }
        firsts[replicas[0] as usize] += 1;
    }
    assert_eq!(&per_broker[1..], [3, 3, 3, 3], "{after:?}");
    assert_eq!(&firsts[1..], [1, 1, 1, 1], "{after:?}");
    wait_for(
        "the fourth broker to hold its replicas",
        Duration::from_secs(30),
        || {
            let dirs = partition_dirs(&brokers[3]);
            async move { (dirs == 3).then_some(()) }
        },
    )
    .await;

    // One partition by hand: partition 0 to {2, 3, 4}, node 3 its preferred leader.
    let (status, body) = brokers[2].http(
        "POST",
        &format!("/v1/topics/{TOPIC}/partitions/0/replicas"),
        Some(r#"{"replicas":[3,2,4]}"#),
    );
    assert_eq!(status, 202, "{body}");
    wait_for("partition 0 to move", Duration::from_secs(60), || {
        let p = placement(&brokers[1]);
        async move { (p[0].1 == [3, 2, 4] && p[0].2.is_empty()).then_some(()) }
    })
    .await;

    // Remove broker 1 (which started the cluster, and may lead the controller).
    let out = brokers[1].cli(&["cluster", "remove-broker", "1", "--wait"]);
    let printed = ok_stdout(&out);
    assert!(printed.contains("has left the cluster"), "{printed}");
    assert_eq!(brokers_listed(&brokers[1]), [2, 3, 4]);
    assert_eq!(brokers_listed(&brokers[3]), [2, 3, 4]);
    for (partition, replicas, moving_to) in placement(&brokers[2]) {
        assert!(moving_to.is_empty());
        assert_eq!(replicas.len(), 3, "partition {partition}: {replicas:?}");
        assert!(
            !replicas.contains(&1),
            "partition {partition}: {replicas:?}"
        );
    }
    wait_for(
        "broker 1 to delete its replicas",
        Duration::from_secs(30),
        || {
            let dirs = partition_dirs(&brokers[0]);
            async move { (dirs == 0).then_some(()) }
        },
    )
    .await;
    brokers[0].kill9();
    // The cluster goes on without it: a topic created now lives on 2, 3 and 4.
    let (status, body) = brokers[2].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"after","partitions":2}"#),
    );
    assert_eq!(status, 201, "{body}");
    assert!(!body.contains("\"replicas\":[1"), "{body}");

    // Broker 1 comes back with its data wiped: it joins again as a new broker and registers
    // (the fault-injection harness saw such a broker apply its own old registration from the
    // log it was catching up on, skip registering, and stay not ready for good).
    std::fs::remove_dir_all(brokers[0].data_dir()).expect("wipe broker 1");
    brokers[0].start_again_same_ports();
    brokers[0].wait_ready();
    wait_for(
        "the cluster to list broker 1 again",
        Duration::from_secs(30),
        || {
            let listed = brokers_listed(&brokers[2]);
            async move { (listed == [1, 2, 3, 4]).then_some(()) }
        },
    )
    .await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let acknowledged = load.await.expect("the load finished");
    eprintln!(
        "acknowledged {} records while brokers moved",
        acknowledged.len()
    );

    // Every replica of every partition holds every acknowledged record once, at its offset.
    for partition in 0..PARTITIONS {
        let mut want: Vec<(u64, String)> = acknowledged
            .iter()
            .filter(|(p, _, _)| *p == partition)
            .map(|(_, o, v)| (*o, v.clone()))
            .collect();
        want.sort();
        let count = want.len() as u64;
        assert_eq!(
            want.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            (0..count).collect::<Vec<_>>(),
            "partition {partition}: acknowledged offsets are dense, each once"
        );
        for broker in &brokers[1..] {
            let address = broker.client_addr.clone();
            wait_for("the replica to catch up", Duration::from_secs(30), || {
                let address = address.clone();
                async move {
                    weft_tests::offsets(&address, TOPIC, partition, None)
                        .await
                        .ok()
                        .filter(|b| b.high_watermark >= count)
                }
            })
            .await;
            let got: Vec<(u64, String)> = fetch_range(&address, TOPIC, partition, 0, count)
                .await
                .iter()
                .map(|(o, v)| (*o, String::from_utf8_lossy(v).into_owned()))
                .collect();
            assert_eq!(got, want, "partition {partition} through {address}");
        }
    }
}

/// The nodes `broker`'s `/v1/cluster` lists, with their JSON.
fn cluster_nodes(broker: &Broker) -> Vec<serde_json::Value> {
    let (status, body) = broker.http("GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    value["brokers"].as_array().expect("brokers").clone()
}

/// Waits until `broker`'s `/v1/cluster` lists node `id` as a voter of the controller group that
/// has not registered; its JSON.
async fn listed_unregistered(broker: &Broker, id: u64) -> serde_json::Value {
    wait_for(
        "the node listed as a controller voter that has not registered",
        Duration::from_secs(60),
        || {
            let nodes = cluster_nodes(broker);
            async move {
                nodes
                    .into_iter()
                    .find(|n| n["id"] == id && n["unregistered"] == true && n["voter"] == true)
            }
        },
    )
    .await
}

/// Waits until every broker's `/v1/cluster` lists exactly the nodes `ids` (registered or not).
async fn listed_everywhere_as(brokers: &[Broker], ids: &[u64]) {
    for broker in brokers {
        wait_for("the nodes listed", Duration::from_secs(30), || {
            let listed: Vec<u64> = cluster_nodes(broker)
                .iter()
                .map(|n| n["id"].as_u64().expect("id"))
                .collect();
            async move { (listed == ids).then_some(()) }
        })
        .await;
    }
}

/// A broker that joined the controller group and was lost before it registered (killed, its
/// machine gone; a test hook holds its registration back) used to be a voter that nothing
/// listed and nothing could remove ("node 4 is not a broker of this cluster"): it counted
/// toward the controller's quorum and held back every feature-gated command (deny rules,
/// offset resets) for good. Now `/v1/cluster` lists it as unregistered, and `weft cluster
/// remove-broker` takes it out of the controller group once it has stopped (refused while it
/// still answers: it would register once caught up).
#[tokio::test(flavor = "multi_thread")]
async fn a_member_lost_before_it_registered_is_listed_and_can_be_removed() {
    let brokers = start_cluster(3);
    let mut lost =
        weft_tests::add_broker_env(&brokers, &[], &[("WEFT_TEST_REGISTER_DELAY_MS", "600000")]);
    let listed = listed_unregistered(&brokers[0], 4).await;
    assert_eq!(listed["client_address"], "", "{listed}");
    assert_eq!(listed["peer_address"], lost.peer_addr.as_str(), "{listed}");
    // Still running, it is not taken out.
    let out = brokers[1].cli(&["cluster", "remove-broker", "4"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "removed while it runs");
    assert!(
        stderr.contains("has not registered yet, but it answers"),
        "{stderr}"
    );

    lost.kill9();
    let deny = [
        "acl",
        "add",
        "--identity",
        "intern",
        "--resource",
        "topic:any",
        "--operations",
        "publish",
        "--deny",
    ];
    let out = brokers[0].cli(&deny);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a deny rule with node 4's build unknown"
    );
    assert!(
        stderr.contains("broker 4 is at feature level 0"),
        "{stderr}"
    );
    let text = ok_stdout(&brokers[2].cli(&["cluster", "status"]));
    assert!(
        text.contains("node 4") && text.contains("UNREGISTERED"),
        "{text}"
    );

    // Through a broker that does not lead the controller (the call is forwarded to the one
    // that does); --wait returns once it is gone.
    let (status, body) = brokers[0].http("GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    let controller = view["controller_id"].as_u64().expect("controller_id");
    let follower = brokers
        .iter()
        .zip(1u64..)
        .find(|(_, id)| *id != controller)
        .map(|(b, _)| b)
        .expect("a broker that does not lead the controller");
    let out = ok_stdout(&follower.cli(&["cluster", "remove-broker", "4", "--wait"]));
    assert!(
        out.contains(
            "node 4 (a controller member that never registered) left the controller group"
        ),
        "{out}"
    );
    listed_everywhere_as(&brokers, &[1, 2, 3]).await;
    ok_stdout(&brokers[0].cli(&deny));
    let rules = ok_stdout(&brokers[2].cli(&["-o", "json", "acl", "list"]));
    assert!(rules.contains("\"deny\""), "{rules}");
    // A node that is neither a broker nor a member is still refused.
    let out = brokers[0].cli(&["cluster", "remove-broker", "4"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a broker of this cluster"),
        "{out:?}"
    );
}

/// The race of the removal above: a member taken out of the controller group while it could
/// not answer (paused), whose registration then lands, would be a registered broker outside the
/// controller group (given replicas it never hears of). The controller's leader removes it as
/// any broker, so it leaves the listing again.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_that_registers_after_it_was_taken_out_is_removed_again() {
    let brokers = start_cluster(3);
    let late =
        weft_tests::add_broker_env(&brokers, &[], &[("WEFT_TEST_REGISTER_DELAY_MS", "8000")]);
    listed_unregistered(&brokers[0], 4).await;
    late.pause();
    let out = ok_stdout(&brokers[0].cli(&["cluster", "remove-broker", "4"]));
    assert!(out.contains("never registered"), "{out}");
    late.resume();
    // Its registration lands once its delay is over; the controller's leader then removes it.
    wait_for(
        "the controller's leader to remove the late registration",
        Duration::from_secs(60),
        || {
            let warned = brokers.iter().any(|b| {
                b.log()
                    .contains("a broker registered after it left the controller group")
            });
            async move { warned.then_some(()) }
        },
    )
    .await;
    listed_everywhere_as(&brokers, &[1, 2, 3]).await;
    drop(late);
}

/// A broker's removal from a three-broker cluster shrinks every partition of a topic with a
/// factor of 3 (no other broker can take its replicas): the topic says it is under-replicated.
/// A fourth broker joins later, and `weft cluster rebalance --wait` gives every partition its
/// third replica back, on the new broker, which then serves every record. Before, a rebalance
/// only moved replicas around: the partitions stayed under-replicated for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_gives_partitions_shrunk_by_a_removal_their_factor_back() {
    let mut brokers = start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(&format!(
            r#"{{"name":"{TOPIC}","partitions":2,"replication_factor":3}}"#
        )),
    );
    assert_eq!(status, 201, "{body}");
    let addresses: Vec<String> = brokers[..2].iter().map(|b| b.client_addr.clone()).collect();
    for i in 0..20u64 {
        let partition = (i % 2) as u32;
        publish_until_acknowledged(&addresses, TOPIC, partition, i / 2, &format!("r-{i:02}")).await;
    }
    let under_replicated = |broker: &Broker| {
        let (status, body) = broker.http("GET", &format!("/v1/topics/{TOPIC}"), None);
        assert_eq!(status, 200, "{body}");
        let value: serde_json::Value = serde_json::from_str(&body).expect("json");
        value["under_replicated"]
            .as_bool()
            .expect("under_replicated")
    };
    // (In-sync replicas count too: a follower may be a moment behind.)
    wait_for(
        "the topic to be fully replicated",
        Duration::from_secs(30),
        || {
            let under = under_replicated(&brokers[0]);
            async move { (!under).then_some(()) }
        },
    )
    .await;

    let out = brokers[0].cli(&["cluster", "remove-broker", "3", "--wait"]);
    let printed = ok_stdout(&out);
    assert!(printed.contains("has left the cluster"), "{printed}");
    for (partition, replicas, _) in placement(&brokers[0]) {
        assert_eq!(replicas.len(), 2, "partition {partition}: {replicas:?}");
    }
    assert!(under_replicated(&brokers[0]));
    brokers[2].kill9();

    let fourth = add_broker(&brokers, &[]);
    let out = brokers[0].cli(&["cluster", "rebalance", "--wait"]);
    ok_stdout(&out);
    for (partition, replicas, moving_to) in placement(&brokers[0]) {
        assert!(moving_to.is_empty(), "partition {partition}: {moving_to:?}");
        assert_eq!(replicas.len(), 3, "partition {partition}: {replicas:?}");
        assert!(replicas.contains(&4), "partition {partition}: {replicas:?}");
    }
    wait_for(
        "the topic to be fully replicated",
        Duration::from_secs(30),
        || {
            let under = under_replicated(&brokers[0]);
            async move { (!under).then_some(()) }
        },
    )
    .await;
    for partition in 0..2u32 {
        let read = wait_for(
            "the new replica to hold every record",
            Duration::from_secs(30),
            || {
                let address = fourth.client_addr.clone();
                async move {
                    weft_tests::try_fetch_range(&address, TOPIC, partition, 0, 10)
                        .await
                        .ok()
                        .filter(|r| r.len() == 10)
                }
            },
        )
        .await;
        let values: BTreeSet<String> = read
            .iter()
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect();
        let expected: BTreeSet<String> = (0..20u64)
            .filter(|i| (i % 2) as u32 == partition)
            .map(|i| format!("r-{i:02}"))
            .collect();
        assert_eq!(values, expected, "partition {partition}");
    }
}

/// A topic created while a broker is down is led only by brokers that are up, and still has
/// its factor of 3 (the broker that is down holds the third replicas, and catches up once
/// back). Before, partitions rotated over every registered broker: the one whose first replica
/// (the replica that starts the partition's group) was down had no leader, and took no
/// publish, until that broker came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_while_a_broker_is_down_is_led_by_the_brokers_that_are_up() {
    let mut brokers = start_cluster(3);
    listed_everywhere_as(&brokers, &[1, 2, 3]).await;
    brokers[2].kill9();
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(&format!(
            r#"{{"name":"{TOPIC}","partitions":3,"replication_factor":3}}"#
        )),
    );
    assert_eq!(status, 201, "{body}");
    for (partition, replicas, _) in placement(&brokers[0]) {
        assert_eq!(replicas.len(), 3, "partition {partition}: {replicas:?}");
        assert_ne!(
            replicas[0], 3,
            "partition {partition} is led by the broker that is down"
        );
    }
    let leaders = |broker: &Broker| -> Vec<u64> {
        let (status, body) = broker.http("GET", &format!("/v1/topics/{TOPIC}"), None);
        assert_eq!(status, 200, "{body}");
        let value: serde_json::Value = serde_json::from_str(&body).expect("json");
        value["partition_details"]
            .as_array()
            .expect("partition details")
            .iter()
            .map(|p| p["leader_id"].as_u64().unwrap_or(0))
            .collect()
    };
    wait_for(
        "every partition to have a leader",
        Duration::from_secs(20),
        || {
            let leaders = leaders(&brokers[0]);
            async move { leaders.iter().all(|l| *l != 0).then_some(()) }
        },
    )
    .await;
    let addresses: Vec<String> = brokers[..2].iter().map(|b| b.client_addr.clone()).collect();
    for partition in 0..3u32 {
        let published = tokio::time::timeout(
            Duration::from_secs(20),
            publish_until_acknowledged(&addresses, TOPIC, partition, 0, &format!("p{partition}")),
        )
        .await;
        assert!(published.is_ok(), "partition {partition} took no publish");
    }
    // Back, the broker catches up on its replicas.
    brokers[2].start_again_same_ports();
    for partition in 0..3u32 {
        let address = brokers[2].client_addr.clone();
        wait_for(
            "the broker back to hold the record",
            Duration::from_secs(30),
            || {
                let address = address.clone();
                async move {
                    weft_tests::try_fetch_range(&address, TOPIC, partition, 0, 1)
                        .await
                        .ok()
                        .filter(|r| r.len() == 1)
                }
            },
        )
        .await;
    }
}

/// Publishes `count` records of 4 KiB to partition 0 of `topic` through `address` (16 per
/// call, an idempotent producer that retries while the partition has no leader).
async fn publish_4k(address: &str, topic: &str, count: u64) {
    let channel = weft_tests::grpc::channel(address).await;
    let mut publisher = weft_tests::grpc::publisher(&channel);
    let mut i = 0;
    let mut attempts = 0;
    while i < count {
        let end = (i + 16).min(count);
        let answer = publisher
            .publish(weft_proto::v1::PublishRequest {
                topic: topic.into(),
                target: Some(weft_proto::v1::publish_request::Target::Partition(0)),
                records: (i..end)
                    .map(|n| {
                        let mut value = format!("{n:08}").into_bytes();
                        value.resize(4096, b'.');
                        weft_proto::v1::Record {
                            value: value.into(),
                            ..weft_proto::v1::Record::default()
                        }
                    })
                    .collect(),
                producer_id: 7002,
                base_sequence: i,
                ..weft_proto::v1::PublishRequest::default()
            })
            .await;
        match answer {
            Ok(response) => {
                assert_eq!(response.into_inner().base_offset, i, "dense offsets");
                i = end;
            }
            Err(status) if status.code() == tonic::Code::Unavailable && attempts < 100 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("publish: {status:?}"),
        }
    }
}

/// Asks broker `asked` (an index) to remove node `removed`, checks that the answer lists the
/// move of partition 0 as under way, and waits until the move's new replica (the one node not
/// in `held`) fills its log (the test hook's delay begins). Returns that node. The move is
/// under way whether this call started it or the controller's leader did meanwhile (it plans
/// removals each tick too). Before, a move the tick had started first was listed as waiting
/// ("has replicas [1, 2, 3] now, not [1, 2]").
async fn remove_until_filling(brokers: &[Broker], asked: usize, removed: u64, held: &[u64]) -> u64 {
    let (status, body) =
        brokers[asked].http("POST", &format!("/v1/brokers/{removed}/remove"), None);
    assert_eq!(status, 202, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["waiting"], serde_json::json!([]), "{body}");
    assert!(
        answer["started"]
            .as_array()
            .is_some_and(|s| s.iter().any(|m| m
                .as_str()
                .is_some_and(|m| m.starts_with(&format!("{TOPIC}/0:"))))),
        "{body}"
    );
    let new = wait_for("the move's new replica", Duration::from_secs(30), || {
        // (The replicas being added are listed with the others while the move runs.)
        let (_, _, moving_to) = placement(&brokers[asked]).remove(0);
        let new: Vec<u64> = moving_to
            .into_iter()
            .filter(|id| !held.contains(id))
            .collect();
        async move { (new.len() == 1).then(|| new[0]) }
    })
    .await;
    let filling = &brokers[new as usize - 1];
    wait_for(
        "the new replica to fill its log",
        Duration::from_secs(60),
        || {
            let started = filling.log().contains("WEFT_TEST_BACKFILL_DELAY_MS");
            async move { started.then_some(()) }
        },
    )
    .await;
    new
}

/// A removal's move whose new replica's broker stops answering for a moment (paused for 3 s
/// while it fills its log) keeps that replica: the move ends on it. Before, one missed health
/// check sent the move to another broker and threw away what the new replica had caught up. A
/// new replica's broker that dies (kill -9) stays in the move only until it has failed its
/// checks for 10 s: the move then goes to a broker that is up, and the removal ends. Five
/// brokers, a topic of factor 2 whose log retention has purged (so a new replica installs a
/// snapshot and fills its log; a test hook makes each fill wait 4 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_keeps_a_new_replica_that_paused_and_redirects_one_whose_broker_died() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(
        &config,
        "retention_check_interval_ms = 200\nsnapshot_interval_bytes = 1048576\n\
         leader_balance_interval_ms = 0\n",
    )
    .expect("config");
    let config = config.to_string_lossy().into_owned();
    let mut brokers = weft_tests::start_cluster_each(
        5,
        |_| vec!["--config".into(), config.clone()],
        &[("WEFT_TEST_BACKFILL_DELAY_MS", "4000")],
    );
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(&format!(
            r#"{{"name":"{TOPIC}","partitions":1,"replication_factor":2,"segment_bytes":1048576,"retention_bytes":4194304,"max_message_bytes":262144}}"#
        )),
    );
    assert_eq!(status, 201, "{body}");
    publish_4k(&brokers[0].client_addr, TOPIC, 1600).await;
    let first_address = brokers[0].client_addr.clone();
    wait_for("retention to purge", Duration::from_secs(30), || {
        let address = first_address.clone();
        async move {
            weft_tests::offsets(&address, TOPIC, 0, None)
                .await
                .ok()
                .filter(|b| b.log_start_offset > 0)
        }
    })
    .await;
    let (_, start, _) = placement(&brokers[0]).remove(0);
    assert_eq!(start.len(), 2, "{start:?}");
    let up = |brokers: &[Broker], except: &[u64]| -> usize {
        (1..=brokers.len() as u64)
            .find(|id| !except.contains(id))
            .expect("a broker") as usize
            - 1
    };

    // The new replica's broker pauses for 3 s while it fills its log: the move keeps it.
    let removed = start[0];
    let asked = up(&brokers, &[removed]);
    let new = remove_until_filling(&brokers, asked, removed, &start).await;
    let filling = &brokers[new as usize - 1];
    filling.pause();
    tokio::time::sleep(Duration::from_secs(3)).await;
    filling.resume();
    let brokers_ref = &brokers;
    let replicas = wait_for("the move to end", Duration::from_secs(90), || {
        let (_, replicas, moving_to) = placement(&brokers_ref[asked]).remove(0);
        async move { moving_to.is_empty().then_some(replicas) }
    })
    .await;
    let kept: BTreeSet<u64> = [start[1], new].into();
    assert_eq!(
        replicas.iter().copied().collect::<BTreeSet<u64>>(),
        kept,
        "the paused broker {new} kept its new replica"
    );
    wait_for("the removal to end", Duration::from_secs(60), || {
        let listed = brokers_listed(&brokers_ref[asked]);
        async move { (!listed.contains(&removed)).then_some(()) }
    })
    .await;

    // The next removal's new replica dies: after 10 s of failed checks the move goes to the
    // last broker that can take it.
    let removed = start[1];
    let asked = new as usize - 1;
    let held = [start[0], start[1], new];
    let dying = remove_until_filling(&brokers, asked, removed, &held).await;
    brokers[dying as usize - 1].kill9();
    let killed = std::time::Instant::now();
    let last = up(&brokers, &[start[0], removed, new, dying]) as u64 + 1;
    let brokers_ref = &brokers;
    let replicas = wait_for(
        "the move to end elsewhere",
        Duration::from_secs(120),
        || {
            let (_, replicas, moving_to) = placement(&brokers_ref[asked]).remove(0);
            async move { moving_to.is_empty().then_some(replicas) }
        },
    )
    .await;
    assert_eq!(
        replicas.iter().copied().collect::<BTreeSet<u64>>(),
        BTreeSet::from([new, last]),
        "the move went from the dead broker {dying} to broker {last}"
    );
    let waited = killed.elapsed();
    assert!(
        waited >= Duration::from_secs(8),
        "the move left the dead broker after {waited:?}, before its checks had failed for 10 s"
    );
    wait_for("the removal to end", Duration::from_secs(60), || {
        let listed = brokers_listed(&brokers_ref[asked]);
        async move { (!listed.contains(&removed)).then_some(()) }
    })
    .await;
    // Both new replicas serve what the log keeps, up to the last record.
    for id in [new, last] {
        let address = brokers[id as usize - 1].client_addr.clone();
        let held = wait_for(
            "the replica to hold every record",
            Duration::from_secs(60),
            || {
                let address = address.clone();
                async move {
                    weft_tests::offsets(&address, TOPIC, 0, None)
                        .await
                        .ok()
                        .filter(|b| b.high_watermark == 1600)
                }
            },
        )
        .await;
        let read = fetch_range(&address, TOPIC, 0, 1599, 1600).await;
        assert_eq!(read.len(), 1, "broker {id}");
        assert_eq!(&read[0].1[..8], b"00001599", "broker {id}");
        assert!(held.log_start_offset > 0, "broker {id}: {held:?}");
    }
}

/// A broker's removal that would leave the controller without an answering majority waits:
/// with broker 2 down, taking broker 3 (which holds no replica) out of the controller group
/// needs broker 2 in the joint configuration. Before, the controller went into it and then
/// committed nothing (a topic's creation failed) until broker 2 came back; now the controller
/// goes on, and the removal ends once broker 2 is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_removal_that_would_cost_the_controller_its_majority_waits() {
    let mut brokers = start_cluster(3);
    brokers[1].kill9();
    let (status, body) = brokers[0].http("POST", "/v1/brokers/3/remove", None);
    assert!(status < 300, "{status}: {body}");
    // A few rounds of the controller leader's removal work.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let created = brokers[0].cli(&[
        "--timeout-ms",
        "15000",
        "topic",
        "create",
        "after",
        "--partitions",
        "1",
        "--replication-factor",
        "1",
    ]);
    ok_stdout(&created);
    assert!(
        brokers_listed(&brokers[0]).contains(&3),
        "not removed while broker 2 is down"
    );
    brokers[1].start_again_same_ports();
    wait_for(
        "broker 3 removed once broker 2 is back",
        Duration::from_secs(90),
        || async { (brokers_listed(&brokers[0]) == [1, 2]).then_some(()) },
    )
    .await;
}

/// `weft cluster rebalance --wait` through a broker whose copy of the metadata lags (each
/// controller apply there waits 300 ms) returns only once the moves are done. Before, the
/// rebalance answered once the controller's leader had applied the moves; the lagging broker
/// then listed no partition moving, and `--wait` returned at once (seen in CI: a rebalance
/// "waited for" was still under way). Now the broker that started the moves answers once its
/// copy holds them, and `--wait` waits for each started move's target (another broker it asks
/// may still be behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_wait_through_a_lagging_broker_returns_once_the_moves_are_done() {
    let mut brokers = start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(&format!(
            r#"{{"name":"{TOPIC}","partitions":{PARTITIONS},"replication_factor":3}}"#
        )),
    );
    assert_eq!(status, 201, "{body}");
    let fourth = add_broker_env(
        &brokers,
        &[],
        &[("WEFT_TEST_CONTROLLER_APPLY_DELAY_MS", "300")],
    );
    fourth.wait_ready();
    brokers.push(fourth);
    wait_for(
        "the lagging broker to list four brokers",
        Duration::from_secs(30),
        || {
            let listed = brokers_listed(&brokers[3]);
            async move { (listed == [1, 2, 3, 4]).then_some(()) }
        },
    )
    .await;
    // Through the lagging broker and another, in turn (the CLI spreads its calls): the moves
    // may be started through either, and listed by either.
    let servers = format!("{},{}", brokers[3].client_addr, brokers[0].client_addr);
    let out = std::process::Command::new(weft_tests::binary("weft"))
        .args(["--server", &servers, "cluster", "rebalance", "--wait"])
        .output()
        .expect("run weft");
    let printed = ok_stdout(&out);
    assert!(printed.contains("moving"), "{printed}");
    // Whichever of the two listed the moves done, broker 1 (no delay) had applied their end
    // no later than the lagging one.
    let after = placement(&brokers[0]);
    assert!(
        after.iter().all(|(_, _, moving_to)| moving_to.is_empty()),
        "still moving after --wait returned: {after:?}"
    );
    assert!(after.iter().any(|(_, replicas, _)| replicas.contains(&4)));
    // The others see the same in a moment.
    for broker in &brokers[1..] {
        wait_for(
            "every broker to list the moves done",
            Duration::from_secs(20),
            || {
                let done = placement(broker)
                    .iter()
                    .all(|(_, _, moving_to)| moving_to.is_empty());
                async move { done.then_some(()) }
            },
        )
        .await;
    }
}

/// A cluster of `size` brokers, each with `partition_replicas_max = max` (the config file's
/// directory goes with it).
fn cluster_with_replicas_max(size: u64, max: u32) -> (tempfile::TempDir, Vec<Broker>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, format!("partition_replicas_max = {max}\n")).expect("config");
    let config = config.to_str().expect("path").to_string();
    let brokers =
        weft_tests::start_cluster_each(size, |_| vec!["--config".into(), config.clone()], &[]);
    (dir, brokers)
}

/// The replicas each broker holds of `topics`, as `broker` sees them (a moving partition
/// counts where it goes).
fn replicas_per_broker(broker: &Broker, topics: &[&str]) -> std::collections::BTreeMap<u64, usize> {
    let mut held = std::collections::BTreeMap::new();
    for topic in topics {
        let (status, body) = broker.http("GET", &format!("/v1/topics/{topic}"), None);
        assert_eq!(status, 200, "{body}");
        let value: serde_json::Value = serde_json::from_str(&body).expect("json");
        for p in value["partition_details"].as_array().expect("partitions") {
            let going = p["moving_to"]
                .as_array()
                .filter(|to| !to.is_empty())
                .unwrap_or_else(|| p["replicas"].as_array().expect("replicas"));
            for id in going {
                *held.entry(id.as_u64().expect("id")).or_default() += 1;
            }
        }
    }
    held
}

/// `partition_replicas_max` holds for moves as for creations (Kafka's max.broker.partitions
/// does the same): with every broker full, moving a partition onto another broker is refused
/// (HTTP 429, LIMIT_REACHED naming the key), and removing a broker starts no move, says why
/// its partitions wait, and leaves every broker at its limit. Before, a move or a removal
/// gave a broker replicas past its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_past_partition_replicas_max_are_refused() {
    let (_dir, brokers) = cluster_with_replicas_max(2, 2);
    let topics = ["full-a", "full-b"];
    for topic in topics {
        let (status, body) = brokers[0].http(
            "POST",
            "/v1/topics",
            Some(&format!(
                r#"{{"name":"{topic}","partitions":2,"replication_factor":1}}"#
            )),
        );
        assert_eq!(status, 201, "{body}");
    }
    let full: std::collections::BTreeMap<u64, usize> = [(1, 2), (2, 2)].into();
    assert_eq!(replicas_per_broker(&brokers[0], &topics), full);
    // Partition 0 of full-a, onto the broker that does not hold it.
    let (status, body) = brokers[0].http("GET", "/v1/topics/full-a", None);
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    let on = value["partition_details"][0]["replicas"][0]
        .as_u64()
        .expect("replica");
    let other = 3 - on;
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics/full-a/partitions/0/replicas",
        Some(&format!(r#"{{"replicas":[{other}]}}"#)),
    );
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("partition_replicas_max"), "{body}");
    assert!(body.contains("LIMIT_REACHED"), "{body}");
    // Onto the broker that holds it already: no replica more anywhere, so not refused.
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics/full-a/partitions/0/replicas",
        Some(&format!(r#"{{"replicas":[{on}]}}"#)),
    );
    assert_eq!(status, 202, "{body}");

    let (status, body) = brokers[0].http("POST", "/v1/brokers/2/remove", None);
    assert_eq!(status, 202, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(view["started"], serde_json::json!([]), "{body}");
    let waiting = view["waiting"].as_array().expect("waiting");
    assert_eq!(waiting.len(), 2, "{body}");
    assert!(
        waiting.iter().all(|w| w
            .as_str()
            .is_some_and(|w| w.contains("partition_replicas_max"))),
        "{body}"
    );
    // The controller's leader plans the removal's moves on its own each tick too (every
    // second): it plans none either.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for broker in &brokers {
        assert_eq!(replicas_per_broker(broker, &topics), full);
    }
}

/// Two topics created at the same moment through two brokers, when the cluster has room for
/// only one: at most one is created, the other is refused (HTTP 429, LIMIT_REACHED), and no
/// broker holds more than `partition_replicas_max` replicas. Each broker checks the limit on
/// its own copy of the metadata before it proposes, so both checks could pass; the controller
/// now checks again when it applies the placement. Before, both topics were created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_created_at_once_through_two_brokers_share_partition_replicas_max() {
    let (_dir, brokers) = cluster_with_replicas_max(2, 1);
    let mut created_rounds = 0;
    for round in 0..8 {
        // Both brokers know that no topic is left from the round before.
        wait_for(
            "the last round's topic deleted",
            Duration::from_secs(10),
            || async {
                brokers
                    .iter()
                    .all(|b| {
                        let (status, body) = b.http("GET", "/v1/topics", None);
                        status == 200 && !body.contains("at-once-")
                    })
                    .then_some(())
            },
        )
        .await;
        let names = [format!("at-once-{round}-a"), format!("at-once-{round}-b")];
        let barrier = std::sync::Barrier::new(2);
        let answers: Vec<(u16, String)> = std::thread::scope(|scope| {
            let calls: Vec<_> = brokers
                .iter()
                .zip(&names)
                .map(|(broker, name)| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        let body =
                            format!(r#"{{"name":"{name}","partitions":1,"replication_factor":2}}"#);
                        barrier.wait();
                        broker.http("POST", "/v1/topics", Some(&body))
                    })
                })
                .collect();
            calls
                .into_iter()
                .map(|c| c.join().expect("create"))
                .collect()
        });
        let created: Vec<&String> = answers
            .iter()
            .zip(&names)
            .filter(|((status, _), _)| *status == 201)
            .map(|(_, name)| name)
            .collect();
        for (status, body) in &answers {
            assert!(
                *status == 201 || *status == 429 && body.contains("LIMIT_REACHED"),
                "round {round}: {status} {body}"
            );
        }
        assert!(
            created.len() <= 1,
            "round {round}: both topics created past partition_replicas_max: {answers:?}"
        );
        for name in created {
            created_rounds += 1;
            let (status, body) = brokers[0].http("DELETE", &format!("/v1/topics/{name}"), None);
            assert!(status < 300, "{status} {body}");
        }
    }
    assert!(created_rounds > 0, "no round created a topic");
}

/// A move stalled on a broker that is down can be undone even when the broker the partition is
/// leaving holds `partition_replicas_max` replicas: the replica it still holds already counts
/// there, so moving back gives it nothing more. Before, the broker receiving the call counted
/// it again and refused the move back with LIMIT_REACHED (helper-94), although the controller
/// would have applied it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_move_can_be_undone_at_the_limit() {
    let (_dir, brokers) = cluster_with_replicas_max(3, 1);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"undo","partitions":1,"replication_factor":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = brokers[0].http("GET", "/v1/topics/undo", None);
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    let on = value["partition_details"][0]["replicas"][0]
        .as_u64()
        .expect("replica");
    // Node ids are 1..=3, in the order of `brokers`. The broker to hang is not the
    // controller's leader (the calls below need the controller).
    let (status, body) = brokers[0].http("GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{body}");
    let cluster: serde_json::Value = serde_json::from_str(&body).expect("json");
    let controller = cluster["controller_id"].as_u64().expect("controller_id");
    let other = [1u64, 2, 3]
        .into_iter()
        .find(|&n| n != on && n != controller)
        .expect("a broker that neither holds the partition nor leads the controller");
    let stays = &brokers[on as usize - 1];
    let hung = &brokers[other as usize - 1];
    // The broker it would move to is hung (the controller keeps its majority): the move starts
    // and cannot end.
    hung.pause();
    let (status, body) = stays.http(
        "POST",
        "/v1/topics/undo/partitions/0/replicas",
        Some(&format!(r#"{{"replicas":[{other}]}}"#)),
    );
    assert_eq!(status, 202, "{body}");
    // Back where it was: the broker it is leaving holds its one replica already.
    let (status, body) = stays.http(
        "POST",
        "/v1/topics/undo/partitions/0/replicas",
        Some(&format!(r#"{{"replicas":[{on}]}}"#)),
    );
    hung.resume();
    assert_eq!(status, 202, "{body}");
    wait_for("the move undone", Duration::from_secs(30), || async {
        let (status, body) = stays.http("GET", "/v1/topics/undo", None);
        let value: serde_json::Value = serde_json::from_str(&body).ok()?;
        let p = &value["partition_details"][0];
        (status == 200
            && p["replicas"] == serde_json::json!([on])
            && p["moving_to"].as_array().is_none_or(|t| t.is_empty()))
        .then_some(())
    })
    .await;
}

/// (replicas, moving_to, leader) of partition 0 of `topic` as `broker` sees it.
fn partition_0(broker: &Broker, topic: &str) -> Option<(Vec<u64>, Vec<u64>, u64)> {
    let (status, body) = broker.http("GET", &format!("/v1/topics/{topic}"), None);
    if status != 200 {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(&body).ok()?;
    let p = &value["partition_details"][0];
    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_u64)
            .collect()
    };
    Some((
        ids(&p["replicas"]),
        ids(&p["moving_to"]),
        p["leader_id"].as_u64().unwrap_or(0),
    ))
}

/// Creates `topic` (one partition, three replicas) through `brokers[0]` and publishes a record
/// to it; returns its replicas, its leader, a follower that leads neither it nor the controller
/// (a broker a test may kill), and the other follower.
async fn three_replicas_and_roles(brokers: &[Broker], topic: &str) -> (Vec<u64>, u64, u64, u64) {
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(&format!(
            r#"{{"name":"{topic}","partitions":1,"replication_factor":3}}"#
        )),
    );
    assert_eq!(status, 201, "{body}");
    let (replicas, _, leader) = wait_for("a leader", Duration::from_secs(30), || {
        let p = partition_0(&brokers[0], topic);
        async move { p.filter(|(r, _, l)| r.len() == 3 && *l != 0) }
    })
    .await;
    publish_until_acknowledged(&[brokers[0].client_addr.clone()], topic, 0, 0, "before").await;
    let client = brokers[0].client().await;
    let controller = client
        .admin()
        .cluster_status()
        .await
        .expect("cluster status")
        .controller_id;
    let quiet = *replicas
        .iter()
        .find(|r| **r != leader && **r != controller)
        .expect("a replica that leads nothing");
    let other = *replicas
        .iter()
        .find(|r| **r != leader && **r != quiet)
        .expect("the other follower");
    (replicas, leader, quiet, other)
}

/// A move whose target keeps a replica that is down completes: a majority of each
/// configuration is enough, and the leadership goes to a replica that has every entry. Before,
/// the move waited for every replica of the target to have every entry, the one that was down
/// too, and handed the leadership (when the leader left) to the most senior replica even when
/// that one was down: either way the move tried again every 30 s for as long as it was down
/// (a removal of another broker waited on it too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_completes_while_a_replica_it_keeps_is_down() {
    let mut brokers = start_cluster(3);
    let fourth = add_broker(&brokers, &[]);
    brokers.push(fourth);
    let topic = "keeps-one-down";
    // A replica to kill (neither the partition's leader nor the controller's), one to drop, and
    // the broker that holds none.
    let (replicas, leader, down, dropped) = three_replicas_and_roles(&brokers, topic).await;
    let spare = (1..=4u64)
        .find(|b| !replicas.contains(b))
        .expect("the broker without a replica");
    brokers[(down - 1) as usize].kill9();
    let asked = brokers
        .iter()
        .position(|b| b.peer_addr != brokers[(down - 1) as usize].peer_addr)
        .expect("a broker that is up");

    // The leader stays: the new replica is waited for, the one down is not.
    let target = [leader, down, spare];
    let (status, body) = brokers[asked].http(
        "POST",
        &format!("/v1/topics/{topic}/partitions/0/replicas"),
        Some(&format!(r#"{{"replicas":{target:?}}}"#)),
    );
    assert_eq!(status, 202, "{body}");
    wait_for("the first move", Duration::from_secs(60), || {
        let p = partition_0(&brokers[asked], topic);
        async move {
            p.filter(|(r, moving, _)| {
                r.iter().collect::<BTreeSet<_>>() == target.iter().collect() && moving.is_empty()
            })
        }
    })
    .await;

    // The leader leaves: the replica that is down comes first among the old ones, but the
    // leadership goes to one that has every entry.
    let target = [down, spare, dropped];
    let (status, body) = brokers[asked].http(
        "POST",
        &format!("/v1/topics/{topic}/partitions/0/replicas"),
        Some(&format!(r#"{{"replicas":{target:?}}}"#)),
    );
    assert_eq!(status, 202, "{body}");
    wait_for("the second move", Duration::from_secs(60), || {
        let p = partition_0(&brokers[asked], topic);
        async move {
            p.filter(|(r, moving, _)| {
                r.iter().collect::<BTreeSet<_>>() == target.iter().collect() && moving.is_empty()
            })
        }
    })
    .await;
    // Led by a replica that is up, which takes publishes.
    let (_, _, new_leader) = partition_0(&brokers[(spare - 1) as usize], topic).expect("topic");
    assert!(
        new_leader == spare || new_leader == dropped,
        "led by {new_leader}"
    );
    publish_until_acknowledged(
        &[brokers[(spare - 1) as usize].client_addr.clone()],
        topic,
        0,
        1,
        "after",
    )
    .await;
}

/// A removal whose move would shrink a partition onto a replica that is down ([1,2,3] ->
/// [1,3] with 3 down, broker 2 removed) waits for it: the partition keeps taking publishes on
/// the two replicas that are up, and the removal ends once the replica is back. Before, the
/// partition's leader made [1,3] the voters (a joint configuration needing 3), and the
/// partition took no publish for as long as 3 stayed down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_never_shrinks_a_partition_onto_a_replica_that_is_down() {
    let mut brokers = start_cluster(3);
    let topic = "shrink";
    let (_, leader, down, removed) = three_replicas_and_roles(&brokers, topic).await;
    brokers[(down - 1) as usize].kill9();
    let at = (leader - 1) as usize;
    let (status, body) = brokers[at].http("POST", &format!("/v1/brokers/{removed}/remove"), None);
    assert!(status < 300, "{status}: {body}");
    // A few rounds of the removal's work.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let channel = weft_tests::grpc::channel(&brokers[at].client_addr).await;
    let during = tokio::time::timeout(
        Duration::from_secs(20),
        weft_tests::grpc::publisher(&channel).publish(weft_proto::v1::PublishRequest {
            topic: topic.into(),
            target: Some(weft_proto::v1::publish_request::Target::Partition(0)),
            records: vec![weft_proto::v1::Record {
                value: b"during".to_vec().into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
    )
    .await
    .expect("the partition takes publishes while its replica is down");
    during.expect("published on the two replicas that are up");
    brokers[(down - 1) as usize].start_again_same_ports();
    let mut left = vec![leader, down];
    left.sort_unstable();
    wait_for(
        "the removal ends once the replica is back",
        Duration::from_secs(90),
        || async { (brokers_listed(&brokers[at]) == left).then_some(()) },
    )
    .await;
    let produced = brokers[at].cli(&["--timeout-ms", "15000", "produce", topic, "after"]);
    ok_stdout(&produced);
}

/// A topic's id, as `broker` lists it.
fn topic_id(broker: &Broker, topic: &str) -> String {
    let (status, body) = broker.http("GET", &format!("/v1/topics/{topic}"), None);
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("json");
    value["topic_id"].as_str().expect("topic id").to_string()
}

/// The partition numbers of `topic_id` whose directories a broker holds.
fn partitions_on_disk(broker: &Broker, topic_id: &str) -> BTreeSet<u32> {
    std::fs::read_dir(broker.data_dir().join("topics").join(topic_id))
        .map(|dirs| {
            dirs.flatten()
                .filter_map(|d| d.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The data a broker holds of a topic deleted, and of a replica moved away, while it was down
/// goes once it is back (and its copy of the metadata has caught up); the partitions it still
/// hosts stay and serve. Before, only partitions open on a broker when the change arrived were
/// removed: a broker that was down kept the rest on its disk for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_a_broker_no_longer_hosts_goes_when_it_returns() {
    let mut brokers = start_cluster(3);
    let fourth = add_broker(&brokers, &[]);
    brokers.push(fourth);
    let (replicas, _, down, _) = three_replicas_and_roles(&brokers, "moved-away").await;
    let spare = (1..=4u64)
        .find(|b| !replicas.contains(b))
        .expect("the broker without a replica");
    for topic in ["gone", "kept"] {
        let (status, body) = brokers[0].http(
            "POST",
            "/v1/topics",
            Some(&format!(
                r#"{{"name":"{topic}","partitions":4,"replication_factor":3}}"#
            )),
        );
        assert_eq!(status, 201, "{body}");
    }
    let ids: Vec<String> = ["gone", "kept", "moved-away"]
        .iter()
        .map(|t| topic_id(&brokers[0], t))
        .collect();
    let at = (down - 1) as usize;
    // Its replicas (3 of each 4-partition topic's 12) and partition 0 of the one to move.
    let (gone_here, kept_here) = wait_for(
        "the broker to hold its replicas",
        Duration::from_secs(30),
        || {
            let (gone, kept, moved) = (
                partitions_on_disk(&brokers[at], &ids[0]),
                partitions_on_disk(&brokers[at], &ids[1]),
                partitions_on_disk(&brokers[at], &ids[2]),
            );
            async move {
                (!gone.is_empty() && !kept.is_empty() && moved.contains(&0)).then_some((gone, kept))
            }
        },
    )
    .await;
    let kept_partition = *kept_here.first().expect("a kept partition");
    publish_until_acknowledged(
        &[brokers[0].client_addr.clone()],
        "kept",
        kept_partition,
        0,
        "before",
    )
    .await;

    brokers[at].stop();
    let asked = (spare - 1) as usize;
    let (status, body) = brokers[asked].http("DELETE", "/v1/topics/gone", None);
    assert_eq!(status, 204, "{body}");
    let target: Vec<u64> = replicas
        .iter()
        .map(|r| if *r == down { spare } else { *r })
        .collect();
    let (status, body) = brokers[asked].http(
        "POST",
        "/v1/topics/moved-away/partitions/0/replicas",
        Some(&format!(r#"{{"replicas":{target:?}}}"#)),
    );
    assert_eq!(status, 202, "{body}");
    let wanted: BTreeSet<u64> = target.iter().copied().collect();
    wait_for("the move", Duration::from_secs(60), || {
        let p = partition_0(&brokers[asked], "moved-away");
        let wanted = &wanted;
        async move {
            p.filter(|(r, moving, _)| {
                r.iter().copied().collect::<BTreeSet<_>>() == *wanted && moving.is_empty()
            })
        }
    })
    .await;
    assert_eq!(partitions_on_disk(&brokers[at], &ids[0]), gone_here);

    brokers[at].start_again_same_ports();
    wait_for(
        "the data of the deleted topic and the moved replica to go",
        Duration::from_secs(60),
        || {
            let (gone, moved) = (
                brokers[at].data_dir().join("topics").join(&ids[0]).exists(),
                partitions_on_disk(&brokers[at], &ids[2]),
            );
            async move { (!gone && moved.is_empty()).then_some(()) }
        },
    )
    .await;
    assert_eq!(partitions_on_disk(&brokers[at], &ids[1]), kept_here);
    let log = brokers[at].log();
    assert!(
        log.contains("removed the Raft state of a group this broker no longer hosts"),
        "{log}"
    );
    // What it still hosts serves: the record published before, read from this broker.
    let address = brokers[at].client_addr.clone();
    let read = wait_for(
        "a read of the kept partition",
        Duration::from_secs(30),
        || {
            let address = address.clone();
            async move {
                weft_tests::try_fetch_range(&address, "kept", kept_partition, 0, 1)
                    .await
                    .ok()
            }
        },
    )
    .await;
    assert_eq!(
        read,
        [(0, bytes::Bytes::from_static(b"before"))],
        "{read:?}"
    );
}

/// A move whose leader leaves hands the leadership to a replica that is not draining, though a
/// draining one comes first by seniority. Four brokers: the partition's most senior follower is
/// drained (and keeps running), then the partition is moved off its leader onto that follower,
/// the other one and the fourth broker: the move completes. Before, every step chose the
/// draining follower, which refused the leadership, and the move (a removal too) never ended
/// while it drained (helper-124).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_hands_the_leadership_past_a_draining_replica() {
    let mut brokers = start_cluster(3);
    let fourth = add_broker(&brokers, &[]);
    brokers.push(fourth);
    let topic = "past-draining";
    let (replicas, leader, _, _) = three_replicas_and_roles(&brokers, topic).await;
    let spare = (1..=4u64)
        .find(|b| !replicas.contains(b))
        .expect("the broker without a replica");
    let followers: Vec<u64> = replicas.iter().copied().filter(|r| *r != leader).collect();
    let (senior, other) = (followers[0], followers[1]);
    // Marked as draining in the controller once it answers (else it says what it kept).
    let (status, body) = brokers[(senior - 1) as usize].http("POST", "/v1/drain", None);
    assert_eq!(status, 200, "{body}");
    let drained: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(drained["kept"], serde_json::json!([]), "{body}");
    let asked = (spare - 1) as usize;
    let target = [senior, other, spare];
    let (status, body) = brokers[asked].http(
        "POST",
        &format!("/v1/topics/{topic}/partitions/0/replicas"),
        Some(&format!(r#"{{"replicas":{target:?}}}"#)),
    );
    assert_eq!(status, 202, "{body}");
    let (_, _, new_leader) = wait_for("the move", Duration::from_secs(60), || {
        let p = partition_0(&brokers[asked], topic);
        async move {
            p.filter(|(r, moving, l)| {
                r.iter().collect::<BTreeSet<_>>() == target.iter().collect()
                    && moving.is_empty()
                    && *l != 0
            })
        }
    })
    .await;
    assert_ne!(new_leader, senior, "the draining replica leads");
    publish_until_acknowledged(&[brokers[asked].client_addr.clone()], topic, 0, 1, "after").await;
}
