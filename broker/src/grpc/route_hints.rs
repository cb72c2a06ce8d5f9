//! Where a broker sends the calls of partitions it holds no replica of. It knows the replicas
//! (the controller's metadata) but not which one leads, nor which are up: it learns both from
//! the answers to the calls it forwards. Before, every such call went to the partition's first
//! replica, and all of them failed for as long as that replica was down.
//!
//! - A replica that does not lead answers a publish with UNAVAILABLE and the leader's id: the
//!   next call goes there (even if that one could not serve a moment ago). A publish stored
//!   shows who leads.
//! - Reads stay with the replica that last served the partition (reads that moved from one
//!   replica to another would see its high watermark move back and forth).
//! - A replica that did not answer (the connection failed) is passed over for
//!   [`UNREACHABLE_FOR`], for every partition, whatever other replicas say (one that has not
//!   noticed its leader died still names it). One that answered that it cannot serve the
//!   partition now (UNAVAILABLE naming no other leader: its copy is opening or down, or it is
//!   cut off from its group) is passed over for [`CANNOT_SERVE_FOR`], for that partition. One
//!   whose reads lag (DATA_LOSS; an offset refused as past its end, or nothing to read, below
//!   the highest high watermark seen) is passed over for reads of that partition for
//!   [`LAGGING_FOR`].
//! - Only a call that reached the peer, or failed trying, teaches anything: a caller's own
//!   deadline, and a refusal made here before calling (it names the node it would have
//!   called), say nothing about the peer.
//! - A partition's high watermark never goes back in the answers reads get: one answered by a
//!   replica behind the highest seen (within [`HIGH_WATERMARK_KEPT_FOR`]) reports that one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::BrokerError;
use crate::raft::NodeId;

/// Partitions whose leader, serving replica and high watermark are remembered; past it a map
/// starts over (each entry is re-learned from one answer).
const PARTITIONS_MAX: usize = 100_000;

/// How long a broker that did not answer is passed over.
const UNREACHABLE_FOR: Duration = Duration::from_secs(10);

/// How long a replica that cannot serve a partition is passed over for it.
const CANNOT_SERVE_FOR: Duration = Duration::from_secs(2);

/// How long a replica whose reads of a partition lag is passed over for them.
const LAGGING_FOR: Duration = Duration::from_secs(5);

/// How long the highest high watermark seen counts without an answer reaching it again (a
/// topic deleted and created again under a name this broker still maps to the old one, data
/// lost on every replica: then no replica reaches it again, and it is forgotten).
const HIGH_WATERMARK_KEPT_FOR: Duration = Duration::from_secs(30);

/// What this broker learned about the replicas of partitions it does not host.
#[derive(Debug, Default)]
pub struct RouteHints {
    inner: Mutex<Hints>,
}

type Key = (String, u32);

/// What a call is for: a write goes to the leader; a read may be served by any replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A publish.
    Write,
    /// A Fetch or GetOffsets.
    Read,
}

#[derive(Debug, Default)]
struct Hints {
    /// Leader by (topic id, partition), as last named by a replica or shown by a publish it
    /// stored.
    leaders: HashMap<Key, NodeId>,
    /// The replica that last served a read of the partition.
    serving: HashMap<Key, NodeId>,
    /// When each broker last failed to answer a forwarded call.
    unreachable: HashMap<NodeId, Instant>,
    /// When a replica last answered that it cannot serve a partition.
    cannot_serve: HashMap<(Key, NodeId), Instant>,
    /// When a replica's reads of a partition last lagged.
    lagging: HashMap<(Key, NodeId), Instant>,
    /// The highest high watermark of each partition seen in an answer, and when an answer last
    /// reached it.
    high_watermarks: HashMap<Key, (u64, Instant)>,
}

/// Inserts into a map bounded at [`PARTITIONS_MAX`] entries: a new key into a full map clears
/// it first.
fn bounded_insert<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, key: K, value: V) {
    if map.len() >= PARTITIONS_MAX && !map.contains_key(&key) {
        map.clear();
    }
    map.insert(key, value);
}

