//! Topics and cluster status.

use crate::{Client, Error, Result, proto};

/// Settings for a new topic; unset values take the broker's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicSettings {
    /// Partitions (0: broker default).
    pub partitions: u32,
    /// Replication factor (0: broker default).
    pub replication_factor: u32,
    /// Retention by bytes per partition.
    pub retention_bytes: Option<u64>,
    /// Retention by age.
    pub retention_ms: Option<u64>,
    /// Largest batch.
    pub max_message_bytes: Option<u32>,
    /// Fsync every this many ms instead of before each acknowledgement.
    pub fsync_interval_ms: Option<u32>,
    /// Segment size.
    pub segment_bytes: Option<u64>,
}

/// A change of a topic's configuration: `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicUpdate {
    /// More partitions (partitions can only grow).
    pub partitions: Option<u32>,
    /// Retention by bytes per partition; `Some(None)` removes the limit.
    pub retention_bytes: Option<Option<u64>>,
    /// Retention by age; `Some(None)` keeps data forever.
    pub retention_ms: Option<Option<u64>>,
    /// Largest batch.
    pub max_message_bytes: Option<u32>,
    /// Segment size (for segments created from now on).
    pub segment_bytes: Option<u64>,
    /// `Some(None)`: fsync before every acknowledgement; `Some(Some(ms))`: acknowledge when
    /// written and fsync every `ms`.
    pub fsync_interval_ms: Option<Option<u32>>,
}

impl TopicUpdate {
    /// True when nothing would change.
    pub fn is_empty(&self) -> bool {
        *self == TopicUpdate::default()
    }

    /// The request's config and field mask.
    fn to_request(&self, name: &str) -> proto::UpdateTopicRequest {
        let mut paths = Vec::new();
        let mut mark = |present: bool, path: &str| {
            if present {
                paths.push(path.to_string());
            }
        };
        mark(self.partitions.is_some(), "partitions");
        mark(self.retention_bytes.is_some(), "retention_bytes");
        mark(self.retention_ms.is_some(), "retention_ms");
        mark(self.max_message_bytes.is_some(), "max_message_bytes");
        mark(self.segment_bytes.is_some(), "segment_bytes");
        mark(self.fsync_interval_ms.is_some(), "fsync_policy");
        let (fsync_policy, fsync_interval_ms) = match self.fsync_interval_ms {
            None => (proto::FsyncPolicy::Unspecified, None),
            Some(None) => (proto::FsyncPolicy::Always, None),
            Some(Some(ms)) => (proto::FsyncPolicy::Interval, Some(ms)),
        };
        proto::UpdateTopicRequest {
            name: name.into(),
            config: Some(proto::TopicConfig {
                partitions: self.partitions.unwrap_or(0),
                replication_factor: 0,
                retention_bytes: self.retention_bytes.flatten(),
                retention_ms: self.retention_ms.flatten(),
                max_message_bytes: self.max_message_bytes,
                fsync_policy: fsync_policy as i32,
                fsync_interval_ms,
                segment_bytes: self.segment_bytes,
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        }
    }
}

/// Offsets of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionStatus {
    /// Partition.
    pub partition: u32,
    /// Oldest retained offset.
    pub log_start_offset: u64,
    /// Offset after the last committed record.
    pub high_watermark: u64,
}

/// The admin API. Reads (topics, partitions, offsets, groups, ACLs, the cluster status) are
/// tried again while the broker answers UNAVAILABLE (an election in progress), for up to the
/// client's timeout; changes are tried once.
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
}

impl Admin {
    pub(crate) fn new(client: Client) -> Self {
        Admin { client }
    }

