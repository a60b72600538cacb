//! Block sources: where the data path reads a disk from. Every source is an NBD export
//! with `base:allocation`, behind the [`BlockSource`] trait: a disk file served read-only by
//! `qemu-nbd` ([`NbdExport`], cold captures and imports) or a running domain's point-in-time
//! view served by QEMU itself during a libvirt pull-mode backup
//! ([`super::live::BackupExport`]).
//!
//! The format is always named (`--format`), never probed: a raw disk whose first bytes look
//! like a qcow2 header must not be read as one. QEMU follows a qcow2 backing chain itself.
//! While qemu-nbd holds the image open it holds QEMU's shared image lock, which keeps a
//! QEMU from starting on the same disk for writing: the domain cannot start mid-capture.
//! The child gets SIGKILL if the daemon dies (`PR_SET_PDEATHSIG`) and on drop. A killed
//! qemu-nbd never removes its socket: the export removes it when stopped or dropped (also when
//! qemu-nbd failed to start), and the daemon sweeps those a killed daemon left at its next
//! start (the journal's run-directory sweep).
//!
//! Imports use [`NbdExport::start_file`]: qemu-nbd inherits the descriptor the import was
//! inspected through ([`super::inspect::SourceFile`]) and opens it as `/dev/fd/3` with backing
//! files disabled, so it reads exactly the file that was inspected, whatever the path names now.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::error::{Error, ErrorKind, Result};
use crate::nbd::{ConnectOptions, Extent, NbdClient};
use crate::repo::ChunkBuf;

/// The NBD meta context that reports holes and zeros.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Something the data path reads a disk from: it opens one [`DiskReader`] per worker.
#[tonic::async_trait]
pub trait BlockSource: Send + Sync {
    /// Opens one more reader (an NBD connection with `base:allocation` negotiated, or the
    /// disk file read in process).
    async fn reader(&self) -> Result<Box<dyn DiskReader>>;
    /// What is read, for messages ("/var/lib/x.qcow2 (qcow2)", "domain web1 disk vda").
    fn describe(&self) -> &str;
    /// The disk's extents with [`crate::nbd::NBD_STATE_DIRTY`] set where a block was written
    /// since the checkpoint an incremental backup job counts from; None when the source has
    /// no such map (a file, a full backup job).
    async fn changed_map(&self) -> Result<Option<Vec<Extent>>> {
        Ok(None)
    }
}

/// One reader of a block source, owned by one worker at a time.
#[tonic::async_trait]
pub trait DiskReader: Send {
    /// The disk's virtual size in bytes.
    fn size(&self) -> u64;
    /// The whole disk's extents, in order and covering it: data, or known zeros
    /// ([`crate::nbd::NBD_STATE_ZERO`]).
    async fn allocation_map(&mut self) -> Result<Vec<Extent>>;
    /// Reads `at.len()` bytes of the disk at `offset` into `buf[at]`. The buffer goes by value
    /// so that a reader may fill it on another thread; it always comes back, with the outcome.
    async fn read(
        &mut self,
        offset: u64,
        buf: ChunkBuf,
        at: std::ops::Range<usize>,
    ) -> (ChunkBuf, Result<()>);
    /// Ends the reader (an NBD connection says goodbye to its server).
    async fn close(self: Box<Self>);
}

/// An NBD connection as a [`DiskReader`], naming what it reads in its errors.
pub struct NbdReader {
    client: NbdClient,
    describe: String,
}

impl NbdReader {
    /// `client`, reading what `describe` names.
    pub fn new(client: NbdClient, describe: &str) -> NbdReader {
        NbdReader {
            client,
            describe: describe.to_string(),
        }
    }
}

#[tonic::async_trait]
impl DiskReader for NbdReader {
    fn size(&self) -> u64 {
        self.client.size()
    }

    async fn allocation_map(&mut self) -> Result<Vec<Extent>> {
        let size = self.client.size();
        self.client
            .allocation_map(BASE_ALLOCATION, 0, size)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Internal,
                    format!("reading the allocation map of {}", self.describe),
                )
                .with_source(e)
            })
    }

    async fn read(
        &mut self,
        offset: u64,
        mut buf: ChunkBuf,
        at: std::ops::Range<usize>,
    ) -> (ChunkBuf, Result<()>) {
        let len = at.len();
        let res = self.client.read(offset, &mut buf[at]).await.map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!(
                    "reading {len} bytes at offset {offset} of {}",
                    self.describe
                ),
            )
            .with_source(e)
        });
        (buf, res)
    }

    async fn close(self: Box<Self>) {
        let _ = self.client.disconnect().await;
    }
}

/// Connects to the NBD server on `socket` (export `export`) with `base:allocation`.
pub async fn connect_unix(socket: &Path, export: &str, describe: &str) -> Result<NbdClient> {
    let opts = ConnectOptions {
        export_name: export.to_string(),
        meta_contexts: vec![BASE_ALLOCATION.to_string()],
    };
    NbdClient::connect_unix(socket, &opts).await.map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            format!("connecting to the NBD export of {describe}"),
        )
        .with_source(e)
    })
}

