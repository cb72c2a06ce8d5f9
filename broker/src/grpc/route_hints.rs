//! Where a broker sends the calls of partitions it holds no replica of. It knows the replicas
//! (the controller's metadata) but not which one leads, nor which are up: it learns both from
//! the answers to the calls it forwards. A replica that does not lead answers UNAVAILABLE with
//! the leader's id, which the next call goes to; a replica that could not be reached is passed
//! over for a while. Before, every such call went to the partition's first replica, and all of
//! them failed for as long as that replica was down.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::BrokerError;
use crate::raft::NodeId;

/// Partitions whose leader is remembered; past it the hints start over (each is re-learned
/// from one answer).
const LEADERS_MAX: usize = 100_000;

/// How long a replica that could not be reached is passed over (unless a replica names it as
/// the leader since).
const UNREACHABLE_FOR: Duration = Duration::from_secs(10);

/// What this broker learned about the replicas of partitions it does not host.
#[derive(Debug, Default)]
pub struct RouteHints {
    inner: Mutex<Hints>,
}

#[derive(Debug, Default)]
struct Hints {
    /// Leader by (topic id, partition), as last named by a replica or shown by a publish it
    /// stored.
    leaders: HashMap<(String, u32), NodeId>,
    /// When each broker last failed to answer a forwarded call.
    unreachable: HashMap<NodeId, Instant>,
}

impl Hints {
    fn unreachable(&self, node: NodeId) -> bool {
        self.unreachable
            .get(&node)
            .is_some_and(|at| at.elapsed() < UNREACHABLE_FOR)
    }
}

impl RouteHints {
    /// The replica of `topic_id`/`partition` (`replicas`, from the metadata) to send a call
    /// to: the leader a replica named last, else the first replica not found unreachable
    /// lately, else the first.
    pub fn pick(&self, topic_id: &str, partition: u32, replicas: &[NodeId]) -> Option<NodeId> {
        let Ok(hints) = self.inner.lock() else {
            return replicas.first().copied();
        };
        if let Some(&leader) = hints.leaders.get(&(topic_id.to_string(), partition))
            && replicas.contains(&leader)
            && !hints.unreachable(leader)
        {
            return Some(leader);
        }
        replicas
            .iter()
            .copied()
            .find(|&n| !hints.unreachable(n))
            .or_else(|| replicas.first().copied())
    }

    /// Learns from the outcome of a call forwarded to `target` for `topic_id`/`partition`:
    /// `led` when an answer shows the target leads (a publish it stored).
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
        match outcome {
            Ok(_) => {
                hints.unreachable.remove(&target);
                if led {
                    remember(&mut hints, key, target);
                }
            }
            // The target answered: it is up; with a leader's id when it does not lead.
            Err(BrokerError::Remote(status)) => {
                hints.unreachable.remove(&target);
                if let Some(leader) = named_leader(&status.0) {
                    // A replica names the leader: reachable as far as it knows, tried next.
                    hints.unreachable.remove(&leader);
                    remember(&mut hints, key, leader);
                }
            }
            // No answer: the connection failed, or the call timed out.
            Err(BrokerError::Unavailable { .. } | BrokerError::Timeout(_)) => {
                hints.unreachable.insert(target, Instant::now());
                if hints.leaders.get(&key) == Some(&target) {
                    hints.leaders.remove(&key);
                }
            }
            Err(_) => {}
        }
    }
}

fn remember(hints: &mut Hints, key: (String, u32), leader: NodeId) {
    if hints.leaders.len() >= LEADERS_MAX && !hints.leaders.contains_key(&key) {
        hints.leaders.clear();
    }
    hints.leaders.insert(key, leader);
}

/// The leader a peer's UNAVAILABLE answer names (`leader_id` in its ErrorInfo), if any.
fn named_leader(status: &tonic::Status) -> Option<NodeId> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    let details = tonic_types::StatusExt::get_error_details(status);
    details
        .error_info()?
        .metadata
        .get("leader_id")?
        .parse()
        .ok()
        .filter(|&id| id != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote_unavailable(leader: Option<NodeId>) -> BrokerError {
        BrokerError::from(tonic::Status::from(BrokerError::Unavailable {
            reason: "this broker does not lead the partition".into(),
            leader,
        }))
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
        let broke: Result<(), _> = Err(BrokerError::Unavailable {
            reason: "the forwarding stream to node 1 broke".into(),
            leader: Some(1),
        });
        hints.learn("t", 0, 1, &broke, true);
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(2), "1 did not answer");
        assert_eq!(hints.pick("t", 1, &[1, 3]), Some(3), "for every partition");

        let named: Result<(), _> = Err(remote_unavailable(Some(3)));
        assert!(matches!(named, Err(BrokerError::Remote(_))));
        hints.learn("t", 0, 2, &named, true);
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(3), "2 named 3");
        assert_eq!(
            hints.pick("t", 0, &[1, 2]),
            Some(2),
            "a named leader no longer a replica is not used"
        );

        // An answer without a leader changes nothing but the target's reachability.
        hints.learn("t", 0, 2, &Err::<(), _>(remote_unavailable(None)), true);
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(3));
        // The leader stops answering: the next live replica.
        let timed_out: Result<(), _> = Err(BrokerError::Timeout("no answer".into()));
        hints.learn("t", 0, 3, &timed_out, true);
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(2));
        // 1 answers again.
        hints.learn("t", 0, 1, &Ok::<(), BrokerError>(()), true);
        assert_eq!(hints.pick("t", 0, &[1, 2, 3]), Some(1));
    }
}
