//! Consumer groups in a three-broker cluster (real processes, 127.0.0.1, free ports): members
//! connected to two different brokers, neither of them the group coordinator (the controller's
//! leader), share the topic's partitions; their commits and the group's description are served
//! through any broker; when the coordinator is killed (-9) the members rejoin the new one, the
//! committed offsets are still there (they are replicated in the controller), and a member that
//! takes over a partition starts at its committed offset. Draining the coordinator moves the
//! groups to another broker.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use weft_client::{Client, Consumer, ConsumerConfig, StartFrom};
use weft_proto::v1::publish_request::Target;
use weft_proto::v1::{PublishRequest, Record};
use weft_tests::{Broker, grpc, start_cluster, wait_for};

const PARTITIONS: u32 = 4;

/// Publishes `count` records to every partition through the broker at `address`, retrying
/// while a partition has no leader (UNAVAILABLE).
async fn publish_each(address: &str, count: u64) {
    publish_to(address, "events", PARTITIONS, count).await;
}

/// Publishes `count` records to each of `partitions` partitions of `topic` through the broker
/// at `address`, retrying while a partition has no leader (UNAVAILABLE).
async fn publish_to(address: &str, topic: &str, partitions: u32, count: u64) {
    let channel = grpc::channel(address).await;
    let mut publisher = grpc::publisher(&channel);
    for partition in 0..partitions {
        let request = PublishRequest {
            topic: topic.into(),
            target: Some(Target::Partition(partition)),
            records: (0..count)
                .map(|i| Record {
                    value: format!("p{partition}-{i}").into_bytes().into(),
                    ..Record::default()
                })
                .collect(),
            ..PublishRequest::default()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match publisher.publish(request.clone()).await {
                Ok(_) => break,
                Err(status)
                    if status.code() == tonic::Code::Unavailable
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("publish to partition {partition}: {status:?}"),
            }
        }
    }
}

async fn member(broker: &Broker) -> Consumer {
    let client = Client::connect([broker.client_addr.as_str()])
        .await
        .expect("connect");
    client
        .consumer(
            ConsumerConfig::new("events")
                .group("g")
                .start(StartFrom::Earliest)
                .auto_commit(false)
                // A member whose client went away while it was (re)joining stays until its
                // session times out: keep that short here.
                .session_timeout(Duration::from_secs(10)),
        )
        .await
        .expect("join")
}

/// The controller's leader (the group coordinator), as `broker` sees it.
async fn coordinator(broker: &Broker) -> u64 {
    let client = broker.client().await;
    wait_for("a controller leader", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let status = client.admin().cluster_status().await.ok()?;
            (status.controller_id != 0).then_some(status.controller_id)
        }
    })
    .await
}

