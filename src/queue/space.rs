//! Free space of the queue's file system (statvfs), against `queue.min_free`.
//!
//! The queue never takes the last free bytes of its file system: while less than the reserve is
//! free, a commit group may not make the queue larger than it is (new events take the place of
//! the oldest telemetry, or are turned away, as `queue.when_full` says, counted). The reserve
//! keeps room for what every write needs besides the rows themselves: the WAL (about 1 MiB
//! between checkpoints, plus a commit group), the deletes of acknowledged events (which also
//! go through the WAL), and other programs. Behind it, a [`Ballast`] file holds space that is
//! handed back when a commit meets a full disk anyway (another program filled it).

use std::path::Path;

/// Sizes of a file system, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Available to an unprivileged writer.
    pub free: u64,
    pub total: u64,
}

/// statvfs(3) of the file system holding `dir`.
// u64::from: these fields are 32-bit on some targets (armhf), 64-bit here.
#[allow(clippy::useless_conversion)]
pub fn of(dir: &Path) -> std::io::Result<Space> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call; `st` is a writable buffer of
    // the right type, read only after the call reported success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded and filled the structure.
    let st = unsafe { st.assume_init() };
    let unit = u64::from(st.f_frsize);
    Ok(Space {
        free: u64::from(st.f_bavail).saturating_mul(unit),
        total: u64::from(st.f_blocks).saturating_mul(unit),
    })
}

/// A file of [`BALLAST_BYTES`] kept beside the queue, given back to the file system when a
/// commit finds the disk full: the acknowledgements (and evictions) that free space need
/// space themselves (their WAL frames, and the checkpoint that moves them into the file, which
/// may have to grow it). Without it, a full disk stays full (issue 12.3).
pub struct Ballast {
    path: std::path::PathBuf,
    present: bool,
}

/// Size of the ballast: the WAL's allowance (a checkpoint may grow the file by that much).
pub const BALLAST_BYTES: u64 = super::store::WAL_LIMIT;

impl Ballast {
    pub fn new(dir: &Path) -> Ballast {
        Ballast {
            path: dir.join("queue.reserve"),
            present: false,
        }
    }

    pub fn present(&self) -> bool {
        self.present
    }

    /// Make sure the ballast exists with its full size (written, not sparse).
    pub fn fill(&mut self) -> std::io::Result<()> {
        if self.present {
            return Ok(());
        }
        let have = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if have < BALLAST_BYTES {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let chunk = vec![0u8; 64 * 1024];
            let mut left = BALLAST_BYTES - have;
            let written = (|| {
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    f.write_all(&chunk[..n])?;
                    left -= n as u64;
                }
                f.sync_all()
            })();
            if let Err(e) = written {
                // Do not hold half a ballast on a full disk.
                drop(f);
                let _ = std::fs::remove_file(&self.path);
                return Err(e);
            }
        }
        self.present = true;
        Ok(())
    }

    /// Give the space back (the file is removed). Returns whether there was any to give.
    pub fn release(&mut self) -> bool {
        let had = self.present || self.path.exists();
        self.present = false;
        match std::fs::remove_file(&self.path) {
            Ok(()) => had,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                tracing::error!(error = %e, path = %self.path.display(), "queue: removing the space reserve failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_file_system_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::of(dir.path()).unwrap();
        assert!(s.total > 0 && s.free <= s.total, "{s:?}");
        assert!(super::of(&dir.path().join("missing")).is_err());
    }
}
