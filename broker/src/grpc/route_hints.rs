//! Where a broker sends the calls of partitions it holds no replica of. It knows the replicas
//! (the controller's metadata) but not which one leads, nor which are up: it learns both from
//! the answers to the calls it forwards. Before, every such call went to the partition's first
//! replica, and all of them failed for as long as that replica was down.
//!
//! - A replica that does not lead answers a publish with UNAVAILABLE and the leader's id: the
//!   next call goes there. A publish stored shows who leads.
//! - Calls stay with the replica that last served the partition (reads that moved from one
//!   replica to another would see its high watermark move back and forth).
//! - A replica that did not answer (the connection failed) is passed over for
//!   [`UNREACHABLE_FOR`], for every partition; one that answered that it cannot serve the
//!   partition now (UNAVAILABLE naming no other leader: its copy is opening, down, or cut off
//!   from its group; DATA_LOSS) is passed over for [`CANNOT_SERVE_FOR`], for that partition.
//! - Only a call that reached the peer, or failed trying, teaches anything: a caller's own
//!   deadline says nothing about the peer.
//! - A partition's high watermark never goes back: reads answered by a replica that lags what
//!   this broker saw served before report the higher one, and one that refuses an offset past
//!   its own end, below what was served, counts as unable to serve (another replica is asked).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::BrokerError;
use crate::raft::NodeId;

/// Partitions whose leader and serving replica are remembered; past it the hints start over
/// (each is re-learned from one answer).
const PARTITIONS_MAX: usize = 100_000;

/// How long a broker that did not answer is passed over.
const UNREACHABLE_FOR: Duration = Duration::from_secs(10);

/// How long a replica that cannot serve a partition is passed over for it.
const CANNOT_SERVE_FOR: Duration = Duration::from_secs(5);

/// What this broker learned about the replicas of partitions it does not host.
#[derive(Debug, Default)]
pub struct RouteHints {
    inner: Mutex<Hints>,
}

type Key = (String, u32);

#[derive(Debug, Default)]
struct Hints {
    /// Leader by (topic id, partition), as last named by a replica or shown by a publish it
    /// stored.
    leaders: HashMap<Key, NodeId>,
    /// The replica that last served a call of the partition.
    serving: HashMap<Key, NodeId>,
    /// When each broker last failed to answer a forwarded call.
    unreachable: HashMap<NodeId, Instant>,
    /// When a replica last answered that it cannot serve a partition.
    cannot_serve: HashMap<(Key, NodeId), Instant>,
    /// The highest high watermark of each partition seen in an answer.
    high_watermarks: HashMap<Key, u64>,
}

/// An answer that reports a partition's high watermark.
pub trait Watermarked {
    /// The high watermark it reports.
    fn high_watermark(&self) -> u64;
    /// Reports `to` instead, a higher one seen before (the partition had committed that far).
    fn raise_high_watermark(&mut self, to: u64);
}

impl Watermarked for weft_proto::v1::FetchResponse {
    fn high_watermark(&self) -> u64 {
        self.high_watermark
    }
    fn raise_high_watermark(&mut self, to: u64) {
        self.high_watermark = to;
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
}

impl Hints {
    /// When `node` was last found unable to serve `key` (None: not lately).
    fn passed_over(&self, key: &Key, node: NodeId) -> Option<Instant> {
        let unreachable = self
            .unreachable
            .get(&node)
            .filter(|at| at.elapsed() < UNREACHABLE_FOR);
        let cannot = self
            .cannot_serve
            .get(&(key.clone(), node))
            .filter(|at| at.elapsed() < CANNOT_SERVE_FOR);
        unreachable.max(cannot).copied()
    }

    fn forget(&mut self, key: &Key, node: NodeId) {
        if self.leaders.get(key) == Some(&node) {
            self.leaders.remove(key);
        }
        if self.serving.get(key) == Some(&node) {
            self.serving.remove(key);
        }
    }

