//! PNG plots (plotters, bitmap backend): line charts for training curves and perplexity by
//! position, and a heatmap for needle-in-a-haystack grids.
//!
//! Text is drawn with DejaVu Sans embedded in the binary (`assets/fonts`, its licence beside it),
//! so plots look the same on a compute node without fontconfig. Files are written to a temporary
//! name and renamed (`io::AtomicPath`): a reader never sees half a PNG, and a failed drawing
//! leaves no file.

use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow, bail};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::io::AtomicPath;

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

const W: u32 = 1000;
const H: u32 = 600;

/// One named curve of a line chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart: one or more curves over a shared x axis.
#[derive(Clone, Debug)]
pub struct LineChart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [Series],
    /// Logarithmic x axis (e.g. token position).
    pub log_x: bool,
    /// Logarithmic y axis (e.g. losses from a few nats down to hundredths); points with y <= 0
    /// are skipped.
    pub log_y: bool,
}

/// A heatmap: `values[row][col]` in `[min, max]`, rows drawn bottom to top in the order given
/// unless `rows_top_down`; NaN cells are left grey (not evaluated).
#[derive(Clone, Debug)]
pub struct Heatmap<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x_ticks: &'a [String],
    pub y_ticks: &'a [String],
    pub values: &'a [Vec<f64>],
    pub min: f64,
    pub max: f64,
    /// First row at the top (as the paper's NIAH plots: depth 0% at the top).
    pub rows_top_down: bool,
    /// Print each cell's value inside it, in the colour bar's units.
    pub annotate: bool,
}

fn register_font() {
    REGISTER.call_once(|| {
        // The embedded font is fixed at build time; a parse failure is a build defect.
        for style in [FontStyle::Normal, FontStyle::Bold] {
            plotters::style::register_font("sans-serif", style, FONT)
                .map_err(|_| ())
                .expect("embedded DejaVuSans.ttf parses");
        }
    });
}

fn draw_err<E: std::fmt::Debug>(path: &Path) -> impl FnOnce(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {} failed: {e:?}", path.display())
}

/// A colour per series, distinguishable and printable.
fn palette(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

/// The range of `v` widened a little (and made non-empty).
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let d = lo.abs().max(1.0) * 0.05;
        return (lo - d, hi + d);
    }
    let d = (hi - lo) * 0.05;
    (lo - d, hi + d)
}

