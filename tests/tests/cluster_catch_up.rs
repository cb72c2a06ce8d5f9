//! A replica whose data directory was wiped rejoins the cluster and catches up from its
//! partition's leader (real processes, three brokers on 127.0.0.x). The leader's log was already
//! purged by retention, so the new replica is sent a snapshot (the partition's state at the
//! leader's latest snapshot); it then fetches the entries before that snapshot which the leader
//! still holds (ReadLog on the peer port) and receives every entry after it: it holds everything
//! retention keeps, not only what came after the leader's latest snapshot. Before, the leader's
//! partition group crashed outright (openraft refuses a follower whose log went backwards unless
//! told that a wiped replica may rejoin). When the leader cannot give those entries (it died
//! meanwhile, say), the new replica fetches them from another replica.

use std::time::Duration;

use weft_proto::v1::publish_request::Target;
use weft_proto::v1::{PublishRequest, Record};
use weft_tests::{Broker, Firewall, fetch_range, grpc, offsets, start_cluster_with, wait_for};

const RECORD: usize = 4096;

fn leader_of_0(broker: &Broker) -> u64 {
    let (status, body) = broker.http("GET", "/v1/topics/wipe", None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["partition_details"][0]["leader_id"].as_u64().unwrap_or(0)
}

/// Publishes records `from .. to` (16 per call) through `address`, as an idempotent producer
/// that retries while the partition is unavailable (its leadership moving, say: the preferred
/// leader balance may run meanwhile).
async fn publish(address: &str, from: u64, to: u64) {
    publish_at(address, from, to, Some(from)).await;
}

/// [`publish`], the first record expected at offset `first_offset` (None: wherever the log
/// ends).
async fn publish_at(address: &str, from: u64, to: u64, mut first_offset: Option<u64>) {
    let channel = grpc::channel(address).await;
    let mut publisher = grpc::publisher(&channel);
    let mut i = from;
    let mut attempts = 0;
    while i < to {
        let end = (i + 16).min(to);
        let answer = publisher
            .publish(PublishRequest {
                topic: "wipe".into(),
                target: Some(Target::Partition(0)),
                records: (i..end)
                    .map(|n| {
                        let mut value = format!("{n:08}").into_bytes();
                        value.resize(RECORD, b'.');
                        Record {
                            value: value.into(),
                            ..Record::default()
                        }
                    })
                    .collect(),
                producer_id: 7001,
                base_sequence: i,
                ..PublishRequest::default()
            })
            .await;
        let response = match answer {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable && attempts < 100 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(status) => panic!("publish: {status:?}"),
        };
        let first = *first_offset.get_or_insert(response.base_offset);
        assert_eq!(response.base_offset, i - from + first, "dense offsets");
        i = end;
    }
}

/// Three brokers that check retention every 200 ms and snapshot every MiB, and topic `wipe`
/// (one partition, 1 MiB segments, 4 MiB kept): the brokers, the node id of the partition's
/// leader, and the directory of their config file (kept while the test runs).
async fn retention_cluster() -> (Vec<Broker>, usize, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(
        &config,
        "retention_check_interval_ms = 200\nsnapshot_interval_bytes = 1048576\n",
    )
    .expect("config");
    let config = config.to_string_lossy().into_owned();
    let brokers = start_cluster_with(3, &["--config", &config]);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"wipe","partitions":1,"segment_bytes":1048576,"retention_bytes":4194304,"max_message_bytes":262144}"#),
    );
    assert_eq!(status, 201, "{body}");
    let leader = wait_for("a leader", Duration::from_secs(30), || {
        let l = leader_of_0(&brokers[0]);
        async move { (l != 0).then_some(l) }
    })
    .await as usize;
    (brokers, leader, dir)
}

