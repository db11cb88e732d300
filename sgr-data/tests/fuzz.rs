//! Property-based fuzzing of every reader on random bytes and on valid fixtures mutated
//! (bytes flipped, inserted, deleted, cut, header fields set to extreme values): each read must
//! return `Ok` or `Err`, never panic, and finish quickly. The budget is fixed and the seed too,
//! so a CI run is reproducible; a crash found here becomes a test in `hostile.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed};

use common::{
    cifar_record, encoded_image, gz, idx_bytes, mat_compressed, mat_file, mat_matrix, png_file,
    svhn_mat,
};
use sgr_data::{
    decode_rgb_bytes, load_idx_pair, load_stl10_pair, load_svhn_mat, read_cifar_file, read_idx,
    read_mat_v5, CifarKind, ImageFolder, Source,
};

/// A fixed budget and seed: `cases` runs per property, the same inputs every run. For a
/// longer hunt, `PROPTEST_CASES` and `PROPTEST_RNG_SEED` override them.
fn config(cases: u32) -> Config {
    let env = Config::default();
    let set = |v: &str| std::env::var_os(v).is_some();
    Config {
        cases: if set("PROPTEST_CASES") {
            env.cases
        } else {
            cases
        },
        rng_seed: if set("PROPTEST_RNG_SEED") {
            env.rng_seed
        } else {
            RngSeed::Fixed(0x5347_525f_4655_5a5a)
        },
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        max_shrink_iters: 512,
        ..env
    }
}

/// Runs one read, failing if it takes more than a second.
fn quick<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "{what} took {took:?}");
    r
}

/// A file with `bytes` in a fresh temporary folder.
fn file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    (dir, p)
}

/// One edit of a valid input.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Truncate(Index),
    /// Overwrites 4 bytes with `value`: at a 4-aligned offset in the first 256 bytes (the
    /// headers) when `header`, anywhere otherwise.
    SetU32 {
        at: Index,
        header: bool,
        value: u32,
        big_endian: bool,
    },
}

fn extreme_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(0x7fff_ffff),
        Just(0x8000_0000),
        Just(u32::MAX - 1),
        Just(u32::MAX),
        Just(1 << 16),
        Just(1 << 24),
        any::<u32>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 1..=255u8).prop_map(|(i, m)| Mutation::Flip(i, m)),
        1 => (any::<Index>(), vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1..64usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        3 => (any::<Index>(), any::<bool>(), extreme_u32(), any::<bool>()).prop_map(
            |(at, header, value, big_endian)| Mutation::SetU32 { at, header, value, big_endian }
        ),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    vec(mutation(), 1..6)
}

fn apply(base: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = base.to_vec();
    for m in muts {
        match m {
            Mutation::Flip(i, mask) if !b.is_empty() => {
                let k = i.index(b.len());
                b[k] ^= mask;
            }
            Mutation::Insert(i, bytes) => {
                let k = i.index(b.len() + 1);
                b.splice(k..k, bytes.iter().copied());
            }
            Mutation::Delete(i, n) if !b.is_empty() => {
                let k = i.index(b.len());
                b.drain(k..(k + n).min(b.len()));
            }
            Mutation::Truncate(i) => b.truncate(i.index(b.len() + 1)),
            Mutation::SetU32 {
                at,
                header,
                value,
                big_endian,
            } if b.len() >= 4 => {
                let k = if *header {
                    4 * at.index((b.len().min(256) - 4) / 4 + 1)
                } else {
                    at.index(b.len() - 3)
                };
                let v = if *big_endian {
                    value.to_be_bytes()
                } else {
                    value.to_le_bytes()
                };
                b[k..k + 4].copy_from_slice(&v);
            }
            _ => {}
        }
    }
    b
}

fn cifar_kind() -> impl Strategy<Value = CifarKind> {
    prop_oneof![
        Just(CifarKind::Cifar10),
        Just(CifarKind::Cifar100Fine),
        Just(CifarKind::Cifar100Coarse),
    ]
}

fn cifar_fixture(kind: CifarKind) -> Vec<u8> {
    let label: &[u8] = if kind == CifarKind::Cifar10 {
        &[3]
    } else {
        &[4, 17]
    };
    let mut b = cifar_record(label, 0);
    b.extend(cifar_record(label, 9));
    b
}

