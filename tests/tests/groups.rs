//! Consumer groups: 3 members over 6 partitions each get a share, every record goes to exactly one
//! member; when one leaves, its partitions move with no record lost and no commit going back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use weft_client::{Client, Consumer, ConsumerConfig, ProducerConfig, Record, StartFrom};
use weft_tests::{Broker, ok_stdout};

async fn publish(client: &Client, from: usize, to: usize) {
    let producer = client.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    for i in from..to {
        acks.push(
            producer
                .send_nowait("work", Record::new(format!("job-{i}")).key(format!("k{i}")))
                .await
                .expect("queued"),
        );
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    producer.close().await.expect("close");
}

/// A client of `broker` and a topic "work" of `partitions` partitions on it.
async fn work_topic(broker: &Broker, partitions: u32) -> Client {
    let client = broker.client().await;
    client
        .admin()
        .create_topic("work", partitions)
        .await
        .expect("create");
    client
}

async fn committed(client: &Client) -> BTreeMap<u32, u64> {
    committed_of(client, "g").await
}

/// `group`'s committed offsets on "work", by partition (0 where none).
async fn committed_of(client: &Client, group: &str) -> BTreeMap<u32, u64> {
    client
        .admin()
        .offsets("work", Some(group))
        .await
        .expect("offsets")
        .into_iter()
        .map(|p| (p.partition, p.committed_offset.unwrap_or(0)))
        .collect()
}

/// Topic "work" with two partitions of ten records each (`job-0`, `job-2`... in partition 0),
/// and the config of a member of group "g" reading it from the start, committing by hand.
async fn two_partitions_of_ten(client: &Client) -> ConsumerConfig {
    client
        .admin()
        .create_topic("work", 2)
        .await
        .expect("create");
    let producer = client.producer(ProducerConfig::default());
    for i in 0..20u32 {
        producer
            .send("work", Record::new(format!("job-{i}")).partition(i % 2))
            .await
            .expect("stored");
    }
    producer.close().await.expect("close");
    ConsumerConfig::new("work")
        .group("g")
        .start(StartFrom::Earliest)
        .auto_commit(false)
}

/// Commits `member`'s positions (which also reads its stream) until its generation is one
/// that `wanted` accepts, within 30 s; commits refused as naming a replaced generation are
/// expected meanwhile.
async fn commit_until_generation(member: &mut Consumer, wanted: impl Fn(u64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match member.commit().await {
            Ok(()) if wanted(member.generation()) => return,
            Ok(()) => {}
            Err(e) => assert_eq!(e.reason(), "STALE_GENERATION", "{e}"),
        }
        assert!(
            Instant::now() < deadline,
            "the member never saw the generation awaited (at {})",
            member.generation()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Takes `member`'s next records, which must be those of `partition` from offset `from` to
/// its end (offset 9), in order.
async fn read_to_ten(member: &mut Consumer, partition: u32, from: u64) {
    for next in from..10 {
        let message = member
            .next_timeout(Duration::from_secs(10))
            .await
            .expect("next")
            .unwrap_or_else(|| panic!("record {next} of partition {partition} never came"));
        assert_eq!((message.partition, message.offset), (partition, next));
    }
}

/// Reads from every member in turn until `total` records were seen overall (bounded in time).
async fn drain(members: &mut [Consumer], seen: &mut HashMap<String, usize>, total: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < total {
        assert!(
            Instant::now() < deadline,
            "only {} of {total} records consumed within 60 s",
            seen.len()
        );
        for (index, member) in members.iter_mut().enumerate() {
            while let Some(message) = member
                .next_timeout(Duration::from_millis(100))
                .await
                .expect("next")
            {
                let value = String::from_utf8_lossy(&message.value).into_owned();
                assert!(
                    member.assignment().contains(&message.partition),
                    "member {index} got a record of partition {} it does not own",
                    message.partition
                );
                if let Some(previous) = seen.insert(value.clone(), index) {
                    panic!("{value} delivered to member {previous} and again to member {index}");
                }
            }
            member.commit().await.expect("commit");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_partitions_and_take_over_from_a_leaver() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("work", 6)
        .await
        .expect("create");

    let config = ConsumerConfig::new("work")
        .group("g")
        .start(StartFrom::Earliest)
        .auto_commit(false);
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(client.consumer(config.clone()).await.expect("join"));
    }
    // Wait until every member has the final (3-member) assignment: 2 partitions each.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for m in members.iter_mut() {
            let _ = m
                .next_timeout(Duration::from_millis(50))
                .await
                .expect("next");
        }
        let sizes: Vec<usize> = members.iter().map(|m| m.assignment().len()).collect();
        if sizes == [2, 2, 2] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "assignments never settled: {sizes:?}"
        );
    }
    let mut owned = HashSet::new();
    for m in &members {
        for p in m.assignment() {
            assert!(owned.insert(p), "partition {p} assigned twice");
        }
    }
    assert_eq!(owned.len(), 6);

    publish(&client, 0, 600).await;
    let mut seen = HashMap::new();
    drain(&mut members, &mut seen, 600).await;
    let counts: Vec<usize> = (0..3)
        .map(|i| seen.values().filter(|&&m| m == i).count())
        .collect();
    assert!(
        counts.iter().all(|&c| c > 0),
        "every member got a share: {counts:?}"
    );
    let before = committed(&client).await;
    assert_eq!(before.values().sum::<u64>(), 600, "all 600 committed");

    // One member leaves; its partitions move to the other two.
    let leaver = members.pop().expect("three members");
    let leaver_partitions = leaver.assignment();
    leaver.close().await.expect("leave");
    publish(&client, 600, 900).await;
    drain(&mut members, &mut seen, 900).await;
    let after: HashSet<u32> = members.iter().flat_map(|m| m.assignment()).collect();
    assert_eq!(
        after.len(),
        6,
        "the two remaining members own all partitions"
    );
    for p in leaver_partitions {
        assert!(after.contains(&p));
    }
    assert_eq!(seen.len(), 900, "no record lost");
    let final_commits = committed(&client).await;
    for (partition, offset) in &final_commits {
        assert!(
            *offset >= before[partition],
            "commit of partition {partition} went back: {} -> {offset}",
            before[partition]
        );
    }
    assert_eq!(final_commits.values().sum::<u64>(), 900);

    // A commit from the stale generation is refused.
    let stale = client
        .admin()
        .commit_offsets("g", "work", &[(0, 1)])
        .await
        .expect_err("a commit from outside a live group is refused");
    assert_eq!(stale.reason(), "STALE_GENERATION");
    for m in members {
        m.close().await.expect("close");
    }
}

/// A commit sent over a member's stream from a generation that a rebalance has since replaced
/// (it crossed the new assignment on the way) is refused without ending the stream: an
/// acknowledgement with no offsets. The next commit, at the new generation, is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_commit_from_a_replaced_generation_is_refused_and_the_stream_goes_on() {
    use weft_proto::v1::subscribe_request::Request as Inbound;
    use weft_proto::v1::*;
    use weft_tests::{grpc, within};
    let limit = Duration::from_secs(20);
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("work", 2)
        .await
        .expect("create");
    publish(&client, 0, 20).await;

    let (tx, mut responses) = grpc::subscribe(
        &broker.client_addr,
        SubscribeStart {
            topic: "work".into(),
            group_id: "g".into(),
            // (From "latest", the group's start would be stored as its commit, 10, and the
            // commit of 1 below refused as going backwards.)
            start: Some(StartPosition {
                position: Some(start_position::Position::Earliest(
                    start_position::Earliest {},
                )),
            }),
            credit: Some(Credit {
                records: 1000,
                bytes: 1 << 20,
            }),
            ..SubscribeStart::default()
        },
    )
    .await;
    let first = within(
        "the first assignment",
        limit,
        grpc::next_assignment(&mut responses, 0),
    )
    .await
    .generation;
    // A second member: the group rebalances, this stream gets the new generation.
    let _other = client
        .consumer(ConsumerConfig::new("work").group("g"))
        .await
        .expect("second member");
    let assignment = within(
        "the new assignment",
        limit,
        grpc::next_assignment(&mut responses, first + 1),
    )
    .await;
    let second = assignment.generation;
    let mine = assignment
        .partitions
        .first()
        .expect("a partition")
        .partition;
    let commit = |generation| SubscribeRequest {
        request: Some(Inbound::Commit(StreamCommit {
            generation,
            offsets: vec![PartitionOffset {
                partition: mine,
                offset: 1,
            }],
        })),
    };
    tx.send(commit(first)).await.expect("stale commit");
    let refused = within("the refusal", limit, grpc::next_commit_ack(&mut responses)).await;
    assert_eq!(refused.generation, first);
    assert!(refused.offsets.is_empty(), "nothing committed: {refused:?}");
    tx.send(commit(second)).await.expect("current commit");
    let stored = within(
        "the acknowledgement",
        limit,
        grpc::next_commit_ack(&mut responses),
    )
    .await;
    assert_eq!(
        stored.offsets,
        vec![PartitionOffset {
            partition: mine,
            offset: 1
        }]
    );
    assert_eq!(committed(&client).await.get(&mine), Some(&1));
}

/// Partitions added to a topic go to its live group at once: the member gets them in a new
/// assignment on the same stream (which waits a moment for them to open) and reads what is
/// published there. Before, the group kept the count it had
/// when its members joined, and the new partitions belonged to nobody until a member joined
/// again (a stream rotates after 15 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_to_a_topic_go_to_its_live_group() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("grow", 2)
        .await
        .expect("create");
    let mut member = client
        .consumer(
            ConsumerConfig::new("grow")
                .group("g")
                .start(StartFrom::Earliest),
        )
        .await
        .expect("join");
    let producer = client.producer(ProducerConfig::default());
    producer
        .send("grow", Record::new("before").partition(0))
        .await
        .expect("stored");
    let first = member
        .next_timeout(Duration::from_secs(20))
        .await
        .expect("next")
        .expect("a record");
    assert_eq!(first.partition, 0);
    let (status, body) = broker.http("PATCH", "/v1/topics/grow", Some(r#"{"partitions":4}"#));
    assert_eq!(status, 200, "{body}");
    producer
        .send("grow", Record::new("after").partition(3))
        .await
        .expect("stored in a new partition");
    producer.close().await.expect("close");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            Instant::now() < deadline,
            "the record in partition 3 was not delivered within 20 s: the member owns {:?}",
            member.assignment()
        );
        if let Some(message) = member
            .next_timeout(Duration::from_millis(200))
            .await
            .expect("next")
        {
            // Its stream went on: "before" does not come again (the member committed nothing,
            // so a new stream would start over from the earliest offset).
            assert_eq!(message.partition, 3, "{message:?}");
            assert_eq!(&message.value[..], b"after");
            break;
        }
    }
    member.close().await.expect("leave");
}

