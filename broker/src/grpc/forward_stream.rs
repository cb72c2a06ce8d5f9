//! Ordered forwarding of publishes: a broker that does not lead a partition hands its publishes
//! to the leader over one `Forward.PublishStream` per (leader, topic, partition), in the order
//! they reached it. Independent unary calls could overtake each other on the way (each is its
//! own HTTP/2 stream and server task), and a client's pipelined idempotent publishes would then
//! arrive out of sequence and be refused with sequence gaps. When the link to the leader breaks,
//! the idempotent publishes the stream had sent go again, ahead of those queued behind them
//! ([`run`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use weft_proto::internal::v1::{ForwardPublishRequest, ForwardPublishResult};
use weft_proto::v1::PublishResponse;

use crate::error::BrokerError;
use crate::node::Node;

/// Publishes queued towards one partition's leader (beyond it, callers wait for room).
const QUEUE_MAX: usize = 1024;
/// A stream with nothing to carry for this long is closed.
const IDLE: Duration = Duration::from_secs(60);
/// A stream is replaced (once it has nothing in flight) after this long.
const AGE_MAX: Duration = Duration::from_secs(600);
/// The deadline of the stream call itself (it is replaced long before).
const STREAM_DEADLINE: Duration = Duration::from_secs(3600);

/// What became of a queued publish.
enum Outcome {
    /// The leader answered it, or it was sent and its outcome is unknown (an error saying so).
    Answered(Result<PublishResponse, BrokerError>),
    /// The stream closed before sending it (idle, too old, or given up after breaking): it goes
    /// again on a new stream.
    NotSent(ForwardPublishRequest),
}

/// Times a publish is handed to a new stream after the one it was queued on closed unsent.
const REQUEUE_MAX: usize = 3;

type Reply = oneshot::Sender<Outcome>;

struct Job {
    request: ForwardPublishRequest,
    reply: Reply,
}

/// Where one partition's publishes go: (leader, topic, partition).
type Key = (u64, String, u32);

/// When a leader last answered a publish on any of this broker's forwarding streams to it
/// (None: never yet, while one of them stayed open).
#[derive(Debug, Default)]
struct Heard(Mutex<Option<Instant>>);

impl Heard {
    fn now(&self) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some(Instant::now());
        }
    }

    /// Whether the leader answered anything since `since`.
    fn since(&self, since: Instant) -> bool {
        self.0
            .lock()
            .map(|last| last.is_some_and(|at| at >= since))
            .unwrap_or(true)
    }
}

/// A forwarder: its queue, and when its leader last answered.
type Forwarder = (mpsc::Sender<Job>, std::sync::Arc<Heard>);

/// The forwarding streams of one broker, by leader and partition.
#[derive(Debug, Default)]
pub(crate) struct Forwarders {
    streams: Mutex<HashMap<Key, Forwarder>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").finish_non_exhaustive()
    }
}

/// The result of one publish, as Forward.PublishStream carries it.
pub(crate) fn encode_result(result: Result<PublishResponse, BrokerError>) -> ForwardPublishResult {
    match result {
        Ok(response) => ForwardPublishResult {
            response: Some(response),
            ..ForwardPublishResult::default()
        },
        Err(error) => {
            let status = tonic::Status::from(error);
            ForwardPublishResult {
                response: None,
                code: status.code() as i32,
                message: status.message().to_string(),
                details: status.details().to_vec().into(),
            }
        }
    }
}

fn decode_result(result: ForwardPublishResult) -> Result<PublishResponse, BrokerError> {
    match result.response {
        Some(response) if result.code == 0 => Ok(response),
        _ => Err(BrokerError::from(tonic::Status::with_details(
            tonic::Code::from(result.code),
            result.message,
            result.details,
        ))),
    }
}

