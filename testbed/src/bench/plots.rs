//! The benchmark page's SVG plots (plotters), one chart per part.

use std::path::Path;

use dmabuf_p2p::range::human_size;
use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use super::{OVERHEAD_OPS, Results, SWEEP_SERIES};
use crate::{Error, Result};

/// One line of a chart: (x, median, min, max) points.
struct Curve {
    name: String,
    color: RGBColor,
    dashed: bool,
    points: Vec<(f64, f64, f64, f64)>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

fn curve(
    r: &Results,
    group: &str,
    series: &str,
    op: &str,
    name: &str,
    color: usize,
    dashed: bool,
) -> Curve {
    Curve {
        name: name.to_owned(),
        color: COLORS[color % COLORS.len()],
        dashed,
        points: r.points(group, series, op),
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Setup(format!("drawing a plot: {e}"))
}

/// An x tick on a log2 axis: `2^v` as a size, at even exponents only (the
/// sweep's sizes and the counts are powers of 4).
fn fmt_log2_size(v: f64) -> String {
    log2_tick(v).map_or_else(String::new, |e| human_size(1u64 << e).replace(' ', ""))
}

/// An x tick on a log2 axis: `2^v` as a count, at even exponents only.
fn fmt_log2_count(v: f64) -> String {
    log2_tick(v).map_or_else(String::new, |e| (1u64 << e).to_string())
}

fn log2_tick(v: f64) -> Option<u32> {
    let r = v.round();
    ((v - r).abs() < 1e-6 && (0.0..63.0).contains(&r) && (r as u32).is_multiple_of(2))
        .then_some(r as u32)
}

/// A y tick of a time axis whose values are nanoseconds.
fn fmt_time_axis(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{} s", trim(ns / 1e9))
    } else if ns >= 1e6 {
        format!("{} ms", trim(ns / 1e6))
    } else if ns >= 1e3 {
        format!("{} µs", trim(ns / 1e3))
    } else {
        format!("{} ns", trim(ns))
    }
}

/// A chart whose x axis is log2 of the x values (sizes or counts, labelled
/// by `x_fmt`), with a log (`y_log`) or linear y axis labelled by `y_fmt`.
#[allow(clippy::too_many_arguments)]
fn chart(
    area: &Area<'_>,
    title: &str,
    x_label: &str,
    x_fmt: fn(f64) -> String,
    y_label: &str,
    y_fmt: fn(f64) -> String,
    y_log: bool,
    curves: &[Curve],
    hline: Option<f64>,
) -> Result<()> {
    let curves: Vec<Curve> = curves
        .iter()
        .map(|c| Curve {
            name: c.name.clone(),
            color: c.color,
            dashed: c.dashed,
            points: c
                .points
                .iter()
                .filter(|p| p.0 > 0.0)
                .map(|p| (p.0.log2(), p.1, p.2, p.3))
                .collect(),
        })
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for p in curves.iter().flat_map(|c| c.points.iter()) {
        x0 = x0.min(p.0);
        x1 = x1.max(p.0);
        y0 = y0.min(p.2);
        y1 = y1.max(p.3);
    }
    if let Some(h) = hline {
        y0 = y0.min(h);
        y1 = y1.max(h);
    }
    if x0 > x1 {
        // Nothing measured: an empty frame with the title.
        area.titled(&format!("{title} (no data)"), ("sans-serif", 18))
            .map_err(plot_err)?;
        return Ok(());
    }
    let xr = (x0 - 0.5)..(x1 + 0.5);
    if y_log {
        chart_in(
            area,
            title,
            x_label,
            x_fmt,
            y_label,
            y_fmt,
            xr,
            (y0 / 1.5..y1 * 1.5).log_scale(),
            &curves,
            hline,
        )
    } else {
        let pad = ((y1 - y0) * 0.08).max(0.01);
        chart_in(
            area,
            title,
            x_label,
            x_fmt,
            y_label,
            y_fmt,
            xr,
            (y0 - pad)..(y1 + pad),
            &curves,
            hline,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn chart_in<X, Y>(
    area: &Area<'_>,
    title: &str,
    x_label: &str,
    x_fmt: fn(f64) -> String,
    y_label: &str,
    y_fmt: fn(f64) -> String,
    xr: X,
    yr: Y,
    curves: &[Curve],
    hline: Option<f64>,
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut ch = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(xr, yr)
        .map_err(plot_err)?;
    let x_formatter = |v: &f64| x_fmt(*v);
    let y_formatter = |v: &f64| y_fmt(*v);
    ch.configure_mesh()
        .x_labels(40)
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&x_formatter)
        .y_label_formatter(&y_formatter)
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .draw()
        .map_err(plot_err)?;
    if let Some(h) = hline {
        let (xa, xb) = (ch.x_range().start, ch.x_range().end);
        ch.draw_series(DashedLineSeries::new(
            vec![(xa, h), (xb, h)],
            6,
            4,
            BLACK.mix(0.5).stroke_width(1),
        ))
        .map_err(plot_err)?
        .label(format!("{h}"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    }
    for c in curves.iter().filter(|c| !c.points.is_empty()) {
        let color = c.color;
        let style = color.stroke_width(2);
        let line: Vec<(f64, f64)> = c.points.iter().map(|p| (p.0, p.1)).collect();
        let anno = if c.dashed {
            ch.draw_series(DashedLineSeries::new(line, 8, 5, style))
                .map_err(plot_err)?
        } else {
            ch.draw_series(LineSeries::new(line, style))
                .map_err(plot_err)?
        };
        let dashed = c.dashed;
        anno.label(c.name.as_str()).legend(move |(x, y)| {
            // A dashed series gets a dashed sample: two short strokes.
            let style = color.stroke_width(2);
            let (a, b) = if dashed {
                ((x, x + 8), (x + 12, x + 20))
            } else {
                ((x, x + 10), (x + 10, x + 20))
            };
            EmptyElement::at((0, 0))
                + PathElement::new(vec![(a.0, y), (a.1, y)], style)
                + PathElement::new(vec![(b.0, y), (b.1, y)], style)
        });
        ch.draw_series(
            c.points
                .iter()
                .map(|p| ErrorBar::new_vertical(p.0, p.2, p.1, p.3, color.stroke_width(1), 6)),
        )
        .map_err(plot_err)?;
        ch.draw_series(
            c.points
                .iter()
                .map(|p| Circle::new((p.0, p.1), 3, color.filled())),
        )
        .map_err(plot_err)?;
    }
    ch.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// An axis number: plain for moderate values, with a k/M suffix otherwise.
pub(super) fn axis_number(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

pub(super) fn plot_sweep(r: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((1, 2));
    for (area, op) in panels.iter().zip(["map", "unmap"]) {
        let curves: Vec<Curve> = SWEEP_SERIES
            .iter()
            .enumerate()
            .map(|(i, (series, _))| {
                let name = match *series {
                    "dmabuf" => "BAR dma-buf (iommufd MAP_FILE)",
                    "type1" => "legacy type1 (MAP_DMA of BAR mmap)",
                    _ => "memfd (iommufd MAP_FILE)",
                };
                curve(r, "sweep", series, op, name, i, false)
            })
            .collect();
        chart(
            area,
            &format!("{op} time against size (log-log)"),
            "size",
            fmt_log2_size,
            &format!("{op} time"),
            fmt_time_axis,
            true,
            &curves,
            None,
        )?;
    }
    root.present().map_err(plot_err)
}

pub(super) fn plot_overhead(r: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut curves: Vec<Curve> = OVERHEAD_OPS
        .iter()
        .enumerate()
        .map(|(i, op)| curve(r, "overhead", "ratio", op, op, i, *op == "total"))
        .collect();
    let mut control = curve(
        r,
        "overhead",
        "ratio_control",
        "total",
        "control: raw / raw (total)",
        0,
        true,
    );
    control.color = RGBColor(0x80, 0x80, 0x80);
    curves.push(control);
    chart(
        &root,
        "library / raw ioctl time per operation (median of batches)",
        "size",
        fmt_log2_size,
        "ratio",
        axis_number,
        false,
        &curves,
        Some(1.05),
    )?;
    root.present().map_err(plot_err)
}

pub(super) fn plot_revoke(r: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let curves = vec![
        curve(r, "revoke", "library", "revoke", "library revoke", 0, false),
        curve(
            r,
            "revoke",
            "library",
            "restore",
            "library restore",
            1,
            false,
        ),
        curve(r, "revoke", "raw", "revoke", "raw revoke", 0, true),
        curve(r, "revoke", "raw", "restore", "raw restore", 1, true),
        curve(
            r,
            "revoke",
            "raw",
            "restore_write",
            "config write alone (restore)",
            2,
            true,
        ),
    ];
    chart(
        &root,
        "revoke and restore against mappings attached (log-log)",
        "mappings",
        fmt_log2_count,
        "time",
        fmt_time_axis,
        true,
        &curves,
        None,
    )?;
    root.present().map_err(plot_err)
}

pub(super) fn plot_scale(r: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let curves = vec![
        curve(r, "scale", "library", "export", "library export", 0, false),
        curve(r, "scale", "library", "map", "library map", 1, false),
        curve(
            r,
            "scale",
            "library",
            "teardown",
            "library teardown",
            2,
            false,
        ),
        curve(r, "scale", "raw", "export", "raw export", 0, true),
        curve(r, "scale", "raw", "map", "raw map", 1, true),
        curve(r, "scale", "raw", "teardown", "raw teardown", 2, true),
    ];
    chart(
        &root,
        "time per buffer against buffers exported and mapped",
        "buffers (N)",
        fmt_log2_count,
        "time per buffer",
        fmt_time_axis,
        true,
        &curves,
        None,
    )?;
    root.present().map_err(plot_err)
}
