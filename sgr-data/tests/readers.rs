//! Every reader on fixtures written here or committed from real data, and on bad input: a typed
//! error naming the file, never a panic.

use std::path::{Path, PathBuf};

use sgr_data::{
    load_cifar, load_idx_pair, load_mnist_dir, load_stl10_pair, load_svhn_mat, read_mat_v5,
    CifarKind, DataError, ImageFolder, Source,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = magic.to_be_bytes().to_vec();
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend(data);
    b
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut e, bytes).unwrap();
    e.finish().unwrap()
}

fn err_text<T: std::fmt::Debug>(r: Result<T, DataError>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn idx_raw_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..3 * 28 * 28).map(|i| (i % 256) as u8).collect();
    let images = idx_bytes(0x803, &[3, 28, 28], &pixels);
    let labels = idx_bytes(0x801, &[3], &[7, 0, 9]);
    std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), &images).unwrap();
    std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), &labels).unwrap();
    std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), gz(&images)).unwrap();
    std::fs::write(dir.path().join("train-labels-idx1-ubyte.gz"), gz(&labels)).unwrap();
    for train in [true, false] {
        let d = load_mnist_dir(dir.path(), train, "mnist").unwrap();
        assert_eq!((d.len(), d.channels, d.height, d.width), (3, 1, 28, 28));
        assert_eq!(d.labels(), &[7, 0, 9]);
        assert_eq!(d.image(1)[0], (784 % 256) as u8);
    }
}

#[test]
fn idx_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let pixels = vec![0u8; 2 * 4 * 4];
    std::fs::write(p("img"), idx_bytes(0x803, &[2, 4, 4], &pixels)).unwrap();
    std::fs::write(p("lab3"), idx_bytes(0x801, &[3], &[1, 2, 3])).unwrap();
    std::fs::write(p("wrongmagic"), idx_bytes(0x802, &[2], &[1, 2])).unwrap();
    std::fs::write(p("trunc"), &idx_bytes(0x803, &[2, 4, 4], &pixels)[..20]).unwrap();
    std::fs::write(p("badlab"), idx_bytes(0x801, &[2], &[1, 12])).unwrap();
    let gzipped = gz(&idx_bytes(0x801, &[2], &[1, 2]));
    std::fs::write(p("truncgz"), &gzipped[..gzipped.len() - 6]).unwrap();
    let e = err_text(load_idx_pair(&p("img"), &p("lab3"), 10, "x"));
    assert!(
        e.contains("lab3") && e.contains("3 labels for 2 images"),
        "{e}"
    );
    let e = err_text(load_idx_pair(&p("img"), &p("wrongmagic"), 10, "x"));
    assert!(
        e.contains("wrongmagic") && e.contains("wrong magic 0x00000802"),
        "{e}"
    );
    let e = err_text(load_idx_pair(&p("trunc"), &p("lab3"), 10, "x"));
    assert!(e.contains("trunc") && e.contains("truncated"), "{e}");
    let e = err_text(load_idx_pair(&p("img"), &p("badlab"), 10, "x"));
    assert!(e.contains("badlab") && e.contains("label 12"), "{e}");
    let e = err_text(load_idx_pair(&p("img"), &p("truncgz"), 10, "x"));
    assert!(e.contains("truncgz") && e.contains("gzip"), "{e}");
    let e = err_text(load_mnist_dir(&p("nowhere"), true, "mnist"));
    assert!(e.contains("train-images-idx3-ubyte"), "{e}");
}

/// Debian's `dataset-fashion-mnist` (installed by `.ci/run`): the full set.
#[test]
fn fashion_mnist_full_set() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    if !dir.join("train-images-idx3-ubyte.gz").is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
        );
        eprintln!(
            "skipped: {} not installed (apt-get install dataset-fashion-mnist)",
            dir.display()
        );
        return;
    }
    for (train, n, per) in [(true, 60_000, 6_000), (false, 10_000, 1_000)] {
        let d = load_mnist_dir(dir, train, "fashion-mnist").unwrap();
        assert_eq!((d.len(), d.height, d.width), (n, 28, 28));
        let mut counts = [0usize; 10];
        for &l in d.labels() {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [per; 10]);
        // Real images: not blank, mean intensity in a plausible band (≈ 0.29 for Fashion-MNIST).
        let (mean, _) = d.channel_stats();
        assert!((0.2..0.4).contains(&mean[0]), "{mean:?}");
    }
}