    fn bounded(&mut self, key: &Key) {
        if self.leaders.len() >= PARTITIONS_MAX && !self.leaders.contains_key(key) {
            self.leaders.clear();
        }
        if self.serving.len() >= PARTITIONS_MAX && !self.serving.contains_key(key) {
            self.serving.clear();
        }
        if self.high_watermarks.len() >= PARTITIONS_MAX && !self.high_watermarks.contains_key(key) {
            self.high_watermarks.clear();
        }
        if self.cannot_serve.len() >= PARTITIONS_MAX {
            self.cannot_serve
                .retain(|_, at| at.elapsed() < CANNOT_SERVE_FOR);
            if self.cannot_serve.len() >= PARTITIONS_MAX {
                self.cannot_serve.clear();
            }
        }
    }
}

/// What a forwarded call's outcome says about its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// It served the call (`true`: as the partition's leader).
    Served(bool),
    /// It answered, naming another replica as the leader.
    NamedLeader(NodeId),
    /// It answered that it cannot serve the partition now.
    CannotServe,
    /// It answered something else (the call's own fault: not found, out of range...).
    Answered,
    /// It did not answer: the connection failed.
    Unreachable,
    /// Nothing learned (the caller's deadline ran out, or the call never left this broker).
    Nothing,
}

/// `floor`: the highest high watermark of the partition seen before (0: none).
fn verdict<T>(target: NodeId, outcome: &Result<T, BrokerError>, led: bool, floor: u64) -> Verdict {
    match outcome {
        Ok(_) => Verdict::Served(led),
        Err(BrokerError::Remote(status)) => match status.0.code() {
            tonic::Code::Unavailable => match error_metadata(&status.0, "leader_id") {
                Some(leader) if leader != target && leader != 0 => Verdict::NamedLeader(leader),
                _ => Verdict::CannotServe,
            },
            tonic::Code::DataLoss => Verdict::CannotServe,
            // Its log ends below what was served before: it lags.
            tonic::Code::OutOfRange
                if error_metadata(&status.0, "log_end_offset").is_some_and(|end| end < floor) =>
            {
                Verdict::CannotServe
            }
            _ => Verdict::Answered,
        },
        Err(BrokerError::Unavailable { .. }) => Verdict::Unreachable,
        Err(_) => Verdict::Nothing,
    }
}

impl RouteHints {
    /// The replica of `topic_id`/`partition` (`replicas`, from the metadata) to send a call
    /// to: the leader a replica named last, else the replica that served the partition last,
    /// else the first replica; each only if not passed over lately (when every one is, the
    /// one passed over longest ago).
    pub fn pick(&self, topic_id: &str, partition: u32, replicas: &[NodeId]) -> Option<NodeId> {
        let Ok(hints) = self.inner.lock() else {
            return replicas.first().copied();
        };
        let key = (topic_id.to_string(), partition);
        let preferred = [hints.leaders.get(&key), hints.serving.get(&key)];
        let candidates = preferred
            .into_iter()
            .flatten()
            .copied()
            .chain(replicas.iter().copied())
            .filter(|node| replicas.contains(node));
        let mut oldest: Option<(Instant, NodeId)> = None;
        for node in candidates {
            match hints.passed_over(&key, node) {
                None => return Some(node),
                Some(at) if oldest.is_none_or(|(seen, _)| at < seen) => oldest = Some((at, node)),
                Some(_) => {}
            }
        }
        oldest.map(|(_, node)| node)
    }

    /// Learns from the outcome of a call forwarded to `target` for `topic_id`/`partition`:
    /// `led` when success shows the target leads (a publish it stored). Call it only around
    /// the call to the peer itself.
    pub fn learn<T>(
        &self,
        topic_id: &str,
        partition: u32,
        target: NodeId,
        outcome: &Result<T, BrokerError>,
        led: bool,
    ) {
        let Ok(mut hints) = self.inner.lock() else {
            return;
        };
        let key = (topic_id.to_string(), partition);
        hints.bounded(&key);
        let floor = hints.high_watermarks.get(&key).copied().unwrap_or(0);
        hints.take(key, target, verdict(target, outcome, led, floor));
    }

