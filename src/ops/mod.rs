//! The daemon's one internal API, the [`Controller`]: every action a transport (gRPC, tests) can ask for.
//!
//! Each action checks its preconditions *before* it returns, so a bad request is refused with
//! a precise error and nothing is started; long work then runs as an [`Operation`] on a task.
//!
//! | action | preconditions | result |
//! |---|---|---|
//! | [`Controller::list_domains`] | libvirt reachable | every domain with disks and state |
//! | [`Controller::domain`] | a name is given (INVALID_ARGUMENT); the domain exists | one domain |
//! | [`Controller::capture`] | the image name is valid; the prep steps are known; the domain exists; mode, state, agent and options fit ([`mode::decide`]: a shut-off domain is read cold — by mode cold, auto, or shutdown, which then shuts nothing down and starts nothing again, and prep is refused; a running one is captured by quiesce (its Linux agent answers), shutdown or crash-consistent; a crashed one is refused); it has the disk (NOT_FOUND) with a local file or block path; the disk file is readable (cold, shutdown); the target is reachable and the image name free; no operation holds the domain, nor a janitor finishing the cleanup of an ended one (ABORTED); live: a backup job imaged left on the domain is ended first, another tool's job refused (FAILED_PRECONDITION) | a capture operation |
//! | [`Controller::plan_prep`] | steps named and known; the domain exists, runs (not paused) and has a guest agent channel; its agent answers | the diffs each step would make, nothing changed |
//! | [`Controller::import`] | the image name is valid; the path is absolute; the format is qcow2 or raw; the path names a non-empty regular file (no symlink, FIFO, device), within `max_virtual_size`; qcow2: no backing or external data file, passes `qemu-img check`, no data beyond the file's end; raw: not recognisably another format; the name is free (see [`crate::capture::inspect`]) | an import operation reading the very file inspected |
//! | [`Controller::export`] | the image name is valid; the image exists; the destination is absolute, its directory exists and is reached without symbolic links, the file does not exist (unless `overwrite`) and is not a link | an export operation (a file of `[export] file_mode`, 0600 by default) |
//! | [`Controller::list_images`] | — | images of the repository |
//! | [`Controller::image`] | the image exists | one image |
//! | [`Controller::delete_image`] | the image exists and no export reads it | chunks freed |
//! | [`Controller::operation`], [`Controller::operations`], [`Controller::watch`], [`Controller::wait_operation`] | the operation is known (running, or ended within `[daemon] operation_retention_days`) | snapshots |
//! | [`Controller::cancel`] | the operation has not ended | it ends CANCELLED, leaving no partial image |
//! | [`Controller::delete_operation`] | the operation has ended (else FAILED_PRECONDITION naming its state) | it is forgotten, with its request_id |
//!
//! Every row is tested against an in-memory hypervisor in this module's `tests.rs`.
//!
//! A capture's cleanup (thaw, end its backup job, start the domain again, restore prep) is
//! journaled ([`journal`]); what it could not confirm before it ended is finished by a janitor
//! (`janitor.rs`) that holds the domain meanwhile: a new capture of it is refused ABORTED,
//! saying cleanup is under way. A captured image is never failed for such a step, and a
//! failed capture leaves no image.
//!
//! A `request_id` given to capture, import or export makes a retried call return the
//! operation of the first call instead of starting another, for 24 hours and across restarts
//! of the daemon; the parameters must be the same as the first call's (else INVALID_ARGUMENT).
//!
//! Operations are durable ([`store`]): each is written to the operations database when it is
//! queued, before the call returns and before any work starts, then at each change of state
//! and at its end. Progress counters are saved with those changes only, not while bytes flow:
//! a running operation is always read from memory, and the saved counters matter only for an
//! operation a stop of the daemon interrupted. Only operations that have not ended (and an
//! ended one whose end could not be saved yet) are kept in memory; the rest is read from the
//! database, where an ended operation stays for `[daemon] operation_retention_days`. At start,
//! the operations a previous run left unfinished are ended (`history.rs`): an operation is
//! never shown running when nothing runs it.

