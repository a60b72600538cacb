//! The gRPC services `imagerepo.v1.ChunkService` and `imagerepo.v1.ImageCatalog`: thin. Each
//! call resolves its caller ([`super::identity`]), decodes the request, calls the catalog or
//! the chunk store on a blocking thread, and encodes the answer; errors carry a
//! `google.rpc.ErrorInfo` of domain "imagerepo" and a stable reason. Every PERMISSION_DENIED
//! is logged with the caller and the method.

use std::pin::Pin;
use std::sync::{Arc, RwLock};

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::catalog::{
    parse_parent, Catalog, ImageRef, ImageView, ListQuery, MemberRow, MemberState, UploadMeta,
    UploadRef, UploadRow, UploadState,
};
use super::chunks::{parse_digest, verify, ChunkStore};
use super::config::GcConfig;
use super::identity::{Principal, RepoPolicy, PROJECT_HEADER};
use super::ERROR_DOMAIN;
use crate::api::auth::Peer;
use crate::error::{denied, invalid, precondition, Error, ErrorKind, Result};
use crate::proto::imagerepo::v1 as pb;
use crate::repo::{DataChunk, CHUNK_SIZE};

/// Largest piece of chunk bytes in one message.
pub const MAX_PIECE: usize = 1 << 20;
/// Manifest entries per GetManifest message.
const MANIFEST_BATCH: usize = 8192;

/// What the services share.
pub struct Repo {
    pub catalog: Arc<Catalog>,
    pub chunks: Arc<dyn ChunkStore>,
    pub policy: RepoPolicy,
    /// Taken shared while a chunk is looked up or stored for an upload, exclusively while the
    /// collector removes chunks.
    pub gate: Arc<RwLock<()>>,
    pub gc: GcConfig,
    /// Download links: the signer and the URL base, set once their listener is bound (unset:
    /// `[download] download_listen` is empty, links are refused).
    pub links: std::sync::OnceLock<Links>,
}

/// What making a download link needs.
pub struct Links {
    pub signer: Arc<super::download::LinkSigner>,
    /// `http://host:port` (or the configured public URL), without a trailing `/`.
    pub base_url: String,
}

/// Download links live 24 hours unless the request says otherwise, 7 days at most.
const LINK_TTL_DEFAULT: u64 = 24 * 3600;
const LINK_TTL_MAX: u64 = 7 * 24 * 3600;

/// Both services over one [`Repo`].
#[derive(Clone)]
pub struct RepoService {
    repo: Arc<Repo>,
}

