//! Leadership transfer, built from what openraft 0.9 offers (it has no transfer call).

use std::collections::{BTreeSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{GroupId, NodeId, Peers, Raft};
use crate::error::BrokerError;

/// How much longer than a maximum election timeout a transfer holds back heartbeats before the
/// target stands, so that every follower's lease has run out.
const TRANSFER_PAUSE_EXTRA: Duration = Duration::from_millis(100);

/// A replica at most this many entries behind counts as caught up when a transfer chooses its
/// target (entries in flight come and go: exact equality would be a matter of which replica
/// answered last).
const CAUGHT_UP_LAG_ENTRIES: u64 = 16;

/// The longest a transfer's target may go without catching up any further, in leases (maximum
/// election timeouts), while proposals are refused.
const CATCH_UP_LEASES: u32 = 3;

/// How often a transfer waiting for its target to catch up checks that it still answers.
const CATCH_UP_RECHECK: Duration = Duration::from_millis(100);

/// The shortest time a transfer waits for its target's answer to the call to stand.
const ELECT_CALL_TIMEOUT_MIN: Duration = Duration::from_secs(1);

/// When transfers held back a group's heartbeats (followers then have nothing to answer,
/// though nothing is wrong with them): the last few pauses, (held back at, resumed at).
#[derive(Debug, Default)]
pub(crate) struct HeartbeatPause(Mutex<VecDeque<(Instant, Option<Instant>)>>);

/// Pauses remembered (older ones no longer matter: an answer older than them is stale anyway).
const PAUSES_KEPT: usize = 4;

impl HeartbeatPause {
    fn hold(&self) {
        if let Ok(mut p) = self.0.lock() {
            if p.len() == PAUSES_KEPT {
                p.pop_front();
            }
            p.push_back((Instant::now(), None));
        }
    }

    fn resume(&self) {
        if let Ok(mut p) = self.0.lock()
            && let Some((_, resumed @ None)) = p.back_mut()
        {
            *resumed = Some(Instant::now());
        }
    }

    /// How old an answer received at `contact` counts as: the time since, less the time the
    /// heartbeats were held back since (a follower that answered every heartbeat before a
    /// pause is as fresh after it as before).
    pub(crate) fn age(&self, contact: Instant) -> Duration {
        let now = Instant::now();
        let paused: Duration = self
            .0
            .lock()
            .map(|p| {
                p.iter()
                    .map(|(held, resumed)| {
                        let from = (*held).max(contact);
                        resumed.unwrap_or(now).saturating_duration_since(from)
                    })
                    .sum()
            })
            .unwrap_or_default();
        now.saturating_duration_since(contact)
            .saturating_sub(paused)
    }
}

/// `WEFT_TEST_TRANSFER_STALL_MS`: a test hook that makes a leader wait that much longer after
/// its pause before it calls the target's election (a leader that dies in between).
fn transfer_stall() -> Option<Duration> {
    crate::test_hook_ms("WEFT_TEST_TRANSFER_STALL_MS")
}

/// Undoes what a transfer set up, however it ends (also when its caller gives up and drops it):
/// heartbeats and proposals resume.
struct Transferring<'a> {
    raft: &'a Raft,
    to: Option<&'a AtomicU64>,
    pause: Option<&'a HeartbeatPause>,
    /// The voters were asked to hold their elections for a transfer to this node (the hold's
    /// id), and it has not succeeded: they are released (best effort), so that a leader lost
    /// soon after a failed transfer is replaced without waiting out the hold. A transfer that
    /// fails releases them itself, before a next transfer may start; this is for a caller that
    /// gives up. (The id keeps a late release from ending a later transfer's hold.)
    held: Option<(Peers, GroupId, NodeId, u64)>,
}

