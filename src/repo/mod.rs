//! The local image repository: a content-addressed chunk store plus one manifest per image.
//!
//! Layout under the repository directory:
//!
//! ```text
//! chunks/ab/ab12…ef     chunk files, named by the sha256 of their bytes
//! images/NAME.json      one manifest per complete image (see [`manifest`])
//! tmp/                  chunks being written (temp name, then rename into chunks/)
//! ```
//!
//! Rules that keep it consistent, whatever fails and whenever the daemon dies:
//! - a chunk is written to `tmp/`, then renamed into place: a chunk file is whole or absent;
//! - before a manifest is written, `syncfs` makes every chunk durable, and the commit checks
//!   every chunk the manifest names exists; the manifest itself is written temp + fsync +
//!   rename + fsync of the directory. An image is listed only once its manifest exists, so a
//!   failed or cancelled capture is never visible;
//! - chunks that a failed capture wrote and no image references are deleted at once, and
//!   `tmp/` (and any temp manifest an interrupted write left in `images/`) is emptied at start;
//! - a chunk file that exists is not trusted blindly: before a capture reuses it, its length
//!   is checked and (once per daemon run) its digest; a truncated or damaged chunk (a power
//!   loss before it reached the disk) is replaced by the new data;
//! - deleting an image first reads every other manifest (streaming, digests only) to learn
//!   which chunks are still in use; if any manifest cannot be read, nothing is deleted;
//! - chunks an in-flight capture relies on are *pinned*: deleting an image never removes a
//!   chunk a running capture has found already stored and is about to reference.

pub mod direct;
pub mod manifest;
mod store;

use std::collections::{HashMap, HashSet};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, ErrorKind, Result};
use crate::util;
pub use direct::ChunkBuf;
pub use manifest::{DataChunk, Digest, ImageRecord, CHUNK_SIZE, CLUSTER_SIZE};
pub use store::ChunkStore;

/// The repository. Cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct Repository {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Digest -> number of in-flight writers relying on it.
    pins: HashMap<Digest, usize>,
    /// Names reserved by in-flight captures and imports.
    reserved: HashSet<String>,
    /// Image name -> number of running exports reading it.
    readers: HashMap<String, usize>,
    /// Chunks whose file was checked (length and digest) or written during this run.
    verified: HashSet<Digest>,
}

/// What deleting an image freed.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeleteStats {
    pub chunks_removed: u64,
    pub bytes_freed: u64,
}