fn idx_images() -> Vec<u8> {
    idx_bytes(0x803, &[2, 4, 4], &(0..32).collect::<Vec<u8>>())
}

fn idx_labels() -> Vec<u8> {
    idx_bytes(0x801, &[2], &[7, 1])
}

/// Splits `bytes` into gzip members at the given cut points.
fn multi_gz(bytes: &[u8], cuts: &[Index]) -> Vec<u8> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort();
    at.windows(2).flat_map(|w| gz(&bytes[w[0]..w[1]])).collect()
}

/// Reads an IDX file as images (3 dimensions), labels (1), and as a pair with valid labels.
fn read_idx_all(bytes: &[u8]) {
    let (dir, p) = file("x-idx-ubyte", bytes);
    let labels = dir.path().join("labels");
    std::fs::write(&labels, idx_labels()).unwrap();
    for dims in [1, 3] {
        let _ = quick("read_idx", || read_idx(&p, dims));
    }
    if let Ok(d) = quick("load_idx_pair", || load_idx_pair(&p, &labels, 10, "x")) {
        assert_eq!(d.len(), 2);
        for i in 0..d.len() {
            assert_eq!(d.image(i).len(), d.image_len());
        }
    }
}

fn stl10_fixture() -> (Vec<u8>, Vec<u8>) {
    ((0..27648).map(|i| (i % 251) as u8).collect(), vec![3])
}

fn read_stl10(x: &[u8], y: &[u8]) {
    let (dir, px) = file("train_X.bin", x);
    let py = dir.path().join("train_y.bin");
    std::fs::write(&py, y).unwrap();
    if let Ok(d) = quick("load_stl10_pair", || load_stl10_pair(&px, &py, "stl10")) {
        assert_eq!(d.len(), y.len());
    }
}

fn read_mat(bytes: &[u8]) {
    let (_dir, p) = file("x_32x32.mat", bytes);
    let _ = quick("read_mat_v5", || read_mat_v5(&p));
    if let Ok(d) = quick("load_svhn_mat", || load_svhn_mat(&p, "svhn")) {
        for i in 0..d.len() {
            assert_eq!(d.image(i).len(), 3072);
        }
    }
}

fn decode(bytes: &[u8]) {
    if let Ok(img) = quick("decode_rgb_bytes", || {
        decode_rgb_bytes(bytes, Path::new("fuzz.img"))
    }) {
        assert_eq!(img.data.len(), 3 * img.width * img.height);
    }
}

fn png_fixture() -> Vec<u8> {
    encoded_image(16, 12, image::ImageFormat::Png)
}

fn jpeg_fixture() -> Vec<u8> {
    encoded_image(16, 12, image::ImageFormat::Jpeg)
}

/// Where a symbolic link in a random tree points.
#[derive(Debug, Clone)]
enum Target {
    Dot,
    Parent,
    GrandParent,
    Root,
    Class(usize),
    Outside,
    Nowhere,
    /// An image written before, by index.
    Earlier(Index),
}

/// What an entry of a random tree is.
#[derive(Debug, Clone)]
enum Node {
    Png,
    Jpeg,
    Junk(Vec<u8>),
    Dir,
    Link(Target),
}

/// One entry: under class `class` (a link at the root when `None`), in nested folders `sub`.
#[derive(Debug, Clone)]
struct Entry {
    class: Option<usize>,
    sub: Vec<u8>,
    name: u8,
    ext: usize,
    node: Node,
}

const EXTS: [&str; 5] = ["png", "jpg", "JPEG", "txt", ""];

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        Just(Target::Dot),
        Just(Target::Parent),
        Just(Target::GrandParent),
        Just(Target::Root),
        (0..3usize).prop_map(Target::Class),
        Just(Target::Outside),
        Just(Target::Nowhere),
        any::<Index>().prop_map(Target::Earlier),
    ]
}

fn node() -> impl Strategy<Value = Node> {
    prop_oneof![
        2 => Just(Node::Png),
        1 => Just(Node::Jpeg),
        1 => vec(any::<u8>(), 0..64).prop_map(Node::Junk),
        1 => Just(Node::Dir),
        3 => target().prop_map(Node::Link),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        prop_oneof![4 => (0..3usize).prop_map(Some), 1 => Just(None)],
        vec(0..2u8, 0..3),
        0..4u8,
        0..EXTS.len(),
        node(),
    )
        .prop_map(|(class, sub, name, ext, node)| Entry {
            class,
            sub,
            name,
            ext,
            node,
        })
}

