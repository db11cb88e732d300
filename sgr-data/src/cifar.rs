//! CIFAR-10 / CIFAR-100 binary format (<https://www.cs.toronto.edu/~kriz/cifar.html>):
//! records of label byte(s) + 3072 bytes (1024 R, 1024 G, 1024 B, row-major 32×32). Any number
//! of records per file is accepted.

use std::path::{Path, PathBuf};

use crate::{DataError, ImageDataset, Result};

/// Which CIFAR variant and label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarKind {
    /// CIFAR-10: 1 label byte, 10 classes.
    Cifar10,
    /// CIFAR-100 with its 100 fine labels (2 label bytes: coarse, fine).
    Cifar100Fine,
    /// CIFAR-100 with its 20 coarse labels.
    Cifar100Coarse,
}

impl CifarKind {
    fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            _ => 2,
        }
    }

    fn classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100Fine => 100,
            CifarKind::Cifar100Coarse => 20,
        }
    }

    /// Files of a split, in order.
    pub fn files(self, train: bool) -> Vec<&'static str> {
        match (self, train) {
            (CifarKind::Cifar10, true) => vec![
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            (CifarKind::Cifar10, false) => vec!["test_batch.bin"],
            (_, true) => vec!["train.bin"],
            (_, false) => vec!["test.bin"],
        }
    }

    fn folder(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "cifar-10-batches-bin",
            _ => "cifar-100-binary",
        }
    }
}

const IMAGE: usize = 3 * 32 * 32;

/// Reads one CIFAR binary file.
pub fn read_cifar_file(path: &Path, kind: CifarKind) -> Result<ImageDataset> {
    let bytes = crate::error::read_file(path, sgr_schema::file::limits::DATA)?;
    let rec = kind.label_bytes() + IMAGE;
    let bad = |problem: String| DataError::Format {
        path: path.to_path_buf(),
        problem,
    };
    if bytes.is_empty() {
        return Err(bad("empty file, expected CIFAR records".into()));
    }
    if bytes.len() % rec != 0 {
        return Err(bad(format!(
            "truncated or not a {kind:?} file: {} bytes is not a multiple of the {rec}-byte record ({} whole records and {} bytes over)",
            bytes.len(),
            bytes.len() / rec,
            bytes.len() % rec
        )));
    }
    let n = bytes.len() / rec;
    let mut pixels = Vec::with_capacity(n * IMAGE);
    let mut labels = Vec::with_capacity(n);
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        let label = match kind {
            CifarKind::Cifar10 => r[0],
            CifarKind::Cifar100Coarse => r[0],
            CifarKind::Cifar100Fine => r[1],
        } as usize;
        if label >= kind.classes() {
            return Err(bad(format!(
                "record {i} has label {label}, outside 0..{} (wrong format?)",
                kind.classes()
            )));
        }
        labels.push(label as u32);
        pixels.extend_from_slice(&r[kind.label_bytes()..]);
    }
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    ImageDataset::new(name, 3, 32, 32, kind.classes(), 255.0, pixels, labels)
}

/// Loads a CIFAR split from `dir` (the extracted binary archive, or its parent folder).
pub fn load_cifar(dir: &Path, kind: CifarKind, train: bool) -> Result<ImageDataset> {
    let candidates: [PathBuf; 2] = [dir.to_path_buf(), dir.join(kind.folder())];
    let files = kind.files(train);
    let root = candidates
        .iter()
        .find(|d| d.join(files[0]).is_file())
        .ok_or_else(|| DataError::NotFound {
            what: format!("{kind:?} {}", files.join(", ")),
            dir: dir.to_path_buf(),
            hint: format!(
                "download the binary version from https://www.cs.toronto.edu/~kriz/cifar.html and extract it so that {} exists (or build sgr with the `download` feature)",
                dir.join(kind.folder()).join(files[0]).display()
            ),
        })?;
    let mut all: Option<ImageDataset> = None;
    for f in &files {
        let d = read_cifar_file(&root.join(f), kind)?;
        match &mut all {
            None => all = Some(d),
            Some(a) => a.extend(d)?,
        }
    }
    let mut all = all.ok_or_else(|| DataError::Invalid("no CIFAR files".into()))?;
    all.name = format!(
        "{}/{}",
        match kind {
            CifarKind::Cifar10 => "cifar10",
            _ => "cifar100",
        },
        if train { "train" } else { "test" }
    );
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: &[u8], fill: u8) -> Vec<u8> {
        let mut r = label.to_vec();
        r.extend((0..IMAGE).map(|i| fill.wrapping_add((i % 251) as u8)));
        r
    }

    #[test]
    fn any_record_count_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("test_batch.bin");
        let mut bytes = Vec::new();
        for (l, f) in [(3u8, 0u8), (9, 7), (0, 200)] {
            bytes.extend(record(&[l], f));
        }
        std::fs::write(&p, &bytes).unwrap();
        let d = load_cifar(dir.path(), CifarKind::Cifar10, false).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d.labels(), &[3, 9, 0]);
        assert_eq!(d.image(1)[0], 7);
        assert_eq!(d.image(1)[1024], 7u8.wrapping_add((1024 % 251) as u8));
    }

    #[test]
    fn cifar100_fine_and_coarse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        let mut bytes = record(&[4, 77], 1);
        bytes.extend(record(&[19, 99], 2));
        std::fs::write(&p, &bytes).unwrap();
        let fine = read_cifar_file(&p, CifarKind::Cifar100Fine).unwrap();
        assert_eq!(fine.labels(), &[77, 99]);
        assert_eq!(fine.num_classes, 100);
        let coarse = read_cifar_file(&p, CifarKind::Cifar100Coarse).unwrap();
        assert_eq!(coarse.labels(), &[4, 19]);
    }

    #[test]
    fn truncated_and_wrong_label_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data_batch_1.bin");
        let mut bytes = record(&[1], 0);
        bytes.extend(&record(&[2], 0)[..100]);
        std::fs::write(&p, &bytes).unwrap();
        let e = read_cifar_file(&p, CifarKind::Cifar10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data_batch_1.bin") && e.contains("truncated"),
            "{e}"
        );
        std::fs::write(&p, record(&[12], 0)).unwrap();
        let e = read_cifar_file(&p, CifarKind::Cifar10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("record 0 has label 12"), "{e}");
        let e = load_cifar(&dir.path().join("nowhere"), CifarKind::Cifar10, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cifar-10-batches-bin"), "{e}");
    }
}
