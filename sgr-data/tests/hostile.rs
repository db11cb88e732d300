//! Regression tests from a hostile-input review: bad input to every reader is a typed error
//! naming the file, never a panic, a hang or an allocation the file cannot back.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{encoded_image, gz, idx_bytes, mat_compressed, mat_file, mat_matrix, svhn_mat};
use sgr_data::{
    decode_rgb, decode_rgb_bytes, load_idx_pair, load_svhn_mat, read_idx, read_mat_v5, DataError,
    ImageDataset, ImageFolder, Source,
};

fn err_text<T: std::fmt::Debug>(r: Result<T, DataError>) -> String {
    r.unwrap_err().to_string()
}

/// Runs `f` on a thread with `stack` bytes of stack; fails if it takes longer than `limit`.
fn bounded<T: Send + 'static>(
    stack: usize,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .stack_size(stack)
        .spawn(move || {
            let _ = tx.send(f());
        })
        .unwrap();
    rx.recv_timeout(limit)
        .unwrap_or_else(|e| panic!("did not finish within {limit:?}: {e}"))
}

// 1. Size arithmetic from file contents is checked.

#[test]
fn idx_dimensions_whose_product_overflows_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // 4 * 2^31 * 2^31 = 2^64: wraps to 0, matching the 0 data bytes present.
    std::fs::write(p("wrap"), idx_bytes(0x803, &[4, 1 << 31, 1 << 31], &[])).unwrap();
    std::fs::write(p("lab4"), idx_bytes(0x801, &[4], &[0, 1, 2, 3])).unwrap();
    std::fs::write(p("max"), idx_bytes(0x803, &[u32::MAX; 3], &[1, 2, 3])).unwrap();
    let e = err_text(load_idx_pair(&p("wrap"), &p("lab4"), 10, "x"));
    assert!(e.contains("wrap") && e.contains("overflow"), "{e}");
    let e = err_text(read_idx(&p("max"), 3));
    assert!(e.contains("max") && e.contains("overflow"), "{e}");
}

#[test]
fn idx_zero_sized_images_are_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("flat"), idx_bytes(0x803, &[2, 0, 28], &[])).unwrap();
    std::fs::write(p("lab2"), idx_bytes(0x801, &[2], &[0, 1])).unwrap();
    let e = err_text(load_idx_pair(&p("flat"), &p("lab2"), 10, "x"));
    assert!(e.contains("flat") && e.contains("0x28"), "{e}");
}

#[test]
fn dataset_geometry_that_overflows_is_an_error() {
    let r = ImageDataset::new("x", 1, 1 << 31, 1 << 31, 10, 255.0, vec![], vec![0; 4]);
    let e = err_text(r);
    assert!(e.contains("overflow"), "{e}");
    let r = ImageDataset::new("x", usize::MAX, 2, 1, 10, 255.0, vec![], vec![]);
    assert!(err_text(r).contains("overflow"));
}

#[test]
fn mat_dimensions_whose_product_overflows_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dims.mat");
    let m = mat_matrix("X", 9, &[i32::MAX, i32::MAX, i32::MAX, 4], 2, &[1, 2, 3]);
    std::fs::write(&p, mat_file(&m)).unwrap();
    let e = err_text(read_mat_v5(&p));
    assert!(e.contains("dims.mat") && e.contains("overflow"), "{e}");
}

// 2. Decompression stops one byte past the size the IDX header declares.

#[test]
fn idx_gzip_is_read_only_up_to_the_declared_size() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // A valid header and payload followed by 64 MiB the header does not declare, and a stream
    // cut short near its end: a reader that stops at the declared size never reaches the cut.
    let mut big = idx_bytes(0x801, &[2], &[1, 2]);
    big.resize(big.len() + (64 << 20), 0);
    let z = gz(&big);
    std::fs::write(p("bomb.gz"), &z[..z.len() - 100]).unwrap();
    let e = err_text(read_idx(&p("bomb.gz"), 1));
    assert!(
        e.contains("bomb.gz") && e.contains("more than the 2 bytes"),
        "{e}"
    );
    // Smaller than declared.
    std::fs::write(p("short.gz"), gz(&idx_bytes(0x801, &[5], &[1, 2, 3]))).unwrap();
    let e = err_text(read_idx(&p("short.gz"), 1));
    assert!(e.contains("short.gz") && e.contains("truncated"), "{e}");
    // Raw files too.
    std::fs::write(p("long"), idx_bytes(0x801, &[2], &[1, 2, 3])).unwrap();
    let e = err_text(read_idx(&p("long"), 1));
    assert!(
        e.contains("long") && e.contains("more than the 2 bytes"),
        "{e}"
    );
}

// 3. Multi-member gzip files are read whole.

#[test]
fn idx_multi_member_gzip_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("multi.gz");
    let whole = idx_bytes(0x801, &[6], &[1, 2, 3, 4, 5, 6]);
    let mut z = gz(&whole[..5]);
    z.extend(gz(&whole[5..10]));
    z.extend(gz(&whole[10..]));
    std::fs::write(&p, &z).unwrap();
    let (dims, data) = read_idx(&p, 1).unwrap();
    assert_eq!((dims, data), (vec![6], vec![1, 2, 3, 4, 5, 6]));
}