fn ts(secs: i64) -> Option<prost_types::Timestamp> {
    (secs > 0).then_some(prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

fn state_pb(s: super::catalog::State) -> i32 {
    pb::ImageState::from_str_name(s.name())
        .map(|x| x as i32)
        .unwrap_or(0)
}

fn member_state_pb(s: MemberState) -> pb::MemberState {
    match s {
        MemberState::Pending => pb::MemberState::Pending,
        MemberState::Accepted => pb::MemberState::Accepted,
        MemberState::Rejected => pb::MemberState::Rejected,
    }
}

/// The proto form of an image as its caller sees it.
pub fn image_pb(v: &ImageView) -> pb::Image {
    let i = &v.image;
    pb::Image {
        name: i.name(),
        image_name: i.image_name.clone(),
        tag: i.tag.clone(),
        display_name: v.display_name(),
        description: i.description.clone(),
        project: i.project.clone(),
        state: state_pb(i.state),
        failure_reason: i.failure_reason.clone(),
        deleted_from: i.deleted_from.map(state_pb).unwrap_or(0),
        source_domain: i.source_domain.clone(),
        source_host: i.source_host.clone(),
        os_type: i.os_type.clone(),
        os_version: i.os_version.clone(),
        architecture: i.architecture.clone(),
        virtual_size_bytes: i.virtual_size,
        stored_size_bytes: i.stored_size,
        source_format: i.source_format,
        content_digest: i.content_digest.clone(),
        consistency: i.consistency,
        licensed: i.licensed,
        in_use_by: i.in_use_by.clone(),
        visibility: if v.membership.is_some() {
            pb::Visibility::Shared as i32
        } else {
            pb::Visibility::Own as i32
        },
        membership: v.membership.map(|m| member_state_pb(m) as i32).unwrap_or(0),
        create_time: ts(i.create_time),
        update_time: ts(i.update_time),
        last_used_time: ts(i.last_used_time),
        delete_time: ts(i.delete_time),
        purge_time: ts(i.purge_time),
        data_chunk_count: i.data_chunk_count,
    }
}

fn upload_pb(u: &UploadRow) -> pb::Upload {
    pb::Upload {
        name: u.name(),
        image: u.image_name(),
        state: match u.state {
            UploadState::Open => pb::UploadState::Open,
            UploadState::Committed => pb::UploadState::Committed,
            UploadState::Aborted => pb::UploadState::Aborted,
        } as i32,
        entries: u.entries,
        chunks_received: u.chunks_received,
        bytes_received: u.bytes_received,
        create_time: ts(u.create_time),
        update_time: ts(u.update_time),
    }
}

fn member_pb(m: &MemberRow) -> pb::ImageMember {
    pb::ImageMember {
        name: m.name(),
        member_project: m.member_project.clone(),
        state: member_state_pb(m.state) as i32,
        create_time: ts(m.create_time),
        update_time: ts(m.update_time),
    }
}

/// Parses `projects/{p}/images/{i}/members/{m}`.
fn parse_member(name: &str) -> Result<(ImageRef, String)> {
    match name.rsplit_once("/members/") {
        Some((image, member)) if !member.is_empty() && !member.contains('/') => {
            Ok((ImageRef::parse(image, "name")?, member.to_string()))
        }
        _ => Err(invalid(format!(
            "name {name:?} is not projects/{{project}}/images/{{image}}/members/{{member_project}}"
        ))
        .with_reason("BAD_NAME")
        .with_field("name")),
    }
}

/// Runs blocking catalog or store work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(Error::new(ErrorKind::Internal, "a worker thread failed").with_source(e))
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

impl RepoService {
    /// The services over `repo`.
    pub fn new(repo: Arc<Repo>) -> RepoService {
        RepoService { repo }
    }

    /// The caller of `req`, or the refusal.
    fn principal<T>(
        &self,
        req: &Request<T>,
        method: &str,
    ) -> std::result::Result<Principal, Status> {
        let peer = Peer::of(req.extensions());
        let header = req
            .metadata()
            .get(PROJECT_HEADER)
            .and_then(|v| v.to_str().ok());
        self.repo
            .policy
            .principal(&peer, header)
            .map_err(|e| self.refuse(method, &peer.name(), e))
    }

    /// The status of `e`; denials are logged with who and what.
    fn refuse(&self, method: &str, who: &str, e: Error) -> Status {
        if e.kind() == ErrorKind::PermissionDenied {
            tracing::warn!(caller = %who, method, reason = %e.facts().reason, "denied: {}", e.chain());
        } else if e.kind() == ErrorKind::Internal {
            tracing::error!(caller = %who, method, "failed: {}", e.chain());
        } else {
            tracing::debug!(caller = %who, method, "refused: {}", e.chain());
        }
        e.into_status_in(ERROR_DOMAIN)
    }

    /// Runs `f` for the caller of `req` on a blocking thread; maps the error.
    async fn call<R, T: Send + 'static>(
        &self,
        req: &Request<R>,
        method: &'static str,
        f: impl FnOnce(Arc<Repo>, Principal) -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, Status> {
        let who = self.principal(req, method)?;
        let shown = who.describe();
        let repo = self.repo.clone();
        blocking(move || f(repo, who))
            .await
            .map_err(|e| self.refuse(method, &shown, e))
    }
}

#[tonic::async_trait]
impl pb::chunk_service_server::ChunkService for RepoService {
    async fn begin_upload(
        &self,
        req: Request<pb::BeginUploadRequest>,
    ) -> std::result::Result<Response<pb::Upload>, Status> {
        let r = req.get_ref().clone();
        let up = self
            .call(&req, "BeginUpload", move |repo, who| {
                let project = parse_parent(&r.parent, false)?.unwrap_or_default();
                let meta = UploadMeta {
                    image_name: r.image_name,
                    tag: r.tag,
                    virtual_size: r.virtual_size_bytes,
                    source_format: r.source_format,
                    consistency: r.consistency,
                    description: r.description,
                    source_domain: r.source_domain,
                    source_host: r.source_host,
                    os_type: r.os_type,
                    os_version: r.os_version,
                    architecture: r.architecture,
                    licensed: r.licensed,
                    import: r.kind == pb::UploadKind::Import as i32,
                };
                repo.catalog
                    .begin_upload(&who, &project, &r.request_id, meta)
            })
            .await?;
        Ok(Response::new(upload_pb(&up)))
    }

    async fn find_missing_chunks(
        &self,
        req: Request<pb::FindMissingChunksRequest>,
    ) -> std::result::Result<Response<pb::FindMissingChunksResponse>, Status> {
        let r = req.get_ref().clone();
        let missing = self
            .call(&req, "FindMissingChunks", move |repo, who| {
                let u = UploadRef::parse(&r.upload, "upload")?;
                let digests = r
                    .digests
                    .iter()
                    .map(|d| parse_digest(d, "digests"))
                    .collect::<Result<Vec<_>>>()?;
                let _g = repo.gate.read().unwrap_or_else(|p| p.into_inner());
                repo.catalog.find_missing(&who, &u, &digests)
            })
            .await?;
        Ok(Response::new(pb::FindMissingChunksResponse {
            missing: missing.iter().map(hex::encode).collect(),
        }))
    }

    async fn put_chunks(
        &self,
        req: Request<tonic::Streaming<pb::PutChunksRequest>>,
    ) -> std::result::Result<Response<pb::PutChunksResponse>, Status> {
        const M: &str = "PutChunks";
        let who = self.principal(&req, M)?;
        let shown = who.describe();
        let fail = |e: Error| self.refuse(M, &shown, e);
        let mut stream = req.into_inner();
        let mut upload: Option<UploadRef> = None;
        let mut cur: Option<(crate::repo::Digest, Vec<u8>)> = None;
        let mut out = pb::PutChunksResponse::default();
        while let Some(msg) = stream.message().await? {
            if !msg.upload.is_empty() {
                let u = UploadRef::parse(&msg.upload, "upload").map_err(fail)?;
                match &upload {
                    Some(have) if *have != u => {
                        return Err(fail(
                            invalid(format!(
                                "one PutChunks stream serves one upload: {} then {}",
                                have.name(),
                                u.name()
                            ))
                            .with_field("upload"),
                        ))
                    }
                    Some(_) => {}
                    None => {
                        let (repo, w, u2) = (self.repo.clone(), who.clone(), u.clone());
                        blocking(move || repo.catalog.check_open(&w, &u2))
                            .await
                            .map_err(fail)?;
                        upload = Some(u);
                    }
                }
            }
            let Some(u) = upload.clone() else {
                return Err(fail(
                    invalid("the first PutChunks message must name the upload")
                        .with_field("upload"),
                ));
            };
            if msg.data.len() > MAX_PIECE {
                return Err(fail(
                    invalid(format!(
                        "a piece of {} bytes: pieces are at most {MAX_PIECE} bytes",
                        msg.data.len()
                    ))
                    .with_reason("PIECE_TOO_LARGE")
                    .with_field("data"),
                ));
            }
            if !msg.digest.is_empty() {
                if let Some((d, _)) = &cur {
                    return Err(fail(
                        invalid(format!(
                            "chunk {} ended without a piece with `last` set before chunk {} began",
                            hex::encode(d),
                            msg.digest
                        ))
                        .with_field("last"),
                    ));
                }
                let d = parse_digest(&msg.digest, "digest").map_err(fail)?;
                cur = Some((d, Vec::with_capacity(msg.data.len())));
            }
            let Some((d, buf)) = cur.as_mut() else {
                return Err(fail(
                    invalid("a chunk's first piece must name its digest").with_field("digest"),
                ));
            };
            if msg.offset != buf.len() as u64 {
                return Err(fail(
                    invalid(format!(
                        "chunk {}: piece at offset {}, expected {} (pieces come in order)",
                        hex::encode(*d),
                        msg.offset,
                        buf.len()
                    ))
                    .with_field("offset"),
                ));
            }
            buf.extend_from_slice(&msg.data);
            if buf.len() as u64 > CHUNK_SIZE {
                return Err(fail(
                    invalid(format!(
                        "chunk {} is longer than {CHUNK_SIZE} bytes",
                        hex::encode(*d)
                    ))
                    .with_reason("CHUNK_TOO_LARGE")
                    .with_field("data"),
                ));
            }
            if msg.last {
                let (d, data) = cur.take().expect("a chunk is under way");
                let repo = self.repo.clone();
                let stored = blocking(move || {
                    verify(&d, &data)?;
                    let _g = repo.gate.read().unwrap_or_else(|p| p.into_inner());
                    let present = repo.catalog.chunk_known(&d)? && repo.chunks.has(&d)?;
                    if !present {
                        repo.chunks.put(&d, &data)?;
                    }
                    repo.catalog.chunk_stored(&u, &d, data.len() as u64)?;
                    Ok((!present, data.len() as u64))
                })
                .await
                .map_err(fail)?;
                match stored {
                    (true, n) => {
                        out.chunks_stored += 1;
                        out.bytes_stored += n;
                    }
                    (false, _) => out.chunks_present += 1,
                }
            }
        }
        if let Some((d, _)) = cur {
            return Err(fail(
                invalid(format!(
                    "the stream ended inside chunk {} (no piece with `last` set)",
                    hex::encode(d)
                ))
                .with_field("last"),
            ));
        }
        Ok(Response::new(out))
    }

    async fn add_manifest_entries(
        &self,
        req: Request<pb::AddManifestEntriesRequest>,
    ) -> std::result::Result<Response<pb::AddManifestEntriesResponse>, Status> {
        let r = req.get_ref().clone();
        let n = self
            .call(&req, "AddManifestEntries", move |repo, who| {
                let u = UploadRef::parse(&r.upload, "upload")?;
                let entries = r
                    .entries
                    .iter()
                    .map(|e| {
                        Ok(DataChunk {
                            index: e.index,
                            digest: parse_digest(&e.digest, "entries.digest")?,
                            mask: e.cluster_mask,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                repo.catalog.add_entries(&who, &u, &entries)
            })
            .await?;
        Ok(Response::new(pb::AddManifestEntriesResponse { entries: n }))
    }

    async fn commit_upload(
        &self,
        req: Request<pb::CommitUploadRequest>,
    ) -> std::result::Result<Response<pb::Image>, Status> {
        let r = req.get_ref().clone();
        let v = self
            .call(&req, "CommitUpload", move |repo, who| {
                let u = UploadRef::parse(&r.upload, "upload")?;
                if r.content_digest.is_empty() {
                    return Err(invalid("content_digest is required").with_field("content_digest"));
                }
                let store = repo.chunks.clone();
                let catalog = repo.catalog.clone();
                repo.catalog
                    .commit(&who, &u, &r.content_digest, move |entries| {
                        // The catalog's record of a chunk is not trusted blindly: a file lost
                        // (a power cut before it reached the disk) is asked for again.
                        for e in entries {
                            if !store.has(&e.digest)? {
                                catalog.forget_chunk(&e.digest)?;
                                return Err(precondition(format!(
                                    "chunk {} is recorded but its file is gone: send it again and \
                                 commit again",
                                    hex::encode(e.digest)
                                ))
                                .with_reason("CHUNK_MISSING")
                                .with_subject(format!("chunks/{}", hex::encode(e.digest))));
                            }
                        }
                        store.sync()
                    })
            })
            .await?;
        Ok(Response::new(image_pb(&v)))
    }

    async fn abort_upload(
        &self,
        req: Request<pb::AbortUploadRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let r = req.get_ref().clone();
        self.call(&req, "AbortUpload", move |repo, who| {
            let u = UploadRef::parse(&r.upload, "upload")?;
            repo.catalog.abort_upload(&who, &u, &r.reason)
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn get_upload(
        &self,
        req: Request<pb::GetUploadRequest>,
    ) -> std::result::Result<Response<pb::Upload>, Status> {
        let r = req.get_ref().clone();
        let up = self
            .call(&req, "GetUpload", move |repo, who| {
                let u = UploadRef::parse(&r.name, "name")?;
                repo.catalog.get_upload(&who, &u)
            })
            .await?;
        Ok(Response::new(upload_pb(&up)))
    }

    type GetManifestStream = BoxStream<pb::GetManifestResponse>;

    async fn get_manifest(
        &self,
        req: Request<pb::GetManifestRequest>,
    ) -> std::result::Result<Response<Self::GetManifestStream>, Status> {
        let r = req.get_ref().clone();
        let (v, entries) = self
            .call(&req, "GetManifest", move |repo, who| {
                let i = ImageRef::parse(&r.name, "name")?;
                repo.catalog.manifest(&who, &i)
            })
            .await?;
        let header = pb::ManifestHeader {
            virtual_size_bytes: v.image.virtual_size,
            chunk_size_bytes: CHUNK_SIZE as u32,
            data_chunk_count: entries.len() as u64,
            content_digest: v.image.content_digest.clone(),
        };
        let mut msgs = vec![pb::GetManifestResponse {
            header: Some(header),
            entries: vec![],
        }];
        for batch in entries.chunks(MANIFEST_BATCH) {
            msgs.push(pb::GetManifestResponse {
                header: None,
                entries: batch
                    .iter()
                    .map(|e| pb::ManifestEntry {
                        index: e.index,
                        digest: hex::encode(e.digest),
                        cluster_mask: e.mask,
                    })
                    .collect(),
            });
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(
            msgs.into_iter().map(Ok),
        ))))
    }

    type GetChunkStream = BoxStream<pb::GetChunkResponse>;

    async fn get_chunk(
        &self,
        req: Request<pb::GetChunkRequest>,
    ) -> std::result::Result<Response<Self::GetChunkStream>, Status> {
        let r = req.get_ref().clone();
        let data = self
            .call(&req, "GetChunk", move |repo, who| {
                let i = ImageRef::parse(&r.image, "image")?;
                let d = parse_digest(&r.digest, "digest")?;
                repo.catalog.may_read_chunk(&who, &i, &d)?;
                let mut buf = Vec::new();
                repo.chunks.read(&d, &mut buf)?;
                Ok(buf)
            })
            .await?;
        let pieces: Vec<_> = data
            .chunks(MAX_PIECE)
            .enumerate()
            .map(|(i, p)| {
                Ok(pb::GetChunkResponse {
                    offset: (i * MAX_PIECE) as u64,
                    data: p.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(pieces))))
    }
}

#[tonic::async_trait]
impl pb::image_catalog_server::ImageCatalog for RepoService {
    async fn get_image(
        &self,
        req: Request<pb::GetImageRequest>,
    ) -> std::result::Result<Response<pb::Image>, Status> {
        let r = req.get_ref().clone();
        let v = self
            .call(&req, "GetImage", move |repo, who| {
                repo.catalog
                    .get_image(&who, &ImageRef::parse(&r.name, "name")?)
            })
            .await?;
        Ok(Response::new(image_pb(&v)))
    }

    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> std::result::Result<Response<pb::ListImagesResponse>, Status> {
        let r = req.get_ref().clone();
        let (views, next) = self
            .call(&req, "ListImages", move |repo, who| {
                repo.catalog.list_images(
                    &who,
                    &ListQuery {
                        parent: if r.parent.is_empty() {
                            "projects/-".into()
                        } else {
                            r.parent
                        },
                        filter: r.filter,
                        show_deleted: r.show_deleted,
                        page_size: r.page_size,
                        page_token: r.page_token,
                    },
                )
            })
            .await?;
        Ok(Response::new(pb::ListImagesResponse {
            images: views.iter().map(image_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn update_image(
        &self,
        req: Request<pb::UpdateImageRequest>,
    ) -> std::result::Result<Response<pb::Image>, Status> {
        let r = req.get_ref().clone();
        let v = self
            .call(&req, "UpdateImage", move |repo, who| {
                let img = r
                    .image
                    .ok_or_else(|| invalid("image is required").with_field("image"))?;
                let i = ImageRef::parse(&img.name, "image.name")?;
                let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
                if paths.is_empty() {
                    return Err(invalid(
                        "update_mask is required: display_name, description or licensed",
                    )
                    .with_field("update_mask"));
                }
                let (mut dn, mut desc, mut lic) = (None, None, None);
                for p in &paths {
                    match p.as_str() {
                        "display_name" => dn = Some(img.display_name.as_str()),
                        "description" => desc = Some(img.description.as_str()),
                        "licensed" => lic = Some(img.licensed),
                        other => {
                            return Err(invalid(format!(
                                "update_mask: {other:?} cannot be changed; display_name, \
                                 description and licensed can"
                            ))
                            .with_field("update_mask"))
                        }
                    }
                }
                repo.catalog.update_image(&who, &i, dn, desc, lic)
            })
            .await?;
        Ok(Response::new(image_pb(&v)))
    }

    async fn delete_image(
        &self,
        req: Request<pb::DeleteImageRequest>,
    ) -> std::result::Result<Response<pb::Image>, Status> {
        let r = req.get_ref().clone();
        let v = self
            .call(&req, "DeleteImage", move |repo, who| {
                repo.catalog
                    .delete_image(&who, &ImageRef::parse(&r.name, "name")?)
            })
            .await?;
        Ok(Response::new(image_pb(&v)))
    }

    async fn batch_delete_images(
        &self,
        req: Request<pb::BatchDeleteImagesRequest>,
    ) -> std::result::Result<Response<pb::BatchDeleteImagesResponse>, Status> {
        let r = req.get_ref().clone();
        let outcomes = self
            .call(&req, "BatchDeleteImages", move |repo, who| {
                if r.names.len() > 1000 {
                    return Err(invalid(format!(
                        "{} names: at most 1000 a call",
                        r.names.len()
                    ))
                    .with_field("names"));
                }
                Ok(r.names
                    .iter()
                    .map(|n| {
                        let res = ImageRef::parse(n, "names")
                            .and_then(|i| repo.catalog.delete_image(&who, &i));
                        match res {
                            Ok(_) => pb::DeleteOutcome {
                                name: n.clone(),
                                code: 0,
                                message: String::new(),
                                reason: String::new(),
                            },
                            Err(e) => {
                                if e.kind() == ErrorKind::PermissionDenied {
                                    tracing::warn!(caller = %who.describe(), image = %n, "batch delete denied: {}", e.chain());
                                }
                                pb::DeleteOutcome {
                                    name: n.clone(),
                                    code: e.kind().grpc_code() as i32,
                                    message: e.chain(),
                                    reason: e.facts().reason,
                                }
                            }
                        }
                    })
                    .collect())
            })
            .await?;
        Ok(Response::new(pb::BatchDeleteImagesResponse { outcomes }))
    }

    async fn undelete_image(
        &self,
        req: Request<pb::UndeleteImageRequest>,
    ) -> std::result::Result<Response<pb::Image>, Status> {
        let r = req.get_ref().clone();
        let v = self
            .call(&req, "UndeleteImage", move |repo, who| {
                repo.catalog
                    .undelete_image(&who, &ImageRef::parse(&r.name, "name")?)
            })
            .await?;
        Ok(Response::new(image_pb(&v)))
    }

    async fn purge_image(
        &self,
        req: Request<pb::PurgeImageRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let r = req.get_ref().clone();
        self.call(&req, "PurgeImage", move |repo, who| {
            repo.catalog
                .purge_image(&who, &ImageRef::parse(&r.name, "name")?)
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn mark_image_in_use(
        &self,
        req: Request<pb::MarkImageInUseRequest>,
    ) -> std::result::Result<Response<pb::Image>, Status> {
        let r = req.get_ref().clone();
        let v = self
            .call(&req, "MarkImageInUse", move |repo, who| {
                repo.catalog
                    .mark_in_use(&who, &ImageRef::parse(&r.name, "name")?, &r.user)
            })
            .await?;
        Ok(Response::new(image_pb(&v)))
    }

    async fn clear_image_in_use(
        &self,
        req: Request<pb::ClearImageInUseRequest>,
    ) -> std::result::Result<Response<pb::Image>, Status> {
        let r = req.get_ref().clone();
        let v = self
            .call(&req, "ClearImageInUse", move |repo, who| {
                repo.catalog
                    .clear_in_use(&who, &ImageRef::parse(&r.name, "name")?)
            })
            .await?;
        Ok(Response::new(image_pb(&v)))
    }

    async fn add_image_member(
        &self,
        req: Request<pb::AddImageMemberRequest>,
    ) -> std::result::Result<Response<pb::ImageMember>, Status> {
        let r = req.get_ref().clone();
        let m = self
            .call(&req, "AddImageMember", move |repo, who| {
                repo.catalog.add_member(
                    &who,
                    &ImageRef::parse(&r.parent, "parent")?,
                    &r.member_project,
                )
            })
            .await?;
        Ok(Response::new(member_pb(&m)))
    }

    async fn remove_image_member(
        &self,
        req: Request<pb::RemoveImageMemberRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let r = req.get_ref().clone();
        self.call(&req, "RemoveImageMember", move |repo, who| {
            let (i, m) = parse_member(&r.name)?;
            repo.catalog.remove_member(&who, &i, &m)
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn list_image_members(
        &self,
        req: Request<pb::ListImageMembersRequest>,
    ) -> std::result::Result<Response<pb::ListImageMembersResponse>, Status> {
        let r = req.get_ref().clone();
        let (members, next) = self
            .call(&req, "ListImageMembers", move |repo, who| {
                repo.catalog.list_members(
                    &who,
                    &ImageRef::parse(&r.parent, "parent")?,
                    r.page_size,
                    &r.page_token,
                )
            })
            .await?;
        Ok(Response::new(pb::ListImageMembersResponse {
            members: members.iter().map(member_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn update_image_membership(
        &self,
        req: Request<pb::UpdateImageMembershipRequest>,
    ) -> std::result::Result<Response<pb::ImageMember>, Status> {
        let r = req.get_ref().clone();
        let m = self
            .call(&req, "UpdateImageMembership", move |repo, who| {
                let (i, member) = parse_member(&r.name)?;
                let state = match pb::MemberState::try_from(r.state) {
                    Ok(pb::MemberState::Accepted) => MemberState::Accepted,
                    Ok(pb::MemberState::Rejected) => MemberState::Rejected,
                    _ => {
                        return Err(
                            invalid("state must be ACCEPTED or REJECTED").with_field("state")
                        )
                    }
                };
                repo.catalog.update_membership(&who, &i, &member, state)
            })
            .await?;
        Ok(Response::new(member_pb(&m)))
    }

    async fn get_project_quota(
        &self,
        req: Request<pb::GetProjectQuotaRequest>,
    ) -> std::result::Result<Response<pb::ProjectQuota>, Status> {
        let r = req.get_ref().clone();
        let (name, q) = self
            .call(&req, "GetProjectQuota", move |repo, who| {
                let p = quota_project(&r.name, "name")?;
                Ok((r.name.clone(), repo.catalog.quota(&who, &p)?))
            })
            .await?;
        Ok(Response::new(pb::ProjectQuota {
            name,
            image_limit: q.image_limit,
            image_count: q.image_count,
        }))
    }

    async fn update_project_quota(
        &self,
        req: Request<pb::UpdateProjectQuotaRequest>,
    ) -> std::result::Result<Response<pb::ProjectQuota>, Status> {
        let r = req.get_ref().clone();
        let (name, q) = self
            .call(&req, "UpdateProjectQuota", move |repo, who| {
                let q = r
                    .quota
                    .ok_or_else(|| invalid("quota is required").with_field("quota"))?;
                let p = quota_project(&q.name, "quota.name")?;
                Ok((
                    q.name.clone(),
                    repo.catalog.set_quota(&who, &p, q.image_limit)?,
                ))
            })
            .await?;
        Ok(Response::new(pb::ProjectQuota {
            name,
            image_limit: q.image_limit,
            image_count: q.image_count,
        }))
    }

    async fn create_download_link(
        &self,
        req: Request<pb::CreateDownloadLinkRequest>,
    ) -> std::result::Result<Response<pb::DownloadLink>, Status> {
        use super::download::{try_image_len, LinkClaim, LinkFormat, DOWNLOAD_PATH};
        let r = req.get_ref().clone();
        let link = self
            .call(&req, "CreateDownloadLink", move |repo, who| {
                let i = ImageRef::parse(&r.name, "name")?;
                let format = match pb::ImageFormat::try_from(r.format) {
                    Ok(pb::ImageFormat::Unspecified | pb::ImageFormat::Raw) => LinkFormat::Raw,
                    Ok(pb::ImageFormat::Qcow2) => LinkFormat::Qcow2,
                    Err(_) => {
                        return Err(invalid(format!("format: {} is not a format", r.format))
                            .with_field("format"))
                    }
                };
                let ttl = match &r.ttl {
                    None => LINK_TTL_DEFAULT,
                    Some(d)
                        if d.seconds >= 60 && d.seconds <= LINK_TTL_MAX as i64 && d.nanos >= 0 =>
                    {
                        d.seconds as u64
                    }
                    Some(d) => {
                        return Err(invalid(format!(
                            "ttl: {} s is outside 60 s to {} s (7 days)",
                            d.seconds, LINK_TTL_MAX
                        ))
                        .with_field("ttl"))
                    }
                };
                let Some(links) = repo.links.get() else {
                    return Err(precondition(
                        "this repository serves no download links: set [download] \
                         download_listen in its config",
                    )
                    .with_reason("DOWNLOADS_DISABLED"));
                };
                // Refusals as everywhere: the caller must be able to use the image.
                let (v, entries) = repo.catalog.manifest(&who, &i)?;
                let size = try_image_len(&v.image.name(), v.image.virtual_size, &entries, format)?;
                let expires = crate::util::now_unix().max(0) as u64 + ttl;
                let token = links.signer.sign(&LinkClaim {
                    image: v.image.name(),
                    content_digest: v.image.content_digest.clone(),
                    format,
                    expires_unix: expires,
                });
                tracing::info!(image = %v.image.name(), format = format.as_str(), ttl_secs = ttl,
                    "download link made");
                Ok(pb::DownloadLink {
                    url: format!("{}{DOWNLOAD_PATH}{token}", links.base_url),
                    expire_time: ts(expires as i64),
                    size_bytes: size,
                    format: match format {
                        LinkFormat::Raw => pb::ImageFormat::Raw,
                        LinkFormat::Qcow2 => pb::ImageFormat::Qcow2,
                    } as i32,
                })
            })
            .await?;
        Ok(Response::new(link))
    }

    async fn run_garbage_collection(
        &self,
        req: Request<pb::RunGarbageCollectionRequest>,
    ) -> std::result::Result<Response<pb::GarbageCollectionReport>, Status> {
        let r = self
            .call(&req, "RunGarbageCollection", move |repo, who| {
                if who != Principal::Admin {
                    return Err(denied("only an admin may run the garbage collector")
                        .with_reason("ADMIN_ONLY"));
                }
                super::gc::collect(
                    &repo.catalog,
                    repo.chunks.as_ref(),
                    &repo.gate,
                    &repo.gc,
                    crate::util::now_unix(),
                )
            })
            .await?;
        Ok(Response::new(pb::GarbageCollectionReport {
            images_purged: r.images_purged,
            uploads_aborted: r.uploads_aborted,
            chunks_removed: r.chunks_removed,
            bytes_freed: r.bytes_freed,
            orphan_files_removed: r.orphan_files_removed,
        }))
    }
}

/// The project of `projects/{p}/quota`.
fn quota_project(name: &str, field: &str) -> Result<String> {
    name.strip_prefix("projects/")
        .and_then(|r| r.strip_suffix("/quota"))
        .filter(|p| !p.is_empty() && !p.contains('/'))
        .map(str::to_string)
        .ok_or_else(|| {
            invalid(format!(
                "{field}: {name:?} is not projects/{{project}}/quota"
            ))
            .with_reason("BAD_NAME")
            .with_field(field)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_and_quota_names_parse() {
        let (i, m) = parse_member("projects/alpha/images/x1/members/beta").unwrap();
        assert_eq!(
            (i.name().as_str(), m.as_str()),
            ("projects/alpha/images/x1", "beta")
        );
        assert!(parse_member("projects/alpha/images/x1").is_err());
        assert!(parse_member("projects/alpha/images/x1/members/").is_err());
        assert_eq!(
            quota_project("projects/alpha/quota", "name").unwrap(),
            "alpha"
        );
        assert!(quota_project("projects/alpha", "name").is_err());
    }

    #[test]
    fn errors_carry_the_repository_domain_and_imaged_keeps_its_own() {
        use tonic_types::StatusExt;
        let e = || invalid("x").with_reason("DIGEST_MISMATCH");
        let st = e().into_status_in(ERROR_DOMAIN);
        let info = st.get_error_details().error_info().cloned().unwrap();
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("DIGEST_MISMATCH", "imagerepo")
        );
        let st: Status = e().into();
        let info = st.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.domain, "imaged");
    }
}
