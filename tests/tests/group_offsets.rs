//! Consumer-group offsets: bound to the topic's identity (a recreated topic of the same name starts
//! fresh), deleted with the topic or the group, and fenced: a zombie member, an expired member and
//! a stream superseded by another using the same member id cannot commit, and a committed offset
//! never moves back, even when a stale member races the new owner.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use weft_proto::v1::{
    CommitOffsetsRequest, Credit, DescribeGroupRequest, PartitionOffset, SubscribeRequest,
    SubscribeResponse, SubscribeStart,
};
use weft_tests::{Broker, grpc, offsets, ok_stdout, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_does_not_inherit_the_old_topics_group_offsets() {
    let broker = Broker::start();
    ok_stdout(&broker.cli(&["topic", "create", "gt", "--partitions", "1"]));
    ok_stdout(&broker.cli_with_stdin(&["produce", "gt"], &"x\n".repeat(12)));
    let client = broker.client().await;
    client
        .admin()
        .commit_offsets("gg", "gt", &[(0, 10)])
        .await
        .expect("commit");
    ok_stdout(&broker.cli(&["topic", "delete", "gt"]));
    // The offsets went with the topic.
    let gone = broker.cli(&["group", "describe", "gg"]);
    assert!(!gone.status.success(), "the group has nothing left");
    ok_stdout(&broker.cli(&["topic", "create", "gt", "--partitions", "1"]));
    ok_stdout(&broker.cli_with_stdin(&["produce", "gt"], "a\nb\nc\n"));
    let out = ok_stdout(&broker.cli(&[
        "consume", "gt", "--group", "gg", "--from", "earliest", "--count", "3", "--format", "json",
    ]));
    let offsets_seen: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["offset"]
                .as_u64()
                .expect("offset")
        })
        .collect();
    assert_eq!(
        offsets_seen,
        [0, 1, 2],
        "the new topic is read from its start"
    );
    let described = ok_stdout(&broker.cli(&["group", "describe", "gg", "--output", "json"]));
    let d: serde_json::Value = serde_json::from_str(&described).expect("json");
    assert_eq!(d["partitions"][0]["committed_offset"], 3);
    assert_eq!(d["partitions"][0]["high_watermark"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_deleted_by_cli_and_admin_api_but_not_while_members_live() {
    let broker = Broker::start();
    ok_stdout(&broker.cli(&["topic", "create", "dt", "--partitions", "2"]));
    let client = broker.client().await;
    client
        .admin()
        .commit_offsets("old", "dt", &[(0, 0), (1, 0)])
        .await
        .expect("commit");
    client
        .admin()
        .commit_offsets("other", "dt", &[(0, 0)])
        .await
        .expect("commit");
    ok_stdout(&broker.cli(&["group", "delete", "old"]));
    let list = ok_stdout(&broker.cli(&["group", "list"]));
    assert!(!list.lines().any(|l| l == "old"), "{list}");
    assert!(list.lines().any(|l| l == "other"), "{list}");
    let again = broker.cli(&["group", "delete", "old"]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    let (status, body) = broker.http("DELETE", "/v1/groups/other", None);
    assert_eq!(status, 204, "{body}");
    let (status, body) = broker.http("DELETE", "/v1/groups/other", None);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("GROUP_NOT_FOUND"), "{body}");

    // A group with a live member is not deleted.
    let mut member = client
        .consumer(weft_client::ConsumerConfig::new("dt").group("live"))
        .await
        .expect("join");
    let busy = broker.cli(&["group", "delete", "live"]);
    assert!(!busy.status.success(), "a live group is not deleted");
    let (status, body) = broker.http("DELETE", "/v1/groups/live", None);
    assert_eq!(status, 409, "{body}");
    let _ = member.next_timeout(Duration::from_millis(10)).await;
    member.close().await.expect("close");
}

/// The session of members that must not expire during the test (they send no heartbeats).
const STAYS: u32 = 600_000;

/// A raw Subscribe stream joined to `group` as `member_id`; returns the request sender, the
/// response stream and the first assignment's generation.
async fn join(
    address: &str,
    topic: &str,
    group: &str,
    member_id: &str,
    session_timeout_ms: u32,
) -> (
    mpsc::Sender<SubscribeRequest>,
    tonic::Streaming<SubscribeResponse>,
    u64,
    Vec<u32>,
) {
    let (tx, mut responses) = grpc::subscribe(
        address,
        SubscribeStart {
            topic: topic.into(),
            group_id: group.into(),
            member_id: member_id.into(),
            // From the earliest: nothing is committed until a test commits (a group's start
            // from "latest" is stored as its commit at once).
            start: Some(weft_proto::v1::StartPosition {
                position: Some(weft_proto::v1::start_position::Position::Earliest(
                    weft_proto::v1::start_position::Earliest {},
                )),
            }),
            credit: Some(Credit {
                records: 1,
                bytes: 1,
            }),
            session_timeout_ms,
            ..SubscribeStart::default()
        },
    )
    .await;
    let a = grpc::next_assignment(&mut responses, 0).await;
    assert_eq!(a.member_id, member_id);
    let partitions = a.partitions.iter().map(|p| p.partition).collect();
    (tx, responses, a.generation, partitions)
}

async fn commit(
    address: &str,
    member_id: &str,
    generation: u64,
    offset: u64,
) -> Result<(), tonic::Status> {
    let channel = grpc::channel(address).await;
    grpc::subscriber(&channel)
        .commit_offsets(CommitOffsetsRequest {
            group_id: "cg".into(),
            member_id: member_id.into(),
            generation,
            topic: "fence".into(),
            offsets: vec![PartitionOffset {
                partition: 0,
                offset,
            }],
            reset: false,
        })
        .await
        .map(|_| ())
}

fn stale(result: Result<(), tonic::Status>) -> bool {
    match result {
        Err(status) => {
            status.code() == tonic::Code::FailedPrecondition
                && status.message().contains("stale generation")
        }
        Ok(()) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_expired_and_superseded_members_cannot_commit_and_commits_never_go_back() {
    let broker = Broker::start();
    let address = broker.client_addr.clone();
    ok_stdout(&broker.cli(&["topic", "create", "fence", "--partitions", "1"]));
    ok_stdout(&broker.cli_with_stdin(&["produce", "fence"], &"x\n".repeat(300)));

    // "z-old" owns the partition at generation 1 and commits.
    let (_old_tx, _old_rx, gen1, owned) = join(&address, "fence", "cg", "z-old", STAYS).await;
    assert_eq!(owned, [0]);
    commit(&address, "z-old", gen1, 1)
        .await
        .expect("the owner commits");

    // While "z-old" keeps committing 1 at its generation, "a-new" joins (sorting first, it takes
    // the partition) and commits 2..=200. The stale member's commits must never land after the
    // new owner's: the committed offset only grows and ends at 200.
    let racing = Arc::new(AtomicBool::new(true));
    let zombie = {
        let racing = racing.clone();
        let address = address.clone();
        tokio::spawn(async move {
            let mut accepted_after_rebalance = 0;
            let mut rebalanced = false;
            while racing.load(Ordering::Relaxed) {
                let result = commit(&address, "z-old", gen1, 1).await;
                if stale(result.clone()) {
                    rebalanced = true;
                } else if result.is_ok() && rebalanced {
                    accepted_after_rebalance += 1;
                }
            }
            (rebalanced, accepted_after_rebalance)
        })
    };
    let watcher = {
        let racing = racing.clone();
        let address = address.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while racing.load(Ordering::Relaxed) {
                if let Ok(o) = offsets(&address, "fence", 0, Some("cg")).await {
                    seen.push(o.committed_offset.unwrap_or(0));
                }
            }
            seen
        })
    };
    let (new_tx, mut new_rx, gen2, owned) = join(&address, "fence", "cg", "a-new", STAYS).await;
    assert!(gen2 > gen1);
    assert_eq!(owned, [0], "the new member owns the partition");
    for offset in 2..=200 {
        commit(&address, "a-new", gen2, offset)
            .await
            .unwrap_or_else(|s| panic!("the owner's commit of {offset}: {s:?}"));
    }
    racing.store(false, Ordering::Relaxed);
    let (rebalanced, accepted_after_rebalance) = zombie.await.expect("zombie");
    assert!(rebalanced, "the zombie saw its generation go stale");
    assert_eq!(
        accepted_after_rebalance, 0,
        "no stale commit after the rebalance"
    );
    let seen = watcher.await.expect("watcher");
    assert!(seen.len() >= 2, "the watcher read the offset ({seen:?})");
    for pair in seen.windows(2) {
        assert!(
            pair[0] <= pair[1],
            "the committed offset went back: {pair:?}"
        );
    }
    let final_offset = offsets(&address, "fence", 0, Some("cg"))
        .await
        .expect("offsets")
        .committed_offset;
    assert_eq!(final_offset, Some(200));

    // A zombie at an old generation is refused, deterministically.
    assert!(stale(commit(&address, "z-old", gen1, 250).await));

    // An expired member: its stream ends, its session runs out, its commit is refused.
    let (expiring_tx, expiring_rx, gen3, _) =
        join(&address, "fence", "cg", "m-expiring", 300).await;
    drop(expiring_tx);
    drop(expiring_rx);
    let channel = grpc::channel(&address).await;
    wait_for(
        "the silent member to expire",
        Duration::from_secs(20),
        || {
            let mut subscriber = grpc::subscriber(&channel);
            async move {
                let d = subscriber
                    .describe_group(DescribeGroupRequest {
                        group_id: "cg".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                (!d.members.iter().any(|m| m.member_id == "m-expiring")).then_some(())
            }
        },
    )
    .await;
    assert!(stale(commit(&address, "m-expiring", gen3, 250).await));

    // Another client reusing "a-new"'s member id supersedes its stream: the first stream ends
    // with STALE_GENERATION and its holder's generation no longer commits.
    let current = grpc::subscriber(&channel)
        .describe_group(DescribeGroupRequest {
            group_id: "cg".into(),
        })
        .await
        .expect("describe")
        .into_inner()
        .generation;
    commit(&address, "a-new", current, 201)
        .await
        .expect("the owner still commits");
    let (_thief_tx, _thief_rx, gen_thief, _) = join(&address, "fence", "cg", "a-new", STAYS).await;
    assert!(
        gen_thief > current,
        "a superseded stream bumps the generation"
    );
    assert!(stale(commit(&address, "a-new", current, 202).await));
    let ended = loop {
        match new_rx.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the superseded stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::FailedPrecondition, "{ended:?}");
    drop(new_tx);
    let final_offset = offsets(&address, "fence", 0, Some("cg"))
        .await
        .expect("offsets")
        .committed_offset;
    assert_eq!(final_offset, Some(201), "refused commits changed nothing");
}

/// Committed offsets live in the controller group, whose state is snapshotted to a file every
/// 2000 entries: a restart reads the snapshot and the log after it, and every group's offsets are
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_a_restart_from_the_controllers_snapshot() {
    let mut broker = Broker::start();
    ok_stdout(&broker.cli(&["topic", "create", "st", "--partitions", "2"]));
    ok_stdout(&broker.cli_with_stdin(&["produce", "st"], &"x\n".repeat(40)));
    let client = broker.client().await;
    let admin = client.admin();
    let bounds = admin.offsets("st", None).await.expect("offsets");
    let end: Vec<u64> = bounds.iter().map(|p| p.high_watermark).collect();
    // More commits than the controller keeps between snapshots, over eight groups.
    let commits = 2100u64;
    for i in 0..commits {
        let group = format!("sg{}", i % 8);
        let offset = (i / 8).min(end[0]);
        admin
            .commit_offsets(&group, "st", &[(0, offset)])
            .await
            .expect("commit");
    }
    let snapshot = broker.data_dir().join("controller").join("snapshot");
    assert!(
        snapshot.exists(),
        "the controller wrote its snapshot ({})",
        snapshot.display()
    );
    drop(client);
    broker.restart();
    let client = broker.client().await;
    for g in 0..8u64 {
        let group = format!("sg{g}");
        let committed = client
            .admin()
            .offsets("st", Some(&group))
            .await
            .expect("offsets")[0]
            .committed_offset;
        let last = (commits - 8 + g) / 8;
        assert_eq!(committed, Some(last.min(end[0])), "{group}");
    }
}

/// A generation number never comes back with another assignment, not even after the
/// coordinator restarts with nothing committed. The fault-injection harness saw brokers that all
/// lost power hand out the generations of before again (the controller's leader led again in
/// the same Raft term, and generations took their high half from the term), so a zombie member
/// of an old generation could commit as if it owned the partition now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_never_come_back_after_the_coordinator_restarts() {
    let mut broker = Broker::start();
    let address = broker.client_addr.clone();
    ok_stdout(&broker.cli(&["topic", "create", "fence", "--partitions", "1"]));
    ok_stdout(&broker.cli_with_stdin(&["produce", "fence"], &"x\n".repeat(10)));
    let mut handed_out = Vec::new();
    for round in 0..3 {
        // A member joins and owns the partition; nothing is committed; the broker is killed.
        let member = format!("m-{round}");
        let (tx, rx, generation, owned) = join(&address, "fence", "cg", &member, STAYS).await;
        assert_eq!(owned, [0]);
        handed_out.push(generation);
        drop((tx, rx));
        broker.kill9();
        broker.start_again_same_ports();
        broker.wait_ready();
    }
    assert!(
        handed_out.windows(2).all(|w| w[0] < w[1]),
        "generations handed out across restarts: {handed_out:?}"
    );
    // The member of the first generation, a zombie now, cannot commit.
    let (_tx, _rx, current, _) = join(&address, "fence", "cg", "m-0", STAYS).await;
    assert!(current > handed_out[2], "{current} after {handed_out:?}");
    assert!(stale(commit(&address, "m-0", handed_out[0], 5).await));
    commit(&address, "m-0", current, 5)
        .await
        .expect("the member commits at the generation it holds now");
}

/// The committed offsets `weft group describe -o json` shows, by partition.
fn committed(broker: &Broker, group: &str) -> Vec<Option<u64>> {
    let out = ok_stdout(&broker.cli(&["-o", "json", "group", "describe", group]));
    let described: serde_json::Value = serde_json::from_str(&out).expect("json");
    described["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["committed_offset"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_group_reset_offsets_moves_a_group_back_and_forth_but_not_while_members_live() {
    let broker = Broker::start();
    ok_stdout(&broker.cli(&["topic", "create", "replay", "--partitions", "2"]));
    let client = broker.client().await;
    let producer = client.producer(weft_client::ProducerConfig::default());
    // Five records per partition an hour ago, five now: `@<ms>` finds the boundary.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let boundary = now_ms - 1_000;
    for i in 0..10 {
        for partition in 0..2 {
            let at = if i < 5 { now_ms - 3_600_000 } else { now_ms };
            producer
                .send(
                    "replay",
                    weft_client::Record::new(format!("{partition}-{i}"))
                        .partition(partition)
                        .timestamp_ms(at),
                )
                .await
                .expect("publish");
        }
    }
    client
        .admin()
        .commit_offsets("rg", "replay", &[(0, 10), (1, 10)])
        .await
        .expect("commit");
    assert_eq!(committed(&broker, "rg"), [Some(10), Some(10)]);

    // Without --execute it is a plan only.
    let plan = ok_stdout(&broker.cli(&[
        "group",
        "reset-offsets",
        "rg",
        "--topic",
        "replay",
        "--to",
        "earliest",
    ]));
    assert!(plan.contains("--execute"), "{plan}");
    assert_eq!(committed(&broker, "rg"), [Some(10), Some(10)]);

    let reset = |to: &str, extra: &[&str]| {
        let mut args = vec![
            "group",
            "reset-offsets",
            "rg",
            "--topic",
            "replay",
            "--to",
            to,
            "--execute",
        ];
        args.extend_from_slice(extra);
        ok_stdout(&broker.cli(&args))
    };
    reset("earliest", &[]);
    assert_eq!(committed(&broker, "rg"), [Some(0), Some(0)], "backwards");
    // The group reads again from there.
    let out = ok_stdout(&broker.cli(&[
        "consume", "replay", "--group", "rg", "--count", "20", "--format", "json",
    ]));
    assert_eq!(out.lines().count(), 20, "{out}");
    let first: serde_json::Value =
        serde_json::from_str(out.lines().next().expect("a line")).expect("json");
    assert_eq!(first["offset"], 0, "{out}");
    reset("4", &[]);
    assert_eq!(committed(&broker, "rg"), [Some(4), Some(4)]);
    reset("+3", &[]);
    assert_eq!(committed(&broker, "rg"), [Some(7), Some(7)]);
    reset("-2", &["--partitions", "1"]);
    assert_eq!(
        committed(&broker, "rg"),
        [Some(7), Some(5)],
        "one partition"
    );
    reset(&format!("@{boundary}"), &[]);
    assert_eq!(committed(&broker, "rg"), [Some(5), Some(5)], "by time");
    // Beyond the log: held to it.
    let json = reset("+100", &["-o", "json"]);
    let json: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(json["executed"], true);
    assert_eq!(json["partitions"][0]["new_offset"], 10);
    assert_eq!(committed(&broker, "rg"), [Some(10), Some(10)], "latest");
    reset("latest", &[]);
    assert_eq!(committed(&broker, "rg"), [Some(10), Some(10)]);

    // Bad input: a clear message and a failing exit.
    for (args, says) in [
        (vec!["--to", "yesterday"], "--to"),
        (
            vec!["--to", "earliest", "--partitions", "7"],
            "no partition 7",
        ),
    ] {
        let mut all = vec![
            "group",
            "reset-offsets",
            "rg",
            "--topic",
            "replay",
            "--execute",
        ];
        all.extend(args);
        let out = broker.cli(&all);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{stderr}");
    }

    // The admin API sets exact offsets the same way.
    let put = |body: &str| broker.http("PUT", "/v1/groups/rg/offsets", Some(body));
    let (status, body) = put(r#"{"topic":"replay","offsets":[{"partition":1,"offset":3}]}"#);
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["offsets"][0]["offset"], 3, "{body}");
    assert_eq!(committed(&broker, "rg"), [Some(10), Some(3)], "over HTTP");
    for (bad, status_wanted, says) in [
        (
            r#"{"topic":"replay","offsets":[{"partition":0,"offset":11}]}"#,
            400,
            "past the high watermark",
        ),
        (
            r#"{"topic":"replay","offsets":[{"partition":0,"offset":1},{"partition":0,"offset":2}]}"#,
            400,
            "named twice",
        ),
        (r#"{"topic":"replay","offset":[]}"#, 400, "offset"),
        (
            r#"{"topic":"nope","offsets":[{"partition":0,"offset":0}]}"#,
            404,
            "nope",
        ),
    ] {
        let (status, body) = put(bad);
        assert_eq!(status, status_wanted, "{bad}: {body}");
        assert!(body.contains(says), "{bad}: {body}");
        let _: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    }
    assert_eq!(committed(&broker, "rg"), [Some(10), Some(3)], "unchanged");

    // Not while the group has a live member: it would commit over the reset.
    let mut member = client
        .consumer(weft_client::ConsumerConfig::new("replay").group("rg"))
        .await
        .expect("join");
    let _ = member.next_timeout(Duration::from_millis(10)).await;
    let busy = broker.cli(&[
        "group",
        "reset-offsets",
        "rg",
        "--topic",
        "replay",
        "--to",
        "earliest",
        "--execute",
    ]);
    assert!(!busy.status.success(), "a live group was reset");
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(
        stderr.contains("GROUP_NOT_EMPTY") || stderr.contains("members"),
        "{stderr}"
    );
    let (status, body) = put(r#"{"topic":"replay","offsets":[{"partition":0,"offset":0}]}"#);
    assert_eq!(status, 409, "{body}");
    member.close().await.expect("close");
}

/// A commit forwarded by a broker that checked it against a topic since deleted (its metadata
/// behind, the topic created again meanwhile) is refused by the coordinator with NOT_FOUND.
/// Before, the forwarded call named the topic only, and the coordinator stored the offsets under
/// the new topic of that name: its group then skipped the new topic's records. The call is made
/// here as a forwarding broker makes it, on the peer port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_commit_checked_against_a_deleted_topic_is_refused() {
    use weft_proto::internal::v1 as internal;
    let broker = Broker::start();
    let topic_id = |broker: &Broker| {
        let (status, body) = broker.http("GET", "/v1/topics/ft", None);
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["topic_id"].as_str().expect("topic id").to_string()
    };
    ok_stdout(&broker.cli(&["topic", "create", "ft", "--partitions", "1"]));
    let old_id = topic_id(&broker);
    ok_stdout(&broker.cli(&["topic", "delete", "ft"]));
    ok_stdout(&broker.cli(&["topic", "create", "ft", "--partitions", "1"]));
    ok_stdout(&broker.cli_with_stdin(&["produce", "ft"], "a\nb\nc\n"));
    let new_id = topic_id(&broker);
    assert_ne!(old_id, new_id);
    let channel = grpc::channel(&broker.peer_addr).await;
    let mut forward = internal::forward_client::ForwardClient::new(channel);
    let forwarded = |topic_id: &str| {
        let mut request = tonic::Request::new(internal::ForwardCommitOffsetsRequest {
            request: Some(CommitOffsetsRequest {
                group_id: "fg".into(),
                topic: "ft".into(),
                offsets: vec![PartitionOffset {
                    partition: 0,
                    offset: 2,
                }],
                ..CommitOffsetsRequest::default()
            }),
            hops: 1,
            from_node_id: 2,
            topic_id: topic_id.to_string(),
        });
        request
            .metadata_mut()
            .insert("weft-cluster", "weft".parse().expect("ascii"));
        request
            .metadata_mut()
            .insert("weft-target-node", "1".parse().expect("ascii"));
        request.set_timeout(Duration::from_secs(10));
        request
    };
    let refused = forward
        .commit_offsets(forwarded(&old_id))
        .await
        .expect_err("the deleted topic's offsets are refused");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    let gone = broker.cli(&["group", "describe", "fg"]);
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(
        !gone.status.success() && stderr.contains("not found"),
        "nothing committed: {} {stderr}",
        String::from_utf8_lossy(&gone.stdout)
    );
    // Checked against the topic as it is, the same call commits.
    let committed = forward
        .commit_offsets(forwarded(&new_id))
        .await
        .expect("commit")
        .into_inner();
    assert_eq!(
        committed.offsets,
        [PartitionOffset {
            partition: 0,
            offset: 2
        }]
    );
}

/// A group with no members that committed nothing for `offsets_retention_ms` loses its
/// committed offsets (Kafka's `offsets.retention.minutes`): it leaves `weft group list`, and
/// the broker counts it in `weft_group_offsets_expired_total`. A group with a live member keeps
/// its offsets. Before, the offsets of every group that ever committed stayed forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_of_a_group_idle_past_the_retention_are_forgotten() {
    use weft_client::ConsumerConfig;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "offsets_retention_ms = 1000\n").expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    ok_stdout(&broker.cli(&["topic", "create", "work", "--partitions", "1"]));
    let client = broker.client().await;
    let admin = client.admin();
    admin
        .commit_offsets("ghost", "work", &[(0, 0)])
        .await
        .expect("a commit from outside membership");
    let mut member = client
        .consumer(ConsumerConfig::new("work").group("live").auto_commit(false))
        .await
        .expect("join");
    member.commit().await.expect("the member commits");
    let listed = ok_stdout(&broker.cli(&["group", "list"]));
    assert!(
        listed.contains("ghost") && listed.contains("live"),
        "{listed}"
    );
    wait_for(
        "the idle group's offsets to go",
        Duration::from_secs(20),
        || async {
            let groups = admin.groups().await.expect("groups");
            (!groups.iter().any(|g| g == "ghost")).then_some(())
        },
    )
    .await;
    let groups = admin.groups().await.expect("groups");
    assert!(groups.iter().any(|g| g == "live"), "{groups:?}");
    let expired = weft_tests::metric(&broker, "weft_group_offsets_expired_total")
        .expect("the expiry counter");
    assert!(expired >= 1.0, "{expired}");
    member.close().await.expect("close");
}
