//! Openraft entries as segment-store batches and back. A records entry is one or more record
//! batches (one frame); blank, membership and controller entries are one control batch whose
//! first payload byte says which.

use openraft::{CommittedLeaderId, EntryPayload, StorageIOError};
use weft_storage::{Batch, EntryKind};

use super::{Command, Entry, LogId, StorageError};

const TAG_BLANK: u8 = 1;
const TAG_MEMBERSHIP: u8 = 2;
const TAG_CONTROLLER: u8 = 3;

/// The batches that store `entry` at `next_offset`. A proposal's batches are restamped in place
/// when the entry holds the only handle on their bytes (the usual case: no copy).
pub(crate) fn to_batches(entry: Entry, next_offset: u64) -> Result<Vec<Batch>, StorageError> {
    let log_id = entry.log_id;
    let term = log_id.leader_id.term;
    let index = log_id.index;
    let control = |tag: u8, body: Vec<u8>| {
        let mut payload = Vec::with_capacity(1 + body.len());
        payload.push(tag);
        payload.extend_from_slice(&body);
        Batch::control(next_offset, term, index, &payload)
    };
    let write_error = |e: &dyn std::fmt::Display| -> StorageError {
        StorageIOError::write_log_entry(log_id, openraft::AnyError::error(e.to_string())).into()
    };
    Ok(match entry.payload {
        EntryPayload::Blank => vec![control(TAG_BLANK, Vec::new())],
        EntryPayload::Membership(membership) => vec![control(
            TAG_MEMBERSHIP,
            serde_json::to_vec(&membership).map_err(|e| write_error(&e))?,
        )],
        EntryPayload::Normal(Command::Controller(command)) => vec![control(
            TAG_CONTROLLER,
            serde_json::to_vec(&command).map_err(|e| write_error(&e))?,
        )],
        EntryPayload::Normal(Command::Lost { .. }) => {
            // A stand-in for entries damaged on this broker's disk: there is nothing to store.
            // (Repairing such a range from another replica is the replicated cluster's job.)
            return Err(write_error(
                &"a stand-in for damaged entries cannot be stored",
            ));
        }
        EntryPayload::Normal(Command::Records(batches)) => {
            if batches.is_empty() {
                return Err(write_error(&"a Records command needs a batch"));
            }
            let mut offset = next_offset;
            let mut stamped = Vec::with_capacity(batches.len());
            for bytes in batches {
                let proposed = Batch::decode(bytes).map_err(|e| write_error(&e))?;
                if proposed.header().kind != EntryKind::Records {
                    return Err(write_error(&"a Records command must hold record batches"));
                }
                let h = *proposed.header();
                let batch = if (h.term, h.index) == (0, 0) {
                    // A proposal, sealed with placeholders: the leader stamps it where it lands.
                    proposed.restamp(offset, term, index)
                } else if (h.base_offset, h.term, h.index) == (offset, term, index) {
                    // Stamped by the leader (a follower storing a replicated entry): kept as it is.
                    proposed
                } else {
                    // Offsets are assigned once, by the leader; a replica never re-stamps them.
                    return Err(write_error(&format!(
                        "entry {index} carries a batch stamped at offset {}, term {}, index {} but \
                         this log continues at offset {offset}, term {term}",
                        h.base_offset, h.term, h.index
                    )));
                };
                offset = batch.header().next_offset();
                stamped.push(batch);
            }
            stamped
        }
    })
}

