//! SVHN cropped digits (`train_32x32.mat`, `test_32x32.mat`, `extra_32x32.mat`): MATLAB v5 files
//! with `X` (32×32×3×N uint8, column-major) and `y` (N×1, 1..10 where 10 means digit 0).
//!
//! The MATLAB v5 reader here handles what such files use: little-endian level-5 files, numeric
//! matrices of any numeric storage type, small data elements, and zlib-compressed elements.
//! Compressed elements are inflated only up to the size their inner tag declares, and may nest
//! at most 16 deep.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use crate::{DataError, ImageDataset, Result};

/// Numeric content of a MATLAB array.
#[derive(Debug, Clone, PartialEq)]
pub enum MatData {
    /// Stored as uint8.
    U8(Vec<u8>),
    /// Any other numeric type, converted to f64.
    F64(Vec<f64>),
}

impl MatData {
    fn len(&self) -> usize {
        match self {
            MatData::U8(v) => v.len(),
            MatData::F64(v) => v.len(),
        }
    }

    fn get(&self, i: usize) -> f64 {
        match self {
            MatData::U8(v) => v[i] as f64,
            MatData::F64(v) => v[i],
        }
    }
}

/// A numeric MATLAB array (column-major).
#[derive(Debug, Clone, PartialEq)]
pub struct MatArray {
    /// Dimensions.
    pub dims: Vec<usize>,
    /// Values, column-major.
    pub data: MatData,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

fn u32le(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

impl<'a> Cursor<'a> {
    /// Next data element: (type, data).
    fn element(&mut self) -> std::result::Result<Option<(u32, &'a [u8])>, String> {
        if self.pos >= self.b.len() {
            return Ok(None);
        }
        if self.b.len() - self.pos < 8 {
            return Err(format!("truncated element tag at byte {}", self.pos));
        }
        let t = u32le(self.b, self.pos);
        if t >> 16 != 0 {
            let n = (t >> 16) as usize;
            if n > 4 {
                return Err(format!("bad small element size {n} at byte {}", self.pos));
            }
            let d = &self.b[self.pos + 4..self.pos + 4 + n];
            self.pos += 8;
            return Ok(Some((t & 0xffff, d)));
        }
        let n = u32le(self.b, self.pos + 4) as usize;
        let start = self.pos + 8;
        if self.b.len() - start < n {
            return Err(format!(
                "truncated: element at byte {} declares {n} bytes, {} remain",
                self.pos,
                self.b.len() - start
            ));
        }
        let d = &self.b[start..start + n];
        // Compressed elements are not padded; others are padded to 8 bytes.
        self.pos = if t == MI_COMPRESSED {
            start + n
        } else {
            start + n.div_ceil(8) * 8
        };
        Ok(Some((t, d)))
    }
}

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;

/// How deep miCOMPRESSED elements may nest in one another; real files nest one level.
const MAX_NESTING: usize = 16;

fn numeric(t: u32, d: &[u8]) -> std::result::Result<MatData, String> {
    let conv = |size: usize, f: &dyn Fn(&[u8]) -> f64| -> std::result::Result<MatData, String> {
        if !d.len().is_multiple_of(size) {
            return Err(format!(
                "{} data bytes of type {t} are not a whole number of {size}-byte values",
                d.len()
            ));
        }
        Ok(MatData::F64(d.chunks_exact(size).map(f).collect()))
    };
    match t {
        MI_UINT8 => Ok(MatData::U8(d.to_vec())),
        MI_INT8 => conv(1, &|c| c[0] as i8 as f64),
        MI_INT16 => conv(2, &|c| i16::from_le_bytes([c[0], c[1]]) as f64),
        MI_UINT16 => conv(2, &|c| u16::from_le_bytes([c[0], c[1]]) as f64),
        MI_INT32 => conv(4, &|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
        MI_UINT32 => conv(4, &|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
        MI_SINGLE => conv(4, &|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
        MI_DOUBLE => conv(8, &|c| {
            f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
        }),
        MI_INT64 => conv(8, &|c| {
            i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64
        }),
        MI_UINT64 => conv(8, &|c| {
            u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64
        }),
        other => Err(format!("unsupported numeric data type {other}")),
    }
}

fn matrix(d: &[u8]) -> std::result::Result<Option<(String, MatArray)>, String> {
    let mut c = Cursor { b: d, pos: 0 };
    let (_, flags) = c.element()?.ok_or("matrix without array flags")?;
    if flags.len() < 4 {
        return Err("short array flags".into());
    }
    let class = flags[0];
    // 6..=15 are the numeric classes (double, single, int8..uint64).
    if !(6..=15).contains(&class) {
        return Ok(None);
    }
    if flags[1] & 0x08 != 0 {
        return Err("complex arrays are not supported".into());
    }
    let (dt, dd) = c.element()?.ok_or("matrix without dimensions")?;
    if dt != MI_INT32 {
        return Err(format!("dimensions stored as type {dt}, expected int32"));
    }
    let dims: Vec<usize> = dd
        .chunks_exact(4)
        .map(|x| i32::from_le_bytes([x[0], x[1], x[2], x[3]]).max(0) as usize)
        .collect();
    let (_, name) = c.element()?.ok_or("matrix without a name")?;
    let name = String::from_utf8_lossy(name).into_owned();
    let (rt, rd) = c.element()?.ok_or("matrix without data")?;
    let n = crate::size::product(&dims)
        .ok_or_else(|| format!("array `{name}`: dimensions {dims:?} overflow"))?;
    let data = numeric(rt, rd).map_err(|e| format!("array `{name}`: {e}"))?;
    if data.len() != n {
        return Err(format!(
            "array `{name}` has {} values for dimensions {dims:?}",
            data.len()
        ));
    }
    Ok(Some((name, MatArray { dims, data })))
}

/// Inflates a miCOMPRESSED element's data: the element it holds, read no further than the
/// size that element's tag declares (padded to 8 bytes) plus one byte, to tell one too long.
fn inflate(d: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let corrupt = |e: std::io::Error| format!("corrupt compressed element: {e}");
    let mut z = flate2::read::ZlibDecoder::new(d);
    let mut raw = Vec::new();
    (&mut z).take(8).read_to_end(&mut raw).map_err(corrupt)?;
    if raw.len() < 8 {
        return Err(format!(
            "truncated compressed element: it inflates to {} bytes, less than an element tag",
            raw.len()
        ));
    }
    let t = u32le(&raw, 0);
    let declared: u64 = if t >> 16 != 0 {
        8
    } else {
        8 + u64::from(u32le(&raw, 4)).div_ceil(8) * 8
    };
    (&mut z)
        .take(declared - 8 + 1)
        .read_to_end(&mut raw)
        .map_err(corrupt)?;
    if raw.len() as u64 > declared {
        return Err(format!(
            "compressed element inflates to more than the {declared} bytes its inner tag declares"
        ));
    }
    Ok(raw)
}

fn elements(
    b: &[u8],
    out: &mut HashMap<String, MatArray>,
    depth: usize,
) -> std::result::Result<(), String> {
    let mut c = Cursor { b, pos: 0 };
    while let Some((t, d)) = c.element()? {
        match t {
            MI_MATRIX => {
                if let Some((name, a)) = matrix(d)? {
                    out.insert(name, a);
                }
            }
            MI_COMPRESSED => {
                if depth >= MAX_NESTING {
                    return Err(format!(
                        "compressed elements nested more than {MAX_NESTING} deep (corrupt or hostile file)"
                    ));
                }
                elements(&inflate(d)?, out, depth + 1)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Reads the numeric arrays of a MATLAB level-5 file.
pub fn read_mat_v5(path: &Path) -> Result<HashMap<String, MatArray>> {
    let b = crate::error::read_file(path, sgr_schema::file::limits::DATA)?;
    let bad = |problem: String| DataError::Format {
        path: path.to_path_buf(),
        problem,
    };
    if b.len() < 128 {
        return Err(bad(format!(
            "truncated: {} bytes, a MAT header is 128",
            b.len()
        )));
    }
    let text = String::from_utf8_lossy(&b[..116]);
    if text.starts_with("MATLAB 7.3") {
        return Err(bad("MATLAB 7.3 (HDF5) files are not supported; save with -v7 or use the official SVHN files (level 5)".into()));
    }
    if !text.starts_with("MATLAB 5.0 MAT-file") {
        return Err(bad("not a MATLAB level-5 file (wrong header text)".into()));
    }
    match &b[126..128] {
        b"IM" => {}
        b"MI" => return Err(bad("big-endian MAT files are not supported".into())),
        _ => return Err(bad("bad endian indicator in the MAT header".into())),
    }
    let mut out = HashMap::new();
    elements(&b[128..], &mut out, 0).map_err(bad)?;
    Ok(out)
}

/// Loads an SVHN `*_32x32.mat` file.
pub fn load_svhn_mat(path: &Path, name: &str) -> Result<ImageDataset> {
    let mut m = read_mat_v5(path)?;
    let bad = |problem: String| DataError::Format {
        path: path.to_path_buf(),
        problem,
    };
    let x = m.remove("X").ok_or_else(|| bad("no variable `X`".into()))?;
    let y = m.remove("y").ok_or_else(|| bad("no variable `y`".into()))?;
    if x.dims.len() != 4 || x.dims[0] != 32 || x.dims[1] != 32 || x.dims[2] != 3 {
        return Err(bad(format!(
            "`X` has dimensions {:?}, expected 32x32x3xN",
            x.dims
        )));
    }
    let n = x.dims[3];
    if y.data.len() != n {
        return Err(bad(format!(
            "{} labels in `y` for {n} images in `X`",
            y.data.len()
        )));
    }
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let v = y.data.get(i);
        if !(1.0..=10.0).contains(&v) || v.fract() != 0.0 {
            return Err(bad(format!("label {v} of sample {i} is outside 1..=10")));
        }
        labels.push(if v == 10.0 { 0 } else { v as u32 });
    }
    let mut pixels = vec![0u8; n * 3072];
    for s in 0..n {
        for ch in 0..3 {
            for r in 0..32 {
                for c in 0..32 {
                    let src = r + 32 * c + 1024 * ch + 3072 * s;
                    pixels[s * 3072 + ch * 1024 + r * 32 + c] = x.data.get(src) as u8;
                }
            }
        }
    }
    ImageDataset::new(name, 3, 32, 32, 10, 255.0, pixels, labels)
}

/// Loads `train_32x32.mat` or `test_32x32.mat` from `dir`.
pub fn load_svhn_dir(dir: &Path, train: bool) -> Result<ImageDataset> {
    let file = if train {
        "train_32x32.mat"
    } else {
        "test_32x32.mat"
    };
    let p = dir.join(file);
    if !p.is_file() {
        return Err(DataError::NotFound {
            what: file.into(),
            dir: dir.to_path_buf(),
            hint: "download the cropped-digit files from http://ufldl.stanford.edu/housenumbers/"
                .into(),
        });
    }
    load_svhn_mat(
        &p,
        &format!("svhn/{}", if train { "train" } else { "test" }),
    )
}
