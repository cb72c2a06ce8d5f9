//! openraft's messages as `weft.internal.v1` protobuf messages and back. Entries keep their bytes:
//! record batches travel as the leader stored them (stamped with offsets, term and index), so a
//! follower writes exactly what the leader wrote.

use std::collections::{BTreeMap, BTreeSet};

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest, VoteResponse,
};
use openraft::{
    BasicNode, CommittedLeaderId, EntryPayload, Membership, SnapshotMeta, StoredMembership,
};
use weft_proto::internal::v1 as pb;

use super::{Command, Entry, LogId, NodeId, TypeConfig};

/// A message that cannot be turned back into openraft's type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed Raft message: {0}")]
pub(super) struct Malformed(pub(super) String);

fn missing(what: &str) -> Malformed {
    Malformed(format!("{what} is missing"))
}

pub(super) fn vote_to(v: &openraft::Vote<NodeId>) -> pb::Vote {
    pb::Vote {
        term: v.leader_id.term,
        node_id: v.leader_id.voted_for.unwrap_or(0),
        committed: v.committed,
    }
}

pub(super) fn vote_from(v: Option<pb::Vote>) -> Result<openraft::Vote<NodeId>, Malformed> {
    let v = v.ok_or_else(|| missing("vote"))?;
    let mut vote = openraft::Vote::new(v.term, v.node_id);
    if v.node_id == 0 {
        vote.leader_id.voted_for = None;
    }
    vote.committed = v.committed;
    Ok(vote)
}

pub(super) fn log_id_to(id: &LogId) -> pb::LogId {
    pb::LogId {
        term: id.leader_id.term,
        node_id: 0,
        index: id.index,
    }
}

pub(super) fn log_id_from(id: pb::LogId) -> LogId {
    LogId::new(CommittedLeaderId::new(id.term, 0), id.index)
}

fn membership_to(m: &Membership<NodeId, BasicNode>) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|set| pb::VoterSet {
                voters: set.iter().copied().collect(),
            })
            .collect(),
        nodes: m
            .nodes()
            .map(|(id, node)| {
                (
                    *id,
                    pb::NodeAddress {
                        peer_address: node.addr.clone(),
                        client_address: String::new(),
                    },
                )
            })
            .collect(),
    }
}

fn membership_from(m: Option<pb::Membership>) -> Result<Membership<NodeId, BasicNode>, Malformed> {
    let m = m.ok_or_else(|| missing("membership"))?;
    let configs: Vec<BTreeSet<NodeId>> = m
        .configs
        .into_iter()
        .map(|c| c.voters.into_iter().collect())
        .collect();
    let nodes: BTreeMap<NodeId, BasicNode> = m
        .nodes
        .into_iter()
        .map(|(id, a)| (id, BasicNode::new(a.peer_address)))
        .collect();
    for config in &configs {
        if let Some(unknown) = config.iter().find(|id| !nodes.contains_key(id)) {
            return Err(Malformed(format!("voter {unknown} has no address")));
        }
    }
    Ok(Membership::new(configs, nodes))
}

fn entry_to(e: &Entry) -> Result<pb::Entry, Malformed> {
    let payload = match &e.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Blank {}),
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(membership_to(m)),
        EntryPayload::Normal(Command::Records(batches)) => {
            pb::entry::Payload::Records(pb::Records {
                batches: batches.clone(),
            })
        }
        EntryPayload::Normal(Command::Controller(c)) => pb::entry::Payload::Controller(
            serde_json::to_vec(c)
                .map_err(|e| Malformed(format!("controller command: {e}")))?
                .into(),
        ),
        EntryPayload::Normal(Command::Lost { .. }) => {
            return Err(Malformed(format!(
                "entry {} is damaged on this broker and cannot be replicated",
                e.log_id.index
            )));
        }
    };
    Ok(pb::Entry {
        log_id: Some(log_id_to(&e.log_id)),
        payload: Some(payload),
    })
}

fn entry_from(e: pb::Entry) -> Result<Entry, Malformed> {
    let log_id = log_id_from(e.log_id.ok_or_else(|| missing("entry log id"))?);
    let payload = match e.payload.ok_or_else(|| missing("entry payload"))? {
        pb::entry::Payload::Blank(_) => EntryPayload::Blank,
        pb::entry::Payload::Membership(m) => EntryPayload::Membership(membership_from(Some(m))?),
        pb::entry::Payload::Records(r) => {
            if r.batches.is_empty() {
                return Err(Malformed("a records entry without batches".into()));
            }
            EntryPayload::Normal(Command::Records(r.batches))
        }
        pb::entry::Payload::Controller(bytes) => EntryPayload::Normal(Command::Controller(
            serde_json::from_slice(&bytes)
                .map_err(|e| Malformed(format!("controller command: {e}")))?,
        )),
        pb::entry::Payload::Normal(_) => {
            return Err(Malformed("untyped application data".into()));
        }
    };
    Ok(Entry { log_id, payload })
}

