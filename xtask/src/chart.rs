//! The chart beside BENCHMARKS.md's tables: each scenario's ratio (cachefrom's seconds over the
//! hand-written build's), a bar each, with the line at 1 (parity) and at 0.5.

use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;

/// A font for the labels; plotters' ab_glyph backend reads it itself (no system font library).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One bar: its label and the ratio.
pub struct Bar {
    pub label: String,
    pub ratio: f64,
}

/// Draws `bars` to the PNG `path`.
pub fn draw(path: &Path, title: &str, bars: &[Bar]) -> Result<()> {
    let font =
        std::fs::read(FONT).with_context(|| format!("reading the chart's font {FONT} (Debian's fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("the font {FONT} could not be read"))?;
    let height = 90 + 34 * bars.len() as u32;
    let root = BitMapBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let widest = bars.iter().map(|bar| bar.ratio).fold(1.2_f64, f64::max) * 1.1;
    let count = bars.len() as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(320)
        .build_cartesian_2d(0.0..widest, (0..count).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("cachefrom's time / the hand-written build's (lower is better)")
        .y_labels(bars.len())
        .y_label_formatter(&|value| match value {
            SegmentValue::CenterOf(index) => {
                bars.get((count - 1 - *index) as usize).map(|bar| bar.label.clone()).unwrap_or_default()
            }
            _ => String::new(),
        })
        .label_style(("sans-serif", 14))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(at, bar)| {
        let row = count - 1 - at as i32;
        let color = if bar.ratio <= 1.0 { RGBColor(46, 125, 50) } else { RGBColor(198, 40, 40) };
        let mut rectangle = Rectangle::new(
            [(0.0, SegmentValue::Exact(row)), (bar.ratio, SegmentValue::Exact(row + 1))],
            color.filled(),
        );
        rectangle.set_margin(6, 6, 0, 0);
        rectangle
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(at, bar)| {
        let row = count - 1 - at as i32;
        Text::new(
            format!("{:.2}", bar.ratio),
            (bar.ratio + widest * 0.01, SegmentValue::CenterOf(row)),
            ("sans-serif", 14).into_font(),
        )
    }))?;
    for (x, color) in [(1.0, BLACK), (0.5, RGBColor(120, 120, 120))] {
        chart.draw_series(LineSeries::new(
            [(x, SegmentValue::Exact(0)), (x, SegmentValue::Exact(count))],
            color.stroke_width(2),
        ))?;
    }
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_is_a_png_with_a_bar_a_scenario() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        let bars = vec![
            Bar { label: "app: cold".into(), ratio: 1.03 },
            Bar { label: "app: no change".into(), ratio: 0.26 },
            Bar { label: "cache mount: source change".into(), ratio: 0.31 },
        ];
        draw(&path, "test", &bars).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // Taller with more bars.
        let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!(height, 90 + 34 * 3);
    }
}
