//! Decode + augment throughput of the input pipeline (images/s), by worker count.
//!
//! `cargo bench -p sgr-data --bench pipeline`
//!
//! * CIFAR binary: the 20 real CIFAR-10 test images of the fixtures repeated to 10 000 records,
//!   training transforms (random crop 32 pad 4, flip, normalise), batch 128.
//! * JPEG folder: 240 JPEGs (quality 90, 500×375, re-encoded from the CC0 photos of the
//!   fixtures) in 8 class folders, ImageNet training transforms (random-resized-crop 224, flip,
//!   normalise), with and without RandAugment 2/9 + Random Erasing 0.25, batch 32.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use sgr_data::{
    load_cifar, CifarKind, ImageFolder, Loader, LoaderConfig, Normalize, Pipeline, Source,
    Transform,
};

fn throughput(source: Arc<dyn Source>, pipeline: Pipeline, batch: usize, workers: usize) -> f64 {
    let loader = Loader::new(
        source,
        LoaderConfig {
            workers,
            ..LoaderConfig::train(batch, 0)
        },
        pipeline,
        &Device::Cpu,
    )
    .expect("loader");
    let t = Instant::now();
    let mut n = 0;
    for b in loader.epoch(0) {
        n += b.expect("batch").1.dim(0).expect("dim");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tmp = tempfile::tempdir().expect("tempdir");
    let max_workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let worker_counts: Vec<usize> = [0, 1, 2, 4]
        .into_iter()
        .filter(|&w| w <= max_workers)
        .collect();

    // CIFAR binary.
    let records = std::fs::read(fixtures.join("cifar10-foolbox/test_batch.bin")).expect("fixture");
    let cifar_dir = tmp.path().join("cifar");
    std::fs::create_dir_all(&cifar_dir).expect("mkdir");
    std::fs::write(cifar_dir.join("test_batch.bin"), records.repeat(500)).expect("write");
    let t = Instant::now();
    let cifar = load_cifar(&cifar_dir, CifarKind::Cifar10, false).expect("cifar");
    println!(
        "cifar-binary read: {} records in {:.3}s",
        cifar.len(),
        t.elapsed().as_secs_f64()
    );
    let norm = Normalize::from_dataset(&cifar);
    let cifar: Arc<dyn Source> = Arc::new(cifar);
    let cifar_pipe = Pipeline::new(vec![
        Transform::RandomCrop {
            size: 32,
            padding: 4,
        },
        Transform::HorizontalFlip { p: 0.5 },
        norm.transform(),
    ]);
    for &w in &worker_counts {
        let ips = throughput(Arc::clone(&cifar), cifar_pipe.clone(), 128, w);
        println!("cifar-binary crop+flip+normalise, batch 128, workers {w}: {ips:.0} images/s");
    }

    // JPEG folder.
    let root = tmp.path().join("jpeg");
    let photos: Vec<image::DynamicImage> = ["rocket.jpg", "chelsea.png", "camera.png"]
        .iter()
        .map(|f| image::open(fixtures.join("photos").join(f)).expect("photo"))
        .collect();
    for i in 0..240 {
        let p = &photos[i % photos.len()];
        let (w, h) = (p.width(), p.height());
        let (cw, ch) = (w * 3 / 4, h * 3 / 4);
        let crop = p
            .crop_imm((i as u32 * 7) % (w - cw), (i as u32 * 5) % (h - ch), cw, ch)
            .resize_exact(500, 375, image::imageops::FilterType::Triangle)
            .to_rgb8();
        let dir = root.join(format!("class{}", i % 8));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut f = std::fs::File::create(dir.join(format!("{i:04}.jpg"))).expect("create");
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut f, 90)
            .encode_image(&crop)
            .expect("encode");
    }
    let folder: Arc<dyn Source> = Arc::new(ImageFolder::open(&root, None).expect("folder"));
    let imagenet = Normalize::imagenet();
    let rrc = Transform::RandomResizedCrop {
        size: 224,
        scale: (0.08, 1.0),
        ratio: (0.75, 4.0 / 3.0),
    };
    let plain = Pipeline::new(vec![
        rrc.clone(),
        Transform::HorizontalFlip { p: 0.5 },
        imagenet.transform(),
    ]);
    let deit = Pipeline::new(vec![
        rrc,
        Transform::HorizontalFlip { p: 0.5 },
        Transform::RandAugment {
            ops: 2,
            magnitude: 9,
        },
        imagenet.transform(),
        Transform::RandomErasing { p: 0.25 },
    ]);
    for (name, pipe) in [
        ("rrc224+flip+normalise", plain),
        ("+randaugment 2/9 +erasing 0.25", deit),
    ] {
        for &w in &worker_counts {
            let ips = throughput(Arc::clone(&folder), pipe.clone(), 32, w);
            println!("jpeg-folder 500x375 {name}, batch 32, workers {w}: {ips:.0} images/s");
        }
    }
}
