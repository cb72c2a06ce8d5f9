//! The clients, in the root namespace: senders publish unique values to keys (a key is one
//! partition of the topic), pollers read keys back by offset, an observer samples every
//! broker's view of each partition's leadership. Every operation goes to the history.
//!
//! A sender is an idempotent producer (its own producer id; an epoch and a sequence per key).
//! An attempt that fails ambiguously (UNAVAILABLE, a timeout, a broken connection) is retried with
//! the same sequence, on any broker, for up to [`SEND_PATIENCE`]: the broker stores it at most
//! once. A send is `ok` with the offset it was stored at, `fail` when the broker said it was
//! not stored (sequence gap, fenced, unknown producer, overloaded, invalid), `info` when its
//! outcome stayed unknown; after a `fail` or `info` the sender starts a new epoch for that key,
//! which fences anything of the old one still on its way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;
use weft_proto::v1::cluster_client::ClusterClient;
use weft_proto::v1::publish_request::Target;
use weft_proto::v1::publisher_client::PublisherClient;
use weft_proto::v1::subscriber_client::SubscriberClient;
use weft_proto::v1::{FetchRequest, ListPartitionsRequest, PublishRequest, Record};

use crate::history::{Function, Kind, Op, Recorder};

/// The topic every run uses.
pub const TOPIC: &str = "jepsen";
/// How long a send keeps retrying an ambiguous attempt (same sequence) before it is `info`.
pub const SEND_PATIENCE: Duration = Duration::from_secs(10);
/// One attempt's deadline.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Records a poll asks for.
const POLL_RECORDS: u32 = 100;
/// Records per fetch of the final reads (every key from offset 0, every replica's copy): long
/// runs hold hundreds of thousands of records.
pub const FINAL_READ_RECORDS: u32 = 5000;

/// A gRPC channel per broker.
#[derive(Debug, Clone)]
pub struct Clients {
    /// (node id, channel).
    pub nodes: Vec<(u64, Channel)>,
}

impl Clients {
    /// Lazily connected channels to `addresses` (node id, host:port).
    pub fn new(addresses: &[(u64, String)]) -> anyhow::Result<Clients> {
        let nodes = addresses
            .iter()
            .map(|(id, address)| {
                let channel = Endpoint::from_shared(format!("http://{address}"))?
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .connect_lazy();
                Ok((*id, channel))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Clients { nodes })
    }

    /// A random broker.
    pub fn any(&self, rng: &mut impl Rng) -> (u64, Channel) {
        self.nodes[rng.random_range(0..self.nodes.len())].clone()
    }

    /// A random broker among those not avoided (any, when all are): a client's load balancer
    /// ejects an endpoint that just failed, as gRPC's outlier detection does.
    pub fn any_but(&self, rng: &mut impl Rng, avoided: &Avoided) -> (u64, Channel) {
        let now = Instant::now();
        let usable: Vec<&(u64, Channel)> = self
            .nodes
            .iter()
            .filter(|(id, _)| avoided.get(id).is_none_or(|until| *until <= now))
            .collect();
        if usable.is_empty() {
            return self.any(rng);
        }
        usable[rng.random_range(0..usable.len())].clone()
    }

    /// Broker `id`.
    pub fn node(&self, id: u64) -> Option<Channel> {
        self.nodes
            .iter()
            .find(|(n, _)| *n == id)
            .map(|(_, c)| c.clone())
    }
}

/// Brokers a client avoids until a moment, after a call to them failed.
pub type Avoided = std::collections::HashMap<u64, Instant>;

/// How long a client avoids a broker after a call to it failed (timed out, unreachable).
const AVOID_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// What the clients have seen, for the final reads: the highest offset per key that a send was
/// acknowledged at or a poll returned.
#[derive(Debug)]
pub struct Progress {
    highest: Vec<AtomicU64>,
    /// Acknowledged sends.
    pub acked: AtomicU64,
}

impl Progress {
    /// For `keys` keys.
    pub fn new(keys: u32) -> Progress {
        Progress {
            highest: (0..keys).map(|_| AtomicU64::new(0)).collect(),
            acked: AtomicU64::new(0),
        }
    }