#[test]
fn stl10_column_major_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let side = 96;
    let mut x = vec![0u8; 2 * 3 * side * side];
    // Sample 1, channel 2, row 5, column 70 = 200: column-major → index col*96 + row.
    x[3 * side * side + 2 * side * side + 70 * side + 5] = 200;
    std::fs::write(p("train_X.bin"), &x).unwrap();
    std::fs::write(p("train_y.bin"), [10u8, 1]).unwrap();
    let d = load_stl10_pair(&p("train_X.bin"), &p("train_y.bin"), "stl10").unwrap();
    assert_eq!(d.labels(), &[9, 0]);
    let img = d.image(1);
    assert_eq!(img[2 * side * side + 5 * side + 70], 200);
    std::fs::write(p("short_X.bin"), &x[..1000]).unwrap();
    let e = err_text(load_stl10_pair(&p("short_X.bin"), &p("train_y.bin"), "s"));
    assert!(e.contains("short_X.bin") && e.contains("truncated"), "{e}");
    std::fs::write(p("y3.bin"), [1u8, 2, 3]).unwrap();
    let e = err_text(load_stl10_pair(&p("train_X.bin"), &p("y3.bin"), "s"));
    assert!(
        e.contains("y3.bin") && e.contains("3 labels for 2 images"),
        "{e}"
    );
    std::fs::write(p("y0.bin"), [0u8, 2]).unwrap();
    let e = err_text(load_stl10_pair(&p("train_X.bin"), &p("y0.bin"), "s"));
    assert!(e.contains("label 0 of sample 0"), "{e}");
}