/// Reads from both members until `want` distinct (partition, offset) pairs were delivered;
/// returns what each member got.
async fn consume(members: &mut [&mut Consumer], want: usize) -> Vec<BTreeMap<u32, BTreeSet<u64>>> {
    let mut got: Vec<BTreeMap<u32, BTreeSet<u64>>> = vec![BTreeMap::new(); members.len()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let distinct: BTreeSet<(u32, u64)> = got
            .iter()
            .flat_map(|m| m.iter().flat_map(|(&p, o)| o.iter().map(move |&o| (p, o))))
            .collect();
        if distinct.len() >= want {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {want} records delivered",
            distinct.len()
        );
        for (i, m) in members.iter_mut().enumerate() {
            if let Some(message) = m
                .next_timeout(Duration::from_millis(100))
                .await
                .expect("next")
            {
                got[i]
                    .entry(message.partition)
                    .or_default()
                    .insert(message.offset);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_groups_span_brokers_and_survive_their_coordinator() {
    let mut brokers = start_cluster(3);
    let admin = brokers[0].client().await;
    admin
        .admin()
        .create_topic("events", PARTITIONS)
        .await
        .expect("create");
    let boss = coordinator(&brokers[0]).await;
    let others: Vec<usize> = (0..3).filter(|&i| i as u64 + 1 != boss).collect();
    let (a, b) = (others[0], others[1]);

    // Two members on the two brokers that do not coordinate the group.
    let mut m1 = member(&brokers[a]).await;
    let mut m2 = member(&brokers[b]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        m1.next_timeout(Duration::from_millis(100))
            .await
            .expect("m1");
        m2.next_timeout(Duration::from_millis(100))
            .await
            .expect("m2");
        if m1.generation() == m2.generation()
            && m1.assignment().len() == 2
            && m2.assignment().len() == 2
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the members did not share the partitions: {:?} at {}, {:?} at {}",
            m1.assignment(),
            m1.generation(),
            m2.assignment(),
            m2.generation()
        );
    }
    let (p1, p2): (BTreeSet<u32>, BTreeSet<u32>) = (
        m1.assignment().into_iter().collect(),
        m2.assignment().into_iter().collect(),
    );
    assert!(p1.is_disjoint(&p2), "{p1:?} and {p2:?} overlap");

    publish_each(&brokers[a].client_addr, 25).await;
    let got = consume(&mut [&mut m1, &mut m2], 100).await;
    for (i, owned) in [&p1, &p2].into_iter().enumerate() {
        let partitions: BTreeSet<u32> = got[i].keys().copied().collect();
        assert!(
            partitions.is_subset(owned),
            "member {i} got records of {partitions:?}, owns {owned:?}"
        );
    }
    m1.commit().await.expect("commit through a non-coordinator");
    m2.commit().await.expect("commit through another");

    // The group as the third broker (the coordinator) and a member's broker describe it.
    for broker in [&brokers[boss as usize - 1], &brokers[a]] {
        let group = broker
            .client()
            .await
            .admin()
            .group("g")
            .await
            .expect("describe");
        assert_eq!(group.members.len(), 2, "{group:?}");
        let committed: Vec<u64> = group
            .partitions
            .iter()
            .map(|p| p.committed_offset)
            .collect();
        assert_eq!(committed, vec![25; PARTITIONS as usize], "{group:?}");
    }

    // The coordinator dies; the controller (and with it the groups) moves to a survivor.
    brokers[boss as usize - 1].kill9();
    let new_boss = wait_for("a new coordinator", Duration::from_secs(30), || {
        let client = Client::connect([brokers[a].client_addr.as_str()]);
        async move {
            let status = client.await.ok()?.admin().cluster_status().await.ok()?;
            (status.controller_id != 0 && status.controller_id != boss)
                .then_some(status.controller_id)
        }
    })
    .await;
    assert_ne!(new_boss, boss);
    let offsets = brokers[b]
        .client()
        .await
        .admin()
        .offsets("events", Some("g"))
        .await
        .expect("offsets");
    for p in &offsets {
        assert_eq!(
            p.committed_offset,
            Some(25),
            "partition {}: the commit survived its coordinator",
            p.partition
        );
    }

    // The members rejoin the new coordinator and go on with what is published next.
    publish_each(&brokers[a].client_addr, 5).await;
    let got = consume(&mut [&mut m1, &mut m2], 20).await;
    let new: usize = got
        .iter()
        .flat_map(|m| m.values())
        .map(|o| o.iter().filter(|&&o| o >= 25).count())
        .sum();
    assert!(
        new >= 20,
        "the records after the commit were delivered: {got:?}"
    );

    // m1 leaves; a new member takes its partitions from their committed offsets (25), not
    // from the start.
    m1.close().await.expect("leave");
    let mut m3 = member(&brokers[b]).await;
    let mut first: BTreeMap<u32, u64> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // Two members left (m2, m3): two partitions each.
    while first.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "m3 got {first:?}");
        let _ = m2.next_timeout(Duration::from_millis(50)).await;
        if let Some(message) = m3
            .next_timeout(Duration::from_millis(100))
            .await
            .expect("next")
        {
            first.entry(message.partition).or_insert(message.offset);
        }
    }
    for (partition, offset) in &first {
        assert_eq!(
            *offset, 25,
            "partition {partition} resumed at its commit: {first:?}"
        );
    }

    // The killed broker comes back and serves the group's description (forwarded).
    brokers[boss as usize - 1].start_again_same_ports();
    brokers[boss as usize - 1].wait_ready();
    let group = wait_for(
        "the group through the restarted broker",
        Duration::from_secs(30),
        || {
            let broker = &brokers[boss as usize - 1];
            async move {
                let group = broker.client().await.admin().group("g").await.ok()?;
                (group.members.len() == 2).then_some(group)
            }
        },
    )
    .await;
    assert_eq!(group.topic, "events");

    // Draining the coordinator (what a pod's preStop hook does) moves the controller, and with
    // it the groups, to another broker; the members rejoin there.
    let c = coordinator(&brokers[0]).await as usize;
    let (status, body) = brokers[c - 1].http("POST", "/v1/drain", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("controller -> node"), "{body}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let _ = m2.next_timeout(Duration::from_millis(50)).await;
        let _ = m3.next_timeout(Duration::from_millis(50)).await;
        let now = coordinator(&brokers[c - 1]).await as usize;
        let members = brokers[c - 1]
            .client()
            .await
            .admin()
            .group("g")
            .await
            .map(|g| g.members.len())
            .unwrap_or(0);
        if now != c && members == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "coordinator {now} (was {c}), {members} members"
        );
    }
}