impl Forwarders {
    /// Hands `request` (for `topic`/`partition`) to `leader` at `peer_address` after every
    /// publish this broker forwarded there before, and waits (up to `timeout`) for its answer.
    pub(crate) async fn publish(
        &self,
        node: &Node,
        leader: u64,
        peer_address: &str,
        request: ForwardPublishRequest,
        timeout: Duration,
    ) -> Result<PublishResponse, BrokerError> {
        let topic = request
            .request
            .as_ref()
            .map(|r| r.topic.clone())
            .unwrap_or_default();
        let key = (leader, topic, request.partition);
        // Counted per publish, like the other forwarded calls (opening a stream counts as
        // method="PublishStream").
        metrics::counter!("weft_forwarded_calls_total", "method" => "Publish").increment(1);
        let not_sent = || BrokerError::Unavailable {
            reason: format!("the forwarding stream to node {leader} closed; try again"),
            // Not named as the leader: it did not answer.
            leader: None,
        };
        let queued = Instant::now();
        // The forwarder the publish went to last (it may go to a new one when a stream closes
        // before sending it).
        let mut heard: Option<std::sync::Arc<Heard>> = None;
        // The whole wait, room in the queue included, stays within the caller's deadline.
        let waited = tokio::time::timeout(timeout, async {
            let mut request = request;
            for _ in 0..REQUEUE_MAX {
                let (sender, answers) = self.sender(node, key.clone(), leader, peer_address)?;
                heard = Some(answers);
                let (reply, answer) = oneshot::channel();
                if let Err(refused) = sender.send(Job { request, reply }).await {
                    // The stream ended between lookup and send: a new one takes it.
                    request = refused.0.request;
                    continue;
                }
                match answer.await {
                    Ok(Outcome::Answered(result)) => return result,
                    Ok(Outcome::NotSent(unsent)) => request = unsent,
                    Err(_) => {
                        return Err(BrokerError::Unavailable {
                            reason: format!(
                                "the forwarding stream to node {leader} broke: the publish may \
                                 or may not be stored (retry it with the same producer sequence)"
                            ),
                            // Not named as the leader: the connection to it failed.
                            leader: None,
                        });
                    }
                }
            }
            Err(not_sent())
        })
        .await;
        waited.unwrap_or_else(|_| {
            if heard.is_some_and(|heard| !heard.since(queued)) {
                // The leader answered no publish at all meanwhile, for any partition (it is
                // given a shorter time than this wait, so a live one answers first even when
                // it cannot store the publish in time): paused, its disk stalled,
                // the link silently dead): what a connection that failed says, so that this
                // broker passes it over for a while (`RouteHints::learn_write`). Before, a
                // publish that ran out of time taught nothing, and a broker with no replica
                // kept sending every publish to a leader that had stopped answering, long after
                // the other replicas had elected another.
                return Err(BrokerError::Unavailable {
                    reason: format!(
                        "node {leader} answered no forwarded publish within {} ms: the publish \
                         may or may not be stored (retry it with the same producer sequence)",
                        timeout.as_millis()
                    ),
                    leader: None,
                });
            }
            Err(BrokerError::Timeout(format!(
                "node {leader} did not answer the forwarded publish in time"
            )))
        })
    }

    /// The queue of the stream for `key`, opening one when there is none (or it ended).
    fn sender(
        &self,
        node: &Node,
        key: Key,
        leader: u64,
        peer_address: &str,
    ) -> Result<Forwarder, BrokerError> {
        let mut streams = self
            .streams
            .lock()
            .map_err(|_| BrokerError::Internal("forwarding streams poisoned".into()))?;
        streams.retain(|_, (s, _)| !s.is_closed());
        if let Some((sender, heard)) = streams.get(&key) {
            return Ok((sender.clone(), heard.clone()));
        }
        let client = super::forward_to(node, leader, peer_address, "PublishStream")?;
        let (sender, jobs) = mpsc::channel(QUEUE_MAX);
        // Shared by every stream to the same leader: an answer for any partition shows it is
        // alive (one partition slow to answer, say without its quorum, does not make it
        // unreachable for all).
        let heard = streams
            .iter()
            .find(|((to, _, _), _)| *to == leader)
            .map(|(_, (_, heard))| heard.clone())
            .unwrap_or_default();
        tokio::spawn(run(
            client,
            node.peers().clone(),
            jobs,
            leader,
            heard.clone(),
        ));
        streams.insert(key, (sender.clone(), heard.clone()));
        Ok((sender, heard))
    }
}

/// Times in a row a broken stream is opened again (each after a longer pause) to carry the
/// publishes it had sent, before they are given up with an outcome unknown.
const REOPEN_MAX: u32 = 5;
/// The pause before the first new stream; it doubles with each failure in a row.
const REOPEN_BACKOFF: Duration = Duration::from_millis(25);

