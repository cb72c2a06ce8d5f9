//! The Metadata service: the read-only topic metadata producers and consumers need (partition
//! count, limits, leaders), apart from TopicAdmin and Cluster so that a mesh policy that keeps
//! those for operators does not stop clients that only publish or consume.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use weft_proto::v1;
use weft_proto::v1::metadata_server::Metadata;

use crate::node::Node;

/// The Metadata service.
#[derive(Debug, Clone)]
pub struct MetadataService {
    node: Arc<Node>,
}

impl MetadataService {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
        MetadataService { node }
    }
}

#[tonic::async_trait]
impl Metadata for MetadataService {
    async fn get_topic(
        &self,
        request: Request<v1::GetTopicRequest>,
    ) -> Result<Response<v1::Topic>, Status> {
        let started = Instant::now();
        let result = super::authorize(
            &self.node,
            &request,
            crate::acl::Operation::Describe,
            crate::acl::Resource::Topic(&request.get_ref().name),
        )
        .and_then(|()| self.node.topic_named("name", &request.get_ref().name))
        .map(|t| Response::new(super::topic_admin::topic_to_proto(&self.node, &t)))
        .map_err(Status::from);
        crate::metrics::rpc("Metadata.GetTopic", started, &result);
        result
    }

    async fn who_am_i(
        &self,
        request: Request<v1::WhoAmIRequest>,
    ) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let identity = crate::auth::identity_of(&request);
        Ok(Response::new(v1::WhoAmIResponse {
            principal: identity.principal,
            source: identity.source.as_str().into(),
        }))
    }
}
