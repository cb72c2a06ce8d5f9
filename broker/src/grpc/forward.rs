//! `weft.internal.v1.Forward` on the peer port: client calls another broker hands to this one
//! because this one can serve them (it leads the partition, or coordinates consumer groups). A forwarded call is served here or
//! refused with UNAVAILABLE and a leader hint: it is never forwarded again, so a stale view of
//! who leads cannot make a call loop.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};
use weft_proto::internal::v1::forward_server::Forward;
use weft_proto::internal::v1::{
    ForwardCommitOffsetsRequest, ForwardCreateTopicRequest, ForwardDeleteTopicRequest,
    ForwardFetchRequest, ForwardGetOffsetsRequest, ForwardGroupRequest, ForwardPublishRequest,
    ForwardPublishResult, ForwardUpdateTopicRequest, GroupMemberEvent, GroupMemberRequest,
};
use weft_proto::v1::{
    CommitOffsetsResponse, DeleteGroupResponse, DeleteTopicResponse, FetchResponse,
    GetOffsetsResponse, GroupDescription, ListGroupsResponse, PartitionOffset, PublishResponse,
    Topic,
};

use super::publish::{PassedOn, PublisherService};
use super::{deadline, group_link};
use crate::acl::{Operation, Resource};
use crate::error::BrokerError;
use crate::node::Node;

/// The Forward service.
#[derive(Debug, Clone)]
pub struct ForwardService {
    node: Arc<Node>,
    publisher: PublisherService,
    subscriber: super::subscribe::SubscriberService,
}

impl ForwardService {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
        ForwardService {
            publisher: PublisherService::new(node.clone()),
            subscriber: super::subscribe::SubscriberService::new(node.clone()),
            node,
        }
    }
}

fn not_forwarded(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not forwarded between brokers: the controller's commands travel through \
         weft.internal.v1.Controller"
    ))
}

type PublishResults = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<ForwardPublishResult, Status>> + Send + 'static>,
>;

/// Publishes of one Forward.PublishStream being processed at once (the partition coalesces
/// them into entries; a deep window keeps a follower's clients as fast as the leader's).
const FORWARD_STREAM_IN_FLIGHT_MAX: usize = 512;

type MemberStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<GroupMemberEvent, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl Forward for ForwardService {
    async fn publish(
        &self,
        request: Request<ForwardPublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        self.node.peers().check(&request)?;
        super::require_broker(&self.node, &request)?;
        let timeout = deadline(request.metadata(), &self.node);
        let passed_on = PassedOn::from_request(&request);
        let identity = crate::auth::identity_of(&request);
        let message = request.into_inner();
        let Some(publish) = message.request else {
            return Err(BrokerError::invalid("request", "is missing").into());
        };
        self.node.authorize(
            &identity,
            Operation::Publish,
            Resource::Topic(&publish.topic),
        )?;
        self.publisher
            .handle(publish, timeout, message.hops.max(1), &passed_on)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    type PublishStreamStream = PublishResults;

    async fn publish_stream(
        &self,
        request: Request<Streaming<ForwardPublishRequest>>,
    ) -> Result<Response<PublishResults>, Status> {
        use futures::StreamExt;
        self.node.peers().check(&request)?;
        super::require_broker(&self.node, &request)?;
        // The stream is the sending broker's (shared by its callers); each publish on it
        // names its caller, believed because the sender is a broker.
        let sender = crate::auth::identity_of(&request);
        let node = self.node.clone();
        let publisher = self.publisher.clone();
        let ceiling = std::time::Duration::from_millis(self.node.config.request_timeout_ms);
        // Handed to the partition in arrival order (each future enqueues its batch on first
        // poll, and `buffered` polls them in order); results go back in the same order, a
        // failure as a result of its own. A broken inbound stream ends the call.
        // When this broker begins to shut down the stream takes no more publishes, answers those
        // taken, then ends with UNAVAILABLE: the sender's callers carry on elsewhere.
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closing = {
            let (cut, closing) = (cut.clone(), self.node.closing());
            async move {
                closing.await;
                cut.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        };
        let ending = self.node.clone();
        let ended = futures::stream::once(async move {
            cut.load(std::sync::atomic::Ordering::SeqCst)
                .then(|| Err(Status::from(ending.closing_error())))
        })
        .filter_map(futures::future::ready);
        let results = request
            .into_inner()
            .take_until(closing)
            .map(move |item| {
                let publisher = publisher.clone();
                let node = node.clone();
                let sender = sender.clone();
                async move {
                    let message = item?;
                    let Some(publish) = message.request else {
                        return Ok(super::forward_stream::encode_result(Err(
                            BrokerError::invalid("request", "is missing"),
                        )));
                    };
                    let timeout = match message.timeout_ms {
                        0 => ceiling,
                        ms => std::time::Duration::from_millis(u64::from(ms)).min(ceiling),
                    };
                    let passed_on = PassedOn::from_map(&message.passed_on);
                    let caller = if sender.broker {
                        passed_on.identity().unwrap_or(sender)
                    } else {
                        sender
                    };
                    if let Err(denied) =
                        node.authorize(&caller, Operation::Publish, Resource::Topic(&publish.topic))
                    {
                        return Ok(super::forward_stream::encode_result(Err(denied)));
                    }
                    let result = publisher
                        .handle(publish, timeout, message.hops.max(1), &passed_on)
                        .await;
                    Ok(super::forward_stream::encode_result(result))
                }
            })
            .buffered(FORWARD_STREAM_IN_FLIGHT_MAX)
            .chain(ended);
        Ok(Response::new(Box::pin(results)))
    }

    async fn commit_offsets(
        &self,
        request: Request<ForwardCommitOffsetsRequest>,
    ) -> Result<Response<CommitOffsetsResponse>, Status> {
        self.node.peers().check(&request)?;
        super::require_broker(&self.node, &request)?;
        let identity = crate::auth::identity_of(&request);
        let message = request.into_inner();
        let Some(commit) = message.request else {
            return Err(BrokerError::invalid("request", "is missing").into());
        };
        self.node.authorize(
            &identity,
            Operation::Commit,
            Resource::Group(&commit.group_id),
        )?;
        if commit.reset {
            self.node.authorize(
                &identity,
                Operation::Alter,
                Resource::Group(&commit.group_id),
            )?;
        }
        let result = async {
            crate::groups::validate_group_id(&commit.group_id)?;
            let named = |id: &str| message.topic_id.is_empty() || message.topic_id == id;
            let mut topic = self.node.topic(&commit.topic);
            if !topic.as_ref().is_ok_and(|t| named(&t.topic_id)) && !message.topic_id.is_empty() {
                // This broker may not have applied yet what the forwarding broker has (the
                // topic created, or deleted and created again): it catches up with the
                // controller and looks again.
                self.node.sync_controller().await?;
                topic = self.node.topic(&commit.topic);
            }
            let topic = topic?;
            if !named(&topic.topic_id) {
                // Checked by the forwarding broker against a topic of that name deleted since:
                // the offsets are not this topic's.
                return Err(BrokerError::TopicNotFound(commit.topic.clone()));
            }
            group_link::commit(&self.node, &commit, &topic.topic_id, message.hops.max(1)).await
        }
        .await;
        result
            .map(|committed| {
                Response::new(CommitOffsetsResponse {
                    offsets: committed
                        .into_iter()
                        .map(|(partition, offset)| PartitionOffset { partition, offset })
                        .collect(),
                })
            })
            .map_err(Status::from)
    }

    async fn fetch(
        &self,
        request: Request<ForwardFetchRequest>,
    ) -> Result<Response<FetchResponse>, Status> {
        self.node.peers().check(&request)?;
        super::require_broker(&self.node, &request)?;
        let identity = crate::auth::identity_of(&request);
        let message = request.into_inner();
        let Some(fetch) = message.request else {
            return Err(BrokerError::invalid("request", "is missing").into());
        };
        self.node.authorize(
            &identity,
            Operation::Subscribe,
            Resource::Topic(&fetch.topic),
        )?;
        self.subscriber
            .fetch_inner(fetch, message.hops.max(1), None)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn get_offsets(
        &self,
        request: Request<ForwardGetOffsetsRequest>,
    ) -> Result<Response<GetOffsetsResponse>, Status> {
        self.node.peers().check(&request)?;
        super::require_broker(&self.node, &request)?;
        let identity = crate::auth::identity_of(&request);
        let message = request.into_inner();
        let Some(offsets) = message.request else {
            return Err(BrokerError::invalid("request", "is missing").into());
        };
        self.node.authorize(
            &identity,
            Operation::Describe,
            Resource::Topic(&offsets.topic),
        )?;
        if !offsets.group_id.is_empty() {
            self.node.authorize(
                &identity,
                Operation::Describe,
                Resource::Group(&offsets.group_id),
            )?;
        }
        self.subscriber
            .offsets_inner(&offsets, message.hops.max(1))
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    type GroupMemberStream = MemberStream;

    async fn group_member(
        &self,
        request: Request<Streaming<GroupMemberRequest>>,
    ) -> Result<Response<MemberStream>, Status> {
        self.node.peers().check(&request)?;
        super::require_broker(&self.node, &request)?;
        // The member's own identity, which its broker passes on with the link.
        let identity = crate::auth::identity_of(&request);
        group_link::serve_member(self.node.clone(), &identity, request.into_inner())
            .await
            .map(|stream| Response::new(Box::pin(stream) as MemberStream))
            .map_err(Status::from)
    }

    async fn describe_group(
        &self,
        request: Request<ForwardGroupRequest>,
    ) -> Result<Response<GroupDescription>, Status> {
        self.node.peers().check(&request)?;
        super::require_broker(&self.node, &request)?;
        let identity = crate::auth::identity_of(&request);
        let message = request.into_inner();
        self.node.authorize(
            &identity,
            Operation::Describe,
            Resource::Group(&message.group_id),
        )?;
        group_link::describe(&self.node, &message.group_id, message.hops.max(1))
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn list_groups(
        &self,
        request: Request<ForwardGroupRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        self.node.peers().check(&request)?;
        super::require_broker(&self.node, &request)?;
        let message = request.into_inner();
        group_link::list(&self.node, message.hops.max(1))
            .await
            .map(|group_ids| Response::new(ListGroupsResponse { group_ids }))
            .map_err(Status::from)
    }

    async fn delete_group(
        &self,
        request: Request<ForwardGroupRequest>,
    ) -> Result<Response<DeleteGroupResponse>, Status> {
        self.node.peers().check(&request)?;
        super::require_broker(&self.node, &request)?;
        let identity = crate::auth::identity_of(&request);
        let message = request.into_inner();
        self.node.authorize(
            &identity,
            Operation::Delete,
            Resource::Group(&message.group_id),
        )?;
        group_link::delete(&self.node, &message.group_id, message.hops.max(1))
            .await
            .map(|()| Response::new(DeleteGroupResponse {}))
            .map_err(Status::from)
    }

    async fn leave_group(
        &self,
        request: Request<ForwardGroupRequest>,
    ) -> Result<Response<weft_proto::v1::LeaveGroupResponse>, Status> {
        self.node.peers().check(&request)?;
        super::require_broker(&self.node, &request)?;
        let identity = crate::auth::identity_of(&request);
        let message = request.into_inner();
        self.node.authorize(
            &identity,
            Operation::Subscribe,
            Resource::Group(&message.group_id),
        )?;
        group_link::leave(
            &self.node,
            &message.group_id,
            &message.member_id,
            message.hops.max(1),
        )
        .await
        .map(|left| Response::new(weft_proto::v1::LeaveGroupResponse { left }))
        .map_err(Status::from)
    }

    async fn create_topic(
        &self,
        _request: Request<ForwardCreateTopicRequest>,
    ) -> Result<Response<Topic>, Status> {
        Err(not_forwarded("CreateTopic"))
    }

    async fn update_topic(
        &self,
        _request: Request<ForwardUpdateTopicRequest>,
    ) -> Result<Response<Topic>, Status> {
        Err(not_forwarded("UpdateTopic"))
    }

    async fn delete_topic(
        &self,
        _request: Request<ForwardDeleteTopicRequest>,
    ) -> Result<Response<DeleteTopicResponse>, Status> {
        Err(not_forwarded("DeleteTopic"))
    }
}
