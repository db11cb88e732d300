//! A distributed run (`RunOptions::ranks`), here with its ranks on threads of one process:
//! rank 0 writes the run directory, and the model, the records and the checkpoint are those of
//! the run in one process, bit for bit, also when the run is stopped and resumed on the ranks.

use std::path::Path;
use std::sync::{Arc, Mutex};

use sgr_core::events::Event;
use sgr_core::trainer::distributed::local_ranks;
use sgr_run::ranks::SharedTransport;
use sgr_run::{ResumeChanges, Resumed, Run, RunOptions, RunSpec};

fn spec() -> RunSpec {
    let mut s = RunSpec {
        model: "resnet8".into(),
        modules: Some(3),
        train_limit: Some(96),
        batch_size: 32,
        ..RunSpec::default()
    };
    s.trainer.epochs = 2;
    s.trainer.method = "greedy+sgr".parse().unwrap();
    s
}

fn opts(ranks: Option<SharedTransport>, max_steps: Option<usize>) -> RunOptions {
    RunOptions {
        workers: Some(0),
        max_steps,
        ranks,
        ..RunOptions::default()
    }
}

/// Runs `work` on `n` ranks, one thread each.
fn on_ranks(n: usize, work: impl Fn(RunOptions) + Sync, max_steps: Option<usize>) {
    on_replicas(n, 1, work, max_steps)
}

/// Runs `work` on `n` ranks in `replicas` copies, one thread each.
fn on_replicas(
    n: usize,
    replicas: usize,
    work: impl Fn(RunOptions) + Sync,
    max_steps: Option<usize>,
) {
    std::thread::scope(|s| {
        let hs: Vec<_> = local_ranks(n)
            .into_iter()
            .map(|t| {
                let t: SharedTransport = Arc::new(Mutex::new(t));
                let work = &work;
                s.spawn(move || {
                    work(RunOptions {
                        replicas: Some(replicas),
                        ..opts(Some(t), max_steps)
                    })
                })
            })
            .collect();
        for h in hs {
            h.join().expect("rank");
        }
    });
}

fn train_new(dir: &Path, o: RunOptions) {
    let mut run = Run::create(spec(), dir, o).unwrap();
    run.train(&mut |_: &Event<'_>| {}).unwrap();
}

fn resume(dir: &Path, o: RunOptions) {
    match Run::resume(dir, ResumeChanges::default(), o).unwrap() {
        Resumed::Ready(mut run) => {
            run.train(&mut |_: &Event<'_>| {}).unwrap();
        }
        Resumed::Finished(_) => panic!("finished"),
    }
}

fn read(dir: &Path, f: &str) -> Vec<u8> {
    std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()))
}

/// The records without their times.
fn losses(dir: &Path) -> Vec<String> {
    String::from_utf8(read(dir, "metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("elapsed_seconds");
            o.remove("seconds");
            v.to_string()
        })
        .collect()
}

#[test]
fn a_run_on_ranks_writes_the_one_process_run_bit_for_bit() {
    let root = tempfile::tempdir().unwrap();
    let alone = root.path().join("alone");
    train_new(&alone, opts(None, None));
    for n in [2, 3] {
        let dir = root.path().join(format!("ranks{n}"));
        on_ranks(n, |o| train_new(&dir, o), None);
        assert!(
            read(&dir, "model.safetensors") == read(&alone, "model.safetensors"),
            "{n} ranks"
        );
        assert_eq!(losses(&dir), losses(&alone), "{n} ranks");
    }
    // Stopped after 4 steps (mid-epoch), then resumed, on 2 ranks.
    let dir = root.path().join("stopped");
    on_ranks(2, |o| train_new(&dir, o), Some(4));
    on_ranks(2, |o| resume(&dir, o), None);
    assert!(read(&dir, "model.safetensors") == read(&alone, "model.safetensors"));
    assert_eq!(losses(&dir), losses(&alone));
    // Without a shared file system: the other ranks see no run directory at all (nor write
    // one); rank 0 sends them the configuration and the checkpoint.
    let dir = root.path().join("hosts");
    let elsewhere = root.path().join("not-here");
    let on_host = |o: &RunOptions| {
        if sgr_run::ranks::rank_of(o.ranks.as_ref().unwrap()) == 0 {
            dir.clone()
        } else {
            elsewhere.clone()
        }
    };
    on_ranks(2, |o| train_new(&on_host(&o), o), Some(4));
    on_ranks(2, |o| resume(&on_host(&o), o), None);
    assert!(read(&dir, "model.safetensors") == read(&alone, "model.safetensors"));
    assert!(!elsewhere.exists(), "a rank but 0 wrote a run directory");
    // A finished run is finished on every rank.
    on_ranks(
        2,
        |o| {
            let r = Run::resume(on_host(&o), ResumeChanges::default(), o).unwrap();
            assert!(matches!(r, Resumed::Finished(_)));
        },
        None,
    );
}

