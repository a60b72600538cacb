//! Import sources: a disk file of the host, opened once and inspected through that descriptor.
//!
//! The path is opened a single time (`O_NOFOLLOW | O_NONBLOCK`, so a symlink is refused and a
//! FIFO or device cannot block the open) and checked with `fstat` before any read: only a
//! non-empty regular file is accepted. Everything after that works on the same open file, never
//! on the path again: `qemu-img info`, `check` and `map` get it as an inherited descriptor
//! (`/dev/fd/3`), and so does the `qemu-nbd` that serves it for reading
//! ([`super::source::NbdExport::start_file`]), with backing files disabled. Replacing the path
//! (or a symlink) after the inspection therefore changes nothing that is read.
//!
//! What is refused, and why:
//! - not a regular file (FIFO, device, directory, socket), a symlink, an empty file;
//! - a virtual size above `[repository] max_virtual_size`;
//! - qcow2: a backing file or an external data file (an upload must not make us read another
//!   file of this host), an image `qemu-img check` finds corrupt, and data clusters that lie
//!   beyond the end of the file (QEMU would read them as zeros: a truncated image would
//!   import as a silently zeroed one);
//! - raw: a file that is recognisably another image format (qcow2, QED, VMDK, VHD, VHDX, VDI,
//!   Parallels, LUKS): stored as raw it would be a different disk from the one meant, and
//!   OpenStack's format inspector refuses such uploads for the same reason. An ISO 9660 image
//!   *is* raw (the guest reads exactly those bytes), so it is accepted.
//!
//! Cost: `qemu-img map` walks the whole virtual size (about 0.4 s for 64 TiB of holes, 6 s per
//! PiB on the test machine), the other steps are O(file). The file's size and modification
//! time are recorded; a file that changes while it is read fails
//! the import ([`SourceFile::check_unchanged`]).

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{internal, invalid, precondition, Error, ErrorKind, Result};

/// The descriptor number the source has in `qemu-img` and `qemu-nbd` children.
pub const CHILD_FD: i32 = 3;

/// An import source, open and inspected.
pub struct SourceFile {
    file: Arc<std::fs::File>,
    path: PathBuf,
    format: String,
    virtual_size: u64,
    stamp: Stamp,
}

/// What tells that a file's bytes changed: its size and modification time. (Not its change
/// time: replacing or unlinking the path, which changes nothing we read, updates that.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
}

impl Stamp {
    fn of(md: &std::fs::Metadata) -> Stamp {
        Stamp {
            len: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
        }
    }
}

impl SourceFile {
    /// Opens `path` once and inspects it as `format` ("qcow2" or "raw"); refuses what the
    /// module documentation lists. Never blocks the async threads.
    pub async fn open(path: &Path, format: &str, max_virtual_size: u64) -> Result<SourceFile> {
        let p = path.to_path_buf();
        let file = tokio::task::spawn_blocking(move || open_regular(&p))
            .await
            .map_err(|e| internal("a blocking task failed").with_source(e))??;
        let md = file
            .metadata()
            .map_err(|e| Error::io(format!("import file {}", path.display()), e))?;
        let file = Arc::new(file);
        let virtual_size = match format {
            "raw" => {
                let f = file.clone();
                let p = path.to_path_buf();
                let len = md.len();
                tokio::task::spawn_blocking(move || refuse_other_formats(&f, &p, len))
                    .await
                    .map_err(|e| internal("a blocking task failed").with_source(e))??;
                md.len()
            }
            "qcow2" => inspect_qcow2(&file, path, md.len(), max_virtual_size).await?,
            other => {
                return Err(invalid(format!(
                    "import format {other:?} is not supported: name the file's format, qcow2 or raw"
                )))
            }
        };
        super::check_virtual_size(
            virtual_size,
            max_virtual_size,
            &format!("import file {}", path.display()),
        )?;
        Ok(SourceFile {
            file,
            path: path.to_path_buf(),
            format: format.to_string(),
            virtual_size,
            stamp: Stamp::of(&md),
        })
    }

    /// The path as given (for messages only: it is never opened again).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// "qcow2" or "raw".
    pub fn format(&self) -> &str {
        &self.format
    }

    /// The guest-visible size.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// The open file.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// The name under which a child that inherited the file as [`CHILD_FD`] opens it, in
    /// QEMU's `json:` syntax, with the format named and backing files disabled.
    pub fn qemu_json(&self) -> String {
        let backing = if self.format == "qcow2" {
            r#""backing":null,"#
        } else {
            ""
        };
        format!(
            r#"json:{{"driver":"{}",{backing}"file":{{"driver":"file","filename":"/dev/fd/{CHILD_FD}"}}}}"#,
            self.format
        )
    }