    fn saw(&self, key: u32, offset: u64) {
        if let Some(h) = self.highest.get(key as usize) {
            h.fetch_max(offset + 1, Ordering::Relaxed);
        }
    }

    /// One past the highest offset seen of `key` (0: none).
    pub fn end(&self, key: u32) -> u64 {
        self.highest
            .get(key as usize)
            .map_or(0, |h| h.load(Ordering::Relaxed))
    }
}

/// A value: unique (sender, number) and self-checking (a CRC of the rest), so a corrupted value
/// that reaches a client is told from one that was never sent.
pub fn make_value(sender: u32, n: u64) -> String {
    let body = format!("s{sender}-{n}");
    format!("{body}-{:08x}", crc32fast::hash(body.as_bytes()))
}

/// Whether `value` is intact (its CRC matches).
pub fn value_is_intact(value: &str) -> bool {
    value
        .rsplit_once('-')
        .and_then(|(body, crc)| {
            u32::from_str_radix(crc, 16)
                .ok()
                .map(|c| crc32fast::hash(body.as_bytes()) == c && crc.len() == 8)
        })
        .unwrap_or(false)
}

/// How a client reads an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Surely not applied.
    Fail,
    /// May have been applied.
    Unknown,
}

/// The gRPC code, the ErrorInfo reason and the message, in one line.
pub fn describe(status: &tonic::Status) -> String {
    let reason = status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default();
    format!("{:?} {reason}: {}", status.code(), status.message())
}

/// The ErrorInfo reasons with which the broker refuses a publish before storing anything (the
/// Rust client's list: one definition of what "surely not stored" means).
pub use weft_client::NOT_STORED_REASONS;

/// Whether a publish that ended with `status` surely did not happen: only when the broker said
/// so, with one of [`NOT_STORED_REASONS`] in its ErrorInfo. A status without the broker's reason
/// comes from the transport (an HTTP/2 reset or protocol error: CANCELLED, INTERNAL, even
/// RESOURCE_EXHAUSTED after a paused broker resumes) and says nothing about what was stored.
pub fn classify_publish(status: &tonic::Status) -> Outcome {
    let reason = status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default();
    if NOT_STORED_REASONS.contains(&reason.as_str()) {
        Outcome::Fail
    } else {
        Outcome::Unknown
    }
}

/// One sender (its index, and whether it publishes without a producer id: the no-dedup
/// canary): publishes unique values to its key (`index % keys`) until `stop`. A sender owns one
/// key, as a Kafka producer batches per partition: a partition that a fault stalls holds up its
/// own senders only, and the others keep the history growing through the fault (a sender that
/// picked a random key for each send would soon wait on the stalled one, every one of them).
pub async fn sender(
    (index, no_dedup): (u32, bool),
    keys: u32,
    clients: Clients,
    recorder: Arc<Recorder>,
    progress: Arc<Progress>,
    stop: watch::Receiver<bool>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let process = format!("s{index}");
    // The no-dedup canary publishes without a producer id: retries can store twice.
    let producer_id = if no_dedup {
        0
    } else {
        rng.random_range(1..u64::MAX / 2)
    };
    // (epoch, next sequence) per key.
    let mut state = vec![(0u32, 0u64); keys as usize];
    let mut n = 0u64;
    let mut avoided = Avoided::new();
    let key = index % keys.max(1);
    while !*stop.borrow() {
        let value = make_value(index, n);
        n += 1;
        let (epoch, sequence) = state[key as usize];
        let id = recorder.next_id();
        let mut op = Op::new(&process, id, Kind::Invoke, Function::Send);
        op.key = Some(key);
        op.value = Some(value.clone());
        recorder.record(op.clone());
        let started = Instant::now();
        // Whether an attempt so far may have stored the value: a later attempt's definite
        // refusal (say TOPIC_NOT_FOUND from a broker whose metadata is behind) does not undo it.
        let mut maybe_stored = false;
        let outcome = loop {
            let (node, channel) = clients.any_but(&mut rng, &avoided);
            let mut request = tonic::Request::new(PublishRequest {
                topic: TOPIC.into(),
                target: Some(Target::Partition(key)),
                records: vec![Record {
                    value: value.clone().into_bytes().into(),
                    ..Record::default()
                }],
                producer_id,
                producer_epoch: epoch,
                base_sequence: sequence,
                ..PublishRequest::default()
            });
            request.set_timeout(ATTEMPT_TIMEOUT);
            let attempt = tokio::time::timeout(
                ATTEMPT_TIMEOUT + Duration::from_secs(1),
                PublisherClient::new(channel).publish(request),
            )
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("client timeout")));
            match attempt {
                Ok(response) => break Ok((node, response.into_inner().base_offset)),
                Err(status) => {
                    let mut outcome = classify_publish(&status);
                    if outcome == Outcome::Unknown {
                        maybe_stored = true;
                        avoided.insert(node, Instant::now() + AVOID_AFTER_FAILURE);
                    } else if maybe_stored {
                        outcome = Outcome::Unknown;
                    }
                    if outcome == Outcome::Fail
                        || started.elapsed() >= SEND_PATIENCE
                        || *stop.borrow()
                    {
                        break Err((node, outcome, describe(&status)));
                    }
                    tokio::time::sleep(Duration::from_millis(rng.random_range(20..100))).await;
                }
            }
        };
        match outcome {
            Ok((node, offset)) => {
                state[key as usize].1 += 1;
                progress.saw(key, offset);
                progress.acked.fetch_add(1, Ordering::Relaxed);
                op.kind = Kind::Ok;
                op.node = Some(node);
                op.offset = Some(offset);
            }
            Err((node, outcome, error)) => {
                // A new epoch fences whatever of this one is still on its way.
                state[key as usize] = (epoch + 1, 0);
                op.kind = if outcome == Outcome::Fail {
                    Kind::Fail
                } else {
                    Kind::Info
                };
                op.node = Some(node);
                op.error = Some(error);
            }
        }
        recorder.record(op);
    }
}

