//! Consumer-group members, in the root namespace. Each joins the group [`GROUP`] on the topic
//! through a random broker (a Subscribe stream), consumes what it is assigned, commits after each
//! delivery (CommitOffsets through a random broker, naming its generation), and reads the group's
//! committed offsets now and then. After a rebalance it sometimes commits once more with the
//! generation it had before, as a zombie would (a member paused through a rebalance): the broker
//! must refuse that. Every assignment, commit and read of the committed offsets goes to the
//! history, for the commit-regression and zombie-commit checks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic_types::StatusExt;
use weft_proto::v1::start_position::{Earliest, Position};
use weft_proto::v1::subscribe_request::Request as SubscribeMessage;
use weft_proto::v1::subscribe_response::Event;
use weft_proto::v1::subscriber_client::SubscriberClient;
use weft_proto::v1::{
    CommitOffsetsRequest, Credit, GetOffsetsRequest, Heartbeat, PartitionOffset, StartPosition,
    SubscribeRequest, SubscribeStart,
};

use crate::history::{Function, Kind, Op, Recorder};
use crate::workload::{Avoided, Clients, TOPIC, describe};

/// The consumer group every member joins.
pub const GROUP: &str = "jepsen";
/// One call's deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A stream silent this long (no delivery, assignment or heartbeat) is given up and rejoined.
const STREAM_SILENCE: Duration = Duration::from_secs(10);
/// Records and bytes of credit a member keeps granted (both limits apply).
const CREDIT_RECORDS: u32 = 1000;
const CREDIT_BYTES: u64 = 4 * 1024 * 1024;
/// How long the group waits for a member's heartbeat before removing it.
const SESSION_TIMEOUT_MS: u32 = 6000;
/// How long a member avoids a broker after a call to it failed.
const AVOID_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// The ErrorInfo reasons with which the broker refuses a commit before storing anything.
const COMMIT_NOT_APPLIED_REASONS: [&str; 5] = [
    "STALE_GENERATION",
    "INVALID_ARGUMENT",
    "GROUP_NOT_FOUND",
    "TOPIC_NOT_FOUND",
    "GROUP_NOT_EMPTY",
];

/// Whether a commit that ended with `status` surely was not applied (the broker said so).
fn commit_surely_failed(status: &tonic::Status) -> bool {
    let reason = status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default();
    COMMIT_NOT_APPLIED_REASONS.contains(&reason.as_str())
}

/// One commit of `offset` for `key` in `generation` through a random broker, recorded. Whether
/// the broker refused it as of a stale generation (the member then rejoins, as a Kafka consumer
/// does).
#[allow(clippy::too_many_arguments)]
async fn commit(
    process: &str,
    (member_id, generation): (&str, u64),
    key: u32,
    offset: u64,
    clients: &Clients,
    rng: &mut StdRng,
    avoided: &mut Avoided,
    recorder: &Recorder,
) -> bool {
    let (node, channel) = clients.any_but(rng, avoided);
    let mut op = Op::new(process, recorder.next_id(), Kind::Invoke, Function::Commit);
    op.key = Some(key);
    op.offset = Some(offset);
    op.generation = Some(generation);
    op.node = Some(node);
    recorder.record(op.clone());
    let mut request = tonic::Request::new(CommitOffsetsRequest {
        group_id: GROUP.into(),
        member_id: member_id.into(),
        generation,
        topic: TOPIC.into(),
        offsets: vec![PartitionOffset {
            partition: key,
            offset,
        }],
        reset: false,
    });
    request.set_timeout(CALL_TIMEOUT);
    let answer = tokio::time::timeout(
        CALL_TIMEOUT + Duration::from_secs(1),
        SubscriberClient::new(channel).commit_offsets(request),
    )
    .await
    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("client timeout")));
    match answer {
        Ok(response) => {
            op.kind = Kind::Ok;
            op.offset = response
                .into_inner()
                .offsets
                .iter()
                .find(|o| o.partition == key)
                .map(|o| o.offset);
        }
        Err(status) => {
            op.kind = if commit_surely_failed(&status) {
                Kind::Fail
            } else {
                avoided.insert(node, Instant::now() + AVOID_AFTER_FAILURE);
                Kind::Info
            };
            op.error = Some(describe(&status));
        }
    }
    let unknown = op.kind == Kind::Info;
    let stale = op
        .error
        .as_deref()
        .is_some_and(|e| e.contains("STALE_GENERATION"));
    recorder.record(op);
    if unknown {
        // The coordinator may be down or moving: a pause instead of a burst of doomed commits.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stale
}

