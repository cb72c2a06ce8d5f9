//! Moving partitions' replicas between brokers: one partition at a time on request, every
//! partition for an even spread (after adding a broker), or every replica off a broker that is
//! being removed.
//!
//! A move is a controller command that records where the replicas go; the partition's leader
//! then does the work in its Raft group (new replicas join as learners, catch up, become the
//! voters; a leader that is not among them hands its leadership to one that is) and proposes
//! the command that ends the move. The brokers that lost a replica then delete it. Once no
//! partition has a replica on a broker being removed, the controller's leader takes it out of
//! the controller group and forgets it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::error::BrokerError;
use crate::node::Node;
use crate::raft::{
    ControllerCommand, ControllerResponse, ControllerState, GroupId, MoveStep, NodeId,
    PartitionMeta, PlannedMove,
};

/// How long one step of a move may wait (for a new replica to catch up, for a membership change
/// to commit); a step that times out is tried again.
const MOVE_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the moves are looked at when the controller state does not change.
const TICK: Duration = Duration::from_secs(1);

/// The partition groups whose moves this broker drives now, and since when each broker has
/// failed its health checks.
#[derive(Debug, Default)]
pub struct Moves {
    running: Mutex<HashSet<GroupId>>,
    /// Per broker failing its checks: since when, and when it was last checked.
    unreachable_since: Mutex<BTreeMap<NodeId, (Instant, Instant)>>,
}

impl Moves {
    fn start(&self, group: GroupId) -> bool {
        self.running.lock().is_ok_and(|mut r| r.insert(group))
    }

    fn end(&self, group: GroupId) {
        if let Ok(mut r) = self.running.lock() {
            r.remove(&group);
        }
    }

    /// Notes a health check of `node` at `now`: failed, it is unreachable since the first
    /// failure after its last answer, unless it went unchecked for a while before this one
    /// (checks run only while something needs them: an old failure says nothing of the time
    /// since).
    fn observe(&self, node: NodeId, up: bool, now: Instant) {
        if let Ok(mut u) = self.unreachable_since.lock() {
            if up {
                u.remove(&node);
                return;
            }
            let entry = u.entry(node).or_insert((now, now));
            if now.saturating_duration_since(entry.1) > CHECKS_GAP_MAX {
                entry.0 = now;
            }
            entry.1 = now;
        }
    }

    /// The brokers that have failed every health check for at least `grace` at `now`.
    fn down_for(&self, grace: Duration, now: Instant) -> BTreeSet<NodeId> {
        self.unreachable_since.lock().map_or_else(
            |_| BTreeSet::new(),
            |u| {
                u.iter()
                    .filter(|(_, (since, _))| now.saturating_duration_since(*since) >= grace)
                    .map(|(id, _)| *id)
                    .collect()
            },
        )
    }
}

/// How long a broker must have failed every health check before a removal sends a move that
/// adds a replica on it elsewhere. A busy broker that misses a check or two keeps its moves
/// (and the catching up they did); one that stays down does not hold a removal for good.
const STALLED_TARGET_GRACE: Duration = Duration::from_secs(10);

/// Longest gap between two failed checks of a broker for them to count as one spell of failures
/// (checks come every [`TICK`] while a removal runs, each taking at most two
/// [`PING_TIMEOUT`]s).
const CHECKS_GAP_MAX: Duration = Duration::from_secs(9);

/// How long a broker has to answer the health check that says it may take replicas.
const PING_TIMEOUT: Duration = Duration::from_millis(1000);

/// Moves of one plan proposed to the controller at once (they commit together; more would
/// only queue in the controller's log).
const MOVE_PROPOSALS_AT_ONCE: usize = 16;

fn unexpected(response: ControllerResponse) -> BrokerError {
    match response {
        ControllerResponse::NotFound(what) => BrokerError::Conflict(format!("{what} not found")),
        ControllerResponse::Invalid(reason) => BrokerError::Conflict(reason),
        ControllerResponse::LimitReached { what, max } => BrokerError::LimitReached {
            what,
            key: "partition_replicas_max",
            max,
        },
        other => BrokerError::Internal(format!("unexpected controller response {other:?}")),
    }
}