/// Moves partition wipe/0's leadership to node `to` through `broker` (its leader), asking
/// again while it answers 503: the target may not answer the leader at once under load (seen
/// in fresh CI: "node 2 has not answered this leader within 1875 ms").
fn transfer(broker: &Broker, to: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = broker.http(
            "POST",
            "/v1/topics/wipe/partitions/0/leader",
            Some(&format!(r#"{{"node_id":{to}}}"#)),
        );
        if status == 200 {
            return;
        }
        assert!(
            status == 503 && std::time::Instant::now() < deadline,
            "transfer to node {to}: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_catches_up_with_everything_retention_keeps() {
    let (mut brokers, leader, _config) = retention_cluster().await;
    let leader_address = brokers[leader - 1].client_addr.clone();

    // About 6.5 MB through 1 MiB segments, keeping 4 MiB: retention purges the head.
    publish(&leader_address, 0, 1600).await;
    wait_for("retention to purge", Duration::from_secs(30), || {
        let address = leader_address.clone();
        async move {
            offsets(&address, "wipe", 0, None)
                .await
                .ok()
                .filter(|b| b.log_start_offset > 0)
        }
    })
    .await;

    // The seed broker (node 1, which initialised the cluster) loses its disk while it follows
    // the partition: it comes back empty, on the same addresses, and must rejoin the cluster
    // it belonged to, not start a second one.
    let wiped = 0;
    if leader == 1 {
        transfer(&brokers[0], 2);
    }
    let leader = wait_for(
        "a leader other than node 1",
        Duration::from_secs(30),
        || {
            let l = leader_of_0(&brokers[1]);
            async move { (l != 0 && l != 1).then_some(l) }
        },
    )
    .await as usize;
    let leader_address = brokers[leader - 1].client_addr.clone();
    brokers[wiped].kill9();
    std::fs::remove_dir_all(brokers[wiped].data_dir()).expect("wipe");
    brokers[wiped].start_again_same_ports();
    brokers[wiped].wait_ready();
    publish(&leader_address, 1600, 1700).await;

    let wiped_address = brokers[wiped].client_addr.clone();
    // It knows the cluster's topics (it rejoined; a second cluster would have none), and it
    // withheld its votes until it had caught up.
    let (status, body) = brokers[wiped].http("GET", "/v1/topics/wipe", None);
    assert_eq!(status, 200, "{body}");
    let caught_up = wait_for(
        "the wiped replica to catch up",
        Duration::from_secs(60),
        || {
            let address = wiped_address.clone();
            async move {
                offsets(&address, "wipe", 0, None)
                    .await
                    .ok()
                    .filter(|b| b.high_watermark >= 1700)
            }
        },
    )
    .await;
    // It holds everything retention keeps: 4 MiB of 4 KiB records (each a little larger on
    // disk), so about the last thousand of the 1,700.
    assert!(
        caught_up.log_start_offset <= 1700 - 1000,
        "the wiped replica starts at {}: it lacks records retention keeps",
        caught_up.log_start_offset
    );
    // And what the leader holds once the leader's own retention has run (each replica applies
    // retention by itself, whole segments at a time, so the heads may differ by part of a
    // segment; the leader may not have purged yet: it became leader just before the wipe, and
    // its log may be longer than retention keeps for a while).
    let per_segment = (1048576 / RECORD) as u64;
    let on_leader = wait_for(
        "the leader's retention to reach the wiped replica's start",
        Duration::from_secs(30),
        || {
            let address = leader_address.clone();
            let wiped_start = caught_up.log_start_offset;
            async move {
                offsets(&address, "wipe", 0, None)
                    .await
                    .ok()
                    .filter(|b| wiped_start <= b.log_start_offset + per_segment)
            }
        },
    )
    .await;
    eprintln!(
        "leader holds [{}, {}), the wiped replica [{}, {})",
        on_leader.log_start_offset,
        on_leader.high_watermark,
        caught_up.log_start_offset,
        caught_up.high_watermark
    );
    let log = brokers[wiped].log();
    assert!(
        log.contains("Rejoining") && log.contains("votes again"),
        "the wiped broker withholds its votes until caught up:\n{log}"
    );
    let read = fetch_range(&wiped_address, "wipe", 0, caught_up.log_start_offset, 1700).await;
    assert_eq!(read.len() as u64, 1700 - caught_up.log_start_offset);
    for (offset, value) in &read {
        assert_eq!(
            &value[..8],
            format!("{offset:08}").as_bytes(),
            "offset {offset}"
        );
    }
}

/// A wiped replica whose snapshot's sender (the leader) dies while the replica fetches the
/// entries before that snapshot fetches them from another replica. Before, it fetched them from
/// the sender only, and when that failed its log restarted after the snapshot: it held only what
/// came after, and, leading later, it would have served less than retention keeps. A test hook
/// makes each fetch wait, so the leader is killed in the middle of the fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_whose_snapshot_sender_dies_fills_its_log_from_another_replica() {
    let (mut brokers, leader, _config) = retention_cluster().await;
    let leader_address = brokers[leader - 1].client_addr.clone();
    publish(&leader_address, 0, 1600).await;
    // The leader that will send the snapshot: the preferred one (the leader balance moves the
    // leadership there, and leaves it).
    let brokers_ref = &brokers;
    let leader = wait_for(
        "the preferred replica to lead",
        Duration::from_secs(30),
        || async move {
            let (status, body) = brokers_ref[0].http("GET", "/v1/topics/wipe", None);
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).expect("json");
            let p = &v["partition_details"][0];
            let leader = p["leader_id"].as_u64().unwrap_or(0);
            (leader != 0 && Some(leader) == p["replicas"][0].as_u64()).then_some(leader as usize)
        },
    )
    .await;
    let leader_address = brokers[leader - 1].client_addr.clone();
    wait_for("retention to purge", Duration::from_secs(30), || {
        let address = leader_address.clone();
        async move {
            offsets(&address, "wipe", 0, None)
                .await
                .ok()
                .filter(|b| b.log_start_offset > 0)
        }
    })
    .await;
    let wiped = (1..=3).find(|id| *id != leader).expect("a follower") - 1;
    let third = (1..=3)
        .find(|id| *id != leader && *id != wiped + 1)
        .expect("the other follower")
        - 1;
    let on_third = offsets(&brokers[third].client_addr, "wipe", 0, None)
        .await
        .expect("offsets");
    brokers[wiped].kill9();
    std::fs::remove_dir_all(brokers[wiped].data_dir()).expect("wipe");
    brokers[wiped].set_env("WEFT_TEST_BACKFILL_DELAY_MS", "2000");
    // Only what the broker logs from its restart on counts: its log file goes on from its
    // first run, which may have filled its log from the leader already (seen in CI: the
    // check below then read that old line and failed).
    let earlier = brokers[wiped].log().len();
    brokers[wiped].start_again_same_ports();
    let since_restart =
        |broker: &Broker| broker.log().get(earlier..).unwrap_or_default().to_string();
    let wiped_broker = &brokers[wiped];
    wait_for(
        "the wiped replica to fill its log",
        Duration::from_secs(60),
        || {
            let filling = since_restart(wiped_broker).contains("WEFT_TEST_BACKFILL_DELAY_MS");
            async move { filling.then_some(()) }
        },
    )
    .await;
    brokers[leader - 1].kill9();
    let wiped_broker = &brokers[wiped];
    let log = wait_for(
        "the wiped replica to fill its log, or give up",
        Duration::from_secs(120),
        || {
            let log = since_restart(wiped_broker);
            async move {
                (log.contains("fetched the entries before the installed snapshot")
                    || log.contains("no replica gave the entries before the installed snapshot"))
                .then_some(log)
            }
        },
    )
    .await;
    let filled = log
        .lines()
        .find(|l| l.contains("fetched the entries before the installed snapshot"))
        .unwrap_or_default()
        .to_string();
    assert!(
        log.contains("cannot fetch the entries before the installed snapshot from this replica")
            && filled.contains(&format!("from={}", third + 1)),
        "the dead leader was asked first, then the other follower gave the entries:\n{log}"
    );
    // The killed leader comes back: the partition has its three replicas again.
    brokers[leader - 1].start_again_same_ports();
    brokers[leader - 1].wait_ready();
    let wiped_address = brokers[wiped].client_addr.clone();
    let caught_up = wait_for(
        "the wiped replica to serve every record",
        Duration::from_secs(60),
        || {
            let address = wiped_address.clone();
            async move {
                offsets(&address, "wipe", 0, None)
                    .await
                    .ok()
                    .filter(|b| b.high_watermark >= 1600)
            }
        },
    )
    .await;
    eprintln!(
        "the other follower held [{}, {}), the wiped replica [{}, {})",
        on_third.log_start_offset,
        on_third.high_watermark,
        caught_up.log_start_offset,
        caught_up.high_watermark
    );
    let per_segment = (1048576 / RECORD) as u64;
    assert!(
        caught_up.log_start_offset <= on_third.log_start_offset + per_segment,
        "the wiped replica starts at {} but the other follower keeps from {}",
        caught_up.log_start_offset,
        on_third.log_start_offset
    );
    let read = fetch_range(&wiped_address, "wipe", 0, caught_up.log_start_offset, 1600).await;
    assert_eq!(read.len() as u64, 1600 - caught_up.log_start_offset);
    for (offset, value) in &read {
        assert_eq!(
            &value[..8],
            format!("{offset:08}").as_bytes(),
            "offset {offset}"
        );
    }
}

/// A replica that lost its data and was stopped while it was catching up (killed, or its pod
/// deleted) withholds its votes again after the restart, until it has caught up; then it votes
/// as any broker, and a later restart votes at once. Before, the identity its first start wrote
/// made the second start look like that of a broker that never lost anything: it voted at once
/// in every group, with a log that may lack entries it had acknowledged before it lost its
/// data (so it could help elect a leader that lacks committed entries). A test hook holds the
/// first start short of settling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_stopped_before_it_caught_up_still_withholds_its_votes() {
    let mut brokers = start_cluster_with(3, &[]);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"wipe","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    publish(&brokers[0].client_addr, 0, 64).await;

    let wiped = 2;
    brokers[wiped].kill9();
    std::fs::remove_dir_all(brokers[wiped].data_dir()).expect("wipe");
    brokers[wiped].set_env("WEFT_TEST_SETTLE_AFTER_MS", "600000");
    brokers[wiped].start_again_same_ports();
    wait_for(
        "the wiped broker rejoining",
        Duration::from_secs(60),
        || {
            let log = brokers[wiped].log();
            async move { log.contains("recovery=Rejoining").then_some(()) }
        },
    )
    .await;
    brokers[wiped].kill9();

    // Restarted (the hook off): it withholds its votes until it has caught up again, then
    // settles.
    let before = brokers[wiped].log().len();
    brokers[wiped].set_env("WEFT_TEST_SETTLE_AFTER_MS", "0");
    brokers[wiped].start_again_same_ports();
    brokers[wiped].wait_ready();
    wait_for(
        "the restarted broker to settle",
        Duration::from_secs(60),
        || {
            let log = brokers[wiped].log();
            let settled = log[before..].contains("votes in every group");
            async move { settled.then_some(()) }
        },
    )
    .await;
    let second = brokers[wiped].log()[before..].to_string();
    assert!(
        second.contains("recovery=Rejoining"),
        "the restarted broker withholds its votes until caught up:\n{second}"
    );
    assert_eq!(
        weft_tests::metric(&brokers[wiped], "weft_voting_mode{mode=\"normal\"}"),
        Some(1.0)
    );

    // Settled, a restart votes at once.
    restart_votes_at_once(&mut brokers[wiped]);
    // It still holds every record.
    let read = fetch_range(&brokers[wiped].client_addr, "wipe", 0, 0, 64).await;
    assert_eq!(read.len(), 64);
}

