//! The fast CPU kernels against candle's own ops, side by side, at the layer shapes of a
//! CIFAR ResNet at batch 128 (f32, all cores).
//!
//! `cargo bench -p sgr-kernels --bench kernels`
//!
//! For each shape: convolution forward, input gradient and weight gradient (ms and GFLOP/s of
//! the forward); for BatchNorm + ReLU rows the forward alone and the batch statistics (`st`);
//! then forward + backward through autograd for candle and for sgr, and their ratio. candle's input gradient is its
//! `conv_transpose2d`, its weight gradient a `conv2d` over the batch axis (what its autograd
//! runs); the BatchNorm reference is the primitive formula that sgr's BatchNorm falls back to.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use sgr_kernels as kernels;

/// glibc's allocator tuned as the training binaries tune it: large blocks stay in the heap
/// instead of a fresh `mmap` (and its page faults) per tensor.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[reps / 2]
}

fn bn_reference(x: &Tensor, g: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(&[0, 2, 3][..])?;
    let c = x.broadcast_sub(&mean)?;
    let var = c.sqr()?.mean_keepdim(&[0, 2, 3][..])?;
    let xhat = c.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
    let ch = x.dim(1)?;
    xhat.broadcast_mul(&g.reshape((1, ch, 1, 1))?)?
        .broadcast_add(&b.reshape((1, ch, 1, 1))?)
}

fn main() -> candle_core::Result<()> {
    tune_allocator();
    let dev = Device::Cpu;
    let n = 128;
    let reps = 5;
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "layer (batch 128, f32)", "fwd ms", "GFLOP/s", "dx ms", "dw ms", "candle", "sgr", "ratio"
    );
    // (channels in, out, spatial size, stride)
    for (cin, cout, hw, stride) in [
        (16, 16, 32, 1),
        (16, 32, 32, 2),
        (32, 32, 16, 1),
        (64, 64, 8, 1),
    ] {
        let x = Tensor::randn(0f32, 1.0, (n, cin, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.1, (cout, cin, 3, 3), &dev)?;
        let y = kernels::conv2d(&x, &w, stride, 1)?;
        let g = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
        let ho = y.dim(2)?;
        let flops = 2.0 * (n * cout * ho * ho * cin * 9) as f64;
        let fwd = median_ms(reps, || {
            kernels::conv2d(&x, &w, stride, 1).unwrap();
        });
        let dx = median_ms(reps, || {
            kernels::conv2d_input_grad(&g, &w, (hw, hw), stride, 1).unwrap();
        });
        let dw = median_ms(reps, || {
            kernels::conv2d_weight_grad(&x, &g, (3, 3), stride, 1).unwrap();
        });
        // forward + backward through Vars (so the custom ops' backward runs), against candle
        let xv = Var::from_tensor(&x)?;
        let wv = Var::from_tensor(&w)?;
        let total = median_ms(reps, || {
            let y = kernels::conv2d(xv.as_tensor(), wv.as_tensor(), stride, 1).unwrap();
            (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        });
        let cand = median_ms(reps, || {
            let y = xv
                .as_tensor()
                .conv2d(wv.as_tensor(), 1, stride, 1, 1)
                .unwrap();
            (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        });
        println!(
            "{:<28} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>6.1}x",
            format!("conv {cin}->{cout} {hw}x{hw} s{stride}"),
            fwd,
            flops / fwd / 1e6,
            dx,
            dw,
            cand,
            total,
            cand / total
        );
    }
    for (c, hw) in [(16, 32), (32, 16), (64, 8)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev)?)?;
        let gm = Var::from_tensor(&Tensor::ones(c, DType::F32, &dev)?)?;
        let bt = Var::from_tensor(&Tensor::zeros(c, DType::F32, &dev)?)?;
        let g = Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev)?;
        let stats_ms = median_ms(reps, || {
            kernels::batch_stats(x.as_tensor()).unwrap();
        });
        let st0 = kernels::batch_stats(x.as_tensor())?;
        let fwd_ms = median_ms(reps, || {
            kernels::batch_norm_train_act(
                &x.as_tensor().detach(),
                &gm.as_tensor().detach(),
                &bt.as_tensor().detach(),
                None,
                true,
                &st0,
                1e-5,
            )
            .unwrap();
        });
        let fast = median_ms(reps, || {
            let st = kernels::batch_stats(x.as_tensor()).unwrap();
            let y = kernels::batch_norm_train_act(
                x.as_tensor(),
                gm.as_tensor(),
                bt.as_tensor(),
                None,
                true,
                &st,
                1e-5,
            )
            .unwrap();
            (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        });
        let cand = median_ms(reps, || {
            let y = bn_reference(x.as_tensor(), gm.as_tensor(), bt.as_tensor())
                .unwrap()
                .relu()
                .unwrap();
            (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        });
        println!(
            "{:<28} {:>9.1} {:>9} {:>9} {:>9} {:>9.1} {:>9.1} {:>6.1}x",
            format!("bn+relu fwd+bwd {c} {hw}x{hw}"),
            fwd_ms,
            format!("st {stats_ms:.1}"),
            "",
            "",
            cand,
            fast,
            cand / fast
        );
    }
    Ok(())
}
