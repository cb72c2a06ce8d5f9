//! Consumer groups across brokers. Every group is coordinated by the broker leading the
//! controller (its offsets live in the controller group, so they are replicated). A member may
//! connect to any broker: when that broker is not the coordinator, it holds the member's place in
//! the group through a `Forward.GroupMember` stream to the coordinator (join, heartbeats, leave),
//! and receives the group's assignments over it. Commits, DescribeGroup, ListGroups and
//! DeleteGroup go to the coordinator the same way.
//!
//! When the coordinator changes, its member streams end: each Subscribe stream ends with
//! UNAVAILABLE, and its client rejoins (through any broker) with its member id.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use weft_proto::internal::v1::group_member_event::Event as CoordinatorEvent;
use weft_proto::internal::v1::group_member_request::Request as MemberRequest;
use weft_proto::internal::v1::{
    ForwardCommitOffsetsRequest, ForwardGroupRequest, GroupJoin, GroupJoined, GroupLeave,
    GroupMemberEvent, GroupMemberHeartbeat, GroupMemberRequest, GroupViewMember, GroupViewUpdate,
    PartitionSince,
};
use weft_proto::v1::{self, CommitOffsetsRequest};

use crate::error::BrokerError;
use crate::groups::GroupView;
use crate::node::{Coordinated, Node};

/// Longest a member's broker waits for its local copy of the controller to reach what the
/// coordinator had applied when it sent an assignment (committed offsets are read from it).
const CONTROLLER_CATCH_UP: Duration = Duration::from_secs(5);

/// How long the coordinator waits for a member's last message once its broker let go.
const LEAVE_GRACE: Duration = Duration::from_secs(1);

/// Messages buffered on a member link, each way.
const LINK_BUFFER: usize = 8;

/// Who joins a group.
#[derive(Debug, Clone)]
pub struct Joining {
    /// Group id.
    pub group_id: String,
    /// Member id to rejoin with.
    pub member_id: Option<String>,
    /// Topic consumed.
    pub topic: String,
    /// Its id.
    pub topic_id: String,
    /// Its partition count.
    pub partitions: u32,
    /// Session timeout asked for.
    pub session: Option<Duration>,
}

enum Link {
    Local,
    Remote {
        requests: mpsc::Sender<GroupMemberRequest>,
        closed: Arc<AtomicBool>,
        last_beat: std::sync::Mutex<Instant>,
        beat_every: Duration,
    },
}

/// A Subscribe stream's place in a consumer group, here or at a coordinator elsewhere.
pub struct GroupLink {
    node: Arc<Node>,
    /// Group id.
    pub group_id: String,
    /// Member id.
    pub member_id: String,
    /// The stream's incarnation of the member (a view naming another one: superseded).
    pub incarnation: u64,
    /// The session timeout its coordinator holds it to.
    pub session: Duration,
    link: Link,
}

fn gone() -> BrokerError {
    BrokerError::Unavailable {
        reason: "the group's coordinator changed or went away: rejoin".into(),
        leader: None,
    }
}