/// Reads the group's committed offsets through a random broker: one `read-committed` operation
/// per key (a read changes nothing: a failed one surely did not happen). Whether it worked.
async fn read_committed(
    process: &str,
    keys: u32,
    clients: &Clients,
    rng: &mut StdRng,
    avoided: &mut Avoided,
    recorder: &Recorder,
) -> bool {
    let (node, channel) = clients.any_but(rng, avoided);
    let ops: Vec<Op> = (0..keys)
        .map(|key| {
            let mut op = Op::new(
                process,
                recorder.next_id(),
                Kind::Invoke,
                Function::ReadCommitted,
            );
            op.key = Some(key);
            op.node = Some(node);
            recorder.record(op.clone());
            op
        })
        .collect();
    let mut request = tonic::Request::new(GetOffsetsRequest {
        topic: TOPIC.into(),
        group_id: GROUP.into(),
        ..GetOffsetsRequest::default()
    });
    request.set_timeout(CALL_TIMEOUT);
    let answer = tokio::time::timeout(
        CALL_TIMEOUT + Duration::from_secs(1),
        SubscriberClient::new(channel).get_offsets(request),
    )
    .await
    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("client timeout")));
    match answer {
        Ok(response) => {
            let partitions = response.into_inner().partitions;
            for mut op in ops {
                op.kind = Kind::Ok;
                op.offset = partitions
                    .iter()
                    .find(|p| Some(p.partition) == op.key)
                    .and_then(|p| p.committed_offset);
                recorder.record(op);
            }
            true
        }
        Err(status) => {
            avoided.insert(node, Instant::now() + AVOID_AFTER_FAILURE);
            for mut op in ops {
                op.kind = Kind::Fail;
                op.error = Some(describe(&status));
                recorder.record(op);
            }
            false
        }
    }
}

