//! `imagectl repo …`: the central image repository's catalog (`imagerepo`) from the command
//! line, over the `imagerepo.v1.ImageCatalog` API.
//!
//! The repository is reached at `--repo-endpoint`: its unix socket by default, or
//! `https://HOST:PORT` with mutual TLS from the same `--ca`, `--cert` and `--key` as the
//! daemon's endpoint ([`super::connect`]). `--project P` names the project to act in: it is
//! sent as the `x-imagerepo-project` metadata (what a service identity, such as a control
//! plane, uses to act for a project), it is the parent `list` reads (`projects/-`, everything
//! the caller sees, without it), and it completes short image names: `IMAGE` is
//! `projects/P/images/IMAGE`, `OWNER/IMAGE` is `projects/OWNER/images/IMAGE`, a full resource
//! name is taken as it is.
//!
//! Output follows the other commands: tables for people, one JSON document with `--json`;
//! `list --format csv` exports the image list as CSV (RFC 4180: a header row, fields quoted
//! when they hold a comma, a quote or a line break, quotes doubled; a cell that a spreadsheet
//! would run as a formula gets a leading `'`). Failed calls exit with the codes of
//! [`super::exit`], their messages naming the image or project; a batch delete prints every
//! image's outcome and exits non-zero when any failed.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::connect::{connect_repo, ConnectOpts};
use super::output::{escape_line, Align, Table};
use super::{all_pages, exit, exit_for};
use crate::proto::imagerepo::v1 as pb;
use crate::util::{human_bytes, rfc3339};
use pb::image_catalog_client::ImageCatalogClient;

/// Where the repository listens by default.
pub const DEFAULT_REPO_ENDPOINT: &str = "unix:///run/imagerepo/imagerepo.sock";
/// The metadata key that names the project a service identity acts for.
pub const PROJECT_HEADER: &str = "x-imagerepo-project";
/// Names a batch delete sends at once (the API's limit).
const BATCH: usize = 1000;

const REPO_HELP: &str = "\
Image names: IMAGE (in --project), OWNER/IMAGE, or projects/OWNER/images/IMAGE.

Examples:
  imagectl repo --project p1 list                          p1's images and those shared with it
  imagectl repo --project p1 list --state active --os linux --format csv > images.csv
  imagectl repo list --deleted --format json               everything you see, recycle bin too
  imagectl repo --project p1 get img-5f3a9c
  imagectl repo --project p1 update img-5f3a9c --display-name 'web golden' --description 'patched'
  imagectl repo --project p1 delete img-1 img-2 img-3      to the recycle bin; each outcome shown
  imagectl repo --project p1 undelete img-1                back from the recycle bin
  imagectl repo --project p1 purge img-1                   gone for good
  imagectl repo --project p1 share img-5f3a9c p2           p2 sees it as pending...
  imagectl repo --project p2 accept p1/img-5f3a9c          ...until it accepts (or rejects) it
  imagectl repo --project p1 members img-5f3a9c
  imagectl repo quota set p1 --limit 20                    admins
  imagectl repo --project p1 in-use mark img-5f3a9c --user domains/web1@host3
  curl -fO -C - \"$(imagectl repo --project p1 link img-5f3a9c --format qcow2 --ttl 2h)\"
  imagectl repo --repo-endpoint https://repo:7444 --ca ca.pem --cert me.pem --key me.key list

Exit codes as for the other commands: 0 done, 2 bad arguments, 3 not found, 4 conflict
(wrong state, in use, licensed), 5 repository unavailable or over quota, 7 permission denied;
a batch delete exits with the failures' code (1 when they differ).";

/// `imagectl repo`: the connection and the subcommand.
#[derive(Args)]
#[command(after_help = REPO_HELP)]
pub struct RepoArgs {
    /// The repository: unix:///PATH, or https://HOST:PORT with mutual TLS (--ca, --cert, --key).
    #[arg(long, global = true, env = "IMAGEREPO_ENDPOINT", default_value = DEFAULT_REPO_ENDPOINT, value_name = "URL")]
    repo_endpoint: String,
    /// The project to act in: sent as x-imagerepo-project (service identities act for any
    /// project), the project `list` shows (default: all you see), and the project of short
    /// image names.
    #[arg(long, global = true, env = "IMAGEREPO_PROJECT")]
    project: Option<String>,
    #[command(subcommand)]
    cmd: RepoCmd,
}