/// Lays out `entries` under `root` (errors from clashing names are ignored: the tree is
/// whatever could be made); `outside` is a folder with one image, outside the root.
#[cfg(unix)]
fn build_tree(root: &Path, outside: &Path, entries: &[Entry]) {
    use std::os::unix::fs::symlink;
    let mut images: Vec<PathBuf> = Vec::new();
    for c in 0..3 {
        let _ = std::fs::create_dir_all(root.join(format!("c{c}")));
    }
    for e in entries {
        let dir = match e.class {
            Some(c) => {
                let mut d = root.join(format!("c{c}"));
                for s in &e.sub {
                    d.push(format!("d{s}"));
                }
                d
            }
            None => root.to_path_buf(),
        };
        let _ = std::fs::create_dir_all(&dir);
        let name = match (e.class, EXTS[e.ext]) {
            (None, _) => format!("l{}", e.name),
            (_, "") => format!("f{}", e.name),
            (_, ext) => format!("f{}.{ext}", e.name),
        };
        let p = dir.join(name);
        let _ = match &e.node {
            Node::Png => std::fs::write(&p, png_fixture()).map(|_| images.push(p.clone())),
            Node::Jpeg => std::fs::write(&p, jpeg_fixture()).map(|_| images.push(p.clone())),
            Node::Junk(b) => std::fs::write(&p, b),
            Node::Dir => std::fs::create_dir_all(&p),
            Node::Link(t) => {
                let to: PathBuf = match t {
                    Target::Dot => ".".into(),
                    Target::Parent => "..".into(),
                    Target::GrandParent => "../..".into(),
                    Target::Root => root.to_path_buf(),
                    Target::Class(c) => root.join(format!("c{c}")),
                    Target::Outside => outside.to_path_buf(),
                    Target::Nowhere => root.join("nowhere"),
                    Target::Earlier(i) if !images.is_empty() => {
                        images[i.index(images.len())].clone()
                    }
                    Target::Earlier(_) => outside.join("o.png"),
                };
                symlink(to, &p)
            }
        };
    }
}

