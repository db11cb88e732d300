//! `sgr train`: a thin shell over [`sgr_run::Run`]. Flags, a `--config` file (the schema of
//! `config.json`) and the defaults make one [`RunSpec`]; the run reports through events, which
//! this file renders as lines, and as progress bars on a terminal.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use sgr_core::events::{EpochMetrics, Event};
use sgr_run::spec::ScheduleKind;
use sgr_run::{
    Dataset, DeviceKind, OptimizerKind, ResumeChanges, Resumed, Run, RunOptions, RunSpec, Stop,
};

use crate::args::{named, set, MethodArgs};

/// `println!` that ignores a closed stdout (`sgr train | head -1`): the training goes on and
/// saves its model; only the printing stops.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if !QUIET.load(Ordering::Relaxed) {
            let _ = writeln!(std::io::stdout(), $($t)*);
        }
    }};
}

/// Set on the ranks of a distributed run but rank 0, which speaks for all.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Flags that set fields of the run specification.
#[derive(Args, Debug, Clone, Default)]
pub struct SpecArgs {
    /// Model: CIFAR ResNets resnet8..resnet110, ImageNet ResNets resnet18..resnet152 (at
    /// width N: resnet101-wN), ViTs deit-ti, deit-s, deit-b, vit-b16, vit-cifar (`sgr inspect`
    /// lists them) [default: resnet20]
    #[arg(long)]
    pub model: Option<String>,
    /// Dropout inside Transformer blocks [default: 0]
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Stochastic depth of the last Transformer block (linear in depth) [default: 0]
    #[arg(long)]
    pub drop_path: Option<f64>,
    /// Data set [default: digits]
    #[arg(long, value_parser = named::<Dataset>())]
    pub dataset: Option<Dataset>,
    /// Folder with the data set's files (CIFAR: the extracted binary archive or its parent).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub method: MethodArgs,
    /// Epochs [default: 6]; with --resume, the new planned total
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size [default: 64]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Base learning rate [default: 0.05]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Optimizer (SGD: Nesterov momentum 0.9; AdamW: betas 0.9/0.999) [default: sgd]
    #[arg(long, value_parser = named::<OptimizerKind>())]
    pub optimizer: Option<OptimizerKind>,
    /// Weight decay [default: 5e-4]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Which parameters weight decay applies to (weights: not norms, biases, position
    /// embeddings or class tokens) [default: all for sgd, weights for adamw]
    #[arg(long, value_parser = named::<sgr_core::optim::DecayScope>())]
    pub decay_scope: Option<sgr_core::optim::DecayScope>,
    /// Label smoothing (DeiT recipe: 0.1) [default: 0]
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Mixup with Beta(ALPHA, ALPHA) mixing weights (DeiT recipe: 0.8); with --cutmix, each
    /// batch takes one of the two at random
    #[arg(long, value_name = "ALPHA")]
    pub mixup: Option<f64>,
    /// Cutmix with Beta(ALPHA, ALPHA) box areas (DeiT recipe: 1.0)
    #[arg(long, value_name = "ALPHA")]
    pub cutmix: Option<f64>,
    /// Clip each optimizer's gradient L2 norm to MAX
    #[arg(long, value_name = "MAX")]
    pub clip_grad_norm: Option<f64>,
    /// Learning-rate schedule [default: cosine]
    #[arg(long, value_parser = named::<ScheduleKind>())]
    pub schedule: Option<ScheduleKind>,
    /// Linear learning-rate warm-up (epochs) before the cosine decay [default: 0]
    #[arg(long)]
    pub warmup_epochs: Option<f64>,
    /// Seed of initialisation and shuffling [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Use only the first N training samples (after --validation takes its images out).
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Hold out the last N training images and evaluate on them instead of the test split
    /// (choose hyperparameters there, never on the test set).
    #[arg(long, value_name = "N")]
    pub validation: Option<usize>,
    /// Turn off the data set's standard training augmentation (crop, flip).
    #[arg(long)]
    pub no_augment: bool,
    /// RandAugment "N,M" (N operations at magnitude M of 30), e.g. 2,9 (DeiT recipe).
    #[arg(long)]
    pub randaugment: Option<String>,
    /// Random Erasing probability (DeiT recipe: 0.25).
    #[arg(long)]
    pub random_erasing: Option<f32>,
    /// Image side for imagefolder (train: random-resized-crop; eval: resize + centre crop) [default: 224]
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Class-index file for imagefolder (one class folder name per line).
    #[arg(long)]
    pub class_index: Option<PathBuf>,
    /// Where to train [default: cpu]
    #[arg(long, value_parser = named::<DeviceKind>())]
    pub device: Option<DeviceKind>,
}