/// Stops `broker` gracefully and starts it again: it votes at once (no recovery mode logged,
/// the voting-mode gauge normal), its recovering mark gone.
fn restart_votes_at_once(broker: &mut Broker) {
    let before = broker.log().len();
    assert_eq!(broker.stop(), Some(0));
    broker.start_again_same_ports();
    broker.wait_ready();
    let restarted = broker.log()[before..].to_string();
    assert!(!restarted.contains("recovery="), "{restarted}");
    assert_eq!(
        weft_tests::metric(broker, "weft_voting_mode{mode=\"normal\"}"),
        Some(1.0)
    );
}

/// A topic of two replicas created while one of them rejoins after losing its data elects its
/// leaders. Before, the rejoining broker withheld its votes in every group whose leader it had
/// not heard yet, a new group included, and stood in none of them: the other replica could
/// never get a majority, and the partition stayed without a leader until the broker settled
/// (never, while that group had no leader). The other replica of a group of two voters was in
/// every majority that committed anything there, so its candidacy is safe whatever the
/// rejoining broker had acknowledged; it says so in its (pre-)vote requests. Then an operator
/// ends the recovery (`weft cluster end-recovery --accept-data-loss`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_of_two_replicas_created_while_a_broker_rejoins_elects_its_leaders() {
    // Each broker opens a new partition at a fixed phase of the 750 ms tick: the rejoining
    // broker (mostly) 50 ms before the others. Placement gives it p1 = [2, 3] (node 2 starts
    // the group and stands) and p2 = [3, 1]: node 3 starts that group, and its first election
    // (openraft's, at the start) finds node 1 not open yet; it must stand again itself.
    let mut brokers = weft_tests::start_cluster_env(3, &[], &[("WEFT_TEST_TICK_PHASE_MS", "50")]);
    let wiped = 2;
    let wiped_id = wiped as u64 + 1;
    brokers[wiped].kill9();
    std::fs::remove_dir_all(brokers[wiped].data_dir()).expect("wipe");
    brokers[wiped].set_env("WEFT_TEST_TICK_PHASE_MS", "0");
    // Held short of settling: it stays rejoining for the whole test.
    brokers[wiped].set_env("WEFT_TEST_SETTLE_AFTER_MS", "600000");
    brokers[wiped].start_again_same_ports();
    // Rejoining, and its controller state caught up (it opens partitions only then): the new
    // partitions open at their tick phases.
    wait_for(
        "the wiped broker rejoining, its controller state caught up",
        Duration::from_secs(60),
        || {
            let log = brokers[wiped].log();
            let ready = log.contains("recovery=Rejoining")
                && log.contains("caught up after losing its data: votes again group=0");
            async move { ready.then_some(()) }
        },
    )
    .await;

    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"pair","partitions":3,"replication_factor":2}"#),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = brokers[0].http("GET", "/v1/topics/pair", None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let with_wiped: Vec<u32> = v["partition_details"]
        .as_array()
        .expect("partitions")
        .iter()
        .filter(|p| {
            p["replicas"]
                .as_array()
                .is_some_and(|r| r.iter().any(|id| id.as_u64() == Some(wiped_id)))
        })
        .map(|p| p["partition"].as_u64().expect("partition") as u32)
        .collect();
    assert!(
        !with_wiped.is_empty(),
        "node {wiped_id} holds no replica: {body}"
    );

    let addresses: Vec<String> = brokers.iter().map(|b| b.client_addr.clone()).collect();
    for partition in 0..3 {
        let (offset, _) = weft_tests::publish_until_acknowledged(
            &addresses,
            "pair",
            partition,
            0,
            &format!("p{partition}"),
        )
        .await;
        assert_eq!(offset, 0);
    }
    // The rejoining broker was still rejoining: the leaders were elected with its votes given
    // as it rejoined, not after it settled.
    assert_eq!(
        weft_tests::metric(&brokers[wiped], "weft_voting_mode{mode=\"rejoining\"}"),
        Some(1.0),
        "partitions {with_wiped:?} hold node {wiped_id}"
    );

    // An operator may end the recovery (unsafe, so only when told so): the broker then votes
    // everywhere, and its durable mark is gone (a restart votes at once).
    let id = wiped_id.to_string();
    let refused = brokers[wiped].cli(&["cluster", "end-recovery", &id]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--accept-data-loss"), "{stderr}");
    // A call that reaches another broker than the one named changes nothing.
    let elsewhere = brokers[0].cli(&["cluster", "end-recovery", &id, "--accept-data-loss"]);
    assert!(!elsewhere.status.success());
    let stderr = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(stderr.contains("this is node 1"), "{stderr}");
    let (status, body) = brokers[wiped].http(
        "POST",
        "/v1/recovery/end",
        Some(&format!(
            r#"{{"node_id":{wiped_id},"accept_data_loss":false}}"#
        )),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("accept_data_loss"), "{body}");
    assert_eq!(
        weft_tests::metric(&brokers[wiped], "weft_voting_mode{mode=\"rejoining\"}"),
        Some(1.0)
    );
    let ended = brokers[wiped].cli(&["cluster", "end-recovery", &id, "--accept-data-loss"]);
    let stdout = String::from_utf8_lossy(&ended.stdout);
    assert!(
        ended.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&ended.stderr)
    );
    assert!(stdout.contains("was rejoining"), "{stdout}");
    assert_eq!(
        weft_tests::metric(&brokers[wiped], "weft_voting_mode{mode=\"normal\"}"),
        Some(1.0)
    );
    restart_votes_at_once(&mut brokers[wiped]);
    let again = brokers[wiped].cli(&["cluster", "end-recovery", &id, "--accept-data-loss"]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to end"),
        "{again:?}"
    );
}

