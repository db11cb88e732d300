//! Every file reader against special files: a FIFO, a device (`/dev/zero`,
//! `/dev/urandom`, `/dev/null`), a folder, a link loop or a dangling link, or a link to any of
//! them, put in place of any one file a reader opens (any batch of a multi-file data set, not
//! only the first). Each read must fail promptly with an error naming the file: never a
//! panic, a hang, or memory filled from an endless device.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use sgr_core::checkpoint::{checkpoint_tags, load_tensors, read_metadata};
use sgr_data::{CifarKind, ImageFolder};
use sgr_run::preprocess::Preprocess;
use sgr_run::{RunDir, RunSpec};

/// What stands in place of the file.
const KINDS: [&str; 8] = [
    "fifo",
    "dir",
    "zero",
    "urandom",
    "null",
    "loop",
    "dangling",
    "link-to-fifo",
];

fn make_special(path: &Path, kind: &str) {
    let _ = std::fs::remove_file(path);
    let link = |to: &Path| std::os::unix::fs::symlink(to, path).unwrap();
    let fifo = |p: &Path| {
        let ok = Command::new("mkfifo").arg(p).status().unwrap().success();
        assert!(ok, "mkfifo {}", p.display());
    };
    match kind {
        "fifo" => fifo(path),
        "dir" => std::fs::create_dir(path).unwrap(),
        "zero" => link(Path::new("/dev/zero")),
        "urandom" => link(Path::new("/dev/urandom")),
        "null" => link(Path::new("/dev/null")),
        "loop" => link(path),
        "dangling" => link(&path.with_extension("missing")),
        "link-to-fifo" => {
            let target = path.with_extension("fifo");
            fifo(&target);
            link(&target);
        }
        _ => unreachable!(),
    }
}

fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = magic.to_be_bytes().to_vec();
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend(data);
    b
}

/// A reader: the files it opens (one is replaced), and the read itself.
struct Reader {
    name: &'static str,
    files: Vec<PathBuf>,
    read: Box<dyn Fn() -> Result<(), String> + Send>,
}

fn err<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| e.to_string())
}