impl Repository {
    /// Opens (creating if needed) the repository at `root` and empties its `tmp/`.
    pub fn open(root: &Path) -> Result<Repository> {
        // Chunks are guests' disk contents: a new repository is private to the daemon's user,
        // and one that others may enter is named in the log.
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(|e| {
                    Error::io(
                        format!("creating repository directory {}", root.display()),
                        e,
                    )
                })?;
            if let Ok(md) = std::fs::metadata(root) {
                let mode = md.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    tracing::warn!(repository = %root.display(), mode = format!("{mode:04o}"),
                        "other users may read the repository (it holds guests' disk contents): chmod 0700 it");
                }
            }
        }
        for sub in ["chunks", "images", "tmp"] {
            let d = root.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| {
                Error::io(format!("creating repository directory {}", d.display()), e)
            })?;
        }
        let repo = Repository {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                state: Mutex::default(),
            }),
        };
        if let Ok(rd) = std::fs::read_dir(repo.tmp_dir()) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        // Temp manifests (`.NAME.json.tmp-PID`) of writes a crash interrupted.
        if let Ok(rd) = std::fs::read_dir(repo.images_dir()) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with('.') && n.contains(".json.tmp-") {
                    tracing::info!(file = %e.path().display(), "removing a temp manifest left by an interrupted write");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        repo.check_writable()?;
        Ok(repo)
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn tmp_dir(&self) -> PathBuf {
        self.inner.root.join("tmp")
    }

    fn images_dir(&self) -> PathBuf {
        self.inner.root.join("images")
    }

    fn manifest_path(&self, name: &str) -> PathBuf {
        self.images_dir().join(format!("{name}.json"))
    }

    /// Path of the chunk file for `digest`.
    pub fn chunk_path(&self, digest: &Digest) -> PathBuf {
        let h = hex::encode(digest);
        self.inner.root.join("chunks").join(&h[..2]).join(h)
    }

    /// Fails with FAILED_PRECONDITION when the repository cannot be written.
    pub fn check_writable(&self) -> Result<()> {
        let probe = self
            .tmp_dir()
            .join(format!(".probe-{}", util::random_id("w")));
        std::fs::write(&probe, b"probe")
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|e| {
                let kind = if e.raw_os_error() == Some(libc::ENOSPC) {
                    ErrorKind::ResourceExhausted
                } else {
                    ErrorKind::FailedPrecondition
                };
                Error::new(
                    kind,
                    format!(
                        "repository directory {} is not writable (check its mount, permissions and free space)",
                        self.inner.root.display()
                    ),
                )
                .with_source(e)
            })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every complete image, sorted by name. Unreadable manifests are logged and left out.
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        let dir = self.images_dir();
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(format!("listing images in {}", dir.display()), e))?;
        let mut out = Vec::new();
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(image) = name.strip_suffix(".json") else {
                continue;
            };
            if image.starts_with('.') {
                continue;
            }
            match self.get(image) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(image, error = %e.chain(), "skipping unreadable manifest"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Opens the manifest of image `name`; NOT_FOUND when there is none.
    fn open_manifest(&self, name: &str) -> Result<(PathBuf, std::fs::File)> {
        util::validate_image_name(name)?;
        let path = self.manifest_path(name);
        match std::fs::File::open(&path) {
            Ok(f) => Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::new(
                ErrorKind::NotFound,
                format!("image {name} not found in the repository"),
            )
            .with_reason("IMAGE_NOT_FOUND")
            .with_subject(format!("images/{name}"))),
            Err(e) => Err(Error::io(format!("reading manifest {}", path.display()), e)),
        }
    }

    /// One image by name.
    pub fn get(&self, name: &str) -> Result<ImageRecord> {
        let (path, file) = self.open_manifest(name)?;
        let rec: ImageRecord =
            serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| {
                Error::new(
                    ErrorKind::Internal,
                    format!("manifest {} is corrupt", path.display()),
                )
                .with_source(e)
            })?;
        rec.validate()?;
        Ok(rec)
    }

    /// Changes the mutable labels of image `name` (`None` keeps one) and its `updated_at`; the
    /// manifest is rewritten atomically (temp, fsync, rename). Returns the new record.
    pub fn update_labels(
        &self,
        name: &str,
        display_name: Option<String>,
        description: Option<String>,
    ) -> Result<ImageRecord> {
        // Under the state lock: a delete or another update of the same image waits.
        let _st = self.lock();
        let mut rec = self.get(name)?;
        if let Some(d) = display_name {
            rec.display_name = d;
        }
        if let Some(d) = description {
            rec.description = d;
        }
        rec.updated_at = util::now_unix();
        let json = serde_json::to_vec_pretty(&rec)
            .map_err(|e| Error::new(ErrorKind::Internal, "encoding manifest").with_source(e))?;
        util::write_atomic(&self.manifest_path(name), &json)?;
        Ok(rec)
    }

    /// Reserves `name` for a new image and returns the writer that fills it.
    /// ALREADY_EXISTS when an image or an in-flight capture has that name.
    pub fn begin_image(&self, name: &str) -> Result<ImageWriter> {
        util::validate_image_name(name)?;
        let mut st = self.lock();
        if st.reserved.contains(name) || self.manifest_path(name).exists() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("image name {name} is already taken: choose another or delete that image"),
            )
            .with_reason("IMAGE_NAME_TAKEN")
            .with_subject(format!("images/{name}")));
        }
        st.reserved.insert(name.to_string());
        drop(st);
        Ok(ImageWriter {
            repo: self.clone(),
            name: name.to_string(),
            log: Arc::new(Mutex::new(SinkLog::default())),
            done: false,
            precommit: None,
        })
    }

    /// Marks `name` as being read (an export); while read, it cannot be deleted.
    pub fn open_reader(&self, name: &str) -> Result<(ImageRecord, ReadGuard)> {
        let rec = self.get(name)?;
        *self.lock().readers.entry(name.to_string()).or_default() += 1;
        Ok((
            rec,
            ReadGuard {
                repo: self.clone(),
                name: name.to_string(),
            },
        ))
    }

    /// Reads a chunk and checks its digest (a corrupt chunk is an error, never exported).
    pub fn read_chunk(&self, digest: &Digest, buf: &mut Vec<u8>) -> Result<()> {
        let path = self.chunk_path(digest);
        buf.clear();
        let mut f = std::fs::File::open(&path)
            .map_err(|e| Error::io(format!("opening chunk {}", path.display()), e))?;
        std::io::Read::read_to_end(&mut f, buf)
            .map_err(|e| Error::io(format!("reading chunk {}", path.display()), e))?;
        let got: Digest = Sha256::digest(&buf[..]).into();
        if &got != digest {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "chunk {} is corrupt: its bytes hash to {}",
                    path.display(),
                    hex::encode(got)
                ),
            ));
        }
        Ok(())
    }

    /// Deletes image `name` and the chunks no other image (nor a running capture) uses.
    pub fn delete(&self, name: &str) -> Result<DeleteStats> {
        let (path, file) = self.open_manifest(name)?;
        let candidates = manifest::scan_digests(file, &path.display().to_string())?;
        let mut st = self.lock();
        if st.readers.get(name).copied().unwrap_or(0) > 0 {
            return Err(Error::new(
                ErrorKind::Aborted,
                format!("image {name} is being exported; delete it when the export has ended"),
            ));
        }
        // Learn what the other images use before anything is removed: an unreadable manifest
        // refuses the delete, as its chunks cannot be told apart.
        let unused = self.unreferenced(&st, candidates, Some(name))?;
        std::fs::remove_file(&path)
            .map_err(|e| Error::io(format!("removing manifest {}", path.display()), e))?;
        let _ = util::fsync_dir(&self.images_dir());
        let stats = self.remove_chunks(&mut st, unused);
        st.reserved.remove(name);
        tracing::info!(
            image = name,
            chunks_removed = stats.chunks_removed,
            bytes_freed = stats.bytes_freed,
            "image deleted"
        );
        Ok(stats)
    }

    /// The candidates that no manifest (but `except`'s) references and no writer pins.
    /// Every manifest is read streaming, digests only; one that cannot be read (corrupt, a
    /// newer format) is a FAILED_PRECONDITION naming it, since the chunks it needs are unknown.
    /// Called with the state lock held so that no pin can appear meanwhile.
    fn unreferenced(
        &self,
        st: &State,
        mut candidates: HashSet<Digest>,
        except: Option<&str>,
    ) -> Result<HashSet<Digest>> {
        candidates.retain(|d| !st.pins.contains_key(d));
        if candidates.is_empty() {
            return Ok(candidates);
        }
        let dir = self.images_dir();
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(format!("listing images in {}", dir.display()), e))?;
        for entry in rd {
            let entry =
                entry.map_err(|e| Error::io(format!("listing images in {}", dir.display()), e))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some(image) = file_name.strip_suffix(".json") else {
                continue;
            };
            if image.starts_with('.') || Some(image) == except {
                continue;
            }
            let path = entry.path();
            let what = path.display().to_string();
            let file = std::fs::File::open(&path).map_err(|e| {
                Error::new(
                    ErrorKind::FailedPrecondition,
                    format!("manifest {what} cannot be read; repair or remove it"),
                )
                .with_source(e)
            })?;
            let used = manifest::scan_digests(file, &what)?;
            candidates.retain(|d| !used.contains(d));
            if candidates.is_empty() {
                break;
            }
        }
        Ok(candidates)
    }

    /// Removes chunk files (that [`Self::unreferenced`] found unused, with the lock held).
    fn remove_chunks(&self, st: &mut State, chunks: HashSet<Digest>) -> DeleteStats {
        let mut stats = DeleteStats::default();
        for d in chunks {
            st.verified.remove(&d);
            let p = self.chunk_path(&d);
            if let Ok(md) = std::fs::metadata(&p) {
                if std::fs::remove_file(&p).is_ok() {
                    stats.chunks_removed += 1;
                    stats.bytes_freed += md.len();
                }
            }
        }
        stats
    }
}

