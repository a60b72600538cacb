//! `imagectl`: the node admin's command line, a gRPC client of the daemon.
//!
//! People get tables and a progress bar on a terminal; scripts get `--json` (one JSON document
//! on stdout) and exit codes that say what happened (see [`exit`]).

/// `println!` for imagectl's output: a reader that went away (`imagectl images | head`) ends
/// imagectl quietly with status 141, as SIGPIPE ends a Unix tool, instead of a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::cli::stdout_failed(e);
        }
    }};
}

/// `print!` likewise.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($arg)*) {
            $crate::cli::stdout_failed(e);
        }
    }};
}

pub mod connect;
mod output;
pub mod repo;
pub mod view;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

use crate::proto;
use crate::proto::domain_service_client::DomainServiceClient;
use crate::proto::image_service_client::ImageServiceClient;
use crate::proto::operation_service_client::OperationServiceClient;
use view::OpView;

/// Standard output could not be written: a closed pipe ends imagectl quietly (status 141, as
/// SIGPIPE would); anything else is said on stderr (status 1).
pub fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    eprintln!("imagectl: writing to standard output: {e}");
    std::process::exit(1);
}

/// Exit codes.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// The operation ran and failed.
    pub const FAILED: u8 = 1;
    /// Bad arguments (INVALID_ARGUMENT).
    pub const USAGE: u8 = 2;
    /// No such domain, image or operation.
    pub const NOT_FOUND: u8 = 3;
    /// The request conflicts with the current state (FAILED_PRECONDITION, ABORTED, ALREADY_EXISTS).
    pub const CONFLICT: u8 = 4;
    /// The daemon, libvirt or the repository is unreachable or out of space.
    pub const UNAVAILABLE: u8 = 5;
    /// The operation was cancelled.
    pub const CANCELLED: u8 = 6;
    /// The caller may not do this (PERMISSION_DENIED: its roles, or a host path outside the
    /// allowed directories).
    pub const DENIED: u8 = 7;
}

const AFTER_HELP: &str = "\
Examples:
  imagectl domains                                  list domains and their disks
  imagectl capture web1 --name web1-2026-11-26      capture shut-off domain web1's system disk
  imagectl images                                   list images in the repository
  imagectl export web1-2026-11-26 --format qcow2 -o /srv/web1.qcow2
  imagectl import /srv/vendor.qcow2 --format qcow2 --name vendor-appliance
  imagectl --json ops                               operations as JSON, for scripts
  imagectl images --filter 'source_domain = domains/web1' --order-by 'create_time desc'
  imagectl update web1-2026-11-26 --display-name 'web1 golden' --description 'patched'
  imagectl wait op-1a2b3c4d                         wait for an operation to end
  imagectl repo --project p1 list --format csv      the central repository's images, as CSV

Exit codes: 0 done, 1 operation failed, 2 bad arguments, 3 not found,
4 conflict (wrong domain state, name taken, object busy), 5 daemon/libvirt/repository
unavailable or full, 6 cancelled, 7 permission denied.";

/// Command line of the imaged host agent: capture VM disks into images, export and import them.
#[derive(Parser)]
#[command(name = "imagectl", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// Where the daemon is: its unix socket, or a TCP endpoint with mutual TLS.
    #[command(flatten)]
    conn: connect::ConnectOpts,
    /// Print JSON for scripts instead of tables and progress bars.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Filter and order of a list (every page is fetched).
