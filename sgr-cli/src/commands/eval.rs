//! `sgr eval`: rebuild a trained model from its run directory (or the Hub) and evaluate it on
//! its data set's test split (the training split is not read when the model stores its
//! preprocessing).

use crate::out::outln;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use sgr_run::data::{load_data, load_test_data};
use sgr_run::preprocess::Preprocess;
use sgr_run::run::{build_network, test_loader};
use sgr_run::{DeviceKind, RunDir};

use crate::args::named;

/// Arguments of `sgr eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A run directory (config.json + model.safetensors), a model.safetensors file with the
    /// run's config.json beside it, or hf://owner/repo[@revision][/file] (Hugging Face Hub;
    /// resolved from the cache when HF_HUB_OFFLINE is set).
    #[arg(long)]
    checkpoint: String,
    /// Evaluate on another copy of the data set (default: the run's --data-dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Batch size.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Data-loading worker threads.
    #[arg(long)]
    workers: Option<usize>,
    /// Where to evaluate.
    #[arg(long, value_parser = named::<DeviceKind>(), default_value = "cpu")]
    device: DeviceKind,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs `sgr eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    if a.batch_size == 0 || a.batch_size > sgr_run::spec::MAX_BATCH {
        anyhow::bail!(
            "--batch-size must be in 1..={}, got {}",
            sgr_run::spec::MAX_BATCH,
            a.batch_size
        );
    }
    let from_hub = crate::hub::HfRef::parse(&a.checkpoint).is_some();
    let (dir, weights) = match crate::hub::HfRef::parse(&a.checkpoint) {
        Some(r) => {
            let r = r?;
            let file = r.file.clone().unwrap_or_else(|| "model.safetensors".into());
            let paths = crate::hub::fetch(&r, &["config.json", file.as_str()])?;
            let dir = paths[0]
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            (dir, paths[1].clone())
        }
        None => {
            let path = PathBuf::from(&a.checkpoint);
            if !path.exists() {
                anyhow::bail!(
                    "--checkpoint {}: no such file or directory; give a run directory, a \
                     model.safetensors file with its run's config.json beside it, or \
                     hf://owner/repo",
                    path.display()
                );
            }
            if path.is_dir() {
                (path.clone(), path.join("model.safetensors"))
            } else {
                let dir = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."));
                (dir, path)
            }
        }
    };
    let mut cfg = RunDir::new(&dir).read_spec()?;
    if from_hub {
        untrusted_paths(&mut cfg, &dir)?;
    }
    if a.data_dir.is_some() {
        cfg.data_dir = a.data_dir.clone();
    }
    // The test split, also for runs that evaluated on held-out training images.
    cfg.train_limit = None;
    cfg.validation = None;
    let device = a.device.device()?;
    // A model that stores its preprocessing needs only the test split; older ones need the
    // training split to recompute the normalisation.
    let data = match Preprocess::read(&weights)? {
        Some(p) => {
            let data = load_test_data(&cfg, &p)?;
            p.check(&data, &weights)?;
            data
        }
        None => load_data(&cfg)?,
    };
    let workers = sgr_run::spec::check_workers(a.workers)?;
    // An evaluation batch (at most the split) that cannot fit is refused, not aborted.
    let plan = sgr_run::budget::Plan {
        batch: 0,
        eval_batch: a.batch_size.min(data.test.len()),
        eval_batch_flag: Some("--batch-size"),
        in_flight: 2 * workers + 2,
        size_flag: None,
        limit: None,
    };
    let meter = std::sync::Arc::new(sgr_run::counting::CountingMeter);
    sgr_run::budget::check_fits(&cfg, data.input(), plan, meter, &device)?;
    let net = build_network(&cfg, data.input(), Some(&data.pixels), &device)?;
    sgr_core::checkpoint::load_params(&weights, &net.params())?;
    let loader = test_loader(&data, a.batch_size, workers, &device)?;
    let t = Instant::now();
    let m = sgr_core::trainer::evaluate(&net, loader.epoch(0))?;
    if a.json {
        let v = serde_json::json!({
            "checkpoint": weights,
            "model": cfg.model,
            "dataset": cfg.dataset.name(),
            "samples": m.samples,
            "loss": m.loss,
            "top1": m.accuracy,
            "top5": m.top5,
            "seconds": t.elapsed().as_secs_f64(),
        });
        outln!("{v}");
    } else {
        outln!(
            "{} on {} test ({} samples): top-1 {:.4}{}, loss {:.4} ({:.1}s)",
            cfg.model,
            cfg.dataset,
            m.samples,
            m.accuracy,
            m.top5
                .map(|t| format!(", top-5 {t:.4}"))
                .unwrap_or_default(),
            m.loss,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// A configuration downloaded from the Hub is someone else's: the paths it names must not decide
/// which local files `eval` reads. Its data folder is not used (`--data-dir` says where the data
/// is here), and a class index must be a file of the snapshot itself.
fn untrusted_paths(cfg: &mut sgr_run::RunSpec, snapshot: &Path) -> Result<()> {
    cfg.data_dir = None;
    if let Some(index) = cfg.class_index.take() {
        let inside = snapshot.join(&index);
        let contained = index.is_relative()
            && !index
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            && inside.is_file();
        if !contained {
            anyhow::bail!(
                "the Hub configuration names class_index {:?}, which is not a file of its \
                 snapshot ({}): a downloaded configuration may not name local files",
                index,
                snapshot.display()
            );
        }
        cfg.class_index = Some(inside);
    }
    Ok(())
}