/// A publish sent on a stream and not answered yet.
struct Sent {
    reply: Reply,
    /// A copy to send again on a new stream when this one breaks: kept only for idempotent
    /// producers' publishes, which the leader recognises when they were stored already.
    again: Option<ForwardPublishRequest>,
    /// Sent on an earlier stream already (it may be stored).
    sent_before: bool,
}

impl Sent {
    fn of(job: Job) -> (Sent, ForwardPublishRequest) {
        let again = job
            .request
            .request
            .as_ref()
            .is_some_and(|r| r.producer_id != 0)
            .then(|| job.request.clone());
        (
            Sent {
                reply: job.reply,
                again,
                sent_before: false,
            },
            job.request,
        )
    }
}

/// How one stream ended.
enum Ended {
    /// Idle or too old with nothing in flight: the forwarder retires.
    Retired,
    /// It broke (or could not open); `answered` says whether the leader answered anything on it.
    Broke { answered: bool },
    /// The leader refused the stream itself (not a transport failure), or ended it because it
    /// is stopping: the publishes on it were answered (with the refusal, or as of unknown
    /// outcome when they may be stored), and the forwarder ends.
    Refused,
}

/// Carries the queued publishes to the leader, in order, and hands each answer to its caller.
///
/// When a stream breaks, the publishes of idempotent producers it had sent go again, first and
/// in their order, on a new stream (the leader answers one it had stored with its original
/// offsets), so a later publish never reaches the leader ahead of an earlier one of the same
/// producer (which would be a sequence gap). Other publishes in flight get an ambiguous
/// UNAVAILABLE (they may be stored). After [`REOPEN_MAX`] failures in a row, every publish
/// still to carry gets that ambiguous answer, and those queued and never sent go back to their
/// callers.
async fn run(
    client: weft_proto::internal::v1::forward_client::ForwardClient<
        crate::grpc::caller::PeerChannel,
    >,
    peers: crate::raft::Peers,
    mut jobs: mpsc::Receiver<Job>,
    leader: u64,
    heard: std::sync::Arc<Heard>,
) {
    let opened = Instant::now();
    // Sent on a stream that broke, to go first, in order, on the next.
    let mut carried: VecDeque<Sent> = VecDeque::new();
    let mut failures = 0u32;
    loop {
        let ended = carry(
            client.clone(),
            &peers,
            &mut jobs,
            &mut carried,
            leader,
            opened,
            &heard,
        )
        .await;
        match ended {
            Ended::Retired | Ended::Refused => break,
            Ended::Broke { answered } => {
                failures = if answered { 1 } else { failures + 1 };
                if carried.is_empty() || failures > REOPEN_MAX {
                    break;
                }
                metrics::counter!("weft_forward_publishes_resent_total")
                    .increment(carried.len() as u64);
                tokio::time::sleep(REOPEN_BACKOFF * 2u32.pow(failures - 1)).await;
            }
        }
    }
    // Dropping their replies tells the callers the outcome is unknown.
    drop(carried);
    close(jobs);
}