pub(super) fn append_to(
    group_id: u64,
    r: &AppendEntriesRequest<TypeConfig>,
) -> Result<pb::AppendEntriesRequest, Malformed> {
    Ok(pb::AppendEntriesRequest {
        group_id,
        vote: Some(vote_to(&r.vote)),
        prev_log_id: r.prev_log_id.as_ref().map(log_id_to),
        entries: r.entries.iter().map(entry_to).collect::<Result<_, _>>()?,
        leader_commit: r.leader_commit.as_ref().map(log_id_to),
    })
}

pub(super) fn append_from(
    r: pb::AppendEntriesRequest,
) -> Result<AppendEntriesRequest<TypeConfig>, Malformed> {
    Ok(AppendEntriesRequest {
        vote: vote_from(r.vote)?,
        prev_log_id: r.prev_log_id.map(log_id_from),
        entries: r
            .entries
            .into_iter()
            .map(entry_from)
            .collect::<Result<_, _>>()?,
        leader_commit: r.leader_commit.map(log_id_from),
    })
}

pub(super) fn append_response_to(r: &AppendEntriesResponse<NodeId>) -> pb::AppendEntriesResponse {
    use pb::append_entries_response::Result as R;
    let result = match r {
        AppendEntriesResponse::Success => R::Success(pb::Blank {}),
        AppendEntriesResponse::PartialSuccess(matching) => R::PartialSuccess(pb::PartialSuccess {
            matching: matching.as_ref().map(log_id_to),
        }),
        AppendEntriesResponse::Conflict => R::Conflict(pb::Blank {}),
        AppendEntriesResponse::HigherVote(v) => R::HigherVote(vote_to(v)),
    };
    pb::AppendEntriesResponse {
        result: Some(result),
    }
}

pub(super) fn append_response_from(
    r: pb::AppendEntriesResponse,
) -> Result<AppendEntriesResponse<NodeId>, Malformed> {
    use pb::append_entries_response::Result as R;
    Ok(match r.result.ok_or_else(|| missing("result"))? {
        R::Success(_) => AppendEntriesResponse::Success,
        R::PartialSuccess(p) => AppendEntriesResponse::PartialSuccess(p.matching.map(log_id_from)),
        R::Conflict(_) => AppendEntriesResponse::Conflict,
        R::HigherVote(v) => AppendEntriesResponse::HigherVote(vote_from(Some(v))?),
    })
}

pub(super) fn vote_request_to(group_id: u64, r: &VoteRequest<NodeId>) -> pb::VoteRequest {
    pb::VoteRequest {
        group_id,
        vote: Some(vote_to(&r.vote)),
        last_log_id: r.last_log_id.as_ref().map(log_id_to),
        // Set by the sender, which knows its membership (see `Peers::in_every_quorum`).
        candidate_in_every_quorum: false,
    }
}

pub(super) fn vote_request_from(r: pb::VoteRequest) -> Result<VoteRequest<NodeId>, Malformed> {
    Ok(VoteRequest {
        vote: vote_from(r.vote)?,
        last_log_id: r.last_log_id.map(log_id_from),
    })
}

pub(super) fn vote_response_to(r: &VoteResponse<NodeId>) -> pb::VoteResponse {
    pb::VoteResponse {
        vote: Some(vote_to(&r.vote)),
        vote_granted: r.vote_granted,
        last_log_id: r.last_log_id.as_ref().map(log_id_to),
    }
}

pub(super) fn vote_response_from(r: pb::VoteResponse) -> Result<VoteResponse<NodeId>, Malformed> {
    Ok(VoteResponse {
        vote: vote_from(r.vote)?,
        vote_granted: r.vote_granted,
        last_log_id: r.last_log_id.map(log_id_from),
    })
}

pub(super) fn snapshot_to(
    group_id: u64,
    r: &InstallSnapshotRequest<TypeConfig>,
) -> pb::InstallSnapshotChunk {
    pb::InstallSnapshotChunk {
        group_id,
        vote: Some(vote_to(&r.vote)),
        meta: Some(pb::SnapshotMeta {
            last_log_id: r.meta.last_log_id.as_ref().map(log_id_to),
            last_membership_log_id: r.meta.last_membership.log_id().as_ref().map(log_id_to),
            last_membership: Some(membership_to(r.meta.last_membership.membership())),
            snapshot_id: r.meta.snapshot_id.clone(),
        }),
        offset: r.offset,
        data: r.data.clone().into(),
        done: r.done,
    }
}

