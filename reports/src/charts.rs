//! Charts as inline SVG, drawn with plotters' SVG backend.
//!
//! Text is written as SVG `<text>` elements that the browser sets in its own sans-serif font,
//! so no font file is read or embedded. Legends are HTML beside the chart.

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::ReportError;

/// Size of a chart in SVG units; it scales to its column through `viewBox`.
const TIME_CHART_SIZE: (u32, u32) = (900, 260);
const HISTOGRAM_SIZE: (u32, u32) = (900, 220);

/// A colour of the report's palette, as RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Colour(pub u8, pub u8, pub u8);

impl Colour {
    pub fn css(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }

    fn rgb(self) -> RGBColor {
        RGBColor(self.0, self.1, self.2)
    }
}

/// Series colours, in order of use.
pub const PALETTE: [Colour; 6] = [
    Colour(0x1f, 0x77, 0xb4),
    Colour(0xd6, 0x27, 0x28),
    Colour(0x2c, 0xa0, 0x2c),
    Colour(0x94, 0x67, 0xbd),
    Colour(0x17, 0xbe, 0xcf),
    Colour(0x8c, 0x56, 0x4b),
];
/// Fault windows are shaded in this colour.
pub const FAULT_SHADE: Colour = Colour(0xf5, 0xa6, 0x23);
/// Agent actions are marked with a vertical line in the colour of their outcome.
pub const ACTION_APPLIED: Colour = Colour(0x17, 0x8a, 0x5a);
pub const ACTION_REJECTED: Colour = Colour(0x88, 0x88, 0x88);
pub const ACTION_FAILED: Colour = Colour(0x9b, 0x11, 0x1e);

/// One line of a time chart: points are (simulated second, value).
#[derive(Debug, Clone)]
pub struct Line {
    pub label: String,
    pub colour: Colour,
    pub points: Vec<(f64, f64)>,
}

/// What every time chart of a run draws besides its lines.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// Fault windows, in simulated seconds (start, end).
    pub faults: Vec<(f64, f64)>,
    /// Agent actions: when, and in which colour.
    pub actions: Vec<(f64, Colour)>,
}

/// A time chart: lines over simulated seconds on a shared axis.
#[derive(Debug, Clone)]
pub struct TimeChart<'a> {
    pub y_label: &'a str,
    pub x_max: f64,
    pub y_max: f64,
    pub lines: &'a [Line],
    pub timeline: &'a Timeline,
}

fn chart_error(error: impl std::fmt::Display) -> ReportError {
    ReportError::Chart(error.to_string())
}

/// A fault window shorter than this is drawn this wide, so an instant still shows.
const FAULT_MIN_WIDTH_S: f64 = 0.25;

pub fn time_chart(chart: &TimeChart<'_>) -> Result<String, ReportError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, TIME_CHART_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let y_max = if chart.y_max > 0.0 { chart.y_max * 1.05 } else { 1.0 };
        let mut context = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..chart.x_max, 0.0..y_max)
            .map_err(chart_error)?;
        context
            .configure_mesh()
            .x_desc("simulated seconds")
            .y_desc(chart.y_label)
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 13))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .y_label_formatter(&|value| short_number(*value))
            .draw()
            .map_err(chart_error)?;
        let shade = FAULT_SHADE.rgb().mix(0.3).filled();
        context
            .draw_series(chart.timeline.faults.iter().map(|&(start, end)| {
                Rectangle::new([(start, 0.0), (end.max(start + FAULT_MIN_WIDTH_S), y_max)], shade)
            }))
            .map_err(chart_error)?;
        for line in chart.lines {
            context
                .draw_series(LineSeries::new(line.points.iter().copied(), line.colour.rgb().stroke_width(2)))
                .map_err(chart_error)?;
        }
        context
            .draw_series(
                chart
                    .timeline
                    .actions
                    .iter()
                    .map(|&(at, colour)| PathElement::new(vec![(at, 0.0), (at, y_max)], colour.rgb().stroke_width(2))),
            )
            .map_err(chart_error)?;
        root.present().map_err(chart_error)?;
    }
    Ok(svg)
}

/// A bar chart of counts per labelled bucket (latency histograms).
pub fn bar_chart(labels: &[String], counts: &[u64], colour: Colour, y_label: &str) -> Result<String, ReportError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, HISTOGRAM_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let y_max = counts.iter().copied().max().unwrap_or(0).max(1);
        // Integer ranges are inclusive in plotters: 0..last gives one segment per bucket.
        let last = labels.len().saturating_sub(1) as u32;
        let mut context = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d((0..last).into_segmented(), 0..y_max + y_max / 20 + 1)
            .map_err(chart_error)?;
        let label_of = |value: &SegmentValue<u32>| match value {
            SegmentValue::CenterOf(index) => labels.get(*index as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        context
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("latency, upper bound of the bucket")
            .y_desc(y_label)
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .x_labels(labels.len().min(16))
            .x_label_formatter(&label_of)
            .draw()
            .map_err(chart_error)?;
        context
            .draw_series(
                Histogram::vertical(&context)
                    .style(colour.rgb().filled())
                    .margin(2)
                    .data(counts.iter().enumerate().map(|(index, &count)| (index as u32, count))),
            )
            .map_err(chart_error)?;
        root.present().map_err(chart_error)?;
    }
    Ok(svg)
}

/// A compact axis label: 12k, 1.5M, 0.25.
pub fn short_number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1e6 {
        format!("{:.1}M", value / 1e6)
    } else if magnitude >= 1e4 {
        format!("{:.0}k", value / 1e3)
    } else if magnitude >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_numbers_stay_short() {
        assert_eq!(short_number(0.0), "0");
        assert_eq!(short_number(0.25), "0.25");
        assert_eq!(short_number(950.0), "950");
        assert_eq!(short_number(12_345.0), "12k");
        assert_eq!(short_number(1_500_000.0), "1.5M");
    }

    #[test]
    fn a_time_chart_draws_its_lines_fault_windows_and_actions() {
        let lines = [Line { label: "holds".into(), colour: PALETTE[0], points: vec![(0.0, 1.0), (1.0, 5.0)] }];
        let timeline = Timeline { faults: vec![(0.2, 0.2)], actions: vec![(0.5, ACTION_APPLIED)] };
        let svg =
            time_chart(&TimeChart { y_label: "per s", x_max: 2.0, y_max: 5.0, lines: &lines, timeline: &timeline })
                .expect("chart renders");
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("simulated seconds"));
        // The line, the fault window and the action line, each in its colour (plotters writes
        // colours in upper case).
        assert!(svg.contains("stroke=\"#1F77B4\" stroke-width=\"2\""), "{svg}");
        assert!(svg.contains("opacity=\"0.3\" fill=\"#F5A623\""), "{svg}");
        assert!(svg.contains("stroke=\"#178A5A\" stroke-width=\"2\""), "{svg}");
    }
}
