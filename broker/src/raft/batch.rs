//! AppendEntries batched per peer: every group's AppendEntries to one peer goes through that
//! peer's batcher, which sends the appends ready at the same moment in one
//! `Raft.AppendEntriesBatch` call, and holds heartbeats (appends with no entries) for up to
//! [`HEARTBEAT_COALESCE`] to send them with others. Only idle groups' heartbeats wait: a group
//! that sent entries lately sends its empty appends at once (openraft has one append in flight
//! per group and peer, so a held one would stall the group's replication). So a broker with many idle partitions makes
//! a bounded number of calls per peer and second, whatever the number of groups. Batches are
//! sent side by side (a slow one does not hold the next back); openraft keeps at most one
//! AppendEntries in flight per group and peer, so a group's appends stay in order.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use weft_proto::internal::v1 as pb;

use super::NodeId;
use super::network::{PEER_MESSAGE_BYTES_MAX, Peers};

/// How long a heartbeat may wait for others to go with it (a small fraction of the heartbeat
/// interval and of the election timeout).
pub(super) const HEARTBEAT_COALESCE: Duration = Duration::from_millis(20);
/// Most groups in one batch.
const BATCH_GROUPS_MAX: usize = 512;
/// Most encoded bytes in one batch (a single larger append goes alone).
const BATCH_BYTES_MAX: usize = PEER_MESSAGE_BYTES_MAX / 2;
/// Appends queued towards one peer (beyond it, groups wait for room).
const QUEUE_MAX: usize = 4096;

/// One group's AppendEntries waiting to go.
pub(super) struct Pending {
    pub(super) request: pb::AppendEntriesRequest,
    /// Sent at once even with no entries: the group is busy (an empty append then carries its
    /// commit index, and the group's next append waits for it to come back).
    pub(super) urgent: bool,
    pub(super) timeout: Duration,
    pub(super) reply: oneshot::Sender<Result<pb::AppendEntriesResponse, Status>>,
}

impl Pending {
    /// An idle group's heartbeat: it may wait for others to go with it.
    fn is_heartbeat(&self) -> bool {
        self.request.entries.is_empty() && !self.urgent
    }

    fn size(&self) -> usize {
        prost::Message::encoded_len(&self.request)
    }
}

/// Starts the batcher of peer `target` at `address`; returns its queue.
pub(super) fn start(peers: Peers, target: NodeId, address: String) -> mpsc::Sender<Pending> {
    let (sender, queue) = mpsc::channel(QUEUE_MAX);
    tokio::spawn(run(peers, target, address, queue));
    sender
}

async fn run(peers: Peers, target: NodeId, address: String, mut queue: mpsc::Receiver<Pending>) {
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match queue.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let deadline = tokio::time::Instant::now()
            + if first.is_heartbeat() {
                HEARTBEAT_COALESCE
            } else {
                Duration::ZERO
            };
        let mut bytes = first.size();
        let mut has_data = !first.is_heartbeat();
        let mut batch = vec![first];
        loop {
            let next = match queue.try_recv() {
                Ok(p) => Some(p),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) if has_data => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, queue.recv())
                        .await
                        .ok()
                        .flatten()
                }
            };
            let Some(next) = next else { break };
            let size = next.size();
            if batch.len() >= BATCH_GROUPS_MAX || bytes + size > BATCH_BYTES_MAX {
                carried = Some(next);
                break;
            }
            has_data |= !next.is_heartbeat();
            bytes += size;
            batch.push(next);
        }
        // Heartbeats travel apart from data: the answer to a batch waits for its slowest
        // append (a data append's fsync there), and openraft gives a heartbeat one heartbeat
        // interval.
        let (heartbeats, data): (Vec<Pending>, Vec<Pending>) =
            batch.into_iter().partition(Pending::is_heartbeat);
        for part in [heartbeats, data] {
            if !part.is_empty() {
                tokio::spawn(send(peers.clone(), target, address.clone(), part));
            }
        }
    }
}

/// Sends one batch and hands each group its result. A peer that does not know the batch call
/// (an older broker during a rolling upgrade) gets the appends one by one.
async fn send(peers: Peers, target: NodeId, address: String, batch: Vec<Pending>) {
    let timeout = batch
        .iter()
        .map(|p| p.timeout)
        .max()
        .unwrap_or(Duration::from_secs(1));
    let mut client = match peers.raft_client(&address) {
        Ok(client) => client,
        Err(reason) => {
            for p in batch {
                let _ = p.reply.send(Err(Status::unavailable(reason.clone())));
            }
            return;
        }
    };
    let peer = target.to_string();
    metrics::histogram!("weft_raft_append_groups_per_call", "peer" => peer.clone())
        .record(batch.len() as f64);
    let (requests, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|p| ((p.request, p.timeout), p.reply))
        .unzip();
    let call = peers.request(
        target,
        pb::AppendEntriesBatchRequest {
            requests: requests.iter().map(|(r, _)| r.clone()).collect(),
        },
        timeout,
    );
    let started = std::time::Instant::now();
    // Bounded here too, not only by the peer: a peer that stopped answering (frozen, or
    // behind a black hole) would otherwise keep every abandoned batch's bytes here until the
    // connection's keepalive gives up, while openraft sends the same entries again.
    let answer = match tokio::time::timeout(timeout, client.append_entries_batch(call)).await {
        Ok(answer) => answer,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer from node {target} within {} ms",
            timeout.as_millis()
        ))),
    };
    metrics::histogram!("weft_raft_append_call_seconds", "peer" => peer)
        .record(started.elapsed().as_secs_f64());
    match answer {
        Ok(response) => {
            let mut results = response.into_inner().results.into_iter();
            for reply in replies {
                let result = match results.next() {
                    Some(pb::AppendEntriesResult {
                        response: Some(response),
                        ..
                    }) => Ok(response),
                    Some(failed) => {
                        Err(Status::new(tonic::Code::from(failed.code), failed.message))
                    }
                    None => Err(Status::internal("the peer answered fewer results")),
                };
                let _ = reply.send(result);
            }
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            for ((request, timeout), reply) in requests.into_iter().zip(replies) {
                if reply.is_closed() {
                    // Its group gave up waiting: nothing to send.
                    continue;
                }
                let call = peers.request(target, request, timeout);
                let result = tokio::time::timeout(timeout, client.append_entries(call))
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in time")))
                    .map(|r| r.into_inner());
                let _ = reply.send(result);
            }
        }
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}