pub mod capture;
mod history;
mod janitor;
pub mod journal;
pub mod mode;
pub mod operation;
pub mod prep;
pub mod store;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::capture::file::{self, Native};
use crate::capture::inspect::SourceFile;
use crate::capture::source::BlockSource;
use crate::capture::source::NbdExport;
use crate::config::Config;
use crate::error::{internal, invalid, not_found, precondition, Error, ErrorKind, Result};
use crate::export;
use crate::format::Format;
use crate::hypervisor::{DomainInfo, Hypervisor};
use crate::repo::{DeleteStats, ImageRecord, ImageWriter, Repository};
use crate::util::{now_unix, validate_image_name};
pub use capture::{CaptureParams, TargetSpec};
pub use mode::{parse_mode, Mode};
pub use operation::{
    OpEntry, OpError, OpKind, OpState, OpStatus, Operation, PrepReport, ProgressSnapshot,
    ReportedChange,
};
use store::Store;

/// An import request.
#[derive(Debug, Clone, Default)]
pub struct ImportParams {
    pub path: PathBuf,
    pub format: String,
    pub image_name: String,
    pub request_id: String,
    /// Kept on the image.
    pub description: String,
    /// Who asks (the API caller, e.g. `uid:1000`), for the per-identity operation limit.
    pub requester: String,
}

/// An export request.
#[derive(Debug, Clone)]
pub struct ExportParams {
    pub image_name: String,
    pub format: Format,
    pub path: PathBuf,
    pub overwrite: bool,
    pub request_id: String,
    /// Who asks (the API caller), for the per-identity operation limit.
    pub requester: String,
}

/// The controller: configuration, the hypervisor, the repository, the operations database and
/// the table of running operations; every action of the public surface is one of its methods.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Config,
    hv: Arc<dyn Hypervisor>,
    repo: Repository,
    host: String,
    table: Mutex<Table>,
    store: Arc<Store>,
    slots: Arc<Semaphore>,
}

/// What lives in memory only. Lock order: the table before the store (the store never calls
/// out).
#[derive(Default)]
struct Table {
    /// Operations that have not ended, and ended ones until their end is saved.
    live: HashMap<String, Arc<OpEntry>>,
    /// Domain name -> id of the operation holding it.
    domain_locks: HashMap<String, String>,
}

/// Runs blocking work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal("a blocking task failed").with_source(e))?
}

impl Controller {
    /// A controller over `hv` and `repo` with settings from `cfg`, its operations in the
    /// database under `[daemon] state_dir`. Operations a previous run left unfinished are
    /// ended first and old ones pruned (see `history.rs`); call it after the journal's
    /// recovery and before serving.
    pub fn open(cfg: Config, hv: Arc<dyn Hypervisor>, repo: Repository) -> Result<Controller> {
        let store = Store::open_in(&cfg.daemon.state_dir)?;
        Controller::with_store(cfg, hv, repo, store)
    }

