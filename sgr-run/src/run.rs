//! A training run as a library: create or resume a run directory, train epoch by epoch with an
//! evaluation and a checkpoint after each, stop on a step budget or an interrupt, and write the
//! model and the [`Summary`]. Progress goes to an [`Observer`]; nothing here prints.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;
use sgr_core::checkpoint::{checkpoint_tags, save_snapshot};
use sgr_core::checkpoint::{load_params, load_training_checkpoint, save_params_with_metadata};
use sgr_core::events::{EvalMetrics, Event, Observer};
use sgr_core::network::LocalNetwork;
use sgr_core::objective::{Batch, PixelStats};
use sgr_core::trainer::distributed::Layout;
use sgr_core::trainer::ownership::Snapshot;
use sgr_core::trainer::pipeline::Pipeline;
use sgr_core::trainer::Trainer;
use sgr_data::{Loader, LoaderConfig};
use sgr_models::Input;
use sgr_schema::{EpochRecord, Summary};

use crate::data::{load_data, Data};
use crate::rundir::{RunDir, RunLock};
use crate::spec::{DeviceKind, RunSpec};
use crate::{Error, Result};

/// How one invocation of a run behaves (none of it is part of the [`RunSpec`]).
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Data-loading worker threads (default: [`sgr_data::default_workers`]).
    pub workers: Option<usize>,
    /// Stop after this many optimisation steps in total.
    pub max_steps: Option<usize>,
    /// Start a new run from these weights (a safetensors file), with fresh optimizer state.
    pub init_from: Option<PathBuf>,
    /// Set to stop at the next step boundary with a checkpoint (Ctrl-C).
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Replace a run already in the output folder (its files are removed first).
    pub overwrite: bool,
    /// Counts heap bytes, for measuring a balanced split (`split = "balanced"` without
    /// `split_ends`): the split is measured on the run's data shape and batch size, and its
    /// ends are written to `config.json`.
    pub meter: Option<Arc<dyn crate::memory::MemoryMeter>>,
    /// Run the modules on this many pipeline worker threads (`None` or 1: one after another),
    /// placed by their measured step times; the result is bit-identical (docs/parallel.md).
    pub pipeline: Option<usize>,
    /// Compute threads of each pipeline worker (default: the rayon pool's threads divided
    /// among the workers, at least 1).
    pub pipeline_threads: Option<usize>,
    /// Run as one rank of a distributed run (MPI): the modules are placed on the ranks by
    /// their step times, rank 0 reads the data and writes the run directory, and every rank
    /// ends each epoch with the whole model (docs/parallel.md, "Across processes"). Every
    /// rank must find the data; only rank 0 needs the run directory (on a resume it sends the
    /// configuration and the checkpoint to the others).
    pub ranks: Option<crate::ranks::SharedTransport>,
    /// Data-parallel copies of the modules in a distributed run (`None` or 1: none): the
    /// ranks form `replicas` copies of a pipeline of N / replicas stages, each batch is cut
    /// into one shard per copy, and the copies average their gradients before every update
    /// (docs/parallel.md, "Replicas"). The batch size stays the run's: each copy sees its
    /// share.
    pub replicas: Option<usize>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("workers", &self.workers)
            .field("max_steps", &self.max_steps)
            .field("init_from", &self.init_from)
            .field("interrupt", &self.interrupt)
            .field("overwrite", &self.overwrite)
            .field("meter", &self.meter.is_some())
            .field("pipeline", &self.pipeline)
            .field("pipeline_threads", &self.pipeline_threads)
            .field("ranks", &self.ranks.is_some())
            .field("replicas", &self.replicas)
            .finish()
    }
}

/// What [`Run::resume`] changes in the stored specification.
#[derive(Debug, Clone, Default)]
pub struct ResumeChanges {
    /// Plan this many epochs in total (extend, or shorten to no fewer than are done).
    pub epochs: Option<usize>,
    /// Continue on another device.
    pub device: Option<DeviceKind>,
    /// Continue although the data differs from the data the checkpoint was trained on.
    pub allow_data_change: bool,
}