    /// A read (describe, list, offsets, status): it changes nothing, so it is tried again while
    /// the broker answers that it is unavailable for now (UNAVAILABLE with a retry delay: a
    /// controller or partition election in progress, a partition still opening), backing off
    /// from 50 ms to 1 s, within the client's timeout in all. A broker that cannot be reached
    /// (UNAVAILABLE without details, from the transport) fails at once. `call` makes one
    /// attempt, with the time left.
    async fn read<T, F, Fut>(&self, mut call: F) -> Result<T>
    where
        F: FnMut(std::time::Duration) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        use tonic_types::StatusExt;
        let deadline = tokio::time::Instant::now() + self.client.timeout();
        let mut backoff = std::time::Duration::from_millis(50);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match call(left).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status)
                    if status.code() == tonic::Code::Unavailable
                        && status.get_details_retry_info().is_some()
                        && tokio::time::Instant::now() + backoff < deadline =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                }
                Err(status) => return Err(Error::from(status)),
            }
        }
    }

    /// Creates a topic with `partitions` partitions and default settings.
    pub async fn create_topic(&self, name: &str, partitions: u32) -> Result<proto::Topic> {
        self.create_topic_with(
            name,
            TopicSettings {
                partitions,
                ..TopicSettings::default()
            },
        )
        .await
    }

    /// Creates a topic.
    pub async fn create_topic_with(
        &self,
        name: &str,
        settings: TopicSettings,
    ) -> Result<proto::Topic> {
        let config = proto::TopicConfig {
            partitions: settings.partitions,
            replication_factor: settings.replication_factor,
            retention_bytes: settings.retention_bytes,
            retention_ms: settings.retention_ms,
            max_message_bytes: settings.max_message_bytes,
            fsync_policy: if settings.fsync_interval_ms.is_some() {
                proto::FsyncPolicy::Interval as i32
            } else {
                proto::FsyncPolicy::Unspecified as i32
            },
            fsync_interval_ms: settings.fsync_interval_ms,
            segment_bytes: settings.segment_bytes,
        };
        let request = self.client.request(
            proto::CreateTopicRequest {
                name: name.into(),
                config: Some(config),
            },
            Some(name),
            None,
        );
        Ok(self
            .client
            .topic_admin()
            .create_topic(request)
            .await
            .map_err(Error::from)?
            .into_inner())
    }

    /// Describes a topic.
    pub async fn topic(&self, name: &str) -> Result<proto::Topic> {
        self.read(|left| {
            let mut request = self.client.request(
                proto::GetTopicRequest { name: name.into() },
                Some(name),
                None,
            );
            request.set_timeout(left);
            let mut admin = self.client.topic_admin();
            async move { admin.get_topic(request).await }
        })
        .await
    }

    /// Every topic.
    pub async fn topics(&self) -> Result<Vec<proto::Topic>> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        // A broker that hands back a token it gave before would keep this going for good.
        let mut seen = std::collections::HashSet::new();
        loop {
            let page = self
                .read(|left| {
                    let mut request = self.client.request(
                        proto::ListTopicsRequest {
                            page_size: 1000,
                            page_token: page_token.clone(),
                        },
                        None,
                        None,
                    );
                    request.set_timeout(left);
                    let mut admin = self.client.topic_admin();
                    async move { admin.list_topics(request).await }
                })
                .await?;
            out.extend(page.topics);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            if !seen.insert(page.next_page_token.clone()) {
                return Err(Error::Status {
                    code: tonic::Code::Internal,
                    message: format!(
                        "the broker listed topics in a loop (page token {:?} came twice)",
                        page.next_page_token
                    ),
                    reason: String::new(),
                    leader_id: None,
                });
            }
            page_token = page.next_page_token;
        }
    }

    /// Changes a topic's configuration; returns the topic as it is now.
    pub async fn update_topic(&self, name: &str, update: &TopicUpdate) -> Result<proto::Topic> {
        let request = self
            .client
            .request(update.to_request(name), Some(name), None);
        Ok(self
            .client
            .topic_admin()
            .update_topic(request)
            .await
            .map_err(Error::from)?
            .into_inner())
    }

    /// Deletes a topic.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let request = self.client.request(
            proto::DeleteTopicRequest { name: name.into() },
            Some(name),
            None,
        );
        self.client
            .topic_admin()
            .delete_topic(request)
            .await
            .map_err(Error::from)?;
        Ok(())
    }

    /// The cluster status.
    pub async fn cluster_status(&self) -> Result<proto::ClusterStatus> {
        self.read(|left| {
            let mut request = self
                .client
                .request(proto::GetClusterStatusRequest {}, None, None);
            request.set_timeout(left);
            let mut cluster = self.client.cluster();
            async move { cluster.get_cluster_status(request).await }
        })
        .await
    }

    /// Moves a partition's leadership from its leader (the broker this client reaches must
    /// lead it) to `to`, or to the most caught-up other replica. Returns the new leader.
    pub async fn transfer_leadership(
        &self,
        topic: &str,
        partition: u32,
        to: Option<u64>,
    ) -> Result<u64> {
        let request = self.client.request(
            proto::TransferLeadershipRequest {
                topic: topic.into(),
                partition,
                to_node_id: to.unwrap_or(0),
            },
            Some(topic),
            Some(partition),
        );
        Ok(self
            .client
            .cluster()
            .transfer_leadership(request)
            .await
            .map_err(Error::from)?
            .into_inner()
            .leader_id)
    }

    /// Moves every partition leadership the broker this client reaches holds to other replicas.
    /// Returns (moved, kept with why).
    pub async fn drain(&self) -> Result<(Vec<String>, Vec<String>)> {
        let request = self.client.request(proto::DrainRequest {}, None, None);
        let r = self
            .client
            .cluster()
            .drain(request)
            .await
            .map_err(Error::from)?
            .into_inner();
        Ok((r.moved, r.kept))
    }

    /// Clears the draining mark of the broker this client reaches (a drain sets it, a restart
    /// clears it), so it gets new replicas and its preferred leaderships back. Returns whether
    /// it was marked.
    pub async fn undrain(&self) -> Result<bool> {
        let request = self.client.request(proto::UndrainRequest {}, None, None);
        Ok(self
            .client
            .cluster()
            .undrain(request)
            .await
            .map_err(Error::from)?
            .into_inner()
            .was_draining)
    }

    /// Makes broker `node_id` (the one this client reaches: another refuses) vote in every
    /// group at once although it lost its data and has not caught up everywhere (unsafe:
    /// `accept_data_loss` must be true). Returns its voting mode before: "normal" (nothing to
    /// end), "undecided" or "rejoining".
    pub async fn end_recovery(&self, node_id: u64, accept_data_loss: bool) -> Result<String> {
        let request = self.client.request(
            proto::EndRecoveryRequest {
                accept_data_loss,
                node_id,
            },
            None,
            None,
        );
        Ok(self
            .client
            .cluster()
            .end_recovery(request)
            .await
            .map_err(Error::from)?
            .into_inner()
            .was)
    }

    /// Starts moving a partition's replicas to `replicas` (the first becomes its preferred
    /// leader). Returns the partition: `moving_to` says where it goes until the move is done.
    pub async fn move_partition(
        &self,
        topic: &str,
        partition: u32,
        replicas: Vec<u64>,
    ) -> Result<proto::PartitionInfo> {
        let request = self.client.request(
            proto::MovePartitionRequest {
                topic: topic.into(),
                partition,
                replicas,
            },
            Some(topic),
            Some(partition),
        );
        Ok(self
            .client
            .cluster()
            .move_partition(request)
            .await
            .map_err(Error::from)?
            .into_inner())
    }

    /// Starts the moves that spread replicas and preferred leaders evenly over the brokers.
    /// Returns (moves started, partitions left for now with why).
    pub async fn rebalance(&self) -> Result<(Vec<String>, Vec<String>)> {
        let request = self.client.request(proto::RebalanceRequest {}, None, None);
        let r = self
            .client
            .cluster()
            .rebalance(request)
            .await
            .map_err(Error::from)?
            .into_inner();
        Ok((r.started, r.waiting))
    }

    /// Starts moving every replica off broker `node_id`, which then leaves the cluster (a
    /// member of the controller group that never registered leaves it at once).
    pub async fn remove_broker(&self, node_id: u64) -> Result<Removal> {
        let request = self
            .client
            .request(proto::RemoveBrokerRequest { node_id }, None, None);
        let r = self
            .client
            .cluster()
            .remove_broker(request)
            .await
            .map_err(Error::from)?
            .into_inner();
        Ok(Removal {
            started: r.started,
            waiting: r.waiting,
            done: r.done,
        })
    }

    /// The ACL rules in force: (checks on, the answering broker's config rules, the rules
    /// stored in the controller).
    pub async fn acls(&self) -> Result<(bool, Vec<proto::AclRule>, Vec<proto::AclRule>)> {
        let r = self
            .read(|left| {
                let mut request = self.client.request(proto::ListAclsRequest {}, None, None);
                request.set_timeout(left);
                let mut cluster = self.client.cluster();
                async move { cluster.list_acls(request).await }
            })
            .await?;
        Ok((r.enabled, r.config_rules, r.stored_rules))
    }

    /// Adds (`add`) or removes an allow rule stored in the controller; whether it was there
    /// before.
    pub async fn change_acl(&self, rule: proto::AclRule, add: bool) -> Result<bool> {
        let request = self.client.request(rule, None, None);
        let mut cluster = self.client.cluster();
        let answer = if add {
            cluster.add_acl(request).await
        } else {
            cluster.remove_acl(request).await
        };
        Ok(answer.map_err(Error::from)?.into_inner().existed)
    }

    /// Partitions with leaders and offsets (one topic, or all when `topic` is empty).
    pub async fn partitions(&self, topic: &str) -> Result<Vec<proto::PartitionInfo>> {
        let r = self
            .read(|left| {
                let mut request = self.client.request(
                    proto::ListPartitionsRequest {
                        topic: topic.into(),
                    },
                    None,
                    None,
                );
                request.set_timeout(left);
                let mut cluster = self.client.cluster();
                async move { cluster.list_partitions(request).await }
            })
            .await?;
        Ok(r.partitions)
    }

    /// Offsets of a topic's partitions, with a group's commits when `group` is set.
    pub async fn offsets(
        &self,
        topic: &str,
        group: Option<&str>,
    ) -> Result<Vec<proto::PartitionOffsets>> {
        self.offsets_at(topic, group, None).await
    }

    /// [`Admin::offsets`], with each partition's first offset at or after `timestamp_ms` (in
    /// `timestamp_offset`) when it is set.
    pub async fn offsets_at(
        &self,
        topic: &str,
        group: Option<&str>,
        timestamp_ms: Option<i64>,
    ) -> Result<Vec<proto::PartitionOffsets>> {
        let r = self
            .read(|left| {
                let mut request = self.client.group_request(
                    proto::GetOffsetsRequest {
                        topic: topic.into(),
                        partitions: vec![],
                        group_id: group.unwrap_or_default().into(),
                        timestamp_ms,
                    },
                    Some(topic),
                    group.unwrap_or_default(),
                );
                request.set_timeout(left);
                let mut subscriber = self.client.subscriber();
                async move { subscriber.get_offsets(request).await }
            })
            .await?;
        Ok(r.partitions)
    }

    /// Commits offsets for a group from outside membership (the group must have no live members).
    /// Offsets never go backwards: see [`Admin::reset_offsets`] for that.
    pub async fn commit_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64)],
    ) -> Result<()> {
        self.store_offsets(group, topic, offsets, false).await
    }

    /// Sets a group's offsets on `topic`, backwards (to read again) or forwards (to skip): the
    /// group must have no live members, and each offset must be retained (between the
    /// partition's log start and its high watermark). What `weft group reset-offsets` does.
    pub async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64)],
    ) -> Result<()> {
        self.store_offsets(group, topic, offsets, true).await
    }

    async fn store_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64)],
        reset: bool,
    ) -> Result<()> {
        let request = self.client.group_request(
            proto::CommitOffsetsRequest {
                group_id: group.into(),
                member_id: String::new(),
                generation: 0,
                topic: topic.into(),
                offsets: offsets
                    .iter()
                    .map(|&(partition, offset)| proto::PartitionOffset { partition, offset })
                    .collect(),
                reset,
            },
            Some(topic),
            group,
        );
        self.client
            .subscriber()
            .commit_offsets(request)
            .await
            .map_err(Error::from)?;
        Ok(())
    }

    /// Every consumer group.
    pub async fn groups(&self) -> Result<Vec<String>> {
        let r = self
            .read(|left| {
                let mut request = self.client.request(proto::ListGroupsRequest {}, None, None);
                request.set_timeout(left);
                let mut subscriber = self.client.subscriber();
                async move { subscriber.list_groups(request).await }
            })
            .await?;
        Ok(r.group_ids)
    }

    /// One consumer group: members, assignments, commits and lag.
    pub async fn group(&self, group_id: &str) -> Result<proto::GroupDescription> {
        self.read(|left| {
            let mut request = self.client.group_request(
                proto::DescribeGroupRequest {
                    group_id: group_id.into(),
                },
                None,
                group_id,
            );
            request.set_timeout(left);
            let mut subscriber = self.client.subscriber();
            async move { subscriber.describe_group(request).await }
        })
        .await
    }

    /// Deletes a consumer group's committed offsets. Refused (FAILED_PRECONDITION, reason
    /// GROUP_NOT_EMPTY) while the group has live members; NOT_FOUND when it has none stored.
    pub async fn delete_group(&self, group_id: &str) -> Result<()> {
        let request = self.client.group_request(
            proto::DeleteGroupRequest {
                group_id: group_id.into(),
            },
            None,
            group_id,
        );
        self.client
            .subscriber()
            .delete_group(request)
            .await
            .map_err(Error::from)?;
        Ok(())
    }
}

/// What a broker removal did ([`Admin::remove_broker`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    /// Moves started ("topic/partition: [from] -> [to]").
    pub started: Vec<String>,
    /// Partitions left for now, with why (call again once their running move is done).
    pub waiting: Vec<String>,
    /// Changes made at once: a member of the controller group that never registered, taken out.
    pub done: Vec<String>,
}
