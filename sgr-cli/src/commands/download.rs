//! `sgr download`: fetch a checkpoint from the Hugging Face Hub into the standard cache.

use crate::out::outln;
use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `sgr download`.
#[derive(Args, Debug)]
pub struct DownloadArgs {
    /// hf://owner/repo[@revision]
    reference: String,
}

/// Runs `sgr download`.
pub fn run(a: DownloadArgs) -> Result<()> {
    let r = crate::hub::HfRef::parse(&a.reference)
        .unwrap_or_else(|| bail!("`{}` is not an hf:// reference", a.reference))?;
    if r.file.is_some() {
        bail!("sgr download takes hf://owner/repo[@revision], without a file");
    }
    let mut paths = crate::hub::fetch(&r, &crate::hub::CHECKPOINT_FILES[..2])?;
    // The model card is optional.
    if let Ok(mut card) = crate::hub::fetch(&r, &crate::hub::CHECKPOINT_FILES[2..]) {
        paths.append(&mut card);
    }
    for p in &paths {
        outln!("{}", p.display());
    }
    Ok(())
}