/// Replicas keep every copy's weights, optimizer state and batch-norm statistics equal after
/// every step, so a replicated run stopped mid-epoch and resumed writes the uninterrupted
/// replicated run's model bit for bit; and it trains the one-process run's model up to the
/// shards' batch statistics.
#[test]
fn a_replicated_run_resumes_bit_for_bit() {
    let root = tempfile::tempdir().unwrap();
    let whole = root.path().join("whole");
    on_replicas(2, 2, |o| train_new(&whole, o), None);
    let dir = root.path().join("stopped");
    on_replicas(2, 2, |o| train_new(&dir, o), Some(4));
    on_replicas(2, 2, |o| resume(&dir, o), None);
    assert!(read(&dir, "model.safetensors") == read(&whole, "model.safetensors"));
    assert_eq!(losses(&dir), losses(&whole));
    // Against one process: the same epochs and examples, losses within what batch norm on
    // half the batch moves.
    let alone = root.path().join("alone");
    train_new(&alone, opts(None, None));
    let loss = |d: &Path| -> Vec<f64> {
        losses(d)
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let (a, b) = (loss(&whole), loss(&alone));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() < 0.1 * y,
            "replicated {a:?}, one process {b:?}"
        );
    }
}

/// A replica count that does not divide the ranks is refused on every rank, before any step.
#[test]
fn replicas_that_do_not_divide_the_ranks_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    let errors = Mutex::new(Vec::new());
    on_replicas(
        3,
        2,
        |o| {
            let mut run = Run::create(spec(), &dir, o).unwrap();
            let e = run.train(&mut |_: &Event<'_>| {}).unwrap_err().to_string();
            errors.lock().unwrap().push(e);
        },
        None,
    );
    for e in errors.into_inner().unwrap() {
        assert!(
            e.contains("--replicas 2 does not divide the 3 ranks"),
            "{e}"
        );
    }
}

/// Bytes module `k` holds on a trainer: its weights and buffers, and its optimizer state.
fn module_bytes(t: &sgr_core::trainer::Trainer, k: usize) -> usize {
    let size = |v: &candle_core::Tensor| v.elem_count() * v.dtype().size_in_bytes();
    let params: usize = t
        .network()
        .module_params(k)
        .iter()
        .map(|p| size(p.var.as_tensor()))
        .sum();
    let state: usize = t.optimizers()[k].state().unwrap().values().map(size).sum();
    params + state
}

/// After a run on ranks, each rank holds the weights, buffers and optimizer state of one
/// contiguous range of modules, its stage, and nothing of the others: the ranks' stages cover
/// the modules once, and each rank's bytes are its modules' share of the one-process run's.
#[test]
fn each_rank_of_a_run_holds_only_its_own_modules() {
    let root = tempfile::tempdir().unwrap();
    let alone_dir = root.path().join("alone");
    let mut alone = Run::create(spec(), &alone_dir, opts(None, None)).unwrap();
    alone.train(&mut |_: &Event<'_>| {}).unwrap();
    let k = alone.trainer().network().num_modules();
    let per_module: Vec<usize> = (0..k).map(|m| module_bytes(alone.trainer(), m)).collect();
    for n in [2, 3] {
        // A new run, and one stopped after 4 steps and resumed (where rank 0 alone loads the
        // checkpoint and sends each module's state to its rank).
        for resumed in [false, true] {
            let dir = root.path().join(format!("ranks{n}-{resumed}"));
            if resumed {
                on_ranks(n, |o| train_new(&dir, o), Some(4));
            }
            let held = Mutex::new(Vec::new());
            on_ranks(
                n,
                |o| {
                    let rank = sgr_run::ranks::rank_of(o.ranks.as_ref().unwrap());
                    let mut run = if resumed {
                        match Run::resume(&dir, ResumeChanges::default(), o).unwrap() {
                            Resumed::Ready(run) => *run,
                            Resumed::Finished(_) => panic!("finished"),
                        }
                    } else {
                        Run::create(spec(), &dir, o).unwrap()
                    };
                    run.train(&mut |_: &Event<'_>| {}).unwrap();
                    let t = run.trainer();
                    let modules: Vec<usize> = (0..k).filter(|&m| t.holds_module(m)).collect();
                    let bytes: usize = (0..k).map(|m| module_bytes(t, m)).sum();
                    held.lock().unwrap().push((rank, modules, bytes));
                },
                None,
            );
            check_held(n, held.into_inner().unwrap(), &per_module);
            assert!(read(&dir, "model.safetensors") == read(&alone_dir, "model.safetensors"));
        }
    }
}

/// Checks what each of `n` ranks held (rank, modules, bytes) against the one-process run's
/// bytes per module.
fn check_held(n: usize, mut held: Vec<(usize, Vec<usize>, usize)>, per_module: &[usize]) {
    let k = per_module.len();
    held.sort();
    let covered: Vec<usize> = held.iter().flat_map(|(_, m, _)| m.clone()).collect();
    assert_eq!(covered, (0..k).collect::<Vec<_>>(), "{n} ranks: {held:?}");
    for (rank, modules, bytes) in &held {
        assert!(
            !modules.is_empty(),
            "{n} ranks: rank {rank} holds no module"
        );
        let want: usize = modules.iter().map(|&m| per_module[m]).sum();
        assert_eq!(
            *bytes, want,
            "{n} ranks: rank {rank} holds modules {modules:?}"
        );
    }
    let total: usize = held.iter().map(|h| h.2).sum();
    assert_eq!(total, per_module.iter().sum::<usize>(), "{n} ranks");
}