/// A member that keeps a partition through a rebalance keeps its own position there: the
/// records the broker had delivered but the application had not taken yet are still to come,
/// so a commit names what was taken, not what was delivered. Before, the new assignment's
/// offsets (the broker's delivery positions) replaced the member's: a commit then covered
/// records never processed (lost if the member died), and the next records taken moved the
/// position back, so the following commit was refused as going backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_partition_keeps_the_members_position_through_a_rebalance() {
    let broker = Broker::start();
    let client = broker.client().await;
    let config = two_partitions_of_ten(&client).await;
    let mut first = client.consumer(config.clone()).await.expect("join");
    assert_eq!(first.assignment(), vec![0, 1]);
    // One record taken: both partitions' ten records were delivered (the credit allows 2,000).
    let taken = first
        .next_timeout(Duration::from_secs(10))
        .await
        .expect("next")
        .expect("a record");
    let mut expected: BTreeMap<u32, u64> = BTreeMap::from([(0, 0), (1, 0)]);
    expected.insert(taken.partition, taken.offset + 1);

    // A second member: the group rebalances and the first keeps one partition.
    let second = client.consumer(config).await.expect("second member");
    let new = second.generation();
    commit_until_generation(&mut first, |g| g == new).await;
    let kept = first.assignment();
    assert_eq!(kept.len(), 1, "one partition each: {kept:?}");
    let kept = kept[0];
    assert_eq!(
        first.positions().get(&kept),
        expected.get(&kept),
        "the position of the kept partition is what the application took"
    );
    assert_eq!(
        committed(&client).await.get(&kept).copied().unwrap_or(0),
        expected[&kept],
        "the commit names only records the application took"
    );

    // The rest of the kept partition follows, in order, and its commit is stored.
    read_to_ten(&mut first, kept, expected[&kept]).await;
    first.commit().await.expect("commit after the rebalance");
    assert_eq!(committed(&client).await.get(&kept), Some(&10));
    first.close().await.expect("close");
    second.close().await.expect("close");
}

