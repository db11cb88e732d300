//! `sgr plot`: PNG plots of a run's training curves and of the per-boundary gradient
//! reconciliation (cos(a_{k-1}, b_k) per boundary over epochs, as a heat map).
//!
//! Charts are drawn with plotters into SVG and rasterised with resvg, with an embedded font
//! (DejaVu Sans), so the pictures look the same on every machine.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// What `sgr plot` reads from `metrics.jsonl`.
#[derive(Debug, Clone)]
pub struct Epoch {
    pub module_losses: Vec<f64>,
    pub train_accuracy: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub cos: Vec<f64>,
}

/// Reads a run's per-epoch metrics.
pub fn read_metrics(run: &Path) -> Result<Vec<Epoch>> {
    let path = run.join("metrics.jsonl");
    let text = sgr_schema::file::read_regular_string(&path, sgr_schema::file::limits::TEXT)
        .with_context(|| {
            format!(
                "reading {} (is {} a run directory?)",
                path.display(),
                run.display()
            )
        })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
        let num = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("{}: line {} has no number `{k}`", path.display(), i + 1))
        };
        let list = |k: &str| -> Vec<f64> {
            v["boundaries"]
                .as_array()
                .map(|a| a.iter().filter_map(|b| b[k].as_f64()).collect())
                .unwrap_or_default()
        };
        out.push(Epoch {
            module_losses: v["module_losses"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default(),
            train_accuracy: num("train_accuracy")?,
            test_loss: num("test_loss")?,
            test_accuracy: num("test_accuracy")?,
            cos: list("cos"),
        });
    }
    if out.is_empty() {
        bail!("{}: no completed epoch to plot", path.display());
    }
    Ok(out)
}

