//! A producer's publish stream to one topic: the batches of every partition travel over one
//! `PublishStream` call (HTTP/2 DATA frames on one stream, no call set-up per batch). The lane
//! numbers the requests of each stream and asks the broker to answer each as soon as it is
//! stored (`weft-answer-order: any`), so one partition's answer never waits behind another's.
//! The partition senders keep their windows, sequences and retry rules; only the transport is
//! shared.
//!
//! The broker ends a stream at its first failing request. That request gets its status (the
//! broker names it in a trailer); every other request not yet answered gets UNAVAILABLE with
//! reason `STREAM_ENDED` (it may or may not have been stored, so its sender resends it with the
//! same sequence, and an idempotent producer never stores it twice), and the next batch opens a
//! new stream. A request not answered within the client's timeout fails the same way
//! (DEADLINE_EXCEEDED for it, STREAM_ENDED for the others). A stream is also replaced after
//! [`STREAM_AGE_MAX`], so a mesh can rebalance it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Client, Error, Result, proto};

/// Requests of one stream sent and not yet answered, at most.
pub(crate) const STREAM_IN_FLIGHT_MAX: usize = 128;
/// A stream older than this takes no new requests; the next ones go on a new stream.
pub(crate) const STREAM_AGE_MAX: Duration = Duration::from_secs(60);

struct Job {
    request: proto::PublishRequest,
    reply: oneshot::Sender<Result<proto::PublishResponse>>,
}

/// The way into a topic's publish stream. Cloned into every partition sender of a producer.
#[derive(Clone)]
pub(crate) struct PublishLane {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for PublishLane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishLane").finish_non_exhaustive()
    }
}

impl PublishLane {
    /// Starts the stream task of `topic` (it ends when every lane handle is gone).
    pub(crate) fn start(client: Client, topic: Arc<str>) -> PublishLane {
        let (jobs, inbox) = mpsc::channel(STREAM_IN_FLIGHT_MAX);
        tokio::spawn(run(client, topic, inbox));
        PublishLane { jobs }
    }

    /// Publishes one request over the stream.
    pub(crate) async fn publish(
        &self,
        request: proto::PublishRequest,
    ) -> Result<proto::PublishResponse> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { request, reply })
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }
}

/// Sent and waiting for its answer.
struct Pending {
    deadline: Instant,
    reply: oneshot::Sender<Result<proto::PublishResponse>>,
}

/// The requests of one stream sent and not yet answered, by `request_id`: the lane numbers
/// them 1, 2, ... on each stream, so ids are unique on it and the smallest is the oldest.
type Unanswered = BTreeMap<u64, Pending>;

fn timed_out(client: &Client) -> Error {
    Error::Timeout(format!("no answer within {:?}", client.timeout()))
}

fn stream_ended(why: &str) -> Error {
    Error::Status {
        code: tonic::Code::Unavailable,
        message: format!(
            "not answered: the publish stream ended ({why}); it may or may not have been stored"
        ),
        reason: "STREAM_ENDED".into(),
        leader_id: None,
    }
}

/// Fails everything still waiting: the request `first` names (the oldest one when it names
/// none) with its error, the rest as not answered.
fn fail_all(pending: &mut Unanswered, first: Option<(Option<u64>, Error)>, why: &str) {
    tracing::debug!(
        why,
        first = first.as_ref().map(|(_, e)| e.to_string()),
        unanswered = pending.len(),
        "publish stream ended"
    );
    if let Some((named, error)) = first {
        let id = named.or_else(|| pending.first_key_value().map(|(id, _)| *id));
        if let Some(p) = id.and_then(|id| pending.remove(&id)) {
            let _ = p.reply.send(Err(error));
        }
    }
    while let Some((_, p)) = pending.pop_first() {
        let _ = p.reply.send(Err(stream_ended(why)));
    }
}

/// Fails the requests queued for the lane and not yet sent, as not answered: a stream that
/// could not be opened (`why`) would hold each of them as long again. Their senders try again
/// (with the same sequence: they count as maybe stored), towards the partition's leader as the
/// client then knows it.
fn fail_queued(inbox: &mut mpsc::Receiver<Job>, why: &str) {
    while let Ok(job) = inbox.try_recv() {
        let _ = job.reply.send(Err(stream_ended(why)));
    }
}