/// How long a broker that started moves waits for its own copy of the metadata to hold them.
const OWN_WRITES_WAIT: Duration = Duration::from_secs(5);

impl Node {
    /// This broker's `partition_replicas_max`: the most partition replicas its moves give any
    /// broker.
    fn replicas_max(&self) -> usize {
        self.config.partition_replicas_max as usize
    }

    /// Starts moving `topic`/`partition`'s replicas to `replicas` (the first becomes its
    /// preferred leader). Returns the partition as the controller now has it (its `target` says
    /// where it is going; a move to where it is does nothing).
    pub async fn move_partition(
        &self,
        topic: &str,
        partition: u32,
        replicas: Vec<NodeId>,
    ) -> Result<PartitionMeta, BrokerError> {
        // The move names the replicas it starts from: read them as of now, not as this broker
        // last applied them (seen: a move asked of a broker that had not yet applied the end of
        // a rebalance another broker had waited for was refused as a conflict).
        self.sync_controller().await?;
        let meta = self.topic(topic)?;
        let Some(current) = meta.partitions.get(partition as usize) else {
            return Err(BrokerError::PartitionNotFound {
                topic: topic.into(),
                partition,
            });
        };
        if replicas.is_empty() {
            return Err(BrokerError::invalid("replicas", "name at least one broker"));
        }
        let state = self.controller_state();
        for node in &replicas {
            if !state.brokers.contains_key(node) {
                return Err(BrokerError::invalid(
                    "replicas",
                    format!("node {node} is not a broker of this cluster"),
                ));
            }
        }
        let mut unique = replicas.clone();
        unique.sort_unstable();
        unique.dedup();
        if unique.len() != replicas.len() {
            return Err(BrokerError::invalid("replicas", "a node appears twice"));
        }
        // No broker takes more than partition_replicas_max replicas (KIP-578's
        // max.broker.partitions is checked on reassignments too).
        let max = self.replicas_max();
        // A broker already counts this partition if it holds a replica of it or is getting
        // one (a move back onto a broker the partition is leaving gives it nothing more).
        let counted = |n: &NodeId| {
            current.replicas.contains(n) || current.target.as_ref().is_some_and(|t| t.contains(n))
        };
        for &node in replicas.iter().filter(|n| !counted(n)) {
            let held = state.replicas_on(node);
            if held >= max {
                return Err(BrokerError::LimitReached {
                    what: format!(
                        "broker {node} holds {held} partition replicas and cannot take {topic}/{partition}"
                    ),
                    key: "partition_replicas_max",
                    max: max as u64,
                });
            }
        }
        let planned = PlannedMove {
            topic: topic.into(),
            topic_id: meta.topic_id.clone(),
            partition,
            from: current.replicas.clone(),
            to: replicas,
        };
        let answer = self.propose(planned.command_within(max)).await?;
        self.see_own_writes(true).await;
        match answer {
            ControllerResponse::Topic(t) => t
                .partitions
                .get(partition as usize)
                .cloned()
                .ok_or_else(|| BrokerError::Internal("the moved partition vanished".into())),
            other => Err(unexpected(other)),
        }
    }