/// An axis label as people write numbers: "10", "4096", "0.05", "1.5" (not "10.0", "0.050").
pub fn tick_label(v: f64) -> String {
    if !v.is_finite() {
        return String::new();
    }
    if v == 0.0 {
        return "0".into();
    }
    // Three significant digits, trailing zeros dropped.
    let decimals = (2 - v.abs().log10().floor() as i64).clamp(0, 12) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Writes `chart` to `path` (PNG). Non-finite points are skipped; a chart without any finite
/// point is an error naming the file.
pub fn line_chart(path: &Path, chart: &LineChart) -> Result<()> {
    line_chart_in(path, chart, None)
}

/// `line_chart` with the y axis fixed to `y_range` (e.g. 0 to 1 for accuracies, whatever the
/// points span) instead of fitted to the points.
pub fn line_chart_in(path: &Path, chart: &LineChart, y_range: Option<(f64, f64)>) -> Result<()> {
    register_font();
    let finite = |&(x, y): &(f64, f64)| {
        x.is_finite() && y.is_finite() && (!chart.log_x || x > 0.0) && (!chart.log_y || y > 0.0)
    };
    let pts: Vec<(f64, f64)> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied().filter(finite))
        .collect();
    if pts.is_empty() {
        bail!("{}: nothing to plot (no finite points)", path.display());
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (y0, y1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let (y0, y1) = if let Some(r) = y_range {
        r
    } else if chart.log_y {
        // A fifth of a decade of room each side (padded() could go below zero).
        (y0 / 1.6, (y1 * 1.6).max(y0 * 1.0001))
    } else {
        padded(y0, y1)
    };
    let tmp = AtomicPath::new(path)?;
    {
        let root = BitMapBackend::new(tmp.tmp(), (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(path))?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(chart.title, ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(80);
        let style = |c: &RGBColor| ShapeStyle::from(c).stroke_width(2);
        macro_rules! body {
            ($ctx:expr) => {{
                let mut ctx = $ctx;
                ctx.configure_mesh()
                    .x_desc(chart.x_label)
                    .y_desc(chart.y_label)
                    .x_label_formatter(&|v: &f64| tick_label(*v))
                    .y_label_formatter(&|v: &f64| tick_label(*v))
                    .label_style(("sans-serif", 16))
                    .axis_desc_style(("sans-serif", 18))
                    .light_line_style(RGBColor(235, 235, 235))
                    .draw()
                    .map_err(draw_err(path))?;
                for (i, s) in chart.series.iter().enumerate() {
                    let c = palette(i);
                    let p: Vec<(f64, f64)> = s.points.iter().copied().filter(finite).collect();
                    let series = ctx
                        .draw_series(LineSeries::new(p, style(&c)))
                        .map_err(draw_err(path))?;
                    if chart.series.len() > 1 {
                        series.label(s.name.clone()).legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
                        });
                    }
                }
                if chart.series.len() > 1 {
                    ctx.configure_series_labels()
                        .background_style(WHITE.mix(0.85))
                        .border_style(BLACK)
                        .label_font(("sans-serif", 16))
                        // Log-y curves (losses by position) fall from the upper left and
                        // leave the lower left empty, as do accuracies by length (the fixed
                        // 0-1 range); other charts keep the upper right.
                        .position(if chart.log_y || y_range.is_some() {
                            SeriesLabelPosition::LowerLeft
                        } else {
                            SeriesLabelPosition::UpperRight
                        })
                        .draw()
                        .map_err(draw_err(path))?;
                }
            }};
        }
        let lin_x = if x1 > x0 { (x0, x1) } else { padded(x0, x1) };
        let log_x = (x0..x1.max(x0 * 1.0001)).log_scale();
        match (chart.log_x, chart.log_y) {
            (true, true) => body!(
                builder
                    .build_cartesian_2d(log_x, (y0..y1).log_scale())
                    .map_err(draw_err(path))?
            ),
            (true, false) => body!(
                builder
                    .build_cartesian_2d(log_x, y0..y1)
                    .map_err(draw_err(path))?
            ),
            (false, true) => body!(
                builder
                    .build_cartesian_2d(lin_x.0..lin_x.1, (y0..y1).log_scale())
                    .map_err(draw_err(path))?
            ),
            (false, false) => body!(
                builder
                    .build_cartesian_2d(lin_x.0..lin_x.1, y0..y1)
                    .map_err(draw_err(path))?
            ),
        }
        root.present().map_err(draw_err(path))?;
    }
    tmp.commit()
}

/// Red (0) → yellow → green (1), the colour scale of the paper's NIAH figures.
pub fn score_colour(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let (r, g, b) = if t < 0.5 {
        let u = t / 0.5;
        (
            215.0 + u * (250.0 - 215.0),
            48.0 + u * (220.0 - 48.0),
            39.0 + u * (80.0 - 39.0),
        )
    } else {
        let u = (t - 0.5) / 0.5;
        (
            250.0 - u * (250.0 - 26.0),
            220.0 - u * (220.0 - 150.0),
            80.0 - u * (80.0 - 65.0),
        )
    };
    RGBColor(r as u8, g as u8, b as u8)
}

/// Writes `map` to `path` (PNG). Every row of `values` must have one value per x tick.
pub fn heatmap(path: &Path, map: &Heatmap) -> Result<()> {
    register_font();
    let nx = map.x_ticks.len();
    let ny = map.y_ticks.len();
    if nx == 0 || ny == 0 {
        bail!(
            "{}: a heatmap needs at least one row and one column",
            path.display()
        );
    }
    if map.values.len() != ny || map.values.iter().any(|r| r.len() != nx) {
        bail!(
            "{}: heatmap values are not {ny} rows × {nx} columns",
            path.display()
        );
    }
    if map.max <= map.min {
        bail!(
            "{}: heatmap range {}..{} is empty",
            path.display(),
            map.min,
            map.max
        );
    }
    let tmp = AtomicPath::new(path)?;
    {
        let root = BitMapBackend::new(tmp.tmp(), (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(path))?;
        let (main, bar) = root.split_horizontally(W - 110);
        let row_of = |j: usize| if map.rows_top_down { ny - 1 - j } else { j };
        let mut ctx = ChartBuilder::on(&main)
            .caption(map.title, ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..nx as f64, 0.0..ny as f64)
            .map_err(draw_err(path))?;
        let xt = map.x_ticks.to_vec();
        let yt = map.y_ticks.to_vec();
        let x_fmt = move |v: &f64| {
            let i = v.floor() as usize;
            if (v - v.floor() - 0.5).abs() < 1e-6 && i < xt.len() {
                xt[i].clone()
            } else {
                String::new()
            }
        };
        let y_fmt = move |v: &f64| {
            let i = v.floor() as usize;
            if (v - v.floor() - 0.5).abs() < 1e-6 && i < ny {
                yt[row_of(i)].clone()
            } else {
                String::new()
            }
        };
        ctx.configure_mesh()
            .disable_mesh()
            .x_desc(map.x_label)
            .y_desc(map.y_label)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 18))
            .x_labels(2 * nx + 1)
            .y_labels(2 * ny + 1)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .draw()
            .map_err(draw_err(path))?;
        let span = map.max - map.min;
        for (j, row) in map.values.iter().enumerate() {
            let y = row_of(j) as f64;
            for (i, &v) in row.iter().enumerate() {
                let x = i as f64;
                let colour = if v.is_finite() {
                    score_colour((v - map.min) / span)
                } else {
                    RGBColor(200, 200, 200)
                };
                ctx.draw_series(std::iter::once(Rectangle::new(
                    [(x, y), (x + 1.0, y + 1.0)],
                    colour.filled(),
                )))
                .map_err(draw_err(path))?;
                ctx.draw_series(std::iter::once(Rectangle::new(
                    [(x, y), (x + 1.0, y + 1.0)],
                    WHITE.stroke_width(1),
                )))
                .map_err(draw_err(path))?;
                if map.annotate && v.is_finite() {
                    // The value itself, as the colour bar labels it.
                    let text = tick_label(v);
                    ctx.draw_series(std::iter::once(Text::new(
                        text,
                        (x + 0.5, y + 0.5),
                        ("sans-serif", 13).into_font().color(&BLACK).pos(
                            plotters::style::text_anchor::Pos::new(
                                plotters::style::text_anchor::HPos::Center,
                                plotters::style::text_anchor::VPos::Center,
                            ),
                        ),
                    )))
                    .map_err(draw_err(path))?;
                }
            }
        }
        // Colour bar.
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(60)
            .margin_bottom(64)
            .margin_right(50)
            .y_label_area_size(0)
            .right_y_label_area_size(40)
            .build_cartesian_2d(0.0..1.0, map.min..map.max)
            .map_err(draw_err(path))?;
        cb.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_label_formatter(&|v: &f64| tick_label(*v))
            .label_style(("sans-serif", 14))
            .y_labels(6)
            .draw()
            .map_err(draw_err(path))?;
        let steps = 100;
        for s in 0..steps {
            let a = map.min + span * s as f64 / steps as f64;
            let b = map.min + span * (s + 1) as f64 / steps as f64;
            cb.draw_series(std::iter::once(Rectangle::new(
                [(0.0, a), (1.0, b)],
                score_colour((s as f64 + 0.5) / steps as f64).filled(),
            )))
            .map_err(draw_err(path))?;
        }
        root.present().map_err(draw_err(path))?;
    }
    tmp.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            &bytes[..8],
            b"\x89PNG\r\n\x1a\n",
            "{} is a PNG",
            path.display()
        );
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        (w, h)
    }

    #[test]
    fn line_chart_writes_a_png_and_draws_text() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("loss.png");
        let s = [
            Series {
                name: "loss".into(),
                points: (1..=50).map(|i| (i as f64, 1.0 / i as f64)).collect(),
            },
            Series {
                name: "ema".into(),
                points: vec![(1.0, f64::NAN), (2.0, 0.4), (50.0, 0.03)],
            },
        ];
        let c = LineChart {
            title: "Training loss",
            x_label: "step",
            y_label: "loss",
            series: &s,
            log_x: false,
            log_y: false,
        };
        line_chart(&p, &c).unwrap();
        assert_eq!(png_size(&p), (W, H));
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        // Text is rendered: a chart with a long title differs from one without.
        let q = d.path().join("notitle.png");
        line_chart(
            &q,
            &LineChart {
                title: "",
                ..c.clone()
            },
        )
        .unwrap();
        assert_ne!(std::fs::read(&p).unwrap(), std::fs::read(&q).unwrap());
        let log = d.path().join("log.png");
        line_chart(
            &log,
            &LineChart {
                log_x: true,
                ..c.clone()
            },
        )
        .unwrap();
        assert_eq!(png_size(&log), (W, H));
        // Log-log (the loss points of 0.4 and 0.03 and the positive ones only).
        line_chart(
            &log,
            &LineChart {
                log_x: true,
                log_y: true,
                ..c
            },
        )
        .unwrap();
        assert_eq!(png_size(&log), (W, H));
    }

    #[test]
    fn empty_chart_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.png");
        let s = [Series {
            name: "a".into(),
            points: vec![(1.0, f64::NAN)],
        }];
        let e = line_chart(
            &p,
            &LineChart {
                title: "t",
                x_label: "x",
                y_label: "y",
                series: &s,
                log_x: false,
                log_y: false,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("x.png"), "{e}");
        assert!(!p.exists());
    }

    #[test]
    fn heatmap_checks_shape_and_colours_cells() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("niah.png");
        let xt: Vec<String> = ["1K", "2K", "4K"].iter().map(|s| s.to_string()).collect();
        let yt: Vec<String> = ["0", "50", "100"].iter().map(|s| s.to_string()).collect();
        let v = vec![
            vec![1.0, 0.0, 1.0],
            vec![0.5, 1.0, f64::NAN],
            vec![1.0, 1.0, 0.0],
        ];
        let m = Heatmap {
            title: "NIAH",
            x_label: "context length",
            y_label: "depth (%)",
            x_ticks: &xt,
            y_ticks: &yt,
            values: &v,
            min: 0.0,
            max: 1.0,
            rows_top_down: true,
            annotate: true,
        };
        heatmap(&p, &m).unwrap();
        assert_eq!(png_size(&p), (W, H));
        let bad = vec![vec![1.0, 0.0]];
        let e = heatmap(&p, &Heatmap { values: &bad, ..m }).unwrap_err();
        assert!(e.to_string().contains("3 rows × 3 columns"), "{e}");
        assert_eq!(score_colour(0.0), RGBColor(215, 48, 39));
        // Cells and colour bar share units: a 0.5 cell is labelled 0.5, not "50".
        for (v, s) in [
            (0.5, "0.5"),
            (0.0, "0"),
            (1.0, "1"),
            (0.125, "0.125"),
            (10.0, "10"),
            (1000.0, "1000"),
            (0.05, "0.05"),
            (1.23456, "1.23"),
        ] {
            assert_eq!(tick_label(v), s, "{v}");
        }
        assert_eq!(score_colour(1.0), RGBColor(26, 150, 65));
    }
}