/// The request a status that ended the stream names: the broker's `weft-request-id` trailer,
/// or, for a request it could not read (too large, say), the first one still unanswered after
/// the request its `weft-request-after` trailer names (requests are numbered in the order they
/// are sent, and the broker reads them in that order).
fn failed_request(status: &tonic::Status, pending: &Unanswered) -> Option<u64> {
    let trailer = |key| {
        status
            .metadata()
            .get(key)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    trailer(weft_proto::REQUEST_ID_TRAILER).or_else(|| {
        let after = trailer(weft_proto::REQUEST_AFTER_TRAILER)?;
        pending
            .range(after.saturating_add(1)..)
            .next()
            .map(|(id, _)| *id)
    })
}

async fn run(client: Client, topic: Arc<str>, mut inbox: mpsc::Receiver<Job>) {
    loop {
        // Open a stream when there is something to send; stop when every handle is gone.
        let Some(mut first) = inbox.recv().await else {
            return;
        };
        let (requests, outbound) = mpsc::channel(STREAM_IN_FLIGHT_MAX);
        let mut call = client.request(ReceiverStream::new(outbound), Some(&topic), None);
        // The stream lives long; each request has its own deadline, kept here.
        call.metadata_mut().remove("grpc-timeout");
        // Each partition's answer as soon as it is stored, not behind other partitions'.
        call.metadata_mut().insert(
            weft_proto::ANSWER_ORDER_HEADER,
            tonic::metadata::MetadataValue::from_static("any"),
        );
        let opened = Instant::now();
        let mut pending = Unanswered::default();
        let first_id = 1u64;
        let mut next_id = first_id + 1;
        first.request.request_id = first_id;
        if requests.send(first.request).await.is_err() {
            let _ = first.reply.send(Err(stream_ended("could not send")));
            continue;
        }
        pending.insert(
            first_id,
            Pending {
                deadline: Instant::now() + client.timeout(),
                reply: first.reply,
            },
        );
        let mut responses =
            match tokio::time::timeout(client.timeout(), client.publisher().publish_stream(call))
                .await
            {
                Ok(Ok(response)) => response.into_inner(),
                Ok(Err(status)) => {
                    fail_all(&mut pending, Some((None, Error::from(status))), "refused");
                    fail_queued(&mut inbox, "refused");
                    continue;
                }
                Err(_) => {
                    fail_all(
                        &mut pending,
                        Some((None, timed_out(&client))),
                        "not opened in time",
                    );
                    // The broker did not open a stream in the whole timeout: the requests
                    // queued meanwhile would each wait as long again for a stream of their own.
                    fail_queued(&mut inbox, "not opened in time");
                    continue;
                }
            };
        let mut requests = Some(requests);
        loop {
            let taking = requests.is_some()
                && pending.len() < STREAM_IN_FLIGHT_MAX
                && opened.elapsed() < STREAM_AGE_MAX;
            if !taking && pending.is_empty() {
                break;
            }
            // Every request has the same timeout from when it is sent: the oldest one's
            // deadline comes first. (Not from when it was queued: a busy stream's requests
            // wait behind others, and the first to pass its deadline would end the stream.)
            let deadline = pending.first_key_value().map(|(_, p)| p.deadline);
            tokio::select! {
                job = inbox.recv(), if taking => match job {
                    Some(mut job) => {
                        let request_id = next_id;
                        next_id += 1;
                        job.request.request_id = request_id;
                        let sent = match &requests {
                            Some(tx) => tx.send(job.request).await.is_ok(),
                            None => false,
                        };
                        if sent {
                            pending.insert(request_id, Pending {
                                deadline: Instant::now() + client.timeout(),
                                reply: job.reply,
                            });
                        } else {
                            let _ = job.reply.send(Err(stream_ended("closed")));
                        }
                    }
                    // Every producer handle is gone: finish what was sent, then stop.
                    None => requests = None,
                },
                answer = responses.message() => match answer {
                    // In any order (a broker that keeps request order is one case of it).
                    Ok(Some(response)) => match pending.remove(&response.request_id) {
                        Some(p) => {
                            let _ = p.reply.send(Ok(response));
                        }
                        None => {
                            fail_all(&mut pending, None, "an answer to no request of the stream");
                            break;
                        }
                    },
                    Ok(None) => {
                        fail_all(&mut pending, None, "closed by the broker");
                        break;
                    }
                    Err(status) => {
                        let named = failed_request(&status, &pending);
                        fail_all(&mut pending, Some((named, Error::from(status))), "an earlier request failed");
                        break;
                    }
                },
                () = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    fail_all(&mut pending, Some((None, timed_out(&client))), "an earlier request timed out");
                    break;
                }
            }
        }
    }
}
