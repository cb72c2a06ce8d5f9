//! `weft.internal.v1.Forward` on the peer port: client calls another broker hands to this one
//! because this one can serve them (it leads the partition). A forwarded call is served here or
//! refused with UNAVAILABLE and a leader hint: it is never forwarded again, so a stale view of
//! who leads cannot make a call loop.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use weft_proto::internal::v1::forward_server::Forward;
use weft_proto::internal::v1::{
    ForwardCommitOffsetsRequest, ForwardCreateTopicRequest, ForwardDeleteTopicRequest,
    ForwardPublishRequest, ForwardUpdateTopicRequest,
};
use weft_proto::v1::{CommitOffsetsResponse, DeleteTopicResponse, PublishResponse, Topic};

use super::deadline;
use super::publish::{PassedOn, PublisherService};
use crate::error::BrokerError;
use crate::node::Node;

/// The Forward service.
#[derive(Debug, Clone)]
pub struct ForwardService {
    node: Arc<Node>,
    publisher: PublisherService,
}

impl ForwardService {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
        ForwardService {
            publisher: PublisherService::new(node.clone()),
            node,
        }
    }
}

fn not_forwarded(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not forwarded between brokers: the controller's commands travel through \
         weft.internal.v1.Controller, and consumer groups are served by the broker a member \
         connects to"
    ))
}

#[tonic::async_trait]
impl Forward for ForwardService {
    async fn publish(
        &self,
        request: Request<ForwardPublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        self.node.peers().check(&request)?;
        let timeout = deadline(request.metadata(), &self.node);
        let passed_on = PassedOn::from_metadata(request.metadata());
        let message = request.into_inner();
        let Some(publish) = message.request else {
            return Err(BrokerError::invalid("request", "is missing").into());
        };
        self.publisher
            .handle(publish, timeout, message.hops.max(1), &passed_on)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn commit_offsets(
        &self,
        _request: Request<ForwardCommitOffsetsRequest>,
    ) -> Result<Response<CommitOffsetsResponse>, Status> {
        Err(not_forwarded("CommitOffsets"))
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