/// Why a run stopped before its last epoch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The step budget ([`RunOptions::max_steps`]) was reached.
    MaxSteps,
    /// [`RunOptions::interrupt`] was set; a checkpoint was saved.
    Interrupted,
}

/// How [`Run::train`] ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Why it stopped early, if it did.
    pub stop: Option<Stop>,
    /// The summary written (none when interrupted).
    pub summary: Option<Summary>,
    /// The final evaluation when it was run after a mid-epoch stop.
    pub stopped_eval: Option<EvalMetrics>,
}

/// Where a resumed run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Steps taken in the current epoch.
    pub step_in_epoch: usize,
    /// Global step.
    pub global_step: usize,
}

/// What [`Run::resume`] found.
#[derive(Debug)]
pub enum Resumed {
    /// The run continues.
    Ready(Box<Run>),
    /// The run had finished its planned epochs: nothing was changed.
    Finished(Box<Summary>),
}

/// Images per evaluation batch.
const EVAL_BATCH: usize = 256;

/// A run: its specification, directory, data, trainer and history.
#[derive(Debug)]
pub struct Run {
    spec: RunSpec,
    dir: RunDir,
    data: Data,
    trainer: Trainer,
    train_loader: Loader,
    test_loader: Loader,
    records: Vec<EpochRecord>,
    opts: RunOptions,
    resumed_at: Option<Position>,
    initial_eval: Option<EvalMetrics>,
    /// What the checkpoints record about the run (`crate::identity`).
    tags: std::collections::BTreeMap<String, String>,
    /// The stages and copies the ranks run, once placed (distributed runs).
    layout: Option<Layout>,
    _lock: Option<RunLock>,
}

/// Builds the model a specification names, for data of the given shape normalised with
/// `pixels` (`None` for inputs that are not images, such as the random batches of
/// `crate::memory`).
pub fn build_network(
    spec: &RunSpec,
    input: Input,
    pixels: Option<&PixelStats>,
    device: &candle_core::Device,
) -> Result<LocalNetwork> {
    let opts = sgr_models::ModelOptions {
        pixels: pixels.cloned(),
        ..spec.model_options()
    };
    Ok(sgr_models::zoo::build(
        &spec.model,
        input,
        &opts,
        device,
        DType::F32,
    )?)
}

/// The test split's loader of a specification's data (evaluation transforms, in order).
pub fn test_loader(
    data: &Data,
    batch: usize,
    workers: usize,
    dev: &candle_core::Device,
) -> Result<Loader> {
    Ok(Loader::new(
        Arc::clone(&data.test),
        LoaderConfig {
            workers,
            ..LoaderConfig::eval(batch)
        },
        data.test_pipeline.clone(),
        dev,
    )?)
}

impl Run {
    /// A new run of `spec` in `dir` (created if missing).
    pub fn create(spec: RunSpec, dir: impl Into<PathBuf>, opts: RunOptions) -> Result<Self> {
        let spec = spec.resolved()?;
        let dir = RunDir::new(dir);
        let mut run = Self::open(spec, dir, opts)?;
        run.check_ranks_agree()?;
        if let Some(w) = run.opts.init_from.clone() {
            load_params(&w, &run.trainer.network().params())?;
            run.initial_eval = Some(run.evaluate()?);
        }
        if !run.leads() {
            return Ok(run);
        }
        let mut lock = run.dir.lock(false)?;
        if run.dir.holds_run() {
            // A run that never reached its first checkpoint is replaced without --overwrite:
            // there is nothing of it to keep, and it cannot be resumed.
            if !run.opts.overwrite && !run.dir.unstarted() {
                let file = run
                    .dir
                    .run_files()
                    .iter()
                    .find(|p| p.exists())
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                return Err(Error::HoldsRun {
                    dir: run.dir.path().to_path_buf(),
                    file,
                });
            }
            run.dir.clear()?;
        }
        lock.claim()?;
        run._lock = Some(lock);
        run.dir.write_spec(&run.spec)?;
        run.dir.write_records(&[])?;
        Ok(run)
    }