/// One stream: sends what `carried` holds, then the queued publishes, until the stream retires
/// or breaks. Publishes in flight when it breaks go back into `carried` when they may be sent
/// again; the others are dropped (their callers hear the outcome is unknown).
async fn carry(
    mut client: weft_proto::internal::v1::forward_client::ForwardClient<
        crate::grpc::caller::PeerChannel,
    >,
    peers: &crate::raft::Peers,
    jobs: &mut mpsc::Receiver<Job>,
    carried: &mut VecDeque<Sent>,
    leader: u64,
    opened: Instant,
    heard: &Heard,
) -> Ended {
    let (outbound, requests) = mpsc::channel(QUEUE_MAX);
    let mut in_flight: VecDeque<Sent> = std::mem::take(carried);
    for sent in &in_flight {
        if let Some(request) = &sent.again
            && outbound.try_send(request.clone()).is_err()
        {
            // Cannot happen (at most QUEUE_MAX are in flight); treat it as a broken stream.
            keep_resendable(in_flight, carried);
            return Ended::Broke { answered: false };
        }
    }
    // At least one publish goes out before the call: the call returns once the leader has
    // answered its headers, and the leader's first answer may wait for it.
    if in_flight.is_empty() {
        let Some(first) = jobs.recv().await else {
            return Ended::Retired;
        };
        let (sent, request) = Sent::of(first);
        in_flight.push_back(sent);
        if outbound.send(request).await.is_err() {
            keep_resendable(in_flight, carried);
            return Ended::Broke { answered: false };
        }
    }
    let call = peers.request(leader, ReceiverStream::new(requests), STREAM_DEADLINE);
    let mut responses = match client.publish_stream(call).await {
        Ok(response) => response.into_inner(),
        Err(status) if transient(status.code()) => {
            tracing::info!(leader, "cannot open the forwarding stream: {status}");
            keep_resendable(in_flight, carried);
            return Ended::Broke { answered: false };
        }
        Err(status) => {
            tracing::warn!(leader, "the leader refused the forwarding stream: {status}");
            for sent in in_flight {
                // One sent on an earlier stream may be stored: dropping its reply says the
                // outcome is unknown. Those never sent get the refusal.
                if !sent.sent_before {
                    let error = BrokerError::from(status.clone());
                    let _ = sent.reply.send(Outcome::Answered(Err(error)));
                }
            }
            return Ended::Refused;
        }
    };
    let mut answered = false;
    loop {
        let idle = tokio::time::sleep(IDLE);
        // Only with nothing queued either: publishes handed back from a retiring stream go
        // again each from its own caller, in whatever order those run (and a caller waiting for
        // room in the queue got in first), so a later publish could reach the leader ahead of an
        // earlier one (helper-122).
        if in_flight.is_empty() && jobs.is_empty() && opened.elapsed() >= AGE_MAX {
            return Ended::Retired;
        }
        tokio::select! {
            job = jobs.recv(), if in_flight.len() < QUEUE_MAX => match job {
                Some(job) => {
                    let (sent, request) = Sent::of(job);
                    in_flight.push_back(sent);
                    if outbound.send(request).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            answer = responses.message() => match answer {
                Ok(Some(result)) => match in_flight.pop_front() {
                    Some(sent) => {
                        answered = true;
                        heard.now();
                        let outcome = answer_of(sent.sent_before, decode_result(result), leader);
                        let _ = sent.reply.send(Outcome::Answered(outcome));
                    }
                    None => {
                        tracing::warn!(leader, "the leader answered a publish that was not sent");
                        break;
                    }
                },
                Ok(None) => break,
                Err(status) if stopping(&status) => {
                    // The leader is stopping: a new stream would find it gone. What it was
                    // sent gets the ambiguous answer; callers go on with the new leader.
                    tracing::info!(leader, "the leader ended the forwarding stream: {status}");
                    drop(in_flight);
                    return Ended::Refused;
                }
                Err(status) => {
                    tracing::info!(leader, "the forwarding stream broke: {status}");
                    break;
                }
            },
            () = idle, if in_flight.is_empty() => return Ended::Retired,
        }
    }
    keep_resendable(in_flight, carried);
    Ended::Broke { answered }
}

/// What the caller of a forwarded publish is told of the leader's answer to it: the answer,
/// or UNAVAILABLE naming `leader` (the outcome is unknown, and the leader answered: it is not
/// passed over as one that did not) for a refusal of a publish sent again after a stream broke
/// (`sent_before`). Its first copy may have been stored, and a refusal that comes before the
/// leader's duplicate check (a full queue, rights taken away meanwhile, ...) says nothing of
/// that copy: passed on, the producer would count the batch as surely not stored and number
/// its next batch into its sequences, which the leader then answers as a duplicate of the
/// stored copy (that next batch lost, reported stored). A duplicate's own answer
/// (DUPLICATE_SEQUENCE: stored, its offsets forgotten) is passed on.
/// Before, its caller was told the stream broke (no leader named), and the leader that had
/// just answered was passed over for every partition for a while (helper-122).
fn answer_of(
    sent_before: bool,
    result: Result<PublishResponse, BrokerError>,
    leader: u64,
) -> Result<PublishResponse, BrokerError> {
    match result {
        Err(e) if sent_before && e.reason_anywhere() != "DUPLICATE_SEQUENCE" => {
            tracing::debug!("a publish sent again was refused ({e}): its outcome is unknown");
            Err(BrokerError::Unavailable {
                reason: format!(
                    "node {leader} refused a publish sent again after the forwarding stream \
                     broke ({e}): its first copy may or may not be stored (retry it with the \
                     same producer sequence)"
                ),
                leader: Some(leader),
            })
        }
        result => result,
    }
}

/// Moves the publishes of `in_flight` that may be sent again into `carried`, in order; the
/// others are dropped (their callers hear the outcome is unknown).
fn keep_resendable(in_flight: VecDeque<Sent>, carried: &mut VecDeque<Sent>) {
    carried.extend(
        in_flight
            .into_iter()
            .filter(|sent| sent.again.is_some())
            .map(|sent| Sent {
                sent_before: true,
                ..sent
            }),
    );
}

/// Whether the leader ended the stream because it is shutting down.
fn stopping(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.message().contains("shutting down")
}

/// Whether a stream that could not open may open on another try (the transport failed, or the
/// leader is busy or stopping), rather than being refused for good.
fn transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Internal
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
    )
}