    /// After moves were started (`started`), waits until this broker's copy of the controller
    /// state holds them, so a caller that asks this broker next (`weft cluster rebalance
    /// --wait` polls the partitions) sees them moving. The controller applied them on its
    /// leader; this broker may apply them later (seen: `--wait` read no move, returned at once,
    /// and the moves were still running). The moves stand either way: a failure is logged.
    async fn see_own_writes(&self, started: bool) {
        if !started {
            return;
        }
        // Bounded well within the caller's deadline: the moves stand either way.
        match tokio::time::timeout(OWN_WRITES_WAIT, self.sync_controller()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!("the moves started, but this broker's metadata is behind: {e}")
            }
            Err(_) => tracing::warn!(
                "the moves started, but this broker's metadata is still behind after {OWN_WRITES_WAIT:?}"
            ),
        }
    }

    /// Starts the moves that spread replicas (and preferred leaders) evenly over the brokers.
    /// Returns the moves started, and those refused (the partition changed meanwhile).
    pub async fn rebalance(&self) -> Result<(Vec<String>, Vec<String>), BrokerError> {
        self.metadata_current()?;
        self.sync_controller().await?;
        let state = self.controller_state();
        let usable = self.usable_brokers(&state).await;
        let plan = state.plan_rebalance_onto(&usable, self.replicas_max());
        Ok(self.start_moves(plan).await)
    }

    /// The brokers that may take replicas now: registered, not being removed, not draining,
    /// voters of the controller group (a broker registered though it left the group never
    /// hears of its replicas), and answering a health check on the peer port (a broker that
    /// is down would hold a move for as long as it stays down).
    pub(crate) async fn usable_brokers(
        &self,
        state: &ControllerState,
    ) -> std::collections::BTreeSet<NodeId> {
        self.usable_brokers_checking(state, &BTreeSet::new()).await
    }

    /// [`Node::usable_brokers`], checking the brokers of `also` too (to know since when they
    /// fail their checks: the new replicas of moves, which may be on brokers not usable now).
    async fn usable_brokers_checking(
        &self,
        state: &ControllerState,
        also: &BTreeSet<NodeId>,
    ) -> BTreeSet<NodeId> {
        let voters = self.controller_voters();
        let eligible = |id: &NodeId, b: &crate::raft::BrokerMeta| {
            !b.removing && !b.draining && voters.contains(id)
        };
        let candidates: Vec<(NodeId, String)> = state
            .brokers
            .iter()
            .filter(|(id, b)| eligible(id, b) || also.contains(id))
            .map(|(id, b)| (*id, b.peer_address.clone()))
            .collect();
        let peers = self.peers();
        let up: Vec<bool> = futures::future::join_all(candidates.iter().map(|(id, address)| {
            let peers = peers.clone();
            async move {
                // Twice: one late answer of a busy broker does not make it unusable.
                *id == self.node_id
                    || peers.ping(*id, address, PING_TIMEOUT).await
                    || peers.ping(*id, address, PING_TIMEOUT).await
            }
        }))
        .await;
        let now = Instant::now();
        for ((id, _), up) in candidates.iter().zip(&up) {
            self.moves.observe(*id, *up, now);
        }
        candidates
            .into_iter()
            .zip(up)
            .filter(|((id, _), up)| *up && state.brokers.get(id).is_some_and(|b| eligible(id, b)))
            .map(|((id, _), _)| id)
            .collect()
    }

    /// Marks `node` as being removed and starts moving every replica off it.
    /// A member of the controller group that never registered (it joined and was lost before it
    /// registered) holds no replica: it is taken out of the controller group at once. Once none is left
    /// (`weft cluster status` stops listing it), it is out of the cluster and can be stopped.
    /// Returns the moves started, and the partitions that must finish a move first (they are
    /// planned again by the next call).
    pub async fn remove_broker(&self, node: NodeId) -> Result<Removal, BrokerError> {
        let began = Instant::now();
        self.metadata_current()?;
        self.sync_controller().await?;
        let state = self.controller_state();
        if !state.brokers.contains_key(&node) && self.is_controller_member(node) {
            // A member that joined and was lost before it registered: it holds no replica (only
            // registered brokers get them), so it only leaves the controller group.
            let leader = self.remove_unregistered_member(node).await?;
            tracing::info!(
                node,
                leader,
                "took an unregistered member out of the controller"
            );
            return Ok(Removal {
                done: vec![format!(
                    "node {node} (a controller member that never registered) left the \
                     controller group"
                )],
                ..Removal::default()
            });
        }
        if !state.brokers.contains_key(&node) {
            return Err(BrokerError::invalid(
                "node_id",
                format!("node {node} is not a broker of this cluster"),
            ));
        }
        if !state
            .brokers
            .iter()
            .any(|(id, b)| *id != node && !b.removing)
        {
            return Err(BrokerError::Conflict(format!(
                "node {node} is the last broker that could hold the replicas"
            )));
        }
        // Checked again when applied, once every broker reads the check: two removals asked
        // at once would otherwise both pass the check above and leave no broker.
        let keep_one = state.behind(crate::raft::LAST_BROKER_CHECK_LEVEL).is_none();
        match self
            .propose(ControllerCommand::SetRemoving {
                node_id: node,
                keep_one,
            })
            .await?
        {
            ControllerResponse::Registered => {}
            other => return Err(unexpected(other)),
        }
        let marked_ms = began.elapsed().as_millis() as u64;
        let state = self.controller_state();
        let usable = self
            .usable_brokers_checking(&state, &state.move_targets())
            .await;
        let checked_ms = began.elapsed().as_millis() as u64;
        let down = self.moves.down_for(STALLED_TARGET_GRACE, Instant::now());
        let (plan, mut busy) = state.plan_removal_onto(node, &usable, &down, self.replicas_max());
        let (mut started, refused) = self.start_planned_moves(plan).await;
        let proposed_ms = began.elapsed().as_millis() as u64;
        // The controller's leader plans the moves off a broker being removed on its own too
        // (each tick, from the moment the broker is marked): a move that plan started first,
        // so that this one was refused or not planned at all, is under way, not waiting.
        // (A refusal was decided on the controller's leader: this broker's copy of the state
        // may not have applied the move that caused it yet. Best effort: on a timeout the
        // copy as it is decides.)
        // Both ways, the moves started are then seen by the caller's next request here.
        if !refused.is_empty() || !started.is_empty() {
            let _ = self.sync_controller().await;
        }
        let now = self.controller_state();
        let moving_off = |topic: &str, partition: u32| {
            now.topics
                .get(topic)
                .and_then(|t| t.partitions.get(partition as usize))
                .and_then(|p| p.target.as_ref())
                .is_some_and(|target| !target.contains(&node))
        };
        for (planned, e) in refused {
            if !moving_off(&planned.topic, planned.partition) {
                busy.push(format!("{planned}: {e}"));
            }
        }
        for topic in now.topics.values() {
            for p in &topic.partitions {
                let name = format!("{}/{}:", topic.name, p.partition);
                if p.replicas.contains(&node)
                    && moving_off(&topic.name, p.partition)
                    && !started.iter().any(|s| s.starts_with(&name))
                {
                    let target = p.target.as_deref().unwrap_or_default();
                    started.push(format!("{name} -> {target:?} (under way)"));
                }
            }
        }
        tracing::info!(
            node,
            moves = started.len(),
            waiting = busy.len(),
            marked_ms,
            checked_ms,
            proposed_ms,
            elapsed_ms = began.elapsed().as_millis() as u64,
            "removing a broker"
        );
        Ok(Removal {
            started,
            waiting: busy,
            done: Vec::new(),
        })
    }

    async fn start_moves(&self, plan: Vec<PlannedMove>) -> (Vec<String>, Vec<String>) {
        let (started, refused) = self.start_planned_moves(plan).await;
        self.see_own_writes(!started.is_empty()).await;
        let refused = refused
            .into_iter()
            .map(|(planned, e)| format!("{planned}: {e}"))
            .collect();
        (started, refused)
    }

    /// Proposes every move of `plan`: the moves started, and those refused with why.
    /// The moves are of different partitions, each checked on its own when applied, so they
    /// are proposed [`MOVE_PROPOSALS_AT_ONCE`] at a time: a removal or a rebalance answers in
    /// a few controller commits' time, not one commit per partition.
    async fn start_planned_moves(
        &self,
        plan: Vec<PlannedMove>,
    ) -> (Vec<String>, Vec<(PlannedMove, BrokerError)>) {
        use futures::StreamExt;
        let max = self.replicas_max();
        let commands: Vec<ControllerCommand> = plan.iter().map(|m| m.command_within(max)).collect();
        let answers: Vec<_> = futures::stream::iter(commands)
            .map(|command| self.propose(command))
            .buffered(MOVE_PROPOSALS_AT_ONCE)
            .collect()
            .await;
        let (mut started, mut refused) = (Vec::new(), Vec::new());
        for (planned, answer) in plan.into_iter().zip(answers) {
            match answer {
                Ok(ControllerResponse::Topic(_)) => started.push(planned.to_string()),
                Ok(other) => refused.push((planned, unexpected(other))),
                Err(e) => refused.push((planned, e)),
            }
        }
        (started, refused)
    }

    /// Drives the moves of the partitions this broker leads, and (on the controller's leader)
    /// ends the removal of brokers that hold no replica any more.
    async fn drive_moves(self: &Arc<Self>, state: &ControllerState) {
        for topic in state.topics.values() {
            for p in &topic.partitions {
                let Some(target) = &p.target else { continue };
                let Ok(partition) = self.partition(&topic.name, p.partition) else {
                    continue;
                };
                if !partition.group().is_leader() || !self.moves.start(p.group_id) {
                    continue;
                }
                let addresses: Option<Vec<(NodeId, String)>> = target
                    .iter()
                    .map(|id| state.brokers.get(id).map(|b| (*id, b.peer_address.clone())))
                    .collect();
                let Some(addresses) = addresses else {
                    self.moves.end(p.group_id);
                    continue;
                };
                let node = Arc::downgrade(self);
                let (topic_id, name, number, group_id) = (
                    topic.topic_id.clone(),
                    topic.name.clone(),
                    p.partition,
                    p.group_id,
                );
                let target = target.clone();
                let seniority = p.replicas.clone();
                // Brokers draining or being removed take the leadership last: a draining one
                // refuses it, and the step chose it again at every try (helper-124).
                let avoid: BTreeSet<NodeId> = state
                    .brokers
                    .iter()
                    .filter(|(_, b)| b.draining || b.removing)
                    .map(|(id, _)| *id)
                    .collect();
                tokio::spawn(async move {
                    let group = partition.group();
                    let outcome = group
                        .move_step(&addresses, &seniority, &avoid, MOVE_STEP_TIMEOUT)
                        .await;
                    drop(partition);
                    let Some(node) = node.upgrade() else { return };
                    match outcome {
                        Ok(MoveStep::Done) => {
                            let finish = ControllerCommand::FinishMove {
                                topic_id,
                                partition: number,
                                replicas: target.clone(),
                            };
                            match node.propose(finish).await {
                                Ok(ControllerResponse::Topic(_)) => {
                                    tracing::info!(topic = %name, partition = number, ?target, "moved the partition's replicas")
                                }
                                Ok(other) => {
                                    tracing::info!(topic = %name, partition = number, "the end of the move was refused (redirected meanwhile?): {other:?}")
                                }
                                Err(e) => {
                                    tracing::info!(topic = %name, partition = number, "cannot end the move yet: {e}")
                                }
                            }
                        }
                        Ok(MoveStep::LeadershipMoved(leader)) => {
                            tracing::info!(topic = %name, partition = number, leader, "handed the leadership to a new replica; it ends the move")
                        }
                        Err(e) => {
                            tracing::info!(topic = %name, partition = number, ?target, "moving the replicas: {e}")
                        }
                    }
                    node.moves.end(group_id);
                });
            }
        }
        if self.controller_leader() == Some(self.node_id) {
            self.finish_removals(state).await;
        }
    }

    /// On the controller's leader: takes every broker being removed that holds no replica any
    /// more out of the controller group, then forgets it. Leading the controller itself, this
    /// broker first hands that leadership to another voter.
    async fn finish_removals(&self, state: &ControllerState) {
        // A broker registered though it is no member of the controller group: its registration
        // was in flight while it was taken out as a member that never registered. It would get
        // replicas and never hear of them (it no longer receives the controller log): it is
        // removed as any broker is.
        for (node, _) in state
            .brokers
            .iter()
            .filter(|(id, b)| !b.removing && !self.is_controller_member(**id))
        {
            match self
                .propose(ControllerCommand::SetRemoving {
                    node_id: *node,
                    keep_one: false,
                })
                .await
            {
                Ok(_) => tracing::warn!(
                    node,
                    "a broker registered after it left the controller group: removing it"
                ),
                Err(e) => tracing::info!(node, "cannot mark the broker as being removed yet: {e}"),
            }
        }
        // Replicas still going to a broker being removed (a move that failed, or that ran when
        // the removal began) are sent elsewhere.
        // Planned together: each removal counts what the ones before it send to each broker.
        let removing: Vec<NodeId> = state
            .brokers
            .iter()
            .filter(|(id, b)| b.removing && state.partitions_on(**id).next().is_some())
            .map(|(id, _)| *id)
            .collect();
        if !removing.is_empty() {
            let usable = self
                .usable_brokers_checking(state, &state.move_targets())
                .await;
            let down = self.moves.down_for(STALLED_TARGET_GRACE, Instant::now());
            for (node, plan, _) in
                state.plan_removals_onto(&removing, &usable, &down, self.replicas_max())
            {
                if plan.is_empty() {
                    continue;
                }
                let (started, refused) = self.start_moves(plan).await;
                tracing::info!(
                    node,
                    ?started,
                    ?refused,
                    "moving replicas off a broker being removed"
                );
            }
        }
        let done: Vec<NodeId> = state
            .brokers
            .iter()
            .filter(|(id, b)| b.removing && state.partitions_on(**id).next().is_none())
            .map(|(id, _)| *id)
            .collect();
        for node in done {
            if node == self.node_id {
                if let Err(e) = self.transfer_controller(MOVE_STEP_TIMEOUT).await {
                    tracing::info!("cannot hand the controller over before leaving: {e}");
                }
                return;
            }
            // Let it apply the moves that took its replicas away (so it deletes them) before it
            // stops hearing from the controller, if it is there to hear them.
            for _ in 0..50 {
                if self.reaches(node) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if let Err(e) = self.remove_controller_member(node).await {
                tracing::info!(
                    node,
                    "cannot take the broker out of the controller yet: {e}"
                );
                continue;
            }
            match self
                .propose(ControllerCommand::RemoveBroker { node_id: node })
                .await
            {
                Ok(_) => tracing::info!(node, "removed the broker from the cluster"),
                Err(e) => tracing::info!(node, "cannot forget the broker yet: {e}"),
            }
        }
    }
}

