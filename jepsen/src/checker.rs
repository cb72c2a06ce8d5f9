//! The checker: reads a history and counts every anomaly of RELIABILITY.md it covers, with the
//! first few examples of each. Any non-zero count fails the run.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::history::{Function, Kind, Op};
use crate::workload::value_is_intact;

/// The anomalies checked, in report order.
pub const ANOMALIES: [&str; 16] = [
    "lost-write",
    "unseen-at-end",
    "inconsistent-offsets",
    "duplicate",
    "aborted-read",
    "phantom",
    "poll-skip",
    "nonmonotonic-poll",
    "nonmonotonic-send",
    "realtime-order",
    "offset-gap",
    "replica-divergence",
    "election-safety",
    "crc-escape",
    "commit-regression",
    "zombie-commit",
];

/// The anomalies that only a history with consumer-group operations exercises (reported as not
/// checked when it has none).
const GROUP_ANOMALIES: [&str; 2] = ["commit-regression", "zombie-commit"];

/// Examples kept per anomaly.
const EXAMPLES_MAX: usize = 8;

/// What the checker found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Count per anomaly (every one of [`ANOMALIES`], zeros included).
    pub anomalies: BTreeMap<String, u64>,
    /// The first few examples of each anomaly found.
    pub examples: BTreeMap<String, Vec<String>>,
    /// Anomaly classes not checked by this workload.
    pub not_checked: Vec<String>,
    /// Sends by outcome: ok, fail, info (no completion counts as info).
    pub sends: BTreeMap<String, u64>,
    /// Polls by outcome (final reads included).
    pub polls: BTreeMap<String, u64>,
    /// Group commits by outcome.
    #[serde(default)]
    pub commits: BTreeMap<String, u64>,
    /// Faults injected, by class.
    pub faults: BTreeMap<String, u64>,
    /// Acknowledged sends never read back by the end.
    pub unread_at_end: u64,
    /// Keys whose replicas were compared, and the nodes compared for each.
    pub replicas_compared: BTreeMap<u32, Vec<u64>>,
    /// Per second: (second, acknowledged sends, median and max send latency in ms, acknowledged
    /// values not yet read by any poll).
    pub timeline: Vec<Second>,
    /// Fault windows: (start s, end s, description).
    pub fault_windows: Vec<(f64, f64, String)>,
    /// Each partition whose leader a fault cut off or isolated, and how soon the others had a
    /// new leader (see [`failovers`]).
    #[serde(default)]
    pub failovers: Vec<Failover>,
}

/// A partition whose leader a fault cut off from the other brokers (availability, not an
/// anomaly: reported, never failing a run).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Failover {
    /// The fault, as the nemesis described it.
    pub fault: String,
    /// When it began (s since the start).
    pub start: f64,
    /// How long it was held (s).
    pub held: f64,
    /// The key (partition).
    pub key: u32,
    /// The node cut off, which led the partition.
    pub leader: u64,
    /// Seconds from the cut until a broker on the other side was seen with a new leader in a
    /// higher term; None: not while the fault lasted.
    pub seconds: Option<f64>,
}

/// One second of the run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Second {
    /// Seconds since the start.
    pub second: u64,
    /// Sends acknowledged in this second.
    pub acked: u64,
    /// Median latency of those sends (ms).
    pub latency_p50_ms: f64,
    /// Largest latency of those sends (ms).
    pub latency_max_ms: f64,
    /// Acknowledged values no poll had returned by the end of this second.
    pub unread: u64,
}

impl Report {
    /// Whether any anomaly was found.
    pub fn failed(&self) -> bool {
        self.anomalies.values().any(|c| *c > 0)
    }

    /// Acknowledged sends.
    pub fn acked(&self) -> u64 {
        self.sends.get("ok").copied().unwrap_or(0)
    }

    fn found(&mut self, anomaly: &str, example: String) {
        *self.anomalies.entry(anomaly.to_string()).or_default() += 1;
        let examples = self.examples.entry(anomaly.to_string()).or_default();
        if examples.len() < EXAMPLES_MAX {
            examples.push(example);
        }
    }
}

#[derive(Debug, Clone)]
struct Send {
    process: String,
    key: u32,
    value: String,
    invoked: u64,
    completed: Option<u64>,
    kind: Kind,
    offset: Option<u64>,
}

