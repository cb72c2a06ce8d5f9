//! Leadership transfer, built from what openraft 0.9 offers (it has no transfer call).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{GroupId, NodeId, Peers, Raft};
use crate::error::BrokerError;

/// How much longer than a maximum election timeout a transfer holds back heartbeats before the
/// target stands, so that every follower's lease has run out.
const TRANSFER_PAUSE_EXTRA: Duration = Duration::from_millis(100);

/// When a transfer last held back a group's heartbeats (followers then answer nothing, though
/// nothing is wrong with them): (held back at, resumed at).
#[derive(Debug, Default)]
pub(crate) struct HeartbeatPause(Mutex<Option<(Instant, Option<Instant>)>>);

impl HeartbeatPause {
    fn hold(&self) {
        if let Ok(mut p) = self.0.lock() {
            *p = Some((Instant::now(), None));
        }
    }

    fn resume(&self) {
        if let Ok(mut p) = self.0.lock()
            && let Some((_, resumed)) = p.as_mut()
        {
            *resumed = Some(Instant::now());
        }
    }

    /// How old an answer received at `contact` counts as: its age when the heartbeats were
    /// held back, while they are and until one heartbeat interval (`heartbeat`) after they
    /// resumed (by then every follower had a heartbeat to answer); its age now otherwise.
    pub(crate) fn age(&self, contact: Instant, heartbeat: Duration) -> Duration {
        let held = self.0.lock().ok().and_then(|p| *p);
        match held {
            Some((held, resumed)) if resumed.is_none_or(|r| r.elapsed() <= heartbeat) => {
                held.saturating_duration_since(contact)
            }
            _ => contact.elapsed(),
        }
    }
}

/// Moves a group's leadership from this node (which must lead it) to `target`, or to the most
/// caught-up other voter that answers: this leader stops proposing (when `transferring_to` is given, proposals
/// check it and answer UNAVAILABLE naming the target) and stops its heartbeats, waits until the
/// target has every entry and the followers' leader leases have run out (one maximum election
/// timeout), then asks the target to stand for election (`Raft.Elect`), and waits until it
/// leads. Heartbeats and proposals resume whatever happened. A target that has not answered
/// this leader within that timeout is refused at once (UNAVAILABLE). Returns the new leader.
pub(crate) async fn transfer_leadership(
    raft: &Raft,
    peers: &Peers,
    group_id: GroupId,
    target: Option<NodeId>,
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
    let answered = |id: &NodeId| {
        peers
            .last_contact(group_id, *id)
            .is_some_and(|t| t.elapsed() <= lease)
    };
    let target = match target {
        Some(t) if t == me => return Ok(me),
        Some(t) if others.contains(&t) => t,
        Some(t) => {
            return Err(BrokerError::invalid(
                "to_node_id",
                format!("node {t} holds no voting replica of this partition"),
            ));
        }
        None => *others
            .iter()
            .filter(|id| answered(id))
            .max_by_key(|id| matched(id))
            .ok_or_else(|| BrokerError::Unavailable {
                reason: "the partition has no other replica that answers to lead it".into(),
                leader: Some(me),
            })?,
    };
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
    if let Some(t) = transferring_to {
        t.store(target, Ordering::SeqCst);
    }
    if let Some(p) = pause {
        p.hold();
    }
    raft.runtime_config().heartbeat(false);
    let moved = async {
        let last = raft.metrics().borrow().last_log_index;
        raft.wait(Some(timeout))
            .metrics(
                |m| super::matched_index(m, target) >= last,
                "the target has every entry",
            )
            .await
            .map_err(|e| BrokerError::Timeout(format!("transfer to node {target}: {e}")))?;
        tokio::time::sleep(lease + TRANSFER_PAUSE_EXTRA).await;
        let address = membership
            .get_node(&target)
            .map(|n| n.addr.clone())
            .ok_or_else(|| BrokerError::Internal(format!("node {target} has no address")))?;
        let request = peers.request(
            target,
            weft_proto::internal::v1::ElectRequest { group_id },
            timeout,
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
        Ok::<_, BrokerError>(raft.metrics().borrow().current_leader.unwrap_or(target))
    }
    .await;
    raft.runtime_config().heartbeat(true);
    if let Some(p) = pause {
        p.resume();
    }
    if let Some(t) = transferring_to {
        t.store(0, Ordering::SeqCst);
    }
    moved
}