/// The leadership moves while a wiped replica fills its log with the entries before the
/// snapshot it was sent: the new leader's entries after the snapshot, and the old leader's
/// retried snapshot, reach a replica whose log is being written by the filling. openraft 0.9
/// holds every later command of the group (appends included) until the install is answered,
/// so the replica still ends up with every record the leader keeps, in order, and nothing
/// fails on the way (no append that does not continue the log, no filling given up). A test
/// hook slows the filling down so that the leadership moves during it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leadership_change_while_a_wiped_replica_fills_its_log_loses_nothing() {
    let (mut brokers, leader, _config) = retention_cluster().await;
    publish(&brokers[leader - 1].client_addr.clone(), 0, 1600).await;
    wait_for("retention to purge", Duration::from_secs(30), || {
        let address = brokers[leader - 1].client_addr.clone();
        async move {
            offsets(&address, "wipe", 0, None)
                .await
                .ok()
                .filter(|b| b.log_start_offset > 0)
        }
    })
    .await;
    // Node 3 loses its data; node 1 leads while it catches up, then hands over to node 2.
    if leader != 1 {
        transfer(&brokers[0], 1);
        wait_for("node 1 to lead", Duration::from_secs(30), || {
            let l = leader_of_0(&brokers[0]);
            async move { (l == 1).then_some(()) }
        })
        .await;
    }
    let wiped = 2;
    brokers[wiped].kill9();
    std::fs::remove_dir_all(brokers[wiped].data_dir()).expect("wipe");
    brokers[wiped].set_env("WEFT_TEST_BACKFILL_DELAY_MS", "2000");
    brokers[wiped].start_again_same_ports();
    wait_for(
        "the wiped replica to fill its log",
        Duration::from_secs(60),
        || {
            let filling = brokers[wiped].log().contains("WEFT_TEST_BACKFILL_DELAY_MS");
            async move { filling.then_some(()) }
        },
    )
    .await;
    transfer(&brokers[0], 2);
    let new_leader = brokers[1].client_addr.clone();
    publish(&new_leader, 1600, 1700).await;

    let wiped_address = brokers[wiped].client_addr.clone();
    let caught_up = wait_for(
        "the wiped replica to catch up",
        Duration::from_secs(60),
        || {
            let address = wiped_address.clone();
            async move {
                offsets(&address, "wipe", 0, None)
                    .await
                    .ok()
                    .filter(|b| b.high_watermark >= 1700)
            }
        },
    )
    .await;
    let log = brokers[wiped].log();
    let filled_at = log
        .lines()
        .find(|l| l.contains("fetched the entries before the installed snapshot"))
        .and_then(|l| l.split(' ').next().map(str::to_string))
        .expect("the filling ended");
    let moved_at = brokers[1]
        .log()
        .lines()
        .find(|l| l.contains("partition leader elected") && l.contains("leader=2"))
        .and_then(|l| l.split(' ').next().map(str::to_string))
        .expect("node 2 leads");
    assert!(
        moved_at < filled_at,
        "the leadership moved at {moved_at}, not before the filling ended at {filled_at}"
    );
    assert!(
        !log.contains("does not continue the log") && !log.contains("cannot fetch the entries"),
        "the append failed, or the filling gave up:\n{log}"
    );
    let on_leader = offsets(&new_leader, "wipe", 0, None)
        .await
        .expect("leader offsets");
    let per_segment = (1048576 / RECORD) as u64;
    assert!(
        caught_up.log_start_offset <= on_leader.log_start_offset + per_segment,
        "the wiped replica starts at {} but the leader keeps from {}",
        caught_up.log_start_offset,
        on_leader.log_start_offset
    );
    let read = fetch_range(&wiped_address, "wipe", 0, caught_up.log_start_offset, 1700).await;
    assert_eq!(read.len() as u64, 1700 - caught_up.log_start_offset);
    for (offset, value) in &read {
        assert_eq!(
            &value[..8],
            format!("{offset:08}").as_bytes(),
            "offset {offset}"
        );
    }
}