/// `call` until it answers, retrying UNAVAILABLE (a partition opening, a leader just elected)
/// every 100 ms until `deadline`; any other error fails the test, naming `what`.
async fn retry_unavailable<T, F, Fut>(deadline: tokio::time::Instant, what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    loop {
        match call().await {
            Ok(response) => return response.into_inner(),
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("{what}: {status:?}"),
        }
    }
}

/// A consumer that read up to the partition leader's high watermark commits that offset through
/// another broker at once: the commit is taken, although that broker's replica learns of the
/// high watermark only with the leader's next message. Before, the commit was refused as past
/// the high watermark (INVALID_ARGUMENT), seen by the fault-injection harness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_through_a_lagging_replica_waits_for_the_high_watermark() {
    let brokers = start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"hw","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    let leader = wait_for("a leader", Duration::from_secs(30), || {
        let (status, body) = brokers[0].http("GET", "/v1/topics/hw", None);
        async move {
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let leader = v["partition_details"][0]["leader_id"].as_u64()?;
            (status == 200 && leader != 0).then_some(leader)
        }
    })
    .await;
    let follower = (1..=3u64).find(|id| *id != leader).expect("a follower");
    let leader_channel = grpc::channel(&brokers[leader as usize - 1].client_addr).await;
    let follower_channel = grpc::channel(&brokers[follower as usize - 1].client_addr).await;
    for i in 0..30u64 {
        // Idempotent (producer 9, sequence i): a partition whose leader was just elected may
        // answer UNAVAILABLE for a moment, and a retry is stored once.
        let request = PublishRequest {
            topic: "hw".into(),
            target: Some(Target::Partition(0)),
            records: vec![Record {
                value: format!("r{i}").into_bytes().into(),
                ..Record::default()
            }],
            producer_id: 9,
            base_sequence: i,
            ..PublishRequest::default()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let published = retry_unavailable(deadline, &format!("publish {i}"), || {
            let mut publisher = grpc::publisher(&leader_channel);
            let request = request.clone();
            async move { publisher.publish(request).await }
        })
        .await;
        let next = published.base_offset + 1;
        // The follower's replica may still be opening right after the topic was created: it
        // answers UNAVAILABLE with a retry hint, and the commit is retried as a client would.
        // What must never come is a refusal as "past the high watermark".
        let what = format!("commit of {next} through node {follower}");
        let committed = retry_unavailable(deadline, &what, || {
            let mut subscriber = grpc::subscriber(&follower_channel);
            async move {
                subscriber
                    .commit_offsets(weft_proto::v1::CommitOffsetsRequest {
                        group_id: "lag".into(),
                        topic: "hw".into(),
                        offsets: vec![weft_proto::v1::PartitionOffset {
                            partition: 0,
                            offset: next,
                        }],
                        ..weft_proto::v1::CommitOffsetsRequest::default()
                    })
                    .await
            }
        })
        .await;
        assert_eq!(committed.offsets[0].offset, next);
    }
}