/// A member whose stream missed a whole generation (its session busy while the group
/// rebalanced twice: hook `WEFT_TEST_GROUP_CHANGE_DELAY_MS` makes it take a changed view 5 s
/// late) gets back a partition another member held in between, read to its end and committed:
/// it starts there. Before, its session and its client took the partition for one it had kept
/// all along: it went on from its own older position, the other member's records came again,
/// and its next commit was refused as going backwards (INVALID_ARGUMENT, which ends a
/// consumer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_given_back_after_another_member_held_it_starts_at_its_commit() {
    let broker = Broker::start_with_env(&[], &[("WEFT_TEST_GROUP_CHANGE_DELAY_MS", "5000")]);
    let client = broker.client().await;
    given_back_partition_starts_at_its_commit(&client, &client).await;
}

/// The same with three brokers, the member whose stream misses a generation connected to a
/// broker that does not coordinate the group: the partitions' "owned since" generations reach
/// it from the coordinator on another broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_given_back_through_another_broker_starts_at_its_commit() {
    let brokers =
        weft_tests::start_cluster_env(3, &[], &[("WEFT_TEST_GROUP_CHANGE_DELAY_MS", "5000")]);
    let admin = brokers[0].client().await;
    let coordinator = weft_tests::wait_for("a controller leader", Duration::from_secs(30), || {
        let admin = admin.clone();
        async move {
            let status = admin.admin().cluster_status().await.ok()?;
            (status.controller_id != 0).then_some(status.controller_id)
        }
    })
    .await as usize;
    let elsewhere = brokers[coordinator % 3].client().await;
    let at_coordinator = brokers[coordinator - 1].client().await;
    given_back_partition_starts_at_its_commit(&elsewhere, &at_coordinator).await;
}

