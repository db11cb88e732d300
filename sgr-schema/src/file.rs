//! How every sgr crate reads a file: regular files only, and never more than the file's format
//! allows. A device (`/dev/zero`, `/dev/urandom`), a FIFO or a socket given where a file is
//! expected, directly or through a link, is an error at once, instead of a read that never ends
//! or fills the memory; a FIFO does not even block the open.

use std::fs::File;
use std::io::{Error, ErrorKind, Read};
use std::path::Path;

/// Opens `path` for reading if it is a regular file (links followed) of at most `max` bytes.
pub fn open_regular(path: &Path, max: u64) -> std::io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Opening a FIFO for reading waits for a writer; non-blocking, it returns at once (and
        // regular files ignore the flag).
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let f = opts.open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a folder"
        } else {
            "not a regular file (a device, FIFO or socket)"
        };
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{kind}, where a file is expected"),
        ));
    }
    if meta.len() > max {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!(
                "{} bytes, more than the {max} a file of this kind can have",
                meta.len()
            ),
        ));
    }
    Ok(f)
}

/// The bytes of a regular file of at most `max` bytes ([`open_regular`]); a file that grows
/// past `max` while it is read is an error too.
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let f = open_regular(path, max)?;
    let len = f.metadata()?.len();
    let mut buf = Vec::with_capacity(len as usize);
    f.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("grew past the {max} bytes a file of this kind can have while it was read"),
        ));
    }
    Ok(buf)
}

/// [`read_regular`] as UTF-8 text, without the byte-order mark some editors write first (it
/// is never part of the text).
pub fn read_regular_string(path: &Path, max: u64) -> std::io::Result<String> {
    let mut bytes = read_regular(path, max)?;
    if bytes.starts_with(b"\xef\xbb\xbf") {
        bytes.drain(..3);
    }
    String::from_utf8(bytes)
        .map_err(|e| Error::new(ErrorKind::InvalidData, format!("not UTF-8 text ({e})")))
}

/// Bounds of the files sgr reads: generous for every real file, finite for every mistake.
pub mod limits {
    /// A configuration, class index, run record or chart file.
    pub const TEXT: u64 = 64 << 20;
    /// A safetensors model or checkpoint.
    pub const TENSORS: u64 = 256 << 30;
    /// One encoded image (JPEG, PNG) of an image folder.
    pub const IMAGE: u64 = 256 << 20;
    /// A data set file read whole (a CIFAR batch, an SVHN `.mat`, an STL-10 binary).
    pub const DATA: u64 = 8 << 30;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_are_refused_at_once() {
        for dev in ["/dev/zero", "/dev/urandom", "/dev/null"] {
            if Path::new(dev).exists() {
                let e = read_regular(Path::new(dev), 1 << 20)
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("not a regular file"), "{dev}: {e}");
            }
        }
        let dir = std::env::temp_dir().join(format!("sgr-schema-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = read_regular(&dir, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("a folder"), "{e}");
        let small = dir.join("small");
        std::fs::write(&small, b"0123456789").unwrap();
        assert_eq!(read_regular(&small, 10).unwrap(), b"0123456789");
        std::fs::write(&small, b"\xef\xbb\xbfseed = 1").unwrap();
        assert_eq!(read_regular_string(&small, 64).unwrap(), "seed = 1");
        std::fs::write(&small, b"0123456789").unwrap();
        let e = read_regular(&small, 9).unwrap_err().to_string();
        assert!(e.contains("10 bytes, more than the 9"), "{e}");
        #[cfg(unix)]
        {
            let fifo = dir.join("fifo");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: mkfifo with a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let e = read_regular(&fifo, 1 << 20).unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
            let link = dir.join("link");
            std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
            let e = read_regular(&link, 1 << 20).unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
