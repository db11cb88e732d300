//! Process memory: measurements, and the allocator setting that training needs.

/// Makes glibc keep freed memory for reuse instead of returning it to the kernel.
///
/// By default glibc serves every block above 128 KiB with its own `mmap` and trims the top of the
/// heap on free, so each training step page-faults its activations in again (measured on a
/// ResNet-32 step: ~20 % of the time in the kernel clearing fresh pages). This serves blocks up
/// to 32 MiB from the heap and never trims: the resident set stays at its peak, which a training
/// run reaches anyway. Call it once, first thing in `main`, before other threads start; it is a
/// process-wide setting, so the library never calls it itself. Returns whether it applied
/// (glibc on Linux only).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Makes every thread allocate from one glibc arena.
///
/// With [`tune_allocator`] each arena keeps its own peak. Pipeline workers (docs/parallel.md)
/// reach their peaks at different moments, so with an arena each the resident set is about the
/// sum of the workers' peaks; with one arena it is about the peak of what they hold together.
/// Process-wide: call it first thing in `main`, as [`tune_allocator`]. Returns whether it
/// applied (glibc on Linux only).
pub fn single_arena() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Returns the heap's free memory to the kernel (glibc's `malloc_trim`), in every arena.
///
/// With [`tune_allocator`] glibc keeps freed memory for reuse, and each thread that allocates
/// gets an arena of its own. A step taken on one thread (such as the measuring steps before a
/// pipeline starts) then keeps its peak resident in that thread's arena while other threads
/// allocate their own: call this between the two. Returns whether memory was released.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free pages of the allocator to the kernel.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Peak resident set size of this process in bytes (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    read_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size of this process in bytes (`VmRSS`).
pub fn current_rss_bytes() -> Option<u64> {
    read_status_kib("VmRSS:").map(|k| k * 1024)
}

fn read_status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Device memory of CUDA GPUs: the high-water mark of the device's default memory pool, where
/// cudarc's stream-ordered allocations (`cuMemAllocAsync`) live, so the exact peak of what the
/// tensors held, not the driver's view of the whole GPU.
#[cfg(feature = "cuda")]
pub mod device {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;

    fn pool(dev: &Device) -> Option<sys::CUmemoryPool> {
        let cuda = dev.as_cuda_device().ok()?;
        let stream = cuda.cuda_stream();
        let ctx = stream.context();
        if !ctx.has_async_alloc() {
            return None;
        }
        ctx.bind_to_thread().ok()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
    }

    /// Peak bytes allocated on `dev` since [`reset_peak`] (or since the pool was created);
    /// `None` off CUDA or where the device has no memory pools.
    pub fn peak_bytes(dev: &Device) -> Option<u64> {
        let pool = pool(dev)?;
        let mut v: u64 = 0;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute; `v` is one.
        let r = unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut v as *mut u64 as *mut std::ffi::c_void,
            )
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    /// Starts a new high-water mark at what `dev` holds now; `false` where it cannot.
    pub fn reset_peak(dev: &Device) -> bool {
        let Some(pool) = pool(dev) else {
            return false;
        };
        if let Some(s) = dev.as_cuda_device().ok().map(|c| c.cuda_stream()) {
            let _ = s.synchronize();
        }
        let mut zero: u64 = 0;
        // SAFETY: resetting USED_MEM_HIGH takes a cuuint64_t of 0.
        let r = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut std::ffi::c_void,
            )
        };
        r == sys::CUresult::CUDA_SUCCESS
    }
}