/// The entry stored as `batches` (the batches of one frame).
pub(crate) fn from_batches(batches: &[Batch]) -> Result<Entry, StorageError> {
    let Some(batch) = batches.first() else {
        return Err(StorageIOError::read_logs(openraft::AnyError::error(
            "an entry without batches",
        ))
        .into());
    };
    let h = batch.header();
    let log_id = LogId::new(CommittedLeaderId::new(h.term, 0), h.index);
    let read_error = |what: String| -> StorageError {
        StorageIOError::read_log_at_index(h.index, openraft::AnyError::error(what)).into()
    };
    let payload = match h.kind {
        EntryKind::Records => EntryPayload::Normal(Command::Records(
            batches.iter().map(|b| b.bytes().clone()).collect(),
        )),
        EntryKind::Control => {
            let body = batch.payload();
            match body.first() {
                Some(&TAG_BLANK) => EntryPayload::Blank,
                Some(&TAG_MEMBERSHIP) => EntryPayload::Membership(
                    serde_json::from_slice(&body[1..])
                        .map_err(|e| read_error(format!("membership entry: {e}")))?,
                ),
                Some(&TAG_CONTROLLER) => EntryPayload::Normal(Command::Controller(
                    serde_json::from_slice(&body[1..])
                        .map_err(|e| read_error(format!("controller entry: {e}")))?,
                )),
                other => return Err(read_error(format!("unknown control entry tag {other:?}"))),
            }
        }
    };
    Ok(Entry { log_id, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::ControllerCommand;
    use std::collections::BTreeSet;
    use weft_storage::{BatchBuilder, ProducerInfo};

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 0), index)
    }

    #[test]
    fn every_payload_round_trips_through_a_batch() {
        let mut records = BatchBuilder::new();
        records.push(5, b"k", b"v", []);
        let proposed = records.seal(
            0,
            0,
            0,
            ProducerInfo {
                producer_id: 3,
                producer_epoch: 1,
                base_sequence: 9,
            },
        );
        let membership = openraft::Membership::new(vec![BTreeSet::from([1u64])], None);
        let entries = vec![
            Entry {
                log_id: log_id(1, 4),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(1, 5),
                payload: EntryPayload::Membership(membership),
            },
            Entry {
                log_id: log_id(2, 6),
                payload: EntryPayload::Normal(Command::Controller(
                    ControllerCommand::DeleteTopic { name: "t".into() },
                )),
            },
            Entry {
                log_id: log_id(2, 7),
                payload: EntryPayload::Normal(Command::Records(vec![
                    proposed.bytes().clone(),
                    proposed.bytes().clone(),
                ])),
            },
        ];
        for entry in entries {
            let batches = to_batches(entry.clone(), 40).expect("encodes");
            for batch in &batches {
                assert_eq!(
                    (batch.header().term, batch.header().index),
                    (entry.log_id.leader_id.term, entry.log_id.index)
                );
            }
            assert_eq!(batches[0].header().base_offset, 40);
            let back = from_batches(&batches).expect("decodes");
            assert_eq!(back.log_id, entry.log_id);
            match (&back.payload, &entry.payload) {
                (
                    EntryPayload::Normal(Command::Records(stored)),
                    EntryPayload::Normal(Command::Records(_)),
                ) => {
                    assert_eq!(stored.len(), 2, "both batches of the entry");
                    for (i, bytes) in stored.iter().enumerate() {
                        let stored = Batch::decode(bytes.clone()).expect("valid");
                        assert_eq!(
                            stored.header().base_offset,
                            40 + i as u64,
                            "restamped at its position, one after the other"
                        );
                        assert_eq!(stored.header().producer_id, 3);
                        assert_eq!(stored.payload(), proposed.payload());
                    }
                }
                (a, b) => assert_eq!(a, b),
            }
        }
    }

    #[test]
    fn a_replica_keeps_the_leaders_offsets_and_refuses_others() {
        let mut records = BatchBuilder::new();
        records.push(5, b"k", b"v", []);
        let stamped = records.seal(40, 3, 7, ProducerInfo::default());
        let entry = Entry {
            log_id: log_id(3, 7),
            payload: EntryPayload::Normal(Command::Records(vec![stamped.bytes().clone()])),
        };
        let kept = to_batches(entry.clone(), 40).expect("continues this log");
        assert_eq!(
            kept[0].bytes(),
            stamped.bytes(),
            "stored as the leader stamped it"
        );
        let error = to_batches(entry.clone(), 41).expect_err("a log one record ahead");
        assert!(
            error.to_string().contains("stamped at offset 40"),
            "{error}"
        );
    }

    #[test]
    fn a_records_command_with_a_corrupt_batch_is_refused() {
        let entry = Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Normal(Command::Records(vec![bytes::Bytes::from_static(
                b"not a batch",
            )])),
        };
        assert!(to_batches(entry.clone(), 0).is_err());
    }
}