/// Opens a random tree and checks what an image folder promises: every sample lies under its
/// own class folder, reached through real directories only, once.
#[cfg(unix)]
fn check_tree(entries: &[Entry]) {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("o.png"), png_fixture()).unwrap();
    build_tree(root.path(), outside.path(), entries);
    let Ok(f) = quick("ImageFolder::open", || ImageFolder::open(root.path(), None)) else {
        return;
    };
    assert!(f.len() <= entries.len() + 1, "{} samples", f.len());
    let mut seen = std::collections::HashSet::new();
    for (i, (p, label)) in f.samples().iter().enumerate() {
        assert!(seen.insert(p.clone()), "{} listed twice", p.display());
        let class_dir = root.path().join(&f.classes()[*label as usize]);
        let rel = p
            .strip_prefix(&class_dir)
            .unwrap_or_else(|_| panic!("{} is not under {}", p.display(), class_dir.display()));
        let mut dir = class_dir.clone();
        for c in rel.parent().into_iter().flat_map(|r| r.components()) {
            dir.push(c);
            let m = std::fs::symlink_metadata(&dir).unwrap();
            assert!(m.is_dir(), "{} reached through a link", p.display());
        }
        assert!(std::fs::metadata(p).unwrap().is_file());
        let _ = quick("ImageFolder::image", || f.image(i));
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn cifar_random_bytes(bytes in vec(any::<u8>(), 0..7000), kind in cifar_kind()) {
        let (_dir, p) = file("data_batch_1.bin", &bytes);
        let _ = quick("read_cifar_file", || read_cifar_file(&p, kind));
    }

    #[test]
    fn cifar_random_records(
        records in vec((vec(any::<u8>(), 2), any::<u8>()), 1..4),
        kind in cifar_kind(),
    ) {
        let label_bytes = if kind == CifarKind::Cifar10 { 1 } else { 2 };
        let bytes: Vec<u8> = records
            .iter()
            .flat_map(|(l, fill)| cifar_record(&l[..label_bytes], *fill))
            .collect();
        let (_dir, p) = file("data_batch_1.bin", &bytes);
        if let Ok(d) = quick("read_cifar_file", || read_cifar_file(&p, kind)) {
            prop_assert_eq!(d.len(), records.len());
        }
    }

    #[test]
    fn cifar_mutated(kind in cifar_kind(), read_as in cifar_kind(), muts in mutations()) {
        let (_dir, p) = file("data_batch_1.bin", &apply(&cifar_fixture(kind), &muts));
        let _ = quick("read_cifar_file", || read_cifar_file(&p, read_as));
    }

    #[test]
    fn idx_random_bytes(
        prefix in prop_oneof![
            Just(vec![]),
            Just(vec![0, 0, 8, 3]),
            Just(vec![0, 0, 8, 1]),
            Just(vec![0x1f, 0x8b]),
        ],
        rest in vec(any::<u8>(), 0..256),
    ) {
        read_idx_all(&[prefix, rest].concat());
    }

    #[test]
    fn idx_raw_mutated(images in any::<bool>(), muts in mutations()) {
        let base = if images { idx_images() } else { idx_labels() };
        read_idx_all(&apply(&base, &muts));
    }

    #[test]
    fn idx_gzip_of_mutated(images in any::<bool>(), muts in mutations(), cuts in vec(any::<Index>(), 0..3)) {
        let base = if images { idx_images() } else { idx_labels() };
        read_idx_all(&multi_gz(&apply(&base, &muts), &cuts));
    }

    #[test]
    fn idx_mutated_gzip(images in any::<bool>(), muts in mutations(), cuts in vec(any::<Index>(), 0..3)) {
        let base = if images { idx_images() } else { idx_labels() };
        read_idx_all(&apply(&multi_gz(&base, &cuts), &muts));
    }

    #[test]
    fn idx_extreme_dimensions(dims in vec(extreme_u32(), 3), data in vec(any::<u8>(), 0..64), zip in any::<bool>()) {
        let raw = idx_bytes(0x803, &dims, &data);
        read_idx_all(&if zip { gz(&raw) } else { raw });
    }

    #[test]
    fn stl10_random(x in vec(any::<u8>(), 0..28000), y in vec(any::<u8>(), 0..3)) {
        read_stl10(&x, &y);
    }

    #[test]
    fn stl10_mutated(mx in mutations(), my in vec(mutation(), 0..3)) {
        let (x, y) = stl10_fixture();
        read_stl10(&apply(&x, &mx), &apply(&y, &my));
    }

    #[test]
    fn mat_random_elements(body in vec(any::<u8>(), 0..512), raw_header in any::<bool>()) {
        // Past a valid header, so that the element parser sees the bytes.
        read_mat(&if raw_header { body } else { mat_file(&body) });
    }

    #[test]
    fn mat_mutated(compressed in any::<bool>(), muts in mutations()) {
        read_mat(&apply(&svhn_mat(2, compressed), &muts));
    }

    #[test]
    fn mat_extreme_arrays(
        name in prop_oneof![Just("X"), Just("y"), Just("z")],
        class in 0..20u8,
        dims in vec(prop_oneof![Just(0), Just(1), Just(3), Just(32), Just(-1), Just(i32::MAX), any::<i32>()], 0..6),
        data_type in 0..16u32,
        data in vec(any::<u8>(), 0..96),
        nesting in 0..20usize,
    ) {
        let mut e = mat_matrix(name, class, &dims, data_type, &data);
        for _ in 0..nesting {
            e = mat_compressed(&e);
        }
        read_mat(&mat_file(&e));
    }

    #[test]
    fn image_random_bytes(
        prefix in prop_oneof![
            Just(b"\x89PNG\r\n\x1a\n".to_vec()),
            Just(vec![0xff, 0xd8, 0xff]),
            Just(vec![]),
        ],
        rest in vec(any::<u8>(), 0..512),
    ) {
        decode(&[prefix, rest].concat());
    }

    #[test]
    fn image_mutated(jpeg in any::<bool>(), muts in mutations()) {
        let base = if jpeg { jpeg_fixture() } else { png_fixture() };
        decode(&apply(&base, &muts));
    }

    #[test]
    fn png_extreme_headers(w in extreme_u32(), h in extreme_u32(), rows in vec(any::<u8>(), 0..256)) {
        // Valid chunks and CRCs around any dimensions and data.
        decode(&png_file(w, h, &rows));
    }
}

#[cfg(unix)]
proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn image_folder_random_trees(entries in vec(entry(), 0..12)) {
        check_tree(&entries);
    }
}