/// Arguments of `sgr train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Settings from a TOML or JSON file in the schema of a run's config.json (any subset of
    /// its fields); flags given on the command line win.
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    pub config: Option<PathBuf>,
    /// Output folder (config.json, metrics.jsonl, model.safetensors, summary.json).
    #[arg(long, conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in DIR from its last checkpoint, with its config.json; only --epochs
    /// (extend or shorten the plan), --device, --max-steps and --workers may be given with it.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Start from trained weights (a run directory, a .safetensors file or hf://owner/repo),
    /// with fresh optimizer state; the initial weights are evaluated first.
    #[arg(long, value_name = "WEIGHTS", conflicts_with = "resume")]
    pub init_from: Option<String>,
    /// With --resume: continue although the data differs from the data the run was trained on
    /// (otherwise an error).
    #[arg(long, requires = "resume")]
    pub allow_data_change: bool,
    /// Stop after N optimisation steps in total (this invocation only).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Data-loading worker threads (0: on the training thread).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Train the modules on N pipeline worker threads, placed by measured step time; the
    /// result is bit-identical to N = 1 (docs/parallel.md).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub pipeline: Option<u16>,
    /// Compute threads of each pipeline worker [default: the cores divided among the workers]
    #[arg(long, value_name = "T", requires = "pipeline", value_parser = clap::value_parser!(u16).range(1..))]
    pub pipeline_threads: Option<u16>,
    /// Run as one rank of a distributed run: `mpirun -np N sgr train --distributed mpi ...`
    /// puts one stage of modules on each of the N processes, bit-identical to one process
    /// (docs/parallel.md; needs a build with `--features mpi`).
    #[arg(long, value_name = "BACKEND", value_parser = ["mpi"], conflicts_with = "pipeline")]
    pub distributed: Option<String>,
    /// Data-parallel copies in a distributed run: the N ranks form R copies of a pipeline
    /// of N/R stages; each copy trains on its share of every batch (--batch-size stays the
    /// whole batch) and the copies average their gradients (docs/parallel.md, "Replicas").
    #[arg(long, value_name = "R", requires = "distributed", value_parser = clap::value_parser!(u16).range(1..))]
    pub replicas: Option<u16>,
    /// Replace the run already in --out (its files are removed before training starts).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Print the resolved run specification and its hash as one JSON line, and exit.
    #[arg(long, conflicts_with = "resume")]
    pub print_spec: bool,
}

/// Flags that may change when resuming.
const RESUMABLE: [&str; 2] = ["--epochs", "--device"];