/// Joins the group (at its coordinator, wherever it is): the link and the group's assignments.
pub async fn join(
    node: &Arc<Node>,
    joining: Joining,
) -> Result<(GroupLink, watch::Receiver<Arc<GroupView>>), BrokerError> {
    let (coordinator, peer_address) = match node.coordinator()? {
        Coordinated::Here => {
            let membership = node.groups.join(
                &joining.group_id,
                joining.member_id.as_deref(),
                &joining.topic,
                &joining.topic_id,
                joining.partitions,
                joining.session,
                Instant::now(),
            )?;
            let link = GroupLink {
                node: node.clone(),
                group_id: joining.group_id,
                member_id: membership.member_id,
                incarnation: membership.incarnation,
                session: membership.session,
                link: Link::Local,
            };
            return Ok((link, membership.view));
        }
        Coordinated::There {
            node_id,
            peer_address,
        } => (node_id, peer_address),
    };
    let unavailable = |reason: String| BrokerError::Unavailable {
        reason,
        leader: Some(coordinator),
    };
    let (requests, outbound) = mpsc::channel(LINK_BUFFER);
    let join = GroupJoin {
        group_id: joining.group_id.clone(),
        member_id: joining.member_id.clone().unwrap_or_default(),
        topic: joining.topic.clone(),
        topic_id: joining.topic_id.clone(),
        partitions: joining.partitions,
        session_timeout_ms: joining
            .session
            .map_or(0, |s| u32::try_from(s.as_millis()).unwrap_or(u32::MAX)),
        from_node_id: node.node_id,
    };
    requests
        .send(GroupMemberRequest {
            request: Some(MemberRequest::Join(join)),
        })
        .await
        .map_err(|_| gone())?;
    // The link lives as long as the Subscribe stream, which has a maximum age.
    let lifetime = Duration::from_millis(node.config.stream_age_ms_max) + Duration::from_secs(60);
    let call = node
        .peers()
        .request(coordinator, ReceiverStream::new(outbound), lifetime);
    let mut client = super::forward_to(node, coordinator, &peer_address, "GroupMember")?;
    let timeout = Duration::from_millis(node.config.request_timeout_ms);
    let opened = tokio::time::timeout(timeout, async {
        let mut inbound = client.group_member(call).await?.into_inner();
        let joined = match inbound.message().await? {
            Some(GroupMemberEvent {
                event: Some(CoordinatorEvent::Joined(joined)),
            }) => joined,
            _ => return Err(gone()),
        };
        let view = match inbound.message().await? {
            Some(GroupMemberEvent {
                event: Some(CoordinatorEvent::View(view)),
            }) => view,
            _ => return Err(gone()),
        };
        Ok((inbound, joined, view))
    })
    .await
    .map_err(|_| unavailable("the group coordinator did not answer in time".into()))?;
    let (inbound, joined, first) = opened?;
    // The member reads the group's committed offsets from this broker's copy of the
    // controller state: it must hold what the coordinator held when it assigned (before, a
    // copy still behind was used anyway, and the member started from older commits).
    if !node
        .wait_controller_applied(first.controller_index, CONTROLLER_CATCH_UP)
        .await
    {
        // The coordinator counts the member in already: it leaves at once, rather than hold
        // partitions nobody reads until its session times out (its client joins again as a
        // new member).
        let _ = requests.try_send(GroupMemberRequest {
            request: Some(MemberRequest::Leave(GroupLeave {})),
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        return Err(unavailable(
            "this broker's copy of the group's committed offsets is behind the coordinator; try again"
                .into(),
        ));
    }
    let (views, view) = watch::channel(Arc::new(to_view(first)));
    let closed = Arc::new(AtomicBool::new(false));
    tokio::spawn(pump(
        node.clone(),
        coordinator,
        inbound,
        views,
        closed.clone(),
    ));
    // The coordinator says what it holds the member to (its default, not this broker's, when
    // the member asked for none; an older coordinator does not say).
    let session = match joined.session_timeout_ms {
        0 => joining
            .session
            .unwrap_or(Duration::from_millis(node.config.session_timeout_ms)),
        ms => Duration::from_millis(ms),
    };
    let link = GroupLink {
        node: node.clone(),
        group_id: joining.group_id,
        member_id: joined.member_id,
        incarnation: joined.incarnation,
        session,
        link: Link::Remote {
            requests,
            closed,
            last_beat: std::sync::Mutex::new(Instant::now()),
            // (A quarter of the shortest session allowed, 100 ms, is 25 ms.)
            beat_every: (session / 4).clamp(Duration::from_millis(20), Duration::from_secs(1)),
        },
    };
    Ok((link, view))
}

/// Passes the coordinator's assignments on to the member's stream; when the coordinator's
/// stream ends, the views end with it (the member's stream ends and its client rejoins). So
/// they do once this broker learns that another broker leads the controller (the coordinator
/// of every group): the old coordinator may be cut off from here, its stream's end never
/// arriving until the connection's keepalive gives up, while the new one already gives the
/// member's partitions to others.
async fn pump(
    node: Arc<Node>,
    coordinator: crate::raft::NodeId,
    mut inbound: Streaming<GroupMemberEvent>,
    views: watch::Sender<Arc<GroupView>>,
    closed: Arc<AtomicBool>,
) {
    let mut check = tokio::time::interval(COORDINATOR_CHECK_EVERY);
    loop {
        tokio::select! {
            _ = check.tick() => {
                if let Some(leader) = node.controller_leader()
                    && leader != coordinator
                {
                    tracing::info!(
                        coordinator,
                        leader,
                        "another broker coordinates the consumer groups now: ending the member's link"
                    );
                    break;
                }
            }
            message = inbound.message() => match message {
                Ok(Some(GroupMemberEvent { event: Some(CoordinatorEvent::View(view)) })) => {
                    if let Some(delay) = view_delay() {
                        tokio::time::sleep(delay).await;
                    }
                    if !node.wait_controller_applied(view.controller_index, CONTROLLER_CATCH_UP).await {
                        // Behind the coordinator: the member's stream ends (its client joins
                        // again) rather than start partitions from older commits.
                        tracing::warn!(
                            index = view.controller_index,
                            "this broker's copy of the controller state is behind a group's coordinator: ending the member's link"
                        );
                        break;
                    }
                    views.send_replace(Arc::new(to_view(view)));
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            },
            () = views.closed() => break,
        }
    }
    closed.store(true, Ordering::SeqCst);
}

/// How often a member's link checks that its coordinator still leads the controller.
const COORDINATOR_CHECK_EVERY: Duration = Duration::from_millis(500);

/// `WEFT_TEST_VIEW_DELAY_MS`: a test hook that makes a member's broker pass on each assignment
/// from the group's coordinator on another broker that much later (a member that commits
/// before its new assignment reached it).
fn view_delay() -> Option<Duration> {
    crate::test_hook_ms("WEFT_TEST_VIEW_DELAY_MS")
}

fn to_view(update: GroupViewUpdate) -> GroupView {
    GroupView {
        generation: update.generation,
        assignments: update
            .members
            .iter()
            .map(|m| (m.member_id.clone(), m.partitions.clone()))
            .collect(),
        incarnations: update
            .members
            .iter()
            .map(|m| (m.member_id.clone(), m.incarnation))
            .collect(),
        owned_since: update
            .owned_since
            .iter()
            .map(|p| (p.partition, p.since))
            .collect(),
    }
}

fn to_update(view: &GroupView, controller_index: u64) -> GroupViewUpdate {
    GroupViewUpdate {
        generation: view.generation,
        members: view
            .incarnations
            .iter()
            .map(|(id, &incarnation)| GroupViewMember {
                member_id: id.clone(),
                partitions: view.assignments.get(id).cloned().unwrap_or_default(),
                incarnation,
            })
            .collect(),
        controller_index,
        owned_since: view
            .owned_since
            .iter()
            .map(|(&partition, &since)| PartitionSince { partition, since })
            .collect(),
    }
}

impl std::fmt::Debug for GroupLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupLink")
            .field("group_id", &self.group_id)
            .field("member_id", &self.member_id)
            .field("incarnation", &self.incarnation)
            .field("remote", &matches!(self.link, Link::Remote { .. }))
            .finish_non_exhaustive()
    }
}

impl GroupLink {
    /// The member is alive; an error when it no longer is a member (expired, superseded, or its
    /// coordinator went away).
    pub fn heartbeat(&self) -> Result<(), BrokerError> {
        match &self.link {
            Link::Local => self.node.groups.heartbeat(
                &self.group_id,
                &self.member_id,
                self.incarnation,
                Instant::now(),
            ),
            Link::Remote {
                requests,
                closed,
                last_beat,
                beat_every,
            } => {
                if closed.load(Ordering::SeqCst) {
                    return Err(gone());
                }
                let mut last = last_beat.lock().map_err(|_| gone())?;
                if last.elapsed() >= *beat_every {
                    *last = Instant::now();
                    // A full link already carries news of the member: nothing is lost.
                    let _ = requests.try_send(GroupMemberRequest {
                        request: Some(MemberRequest::Heartbeat(GroupMemberHeartbeat {})),
                    });
                }
                Ok(())
            }
        }
    }

    /// The member's stream ended: `left` on purpose (its partitions move at once), otherwise it
    /// broke (the member keeps its place until its session times out).
    pub fn end(&self, left: bool) {
        match &self.link {
            Link::Local if left => {
                self.node
                    .groups
                    .leave(&self.group_id, &self.member_id, self.incarnation);
            }
            Link::Local => self.node.groups.disconnect(
                &self.group_id,
                &self.member_id,
                self.incarnation,
                Instant::now(),
            ),
            Link::Remote { requests, .. } => {
                if left {
                    let _ = requests.try_send(GroupMemberRequest {
                        request: Some(MemberRequest::Leave(GroupLeave {})),
                    });
                }
                // Dropping the link ends the stream: the coordinator disconnects the member.
            }
        }
    }
}

/// Stores a group's offsets at its coordinator (checked there: generation, ownership, never
/// backwards). `request` was validated here against the partitions' high watermarks.
pub async fn commit(
    node: &Arc<Node>,
    request: &CommitOffsetsRequest,
    topic_id: &str,
    hops: u32,
) -> Result<Vec<(u32, u64)>, BrokerError> {
    at_coordinator(
        node,
        hops,
        "CommitOffsets",
        || ForwardCommitOffsetsRequest {
            request: Some(request.clone()),
            hops: 1,
            from_node_id: node.node_id,
            topic_id: topic_id.to_string(),
        },
        async || {
            let offsets: Vec<(u32, u64)> = request
                .offsets
                .iter()
                .map(|o| (o.partition, o.offset))
                .collect();
            if request.reset {
                return node
                    .groups
                    .reset_offsets(&request.group_id, topic_id, &offsets)
                    .await;
            }
            node.groups
                .commit(
                    &request.group_id,
                    &request.member_id,
                    request.generation,
                    topic_id,
                    &offsets,
                )
                .await
        },
        async |mut client, call| {
            let response = client.commit_offsets(call).await?.into_inner();
            Ok(response
                .offsets
                .into_iter()
                .map(|o| (o.partition, o.offset))
                .collect())
        },
    )
    .await
}

/// A group call the coordinator answers: `local` here, or `remote` with the forwarded
/// `message` (built only then) at the coordinator, once (`hops` 0).
async fn at_coordinator<T, M, Message, Local, Remote>(
    node: &Arc<Node>,
    hops: u32,
    method: &'static str,
    message: Message,
    local: Local,
    remote: Remote,
) -> Result<T, BrokerError>
where
    Message: FnOnce() -> M,
    Local: AsyncFnOnce() -> Result<T, BrokerError>,
    Remote: AsyncFnOnce(
        weft_proto::internal::v1::forward_client::ForwardClient<crate::grpc::caller::PeerChannel>,
        tonic::Request<M>,
    ) -> Result<T, Status>,
{
    match node.coordinator()? {
        Coordinated::Here => local().await,
        Coordinated::There { node_id, .. } if hops > 0 => Err(BrokerError::Unavailable {
            reason: "this broker is not the group coordinator".into(),
            leader: Some(node_id),
        }),
        Coordinated::There {
            node_id,
            peer_address,
        } => {
            let timeout = Duration::from_millis(node.config.request_timeout_ms);
            let call = node.peers().request(node_id, message(), timeout);
            let client = super::forward_to(node, node_id, &peer_address, method)?;
            Ok(remote(client, call).await?)
        }
    }
}

/// A DescribeGroup, ListGroups or DeleteGroup as forwarded.
fn group_request(node: &Node, group_id: &str) -> ForwardGroupRequest {
    ForwardGroupRequest {
        group_id: group_id.to_string(),
        hops: 1,
        from_node_id: node.node_id,
        member_id: String::new(),
    }
}

/// Takes `member_id` out of `group_id` at the coordinator; whether it was there.
pub async fn leave(
    node: &Arc<Node>,
    group_id: &str,
    member_id: &str,
    hops: u32,
) -> Result<bool, BrokerError> {
    crate::groups::validate_group_id(group_id)?;
    if member_id.is_empty() || member_id.len() > 256 {
        return Err(BrokerError::invalid(
            "member_id",
            "name the member (1 to 256 bytes), as its assignment did",
        ));
    }
    at_coordinator(
        node,
        hops,
        "LeaveGroup",
        || ForwardGroupRequest {
            member_id: member_id.to_string(),
            ..group_request(node, group_id)
        },
        async || Ok(node.groups.leave_member(group_id, member_id)),
        async |mut client, call| Ok(client.leave_group(call).await?.into_inner().left),
    )
    .await
}

/// Describes a group, at its coordinator.
pub async fn describe(
    node: &Arc<Node>,
    group_id: &str,
    hops: u32,
) -> Result<v1::GroupDescription, BrokerError> {
    crate::groups::validate_group_id(group_id)?;
    at_coordinator(
        node,
        hops,
        "DescribeGroup",
        || group_request(node, group_id),
        async || super::subscribe::describe_group_everywhere(node, group_id).await,
        async |mut client, call| Ok(client.describe_group(call).await?.into_inner()),
    )
    .await
}

/// Every group, as its coordinator knows them.
pub async fn list(node: &Arc<Node>, hops: u32) -> Result<Vec<String>, BrokerError> {
    at_coordinator(
        node,
        hops,
        "ListGroups",
        || group_request(node, ""),
        async || node.groups.list(),
        async |mut client, call| Ok(client.list_groups(call).await?.into_inner().group_ids),
    )
    .await
}

/// Deletes a group's committed offsets, at its coordinator.
pub async fn delete(node: &Arc<Node>, group_id: &str, hops: u32) -> Result<(), BrokerError> {
    crate::groups::validate_group_id(group_id)?;
    at_coordinator(
        node,
        hops,
        "DeleteGroup",
        || group_request(node, group_id),
        async || node.groups.delete(group_id).await,
        async |mut client, call| {
            client.delete_group(call).await?;
            Ok(())
        },
    )
    .await
}

/// Serves a member connected to another broker (this broker coordinates its group): the
/// coordinator's side of `Forward.GroupMember`.
pub async fn serve_member(
    node: Arc<Node>,
    caller: &crate::auth::Identity,
    mut inbound: Streaming<GroupMemberRequest>,
) -> Result<ReceiverStream<Result<GroupMemberEvent, Status>>, BrokerError> {
    let join = match crate::grpc::first_message(&node, &mut inbound, "join").await?? {
        Some(GroupMemberRequest {
            request: Some(MemberRequest::Join(join)),
        }) => join,
        _ => {
            return Err(BrokerError::invalid(
                "request",
                "the first message of a GroupMember stream must be `join`",
            ));
        }
    };
    if let Coordinated::There { node_id, .. } = node.coordinator()? {
        return Err(BrokerError::Unavailable {
            reason: "this broker is not the group coordinator".into(),
            leader: Some(node_id),
        });
    }
    // Checked here as well as where the member connected: as the member (its broker passes
    // its identity on), by this broker's rules.
    node.authorize(
        caller,
        crate::acl::Operation::Subscribe,
        crate::acl::Resource::Topic(&join.topic),
    )?;
    node.authorize(
        caller,
        crate::acl::Operation::Subscribe,
        crate::acl::Resource::Group(&join.group_id),
    )?;
    let topic = node.topic(&join.topic)?;
    if topic.topic_id != join.topic_id {
        return Err(BrokerError::TopicNotFound(join.topic));
    }
    let session = (join.session_timeout_ms > 0)
        .then(|| Duration::from_millis(join.session_timeout_ms.into()));
    let member = (!join.member_id.is_empty()).then_some(join.member_id.as_str());
    let membership = node.groups.join(
        &join.group_id,
        member,
        &join.topic,
        &topic.topic_id,
        topic.config.partitions,
        session,
        Instant::now(),
    )?;
    let (tx, rx) = mpsc::channel(LINK_BUFFER);
    let joined = GroupMemberEvent {
        event: Some(CoordinatorEvent::Joined(GroupJoined {
            member_id: membership.member_id.clone(),
            incarnation: membership.incarnation,
            session_timeout_ms: u64::try_from(membership.session.as_millis()).unwrap_or(u64::MAX),
        })),
    };
    let _ = tx.try_send(Ok(joined));
    tokio::spawn(async move {
        let (group, member, incarnation) =
            (join.group_id, membership.member_id, membership.incarnation);
        let mut view = membership.view;
        let closing = node.closing();
        tokio::pin!(closing);
        let outcome: Result<bool, BrokerError> = async {
            loop {
                let current = view.borrow_and_update().clone();
                // The index the member's broker waits for covers the commits that were in
                // flight at the rebalance (see `Coordinator::settle_commits`).
                node.groups.settle_commits(&group).await;
                let update = to_update(&current, node.controller_applied_index());
                let event = GroupMemberEvent {
                    event: Some(CoordinatorEvent::View(update)),
                };
                if tx.send(Ok(event)).await.is_err() {
                    return Ok(false);
                }
                // Until the assignment changes: the member's heartbeats, its leave or its end.
                loop {
                    tokio::select! {
                        biased;
                        message = inbound.message() => match message {
                            Ok(Some(GroupMemberRequest { request: Some(MemberRequest::Heartbeat(_)) })) => {
                                node.groups.heartbeat(&group, &member, incarnation, Instant::now())?;
                            }
                            Ok(Some(GroupMemberRequest { request: Some(MemberRequest::Leave(_)) })) => {
                                return Ok(true);
                            }
                            Ok(Some(_)) => {
                                return Err(BrokerError::invalid("request", "a member joins only once"));
                            }
                            Ok(None) | Err(_) => return Ok(false),
                        },
                        changed = view.changed() => match changed {
                            Ok(()) => break,
                            Err(_) => return Err(gone()),
                        },
                        // The coordinator shuts down: the member's broker finds the next one.
                        () = &mut closing => return Err(node.closing_error()),
                        () = tx.closed() => {
                            // The member's broker let go of the stream; a leave it sent just
                            // before may still be on its way.
                            let last = tokio::time::timeout(LEAVE_GRACE, inbound.message()).await;
                            return Ok(matches!(
                                last,
                                Ok(Ok(Some(GroupMemberRequest {
                                    request: Some(MemberRequest::Leave(_))
                                })))
                            ));
                        }
                    }
                }
            }
        }
        .await;
        tracing::debug!(group = %group, member = %member, ?outcome, "a remote member's link ended");
        match outcome {
            Ok(true) => node.groups.leave(&group, &member, incarnation),
            Ok(false) => node
                .groups
                .disconnect(&group, &member, incarnation, Instant::now()),
            Err(e) => {
                node.groups
                    .disconnect(&group, &member, incarnation, Instant::now());
                let _ = tx.send(Err(Status::from(e))).await;
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}
