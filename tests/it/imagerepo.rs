//! The central repository (`imagerepo`) through its gRPC API, on the real binary: the chunk
//! protocol end to end, every refusal of the catalog that belongs to the server, identities
//! from the unix socket and from client certificates, resumed uploads, the collector racing an
//! upload, and a server killed in the middle of an upload.
//!
//! Every server test runs on both catalog backends (see `on_both_backends!` at the end):
//! `NAME::sqlite` and `NAME::postgres`, the latter on the tests' own PostgreSQL cluster
//! (tests/servers/postgres.sh), which must be there: a missing one fails the test, naming
//! what is missing.

use std::time::{Duration, Instant};

use imaged::proto::imagerepo::v1 as pb;
use tonic::Code;

use crate::support::repo_server::{
    begin, capture, content_digest, finish, pieces, read_chunk, reason, Backend, Caller,
    RepoServer, TestChunk,
};

const MIB: usize = 1 << 20;
const CHUNK: u64 = 4 << 20;

/// A disk of 3 chunks: a full data chunk, a zero chunk (left out), a short last chunk.
fn disk(seed: u64) -> (u64, Vec<TestChunk>) {
    let size = 2 * CHUNK + 1000;
    (
        size,
        vec![
            TestChunk::new(0, seed, CHUNK as usize),
            TestChunk::new(2, seed + 1, 1000),
        ],
    )
}

async fn list(c: &mut Caller, parent: &str, filter: &str, show_deleted: bool) -> Vec<pb::Image> {
    c.catalog
        .list_images(c.req(pb::ListImagesRequest {
            parent: parent.into(),
            filter: filter.into(),
            show_deleted,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .images
}

async fn get(c: &mut Caller, name: &str) -> Result<pb::Image, tonic::Status> {
    c.catalog
        .get_image(c.req(pb::GetImageRequest { name: name.into() }))
        .await
        .map(|r| r.into_inner())
}

fn state(i: &pb::Image) -> pb::ImageState {
    pb::ImageState::try_from(i.state).unwrap()
}

#[test]
fn runs_with_embedded_defaults_and_refuses_unknown_keys() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imagerepo"))
        .args(["--check-config", "--config", "/nonexistent/imagerepo.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "an explicit config must exist");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[catalog]\ndefault_image_qouta = 3\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imagerepo"))
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("default_image_qouta"), "{err}");
    // No config file at the default path: the embedded defaults.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imagerepo"))
        .arg("--check-config")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("/var/lib/imagerepo/catalog.db"), "{text}");
    assert!(text.contains("/run/imagerepo/imagerepo.sock"), "{text}");
    assert!(text.contains("10 images per project"), "{text}");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_imagerepo"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("tcp_listen") && help.contains("[[policy]]"),
        "{help}"
    );
}

