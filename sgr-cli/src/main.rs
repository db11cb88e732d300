//! `sgr`: train networks with end-to-end back-propagation or local learning with SGR.

mod alloc;
mod hub;
mod plot;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use sgr_core::checkpoint::{
    load_training_checkpoint, save_params, save_training_checkpoint, write_atomic,
};
use sgr_core::events::{EpochMetrics, EvalMetrics};
use sgr_core::nn::Ctx;
use sgr_core::optim::{OptimizerConfig, Schedule};
use sgr_core::sgr::{Direction, Distance, SgrConfig, SgrGrad, DEFAULT_LAMBDA};
use sgr_core::trainer::{Method, Trainer, TrainerConfig};
use sgr_data::{
    CifarKind, ImageDataset, ImageFolder, Loader, LoaderConfig, Normalize, Pipeline, Source,
    Subset, Transform,
};
use sgr_models::{CifarResNet, HeadKind, ResNetConfig, SplitStrategy};

#[derive(Parser, Debug)]
#[command(
    name = "sgr",
    version,
    about = "Local learning with Successive Gradient Reconciliation"
)]
struct Cli {
    /// More log output (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (default: SGR on the embedded 8x8 digits).
    Train(Box<TrainArgs>),
    /// Time training steps on random inputs of the model's shape.
    Bench(Box<BenchArgs>),
    /// Evaluate a trained model (a run directory) on its data set's test split.
    Eval(EvalArgs),
    /// Model summary, split plan, per-module parameters and measured activation memory.
    Inspect(Box<InspectArgs>),
    /// Fetch a checkpoint from the Hugging Face Hub into the standard cache.
    Download(DownloadArgs),
    /// PNG plots of a run: training curves and the per-boundary reconciliation heat map.
    Plot(PlotArgs),
}

#[derive(Args, Debug)]
struct PlotArgs {
    /// The run directory (with metrics.jsonl).
    #[arg(long)]
    run: PathBuf,
    /// Where to write the PNGs (default: the run directory).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct DownloadArgs {
    /// hf://owner/repo[@revision]
    reference: String,
}