/// What `remove_broker` did.
#[derive(Debug, Default)]
pub struct Removal {
    /// Moves started ("topic/partition: [from] -> [to]").
    pub started: Vec<String>,
    /// Partitions left for now, with why.
    pub waiting: Vec<String>,
    /// Changes made at once (a controller member that never registered, taken out).
    pub done: Vec<String>,
}

/// Drives replica moves while the node runs: on every controller change and every second.
pub(crate) async fn reassign_loop(node: Weak<Node>) {
    let Some(mut state) = node.upgrade().map(|n| n.controller_watch()) else {
        return;
    };
    loop {
        if let Ok(Err(_)) = tokio::time::timeout(TICK, state.changed()).await {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        if node.is_stopping() {
            return;
        }
        let current = state.borrow_and_update().clone();
        node.drive_moves(&current).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker counts as down only once it has failed every check for the grace period; an
    /// answer in between starts it over.
    #[test]
    fn a_broker_is_down_only_after_failing_checks_for_the_grace() {
        let moves = Moves::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        moves.observe(4, false, t0);
        moves.observe(5, true, t0);
        assert!(
            moves
                .down_for(grace, t0 + Duration::from_secs(9))
                .is_empty()
        );
        // Failing again does not move the start of its failures.
        moves.observe(4, false, t0 + Duration::from_secs(9));
        assert_eq!(
            moves.down_for(grace, t0 + Duration::from_secs(10)),
            BTreeSet::from([4])
        );
        // It answers: up again, and a later failure starts the clock over.
        moves.observe(4, true, t0 + Duration::from_secs(11));
        moves.observe(4, false, t0 + Duration::from_secs(12));
        assert!(
            moves
                .down_for(grace, t0 + Duration::from_secs(21))
                .is_empty()
        );
        assert_eq!(
            moves.down_for(grace, t0 + Duration::from_secs(22)),
            BTreeSet::from([4])
        );
        // Checked again only after a long gap (nothing needed the checks meanwhile): the old
        // failure says nothing of the time between, so its spell starts over.
        let moves = Moves::default();
        moves.observe(6, false, t0);
        moves.observe(6, false, t0 + Duration::from_secs(60));
        assert!(
            moves
                .down_for(grace, t0 + Duration::from_secs(60))
                .is_empty()
        );
        moves.observe(6, false, t0 + Duration::from_secs(65));
        moves.observe(6, false, t0 + Duration::from_secs(70));
        assert_eq!(
            moves.down_for(grace, t0 + Duration::from_secs(70)),
            BTreeSet::from([6])
        );
    }
}