/// Reads `key` from `offset` on `channel` (up to `max_records`): (offset, value) pairs, and
/// the broker's high watermark.
pub async fn fetch(
    channel: Channel,
    key: u32,
    offset: u64,
    max_records: u32,
) -> Result<(Vec<(u64, String)>, u64), tonic::Status> {
    let mut request = tonic::Request::new(FetchRequest {
        topic: TOPIC.into(),
        partition: key,
        offset,
        max_records,
        ..FetchRequest::default()
    });
    request.set_timeout(ATTEMPT_TIMEOUT);
    let response = tokio::time::timeout(
        ATTEMPT_TIMEOUT + Duration::from_secs(1),
        SubscriberClient::new(channel).fetch(request),
    )
    .await
    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("client timeout")))?
    .into_inner();
    let records = response
        .records
        .into_iter()
        .map(|r| (r.offset, String::from_utf8_lossy(&r.value).into_owned()))
        .collect();
    Ok((records, response.high_watermark))
}

/// One poll of `key` from `offset` through a random broker, recorded as `f`.
pub async fn poll_once(
    process: &str,
    f: Function,
    key: u32,
    offset: u64,
    (node, channel): (u64, Channel),
    recorder: &Recorder,
    progress: &Progress,
) -> Option<(Vec<(u64, String)>, u64)> {
    let mut op = Op::new(process, recorder.next_id(), Kind::Invoke, f);
    op.key = Some(key);
    op.offset = Some(offset);
    op.node = Some(node);
    recorder.record(op.clone());
    let max_records = if f == Function::FinalPoll {
        FINAL_READ_RECORDS
    } else {
        POLL_RECORDS
    };
    match fetch(channel, key, offset, max_records).await {
        Ok((records, high_watermark)) => {
            if let Some((last, _)) = records.last() {
                progress.saw(key, *last);
            }
            op.kind = Kind::Ok;
            op.records = Some(records.clone());
            recorder.record(op);
            Some((records, high_watermark))
        }
        Err(status) => {
            // A read changes nothing: a failed one surely did not happen.
            op.kind = Kind::Fail;
            op.error = Some(describe(&status));
            recorder.record(op);
            None
        }
    }
}

