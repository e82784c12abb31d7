//! The `--svg` chart of a `subscribe` run, drawn with plotters' SVG backend.
//!
//! Top panel: publish-to-receive latency per window (p50, p90, p99, p99.9,
//! max; log scale, ms). Bottom panel: the server's RSS (MiB) over the run,
//! when `--server-pid` was given. SVG needs no font files: text is left to
//! the viewer.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::subscribe::Window;
use super::watch::ProcSample;

/// One line of the latency panel: name, value of a window, colour.
type Series = (&'static str, fn(&Window) -> f64, RGBColor);

const WIDTH_PX: u32 = 1000;
const HEIGHT_PX: u32 = 700;

/// Writes the chart to `path`.
pub fn write_chart(path: &Path, windows: &[Window], samples: &[ProcSample]) -> anyhow::Result<()> {
    let svg = render_chart(windows, samples)?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// Renders the chart as SVG text.
pub fn render_chart(windows: &[Window], samples: &[ProcSample]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (top, bottom) = root.split_vertically(HEIGHT_PX * 3 / 5);
        draw_latency(&top, windows)?;
        draw_rss(&bottom, samples)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

fn plot_error<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {error:?}")
}

fn draw_latency<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    windows: &[Window],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let t_max = windows.iter().map(|w| w.t_s).fold(1.0f64, f64::max) + 1.0;
    let y_max = windows
        .iter()
        .map(|w| w.latency.max_ms)
        .fold(1.0f64, f64::max)
        * 1.5;
    let y_min = windows
        .iter()
        .map(|w| w.latency.p50_ms)
        .filter(|&v| v > 0.0)
        .fold(y_max, f64::min)
        .min(1.0)
        / 1.5;
    let mut chart = ChartBuilder::on(area)
        .caption("publish-to-receive latency per window", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, (y_min.max(0.001)..y_max).log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(240, 240, 240))
        .x_desc("seconds since start")
        .y_desc("latency (ms)")
        .draw()
        .map_err(plot_error)?;
    let series: [Series; 5] = [
        ("p50", |w| w.latency.p50_ms, RGBColor(31, 119, 180)),
        ("p90", |w| w.latency.p90_ms, RGBColor(44, 160, 44)),
        ("p99", |w| w.latency.p99_ms, RGBColor(255, 127, 14)),
        ("p99.9", |w| w.latency.p999_ms, RGBColor(214, 39, 40)),
        ("max", |w| w.latency.max_ms, RGBColor(110, 110, 110)),
    ];
    for (name, value, color) in series {
        let points: Vec<(f64, f64)> = windows
            .iter()
            .filter(|w| w.latency.count > 0)
            .map(|w| (w.t_s, value(w).max(0.001)))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_error)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

fn draw_rss<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    samples: &[ProcSample],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let t_max = samples.iter().map(|s| s.t_s).fold(1.0f64, f64::max);
    let y_max = samples
        .iter()
        .map(|s| mib(s.rss_bytes))
        .fold(1.0f64, f64::max)
        * 1.1;
    let caption = if samples.is_empty() {
        "server RSS (no --server-pid given)"
    } else {
        "server RSS"
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(240, 240, 240))
        .x_desc("seconds since start")
        .y_desc("RSS (MiB)")
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (s.t_s, mib(s.rss_bytes))),
            RGBColor(148, 103, 189).stroke_width(2),
        ))
        .map_err(plot_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::report::Percentiles;

    #[test]
    fn renders_with_and_without_data() {
        let windows: Vec<Window> = (0..5)
            .map(|i| Window {
                t_s: i as f64,
                latency: Percentiles {
                    count: 10,
                    p50_ms: 1.0 + i as f64,
                    p90_ms: 2.0,
                    p99_ms: 3.0,
                    p999_ms: 4.0,
                    max_ms: 5.0,
                    ..Percentiles::default()
                },
            })
            .collect();
        let samples: Vec<ProcSample> = (0..5)
            .map(|i| ProcSample {
                t_s: i as f64,
                rss_bytes: (10 + i) << 20,
                ..ProcSample::default()
            })
            .collect();
        let svg = render_chart(&windows, &samples).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("p99.9") && svg.contains("server RSS"));
        let empty = render_chart(&[], &[]).unwrap();
        assert!(empty.contains("no --server-pid"));
    }
}