/// Keeps an image from being deleted while it is read. Dropped when the export ends.
pub struct ReadGuard {
    repo: Repository,
    name: String,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut st = self.repo.lock();
        if let Some(n) = st.readers.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                st.readers.remove(&self.name);
            }
        }
    }
}

/// What storing one chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The chunk was new and has been written.
    Stored,
    /// The repository had it already.
    Existing,
}

/// Fills one new image: stores its chunks, then commits the manifest (or aborts, releasing
/// what it wrote). Dropping it without commit aborts.
pub struct ImageWriter {
    repo: Repository,
    name: String,
    /// Pins and new chunks recorded by this writer's sinks.
    log: Arc<Mutex<SinkLog>>,
    done: bool,
    /// Run at commit, after the chunks are durable and before the manifest is written.
    precommit: Option<PreCommit>,
}

/// A last check before an image becomes visible (e.g. "the imported file did not change").
pub type PreCommit = Box<dyn FnOnce() -> Result<()> + Send>;

impl ImageWriter {
    /// Sets a check that [`ImageWriter::commit`] runs before it writes the manifest; its
    /// error fails the commit and the image is never listed.
    pub fn check_before_commit(&mut self, check: PreCommit) {
        self.precommit = Some(check);
    }

    /// The name being written.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle that worker threads use to store chunks for this image.
    pub fn chunk_sink(&self) -> ChunkSink {
        ChunkSink {
            repo: self.repo.clone(),
            log: self.log.clone(),
        }
    }

