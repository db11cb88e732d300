//! The bytes of the messages between the ranks of a distributed run: tensors with their dtype
//! and shape, exactly (no conversion, so a step on another rank sees the bits this one sent).

use candle_core::{DType, Device, Tensor, Var};

use super::module::{BoundaryRecord, Carry, StepInput, StepRecord};
use crate::objective::{Batch, Targets};
use crate::{Error, Result};

/// Writes values in order; [`Reader`] reads them back in the same order.
#[derive(Default)]
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend(v.to_le_bytes());
    }

    pub(crate) fn f64(&mut self, v: f64) {
        self.0.extend(v.to_bits().to_le_bytes());
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    pub(crate) fn tensor(&mut self, t: &Tensor) -> Result<()> {
        let dims = t.dims().to_vec();
        let t = t.to_device(&Device::Cpu)?.flatten_all()?;
        let (tag, data): (u8, Vec<u8>) = match t.dtype() {
            DType::F32 => (
                0,
                t.to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::F64 => (
                1,
                t.to_vec1::<f64>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::U32 => (
                2,
                t.to_vec1::<u32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::I64 => (
                3,
                t.to_vec1::<i64>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::U8 => (4, t.to_vec1::<u8>()?),
            d => {
                return Err(Error::Internal(format!(
                    "a {d:?} tensor cannot be sent between ranks"
                )))
            }
        };
        self.u8(tag);
        self.u64(dims.len() as u64);
        for d in dims {
            self.u64(d as u64);
        }
        self.bytes(&data);
        Ok(())
    }

    pub(crate) fn opt_tensor(&mut self, t: Option<&Tensor>) -> Result<()> {
        match t {
            None => {
                self.u8(0);
                Ok(())
            }
            Some(t) => {
                self.u8(1);
                self.tensor(t)
            }
        }
    }
}

/// A tensor's decoded values.
enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    U32(Vec<u32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

/// Reads what a [`Writer`] wrote; a message cut short or malformed is an error, never a panic.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

fn malformed(what: &str) -> Error {
    Error::Internal(format!("a message between ranks is malformed ({what})"))
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| malformed("it ends early"))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    pub(crate) fn usize(&mut self) -> Result<usize> {
        usize::try_from(self.u64()?).map_err(|_| malformed("a count out of range"))
    }

    pub(crate) fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_bits(self.u64()?))
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.usize()?;
        self.take(n)
    }

    pub(crate) fn tensor(&mut self, device: &Device) -> Result<Tensor> {
        Ok(match self.data()? {
            (Data::F32(v), dims) => Tensor::from_vec(v, dims, device)?,
            (Data::F64(v), dims) => Tensor::from_vec(v, dims, device)?,
            (Data::U32(v), dims) => Tensor::from_vec(v, dims, device)?,
            (Data::I64(v), dims) => Tensor::from_vec(v, dims, device)?,
            (Data::U8(v), dims) => Tensor::from_vec(v, dims, device)?,
        })
    }

    /// A tensor as a variable, made from the decoded values without a copy (a module's
    /// weights as they travel between ranks).
    pub(crate) fn var(&mut self, device: &Device) -> Result<Var> {
        Ok(match self.data()? {
            (Data::F32(v), dims) => Var::from_vec(v, dims, device)?,
            (Data::F64(v), dims) => Var::from_vec(v, dims, device)?,
            (Data::U32(v), dims) => Var::from_vec(v, dims, device)?,
            (Data::I64(v), dims) => Var::from_vec(v, dims, device)?,
            (Data::U8(v), dims) => Var::from_vec(v, dims, device)?,
        })
    }

    fn data(&mut self) -> Result<(Data, Vec<usize>)> {
        let tag = self.u8()?;
        let rank = self.usize()?;
        if rank > 8 {
            return Err(malformed("a tensor of more than 8 dimensions"));
        }
        let dims = (0..rank)
            .map(|_| self.usize())
            .collect::<Result<Vec<_>>>()?;
        let data = self.bytes()?;
        let n = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| malformed("a tensor's size overflows"))?;
        fn words<const W: usize>(d: &[u8], n: usize) -> Result<Vec<[u8; W]>> {
            if d.len() != n * W {
                return Err(malformed("a tensor's data does not match its shape"));
            }
            Ok(d.chunks_exact(W)
                .map(|c| c.try_into().expect("chunk"))
                .collect())
        }
        let d = match tag {
            0 => Data::F32(
                words::<4>(data, n)?
                    .into_iter()
                    .map(f32::from_le_bytes)
                    .collect(),
            ),
            1 => Data::F64(
                words::<8>(data, n)?
                    .into_iter()
                    .map(f64::from_le_bytes)
                    .collect(),
            ),
            2 => Data::U32(
                words::<4>(data, n)?
                    .into_iter()
                    .map(u32::from_le_bytes)
                    .collect(),
            ),
            3 => Data::I64(
                words::<8>(data, n)?
                    .into_iter()
                    .map(i64::from_le_bytes)
                    .collect(),
            ),
            4 => {
                if data.len() != n {
                    return Err(malformed("a tensor's data does not match its shape"));
                }
                Data::U8(data.to_vec())
            }
            _ => return Err(malformed("an unknown dtype")),
        };
        Ok((d, dims))
    }

    pub(crate) fn opt_tensor(&mut self, device: &Device) -> Result<Option<Tensor>> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.tensor(device)?)),
            _ => Err(malformed("an optional tensor's tag")),
        }
    }

    pub(crate) fn end(&self) -> Result<()> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(malformed("bytes are left over"))
        }
    }
}

