//! The convolution family on CUDA through cuDNN (feature `cudnn`): the forward convolution,
//! its input gradient (cuDNN's backward-data) and its weight gradient (backward-filter), one
//! cuDNN call each on contiguous NCHW f32 or f64 operands. These are the `cuda_fwd` of the
//! three custom ops, whose backward passes are each other, so the exact SGR gradient (second
//! order) goes through cuDNN too.
//!
//! candle 0.11's own CUDA convolution takes cuDNN for the forward pass only: its weight
//! gradient (a non-contiguous kernel argument) and input gradient (a transposed convolution)
//! fall back to direct kernels that are far slower.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape};
use cudarc::cudnn::sys::{cudnnConvolutionMode_t, cudnnTensorFormat_t};
use cudarc::cudnn::{ConvBackwardData, ConvBackwardFilter, ConvForward, Cudnn, CudnnDataType};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use crate::geom::ConvGeom;

// cuDNN handles are neither Send nor Sync: one per thread and device, as candle keeps them.
thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
}

fn handle(dev: &CudaDevice) -> candle_core::Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream())?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

/// Which member of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// `y = conv(x, w)`: operands `(x, w)`.
    Forward,
    /// `dx = conv_dx(gy, w)`: operands `(gy, w)`.
    InputGrad,
    /// `dw = conv_dw(x, gy)`: operands `(x, gy)`.
    WeightGrad,
}

/// Runs `which` on CUDA operands `(a, la)`, `(b, lb)` of geometry `g`; returns the output
/// and its shape. The operands must be contiguous (the callers make them so).
pub fn conv(
    which: Which,
    g: &ConvGeom,
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    match (a.dtype(), b.dtype()) {
        (DType::F32, DType::F32) => run::<f32>(which, g, a, la, b, lb),
        (DType::F64, DType::F64) => run::<f64>(which, g, a, la, b, lb),
        (x, y) => candle_core::bail!(
            "sgr cuDNN convolution: f32 or f64 operands of one dtype, got {x:?} and {y:?}"
        ),
    }
}

fn run<T>(
    which: Which,
    g: &ConvGeom,
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)>
where
    T: CudaDType + CudnnDataType + DeviceRepr + ValidAsZeroBits + num_traits_like::OneZero,
{
    let dev = a.device().clone();
    let cudnn = handle(&dev)?;
    let i = |v: usize| v as i32;
    let conv = cudnn.create_conv2d::<T>(
        [i(g.pad), i(g.pad)],
        [i(g.stride), i(g.stride)],
        [1, 1],
        cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    )?;
    let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let x = cudnn.create_4d_tensor::<T>(nchw, [i(g.n), i(g.c), i(g.h), i(g.w)])?;
    let w = cudnn.create_4d_filter::<T>(nchw, [i(g.o), i(g.c), i(g.kh), i(g.kw)])?;
    let y = cudnn.create_4d_tensor::<T>(nchw, [i(g.n), i(g.o), i(g.ho()), i(g.wo())])?;
    fn view<'s, T: CudaDType>(
        s: &'s CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<cudarc::driver::CudaView<'s, T>> {
        let (start, end) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("sgr cuDNN convolution: operands must be contiguous".into())
        })?;
        Ok(s.as_cuda_slice::<T>()?.slice(start..end))
    }
    let (va, vb) = (view::<T>(a, la)?, view::<T>(b, lb)?);
    let stream = dev.cuda_stream();
    let (one, zero) = (T::one(), T::zero());
    let (out, shape): (CudaSlice<T>, Shape) = match which {
        Which::Forward => {
            let op = ConvForward {
                conv: &conv,
                x: &x,
                w: &w,
                y: &y,
            };
            let algo = op.pick_algorithm()?;
            let mut ws = stream.alloc_zeros::<u8>(op.get_workspace_size(algo)?)?;
            let mut out = stream.alloc_zeros::<T>(g.n * g.o * g.ho() * g.wo())?;
            // SAFETY: the descriptors match the operands' contiguous NCHW extents and `out`.
            unsafe { op.launch(algo, Some(&mut ws), (one, zero), &va, &vb, &mut out) }?;
            (out, Shape::from((g.n, g.o, g.ho(), g.wo())))
        }
        Which::InputGrad => {
            let op = ConvBackwardData {
                conv: &conv,
                dx: &x,
                w: &w,
                dy: &y,
            };
            let algo = op.pick_algorithm()?;
            let mut ws = stream.alloc_zeros::<u8>(op.get_workspace_size(algo)?)?;
            let mut out = stream.alloc_zeros::<T>(g.n * g.c * g.h * g.w)?;
            // SAFETY: as above; `va` is dy, `vb` the filter.
            unsafe { op.launch(algo, Some(&mut ws), (one, zero), &mut out, &vb, &va) }?;
            (out, Shape::from((g.n, g.c, g.h, g.w)))
        }
        Which::WeightGrad => {
            let op = ConvBackwardFilter {
                conv: &conv,
                x: &x,
                dw: &w,
                dy: &y,
            };
            let algo = op.pick_algorithm()?;
            let mut ws = stream.alloc_zeros::<u8>(op.get_workspace_size(algo)?)?;
            let mut out = stream.alloc_zeros::<T>(g.o * g.c * g.kh * g.kw)?;
            // SAFETY: as above; `va` is x, `vb` is dy.
            unsafe { op.launch(algo, Some(&mut ws), (one, zero), &va, &mut out, &vb) }?;
            (out, Shape::from((g.o, g.c, g.kh, g.kw)))
        }
    };
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// The scaling constants cuDNN takes, for f32 and f64.
mod num_traits_like {
    pub trait OneZero: Copy {
        fn one() -> Self;
        fn zero() -> Self;
    }
    impl OneZero for f32 {
        fn one() -> Self {
            1.0
        }
        fn zero() -> Self {
            0.0
        }
    }
    impl OneZero for f64 {
        fn one() -> Self {
            1.0
        }
        fn zero() -> Self {
            0.0
        }
    }
}