    /// Makes the image durable and visible: syncs the chunks, checks every data chunk is present,
    /// writes the manifest.
    pub fn commit(mut self, record: &ImageRecord) -> Result<()> {
        record.validate()?;
        let root = self.repo.root().to_path_buf();
        syncfs(&root)?;
        for c in &record.chunks {
            let p = self.repo.chunk_path(&c.digest);
            if !p.exists() {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "image {}: chunk {} is missing at commit",
                        self.name,
                        p.display()
                    ),
                ));
            }
        }
        if let Some(check) = self.precommit.take() {
            check()?;
        }
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::new(ErrorKind::Internal, "encoding manifest").with_source(e))?;
        util::write_atomic(&self.repo.manifest_path(&self.name), &json)?;
        self.done = true;
        self.release(false);
        Ok(())
    }

    /// Drops the reservation, unpins, and (on abort) deletes the chunks this writer added that
    /// nothing else uses.
    fn release(&mut self, aborted: bool) {
        let repo = self.repo.clone();
        let (pinned, new_chunks) = {
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            (
                std::mem::take(&mut log.pinned),
                std::mem::take(&mut log.new_chunks),
            )
        };
        let mut st = repo.lock();
        let st = &mut *st;
        for d in pinned {
            if let Some(n) = st.pins.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    st.pins.remove(&d);
                }
            }
        }
        if aborted && !new_chunks.is_empty() {
            let candidates: HashSet<Digest> = new_chunks.into_iter().collect();
            match repo
                .unreferenced(st, candidates, None)
                .map(|unused| repo.remove_chunks(st, unused))
            {
                Ok(s) => {
                    tracing::info!(image = %self.name, chunks_removed = s.chunks_removed, bytes_freed = s.bytes_freed, "released chunks of an unfinished image")
                }
                Err(e) => {
                    tracing::warn!(image = %self.name, error = %e.chain(), "could not release chunks of an unfinished image")
                }
            }
        }
        st.reserved.remove(&self.name);
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            self.release(true);
        }
    }
}