    /// Fails when the file changed (size or times) since it was inspected.
    pub fn check_unchanged(&self) -> Result<()> {
        let md = self
            .file
            .metadata()
            .map_err(|e| Error::io(format!("import file {}", self.path.display()), e))?;
        if Stamp::of(&md) != self.stamp {
            return Err(precondition(format!(
                "import file {} changed while it was read; nothing was stored: import it again \
                 when nothing writes to it",
                self.path.display()
            )));
        }
        Ok(())
    }
}

/// Opens `path` read-only without following a final symlink and without blocking on a FIFO,
/// and accepts only a non-empty regular file.
fn open_regular(path: &Path) -> Result<std::fs::File> {
    let what = |s: &str| format!("import file {} {s}", path.display());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => invalid(what(
                "is a symbolic link; name the file itself (links are not followed)",
            )),
            Some(libc::ENOENT) => precondition(what("does not exist")),
            _ => Error::new(ErrorKind::FailedPrecondition, what("cannot be read")).with_source(e),
        })?;
    let md = file
        .metadata()
        .map_err(|e| Error::io(what("cannot be examined"), e))?;
    let ft = md.file_type();
    if !ft.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(invalid(what(&format!(
            "is {kind}; only a regular disk image file can be imported"
        ))));
    }
    if md.len() == 0 {
        return Err(invalid(what(
            "is empty (0 bytes); there is no disk to import",
        )));
    }
    // Reads must block normally from here on (O_NONBLOCK only guarded the open).
    // SAFETY: fcntl on a descriptor `file` owns and keeps open; no memory is passed.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
    if rc != 0 {
        return Err(Error::io(
            what("cannot be set to blocking reads"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

/// The image format whose signature `head` (the file's first bytes) or `tail` (its last 512
/// bytes) carries, if any.
pub fn foreign_format(head: &[u8], tail: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        return Some("qcow2 (or qcow)");
    }
    if at(0, b"QED\0") {
        return Some("QED");
    }
    if at(0, b"KDMV") || at(0, b"COWD") {
        return Some("VMDK");
    }
    if at(0, b"# Disk DescriptorFile") {
        return Some("VMDK (descriptor)");
    }
    if at(0, b"vhdxfile") {
        return Some("VHDX");
    }
    if at(0, b"conectix") || tail.starts_with(b"conectix") {
        return Some("VHD");
    }
    if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        return Some("VDI");
    }
    if at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt") {
        return Some("Parallels");
    }
    if at(0, b"LUKS\xba\xbe") {
        return Some("LUKS");
    }
    None
}

/// Refuses a file declared raw whose bytes say it is another image format.
fn refuse_other_formats(file: &std::fs::File, path: &Path, len: u64) -> Result<()> {
    let mut head = vec![0u8; 4096.min(len as usize)];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io(format!("reading import file {}", path.display()), e))?;
    let tail_len = 512.min(len);
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact_at(&mut tail, len - tail_len)
        .map_err(|e| Error::io(format!("reading import file {}", path.display()), e))?;
    if let Some(kind) = foreign_format(&head, &tail) {
        return Err(invalid(format!(
            "import file {} is declared raw but is a {kind} image; import it with its own \
             format, or convert it first (qemu-img convert -O raw)",
            path.display()
        )));
    }
    Ok(())
}

/// Runs `qemu-img ARGS /dev/fd/3` with `file` inherited as descriptor 3; bounded in time.
async fn qemu_img(args: &[&str], file: &std::fs::File) -> Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(args)
        .arg(format!("/dev/fd/{CHILD_FD}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    inherit_as_child_fd(cmd.as_std_mut(), file.as_raw_fd());
    let child = cmd.spawn().map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            "cannot run qemu-img (install qemu-utils)",
        )
        .with_source(e)
    })?;
    match tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await {
        Ok(out) => out.map_err(|e| Error::io("waiting for qemu-img", e)),
        Err(_) => Err(Error::new(
            ErrorKind::Unavailable,
            format!("qemu-img {} did not answer within 120 s", args.join(" ")),
        )),
    }
}