/// The scenario of the two tests above: topic "work" (2 partitions of 10 records), group "g";
/// the first member joins through `first_client`, the second through `second_client`.
async fn given_back_partition_starts_at_its_commit(first_client: &Client, second_client: &Client) {
    // How late the first member's session takes a changed view (the brokers' hook).
    let delay = Duration::from_millis(5000);
    let config = two_partitions_of_ten(first_client).await;
    // Credit for two records: the first member's session delivers little, so where it got to in
    // the partition it lends stays below what the second member commits there.
    let mut small = config.clone();
    small.credit_records = 2;
    let mut first = first_client.consumer(small).await.expect("join");
    assert_eq!(first.assignment(), vec![0, 1]);
    let taken = first
        .next_timeout(Duration::from_secs(10))
        .await
        .expect("next")
        .expect("a record");

    // A second member joins, reads its partition to the end, commits and leaves, all while the
    // first member's session has not yet taken the generation it joined at.
    let joined = Instant::now();
    let mut second = second_client.consumer(config).await.expect("second member");
    let lent = second.assignment();
    assert_eq!(lent.len(), 1, "one partition each: {lent:?}");
    let lent = lent[0];
    let second_generation = second.generation();
    for offset in 0..10 {
        let message = second
            .next_timeout(Duration::from_secs(10))
            .await
            .expect("next")
            .expect("a record of the second member's partition");
        assert_eq!((message.partition, message.offset), (lent, offset));
    }
    second.commit().await.expect("the second member's commit");
    second.close().await.expect("leave");
    assert_eq!(committed(first_client).await.get(&lent), Some(&10));
    assert!(
        joined.elapsed() < delay,
        "the second member took {:?}, longer than the first member's session waits: the test \
         would not show a missed generation",
        joined.elapsed()
    );

    // The first member's session takes the latest view: both partitions, one of them back.
    commit_until_generation(&mut first, |g| g > second_generation).await;
    assert_eq!(first.assignment(), vec![0, 1]);
    assert_eq!(
        first.positions().get(&lent),
        Some(&10),
        "the partition given back starts at the commit of the member that held it"
    );
    // What follows is the rest of the first member's own partition, and nothing again of the
    // one the second member read.
    let own = 1 - lent;
    let from = if taken.partition == own {
        taken.offset + 1
    } else {
        0
    };
    read_to_ten(&mut first, own, from).await;
    let extra = first
        .next_timeout(Duration::from_millis(1500))
        .await
        .expect("next");
    assert!(
        extra.is_none(),
        "a record read again: {:?}",
        extra.map(|m| (m.partition, m.offset))
    );
    first.commit().await.expect("commit after the rebalance");
    assert_eq!(
        committed(first_client).await,
        BTreeMap::from([(0, 10), (1, 10)])
    );
    first.close().await.expect("close");
}

/// A member whose application takes records slowly stays in its group while its client keeps
/// heartbeating: the broker reads the member's heartbeats while the stream waits for the
/// member to read. Before, a full stream (the HTTP/2 window and the session's queue full of
/// small deliveries, with credit left) held the session in its delivery, and it read nothing
/// from the member: the coordinator expired a live member after its session timeout, and gave
/// its partitions to others while it still processed them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_member_that_keeps_heartbeating_stays_in_its_group() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("slow", 1)
        .await
        .expect("create");
    let session = Duration::from_secs(2);
    let mut member = client
        .consumer(
            ConsumerConfig::new("slow")
                .group("g")
                .start(StartFrom::Earliest)
                .auto_commit(false)
                .session_timeout(session),
        )
        .await
        .expect("join");
    let (id, generation) = (member.member_id().to_string(), member.generation());

    // A steady producer, one 8 KiB record at a time (so each delivery is small), until 3 MiB
    // are stored: more than the stream holds, about 2 MiB (bounded: 30 s).
    let producing = {
        let client = client.clone();
        tokio::spawn(async move {
            let producer = client.producer(ProducerConfig::default());
            let began = Instant::now();
            let mut sent = 0u64;
            while sent * 8192 < 3 << 20 && began.elapsed() < Duration::from_secs(30) {
                producer
                    .send("slow", Record::new(vec![b'x'; 8192]).partition(0))
                    .await
                    .expect("stored");
                sent += 1;
            }
            producer.close().await.expect("close");
            sent
        })
    };
    member
        .next_timeout(Duration::from_secs(10))
        .await
        .expect("next")
        .expect("a record");
    let sent = producing.await.expect("producer");
    assert!(sent * 8192 >= 3 << 20, "only {sent} records stored in 30 s");
    // The application holds on to its record for three session timeouts.
    tokio::time::sleep(session * 3).await;
    let group = client.admin().group("g").await.expect("describe");
    assert_eq!(
        group
            .members
            .iter()
            .map(|m| m.member_id.as_str())
            .collect::<Vec<_>>(),
        vec![id.as_str()],
        "the slow member is still the group's member"
    );
    for _ in 0..100 {
        member
            .next_timeout(Duration::from_secs(10))
            .await
            .expect("next")
            .expect("a record");
    }
    assert_eq!(member.member_id(), id);
    assert_eq!(member.generation(), generation);
    member.close().await.expect("close");
}