#[derive(Subcommand)]
enum RepoCmd {
    /// List images (every page), newest first: a table, JSON or CSV.
    List {
        /// Only images in this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Only images of this OS type (as recorded at capture, e.g. linux).
        #[arg(long)]
        os: Option<String>,
        /// Only images of this name (the name images are captured under, without the tag).
        #[arg(long)]
        name: Option<String>,
        /// Also list the recycle bin (deleted images).
        #[arg(long)]
        deleted: bool,
        /// table (people), json or csv (exports; --json is the same as --format json).
        #[arg(long, value_enum, default_value = "table")]
        format: ListFormat,
    },
    /// Show one image.
    Get { image: String },
    /// Change an image's display name or description (any state).
    Update {
        image: String,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Move images to the recycle bin (ACTIVE or FAILED ones, not in use); every image's
    /// outcome is shown, and the exit code is non-zero when any failed.
    Delete {
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<String>,
    },
    /// Restore an image from the recycle bin.
    Undelete { image: String },
    /// Remove a deleted image for good.
    Purge { image: String },
    /// Share an image with another project (it sees the image as pending until it accepts).
    Share {
        image: String,
        /// The member project.
        #[arg(value_name = "PROJECT")]
        member: String,
    },
    /// Stop sharing an image with a project.
    Unshare {
        image: String,
        /// The member project.
        #[arg(value_name = "PROJECT")]
        member: String,
    },
    /// List the projects an image is shared with, and their answers.
    Members { image: String },
    /// Accept an image shared with --project.
    Accept { image: String },
    /// Reject an image shared with --project (or remove an accepted one from its list).
    Reject { image: String },
    /// A project's image quota.
    Quota {
        #[command(subcommand)]
        cmd: QuotaCmd,
    },
    /// Mark an image in use by a VM (deleting it is refused meanwhile), or clear the mark.
    InUse {
        #[command(subcommand)]
        cmd: InUseCmd,
    },
    /// A download link (HTTP, resumable with Range, no other credential needed): printed on
    /// the first line.
    Link {
        image: String,
        /// raw or qcow2, generated while it downloads.
        #[arg(long, value_enum, default_value = "raw")]
        format: LinkFormatArg,
        /// How long the link works: 90m, 24h, 7d, or seconds (default 24h, at most 7d).
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
}

#[derive(Subcommand)]
enum QuotaCmd {
    /// Show a project's limit and use (default: --project).
    Get {
        #[arg(value_name = "PROJECT")]
        of: Option<String>,
    },
    /// Set a project's limit of private images (admins; default: --project).
    Set {
        #[arg(value_name = "PROJECT")]
        of: Option<String>,
        #[arg(long)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum InUseCmd {
    /// Mark the image in use by --user (a VM or a person, shown when a delete is refused).
    Mark {
        image: String,
        #[arg(long)]
        user: String,
    },
    /// Clear the mark.
    Clear { image: String },
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
enum StateArg {
    Queued,
    Saving,
    Importing,
    Active,
    Failed,
    Deleted,
}

impl StateArg {
    fn api_name(self) -> &'static str {
        match self {
            StateArg::Queued => "QUEUED",
            StateArg::Saving => "SAVING",
            StateArg::Importing => "IMPORTING",
            StateArg::Active => "ACTIVE",
            StateArg::Failed => "FAILED",
            StateArg::Deleted => "DELETED",
        }
    }
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
enum ListFormat {
    Table,
    Json,
    Csv,
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
enum LinkFormatArg {
    Raw,
    Qcow2,
}

/// Adds `x-imagerepo-project` to every call when a project is given.
#[derive(Clone)]
struct ProjectHeader(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for ProjectHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(PROJECT_HEADER, v.clone());
        }
        Ok(req)
    }
}

type Catalog = ImageCatalogClient<InterceptedService<Channel, ProjectHeader>>;

/// The context of one command: the client and the project.
struct Repo {
    c: Catalog,
    project: Option<String>,
}

impl Repo {
    /// The project, or a usage error saying why one is needed.
    fn project(&self, why: &str) -> Result<&str, Status> {
        self.project.as_deref().ok_or_else(|| {
            Status::invalid_argument(format!("{why} needs --project (or IMAGEREPO_PROJECT)"))
        })
    }

    /// The resource name of `image` (see the module docs).
    fn image(&self, image: &str) -> Result<String, Status> {
        resolve_image(image, self.project.as_deref())
    }
}

/// `projects/P/images/I` from `I` (with `project`), `P/I` or the full name.
fn resolve_image(image: &str, project: Option<&str>) -> Result<String, Status> {
    let bad = |why: &str| {
        Status::invalid_argument(format!(
            "image {image:?}: {why}; write IMAGE (with --project), OWNER/IMAGE or \
             projects/OWNER/images/IMAGE"
        ))
    };
    let segs: Vec<&str> = image.split('/').collect();
    if segs.iter().any(|s| s.is_empty()) {
        return Err(bad("an empty name part"));
    }
    match segs.as_slice() {
        ["projects", _, "images", _] => Ok(image.to_string()),
        [p, i] => Ok(format!("projects/{p}/images/{i}")),
        [i] => match project {
            Some(p) => Ok(format!("projects/{p}/images/{i}")),
            None => Err(bad("a short name needs --project")),
        },
        _ => Err(bad("not an image name")),
    }
}

/// `s` with `what` in front, unless the message names it already; the error details (the
/// `ErrorInfo` reason) are kept.
fn naming(what: String) -> impl Fn(Status) -> Status {
    move |s| {
        if s.message().contains(&what) {
            s
        } else {
            Status::with_details(
                s.code(),
                format!("{what}: {}", s.message()),
                s.details().to_vec().into(),
            )
        }
    }
}

/// The AIP-160 filter of `list`'s options.
fn list_filter(
    state: Option<StateArg>,
    os: Option<&str>,
    name: Option<&str>,
) -> Result<String, Status> {
    let mut terms = Vec::new();
    if let Some(s) = state {
        terms.push(format!("state = \"{}\"", s.api_name()));
    }
    for (field, flag, v) in [("os_type", "--os", os), ("image_name", "--name", name)] {
        if let Some(v) = v {
            if v.contains('"') || v.contains('\\') {
                return Err(Status::invalid_argument(format!(
                    "{flag} {v:?}: quotes and backslashes cannot be matched"
                )));
            }
            terms.push(format!("{field} = \"{v}\""));
        }
    }
    Ok(terms.join(" AND "))
}

/// Parses a TTL: `90m`, `24h`, `7d`, `30s` or plain seconds; positive.
fn parse_ttl(s: &str) -> Result<Duration, Status> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => 0,
    };
    let n: u64 = num.parse().unwrap_or(0);
    match n.checked_mul(mult) {
        Some(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err(Status::invalid_argument(format!(
            "--ttl {s:?}: write a positive duration like 90m, 24h, 7d or 3600"
        ))),
    }
}

/// Runs `imagectl repo …`; the exit code, or the failed call's status.
pub(super) async fn run(args: &RepoArgs, conn: &ConnectOpts, json: bool) -> Result<u8, Status> {
    let header = match &args.project {
        Some(p) => Some(p.parse::<MetadataValue<Ascii>>().map_err(|_| {
            Status::invalid_argument(format!("--project {p:?} is not a valid project id"))
        })?),
        None => None,
    };
    let ch = connect_repo(&args.repo_endpoint, conn, "--repo-endpoint").await?;
    let mut r = Repo {
        c: ImageCatalogClient::with_interceptor(ch, ProjectHeader(header)),
        project: args.project.clone(),
    };
    match &args.cmd {
        RepoCmd::List {
            state,
            os,
            name,
            deleted,
            format,
        } => {
            let filter = list_filter(*state, os.as_deref(), name.as_deref())?;
            let parent = match &r.project {
                Some(p) => format!("projects/{p}"),
                None => "projects/-".to_string(),
            };
            let c = r.c.clone();
            let all = all_pages(|page_token| {
                let mut c = c.clone();
                let req = pb::ListImagesRequest {
                    parent: parent.clone(),
                    page_size: 1000,
                    page_token,
                    filter: filter.clone(),
                    show_deleted: *deleted,
                };
                async move {
                    let resp = c.list_images(req).await?.into_inner();
                    Ok((resp.images, resp.next_page_token))
                }
            })
            .await
            .map_err(naming(format!("listing the images of {parent}")))?;
            let format = if json { ListFormat::Json } else { *format };
            out!("{}", images_out(&all, format));
        }
        RepoCmd::Get { image } => {
            let name = r.image(image)?;
            let i =
                r.c.get_image(pb::GetImageRequest { name: name.clone() })
                    .await
                    .map_err(naming(format!("image {name}")))?
                    .into_inner();
            out!("{}", image_detail(&i, json));
        }
        RepoCmd::Update {
            image,
            display_name,
            description,
        } => {
            let name = r.image(image)?;
            let mut paths = Vec::new();
            if display_name.is_some() {
                paths.push("display_name".to_string());
            }
            if description.is_some() {
                paths.push("description".to_string());
            }
            if paths.is_empty() {
                return Err(Status::invalid_argument(
                    "nothing to change: give --display-name and/or --description",
                ));
            }
            let i =
                r.c.update_image(pb::UpdateImageRequest {
                    image: Some(pb::Image {
                        name: name.clone(),
                        display_name: display_name.clone().unwrap_or_default(),
                        description: description.clone().unwrap_or_default(),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                })
                .await
                .map_err(naming(format!("image {name}")))?
                .into_inner();
            out!("{}", image_detail(&i, json));
        }
        RepoCmd::Delete { images } => {
            let names = images
                .iter()
                .map(|i| r.image(i))
                .collect::<Result<Vec<_>, _>>()?;
            let mut outcomes = Vec::with_capacity(names.len());
            for batch in names.chunks(BATCH) {
                let resp =
                    r.c.batch_delete_images(pb::BatchDeleteImagesRequest {
                        names: batch.to_vec(),
                    })
                    .await
                    .map_err(naming(format!("deleting {} images", batch.len())))?
                    .into_inner();
                outcomes.extend(resp.outcomes);
            }
            out!("{}", outcomes_out(&outcomes, json));
            return Ok(batch_exit(&outcomes));
        }
        RepoCmd::Undelete { image } => {
            let name = r.image(image)?;
            let i =
                r.c.undelete_image(pb::UndeleteImageRequest { name: name.clone() })
                    .await
                    .map_err(naming(format!("image {name}")))?
                    .into_inner();
            out!("{}", image_detail(&i, json));
        }
        RepoCmd::Purge { image } => {
            let name = r.image(image)?;
            r.c.purge_image(pb::PurgeImageRequest { name: name.clone() })
                .await
                .map_err(naming(format!("image {name}")))?;
            done(json, json!({ "purged": name }), format!("purged {name}"));
        }
        RepoCmd::Share {
            image,
            member: project,
        } => {
            let name = r.image(image)?;
            let m =
                r.c.add_image_member(pb::AddImageMemberRequest {
                    parent: name.clone(),
                    member_project: project.clone(),
                })
                .await
                .map_err(naming(format!(
                    "sharing image {name} with project {project}"
                )))?
                .into_inner();
            done(
                json,
                member_json(&m),
                format!(
                    "shared {name} with project {project} ({}: it sees the image once it accepts)",
                    member_state(m.state)
                ),
            );
        }
        RepoCmd::Unshare {
            image,
            member: project,
        } => {
            let name = r.image(image)?;
            let member = format!("{name}/members/{project}");
            r.c.remove_image_member(pb::RemoveImageMemberRequest {
                name: member.clone(),
            })
            .await
            .map_err(naming(format!(
                "unsharing image {name} with project {project}"
            )))?;
            done(
                json,
                json!({ "removed": member }),
                format!("stopped sharing {name} with project {project}"),
            );
        }
        RepoCmd::Members { image } => {
            let name = r.image(image)?;
            let c = r.c.clone();
            let all = all_pages(|page_token| {
                let mut c = c.clone();
                let req = pb::ListImageMembersRequest {
                    parent: name.clone(),
                    page_size: 1000,
                    page_token,
                };
                async move {
                    let resp = c.list_image_members(req).await?.into_inner();
                    Ok((resp.members, resp.next_page_token))
                }
            })
            .await
            .map_err(naming(format!("members of image {name}")))?;
            out!("{}", members_out(&all, json));
        }
        RepoCmd::Accept { image } | RepoCmd::Reject { image } => {
            let accept = matches!(args.cmd, RepoCmd::Accept { .. });
            let verb = if accept { "accepting" } else { "rejecting" };
            let me = r.project(verb)?.to_string();
            let name = r.image(image)?;
            let state = if accept {
                pb::MemberState::Accepted
            } else {
                pb::MemberState::Rejected
            };
            let m =
                r.c.update_image_membership(pb::UpdateImageMembershipRequest {
                    name: format!("{name}/members/{me}"),
                    state: state as i32,
                })
                .await
                .map_err(naming(format!("{verb} image {name} for project {me}")))?
                .into_inner();
            done(
                json,
                member_json(&m),
                format!("project {me}: image {name} {}", member_state(m.state)),
            );
        }
        RepoCmd::Quota { cmd } => {
            let (project, limit) = match cmd {
                QuotaCmd::Get { of } => (of, None),
                QuotaCmd::Set { of, limit } => (of, Some(*limit)),
            };
            let project = match project {
                Some(p) => p.clone(),
                None => r.project("a quota without a PROJECT argument")?.to_string(),
            };
            let qname = format!("projects/{project}/quota");
            let what = naming(format!("quota of project {project}"));
            let q = match limit {
                None => {
                    r.c.get_project_quota(pb::GetProjectQuotaRequest {
                        name: qname.clone(),
                    })
                    .await
                    .map_err(what)?
                }
                Some(limit) => {
                    r.c.update_project_quota(pb::UpdateProjectQuotaRequest {
                        quota: Some(pb::ProjectQuota {
                            name: qname.clone(),
                            image_limit: limit,
                            image_count: 0,
                        }),
                    })
                    .await
                    .map_err(what)?
                }
            }
            .into_inner();
            done(
                json,
                json!({ "name": q.name, "image_limit": q.image_limit, "image_count": q.image_count }),
                format!(
                    "project {project}: {} of {} private images",
                    q.image_count, q.image_limit
                ),
            );
        }
        RepoCmd::InUse { cmd } => {
            let i = match cmd {
                InUseCmd::Mark { image, user } => {
                    let name = r.image(image)?;
                    r.c.mark_image_in_use(pb::MarkImageInUseRequest {
                        name: name.clone(),
                        user: user.clone(),
                    })
                    .await
                    .map_err(naming(format!("image {name}")))?
                }
                InUseCmd::Clear { image } => {
                    let name = r.image(image)?;
                    r.c.clear_image_in_use(pb::ClearImageInUseRequest { name: name.clone() })
                        .await
                        .map_err(naming(format!("image {name}")))?
                }
            }
            .into_inner();
            out!("{}", image_detail(&i, json));
        }
        RepoCmd::Link { image, format, ttl } => {
            let name = r.image(image)?;
            let ttl = parse_ttl(ttl)?;
            let format = match format {
                LinkFormatArg::Raw => pb::ImageFormat::Raw,
                LinkFormatArg::Qcow2 => pb::ImageFormat::Qcow2,
            };
            let l =
                r.c.create_download_link(pb::CreateDownloadLinkRequest {
                    name: name.clone(),
                    format: format as i32,
                    ttl: Some(prost_types::Duration {
                        seconds: ttl.as_secs() as i64,
                        nanos: 0,
                    }),
                })
                .await
                .map_err(naming(format!("download link of image {name}")))?
                .into_inner();
            let fmt = format_name(l.format);
            let expires = time(&l.expire_time);
            done(
                json,
                json!({ "url": l.url, "expire_time": expires, "size_bytes": l.size_bytes, "format": fmt }),
                format!(
                    "{}\n{fmt}, {} ({} bytes), expires {}",
                    l.url,
                    human_bytes(l.size_bytes),
                    l.size_bytes,
                    expires.as_str().unwrap_or("-")
                ),
            );
        }
    }
    Ok(exit::OK)
}

/// Prints `value` (JSON) or `line` (people).
fn done(json: bool, value: Value, line: String) {
    if json {
        outln!("{value}");
    } else {
        outln!("{}", escape_line(&line).replace("\\x0a", "\n"));
    }
}

/// The exit code of a batch delete: OK when every image went, else the failures' code (their
/// common code's exit, or FAILED when they differ).
fn batch_exit(outcomes: &[pb::DeleteOutcome]) -> u8 {
    let mut codes = outcomes.iter().filter(|o| o.code != 0).map(|o| o.code);
    let Some(first) = codes.next() else {
        return exit::OK;
    };
    if codes.all(|c| c == first) {
        match exit_for(Code::from_i32(first)) {
            exit::OK => exit::FAILED,
            e => e,
        }
    } else {
        exit::FAILED
    }
}

fn state_name(s: i32) -> &'static str {
    match pb::ImageState::try_from(s) {
        Ok(pb::ImageState::Queued) => "queued",
        Ok(pb::ImageState::Saving) => "saving",
        Ok(pb::ImageState::Importing) => "importing",
        Ok(pb::ImageState::Active) => "active",
        Ok(pb::ImageState::Failed) => "failed",
        Ok(pb::ImageState::Deleted) => "deleted",
        _ => "",
    }
}

fn format_name(f: i32) -> &'static str {
    match pb::ImageFormat::try_from(f) {
        Ok(pb::ImageFormat::Raw) => "raw",
        Ok(pb::ImageFormat::Qcow2) => "qcow2",
        _ => "",
    }
}

fn consistency(c: i32) -> &'static str {
    match pb::Consistency::try_from(c) {
        Ok(pb::Consistency::Cold) => "cold",
        Ok(pb::Consistency::Quiesced) => "quiesced",
        Ok(pb::Consistency::CrashConsistent) => "crash-consistent",
        Ok(pb::Consistency::Imported) => "imported",
        _ => "",
    }
}

fn visibility(v: i32) -> &'static str {
    match pb::Visibility::try_from(v) {
        Ok(pb::Visibility::Own) => "own",
        Ok(pb::Visibility::Shared) => "shared",
        _ => "",
    }
}

