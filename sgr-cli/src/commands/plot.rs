//! `sgr plot`: PNG plots of a run.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// Arguments of `sgr plot`.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// The run directory (with metrics.jsonl).
    #[arg(long)]
    run: PathBuf,
    /// Where to write the PNGs (default: the run directory).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs `sgr plot`: prints the files written.
pub fn run(a: PlotArgs) -> Result<()> {
    for f in crate::plot::plot_run(&a.run, a.out.as_deref().unwrap_or(&a.run))? {
        println!("{}", f.display());
    }
    Ok(())
}