    /// [`RouteHints::learn`] for a read: an answer reports at least the highest high watermark
    /// seen before. Returns whether another replica should be asked at once (the target did
    /// not answer, or cannot serve the partition now; a read is safe to repeat).
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
        hints.bounded(&key);
        let floor = hints.high_watermarks.get(&key).copied().unwrap_or(0);
        if let Ok(answer) = outcome {
            if answer.high_watermark() < floor {
                answer.raise_high_watermark(floor);
            } else {
                hints
                    .high_watermarks
                    .insert(key.clone(), answer.high_watermark());
            }
        }
        let verdict = verdict(target, outcome, false, floor);
        hints.take(key, target, verdict);
        matches!(verdict, Verdict::Unreachable | Verdict::CannotServe)
    }
}

impl Hints {
    fn take(&mut self, key: Key, target: NodeId, verdict: Verdict) {
        let hints = self;
        match verdict {
            Verdict::Served(led) => {
                hints.unreachable.remove(&target);
                hints.cannot_serve.remove(&(key.clone(), target));
                if led {
                    hints.leaders.insert(key.clone(), target);
                }
                hints.serving.insert(key, target);
            }
            Verdict::NamedLeader(leader) => {
                hints.unreachable.remove(&target);
                // Tried next; but a broker found unreachable here stays passed over (a replica
                // that has not noticed its leader died still names it).
                hints.leaders.insert(key.clone(), leader);
                if hints.serving.get(&key) == Some(&target) {
                    hints.serving.remove(&key);
                }
            }
            Verdict::CannotServe => {
                hints.unreachable.remove(&target);
                hints
                    .cannot_serve
                    .insert((key.clone(), target), Instant::now());
                hints.forget(&key, target);
            }
            Verdict::Answered => {
                hints.unreachable.remove(&target);
            }
            Verdict::Unreachable => {
                hints.unreachable.insert(target, Instant::now());
                hints.forget(&key, target);
            }
            Verdict::Nothing => {}
        }
    }
}

