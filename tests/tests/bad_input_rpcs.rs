//! Bad input for every RPC, table by table: each malformed or hostile request gets its documented
//! status with details (a reason in ErrorInfo, or the offending field in BadRequest), the broker
//! stays healthy, and no data changes.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_types::StatusExt;
use weft_proto::v1::cluster_client::ClusterClient;
use weft_proto::v1::publish_request::Target;
use weft_proto::v1::start_position::Position;
use weft_proto::v1::subscribe_request::Request as Inbound;
use weft_proto::v1::subscribe_response::Event;
use weft_proto::v1::*;
use weft_tests::{Broker, grpc};

/// What a refusal must carry besides its code.
#[derive(Debug, Clone, Copy)]
enum Detail {
    /// ErrorInfo with this reason.
    Reason(&'static str),
    /// A BadRequest field violation naming this field.
    Field(&'static str),
}

fn check(case: &str, result: Result<(), tonic::Status>, code: Code, detail: Detail) {
    let status = match result {
        Ok(()) => panic!("{case}: accepted, expected {code:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), code, "{case}: {status:?}");
    assert!(
        !status.message().is_empty() && status.message().len() < 1024,
        "{case}: a short message: {status:?}"
    );
    match detail {
        Detail::Reason(reason) => assert_eq!(
            status
                .get_details_error_info()
                .unwrap_or_else(|| panic!("{case}: no ErrorInfo: {status:?}"))
                .reason,
            reason,
            "{case}"
        ),
        Detail::Field(field) => {
            let bad = status
                .get_details_bad_request()
                .unwrap_or_else(|| panic!("{case}: no BadRequest: {status:?}"));
            assert!(
                bad.field_violations.iter().any(|v| v.field == field),
                "{case}: no violation of {field}: {:?}",
                bad.field_violations
            );
        }
    }
}

/// Everything a bad request must not change: topics with their configs, partition bounds,
/// committed offsets of group "g".
async fn state(address: &str) -> String {
    let channel = grpc::channel(address).await;
    let topics = grpc::topic_admin(&channel)
        .list_topics(ListTopicsRequest::default())
        .await
        .expect("list topics")
        .into_inner();
    let mut out = String::new();
    for topic in topics.topics {
        out.push_str(&format!(
            "{} {:?} {}\n",
            topic.name, topic.config, topic.topic_id
        ));
        let offsets = grpc::subscriber(&channel)
            .get_offsets(GetOffsetsRequest {
                topic: topic.name.clone(),
                group_id: "g".into(),
                ..GetOffsetsRequest::default()
            })
            .await
            .expect("offsets")
            .into_inner();
        for p in offsets.partitions {
            out.push_str(&format!(
                "  {} {} {} {:?}\n",
                p.partition, p.log_start_offset, p.high_watermark, p.committed_offset
            ));
        }
    }
    out
}

/// A broker with topic "t" (2 partitions, 10 records in partition 0) and group "g" that
/// committed offset 5 of partition 0.
async fn prepared() -> (Broker, String) {
    let broker = Broker::start();
    let client = broker.client().await;
    client.admin().create_topic("t", 2).await.expect("create");
    let producer = client.producer(weft_client::ProducerConfig::default());
    for i in 0..10 {
        producer
            .send("t", weft_client::Record::new(format!("r{i}")).partition(0))
            .await
            .expect("stored");
    }
    producer.close().await.expect("close");
    let mut consumer = client
        .consumer(
            weft_client::ConsumerConfig::new("t")
                .group("g")
                .start(weft_client::StartFrom::Earliest)
                .auto_commit(false),
        )
        .await
        .expect("join");
    while consumer.positions().get(&0).copied().unwrap_or(0) < 5 {
        consumer
            .next_timeout(Duration::from_secs(30))
            .await
            .expect("next")
            .expect("a record");
    }
    consumer.commit().await.expect("commit");
    consumer.close().await.expect("leave");
    let address = broker.client_addr.clone();
    (broker, address)
}

/// The broker still serves: a publish is stored and reads back.
async fn still_healthy(address: &str) {
    let channel = grpc::channel(address).await;
    let response = grpc::publisher(&channel)
        .publish(PublishRequest {
            topic: "t".into(),
            target: Some(Target::Partition(1)),
            records: vec![Record {
                value: "alive".into(),
                ..Record::default()
            }],
            ..PublishRequest::default()
        })
        .await
        .expect("a publish after the bad requests")
        .into_inner();
    let read = weft_tests::fetch_range(
        address,
        "t",
        1,
        response.base_offset,
        response.base_offset + 1,
    )
    .await;
    assert_eq!(read[0].1.as_ref(), b"alive");
}

fn fetch(topic: &str, partition: u32, offset: u64) -> FetchRequest {
    FetchRequest {
        topic: topic.into(),
        partition,
        offset,
        max_bytes: 1 << 20,
        max_wait_ms: 0,
        min_bytes: 0,
        max_records: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_get_offsets_commit_and_group_calls_refuse_bad_input() {
    let (broker, address) = prepared().await;
    let before = state(&address).await;
    let channel = grpc::channel(&address).await;
    let mut sub = grpc::subscriber(&channel);

    use Detail::*;
    let fetches: Vec<(&str, FetchRequest, Code, Detail)> = vec![
        (
            "fetch: empty topic",
            fetch("", 0, 0),
            Code::InvalidArgument,
            Field("topic"),
        ),
        (
            "fetch: unknown topic",
            fetch("nope", 0, 0),
            Code::NotFound,
            Reason("TOPIC_NOT_FOUND"),
        ),
        (
            "fetch: bad topic name",
            fetch("a b/c", 0, 0),
            Code::InvalidArgument,
            Field("topic"),
        ),
        (
            "fetch: partition out of range",
            fetch("t", 2, 0),
            Code::NotFound,
            Reason("PARTITION_NOT_FOUND"),
        ),
        (
            "fetch: partition u32::MAX",
            fetch("t", u32::MAX, 0),
            Code::NotFound,
            Reason("PARTITION_NOT_FOUND"),
        ),
        (
            "fetch: offset past the end",
            fetch("t", 0, 11),
            Code::OutOfRange,
            Reason("OFFSET_OUT_OF_RANGE"),
        ),
        (
            "fetch: offset u64::MAX",
            fetch("t", 0, u64::MAX),
            Code::OutOfRange,
            Reason("OFFSET_OUT_OF_RANGE"),
        ),
    ];
    for (case, request, code, detail) in fetches {
        check(case, sub.fetch(request).await.map(|_| ()), code, detail);
    }
    // Hostile sizes are capped, not trusted: everything at u32::MAX answers at once with what
    // there is (the wait is capped by fetch_wait_ms_max, the size by the broker's own limit).
    let huge = sub
        .fetch(FetchRequest {
            max_bytes: u32::MAX,
            max_wait_ms: 0,
            min_bytes: u32::MAX,
            max_records: u32::MAX,
            ..fetch("t", 0, 0)
        })
        .await
        .expect("huge limits are capped")
        .into_inner();
    assert_eq!(huge.records.len(), 10);
    // max_bytes 0 means the broker's default, max_records 1 one record.
    let one = sub
        .fetch(FetchRequest {
            max_bytes: 0,
            max_records: 1,
            ..fetch("t", 0, 3)
        })
        .await
        .expect("one record")
        .into_inner();
    assert_eq!(one.records.len(), 1);
    assert_eq!(one.records[0].offset, 3);

    let get_offsets =
        |topic: &str, partitions: Vec<u32>, group: &str, ts: Option<i64>| GetOffsetsRequest {
            topic: topic.into(),
            partitions,
            group_id: group.into(),
            timestamp_ms: ts,
        };
    let cases: Vec<(&str, GetOffsetsRequest, Code, Detail)> = vec![
        (
            "offsets: empty topic",
            get_offsets("", vec![], "", None),
            Code::InvalidArgument,
            Field("topic"),
        ),
        (
            "offsets: unknown topic",
            get_offsets("nope", vec![], "", None),
            Code::NotFound,
            Reason("TOPIC_NOT_FOUND"),
        ),
        (
            "offsets: partition out of range",
            get_offsets("t", vec![0, 7], "", None),
            Code::NotFound,
            Reason("PARTITION_NOT_FOUND"),
        ),
        (
            "offsets: a partition named twice",
            get_offsets("t", vec![0, 1, 0], "", None),
            Code::InvalidArgument,
            Field("partitions"),
        ),
        (
            // 4 MB on the wire; before, the answer grew to 4 million entries (and 16 million
            // would have been 1 GiB in the broker's memory).
            "offsets: millions of partitions",
            get_offsets("t", vec![0; 4_000_000], "", None),
            Code::InvalidArgument,
            Field("partitions"),
        ),
        (
            "offsets: bad group id",
            get_offsets("t", vec![], &"g".repeat(300), None),
            Code::InvalidArgument,
            Field("group_id"),
        ),
    ];
    for (case, request, code, detail) in cases {
        check(
            case,
            sub.get_offsets(request).await.map(|_| ()),
            code,
            detail,
        );
    }
    // An unknown group has no committed offsets (not an error: it may commit later); a time
    // before every record finds the first, a time after every record finds none.
    let unknown_group = sub
        .get_offsets(get_offsets("t", vec![0], "never-seen", Some(i64::MIN)))
        .await
        .expect("offsets of an unknown group")
        .into_inner();
    assert_eq!(unknown_group.partitions[0].committed_offset, None);
    assert_eq!(unknown_group.partitions[0].timestamp_offset, Some(0));
    let future = sub
        .get_offsets(get_offsets("t", vec![0], "", Some(i64::MAX)))
        .await
        .expect("offsets at the end of time")
        .into_inner();
    assert_eq!(
        future.partitions[0].timestamp_offset,
        Some(10),
        "no record that late: the high watermark, as documented"
    );

    let commit =
        |group: &str, member: &str, generation: u64, topic: &str, offsets: Vec<(u32, u64)>| {
            CommitOffsetsRequest {
                group_id: group.into(),
                member_id: member.into(),
                generation,
                topic: topic.into(),
                offsets: offsets
                    .into_iter()
                    .map(|(partition, offset)| PartitionOffset { partition, offset })
                    .collect(),
                reset: false,
            }
        };
    let cases: Vec<(&str, CommitOffsetsRequest, Code, Detail)> = vec![
        (
            "commit: empty group",
            commit("", "", 0, "t", vec![(0, 6)]),
            Code::InvalidArgument,
            Field("group_id"),
        ),
        (
            "commit: unknown topic",
            commit("g", "", 0, "nope", vec![(0, 6)]),
            Code::NotFound,
            Reason("TOPIC_NOT_FOUND"),
        ),
        (
            "commit: nothing to commit",
            commit("g", "", 0, "t", vec![]),
            Code::InvalidArgument,
            Field("offsets"),
        ),
        (
            "commit: partition out of range",
            commit("g", "", 0, "t", vec![(9, 1)]),
            Code::NotFound,
            Reason("PARTITION_NOT_FOUND"),
        ),
        (
            "commit: beyond the high watermark",
            commit("g", "", 0, "t", vec![(0, 11)]),
            Code::InvalidArgument,
            Field("offsets"),
        ),
        (
            "commit: backwards",
            commit("g", "", 0, "t", vec![(0, 2)]),
            Code::InvalidArgument,
            Field("offsets"),
        ),
        (
            "commit: stale generation of a member that left",
            commit("g", "gone-member", 1, "t", vec![(0, 8)]),
            Code::FailedPrecondition,
            Reason("STALE_GENERATION"),
        ),
        (
            // Before, any generation passed, and the group's next generation was computed
            // from it: u64::MAX overflowed (a panic under the groups' lock in a debug build).
            "commit: a generation from outside membership",
            commit("g", "", u64::MAX, "t", vec![(0, 8)]),
            Code::InvalidArgument,
            Field("generation"),
        ),
        (
            "commit: a partition named twice",
            commit("g", "", 0, "t", vec![(0, 8), (0, 9)]),
            Code::InvalidArgument,
            Field("offsets"),
        ),
        (
            "reset: from a member",
            CommitOffsetsRequest {
                reset: true,
                ..commit("g", "a-member", 1, "t", vec![(0, 1)])
            },
            Code::InvalidArgument,
            Field("reset"),
        ),
        (
            "reset: beyond the high watermark",
            CommitOffsetsRequest {
                reset: true,
                ..commit("g", "", 0, "t", vec![(0, 11)])
            },
            Code::InvalidArgument,
            Field("offsets"),
        ),
    ];
    for (case, request, code, detail) in cases {
        check(
            case,
            sub.commit_offsets(request).await.map(|_| ()),
            code,
            detail,
        );
    }

    check(
        "describe: unknown group",
        sub.describe_group(DescribeGroupRequest {
            group_id: "nope".into(),
        })
        .await
        .map(|_| ()),
        Code::NotFound,
        Reason("GROUP_NOT_FOUND"),
    );
    check(
        "describe: empty group id",
        sub.describe_group(DescribeGroupRequest {
            group_id: String::new(),
        })
        .await
        .map(|_| ()),
        Code::InvalidArgument,
        Field("group_id"),
    );
    check(
        "delete: unknown group",
        sub.delete_group(DeleteGroupRequest {
            group_id: "nope".into(),
        })
        .await
        .map(|_| ()),
        Code::NotFound,
        Reason("GROUP_NOT_FOUND"),
    );
    check(
        "delete: empty group id",
        sub.delete_group(DeleteGroupRequest {
            group_id: String::new(),
        })
        .await
        .map(|_| ()),
        Code::InvalidArgument,
        Field("group_id"),
    );

    assert_eq!(
        state(&address).await,
        before,
        "bad requests changed nothing"
    );
    still_healthy(&address).await;
    drop(broker);
}

/// Sends `messages` on a Subscribe stream and returns the first error status (skipping
/// assignments, deliveries and heartbeats), or Ok(()) if the stream ended cleanly.
async fn subscribe_error(
    address: &str,
    messages: Vec<SubscribeRequest>,
) -> Result<(), tonic::Status> {
    let channel = grpc::channel(address).await;
    let (tx, rx) = mpsc::channel(16);
    for m in messages {
        tx.send(m).await.expect("queue");
    }
    let mut responses = grpc::subscriber(&channel)
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match responses.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(status) => return Err(status),
            }
        }
    })
    .await
    .expect("the stream answered the bad request within 60 s");
    drop(tx);
    outcome
}

/// Joins `group` on "t" with a raw Subscribe stream.
async fn member(address: &str, group: &str) -> grpc::SubscribeStream {
    grpc::subscribe(
        address,
        SubscribeStart {
            group_id: group.into(),
            session_timeout_ms: 600_000,
            ..start("t")
        },
    )
    .await
}

/// The first assignment at generation `at_least` or later: (partitions, generation).
async fn assignment(
    responses: &mut tonic::Streaming<SubscribeResponse>,
    at_least: u64,
) -> (Vec<u32>, u64) {
    let a = grpc::next_assignment(responses, at_least).await;
    (
        a.partitions.iter().map(|p| p.partition).collect(),
        a.generation,
    )
}

fn start(topic: &str) -> SubscribeStart {
    SubscribeStart {
        topic: topic.into(),
        credit: Some(Credit {
            records: 100,
            bytes: 1 << 20,
        }),
        start: Some(StartPosition {
            position: Some(Position::Earliest(start_position::Earliest {})),
        }),
        ..SubscribeStart::default()
    }
}

fn msg(request: Inbound) -> SubscribeRequest {
    SubscribeRequest {
        request: Some(request),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_refuses_bad_streams() {
    let (broker, address) = prepared().await;
    let before = state(&address).await;
    use Detail::*;
    let cases: Vec<(&str, Vec<SubscribeRequest>, Code, Detail)> = vec![
        (
            "first message is not start",
            vec![msg(Inbound::Credit(Credit {
                records: 1,
                bytes: 1,
            }))],
            Code::InvalidArgument,
            Field("request"),
        ),
        (
            "start twice",
            vec![
                msg(Inbound::Start(start("t"))),
                msg(Inbound::Start(start("t"))),
            ],
            Code::InvalidArgument,
            Field("start"),
        ),
        (
            "commit outside a group",
            vec![
                msg(Inbound::Start(start("t"))),
                msg(Inbound::Commit(StreamCommit {
                    generation: 1,
                    offsets: vec![PartitionOffset {
                        partition: 0,
                        offset: 1,
                    }],
                })),
            ],
            Code::InvalidArgument,
            Field("commit"),
        ),
        (
            "empty topic",
            vec![msg(Inbound::Start(start("")))],
            Code::InvalidArgument,
            Field("topic"),
        ),
        (
            "unknown topic",
            vec![msg(Inbound::Start(start("nope")))],
            Code::NotFound,
            Reason("TOPIC_NOT_FOUND"),
        ),
        (
            "partition out of range",
            vec![msg(Inbound::Start(SubscribeStart {
                partitions: vec![0, 5],
                ..start("t")
            }))],
            Code::NotFound,
            Reason("PARTITION_NOT_FOUND"),
        ),
        (
            "a partition twice",
            vec![msg(Inbound::Start(SubscribeStart {
                partitions: vec![1, 1],
                ..start("t")
            }))],
            Code::InvalidArgument,
            Field("partitions"),
        ),
        (
            "partitions named in a group",
            vec![msg(Inbound::Start(SubscribeStart {
                partitions: vec![0],
                group_id: "g2".into(),
                ..start("t")
            }))],
            Code::InvalidArgument,
            Field("partitions"),
        ),
        (
            "session timeout over the maximum",
            vec![msg(Inbound::Start(SubscribeStart {
                group_id: "g2".into(),
                session_timeout_ms: u32::MAX,
                ..start("t")
            }))],
            Code::InvalidArgument,
            Field("session_timeout_ms"),
        ),
        (
            "session timeout under the minimum",
            vec![msg(Inbound::Start(SubscribeStart {
                group_id: "g2".into(),
                session_timeout_ms: 5,
                ..start("t")
            }))],
            Code::InvalidArgument,
            Field("session_timeout_ms"),
        ),
        (
            "group id too long",
            vec![msg(Inbound::Start(SubscribeStart {
                group_id: "g".repeat(300),
                ..start("t")
            }))],
            Code::InvalidArgument,
            Field("group_id"),
        ),
        (
            "commit of a partition the topic does not have",
            vec![
                msg(Inbound::Start(SubscribeStart {
                    group_id: "g".into(),
                    ..start("t")
                })),
                msg(Inbound::Commit(StreamCommit {
                    generation: 0,
                    offsets: vec![PartitionOffset {
                        partition: 9,
                        offset: 1,
                    }],
                })),
            ],
            Code::NotFound,
            Reason("PARTITION_NOT_FOUND"),
        ),
        (
            "commit at a generation that is not the member's",
            vec![
                msg(Inbound::Start(SubscribeStart {
                    group_id: "g".into(),
                    ..start("t")
                })),
                msg(Inbound::Commit(StreamCommit {
                    generation: 99,
                    offsets: vec![PartitionOffset {
                        partition: 0,
                        offset: 6,
                    }],
                })),
            ],
            Code::FailedPrecondition,
            Reason("STALE_GENERATION"),
        ),
    ];
    for (case, messages, code, detail) in cases {
        eprintln!("case: {case}");
        check(
            case,
            subscribe_error(&address, messages).await,
            code,
            detail,
        );
    }
    // A commit for a partition assigned to another member of the group, at the current
    // generation: refused, and the committed offset does not move.
    {
        let (_a_tx, mut a) = member(&address, "g3").await;
        let (_, gen1) = assignment(&mut a, 0).await;
        let (_b_tx, mut b) = member(&address, "g3").await;
        let (b_owns, gen2) = assignment(&mut b, gen1 + 1).await;
        let (a_owns, _) = assignment(&mut a, gen2).await;
        assert_eq!(a_owns.len() + b_owns.len(), 2, "{a_owns:?} {b_owns:?}");
        _a_tx
            .send(msg(Inbound::Commit(StreamCommit {
                generation: gen2,
                offsets: vec![PartitionOffset {
                    partition: b_owns[0],
                    offset: 1,
                }],
            })))
            .await
            .expect("queue");
        let status = loop {
            match a.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without refusing the commit"),
                Err(status) => break status,
            }
        };
        assert!(status.message().contains("not assigned"), "{status:?}");
        check(
            "commit of a partition another member owns",
            Err(status),
            Code::FailedPrecondition,
            Reason("STALE_GENERATION"),
        );
    }

    // A member's commit over its stream is checked as a unary commit is: an offset past the
    // high watermark (10) is refused and nothing is committed. It was stored before, and every
    // later commit of the partition refused as going backwards. (A new group each: a refused
    // member keeps its partitions for its session.)
    for (case, group, offsets, detail) in [
        (
            "stream commit past the high watermark",
            "g4",
            vec![PartitionOffset {
                partition: 0,
                offset: 1 << 60,
            }],
            Detail::Field("offsets"),
        ),
        (
            "stream commit naming a partition twice",
            "g5",
            vec![
                PartitionOffset {
                    partition: 0,
                    offset: 6,
                },
                PartitionOffset {
                    partition: 0,
                    offset: 7,
                },
            ],
            Detail::Field("offsets"),
        ),
    ] {
        eprintln!("case: {case}");
        let (tx, mut responses) = member(&address, group).await;
        let (owns, generation) = assignment(&mut responses, 0).await;
        assert!(owns.contains(&0), "{owns:?}");
        tx.send(msg(Inbound::Commit(StreamCommit {
            generation,
            offsets,
        })))
        .await
        .expect("queue");
        let status = loop {
            match responses.message().await {
                Ok(Some(SubscribeResponse {
                    event: Some(Event::CommitAck(ack)),
                })) => panic!("{case}: acknowledged: {ack:?}"),
                Ok(Some(_)) => continue,
                Ok(None) => panic!("{case}: the stream ended without refusing the commit"),
                Err(status) => break status,
            }
        };
        check(case, Err(status), Code::InvalidArgument, detail);
        let committed = weft_tests::offsets(&address, "t", 0, Some(group))
            .await
            .expect("offsets")
            .committed_offset;
        assert_eq!(committed, None, "{case}: committed");
    }

    // Credit: 0 delivers nothing until credit arrives; a grant of 2 delivers at most 2;
    // u32::MAX records is capped by the broker's own per-delivery limit and delivers the rest.
    {
        let (tx, mut responses) = grpc::subscribe(
            &address,
            SubscribeStart {
                partitions: vec![0],
                credit: Some(Credit {
                    records: 0,
                    bytes: 0,
                }),
                ..start("t")
            },
        )
        .await;
        tx.send(msg(Inbound::Credit(Credit {
            records: 2,
            bytes: 1 << 20,
        })))
        .await
        .expect("queue");
        let mut received = 0usize;
        let mut granted = 2usize;
        while received < 10 {
            match responses
                .message()
                .await
                .expect("stream")
                .expect("open")
                .event
            {
                Some(Event::Delivery(d)) => {
                    received += d.records.len();
                    assert!(
                        received <= granted,
                        "delivered {received} records with credit for {granted}"
                    );
                    if received == 2 && granted == 2 {
                        tx.send(msg(Inbound::Credit(Credit {
                            records: u32::MAX,
                            bytes: u64::MAX,
                        })))
                        .await
                        .expect("queue");
                        granted = usize::MAX;
                    }
                }
                _ => continue,
            }
        }
        assert_eq!(received, 10);
    }

    assert_eq!(state(&address).await, before, "bad streams changed nothing");
    still_healthy(&address).await;
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_admin_and_cluster_calls_refuse_bad_input() {
    let (broker, address) = prepared().await;
    let before = state(&address).await;
    let channel = grpc::channel(&address).await;
    let mut admin = grpc::topic_admin(&channel);
    use Detail::*;

    let create = |name: &str, config: TopicConfig| CreateTopicRequest {
        name: name.into(),
        config: Some(config),
    };
    let cases: Vec<(&str, CreateTopicRequest, Code, Detail)> = vec![
        (
            "create: existing name",
            create("t", TopicConfig::default()),
            Code::AlreadyExists,
            Reason("TOPIC_EXISTS"),
        ),
        (
            "create: empty name",
            create("", TopicConfig::default()),
            Code::InvalidArgument,
            Field("name"),
        ),
        (
            "create: bad characters",
            create("a b", TopicConfig::default()),
            Code::InvalidArgument,
            Field("name"),
        ),
        (
            "create: \"..\"",
            create("..", TopicConfig::default()),
            Code::InvalidArgument,
            Field("name"),
        ),
        (
            "create: 250 characters",
            create(&"x".repeat(250), TopicConfig::default()),
            Code::InvalidArgument,
            Field("name"),
        ),
        (
            "create: 5000 partitions",
            create(
                "n",
                TopicConfig {
                    partitions: 5000,
                    ..TopicConfig::default()
                },
            ),
            Code::InvalidArgument,
            Field("config.partitions"),
        ),
        (
            "create: unknown fsync policy",
            create(
                "n",
                TopicConfig {
                    fsync_policy: 99,
                    ..TopicConfig::default()
                },
            ),
            Code::InvalidArgument,
            Field("config.fsync_policy"),
        ),
        (
            "create: tiny segments",
            create(
                "n",
                TopicConfig {
                    segment_bytes: Some(10),
                    ..TopicConfig::default()
                },
            ),
            Code::InvalidArgument,
            Field("config.segment_bytes"),
        ),
        (
            "create: zero retention",
            create(
                "n",
                TopicConfig {
                    retention_ms: Some(0),
                    ..TopicConfig::default()
                },
            ),
            Code::InvalidArgument,
            Field("config.retention_ms"),
        ),
        (
            "create: messages larger than segments",
            create(
                "n",
                TopicConfig {
                    segment_bytes: Some(1 << 20),
                    max_message_bytes: Some(2 << 20),
                    ..TopicConfig::default()
                },
            ),
            Code::InvalidArgument,
            Field("config.max_message_bytes"),
        ),
        (
            // (The broker's grpc_message_bytes_max is 16 MiB: no publish that large arrives.)
            "create: messages larger than the broker takes in one request",
            create(
                "n",
                TopicConfig {
                    segment_bytes: Some(256 << 20),
                    max_message_bytes: Some(32 << 20),
                    ..TopicConfig::default()
                },
            ),
            Code::InvalidArgument,
            Field("config.max_message_bytes"),
        ),
    ];
    for (case, request, code, detail) in cases {
        check(
            case,
            admin.create_topic(request).await.map(|_| ()),
            code,
            detail,
        );
    }

    check(
        "get: unknown topic",
        admin
            .get_topic(GetTopicRequest {
                name: "nope".into(),
            })
            .await
            .map(|_| ()),
        Code::NotFound,
        Reason("TOPIC_NOT_FOUND"),
    );
    // A page size over the maximum (1000) is coerced to it, as AIP-158 has it.
    let page = admin
        .list_topics(ListTopicsRequest {
            page_size: 100_000,
            page_token: String::new(),
        })
        .await
        .expect("a page size over the maximum is coerced")
        .into_inner();
    assert_eq!(page.topics.len(), 1);
    check(
        "list: bad page token",
        admin
            .list_topics(ListTopicsRequest {
                page_size: 0,
                page_token: "\u{1}garbage".into(),
            })
            .await
            .map(|_| ()),
        Code::InvalidArgument,
        Field("page_token"),
    );

    let update = |name: &str, config: TopicConfig, paths: &[&str]| UpdateTopicRequest {
        name: name.into(),
        config: Some(config),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    };
    let cases: Vec<(&str, UpdateTopicRequest, Code, Detail)> = vec![
        (
            "update: unknown topic",
            update("nope", TopicConfig::default(), &["retention_ms"]),
            Code::NotFound,
            Reason("TOPIC_NOT_FOUND"),
        ),
        (
            "update: empty mask",
            update("t", TopicConfig::default(), &[]),
            Code::InvalidArgument,
            Field("update_mask"),
        ),
        (
            "update: unknown field",
            update("t", TopicConfig::default(), &["colour"]),
            Code::InvalidArgument,
            Field("update_mask"),
        ),
        (
            "update: replication factor",
            update(
                "t",
                TopicConfig {
                    replication_factor: 3,
                    ..TopicConfig::default()
                },
                &["replication_factor"],
            ),
            Code::InvalidArgument,
            Field("update_mask"),
        ),
        (
            "update: fewer partitions",
            update(
                "t",
                TopicConfig {
                    partitions: 1,
                    ..TopicConfig::default()
                },
                &["partitions"],
            ),
            Code::InvalidArgument,
            Field("config.partitions"),
        ),
        (
            "update: zero retention",
            update(
                "t",
                TopicConfig {
                    retention_bytes: Some(0),
                    ..TopicConfig::default()
                },
                &["retention_bytes"],
            ),
            Code::InvalidArgument,
            Field("config.retention_bytes"),
        ),
        (
            "update: tiny segments",
            update(
                "t",
                TopicConfig {
                    segment_bytes: Some(10),
                    ..TopicConfig::default()
                },
                &["segment_bytes"],
            ),
            Code::InvalidArgument,
            Field("config.segment_bytes"),
        ),
    ];
    for (case, request, code, detail) in cases {
        check(
            case,
            admin.update_topic(request).await.map(|_| ()),
            code,
            detail,
        );
    }
    let missing_config = admin
        .update_topic(UpdateTopicRequest {
            name: "t".into(),
            config: None,
            update_mask: None,
        })
        .await
        .map(|_| ());
    check(
        "update: nothing at all",
        missing_config,
        Code::InvalidArgument,
        Field("update_mask"),
    );

    check(
        "delete: unknown topic",
        admin
            .delete_topic(DeleteTopicRequest {
                name: "nope".into(),
            })
            .await
            .map(|_| ()),
        Code::NotFound,
        Reason("TOPIC_NOT_FOUND"),
    );
    check(
        "delete: empty name",
        admin
            .delete_topic(DeleteTopicRequest {
                name: String::new(),
            })
            .await
            .map(|_| ()),
        Code::InvalidArgument,
        Field("name"),
    );

    let mut cluster = ClusterClient::new(channel.clone());
    check(
        "list partitions: unknown topic",
        cluster
            .list_partitions(ListPartitionsRequest {
                topic: "nope".into(),
            })
            .await
            .map(|_| ()),
        Code::NotFound,
        Reason("TOPIC_NOT_FOUND"),
    );
    let status = cluster
        .get_cluster_status(GetClusterStatusRequest {})
        .await
        .expect("cluster status")
        .into_inner();
    assert_eq!(status.topic_count, 1);

    assert_eq!(
        state(&address).await,
        before,
        "bad admin calls changed nothing"
    );
    still_healthy(&address).await;
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_publish_stream_refuse_bad_input() {
    let (broker, address) = prepared().await;
    let before = state(&address).await;
    let channel = grpc::channel(&address).await;
    let mut publisher = grpc::publisher(&channel);
    use Detail::*;
    let record = |value: &str| Record {
        value: value.to_string().into(),
        ..Record::default()
    };
    let publish = |topic: &str, target: Option<Target>, records: Vec<Record>| PublishRequest {
        topic: topic.into(),
        target,
        records,
        ..PublishRequest::default()
    };
    let cases: Vec<(&str, PublishRequest, Code, Detail)> = vec![
        (
            "bad topic name",
            publish("a b", Some(Target::Partition(0)), vec![record("x")]),
            Code::InvalidArgument,
            Field("topic"),
        ),
        (
            "key target with an empty key",
            publish(
                "t",
                Some(Target::PartitionKey(Vec::new().into())),
                vec![record("x")],
            ),
            Code::InvalidArgument,
            Field("target"),
        ),
        (
            "negative timestamp",
            publish(
                "t",
                Some(Target::Partition(0)),
                vec![Record {
                    timestamp_ms: -5,
                    ..record("x")
                }],
            ),
            Code::InvalidArgument,
            Field("records[0].timestamp_ms"),
        ),
        (
            "a timestamp two hours ahead of the broker's clock",
            publish(
                "t",
                Some(Target::Partition(0)),
                vec![Record {
                    timestamp_ms: i64::try_from(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .expect("clock")
                            .as_millis(),
                    )
                    .expect("ms")
                        + 2 * 3_600_000,
                    ..record("x")
                }],
            ),
            Code::InvalidArgument,
            Field("records[0].timestamp_ms"),
        ),
        (
            "a header value of 2 MiB",
            publish(
                "t",
                Some(Target::Partition(0)),
                vec![Record {
                    headers: vec![Header {
                        key: "h".into(),
                        value: vec![0u8; 2 << 20].into(),
                    }],
                    ..record("x")
                }],
            ),
            Code::ResourceExhausted,
            Reason("BATCH_TOO_LARGE"),
        ),
        (
            "sequence at the end of the range",
            PublishRequest {
                producer_id: 77,
                producer_epoch: 0,
                base_sequence: u64::MAX,
                ..publish(
                    "t",
                    Some(Target::Partition(0)),
                    vec![record("a"), record("b")],
                )
            },
            Code::InvalidArgument,
            Field("base_sequence"),
        ),
        (
            "a trace context key other than traceparent and tracestate",
            PublishRequest {
                trace_context: [("baggage".to_string(), "k=v".to_string())].into(),
                ..publish("t", Some(Target::Partition(0)), vec![record("x")])
            },
            Code::InvalidArgument,
            Field("trace_context"),
        ),
        (
            "a traceparent of 4 KiB",
            PublishRequest {
                trace_context: [("traceparent".to_string(), "0".repeat(4096))].into(),
                ..publish("t", Some(Target::Partition(0)), vec![record("x")])
            },
            Code::InvalidArgument,
            Field("trace_context.traceparent"),
        ),
    ];
    for (case, request, code, detail) in cases {
        check(
            case,
            publisher.publish(request).await.map(|_| ()),
            code,
            detail,
        );
    }

    // PublishStream: a bad request in the middle is refused on its own answer or ends the stream
    // with its status; the requests before it are stored.
    let (tx, rx) = mpsc::channel(8);
    tx.send(publish(
        "t",
        Some(Target::Partition(1)),
        vec![record("ok-1")],
    ))
    .await
    .expect("queue");
    tx.send(publish("t", Some(Target::Partition(1)), vec![]))
        .await
        .expect("queue");
    drop(tx);
    let mut answers = publisher
        .publish_stream(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let first = answers
        .message()
        .await
        .expect("first answer")
        .expect("an answer");
    let stored =
        weft_tests::fetch_range(&address, "t", 1, first.base_offset, first.base_offset + 1).await;
    assert_eq!(stored[0].1.as_ref(), b"ok-1");
    let second = answers.message().await.map(|_| ());
    check(
        "stream: a request without records",
        second,
        Code::InvalidArgument,
        Field("records"),
    );

    // The "ok-1" record is the only change.
    let after = state(&address).await;
    assert_ne!(after, before);
    assert_eq!(
        after.replace("  1 0 1 Some(0)", "  1 0 0 Some(0)"),
        before,
        "only the stream's good record was stored"
    );
    still_healthy(&address).await;
    drop(broker);
}
