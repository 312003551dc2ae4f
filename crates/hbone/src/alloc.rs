//! Process-wide allocator tuning for binaries that move bytes through HBONE.

/// glibc returns freed memory at the top of a heap to the kernel as soon as 128 KiB are free,
/// and serves blocks of 128 KiB and more with a fresh `mmap`; HBONE's growable copy buffers
/// (up to 256 KiB) then page-fault on every reuse, which cost about half the CPU per byte in
/// `scripts/bench-hbone`. A high trim threshold (what jemalloc's retention amounts to) removes
/// that. Call once at the start of `main`, before threads start. Returns whether it applied.
pub fn tune_glibc_malloc() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before other threads run.
        return unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20) } == 1;
    }
    #[allow(unreachable_code)]
    false
}
