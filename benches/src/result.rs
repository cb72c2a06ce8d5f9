//! What one run produced: counts, rates, latency summaries and curves, a per-second timeline,
//! and the checks that the counts add up. Written as `result.json` beside the run's charts.

use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::drivers::Durability;
use crate::workload::Workload;

/// Version of the result file's layout.
pub const RESULT_FORMAT: u32 = 1;

/// Latency summary in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Largest.
    pub max: f64,
    /// The percentile curve: `[percentile, ms]` points from p0 to the largest sample.
    pub curve: Vec<[f64; 2]>,
}

impl Latency {
    /// Summarizes a histogram of microseconds (None when it is empty).
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        let mut curve = Vec::new();
        // Points evenly spaced in "nines": 0, 0.5, 1 (90%), 2 (99%) ... up to what the sample
        // count supports.
        let max_nines = (h.len() as f64).log10().max(1.0);
        let mut nines = 0.0f64;
        while nines <= max_nines + 1e-9 {
            let q = 1.0 - 10f64.powf(-nines);
            curve.push([q * 100.0, ms(h.value_at_quantile(q))]);
            nines += 0.1;
        }
        curve.push([100.0, ms(h.max())]);
        Some(Latency {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            curve,
        })
    }
}

/// Message counts over the whole run (warm-up included).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Messages handed to the client.
    pub sent: u64,
    /// Messages the system acknowledged.
    pub acked: u64,
    /// Messages that failed (an error, or no acknowledgement within the drain timeout).
    pub failed: u64,
    /// Messages received, over all groups.
    pub consumed: u64,
    /// Messages received by each consumer group (topic/group).
    pub consumed_per_group: Vec<GroupCount>,
}

/// One group's count.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCount {
    /// `topic/group`.
    pub group: String,
    /// Messages acknowledged on the group's topic.
    pub acked_on_topic: u64,
    /// Messages the group received.
    pub consumed: u64,
}

/// One second of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since the start (warm-up included).
    pub second: u64,
    /// Acknowledgements in that second.
    pub acked: u64,
    /// Messages consumed in that second (all groups).
    pub consumed: u64,
}

/// Whether the counts add up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checks {
    /// sent = acked + failed.
    pub sent_is_acked_plus_failed: bool,
    /// Every group received at least every acknowledged message of its topic (true when the
    /// workload has no consumers).
    pub consumed_covers_acked: bool,
    /// Nothing failed.
    pub no_failures: bool,
}

impl Checks {
    /// True when every check passed.
    pub fn all(&self) -> bool {
        self.sent_is_acked_plus_failed && self.consumed_covers_acked && self.no_failures
    }
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Layout version.
    pub format: u32,
    /// The harness version.
    pub harness: String,
    /// The workload as run (after command-line overrides).
    pub workload: Workload,
    /// Driver name (`weft`, `nats`, `redis`, `disk`).
    pub driver: String,
    /// `default` or `fsync`.
    pub durability: Durability,
    /// What that durability means for this system.
    pub durability_detail: String,
    /// Where the system ran (`started on loopback` or the endpoint given).
    pub endpoint: String,
    /// Start, ms since the Unix epoch.
    pub started_at_ms: u64,
    /// Seconds measured (after warm-up).
    pub measured_seconds: f64,
    /// Acknowledged messages per second over the measured window.
    pub msgs_per_sec: f64,
    /// Acknowledged payload megabytes (10^6 bytes) per second.
    pub mb_per_sec: f64,
    /// Consumed messages per second over the measured window (all groups).
    pub consumed_msgs_per_sec: f64,
    /// Publish to acknowledgement, from the intended send time (measured window only).
    pub publish_latency_ms: Option<Latency>,
    /// Publish to consumption, from the intended send time (measured window only).
    pub end_to_end_latency_ms: Option<Latency>,
    /// Counts.
    pub counts: Counts,
    /// Per-second acknowledgements and consumption.
    pub timeline: Vec<Second>,
    /// The first errors seen (at most 10).
    pub errors: Vec<String>,
    /// Whether the counts add up.
    pub checks: Checks,
}

impl RunResult {
    /// Fills in the checks from the counts.
    pub fn compute_checks(&mut self) {
        // The raw-disk baseline has no consumers whatever the workload says.
        let has_consumers = self.workload.has_consumers() && self.driver != "disk";
        let c = &self.counts;
        self.checks = Checks {
            sent_is_acked_plus_failed: c.sent == c.acked + c.failed,
            consumed_covers_acked: !has_consumers
                || (!c.consumed_per_group.is_empty()
                    && c.consumed_per_group
                        .iter()
                        .all(|g| g.consumed >= g.acked_on_topic)),
            no_failures: c.failed == 0,
        };
    }

    /// `driver:durability`.
    pub fn label(&self) -> String {
        format!("{}:{}", self.driver, self.durability)
    }

    /// Writes the JSON file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a JSON file.
    pub fn read(path: &Path) -> Result<RunResult> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

fn fmt_ms(l: Option<&Latency>, pick: fn(&Latency) -> f64) -> String {
    l.map(|l| format!("{:.2}", pick(l)))
        .unwrap_or_else(|| "-".into())
}

/// A plain-text table of results, one row each.
pub fn table(results: &[&RunResult]) -> String {
    let mut out = format!(
        "{:<16} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "driver",
        "msgs/s",
        "MB/s",
        "pub p50",
        "pub p99",
        "pub p99.9",
        "e2e p50",
        "e2e p99",
        "e2e p99.9",
        "e2e max"
    );
    for r in results {
        let p = r.publish_latency_ms.as_ref();
        let e = r.end_to_end_latency_ms.as_ref();
        out.push_str(&format!(
            "{:<16} {:>12.0} {:>9.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            r.label(),
            r.msgs_per_sec,
            r.mb_per_sec,
            fmt_ms(p, |l| l.p50),
            fmt_ms(p, |l| l.p99),
            fmt_ms(p, |l| l.p99_9),
            fmt_ms(e, |l| l.p50),
            fmt_ms(e, |l| l.p99),
            fmt_ms(e, |l| l.p99_9),
            fmt_ms(e, |l| l.max),
        ));
    }
    out.push_str("(latencies in ms, from each message's intended send time)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary_and_curve() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        for us in 1..=10_000u64 {
            h.record(us).expect("record");
        }
        let l = Latency::from_histogram(&h).expect("summary");
        assert_eq!(l.count, 10_000);
        assert!((l.p50 - 5.0).abs() < 0.05, "{}", l.p50);
        assert!((l.p99 - 9.9).abs() < 0.05, "{}", l.p99);
        assert!((l.max - 10.0).abs() < 0.05, "{}", l.max);
        assert!(
            l.curve
                .windows(2)
                .all(|w| w[0][0] <= w[1][0] && w[0][1] <= w[1][1])
        );
        assert_eq!(l.curve.last().map(|p| p[0]), Some(100.0));
        assert!(Latency::from_histogram(&Histogram::<u64>::new(3).expect("h")).is_none());
    }
}