/// Reads the group's committed offsets once more at the end (after healing), through each
/// broker in turn until one answers (for up to 30 s). Whether one did.
pub async fn final_read_committed(keys: u32, clients: &Clients, recorder: &Recorder) -> bool {
    let mut rng = StdRng::seed_from_u64(0);
    let mut avoided = Avoided::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if read_committed("final", keys, clients, &mut rng, &mut avoided, recorder).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// What a member holds of its current assignment.
struct Assigned {
    member_id: String,
    generation: u64,
    /// (partition, the offset this member last committed or started from).
    partitions: Vec<(u32, u64)>,
}

/// One group member: joins, consumes, commits, rejoins when its stream ends, until `stop`.
pub async fn member(
    index: u32,
    keys: u32,
    clients: Clients,
    recorder: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let process = format!("g{index}");
    let mut avoided = Avoided::new();
    let mut member_id = String::new();
    let mut assigned: Option<Assigned> = None;
    while !*stop.borrow() {
        let (node, channel) = clients.any_but(&mut rng, &avoided);
        let (requests, rx) = mpsc::channel(16);
        let start = SubscribeRequest {
            request: Some(SubscribeMessage::Start(SubscribeStart {
                topic: TOPIC.into(),
                group_id: GROUP.into(),
                member_id: member_id.clone(),
                start: Some(StartPosition {
                    position: Some(Position::Earliest(Earliest {})),
                }),
                credit: Some(Credit {
                    records: CREDIT_RECORDS,
                    bytes: CREDIT_BYTES,
                }),
                session_timeout_ms: SESSION_TIMEOUT_MS,
                ..SubscribeStart::default()
            })),
        };
        if requests.send(start).await.is_err() {
            break;
        }
        let opened = tokio::time::timeout(
            CALL_TIMEOUT,
            SubscriberClient::new(channel).subscribe(ReceiverStream::new(rx)),
        )
        .await;
        let mut stream = match opened {
            Ok(Ok(response)) => response.into_inner(),
            _ => {
                avoided.insert(node, Instant::now() + AVOID_AFTER_FAILURE);
                let _ = tokio::time::timeout(Duration::from_millis(200), stop.changed()).await;
                continue;
            }
        };
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        let mut read_now = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                message = tokio::time::timeout(STREAM_SILENCE, stream.message()) => {
                    let event = match message {
                        Ok(Ok(Some(response))) => response.event,
                        _ => {
                            avoided.insert(node, Instant::now() + AVOID_AFTER_FAILURE);
                            break;
                        }
                    };
                    match event {
                        Some(Event::Assignment(a)) => {
                            member_id = a.member_id.clone();
                            let mut op = Op::new(&process, recorder.next_id(), Kind::Ok, Function::Assign);
                            op.generation = Some(a.generation);
                            op.node = Some(node);
                            op.detail = Some(format!(
                                "member {} partitions {:?}",
                                a.member_id,
                                a.partitions.iter().map(|p| (p.partition, p.offset)).collect::<Vec<_>>()
                            ));
                            recorder.record(op);
                            // Now and then, one commit more with the generation before, as a
                            // member that missed the rebalance would send: it must be refused.
                            if let Some(old) = assigned.take()
                                && old.generation < a.generation
                                && let Some(&(key, offset)) = old.partitions.first()
                                && rng.random_bool(0.5)
                            {
                                let _refused = commit(
                                    &process,
                                    (&old.member_id, old.generation),
                                    key,
                                    offset,
                                    &clients,
                                    &mut rng,
                                    &mut avoided,
                                    &recorder,
                                )
                                .await;
                            }
                            assigned = Some(Assigned {
                                member_id: a.member_id,
                                generation: a.generation,
                                partitions: a.partitions.iter().map(|p| (p.partition, p.offset)).collect(),
                            });
                        }
                        Some(Event::Delivery(d)) => {
                            let Some(last) = d.records.iter().map(|r| r.offset).max() else {
                                continue;
                            };
                            // The credit back: records, and their key, value and header bytes.
                            let count = u32::try_from(d.records.len()).unwrap_or(u32::MAX);
                            let bytes = d
                                .records
                                .iter()
                                .map(|r| {
                                    (r.key.len()
                                        + r.value.len()
                                        + r.headers.iter().map(|h| h.key.len() + h.value.len()).sum::<usize>())
                                        as u64
                                })
                                .sum();
                            let _ = requests.try_send(SubscribeRequest {
                                request: Some(SubscribeMessage::Credit(Credit { records: count, bytes })),
                            });
                            let Some(current) = assigned.as_mut() else {
                                continue;
                            };
                            if d.partition >= keys {
                                continue;
                            }
                            if let Some(held) = current.partitions.iter_mut().find(|(p, _)| *p == d.partition) {
                                held.1 = last + 1;
                            }
                            let (member, generation) = (current.member_id.clone(), current.generation);
                            let stale = commit(
                                &process,
                                (&member, generation),
                                d.partition,
                                last + 1,
                                &clients,
                                &mut rng,
                                &mut avoided,
                                &recorder,
                            )
                            .await;
                            if stale {
                                // The group moved on without this member: rejoin.
                                break;
                            }
                        }
                        Some(Event::Heartbeat(_) | Event::CommitAck(_)) | None => {}
                    }
                }
                _ = heartbeat.tick() => {
                    let _ = requests.try_send(SubscribeRequest {
                        request: Some(SubscribeMessage::Heartbeat(Heartbeat { time_ms: 0 })),
                    });
                }
                _ = read_now.tick() => {
                    read_committed(&process, keys, &clients, &mut rng, &mut avoided, &recorder).await;
                }
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), stop.changed()).await;
    }
}