/// Draining the controller's leader while group commits keep coming (each one a controller
/// proposal): the leadership still moves. Seen by the fault-injection harness: a broker being
/// removed could not hand the controller over (twice 30 s), because the entries it kept
/// appending left the target behind and renewed the followers' leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_moves_while_commits_keep_coming() {
    let brokers = start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"busy","partitions":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    let c = coordinator(&brokers[0]).await as usize;
    let other = if c == 1 { 2 } else { 1 };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut committers = Vec::new();
    for k in 0..4 {
        let client = brokers[other - 1].client().await;
        let stop = stop.clone();
        committers.push(tokio::spawn(async move {
            let mut committed = 0u32;
            let started = tokio::time::Instant::now();
            while !stop.load(std::sync::atomic::Ordering::SeqCst)
                && started.elapsed() < Duration::from_secs(120)
            {
                if client
                    .admin()
                    .commit_offsets(&format!("busy-{k}"), "busy", &[(0, 0)])
                    .await
                    .is_ok()
                {
                    committed += 1;
                }
            }
            committed
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = brokers[c - 1].http("POST", "/v1/drain", None);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut committed = 0;
    for task in committers {
        committed += task.await.expect("committer");
    }
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("controller -> node"), "{body}");
    assert!(committed > 0, "the commits went on");
    let now = coordinator(&brokers[other - 1]).await as usize;
    assert_ne!(now, c, "the controller moved off node {c}");
}

/// The client's reads (a group's offsets and description, the topics) ride out a controller
/// election: asked through a survivor right after the controller's leader was killed (-9),
/// they answer once a new leader is elected, instead of failing with UNAVAILABLE ("the
/// controller has no leader now", seen in CI when the group test above asked a broker that had
/// not yet learnt of the new leader).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reads_ride_out_a_controller_election() {
    let mut brokers = start_cluster(3);
    let admin = brokers[0].client().await;
    admin
        .admin()
        .create_topic("events", PARTITIONS)
        .await
        .expect("create");
    publish_each(&brokers[0].client_addr, 3).await;
    admin
        .admin()
        .commit_offsets("g", "events", &[(0, 2)])
        .await
        .expect("commit");
    let boss = coordinator(&brokers[0]).await;
    let survivor = (0..3).find(|&i| i as u64 + 1 != boss).expect("a survivor");
    let client = brokers[survivor].client().await;

    brokers[boss as usize - 1].kill9();
    let started = std::time::Instant::now();
    let offsets = client
        .admin()
        .offsets("events", Some("g"))
        .await
        .expect("offsets through a survivor during the election");
    let committed: Vec<Option<u64>> = offsets.iter().map(|p| p.committed_offset).collect();
    assert_eq!(committed[0], Some(2), "{offsets:?}");
    let group = client.admin().group("g").await.expect("describe");
    assert_eq!(group.partitions[0].committed_offset, 2, "{group:?}");
    let topics = client.admin().topics().await.expect("topics");
    assert_eq!(topics.len(), 1, "{topics:?}");
    eprintln!("answered {:?} after the kill", started.elapsed());
    // The answers came from the new controller leader (the group's coordinator).
    let new_boss = coordinator(&brokers[survivor]).await;
    assert_ne!(new_boss, boss, "a new controller leader was elected");
}

/// Three brokers with `envs`, topic "events" (4 partitions) holding `records` records in each
/// partition, and the group coordinator's node id.
async fn events_cluster(envs: &[(&str, &str)], records: u64) -> (Vec<Broker>, usize) {
    let brokers = weft_tests::start_cluster_env(3, &[], envs);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"events","partitions":4}"#),
    );
    assert_eq!(status, 201, "{body}");
    publish_each(&brokers[0].client_addr, records).await;
    let boss = coordinator(&brokers[0]).await as usize;
    (brokers, boss)
}

/// The start of a raw Subscribe stream of member `member` (empty: a new one) of `group` on
/// "events", from the earliest offset, with a session of a minute.
fn group_start(group: &str, member: &str) -> weft_proto::v1::SubscribeStart {
    use weft_proto::v1::start_position::{Earliest, Position};
    use weft_proto::v1::{Credit, StartPosition, SubscribeStart};
    SubscribeStart {
        topic: "events".into(),
        group_id: group.into(),
        member_id: member.into(),
        session_timeout_ms: 60_000,
        credit: Some(Credit {
            records: 100,
            bytes: 1 << 20,
        }),
        start: Some(StartPosition {
            position: Some(Position::Earliest(Earliest {})),
        }),
        ..SubscribeStart::default()
    }
}

/// A member connected to a broker that does not coordinate its group commits from a generation
/// a rebalance has just replaced (its new assignment is still on its way: hook
/// `WEFT_TEST_VIEW_DELAY_MS` holds it back 4 s): nothing is committed and its stream goes
/// on, as on the coordinator's own broker. Before, the
/// coordinator's STALE_GENERATION came back through the forwarded call unrecognised and ended
/// the stream; the client then joined as a new member, and the old one kept its partitions
/// until its session ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_from_a_replaced_generation_through_another_broker_keeps_the_stream() {
    use weft_proto::v1::subscribe_request::Request as Inbound;
    use weft_proto::v1::subscribe_response::Event;
    use weft_proto::v1::{PartitionOffset, StreamCommit, SubscribeRequest};

    let (brokers, boss) = events_cluster(&[("WEFT_TEST_VIEW_DELAY_MS", "4000")], 1).await;
    let elsewhere = &brokers[boss % 3];
    let start = |member: &str| group_start("stale", member);
    let (tx, mut responses) = grpc::subscribe(&elsewhere.client_addr, start("a")).await;
    let first = grpc::next_assignment(&mut responses, 0).await;
    let mine = first.partitions[0].partition;
    let mut others = Vec::new();
    let mut stale_acks = 0;
    for round in 0..3 {
        // Another member joins through the coordinator's broker: the generation moves on
        // there at once, and reaches "a"'s broker 4 s later.
        let other =
            grpc::subscribe(&brokers[boss - 1].client_addr, start(&format!("b{round}"))).await;
        others.push(other);
        let (_, joined) = others.last_mut().expect("pushed");
        let generation = grpc::next_assignment(joined, first.generation + 1)
            .await
            .generation;
        tx.send(SubscribeRequest {
            request: Some(Inbound::Commit(StreamCommit {
                generation: first.generation,
                offsets: vec![PartitionOffset {
                    partition: mine,
                    offset: 1,
                }],
            })),
        })
        .await
        .expect("queue");
        let ack = loop {
            match responses.message().await {
                Ok(Some(message)) => {
                    if let Some(Event::CommitAck(ack)) = message.event {
                        break ack;
                    }
                }
                Ok(None) => panic!("round {round}: the stream ended"),
                Err(status) => panic!("round {round} (generation {generation}): {status:?}"),
            }
        };
        assert!(
            ack.offsets.is_empty(),
            "round {round}: committed from replaced generation {}: {ack:?}",
            first.generation
        );
        stale_acks += 1;
    }
    assert_eq!(stale_acks, 3);
    drop(tx);
}