/// The consumer-group checks. commit-regression: a committed offset seen (a commit's answer, a
/// read of the group's offsets) is never below one seen by an operation that completed before
/// it began. zombie-commit: a commit naming a generation older than one some member had
/// received before the commit began is refused.
fn check_groups(
    report: &mut Report,
    assigns: &[(u64, u64, &Op)],
    group_ops: &[(u64, &Op)],
    history: &[Op],
) {
    let exercised = history
        .iter()
        .any(|op| matches!(op.f, Function::Commit | Function::ReadCommitted));
    if !exercised {
        report.not_checked = GROUP_ANOMALIES.iter().map(|s| s.to_string()).collect();
        return;
    }
    let mut by_key: BTreeMap<u32, Vec<(u64, u64, u64, &Op)>> = BTreeMap::new();
    for (invoked, op) in group_ops {
        // A read that found no committed offset saw 0: after a commit, the group's offsets
        // were lost (wiped, rolled back), which is the regression this check is for.
        let offset = match op.f {
            Function::ReadCommitted => Some(op.offset.unwrap_or(0)),
            _ => op.offset,
        };
        if let (Some(key), Some(offset)) = (op.key, offset) {
            by_key
                .entry(key)
                .or_default()
                .push((*invoked, op.time_ns, offset, op));
        }
    }
    for (key, list) in &by_key {
        let mut by_completion = list.clone();
        by_completion.sort_by_key(|o| o.1);
        let mut by_invocation = list.clone();
        by_invocation.sort_by_key(|o| o.0);
        let mut i = 0;
        let mut best: Option<(u64, &Op)> = None;
        for (invoked, _, offset, op) in by_invocation {
            while i < by_completion.len() && by_completion[i].1 < invoked {
                if best.is_none_or(|(b, _)| by_completion[i].2 > b) {
                    best = Some((by_completion[i].2, by_completion[i].3));
                }
                i += 1;
            }
            if let Some((before, seen_by)) = best
                && offset < before
            {
                report.found(
                    "commit-regression",
                    format!(
                        "key {key}: {} saw committed offset {offset} ({:?} at {:.3} s), after {} saw {before} ({:?} at {:.3} s)",
                        op.process,
                        op.f,
                        op.time_ns as f64 / 1e9,
                        seen_by.process,
                        seen_by.f,
                        seen_by.time_ns as f64 / 1e9
                    ),
                );
            }
        }
    }
    let mut assigns = assigns.to_vec();
    assigns.sort_by_key(|a| a.0);
    let mut commits: Vec<(u64, &Op)> = group_ops
        .iter()
        .filter(|(_, op)| op.f == Function::Commit)
        .copied()
        .collect();
    commits.sort_by_key(|c| c.0);
    let mut i = 0;
    let mut newest: Option<(u64, &Op)> = None;
    for (invoked, op) in commits {
        while i < assigns.len() && assigns[i].0 < invoked {
            if newest.is_none_or(|(g, _)| assigns[i].1 > g) {
                newest = Some((assigns[i].1, assigns[i].2));
            }
            i += 1;
        }
        if let (Some(generation), Some((current, given_to))) = (op.generation, newest)
            && generation < current
        {
            report.found(
                "zombie-commit",
                format!(
                    "{} committed key {:?} offset {:?} in generation {generation} at {:.3} s, after {} had received generation {current} at {:.3} s",
                    op.process,
                    op.key,
                    op.offset,
                    op.time_ns as f64 / 1e9,
                    given_to.process,
                    given_to.time_ns as f64 / 1e9
                ),
            );
        }
    }
}

/// The (term, leader) an observer's leader op reports ("TERM LEADER").
fn observed_leader(op: &Op) -> Option<(u64, u64)> {
    let (term, leader) = op.detail.as_deref()?.split_once(' ')?;
    Some((term.parse().ok()?, leader.parse().ok()?))
}

/// For each fault that isolated one node ("node N isolated", "leader N isolated") and each
/// partition that node led when the fault began (the leader of the highest term any broker
/// reported), how soon a broker other than N reported another leader in a higher term, as the
/// observer sampled (every ~200 ms per broker).
pub fn failovers(history: &[Op], windows: &[(f64, f64, String)]) -> Vec<Failover> {
    // (time s, node, key, term, leader), in history order.
    let observed: Vec<(f64, u64, u32, u64, u64)> = history
        .iter()
        .filter(|op| op.f == Function::Leader)
        .filter_map(|op| {
            let (term, leader) = observed_leader(op)?;
            Some((op.time_ns as f64 / 1e9, op.node?, op.key?, term, leader))
        })
        .collect();
    let mut out = Vec::new();
    for (start, end, detail) in windows {
        let isolated = detail
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(3)
            .find(|w| (w[0] == "node" || w[0] == "leader") && w[2] == "isolated")
            .and_then(|w| w[1].parse::<u64>().ok());
        let Some(isolated) = isolated else {
            continue;
        };
        // The leader of the highest term reported before the fault, per key.
        let mut led: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for &(t, _, key, term, leader) in &observed {
            if t > *start {
                break;
            }
            let e = led.entry(key).or_insert((term, leader));
            if term >= e.0 {
                *e = (term, leader);
            }
        }
        for (key, (term, leader)) in led {
            if leader != isolated {
                continue;
            }
            let seconds = observed
                .iter()
                .find(|&&(t, node, k, tm, l)| {
                    t >= *start
                        && t <= *end
                        && k == key
                        && node != isolated
                        && tm > term
                        && l != isolated
                })
                .map(|o| o.0 - start);
            out.push(Failover {
                fault: detail.clone(),
                start: *start,
                held: end - start,
                key,
                leader,
                seconds,
            });
        }
    }
    out
}