/// Hands back the publishes still queued (none of them was sent): their callers queue them on a
/// new stream.
fn close(mut jobs: mpsc::Receiver<Job>) {
    jobs.close();
    while let Ok(job) = jobs.try_recv() {
        let _ = job.reply.send(Outcome::NotSent(job.request));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal of a publish sent again after its stream broke leaves its outcome unknown (its
    /// first copy may be stored), naming the leader, which answered: a broker with no replica
    /// does not pass it over (before, the caller was told the stream broke, and the leader was
    /// passed over for every partition for a while); the same refusal of a publish sent once
    /// is passed on, and so is a duplicate's answer and any success.
    #[test]
    fn a_refusal_of_a_publish_sent_again_leaves_its_outcome_unknown() {
        let denied = || {
            BrokerError::from(tonic::Status::from(BrokerError::PermissionDenied(
                "no publish right".into(),
            )))
        };
        let unknown = |answer: Result<PublishResponse, BrokerError>| match answer {
            Err(BrokerError::Unavailable {
                reason,
                leader: Some(3),
            }) => reason.contains("may or may not be stored"),
            _ => false,
        };
        assert!(unknown(answer_of(true, Err(denied()), 3)));
        assert!(unknown(answer_of(
            true,
            Err(BrokerError::Overloaded("publish queue".into())),
            3
        )));
        assert!(matches!(
            answer_of(false, Err(denied()), 3),
            Err(BrokerError::Remote(_))
        ));
        let duplicate = BrokerError::from(tonic::Status::from(BrokerError::DuplicateSequence {
            producer_id: 7,
            expected: 9,
            got: 3,
        }));
        assert!(matches!(
            answer_of(true, Err(duplicate), 3),
            Err(BrokerError::Remote(_))
        ));
        assert!(answer_of(true, Ok(PublishResponse::default()), 3).is_ok());
        // What a broker with no replica learns from the ambiguous answer: node 3 is still the
        // one to send to.
        let hints = crate::grpc::route_hints::RouteHints::default();
        let replicas = [1, 2, 3];
        let write = crate::grpc::route_hints::Purpose::Write;
        hints.learn_write("t", 0, 3, &Ok::<(), BrokerError>(()));
        hints.learn_write("t", 0, 3, &answer_of(true, Err(denied()), 3));
        assert_eq!(hints.pick("t", 0, &replicas, write), Some(3));
    }

    /// Publishes still queued when a stream retires (idle, too old, or broken) were never sent:
    /// they are handed back to their callers to go on a new stream, not refused.
    #[tokio::test]
    async fn publishes_queued_on_a_closing_stream_are_handed_back_unsent() {
        let (sender, jobs) = mpsc::channel(4);
        let mut answers = Vec::new();
        for partition in [3, 4] {
            let (reply, answer) = oneshot::channel();
            let request = ForwardPublishRequest {
                partition,
                ..ForwardPublishRequest::default()
            };
            sender.send(Job { request, reply }).await.expect("queued");
            answers.push(answer);
        }
        close(jobs);
        assert!(
            sender.is_closed(),
            "a closed stream takes no more publishes"
        );
        for (answer, partition) in answers.into_iter().zip([3, 4]) {
            match answer.await.expect("answered") {
                Outcome::NotSent(request) => assert_eq!(request.partition, partition),
                Outcome::Answered(result) => panic!("refused instead of requeued: {result:?}"),
            }
        }
    }
}