#[derive(clap::Args, Clone, Default)]
struct ListArgs {
    /// Only items matching, e.g. `state = RUNNING`, `name = "images/web*"`, terms joined by
    /// AND (OR binds tighter); see the README for the fields of each list.
    #[arg(long, default_value = "")]
    filter: String,
    /// Order, e.g. `create_time desc`, `size_bytes desc, name`.
    #[arg(long, default_value = "")]
    order_by: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the host's libvirt domains, their state and disks.
    Domains {
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one domain.
    Domain { name: String },
    /// Capture a domain's system disk (or --disk) into a new image.
    ///
    /// Modes: cold (the domain is shut off and kept from starting while its disk is read),
    /// shutdown (prep steps in the running guest, shut it down through its agent or ACPI,
    /// capture, --restart it), quiesce (live: prep steps, filesystems frozen for the
    /// consistency point, thawed at once), crash-consistent (live, no agent needed). The
    /// default picks cold for a shut-off domain and quiesce for a running one whose guest
    /// agent answers. Options that do not fit the mode or the domain's state are refused
    /// before anything is touched. Waits and shows progress unless --no-wait. A live capture
    /// of a qcow2 disk into a repository reads only what the guest wrote since the previous
    /// live capture of that disk (`imagectl op` shows how the disk was read, and why in full).
    ///
    /// Examples:
    ///   imagectl capture web1 --name web1-live --mode quiesce --prep all --restore-source
    ///   imagectl capture web1 --name web1-gold --mode shutdown --prep all --restart
    #[command(verbatim_doc_comment)]
    Capture {
        /// The libvirt domain.
        domain: String,
        /// Name of the new image (letters, digits, '.', '_', '-').
        #[arg(long)]
        name: String,
        /// Disk target to capture, e.g. vdb (default: the system disk).
        #[arg(long)]
        disk: Option<String>,
        /// auto, cold, shutdown, quiesce or crash-consistent.
        #[arg(long, default_value = "auto")]
        mode: String,
        /// Prep steps run in the guest first: dhcp, udev-net-rules, setpasswd-hook,
        /// fstab-data-disks, or all (comma-separated).
        #[arg(long, value_delimiter = ',')]
        prep: Vec<String>,
        /// Show the changes the prep steps would make (as diffs) and capture nothing.
        #[arg(long)]
        dry_run: bool,
        /// Undo the prep changes in the source; the image keeps them. quiesce: right after
        /// the consistency point; shutdown (with --restart): once the guest runs again.
        #[arg(long)]
        restore_source: bool,
        /// shutdown: force the domain off if it has not shut down in time.
        #[arg(long)]
        force_off: bool,
        /// shutdown: start the domain again afterwards, whatever the outcome.
        #[arg(long)]
        restart: bool,
        /// shutdown: seconds to wait for the guest to power off.
        #[arg(long, default_value_t = 120)]
        shutdown_timeout: u32,
        /// Where the image goes: `repo` (the local repository, default), `file` (with -o), or
        /// the NAME of a [targets.NAME] of the daemon's config (Glance, S3 or imagerepo).
        #[arg(long, default_value = "repo", value_name = "repo|file|NAME")]
        to: String,
        /// Format of the stream for file, Glance and S3 targets (default qcow2); an imagerepo
        /// target takes none.
        #[arg(long)]
        format: Option<FormatArg>,
        /// imagerepo targets: the repository project (default: the target's `project`).
        #[arg(long)]
        project: Option<String>,
        /// imagerepo targets: the tag of the new version (default "latest").
        #[arg(long)]
        tag: Option<String>,
        /// The file to write with --to file.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Replace the --to file output if it exists.
        #[arg(long)]
        overwrite: bool,
        /// Free text kept on the image.
        #[arg(long, default_value = "")]
        description: String,
        /// Idempotency key (a UUID): repeating the command with the same key returns the same
        /// operation, also after a daemon restart (kept 24 hours).
        #[arg(long)]
        request_id: Option<String>,
        /// Print the operation and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Import a qcow2 or raw file of this host (in an allowed import directory) into a new image.
    Import {
        file: PathBuf,
        /// The file's format; never guessed.
        #[arg(long)]
        format: FormatArg,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        request_id: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// List images in the repository.
    Images {
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one image.
    Image { name: String },
    /// Change an image's display name or description.
    Update {
        name: String,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Write an image to a file (qcow2, or sparse raw) in an allowed export directory.
    Export {
        name: String,
        #[arg(long)]
        format: FormatArg,
        /// Destination file; must not exist unless --overwrite.
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long)]
        overwrite: bool,
        #[arg(long)]
        request_id: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete an image (and the chunks no other image uses).
    Rm { name: String },
    /// List operations (newest first).
    Ops {
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one operation.
    Op { id: String },
    /// Follow an operation until it ends, with progress.
    Watch { id: String },
    /// Wait for an operation to end (at most --timeout seconds) and print it.
    Wait {
        id: String,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Cancel a running operation.
    Cancel { id: String },
    /// Forget a finished operation (and its request id).
    Forget { id: String },
    /// The central image repository's catalog (imagerepo): list and export, delete and
    /// restore, share with projects, quotas, images in use, download links.
    Repo(repo::RepoArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Qcow2,
    Raw,
}

/// Parses arguments, runs the command, returns the exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(run(cli));
    std::process::ExitCode::from(code)
}

async fn run(cli: Cli) -> u8 {
    match dispatch(&cli).await {
        Ok(code) => code,
        Err(status) => {
            if cli.json {
                outln!("{}", output::status_json(&status));
            }
            eprintln!("imagectl: {}", output::escape_controls(status.message()));
            exit_for(status.code())
        }
    }
}

fn exit_for(code: Code) -> u8 {
    match code {
        Code::Ok => exit::OK,
        Code::InvalidArgument | Code::OutOfRange => exit::USAGE,
        Code::NotFound => exit::NOT_FOUND,
        Code::FailedPrecondition | Code::Aborted | Code::AlreadyExists => exit::CONFLICT,
        Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded => exit::UNAVAILABLE,
        Code::Cancelled => exit::CANCELLED,
        Code::PermissionDenied | Code::Unauthenticated => exit::DENIED,
        _ => exit::FAILED,
    }
}

/// Opens a channel to the daemon's unix socket.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::Status> {
    unix_channel(socket).await.map_err(|e| {
        tonic::Status::unavailable(format!(
            "cannot reach imaged at {} ({}): is the daemon running? (systemctl status imaged)",
            socket.display(),
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.to_string())
        ))
    })
}

/// A gRPC channel over the unix socket `socket` (the daemon's or the repository's).
async fn unix_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_path_buf();
    Endpoint::from_static("http://imaged.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

fn op_name(id: &str) -> String {
    if id.starts_with("operations/") {
        id.to_string()
    } else {
        format!("operations/{id}")
    }
}

fn res(collection: &str, id: &str) -> String {
    format!("{collection}/{id}")
}

fn format_enum(f: FormatArg) -> i32 {
    let e = match f {
        FormatArg::Qcow2 => proto::ImageFormat::Qcow2,
        FormatArg::Raw => proto::ImageFormat::Raw,
    };
    e as i32
}

/// `--prep` values (comma-separated names, or `all`) as the API's enum values, in order, once.
fn prep_enums(prep: &[String]) -> Result<Vec<i32>, tonic::Status> {
    use proto::PrepStep as P;
    let all = [
        P::Dhcp,
        P::UdevNetRules,
        P::SetpasswdHook,
        P::FstabDataDisks,
    ];
    let mut out: Vec<i32> = Vec::new();
    for name in prep.iter().flat_map(|p| p.split(',')).map(str::trim) {
        let steps: Vec<P> = match name {
            "all" => all.to_vec(),
            "dhcp" => vec![P::Dhcp],
            "udev-net-rules" => vec![P::UdevNetRules],
            "setpasswd-hook" => vec![P::SetpasswdHook],
            "fstab-data-disks" => vec![P::FstabDataDisks],
            other => {
                return Err(tonic::Status::invalid_argument(format!(
                    "--prep {other:?} is not a prep step: use dhcp, udev-net-rules, \
                     setpasswd-hook, fstab-data-disks or all"
                )))
            }
        };
        for s in steps {
            if !out.contains(&(s as i32)) {
                out.push(s as i32);
            }
        }
    }
    Ok(out)
}

async fn dispatch(cli: &Cli) -> Result<u8, tonic::Status> {
    if let Cmd::Repo(args) = &cli.cmd {
        return repo::run(args, &cli.conn, cli.json).await;
    }
    let ch = connect::connect(&cli.conn).await?;
    let mut doms = DomainServiceClient::new(ch.clone());
    let mut imgs = ImageServiceClient::new(ch.clone());
    let mut ops = OperationServiceClient::new(ch.clone());
    let json = cli.json;
    match &cli.cmd {
        Cmd::Domains { list } => {
            let all = all_pages(|page_token| {
                let mut c = doms.clone();
                let req = proto::ListDomainsRequest {
                    page_size: 1000,
                    page_token,
                    filter: list.filter.clone(),
                    order_by: list.order_by.clone(),
                };
                async move {
                    let r = c.list_domains(req).await?.into_inner();
                    Ok((r.domains, r.next_page_token))
                }
            })
            .await?;
            output::domains(&all, json);
        }
        Cmd::Domain { name } => {
            let d = doms
                .get_domain(proto::GetDomainRequest {
                    name: res("domains", name),
                })
                .await?
                .into_inner();
            output::domains(std::slice::from_ref(&d), json);
        }
        Cmd::Capture {
            domain,
            name,
            disk,
            mode,
            prep,
            dry_run,
            restore_source,
            force_off,
            restart,
            shutdown_timeout,
            to,
            format,
            project,
            tag,
            output: out,
            overwrite,
            description,
            request_id,
            no_wait,
        } => {
            let fmt = format_enum(format.unwrap_or(FormatArg::Qcow2));
            use proto::target::Kind;
            let kind = match (to.as_str(), out) {
                ("repo", None) => Kind::Repository(proto::RepositoryTarget {}),
                ("file", Some(p)) => Kind::File(proto::FileTarget {
                    path: absolute(p).to_string_lossy().into_owned(),
                    format: fmt,
                    overwrite: *overwrite,
                }),
                ("file", None) => {
                    return Err(tonic::Status::invalid_argument("--to file needs -o FILE"))
                }
                (_, Some(_)) => {
                    return Err(tonic::Status::invalid_argument(
                        "-o FILE goes with --to file",
                    ))
                }
                (name, None) => Kind::Remote(proto::RemoteTarget {
                    name: name.to_string(),
                    // Unset: the daemon picks by the target's kind (qcow2, or none).
                    format: format.map(format_enum).unwrap_or_default(),
                    project: project.clone().unwrap_or_default(),
                    tag: tag.clone().unwrap_or_default(),
                }),
            };
            let prep_steps = prep_enums(prep)?;
            if *dry_run {
                let r = imgs
                    .plan_prep(proto::PlanPrepRequest {
                        domain: res("domains", domain),
                        prep_steps,
                    })
                    .await?
                    .into_inner();
                output::prep_reports(&r.steps, json);
                return Ok(exit::OK);
            }
            let mode = match crate::ops::parse_mode(mode)
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
            {
                crate::ops::Mode::Auto => proto::CaptureMode::Unspecified,
                crate::ops::Mode::Cold => proto::CaptureMode::Cold,
                crate::ops::Mode::Shutdown => proto::CaptureMode::Shutdown,
                crate::ops::Mode::Quiesce => proto::CaptureMode::Quiesce,
                crate::ops::Mode::CrashConsistent => proto::CaptureMode::CrashConsistent,
            };
            let op = imgs
                .capture_image(proto::CaptureImageRequest {
                    image_id: name.clone(),
                    domain: res("domains", domain),
                    request_id: request_id.clone().unwrap_or_default(),
                    mode: mode as i32,
                    disk: disk.clone().unwrap_or_default(),
                    shutdown_timeout: Some(prost_types::Duration {
                        seconds: i64::from(*shutdown_timeout),
                        nanos: 0,
                    }),
                    force_off: *force_off,
                    restart: *restart,
                    prep_steps,
                    restore_source: *restore_source,
                    target: Some(proto::Target { kind: Some(kind) }),
                    description: description.clone(),
                })
                .await?
                .into_inner();
            return follow(&mut ops, OpView::from_lro(&op), *no_wait, json).await;
        }
        Cmd::Import {
            file,
            format,
            name,
            description,
            request_id,
            no_wait,
        } => {
            let op = imgs
                .import_image(proto::ImportImageRequest {
                    image_id: name.clone(),
                    path: absolute(file).to_string_lossy().into_owned(),
                    format: format_enum(*format),
                    description: description.clone(),
                    request_id: request_id.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            return follow(&mut ops, OpView::from_lro(&op), *no_wait, json).await;
        }
        Cmd::Images { list } => {
            let all = all_pages(|page_token| {
                let mut c = imgs.clone();
                let req = proto::ListImagesRequest {
                    page_size: 1000,
                    page_token,
                    filter: list.filter.clone(),
                    order_by: list.order_by.clone(),
                };
                async move {
                    let r = c.list_images(req).await?.into_inner();
                    Ok((r.images, r.next_page_token))
                }
            })
            .await?;
            output::images(&all, json);
        }
        Cmd::Image { name } => {
            let i = imgs
                .get_image(proto::GetImageRequest {
                    name: res("images", name),
                })
                .await?
                .into_inner();
            output::image_detail(&i, json);
        }
        Cmd::Update {
            name,
            display_name,
            description,
        } => {
            let mut paths = Vec::new();
            if display_name.is_some() {
                paths.push("display_name".to_string());
            }
            if description.is_some() {
                paths.push("description".to_string());
            }
            if paths.is_empty() {
                return Err(tonic::Status::invalid_argument(
                    "nothing to change: give --display-name and/or --description",
                ));
            }
            let i = imgs
                .update_image(proto::UpdateImageRequest {
                    image: Some(proto::Image {
                        name: res("images", name),
                        display_name: display_name.clone().unwrap_or_default(),
                        description: description.clone().unwrap_or_default(),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                })
                .await?
                .into_inner();
            output::image_detail(&i, json);
        }
        Cmd::Export {
            name,
            format,
            output: out,
            overwrite,
            request_id,
            no_wait,
        } => {
            let op = imgs
                .export_image(proto::ExportImageRequest {
                    name: res("images", name),
                    format: format_enum(*format),
                    path: absolute(out).to_string_lossy().into_owned(),
                    overwrite: *overwrite,
                    request_id: request_id.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            return follow(&mut ops, OpView::from_lro(&op), *no_wait, json).await;
        }
        Cmd::Rm { name } => {
            imgs.delete_image(proto::DeleteImageRequest {
                name: res("images", name),
            })
            .await?;
            output::deleted(name, json);
        }
        Cmd::Ops { list } => {
            let all = all_pages(|page_token| {
                let mut c = ops.clone();
                let req = proto::ListOperationsRequest {
                    page_size: 1000,
                    page_token,
                    filter: list.filter.clone(),
                    order_by: list.order_by.clone(),
                };
                async move {
                    let r = c.list_operations(req).await?.into_inner();
                    let views = r.operations.iter().map(OpView::from_lro).collect();
                    Ok((views, r.next_page_token))
                }
            })
            .await?;
            output::operations(&all, json);
        }
        Cmd::Op { id } => {
            let o = ops
                .get_operation(proto::GetOperationRequest { name: op_name(id) })
                .await?
                .into_inner();
            let o = OpView::from_lro(&o);
            output::operation_detail(&o, json);
            return Ok(op_exit(&o));
        }
        Cmd::Watch { id } => {
            let o = ops
                .get_operation(proto::GetOperationRequest { name: op_name(id) })
                .await?
                .into_inner();
            return follow(&mut ops, OpView::from_lro(&o), false, json).await;
        }
        Cmd::Wait { id, timeout } => {
            let o = ops
                .wait_operation(proto::WaitOperationRequest {
                    name: op_name(id),
                    timeout: Some(prost_types::Duration {
                        seconds: (*timeout).min(600) as i64,
                        nanos: 0,
                    }),
                })
                .await?
                .into_inner();
            let o = OpView::from_lro(&o);
            output::operation_detail(&o, json);
            if !o.done {
                return Ok(exit::UNAVAILABLE);
            }
            return Ok(op_exit(&o));
        }
        Cmd::Cancel { id } => {
            let o = ops
                .cancel_operation(proto::CancelOperationRequest { name: op_name(id) })
                .await?
                .into_inner();
            let o = OpView::from_lro(&o);
            if json {
                outln!("{}", output::operation_json(&o));
            } else {
                outln!("cancel requested for {} ({})", o.id, o.image_name());
            }
        }
        Cmd::Repo(_) => unreachable!("handled above"),
        Cmd::Forget { id } => {
            ops.delete_operation(proto::DeleteOperationRequest { name: op_name(id) })
                .await?;
            if json {
                outln!("{}", serde_json::json!({ "forgotten": id }));
            } else {
                outln!("forgot operation {id}");
            }
        }
    }
    Ok(exit::OK)
}

/// Every item of a List: `page(token)` fetches one page (items, next token) until the token
/// comes back empty.
async fn all_pages<T, F, Fut>(mut page: F) -> Result<Vec<T>, tonic::Status>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

/// Exit code for an operation's final state.
fn op_exit(o: &OpView) -> u8 {
    match proto::OperationState::try_from(o.meta.state) {
        Ok(proto::OperationState::Failed) => {
            let code = o.error.as_ref().map(|e| e.code.as_str()).unwrap_or("");
            match code {
                "RESOURCE_EXHAUSTED" | "UNAVAILABLE" => exit::UNAVAILABLE,
                "FAILED_PRECONDITION" | "ABORTED" | "ALREADY_EXISTS" => exit::CONFLICT,
                "NOT_FOUND" => exit::NOT_FOUND,
                _ => exit::FAILED,
            }
        }
        Ok(proto::OperationState::Cancelled) => exit::CANCELLED,
        _ => exit::OK,
    }
}

/// Follows an operation to its end with a progress bar (terminal), state lines (pipe) or
/// nothing until the final JSON (`--json`).
async fn follow(
    ops: &mut OperationServiceClient<Channel>,
    op: OpView,
    no_wait: bool,
    json: bool,
) -> Result<u8, tonic::Status> {
    if no_wait {
        if json {
            outln!("{}", output::operation_json(&op));
        } else {
            outln!("{}", op.id);
        }
        return Ok(exit::OK);
    }
    let mut stream = ops
        .watch_operation(proto::WatchOperationRequest {
            name: op_name(&op.id),
        })
        .await?
        .into_inner();
    let mut view = output::ProgressView::new(&op, json);
    let mut last = op;
    loop {
        match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
            Ok(Ok(Some(o))) => {
                let o = OpView::from_lro(&o);
                view.update(&o);
                last = o;
            }
            Ok(Ok(None)) => break,
            Ok(Err(status)) => return Err(status),
            Err(_) => {
                // No news for a minute: ask directly, the stream may be stuck behind a proxy.
                let o = ops
                    .get_operation(proto::GetOperationRequest {
                        name: op_name(&last.id),
                    })
                    .await?
                    .into_inner();
                last = OpView::from_lro(&o);
                view.update(&last);
            }
        }
    }
    view.finish(&last);
    Ok(op_exit(&last))
}