/// A member with a short session timeout (700 ms, below the client's default heartbeat
/// interval of 1 s) keeps its membership on an idle topic: the client heartbeats often enough
/// for it. Before, the session expired between two heartbeats, the group rebalanced, and the
/// member rejoined under a new id, again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_session_timeout_keeps_an_idle_member() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("idle", 1)
        .await
        .expect("create");
    let member = client
        .consumer(
            ConsumerConfig::new("idle")
                .group("g")
                .session_timeout(Duration::from_millis(700)),
        )
        .await
        .expect("join");
    weft_tests::stays_idle_for_4_s(member).await;
}

/// A member that names no session timeout gets the broker's default, here 700 ms (below the
/// client's default heartbeat interval of 1 s): the assignment says it, and the client
/// heartbeats often enough for it. Before, the client beat every second whatever the broker's
/// default, and the member was expired and rejoined under a new id, again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_default_session_timeout_of_the_broker_keeps_an_idle_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "session_timeout_ms = 700\n").expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    let client = broker.client().await;
    client
        .admin()
        .create_topic("idle", 1)
        .await
        .expect("create");
    let member = client
        .consumer(ConsumerConfig::new("idle").group("g"))
        .await
        .expect("join");
    weft_tests::stays_idle_for_4_s(member).await;
}

/// A broker holds at most `groups_max` groups with members and `group_members_max` members
/// per group: one more is refused at once with RESOURCE_EXHAUSTED (LIMIT_REACHED, naming the
/// setting), the client does not retry it, the CLI says it and exits non-zero, and room comes
/// back when a member leaves. Before, groups and members grew without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_past_the_group_limits_are_refused_with_the_setting_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    std::fs::write(&config, "groups_max = 2\ngroup_members_max = 2\n").expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    let client = work_topic(&broker, 2).await;
    let member_of = |group: &str| ConsumerConfig::new("work").group(group);
    let first = client.consumer(member_of("g")).await.expect("first member");
    let second = client
        .consumer(member_of("g"))
        .await
        .expect("second member");
    let refused = |e: weft_client::Error, key: &str| {
        assert_eq!(e.code(), Some(tonic::Code::ResourceExhausted), "{e}");
        assert_eq!(e.reason(), "LIMIT_REACHED", "{e}");
        assert!(!e.is_retriable(), "{e}");
        assert!(e.to_string().contains(key), "{e}");
    };
    let third = client.consumer(member_of("g")).await;
    refused(
        match third {
            Err(e) => e,
            Ok(_) => panic!("a third member is refused"),
        },
        "group_members_max",
    );
    let other = client
        .consumer(member_of("h"))
        .await
        .expect("a second group");
    let third_group = client.consumer(member_of("i")).await;
    refused(
        match third_group {
            Err(e) => e,
            Ok(_) => panic!("a third group is refused"),
        },
        "groups_max",
    );
    let cli = broker.cli(&["consume", "work", "--group", "i", "--count", "1"]);
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(!cli.status.success(), "the CLI fails: {stderr}");
    assert!(
        stderr.contains("groups_max"),
        "the CLI names the setting: {stderr}"
    );
    // A member leaving makes room in its group. (It closes after the group rebalanced under
    // it, its stream unread: before, its closing commit was refused as naming a replaced
    // generation and `close` failed.)
    first.close().await.expect("close");
    let again = client.consumer(member_of("g")).await.expect("room again");
    // A group whose last member left still counts while it keeps committed offsets (its
    // member's closing commit stored some); deleted, it makes room for another.
    other.close().await.expect("close");
    let still = client.consumer(member_of("i")).await;
    refused(
        match still {
            Err(e) => e,
            Ok(_) => panic!("a group with offsets still counts"),
        },
        "groups_max",
    );
    ok_stdout(&broker.cli(&["group", "delete", "h"]));
    let newcomer = client
        .consumer(member_of("i"))
        .await
        .expect("room for a group");
    // Members that did not read their streams since the group rebalanced close cleanly too
    // (their closing commits are refused as naming a replaced generation: not an error).
    for member in [second, again, newcomer] {
        member.close().await.expect("close");
    }
}