// 4. MAT nesting depth is bounded.

#[test]
fn mat_deep_compressed_nesting_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("deep.mat");
    let mut e = mat_matrix("y", 6, &[1, 1], 9, &1.0f64.to_le_bytes());
    for _ in 0..3000 {
        e = mat_compressed(&e);
    }
    std::fs::write(&p, mat_file(&e)).unwrap();
    // A small stack makes the unbounded recursion overflow quickly.
    let e = bounded(256 << 10, Duration::from_secs(20), move || {
        read_mat_v5(&p).map(|m| m.len()).map_err(|e| e.to_string())
    })
    .unwrap_err();
    assert!(e.contains("deep.mat") && e.contains("nested"), "{e}");
    // 16 levels are fine.
    let p = dir.path().join("ok.mat");
    let mut e = mat_matrix("y", 6, &[1, 1], 9, &1.0f64.to_le_bytes());
    for _ in 0..16 {
        e = mat_compressed(&e);
    }
    std::fs::write(&p, mat_file(&e)).unwrap();
    assert_eq!(read_mat_v5(&p).unwrap()["y"].dims, vec![1, 1]);
}

#[test]
fn mat_compressed_element_is_inflated_only_up_to_its_declared_size() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bomb.mat");
    // The inner tag declares 8 bytes (an empty miINT8 of 8 bytes); 64 MiB follow.
    let mut inner = 1u32.to_le_bytes().to_vec();
    inner.extend(8u32.to_le_bytes());
    inner.resize(inner.len() + (64 << 20), 0);
    std::fs::write(&p, mat_file(&mat_compressed(&inner))).unwrap();
    let e = err_text(read_mat_v5(&p));
    assert!(e.contains("bomb.mat") && e.contains("declares"), "{e}");
}

#[test]
fn svhn_compressed_and_plain_fixtures_still_load() {
    let dir = tempfile::tempdir().unwrap();
    for compressed in [false, true] {
        let p = dir.path().join(format!("svhn_{compressed}.mat"));
        std::fs::write(&p, svhn_mat(3, compressed)).unwrap();
        let d = load_svhn_mat(&p, "svhn").unwrap();
        assert_eq!(d.labels(), &[1, 2, 3]);
    }
}

// 5. Image folders do not follow directory symlinks.

#[cfg(unix)]
mod symlinks {
    use super::*;
    use std::os::unix::fs::symlink;

    fn png() -> Vec<u8> {
        encoded_image(4, 4, image::ImageFormat::Png)
    }

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (class, file) in [("cat", "a.png"), ("dog", "b.png")] {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            std::fs::write(dir.path().join(class).join(file), png()).unwrap();
        }
        dir
    }

    fn names(f: &ImageFolder) -> Vec<(String, u32)> {
        f.samples()
            .iter()
            .map(|(p, l)| (p.file_name().unwrap().to_string_lossy().into_owned(), *l))
            .collect()
    }

    #[test]
    fn a_link_to_the_parent_does_not_label_dogs_as_cats() {
        let dir = tree();
        symlink("..", dir.path().join("cat/up")).unwrap();
        let f = ImageFolder::open(dir.path(), None).unwrap();
        assert_eq!(names(&f), [("a.png".into(), 0), ("b.png".into(), 1)]);
    }

    #[test]
    fn self_links_do_not_hang() {
        let dir = tree();
        symlink(".", dir.path().join("cat/x")).unwrap();
        symlink(".", dir.path().join("cat/y")).unwrap();
        let root = dir.path().to_path_buf();
        let f = bounded(8 << 20, Duration::from_secs(10), move || {
            ImageFolder::open(&root, None).map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn linked_files_are_read_only_if_they_resolve_to_regular_files() {
        let dir = tree();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("c.png"), png()).unwrap();
        symlink(outside.path().join("c.png"), dir.path().join("cat/c.png")).unwrap();
        symlink(outside.path(), dir.path().join("cat/dir.png")).unwrap();
        symlink(
            dir.path().join("nowhere.png"),
            dir.path().join("cat/broken.png"),
        )
        .unwrap();
        let f = ImageFolder::open(dir.path(), None).unwrap();
        assert_eq!(
            names(&f),
            [
                ("a.png".into(), 0),
                ("c.png".into(), 0),
                ("b.png".into(), 1)
            ]
        );
        assert_eq!(f.image(1).unwrap().width, 4);
    }

    #[test]
    fn class_folders_that_resolve_to_the_same_place_are_an_error() {
        let dir = tree();
        symlink(dir.path().join("cat"), dir.path().join("kitten")).unwrap();
        let e = err_text(ImageFolder::open(dir.path(), None));
        assert!(e.contains("cat") && e.contains("kitten"), "{e}");
        let dir = tree();
        symlink(dir.path(), dir.path().join("all")).unwrap();
        let e = err_text(ImageFolder::open(dir.path(), None));
        assert!(e.contains("all") && e.contains("root"), "{e}");
        // A class folder linked from elsewhere is fine.
        let dir = tree();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("e.png"), png()).unwrap();
        symlink(outside.path(), dir.path().join("eel")).unwrap();
        let f = ImageFolder::open(dir.path(), None).unwrap();
        assert_eq!(f.classes(), &["cat", "dog", "eel"]);
        assert_eq!(f.len(), 3);
    }

    #[test]
    fn special_files_named_like_images_are_skipped() {
        let dir = tree();
        let fifo = dir.path().join("cat/pipe.png");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !made {
            eprintln!("skipped: mkfifo not available");
            return;
        }
        let f = ImageFolder::open(dir.path(), None).unwrap();
        assert_eq!(f.len(), 2);
    }
}

