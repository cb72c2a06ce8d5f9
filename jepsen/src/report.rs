//! The outputs of a check: a summary table (printed), `results.json`, and plots as SVG and PNG:
//! acknowledged sends per second and send latency over time, and acknowledged values not yet
//! read over time, each with the fault windows shaded.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

use crate::checker::{ANOMALIES, Report};

/// The summary table.
pub fn summary(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<24} {:>8}", "anomaly", "count");
    for anomaly in ANOMALIES {
        let count = report.anomalies.get(anomaly).copied().unwrap_or(0);
        let _ = writeln!(out, "{anomaly:<24} {count:>8}");
    }
    for (anomaly, examples) in &report.examples {
        let _ = writeln!(out, "\n{anomaly}, first examples:");
        for e in examples {
            let _ = writeln!(out, "  {e}");
        }
    }
    let _ = writeln!(
        out,
        "\nnot checked by this workload: {}",
        report.not_checked.join(", ")
    );
    let _ = writeln!(out, "sends: {:?}", report.sends);
    let _ = writeln!(out, "polls: {:?}", report.polls);
    if !report.commits.is_empty() {
        let _ = writeln!(out, "group commits: {:?}", report.commits);
    }
    let _ = writeln!(out, "faults: {:?}", report.faults);
    if !report.failovers.is_empty() {
        let times: Vec<f64> = report.failovers.iter().filter_map(|f| f.seconds).collect();
        let slowest = times.iter().copied().fold(0.0_f64, f64::max);
        let _ = writeln!(
            out,
            "failovers (a partition's leader cut off): {} seen, {} within the fault (slowest {:.1} s), {} without a new leader while the fault lasted",
            report.failovers.len(),
            times.len(),
            slowest,
            report.failovers.len() - times.len()
        );
        for f in report.failovers.iter().filter(|f| f.seconds.is_none()) {
            let _ = writeln!(
                out,
                "  key {} led by node {}: no new leader in {:.1} s of {:?} (at {:.1} s)",
                f.key, f.leader, f.held, f.fault, f.start
            );
        }
    }
    let _ = writeln!(out, "replicas compared: {:?}", report.replicas_compared);
    let _ = writeln!(
        out,
        "result: {}",
        if report.failed() {
            "ANOMALIES FOUND"
        } else {
            "no anomalies"
        }
    );
    out
}

/// Writes `results.json`, `summary.txt` and the plots into `dir`.
pub fn write(dir: &Path, report: &Report, extra: serde_json::Value) -> Result<()> {
    let mut json = serde_json::to_value(report)?;
    if let (Some(object), serde_json::Value::Object(more)) = (json.as_object_mut(), extra) {
        object.extend(more);
    }
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(&json)?)
        .context("writing results.json")?;
    std::fs::write(dir.join("summary.txt"), summary(report)).context("writing summary.txt")?;
    let seconds: Vec<f64> = report.timeline.iter().map(|s| s.second as f64).collect();
    let acked: Vec<f64> = report.timeline.iter().map(|s| s.acked as f64).collect();
    let p50: Vec<f64> = report.timeline.iter().map(|s| s.latency_p50_ms).collect();
    let max: Vec<f64> = report.timeline.iter().map(|s| s.latency_max_ms).collect();
    let unread: Vec<f64> = report.timeline.iter().map(|s| s.unread as f64).collect();
    let charts = [
        (
            "throughput",
            "acknowledged sends per second",
            vec![("acked/s", &acked)],
        ),
        (
            "latency",
            "send latency (ms), retries included",
            vec![("median", &p50), ("max", &max)],
        ),
        (
            "unread",
            "acknowledged values not yet read",
            vec![("unread", &unread)],
        ),
    ];
    for (name, title, lines) in charts {
        let svg = chart(title, &seconds, &lines, &report.fault_windows)?;
        weft_bench::chart::write_both(dir, name, &svg)?;
    }
    Ok(())
}

fn chart(
    title: &str,
    x: &[f64],
    lines: &[(&str, &Vec<f64>)],
    faults: &[(f64, f64, String)],
) -> Result<String> {
    const COLORS: [RGBColor; 2] = [RGBColor(31, 119, 180), RGBColor(214, 39, 40)];
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let x_max = x.last().copied().unwrap_or(1.0).max(1.0) + 1.0;
        let y_max = lines
            .iter()
            .flat_map(|(_, ys)| ys.iter().copied())
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds (faults shaded)")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(faults.iter().map(|(start, end, _)| {
                Rectangle::new(
                    [(*start, 0.0), (*end, y_max)],
                    RGBColor(255, 165, 0).mix(0.2).filled(),
                )
            }))
            .map_err(|e| anyhow!("{e}"))?;
        for (i, (label, ys)) in lines.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    x.iter().copied().zip(ys.iter().copied()),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow!("{e}"))?
                .label(*label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    Ok(svg)
}