impl Drop for Transferring<'_> {
    fn drop(&mut self) {
        if let Some((peers, group_id, target, id)) = self.held.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let raft = self.raft.clone();
            runtime.spawn(async move {
                peers
                    .hold_elections(
                        group_id,
                        &raft,
                        target,
                        Duration::ZERO,
                        Duration::ZERO,
                        id,
                        false,
                    )
                    .await;
            });
        }
        self.raft.runtime_config().heartbeat(true);
        if let Some(p) = self.pause {
            p.resume();
        }
        if let Some(t) = self.to {
            t.store(0, Ordering::SeqCst);
        }
    }
}

/// Moves a group's leadership from this node (which must lead it) to `target`, or to the most
/// caught-up other voter that answers: this leader stops proposing (when `transferring_to` is
/// given, proposals check it and answer UNAVAILABLE naming the target), waits until the target
/// has every entry, asks the other voters to hold their elections ([`Peers::hold_elections`]),
/// stops its heartbeats until the followers' leader leases have run out (one maximum election
/// timeout), then asks the target to stand for election (`Raft.Elect`), and waits until it
/// leads. Heartbeats and proposals resume whatever happened (also when the caller gives up);
/// one transfer of a group runs at a time. A target that has not answered this leader within
/// that timeout is refused at once (UNAVAILABLE), and so is a transfer to a named target that
/// another replica won. Returns the new leader.
///
/// Chosen by this leader, the target is one of the voters not in `avoid` (brokers draining or
/// being removed: they would have to hand it on again) when one of those answers; one in
/// `avoid` only when no other does. With no voter to choose at all the answer is
/// [`BrokerError::NoTransferTarget`].
#[allow(clippy::too_many_arguments)]
pub(crate) async fn transfer_leadership(
    raft: &Raft,
    peers: &Peers,
    group_id: GroupId,
    target: Option<NodeId>,
    avoid: &BTreeSet<NodeId>,
    timeout: Duration,
    transferring_to: Option<&AtomicU64>,
    pause: Option<&HeartbeatPause>,
) -> Result<NodeId, BrokerError> {
    let m = raft.metrics().borrow().clone();
    let me = m.id;
    if m.current_leader != Some(me) {
        return Err(BrokerError::Unavailable {
            reason: "this broker does not lead the group".into(),
            leader: m.current_leader,
        });
    }
    let membership = m.membership_config.membership().clone();
    let others: Vec<NodeId> = membership.voter_ids().filter(|v| *v != me).collect();
    let matched = |id: &NodeId| super::matched_index(&m, *id);
    let lease = Duration::from_millis(raft.config().election_timeout_max);
    // (Measured as the in-sync set measures it: less the time earlier transfers held back
    // the heartbeats.)
    let answered = |id: &NodeId| {
        peers
            .last_contact(group_id, *id)
            .is_some_and(|t| pause.map_or_else(|| t.elapsed(), |p| p.age(t)) <= lease)
    };
    let explicit = target.is_some();
    let target = match target {
        Some(t) if t == me => return Ok(me),
        Some(t) if others.contains(&t) => t,
        Some(t) => {
            return Err(BrokerError::invalid(
                "to_node_id",
                format!("node {t} holds no voting replica of this partition"),
            ));
        }
        // One a transfer this node chose did not fail to lately first, then one caught up
        // (within a few entries: a replica far behind would keep proposals refused until it
        // has every entry), then one not to avoid, then the furthest.
        None => *others
            .iter()
            .filter(|id| answered(id))
            .max_by_key(|id| {
                let lag = m
                    .last_log_index
                    .unwrap_or(0)
                    .saturating_sub(matched(id).unwrap_or(0));
                (
                    !peers.transfer_failed_within(group_id, **id, lease * 3),
                    lag <= CAUGHT_UP_LAG_ENTRIES,
                    !avoid.contains(id),
                    matched(id),
                )
            })
            .ok_or_else(|| BrokerError::NoTransferTarget {
                reason: "the partition has no other replica that answers to lead it".into(),
                leader: me,
            })?,
    };
    // Chosen by this leader although it drains, and no replica that answers is free of that: a
    // draining target takes it. Named by the caller, not known here to drain, or with another
    // replica that could take it (further behind, or a transfer to it failed lately: the
    // ranking puts those first), it refuses, and the next try goes elsewhere.
    let last_resort = !explicit
        && avoid.contains(&target)
        && others.iter().all(|id| avoid.contains(id) || !answered(id));
    // A target that has not answered lately (down, cut off) could not stand: the leader would
    // refuse proposals and hold back its heartbeats for nothing (and the other followers'
    // leases run out).
    if !answered(&target) {
        return Err(BrokerError::Unavailable {
            reason: format!(
                "node {target} has not answered this leader within {} ms",
                lease.as_millis()
            ),
            leader: Some(me),
        });
    }
    // One transfer of a group at a time (a drain, the balancer and an operator may ask at
    // once): a second would resume the heartbeats the first holds back.
    if let Some(t) = transferring_to
        && let Err(running) = t.compare_exchange(0, target, Ordering::SeqCst, Ordering::SeqCst)
    {
        return Err(BrokerError::TransferUnderWay {
            to: running,
            leader: me,
        });
    }
    let mut transferring = Transferring {
        raft,
        to: transferring_to,
        pause,
        held: None,
    };
    let outcome = async {
        // Proposals are refused from here: the log ends at `last` until the transfer ends.
        let (last, term) = {
            let metrics = raft.metrics().borrow().clone();
            (metrics.last_log_index, metrics.current_term)
        };
        // Only while the target answers, makes progress (a few leases without, and it is given
        // up) and this node leads in the same term, and at most the caller's timeout: proposals
        // are refused all along. Before, the wait was the caller's whole timeout whatever
        // happened, and a leader whose target died (or that lost its term meanwhile) refused
        // every write for up to 30 s (helper-124).
        let deadline = Instant::now() + timeout;
        let stall = lease * CATCH_UP_LEASES;
        let mut progress = (
            super::matched_index(&raft.metrics().borrow(), target),
            Instant::now(),
        );
        let mut watch = raft.metrics();
        loop {
            {
                let m = watch.borrow_and_update();
                let matched = super::matched_index(&m, target);
                if matched >= last {
                    break;
                }
                if m.current_term != term || m.current_leader != Some(me) {
                    return Err(BrokerError::Unavailable {
                        reason: format!(
                            "this node stopped leading the group while node {target} caught up"
                        ),
                        leader: m.current_leader,
                    });
                }
                if matched > progress.0 {
                    progress = (matched, Instant::now());
                }
            }
            if !answered(&target) {
                return Err(BrokerError::Unavailable {
                    reason: format!(
                        "node {target} stopped answering while it caught up to lead: the \
                         leadership stays"
                    ),
                    leader: Some(me),
                });
            }
            let now = Instant::now();
            if now >= deadline || now.duration_since(progress.1) >= stall {
                return Err(BrokerError::Timeout(format!(
                    "transfer to node {target}: it did not catch up (no progress for {} ms, or \
                     not within {} ms)",
                    stall.as_millis(),
                    timeout.as_millis()
                )));
            }
            let left = deadline
                .min(progress.1 + stall)
                .saturating_duration_since(now);
            if let Ok(Err(_)) =
                tokio::time::timeout(left.min(CATCH_UP_RECHECK), watch.changed()).await
            {
                return Err(BrokerError::Unavailable {
                    reason: "the group stopped during the transfer".into(),
                    leader: None,
                });
            }
        }
        // The other voters stand for no election meanwhile (their leases run out too), long
        // enough for the pause, the call to the target and its election (which moves the term
        // on, and so ends the hold), with a lease to spare for a target slow to stand. The
        // target stands by itself if this leader's call has not come half a lease after the
        // pause (this leader died meanwhile: the others would wait out their hold).
        let hold_id = super::network::new_hold_id();
        transferring.held = Some((peers.clone(), group_id, target, hold_id));
        // A target that will not lead (draining since this leader chose it) says so here,
        // before the heartbeats stop: the transfer ends and the followers' holds are lifted.
        if let Some(refused) = peers
            .hold_elections(
                group_id,
                raft,
                target,
                lease * 3 + TRANSFER_PAUSE_EXTRA,
                lease + TRANSFER_PAUSE_EXTRA + lease / 2,
                hold_id,
                last_resort,
            )
            .await
        {
            return Err(BrokerError::Conflict(format!(
                "the transfer's target refused: {refused}"
            )));
        }
        if let Some(p) = pause {
            p.hold();
        }
        raft.runtime_config().heartbeat(false);
        tokio::time::sleep(lease + TRANSFER_PAUSE_EXTRA).await;
        if let Some(stall) = transfer_stall() {
            tokio::time::sleep(stall).await;
        }
        let address = membership
            .get_node(&target)
            .map(|n| n.addr.clone())
            .ok_or_else(|| BrokerError::Internal(format!("node {target} has no address")))?;
        // The target only triggers its election and answers: one that does not answer within
        // a lease (frozen since it last answered, say) is not waited for the whole timeout,
        // and the caller may try another.
        let request = peers.request(
            target,
            weft_proto::internal::v1::ElectRequest {
                group_id,
                term,
                leader_id: me,
                last_resort,
            },
            timeout.min(lease.max(ELECT_CALL_TIMEOUT_MIN)),
        );
        let mut client =
            peers
                .raft_client(&address)
                .map_err(|reason| BrokerError::Unavailable {
                    reason,
                    leader: Some(me),
                })?;
        client.elect(request).await?;
        raft.wait(Some(timeout))
            .metrics(
                |m| m.current_leader.is_some() && m.current_leader != Some(me),
                "a new leader",
            )
            .await
            .map_err(|e| BrokerError::Timeout(format!("transfer to node {target}: {e}")))?;
        let leader = raft.metrics().borrow().current_leader.unwrap_or(target);
        if explicit && leader != target {
            return Err(BrokerError::Unavailable {
                reason: format!("node {leader} won the election meant for node {target}"),
                leader: Some(leader),
            });
        }
        Ok::<_, BrokerError>(leader)
    }
    .await;
    metrics::counter!(
        "weft_leadership_transfers_total",
        "outcome" => if outcome.is_ok() { "moved" } else { "failed" }
    )
    .increment(1);
    if outcome.is_err() && !explicit {
        peers.note_transfer_failure(group_id, target);
    }
    if let Some((_, _, _, hold_id)) = transferring.held.take()
        && outcome.is_err()
    {
        let _ = peers
            .hold_elections(
                group_id,
                raft,
                target,
                Duration::ZERO,
                Duration::ZERO,
                hold_id,
                false,
            )
            .await;
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer's age leaves out the time heartbeats were held back after it, and only that.
    #[test]
    fn a_pause_does_not_age_the_answers_before_it() {
        let pause = HeartbeatPause::default();
        let before = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        pause.hold();
        std::thread::sleep(Duration::from_millis(200));
        let during = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        let held_age = pause.age(before);
        assert!(
            held_age < Duration::from_millis(150),
            "30 ms before the pause, 230 ms of it: {held_age:?}"
        );
        assert!(pause.age(during) < Duration::from_millis(20));
        pause.resume();
        std::thread::sleep(Duration::from_millis(30));
        let after = pause.age(before);
        assert!(
            after >= Duration::from_millis(60) && after < Duration::from_millis(200),
            "30 ms before, 30 ms after: {after:?}"
        );
        let fresh = Instant::now();
        assert!(pause.age(fresh) < Duration::from_millis(20));
        assert!(before.elapsed() >= Duration::from_millis(290));
    }
}