/// A number in a peer's answer's ErrorInfo (`leader_id`, `log_end_offset`...), if any.
fn error_metadata(status: &tonic::Status, name: &str) -> Option<u64> {
    let details = tonic_types::StatusExt::get_error_details(status);
    details.error_info()?.metadata.get(name)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote_unavailable(leader: Option<NodeId>) -> Result<(), BrokerError> {
        Err(BrokerError::from(tonic::Status::from(
            BrokerError::Unavailable {
                reason: "this broker does not lead the partition".into(),
                leader,
            },
        )))
    }

    fn broke() -> Result<(), BrokerError> {
        Err(BrokerError::Unavailable {
            reason: "the forwarding stream to node 1 broke".into(),
            leader: Some(1),
        })
    }

    #[test]
    fn the_first_replica_until_answers_say_otherwise() {
        let hints = RouteHints::default();
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(1));
        assert_eq!(hints.pick("t", 0, &[]), None);
    }

    #[test]
    fn an_unreachable_replica_is_passed_over_and_a_named_leader_followed() {
        let hints = RouteHints::default();
        hints.learn("t", 0, 1, &broke(), true);
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(2), "1 did not answer");
        assert_eq!(hints.pick("t", 1, &[1, 3]), Some(3), "for every partition");

        let named = remote_unavailable(Some(3));
        assert!(matches!(named, Err(BrokerError::Remote(_))));
        hints.learn("t", 0, 2, &named, true);
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(3), "2 named 3");
        assert_eq!(
            hints.pick("t", 0, &[1, 2]),
            Some(2),
            "a named leader no longer a replica is not used"
        );
        // 3 names 1, which did not answer here: 1 stays passed over, and 3 does not lead.
        hints.learn("t", 1, 3, &remote_unavailable(Some(1)), true);
        assert_eq!(hints.pick("t", 1, &[1, 2, 3]), Some(2));
        // 1 answers again.
        hints.learn("t", 0, 1, &Ok::<(), BrokerError>(()), true);
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(1));
    }

    /// A replica that answers but cannot serve the partition (its copy opening or down, or a
    /// leader cut off from its group) is passed over for that partition, not for others.
    #[test]
    fn a_replica_that_cannot_serve_is_passed_over_for_that_partition() {
        let hints = RouteHints::default();
        hints.learn("t", 0, 3, &Ok::<(), BrokerError>(()), true);
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(3));
        hints.learn("t", 0, 3, &remote_unavailable(None), true);
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(1));
        // Naming itself is no better.
        hints.learn("t", 0, 1, &remote_unavailable(Some(1)), false);
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(2));
        assert_eq!(hints.pick("t", 1, &[3, 1]), Some(3), "another partition");
    }

    /// Reads stay with the replica that served them, rather than going back to the first
    /// replica once its mark runs out (their high watermark would move back and forth).
    #[test]
    fn calls_stay_with_the_replica_that_served_them() {
        let hints = RouteHints::default();
        hints.learn("t", 0, 1, &broke(), false);
        let next = hints.pick("t", 0, &[1, 2, 3]).expect("a replica");
        assert_eq!(next, 2);
        hints.learn("t", 0, next, &Ok::<(), BrokerError>(()), false);
        // 1 answers for another partition: reachable again, but partition 0 stays with 2.
        hints.learn("t", 5, 1, &Ok::<(), BrokerError>(()), false);
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(2));
    }

    /// The caller's own deadline says nothing about the peer; with every replica passed over,
    /// the one passed over longest ago is tried.
    #[test]
    fn timeouts_teach_nothing_and_the_oldest_mark_goes_first() {
        let hints = RouteHints::default();
        hints.learn("t", 0, 1, &Ok::<(), BrokerError>(()), true);
        hints.learn(
            "t",
            0,
            1,
            &Err::<(), _>(BrokerError::Timeout("no answer in time".into())),
            true,
        );
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(1));

        let hints = RouteHints::default();
        hints.learn("t", 0, 2, &broke(), false);
        std::thread::sleep(Duration::from_millis(5));
        hints.learn("t", 0, 3, &broke(), false);
        std::thread::sleep(Duration::from_millis(5));
        hints.learn("t", 0, 1, &broke(), false);
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(2));
    }

    /// A read answered by a replica behind what was served before reports the higher high
    /// watermark; one that refuses an offset past its end, below what was served, lags: another
    /// replica is asked, and it is passed over for the partition.
    #[test]
    fn reads_never_see_the_high_watermark_go_back() {
        let hints = RouteHints::default();
        let answer = |high_watermark| {
            Ok::<_, BrokerError>(weft_proto::v1::FetchResponse {
                high_watermark,
                ..Default::default()
            })
        };
        let mut from_2 = answer(110);
        assert!(!hints.learn_read("t", 0, 2, &mut from_2));
        let mut from_1 = answer(10);
        assert!(!hints.learn_read("t", 0, 1, &mut from_1));
        assert_eq!(from_1.expect("answer").high_watermark, 110);
        let mut higher = answer(120);
        assert!(!hints.learn_read("t", 0, 1, &mut higher));
        assert_eq!(higher.expect("answer").high_watermark, 120);

        let past_its_end = |end| {
            Err::<weft_proto::v1::FetchResponse, _>(BrokerError::from(tonic::Status::from(
                BrokerError::OffsetOutOfRange {
                    offset: 115,
                    start: 0,
                    end,
                },
            )))
        };
        assert!(
            hints.learn_read("t", 0, 1, &mut past_its_end(10)),
            "1 lags: ask another"
        );
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(2));
        assert!(
            !hints.learn_read("t", 0, 2, &mut past_its_end(120)),
            "an offset past what any answer showed is the caller's"
        );
    }
}