    /// Continues the run in `dir` from its last checkpoint. A run that has finished its planned
    /// epochs (and is not extended by `changes`) is left untouched.
    pub fn resume(
        dir: impl Into<PathBuf>,
        changes: ResumeChanges,
        opts: RunOptions,
    ) -> Result<Resumed> {
        let dir = RunDir::new(dir);
        let leads = crate::ranks::rank(&opts) == 0;
        // Held from here: nothing below runs while another process trains the run (in a
        // distributed run, rank 0 holds it for all).
        let mut lock = if leads { Some(dir.lock(false)?) } else { None };
        // Rank 0 reads the run's files and sends the configuration to the other ranks, which so
        // need not see the run directory (hosts without a shared file system).
        let (mut spec, checkpoint) = match &opts.ranks {
            Some(t) => crate::ranks::spec_from_rank0(t, leads.then(|| read_run_files(&dir)))?,
            None => {
                let (spec, checkpoint) = read_run_files(&dir)?;
                (spec, Some(checkpoint))
            }
        };
        if let Some(d) = changes.device {
            spec.device = d;
        }
        let mut run = Self::open(spec, dir, opts)?;
        run.check_ranks_agree()?;
        // Only rank 0 loads the checkpoint. The other ranks get its position now and their
        // modules' state when the modules are placed (`Trainer::distribute`), so none holds the
        // whole checkpoint.
        let loaded = match &checkpoint {
            Some(path) => checkpoint_tags(path)
                .map_err(Error::from)
                .and_then(|recorded| {
                    crate::identity::check(
                        &recorded,
                        &run.tags,
                        run.dir.path(),
                        changes.allow_data_change,
                    )
                })
                .and_then(|()| Ok(load_training_checkpoint(path, &mut run.trainer)?)),
            None => Ok(()),
        };
        match &run.opts.ranks {
            Some(t) => crate::ranks::position_from_rank0(t, &mut run.trainer, loaded)?,
            None => loaded?,
        }
        let t = &run.trainer;
        let pos = Position {
            epoch: t.epoch(),
            step_in_epoch: t.steps_in_epoch(),
            global_step: t.global_step(),
        };
        let planned = run.spec.trainer.epochs;
        let wanted = changes.epochs.unwrap_or(planned);
        let finished = pos.epoch >= planned && pos.step_in_epoch == 0;
        if wanted != planned {
            // Fewer epochs than are done is an error, before anything is written.
            run.trainer.set_planned_epochs(wanted)?;
        }
        if finished && wanted <= planned {
            let summary = if leads {
                run.dir.read_summary().ok()
            } else {
                None
            };
            // Rank 0's answer on every rank, so that all stop or all train.
            let summary = match &run.opts.ranks {
                Some(t) => crate::ranks::summary_from_rank0(t, summary)?,
                None => summary,
            };
            if let Some(s) = summary {
                return Ok(Resumed::Finished(Box::new(s)));
            }
        }
        if wanted != planned {
            run.spec.trainer.epochs = wanted;
        }
        if let Some(mut lock) = lock.take() {
            run.records = run.dir.read_records(Some(pos.epoch))?;
            lock.claim()?;
            run._lock = Some(lock);
            if wanted != planned {
                run.dir.write_spec(&run.spec)?;
            }
            run.dir.write_records(&run.records)?;
        }
        run.resumed_at = Some(pos);
        Ok(Resumed::Ready(Box::new(run)))
    }