/// Whether `at` is within `lasting` of now.
fn recent(at: Option<&Instant>, lasting: Duration) -> Option<Instant> {
    at.filter(|at| at.elapsed() < lasting).copied()
}

impl Hints {
    /// When `node` was last found unable to serve `key` for `purpose` (None: not lately).
    fn passed_over(&self, key: &Key, node: NodeId, purpose: Purpose) -> Option<Instant> {
        let pair = (key.clone(), node);
        let unreachable = recent(self.unreachable.get(&node), UNREACHABLE_FOR);
        let cannot = recent(self.cannot_serve.get(&pair), CANNOT_SERVE_FOR);
        let lagging = match purpose {
            Purpose::Read => recent(self.lagging.get(&pair), LAGGING_FOR),
            Purpose::Write => None,
        };
        unreachable.max(cannot).max(lagging)
    }

    fn high_watermark(&self, key: &Key) -> u64 {
        self.high_watermarks
            .get(key)
            .filter(|(_, at)| at.elapsed() < HIGH_WATERMARK_KEPT_FOR)
            .map_or(0, |(high_watermark, _)| *high_watermark)
    }

    fn forget(&mut self, key: &Key, node: NodeId) {
        if self.leaders.get(key) == Some(&node) {
            self.leaders.remove(key);
        }
        if self.serving.get(key) == Some(&node) {
            self.serving.remove(key);
        }
    }

    /// Marks `node` for `key` in `marks` (a map bounded like the others: expired marks go
    /// first).
    fn mark(
        marks: &mut HashMap<(Key, NodeId), Instant>,
        key: &Key,
        node: NodeId,
        lasting: Duration,
    ) {
        if marks.len() >= PARTITIONS_MAX {
            marks.retain(|_, at| at.elapsed() < lasting);
        }
        bounded_insert(marks, (key.clone(), node), Instant::now());
    }

    fn take(&mut self, key: Key, target: NodeId, verdict: Verdict) {
        match verdict {
            Verdict::Served { led, read } => {
                self.unreachable.remove(&target);
                self.cannot_serve.remove(&(key.clone(), target));
                if read {
                    self.lagging.remove(&(key.clone(), target));
                    bounded_insert(&mut self.serving, key.clone(), target);
                }
                if led {
                    bounded_insert(&mut self.leaders, key, target);
                }
            }
            Verdict::NamedLeader(leader) => {
                self.unreachable.remove(&target);
                // Tried next, even if it could not serve a moment ago (it may again now); but a
                // broker that did not answer here stays passed over.
                self.cannot_serve.remove(&(key.clone(), leader));
                if self.serving.get(&key) == Some(&target) {
                    self.serving.remove(&key);
                }
                bounded_insert(&mut self.leaders, key, leader);
            }
            Verdict::CannotServe => {
                self.unreachable.remove(&target);
                Self::mark(&mut self.cannot_serve, &key, target, CANNOT_SERVE_FOR);
                self.forget(&key, target);
            }
            Verdict::Lagging => {
                self.unreachable.remove(&target);
                Self::mark(&mut self.lagging, &key, target, LAGGING_FOR);
                if self.serving.get(&key) == Some(&target) {
                    self.serving.remove(&key);
                }
            }
            Verdict::Answered => {
                self.unreachable.remove(&target);
            }
            Verdict::Unreachable => {
                self.unreachable.insert(target, Instant::now());
                self.forget(&key, target);
            }
            Verdict::Nothing => {}
        }
    }
}

/// An answer that reports a partition's high watermark.
pub trait Watermarked {
    /// The high watermark it reports.
    fn high_watermark(&self) -> u64;
    /// Reports `to` instead, a higher one seen before (the partition had committed that far).
    fn raise_high_watermark(&mut self, to: u64);
    /// Whether it gave nothing to read (a Fetch without records).
    fn nothing_read(&self) -> bool;
}