impl SpecArgs {
    /// Applies the given flags to `spec`; returns the flags applied.
    fn apply(&self, spec: &mut RunSpec) -> Result<Vec<&'static str>> {
        let mut g = self.method.apply(spec)?;
        set(&mut g, "--model", &self.model, &mut spec.model);
        set(&mut g, "--dropout", &self.dropout, &mut spec.dropout);
        set(&mut g, "--drop-path", &self.drop_path, &mut spec.drop_path);
        set(&mut g, "--dataset", &self.dataset, &mut spec.dataset);
        if self.data_dir.is_some() {
            spec.data_dir = self.data_dir.clone();
            g.push("--data-dir");
        }
        let t = &mut spec.trainer;
        set(&mut g, "--epochs", &self.epochs, &mut t.epochs);
        set(
            &mut g,
            "--batch-size",
            &self.batch_size,
            &mut spec.batch_size,
        );
        set(&mut g, "--lr", &self.lr, &mut t.lr);
        let wd = self
            .weight_decay
            .unwrap_or_else(|| t.optimizer.weight_decay());
        if let Some(kind) = self.optimizer {
            t.optimizer = kind.config(wd);
            g.push("--optimizer");
        }
        if self.weight_decay.is_some() {
            t.optimizer.set_weight_decay(wd);
            g.push("--weight-decay");
        }
        if let Some(scope) = self.decay_scope {
            t.optimizer.set_decay_scope(scope);
            g.push("--decay-scope");
        }
        set(
            &mut g,
            "--label-smoothing",
            &self.label_smoothing,
            &mut t.label_smoothing,
        );
        if self.mixup.is_some() || self.cutmix.is_some() {
            t.mix = Some(sgr_core::mix::MixConfig {
                mixup_alpha: self.mixup.unwrap_or(0.0),
                cutmix_alpha: self.cutmix.unwrap_or(0.0),
                ..sgr_core::mix::MixConfig::default()
            });
            g.push("--mixup/--cutmix");
        }
        if self.clip_grad_norm.is_some() {
            t.clip_grad_norm = self.clip_grad_norm;
            g.push("--clip-grad-norm");
        }
        use sgr_core::optim::Schedule;
        let warmup = match (self.warmup_epochs, &t.schedule) {
            (Some(w), _) => w,
            (None, Schedule::Cosine { warmup_epochs }) => *warmup_epochs,
            (None, _) => 0.0,
        };
        match (self.schedule, self.warmup_epochs) {
            (Some(ScheduleKind::Constant), Some(_)) => {
                bail!("--warmup-epochs applies to --schedule cosine, not constant")
            }
            (Some(ScheduleKind::Constant), None) => t.schedule = Schedule::Constant,
            (Some(ScheduleKind::Cosine), _) | (None, Some(_)) => {
                t.schedule = Schedule::Cosine {
                    warmup_epochs: warmup,
                }
            }
            (None, None) => {}
        }
        if self.schedule.is_some() {
            g.push("--schedule");
        }
        if self.warmup_epochs.is_some() {
            g.push("--warmup-epochs");
        }
        set(&mut g, "--seed", &self.seed, &mut spec.seed);
        if self.train_limit.is_some() {
            spec.train_limit = self.train_limit;
            g.push("--train-limit");
        }
        if self.validation.is_some() {
            spec.validation = self.validation;
            g.push("--validation");
        }
        if self.no_augment {
            spec.augment = false;
            g.push("--no-augment");
        }
        if let Some(t) = &self.randaugment {
            let parse = |x: &str| x.trim().parse::<usize>().ok();
            spec.randaugment = match t.split(',').collect::<Vec<_>>().as_slice() {
                [n, m] if parse(n).is_some() && parse(m).is_some_and(|m| m <= 30) => {
                    parse(n).zip(parse(m))
                }
                _ => bail!("--randaugment takes N,M with M <= 30 (e.g. 2,9), got `{t}`"),
            };
            g.push("--randaugment");
        }
        if self.random_erasing.is_some() {
            spec.random_erasing = self.random_erasing;
            g.push("--random-erasing");
        }
        set(
            &mut g,
            "--image-size",
            &self.image_size,
            &mut spec.image_size,
        );
        if self.class_index.is_some() {
            spec.class_index = self.class_index.clone();
            g.push("--class-index");
        }
        set(&mut g, "--device", &self.device, &mut spec.device);
        Ok(g)
    }
}

/// Renders run events: a progress bar per epoch on a terminal, one line per epoch.
struct Printer {
    /// What the evaluations measure: `test`, or `val` (images held out of the training set).
    eval_name: &'static str,
    epochs: usize,
    steps_per_epoch: usize,
    bar: Option<indicatif::ProgressBar>,
    terminal: bool,
    last: Option<EpochMetrics>,
    /// The modules run on the ranks of a distributed run.
    ranks: bool,
}