/// One idempotent publish of producer `producer_id` at `sequence` to `address` with a deadline
/// of `limit`.
async fn publish_once(
    address: String,
    producer_id: u64,
    sequence: u64,
    limit: Duration,
) -> Result<weft_proto::v1::PublishResponse, tonic::Status> {
    let channel = grpc::channel(&address).await;
    let mut request = tonic::Request::new(PublishRequest {
        topic: "wipe".into(),
        target: Some(Target::Partition(0)),
        records: vec![Record {
            value: b"one".to_vec().into(),
            ..Record::default()
        }],
        producer_id,
        base_sequence: sequence,
        ..PublishRequest::default()
    });
    request.set_timeout(limit);
    tokio::time::timeout(
        limit + Duration::from_secs(1),
        grpc::publisher(&channel).publish(request),
    )
    .await
    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("client timeout")))
    .map(tonic::Response::into_inner)
}

/// A leader cut off with a publish in flight loses the leadership while the others commit the
/// publish's entry and retention runs on the new leader; back, the old leader is sent a
/// snapshot, and then leads again: it must take idempotent publishes. openraft never answers a
/// proposal whose entry a snapshot covered (it answers only entries it applies or truncates),
/// and the partition's publish actor then waited for it for good (each idempotent publish
/// waited for the entries in flight to settle before loading the producer table); a proposal
/// now gives up once a snapshot was installed over it. This run does not reliably reach that
/// case: openraft holds the purge back while its replication to the cut-off replica is in
/// flight, so the old leader usually receives the entry itself before the snapshot. It passes
/// with and without the proposal's give-up (seen: 4 runs each); it guards the whole sequence
/// (cut, retention, snapshot install, leading again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_pending_publish_a_snapshot_covered_serves_again() {
    let (brokers, old, _config) = retention_cluster().await;
    // The leader knows the producer (its table is loaded). Then nothing the others send it
    // arrives: its next publish reaches the followers, which store it, but their answers are
    // lost, and it cannot commit it. Then it is cut off for good: the others elect a leader,
    // which commits that entry.
    publish_once(
        brokers[old - 1].client_addr.clone(),
        9001,
        0,
        Duration::from_secs(10),
    )
    .await
    .expect("the first publish");
    let mut firewall = Firewall::new();
    let cut = &brokers[old - 1];
    for other in brokers.iter().filter(|b| b.peer_addr != cut.peer_addr) {
        firewall.drop_tcp_between(ip(&other.peer_addr), ip(&cut.peer_addr));
    }
    let stranded = tokio::spawn(publish_once(
        cut.client_addr.clone(),
        9001,
        1,
        Duration::from_secs(2),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    for other in brokers.iter().filter(|b| b.peer_addr != cut.peer_addr) {
        firewall.drop_tcp(Some(ip(&cut.peer_addr)), &other.peer_addr);
    }
    let stranded = stranded.await.expect("no panic");
    assert!(
        stranded.is_err(),
        "a cut-off leader committed: {stranded:?}"
    );
    let other = brokers
        .iter()
        .position(|b| b.peer_addr != cut.peer_addr)
        .expect("another");
    let new = wait_for("a new leader", Duration::from_secs(30), || {
        let l = leader_of_0(&brokers[other]);
        async move { (l != 0 && l as usize != old).then_some(l) }
    })
    .await as usize;
    let new_address = brokers[new - 1].client_addr.clone();
    // Retention on the new leader purges far past the old leader's log.
    publish_at(&new_address, 0, 1600, None).await;
    wait_for("retention to purge", Duration::from_secs(30), || {
        let address = new_address.clone();
        async move {
            offsets(&address, "wipe", 0, None)
                .await
                .ok()
                .filter(|b| b.log_start_offset > 0)
        }
    })
    .await;
    firewall.heal();
    wait_for(
        "the old leader to catch up",
        Duration::from_secs(60),
        || {
            let address = cut.client_addr.clone();
            async move {
                offsets(&address, "wipe", 0, None)
                    .await
                    .ok()
                    .filter(|b| b.high_watermark >= 1600)
            }
        },
    )
    .await;
    // Led by it again (the transfer asked of the current leader).
    wait_for(
        "the old leader to lead again",
        Duration::from_secs(30),
        || {
            let l = leader_of_0(&brokers[other]) as usize;
            if l != 0 && l != old {
                let (status, body) = brokers[l - 1].http(
                    "POST",
                    "/v1/topics/wipe/partitions/0/leader",
                    Some(&format!(r#"{{"node_id":{old}}}"#)),
                );
                assert!(status == 200 || status == 503, "{status} {body}");
            }
            async move { (l == old).then_some(()) }
        },
    )
    .await;
    // It takes an idempotent publish of a new producer.
    let mut last = None;
    for _ in 0..10 {
        match publish_once(cut.client_addr.clone(), 9002, 0, Duration::from_secs(2)).await {
            Ok(response) => {
                assert!(response.base_offset >= 1600, "{response:?}");
                return;
            }
            Err(status) => last = Some(status),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "the old leader, leading again, took no idempotent publish: {last:?}; log:\n{}",
        cut.log()
    );
}

/// The IP of `address` (ip:port).
fn ip(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(ip, _)| ip)
}