#[derive(Args, Debug)]
struct EvalArgs {
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
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Model.
    #[arg(long, default_value = "resnet32")]
    model: String,
    #[command(flatten)]
    method: MethodArgs,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Input height and width.
    #[arg(long, default_value_t = 32)]
    input_size: usize,
    /// Input channels.
    #[arg(long, default_value_t = 3)]
    in_channels: usize,
    /// Classes.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// Model.
    #[arg(long, default_value = "resnet32")]
    model: String,
    #[command(flatten)]
    method: MethodArgs,
    /// Batch size for the measured activation memory.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Input height and width.
    #[arg(long, default_value_t = 32)]
    input_size: usize,
    /// Input channels.
    #[arg(long, default_value_t = 3)]
    in_channels: usize,
    /// Classes.
    #[arg(long, default_value_t = 10)]
    classes: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum DatasetArg {
    /// Embedded 8x8 handwritten digits (1438 train / 359 test).
    Digits,
    /// CIFAR-10 binary files in --data-dir.
    Cifar10,
    /// CIFAR-100 binary files (fine labels) in --data-dir.
    Cifar100,
    /// MNIST IDX files (raw or .gz) in --data-dir; padded to 32x32, grey repeated to RGB.
    Mnist,
    /// Fashion-MNIST IDX files in --data-dir (default: Debian's /usr/share/datasets/fashion-mnist).
    FashionMnist,
    /// SVHN train_32x32.mat / test_32x32.mat in --data-dir.
    Svhn,
    /// STL-10 binary files (stl10_binary) in --data-dir.
    Stl10,
    /// ImageNet-style folders: --data-dir/train/<class>/*.jpg|png and --data-dir/val/<class>/...
    Imagefolder,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum DeviceArg {
    /// The CPU.
    Cpu,
    /// The first CUDA GPU (needs a binary built with `--features cuda`).
    Cuda,
}

fn device(d: DeviceArg) -> Result<Device> {
    match d {
        DeviceArg::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda => Ok(Device::new_cuda(0)?),
        #[cfg(not(feature = "cuda"))]
        DeviceArg::Cuda => bail!(
            "--device cuda: this sgr binary was built without GPU support; rebuild it with `cargo build --release -p sgr-cli --features cuda` (needs the CUDA toolkit)"
        ),
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MethodArg {
    Bp,
    Greedy,
    Sgr,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DistanceArg {
    SquaredL2,
    Cosine,
    CosinePerSample,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum GradArg {
    /// Central difference, masks replayed (≈3 plain local steps)
    FiniteDifference,
    /// One-sided difference against the base pass (≈2 plain local steps, O(ε) error)
    ForwardDifference,
    /// Double backward (the oracle)
    Exact,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DirectionArg {
    Forward,
    Backward,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SplitArg {
    Auto,
    Infopro,
    InfoproBalanced,
    Uniform,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum HeadArg {
    #[value(name = "0c1f")]
    ZeroConv,
    #[value(name = "1c2f")]
    OneConv,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OptimArg {
    Sgd,
    Adamw,
}

/// Method, split, head and SGR flags, shared by `train` and `bench`.
#[derive(Args, Debug, Clone)]
struct MethodArgs {
    /// Training method.
    #[arg(long, value_enum, default_value = "sgr")]
    method: MethodArg,
    /// Number of gradient-isolated modules K (bp: 1).
    #[arg(long = "modules", short = 'k')]
    modules: Option<usize>,
    /// How to cut the network into modules.
    #[arg(long, value_enum, default_value = "auto")]
    split: SplitArg,
    /// Auxiliary head of modules 1..K-1.
    #[arg(long, value_enum, default_value = "1c2f")]
    aux_head: HeadArg,
    /// SGR weight lambda.
    #[arg(long, default_value_t = DEFAULT_LAMBDA)]
    sgr_lambda: f64,
    /// SGR distance.
    #[arg(long, value_enum, default_value = "squared-l2")]
    sgr_distance: DistanceArg,
    /// How the SGR parameter gradient is computed.
    #[arg(long, value_enum, default_value = "finite-difference")]
    sgr_grad: GradArg,
    /// Which gradient of a boundary SGR pulls toward the other.
    #[arg(long, value_enum, default_value = "forward")]
    sgr_direction: DirectionArg,
    /// Epochs over which lambda rises linearly from 0.
    #[arg(long, default_value_t = 0.0)]
    sgr_warmup: f64,
    /// Finite-difference step [default: 5e-3 central, 1e-3 one-sided]
    #[arg(long)]
    sgr_fd_epsilon: Option<f64>,
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// Model: resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110.
    #[arg(long, default_value = "resnet20")]
    model: String,
    /// Data set.
    #[arg(long, value_enum, default_value = "digits")]
    dataset: DatasetArg,
    /// Folder with the data set's files (CIFAR: the extracted binary archive or its parent).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    method: MethodArgs,
    /// Epochs.
    #[arg(long, default_value_t = 6)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Base learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Optimizer (SGD: Nesterov momentum 0.9; AdamW: betas 0.9/0.999).
    #[arg(long, value_enum, default_value = "sgd")]
    optimizer: OptimArg,
    /// Weight decay.
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    /// Linear learning-rate warm-up (epochs) before the cosine decay.
    #[arg(long, default_value_t = 0.0)]
    warmup_epochs: f64,
    /// Seed of initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder (config.json, metrics.jsonl, model.safetensors, summary.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use only the first N training samples.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Stop after N optimisation steps in total.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Turn off the data set's standard training augmentation (crop, flip).
    #[arg(long)]
    no_augment: bool,
    /// RandAugment "N,M" (N operations at magnitude M of 30), e.g. 2,9 (DeiT recipe).
    #[arg(long)]
    randaugment: Option<String>,
    /// Random Erasing probability (DeiT recipe: 0.25).
    #[arg(long)]
    random_erasing: Option<f32>,
    /// Image side for imagefolder (train: random-resized-crop; eval: resize + centre crop).
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Class-index file for imagefolder (one class folder name per line).
    #[arg(long)]
    class_index: Option<PathBuf>,
    /// Data-loading worker threads (0: on the training thread).
    #[arg(long)]
    workers: Option<usize>,
    /// Where to train.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Settings from a TOML or JSON file: keys are the flag names (`sgr-lambda = 1.0`, or
    /// `sgr_lambda`), unknown keys are rejected, flags given on the command line win.
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    config: Option<PathBuf>,
    /// Continue the run in DIR from its last checkpoint (its config.json is used; only
    /// --max-steps and --workers may be given with it).
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "model", "dataset", "data_dir", "method", "modules", "split", "aux_head", "sgr_lambda",
        "sgr_distance", "sgr_grad", "sgr_direction", "sgr_warmup", "sgr_fd_epsilon", "epochs",
        "batch_size", "lr", "optimizer", "weight_decay", "warmup_epochs", "seed", "out",
        "train_limit", "no_augment", "randaugment", "random_erasing", "image_size", "class_index",
    ])]
    resume: Option<PathBuf>,
}

/// The effective configuration of a run, written as `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunConfig {
    model: String,
    dataset: DatasetArg,
    data_dir: Option<PathBuf>,
    modules: usize,
    split: SplitStrategy,
    aux_head: HeadKind,
    batch_size: usize,
    seed: u64,
    train_limit: Option<usize>,
    max_steps: Option<usize>,
    augment: bool,
    randaugment: Option<(usize, usize)>,
    random_erasing: Option<f32>,
    image_size: usize,
    class_index: Option<PathBuf>,
    trainer: TrainerConfig,
}

#[derive(Debug, Serialize)]
struct EpochRecord<'a> {
    #[serde(flatten)]
    train: &'a EpochMetrics,
    test_loss: f64,
    test_accuracy: f64,
    test_top5: Option<f64>,
    elapsed_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Summary {
    method: String,
    model: String,
    dataset: String,
    modules: usize,
    epochs: usize,
    steps: usize,
    train_samples: usize,
    test_samples: usize,
    test_accuracy: f64,
    test_error: f64,
    test_top5: Option<f64>,
    train_seconds: f64,
    peak_memory_bytes: Option<u64>,
    final_boundary_cos: Vec<f64>,
}

/// Turns `sgr train --config FILE` into the equivalent flags, placed before the command line's
/// own so that flags given there win.
fn expand_config(argv: Vec<std::ffi::OsString>) -> Result<Vec<std::ffi::OsString>> {
    use clap::parser::ValueSource;
    use clap::CommandFactory;
    let Ok(matches) = Cli::command().try_get_matches_from(&argv) else {
        return Ok(argv); // clap reports the problem when parsing for real
    };
    let Some(("train", sub)) = matches.subcommand() else {
        return Ok(argv);
    };
    let Some(path) = sub.get_one::<PathBuf>("config") else {
        return Ok(argv);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: serde_json::Map<String, serde_json::Value> =
        if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not a JSON object", path.display()))?
        } else {
            let t: toml::Table = toml::from_str(&text)
                .with_context(|| format!("{}: invalid TOML", path.display()))?;
            serde_json::to_value(t)?
                .as_object()
                .cloned()
                .unwrap_or_default()
        };
    let cmd = Cli::command();
    let train_cmd = cmd
        .find_subcommand("train")
        .context("internal: no train command")?;
    let settable: Vec<&clap::Arg> = train_cmd
        .get_arguments()
        .filter(|a| {
            !["config", "resume", "help", "verbose", "quiet"].contains(&a.get_id().as_str())
        })
        .collect();
    let mut extra: Vec<std::ffi::OsString> = Vec::new();
    for (key, value) in &table {
        let id = key.replace('-', "_");
        let arg = settable
            .iter()
            .find(|a| a.get_id().as_str() == id)
            .ok_or_else(|| {
                let mut names: Vec<String> = settable
                    .iter()
                    .filter_map(|a| a.get_long().map(str::to_string))
                    .collect();
                names.sort();
                anyhow::anyhow!(
                    "{}: unknown config field `{key}`; known fields: {}",
                    path.display(),
                    names.join(", ")
                )
            })?;
        if sub.value_source(&id) == Some(ValueSource::CommandLine) {
            continue;
        }
        let long = format!("--{}", arg.get_long().unwrap_or(key));
        let is_switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
        match value {
            serde_json::Value::Bool(b) if is_switch => {
                if *b {
                    extra.push(long.into());
                }
            }
            serde_json::Value::String(v) => extra.extend([long.into(), v.into()]),
            serde_json::Value::Number(n) if !is_switch => {
                extra.extend([long.into(), n.to_string().into()])
            }
            other => bail!(
                "{}: config field `{key}` has an unsupported value {other}",
                path.display()
            ),
        }
    }
    let at = argv
        .iter()
        .position(|a| a == "train")
        .map(|i| i + 1)
        .unwrap_or(argv.len());
    let mut out = argv[..at].to_vec();
    out.extend(extra);
    out.extend_from_slice(&argv[at..]);
    Ok(out)
}

fn main() {
    // Like other Unix tools: end quietly when the reader of stdout goes away (`sgr ... | head`).
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    sgr_core::memory::tune_allocator();
    let argv = match expand_config(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(argv);
    init_logging(cli.verbose, cli.quiet);
    let result = match cli.command {
        Command::Train(a) => train(*a),
        Command::Bench(a) => bench(*a),
        Command::Eval(a) => eval(a),
        Command::Inspect(a) => inspect(*a),
        Command::Download(a) => download(a),
        Command::Plot(a) => {
            plot::plot_run(&a.run, a.out.as_deref().unwrap_or(&a.run)).map(|files| {
                for f in files {
                    println!("{}", f.display());
                }
            })
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = if quiet {
        "error"
    } else {
        match verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SGR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Training and test data with their transform pipelines.
struct Data {
    train: Arc<dyn Source>,
    test: Arc<dyn Source>,
    train_pipeline: Pipeline,
    test_pipeline: Pipeline,
    channels: usize,
    classes: usize,
}

fn load_data(cfg: &RunConfig) -> Result<Data> {
    let dir = || -> Result<PathBuf> {
        match (&cfg.data_dir, cfg.dataset) {
            (Some(d), _) => Ok(d.clone()),
            (None, DatasetArg::FashionMnist) => {
                Ok(PathBuf::from("/usr/share/datasets/fashion-mnist"))
            }
            (None, d) => bail!("--dataset {} needs --data-dir", dataset_name(d)),
        }
    };
    let aug = cfg.augment;
    // In-memory data sets: normalised with the training split's channel statistics.
    let in_memory = |train: ImageDataset,
                     test: ImageDataset,
                     mut train_steps: Vec<Transform>,
                     pre: Vec<Transform>|
     -> Data {
        let to_rgb = pre.contains(&Transform::GreyToRgb);
        let mut norm = Normalize::from_dataset(&train);
        let channels = if to_rgb { 3 } else { train.channels };
        if to_rgb {
            norm = norm.repeated(3);
        }
        let mut tr = pre.clone();
        if aug {
            tr.append(&mut train_steps);
        }
        tr.push(norm.transform());
        let mut te = pre;
        te.push(norm.transform());
        Data {
            classes: train.num_classes,
            channels,
            train: Arc::new(train),
            test: Arc::new(test),
            train_pipeline: Pipeline::new(tr),
            test_pipeline: Pipeline::new(te),
        }
    };
    let crop_flip = |size: usize, pad: usize, flip: bool| {
        let mut v = vec![Transform::RandomCrop { size, padding: pad }];
        if flip {
            v.push(Transform::HorizontalFlip { p: 0.5 });
        }
        v
    };
    let mnist_pre = vec![Transform::PadTo { size: 32 }, Transform::GreyToRgb];
    let mut data = match cfg.dataset {
        DatasetArg::Digits => in_memory(
            sgr_data::digits(true)?,
            sgr_data::digits(false)?,
            vec![],
            vec![],
        ),
        DatasetArg::Cifar10 | DatasetArg::Cifar100 => {
            let kind = if cfg.dataset == DatasetArg::Cifar10 {
                CifarKind::Cifar10
            } else {
                CifarKind::Cifar100Fine
            };
            let d = dir()?;
            // With the `download` feature, fetch the official archive (MD5-checked) when the
            // files are not there yet.
            #[cfg(feature = "download")]
            if sgr_data::load_cifar(&d, kind, false).is_err() {
                eprintln!("{kind:?} not found in {}: downloading it", d.display());
                sgr_data::download::download_cifar(kind, &d)?;
            }
            in_memory(
                sgr_data::load_cifar(&d, kind, true)?,
                sgr_data::load_cifar(&d, kind, false)?,
                crop_flip(32, 4, true),
                vec![],
            )
        }
        DatasetArg::Mnist | DatasetArg::FashionMnist => {
            let d = dir()?;
            let name = dataset_name(cfg.dataset);
            in_memory(
                sgr_data::load_mnist_dir(&d, true, name)?,
                sgr_data::load_mnist_dir(&d, false, name)?,
                crop_flip(32, 2, cfg.dataset == DatasetArg::FashionMnist),
                mnist_pre,
            )
        }
        DatasetArg::Svhn => {
            let d = dir()?;
            in_memory(
                sgr_data::load_svhn_dir(&d, true)?,
                sgr_data::load_svhn_dir(&d, false)?,
                crop_flip(32, 2, false),
                vec![],
            )
        }
        DatasetArg::Stl10 => {
            let d = dir()?;
            in_memory(
                sgr_data::load_stl10_dir(&d, true)?,
                sgr_data::load_stl10_dir(&d, false)?,
                crop_flip(96, 12, true),
                vec![],
            )
        }
        DatasetArg::Imagefolder => {
            let d = dir()?;
            let ci = cfg.class_index.as_deref();
            let train = ImageFolder::open(&d.join("train"), ci)?;
            let test = ImageFolder::open(&d.join("val"), ci)?;
            if train.classes() != test.classes() {
                bail!(
                    "{}: the val classes differ from the train classes; pass --class-index",
                    d.display()
                );
            }
            let norm = Normalize::imagenet();
            let size = cfg.image_size;
            let mut tr = if aug {
                vec![
                    Transform::RandomResizedCrop {
                        size,
                        scale: (0.08, 1.0),
                        ratio: (0.75, 4.0 / 3.0),
                    },
                    Transform::HorizontalFlip { p: 0.5 },
                ]
            } else {
                vec![
                    Transform::Resize {
                        size: size * 256 / 224,
                    },
                    Transform::CenterCrop { size },
                ]
            };
            tr.push(norm.transform());
            Data {
                classes: train.num_classes(),
                channels: 3,
                train: Arc::new(train),
                test: Arc::new(test),
                train_pipeline: Pipeline::new(tr),
                test_pipeline: Pipeline::new(vec![
                    Transform::Resize {
                        size: size * 256 / 224,
                    },
                    Transform::CenterCrop { size },
                    norm.transform(),
                ]),
            }
        }
    };
    // DeiT-style extras: RandAugment before normalisation, Random Erasing after it.
    if let Some((n, m)) = cfg.randaugment {
        let at = data.train_pipeline.steps.len().saturating_sub(1);
        data.train_pipeline.steps.insert(
            at,
            Transform::RandAugment {
                ops: n,
                magnitude: m,
            },
        );
    }
    if let Some(p) = cfg.random_erasing {
        data.train_pipeline
            .steps
            .push(Transform::RandomErasing { p });
    }
    if let Some(n) = cfg.train_limit {
        if n == 0 {
            bail!("--train-limit must be >= 1");
        }
        data.train = Arc::new(Subset::first(data.train, n));
    }
    Ok(data)
}

fn dataset_name(d: DatasetArg) -> &'static str {
    match d {
        DatasetArg::Digits => "digits",
        DatasetArg::Cifar10 => "cifar10",
        DatasetArg::Cifar100 => "cifar100",
        DatasetArg::Mnist => "mnist",
        DatasetArg::FashionMnist => "fashion-mnist",
        DatasetArg::Svhn => "svhn",
        DatasetArg::Stl10 => "stl10",
        DatasetArg::Imagefolder => "imagefolder",
    }
}

/// The method's settings: (method, K, split, head, SGR).
fn method_config(m: &MethodArgs) -> Result<(Method, usize, SplitStrategy, HeadKind, SgrConfig)> {
    let method = match m.method {
        MethodArg::Bp => Method::Bp,
        MethodArg::Greedy => Method::Greedy,
        MethodArg::Sgr => Method::Sgr,
    };
    let modules = match (method, m.modules) {
        (Method::Bp, None | Some(1)) => 1,
        (Method::Bp, Some(k)) => {
            bail!("--method bp trains end to end: --modules must be 1, got {k}")
        }
        (_, Some(k)) => k,
        (_, None) => 4,
    };
    let sgr = SgrConfig {
        lambda: m.sgr_lambda,
        distance: match m.sgr_distance {
            DistanceArg::SquaredL2 => Distance::SquaredL2,
            DistanceArg::Cosine => Distance::Cosine,
            DistanceArg::CosinePerSample => Distance::CosinePerSample,
        },
        direction: match m.sgr_direction {
            DirectionArg::Forward => Direction::Forward,
            DirectionArg::Backward => Direction::Backward,
        },
        grad: match m.sgr_grad {
            GradArg::FiniteDifference => SgrGrad::FiniteDifference,
            GradArg::ForwardDifference => SgrGrad::ForwardDifference,
            GradArg::Exact => SgrGrad::Exact,
        },
        fd_epsilon: m.sgr_fd_epsilon,
        warmup_epochs: m.sgr_warmup,
    };
    let split = match m.split {
        SplitArg::Auto => SplitStrategy::Auto,
        SplitArg::Infopro => SplitStrategy::Infopro,
        SplitArg::InfoproBalanced => SplitStrategy::InfoproBalanced,
        SplitArg::Uniform => SplitStrategy::Uniform,
    };
    let head = match m.aux_head {
        HeadArg::ZeroConv => HeadKind::ZeroConvOneFc,
        HeadArg::OneConv => HeadKind::OneConvTwoFc,
    };
    Ok((method, modules, split, head, sgr))
}

fn run_config(a: &TrainArgs) -> Result<RunConfig> {
    let (method, modules, split, aux_head, sgr) = method_config(&a.method)?;
    let optimizer = match a.optimizer {
        OptimArg::Sgd => OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: a.weight_decay,
        },
        OptimArg::Adamw => OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: a.weight_decay,
        },
    };
    if a.batch_size == 0 || a.epochs == 0 {
        bail!("--batch-size and --epochs must be >= 1");
    }
    Ok(RunConfig {
        model: a.model.clone(),
        dataset: a.dataset,
        data_dir: a.data_dir.clone(),
        modules,
        split,
        aux_head,
        batch_size: a.batch_size,
        seed: a.seed,
        train_limit: a.train_limit,
        max_steps: a.max_steps,
        augment: !a.no_augment,
        randaugment: match &a.randaugment {
            None => None,
            Some(t) => {
                let parts: Vec<&str> = t.split(',').collect();
                let parse = |x: &str| x.trim().parse::<usize>().ok();
                match parts.as_slice() {
                    [n, m] if parse(n).is_some() && parse(m).is_some_and(|m| m <= 30) => {
                        Some((parse(n).unwrap_or(2), parse(m).unwrap_or(9)))
                    }
                    _ => bail!("--randaugment takes N,M with M <= 30 (e.g. 2,9), got `{t}`"),
                }
            }
        },
        random_erasing: match a.random_erasing {
            Some(p) if !(0.0..=1.0).contains(&p) => {
                bail!("--random-erasing is a probability in [0, 1], got {p}")
            }
            p => p,
        },
        image_size: a.image_size,
        class_index: a.class_index.clone(),
        trainer: TrainerConfig {
            method,
            sgr,
            optimizer,
            lr: a.lr,
            schedule: Schedule::Cosine {
                warmup_epochs: a.warmup_epochs,
            },
            epochs: a.epochs,
            steps_per_epoch: 0,
        },
    })
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    write_atomic(path, s.as_bytes())?;
    Ok(())
}

fn read_run_config(dir: &Path) -> Result<RunConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is {} a run directory?)",
            path.display(),
            dir.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid run configuration", path.display()))
}

/// Why training stopped before its last epoch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    MaxSteps,
    Interrupted,
}

fn train(a: TrainArgs) -> Result<()> {
    // Installed first, so that Ctrl-C at any point after start-up is handled.
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = Arc::clone(&interrupted);
        // A second Ctrl-C while saving ends the process at once.
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    let (mut cfg, out) = match &a.resume {
        Some(dir) => {
            let mut cfg = read_run_config(dir)?;
            // --max-steps limits one invocation; it is not carried over.
            cfg.max_steps = a.max_steps;
            (cfg, dir.clone())
        }
        None => {
            let cfg = run_config(&a)?;
            let out = a.out.clone().unwrap_or_else(|| {
                PathBuf::from("runs").join(format!(
                    "{}-{}-{}-k{}",
                    dataset_name(cfg.dataset),
                    cfg.model,
                    cfg.trainer.method.name(),
                    cfg.modules
                ))
            });
            (cfg, out)
        }
    };
    let resuming = a.resume.is_some();
    let device = device(a.device)?;
    let data = load_data(&cfg)?;
    let workers = a.workers.unwrap_or_else(sgr_data::default_workers);
    let train_loader = Loader::new(
        Arc::clone(&data.train),
        LoaderConfig {
            workers,
            ..LoaderConfig::train(cfg.batch_size, cfg.seed)
        },
        data.train_pipeline.clone(),
        &device,
    )?;
    let test_loader = Loader::new(
        Arc::clone(&data.test),
        LoaderConfig {
            workers,
            ..LoaderConfig::eval(256)
        },
        data.test_pipeline.clone(),
        &device,
    )?;
    cfg.trainer.steps_per_epoch = train_loader.batches_per_epoch();

    let arch = ResNetConfig::preset(&cfg.model, data.channels, data.classes)?;
    let net = CifarResNet {
        config: arch,
        modules: cfg.modules,
        split: cfg.split,
        head: cfg.aux_head,
        seed: cfg.seed,
    }
    .build(&device, DType::F32)?;
    let plan = net.plan().clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let checkpoint = out.join("checkpoint.safetensors");
    let metrics_path = out.join("metrics.jsonl");
    println!(
        "sgr train: {} on {} ({} train / {} test), method {}, K={} (module ends after blocks {:?}), {} parameters",
        cfg.model,
        dataset_name(cfg.dataset),
        data.train.len(),
        data.test.len(),
        cfg.trainer.method.name(),
        cfg.modules,
        plan.ends(),
        net.num_trainable()
    );
    let mut trainer = Trainer::new(net, cfg.trainer.clone())?;
    let mut history: Vec<String> = Vec::new();
    if resuming {
        load_training_checkpoint(&checkpoint, &mut trainer)?;
        // Keep the metrics of the epochs the checkpoint has completed.
        if let Ok(text) = std::fs::read_to_string(&metrics_path) {
            history = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .take(trainer.epoch())
                .map(str::to_string)
                .collect();
        }
        println!(
            "resuming {} at epoch {}, step {} of the epoch (global step {})",
            out.display(),
            trainer.epoch() + 1,
            trainer.steps_in_epoch(),
            trainer.global_step()
        );
    } else {
        write_json(&out.join("config.json"), &cfg)?;
    }
    let mut metrics_text: String = history.iter().map(|l| format!("{l}\n")).collect();
    write_atomic(&metrics_path, metrics_text.as_bytes())?;

    let start = Instant::now();
    let mut last: Option<(EvalMetrics, Vec<f64>)> = None;
    let mut stop: Option<Stop> = None;
    // Progress bars on a terminal, plain per-epoch lines otherwise.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    'epochs: for epoch in trainer.epoch()..cfg.trainer.epochs {
        let bar = terminal.then(|| {
            let pb = indicatif::ProgressBar::new(train_loader.batches_per_epoch() as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            pb.set_prefix(format!("{}/{}", epoch + 1, cfg.trainer.epochs));
            pb.set_position(trainer.steps_in_epoch() as u64);
            pb
        });
        for batch in train_loader.epoch_from(epoch, trainer.steps_in_epoch()) {
            if cfg.max_steps.is_some_and(|m| trainer.global_step() >= m) {
                stop = Some(Stop::MaxSteps);
                break 'epochs;
            }
            let (x, y) = batch?;
            let step = trainer.train_step(&x, &y)?;
            if let Some(pb) = &bar {
                pb.inc(1);
                pb.set_message(format!(
                    "loss {:.4}  {:.0} img/s",
                    step.module_losses.last().copied().unwrap_or(f64::NAN),
                    step.batch as f64 / step.seconds.max(1e-9)
                ));
            }
            if interrupted.load(Ordering::SeqCst) {
                stop = Some(Stop::Interrupted);
                break 'epochs;
            }
        }
        if let Some(pb) = bar {
            pb.finish_and_clear();
        }
        let m = trainer.finish_epoch(&mut sgr_core::events::NoObserver);
        let eval = trainer.evaluate(test_loader.epoch(0))?;
        let rec = EpochRecord {
            train: &m,
            test_loss: eval.loss,
            test_accuracy: eval.accuracy,
            test_top5: eval.top5,
            elapsed_seconds: start.elapsed().as_secs_f64(),
        };
        metrics_text.push_str(&serde_json::to_string(&rec)?);
        metrics_text.push('\n');
        write_atomic(&metrics_path, metrics_text.as_bytes())?;
        save_training_checkpoint(&checkpoint, &trainer)?;
        let cos: Vec<String> = m
            .boundaries
            .iter()
            .map(|b| format!("{:.2}", b.cos))
            .collect();
        println!(
            "epoch {:>3}/{}  loss {:.4}  train acc {:.4}  test acc {:.4}  time {:.1}s{}",
            epoch + 1,
            cfg.trainer.epochs,
            m.train_loss,
            m.train_accuracy,
            eval.accuracy,
            m.seconds,
            if cos.is_empty() {
                String::new()
            } else {
                format!("  cos(a,b) [{}]", cos.join(" "))
            }
        );
        last = Some((eval, m.boundaries.iter().map(|b| b.cos).collect()));
        if interrupted.load(Ordering::SeqCst) {
            stop = Some(Stop::Interrupted);
            break;
        }
    }
    if stop.is_some() {
        save_training_checkpoint(&checkpoint, &trainer)?;
    }
    save_params(&out.join("model.safetensors"), &trainer.network().params())?;
    if stop == Some(Stop::Interrupted) {
        println!(
            "interrupted at epoch {}, step {} of the epoch: checkpoint saved; continue with `sgr train --resume {}`",
            trainer.epoch() + 1,
            trainer.steps_in_epoch(),
            out.display()
        );
        std::process::exit(130);
    }
    let (eval, last_cos) = match last {
        Some(l) if trainer.steps_in_epoch() == 0 => l,
        prev => {
            let eval = trainer.evaluate(test_loader.epoch(0))?;
            println!(
                "stopped after {} steps (--max-steps), in epoch {}: test acc {:.4}",
                trainer.global_step(),
                trainer.epoch() + 1,
                eval.accuracy
            );
            (eval, prev.map(|p| p.1).unwrap_or_default())
        }
    };
    let peak = sgr_core::memory::peak_rss_bytes();
    let train_seconds: f64 = metrics_text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["seconds"].as_f64())
        .sum::<f64>()
        + trainer.state().epoch_progress.seconds();
    let summary = Summary {
        method: cfg.trainer.method.name().into(),
        model: cfg.model.clone(),
        dataset: dataset_name(cfg.dataset).into(),
        modules: cfg.modules,
        epochs: trainer.epoch(),
        steps: trainer.global_step(),
        train_samples: data.train.len(),
        test_samples: data.test.len(),
        test_accuracy: eval.accuracy,
        test_error: 1.0 - eval.accuracy,
        test_top5: eval.top5,
        train_seconds,
        peak_memory_bytes: peak,
        final_boundary_cos: last_cos,
    };
    write_json(&out.join("summary.json"), &summary)?;
    write_atomic(
        &out.join("README.md"),
        model_card(&cfg, &summary).as_bytes(),
    )?;
    println!(
        "done: test accuracy {:.4} (error {:.2}%), train time {:.1}s, peak memory {} MiB; saved {}",
        eval.accuracy,
        100.0 * (1.0 - eval.accuracy),
        train_seconds,
        peak.map(|b| (b / (1024 * 1024)).to_string())
            .unwrap_or_else(|| "?".into()),
        out.join("model.safetensors").display()
    );
    Ok(())
}

fn download(a: DownloadArgs) -> Result<()> {
    let r = hub::HfRef::parse(&a.reference)
        .unwrap_or_else(|| bail!("`{}` is not an hf:// reference", a.reference))?;
    if r.file.is_some() {
        bail!("sgr download takes hf://owner/repo[@revision], without a file");
    }
    let mut paths = hub::fetch(&r, &hub::CHECKPOINT_FILES[..2])?;
    // The model card is optional.
    if let Ok(mut card) = hub::fetch(&r, &hub::CHECKPOINT_FILES[2..]) {
        paths.append(&mut card);
    }
    for p in &paths {
        println!("{}", p.display());
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let (dir, weights) = match hub::HfRef::parse(&a.checkpoint) {
        Some(r) => {
            let r = r?;
            let file = r.file.clone().unwrap_or_else(|| "model.safetensors".into());
            let paths = hub::fetch(&r, &["config.json", file.as_str()])?;
            let dir = paths[0]
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            (dir, paths[1].clone())
        }
        None => {
            let path = PathBuf::from(&a.checkpoint);
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
    let mut cfg = read_run_config(&dir)?;
    if a.data_dir.is_some() {
        cfg.data_dir = a.data_dir.clone();
    }
    cfg.train_limit = None;
    let device = device(a.device)?;
    let data = load_data(&cfg)?;
    let net = CifarResNet {
        config: ResNetConfig::preset(&cfg.model, data.channels, data.classes)?,
        modules: cfg.modules,
        split: cfg.split,
        head: cfg.aux_head,
        seed: cfg.seed,
    }
    .build(&device, DType::F32)?;
    sgr_core::checkpoint::load_params(&weights, &net.params())?;
    let loader = Loader::new(
        Arc::clone(&data.test),
        LoaderConfig {
            workers: a.workers.unwrap_or_else(sgr_data::default_workers),
            ..LoaderConfig::eval(a.batch_size.max(1))
        },
        data.test_pipeline.clone(),
        &device,
    )?;
    let t = Instant::now();
    let m = sgr_core::trainer::evaluate(&net, loader.epoch(0))?;
    if a.json {
        let v = serde_json::json!({
            "checkpoint": weights,
            "model": cfg.model,
            "dataset": dataset_name(cfg.dataset),
            "samples": m.samples,
            "loss": m.loss,
            "top1": m.accuracy,
            "top5": m.top5,
            "seconds": t.elapsed().as_secs_f64(),
        });
        println!("{v}");
    } else {
        println!(
            "{} on {} test ({} samples): top-1 {:.4}{}, loss {:.4} ({:.1}s)",
            cfg.model,
            dataset_name(cfg.dataset),
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

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn inspect(a: InspectArgs) -> Result<()> {
    use sgr_core::sgr::{CrossEntropyModule, LocalProblem, OutputShift};
    let (_method, modules, split, head, _sgr) = method_config(&a.method)?;
    let arch = ResNetConfig::preset(&a.model, a.in_channels, a.classes)?;
    let device = Device::Cpu;
    let net = CifarResNet {
        config: arch.clone(),
        modules,
        split,
        head,
        seed: 0,
    }
    .build(&device, DType::F32)?;
    let plan = net.plan().clone();
    let n = arch.blocks_per_stage();
    let unit_name = |u: usize| {
        if u == 0 {
            "stem".to_string()
        } else {
            format!("layer{}.{}", (u - 1) / n + 1, (u - 1) % n)
        }
    };
    let count = |ps: Vec<sgr_core::nn::Param>| -> usize {
        ps.iter()
            .filter(|p| p.kind == sgr_core::nn::ParamKind::Trainable)
            .map(|p| p.var.elem_count())
            .sum()
    };
    let backbone = count(
        net.params()
            .into_iter()
            .filter(|p| !p.name.starts_with("aux."))
            .collect(),
    );
    println!(
        "{}: depth {}, {} blocks per stage, {} backbone parameters, {} in aux heads; input {}x{}x{}, {} classes",
        a.model,
        arch.depth,
        n,
        backbone,
        net.num_trainable() - backbone,
        a.in_channels,
        a.input_size,
        a.input_size,
        a.classes
    );
    println!(
        "split: K={} ({:?}), aux head {}; activation memory measured at batch {} (live heap bytes held by the forward graph; peak while also running backward)",
        modules,
        split,
        head.name(),
        a.batch_size
    );
    println!(
        "{:<7} {:<24} {:>14} {:>10} {:>10} {:>16} {:>16}",
        "module", "blocks", "output", "body", "head", "activations MiB", "fwd+bwd peak MiB"
    );
    let labels = candle_core::Tensor::from_vec(
        (0..a.batch_size)
            .map(|i| (i % a.classes) as u32)
            .collect::<Vec<_>>(),
        a.batch_size,
        &device,
    )?;
    let mut h = candle_core::Tensor::randn(
        0f32,
        1.0,
        (a.batch_size, a.in_channels, a.input_size, a.input_size),
        &device,
    )?;
    let mut worst = 0usize;
    for k in 0..net.num_modules() {
        let r = plan.range(k);
        let blocks = if r.len() == 1 {
            unit_name(r.start)
        } else {
            format!("{}..{}", unit_name(r.start), unit_name(r.end - 1))
        };
        let all = net.module_params(k);
        let head_params = count(
            all.iter()
                .filter(|p| p.name.starts_with("aux."))
                .cloned()
                .collect(),
        );
        let body_params = count(all) - head_params;
        let prob = CrossEntropyModule {
            net: &net,
            k,
            labels: &labels,
        };
        let x = h.detach();
        let before = alloc::live_bytes();
        alloc::reset_peak();
        let f = prob.forward(&x, OutputShift::None, &mut Ctx::train_frozen_stats())?;
        let held = alloc::live_bytes().saturating_sub(before);
        let grads = f.loss.backward()?;
        let peak = alloc::peak_bytes().saturating_sub(before);
        drop(grads);
        worst = worst.max(peak);
        let out_shape = if k + 1 < net.num_modules() {
            format!("{:?}", &f.output.dims()[1..])
        } else {
            format!("logits {}", a.classes)
        };
        println!(
            "{:<7} {:<24} {:>14} {:>10} {:>10} {:>16.1} {:>16.1}",
            k + 1,
            blocks,
            out_shape,
            body_params,
            head_params,
            mib(held),
            mib(peak)
        );
        h = f.output.detach();
    }
    // The same network trained end to end keeps the whole graph.
    let whole = CifarResNet {
        config: arch,
        modules: 1,
        split,
        head,
        seed: 0,
    }
    .build(&device, DType::F32)?;
    let x = candle_core::Tensor::randn(
        0f32,
        1.0,
        (a.batch_size, a.in_channels, a.input_size, a.input_size),
        &device,
    )?;
    let before = alloc::live_bytes();
    alloc::reset_peak();
    let logits = whole.forward(&x, &mut Ctx::train_frozen_stats())?;
    let held = alloc::live_bytes().saturating_sub(before);
    let loss = sgr_core::loss::cross_entropy(&logits, &labels)?;
    let grads = loss.backward()?;
    let peak = alloc::peak_bytes().saturating_sub(before);
    drop(grads);
    println!(
        "end-to-end (bp): activations {:.1} MiB, fwd+bwd peak {:.1} MiB; largest local module peak {:.1} MiB ({:.0}% of bp)",
        mib(held),
        mib(peak),
        mib(worst),
        100.0 * worst as f64 / peak.max(1) as f64
    );
    Ok(())
}

/// A Hugging Face Hub model card for a run directory.
fn model_card(cfg: &RunConfig, s: &Summary) -> String {
    let cos = if s.final_boundary_cos.is_empty() {
        "–".to_string()
    } else {
        s.final_boundary_cos
            .iter()
            .map(|c| format!("{c:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "---\nlibrary_name: sgr\ntags:\n- image-classification\n- local-learning\n- {method}\nmetrics:\n- accuracy\n---\n\n\
# {model} trained with `{method}` (K={k}) on {dataset}\n\n\
Trained with [sgr](https://github.com/sgr-rs/sgr): local learning with Successive Gradient \
Reconciliation (Yang et al., ICML 2024).\n\n\
| metric | value |\n|---|---|\n\
| test accuracy | {acc:.4} |\n| test error | {err:.2}% |\n| epochs | {epochs} |\n| steps | {steps} |\n\
| train samples | {ntr} |\n| training time | {secs:.1} s |\n| peak memory | {mem} |\n\
| final cos(a, b) per boundary | {cos} |\n\n\
Files: `model.safetensors` (torchvision-style names; aux heads under `aux.<k>`), `config.json` \
(the run configuration), `metrics.jsonl` (per epoch), `summary.json`, `checkpoint.safetensors` \
(weights, optimizer state and position, for `sgr train --resume`).\n\n\
Method: `{method}`, split `{split:?}`, aux head `{head}`, optimizer `{opt:?}`, lr {lr}, batch {batch}, \
seed {seed}.\n",
        method = cfg.trainer.method.name(),
        model = cfg.model,
        k = cfg.modules,
        dataset = dataset_name(cfg.dataset),
        acc = s.test_accuracy,
        err = 100.0 * s.test_error,
        epochs = s.epochs,
        steps = s.steps,
        ntr = s.train_samples,
        secs = s.train_seconds,
        mem = s
            .peak_memory_bytes
            .map(|b| format!("{} MiB", b / (1024 * 1024)))
            .unwrap_or_else(|| "–".into()),
        cos = cos,
        split = cfg.split,
        head = cfg.aux_head.name(),
        opt = cfg.trainer.optimizer,
        lr = cfg.trainer.lr,
        batch = cfg.batch_size,
        seed = cfg.seed,
    )
}

#[derive(Debug, Serialize)]
struct BenchReport {
    model: String,
    method: String,
    modules: usize,
    sgr_grad: Option<String>,
    batch_size: usize,
    input: [usize; 3],
    steps: usize,
    median_step_seconds: f64,
    images_per_s: f64,
    step_seconds: Vec<f64>,
    peak_memory_bytes: Option<u64>,
}

fn bench(a: BenchArgs) -> Result<()> {
    if a.steps == 0 || a.batch_size == 0 {
        bail!("--steps and --batch-size must be >= 1");
    }
    let (method, modules, split, head, sgr) = method_config(&a.method)?;
    let trainer_cfg = TrainerConfig {
        method,
        sgr,
        optimizer: OptimizerConfig::default(),
        lr: 0.05,
        schedule: Schedule::Constant,
        epochs: 1,
        steps_per_epoch: a.steps + 1,
    };
    let device = device(a.device)?;
    let arch = ResNetConfig::preset(&a.model, a.in_channels, a.classes)?;
    let net = CifarResNet {
        config: arch,
        modules,
        split,
        head,
        seed: 0,
    }
    .build(&device, DType::F32)?;
    let mut trainer = Trainer::new(net, trainer_cfg.clone())?;
    let shape = (a.batch_size, a.in_channels, a.input_size, a.input_size);
    let x = candle_core::Tensor::randn(0f32, 1.0, shape, &device)?;
    let labels: Vec<u32> = (0..a.batch_size).map(|i| (i % a.classes) as u32).collect();
    let y = candle_core::Tensor::from_vec(labels, a.batch_size, &device)?;
    trainer.train_step(&x, &y)?;
    let mut times = Vec::with_capacity(a.steps);
    for _ in 0..a.steps {
        times.push(trainer.train_step(&x, &y)?.seconds);
    }
    let mut sorted = times.clone();
    sorted.sort_by(|p, q| p.total_cmp(q));
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        0.5 * (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2])
    };
    let report = BenchReport {
        model: a.model.clone(),
        method: method.name().into(),
        modules,
        sgr_grad: (method == Method::Sgr).then(|| {
            match trainer_cfg.sgr.grad {
                SgrGrad::FiniteDifference => "finite-difference",
                SgrGrad::ForwardDifference => "forward-difference",
                SgrGrad::Exact => "exact",
            }
            .to_string()
        }),
        batch_size: a.batch_size,
        input: [a.in_channels, a.input_size, a.input_size],
        steps: a.steps,
        median_step_seconds: median,
        images_per_s: a.batch_size as f64 / median,
        step_seconds: times,
        peak_memory_bytes: sgr_core::memory::peak_rss_bytes(),
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} {} K={}{} batch {} input {}x{}x{}: median step {:.3}s, {:.1} images/s, peak memory {} MiB",
            report.model,
            report.method,
            report.modules,
            report
                .sgr_grad
                .as_ref()
                .map(|g| format!(" ({g})"))
                .unwrap_or_default(),
            report.batch_size,
            a.in_channels,
            a.input_size,
            a.input_size,
            report.median_step_seconds,
            report.images_per_s,
            report
                .peak_memory_bytes
                .map(|b| (b / (1024 * 1024)).to_string())
                .unwrap_or_else(|| "?".into())
        );
    }
    Ok(())
}