/// A group reading from "latest" that never committed on a partition: the first member's
/// start becomes the group's commit at once, so a member given the partition next starts
/// there and gets what was published in between. Before, the next member took "latest"
/// again, later, and the records published while the first member held the partition (it read
/// none of them, or had not committed yet) went to nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_group_moving_a_partition_before_its_first_commit_loses_nothing() {
    let broker = Broker::start();
    let client = work_topic(&broker, 1).await;
    let producer = client.producer(ProducerConfig::default());
    let publish = async |from: u32, to: u32| {
        for i in from..to {
            producer
                .send("work", Record::new(format!("r{i}")))
                .await
                .expect("stored");
        }
    };
    publish(0, 5).await;
    let latest = || {
        ConsumerConfig::new("work")
            .group("g")
            .start(StartFrom::Latest)
            .auto_commit(false)
    };
    let first = client.consumer(latest()).await.expect("first member");
    assert_eq!(first.positions().get(&0), Some(&5));
    // Its start is the group's commit (stored in the background, at once).
    weft_tests::wait_for("the start stored", Duration::from_secs(10), || async {
        (committed_of(&client, "g").await.get(&0) == Some(&5)).then_some(())
    })
    .await;
    publish(5, 10).await;
    // It leaves without reading or committing anything.
    first.close().await.expect("close");
    let mut second = client.consumer(latest()).await.expect("second member");
    let record = second
        .next_timeout(Duration::from_secs(10))
        .await
        .expect("next")
        .expect("a record published while the first member held the partition");
    assert_eq!(record.value.as_ref(), b"r5");
    second.close().await.expect("close");
    producer.close().await.expect("close");
}

/// The start stored for a group reading from "latest" does not hold its member's stream up: with
/// every commit taking 3 s (hook `WEFT_TEST_COMMIT_STALL_MS`), a member with a 1 s session
/// keeps its id and generation and reads what is published. Before (the store awaited in the
/// assignment), the stream read none of its member's heartbeats meanwhile and the member
/// expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_commit_of_the_start_does_not_expire_the_member() {
    let broker = Broker::start_with_env(&[], &[("WEFT_TEST_COMMIT_STALL_MS", "3000")]);
    broker.wait_ready();
    let client = work_topic(&broker, 1).await;
    let mut member = client
        .consumer(
            ConsumerConfig::new("work")
                .group("g")
                .start(StartFrom::Latest)
                .auto_commit(false)
                .session_timeout(Duration::from_secs(1)),
        )
        .await
        .expect("join");
    let (id, generation) = (member.member_id().to_string(), member.generation());
    let producer = client.producer(ProducerConfig::default());
    producer
        .send("work", Record::new("r0"))
        .await
        .expect("stored");
    let began = Instant::now();
    let mut read = Vec::new();
    while began.elapsed() < Duration::from_secs(5) {
        if let Some(m) = member
            .next_timeout(Duration::from_millis(200))
            .await
            .expect("next")
        {
            read.push(m.value.clone());
        }
    }
    assert_eq!(read, [bytes::Bytes::from("r0")]);
    assert_eq!(member.member_id(), id, "the member kept its id");
    assert_eq!(member.generation(), generation, "no rebalance");
    member.close().await.expect("close");
    producer.close().await.expect("close");
}

/// An automatic commit refused because the group rebalanced meanwhile (it named the
/// generation before) is sent again at the next interval under the new one, also while no
/// record comes. Before, it counted as done: on a quiet topic the member's positions stayed
/// uncommitted for as long as it stayed quiet, and a crash or the next rebalance delivered
/// those records again (helper-108).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automatic_commit_refused_by_a_rebalance_is_sent_again() {
    // Member a's session takes the rebalance 3 s late: its automatic commit, due 2 s after
    // it started, names the generation before.
    let broker = Broker::start_with_env(&[], &[("WEFT_TEST_GROUP_CHANGE_DELAY_MS", "3000")]);
    let client = broker.client().await;
    let config = two_partitions_of_ten(&client).await;
    let mut a = client
        .consumer(ConsumerConfig {
            auto_commit: true,
            auto_commit_interval: Duration::from_secs(2),
            ..config.clone()
        })
        .await
        .expect("a joins");
    for _ in 0..20 {
        a.next_timeout(Duration::from_secs(10))
            .await
            .expect("next")
            .expect("a record within 10 s");
    }
    let mut b = client.consumer(config).await.expect("b joins");
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(9) {
        let _ = a.next_timeout(Duration::from_millis(200)).await;
        let _ = b.next_timeout(Duration::from_millis(10)).await;
    }
    let kept = a.assignment();
    assert_eq!(kept.len(), 1, "the partitions are shared: {kept:?}");
    let committed = committed(&client).await;
    assert_eq!(
        committed.get(&kept[0]),
        Some(&10),
        "a committed what it read of the partition it kept: {committed:?}"
    );
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// A member whose own commit over its stream is slow to be stored (the controller's proposal
/// takes 3 s, the member's session 1 s) stays a member: its stream's session keeps it alive
/// while it waits for the commit. Before, the session read none of the member's heartbeats
/// meanwhile, the member expired, its group rebalanced, and its stream ended (helper-109).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_commit_over_the_stream_does_not_expire_the_member() {
    let broker = Broker::start_with_env(&[], &[("WEFT_TEST_COMMIT_STALL_MS", "3000")]);
    broker.wait_ready();
    let client = work_topic(&broker, 1).await;
    let producer = client.producer(ProducerConfig::default());
    producer
        .send("work", Record::new("r0"))
        .await
        .expect("stored");
    let mut member = client
        .consumer(
            ConsumerConfig::new("work")
                .group("g")
                .start(StartFrom::Earliest)
                .auto_commit(false)
                .session_timeout(Duration::from_secs(1)),
        )
        .await
        .expect("join");
    let (id, generation) = (member.member_id().to_string(), member.generation());
    let first = member
        .next_timeout(Duration::from_secs(10))
        .await
        .expect("next")
        .expect("r0 within 10 s");
    assert_eq!(first.value, bytes::Bytes::from("r0"));
    member.commit().await.expect("the commit is stored");
    producer
        .send("work", Record::new("r1"))
        .await
        .expect("stored");
    let next = member
        .next_timeout(Duration::from_secs(10))
        .await
        .expect("next")
        .expect("r1 within 10 s");
    assert_eq!(next.value, bytes::Bytes::from("r1"), "nothing read twice");
    assert_eq!(member.member_id(), id, "the member kept its id");
    assert_eq!(member.generation(), generation, "no rebalance");
    member.close().await.expect("close");
    producer.close().await.expect("close");
}

