//! The Transformer kernels against the compositions of candle's ops they replace, side by side,
//! at the shapes of one DeiT-S block at 224×224 and batch 16 (f32, all cores of the rayon pool:
//! set `RAYON_NUM_THREADS`).
//!
//! `cargo bench -p sgr-kernels --bench transformer`
//!
//! Each row times forward alone and forward + backward (a weighted sum of the output as the
//! loss) for the composition (`generic`) and the fused op, and the ratio of the two. The linear
//! rows also give the GFLOP/s of forward + backward (three gemms of `2·rows·cin·cout`).

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use sgr_kernels as kernels;

/// glibc's allocator tuned as the training binaries tune it.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn median_ms(
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[reps / 2])
}

/// Forward ms and forward + backward ms of `f` on the variables `vars`.
fn time(
    reps: usize,
    vars: &[&Var],
    f: &dyn Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<(f64, f64)> {
    let fwd = median_ms(reps, || f().map(drop))?;
    let r = {
        let y = f()?;
        Tensor::randn(0f32, 1.0, y.shape(), y.device())?
    };
    let both = median_ms(reps, || {
        let grads = (f()? * &r)?.sum_all()?.backward()?;
        for v in vars {
            grads.get(v.as_tensor());
        }
        Ok(())
    })?;
    Ok((fwd, both))
}

fn row(
    name: &str,
    reps: usize,
    vars: &[&Var],
    generic: &dyn Fn() -> candle_core::Result<Tensor>,
    fused: &dyn Fn() -> candle_core::Result<Tensor>,
    flops: Option<f64>,
) -> candle_core::Result<()> {
    let (gf, gb) = time(reps, vars, generic)?;
    let (ff, fb) = time(reps, vars, fused)?;
    let rate = flops.map_or(String::new(), |f| format!("{:>9.0}", f / fb / 1e6));
    println!(
        "{name:<34} {gf:>9.2} {gb:>9.2} {ff:>9.2} {fb:>9.2} {:>7.2} {rate}",
        gb / fb
    );
    Ok(())
}

fn main() -> candle_core::Result<()> {
    tune_allocator();
    let dev = Device::Cpu;
    let reps = 7;
    let (b, n, c, heads) = (16, 197, 384, 6);
    let rows = b * n;
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9}",
        "DeiT-S op (batch 16, f32)",
        "cand fwd",
        "cand f+b",
        "sgr fwd",
        "sgr f+b",
        "ratio",
        "GFLOP/s"
    );
    for (name, cin, cout) in [
        ("linear qkv 3152×384→1152", c, 3 * c),
        ("linear proj 3152×384→384", c, c),
        ("linear fc1 3152×384→1536", c, 4 * c),
        ("linear fc2 3152×1536→384", 4 * c, c),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, cin), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, (cout, cin), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.05, cout, &dev)?)?;
        let flops = 3.0 * 2.0 * (rows * cin * cout) as f64;
        row(
            name,
            reps,
            &[&x, &w, &bias],
            &|| kernels::generic::linear(x.as_tensor(), w.as_tensor(), bias.as_tensor()),
            &|| kernels::linear(x.as_tensor(), w.as_tensor(), bias.as_tensor()),
            Some(flops),
        )?;
    }
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, c), &dev)?)?;
    let g = Var::from_tensor(&Tensor::randn(1f32, 0.1, c, &dev)?)?;
    let be = Var::from_tensor(&Tensor::randn(0f32, 0.1, c, &dev)?)?;
    row(
        "layer norm 3152×384",
        reps,
        &[&x, &g, &be],
        &|| kernels::generic::layer_norm(x.as_tensor(), g.as_tensor(), be.as_tensor(), 1e-6),
        &|| kernels::layer_norm(x.as_tensor(), g.as_tensor(), be.as_tensor(), 1e-6),
        None,
    )?;
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, 4 * c), &dev)?)?;
    row(
        "gelu 3152×1536",
        reps,
        &[&h],
        &|| kernels::generic::gelu(h.as_tensor()),
        &|| kernels::gelu(h.as_tensor()),
        None,
    )?;
    let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, 3 * c), &dev)?)?;
    let scale = ((c / heads) as f64).powf(-0.5);
    let flops = 7.0 * 2.0 * (b * heads * n * n * (c / heads)) as f64;
    row(
        "attention 16×6 heads×197×64",
        reps,
        &[&qkv],
        &|| kernels::generic::attention(qkv.as_tensor(), heads, scale),
        &|| kernels::attention(qkv.as_tensor(), heads, scale),
        Some(flops),
    )?;
    Ok(())
}
