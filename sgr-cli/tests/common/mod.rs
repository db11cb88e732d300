//! Helpers shared by the tests of the `sgr` binary (each test binary uses a subset).
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs the `sgr` binary built for these tests.
pub fn sgr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(args)
        .output()
        .expect("run sgr")
}

/// Runs the `sgr` binary with one compute thread, for a test binary whose tests each run one
/// long job, so that the harness's parallel tests (one per core) run side by side instead of
/// contending for the cores: these jobs gain little from a second thread, and spin-waiting
/// kernels lose much to oversubscription. The bits do not depend on the thread count
/// (`tests/parallel.rs`, `results_do_not_depend_on_the_thread_count`).
pub fn sgr_one_thread(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("CANDLE_NUM_THREADS")
        .output()
        .expect("run sgr")
}

/// stdout and stderr of a run, for assertions and failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An IDX file (MNIST's format): a big-endian magic number and dimensions, then the data.
pub fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = magic.to_be_bytes().to_vec();
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend(data);
    b
}

/// An image folder: `root/<split>/<class>/<NN>.png`, `per_class` 8x8 images in each class of
/// each split, their colour set by the image's number and the class's.
pub fn image_folder(root: &std::path::Path, splits: &[&str], classes: &[&str], per_class: u8) {
    for split in splits {
        for (c, class) in classes.iter().enumerate() {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..per_class {
                let rgb = [i.wrapping_mul(12), (c as u8).wrapping_mul(90), 199];
                image::RgbImage::from_pixel(8, 8, image::Rgb(rgb))
                    .save(d.join(format!("{i:02}.png")))
                    .unwrap();
            }
        }
    }
}