fn member_state(s: i32) -> &'static str {
    match pb::MemberState::try_from(s) {
        Ok(pb::MemberState::Pending) => "pending",
        Ok(pb::MemberState::Accepted) => "accepted",
        Ok(pb::MemberState::Rejected) => "rejected",
        _ => "",
    }
}

/// A timestamp as RFC 3339, or null.
fn time(t: &Option<prost_types::Timestamp>) -> Value {
    match t {
        Some(t) if t.seconds != 0 || t.nanos != 0 => Value::String(rfc3339(t.seconds)),
        _ => Value::Null,
    }
}

/// An image's fields, in the order of the JSON object and the CSV columns.
fn image_fields(i: &pb::Image) -> Vec<(&'static str, Value)> {
    let id = i.name.rsplit('/').next().unwrap_or("");
    vec![
        ("name", json!(i.name)),
        ("id", json!(id)),
        ("image_name", json!(i.image_name)),
        ("tag", json!(i.tag)),
        ("display_name", json!(i.display_name)),
        ("description", json!(i.description)),
        ("project", json!(i.project)),
        ("state", json!(state_name(i.state))),
        ("failure_reason", json!(i.failure_reason)),
        ("deleted_from", json!(state_name(i.deleted_from))),
        ("os_type", json!(i.os_type)),
        ("os_version", json!(i.os_version)),
        ("architecture", json!(i.architecture)),
        ("virtual_size_bytes", json!(i.virtual_size_bytes)),
        ("stored_size_bytes", json!(i.stored_size_bytes)),
        ("data_chunk_count", json!(i.data_chunk_count)),
        ("source_format", json!(format_name(i.source_format))),
        ("consistency", json!(consistency(i.consistency))),
        ("content_digest", json!(i.content_digest)),
        ("source_domain", json!(i.source_domain)),
        ("source_host", json!(i.source_host)),
        ("licensed", json!(i.licensed)),
        ("in_use_by", json!(i.in_use_by)),
        ("visibility", json!(visibility(i.visibility))),
        ("membership", json!(member_state(i.membership))),
        ("create_time", time(&i.create_time)),
        ("update_time", time(&i.update_time)),
        ("last_used_time", time(&i.last_used_time)),
        ("delete_time", time(&i.delete_time)),
        ("purge_time", time(&i.purge_time)),
    ]
}

