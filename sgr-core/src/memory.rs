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