/// A member's commit that its coordinator checked just before it lost the controller's
/// leadership (hook `WEFT_TEST_COMMIT_STALL_MS`: the proposal waits 20 s after the check, while
/// a drain moves the controller) is refused, not stored. Before, openraft's "forward to the
/// leader" sent it to the new leader, which applied it after its takeover of the groups,
/// unchecked: a fenced member's offset stored over the new generation's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_checked_by_a_coordinator_that_lost_the_controller_is_refused() {
    use weft_proto::v1::{CommitOffsetsRequest, PartitionOffset};

    let (brokers, boss) = events_cluster(&[("WEFT_TEST_COMMIT_STALL_MS", "20000")], 10).await;
    let at_boss = &brokers[boss - 1].client_addr;
    let (_tx, mut responses) = grpc::subscribe(at_boss, group_start("fenced", "")).await;
    let assignment = grpc::next_assignment(&mut responses, 0).await;
    let member_id = assignment.member_id.clone();
    let channel = grpc::channel(at_boss).await;
    let commit = tokio::spawn({
        let channel = channel.clone();
        let request = CommitOffsetsRequest {
            topic: "events".into(),
            group_id: "fenced".into(),
            member_id,
            generation: assignment.generation,
            offsets: vec![PartitionOffset {
                partition: 0,
                offset: 5,
            }],
            ..CommitOffsetsRequest::default()
        };
        async move { grpc::subscriber(&channel).commit_offsets(request).await }
    });
    // The commit is checked at once and waits; the controller moves meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = brokers[boss - 1].http("POST", "/v1/drain", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("controller -> node"), "{body}");
    assert!(
        !commit.is_finished(),
        "the drain took longer than the commit's stall: the test proves nothing"
    );
    let outcome = commit.await.expect("commit task");
    let other = &brokers[boss % 3];
    let committed = weft_tests::offsets(&other.client_addr, "events", 0, Some("fenced"))
        .await
        .expect("offsets")
        .committed_offset;
    // (UNAVAILABLE from the old coordinator, or STALE_GENERATION where a retry reached the
    // new one.)
    let status = outcome.expect_err("a commit checked under the old coordinator is refused");
    eprintln!("refused: {status:?}");
    assert_eq!(committed, None, "nothing was committed");
}

/// The group coordinator (the controller's leader) cut off from the other brokers stops
/// coordinating within about two election timeouts: its members' streams end, so their clients
/// join again through brokers that reach the new coordinator. Before, openraft kept the
/// isolated leader believing it led, and it went on handing out assignments while the other
/// side elected a new coordinator for the same groups (two members got the same partitions).
/// A member on another broker, linked to the cut-off coordinator, has its stream ended as
/// soon as its broker learns of the new controller leader (the coordinator changed), not only
/// once its link's connection to the cut-off broker gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_cut_off_from_the_cluster_stops_coordinating() {
    let brokers = start_cluster(3);
    let client = brokers[0].client().await;
    client.admin().create_topic("iso", 2).await.expect("create");
    let boss = coordinator(&brokers[0]).await as usize;
    let on_boss = &brokers[boss - 1];
    let (_requests, mut responses) = grpc::subscribe(
        &on_boss.client_addr,
        weft_proto::v1::SubscribeStart {
            topic: "iso".into(),
            group_id: "isolated".into(),
            session_timeout_ms: 60_000,
            credit: Some(weft_proto::v1::Credit {
                records: 1000,
                bytes: 1 << 20,
            }),
            ..Default::default()
        },
    )
    .await;
    let first = grpc::next_assignment(&mut responses, 1).await;
    assert_eq!(first.partitions.len(), 2, "{first:?}");
    let elsewhere = brokers
        .iter()
        .find(|b| b.peer_addr != on_boss.peer_addr)
        .expect("another broker");
    let (_other_requests, mut other_responses) = grpc::subscribe(
        &elsewhere.client_addr,
        weft_proto::v1::SubscribeStart {
            topic: "iso".into(),
            group_id: "isolated".into(),
            session_timeout_ms: 60_000,
            credit: Some(weft_proto::v1::Credit {
                records: 1000,
                bytes: 1 << 20,
            }),
            ..Default::default()
        },
    )
    .await;
    let second = grpc::next_assignment(&mut other_responses, first.generation + 1).await;
    assert_eq!(second.partitions.len(), 1, "{second:?}");

    let mut firewall = weft_tests::Firewall::new();
    let ip = |address: &str| address.rsplit_once(':').expect("ip:port").0.to_string();
    firewall.drop_tcp(None, &on_boss.peer_addr);
    for other in brokers.iter().filter(|b| b.peer_addr != on_boss.peer_addr) {
        firewall.drop_tcp(Some(&ip(&on_boss.peer_addr)), &other.peer_addr);
    }
    let cut = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(15), stream_end(&mut responses))
        .await
        .expect("the cut-off coordinator's member stream ends");
    eprintln!("the member's stream ended: {ended:?}");
    let other_ended =
        tokio::time::timeout(Duration::from_secs(12), stream_end(&mut other_responses))
            .await
            .expect("the stream of the member on another broker ends");
    let other_after = cut.elapsed();
    eprintln!("the other member's stream ended {other_after:?} after the cut: {other_ended:?}");
    // Its broker hears of the new controller leader within about an election.
    assert!(
        other_after < Duration::from_secs(6),
        "the other member's stream ended {other_after:?} after the cut"
    );
    assert!(
        on_boss
            .log()
            .contains("no longer coordinating the consumer groups"),
        "{}",
        on_boss.log()
    );
    firewall.heal();
}