/// One poller: reads random keys onward from where it got to, until `stop`.
pub async fn poller(
    index: u32,
    keys: u32,
    clients: Clients,
    recorder: Arc<Recorder>,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let process = format!("p{index}");
    let mut positions = vec![0u64; keys as usize];
    let mut avoided = Avoided::new();
    while !*stop.borrow() {
        // A random key each time: every key is read while the faults run, whatever the
        // number of pollers (pinned to one key each, 3 pollers left a fourth key unread).
        let key = rng.random_range(0..keys.max(1));
        let from = positions[key as usize];
        let (node, channel) = clients.any_but(&mut rng, &avoided);
        match poll_once(
            &process,
            Function::Poll,
            key,
            from,
            (node, channel),
            &recorder,
            &progress,
        )
        .await
        {
            Some((records, _)) => {
                if let Some((last, _)) = records.last() {
                    positions[key as usize] = last + 1;
                }
            }
            None => {
                avoided.insert(node, Instant::now() + AVOID_AFTER_FAILURE);
            }
        }
        let _ = tokio::time::timeout(
            Duration::from_millis(rng.random_range(5..30)),
            stop.changed(),
        )
        .await;
    }
}

/// Samples each broker's view of every partition's (term, leader) every 200 ms until `stop`,
/// recording each change (for the election-safety check).
pub async fn observer(clients: Clients, recorder: Arc<Recorder>, mut stop: watch::Receiver<bool>) {
    let mut last: std::collections::HashMap<(u64, u32), (u64, u64)> = Default::default();
    while !*stop.borrow() {
        for (node, channel) in &clients.nodes {
            let mut request = tonic::Request::new(ListPartitionsRequest {
                topic: TOPIC.into(),
            });
            request.set_timeout(Duration::from_millis(500));
            let answer = tokio::time::timeout(
                Duration::from_secs(1),
                ClusterClient::new(channel.clone()).list_partitions(request),
            )
            .await;
            let Ok(Ok(answer)) = answer else {
                continue;
            };
            for p in answer.into_inner().partitions {
                if p.leader_id == 0 {
                    continue;
                }
                let seen = (p.leader_term, p.leader_id);
                if last.insert((*node, p.partition), seen) != Some(seen) {
                    let mut op =
                        Op::new("observer", recorder.next_id(), Kind::Ok, Function::Leader);
                    op.key = Some(p.partition);
                    op.node = Some(*node);
                    op.detail = Some(format!("{} {}", seen.0, seen.1));
                    recorder.record(op);
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), stop.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_check_themselves() {
        let v = make_value(3, 1234);
        assert!(value_is_intact(&v), "{v}");
        let mut damaged = v.clone().into_bytes();
        damaged[1] ^= 1;
        assert!(!value_is_intact(&String::from_utf8_lossy(&damaged)));
        assert!(!value_is_intact("s1-2"));
        assert!(!value_is_intact("garbage"));
    }

    #[test]
    fn only_refusals_that_store_nothing_are_failures() {
        use tonic::Code;
        use tonic_types::{ErrorDetails, StatusExt};
        let with_reason = |code, reason: &str| {
            let mut details = ErrorDetails::new();
            details.set_error_info(reason, "weft.dev", std::collections::HashMap::new());
            tonic::Status::with_error_details(code, "refused", details)
        };
        assert_eq!(
            classify_publish(&with_reason(Code::ResourceExhausted, "OVERLOADED")),
            Outcome::Fail
        );
        assert_eq!(
            classify_publish(&with_reason(Code::FailedPrecondition, "SEQUENCE_GAP")),
            Outcome::Fail
        );
        // Stored long ago: not a failure.
        assert_eq!(
            classify_publish(&with_reason(Code::FailedPrecondition, "DUPLICATE_SEQUENCE")),
            Outcome::Unknown
        );
        assert_eq!(
            classify_publish(&with_reason(Code::Unavailable, "UNAVAILABLE")),
            Outcome::Unknown
        );
        // The transport's errors carry no reason (seen: RESOURCE_EXHAUSTED "h2 protocol error"
        // for a publish that was stored).
        for code in [
            Code::ResourceExhausted,
            Code::Internal,
            Code::Cancelled,
            Code::FailedPrecondition,
        ] {
            assert_eq!(
                classify_publish(&tonic::Status::new(code, "h2 protocol error")),
                Outcome::Unknown
            );
        }
    }
}