/// Makes the child started by `cmd` find `fd` as its descriptor [`CHILD_FD`].
pub fn inherit_as_child_fd(cmd: &mut std::process::Command, fd: i32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: dup2 and fcntl are async-signal-safe and only act on descriptors; they run in
    // the forked child before exec, where `fd` is still open (it is inherited by the fork).
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == CHILD_FD {
                libc::fcntl(CHILD_FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, CHILD_FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn json_of(out: &std::process::Output, what: &str) -> Result<serde_json::Value> {
    serde_json::from_slice(&out.stdout).map_err(|e| {
        internal(format!("qemu-img {what} printed JSON we cannot read")).with_source(e)
    })
}

/// Inspects a qcow2 through its open descriptor; returns its virtual size.
async fn inspect_qcow2(
    file: &std::fs::File,
    path: &Path,
    file_len: u64,
    max_virtual_size: u64,
) -> Result<u64> {
    let name = path.display();
    let out = qemu_img(&["info", "--output=json", "-f", "qcow2"], file).await?;
    if !out.status.success() {
        return Err(invalid(format!(
            "import file {name} is not a valid qcow2 image: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let info = json_of(&out, "info")?;
    let virtual_size = info
        .get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| internal(format!("qemu-img info gave no virtual size for {name}")))?;
    // The limit first: nothing below may walk a petabyte of tables.
    super::check_virtual_size(
        virtual_size,
        max_virtual_size,
        &format!("import file {name}"),
    )?;
    if let Some(b) = info.get("backing-filename") {
        return Err(invalid(format!(
            "import file {name} names a backing file {b}; flatten it first (qemu-img convert)"
        )));
    }
    if let Some(d) = info.pointer("/format-specific/data/data-file") {
        return Err(invalid(format!(
            "import file {name} names an external data file {d}; refusing to follow it"
        )));
    }
    let out = qemu_img(&["check", "--output=json", "-f", "qcow2"], file).await?;
    // 0: clean; 3: only leaked clusters (harmless for reading). 2: corrupt; 1: not checked.
    match out.status.code() {
        Some(0) | Some(3) => {}
        code => {
            let report = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok();
            let errors = report
                .as_ref()
                .and_then(|r| r.get("corruptions"))
                .and_then(serde_json::Value::as_u64);
            let detail = match (code, errors) {
                (Some(2), Some(n)) => format!("{n} corruptions"),
                _ => String::from_utf8_lossy(&out.stderr).trim().to_string(),
            };
            return Err(invalid(format!(
                "import file {name} is a damaged qcow2 (qemu-img check: {detail}); repair it \
                 (qemu-img check -r all) or upload it again"
            )));
        }
    }
    let out = qemu_img(&["map", "--output=json", "-f", "qcow2"], file).await?;
    if !out.status.success() {
        return Err(invalid(format!(
            "import file {name}: qemu-img map failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    check_map_inside(&json_of(&out, "map")?, file_len, &format!("{name}"))?;
    Ok(virtual_size)
}

/// Fails when a data extent of a `qemu-img map` lies (partly) beyond the end of the file: QEMU
/// would read it as zeros, and the image would import silently zeroed.
pub fn check_map_inside(map: &serde_json::Value, file_len: u64, name: &str) -> Result<()> {
    let Some(entries) = map.as_array() else {
        return Err(internal("qemu-img map printed no list"));
    };
    for e in entries {
        let data = e.get("data").and_then(serde_json::Value::as_bool) == Some(true);
        let (Some(off), Some(len)) = (
            e.get("offset").and_then(serde_json::Value::as_u64),
            e.get("length").and_then(serde_json::Value::as_u64),
        ) else {
            continue;
        };
        if data && off.saturating_add(len) > file_len {
            let start = e
                .get("start")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            return Err(invalid(format!(
                "import file {name} is truncated: guest bytes {start}..{} are stored at file \
                 offset {off}, beyond its end ({file_len} bytes); upload it again",
                start + len
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_signatures_are_recognised() {
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda_107f_u32.to_le_bytes());
        let mut vhd_tail = vec![0u8; 512];
        vhd_tail[..8].copy_from_slice(b"conectix");
        let cases: [(&[u8], &[u8], Option<&str>); 9] = [
            (b"QFI\xfb\0\0\0\x03", b"", Some("qcow2 (or qcow)")),
            (b"KDMV\x01\0\0\0", b"", Some("VMDK")),
            (b"# Disk DescriptorFile\n", b"", Some("VMDK (descriptor)")),
            (b"vhdxfile", b"", Some("VHDX")),
            (b"\0\0\0\0", &vhd_tail, Some("VHD")),
            (&vdi, b"", Some("VDI")),
            (b"QED\0", b"", Some("QED")),
            (b"LUKS\xba\xbe\0\x01", b"", Some("LUKS")),
            (b"\xeb\x63\x90MBR bytes", b"\0\0", None),
        ];
        for (head, tail, want) in cases {
            assert_eq!(foreign_format(head, tail), want, "{head:?}");
        }
    }

    #[test]
    fn map_beyond_the_file_end_is_refused() {
        let map: serde_json::Value = serde_json::from_str(
            r#"[{"start":0,"length":65536,"data":true,"zero":false,"offset":327680},
                {"start":65536,"length":1048576,"data":false,"zero":true}]"#,
        )
        .unwrap();
        check_map_inside(&map, 393216, "x").unwrap();
        let e = check_map_inside(&map, 393215, "x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