/// Reads a Subscribe stream until it ends: None when it closed, the status when it failed.
async fn stream_end(
    responses: &mut tonic::Streaming<weft_proto::v1::SubscribeResponse>,
) -> Option<tonic::Status> {
    loop {
        match responses.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return None,
            Err(status) => return Some(status),
        }
    }
}

/// A commit forwarded to a broker that has not applied the topic's creation yet (its
/// controller log cut off from the controller's leader for a moment; the group's coordinator
/// had moved there, say, when the forwarding broker sent it) is not refused as naming an
/// unknown topic: the broker catches up with the controller first, finds the topic the
/// forwarding broker named by id, and answers as it answers any commit that reaches a broker
/// not coordinating the groups (UNAVAILABLE, naming the coordinator: the forwarding broker
/// tries again there). Before, it answered NOT_FOUND at once, although the topic existed, and
/// the member's commit failed for good. The calls are made as a forwarding broker makes them,
/// on the peer port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_forwarded_to_a_broker_behind_on_the_topic_waits_for_it() {
    use weft_proto::internal::v1 as internal;
    use weft_proto::v1::{CommitOffsetsRequest, PartitionOffset};
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    // Long elections: the broker cut off below does not stand while it is.
    std::fs::write(&config, "raft_election_timeout_ms = 6000\n").expect("config");
    let config = config.to_string_lossy().into_owned();
    let brokers = weft_tests::start_cluster_with(3, &["--config", &config]);
    let (status, body) = brokers[0].http("GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    let leader = view["controller_id"].as_u64().expect("controller_id") as usize - 1;
    let behind = (leader + 1) % 3;
    let forwarder = (leader + 2) % 3;
    let ip = |address: &str| address.rsplit_once(':').expect("ip:port").0.to_string();
    let mut firewall = weft_tests::Firewall::new();
    firewall.drop_tcp(
        Some(&ip(&brokers[leader].peer_addr)),
        &brokers[behind].peer_addr,
    );

    let (status, body) = brokers[leader].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"late","partitions":1,"replication_factor":3}"#),
    );
    assert_eq!(status, 201, "{body}");
    let created: serde_json::Value = serde_json::from_str(&body).expect("json");
    let topic_id = created["topic_id"].as_str().expect("topic id").to_string();
    let forwarded = |to: usize| {
        let mut request = tonic::Request::new(internal::ForwardCommitOffsetsRequest {
            request: Some(CommitOffsetsRequest {
                group_id: "lg".into(),
                topic: "late".into(),
                offsets: vec![PartitionOffset {
                    partition: 0,
                    offset: 0,
                }],
                ..CommitOffsetsRequest::default()
            }),
            hops: 1,
            from_node_id: forwarder as u64 + 1,
            topic_id: topic_id.clone(),
        });
        request
            .metadata_mut()
            .insert("weft-cluster", "weft".parse().expect("ascii"));
        request.metadata_mut().insert(
            "weft-target-node",
            (to + 1).to_string().parse().expect("ascii"),
        );
        request.set_timeout(Duration::from_secs(25));
        request
    };
    let channel = grpc::channel(&brokers[behind].peer_addr).await;
    let mut forward = internal::forward_client::ForwardClient::new(channel);
    let request = forwarded(behind);
    let call = tokio::spawn(async move { forward.commit_offsets(request).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !call.is_finished(),
        "answered before it could know the topic: {:?}",
        call.await
    );
    firewall.heal();
    let answer = call
        .await
        .expect("no panic")
        .expect_err("the broker behind does not coordinate the groups");
    assert_eq!(answer.code(), tonic::Code::Unavailable, "{answer:?}");
    assert!(
        answer.message().contains("not the group coordinator"),
        "{answer:?}"
    );
    // At the coordinator, the same call commits.
    let channel = grpc::channel(&brokers[leader].peer_addr).await;
    let committed = internal::forward_client::ForwardClient::new(channel)
        .commit_offsets(forwarded(leader))
        .await
        .expect("the commit at the coordinator")
        .into_inner();
    assert_eq!(
        committed.offsets,
        [PartitionOffset {
            partition: 0,
            offset: 0
        }]
    );
    let (status, body) = brokers[behind].http("GET", "/v1/groups/lg", None);
    assert_eq!(status, 200, "{body}");
    let group: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(group["partitions"][0]["committed_offset"], 0, "{body}");
}