// 6. Truncated images are an error naming the file.

#[test]
fn truncated_png_and_jpeg_are_errors_naming_the_file() {
    for (format, name) in [
        (image::ImageFormat::Png, "cut.png"),
        (image::ImageFormat::Jpeg, "cut.jpg"),
    ] {
        let full = encoded_image(64, 48, format);
        let img = decode_rgb_bytes(&full, Path::new(name)).unwrap();
        assert_eq!((img.width, img.height), (64, 48));
        for keep in [full.len() / 2, full.len() - 20, full.len() - 1] {
            let e = err_text(decode_rgb_bytes(&full[..keep], Path::new(name)));
            assert!(
                e.contains(name) && e.contains("truncated"),
                "{name} cut to {keep} of {} bytes: {e}",
                full.len()
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("half.jpg");
    let full = encoded_image(64, 48, image::ImageFormat::Jpeg);
    std::fs::write(&p, &full[..full.len() / 2]).unwrap();
    let e = err_text(decode_rgb(&p));
    assert!(e.contains("half.jpg") && e.contains("truncated"), "{e}");
}

#[test]
fn images_larger_than_the_pixel_limit_are_an_error() {
    // A complete grey PNG declaring 20000x20000 (400 Mpx) with one row of data.
    let png = common::png_file(20000, 20000, &vec![0u8; 20001]);
    let e = err_text(decode_rgb_bytes(&png, Path::new("huge.png")));
    assert!(e.contains("huge.png") && e.contains("20000x20000"), "{e}");
}

/// An image folder with one class, or a class folder whose name is not text, is an error
/// naming the folder and what to do (a one-class folder used to fail later in the model
/// builder, and a non-UTF-8 name as "No such file").
#[test]
fn class_folders_need_two_classes_with_text_names() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("cat")).unwrap();
    std::fs::write(
        root.join("cat/a.png"),
        encoded_image(4, 4, image::ImageFormat::Png),
    )
    .unwrap();
    let e = err_text(sgr_data::ImageFolder::open(root, None));
    assert!(
        e.contains(&root.display().to_string()) && e.contains("at least two") && e.contains("cat"),
        "{e}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let raw = std::ffi::OsStr::from_bytes(b"d\xffg");
        std::fs::create_dir(root.join(raw)).unwrap();
        let e = err_text(sgr_data::ImageFolder::open(root, None));
        assert!(e.contains("not valid UTF-8") && e.contains("rename"), "{e}");
    }
}

#[test]
fn images_larger_than_their_file_can_hold_are_an_error() {
    // 4000x4000 grey pixels declared in about a hundred bytes: deflate cannot inflate that far.
    let png = common::png_file(4000, 4000, &[0u8; 4001]);
    let e = err_text(decode_rgb_bytes(&png, Path::new("tiny.png")));
    assert!(
        e.contains("tiny.png") && e.contains("cannot be held"),
        "{e}"
    );
}

/// Inputs `fuzz.rs` shrank to when run on the readers before these fixes (each panicked with
/// "attempt to multiply with overflow"; its random image-folder trees hung on self-links,
/// `self_links_do_not_hang` above).
#[test]
fn inputs_the_fuzzer_found() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let idx_cases: [(&str, Vec<u8>); 2] = [
        (
            "random-idx",
            vec![0, 0, 8, 3, 0, 0, 0, 2, 159, 1, 26, 122, 206, 21, 28, 88],
        ),
        (
            "extreme-idx",
            idx_bytes(0x803, &[16777216, 16777216, 2147483647], &[]),
        ),
    ];
    for (name, bytes) in idx_cases {
        std::fs::write(p(name), bytes).unwrap();
        let e = err_text(read_idx(&p(name), 3));
        assert!(e.contains(name) && e.contains("overflow"), "{e}");
    }
    let m = mat_matrix("X", 6, &[i32::MAX, 32, i32::MAX], 1, &[]);
    std::fs::write(p("extreme.mat"), mat_file(&m)).unwrap();
    let e = err_text(read_mat_v5(&p("extreme.mat")));
    assert!(e.contains("extreme.mat") && e.contains("overflow"), "{e}");
}
