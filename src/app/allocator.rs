//! Process-wide allocator setting for the daemon. Layer: app (called once by `main` before
//! the runtime starts).
//!
//! glibc serves allocations over its mmap threshold (128 KiB at start) with a mapping of their
//! own, returned to the system on free, but it raises that threshold to the size of each such
//! block freed (up to 32 MiB). After the first large payload, publishes of up to
//! `broker.max_payload_size` (256 KiB) come from per-thread arenas, which keep what is freed:
//! the RSS then climbs towards the sum of every arena's high-water mark. Measured with
//! `bench/soak.sh --duration 3m` (every attack at once): peak RSS 245 MB (VmHWM 260 MB) with
//! glibc's default, 186 MB (VmHWM 235 MB) with the threshold fixed, the same readings
//! delivered. Fixing it costs one mmap/munmap pair per allocation of 128 KiB or more, which
//! only large payloads make.

/// Fix glibc's mmap threshold at 128 KiB (a no-op on other C libraries).
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes a setting of the allocator; called before any other
        // thread of ours exists.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
        if ok != 1 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) refused; glibc's default stays");
        }
    }
}