/// A member connected through a broker whose default session timeout (10 s) is longer than the
/// coordinator's (700 ms) is held to the coordinator's: its assignment says so, its client and
/// its broker's link heartbeat often enough for it, and an idle member keeps its id and its
/// generation. Before, the member was told its own broker's default, both heartbeated every
/// second, and the coordinator expired it again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_is_held_to_its_coordinators_default_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |ms: u32| {
        let path = dir.path().join(format!("session-{ms}.toml"));
        std::fs::write(&path, format!("session_timeout_ms = {ms}\n")).expect("config");
        path.to_str().expect("utf-8").to_string()
    };
    let (short, long) = (config(700), config(10_000));
    let brokers = weft_tests::start_cluster_each(
        3,
        |i| {
            let file = if i == 0 { &short } else { &long };
            vec!["--config".into(), file.clone()]
        },
        &[],
    );
    // Node 1 (700 ms) coordinates: the others are drained until the controller moves there.
    for _ in 0..2 {
        let c = coordinator(&brokers[0]).await;
        if c == 1 {
            break;
        }
        let (status, body) = brokers[c as usize - 1].http("POST", "/v1/drain", None);
        assert_eq!(status, 200, "{body}");
        wait_for(
            "the controller to move",
            Duration::from_secs(30),
            || async {
                let now = coordinator(&brokers[0]).await;
                (now != c).then_some(())
            },
        )
        .await;
    }
    assert_eq!(coordinator(&brokers[0]).await, 1, "node 1 coordinates");
    let client = brokers[1].client().await;
    client
        .admin()
        .create_topic("idle", 1)
        .await
        .expect("create");
    // Through node 2 (10 s default), asking for no session timeout.
    let member = client
        .consumer(ConsumerConfig::new("idle").group("g"))
        .await
        .expect("join");
    weft_tests::stays_idle_for_4_s(member).await;
}

/// A group's offsets cannot be deleted (or reset) through a coordinator that has just taken
/// the groups over while its members are still on their way back to it: the new coordinator
/// does not know them yet, and it answers UNAVAILABLE (try again) instead of deleting the
/// offsets of a group whose live member then starts over from the end. Once the member is
/// back, the delete is refused as for any group with members (409, GROUP_NOT_EMPTY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_cannot_be_deleted_while_its_members_rejoin_a_new_coordinator() {
    let (mut brokers, boss) = events_cluster(&[], 20).await;
    let a = (0..3).find(|&i| i + 1 != boss).expect("a survivor");
    let mut m = member(&brokers[a]).await;
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got < 10 {
        assert!(tokio::time::Instant::now() < deadline, "got {got} records");
        if m.next_timeout(Duration::from_millis(100))
            .await
            .expect("next")
            .is_some()
        {
            got += 1;
        }
    }
    m.commit().await.expect("commit");
    let (status, body) = brokers[a].http("DELETE", "/v1/groups/g", None);
    assert_eq!(status, 409, "a group with a member: {body}");

    // The coordinator dies while the member's application is busy (it does not poll).
    brokers[boss - 1].kill9();
    let new_boss = wait_for("a new coordinator", Duration::from_secs(30), || {
        let client = Client::connect([brokers[a].client_addr.as_str()]);
        async move {
            let status = client.await.ok()?.admin().cluster_status().await.ok()?;
            (status.controller_id != 0 && status.controller_id as usize != boss)
                .then_some(status.controller_id as usize)
        }
    })
    .await;
    // For a few seconds (well within the broker's default session of 10 s), every delete is
    // turned away: none deletes the offsets.
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut answers = BTreeMap::new();
    while tokio::time::Instant::now() < until {
        let (status, body) = brokers[new_boss - 1].http("DELETE", "/v1/groups/g", None);
        assert_ne!(status, 204, "deleted while its member was away: {body}");
        assert!(status == 503 || status == 409, "answered {status}: {body}");
        *answers.entry(status).or_insert(0) += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("answers while the member was away: {answers:?}");

    // The member comes back: the delete is refused for its being there, and it goes on from
    // its committed offsets.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let _ = m.next_timeout(Duration::from_millis(100)).await;
        let (status, body) = brokers[new_boss - 1].http("DELETE", "/v1/groups/g", None);
        assert_ne!(status, 204, "deleted while its member was back: {body}");
        if status == 409 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {status}: {body}"
        );
    }
    let group = brokers[new_boss - 1]
        .client()
        .await
        .admin()
        .group("g")
        .await
        .expect("describe");
    let committed: u64 = group.partitions.iter().map(|p| p.committed_offset).sum();
    assert_eq!(committed, 10, "the commit was kept: {group:?}");
}