    fn open(mut spec: RunSpec, dir: RunDir, opts: RunOptions) -> Result<Self> {
        let device = spec.device.device()?;
        let workers = crate::spec::check_workers(opts.workers)?;
        let data = load_data(&spec)?;
        if let Some(meter) = &opts.meter {
            let plan = crate::budget::Plan {
                batch: spec.batch_size,
                eval_batch: EVAL_BATCH,
                eval_batch_flag: None,
                in_flight: 2 * workers + 2,
                size_flag: matches!(spec.dataset, crate::Dataset::Imagefolder)
                    .then_some("--image-size"),
                limit: None,
            };
            crate::budget::check_fits(&spec, data.input(), plan, Arc::clone(meter), &device)?;
        }
        if spec.split == sgr_models::SplitStrategy::Balanced && spec.split_ends.is_none() {
            let meter = opts.meter.clone().ok_or_else(|| {
                Error::Spec(
                    "--split balanced is measured with a memory meter: pass \
                     RunOptions::meter (the sgr binary does), or give split_ends"
                        .into(),
                )
            })?;
            spec =
                crate::memory::balanced_spec(&spec, data.input(), spec.batch_size, meter, &device)?
                    .0;
        }
        let train_loader = Loader::new(
            Arc::clone(&data.train),
            LoaderConfig {
                workers,
                ..LoaderConfig::train(spec.batch_size, spec.seed)
            },
            data.train_pipeline.clone(),
            &device,
        )?;
        let test_loader = test_loader(&data, EVAL_BATCH, workers, &device)?;
        let mut tcfg = spec.trainer.clone();
        tcfg.steps_per_epoch = train_loader.batches_per_epoch();
        let net = build_network(&spec, data.input(), Some(&data.pixels), &device)?;
        let trainer = Trainer::new(net, tcfg)?;
        let tags = crate::identity::tags(&spec, &data)?;
        Ok(Self {
            spec,
            dir,
            data,
            trainer,
            train_loader,
            test_loader,
            records: Vec::new(),
            opts,
            resumed_at: None,
            initial_eval: None,
            tags,
            layout: None,
            _lock: None,
        })
    }

    /// The specification (as written to `config.json`).
    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    /// The run directory.
    pub fn dir(&self) -> &RunDir {
        &self.dir
    }

    /// The trainer (network, optimizers, position). On a rank of a distributed run that has
    /// started training, it holds only the rank's own modules (`Trainer::holds_module`).
    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// Training and test sample counts.
    pub fn sizes(&self) -> (usize, usize) {
        (self.data.train.len(), self.data.test.len())
    }