async fn uploads_end_to_end_send_only_missing_chunks_and_read_back(backend: Backend) {
    let srv = RepoServer::start_on(backend, "", "");
    let mut c = srv.service("alpha").await;
    let (size, chunks) = disk(1);
    let up = begin(&mut c, "alpha", "web", "", "", size).await.unwrap();
    assert_eq!(
        pb::UploadState::try_from(up.state).unwrap(),
        pb::UploadState::Open
    );
    let queued = get(&mut c, &up.image).await.unwrap();
    assert_eq!(state(&queued), pb::ImageState::Queued);
    let (img, asked) = finish(&mut c, &up.name, size, &chunks).await.unwrap();
    assert_eq!(asked, 2);
    assert_eq!(state(&img), pb::ImageState::Active);
    assert_eq!(img.content_digest, content_digest(size, &chunks));
    assert_eq!(img.stored_size_bytes, CHUNK + 1000);
    assert_eq!(img.data_chunk_count, 2);
    assert_eq!(img.display_name, "web:latest");
    assert!(srv.chunk_file(&chunks[0].digest()).exists());

    // The manifest and the chunks read back as sent.
    let mut s = c
        .chunks
        .get_manifest(c.req(pb::GetManifestRequest {
            name: img.name.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    let header = first.header.unwrap();
    assert_eq!(header.virtual_size_bytes, size);
    assert_eq!(header.data_chunk_count, 2);
    let mut entries = first.entries;
    while let Some(m) = s.message().await.unwrap() {
        entries.extend(m.entries);
    }
    assert_eq!(
        entries,
        chunks.iter().map(TestChunk::entry).collect::<Vec<_>>()
    );
    for ch in &chunks {
        assert_eq!(
            read_chunk(&mut c, &img.name, &ch.digest()).await.unwrap(),
            ch.data
        );
    }

    // A second image sharing one chunk: only the new one is asked for and stored.
    let (_, other) = disk(1);
    let changed = vec![other[0].clone(), TestChunk::new(2, 77, 1000)];
    let up2 = begin(&mut c, "alpha", "db", "", "", size).await.unwrap();
    let missing = c
        .chunks
        .find_missing_chunks(c.req(pb::FindMissingChunksRequest {
            upload: up2.name.clone(),
            digests: changed.iter().map(TestChunk::digest).collect(),
        }))
        .await
        .unwrap()
        .into_inner()
        .missing;
    assert_eq!(missing, [changed[1].digest()]);
    // Sending a present chunk anyway is accepted and counted as present.
    let r = c
        .chunks
        .put_chunks(c.req(tokio_stream::iter(pieces(
            &up2.name,
            &[&changed[0], &changed[1]],
        ))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.chunks_stored, r.chunks_present, r.bytes_stored),
        (1, 1, 1000)
    );
    let (img2, _) = finish(&mut c, &up2.name, size, &changed).await.unwrap();
    assert_eq!(state(&img2), pb::ImageState::Active);
    let all = list(&mut c, "projects/alpha", "state = \"ACTIVE\"", false).await;
    assert_eq!(
        all.iter()
            .map(|i| i.image_name.as_str())
            .collect::<Vec<_>>(),
        ["db", "web"]
    );
    // Committing again returns the image again.
    let again = c
        .chunks
        .commit_upload(c.req(pb::CommitUploadRequest {
            upload: up2.name.clone(),
            content_digest: img2.content_digest.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.name, img2.name);
}

async fn a_chunk_whose_bytes_do_not_match_its_digest_is_refused_naming_it(backend: Backend) {
    let srv = RepoServer::start_on(backend, "", "");
    let mut c = srv.service("alpha").await;
    let up = begin(&mut c, "alpha", "web", "", "", CHUNK).await.unwrap();
    let good = TestChunk::new(0, 5, 3 * MIB);
    let mut msgs = pieces(&up.name, &[&good]);
    msgs[1].data[10] ^= 0xff;
    let st = c
        .chunks
        .put_chunks(c.req(tokio_stream::iter(msgs)))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert_eq!(reason(&st), "DIGEST_MISMATCH");
    assert!(st.message().contains(&good.digest()), "{}", st.message());
    assert!(!srv.chunk_file(&good.digest()).exists());
    // A commit naming a chunk never stored.
    c.chunks
        .add_manifest_entries(c.req(pb::AddManifestEntriesRequest {
            upload: up.name.clone(),
            entries: vec![good.entry()],
        }))
        .await
        .unwrap();
    let st = c
        .chunks
        .commit_upload(c.req(pb::CommitUploadRequest {
            upload: up.name.clone(),
            content_digest: content_digest(CHUNK, std::slice::from_ref(&good)),
        }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    assert_eq!(reason(&st), "CHUNK_MISSING");
    assert!(st.message().contains(&good.digest()), "{}", st.message());
    // A wrong content digest.
    let short = TestChunk::new(0, 6, CHUNK as usize);
    let up2 = begin(&mut c, "alpha", "db", "", "", CHUNK).await.unwrap();
    c.chunks
        .put_chunks(c.req(tokio_stream::iter(pieces(&up2.name, &[&short]))))
        .await
        .unwrap();
    c.chunks
        .add_manifest_entries(c.req(pb::AddManifestEntriesRequest {
            upload: up2.name.clone(),
            entries: vec![short.entry()],
        }))
        .await
        .unwrap();
    let st = c
        .chunks
        .commit_upload(c.req(pb::CommitUploadRequest {
            upload: up2.name.clone(),
            content_digest: "ab".repeat(32),
        }))
        .await
        .unwrap_err();
    assert_eq!(reason(&st), "CONTENT_DIGEST_MISMATCH");
    // Nothing half-made is ACTIVE.
    assert!(list(&mut c, "projects/alpha", "state = \"ACTIVE\"", false)
        .await
        .is_empty());
}

async fn over_quota_is_resource_exhausted_with_the_limit(backend: Backend) {
    let srv = RepoServer::start_on(backend, "default_image_quota = 2", "");
    let mut c = srv.service("alpha").await;
    let (size, chunks) = disk(2);
    capture(&mut c, "alpha", "a", "", size, &chunks)
        .await
        .unwrap();
    capture(&mut c, "alpha", "b", "", size, &chunks)
        .await
        .unwrap();
    let st = begin(&mut c, "alpha", "c", "", "", size).await.unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted);
    assert_eq!(reason(&st), "QUOTA_EXCEEDED");
    assert!(st.message().contains("quota is 2"), "{}", st.message());
    // A project may not raise its own quota; an admin may.
    let st = c
        .catalog
        .update_project_quota(c.req(pb::UpdateProjectQuotaRequest {
            quota: Some(pb::ProjectQuota {
                name: "projects/alpha/quota".into(),
                image_limit: 5,
                image_count: 0,
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    let mut admin = srv.tls("repo-admin").await;
    let q = admin
        .catalog
        .update_project_quota(admin.req(pb::UpdateProjectQuotaRequest {
            quota: Some(pb::ProjectQuota {
                name: "projects/alpha/quota".into(),
                image_limit: 3,
                image_count: 0,
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((q.image_limit, q.image_count), (3, 2));
    capture(&mut c, "alpha", "c", "", size, &chunks)
        .await
        .unwrap();
}

async fn sharing_refusals_and_the_members_view(backend: Backend) {
    let srv = RepoServer::start_on(backend, "", "");
    let mut alpha = srv.service("alpha").await;
    let mut beta = srv.service("beta").await;
    let (size, chunks) = disk(3);
    let img = capture(&mut alpha, "alpha", "web", "", size, &chunks)
        .await
        .unwrap();

    // A project reading another's image.
    let st = get(&mut beta, &img.name).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    let st = read_chunk(&mut beta, &img.name, &chunks[0].digest())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);

    let add = |p: &str| pb::AddImageMemberRequest {
        parent: img.name.clone(),
        member_project: p.into(),
    };
    alpha
        .catalog
        .add_image_member(alpha.req(add("beta")))
        .await
        .unwrap();
    // Pending: listed under the owner's name, not usable.
    let seen = list(&mut beta, "projects/beta", "", false).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].display_name, "alpha/web:latest");
    assert_eq!(seen[0].visibility, pb::Visibility::Shared as i32);
    assert_eq!(seen[0].membership, pb::MemberState::Pending as i32);
    let st = read_chunk(&mut beta, &img.name, &chunks[0].digest())
        .await
        .unwrap_err();
    assert_eq!(reason(&st), "SHARE_NOT_ACCEPTED");
    let member = format!("{}/members/beta", img.name);
    beta.catalog
        .update_image_membership(beta.req(pb::UpdateImageMembershipRequest {
            name: member.clone(),
            state: pb::MemberState::Accepted as i32,
        }))
        .await
        .unwrap();
    assert_eq!(
        read_chunk(&mut beta, &img.name, &chunks[0].digest())
            .await
            .unwrap(),
        chunks[0].data
    );

    // A member acting as owner.
    let st = beta
        .catalog
        .delete_image(beta.req(pb::DeleteImageRequest {
            name: img.name.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st)),
        (Code::PermissionDenied, "NOT_OWNER".into())
    );
    let st = beta
        .catalog
        .add_image_member(beta.req(add("gamma")))
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st)),
        (Code::PermissionDenied, "NOT_OWNER".into())
    );
    let st = beta
        .catalog
        .update_image(beta.req(pb::UpdateImageRequest {
            image: Some(pb::Image {
                name: img.name.clone(),
                display_name: "mine now".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st)),
        (Code::PermissionDenied, "NOT_OWNER".into())
    );
    assert!(srv.log_text().contains("NOT_OWNER"), "denials are logged");

    // Rejecting an accepted image removes it from the member's list; it can accept it again.
    beta.catalog
        .update_image_membership(beta.req(pb::UpdateImageMembershipRequest {
            name: member.clone(),
            state: pb::MemberState::Rejected as i32,
        }))
        .await
        .unwrap();
    assert!(list(&mut beta, "projects/beta", "", false).await.is_empty());
    beta.catalog
        .update_image_membership(beta.req(pb::UpdateImageMembershipRequest {
            name: member,
            state: pb::MemberState::Accepted as i32,
        }))
        .await
        .unwrap();
    assert_eq!(list(&mut beta, "projects/beta", "", false).await.len(), 1);

    // The 129th member.
    for i in 1..128 {
        alpha
            .catalog
            .add_image_member(alpha.req(add(&format!("p{i}"))))
            .await
            .unwrap();
    }
    let st = alpha
        .catalog
        .add_image_member(alpha.req(add("p128")))
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st)),
        (Code::ResourceExhausted, "MEMBER_LIMIT".into())
    );

    // A licensed image cannot be shared.
    let req = alpha.req(pb::BeginUploadRequest {
        parent: "projects/alpha".into(),
        image_name: "windows".into(),
        virtual_size_bytes: size,
        licensed: true,
        ..Default::default()
    });
    let up = alpha.chunks.begin_upload(req).await.unwrap().into_inner();
    let lic = finish(&mut alpha, &up.name, size, &chunks).await.unwrap().0;
    assert!(lic.licensed);
    let st = alpha
        .catalog
        .add_image_member(alpha.req(pb::AddImageMemberRequest {
            parent: lic.name.clone(),
            member_project: "beta".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st)),
        (Code::FailedPrecondition, "IMAGE_LICENSED".into())
    );
}

async fn deleting_an_image_in_use_names_the_user_and_the_bin_restores_and_purges(backend: Backend) {
    let srv = RepoServer::start_on(backend, "", "");
    let mut c = srv.service("alpha").await;
    let (size, chunks) = disk(4);
    let a = capture(&mut c, "alpha", "a", "", size, &chunks)
        .await
        .unwrap();
    let b = capture(&mut c, "alpha", "b", "", size, &chunks)
        .await
        .unwrap();
    c.catalog
        .mark_image_in_use(c.req(pb::MarkImageInUseRequest {
            name: a.name.clone(),
            user: "domains/web1@host3".into(),
        }))
        .await
        .unwrap();
    let st = c
        .catalog
        .delete_image(c.req(pb::DeleteImageRequest {
            name: a.name.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st)),
        (Code::FailedPrecondition, "IMAGE_IN_USE".into())
    );
    assert!(
        st.message().contains("domains/web1@host3"),
        "{}",
        st.message()
    );

    // A batch: each image's outcome.
    let out = c
        .catalog
        .batch_delete_images(c.req(pb::BatchDeleteImagesRequest {
            names: vec![
                a.name.clone(),
                b.name.clone(),
                "projects/alpha/images/nope".into(),
            ],
        }))
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    assert_eq!(out[0].code, Code::FailedPrecondition as i32);
    assert_eq!(out[0].reason, "IMAGE_IN_USE");
    assert_eq!(out[1].code, 0);
    assert_eq!(out[2].code, Code::NotFound as i32);

    // The bin: listed only when asked; restored; purged.
    assert_eq!(list(&mut c, "projects/alpha", "", false).await.len(), 1);
    let bin = list(&mut c, "projects/alpha", "", true).await;
    assert_eq!(bin.len(), 2);
    let deleted = get(&mut c, &b.name).await.unwrap();
    assert_eq!(state(&deleted), pb::ImageState::Deleted);
    assert_eq!(deleted.deleted_from, pb::ImageState::Active as i32);
    let purge_at = deleted.purge_time.unwrap().seconds;
    let deleted_at = deleted.delete_time.unwrap().seconds;
    assert_eq!(purge_at - deleted_at, 7 * 86400);
    let back = c
        .catalog
        .undelete_image(c.req(pb::UndeleteImageRequest {
            name: b.name.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&back), pb::ImageState::Active);
    let st = c
        .catalog
        .purge_image(c.req(pb::PurgeImageRequest {
            name: b.name.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(reason(&st), "IMAGE_NOT_DELETED");
    c.catalog
        .delete_image(c.req(pb::DeleteImageRequest {
            name: b.name.clone(),
        }))
        .await
        .unwrap();
    c.catalog
        .purge_image(c.req(pb::PurgeImageRequest {
            name: b.name.clone(),
        }))
        .await
        .unwrap();
    assert_eq!(
        get(&mut c, &b.name).await.unwrap_err().code(),
        Code::NotFound
    );
}

async fn recapturing_a_tag_replaces_the_version_and_keeps_the_id(backend: Backend) {
    let srv = RepoServer::start_on(backend, "", "gc_grace_secs = 0");
    let mut c = srv.service("alpha").await;
    let (size, first) = disk(10);
    let v1 = capture(&mut c, "alpha", "web", "nightly", size, &first)
        .await
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let second = vec![first[0].clone(), TestChunk::new(2, 99, 1000)];
    let up = begin(&mut c, "alpha", "web", "nightly", "", size)
        .await
        .unwrap();
    assert_eq!(up.image, v1.name);
    // Until the commit the old version is served.
    assert_eq!(
        get(&mut c, &v1.name).await.unwrap().content_digest,
        v1.content_digest
    );
    let (v2, asked) = finish(&mut c, &up.name, size, &second).await.unwrap();
    assert_eq!(asked, 1, "only the changed chunk is sent");
    assert_eq!(v2.name, v1.name);
    assert_ne!(v2.content_digest, v1.content_digest);
    assert!(v2.update_time.unwrap().seconds > v1.update_time.unwrap().seconds);
    assert_eq!(
        list(&mut c, "projects/alpha", "tag = \"nightly\"", false)
            .await
            .len(),
        1
    );
    // The old version's own chunk goes to the collector; the shared one stays.
    let mut admin = srv.tls("repo-admin").await;
    let r = admin
        .catalog
        .run_garbage_collection(admin.req(pb::RunGarbageCollectionRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.chunks_removed, 1);
    assert!(!srv.chunk_file(&first[1].digest()).exists());
    assert!(srv.chunk_file(&first[0].digest()).exists());
    assert_eq!(
        read_chunk(&mut c, &v2.name, &second[1].digest())
            .await
            .unwrap(),
        second[1].data
    );
}

async fn a_resumed_upload_is_asked_only_for_missing_chunks(backend: Backend) {
    let srv = RepoServer::start_on(backend, "", "");
    let size = 4 * CHUNK;
    let chunks: Vec<TestChunk> = (0..4)
        .map(|i| TestChunk::new(i, 100 + i, CHUNK as usize))
        .collect();
    let up = {
        let mut c = srv.service("alpha").await;
        let up = begin(&mut c, "alpha", "big", "", "req-resume-1", size)
            .await
            .unwrap();
        c.chunks
            .put_chunks(c.req(tokio_stream::iter(pieces(
                &up.name,
                &[&chunks[0], &chunks[1]],
            ))))
            .await
            .unwrap();
        up
        // The connection drops here.
    };
    let mut c = srv.service("alpha").await;
    let again = begin(&mut c, "alpha", "big", "", "req-resume-1", size)
        .await
        .unwrap();
    assert_eq!(again.name, up.name);
    assert_eq!(again.chunks_received, 2);
    let (img, asked) = finish(&mut c, &again.name, size, &chunks).await.unwrap();
    assert_eq!(asked, 2);
    assert_eq!(state(&img), pb::ImageState::Active);
    // The same request id for another image is refused.
    let st = begin(&mut c, "alpha", "other", "", "req-resume-1", size)
        .await
        .unwrap_err();
    assert_eq!(reason(&st), "REQUEST_ID_REUSED");
}

async fn the_collector_keeps_the_chunks_an_open_upload_holds(backend: Backend) {
    // No grace period: only the holds protect the upload's chunks.
    let srv = RepoServer::start_on(backend, "", "gc_grace_secs = 0");
    let mut c = srv.service("alpha").await;
    let mut admin = srv.tls("repo-admin").await;
    let gc = |a: &mut Caller| {
        let mut a = a.clone();
        async move {
            a.catalog
                .run_garbage_collection(a.req(pb::RunGarbageCollectionRequest {}))
                .await
                .map(|r| r.into_inner())
        }
    };
    let size = 2 * CHUNK;
    let x = TestChunk::new(0, 500, CHUNK as usize);
    let y = TestChunk::new(1, 501, CHUNK as usize);
    // An upload sends x (no entries yet); the collector runs: x survives.
    let up = begin(&mut c, "alpha", "web", "", "", size).await.unwrap();
    c.chunks
        .put_chunks(c.req(tokio_stream::iter(pieces(&up.name, &[&x]))))
        .await
        .unwrap();
    assert_eq!(gc(&mut admin).await.unwrap().chunks_removed, 0);
    assert!(srv.chunk_file(&x.digest()).exists());
    // Another upload finds x present (held by it too); the first aborts; the collector runs:
    // x still survives, and the second commits with it.
    let up2 = begin(&mut c, "alpha", "db", "", "", size).await.unwrap();
    let missing = c
        .chunks
        .find_missing_chunks(c.req(pb::FindMissingChunksRequest {
            upload: up2.name.clone(),
            digests: vec![x.digest(), y.digest()],
        }))
        .await
        .unwrap()
        .into_inner()
        .missing;
    assert_eq!(missing, [y.digest()]);
    c.chunks
        .abort_upload(c.req(pb::AbortUploadRequest {
            upload: up.name.clone(),
            reason: String::new(),
        }))
        .await
        .unwrap();
    assert_eq!(gc(&mut admin).await.unwrap().chunks_removed, 0);
    let (img, _) = finish(&mut c, &up2.name, size, &[x.clone(), y.clone()])
        .await
        .unwrap();
    assert_eq!(state(&img), pb::ImageState::Active);
    // Once nothing references them they go.
    c.catalog
        .delete_image(c.req(pb::DeleteImageRequest {
            name: img.name.clone(),
        }))
        .await
        .unwrap();
    c.catalog
        .purge_image(c.req(pb::PurgeImageRequest {
            name: img.name.clone(),
        }))
        .await
        .unwrap();
    let r = gc(&mut admin).await.unwrap();
    assert_eq!(r.chunks_removed, 2);
    assert_eq!(r.bytes_freed, 2 * CHUNK);
    assert!(!srv.chunk_file(&x.digest()).exists());
    // Only admins run the collector.
    let st = c
        .catalog
        .run_garbage_collection(c.req(pb::RunGarbageCollectionRequest {}))
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st)),
        (Code::PermissionDenied, "ADMIN_ONLY".into())
    );
}

async fn identities_come_from_the_socket_and_client_certificates(backend: Backend) {
    let srv = RepoServer::start_on(backend, "", "");
    let (size, chunks) = disk(20);
    // A project certificate acts for its project whatever the header says.
    let mut ui = srv.tls("alpha-ui").await;
    ui.project = Some("beta".into());
    let img = capture(&mut ui, "alpha", "web", "", size, &chunks)
        .await
        .unwrap();
    assert_eq!(img.project, "alpha");
    let st = begin(&mut ui, "beta", "x", "", "", size).await.unwrap_err();
    assert_eq!(
        (st.code(), reason(&st)),
        (Code::PermissionDenied, "OTHER_PROJECT".into())
    );
    // A service must name its project.
    let mut svc = srv.service("alpha").await;
    svc.project = None;
    let st = get(&mut svc, &img.name).await.unwrap_err();
    assert_eq!(
        (st.code(), reason(&st)),
        (Code::InvalidArgument, "PROJECT_MISSING".into())
    );
    // A certificate the policy does not name has no role.
    let mut stranger = srv.tls("stranger").await;
    let st = get(&mut stranger, &img.name).await.unwrap_err();
    assert_eq!(
        (st.code(), reason(&st)),
        (Code::PermissionDenied, "ROLE_MISSING".into())
    );
    // The admin sees every project.
    let mut admin = srv.tls("repo-admin").await;
    assert_eq!(list(&mut admin, "projects/-", "", false).await.len(), 1);
    // Health is served.
    let ch = imaged::cli::connect(&srv.socket).await.unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "imagerepo.v1.ChunkService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

async fn a_repository_killed_mid_upload_resumes_and_lists_no_half_image(backend: Backend) {
    let mut srv = RepoServer::start_on(backend, "", "");
    let size = 4 * CHUNK;
    let chunks: Vec<TestChunk> = (0..4)
        .map(|i| TestChunk::new(i, 300 + i, CHUNK as usize))
        .collect();
    let mut c = srv.service("alpha").await;
    let up = begin(&mut c, "alpha", "web", "", "req-kill-1", size)
        .await
        .unwrap();
    // A PutChunks stream that sends two chunks, then half of the third, and waits.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::PutChunksRequest>(64);
    let mut put_client = c.clone();
    let req = put_client.req(tokio_stream::wrappers::ReceiverStream::new(rx));
    let put = tokio::spawn(async move { put_client.chunks.put_chunks(req).await });
    let msgs = pieces(&up.name, &[&chunks[0], &chunks[1], &chunks[2]]);
    let half = msgs.len() - 2;
    for m in msgs.into_iter().take(half) {
        tx.send(m).await.unwrap();
    }
    // Wait until the server has stored the first two.
    let t0 = Instant::now();
    loop {
        let u = c
            .chunks
            .get_upload(c.req(pb::GetUploadRequest {
                name: up.name.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if u.chunks_received == 2 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "chunks not received: {u:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.kill();
    let res = put.await.unwrap();
    assert!(res.is_err(), "the stream broke with the server");
    drop(tx);
    srv.restart();

    let mut c = srv.service("alpha").await;
    // No half image: the record is there, but not ACTIVE.
    assert!(list(&mut c, "projects/alpha", "state = \"ACTIVE\"", false)
        .await
        .is_empty());
    let rec = get(&mut c, &up.image).await.unwrap();
    assert_eq!(state(&rec), pb::ImageState::Saving);
    // The capture resumes: only what is missing is asked for.
    let again = begin(&mut c, "alpha", "web", "", "req-kill-1", size)
        .await
        .unwrap();
    assert_eq!(again.name, up.name);
    let (img, asked) = finish(&mut c, &again.name, size, &chunks).await.unwrap();
    assert_eq!(asked, 2);
    assert_eq!(state(&img), pb::ImageState::Active);
    for ch in &chunks {
        assert_eq!(
            read_chunk(&mut c, &img.name, &ch.digest()).await.unwrap(),
            ch.data
        );
    }
    // A clean stop on SIGTERM.
    assert!(srv.stop().success(), "{}", srv.log_text());
}

async fn a_recorded_chunk_whose_file_is_lost_is_asked_for_again_before_commit(backend: Backend) {
    let srv = RepoServer::start_on(backend, "", "");
    let mut c = srv.service("alpha").await;
    let (size, chunks) = disk(40);
    let up = begin(&mut c, "alpha", "web", "", "", size).await.unwrap();
    c.chunks
        .put_chunks(c.req(tokio_stream::iter(pieces(
            &up.name,
            &[&chunks[0], &chunks[1]],
        ))))
        .await
        .unwrap();
    c.chunks
        .add_manifest_entries(c.req(pb::AddManifestEntriesRequest {
            upload: up.name.clone(),
            entries: chunks.iter().map(TestChunk::entry).collect(),
        }))
        .await
        .unwrap();
    // The file is lost (a power cut before it reached the disk).
    std::fs::remove_file(srv.chunk_file(&chunks[1].digest())).unwrap();
    let st = c
        .chunks
        .commit_upload(c.req(pb::CommitUploadRequest {
            upload: up.name.clone(),
            content_digest: content_digest(size, &chunks),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), reason(&st)),
        (Code::FailedPrecondition, "CHUNK_MISSING".into())
    );
    assert!(
        st.message().contains(&chunks[1].digest()),
        "{}",
        st.message()
    );
    assert_eq!(
        state(&get(&mut c, &up.image).await.unwrap()),
        pb::ImageState::Saving
    );
    let (img, asked) = finish(&mut c, &up.name, size, &chunks).await.unwrap();
    assert_eq!(asked, 1);
    assert_eq!(state(&img), pb::ImageState::Active);
    assert_eq!(
        read_chunk(&mut c, &img.name, &chunks[1].digest())
            .await
            .unwrap(),
        chunks[1].data
    );
    // A download link checks the caller's right to the image.
    let mut beta = srv.service("beta").await;
    let st = beta
        .catalog
        .create_download_link(beta.req(pb::CreateDownloadLinkRequest {
            name: img.name.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
}

async fn the_collector_aborts_idle_uploads_and_their_records_fail(backend: Backend) {
    let srv = RepoServer::start_on(backend, "", "upload_idle_secs = 1");
    let mut c = srv.service("alpha").await;
    let mut admin = srv.tls("repo-admin").await;
    let up = begin(&mut c, "alpha", "web", "", "", CHUNK).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = admin
        .catalog
        .run_garbage_collection(admin.req(pb::RunGarbageCollectionRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.uploads_aborted, 1);
    let img = get(&mut c, &up.image).await.unwrap();
    assert_eq!(state(&img), pb::ImageState::Failed);
    assert!(
        img.failure_reason.contains("idle"),
        "{}",
        img.failure_reason
    );
    let u = c
        .chunks
        .get_upload(c.req(pb::GetUploadRequest {
            name: up.name.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pb::UploadState::try_from(u.state).unwrap(),
        pb::UploadState::Aborted
    );
    // A FAILED image can be deleted, or retried under its name.
    let again = begin(&mut c, "alpha", "web", "", "", CHUNK).await.unwrap();
    assert_eq!(again.image, up.image);
}

/// The bytes of `disk(seed)` as a raw image.
fn raw_of(size: u64, chunks: &[TestChunk]) -> Vec<u8> {
    let mut raw = vec![0u8; size as usize];
    for c in chunks {
        let at = (c.index * CHUNK) as usize;
        raw[at..at + c.data.len()].copy_from_slice(&c.data);
    }
    raw
}

async fn a_download_link_serves_raw_and_qcow2_with_ranges_until_a_recapture_ends_it(
    backend: Backend,
) {
    let srv = RepoServer::start_on(backend, "", "");
    let mut c = srv.service("alpha").await;
    // qcow2 counts whole 512-byte sectors: a disk of another size is refused for qcow2 links.
    let (odd_size, odd) = disk(40);
    let odd_img = capture(&mut c, "alpha", "odd", "", odd_size, &odd)
        .await
        .unwrap();
    let st = c
        .catalog
        .create_download_link(c.req(pb::CreateDownloadLinkRequest {
            name: odd_img.name.clone(),
            format: pb::ImageFormat::Qcow2 as i32,
            ttl: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains(&odd_img.name), "{st:?}");
    let size = 2 * CHUNK + 4096;
    let chunks = vec![
        TestChunk::new(0, 41, CHUNK as usize),
        TestChunk::new(2, 42, 4096),
    ];
    let img = capture(&mut c, "alpha", "web", "", size, &chunks)
        .await
        .unwrap();
    let raw = raw_of(size, &chunks);
    let link = |c: &mut Caller, format: pb::ImageFormat| {
        let mut c = c.clone();
        let name = img.name.clone();
        async move {
            c.catalog
                .create_download_link(c.req(pb::CreateDownloadLinkRequest {
                    name,
                    format: format as i32,
                    ttl: None,
                }))
                .await
                .map(|r| r.into_inner())
        }
    };
    let l = link(&mut c, pb::ImageFormat::Raw).await.unwrap();
    assert_eq!(l.size_bytes, size);
    let ttl = l.expire_time.unwrap().seconds - imaged::util::now_unix();
    assert!((24 * 3600 - 60..=24 * 3600).contains(&ttl), "ttl {ttl} s");
    let http = reqwest::Client::new();
    let got = http.get(&l.url).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert!(
        got.bytes().await.unwrap() == raw,
        "the raw download differs"
    );
    // A range across the hole, as a resumed download asks.
    let (a, b) = (CHUNK - 100, 2 * CHUNK + 10);
    let part = http
        .get(&l.url)
        .header("Range", format!("bytes={a}-{b}"))
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert!(part.bytes().await.unwrap() == raw[a as usize..=b as usize]);
    // A download cut off part way (the client drops the connection after some MiB), then
    // resumed from the byte it got to with `Range: bytes=N-`: the two parts are the image.
    let mut first = http.get(&l.url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let mut got = Vec::new();
    while got.len() < (CHUNK + CHUNK / 2) as usize {
        match first.chunk().await.unwrap() {
            Some(piece) => got.extend_from_slice(&piece),
            None => break,
        }
    }
    drop(first);
    assert!(
        (got.len() as u64) < size,
        "the cut came after the whole image"
    );
    let rest = http
        .get(&l.url)
        .header("Range", format!("bytes={}-", got.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), 206);
    let cr = rest
        .headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(cr, format!("bytes {}-{}/{size}", got.len(), size - 1));
    got.extend_from_slice(&rest.bytes().await.unwrap());
    assert!(got == raw, "the resumed download differs from the image");
    // A tampered token is refused.
    let mut bad = l.url.clone();
    let last = bad.pop().unwrap();
    bad.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(http.get(&bad).send().await.unwrap().status(), 403);

    // qcow2, made from the manifest while it is served, judged by qemu-img.
    let q = link(&mut c, pb::ImageFormat::Qcow2).await.unwrap();
    let body = http
        .get(&q.url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len() as u64, q.size_bytes);
    let dir = tempfile::tempdir().unwrap();
    let (qf, rf) = (dir.path().join("d.qcow2"), dir.path().join("d.raw"));
    std::fs::write(&qf, &body).unwrap();
    std::fs::write(&rf, &raw).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .args([&qf, &rf])
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Another project cannot make a link to it.
    let mut other = srv.service("beta").await;
    let st = link(&mut other, pb::ImageFormat::Raw).await.unwrap_err();
    assert!(
        matches!(st.code(), Code::PermissionDenied | Code::NotFound),
        "{st:?}"
    );
    // A TTL out of range is refused naming the field.
    let st = c
        .catalog
        .create_download_link(c.req(pb::CreateDownloadLinkRequest {
            name: img.name.clone(),
            format: 0,
            ttl: Some(prost_types::Duration {
                seconds: 8 * 24 * 3600,
                nanos: 0,
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");

    // Recapturing the tag makes a new version: the old link ends (410), never other bytes.
    let changed = vec![TestChunk::new(1, 43, CHUNK as usize)];
    capture(&mut c, "alpha", "web", "", size, &changed)
        .await
        .unwrap();
    assert_eq!(http.get(&l.url).send().await.unwrap().status(), 410);
}

/// Each test above twice: on SQLite (`…::sqlite`) and on PostgreSQL (`…::postgres`, a fresh
/// database of the tests' own cluster per server).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::Backend;

                #[tokio::test(flavor = "multi_thread")]
                async fn sqlite() {
                    super::$name(Backend::Sqlite).await
                }

                #[tokio::test(flavor = "multi_thread")]
                async fn postgres() {
                    super::$name(Backend::Postgres).await
                }
            }
        )*
    };
}

on_both_backends!(
    uploads_end_to_end_send_only_missing_chunks_and_read_back,
    a_chunk_whose_bytes_do_not_match_its_digest_is_refused_naming_it,
    over_quota_is_resource_exhausted_with_the_limit,
    sharing_refusals_and_the_members_view,
    deleting_an_image_in_use_names_the_user_and_the_bin_restores_and_purges,
    recapturing_a_tag_replaces_the_version_and_keeps_the_id,
    a_resumed_upload_is_asked_only_for_missing_chunks,
    the_collector_keeps_the_chunks_an_open_upload_holds,
    identities_come_from_the_socket_and_client_certificates,
    a_repository_killed_mid_upload_resumes_and_lists_no_half_image,
    a_recorded_chunk_whose_file_is_lost_is_asked_for_again_before_commit,
    the_collector_aborts_idle_uploads_and_their_records_fail,
    a_download_link_serves_raw_and_qcow2_with_ranges_until_a_recapture_ends_it,
);