/// A group's lag is the same through every broker, also for partitions whose only replica is
/// on another broker than the group's coordinator: before, the coordinator took a partition it
/// did not hold for one whose high watermark was the committed offset (lag 0, high watermark 0
/// shown for two of three partitions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_lag_counts_partitions_held_by_other_brokers() {
    let brokers = start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"lag","partitions":3,"replication_factor":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    publish_to(&brokers[0].client_addr, "lag", 3, 10).await;
    brokers[0]
        .client()
        .await
        .admin()
        .commit_offsets("g", "lag", &[(0, 0), (1, 0), (2, 0)])
        .await
        .expect("commit");
    for broker in &brokers {
        let (status, body) = broker.http("GET", "/v1/groups/g", None);
        assert_eq!(status, 200, "{body}");
        let view: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(view["lag"], 30, "{body}");
        let partitions = view["partitions"].as_array().expect("partitions");
        assert_eq!(partitions.len(), 3, "{body}");
        for p in partitions {
            assert_eq!(p["high_watermark"], 10, "{body}");
            assert_eq!(p["lag"], 10, "{body}");
        }
    }
}

/// A group whose partition cannot be read right now (here: the only replica of the partition
/// it committed on is down) is still described and listed, that partition's lag marked
/// unknown with the reason: before, `GET /v1/groups` answered 200 without the group (as if it
/// did not exist), and then, with lags read from other brokers, 503 for every group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_partition_cannot_be_read_is_listed_with_its_lag_unknown() {
    let mut brokers = start_cluster(3);
    let (status, body) = brokers[0].http(
        "POST",
        "/v1/topics",
        Some(r#"{"name":"one","partitions":3,"replication_factor":1}"#),
    );
    assert_eq!(status, 201, "{body}");
    let boss = coordinator(&brokers[0]).await;
    // A partition whose only replica is on a broker that does not coordinate the groups.
    let topic = brokers[0]
        .client()
        .await
        .admin()
        .partitions("one")
        .await
        .expect("partitions");
    let (partition, holder) = topic
        .iter()
        .find_map(|p| {
            let holder = *p.replicas.first()?;
            (holder != boss).then_some((p.partition, holder))
        })
        .expect("a partition held away from the coordinator");
    brokers[0]
        .client()
        .await
        .admin()
        .commit_offsets("g", "one", &[(partition, 0)])
        .await
        .expect("commit");
    let survivor = boss as usize - 1;
    let (status, body) = brokers[survivor].http("GET", "/v1/groups", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"group_id\":\"g\""), "{body}");

    brokers[holder as usize - 1].kill9();
    for path in ["/v1/groups", "/v1/groups/g"] {
        let (status, body) = brokers[survivor].http("GET", path, None);
        assert_eq!(status, 200, "{path}: {body}");
        let view: serde_json::Value = serde_json::from_str(&body).expect("json");
        let group = if path == "/v1/groups" {
            view.as_array()
                .and_then(|groups| groups.iter().find(|g| g["group_id"] == "g"))
                .unwrap_or_else(|| panic!("g listed: {body}"))
                .clone()
        } else {
            view
        };
        let p = &group["partitions"][0];
        assert_eq!(p["partition"], partition, "{body}");
        assert!(
            p["unavailable"].as_str().is_some_and(|why| !why.is_empty()),
            "{path}: its lag is marked unknown: {body}"
        );
        assert_eq!(group["lag"], 0, "{body}");
    }
}