/// Checks `history`.
pub fn check(history: &[Op]) -> Report {
    let mut report = Report::default();
    for anomaly in ANOMALIES {
        report.anomalies.insert(anomaly.to_string(), 0);
    }

    // Pair invocations with completions.
    let mut open: HashMap<(&str, u64), &Op> = HashMap::new();
    let mut sends: Vec<Send> = Vec::new();
    let mut send_of: HashMap<(String, u64), usize> = HashMap::new();
    let mut reads: Vec<&Op> = Vec::new();
    let mut replica_reads: Vec<&Op> = Vec::new();
    let mut leaders: BTreeMap<(u32, u64), BTreeSet<u64>> = BTreeMap::new();
    let mut fault_open: HashMap<u64, (f64, String)> = HashMap::new();
    // Assignments received: (time, generation, op).
    let mut assigns: Vec<(u64, u64, &Op)> = Vec::new();
    // Group commits and reads of committed offsets that completed ok: (invoked, completion).
    let mut group_ops: Vec<(u64, &Op)> = Vec::new();
    for op in history {
        match (op.f, op.kind) {
            (Function::Send, Kind::Invoke) => {
                send_of.insert((op.process.clone(), op.id), sends.len());
                sends.push(Send {
                    process: op.process.clone(),
                    key: op.key.unwrap_or(0),
                    value: op.value.clone().unwrap_or_default(),
                    invoked: op.time_ns,
                    completed: None,
                    kind: Kind::Info,
                    offset: None,
                });
            }
            (Function::Send, kind) => {
                if let Some(&i) = send_of.get(&(op.process.clone(), op.id)) {
                    sends[i].completed = Some(op.time_ns);
                    sends[i].kind = kind;
                    sends[i].offset = op.offset;
                }
            }
            (Function::Poll | Function::FinalPoll | Function::ReplicaRead, Kind::Invoke) => {
                open.insert((op.process.as_str(), op.id), op);
            }
            (Function::Poll | Function::FinalPoll, kind) => {
                open.remove(&(op.process.as_str(), op.id));
                *report
                    .polls
                    .entry(format!("{kind:?}").to_lowercase())
                    .or_default() += 1;
                if kind == Kind::Ok {
                    reads.push(op);
                }
            }
            (Function::Assign, _) => {
                if let Some(generation) = op.generation {
                    assigns.push((op.time_ns, generation, op));
                }
            }
            (Function::Commit | Function::ReadCommitted, Kind::Invoke) => {
                open.insert((op.process.as_str(), op.id), op);
            }
            (Function::Commit | Function::ReadCommitted, kind) => {
                let Some(invoke) = open.remove(&(op.process.as_str(), op.id)) else {
                    continue;
                };
                if op.f == Function::Commit {
                    *report
                        .commits
                        .entry(format!("{kind:?}").to_lowercase())
                        .or_default() += 1;
                }
                if kind == Kind::Ok {
                    group_ops.push((invoke.time_ns, op));
                }
            }
            (Function::ReplicaRead, Kind::Ok) => replica_reads.push(op),
            (Function::ReplicaRead, _) => {}
            (Function::Leader, _) => {
                if let Some((term, leader)) = observed_leader(op) {
                    leaders
                        .entry((op.key.unwrap_or(0), term))
                        .or_default()
                        .insert(leader);
                }
            }
            (Function::Nemesis, Kind::Invoke) => {
                let detail = op.detail.clone().unwrap_or_default();
                let class = detail.split(':').next().unwrap_or("").to_string();
                *report.faults.entry(class).or_default() += 1;
                fault_open.insert(op.id, (op.time_ns as f64 / 1e9, detail));
            }
            (Function::Nemesis, _) => {
                if let Some((start, detail)) = fault_open.remove(&op.id) {
                    report
                        .fault_windows
                        .push((start, op.time_ns as f64 / 1e9, detail));
                }
            }
        }
    }
    let end_s = history.last().map_or(0.0, |o| o.time_ns as f64 / 1e9);
    for (_, (start, detail)) in fault_open {
        report.fault_windows.push((start, end_s, detail));
    }
    report
        .fault_windows
        .sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    report.failovers = failovers(history, &report.fault_windows);
    for s in &sends {
        *report
            .sends
            .entry(format!("{:?}", s.kind).to_lowercase())
            .or_default() += 1;
    }
    let by_value: HashMap<&str, &Send> = sends.iter().map(|s| (s.value.as_str(), s)).collect();

    // What the polls saw: values at (key, offset), where each value was seen, and when first.
    let mut at: BTreeMap<(u32, u64), BTreeSet<&str>> = BTreeMap::new();
    let mut seen: HashMap<&str, BTreeSet<(u32, u64)>> = HashMap::new();
    let mut first_seen: HashMap<&str, u64> = HashMap::new();
    let mut highest: BTreeMap<u32, u64> = BTreeMap::new();
    for op in &reads {
        let key = op.key.unwrap_or(0);
        for (offset, value) in op.records.as_deref().unwrap_or(&[]) {
            at.entry((key, *offset)).or_default().insert(value.as_str());
            seen.entry(value.as_str())
                .or_default()
                .insert((key, *offset));
            first_seen
                .entry(value.as_str())
                .and_modify(|t| *t = (*t).min(op.time_ns))
                .or_insert(op.time_ns);
            let h = highest.entry(key).or_insert(0);
            *h = (*h).max(*offset);
        }
    }

    // Values: intact, sent, not refused.
    for (value, places) in &seen {
        if !value_is_intact(value) {
            report.found("crc-escape", format!("{value:?} read at {places:?}"));
            continue;
        }
        match by_value.get(value) {
            None => report.found(
                "phantom",
                format!("{value:?} read at {places:?}, never sent"),
            ),
            Some(send) if send.kind == Kind::Fail => report.found(
                "aborted-read",
                format!("{value:?} read at {places:?}, its send failed"),
            ),
            _ => {}
        }
        if places.len() > 1 {
            report.found("duplicate", format!("{value:?} at {places:?}"));
        }
    }
    for ((key, offset), values) in &at {
        if values.len() > 1 {
            report.found(
                "inconsistent-offsets",
                format!("key {key} offset {offset} read as {values:?}"),
            );
        }
    }

    // Acknowledged sends: read back where they were acknowledged.
    for s in sends.iter().filter(|s| s.kind == Kind::Ok) {
        let Some(offset) = s.offset else { continue };
        let places = seen.get(s.value.as_str());
        match places {
            Some(places) => {
                if !places.contains(&(s.key, offset)) {
                    report.found(
                        "inconsistent-offsets",
                        format!(
                            "{:?} acknowledged at key {} offset {offset}, read at {places:?}",
                            s.value, s.key
                        ),
                    );
                }
            }
            None => {
                let top = highest.get(&s.key).copied();
                if top.is_some_and(|h| offset <= h) {
                    let there = at.get(&(s.key, offset));
                    report.found(
                        "lost-write",
                        format!(
                            "{:?} acknowledged at key {} offset {offset} (by {}), never read; that offset read as {there:?}",
                            s.value, s.key, s.process
                        ),
                    );
                } else {
                    report.found(
                        "unseen-at-end",
                        format!(
                            "{:?} acknowledged at key {} offset {offset}, past every read ({top:?})",
                            s.value, s.key
                        ),
                    );
                }
                report.unread_at_end += 1;
            }
        }
    }

    // Sends of one process to one key get increasing offsets; a send begun after another was
    // acknowledged lands after it.
    let mut by_process: BTreeMap<(&str, u32), Vec<&Send>> = BTreeMap::new();
    let mut by_key: BTreeMap<u32, Vec<&Send>> = BTreeMap::new();
    for s in sends
        .iter()
        .filter(|s| s.kind == Kind::Ok && s.offset.is_some())
    {
        by_process
            .entry((s.process.as_str(), s.key))
            .or_default()
            .push(s);
        by_key.entry(s.key).or_default().push(s);
    }
    for ((process, key), list) in &by_process {
        for pair in list.windows(2) {
            if pair[1].offset <= pair[0].offset {
                report.found(
                    "nonmonotonic-send",
                    format!(
                        "{process} key {key}: {:?} at {:?} after {:?} at {:?}",
                        pair[1].value, pair[1].offset, pair[0].value, pair[0].offset
                    ),
                );
            }
        }
    }
    for (key, list) in &by_key {
        let mut by_completion: Vec<&Send> = list.clone();
        by_completion.sort_by_key(|s| s.completed);
        let mut by_invocation: Vec<&Send> = list.clone();
        by_invocation.sort_by_key(|s| s.invoked);
        let mut i = 0;
        let mut best: Option<&Send> = None;
        for s in by_invocation {
            while i < by_completion.len() && by_completion[i].completed < Some(s.invoked) {
                if best.is_none_or(|b| by_completion[i].offset > b.offset) {
                    best = Some(by_completion[i]);
                }
                i += 1;
            }
            if let Some(b) = best
                && s.offset < b.offset
            {
                report.found(
                    "realtime-order",
                    format!(
                        "key {key}: {:?} sent after {:?} (offset {:?}) was acknowledged, stored at {:?}",
                        s.value, b.value, b.offset, s.offset
                    ),
                );
            }
        }
    }

    check_groups(&mut report, &assigns, &group_ops, history);

    // Keys no in-run poll read: dirty reads and skips there went unseen while faults ran.
    let polled: BTreeSet<u32> = reads
        .iter()
        .filter(|op| op.f == Function::Poll)
        .filter_map(|op| op.key)
        .collect();
    let keys: BTreeSet<u32> = sends.iter().map(|s| s.key).collect();
    for key in keys.difference(&polled) {
        report
            .not_checked
            .push(format!("in-run polls of key {key}"));
    }

    // Each poll reads on from where it asked, densely.
    for op in &reads {
        let key = op.key.unwrap_or(0);
        let mut expected = op.offset.unwrap_or(0);
        for (offset, _) in op.records.as_deref().unwrap_or(&[]) {
            if *offset > expected {
                report.found(
                    "poll-skip",
                    format!(
                        "{} key {key}: asked from {:?}, skipped {expected}..{offset}",
                        op.process, op.offset
                    ),
                );
            } else if *offset < expected {
                report.found(
                    "nonmonotonic-poll",
                    format!(
                        "{} key {key}: asked from {:?}, got {offset} after {}",
                        op.process,
                        op.offset,
                        expected.saturating_sub(1)
                    ),
                );
            }
            expected = offset + 1;
        }
    }

    // Offsets are dense: every offset up to the highest read holds a record someone read.
    for (key, top) in &highest {
        let missing: Vec<u64> = (0..=*top)
            .filter(|o| !at.contains_key(&(*key, *o)))
            .collect();
        if !missing.is_empty() {
            report.found(
                "offset-gap",
                format!(
                    "key {key}: {} offsets up to {top} never read, first {:?}",
                    missing.len(),
                    &missing[..missing.len().min(5)]
                ),
            );
        }
    }

    // Replicas agree on every offset they both hold.
    let mut replicas: BTreeMap<u32, Vec<(u64, &Op)>> = BTreeMap::new();
    for op in &replica_reads {
        replicas
            .entry(op.key.unwrap_or(0))
            .or_default()
            .push((op.node.unwrap_or(0), op));
    }
    for (key, copies) in &replicas {
        report
            .replicas_compared
            .insert(*key, copies.iter().map(|(n, _)| *n).collect());
        let maps: Vec<(u64, BTreeMap<u64, &str>)> = copies
            .iter()
            .map(|(node, op)| {
                (
                    *node,
                    op.records
                        .as_deref()
                        .unwrap_or(&[])
                        .iter()
                        .map(|(o, v)| (*o, v.as_str()))
                        .collect(),
                )
            })
            .collect();
        // A copy is dense from where its read began: a hole in one copy is a difference
        // from every copy that holds the offset, or from the log if none does.
        for (node, map) in &maps {
            let holes: Vec<u64> = map
                .keys()
                .zip(map.keys().skip(1))
                .filter(|(a, b)| **b != **a + 1)
                .map(|(a, _)| a + 1)
                .collect();
            if !holes.is_empty() {
                report.found(
                    "replica-divergence",
                    format!(
                        "key {key}: node {node}'s copy skips offsets at {} places, first after {:?}",
                        holes.len(),
                        &holes[..holes.len().min(5)]
                    ),
                );
            }
        }
        for (i, (a, ma)) in maps.iter().enumerate() {
            for (b, mb) in &maps[i + 1..] {
                let differ: Vec<u64> = ma
                    .iter()
                    .filter_map(|(o, v)| mb.get(o).filter(|w| *w != v).map(|_| *o))
                    .collect();
                if !differ.is_empty() {
                    report.found(
                        "replica-divergence",
                        format!(
                            "key {key}: nodes {a} and {b} differ at {} offsets, first {:?}",
                            differ.len(),
                            &differ[..differ.len().min(5)]
                        ),
                    );
                }
            }
        }
    }

    // At most one leader per term of each partition.
    for ((key, term), who) in &leaders {
        if who.len() > 1 {
            report.found(
                "election-safety",
                format!("key {key} term {term}: leaders {who:?}"),
            );
        }
    }

    report.timeline = timeline(&sends, &first_seen);
    report
}

