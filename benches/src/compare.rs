//! `weft-bench compare`: several drivers on one workload in alternating rounds (A B C A B C ...),
//! so slow drift of a noisy machine (disk caches, page-cache writeback, another tenant) touches
//! every driver alike; each driver's medians and its ratios to Weft are reported.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::chart;
use crate::drivers::{DriverSpec, Kind};
use crate::result::RunResult;
use crate::runner::{self, RunOptions};
use crate::workload::Workload;

/// Medians of one driver over the rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriverSummary {
    /// `driver:durability`.
    pub label: String,
    /// What the durability means.
    pub durability_detail: String,
    /// Rounds that completed.
    pub runs: usize,
    /// Result files of the runs.
    pub result_files: Vec<PathBuf>,
    /// Median acknowledged msgs/s.
    pub msgs_per_sec: f64,
    /// Median MB/s.
    pub mb_per_sec: f64,
    /// Median publish p50 / p99 / p99.9, ms.
    pub publish_p50_ms: Option<f64>,
    /// See above.
    pub publish_p99_ms: Option<f64>,
    /// See above.
    pub publish_p99_9_ms: Option<f64>,
    /// Median end-to-end p50 / p99 / p99.9, ms.
    pub e2e_p50_ms: Option<f64>,
    /// See above.
    pub e2e_p99_ms: Option<f64>,
    /// See above.
    pub e2e_p99_9_ms: Option<f64>,
    /// This driver's median msgs/s over Weft's.
    pub throughput_vs_weft: Option<f64>,
    /// This driver's median p99 over Weft's (end-to-end when the workload consumes, else
    /// publish).
    pub p99_vs_weft: Option<f64>,
    /// Whether every run's counts added up.
    pub counts_add_up: bool,
}

/// The comparison file (`compare.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The workload.
    pub workload: Workload,
    /// Rounds asked for.
    pub rounds: usize,
    /// Per driver.
    pub drivers: Vec<DriverSummary>,
    /// Runs that failed: `round label: error`.
    pub failures: Vec<String>,
}

/// The median of some values (the mean of the middle two for an even count).
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

fn median_of(results: &[&RunResult], pick: impl Fn(&RunResult) -> Option<f64>) -> Option<f64> {
    let mut values: Vec<f64> = results.iter().copied().filter_map(pick).collect();
    median(&mut values)
}

/// Runs the comparison; every run's result and charts go under `out`.
pub async fn compare(
    workload: &Workload,
    specs: &[DriverSpec],
    rounds: usize,
    options: &RunOptions,
    out: &Path,
) -> Result<Comparison> {
    std::fs::create_dir_all(out)?;
    let mut results: Vec<Vec<(RunResult, PathBuf)>> = specs.iter().map(|_| Vec::new()).collect();
    let mut failures = Vec::new();
    for round in 1..=rounds.max(1) {
        for (i, spec) in specs.iter().enumerate() {
            eprintln!(
                "round {round}/{rounds}: {} on {}",
                workload.name,
                spec.label()
            );
            match runner::run(workload, spec, options).await {
                Ok(result) => {
                    let dir = out.join(format!("r{round}-{}", spec.label().replace(':', "-")));
                    std::fs::create_dir_all(&dir)?;
                    let file = dir.join("result.json");
                    result.write(&file)?;
                    if let Err(e) = chart::write_run_charts(&dir, &result) {
                        eprintln!("  charts: {e:#}");
                    }
                    eprintln!(
                        "  {:.0} msg/s, {:.1} MB/s{}",
                        result.msgs_per_sec,
                        result.mb_per_sec,
                        if result.checks.all() {
                            String::new()
                        } else {
                            format!("; counts do not add up: {:?}", result.counts)
                        }
                    );
                    results[i].push((result, file));
                }
                Err(e) => {
                    eprintln!("  failed: {e:#}");
                    failures.push(format!("round {round} {}: {e:#}", spec.label()));
                }
            }
        }
    }

    let consumes = workload.has_consumers();
    let p99 = |r: &RunResult| {
        if consumes {
            r.end_to_end_latency_ms.as_ref().map(|l| l.p99)
        } else {
            r.publish_latency_ms.as_ref().map(|l| l.p99)
        }
    };
    let weft_index = specs.iter().position(|s| s.kind == Kind::Weft);
    let weft_runs: Vec<&RunResult> = weft_index
        .map(|i| results[i].iter().map(|(r, _)| r).collect())
        .unwrap_or_default();
    let weft_throughput = median_of(&weft_runs, |r| Some(r.msgs_per_sec));
    let weft_p99 = median_of(&weft_runs, p99);
    let mut drivers = Vec::new();
    for (spec, runs) in specs.iter().zip(&results) {
        let only: Vec<&RunResult> = runs.iter().map(|(r, _)| r).collect();
        let throughput = median_of(&only, |r| Some(r.msgs_per_sec)).unwrap_or(0.0);
        let driver_p99 = median_of(&only, p99);
        drivers.push(DriverSummary {
            label: spec.label(),
            durability_detail: spec.durability_detail(),
            runs: only.len(),
            result_files: runs.iter().map(|(_, f)| f.clone()).collect(),
            msgs_per_sec: throughput,
            mb_per_sec: median_of(&only, |r| Some(r.mb_per_sec)).unwrap_or(0.0),
            publish_p50_ms: median_of(&only, |r| r.publish_latency_ms.as_ref().map(|l| l.p50)),
            publish_p99_ms: median_of(&only, |r| r.publish_latency_ms.as_ref().map(|l| l.p99)),
            publish_p99_9_ms: median_of(&only, |r| r.publish_latency_ms.as_ref().map(|l| l.p99_9)),
            e2e_p50_ms: median_of(&only, |r| r.end_to_end_latency_ms.as_ref().map(|l| l.p50)),
            e2e_p99_ms: median_of(&only, |r| r.end_to_end_latency_ms.as_ref().map(|l| l.p99)),
            e2e_p99_9_ms: median_of(&only, |r| r.end_to_end_latency_ms.as_ref().map(|l| l.p99_9)),
            throughput_vs_weft: weft_throughput
                .filter(|w| *w > 0.0 && !only.is_empty())
                .map(|w| throughput / w),
            p99_vs_weft: match (driver_p99, weft_p99) {
                (Some(d), Some(w)) if w > 0.0 => Some(d / w),
                _ => None,
            },
            counts_add_up: only.iter().all(|r| r.checks.all()),
        });
    }
    let comparison = Comparison {
        workload: workload.clone(),
        rounds,
        drivers,
        failures,
    };
    std::fs::write(
        out.join("compare.json"),
        serde_json::to_string_pretty(&comparison)?,
    )?;
    if let Err(e) = write_compare_charts(out, workload, specs, &results) {
        eprintln!("compare charts: {e:#}");
    }
    Ok(comparison)
}

