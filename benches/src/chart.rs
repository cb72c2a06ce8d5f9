//! Charts: throughput over time and the latency percentile curve, drawn as SVG by plotters and
//! rasterized to PNG by resvg (text uses the machine's fonts; without any, the PNG has no text
//! but the SVG still does).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

use crate::result::{Latency, RunResult};

const SIZE: (u32, u32) = (900, 500);
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend.
    pub label: String,
    /// Points.
    pub points: Vec<(f64, f64)>,
}

/// Per-second throughput lines of one run: acknowledged, and consumed when there are consumers.
pub fn throughput_series(result: &RunResult, prefix: &str) -> Vec<Series> {
    let mut out = vec![Series {
        label: format!("{prefix}acked msg/s"),
        points: result
            .timeline
            .iter()
            .map(|s| (s.second as f64, s.acked as f64))
            .collect(),
    }];
    if result.workload.has_consumers() {
        out.push(Series {
            label: format!("{prefix}consumed msg/s"),
            points: result
                .timeline
                .iter()
                .map(|s| (s.second as f64, s.consumed as f64))
                .collect(),
        });
    }
    out
}

/// Latency curve on a "nines" axis: x = -log10(1 - percentile), so 90% is 1, 99% is 2.
pub fn latency_series(label: &str, latency: &Latency) -> Series {
    let top = latency
        .curve
        .iter()
        .filter(|p| p[0] < 100.0)
        .map(|p| nines(p[0]))
        .fold(1.0, f64::max);
    Series {
        label: label.to_string(),
        points: latency
            .curve
            .iter()
            .map(|p| {
                let x = if p[0] >= 100.0 {
                    top + 0.25
                } else {
                    nines(p[0])
                };
                (x, p[1])
            })
            .collect(),
    }
}

fn nines(percentile: f64) -> f64 {
    -(1.0 - percentile / 100.0).max(1e-9).log10()
}

fn nines_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    if p >= 99.0 {
        let text = format!("{p:.4}");
        format!("{}%", text.trim_end_matches('0').trim_end_matches('.'))
    } else {
        format!("{p:.0}%")
    }
}

/// Draws lines as an SVG document.
pub fn line_chart(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    nines_axis: bool,
) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let points = series.iter().flat_map(|s| s.points.iter());
        let x_max = points.clone().map(|p| p.0).fold(1.0, f64::max);
        let x_min = points.clone().map(|p| p.0).fold(x_max, f64::min).min(0.0);
        let y_max = points.map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(80)
            .build_cartesian_2d(x_min..x_max, 0.0..y_max)
            .map_err(|e| anyhow!("{e}"))?;
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(x_desc).y_desc(y_desc);
        if nines_axis {
            // One label per nine: 0%, 90%, 99%, 99.9% ...
            mesh.x_labels(x_max.floor() as usize + 1)
                .x_label_formatter(&nines_label);
        }
        mesh.draw().map_err(|e| anyhow!("{e}"))?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow!("{e}"))?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    Ok(svg)
}

fn font_database() -> Arc<resvg::usvg::fontdb::Database> {
    static DB: OnceLock<Arc<resvg::usvg::fontdb::Database>> = OnceLock::new();
    DB.get_or_init(|| {
        let mut db = resvg::usvg::fontdb::Database::new();
        db.load_system_fonts();
        // plotters asks for "sans-serif"; map it to a family this machine has.
        let families: Vec<String> = db
            .faces()
            .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
            .collect();
        let pick = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "Arial"]
            .iter()
            .find(|want| families.iter().any(|f| f == *want))
            .map(|s| s.to_string())
            .or_else(|| families.first().cloned());
        if let Some(family) = pick {
            db.set_sans_serif_family(family);
        }
        Arc::new(db)
    })
    .clone()
}

/// Rasterizes an SVG document to a PNG file.
pub fn svg_to_png(svg: &str, path: &Path) -> Result<()> {
    let options = resvg::usvg::Options {
        fontdb: font_database(),
        ..Default::default()
    };
    let tree = resvg::usvg::Tree::from_str(svg, &options).context("parsing the chart SVG")?;
    let size = tree.size().to_int_size();
    let mut pixmap =
        resvg::tiny_skia::Pixmap::new(size.width(), size.height()).context("allocating the PNG")?;
    pixmap.fill(resvg::tiny_skia::Color::WHITE);
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    pixmap
        .save_png(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes `<name>.svg` and `<name>.png` in `dir`.
pub fn write_both(dir: &Path, name: &str, svg: &str) -> Result<()> {
    let path = dir.join(format!("{name}.svg"));
    std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    svg_to_png(svg, &dir.join(format!("{name}.png")))
}

/// The charts of one run: `throughput.{svg,png}` and `latency.{svg,png}`.
pub fn write_run_charts(dir: &Path, result: &RunResult) -> Result<()> {
    let title = format!("{} on {}", result.workload.name, result.label());
    let throughput = line_chart(
        &format!("{title}: throughput"),
        "seconds (warm-up included)",
        "messages per second",
        &throughput_series(result, ""),
        false,
    )?;
    write_both(dir, "throughput", &throughput)?;
    let mut curves = Vec::new();
    if let Some(l) = &result.publish_latency_ms {
        curves.push(latency_series("publish -> ack", l));
    }
    if let Some(l) = &result.end_to_end_latency_ms {
        curves.push(latency_series("publish -> consumed", l));
    }
    if !curves.is_empty() {
        let latency = line_chart(
            &format!("{title}: latency from intended send time"),
            "percentile",
            "milliseconds",
            &curves,
            true,
        )?;
        write_both(dir, "latency", &latency)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_axis_labels() {
        assert_eq!(nines_label(&0.0), "0%");
        assert_eq!(nines_label(&1.0), "90%");
        assert_eq!(nines_label(&2.0), "99%");
        assert_eq!(nines_label(&3.0), "99.9%");
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn chart_renders_to_svg_and_png() {
        let dir = tempfile::tempdir().expect("tempdir");
        let svg = line_chart(
            "t",
            "x",
            "y",
            &[Series {
                label: "s".into(),
                points: vec![(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)],
            }],
            false,
        )
        .expect("svg");
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        write_both(dir.path(), "c", &svg).expect("write");
        let png = std::fs::read(dir.path().join("c.png")).expect("png");
        assert_eq!(&png[1..4], b"PNG");
    }
}
