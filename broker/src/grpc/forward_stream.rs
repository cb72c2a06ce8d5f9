//! Ordered forwarding of publishes: a broker that does not lead a partition hands its publishes
//! to the leader over one `Forward.PublishStream` per (leader, topic, partition), in the order
//! they reached it. Independent unary calls could overtake each other on the way (each is its
//! own HTTP/2 stream and server task), and a client's pipelined idempotent publishes would then
//! arrive out of sequence and be refused with sequence gaps.

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
    /// The stream closed before sending it (idle, replaced, or broken): it goes again on a new
    /// stream.
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

/// The forwarding streams of one broker, by leader and partition.
#[derive(Debug, Default)]
pub(crate) struct Forwarders {
    streams: Mutex<HashMap<Key, mpsc::Sender<Job>>>,
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
            leader: Some(leader),
        };
        // The whole wait, room in the queue included, stays within the caller's deadline.
        let waited = tokio::time::timeout(timeout, async {
            let mut request = request;
            for _ in 0..REQUEUE_MAX {
                let sender = self.sender(node, key.clone(), leader, peer_address)?;
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
                            leader: Some(leader),
                        });
                    }
                }
            }
            Err(not_sent())
        })
        .await;
        waited.unwrap_or_else(|_| {
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
    ) -> Result<mpsc::Sender<Job>, BrokerError> {
        let mut streams = self
            .streams
            .lock()
            .map_err(|_| BrokerError::Internal("forwarding streams poisoned".into()))?;
        streams.retain(|_, s| !s.is_closed());
        if let Some(sender) = streams.get(&key) {
            return Ok(sender.clone());
        }
        let client = super::forward_to(node, leader, peer_address, "PublishStream")?;
        let (sender, jobs) = mpsc::channel(QUEUE_MAX);
        let (outbound, requests) = mpsc::channel(QUEUE_MAX);
        let call = node
            .peers()
            .request(leader, ReceiverStream::new(requests), STREAM_DEADLINE);
        tokio::spawn(run(client, call, outbound, jobs, leader));
        streams.insert(key, sender.clone());
        Ok(sender)
    }
}

/// Carries the queued publishes over one stream and hands each answer to its caller, in order.
/// When the stream ends or breaks, the publishes in flight get an ambiguous UNAVAILABLE (they
/// may be stored), and those not sent yet a plain one.
async fn run(
    mut client: weft_proto::internal::v1::forward_client::ForwardClient<
        crate::grpc::caller::PeerChannel,
    >,
    call: tonic::Request<ReceiverStream<ForwardPublishRequest>>,
    outbound: mpsc::Sender<ForwardPublishRequest>,
    mut jobs: mpsc::Receiver<Job>,
    leader: u64,
) {
    let opened = Instant::now();
    let mut in_flight: VecDeque<Reply> = VecDeque::new();
    // The first job goes out before the call: the call returns once the leader has answered
    // its headers, and the leader's first answer may wait for it.
    let Some(first) = jobs.recv().await else {
        return;
    };
    in_flight.push_back(first.reply);
    if outbound.send(first.request).await.is_err() {
        return;
    }
    let mut responses = match client.publish_stream(call).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            tracing::info!(leader, "cannot open the forwarding stream: {status}");
            if let Some(reply) = in_flight.pop_front() {
                let _ = reply.send(Outcome::Answered(Err(BrokerError::from(status))));
            }
            close(jobs);
            return;
        }
    };
    loop {
        let idle = tokio::time::sleep(IDLE);
        let retire = in_flight.is_empty() && opened.elapsed() >= AGE_MAX;
        if retire {
            break;
        }
        tokio::select! {
            job = jobs.recv(), if in_flight.len() < QUEUE_MAX => match job {
                Some(job) => {
                    in_flight.push_back(job.reply);
                    if outbound.send(job.request).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            answer = responses.message() => match answer {
                Ok(Some(result)) => match in_flight.pop_front() {
                    Some(reply) => {
                        let _ = reply.send(Outcome::Answered(decode_result(result)));
                    }
                    None => {
                        tracing::warn!(leader, "the leader answered a publish that was not sent");
                        break;
                    }
                },
                Ok(None) => break,
                Err(status) => {
                    tracing::info!(leader, "the forwarding stream broke: {status}");
                    break;
                }
            },
            () = idle, if in_flight.is_empty() => break,
        }
    }
    // In flight: dropping their replies tells the callers the outcome is unknown.
    drop(in_flight);
    close(jobs);
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