impl Watermarked for weft_proto::v1::FetchResponse {
    fn high_watermark(&self) -> u64 {
        self.high_watermark
    }
    fn raise_high_watermark(&mut self, to: u64) {
        self.high_watermark = to;
    }
    fn nothing_read(&self) -> bool {
        self.records.is_empty()
    }
}

impl Watermarked for weft_proto::v1::PartitionOffsets {
    fn high_watermark(&self) -> u64 {
        self.high_watermark
    }
    fn raise_high_watermark(&mut self, to: u64) {
        self.high_watermark = to;
        self.log_end_offset = self.log_end_offset.max(to);
    }
    fn nothing_read(&self) -> bool {
        false
    }
}

/// What a forwarded call's outcome says about its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// It served the call: `led`, as the partition's leader (a publish it stored); `read`, a
    /// read.
    Served { led: bool, read: bool },
    /// It answered, naming another replica as the leader.
    NamedLeader(NodeId),
    /// It answered that it cannot serve the partition now.
    CannotServe,
    /// Its reads of the partition lag what was served before (or its copy is damaged).
    Lagging,
    /// It answered something else (the call's own fault: not found, out of range...).
    Answered,
    /// It did not answer: the connection failed.
    Unreachable,
    /// Nothing learned (the caller's deadline ran out, or the call never left this broker).
    Nothing,
}

/// The verdict on a call to `target`; `floor`: the highest high watermark of the partition
/// seen before (0: none).
fn verdict<T>(
    target: NodeId,
    outcome: &Result<T, BrokerError>,
    purpose: Purpose,
    floor: u64,
) -> Verdict {
    match outcome {
        Ok(_) => Verdict::Served {
            led: purpose == Purpose::Write,
            read: purpose == Purpose::Read,
        },
        Err(error @ BrokerError::Remote(status)) => match status.0.code() {
            tonic::Code::Unavailable => match error.named_leader() {
                Some(leader) if leader != target => Verdict::NamedLeader(leader),
                _ => Verdict::CannotServe,
            },
            tonic::Code::DataLoss => Verdict::Lagging,
            // Its log ends below what was served before: it lags.
            tonic::Code::OutOfRange
                if crate::grpc::subscribe::retained_range(error)
                    .is_some_and(|(_, end)| end < floor) =>
            {
                Verdict::Lagging
            }
            _ => Verdict::Answered,
        },
        // Made here because the connection failed (a refusal made before calling names the
        // node it would have called).
        Err(BrokerError::Unavailable { leader: None, .. }) => Verdict::Unreachable,
        Err(_) => Verdict::Nothing,
    }
}

impl RouteHints {
    /// The replica of `topic_id`/`partition` (`replicas`, from the metadata) to send a call
    /// for `purpose` to: the leader named last; for a read, else the replica that served the
    /// last read; else the first replica; each only if not passed over lately (when every one
    /// is, the one passed over longest ago).
    pub fn pick(
        &self,
        topic_id: &str,
        partition: u32,
        replicas: &[NodeId],
        purpose: Purpose,
    ) -> Option<NodeId> {
        let Ok(hints) = self.inner.lock() else {
            return replicas.first().copied();
        };
        let key = (topic_id.to_string(), partition);
        let serving = match purpose {
            Purpose::Read => hints.serving.get(&key),
            Purpose::Write => None,
        };
        let candidates = [hints.leaders.get(&key), serving]
            .into_iter()
            .flatten()
            .copied()
            .chain(replicas.iter().copied())
            .filter(|node| replicas.contains(node));
        let mut oldest: Option<(Instant, NodeId)> = None;
        for node in candidates {
            match hints.passed_over(&key, node, purpose) {
                None => return Some(node),
                Some(at) if oldest.is_none_or(|(seen, _)| at < seen) => oldest = Some((at, node)),
                Some(_) => {}
            }
        }
        oldest.map(|(_, node)| node)
    }