/// A member that commits over its stream but reads none of the answers (the stream's queue and
/// its HTTP/2 window full of deliveries it does not read) does not hold its session stuck: at
/// 64 acknowledgements waiting the session reads no more of its commits, and the stream still
/// ends at its maximum age while the subscriber reads nothing (the end follows what was
/// queued, once it reads). Before, the session waited for room inside its 65th commit, deaf to
/// its age and to the broker's stop, for as long as the subscriber kept its connection; once
/// the subscriber read again it went on and answered all 100 commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_commits_without_reading_the_answers_is_not_held() {
    use weft_proto::v1::subscribe_request::Request as Inbound;
    use weft_proto::v1::*;
    use weft_tests::{grpc, within};
    let limit = Duration::from_secs(20);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("weft.toml");
    // Streams end at 4 s of age; one that ends waits 1 s for its subscriber to take its last
    // answers.
    std::fs::write(
        &config,
        "stream_age_ms_max = 4000\nrequest_timeout_ms = 1000\n",
    )
    .expect("config");
    let broker = Broker::start_with(&["--config", config.to_str().expect("path")]);
    let client = broker.client().await;
    client
        .admin()
        .create_topic("unread", 1)
        .await
        .expect("create");
    // 8 MiB: more than the windows of the subscriber's connection and the stream's queue.
    let producer = client.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    for _ in 0..128 {
        acks.push(
            producer
                .send_nowait(
                    "unread",
                    weft_client::Record::new(vec![b'x'; 64 * 1024]).partition(0),
                )
                .await
                .expect("queued"),
        );
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    let (tx, mut responses) = grpc::subscribe(
        &broker.client_addr,
        SubscribeStart {
            topic: "unread".into(),
            group_id: "g".into(),
            start: Some(StartPosition {
                position: Some(start_position::Position::Earliest(
                    start_position::Earliest {},
                )),
            }),
            credit: Some(Credit {
                records: 100_000,
                bytes: 64 << 20,
            }),
            ..SubscribeStart::default()
        },
    )
    .await;
    let generation = within(
        "the assignment",
        limit,
        grpc::next_assignment(&mut responses, 0),
    )
    .await
    .generation;
    // Nothing read from here on: the broker fills the windows and the queue.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for offset in 1..=100u64 {
        let commit = SubscribeRequest {
            request: Some(Inbound::Commit(StreamCommit {
                generation,
                offsets: vec![PartitionOffset {
                    partition: 0,
                    offset,
                }],
            })),
        };
        within("a commit sent", limit, tx.send(commit))
            .await
            .expect("sent");
    }
    // The session takes commits until 64 answers wait, then no more.
    let committed = || async {
        weft_tests::offsets(&broker.client_addr, "unread", 0, Some("g"))
            .await
            .expect("offsets")
            .committed_offset
            .unwrap_or(0)
    };
    weft_tests::wait_for("64 commits stored", limit, || async {
        (committed().await >= 64).then_some(())
    })
    .await;
    // The stream reaches its age meanwhile, and ends without waiting for the subscriber...
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stored = committed().await;
    assert!(
        stored < 100,
        "the session read every commit ({stored}) although none of its answers was read"
    );
    // ...which reads what was queued, then the end.
    let mut answered = 0;
    let ended = within("the stream's end", Duration::from_secs(30), async {
        loop {
            match responses.message().await {
                Ok(Some(SubscribeResponse {
                    event: Some(subscribe_response::Event::CommitAck(_)),
                })) => answered += 1,
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without saying why"),
                Err(status) => return status,
            }
        }
    })
    .await;
    assert_eq!(
        ended.code(),
        tonic::Code::Unavailable,
        "{ended:?} after {answered} acknowledgements"
    );
    assert!(
        ended.message().contains("maximum age"),
        "the stream ended at its age, unread: {ended:?}"
    );
    assert!(
        answered < 100,
        "{answered} of the 100 commits were answered: the session went on"
    );
    assert_eq!(
        committed().await,
        stored,
        "no commit taken after the stream's end"
    );
    drop(tx);
}