/// Every reader, with valid files laid out under `dir`.
fn readers(dir: &Path) -> Vec<Reader> {
    let mut out = Vec::new();
    // A run directory's records.
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let spec = RunSpec::default().resolved().unwrap();
    RunDir::new(&run).write_spec(&spec).unwrap();
    RunDir::new(&run).write_records(&[]).unwrap();
    for (name, file) in [
        ("config.json", "config.json"),
        ("metrics.jsonl", "metrics.jsonl"),
        ("summary.json", "summary.json"),
    ] {
        let r = run.clone();
        out.push(Reader {
            name,
            files: vec![run.join(file)],
            read: Box::new(move || {
                let d = RunDir::new(&r);
                match name {
                    "config.json" => err(d.read_spec()),
                    "metrics.jsonl" => err(d.read_records(Some(0))),
                    _ => err(d.read_summary()),
                }
            }),
        });
    }
    // Configuration files.
    for ext in ["json", "toml"] {
        let p = dir.join(format!("spec.{ext}"));
        std::fs::write(&p, "").unwrap();
        let q = p.clone();
        out.push(Reader {
            name: "--config",
            files: vec![p],
            read: Box::new(move || err(RunSpec::from_file(&q))),
        });
    }
    // Model files and checkpoints: every reader of safetensors.
    let model = dir.join("model.safetensors");
    std::fs::write(&model, b"").unwrap();
    for name in [
        "load_tensors",
        "read_metadata",
        "checkpoint_tags",
        "preprocess",
    ] {
        let m = model.clone();
        out.push(Reader {
            name,
            files: vec![model.clone()],
            read: Box::new(move || match name {
                "load_tensors" => err(load_tensors(&m, &candle_core::Device::Cpu)),
                "read_metadata" => err(read_metadata(&m)),
                "checkpoint_tags" => err(checkpoint_tags(&m)),
                _ => err(Preprocess::read(&m)),
            }),
        });
    }
    // CIFAR-10: five training batches and a test batch, any of which may be replaced.
    let cifar = dir.join("cifar");
    std::fs::create_dir_all(&cifar).unwrap();
    let record: Vec<u8> = (0..3073u32).map(|i| (i % 10) as u8).collect();
    let mut files = Vec::new();
    for f in (1..=5)
        .map(|i| format!("data_batch_{i}.bin"))
        .chain(["test_batch.bin".into()])
    {
        std::fs::write(cifar.join(&f), record.repeat(2)).unwrap();
        files.push(cifar.join(f));
    }
    let c = cifar.clone();
    out.push(Reader {
        name: "cifar10",
        files,
        read: Box::new(move || {
            err(sgr_data::load_cifar(&c, CifarKind::Cifar10, true))?;
            err(sgr_data::load_cifar(&c, CifarKind::Cifar10, false))
        }),
    });
    // MNIST: four IDX files.
    let mnist = dir.join("mnist");
    std::fs::create_dir_all(&mnist).unwrap();
    let mut files = Vec::new();
    for stem in ["train", "t10k"] {
        let images = mnist.join(format!("{stem}-images-idx3-ubyte"));
        let labels = mnist.join(format!("{stem}-labels-idx1-ubyte"));
        std::fs::write(&images, idx(0x803, &[2, 28, 28], &[7; 2 * 784])).unwrap();
        std::fs::write(&labels, idx(0x801, &[2], &[0, 1])).unwrap();
        files.extend([images, labels]);
    }
    let m = mnist.clone();
    out.push(Reader {
        name: "mnist",
        files,
        read: Box::new(move || {
            err(sgr_data::load_mnist_dir(&m, true, "mnist"))?;
            err(sgr_data::load_mnist_dir(&m, false, "mnist"))
        }),
    });
    // An image folder's class index, and one of its images.
    let folder = dir.join("folder");
    for class in ["a", "b"] {
        let d = folder.join(class);
        std::fs::create_dir_all(&d).unwrap();
        image::RgbImage::from_pixel(4, 4, image::Rgb([9, 99, 199]))
            .save(d.join("x.png"))
            .unwrap();
    }
    let index = dir.join("classes.txt");
    std::fs::write(&index, "a\nb\n").unwrap();
    let (f, i) = (folder.clone(), index.clone());
    out.push(Reader {
        name: "--class-index",
        files: vec![index],
        read: Box::new(move || err(ImageFolder::open(&f, Some(&i)))),
    });
    let image = folder.join("b/x.png");
    let im = image.clone();
    out.push(Reader {
        name: "image",
        files: vec![image],
        read: Box::new(move || err(sgr_data::decode_rgb(&im))),
    });
    out
}

/// The read, on its own thread: it must end within `limit` (a FIFO would block forever).
fn within(
    read: Box<dyn Fn() -> Result<(), String> + Send>,
    limit: Duration,
) -> Option<Result<(), String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read))
            .unwrap_or_else(|_| Err("panicked".into()));
        let _ = tx.send(r);
    });
    rx.recv_timeout(limit).ok()
}

/// Every reader × every kind of special file × every file the reader opens.
#[test]
fn every_reader_refuses_a_special_file_in_place_of_any_of_its_files() {
    let layout = readers(tempfile::tempdir().unwrap().path());
    let mut cases = 0;
    for (r, reader) in layout.iter().enumerate() {
        for which in 0..reader.files.len() {
            for kind in KINDS {
                let dir = tempfile::tempdir().unwrap();
                let reader = readers(dir.path()).swap_remove(r);
                let file = reader.files[which].clone();
                make_special(&file, kind);
                let what = format!("{} with {} as {kind}", reader.name, file.display());
                let Some(result) = within(reader.read, Duration::from_secs(20)) else {
                    panic!("{what}: no answer in 20 s");
                };
                // A run's history before its first epoch may be absent.
                if reader.name == "metrics.jsonl" && kind == "dangling" && result.is_ok() {
                    continue;
                }
                let e = result.expect_err(&what);
                let name = file.file_name().unwrap().to_string_lossy().into_owned();
                assert!(
                    e.contains(&name),
                    "{what}: the error names no `{name}`: {e}"
                );
                assert!(!e.contains("panicked"), "{what}: {e}");
                cases += 1;
            }
        }
    }
    assert!(cases >= 150, "{cases} cases");
}