    /// Steps per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.train_loader.batches_per_epoch()
    }

    /// Where a resumed run continued from.
    pub fn resumed_at(&self) -> Option<Position> {
        self.resumed_at
    }

    /// The evaluation of the initial weights, for a run started with
    /// [`RunOptions::init_from`].
    pub fn initial_eval(&self) -> Option<&EvalMetrics> {
        self.initial_eval.as_ref()
    }

    /// Whether Ctrl-C (or SIGTERM) asked to stop; in a distributed run, rank 0's answer on
    /// every rank, so that all stop at the same step.
    fn interrupted(&self) -> Result<bool> {
        let mine = self
            .opts
            .interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst));
        match &self.opts.ranks {
            None => Ok(mine),
            Some(t) => crate::ranks::from_rank0(t, mine),
        }
    }

    /// The test split's evaluation; in a distributed run, pipelined through the ranks' stages
    /// (rank 0 reads the batches), with the one-process numbers on every rank.
    fn evaluate(&self) -> Result<EvalMetrics> {
        match (&self.opts.ranks, &self.layout) {
            (None, _) => Ok(self.trainer.evaluate(self.test_loader.epoch(0))?),
            (Some(t), Some(layout)) => {
                let mut batches = self
                    .leads()
                    .then(|| self.test_loader.epoch(0))
                    .into_iter()
                    .flatten()
                    .map(|b| b.map_err(|e| sgr_core::Error::Data(e.into())));
                let mut t = crate::ranks::lock(t);
                Ok(self.trainer.evaluate_on(&mut *t, layout, &mut batches)?)
            }
            // Before the modules are placed (the evaluation of `init_from`'s weights in
            // `create`), every rank holds the whole model.
            (Some(t), None) => crate::ranks::evaluate_on_ranks(
                t,
                self.trainer.network(),
                self.test_loader.epoch(0),
            ),
        }
    }

    /// Whether this process writes the run directory: rank 0 of a distributed run, or the
    /// only process.
    fn leads(&self) -> bool {
        crate::ranks::rank(&self.opts) == 0
    }

    /// In a distributed run, every rank must run the same binary on the same configuration and
    /// data: each is compared with rank 0's, and a difference is an error on every rank that
    /// names the ranks.
    fn check_ranks_agree(&self) -> Result<()> {
        let Some(t) = &self.opts.ranks else {
            if self.opts.replicas.is_some_and(|r| r > 1) {
                return Err(Error::Spec(
                    "--replicas makes copies on the ranks of a distributed run: add \
                     --distributed mpi (RunOptions::ranks), or drop --replicas"
                        .into(),
                ));
            }
            return Ok(());
        };
        if self.opts.pipeline.is_some_and(|n| n > 1) {
            return Err(Error::Spec(
                "--pipeline and --distributed both place modules: a distributed run puts one \
                 stage on each rank; drop --pipeline"
                    .into(),
            ));
        }
        let what = format!(
            "sgr {} with configuration {} on data {}",
            env!("CARGO_PKG_VERSION"),
            self.tags.get("sgr.spec_key").map_or("?", String::as_str),
            self.tags.get("sgr.data").map_or("?", String::as_str),
        );
        let mut t = crate::ranks::lock(t);
        sgr_core::trainer::distributed::check_same(
            &mut *t,
            "version, configuration and data",
            &what,
        )?;
        Ok(())
    }

    /// Places the modules on the ranks by their step times, measured by rank 0 on the next
    /// training batch (with the trainer left unchanged) and sent to all: N / R stages, in R
    /// copies. Rank 0 measures with every module, which every rank holds until here; then
    /// each rank keeps only its own stage's.
    fn place_on_ranks(
        &mut self,
        epoch: usize,
        from: usize,
        observer: &mut dyn Observer,
    ) -> Result<Layout> {
        let t = self.opts.ranks.clone().expect("a distributed run");
        let size = crate::ranks::lock(&t).size();
        let replicas = self.opts.replicas.unwrap_or(1);
        if replicas == 0 || !size.is_multiple_of(replicas) {
            return Err(Error::Spec(format!(
                "--replicas {replicas} does not divide the {size} ranks: start a multiple of \
                 {} ranks (replicas × stages), or change --replicas",
                replicas.max(1)
            )));
        }
        if self.spec.batch_size < replicas {
            return Err(Error::Spec(format!(
                "--batch-size {} is smaller than --replicas {replicas}: each copy takes a share \
                 of every batch; raise --batch-size or lower --replicas",
                self.spec.batch_size
            )));
        }
        let n = size / replicas;
        let k = self.trainer.network().num_modules();
        if n > k {
            return Err(Error::Spec(format!(
                "{n} ranks per replica over K={k} modules: each rank owns at least one module; \
                 start at most {} ranks, or cut the network into more modules (-k)",
                k * replicas
            )));
        }
        let seconds = if self.leads() {
            match self.train_loader.epoch_from(epoch, from).next() {
                Some(b) => {
                    let batch: Batch = b?.into();
                    let p = self.trainer.profile_modules(&batch, 2)?;
                    p.iter().map(|p| p.seconds).collect()
                }
                None => vec![1.0; k],
            }
        } else {
            Vec::new()
        };
        let seconds = crate::ranks::seconds_from_rank0(&t, &seconds, k)?;
        let stages = Pipeline::balanced(&seconds, n, rayon::current_num_threads().max(1))?;
        if self.leads() {
            observer.on_event(&Event::Placed {
                pipeline: &stages,
                module_seconds: &seconds,
                replicas,
            });
        }
        let layout = Layout::new(stages, replicas)?;
        // Every rank frees the modules it does not own, and their memory goes back to the
        // system. A resumed run's state is rank 0's alone, so rank 0 first sends each module's
        // to its ranks; a new run's ranks built the same network from the same seed (and read
        // the same `init_from` weights), so each already holds rank 0's state.
        if self.resumed_at.is_some() {
            self.trainer
                .distribute(&mut *crate::ranks::lock(&t), &layout)?;
        } else {
            self.trainer
                .keep_stage(&layout, crate::ranks::rank(&self.opts))?;
        }
        sgr_core::memory::release_free_memory();
        Ok(layout)
    }

    /// Trains the remaining epochs, evaluating and checkpointing after each, then writes the
    /// model and the summary. Emits the trainer's events and [`Event::Evaluated`].
    pub fn train(&mut self, observer: &mut dyn Observer) -> Result<Outcome> {
        let start = Instant::now();
        let mut stop = None;
        let mut last_eval: Option<EvalMetrics> = None;
        if let Some(e) = &self.initial_eval {
            observer.on_event(&Event::Evaluated {
                epoch: 0,
                metrics: e,
            });
        }
        // A distributed run places its modules first, so that from here on every rank holds
        // only its own and the evaluations and checkpoints below all take the distributed path.
        if self.opts.ranks.is_some() && self.layout.is_none() {
            let (epoch, from) = (self.trainer.epoch(), self.trainer.steps_in_epoch());
            self.layout = Some(self.place_on_ranks(epoch, from, observer)?);
        }
        'epochs: for epoch in self.trainer.epoch()..self.spec.trainer.epochs {
            let from = self.trainer.steps_in_epoch();
            let budget = match self.opts.max_steps {
                Some(m) if self.trainer.global_step() >= m => {
                    stop = Some(Stop::MaxSteps);
                    break 'epochs;
                }
                Some(m) => m - self.trainer.global_step(),
                None => usize::MAX,
            };
            if self.opts.pipeline.is_some_and(|n| n > 1) && self.trainer.pipeline().is_none() {
                self.place_modules(epoch, from, observer)?;
            }
            let interrupt = self.opts.interrupt.clone();
            let mut data_error = None;
            let leads = self.leads();
            let drained = {
                // In a distributed run only rank 0 reads the data.
                let mut source = leads
                    .then(|| self.train_loader.epoch_from(epoch, from).take(budget))
                    .into_iter()
                    .flatten()
                    .map(|b| match b {
                        Ok(b) => Ok(Batch::from(b)),
                        Err(e) => {
                            data_error = Some(e);
                            Err(sgr_core::Error::Data("the training data failed".into()))
                        }
                    });
                let mut on_step = |m: &sgr_core::events::StepMetrics| {
                    observer.on_event(&Event::Step(m));
                    if interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                };
                match (&self.opts.ranks, &self.layout) {
                    (Some(t), Some(layout)) => {
                        let mut t = crate::ranks::lock(t);
                        let r = self.trainer.train_batches_on(
                            &mut *t,
                            layout,
                            &mut source,
                            &mut on_step,
                        );
                        // Every rank gets rank 0's position, also when the data failed (its
                        // steps are saved below); other errors end the run as they are.
                        match &r {
                            Ok(_) | Err(sgr_core::Error::Data(_)) => {
                                self.trainer.share_state(&mut *t, layout)?
                            }
                            Err(_) => {}
                        }
                        r
                    }
                    _ => self.trainer.train_batches(&mut source, &mut on_step),
                }
            };
            let drained = match (drained, data_error) {
                (Err(_), Some(e)) => {
                    // As on Ctrl-C: the steps before the bad batch are kept.
                    self.save_checkpoint()?;
                    return Err(Error::DataMidRun {
                        problem: e,
                        dir: self.dir.path().to_path_buf(),
                        step: self.trainer.global_step(),
                    });
                }
                // The other ranks of a distributed run take part in rank 0's checkpoint.
                (Err(e @ sgr_core::Error::Data(_)), None) if self.opts.ranks.is_some() => {
                    self.save_checkpoint()?;
                    return Err(e.into());
                }
                (r, _) => r?,
            };
            if drained.stopped {
                stop = Some(Stop::Interrupted);
                break 'epochs;
            }
            if self.trainer.steps_in_epoch() < self.batches_per_epoch() {
                // The step budget ended inside the epoch.
                stop = Some(Stop::MaxSteps);
                break 'epochs;
            }
            let m = self.trainer.finish_epoch(observer)?;
            self.check_finite(epoch + 1)?;
            let eval = self.evaluate()?;
            if !eval.loss.is_finite() {
                return Err(Error::Diverged(format!(
                    "the test loss after epoch {} is {}: the run diverged; the last good \
                     checkpoint is the one before this epoch",
                    epoch + 1,
                    eval.loss
                )));
            }
            observer.on_event(&Event::Evaluated {
                epoch: epoch + 1,
                metrics: &eval,
            });
            self.records.push(EpochRecord {
                train: m,
                test_loss: eval.loss,
                test_accuracy: eval.accuracy,
                test_top5: eval.top5,
                elapsed_seconds: start.elapsed().as_secs_f64(),
            });
            if self.leads() {
                self.dir.write_records(&self.records)?;
            }
            self.save_checkpoint()?;
            last_eval = Some(eval);
            if self.interrupted()? {
                stop = Some(Stop::Interrupted);
                break;
            }
        }
        if stop.is_some() {
            self.check_finite(self.trainer.epoch())?;
        }
        // In a distributed run rank 0 holds the whole model only while it writes it.
        if let Some(snapshot) = self.snapshot()? {
            if stop.is_some() {
                save_snapshot(&self.dir.checkpoint(), &snapshot, &self.tags)?;
            }
            // With the preprocessing, so that the model evaluates on a test split alone.
            let preprocess = crate::preprocess::Preprocess::of(&self.data).to_metadata();
            save_params_with_metadata(&self.dir.model(), &snapshot.params, &preprocess)?;
        }
        if stop == Some(Stop::Interrupted) {
            return Ok(Outcome {
                stop,
                summary: None,
                stopped_eval: None,
            });
        }
        let mid_epoch = self.trainer.steps_in_epoch() > 0 || last_eval.is_none();
        let (eval, stopped_eval) = match last_eval {
            Some(e) if !mid_epoch => (e, None),
            _ => {
                let e = self.evaluate()?;
                (e.clone(), Some(e))
            }
        };
        let summary = self.summary(&eval)?;
        if self.leads() {
            self.dir.write_summary(&self.spec, &summary)?;
        }
        Ok(Outcome {
            stop,
            summary: Some(summary),
            stopped_eval,
        })
    }

    /// Saves the training checkpoint (rank 0 only in a distributed run; every rank calls it).
    fn save_checkpoint(&self) -> Result<()> {
        if let Some(snapshot) = self.snapshot()? {
            save_snapshot(&self.dir.checkpoint(), &snapshot, &self.tags)?;
        }
        Ok(())
    }

    /// The whole training state on the process that writes the run directory (`None` on the
    /// other ranks). Once a distributed run has placed its modules, every rank calls it and
    /// rank 0 gathers the other ranks' modules (`Trainer::gather`).
    fn snapshot(&self) -> Result<Option<Snapshot>> {
        match (&self.opts.ranks, &self.layout) {
            (Some(t), Some(layout)) => {
                Ok(self.trainer.gather(&mut *crate::ranks::lock(t), layout)?)
            }
            _ if self.leads() => Ok(Some(self.trainer.snapshot()?)),
            _ => Ok(None),
        }
    }

    /// Places the modules on `RunOptions::pipeline` workers by their step times, measured on
    /// the next training batch with the trainer left unchanged, and reports the layout.
    fn place_modules(
        &mut self,
        epoch: usize,
        from: usize,
        observer: &mut dyn Observer,
    ) -> Result<()> {
        let workers = self.opts.pipeline.unwrap_or(1);
        let k = self.trainer.network().num_modules();
        if workers > k {
            return Err(Error::Spec(format!(
                "--pipeline {workers}: the network has K={k} modules and each worker owns at \
                 least one; use --pipeline 2..={k}, or cut the network into more modules (-k)"
            )));
        }
        let threads = self
            .opts
            .pipeline_threads
            .unwrap_or_else(|| (rayon::current_num_threads() / workers).max(1));
        let batch: Batch = match self.train_loader.epoch_from(epoch, from).next() {
            Some(b) => b?.into(),
            None => return Ok(()),
        };
        let seconds: Vec<f64> = self
            .trainer
            .profile_modules(&batch, 2)?
            .iter()
            .map(|p| p.seconds)
            .collect();
        let pipeline = Pipeline::balanced(&seconds, workers, threads)?;
        // The measuring steps' memory stays with this thread's arena otherwise.
        sgr_core::memory::release_free_memory();
        self.trainer.set_pipeline(Some(pipeline.clone()))?;
        observer.on_event(&Event::Placed {
            pipeline: &pipeline,
            module_seconds: &seconds,
            replicas: 1,
        });
        Ok(())
    }

    /// Every weight and buffer is finite; the error names the first tensor that is not, its
    /// module and the step.
    /// In a distributed run each rank checks its own modules and all get the same verdict.
    fn check_finite(&self, epochs_done: usize) -> Result<()> {
        let first = match (&self.opts.ranks, &self.layout) {
            (Some(t), Some(layout)) => self
                .trainer
                .first_non_finite_on(&mut *crate::ranks::lock(t), layout)?,
            _ => self.trainer.first_non_finite()?,
        };
        match first {
            Some((tensor, k)) => Err(Error::Diverged(format!(
                "`{tensor}` of module {} is not finite after epoch {epochs_done} (step {}): the \
                 run diverged; nothing was saved, the last checkpoint in {} is the last good \
                 state (try a smaller --lr or --sgr-lambda)",
                k + 1,
                self.trainer.global_step(),
                self.dir.path().display()
            ))),
            None => Ok(()),
        }
    }

    fn summary(&self, eval: &EvalMetrics) -> Result<Summary> {
        let state = self.trainer.state()?;
        let train_seconds = self.records.iter().map(|r| r.train.seconds).sum::<f64>()
            + state.epoch_progress.seconds();
        let (train_samples, test_samples) = self.sizes();
        Ok(Summary {
            method: self.spec.trainer.method.to_string(),
            model: self.spec.model.clone(),
            dataset: self.spec.dataset.to_string(),
            modules: self.spec.num_modules(),
            epochs: self.trainer.epoch(),
            steps: self.trainer.global_step(),
            train_samples,
            test_samples,
            test_accuracy: eval.accuracy,
            test_error: 1.0 - eval.accuracy,
            test_top5: eval.top5,
            train_seconds,
            peak_memory_bytes: sgr_core::memory::peak_rss_bytes(),
            rank_peak_memory_bytes: match &self.opts.ranks {
                Some(t) => crate::ranks::gather_to_rank0(
                    t,
                    sgr_core::memory::peak_rss_bytes().unwrap_or(0),
                )?,
                None => Vec::new(),
            },
            final_boundary_cos: self
                .records
                .last()
                .map(|r| r.train.boundaries.iter().map(|b| b.cos).collect())
                .unwrap_or_default(),
            initial_test_accuracy: self.initial_eval.as_ref().map(|e| e.accuracy),
            spec_hash: self.spec.hash()?,
            validation: self.data.validation,
        })
    }
}

/// A stopped run's specification and checkpoint file, or why it cannot be resumed.
pub(crate) fn read_run_files(dir: &RunDir) -> Result<(RunSpec, PathBuf)> {
    let spec = dir.read_spec()?;
    if dir.unstarted() {
        let d = dir.path().display();
        return Err(Error::File {
            path: dir.path().to_path_buf(),
            problem: format!(
                "this run stopped before its first checkpoint, so there is nothing to resume; \
                 start it anew from its configuration, which replaces it: sgr train --config \
                 {d}/config.json --out {d}"
            ),
        });
    }
    Ok((spec, dir.checkpoint()))
}

/// The weights file of a run directory, or `path` itself when it is a file.
pub fn weights_in(path: &Path) -> PathBuf {
    if path.is_dir() {
        RunDir::new(path).model()
    } else {
        path.to_path_buf()
    }
}