/// One image as a JSON object.
fn image_json(i: &pb::Image) -> Value {
    Value::Object(
        image_fields(i)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<Map<_, _>>(),
    )
}

/// A JSON value as CSV text: strings as they are, null empty.
fn plain(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote, a line break or outer
/// spaces, quotes doubled; a text a spreadsheet would evaluate (`=`, `+`, `-`, `@`, tab or
/// carriage return first) gets a leading `'`.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    let quote = s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ');
    if quote {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Images as CSV: a header row, then one row per image, lines ending in CRLF.
fn images_csv(is: &[pb::Image]) -> String {
    let header: Vec<&str> = image_fields(&pb::Image::default())
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut out = header.join(",");
    out.push_str("\r\n");
    for i in is {
        let row: Vec<String> = image_fields(i)
            .iter()
            .map(|(_, v)| csv_field(&plain(v)))
            .collect();
        out.push_str(&row.join(","));
        out.push_str("\r\n");
    }
    out
}

/// Images as a table for people.
fn images_table(is: &[pb::Image]) -> String {
    use Align::*;
    let mut t = Table::new(&[
        ("IMAGE", Left),
        ("NAME", Left),
        ("PROJECT", Left),
        ("STATE", Left),
        ("OS", Left),
        ("VIRTUAL", Right),
        ("STORED", Right),
        ("UPDATED", Left),
    ]);
    for i in is {
        let mut state = state_name(i.state).to_string();
        if i.visibility == pb::Visibility::Shared as i32 {
            state = format!("{state} (shared, {})", member_state(i.membership));
        }
        if !i.in_use_by.is_empty() {
            state.push_str(", in use");
        }
        let name = if i.tag.is_empty() {
            i.image_name.clone()
        } else {
            format!("{}:{}", i.image_name, i.tag)
        };
        t.row(vec![
            i.name.rsplit('/').next().unwrap_or("").to_string(),
            name,
            i.project.clone(),
            state,
            [i.os_type.as_str(), i.os_version.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" "),
            human_bytes(i.virtual_size_bytes),
            human_bytes(i.stored_size_bytes),
            plain(&time(&i.update_time)),
        ]);
    }
    t.render()
}

/// The image list in `format`.
fn images_out(is: &[pb::Image], format: ListFormat) -> String {
    match format {
        ListFormat::Table => images_table(is),
        ListFormat::Csv => images_csv(is),
        ListFormat::Json => format!("{}\n", Value::Array(is.iter().map(image_json).collect())),
    }
}

/// One image in full: JSON, or a `field: value` line per non-empty field.
fn image_detail(i: &pb::Image, json: bool) -> String {
    if json {
        return format!("{}\n", image_json(i));
    }
    let mut out = String::new();
    for (k, v) in image_fields(i) {
        let v = plain(&v);
        if v.is_empty() || v == "false" || v == "0" && k.ends_with("_count") {
            continue;
        }
        let v = match k {
            "virtual_size_bytes" | "stored_size_bytes" => {
                let n: u64 = v.parse().unwrap_or(0);
                format!("{} ({n} bytes)", human_bytes(n))
            }
            _ => v,
        };
        out.push_str(&format!("{:<19} {}\n", format!("{k}:"), escape_line(&v)));
    }
    out
}

fn member_json(m: &pb::ImageMember) -> Value {
    json!({
        "name": m.name, "member_project": m.member_project, "state": member_state(m.state),
        "create_time": time(&m.create_time), "update_time": time(&m.update_time),
    })
}

fn members_out(ms: &[pb::ImageMember], json: bool) -> String {
    if json {
        return format!("{}\n", Value::Array(ms.iter().map(member_json).collect()));
    }
    let mut t = Table::new(&[
        ("MEMBER", Align::Left),
        ("STATE", Align::Left),
        ("SHARED", Align::Left),
        ("UPDATED", Align::Left),
    ]);
    for m in ms {
        t.row(vec![
            m.member_project.clone(),
            member_state(m.state).to_string(),
            plain(&time(&m.create_time)),
            plain(&time(&m.update_time)),
        ]);
    }
    t.render()
}

/// A batch delete's outcomes: JSON (`outcomes`, `failed`), or a table of every image.
fn outcomes_out(os: &[pb::DeleteOutcome], json: bool) -> String {
    let failed = os.iter().filter(|o| o.code != 0).count();
    if json {
        let items: Vec<Value> = os
            .iter()
            .map(|o| {
                json!({
                    "name": o.name, "ok": o.code == 0,
                    "code": super::view::code_name(o.code), "reason": o.reason, "message": o.message,
                })
            })
            .collect();
        return format!("{}\n", json!({ "outcomes": items, "failed": failed }));
    }
    let mut t = Table::new(&[("IMAGE", Align::Left), ("RESULT", Align::Left)]);
    for o in os {
        let result = if o.code == 0 {
            "deleted (in the recycle bin)".to_string()
        } else {
            format!("{}: {}", super::view::code_name(o.code), o.message)
        };
        t.row(vec![o.name.clone(), result]);
    }
    let mut out = t.render();
    out.push_str(&format!("{} deleted, {failed} failed\n", os.len() - failed));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(id: &str, description: &str) -> pb::Image {
        pb::Image {
            name: format!("projects/p1/images/{id}"),
            image_name: "web".into(),
            tag: "nightly".into(),
            display_name: "web, golden".into(),
            description: description.into(),
            project: "p1".into(),
            state: pb::ImageState::Active as i32,
            os_type: "linux".into(),
            os_version: "debian 12".into(),
            virtual_size_bytes: 10 << 30,
            stored_size_bytes: 3 << 29,
            source_format: pb::ImageFormat::Qcow2 as i32,
            consistency: pb::Consistency::Quiesced as i32,
            create_time: Some(prost_types::Timestamp {
                seconds: 1_780_000_000,
                nanos: 0,
            }),
            update_time: Some(prost_types::Timestamp {
                seconds: 1_780_000_060,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    /// A minimal RFC 4180 reader, to check that what is written reads back.
    fn read_csv(text: &str) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        let mut row = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                (true, '"') => quoted = false,
                (true, c) => field.push(c),
                (false, '"') => quoted = true,
                (false, ',') => row.push(std::mem::take(&mut field)),
                (false, '\r') => {}
                (false, '\n') => {
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                (false, c) => field.push(c),
            }
        }
        rows
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field(""), "");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field("cr\rhere"), "\"cr\rhere\"");
        assert_eq!(csv_field(" padded "), "\" padded \"");
        assert_eq!(csv_field("=SUM(A1)"), "'=SUM(A1)");
        assert_eq!(csv_field("+1"), "'+1");
        assert_eq!(csv_field("-x,y"), "\"'-x,y\"");
        assert_eq!(csv_field("@cmd"), "'@cmd");
        assert_eq!(csv_field("a=b"), "a=b");
    }

    #[test]
    fn image_list_csv_has_a_header_and_reads_back() {
        let tricky = "line one\nline \"two\", with a comma";
        let csv = images_csv(&[img("img-1", tricky), img("img-2", "")]);
        assert!(csv.starts_with("name,id,image_name,tag,display_name,description,project,state,"));
        assert!(csv.ends_with("\r\n"));
        let rows = read_csv(&csv);
        assert_eq!(rows.len(), 3);
        let header = &rows[0];
        assert!(rows.iter().all(|r| r.len() == header.len()));
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        assert_eq!(rows[1][col("name")], "projects/p1/images/img-1");
        assert_eq!(rows[1][col("id")], "img-1");
        assert_eq!(rows[1][col("description")], tricky);
        assert_eq!(rows[1][col("display_name")], "web, golden");
        assert_eq!(rows[1][col("state")], "active");
        assert_eq!(
            rows[1][col("virtual_size_bytes")],
            (10u64 << 30).to_string()
        );
        assert_eq!(rows[1][col("create_time")], "2026-05-28T20:26:40Z");
        assert_eq!(rows[1][col("delete_time")], "", "absent times are empty");
        assert_eq!(rows[1][col("licensed")], "false");
        assert_eq!(rows[2][col("description")], "");
        // The CSV columns are the JSON keys, in order.
        let j = image_json(&img("img-1", tricky));
        let keys: Vec<&String> = j.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), header.len());
        assert_eq!(j["description"], tricky);
    }

    #[test]
    fn image_table_lines_up_and_escapes() {
        let mut shared = img("img-2", "");
        shared.visibility = pb::Visibility::Shared as i32;
        shared.membership = pb::MemberState::Pending as i32;
        shared.project = "p0".into();
        shared.in_use_by = "domains/web1".into();
        shared.image_name = "evil\x1b[2J".into();
        let t = images_table(&[img("img-1", ""), shared]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("IMAGE  NAME"), "{t}");
        let at = |l: &str, h: &str| lines[0].find(h).map(|i| l[i..].to_string());
        assert!(at(lines[1], "PROJECT").unwrap().starts_with("p1 "));
        assert!(at(lines[2], "STATE")
            .unwrap()
            .starts_with("active (shared, pending), in use"));
        assert!(lines[1].contains("web:nightly"));
        assert!(lines[1].contains("linux debian 12"));
        assert!(lines[1].contains("10.0 GiB"), "{t}");
        assert!(!t.contains('\x1b'), "control characters are escaped");
        assert!(t.contains("\\x1b[2J"));
        // VIRTUAL is right-aligned: its cells end where its header ends.
        let end = lines[0].find("VIRTUAL").unwrap() + "VIRTUAL".len();
        assert_eq!(&lines[1][end - 3..end], "GiB");
    }

    #[test]
    fn delete_outcomes_and_exit_codes() {
        let ok = pb::DeleteOutcome {
            name: "projects/p1/images/a".into(),
            ..Default::default()
        };
        let busy = pb::DeleteOutcome {
            name: "projects/p1/images/b".into(),
            code: Code::FailedPrecondition as i32,
            message: "in use by domains/web1".into(),
            reason: "IMAGE_IN_USE".into(),
        };
        let gone = pb::DeleteOutcome {
            name: "projects/p1/images/c".into(),
            code: Code::NotFound as i32,
            message: "no such image".into(),
            reason: String::new(),
        };
        assert_eq!(batch_exit(&[ok.clone(), ok.clone()]), exit::OK);
        assert_eq!(batch_exit(&[ok.clone(), busy.clone()]), exit::CONFLICT);
        assert_eq!(
            batch_exit(&[ok.clone(), busy.clone(), gone.clone()]),
            exit::FAILED
        );
        let t = outcomes_out(&[ok.clone(), busy.clone()], false);
        assert!(t.contains("projects/p1/images/a  deleted"), "{t}");
        assert!(
            t.contains("FAILED_PRECONDITION: in use by domains/web1"),
            "{t}"
        );
        assert!(t.ends_with("1 deleted, 1 failed\n"));
        let j: Value = serde_json::from_str(&outcomes_out(&[ok, busy], true)).unwrap();
        assert_eq!(j["failed"], 1);
        assert_eq!(j["outcomes"][1]["reason"], "IMAGE_IN_USE");
        assert_eq!(j["outcomes"][0]["ok"], true);
    }

    #[test]
    fn names_filters_and_ttls() {
        assert_eq!(
            resolve_image("img-1", Some("p1")).unwrap(),
            "projects/p1/images/img-1"
        );
        assert_eq!(
            resolve_image("p0/img-1", Some("p1")).unwrap(),
            "projects/p0/images/img-1"
        );
        assert_eq!(
            resolve_image("projects/p0/images/img-1", None).unwrap(),
            "projects/p0/images/img-1"
        );
        let e = resolve_image("img-1", None).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("--project"));
        assert!(resolve_image("a/b/c", Some("p")).is_err());
        assert!(resolve_image("p//x", Some("p")).is_err());

        assert_eq!(list_filter(None, None, None).unwrap(), "");
        assert_eq!(
            list_filter(Some(StateArg::Active), Some("linux"), Some("web")).unwrap(),
            "state = \"ACTIVE\" AND os_type = \"linux\" AND image_name = \"web\""
        );
        assert!(list_filter(None, Some("a\"b"), None).is_err());

        assert_eq!(parse_ttl("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_ttl("90m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_ttl("3600").unwrap(), Duration::from_secs(3_600));
        assert_eq!(parse_ttl("30s").unwrap(), Duration::from_secs(30));
        for bad in ["", "0", "h", "5w", "-1h", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn help_parses() {
        use clap::CommandFactory;
        super::super::Cli::command().debug_assert();
        let cli = <super::super::Cli as clap::Parser>::try_parse_from([
            "imagectl",
            "repo",
            "--project",
            "p1",
            "list",
            "--state",
            "active",
            "--format",
            "csv",
        ]);
        assert!(cli.is_ok());
        // A positional PROJECT is not the global --project (one clap id would merge them).
        let cli = <super::super::Cli as clap::Parser>::try_parse_from([
            "imagectl",
            "repo",
            "--project",
            "p1",
            "share",
            "img",
            "p2",
        ])
        .unwrap();
        let super::super::Cmd::Repo(args) = cli.cmd else {
            panic!("not a repo command")
        };
        assert_eq!(args.project.as_deref(), Some("p1"));
        assert!(matches!(&args.cmd, RepoCmd::Share { member, .. } if member == "p2"));
    }
}