/// SVHN files written by scipy.io.savemat (scripts/make_fixtures.py), compressed or not.
#[test]
fn svhn_mat_files_written_by_scipy() {
    let dir = fixtures().join("svhn");
    let expect: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tiny_32x32.json")).unwrap())
            .unwrap();
    for f in ["tiny_32x32.mat", "tiny_32x32_compressed.mat"] {
        let d = load_svhn_mat(&dir.join(f), "svhn").unwrap();
        let labels: Vec<u32> = expect["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(d.labels(), labels.as_slice(), "{f}");
        for p in expect["probes"].as_array().unwrap() {
            let v: Vec<usize> = p
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let (r, c, ch, s, want) = (v[0], v[1], v[2], v[3], v[4]);
            assert_eq!(
                d.image(s)[ch * 1024 + r * 32 + c] as usize,
                want,
                "{f} {v:?}"
            );
        }
    }
    let m = read_mat_v5(&dir.join("tiny_32x32.mat")).unwrap();
    assert_eq!(m["X"].dims, vec![32, 32, 3, 5]);
    assert_eq!(m["y"].dims, vec![5, 1]);
}

#[test]
fn svhn_bad_input() {
    let src = std::fs::read(fixtures().join("svhn/tiny_32x32.mat")).unwrap();
    let srcz = std::fs::read(fixtures().join("svhn/tiny_32x32_compressed.mat")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("trunc.mat", src[..src.len() - 500].to_vec(), "truncated"),
        ("header.mat", src[..60].to_vec(), "truncated"),
        ("truncz.mat", srcz[..srcz.len() - 300].to_vec(), "truncated"),
        (
            "corruptz.mat",
            {
                let mut b = srcz.clone();
                for v in &mut b[400..700] {
                    *v ^= 0x5a;
                }
                b
            },
            "compressed",
        ),
        (
            "notmat.mat",
            b"hello world".repeat(20),
            "not a MATLAB level-5 file",
        ),
    ];
    for (name, bytes, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = err_text(load_svhn_mat(&p, "svhn"));
        assert!(e.contains(name) && e.contains(want), "{name}: {e}");
    }
}

#[test]
fn real_cifar10_test_images_from_foolbox() {
    let d = load_cifar(
        &fixtures().join("cifar10-foolbox"),
        CifarKind::Cifar10,
        false,
    )
    .unwrap();
    assert_eq!(d.len(), 20);
    assert_eq!(
        d.labels(),
        &[3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]
    );
    // Real photographs: every image has varied pixels and the set's channel means are those of
    // natural CIFAR images (≈ 0.49, 0.48, 0.45 over the full set).
    for i in 0..20 {
        let img = d.image(i);
        let (lo, hi) = img.iter().fold((255, 0), |(a, b), &v| (a.min(v), b.max(v)));
        assert!(hi - lo > 100, "image {i} is nearly flat");
    }
    let (mean, _) = d.channel_stats();
    assert!(mean.iter().all(|m| (0.3..0.7).contains(m)), "{mean:?}");
}

fn folder_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let photos = fixtures().join("photos");
    let put = |class: &str, name: &str, bytes: &[u8]| {
        let d = dir.path().join(class);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    put(
        "rocket",
        "rocket.jpg",
        &std::fs::read(photos.join("rocket.jpg")).unwrap(),
    );
    put(
        "cat",
        "chelsea.PNG",
        &std::fs::read(photos.join("chelsea.png")).unwrap(),
    );
    put(
        "camera",
        "camera.png",
        &std::fs::read(photos.join("camera.png")).unwrap(),
    );
    // Edge cases written here: 16-bit grey, RGBA, grey+alpha PNGs.
    let mut buf = std::io::Cursor::new(Vec::new());
    image::ImageBuffer::<image::Luma<u16>, _>::from_fn(5, 3, |x, _| {
        image::Luma([x as u16 * 16000])
    })
    .write_to(&mut buf, image::ImageFormat::Png)
    .unwrap();
    put("synthetic", "grey16.png", buf.get_ref());
    let mut buf = std::io::Cursor::new(Vec::new());
    image::ImageBuffer::<image::Rgba<u8>, _>::from_fn(4, 4, |_, _| image::Rgba([255, 0, 0, 10]))
        .write_to(&mut buf, image::ImageFormat::Png)
        .unwrap();
    put("synthetic", "rgba.png", buf.get_ref());
    let mut buf = std::io::Cursor::new(Vec::new());
    image::ImageBuffer::<image::LumaA<u8>, _>::from_fn(2, 2, |_, _| image::LumaA([51, 200]))
        .write_to(&mut buf, image::ImageFormat::Png)
        .unwrap();
    put("synthetic", "greyalpha.png", buf.get_ref());
    put("synthetic", "notes.txt", b"ignored: not an image");
    dir
}

#[test]
fn image_folder_decodes_real_photos_and_edge_cases() {
    let dir = folder_fixture();
    let f = ImageFolder::open(dir.path(), None).unwrap();
    assert_eq!(f.classes(), &["camera", "cat", "rocket", "synthetic"]);
    assert_eq!(f.len(), 6);
    let by_name = |n: &str| {
        (0..f.len())
            .find(|&i| f.samples()[i].0.file_name().unwrap() == n)
            .unwrap()
    };
    let rocket = f.image(by_name("rocket.jpg")).unwrap();
    assert_eq!(
        (rocket.channels, rocket.height, rocket.width),
        (3, 427, 640)
    );
    assert_eq!(f.label(by_name("rocket.jpg")), 2);
    let cat = f.image(by_name("chelsea.PNG")).unwrap();
    assert_eq!((cat.height, cat.width), (300, 451));
    let cam = f.image(by_name("camera.png")).unwrap();
    assert_eq!((cam.channels, cam.height, cam.width), (3, 512, 512));
    assert_eq!(
        cam.plane(0),
        cam.plane(2),
        "grey photo → three equal channels"
    );
    let g16 = f.image(by_name("grey16.png")).unwrap();
    assert!((g16.at(1, 0, 4) - 64000.0 / 65535.0).abs() < 1e-4);
    let rgba = f.image(by_name("rgba.png")).unwrap();
    assert_eq!((rgba.at(0, 0, 0), rgba.at(1, 0, 0)), (1.0, 0.0));
    let ga = f.image(by_name("greyalpha.png")).unwrap();
    assert!((ga.at(2, 1, 1) - 0.2).abs() < 1e-6);
}

#[test]
fn image_folder_class_index_and_bad_input() {
    let dir = folder_fixture();
    let idx = dir.path().join("classes.txt");
    std::fs::write(&idx, "synthetic\nrocket\ncat\ncamera\nunused\n").unwrap();
    let f = ImageFolder::open(dir.path(), Some(&idx)).unwrap();
    assert_eq!(f.num_classes(), 5);
    let rocket = (0..f.len())
        .find(|&i| f.samples()[i].0.ends_with("rocket/rocket.jpg"))
        .unwrap();
    assert_eq!(f.label(rocket), 1);
    std::fs::write(&idx, "rocket\ncat\ncamera\n").unwrap();
    let e = err_text(ImageFolder::open(dir.path(), Some(&idx)));
    assert!(e.contains("unknown class folder `synthetic`"), "{e}");
    std::fs::write(dir.path().join("cat/broken.jpg"), b"\xff\xd8\xff garbage").unwrap();
    let f = ImageFolder::open(dir.path(), None).unwrap();
    let broken = (0..f.len())
        .find(|&i| f.samples()[i].0.ends_with("broken.jpg"))
        .unwrap();
    let e = err_text(f.image(broken));
    assert!(
        e.contains("broken.jpg") && e.contains("cannot decode"),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    let e = err_text(ImageFolder::open(empty.path(), None));
    assert!(e.contains("class folders"), "{e}");
}