pub(crate) fn write_record(w: &mut Writer, r: &StepRecord) -> Result<()> {
    w.u64(r.losses.len() as u64);
    for l in &r.losses {
        w.tensor(l)?;
    }
    w.u64(r.boundaries.len() as u64);
    for b in &r.boundaries {
        w.u64(b.slot as u64);
        w.opt_tensor(b.stats.as_ref())?;
        w.opt_tensor(b.distance.as_ref())?;
    }
    w.opt_tensor(r.correct.as_ref())
}

pub(crate) fn read_record(r: &mut Reader<'_>, device: &Device) -> Result<StepRecord> {
    let n = r.usize()?;
    let losses = (0..n.min(1 << 16))
        .map(|_| r.tensor(device))
        .collect::<Result<Vec<_>>>()?;
    let n = r.usize()?;
    let boundaries = (0..n.min(1 << 16))
        .map(|_| {
            Ok(BoundaryRecord {
                slot: r.usize()?,
                stats: r.opt_tensor(device)?,
                distance: r.opt_tensor(device)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StepRecord {
        losses,
        boundaries,
        correct: r.opt_tensor(device)?,
    })
}

pub(crate) fn write_step(
    w: &mut Writer,
    input: &StepInput,
    carry: &Carry,
    record: &StepRecord,
) -> Result<()> {
    w.u64(input.step as u64);
    w.f64(input.lr);
    w.f64(input.lambda);
    w.u64(input.replica as u64);
    w.tensor(&input.batch.input)?;
    match &input.batch.targets {
        Targets::Labels(t) => {
            w.u8(0);
            w.tensor(t)?;
        }
        Targets::Soft(t) => {
            w.u8(1);
            w.tensor(t)?;
        }
    }
    w.tensor(&carry.h)?;
    w.opt_tensor(carry.a.as_ref())?;
    write_record(w, record)
}

pub(crate) fn read_step(
    r: &mut Reader<'_>,
    device: &Device,
) -> Result<(StepInput, Carry, StepRecord)> {
    let step = r.usize()?;
    let lr = r.f64()?;
    let lambda = r.f64()?;
    let replica = r.usize()?;
    let input = r.tensor(device)?;
    let targets = match r.u8()? {
        0 => Targets::Labels(r.tensor(device)?),
        1 => Targets::Soft(r.tensor(device)?),
        _ => return Err(malformed("a targets tag")),
    };
    let h = r.tensor(device)?;
    let a = r.opt_tensor(device)?;
    let record = read_record(r, device)?;
    Ok((
        StepInput {
            batch: Batch { input, targets },
            step,
            lr,
            lambda,
            replica,
        },
        Carry { h, a },
        record,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_travel_bit_for_bit_and_damaged_messages_are_errors() {
        let d = Device::Cpu;
        let ts = [
            Tensor::new(&[[1.5f32, -0.0, f32::MIN_POSITIVE]], &d).unwrap(),
            Tensor::new(&[1e-300f64, 3.0], &d).unwrap(),
            Tensor::new(&[7u32, 9], &d).unwrap(),
            Tensor::new(&[-3i64], &d).unwrap(),
            Tensor::new(&[1u8, 2, 3], &d).unwrap(),
            Tensor::new(2.5f64, &d).unwrap(),
        ];
        let mut w = Writer::default();
        for t in &ts {
            w.tensor(t).unwrap();
        }
        let mut r = Reader::new(&w.0);
        for t in &ts {
            let back = r.tensor(&d).unwrap();
            assert_eq!(back.dims(), t.dims());
            assert_eq!(back.dtype(), t.dtype());
            let a: Vec<u8> = {
                let mut w = Writer::default();
                w.tensor(&back).unwrap();
                w.0
            };
            let b: Vec<u8> = {
                let mut w = Writer::default();
                w.tensor(t).unwrap();
                w.0
            };
            assert_eq!(a, b);
        }
        r.end().unwrap();
        for cut in 0..w.0.len() {
            let mut r = Reader::new(&w.0[..cut]);
            let all = (0..ts.len()).try_for_each(|_| r.tensor(&d).map(|_| ()));
            assert!(all.is_err(), "cut at {cut}");
        }
    }
}