    /// [`Controller::open`] with an opened database.
    pub fn with_store(
        cfg: Config,
        hv: Arc<dyn Hypervisor>,
        repo: Repository,
        store: Store,
    ) -> Result<Controller> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let slots = Arc::new(Semaphore::new(cfg.daemon.max_running_operations));
        let ctl = Controller {
            inner: Arc::new(Inner {
                cfg,
                hv,
                repo,
                host,
                table: Mutex::default(),
                store: Arc::new(store),
                slots,
            }),
        };
        ctl.end_interrupted()?;
        ctl.prune_operations();
        ctl.spawn_pruner();
        Ok(ctl)
    }

    /// The hypervisor the controller acts on (shared with the health watcher).
    pub fn hypervisor(&self) -> Arc<dyn Hypervisor> {
        self.inner.hv.clone()
    }

    /// The repository.
    pub fn repository(&self) -> &Repository {
        &self.inner.repo
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ----------------------------------------------------------------------------- domains

    /// Runs a hypervisor call on the blocking pool (libvirt's API is synchronous).
    async fn hv<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Hypervisor) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let hv = self.inner.hv.clone();
        blocking(move || f(hv.as_ref())).await
    }

    /// Every domain on the host.
    pub async fn list_domains(&self) -> Result<Vec<DomainInfo>> {
        self.hv(|hv| hv.list_domains()).await
    }

    /// One domain.
    pub async fn domain(&self, name: &str) -> Result<DomainInfo> {
        if name.is_empty() {
            return Err(invalid("domain name is empty"));
        }
        let name = name.to_string();
        self.hv(move |hv| hv.domain(&name)).await
    }

    // ----------------------------------------------------------------------------- images

    /// Starts importing a disk file of this host.
    pub async fn import(&self, p: ImportParams) -> Result<Operation> {
        validate_image_name(&p.image_name)?;
        if !p.path.is_absolute() {
            return Err(invalid(format!(
                "import path {} must be absolute",
                p.path.display()
            )));
        }
        if !matches!(p.format.as_str(), "qcow2" | "raw") {
            return Err(invalid(format!(
                "import format {:?} is not supported: name the file's format, qcow2 or raw",
                p.format
            )));
        }
        let fp = format!(
            "import\0{}\0{}\0{}\0{}",
            p.path.display(),
            p.format,
            p.image_name,
            p.description
        );
        if let Some(op) = self.same_request(&p.request_id, OpKind::Import, &fp)? {
            return Ok(op);
        }
        // Opened once; everything after reads this open file, never the path again.
        let max = self.inner.cfg.repository.max_virtual_size;
        let dirs = &self.inner.cfg.paths.import_dirs;
        crate::hostfile::precheck_within(&p.path, dirs, "import path")?;
        let source = SourceFile::open(&p.path, &p.format, max).await?;
        crate::hostfile::check_opened_within(source.file(), &p.path, dirs, "import path")?;
        let writer = self.reserve(&p.image_name).await?;
        let path = p.path.to_string_lossy().into_owned();
        let op = OpEntry::new(OpKind::Import, "", &p.image_name, &p.request_id, &path);
        op.set_requester(&p.requester);
        op.set_consistency("imported");
        {
            let mut t = self.table();
            if let Some(op) = self.request_matching(&t, &p.request_id, OpKind::Import, &fp)? {
                return Ok(op);
            }
            self.insert(&mut t, &op, "repository", &fp)?;
        }
        tracing::info!(op = %op.id, path = %path, format = %p.format, image = %p.image_name, "import queued");
        let ctl = self.clone();
        let entry = op.clone();
        let description = p.description.clone();
        tokio::spawn(async move {
            let res = ctl.run_import(&entry, writer, source, description).await;
            ctl.end(&entry, res);
        });
        Ok(op.snapshot())
    }

    /// Starts writing an image to a file.
    pub async fn export(&self, p: ExportParams) -> Result<Operation> {
        validate_image_name(&p.image_name)?;
        if !p.path.is_absolute() {
            return Err(invalid(format!(
                "export path {} must be absolute",
                p.path.display()
            )));
        }
        let fp = format!(
            "export\0{}\0{}\0{}\0{}",
            p.image_name,
            p.format.as_str(),
            p.path.display(),
            p.overwrite
        );
        if let Some(op) = self.same_request(&p.request_id, OpKind::Export, &fp)? {
            return Ok(op);
        }
        let dirs = &self.inner.cfg.paths.export_dirs;
        crate::hostfile::check_destination_within(&p.path, p.overwrite, dirs, "export path")?;
        let repo = self.inner.repo.clone();
        let name = p.image_name.clone();
        let (rec, guard) = blocking(move || repo.open_reader(&name)).await?;
        let path = p.path.to_string_lossy().into_owned();
        let op = OpEntry::new(OpKind::Export, "", &p.image_name, &p.request_id, &path);
        op.set_requester(&p.requester);
        op.set_location(&path);
        {
            let mut t = self.table();
            if let Some(op) = self.request_matching(&t, &p.request_id, OpKind::Export, &fp)? {
                return Ok(op);
            }
            self.insert(&mut t, &op, &format!("file:{path}"), &fp)?;
        }
        tracing::info!(op = %op.id, image = %p.image_name, path = %path, format = p.format.as_str(), "export queued");
        let ctl = self.clone();
        let entry = op.clone();
        tokio::spawn(async move {
            let res = ctl.run_export(&entry, rec, p).await;
            drop(guard);
            ctl.end(&entry, res);
        });
        Ok(op.snapshot())
    }

    /// Every image of the repository.
    pub async fn list_images(&self) -> Result<Vec<ImageRecord>> {
        let repo = self.inner.repo.clone();
        blocking(move || repo.list()).await
    }

    /// One image.
    pub async fn image(&self, name: &str) -> Result<ImageRecord> {
        let repo = self.inner.repo.clone();
        let name = name.to_string();
        blocking(move || repo.get(&name)).await
    }

    /// Changes an image's display name and description (`None` keeps one).
    pub async fn update_image(
        &self,
        name: &str,
        display_name: Option<String>,
        description: Option<String>,
    ) -> Result<ImageRecord> {
        let repo = self.inner.repo.clone();
        let name = name.to_string();
        blocking(move || repo.update_labels(&name, display_name, description)).await
    }

    /// Deletes an image and the chunks only it used.
    pub async fn delete_image(&self, name: &str) -> Result<DeleteStats> {
        let repo = self.inner.repo.clone();
        let name = name.to_string();
        blocking(move || repo.delete(&name)).await
    }

    // ----------------------------------------------------------------------------- operations

    /// One operation.
    pub fn operation(&self, id: &str) -> Result<Operation> {
        if let Some(e) = self.live(id) {
            return Ok(e.snapshot());
        }
        self.inner.store.get(id)?.ok_or_else(|| op_not_found(id))
    }

    /// Every operation kept (running, or ended within the retention), newest first.
    pub fn operations(&self) -> Result<Vec<Operation>> {
        self.operations_page(None, u32::MAX)
    }

    /// Up to `limit` operations, newest first, after the one created at `after` =
    /// `(created_at, id)` (keyset paging: pass the last operation of the previous page).
    pub fn operations_page(
        &self,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<Operation>> {
        let mut ops = self.inner.store.page(after, limit)?;
        let t = self.table();
        for op in &mut ops {
            if let Some(e) = t.live.get(&op.id) {
                *op = e.snapshot();
            }
        }
        Ok(ops)
    }

    /// The entry of an operation, for watching: the live one while it runs, else a fixed
    /// record of how it ended.
    pub fn watch(&self, id: &str) -> Result<Arc<OpEntry>> {
        if let Some(e) = self.live(id) {
            return Ok(e);
        }
        self.operation(id).map(OpEntry::ended)
    }

    /// Waits until the operation has ended or `timeout` has passed, and returns it as it is
    /// then (the caller tells the two apart by its state).
    pub async fn wait_operation(&self, id: &str, timeout: Duration) -> Result<Operation> {
        let Some(e) = self.live(id) else {
            return self.operation(id);
        };
        let mut rx = e.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| s.state.is_terminal())).await;
        Ok(e.snapshot())
    }

    /// Asks an operation to stop; it ends CANCELLED.
    pub fn cancel(&self, id: &str) -> Result<Operation> {
        let Some(e) = self.live(id).filter(|e| !e.state().is_terminal()) else {
            let op = self.operation(id)?;
            return Err(precondition(format!(
                "operation {id} has already ended ({}); nothing to cancel",
                op.state.name()
            )));
        };
        tracing::info!(op = %id, "cancel requested");
        e.cancel.cancel();
        Ok(e.snapshot())
    }

    /// Forgets an ended operation (and its request_id): FAILED_PRECONDITION while it runs.
    pub fn delete_operation(&self, id: &str) -> Result<()> {
        if let Some(e) = self.live(id) {
            let state = e.state();
            if !state.is_terminal() {
                return Err(precondition(format!(
                    "operation {id} is {} and has not ended; cancel it or wait for its end \
                     before deleting it",
                    state.name()
                ))
                .with_reason("OPERATION_RUNNING")
                .with_subject(format!("operations/{id}")));
            }
            // Ended, its end not saved yet: save it so that it can go.
            self.inner.store.update(&e.snapshot())?;
            self.table().live.remove(id);
        }
        if !self.inner.store.delete(id)? {
            return Err(op_not_found(id));
        }
        tracing::info!(op = %id, "operation deleted");
        Ok(())
    }

    /// Cancels every running operation and waits up to `timeout` for them to end.
    pub async fn shutdown(&self, timeout: Duration) {
        let running: Vec<Arc<OpEntry>> = self
            .table()
            .live
            .values()
            .filter(|e| !e.state().is_terminal())
            .cloned()
            .collect();
        for e in &running {
            tracing::info!(op = %e.id, "cancelling for shutdown");
            e.cancel.cancel();
        }
        let deadline = tokio::time::Instant::now() + timeout;
        for e in running {
            let mut rx = e.subscribe();
            let _ = tokio::time::timeout_at(deadline, rx.wait_for(|s| s.state.is_terminal())).await;
        }
    }

    fn live(&self, id: &str) -> Option<Arc<OpEntry>> {
        self.table().live.get(id).cloned()
    }

    /// The operation a request_id already started (within its 24 hours), when its kind and
    /// parameters (`fp`) are the same; INVALID_ARGUMENT when the request_id was used for
    /// something else. Called with the table locked, so that a check and the insert after it
    /// are one step.
    fn request_matching(
        &self,
        t: &Table,
        request_id: &str,
        kind: OpKind,
        fp: &str,
    ) -> Result<Option<Operation>> {
        let Some((stored, stored_fp)) = self.inner.store.by_request(request_id, now_unix())? else {
            return Ok(None);
        };
        let op = t
            .live
            .get(&stored.id)
            .map(|e| e.snapshot())
            .unwrap_or(stored);
        if op.kind != kind {
            return Err(invalid(format!(
                "request_id {request_id} was already used for a {:?} operation ({})",
                op.kind, op.id
            )));
        }
        if stored_fp != store::fingerprint(fp) {
            return Err(invalid(format!(
                "request_id {request_id} was already used for {:?} operation {} with other \
                 parameters; use a new request_id for a different request",
                op.kind, op.id
            )));
        }
        Ok(Some(op))
    }

    fn same_request(&self, request_id: &str, kind: OpKind, fp: &str) -> Result<Option<Operation>> {
        if request_id.is_empty() {
            return Ok(None);
        }
        self.request_matching(&self.table(), request_id, kind, fp)
    }

    /// Refuses it (RESOURCE_EXHAUSTED) when its requester already has
    /// `daemon.max_operations_per_identity` operations queued or running (an empty requester, an
    /// internal caller, is not counted); else records a new operation in the database (QUEUED, with its request_id and the
    /// fingerprint `fp` of the call's parameters) and makes it live; each later change of its
    /// state is saved by a hook. `target` says where its bytes go (see [`store`]).
    fn insert(&self, t: &mut Table, op: &Arc<OpEntry>, target: &str, fp: &str) -> Result<()> {
        let who = op.requester();
        let limit = self.inner.cfg.daemon.max_operations_per_identity;
        if !who.is_empty() {
            let open = t
                .live
                .values()
                .filter(|e| !e.state().is_terminal() && e.requester() == who)
                .count();
            if open >= limit {
                return Err(Error::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "{who} has {open} operations queued or running, the limit per identity \
                         (daemon.max_operations_per_identity = {limit}); wait for one to end or cancel one"
                    ),
                )
                .with_reason("IDENTITY_OPERATION_LIMIT"));
            }
        }
        self.inner
            .store
            .insert(&op.snapshot(), target, &store::fingerprint(fp), now_unix())?;
        let store = self.inner.store.clone();
        op.on_change(Box::new(move |e| {
            if let Err(err) = store.update(&e.snapshot()) {
                tracing::error!(op = %e.id, error = %err.chain(), "cannot save the operation's new state");
            }
        }));
        t.live.insert(op.id.clone(), op.clone());
        Ok(())
    }

    /// Reserves an image name in the repository (checks it is free and the repository writable).
    async fn reserve(&self, name: &str) -> Result<ImageWriter> {
        let repo = self.inner.repo.clone();
        let name = name.to_string();
        blocking(move || {
            repo.check_writable()?;
            repo.begin_image(&name)
        })
        .await
    }

    /// Records the end of an operation and releases what it held.
    fn end(&self, op: &OpEntry, res: Result<()>) {
        match &res {
            Ok(()) => {
                tracing::info!(op = %op.id, image = %op.image_name, "operation {:?} completed", op.kind)
            }
            Err(e) if e.kind() == ErrorKind::Cancelled => {
                tracing::info!(op = %op.id, image = %op.image_name, "operation cancelled")
            }
            Err(e) => {
                tracing::error!(op = %op.id, image = %op.image_name, error = %e.chain(), "operation failed")
            }
        }
        op.finish(&res);
        // Saved before it leaves memory; an end that cannot be saved stays in memory (and is
        // saved again by the pruner) so the database never shows it running.
        let saved = match self.inner.store.update(&op.snapshot()) {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(op = %op.id, error = %e.chain(), "cannot save the end of the operation; kept in memory, retried hourly");
                false
            }
        };
        let cleanup = op.kind == OpKind::Capture && self.has_cleanup(&op.id);
        let mut t = self.table();
        if saved {
            t.live.remove(&op.id);
        }
        if !op.domain.is_empty() && t.domain_locks.get(&op.domain) == Some(&op.id) {
            if cleanup {
                // The domain stays held until the janitor confirms the cleanup.
                t.domain_locks
                    .insert(op.domain.clone(), janitor::holder(&op.id));
                drop(t);
                tracing::warn!(op = %op.id, domain = %op.domain, "the cleanup after the operation is not confirmed yet; a janitor keeps trying and holds the domain until it is done");
                self.spawn_janitor(vec![op.id.clone()], op.domain.clone());
            } else {
                t.domain_locks.remove(&op.domain);
            }
        }
    }

    /// Waits for a run slot, giving up early when cancelled. The one request for a slot is
    /// kept across the checks for a cancel (a new request would join the semaphore's queue at
    /// its end again), so queued operations start in the order they were queued.
    async fn slot(&self, op: &OpEntry) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let acquire = self.inner.slots.clone().acquire_owned();
        tokio::pin!(acquire);
        loop {
            op.cancel.check()?;
            tokio::select! {
                permit = &mut acquire => {
                    return permit.map_err(|e| internal("run slots closed").with_source(e));
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    async fn run_import(
        &self,
        op: &OpEntry,
        writer: ImageWriter,
        source: SourceFile,
        description: String,
    ) -> Result<()> {
        let _permit = self.slot(op).await?;
        op.set_state(OpState::Preparing);
        let cfg = &self.inner.cfg.capture;
        // Read in process through the inspected descriptor, or by a qemu-nbd that inherits it.
        let native = if cfg.native_reader {
            let file = source.file().try_clone().map_err(|e| {
                Error::io(
                    format!("duplicating the descriptor of {}", source.path().display()),
                    e,
                )
            })?;
            let (path, format) = (source.path().to_path_buf(), source.format().to_string());
            tokio::task::spawn_blocking(move || file::open_file(file, &path, &format))
                .await
                .map_err(|e| internal("opening the import file").with_source(e))??
        } else {
            Native::NotNative("capture.native_reader is off".into())
        };
        let export = match native {
            Native::Reader(r) => ImportSource::Native(r),
            Native::NotNative(why) => {
                tracing::info!(op = %op.id, file = %source.path().display(), reason = %why, "reading the import through qemu-nbd");
                let nbd = NbdExport::start_file(
                    &cfg.qemu_nbd,
                    &source,
                    &cfg.run_dir,
                    &op.id,
                    cfg.readers,
                )
                .await?;
                ImportSource::Nbd(Box::new(nbd))
            }
        };
        let from = capture::Provenance {
            consistency: "imported".into(),
            domain: String::new(),
            disk: String::new(),
            format: source.format().to_string(),
            agent: false,
            os_type: None,
            os_distro: None,
            description,
        };
        // A file that changed while it was read must not become an image: checked at the
        // commit, before the manifest is written (the chunks are released on failure).
        let mut writer = writer;
        writer.check_before_commit(Box::new(move || source.check_unchanged()));
        match export {
            ImportSource::Native(r) => self
                .store(op, writer, r.as_ref(), &from, None)
                .await
                .map(drop),
            ImportSource::Nbd(nbd) => {
                let res = self
                    .store(op, writer, nbd.as_ref(), &from, None)
                    .await
                    .map(drop);
                nbd.stop().await;
                res
            }
        }
    }

    async fn run_export(&self, op: &OpEntry, rec: ImageRecord, p: ExportParams) -> Result<()> {
        let _permit = self.slot(op).await?;
        op.set_state(OpState::Preparing);
        let mode = self.inner.cfg.export_file_mode()?;
        op.set_state(OpState::Saving);
        let repo = self.inner.repo.clone();
        let progress = op.progress.clone();
        let cancel = op.cancel.clone();
        blocking(move || {
            export::export_to(
                &repo,
                &rec,
                p.format,
                &p.path,
                p.overwrite,
                mode,
                &progress,
                &cancel,
            )
        })
        .await
    }
}
/// Fails with a precise error when `path` cannot be opened for reading.
fn check_readable(path: &Path, what: &str) -> Result<()> {
    match std::fs::File::open(path) {
        Ok(f) => {
            let md = f
                .metadata()
                .map_err(|e| Error::io(format!("{what}: {}", path.display()), e))?;
            if md.is_dir() {
                return Err(precondition(format!(
                    "{what}: {} is a directory",
                    path.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(precondition(format!(
            "{what}: file {} does not exist",
            path.display()
        ))),
        Err(e) => Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!("{what}: file {} cannot be read", path.display()),
        )
        .with_source(e)),
    }
}

/// NOT_FOUND for operation `id`, with its reason and resource name.
fn op_not_found(id: &str) -> Error {
    not_found(format!("operation {id} not found"))
        .with_reason("OPERATION_NOT_FOUND")
        .with_subject(format!("operations/{id}"))
}

/// What an import reads its file through.
enum ImportSource {
    /// In process ([`file::open_file`]).
    Native(Arc<dyn BlockSource>),
    /// A qemu-nbd that inherited the inspected descriptor.
    Nbd(Box<NbdExport>),
}