pub(super) fn snapshot_from(
    r: pb::InstallSnapshotChunk,
) -> Result<InstallSnapshotRequest<TypeConfig>, Malformed> {
    let meta = r.meta.ok_or_else(|| missing("snapshot meta"))?;
    Ok(InstallSnapshotRequest {
        vote: vote_from(r.vote)?,
        meta: SnapshotMeta {
            last_log_id: meta.last_log_id.map(log_id_from),
            last_membership: StoredMembership::new(
                meta.last_membership_log_id.map(log_id_from),
                membership_from(meta.last_membership)?,
            ),
            snapshot_id: meta.snapshot_id,
        },
        offset: r.offset,
        data: r.data.to_vec(),
        done: r.done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::ControllerCommand;

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 0), index)
    }

    /// An AppendEntries of one entry holding the largest batch a topic may allow (as the log
    /// stores it, with its slack) fits in one peer message: openraft splits larger appends by
    /// entries, never an entry. Before, the limits were equal and such an entry was refused on
    /// every resend.
    #[test]
    fn one_entry_of_the_largest_batch_fits_in_a_peer_message() {
        use prost::Message;
        let batch = bytes::Bytes::from(vec![0u8; crate::topic::MESSAGE_BYTES_MAX as usize + 1024]);
        let request = AppendEntriesRequest {
            vote: openraft::Vote::new_committed(u64::MAX, u64::MAX),
            prev_log_id: Some(id(u64::MAX, u64::MAX - 1)),
            entries: vec![Entry {
                log_id: id(u64::MAX, u64::MAX),
                payload: EntryPayload::Normal(Command::Records(vec![batch])),
            }],
            leader_commit: Some(id(u64::MAX, u64::MAX)),
        };
        let encoded = append_to(u64::MAX, &request)
            .expect("encodes")
            .encoded_len();
        assert!(
            encoded <= crate::raft::PEER_MESSAGE_BYTES_MAX,
            "{encoded} bytes, more than a peer message's {}",
            crate::raft::PEER_MESSAGE_BYTES_MAX
        );
    }

    #[test]
    fn requests_and_responses_round_trip() {
        let membership = Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            BTreeMap::from([
                (1, BasicNode::new("a:1")),
                (2, BasicNode::new("b:1")),
                (3, BasicNode::new("c:1")),
            ]),
        );
        let entries = vec![
            Entry {
                log_id: id(2, 5),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: id(2, 6),
                payload: EntryPayload::Membership(membership.clone()),
            },
            Entry {
                log_id: id(2, 7),
                payload: EntryPayload::Normal(Command::Records(vec![
                    bytes::Bytes::from_static(b"one"),
                    bytes::Bytes::from_static(b"two"),
                ])),
            },
            Entry {
                log_id: id(2, 8),
                payload: EntryPayload::Normal(Command::Controller(
                    ControllerCommand::DeleteTopic { name: "t".into() },
                )),
            },
        ];
        let request = AppendEntriesRequest::<TypeConfig> {
            vote: openraft::Vote::new_committed(2, 1),
            prev_log_id: Some(id(1, 4)),
            entries,
            leader_commit: Some(id(2, 3)),
        };
        let back = append_from(append_to(9, &request).expect("encodes")).expect("decodes");
        assert_eq!(back.vote, request.vote);
        assert_eq!(back.prev_log_id, request.prev_log_id);
        assert_eq!(back.leader_commit, request.leader_commit);
        assert_eq!(back.entries, request.entries);

        for response in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::PartialSuccess(Some(id(3, 9))),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(openraft::Vote::new(4, 2)),
        ] {
            assert_eq!(
                append_response_from(append_response_to(&response)).expect("decodes"),
                response
            );
        }

        let vote = VoteRequest {
            vote: openraft::Vote::new(3, 2),
            last_log_id: Some(id(2, 8)),
        };
        assert_eq!(
            vote_request_from(vote_request_to(9, &vote)).expect("decodes"),
            vote
        );
        let answer = VoteResponse {
            vote: openraft::Vote::new(3, 2),
            vote_granted: true,
            last_log_id: None,
        };
        assert_eq!(
            vote_response_from(vote_response_to(&answer)).expect("decodes"),
            answer
        );

        let chunk = InstallSnapshotRequest::<TypeConfig> {
            vote: openraft::Vote::new_committed(2, 1),
            meta: SnapshotMeta {
                last_log_id: Some(id(2, 8)),
                last_membership: StoredMembership::new(Some(id(2, 6)), membership),
                snapshot_id: "s-1".into(),
            },
            offset: 10,
            data: b"state".to_vec(),
            done: true,
        };
        assert_eq!(
            snapshot_from(snapshot_to(9, &chunk)).expect("decodes"),
            chunk
        );
    }

    #[test]
    fn malformed_messages_are_refused() {
        assert!(vote_request_from(pb::VoteRequest::default()).is_err());
        let untyped = pb::AppendEntriesRequest {
            vote: Some(pb::Vote::default()),
            entries: vec![pb::Entry {
                log_id: Some(pb::LogId::default()),
                payload: Some(pb::entry::Payload::Normal(bytes::Bytes::from_static(b"x"))),
            }],
            ..Default::default()
        };
        assert!(append_from(untyped).is_err());
        let voter_without_address = pb::Membership {
            configs: vec![pb::VoterSet { voters: vec![7] }],
            nodes: Default::default(),
        };
        assert!(membership_from(Some(voter_without_address)).is_err());
        let lost = Entry {
            log_id: id(1, 1),
            payload: EntryPayload::Normal(Command::Lost { next_offset: 3 }),
        };
        assert!(entry_to(&lost).is_err());
    }
}
