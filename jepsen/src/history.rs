//! The history: every client operation as an `invoke` line and then one completion line (`ok`:
//! surely applied, `fail`: surely not applied, `info`: unknown), plus the nemesis's faults and
//! the observers' leadership samples, one JSON object per line (`history.jsonl`), each with a
//! monotonic timestamp from the start of the run.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What a line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An operation starts.
    Invoke,
    /// It surely happened (a poll returned these records; a send was stored at this offset).
    Ok,
    /// It surely did not happen.
    Fail,
    /// Unknown: it may or may not have happened.
    Info,
}

/// The operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Function {
    /// Publish one unique value to a key (a partition).
    Send,
    /// Read a key from an offset.
    Poll,
    /// The final read of every key from offset 0 (after healing).
    FinalPoll,
    /// One broker's own copy of a key, read at the end (for the divergence check).
    ReplicaRead,
    /// A fault starts (invoke) or is healed (ok).
    Nemesis,
    /// A broker's view of a partition's leadership: (term, leader).
    Leader,
    /// A consumer-group member received an assignment (its generation).
    Assign,
    /// A group member commits an offset of a key in a generation.
    Commit,
    /// The group's committed offset of a key, read.
    ReadCommitted,
}

/// One line of the history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    /// Nanoseconds since the run started (monotonic).
    pub time_ns: u64,
    /// Who did it: `s<N>` senders, `p<N>` pollers, `final`, `nemesis`, `observer`.
    pub process: String,
    /// Pairs an invoke with its completion.
    pub id: u64,
    /// Invoke or completion.
    pub kind: Kind,
    /// The operation.
    pub f: Function,
    /// The key (partition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<u32>,
    /// A send's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// A send's offset (ok), a poll's starting offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// What a poll returned: (offset, value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<Vec<(u64, String)>>,
    /// The broker asked (node id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// The error of a fail or info: gRPC code, reason and message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A fault's description, or a leadership sample's "term leader".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A group assignment's or commit's generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

impl Op {
    /// An operation line with the fields every line has.
    pub fn new(process: &str, id: u64, kind: Kind, f: Function) -> Op {
        Op {
            time_ns: 0,
            process: process.to_string(),
            id,
            kind,
            f,
            key: None,
            value: None,
            offset: None,
            records: None,
            node: None,
            error: None,
            detail: None,
            generation: None,
        }
    }
}

/// Appends operations to `history.jsonl`, stamping each with the time since the run started.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    out: Mutex<BufWriter<File>>,
    next_id: AtomicU64,
}

impl Recorder {
    /// Creates `path` (truncating it).
    pub fn create(path: &Path, start: Instant) -> Result<Recorder> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Recorder {
            start,
            out: Mutex::new(BufWriter::new(file)),
            next_id: AtomicU64::new(1),
        })
    }

    /// A new operation id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Nanoseconds since the run started.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records `op` now.
    pub fn record(&self, mut op: Op) {
        op.time_ns = self.now_ns();
        let Ok(line) = serde_json::to_string(&op) else {
            return;
        };
        if let Ok(mut out) = self.out.lock() {
            // A write error surfaces at flush (the end of the run); the checker then fails on a
            // history that does not parse or misses completions.
            let _ = writeln!(out, "{line}");
        }
    }

    /// Flushes what was recorded.
    pub fn flush(&self) -> Result<()> {
        let mut out = self
            .out
            .lock()
            .map_err(|_| anyhow::anyhow!("history writer poisoned"))?;
        out.flush().context("flushing the history")
    }
}

/// Reads a history file. A torn last line (the harness was killed mid-write) is skipped; any
/// other unparsable line is an error.
pub fn read(path: &Path) -> Result<Vec<Op>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", path.display()))?;
    let mut ops = Vec::with_capacity(lines.len());
    let last = lines.len().saturating_sub(1);
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Op>(line) {
            Ok(op) => ops.push(op),
            Err(_) if i == last => break,
            Err(e) => anyhow::bail!("{}:{}: {e}", path.display(), i + 1),
        }
    }
    Ok(ops)
}
