//! Whether a PNG or JPEG file is whole: the `image` crate decodes a JPEG that is cut short
//! without an error (its decoder fills in the missing part), so the structure is walked here
//! up to the end marker (PNG `IEND`, JPEG EOI) first.

/// Checks that a PNG's chunks are complete up to `IEND`; the problem otherwise.
pub(crate) fn png(b: &[u8]) -> Result<(), String> {
    let mut pos = 8; // the signature
    loop {
        let Some(head) = b.get(pos..pos + 8) else {
            return Err(format!(
                "truncated PNG: it ends at byte {} before the IEND chunk",
                b.len()
            ));
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let ty = String::from_utf8_lossy(&head[4..8]).into_owned();
        // Data, then the 4-byte CRC.
        let end = (pos + 8).saturating_add(len).saturating_add(4);
        if end > b.len() {
            return Err(format!(
                "truncated PNG: chunk `{ty}` at byte {pos} needs {end} bytes, the file has {}",
                b.len()
            ));
        }
        if &head[4..8] == b"IEND" {
            return Ok(());
        }
        pos = end;
    }
}

/// Checks that a JPEG's segments and entropy-coded data run up to an EOI marker; the problem
/// otherwise. Stray bytes between segments are skipped, as decoders do.
pub(crate) fn jpeg(b: &[u8]) -> Result<(), String> {
    let truncated = |what: &str| {
        Err(format!(
            "truncated JPEG: it ends at byte {} {what}, before the end-of-image marker",
            b.len()
        ))
    };
    let mut pos = 2; // SOI
    loop {
        // The next marker: 0xFF (any number of fill bytes), then a code other than 0x00/0xFF.
        while pos < b.len() && b[pos] != 0xff {
            pos += 1;
        }
        while pos < b.len() && b[pos] == 0xff {
            pos += 1;
        }
        let Some(&code) = b.get(pos) else {
            return truncated("between segments");
        };
        pos += 1;
        match code {
            0xd9 => return Ok(()),
            // Standalone markers: RSTn, TEM, and a stuffed zero out of place.
            0x00 | 0x01 | 0xd0..=0xd7 => continue,
            0x02..=0xbf => {
                return Err(format!(
                    "corrupt JPEG: 0xFF{code:02X} at byte {} is not a JPEG marker",
                    pos - 2
                ))
            }
            _ => {}
        }
        let Some(len) = b.get(pos..pos + 2) else {
            return truncated("in a segment length");
        };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if len < 2 || pos + len > b.len() {
            return truncated(&format!("in segment 0xFF{code:02X} at byte {}", pos - 2));
        }
        pos += len;
        if code == 0xda {
            // Entropy-coded data of a scan: up to the first marker that is not a stuffed 0xFF00
            // or a restart marker.
            loop {
                while pos < b.len() && b[pos] != 0xff {
                    pos += 1;
                }
                match b.get(pos + 1) {
                    None => return truncated("in the image data"),
                    Some(0x00 | 0xd0..=0xd7) => pos += 2,
                    Some(0xff) => pos += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn empty_and_minimal_inputs() {
        assert!(super::png(b"\x89PNG\r\n\x1a\n").is_err());
        let mut iend = b"\x89PNG\r\n\x1a\n".to_vec();
        iend.extend([0, 0, 0, 0]);
        iend.extend(b"IEND");
        iend.extend([0xae, 0x42, 0x60, 0x82]);
        assert!(super::png(&iend).is_ok());
        assert!(super::png(&iend[..iend.len() - 1]).is_err());
        assert!(super::jpeg(b"\xff\xd8").is_err());
        assert!(super::jpeg(b"\xff\xd8\xff\xd9").is_ok());
        // A scan whose data holds a stuffed byte and a restart marker, then EOI.
        let scan = b"\xff\xd8\xff\xda\x00\x02\x12\xff\x00\x34\xff\xd0\x56\xff\xd9";
        assert!(super::jpeg(scan).is_ok());
        assert!(super::jpeg(&scan[..scan.len() - 1]).is_err());
        // A segment length pointing past the end; a reserved marker.
        assert!(super::jpeg(b"\xff\xd8\xff\xe0\x00\x10abc").is_err());
        let e = super::jpeg(b"\xff\xd8\xff garbage\xff\xd9").unwrap_err();
        assert!(e.contains("0xFF20 at byte 2"), "{e}");
    }
}
