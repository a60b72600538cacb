//! Small helpers shared by the modules: durable file writes, names, ids and clocks.

use std::io::Write;
use std::path::Path;

use crate::error::{invalid, Error, Result};

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A random id with a prefix, e.g. `op-5f3a9c...` (16 hex digits from the kernel's RNG).
pub fn random_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    let filled = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !filled {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()) << 32;
        b = n.to_le_bytes();
    }
    format!("{prefix}-{}", hex::encode(b))
}

/// Checks an image name: 1 to 128 characters of letters, digits, `.`, `_`, `-`, not starting
/// with `.` or `-` (so it is a safe file name and a safe CLI argument).
pub fn validate_image_name(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() {
        return Err(invalid(
            "image name is empty: give a name like web-2026-11-26",
        ));
    }
    if name.len() > 128 {
        return Err(invalid(format!(
            "image name is {} characters long; at most 128",
            name.len()
        )));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(invalid(format!(
            "image name {name:?} must not start with '.' or '-'"
        )));
    }
    if let Some(c) = name.chars().find(|c| !ok_char(*c)) {
        return Err(invalid(format!(
            "image name {name:?} contains {c:?}: use only letters, digits, '.', '_' and '-'"
        )));
    }
    Ok(())
}

/// Writes `data` to `path` durably: a temp file in the same directory, fsync, rename over
/// `path`, fsync of the directory. Readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| {
        // Manifests and journal entries describe guests (journal entries hold original guest
        // files, which may carry network secrets): readable by the daemon's user only.
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        fsync_dir(dir)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("writing {}", path.display()), e));
    }
    Ok(())
}

/// fsyncs a directory so that renames and unlinks in it are durable.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Formats a byte count for people: `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Formats Unix seconds as RFC 3339 UTC (`2026-11-26T08:36:55Z`).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (proleptic Gregorian), after H. Hinnant's public-domain algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// True when every byte is zero (64-byte blocks OR-folded, which the compiler vectorises).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    blocks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
        && blocks.remainder().iter().all(|&b| b == 0)
}

/// How many glibc malloc arenas a daemon keeps unless `MALLOC_ARENA_MAX` says otherwise.
pub const DAEMON_MALLOC_ARENAS: i32 = 2;
/// Allocations from this size up (the 4 MiB chunk buffers) get their own mapping, returned to
/// the kernel when freed, unless `MALLOC_MMAP_THRESHOLD_` says otherwise. Smaller ones (1 MiB
/// upload pieces, many per chunk) stay in the heap: mapping those cost a capture into imagerepo
/// three times its system time.
pub const DAEMON_MMAP_THRESHOLD: i32 = 4 << 20;

/// Makes glibc's malloc keep a long-running daemon's memory flat; call it from `main` before
/// any thread starts.
///
/// The data path allocates multi-MiB buffers (4 MiB chunks) on many runtime and blocking
/// threads. By default glibc gives each thread that contends an arena of its own (up to 8 per
/// core) and, once such a buffer is freed, raises its mmap threshold so that later buffers come
/// from those arenas, whose freed memory mostly stays resident: resident memory then creeps up
/// with every capture's pattern of threads. Two arenas, and a fixed threshold of 4 MiB (chunk
/// buffers are mapped and unmapped: a few per capture), keep it flat.
/// Done in the process rather than only in the systemd unit, so a daemon started by hand or by
/// the tests behaves the same. An admin's `MALLOC_ARENA_MAX` / `MALLOC_MMAP_THRESHOLD_` in the
/// environment win (glibc reads them itself).
pub fn tune_malloc_for_daemon() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt only sets an allocator tunable; it is called from `main` before any
            // other thread exists, and M_ARENA_MAX takes any positive int.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, DAEMON_MALLOC_ARENAS);
            }
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above; a fixed threshold (below glibc's 32 MiB maximum) also turns off
            // its dynamic adjustment.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, DAEMON_MMAP_THRESHOLD);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "web-2026.11.26", "A_b-9"] {
            validate_image_name(ok).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "../x",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(validate_image_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_682_215), "2026-11-26T08:36:55Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn bytes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn atomic_write_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