#[derive(Default)]
struct SinkLog {
    pinned: Vec<Digest>,
    new_chunks: Vec<Digest>,
}

/// A cloneable handle that stores chunks of one image from any thread.
#[derive(Clone)]
pub struct ChunkSink {
    repo: Repository,
    log: Arc<Mutex<SinkLog>>,
}

impl ChunkSink {
    /// Stores `data` under `digest` unless present. Blocking: call from a blocking thread.
    pub fn put(&self, digest: &Digest, data: &[u8]) -> Result<PutOutcome> {
        {
            let mut st = self.repo.lock();
            *st.pins.entry(*digest).or_default() += 1;
        }
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pinned
            .push(*digest);
        let path = self.repo.chunk_path(digest);
        if self.existing_is_good(digest, &path, data.len() as u64) {
            return Ok(PutOutcome::Existing);
        }
        let hexd = hex::encode(digest);
        let tmp = self
            .repo
            .tmp_dir()
            .join(format!("{hexd}.{}", util::random_id("t")));
        let write = || -> std::io::Result<()> {
            // Around the page cache: the commit's syncfs makes it durable (see `direct`).
            direct::write_file(&tmp, data)?;
            if let Some(dir) = path.parent() {
                if !dir.exists() {
                    std::fs::create_dir_all(dir)?;
                }
            }
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(
                format!("storing chunk {hexd} in {}", self.repo.root().display()),
                e,
            ));
        }
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .new_chunks
            .push(*digest);
        self.repo.lock().verified.insert(*digest);
        Ok(PutOutcome::Stored)
    }

    /// True when the chunk file at `path` exists and holds `len` bytes hashing to `digest`.
    /// The digest is checked once per daemon run (then remembered); the length every time.
    /// A bad file is reported and left to be replaced by the caller's fresh copy.
    /// Keeps chunk `digest` of an earlier image for this one without its bytes (pinned, as a
    /// put that found it): true when its file is there with length `len`. Its digest is not
    /// checked again: the chunks of a committed image were made durable before its manifest
    /// was written, and reading them back would cost what the incremental read saves.
    /// Blocking.
    pub fn reuse(&self, digest: &Digest, len: u64) -> bool {
        let present = std::fs::metadata(self.repo.chunk_path(digest)).is_ok_and(|m| m.len() == len);
        if present {
            *self.repo.lock().pins.entry(*digest).or_default() += 1;
            self.log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pinned
                .push(*digest);
        }
        present
    }

    fn existing_is_good(&self, digest: &Digest, path: &Path, len: u64) -> bool {
        let Ok(md) = std::fs::metadata(path) else {
            return false;
        };
        let hexd = hex::encode(digest);
        if md.len() != len {
            tracing::warn!(chunk = %hexd, size = md.len(), expected = len, "replacing a chunk file of the wrong length");
            self.repo.lock().verified.remove(digest);
            return false;
        }
        if self.repo.lock().verified.contains(digest) {
            return true;
        }
        let mut buf = Vec::with_capacity(len as usize);
        match self.repo.read_chunk(digest, &mut buf) {
            Ok(()) => {
                self.repo.lock().verified.insert(*digest);
                true
            }
            Err(e) => {
                tracing::warn!(chunk = %hexd, error = %e.chain(), "replacing a damaged chunk file");
                false
            }
        }
    }
}

/// Flushes the filesystem holding `path` (all chunk writes become durable at once, far cheaper
/// than one fsync per chunk).
pub fn syncfs(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the call.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc != 0 {
        return Err(Error::io(
            format!("syncing repository {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
