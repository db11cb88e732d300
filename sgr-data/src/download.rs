//! Downloads of CIFAR-10/100 from their official archives, verified by MD5 (feature
//! `download`). Without a network the error says where to put the files instead.

use std::io::Read;
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};

use crate::{CifarKind, DataError, Result};

/// Official archive of a CIFAR variant: (URL, MD5 of the archive, folder inside it).
pub fn cifar_archive(kind: CifarKind) -> (&'static str, &'static str, &'static str) {
    match kind {
        CifarKind::Cifar10 => (
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            "c32a1d4ab5d03f1284b67883e8d87530",
            "cifar-10-batches-bin",
        ),
        _ => (
            "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
            "03b5dce01913d631647c71ecec9e9cb8",
            "cifar-100-binary",
        ),
    }
}

/// Hex MD5 of bytes.
pub fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks an archive's MD5 and extracts it (gzip tar) into `dir`.
pub fn verify_and_extract(archive: &[u8], md5: &str, dir: &Path, source: &str) -> Result<()> {
    let got = md5_hex(archive);
    if got != md5 {
        return Err(DataError::Format {
            path: PathBuf::from(source),
            problem: format!(
                "checksum mismatch: MD5 {got}, expected {md5} (corrupt or partial download)"
            ),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let gz = flate2::read::GzDecoder::new(archive);
    tar::Archive::new(gz)
        .unpack(dir)
        .map_err(|e| DataError::Format {
            path: PathBuf::from(source),
            problem: format!("cannot extract archive: {e}"),
        })
}

/// Downloads and extracts a CIFAR variant into `dir` unless it is already there; returns the
/// folder holding the binary files.
pub fn download_cifar(kind: CifarKind, dir: &Path) -> Result<PathBuf> {
    let (url, md5, folder) = cifar_archive(kind);
    let target = dir.join(folder);
    if target.join(kind.files(false)[0]).is_file() {
        return Ok(target);
    }
    let resp = ureq::get(url).call().map_err(|e| DataError::NotFound {
        what: format!("{kind:?} archive"),
        dir: dir.to_path_buf(),
        hint: format!(
            "download of {url} failed ({e}); without a network, download it elsewhere and extract it so that {} exists",
            target.display()
        ),
    })?;
    let mut bytes = Vec::new();
    resp.into_reader()
        .read_to_end(&mut bytes)
        .map_err(|source| DataError::Io {
            path: PathBuf::from(url),
            source,
        })?;
    verify_and_extract(&bytes, md5, dir, url)?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_of_known_strings() {
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn verifies_then_extracts_an_archive() {
        // A tar.gz laid out like the CIFAR-10 archive, built here.
        let mut tar_bytes = Vec::new();
        {
            let mut b = tar::Builder::new(&mut tar_bytes);
            let mut rec = vec![3u8];
            rec.extend(vec![7u8; 3072]);
            let mut h = tar::Header::new_gnu();
            h.set_size(rec.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(
                &mut h,
                "cifar-10-batches-bin/test_batch.bin",
                rec.as_slice(),
            )
            .unwrap();
            b.finish().unwrap();
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar_bytes).unwrap();
        let archive = gz.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = verify_and_extract(&archive, "00", dir.path(), "fixture.tar.gz")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("checksum mismatch") && e.contains("fixture.tar.gz"),
            "{e}"
        );
        verify_and_extract(&archive, &md5_hex(&archive), dir.path(), "fixture.tar.gz").unwrap();
        let d = crate::load_cifar(dir.path(), CifarKind::Cifar10, false).unwrap();
        assert_eq!(d.labels(), &[3]);
    }
}