fn render_png(svg: &str, path: &Path) -> Result<()> {
    let mut opt = resvg::usvg::Options::default();
    {
        let db = opt.fontdb_mut();
        db.load_font_data(FONT.to_vec());
        db.set_sans_serif_family("DejaVu Sans");
    }
    let tree = resvg::usvg::Tree::from_str(svg, &opt).context("internal: invalid SVG")?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
        .context("internal: empty picture")?;
    pixmap.fill(resvg::tiny_skia::Color::WHITE);
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    let png = pixmap.encode_png().context("encoding PNG")?;
    sgr_core::checkpoint::write_atomic(path, &png)?;
    Ok(())
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {e:?}")
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Blue (−1) – white (0) – red (+1).
fn diverging(v: f64) -> RGBColor {
    let t = v.clamp(-1.0, 1.0);
    let mix = |a: u8, b: u8, f: f64| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    if t < 0.0 {
        let f = -t;
        RGBColor(mix(255, 33, f), mix(255, 102, f), mix(255, 172, f))
    } else {
        RGBColor(mix(255, 178, t), mix(255, 24, t), mix(255, 43, t))
    }
}

/// Training curves: module losses and the evaluation loss; train and evaluation accuracy.
/// `eval` names the evaluation split (`test`, or `validation` for `--validation` runs).
pub fn curves(epochs: &[Epoch], title: &str, eval: &'static str, path: &Path) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
        let (left, right) = root.split_horizontally(600);
        let n = epochs.len() as f64;
        let xs: Vec<f64> = (1..=epochs.len()).map(|e| e as f64).collect();
        let k = epochs[0].module_losses.len();
        let max_loss = epochs
            .iter()
            .flat_map(|e| e.module_losses.iter().copied().chain([e.test_loss]))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max)
            .max(1e-3);
        let mut c = ChartBuilder::on(&left)
            .margin(15)
            .caption("loss", ("sans-serif", 18))
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0.8..n + 0.2, 0.0..max_loss * 1.05)
            .map_err(err)?;
        c.configure_mesh()
            .x_desc("epoch")
            .y_desc("cross-entropy")
            .x_labels(epochs.len().min(10))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for m in 0..k {
            let color = PALETTE[m % PALETTE.len()];
            let label = if m + 1 == k {
                "train (network)".to_string()
            } else {
                format!("train, module {} head", m + 1)
            };
            c.draw_series(LineSeries::new(
                xs.iter().zip(epochs).map(|(&x, e)| (x, e.module_losses[m])),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
        c.draw_series(LineSeries::new(
            xs.iter().zip(epochs).map(|(&x, e)| (x, e.test_loss)),
            BLACK.stroke_width(2),
        ))
        .map_err(err)?
        .label(eval)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(2)));
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(err)?;

        let mut c = ChartBuilder::on(&right)
            .margin(15)
            .caption("accuracy", ("sans-serif", 18))
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0.8..n + 0.2, 0.0..1.0)
            .map_err(err)?;
        c.configure_mesh()
            .x_desc("epoch")
            .y_desc("top-1")
            .x_labels(epochs.len().min(10))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for (label, color, get) in [
            (
                "train",
                PALETTE[0],
                (|e: &Epoch| e.train_accuracy) as fn(&Epoch) -> f64,
            ),
            (eval, BLACK, |e: &Epoch| e.test_accuracy),
        ] {
            c.draw_series(LineSeries::new(
                xs.iter().zip(epochs).map(|(&x, e)| (x, get(e))),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    render_png(&svg, path)
}

/// Heat map of cos(a_{k-1}, b_k): boundaries (rows) over epochs (columns), with values.
pub fn reconciliation(epochs: &[Epoch], title: &str, path: &Path) -> Result<()> {
    let boundaries = epochs[0].cos.len();
    if boundaries == 0 {
        bail!("the run has a single module: there is no boundary to plot (train with --modules K > 1)");
    }
    let n = epochs.len();
    let width = (260 + 60 * n).clamp(700, 1800) as u32;
    let height = (200 + 45 * boundaries).clamp(320, 1400) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
        let (main, bar) = root.split_horizontally(width - 110);
        let mut c = ChartBuilder::on(&main)
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0.5..n as f64 + 0.5, 0.5..boundaries as f64 + 0.5)
            .map_err(err)?;
        c.configure_mesh()
            .disable_mesh()
            .x_desc("epoch")
            .y_desc("boundary k (between modules k and k+1)")
            .x_labels(n.min(20))
            .y_labels(boundaries.min(30))
            .x_label_formatter(&|v| format!("{:.0}", v))
            .y_label_formatter(&|v| format!("{:.0}", v))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for (e, ep) in epochs.iter().enumerate() {
            for (b, &v) in ep.cos.iter().enumerate() {
                let (x, y) = ((e + 1) as f64, (b + 1) as f64);
                c.draw_series(std::iter::once(Rectangle::new(
                    [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                    diverging(v).filled(),
                )))
                .map_err(err)?;
                if n * boundaries <= 400 {
                    let color = if v.abs() > 0.6 { WHITE } else { BLACK };
                    c.draw_series(std::iter::once(Text::new(
                        format!("{v:.2}"),
                        (x - 0.28, y + 0.12),
                        ("sans-serif", 12).into_font().color(&color),
                    )))
                    .map_err(err)?;
                }
            }
        }
        // Colour bar.
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(40)
            .margin_bottom(55)
            .margin_right(10)
            .y_label_area_size(45)
            .caption("cos(a, b)", ("sans-serif", 14))
            .build_cartesian_2d(0.0..1.0, -1.0..1.0)
            .map_err(err)?;
        cb.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(5)
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(err)?;
        let steps = 100;
        cb.draw_series((0..steps).map(|i| {
            let lo = -1.0 + 2.0 * i as f64 / steps as f64;
            let hi = lo + 2.0 / steps as f64;
            Rectangle::new([(0.0, lo), (1.0, hi)], diverging((lo + hi) / 2.0).filled())
        }))
        .map_err(err)?;
        root.present().map_err(err)?;
    }
    render_png(&svg, path)
}

/// The bottom of the y axis: 0 for non-negative data (errors, memory), else below the lowest.
fn y_floor(y0: f64, pad: f64) -> f64 {
    if y0 >= 0.0 {
        (y0 - pad).max(0.0)
    } else {
        y0 - pad
    }
}

/// A line chart from data ([`sgr_schema::LineChart`]): one coloured line with markers per
/// series, dashed for reference series, the legend outside the plot area's lines.
pub fn lines(chart: &sgr_schema::LineChart, path: &Path) -> Result<()> {
    let points = || chart.series.iter().flat_map(|s| s.points.iter());
    if points().next().is_none() {
        bail!("the chart `{}` has no points to draw", chart.title);
    }
    if let Some(p) = points().find(|p| !p.0.is_finite() || !p.1.is_finite()) {
        bail!("the chart `{}` has a non-finite point {p:?}", chart.title);
    }
    // Beyond this the axis arithmetic (spans, padding, tick steps) overflows or loses every
    // digit, and plotters then loops forever; no metric sgr charts comes near it.
    const LIMIT: f64 = 1e15;
    if let Some(p) = points().find(|p| p.0.abs() > LIMIT || p.1.abs() > LIMIT) {
        bail!(
            "the chart `{}` has a point {p:?} beyond ±{LIMIT:e}: too large to draw; rescale the \
             values (e.g. bytes to MiB)",
            chart.title
        );
    }
    let fx = |x: f64| if chart.x_log2 { x.log2() } else { x };
    if chart.x_log2 && points().any(|p| p.0 <= 0.0) {
        bail!("the chart `{}` has x_log2 with an x <= 0", chart.title);
    }
    let (x0, x1) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(fx(p.0)), b.max(fx(p.0)))
    });
    let (y0, y1) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.1), b.max(p.1))
    });
    let pad_x = ((x1 - x0) * 0.05).max(0.25);
    let pad_y = ((y1 - y0) * 0.08).max(0.5);
    let xs: Vec<f64> = {
        let mut v: Vec<f64> = points().map(|p| p.0).collect();
        v.sort_by(f64::total_cmp);
        v.dedup();
        v
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 620)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut c = ChartBuilder::on(&root)
            .margin(20)
            .caption(&chart.title, ("sans-serif", 20))
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(x0 - pad_x..x1 + pad_x, y_floor(y0, pad_y)..y1 + pad_y)
            .map_err(err)?;
        let x_label = |v: &f64| {
            let x = if chart.x_log2 { v.exp2() } else { *v };
            match xs.iter().find(|&&t| (fx(t) - v).abs() < 1e-9) {
                Some(t) => format!("{t}"),
                None if chart.x_log2 => String::new(),
                None => format!("{x:.3}"),
            }
        };
        let mut mesh = c.configure_mesh();
        mesh.x_desc(&chart.x_label)
            .y_desc(&chart.y_label)
            .label_style(("sans-serif", 14))
            .x_label_formatter(&x_label);
        if chart.x_log2 {
            // One tick per power of two between the ends; only those with data are labelled.
            mesh.x_labels(((x1 - x0).round() as usize + 1) * 4 + 1);
        }
        mesh.draw().map_err(err)?;
        for (i, s) in chart.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let mut pts: Vec<(f64, f64)> = s.points.iter().map(|p| (fx(p.0), p.1)).collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let style = color.stroke_width(2);
            if s.dashed {
                c.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style))
                    .map_err(err)?
                    .label(&s.label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(1))
                    });
            } else {
                c.draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(err)?
                    .label(&s.label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            }
            c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(err)?;
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    render_png(&svg, path)
}

/// Writes `curves.png` and (for local runs) `reconciliation.png` into `out`.
pub fn plot_run(run: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let epochs = read_metrics(run)?;
    let config = sgr_schema::file::read_regular_string(
        &run.join("config.json"),
        sgr_schema::file::limits::TEXT,
    )
    .ok()
    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let eval = match config.as_ref().map(|c| &c["validation"]) {
        Some(v) if v.as_u64().is_some_and(|n| n > 0) => "validation",
        _ => "test",
    };
    let title = config
        .map(|c| {
            format!(
                "{} on {}, {} K={}",
                c["model"].as_str().unwrap_or("?"),
                c["dataset"].as_str().unwrap_or("?"),
                c["trainer"]["method"].as_str().unwrap_or("?"),
                c["modules"]
            )
        })
        .unwrap_or_else(|| run.display().to_string());
    let mut written = Vec::new();
    let p = out.join("curves.png");
    curves(&epochs, &title, eval, &p)?;
    written.push(p);
    if !epochs[0].cos.is_empty() {
        let p = out.join("reconciliation.png");
        reconciliation(
            &epochs,
            &format!("{title}: gradient reconciliation cos(a_(k-1), b_k)"),
            &p,
        )?;
        written.push(p);
    }
    Ok(written)
}