/// For each driver, the run with the median throughput.
fn median_runs<'a>(
    specs: &[DriverSpec],
    results: &'a [Vec<(RunResult, PathBuf)>],
) -> Vec<(String, &'a RunResult)> {
    let mut out = Vec::new();
    for (spec, runs) in specs.iter().zip(results) {
        let mut sorted: Vec<&RunResult> = runs.iter().map(|(r, _)| r).collect();
        sorted.sort_by(|a, b| a.msgs_per_sec.total_cmp(&b.msgs_per_sec));
        if let Some(r) = sorted.get(sorted.len() / 2) {
            out.push((spec.label(), *r));
        }
    }
    out
}

fn write_compare_charts(
    out: &Path,
    workload: &Workload,
    specs: &[DriverSpec],
    results: &[Vec<(RunResult, PathBuf)>],
) -> Result<()> {
    let chosen = median_runs(specs, results);
    let throughput: Vec<chart::Series> = chosen
        .iter()
        .map(|(label, r)| chart::Series {
            label: label.clone(),
            points: r
                .timeline
                .iter()
                .map(|s| (s.second as f64, s.acked as f64))
                .collect(),
        })
        .collect();
    let svg = chart::line_chart(
        &format!("{}: acknowledged msg/s (median run of each)", workload.name),
        "seconds (warm-up included)",
        "messages per second",
        &throughput,
        false,
    )?;
    chart::write_both(out, "compare-throughput", &svg)?;
    let latency: Vec<chart::Series> = chosen
        .iter()
        .filter_map(|(label, r)| {
            let l = if workload.has_consumers() {
                r.end_to_end_latency_ms.as_ref()
            } else {
                r.publish_latency_ms.as_ref()
            };
            l.map(|l| chart::latency_series(label, l))
        })
        .collect();
    if !latency.is_empty() {
        let svg = chart::line_chart(
            &format!(
                "{}: {} latency from intended send time",
                workload.name,
                if workload.has_consumers() {
                    "end-to-end"
                } else {
                    "publish"
                }
            ),
            "percentile",
            "milliseconds",
            &latency,
            true,
        )?;
        chart::write_both(out, "compare-latency", &svg)?;
    }
    Ok(())
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// The summary table.
pub fn table(c: &Comparison) -> String {
    let mut out = format!(
        "{} — medians of {} alternating round(s)\n{:<16} {:>4} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}\n",
        c.workload.name,
        c.rounds,
        "driver",
        "runs",
        "msgs/s",
        "MB/s",
        "pub p50",
        "pub p99",
        "e2e p50",
        "e2e p99",
        "thr/weft",
        "p99/weft"
    );
    for d in &c.drivers {
        out.push_str(&format!(
            "{:<16} {:>4} {:>11.0} {:>8.1} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}{}\n",
            d.label,
            d.runs,
            d.msgs_per_sec,
            d.mb_per_sec,
            opt(d.publish_p50_ms, 2),
            opt(d.publish_p99_ms, 2),
            opt(d.e2e_p50_ms, 2),
            opt(d.e2e_p99_ms, 2),
            opt(d.throughput_vs_weft, 3),
            opt(d.p99_vs_weft, 3),
            if d.counts_add_up {
                ""
            } else {
                "  (counts did not add up)"
            }
        ));
    }
    out.push_str(
        "latencies in ms from the intended send time; thr/weft = this driver's msgs/s over Weft's;\n\
         p99/weft = its p99 (end-to-end if the workload consumes, else publish) over Weft's\n",
    );
    for d in &c.drivers {
        out.push_str(&format!("  {:<16} {}\n", d.label, d.durability_detail));
    }
    for f in &c.failures {
        out.push_str(&format!("FAILED {f}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0]), Some(3.0));
        assert_eq!(median(&mut [5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
