//! Whether the store can still write, and how to tell when it could again.
//!
//! sled 0.34 stops for good at its first I/O error (a full disk, a read-only remount, a failed
//! fsync): every later write of that process fails, even once the disk has room again, and
//! only opening the directory anew recovers it. So the first flush that fails marks the store
//! failed here ([`Health::fail`], by the writer thread); the requests that needed it were
//! refused (503), and so will every paid or prepaid request be, while free routes go on.
//! `/readyz` and `tollgate_store_up` tell the operator, and [`writable`] probes the directory
//! until it takes a write again: then the server restarts in place (`crate::server`), and the
//! store is opened and recovered as after any stop.

use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;

/// The first write failure of this process's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What the operating system said, e.g. `No space left on device (os error 28)`.
    pub reason: String,
    /// Unix seconds.
    pub since: u64,
}

/// Shared by the store's handles, its writer thread and whoever reports health.
#[derive(Debug, Default)]
pub struct Health {
    failure: Mutex<Option<Failure>>,
}

impl Health {
    /// Records that a write failed; the first failure is the one kept (sled refuses every
    /// later write for its sake). Returns true the first time.
    pub fn fail(&self, reason: &str, now: u64) -> bool {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if failure.is_some() {
            return false;
        }
        *failure = Some(Failure {
            reason: reason.to_string(),
            since: now,
        });
        true
    }

    /// `None` while every write succeeded.
    pub fn failure(&self) -> Option<Failure> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Bytes the probe writes: two of sled's 512 KiB log segments, the least a reopened store
/// needs before it takes a write.
const PROBE_BYTES: usize = 1 << 20;

/// Whether `dir` takes a write again: a probe file of [`PROBE_BYTES`] is written, synced to
/// disk and removed.
pub fn writable(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(".tollgate-probe");
    let written = std::fs::File::create(&path).and_then(|mut file| {
        file.write_all(&[0u8; PROBE_BYTES])?;
        file.sync_all()
    });
    // Removed whether or not it was written whole: it must not hold the space it probed.
    let removed = std::fs::remove_file(&path);
    written?;
    removed
}

/// An I/O error as the operator reads it (sled's own text is the error's debug form).
/// sled hands some I/O errors on wrapped in its own, whose text is the debug form of the
/// original: the kind says it best then.
pub fn describe(e: &sled::Error) -> String {
    use std::io::ErrorKind;
    match e {
        sled::Error::Io(io) if io.raw_os_error().is_some() => io.to_string(),
        sled::Error::Io(io) => match io.kind() {
            ErrorKind::StorageFull => "No space left on device (disk full)".into(),
            ErrorKind::ReadOnlyFilesystem => "Read-only file system".into(),
            ErrorKind::PermissionDenied => "Permission denied".into(),
            _ => io.to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_kept() {
        let health = Health::default();
        assert_eq!(health.failure(), None);
        assert!(health.fail("No space left on device (os error 28)", 7));
        assert!(!health.fail("something later", 9));
        assert_eq!(
            health.failure(),
            Some(Failure {
                reason: "No space left on device (os error 28)".into(),
                since: 7
            })
        );
    }

    #[test]
    fn wrapped_io_errors_read_as_the_system_says() {
        let wrapped = std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "Os { code: 28, kind: StorageFull }",
        );
        assert_eq!(
            describe(&sled::Error::Io(wrapped)),
            "No space left on device (disk full)"
        );
        let plain = std::io::Error::from_raw_os_error(30);
        assert_eq!(
            describe(&sled::Error::Io(plain)),
            "Read-only file system (os error 30)"
        );
    }

    #[test]
    fn a_writable_directory_passes_and_keeps_no_probe() {
        let dir = std::env::temp_dir().join(format!("tollgate-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        writable(&dir).unwrap();
        assert!(!dir.join(".tollgate-probe").exists());
        assert!(writable(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
