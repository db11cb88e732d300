//! Builders of valid inputs for every reader, shared by the regression and fuzz tests.

#![allow(dead_code)]

use std::io::Write;

/// An IDX file: big-endian magic, dimensions, data.
pub fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = magic.to_be_bytes().to_vec();
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend(data);
    b
}

/// One gzip member holding `bytes`.
pub fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A zlib stream holding `bytes`.
pub fn zlib(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A CIFAR record: label byte(s), then 3072 pixel bytes.
pub fn cifar_record(label: &[u8], fill: u8) -> Vec<u8> {
    let mut r = label.to_vec();
    r.extend((0..3072).map(|i| fill.wrapping_add((i % 251) as u8)));
    r
}

/// A MATLAB v5 data element: tag (type, byte count), data, padding to 8 bytes.
pub fn mat_element(ty: u32, data: &[u8]) -> Vec<u8> {
    let mut b = ty.to_le_bytes().to_vec();
    b.extend((data.len() as u32).to_le_bytes());
    b.extend(data);
    b.resize(b.len().div_ceil(8) * 8, 0);
    b
}

/// A miCOMPRESSED element holding `element` (not padded, as MATLAB writes it).
pub fn mat_compressed(element: &[u8]) -> Vec<u8> {
    let z = zlib(element);
    let mut b = 15u32.to_le_bytes().to_vec();
    b.extend((z.len() as u32).to_le_bytes());
    b.extend(z);
    b
}

/// A miMATRIX element: numeric array `name` of MATLAB class `class` (6 double, 9 uint8, ...),
/// with `dims` and data of MAT type `data_type` (2 uint8, 9 double, ...).
pub fn mat_matrix(name: &str, class: u8, dims: &[i32], data_type: u32, data: &[u8]) -> Vec<u8> {
    let mut m = mat_element(6, &[class, 0, 0, 0, 0, 0, 0, 0]);
    let d: Vec<u8> = dims.iter().flat_map(|x| x.to_le_bytes()).collect();
    m.extend(mat_element(5, &d));
    m.extend(mat_element(1, name.as_bytes()));
    m.extend(mat_element(data_type, data));
    mat_element(14, &m)
}

/// A MATLAB level-5 file: the 128-byte header, then `elements`.
pub fn mat_file(elements: &[u8]) -> Vec<u8> {
    let mut h = b"MATLAB 5.0 MAT-file, written by sgr-data tests".to_vec();
    h.resize(116, b' ');
    h.extend([0u8; 8]);
    h.extend(0x0100u16.to_le_bytes());
    h.extend(b"IM");
    h.extend(elements);
    h
}

/// An SVHN-layout MAT file with `n` images (X uint8 32x32x3xN, y double Nx1), optionally with
/// each variable compressed.
pub fn svhn_mat(n: usize, compressed: bool) -> Vec<u8> {
    let x: Vec<u8> = (0..n * 3072).map(|i| (i % 253) as u8).collect();
    let y: Vec<u8> = (0..n)
        .flat_map(|i| (1.0 + (i % 10) as f64).to_le_bytes())
        .collect();
    let ex = mat_matrix("X", 9, &[32, 32, 3, n as i32], 2, &x);
    let ey = mat_matrix("y", 6, &[n as i32, 1], 9, &y);
    let mut body = Vec::new();
    for e in [ex, ey] {
        body.extend(if compressed { mat_compressed(&e) } else { e });
    }
    mat_file(&body)
}

/// A small RGB noise image encoded as `format`.
pub fn encoded_image(w: u32, h: u32, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = (x * 31 + y * 17) as u8;
        image::Rgb([v, v.wrapping_mul(3), v ^ 0x5a])
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, format).unwrap();
    buf.into_inner()
}

/// A PNG chunk: length, type, data, CRC.
pub fn png_chunk(ty: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut b = (data.len() as u32).to_be_bytes().to_vec();
    b.extend(ty);
    b.extend(data);
    let mut crc = flate2::Crc::new();
    crc.update(ty);
    crc.update(data);
    b.extend(crc.sum().to_be_bytes());
    b
}

/// An 8-bit grey PNG declaring `w` x `h` whose image data is `rows` (filter bytes included),
/// compressed: it may hold fewer rows than it declares.
pub fn png_file(w: u32, h: u32, rows: &[u8]) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    b.extend(png_chunk(b"IHDR", &ihdr));
    b.extend(png_chunk(b"IDAT", &zlib(rows)));
    b.extend(png_chunk(b"IEND", &[]));
    b
}
