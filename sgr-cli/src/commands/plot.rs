//! `sgr plot`: PNG plots of a run, or of a line chart given as data.

use crate::out::outln;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

/// Arguments of `sgr plot`.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// The run directory (with metrics.jsonl).
    #[arg(long, required_unless_present = "lines")]
    run: Option<PathBuf>,
    /// A line chart as JSON (`sgr_schema::LineChart`: title, axis labels, series of (x, y)
    /// points), as `cargo xtask reproduce` writes for its pictures.
    #[arg(long, value_name = "FILE", conflicts_with = "run")]
    lines: Option<PathBuf>,
    /// Where to write: a folder for --run (default: the run directory), the PNG file for
    /// --lines (default: FILE with the extension .png).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs `sgr plot`: prints the files written.
pub fn run(a: PlotArgs) -> Result<()> {
    if let Some(file) = &a.lines {
        let text = sgr_schema::file::read_regular_string(file, sgr_schema::file::limits::TEXT)
            .with_context(|| format!("reading the line chart {}", file.display()))?;
        let chart: sgr_schema::LineChart = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a line chart (JSON with title, x_label, y_label and series)",
                file.display()
            )
        })?;
        let out = a.out.clone().unwrap_or_else(|| file.with_extension("png"));
        crate::plot::lines(&chart, &out)?;
        outln!("{}", out.display());
        return Ok(());
    }
    let Some(run) = a.run.as_deref() else {
        bail!("sgr plot needs --run DIR or --lines FILE");
    };
    for f in crate::plot::plot_run(run, a.out.as_deref().unwrap_or(run))? {
        outln!("{}", f.display());
    }
    Ok(())
}