/// Auto-commit commits what the application was handed once the interval is up, even when no
/// record comes after it. Before, only the next record's arrival did: a topic gone quiet kept
/// the last records uncommitted for as long as it stayed quiet, and the next owner of the
/// partition (after a crash, a rebalance) was handed them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_commit_commits_what_was_read_while_the_topic_is_quiet() {
    let broker = Broker::start();
    let client = broker.client().await;
    client
        .admin()
        .create_topic("quiet", 1)
        .await
        .expect("create");
    let producer = client.producer(ProducerConfig::default());
    for i in 0..10 {
        producer
            .send("quiet", Record::new(format!("r{i}")))
            .await
            .expect("stored");
    }
    let mut consumer = client
        .consumer(ConsumerConfig {
            auto_commit_interval: Duration::from_millis(200),
            ..ConsumerConfig::new("quiet")
                .group("quiet-group")
                .start(StartFrom::Earliest)
        })
        .await
        .expect("consumer");
    for _ in 0..10 {
        consumer
            .next_timeout(Duration::from_secs(10))
            .await
            .expect("next")
            .expect("a record");
    }
    // The application asks for more; none comes.
    assert!(
        consumer
            .next_timeout(Duration::from_secs(2))
            .await
            .expect("next")
            .is_none()
    );
    let committed = weft_tests::offsets(&broker.client_addr, "quiet", 0, Some("quiet-group"))
        .await
        .expect("offsets")
        .committed_offset;
    assert_eq!(committed, Some(10));
    drop(consumer);
}

/// A member that resumes its stream from an offset past the end of the log (raw gRPC: the
/// `resume` of its Subscribe start) and commits that offset over the stream: the commit is
/// checked against the high watermark, as a unary commit is, and refused. Before, only offsets
/// past the stream's position were checked, and a position it started from was taken for one
/// it had delivered: the offset was stored, the group's later owners started past the end of
/// the log (skipping every record up to it), and their commits were refused as going backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_commit_of_a_resumed_offset_past_the_log_is_refused() {
    use weft_proto::v1::{
        Credit, PartitionOffset, StreamCommit, SubscribeRequest, SubscribeStart, subscribe_request,
        subscribe_response,
    };
    let broker = Broker::start();
    weft_tests::ok_stdout(&broker.cli(&["topic", "create", "resumed", "--partitions", "1"]));
    weft_tests::ok_stdout(&broker.cli(&["produce", "resumed", "a", "b", "c"]));
    let (tx, mut responses) = weft_tests::grpc::subscribe(
        &broker.client_addr,
        SubscribeStart {
            topic: "resumed".into(),
            group_id: "rg".into(),
            resume: vec![PartitionOffset {
                partition: 0,
                offset: 1_000_000,
            }],
            credit: Some(Credit {
                records: 100,
                bytes: 1 << 20,
            }),
            session_timeout_ms: 60_000,
            ..SubscribeStart::default()
        },
    )
    .await;
    let assigned = tokio::time::timeout(
        Duration::from_secs(30),
        weft_tests::grpc::next_assignment(&mut responses, 1),
    )
    .await
    .expect("an assignment within 30 s");
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Commit(StreamCommit {
            generation: assigned.generation,
            offsets: vec![PartitionOffset {
                partition: 0,
                offset: 1_000_000,
            }],
        })),
    })
    .await
    .expect("queue the commit");
    let answer = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match responses.message().await {
                Ok(Some(m)) => {
                    if let Some(subscribe_response::Event::CommitAck(ack)) = m.event {
                        return Ok(ack);
                    }
                }
                Ok(None) => panic!("the stream ended without an answer"),
                Err(status) => return Err(status),
            }
        }
    })
    .await
    .expect("an answer within 30 s");
    match answer {
        Ok(ack) => panic!("an offset past the log was committed: {ack:?}"),
        Err(status) => assert!(status.message().contains("high watermark"), "{status:?}"),
    }
    drop(tx);
    let committed = weft_tests::offsets(&broker.client_addr, "resumed", 0, Some("rg"))
        .await
        .expect("offsets");
    assert_eq!(committed.committed_offset, None, "{committed:?}");
}