    /// Learns from the outcome of a publish forwarded to `target` for `topic_id`/`partition`.
    pub fn learn_write<T>(
        &self,
        topic_id: &str,
        partition: u32,
        target: NodeId,
        outcome: &Result<T, BrokerError>,
    ) {
        let Ok(mut hints) = self.inner.lock() else {
            return;
        };
        let key = (topic_id.to_string(), partition);
        let verdict = verdict(target, outcome, Purpose::Write, 0);
        hints.take(key, target, verdict);
    }

    /// Learns from the outcome of a read forwarded to `target` for `topic_id`/`partition`; an
    /// answer reports at least the highest high watermark seen before. Returns whether another
    /// replica should be asked at once (the target did not answer, or not in time, cannot serve
    /// the partition now, or lags; a read is safe to repeat).
    pub fn learn_read<T: Watermarked>(
        &self,
        topic_id: &str,
        partition: u32,
        target: NodeId,
        outcome: &mut Result<T, BrokerError>,
    ) -> bool {
        let Ok(mut hints) = self.inner.lock() else {
            return false;
        };
        let key = (topic_id.to_string(), partition);
        let floor = hints.high_watermark(&key);
        let mut verdict = match verdict(target, outcome, Purpose::Read, floor) {
            // Any replica serves reads: a leader a read refusal names is another group's (the
            // controller's, which a read with a group waits for), not the partition's. The
            // replica cannot serve the read now; it stays a candidate for publishes.
            Verdict::NamedLeader(_) => Verdict::Lagging,
            // A forwarded read waits this broker's own time for its replica (its
            // `request_timeout_ms`, plus a long poll's wait), never the caller's deadline: a
            // replica that did not answer by then (paused, its disk stalled) is passed over like
            // one that cannot be reached. Before, it stayed the one asked first, and every read
            // through this broker timed out there for as long as it did not answer.
            Verdict::Nothing if matches!(outcome, Err(BrokerError::Timeout(_))) => {
                Verdict::Unreachable
            }
            other => other,
        };
        if let Ok(answer) = outcome {
            if answer.high_watermark() < floor {
                // Behind: and with nothing to read, it would keep a reader waiting there.
                if answer.nothing_read() {
                    verdict = Verdict::Lagging;
                }
                answer.raise_high_watermark(floor);
            } else {
                bounded_insert(
                    &mut hints.high_watermarks,
                    key.clone(),
                    (answer.high_watermark(), Instant::now()),
                );
            }
        }
        hints.take(key, target, verdict);
        matches!(
            verdict,
            Verdict::Unreachable | Verdict::CannotServe | Verdict::Lagging
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::v1::FetchResponse;

    const ALL: [NodeId; 3] = [1, 2, 3];

    fn remote(error: BrokerError) -> BrokerError {
        BrokerError::from(tonic::Status::from(error))
    }

    fn remote_unavailable(leader: Option<NodeId>) -> Result<(), BrokerError> {
        Err(remote(BrokerError::Unavailable {
            reason: "this broker does not lead the partition".into(),
            leader,
        }))
    }

    /// A forwarding stream that broke (the connection failed).
    fn broke<T>() -> Result<T, BrokerError> {
        Err(BrokerError::Unavailable {
            reason: "the forwarding stream to node 1 broke".into(),
            leader: None,
        })
    }

    fn fetched(high_watermark: u64, records: usize) -> Result<FetchResponse, BrokerError> {
        Ok(FetchResponse {
            high_watermark,
            records: vec![Default::default(); records],
            ..Default::default()
        })
    }

    fn past_its_end(end: u64) -> Result<FetchResponse, BrokerError> {
        Err(remote(BrokerError::OffsetOutOfRange {
            offset: 115,
            start: 0,
            end,
        }))
    }

    #[test]
    fn the_first_replica_until_answers_say_otherwise() {
        let hints = RouteHints::default();
        assert_eq!(hints.pick("t", 0, &ALL, Purpose::Write), Some(1));
        assert_eq!(hints.pick("t", 0, &ALL, Purpose::Read), Some(1));
        assert_eq!(hints.pick("t", 0, &[], Purpose::Read), None);
    }

    #[test]
    fn an_unreachable_replica_is_passed_over_and_a_named_leader_followed() {
        let w = Purpose::Write;
        let hints = RouteHints::default();
        hints.learn_write("t", 0, 1, &broke::<()>());
        assert_eq!(hints.pick("t", 0, &ALL, w), Some(2), "1 did not answer");
        assert_eq!(
            hints.pick("t", 1, &[1, 3], w),
            Some(3),
            "for every partition"
        );

        let named = remote_unavailable(Some(3));
        assert!(matches!(named, Err(BrokerError::Remote(_))));
        hints.learn_write("t", 0, 2, &named);
        assert_eq!(hints.pick("t", 0, &ALL, w), Some(3), "2 named 3");
        assert_eq!(
            hints.pick("t", 0, &[1, 2], w),
            Some(2),
            "a named leader no longer a replica is not used"
        );
        // 3 names 1, which did not answer here: 1 stays passed over.
        hints.learn_write("t", 1, 3, &remote_unavailable(Some(1)));
        assert_ne!(hints.pick("t", 1, &ALL, w), Some(1));
        // 1 answers again.
        hints.learn_write("t", 0, 1, &Ok::<(), BrokerError>(()));
        assert_eq!(hints.pick("t", 0, &ALL, w), Some(1));
    }

    /// A replica that answers but cannot serve the partition (its copy opening or down, or a
    /// leader cut off from its group) is passed over for that partition, not for others, until
    /// another replica names it the leader.
    #[test]
    fn a_replica_that_cannot_serve_is_passed_over_until_named_again() {
        let w = Purpose::Write;
        let hints = RouteHints::default();
        hints.learn_write("t", 0, 3, &Ok::<(), BrokerError>(()));
        assert_eq!(hints.pick("t", 0, &ALL, w), Some(3));
        hints.learn_write("t", 0, 3, &remote_unavailable(None));
        assert_eq!(hints.pick("t", 0, &ALL, w), Some(1));
        // Naming itself is no better.
        hints.learn_write("t", 0, 1, &remote_unavailable(Some(1)));
        assert_eq!(hints.pick("t", 0, &ALL, w), Some(2));
        assert_eq!(hints.pick("t", 1, &[3, 1], w), Some(3), "another partition");
        // 2 names 3 the leader: it is tried again.
        hints.learn_write("t", 0, 2, &remote_unavailable(Some(3)));
        assert_eq!(hints.pick("t", 0, &ALL, w), Some(3));
    }

    /// Reads stay with the replica that served them, rather than going back to the first
    /// replica once its mark runs out; a replica whose reads lag is passed over for reads, not
    /// for publishes.
    #[test]
    fn reads_stay_with_the_replica_that_served_them() {
        let r = Purpose::Read;
        let hints = RouteHints::default();
        assert!(hints.learn_read("t", 0, 1, &mut broke::<FetchResponse>()));
        let next = hints.pick("t", 0, &ALL, r).expect("a replica");
        assert_eq!(next, 2);
        assert!(!hints.learn_read("t", 0, next, &mut fetched(10, 1)));
        // 1 answers for another partition: reachable again, but partition 0 stays with 2.
        assert!(!hints.learn_read("t", 5, 1, &mut fetched(10, 1)));
        assert_eq!(hints.pick("t", 0, &ALL, r), Some(2));
        // 2 does not answer in time (paused): another replica is asked, and then first.
        assert!(hints.learn_read(
            "t",
            0,
            2,
            &mut Err::<FetchResponse, _>(BrokerError::Timeout("no answer in time".into()))
        ));
        assert_eq!(hints.pick("t", 0, &ALL, r), Some(1));
        assert!(!hints.learn_read("t", 0, 1, &mut fetched(10, 1)));
        assert_eq!(hints.pick("t", 0, &ALL, r), Some(1));

        // A leader known from publishes; its copy then refuses a read as damaged.
        hints.learn_write("t", 0, 3, &Ok::<(), BrokerError>(()));
        assert_eq!(hints.pick("t", 0, &ALL, r), Some(3));
        let mut damaged: Result<FetchResponse, _> = Err(remote(BrokerError::DataLoss {
            detail: "crc".into(),
            segment: "00.log".into(),
            position: 0,
        }));
        assert!(hints.learn_read("t", 0, 3, &mut damaged), "ask another");
        assert_ne!(hints.pick("t", 0, &ALL, r), Some(3));
        assert_eq!(
            hints.pick("t", 0, &ALL, Purpose::Write),
            Some(3),
            "publishes"
        );

        // A read refused naming a leader (the controller's, whose state a read with a group
        // waits for): another replica is asked, and publishes still go to the partition's.
        let mut refused: Result<FetchResponse, _> = Err(remote(BrokerError::Unavailable {
            reason: "the controller state is behind".into(),
            leader: Some(1),
        }));
        assert!(hints.learn_read("t", 0, 2, &mut refused));
        assert_eq!(hints.pick("t", 0, &ALL, Purpose::Write), Some(3));
    }

    /// The caller's own deadline, and refusals made here before calling, say nothing about the
    /// peer; with every replica passed over, the one passed over longest ago is tried.
    #[test]
    fn what_teaches_nothing_and_the_oldest_mark_goes_first() {
        let w = Purpose::Write;
        let hints = RouteHints::default();
        hints.learn_write("t", 0, 1, &Ok::<(), BrokerError>(()));
        hints.learn_write(
            "t",
            0,
            1,
            &Err::<(), _>(BrokerError::Timeout("no answer in time".into())),
        );
        hints.learn_write(
            "t",
            0,
            1,
            &Err::<(), _>(BrokerError::Unavailable {
                reason: "node 1, which holds the partition, is not known yet".into(),
                leader: Some(1),
            }),
        );
        assert_eq!(hints.pick("t", 0, &ALL, w), Some(1));

        let hints = RouteHints::default();
        hints.learn_write("t", 0, 2, &broke::<()>());
        std::thread::sleep(Duration::from_millis(5));
        hints.learn_write("t", 0, 3, &broke::<()>());
        std::thread::sleep(Duration::from_millis(5));
        hints.learn_write("t", 0, 1, &broke::<()>());
        assert_eq!(hints.pick("t", 0, &ALL, w), Some(2));
    }

    /// A read answered by a replica behind what was served before reports the higher high
    /// watermark, and if it had nothing to give, or refused an offset past its end below what
    /// was served, it lags: another replica is asked, and it is passed over for reads.
    #[test]
    fn reads_never_see_the_high_watermark_go_back() {
        let r = Purpose::Read;
        let hints = RouteHints::default();
        let mut from_2 = fetched(110, 1);
        assert!(!hints.learn_read("t", 0, 2, &mut from_2));
        let mut from_1 = fetched(10, 1);
        assert!(!hints.learn_read("t", 0, 1, &mut from_1), "it gave records");
        assert_eq!(from_1.expect("answer").high_watermark, 110);
        let mut higher = fetched(120, 1);
        assert!(!hints.learn_read("t", 0, 1, &mut higher));
        assert_eq!(higher.expect("answer").high_watermark, 120);

        assert!(hints.learn_read("t", 0, 1, &mut past_its_end(10)), "1 lags");
        assert_eq!(hints.pick("t", 0, &ALL, r), Some(2));
        assert!(
            !hints.learn_read("t", 0, 2, &mut past_its_end(130)),
            "an offset past what any answer showed is the caller's"
        );
        let mut nothing_behind = fetched(100, 0);
        assert!(
            hints.learn_read("t", 0, 2, &mut nothing_behind),
            "2 lags now"
        );
        assert_eq!(nothing_behind.expect("answer").high_watermark, 120);
        assert_eq!(hints.pick("t", 0, &ALL, r), Some(3));
    }
}