fn timeline(sends: &[Send], first_seen: &HashMap<&str, u64>) -> Vec<Second> {
    let seconds = sends
        .iter()
        .filter_map(|s| s.completed)
        .max()
        .map_or(0, |t| t / 1_000_000_000 + 1);
    let mut out: Vec<Second> = (0..seconds)
        .map(|second| Second {
            second,
            ..Second::default()
        })
        .collect();
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); seconds as usize];
    // unread(t) = acknowledged by t - (acknowledged by t and read by t).
    let mut delta = vec![0i64; seconds as usize + 1];
    for s in sends.iter().filter(|s| s.kind == Kind::Ok) {
        let Some(done) = s.completed else { continue };
        let second = (done / 1_000_000_000) as usize;
        out[second].acked += 1;
        latencies[second].push((done - s.invoked) as f64 / 1e6);
        delta[second] += 1;
        if let Some(read) = first_seen.get(s.value.as_str()) {
            let when = ((*read).max(done) / 1_000_000_000) as usize;
            if when < delta.len() {
                delta[when] -= 1;
            }
        }
    }
    let mut unread = 0i64;
    for (i, second) in out.iter_mut().enumerate() {
        unread += delta[i];
        second.unread = unread.max(0) as u64;
        let l = &mut latencies[i];
        if !l.is_empty() {
            l.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            second.latency_p50_ms = l[l.len() / 2];
            second.latency_max_ms = l[l.len() - 1];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::make_value;

    struct H {
        ops: Vec<Op>,
        t: u64,
        id: u64,
    }

    impl H {
        fn new() -> H {
            H {
                ops: Vec::new(),
                t: 0,
                id: 0,
            }
        }
        fn push(&mut self, mut op: Op) {
            self.t += 1_000_000;
            op.time_ns = self.t;
            self.ops.push(op);
        }
        /// A send of `value` to `key` completed as `kind` (at `offset` when ok).
        fn send(&mut self, process: &str, key: u32, value: &str, kind: Kind, offset: Option<u64>) {
            self.id += 1;
            let mut op = Op::new(process, self.id, Kind::Invoke, Function::Send);
            op.key = Some(key);
            op.value = Some(value.into());
            self.push(op.clone());
            op.kind = kind;
            op.offset = offset;
            self.push(op);
        }
        fn poll(&mut self, process: &str, key: u32, from: u64, records: &[(u64, &str)]) {
            self.id += 1;
            let mut op = Op::new(process, self.id, Kind::Invoke, Function::Poll);
            op.key = Some(key);
            op.offset = Some(from);
            self.push(op.clone());
            op.kind = Kind::Ok;
            op.records = Some(records.iter().map(|(o, v)| (*o, v.to_string())).collect());
            self.push(op);
        }
        fn replica(&mut self, node: u64, key: u32, records: &[(u64, &str)]) {
            self.id += 1;
            let mut op = Op::new("replicas", self.id, Kind::Ok, Function::ReplicaRead);
            op.key = Some(key);
            op.node = Some(node);
            op.records = Some(records.iter().map(|(o, v)| (*o, v.to_string())).collect());
            self.push(op);
        }
        fn leader(&mut self, node: u64, key: u32, term: u64, leader: u64) {
            let mut op = Op::new("observer", 0, Kind::Ok, Function::Leader);
            op.key = Some(key);
            op.node = Some(node);
            op.detail = Some(format!("{term} {leader}"));
            self.push(op);
        }
        fn check(&self) -> Report {
            check(&self.ops)
        }
        fn assign(&mut self, process: &str, generation: u64) {
            self.id += 1;
            let mut op = Op::new(process, self.id, Kind::Ok, Function::Assign);
            op.generation = Some(generation);
            self.push(op);
        }
        /// A commit of `offset` to `key` in `generation`, completed as `kind` (ok: the
        /// committed offset).
        fn commit(&mut self, process: &str, key: u32, generation: u64, offset: u64, kind: Kind) {
            self.id += 1;
            let mut op = Op::new(process, self.id, Kind::Invoke, Function::Commit);
            op.key = Some(key);
            op.offset = Some(offset);
            op.generation = Some(generation);
            self.push(op.clone());
            op.kind = kind;
            self.push(op);
        }
        fn read_committed(&mut self, process: &str, key: u32, offset: Option<u64>) {
            self.id += 1;
            let mut op = Op::new(process, self.id, Kind::Invoke, Function::ReadCommitted);
            op.key = Some(key);
            self.push(op.clone());
            op.kind = Kind::Ok;
            op.offset = offset;
            self.push(op);
        }
    }

    fn count(report: &Report, anomaly: &str) -> u64 {
        report.anomalies.get(anomaly).copied().unwrap_or(0)
    }

    fn only(report: &Report, expected: &[(&str, u64)]) {
        for anomaly in ANOMALIES {
            let want = expected
                .iter()
                .find(|(a, _)| *a == anomaly)
                .map_or(0, |(_, n)| *n);
            assert_eq!(
                count(report, anomaly),
                want,
                "{anomaly}: {:?}",
                report.examples
            );
        }
    }

    #[test]
    fn a_clean_history_has_no_anomalies() {
        let (a, b) = (make_value(0, 0), make_value(0, 1));
        let mut h = H::new();
        h.send("s0", 0, &a, Kind::Ok, Some(0));
        h.send("s0", 0, &b, Kind::Ok, Some(1));
        h.send("s0", 0, &make_value(0, 2), Kind::Fail, None);
        h.send("s0", 0, &make_value(0, 3), Kind::Info, None);
        h.poll("p0", 0, 0, &[(0, &a), (1, &b)]);
        h.replica(1, 0, &[(0, &a), (1, &b)]);
        h.replica(2, 0, &[(0, &a)]);
        h.leader(1, 0, 1, 1);
        h.leader(2, 0, 1, 1);
        let report = h.check();
        only(&report, &[]);
        assert!(!report.failed());
        assert_eq!(report.acked(), 2);
    }

    /// A copy missing an offset between two it holds differs from one holding it, though the
    /// offsets both hold agree; a key that no in-run poll read is reported as not checked.
    #[test]
    fn a_hole_in_a_copy_diverges_and_keys_never_polled_are_reported() {
        let v: Vec<String> = (0..3).map(|i| make_value(0, i)).collect();
        let mut h = H::new();
        for (i, value) in v.iter().enumerate() {
            h.send("s0", 0, value, Kind::Ok, Some(i as u64));
        }
        h.send("s0", 1, &make_value(0, 9), Kind::Ok, Some(0));
        h.poll("p0", 0, 0, &[(0, &v[0]), (1, &v[1]), (2, &v[2])]);
        h.replica(1, 0, &[(0, &v[0]), (1, &v[1]), (2, &v[2])]);
        h.replica(2, 0, &[(0, &v[0]), (2, &v[2])]);
        let report = h.check();
        only(&report, &[("replica-divergence", 1), ("unseen-at-end", 1)]);
        assert!(
            report
                .not_checked
                .contains(&"in-run polls of key 1".to_string()),
            "{:?}",
            report.not_checked
        );
        assert!(
            !report
                .not_checked
                .contains(&"in-run polls of key 0".to_string())
        );
    }

    #[test]
    fn lost_unseen_and_gaps_are_found() {
        let v: Vec<String> = (0..4).map(|i| make_value(1, i)).collect();
        let mut h = H::new();
        for (i, value) in v.iter().enumerate() {
            h.send("s1", 0, value, Kind::Ok, Some(i as u64));
        }
        // Offset 1 is never read back, offset 2 holds another value, offset 3 is past every read.
        let info = make_value(2, 0);
        h.send("s2", 0, &info, Kind::Info, None);
        h.poll("p0", 0, 0, &[(0, &v[0]), (2, &info)]);
        let report = h.check();
        // v1 and v2 lost (both at or below the highest read offset, never read); v3 unseen; v2's
        // offset read as another value; offset 1 never read (a gap) and skipped by the poll.
        only(
            &report,
            &[
                ("lost-write", 2),
                ("unseen-at-end", 1),
                ("offset-gap", 1),
                ("poll-skip", 1),
            ],
        );
        assert_eq!(report.unread_at_end, 3);
    }

    #[test]
    fn values_in_two_places_two_values_in_one_place_and_refused_values_are_found() {
        let (a, b, refused) = (make_value(0, 0), make_value(0, 1), make_value(0, 2));
        let never_sent = make_value(9, 9);
        let mut damaged = make_value(0, 3);
        damaged.replace_range(0..1, "x");
        let mut h = H::new();
        h.send("s0", 0, &a, Kind::Ok, Some(0));
        h.send("s0", 0, &b, Kind::Ok, Some(1));
        h.send("s0", 0, &refused, Kind::Fail, None);
        h.poll(
            "p0",
            0,
            0,
            &[
                (0, &a),
                (1, &b),
                (2, &a),
                (3, &refused),
                (4, &never_sent),
                (5, &damaged),
            ],
        );
        h.poll("p1", 0, 1, &[(1, &never_sent)]);
        let report = h.check();
        only(
            &report,
            &[
                ("duplicate", 2),
                ("inconsistent-offsets", 1),
                ("aborted-read", 1),
                ("phantom", 1),
                ("crc-escape", 1),
            ],
        );
    }

    #[test]
    fn send_order_poll_order_replicas_and_leaders_are_checked() {
        let v: Vec<String> = (0..3).map(|i| make_value(0, i)).collect();
        let w = make_value(1, 0);
        let mut h = H::new();
        // s0's second send lands below its first; s1's send, begun after s0's first was
        // acknowledged, lands below it too.
        h.send("s0", 0, &v[0], Kind::Ok, Some(2));
        h.send("s0", 0, &v[1], Kind::Ok, Some(1));
        h.send("s1", 0, &w, Kind::Ok, Some(0));
        h.poll("p0", 0, 0, &[(0, &w), (1, &v[1]), (2, &v[0])]);
        // A poll that goes backwards.
        h.poll("p1", 0, 2, &[(2, &v[0]), (1, &v[1])]);
        h.replica(1, 0, &[(0, &w), (1, &v[1])]);
        h.replica(2, 0, &[(0, &w), (1, &v[0])]);
        h.leader(1, 0, 3, 1);
        h.leader(2, 0, 3, 2);
        let report = h.check();
        only(
            &report,
            &[
                ("nonmonotonic-send", 1),
                ("realtime-order", 2),
                ("nonmonotonic-poll", 1),
                ("replica-divergence", 1),
                ("election-safety", 1),
            ],
        );
    }

    #[test]
    fn group_commits_never_regress_and_stale_generations_never_commit() {
        let mut h = H::new();
        // Without group operations, the group anomalies are not checked.
        assert_eq!(
            h.check().not_checked,
            ["commit-regression", "zombie-commit"]
        );
        h.assign("g0", 1);
        h.commit("g0", 0, 1, 10, Kind::Ok);
        h.read_committed("g1", 0, Some(10));
        h.commit("g0", 0, 1, 20, Kind::Ok);
        // A failed or unknown commit is no observation.
        h.commit("g0", 0, 1, 5, Kind::Fail);
        h.commit("g0", 0, 1, 3, Kind::Info);
        h.read_committed("g1", 0, Some(20));
        // Fine so far, on another key too.
        h.read_committed("g1", 1, None);
        assert!(!h.check().failed(), "{:?}", h.check().examples);
        assert!(h.check().not_checked.is_empty());

        // The committed offset goes back (a lost commit), and a member of generation 1 commits
        // after generation 2 was handed out, which must be refused; a refused one is fine.
        h.read_committed("g1", 0, Some(12));
        // The group's offsets gone: a read finds none after commits were seen.
        h.read_committed("g1", 0, None);
        h.assign("g1", 2);
        h.commit("g0", 1, 1, 4, Kind::Fail);
        h.commit("g0", 1, 1, 4, Kind::Ok);
        h.commit("g1", 1, 2, 5, Kind::Ok);
        let report = h.check();
        only(&report, &[("commit-regression", 2), ("zombie-commit", 1)]);
        assert_eq!(report.commits.get("ok"), Some(&4));
    }

    #[test]
    fn failovers_measure_how_soon_the_others_elect_after_their_leader_is_cut_off() {
        let mut h = H::new();
        // Key 0 led by node 2, key 1 by node 1, key 2 by node 2.
        for node in 1..=3 {
            h.leader(node, 0, 3, 2);
            h.leader(node, 1, 4, 1);
            h.leader(node, 2, 5, 2);
        }
        let mut fault = Op::new("nemesis", 900, Kind::Invoke, Function::Nemesis);
        fault.detail = Some("partition: leader 2 isolated".into());
        h.push(fault);
        let cut = h.t;
        // The isolated node still believes it leads; node 1 sees key 0's new leader 3 ms
        // after the cut; key 2 gets none while the fault lasts.
        h.leader(2, 0, 3, 2);
        h.leader(1, 0, 4, 3);
        let mut healed = Op::new("nemesis", 900, Kind::Ok, Function::Nemesis);
        healed.detail = Some("healed partition".into());
        h.push(healed);
        let end = h.t;
        h.leader(1, 2, 6, 1);
        let report = h.check();
        let by_key: Vec<(u32, Option<f64>)> = report
            .failovers
            .iter()
            .map(|f| (f.key, f.seconds))
            .collect();
        assert_eq!(by_key.len(), 2, "{:?}", report.failovers);
        assert_eq!(by_key[0].0, 0);
        let seconds = by_key[0].1.expect("key 0 failed over");
        assert!((seconds - 0.002).abs() < 1e-9, "{seconds}");
        assert_eq!(by_key[1], (2, None));
        assert!((report.failovers[1].held - (end - cut) as f64 / 1e9).abs() < 1e-9);
        assert!(!report.failed(), "availability is reported, not an anomaly");
    }
}