impl Printer {
    fn on_event(&mut self, e: &Event<'_>) {
        match e {
            Event::Step(m) if self.terminal => {
                let pb = self.bar.get_or_insert_with(|| {
                    let pb = indicatif::ProgressBar::new(self.steps_per_epoch as u64);
                    pb.set_style(
                        indicatif::ProgressStyle::with_template(
                            "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    pb.set_prefix(format!("{}/{}", m.epoch + 1, self.epochs));
                    pb.set_position((m.step % self.steps_per_epoch.max(1)) as u64);
                    pb
                });
                pb.inc(1);
                // Reading the loss is a host sync: only for the bar.
                let loss = m.losses().ok().and_then(|l| l.last().copied());
                pb.set_message(format!(
                    "loss {:.4}  {:.0} img/s",
                    loss.unwrap_or(f64::NAN),
                    m.batch as f64 / m.seconds.max(1e-9)
                ));
            }
            Event::Epoch(m) => {
                if let Some(pb) = self.bar.take() {
                    pb.finish_and_clear();
                }
                self.last = Some((*m).clone());
            }
            Event::Placed {
                pipeline,
                module_seconds,
                replicas,
            } => {
                let workers: Vec<String> = pipeline
                    .stages()
                    .iter()
                    .map(|r| {
                        let s: f64 = module_seconds[r.clone()].iter().sum();
                        let modules = if r.len() == 1 {
                            format!("module {}", r.start)
                        } else {
                            format!("modules {}-{}", r.start, r.end - 1)
                        };
                        format!("{modules} ({:.0} ms/step)", s * 1e3)
                    })
                    .collect();
                if self.ranks && *replicas > 1 {
                    say!(
                        "distributed: {} ranks: {} replicas x {} stage{}: {}",
                        pipeline.workers() * replicas,
                        replicas,
                        pipeline.workers(),
                        if pipeline.workers() == 1 { "" } else { "s" },
                        workers.join(", ")
                    )
                } else if self.ranks {
                    say!(
                        "distributed: {} ranks: {}",
                        pipeline.workers(),
                        workers.join(", ")
                    )
                } else {
                    say!(
                        "pipeline: {} workers x {} thread{}: {}",
                        pipeline.workers(),
                        pipeline.threads(),
                        if pipeline.threads() == 1 { "" } else { "s" },
                        workers.join(", ")
                    )
                }
            }
            Event::Evaluated { epoch: 0, metrics } => {
                say!(
                    "initial weights: {} acc {:.4}",
                    self.eval_name,
                    metrics.accuracy
                )
            }
            Event::Evaluated { epoch, metrics } => {
                let Some(m) = self.last.take() else { return };
                let cos: Vec<String> = m
                    .boundaries
                    .iter()
                    .map(|b| format!("{:.2}", b.cos))
                    .collect();
                say!(
                    "epoch {:>3}/{}  loss {:.4}  train acc {:.4}  {} acc {:.4}  time {:.1}s{}",
                    epoch,
                    self.epochs,
                    m.train_loss,
                    m.train_accuracy,
                    self.eval_name,
                    metrics.accuracy,
                    m.seconds,
                    if cos.is_empty() {
                        String::new()
                    } else {
                        format!("  cos(a,b) [{}]", cos.join(" "))
                    }
                );
            }
            _ => {}
        }
    }
}

/// The transport of `--distributed BACKEND`.
fn connect(backend: &str) -> Result<sgr_run::ranks::SharedTransport> {
    match backend {
        #[cfg(feature = "mpi")]
        "mpi" => Ok(Arc::new(std::sync::Mutex::new(
            crate::mpi::MpiRanks::init()?
        ))),
        #[cfg(not(feature = "mpi"))]
        "mpi" => bail!(
            "--distributed mpi: this sgr was built without MPI; build it with `cargo build \
             --release -p sgr-cli --features mpi` (needs an MPI library, such as Debian's \
             libmpich-dev, and libclang-dev), then start it with `mpirun -np N sgr train \
             --distributed mpi ...`"
        ),
        other => bail!("--distributed {other}: the backend is mpi"),
    }
}

/// Resolves `--init-from` to a weights file.
fn init_weights(reference: &str) -> Result<PathBuf> {
    match crate::hub::HfRef::parse(reference) {
        Some(r) => {
            let r = r?;
            let file = r.file.clone().unwrap_or_else(|| "model.safetensors".into());
            Ok(crate::hub::fetch(&r, &[file.as_str()])?.remove(0))
        }
        None => Ok(sgr_run::run::weights_in(std::path::Path::new(reference))),
    }
}

impl TrainArgs {
    /// Whether the modules run on more than one pipeline worker.
    pub fn pipelined(&self) -> bool {
        self.pipeline.is_some_and(|n| n > 1)
    }
}

/// Runs `sgr train`.
pub fn run(a: TrainArgs) -> Result<()> {
    // Installed first, so that Ctrl-C at any point after start-up is handled; SIGTERM (how
    // docker, systemd, Slurm and Kubernetes stop a job) and SIGHUP save a checkpoint the same
    // way (ctrlc's `termination` feature).
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
    let ranks = match a.distributed.as_deref() {
        Some(backend) => Some(connect(backend)?),
        None => None,
    };
    let lead = ranks
        .as_ref()
        .is_none_or(|t| sgr_run::ranks::rank_of(t) == 0);
    QUIET.store(!lead, Ordering::Relaxed);
    let opts = RunOptions {
        ranks,
        workers: a.workers,
        max_steps: a.max_steps,
        init_from: a.init_from.as_deref().map(init_weights).transpose()?,
        interrupt: Some(Arc::clone(&interrupted)),
        overwrite: a.overwrite,
        meter: Some(Arc::new(sgr_run::counting::CountingMeter)),
        pipeline: a.pipeline.map(usize::from),
        pipeline_threads: a.pipeline_threads.map(usize::from),
        replicas: a.replicas.map(usize::from),
    };
    let mut run = match &a.resume {
        Some(dir) => {
            let given = a.spec.apply(&mut RunSpec::default())?;
            if let Some(f) = given.iter().find(|f| !RESUMABLE.contains(f)) {
                bail!(
                    "{f} cannot be used with --resume: a resumed run keeps its config.json; \
                     only --epochs, --device, --max-steps, --workers and --pipeline may change"
                );
            }
            let changes = ResumeChanges {
                epochs: a.spec.epochs,
                device: a.spec.device,
                allow_data_change: a.allow_data_change,
            };
            match Run::resume(dir, changes, opts)? {
                Resumed::Finished(s) => {
                    say!(
                        "{} has finished its {} epochs ({} accuracy {:.4}); nothing to do. To train longer: sgr train --resume {} --epochs N",
                        dir.display(),
                        s.epochs,
                        if s.validation { "validation" } else { "test" },
                        s.test_accuracy,
                        dir.display()
                    );
                    return Ok(());
                }
                Resumed::Ready(r) => *r,
            }
        }
        None => {
            let mut spec = match &a.config {
                Some(path) => RunSpec::from_file(path)?,
                None => RunSpec::default(),
            };
            a.spec.apply(&mut spec)?;
            let spec = spec.resolved()?;
            if a.print_spec {
                // The specification is the result here: failing to write it is an error.
                let v = serde_json::json!({ "spec_hash": spec.hash()?, "spec": spec });
                crate::out::outln!("{v}");
                return Ok(());
            }
            let out = a.out.clone().unwrap_or_else(|| {
                PathBuf::from("runs").join(format!(
                    "{}-{}-{}-k{}",
                    spec.dataset,
                    spec.model,
                    spec.trainer.method,
                    spec.num_modules()
                ))
            });
            Run::create(spec, out, opts)?
        }
    };
    let spec = run.spec().clone();
    let (ntrain, ntest) = run.sizes();
    let net = run.trainer().network();
    say!(
        "sgr train: {} on {} ({} train / {} {}), method {}, K={} (module ends after blocks {:?}), {} parameters",
        spec.model,
        spec.dataset,
        ntrain,
        ntest,
        if spec.validation.is_some() {
            "validation, held out of the training set"
        } else {
            "test"
        },
        spec.trainer.method,
        spec.num_modules(),
        net.plan().ends(),
        net.num_trainable()
    );
    if let Some(p) = run.resumed_at() {
        say!(
            "resuming {} at epoch {}, step {} of the epoch (global step {})",
            run.dir().path().display(),
            p.epoch + 1,
            p.step_in_epoch,
            p.global_step
        );
    }
    let mut printer = Printer {
        eval_name: if spec.validation.is_some() {
            "val"
        } else {
            "test"
        },
        epochs: spec.trainer.epochs,
        steps_per_epoch: run.batches_per_epoch(),
        bar: None,
        terminal: std::io::IsTerminal::is_terminal(&std::io::stdout()),
        last: None,
        ranks: a.distributed.is_some(),
    };
    let outcome = run.train(&mut |e: &Event<'_>| {
        if lead {
            printer.on_event(e)
        }
    })?;
    let t = run.trainer();
    let out = run.dir().path().display();
    if outcome.stop == Some(Stop::Interrupted) {
        say!(
            "interrupted at epoch {}, step {} of the epoch: checkpoint saved; continue with `sgr train --resume {out}`",
            t.epoch() + 1,
            t.steps_in_epoch(),
        );
        // Closes the run (and MPI) before leaving.
        drop(run);
        std::process::exit(130);
    }
    if let Some(e) = &outcome.stopped_eval {
        say!(
            "stopped after {} steps{}, in epoch {}: test acc {:.4}",
            t.global_step(),
            if outcome.stop == Some(Stop::MaxSteps) {
                " (--max-steps)"
            } else {
                ""
            },
            t.epoch() + 1,
            e.accuracy
        );
    }
    let s = outcome
        .summary
        .context("internal: a finished run has a summary")?;
    let mib = |b: u64| (b / (1024 * 1024)).to_string();
    let peak = if s.rank_peak_memory_bytes.is_empty() {
        format!(
            "peak memory {} MiB",
            s.peak_memory_bytes.map(mib).unwrap_or_else(|| "?".into())
        )
    } else {
        let ranks: Vec<String> = s.rank_peak_memory_bytes.iter().map(|&b| mib(b)).collect();
        format!("peak memory per rank {} MiB", ranks.join(", "))
    };
    say!(
        "done: {} accuracy {:.4} (error {:.2}%), train time {:.1}s, {peak}; saved {}",
        if s.validation { "validation" } else { "test" },
        s.test_accuracy,
        100.0 * s.test_error,
        s.train_seconds,
        run.dir().model().display()
    );
    Ok(())
}