/// A running `qemu-nbd` serving one disk file read-only on a unix socket.
pub struct NbdExport {
    child: Child,
    socket: PathBuf,
    /// What is served, for messages.
    describe: String,
}

impl NbdExport {
    /// Starts qemu-nbd on `disk` (format named) with room for `connections` clients, the
    /// socket under `run_dir`. Returns once the socket accepts connections.
    pub async fn start(
        qemu_nbd: &Path,
        disk: &Path,
        format: &str,
        run_dir: &Path,
        tag: &str,
        connections: usize,
    ) -> Result<NbdExport> {
        if !matches!(format, "qcow2" | "raw") {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "disk {} has format {format:?}; only qcow2 and raw are supported",
                    disk.display()
                ),
            ));
        }
        let describe = format!("{} ({format})", disk.display());
        let args = [
            format!("--format={format}").into(),
            disk.as_os_str().to_owned(),
        ];
        Self::launch(qemu_nbd, &args, None, describe, run_dir, tag, connections).await
    }

    /// Starts qemu-nbd on an inspected import source: it inherits the open file and reads
    /// it as `/dev/fd/3`, format named, backing files disabled; the path is not opened again.
    pub async fn start_file(
        qemu_nbd: &Path,
        source: &super::inspect::SourceFile,
        run_dir: &Path,
        tag: &str,
        connections: usize,
    ) -> Result<NbdExport> {
        use std::os::fd::AsRawFd;
        let describe = format!("{} ({})", source.path().display(), source.format());
        let args = [source.qemu_json().into()];
        let fd = source.file().as_raw_fd();
        Self::launch(
            qemu_nbd,
            &args,
            Some(fd),
            describe,
            run_dir,
            tag,
            connections,
        )
        .await
    }

    async fn launch(
        qemu_nbd: &Path,
        image: &[std::ffi::OsString],
        fd: Option<i32>,
        describe: String,
        run_dir: &Path,
        tag: &str,
        connections: usize,
    ) -> Result<NbdExport> {
        std::fs::create_dir_all(run_dir)
            .map_err(|e| Error::io(format!("creating run directory {}", run_dir.display()), e))?;
        let socket = run_dir.join(format!("{tag}.sock"));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(qemu_nbd);
        let (opts, file) = image.split_at(image.len() - 1);
        cmd.arg("--read-only")
            .args(opts)
            .arg(format!("--shared={}", connections.max(1)))
            .arg("--persistent")
            .arg(format!("--socket={}", socket.display()))
            .arg("--")
            .args(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
        // parent; it runs in the forked child before exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if let Some(fd) = fd {
            super::inspect::inherit_as_child_fd(cmd.as_std_mut(), fd);
        }
        let child = cmd.spawn().map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "cannot run {} to read disk {describe} (install qemu-utils)",
                    qemu_nbd.display()
                ),
            )
            .with_source(e)
        })?;
        // From here on the export owns the socket: a qemu-nbd that fails to start (or is
        // killed, which it does not survive to clean up after) leaves it for the drop to remove.
        let mut export = NbdExport {
            child,
            socket,
            describe,
        };
        let (child, socket, describe) = (&mut export.child, &export.socket, &export.describe);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| Error::io("waiting for qemu-nbd", e))?
            {
                let mut err = String::new();
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut err).await;
                }
                return Err(qemu_nbd_failed(describe, status.code(), err.trim()));
            }
            if tokio::net::UnixStream::connect(socket).await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("qemu-nbd did not open its socket for {describe} within 20 s"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(export)
    }

    /// Stops qemu-nbd and removes its socket.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[tonic::async_trait]
impl BlockSource for NbdExport {
    async fn reader(&self) -> Result<Box<dyn DiskReader>> {
        let c = connect_unix(&self.socket, "", &self.describe).await?;
        Ok(Box::new(NbdReader::new(c, &self.describe)))
    }

    fn describe(&self) -> &str {
        &self.describe
    }
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Turns qemu-nbd's complaint into an error a person can act on.
fn qemu_nbd_failed(describe: &str, code: Option<i32>, stderr: &str) -> Error {
    let kind = if stderr.contains("lock") {
        // Someone (a running QEMU) holds the image for writing.
        ErrorKind::FailedPrecondition
    } else if stderr.contains("No such file")
        || stderr.contains("Permission denied")
        || stderr.contains("Could not open")
    {
        ErrorKind::FailedPrecondition
    } else {
        ErrorKind::Internal
    };
    let hint = if stderr.contains("lock") {
        " (is a VM using this disk?)"
    } else {
        ""
    };
    Error::new(
        kind,
        format!(
            "cannot read disk {describe}: qemu-nbd exited with {}: {}{hint}",
            code.map(|c| c.to_string())
                .unwrap_or_else(|| "a signal".into()),
            if stderr.is_empty() {
                "no message"
            } else {
                stderr
            }
        ),
    )
}
